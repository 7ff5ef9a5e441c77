/* SHA-256's compression function with the x86 SHA extensions (SHA-NI), for native/_fast.pyx's keyed hash.

   One 64-byte block into an eight-word state, exactly as _fast.pyx's portable _compress does it (the test
   tests/adapters/test_http_fastpath.py compares both with hashlib's HMAC-SHA256). The portable code takes
   ~4,000 instructions a block, this one ~150: a check hashes its key's secret in two blocks, on every
   request whose Authorization differs from the last one's (every request, with many keys).

   nx_sha_ni_supported() asks the CPU (cpuid: SHA, SSE4.1, SSSE3) once; the function is compiled for those
   instructions alone (a target attribute), so the rest of the module keeps the build's flags and runs
   anywhere. Elsewhere (another architecture or compiler) it is a stub that says "not supported". Under
   valgrind, whose CPU does not have SHA, the portable code runs. */

#ifndef NEXUS_AUTHZ_SHA_NI_H
#define NEXUS_AUTHZ_SHA_NI_H

#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>

static int nx_sha_ni_supported(void) {
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    if (!(c & bit_SSE4_1) || !(c & bit_SSSE3)) return 0;
    if (__get_cpuid_max(0, 0) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b & bit_SHA) != 0;
}

__attribute__((target("sha,sse4.1,ssse3"))) static void nx_sha256_block_ni(
    uint32_t *state, const unsigned char *block, const uint32_t *k) {
    /* the state as the rounds instruction wants it: ABEF and CDGH */
    __m128i tmp = _mm_loadu_si128((const __m128i *)&state[0]);  /* DCBA */
    __m128i s1 = _mm_loadu_si128((const __m128i *)&state[4]);   /* HGFE */
    tmp = _mm_shuffle_epi32(tmp, 0xB1);                          /* CDAB */
    s1 = _mm_shuffle_epi32(s1, 0x1B);                            /* EFGH */
    __m128i s0 = _mm_alignr_epi8(tmp, s1, 8);                    /* ABEF */
    s1 = _mm_blend_epi16(s1, tmp, 0xF0);                         /* CDGH */
    const __m128i abef = s0, cdgh = s1;
    const __m128i swap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL); /* big-endian words */
    __m128i w[4], msg;
    int i;
    for (i = 0; i < 16; i++) {
        if (i < 4) {
            w[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(block + 16 * i)), swap);
        } else { /* words 4i..4i+3 of the schedule from the four quads before them */
            __m128i next = _mm_sha256msg1_epu32(w[i & 3], w[(i + 1) & 3]);
            next = _mm_add_epi32(next, _mm_alignr_epi8(w[(i + 3) & 3], w[(i + 2) & 3], 4));
            w[i & 3] = _mm_sha256msg2_epu32(next, w[(i + 3) & 3]);
        }
        msg = _mm_add_epi32(w[i & 3], _mm_loadu_si128((const __m128i *)(k + 4 * i)));
        s1 = _mm_sha256rnds2_epu32(s1, s0, msg);  /* two rounds */
        msg = _mm_shuffle_epi32(msg, 0x0E);
        s0 = _mm_sha256rnds2_epu32(s0, s1, msg);  /* and two more */
    }
    s0 = _mm_add_epi32(s0, abef);
    s1 = _mm_add_epi32(s1, cdgh);
    /* back to DCBA and HGFE */
    tmp = _mm_shuffle_epi32(s0, 0x1B);           /* FEBA */
    s1 = _mm_shuffle_epi32(s1, 0xB1);            /* DCHG */
    s0 = _mm_blend_epi16(tmp, s1, 0xF0);         /* DCBA */
    s1 = _mm_alignr_epi8(s1, tmp, 8);            /* HGFE */
    _mm_storeu_si128((__m128i *)&state[0], s0);
    _mm_storeu_si128((__m128i *)&state[4], s1);
}

#else

static int nx_sha_ni_supported(void) { return 0; }

static void nx_sha256_block_ni(uint32_t *state, const unsigned char *block, const uint32_t *k) {
    (void)state;
    (void)block;
    (void)k;
}

#endif

#endif
