/* JSON string text a word at a time: shared by the compiled scans of request bodies (_body.pyx) and
   of access-log usage records (_usage.pyx). */
#ifndef NX_PLAIN8_H
#define NX_PLAIN8_H
#include <stdint.h>
#include <string.h>

/* How many of the 8 bytes at p are plain string text (0x20..0x7F but '"' and '\\'): the offset of the
   first other byte, or 8. One unaligned load; a byte b's high bit is set in (b ^ '"') - 1 when b is '"'
   (0 - 1) or >= 0x80 (but 0xA2, whose (b ^ '\\') - 1 is 0xFD), in (b ^ '\\') - 1 when b is '\\', in
   b - 0x20 when b < 0x20 (or >= 0xA0), never for plain text; a lane borrows only when its byte is
   flagged, so no byte before the first flagged one is flagged: the lowest flag is that byte, in memory
   order (little-endian lanes). */
static inline unsigned int _nx_plain8(const unsigned char *p) {
    const uint64_t ones = 0x0101010101010101ULL;
    uint64_t x, m;
    memcpy(&x, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    x = __builtin_bswap64(x);
#endif
    m = (((x ^ (ones * 0x22)) - ones) | ((x ^ (ones * 0x5C)) - ones) | (x - ones * 0x20))
        & (ones * 0x80);
    return m ? (unsigned int)__builtin_ctzll(m) >> 3 : 8;
}

#endif
