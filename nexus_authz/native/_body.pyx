# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The request body's facts in C (see nexus_authz/native/): `request_facts`, the compiled equivalent of
nexus_authz.core.body.request_facts, which stays the reference and answers whatever this one does not.

One pass over the body validates it as JSON and reads the top-level fact keys on the way, with no Python
object built for what it skips. It answers only for the usual body: complete (not cut), at most
MAX_PARSE_BYTES, UTF-8, one JSON object whose grammar is the strict subset of what Python's json accepts (no
NaN or Infinity, depth at most MAX_DEPTH, numbers of at most MAX_NUMBER characters), whose top-level keys are
all distinct and spelled without escapes, and whose fact values need no decoding of escapes or floats. A
body over PARSE_BELOW, which the reference reads by its key scan rather than a parse, is answered only
where that scan reads what the parse does (`count_key`): no key at any depth spelled with an escape, no more
fact or blob keys than the scan's limits. The body's base64 blobs are found as that scan finds them (in
a body up to PARSE_BELOW only when it holds a blob marker, as `_blob_spans`), and its prompt estimated as
core/tokens.prompt_estimate estimates it (`_prompt_tokens`, to the token). Any other body
(invalid, duplicate keys, an escaped key, not UTF-8, NUL, cut, larger, a float max_tokens ...) is handed to
the pure reading, which answers it, refusals included: this reader can never be more lenient than the
reference (tests/test_native_body.py checks both give the same RequestFacts on generated bodies, large ones
too).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.unicode cimport PyUnicode_DecodeUTF8
from cpython.object cimport PyObject
from libc.math cimport ceil
from libc.string cimport memchr, memcmp, memcpy, memset


cdef extern from "_plain8.h":
    unsigned int _plain8 "_nx_plain8"(const unsigned char* p) nogil  # plain string bytes at p, of 8

cdef extern from "string.h":
    void* memmem(const void* haystack, size_t n, const void* needle, size_t m) nogil  # GNU (pyconfig.h)

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)
    void* PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    ctypedef Py_ssize_t Py_hash_t
    PyObject* _PyDict_GetItem_KnownHash(object d, object key, Py_hash_t hash)

from nexus_authz.core import body as _core_body
from nexus_authz.core import tokens as _tokens
from nexus_authz.core.tokens import prompt_estimate as _prompt_estimate

# Bound at import: the reference, even if a test or the composition root later rebinds the module's names.
_python_request_facts = _core_body.request_facts
_object_facts = _core_body._object_facts
cdef dict _FACTS_CACHE = _core_body._FACTS_CACHE  # emptied in place when full, never rebound

cdef Py_ssize_t PARSE_BELOW = _core_body.PARSE_BELOW
cdef Py_ssize_t MAX_PARSE_BYTES = _core_body.MAX_PARSE_BYTES
cdef int MAX_MATCHES = _core_body._MAX_MATCHES
cdef int MAX_CANDIDATES = _core_body._MAX_CANDIDATES
cdef Py_ssize_t BLOB_MIN = _core_body._BLOB_MIN
cdef double QUICK_TOKENS_PER_BYTE = _core_body.QUICK_TOKENS_PER_BYTE

cdef enum:
    MAX_BLOBS = 512  # core/body._MAX_MATCHES: the scan finds no more
    MAX_DEPTH = 64  # far below the interpreter's recursion limit, which json's own bound depends on
    MAX_TOP_KEYS = 64
    MAX_NUMBER = 64  # characters: far below the int-conversion limit (4,300 digits) json enforces
    MAX_INT_DIGITS = 18  # fits a long long

# What a value was (or FAIL: hand the body to the reference).
cdef enum:
    FAIL = -1
    V_STR = 0
    V_TRUE
    V_FALSE
    V_NULL
    V_INT
    V_FLOAT
    V_OBJ
    V_ARR

# The top-level fact keys.
cdef enum:
    K_OTHER = 0
    K_MODEL
    K_MAX_TOKENS
    K_MAX_COMPLETION_TOKENS
    K_MAX_OUTPUT_TOKENS
    K_STREAM
    K_STREAM_OPTIONS
    K_N

cdef bint PLAIN[256]  # string bytes with nothing to check: 0x20..0x7f except '"' and '\'
cdef bint HEX[256]
cdef bint SHORT_ESCAPE[256]  # after a backslash: " \ / b f n r t
cdef int _c
for _c in range(256):
    PLAIN[_c] = 0x20 <= _c < 0x80 and _c != 0x22 and _c != 0x5C
    HEX[_c] = (48 <= _c <= 57) or (65 <= _c <= 70) or (97 <= _c <= 102)
    SHORT_ESCAPE[_c] = _c in b'"\\/bfnrt'


cdef struct Reader:
    const unsigned char* p
    Py_ssize_t n
    Py_ssize_t i
    bint non_ascii
    # the last string read: its contents p[s_start:s_end], and whether it holds an escape
    Py_ssize_t s_start
    Py_ssize_t s_end
    bint esc
    # the last number read, when an integer: its value (when int_big is false: at most MAX_INT_DIGITS digits)
    long long int_value
    bint int_neg
    bint int_big
    # stream_options.include_usage (the last one: dict() keeps the last of a nested duplicate)
    bint include_usage
    # a body over PARSE_BELOW, which the reference reads by its key scan (core/body.py `_scan`), or one
    # whose blobs it looks for with that scan (`count`: a small body with a blob marker): the keys (any
    # depth) its regex matches, of them the fact keys (see count_key), and the blobs it finds
    bint large
    bint count
    int matches
    int candidates
    int nblobs
    Py_ssize_t blob_start[MAX_BLOBS]
    Py_ssize_t blob_end[MAX_BLOBS]


cdef inline bint is_ws(unsigned char c) noexcept nogil:
    return c == 0x20 or c == 0x0A or c == 0x0D or c == 0x09


cdef inline void skip_ws(Reader* r) noexcept nogil:
    while r.i < r.n and is_ws(r.p[r.i]):
        r.i += 1


cdef inline bint cont(unsigned char c) noexcept nogil:
    return 0x80 <= c <= 0xBF


cdef inline Py_ssize_t utf8_len(const unsigned char* p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """The length of the strict UTF-8 sequence at p[i] (what Python's decoder accepts), 0 if invalid."""
    cdef unsigned char c = p[i], c1, lo, hi
    if 0xC2 <= c <= 0xDF:
        return 2 if i + 1 < n and cont(p[i + 1]) else 0
    if 0xE0 <= c <= 0xEF:
        if i + 2 >= n:
            return 0
        c1 = p[i + 1]
        lo = 0xA0 if c == 0xE0 else 0x80
        hi = 0x9F if c == 0xED else 0xBF  # no surrogates
        return 3 if lo <= c1 <= hi and cont(p[i + 2]) else 0
    if 0xF0 <= c <= 0xF4:
        if i + 3 >= n:
            return 0
        c1 = p[i + 1]
        lo = 0x90 if c == 0xF0 else 0x80
        hi = 0x8F if c == 0xF4 else 0xBF  # at most U+10FFFF
        return 4 if lo <= c1 <= hi and cont(p[i + 2]) and cont(p[i + 3]) else 0
    return 0


cdef int scan_string(Reader* r) noexcept nogil:
    """The string whose opening quote is at r.i (json's strict rules: no control character, the escapes
    json knows, \\u and four hex digits). 0, or FAIL. Runs of plain text are skipped 8 bytes at a time
    (_plain8.h: a prompt's text is almost all plain), every other byte is checked one at a time."""
    cdef const unsigned char* p = r.p
    cdef Py_ssize_t i = r.i + 1, n = r.n, k
    cdef unsigned char c
    r.esc = False
    r.s_start = i
    while i < n:
        while i + 8 <= n:  # plain text, a word at a time
            k = _plain8(p + i)
            i += k
            if k < 8:
                break
        if i >= n:
            break
        c = p[i]
        if PLAIN[c]:
            i += 1
        elif c == 0x22:
            r.s_end = i
            r.i = i + 1
            return 0
        elif c == 0x5C:
            r.esc = True
            if i + 1 >= n:
                return FAIL
            c = p[i + 1]
            if c == 0x75:  # \uXXXX (a lone surrogate too: json accepts it)
                if i + 5 >= n or not (HEX[p[i + 2]] and HEX[p[i + 3]] and HEX[p[i + 4]] and HEX[p[i + 5]]):
                    return FAIL
                i += 6
            elif SHORT_ESCAPE[c]:
                i += 2
            else:
                return FAIL
        elif c < 0x20:
            return FAIL
        else:
            k = utf8_len(p, i, n)
            if k == 0:
                return FAIL
            r.non_ascii = True
            i += k
    return FAIL


cdef inline bint digit(unsigned char c) noexcept nogil:
    return 0x30 <= c <= 0x39


cdef int scan_number(Reader* r) noexcept nogil:
    """json's number grammar: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][-+]?[0-9]+)?. V_INT (r.int_value set, or
    r.int_big beyond MAX_INT_DIGITS digits), V_FLOAT, or FAIL."""
    cdef const unsigned char* p = r.p
    cdef Py_ssize_t i = r.i, n = r.n, start = r.i, int_start, int_end, j
    cdef int kind = V_INT
    cdef long long v = 0
    cdef bint neg = False
    if p[i] == 0x2D:
        neg = True
        i += 1
    if i >= n:
        return FAIL
    int_start = i
    if p[i] == 0x30:
        i += 1
    elif digit(p[i]):
        while i < n and digit(p[i]):
            i += 1
    else:
        return FAIL
    int_end = i
    if i < n and p[i] == 0x2E:
        i += 1
        if i >= n or not digit(p[i]):
            return FAIL
        while i < n and digit(p[i]):
            i += 1
        kind = V_FLOAT
    if i < n and (p[i] == 0x65 or p[i] == 0x45):
        i += 1
        if i < n and (p[i] == 0x2B or p[i] == 0x2D):
            i += 1
        if i >= n or not digit(p[i]):
            return FAIL
        while i < n and digit(p[i]):
            i += 1
        kind = V_FLOAT
    if i - start > MAX_NUMBER:
        return FAIL
    if kind == V_INT:
        r.int_neg = neg
        r.int_big = int_end - int_start > MAX_INT_DIGITS
        if not r.int_big:
            for j in range(int_start, int_end):
                v = v * 10 + (p[j] - 0x30)
        r.int_value = v
    r.i = i
    return kind


cdef inline bint literal(Reader* r, const char* word, Py_ssize_t k) noexcept nogil:
    if r.i + k <= r.n and memcmp(r.p + r.i, word, k) == 0:
        r.i += k
        return True
    return False


cdef int parse_value(Reader* r, int depth) noexcept nogil:
    """The value at r.i (no leading whitespace), r.i moved past it. Its kind, or FAIL."""
    cdef unsigned char c
    if r.i >= r.n:
        return FAIL
    c = r.p[r.i]
    if c == 0x22:
        return V_STR if scan_string(r) == 0 else FAIL
    if c == 0x7B:
        return parse_object(r, depth + 1, False)
    if c == 0x5B:
        return parse_array(r, depth + 1)
    if c == 0x74:
        return V_TRUE if literal(r, "true", 4) else FAIL
    if c == 0x66:
        return V_FALSE if literal(r, "false", 5) else FAIL
    if c == 0x6E:
        return V_NULL if literal(r, "null", 4) else FAIL
    if c == 0x2D or digit(c):
        return scan_number(r)
    return FAIL  # NaN, Infinity, -Infinity (json takes them) and anything json refuses


cdef int parse_array(Reader* r, int depth) noexcept nogil:
    if depth > MAX_DEPTH:
        return FAIL
    r.i += 1
    skip_ws(r)
    if r.i < r.n and r.p[r.i] == 0x5D:
        r.i += 1
        return V_ARR
    while True:
        if parse_value(r, depth) == FAIL:
            return FAIL
        skip_ws(r)
        if r.i >= r.n:
            return FAIL
        r.i += 1
        if r.p[r.i - 1] == 0x5D:
            return V_ARR
        if r.p[r.i - 1] != 0x2C:
            return FAIL
        skip_ws(r)


cdef int parse_object(Reader* r, int depth, bint options) noexcept nogil:
    """An object below the top level; `options`: it is stream_options (its include_usage is read)."""
    cdef Py_ssize_t key_start, key_len
    cdef bint key_esc
    cdef int kind, counted
    if depth > MAX_DEPTH:
        return FAIL
    r.i += 1
    skip_ws(r)
    if r.i < r.n and r.p[r.i] == 0x7D:
        r.i += 1
        return V_OBJ
    while True:
        if r.i >= r.n or r.p[r.i] != 0x22 or scan_string(r) == FAIL:
            return FAIL
        key_start = r.s_start
        key_len = r.s_end - r.s_start
        key_esc = r.esc
        counted = count_key(r, key_start, key_len) if r.count else K_OTHER
        if counted == FAIL:
            return FAIL
        skip_ws(r)
        if r.i >= r.n or r.p[r.i] != 0x3A:
            return FAIL
        r.i += 1
        skip_ws(r)
        kind = parse_value(r, depth)
        if kind == FAIL:
            return FAIL
        if counted == BLOB_KEY and kind == V_STR and r.s_end - r.s_start >= BLOB_MIN:
            blob_at(r, r.s_start - 1)
        if options:
            if key_esc:  # an escaped spelling of include_usage: the reference decodes it
                return FAIL
            if key_len == 13 and memcmp(r.p + key_start, b"include_usage", 13) == 0:
                r.include_usage = kind == V_TRUE
        skip_ws(r)
        if r.i >= r.n:
            return FAIL
        r.i += 1
        if r.p[r.i - 1] == 0x7D:
            return V_OBJ
        if r.p[r.i - 1] != 0x2C:
            return FAIL
        skip_ws(r)


cdef inline bint key_is(const unsigned char* p, Py_ssize_t n, const char* name, Py_ssize_t k) noexcept nogil:
    return n == k and memcmp(p, name, k) == 0


cdef enum:
    BLOB_KEY = 100  # count_key: a key whose string value the reference may read as a base64 blob


cdef void blob_at(Reader* r, Py_ssize_t q) noexcept nogil:
    """core/body.py `_blob_at` of a blob key's string value (its opening quote at q): recorded when it is a
    base64 blob (a data: URI's payload or bare base64: BLOB_MIN bytes or more up to the next quote, the
    first KB in the base64 alphabet or a backslash), from its quote to that next quote."""
    cdef const unsigned char* p = r.p
    cdef Py_ssize_t n = r.n, start = q + 1, end, stop, k
    cdef const unsigned char* at
    if start + 5 <= n and memcmp(p + start, b"data:", 5) == 0:
        stop = start + 256 if start + 256 < n else n  # bytes.find(b";base64,", start, start + 256)
        at = <const unsigned char*>memmem(p + start, stop - start, b";base64,", 8) if stop > start else NULL
        if at == NULL:
            return
        start = at - p + 8
    at = <const unsigned char*>memchr(p + start, 0x22, n - start) if start < n else NULL
    if at == NULL:
        return
    end = at - p
    if end - start < BLOB_MIN:
        return
    stop = end if end < start + 1024 else start + 1024
    for k in range(start, stop):
        if not B64_RUN[p[k]]:
            return
    if r.nblobs < MAX_BLOBS:
        r.blob_start[r.nblobs] = q
        r.blob_end[r.nblobs] = end
        r.nblobs += 1


cdef int count_key(Reader* r, Py_ssize_t ks, Py_ssize_t kl) noexcept nogil:
    """A key (at any depth) of a body the reference reads with its key scan (core/body.py `_scan`), as the
    scan sees it: its regex matches a quote, one of the fact or blob key names, a quote, whitespace and a
    colon; in valid JSON that is a key of that name, or one ending in an escaped quote and the name, so
    any key with an escape is left to the reference (FAIL). Counted as the scan counts: more than
    MAX_MATCHES keys of those names, or more than MAX_CANDIDATES fact keys, and the reference refuses the
    body as ambiguous (FAIL). The fact key's kind, BLOB_KEY for a blob key (its string value may be a blob:
    blob_at, the caller calls it), K_OTHER."""
    cdef const unsigned char* p = r.p + ks
    cdef int which
    if r.esc:
        return FAIL
    which = fact_key(p, kl)
    if which != K_OTHER:
        r.candidates += 1
    elif key_is(p, kl, "data", 4) or key_is(p, kl, "url", 3) or key_is(p, kl, "image_url", 9) or key_is(
        p, kl, "file_data", 9
    ):
        which = BLOB_KEY
    else:
        return K_OTHER
    r.matches += 1
    if r.matches > MAX_MATCHES or r.candidates > MAX_CANDIDATES:
        return FAIL
    return which


cdef int fact_key(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    if n == 5 and memcmp(p, b"model", 5) == 0:
        return K_MODEL
    if n == 1 and p[0] == 0x6E:
        return K_N
    if key_is(p, n, "stream", 6):
        return K_STREAM
    if key_is(p, n, "max_tokens", 10):
        return K_MAX_TOKENS
    if key_is(p, n, "stream_options", 14):
        return K_STREAM_OPTIONS
    if key_is(p, n, "max_completion_tokens", 21):
        return K_MAX_COMPLETION_TOKENS
    if key_is(p, n, "max_output_tokens", 17):
        return K_MAX_OUTPUT_TOKENS
    return K_OTHER


cdef struct Facts:
    Py_ssize_t model_start  # -1: no string model
    Py_ssize_t model_end
    long long cap  # -1: none
    long long n  # -1: none
    bint stream
    bint include_usage


cdef inline long long int_or_none(Reader* r, int kind) noexcept nogil:
    """core.body._int_or_none of an integer value: the value, -1 for None (negative, not an integer)."""
    if kind != V_INT:
        return -1
    if r.int_neg and r.int_value != 0:
        return -1
    return r.int_value


cdef int read_top(Reader* r, Facts* f) noexcept nogil:
    """The whole body: one object, top-level keys distinct and unescaped. 0, or FAIL."""
    cdef Py_ssize_t key_start[MAX_TOP_KEYS]
    cdef Py_ssize_t key_len[MAX_TOP_KEYS]
    cdef int nkeys = 0, j, kind, which
    cdef Py_ssize_t ks, kl
    cdef long long v
    skip_ws(r)
    if r.i >= r.n or r.p[r.i] != 0x7B:
        return FAIL
    r.i += 1
    skip_ws(r)
    if r.i < r.n and r.p[r.i] == 0x7D:
        r.i += 1
    else:
        while True:
            if r.i >= r.n or r.p[r.i] != 0x22 or scan_string(r) == FAIL or r.esc:
                return FAIL  # an escaped top-level key (`mod\u0065l`): the reference decodes it
            ks = r.s_start
            kl = r.s_end - r.s_start
            for j in range(nkeys):  # a duplicate: the reference refuses it
                if key_len[j] == kl and memcmp(r.p + key_start[j], r.p + ks, kl) == 0:
                    return FAIL
            if nkeys == MAX_TOP_KEYS:
                return FAIL
            key_start[nkeys] = ks
            key_len[nkeys] = kl
            nkeys += 1
            skip_ws(r)
            if r.i >= r.n or r.p[r.i] != 0x3A:
                return FAIL
            r.i += 1
            skip_ws(r)
            which = count_key(r, ks, kl) if r.count else fact_key(r.p + ks, kl)
            if which == FAIL:
                return FAIL
            if which == K_STREAM_OPTIONS and r.i < r.n and r.p[r.i] == 0x7B:
                r.include_usage = False
                kind = parse_object(r, 2, True)
                f.include_usage = r.include_usage
            else:
                kind = parse_value(r, 1)
            if kind == FAIL:
                return FAIL
            if which == BLOB_KEY and kind == V_STR and r.s_end - r.s_start >= BLOB_MIN:
                blob_at(r, r.s_start - 1)
            if which == K_MODEL:
                if kind == V_STR:
                    if r.esc:
                        return FAIL  # an escaped model: the reference decodes it
                    f.model_start = r.s_start
                    f.model_end = r.s_end
            elif which == K_MAX_TOKENS or which == K_MAX_COMPLETION_TOKENS or which == K_MAX_OUTPUT_TOKENS:
                if kind == V_FLOAT or (kind == V_INT and r.int_big):
                    return FAIL  # the reference reads floats (an integral float counts) and big numbers
                v = int_or_none(r, kind)
                if v > f.cap:
                    f.cap = v
            elif which == K_N:
                if kind == V_FLOAT or (kind == V_INT and r.int_big):
                    return FAIL
                f.n = int_or_none(r, kind)
            elif which == K_STREAM:
                f.stream = kind == V_TRUE
            skip_ws(r)
            if r.i >= r.n:
                return FAIL
            r.i += 1
            if r.p[r.i - 1] == 0x7D:
                break
            if r.p[r.i - 1] != 0x2C:
                return FAIL
            skip_ws(r)
    skip_ws(r)
    return 0 if r.i == r.n else FAIL  # anything after the object: json's "Extra data"


# -- the prompt estimate of a body without blobs: core/tokens.prompt_estimate(body, []) in C ---------------
# One pass over the bytes it reads (the body, or the join of its evenly spaced samples above SAMPLE_ABOVE),
# its \u escapes cut out as its regex cuts them, counting what estimate_tokens counts with its own byte-class
# table (copied); then the same double arithmetic in the same order (the build compiles with
# -ffp-contract=off: no fused multiply-add) and Python's rounding of a float (half to even: nearbyint).

cdef extern from "math.h":
    double nearbyint(double x) nogil

cdef unsigned char CLASS[256]
_classes = _tokens._CLASSES
for _c in range(256):
    CLASS[_c] = _classes[_c]
cdef double W_LETTER = _tokens._LETTER, W_WORD = _tokens._WORD, W_DIGIT = _tokens._DIGIT
cdef double W_PUNCT = _tokens._PUNCT, W_PUNCT_RUN = _tokens._PUNCT_RUN, W_NEWLINE = _tokens._NEWLINE
cdef unsigned char NON_ASCII_CLASS[9]
cdef double NON_ASCII_WEIGHT[9]
if len(_tokens._NON_ASCII) != 9:  # pragma: no cover - a new script class: add it here
    raise ImportError("core.tokens._NON_ASCII changed: update native/_body.pyx")
for _c, (_cls, _weight) in enumerate(_tokens._NON_ASCII):
    NON_ASCII_CLASS[_c] = _cls[0]
    NON_ASCII_WEIGHT[_c] = _weight
if [_e for _e, _ in _tokens._SHORT_ESCAPES] != [b"\\n", b"\\t", b'\\"']:  # pragma: no cover
    raise ImportError("core.tokens._SHORT_ESCAPES changed: update native/_body.pyx")
cdef double ESCAPED_CHAR = _tokens._ESCAPED_CHAR_TOKENS
cdef double EXCESS_N = _tokens._SHORT_ESCAPES[0][1]
cdef double EXCESS_T = _tokens._SHORT_ESCAPES[1][1]
cdef double EXCESS_Q = _tokens._SHORT_ESCAPES[2][1]
cdef Py_ssize_t SAMPLE_ABOVE = _tokens.SAMPLE_ABOVE
cdef Py_ssize_t SAMPLES = _tokens._SAMPLES
cdef Py_ssize_t SAMPLE_BYTES = _tokens._SAMPLE_BYTES
if SAMPLES * SAMPLE_BYTES > 4096:  # pragma: no cover - the sample buffer below
    raise ImportError("core.tokens' samples grew: update native/_body.pyx")
cdef long long IMAGE_TOKENS = _tokens.IMAGE_TOKENS
cdef bint B64_RUN[256]  # core/body._B64_RUN's characters
for _c in range(256):
    B64_RUN[_c] = _core_body._B64_RUN.fullmatch(bytes([_c])) is not None
cdef long long REQUEST_SYNTAX = _tokens._REQUEST_SYNTAX
cdef long long PER_MESSAGE_SYNTAX = _tokens._PER_MESSAGE_SYNTAX


cdef struct Tally:
    long long counts[256]  # remaining bytes of each class (indexed by the class's letter)
    long long words  # runs of letters and of punctuation (estimate_tokens' _runs)
    long long puncts
    long long escapes  # \u escapes cut out
    long long esc_n  # \n, \t, \" in what remains
    long long esc_t
    long long esc_q
    long long size  # bytes that remain
    bint backslash  # the text read holds a backslash (before the cut)
    bint non_ascii  # what remains holds a byte >= 0x80
    unsigned char last  # the last remaining byte


cdef void _tally(Tally* t, const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """What estimate_tokens and _unescaped_estimate count in p[:n], its \\u escapes (`\\\\u[0-9a-fA-F]{4}`,
    leftmost, not overlapping) cut out first."""
    cdef Py_ssize_t i = 0
    cdef unsigned char b, c
    while i < n:
        b = p[i]
        if b == 92:
            t.backslash = True
            if i + 5 < n and p[i + 1] == 117 and HEX[p[i + 2]] and HEX[p[i + 3]] and HEX[p[i + 4]] and HEX[p[i + 5]]:
                t.escapes += 1
                i += 6
                continue
        c = CLASS[b]
        if c == 97 and (t.size == 0 or CLASS[t.last] != 97):  # 'a': a run of letters starts
            t.words += 1
        elif c == 112 and (t.size == 0 or CLASS[t.last] != 112):  # 'p': a run of punctuation starts
            t.puncts += 1
        if t.size and t.last == 92:
            if b == 110:
                t.esc_n += 1
            elif b == 116:
                t.esc_t += 1
            elif b == 34:
                t.esc_q += 1
        if b >= 0x80:
            t.non_ascii = True
        t.counts[c] += 1
        t.size += 1
        t.last = b
        i += 1


cdef double _unescaped(Tally* t) noexcept nogil:
    """core/tokens._unescaped_estimate of the tallied text: estimate_tokens of what remains (an int), then
    with a backslash in the text its corrections, as a float."""
    cdef double total, estimate
    cdef long long tokens = 0
    cdef int k
    if t.size:
        total = (W_LETTER * <double>t.counts[97] + W_WORD * <double>t.words + W_DIGIT * <double>t.counts[100]
                 + W_PUNCT * <double>t.counts[112] + W_PUNCT_RUN * <double>t.puncts
                 + W_NEWLINE * <double>t.counts[110])
        if t.non_ascii:
            for k in range(9):
                total += NON_ASCII_WEIGHT[k] * <double>t.counts[NON_ASCII_CLASS[k]]
        tokens = <long long>nearbyint(total)
        if tokens < 1:
            tokens = 1
    if not t.backslash:
        return <double>tokens
    estimate = <double>tokens + <double>t.escapes * ESCAPED_CHAR
    estimate -= EXCESS_N * <double>t.esc_n
    estimate -= EXCESS_T * <double>t.esc_t
    estimate -= EXCESS_Q * <double>t.esc_q
    return estimate if estimate > 0.0 else 0.0


cdef long long _prompt_tokens(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """core/tokens.prompt_estimate(p[:n], []): a body without blobs."""
    cdef Tally t
    cdef unsigned char sample[4096]
    cdef Py_ssize_t step, i, roles = 0
    cdef long long estimate, syntax, half
    cdef const void* at
    memset(&t, 0, sizeof(Tally))
    if n <= SAMPLE_ABOVE:
        _tally(&t, p, n)
        estimate = <long long>nearbyint(_unescaped(&t))
    else:
        step = n // SAMPLES
        for i in range(SAMPLES):  # joined first: an escape may span two samples
            memcpy(sample + i * SAMPLE_BYTES, p + i * step, SAMPLE_BYTES)
        _tally(&t, sample, SAMPLES * SAMPLE_BYTES)
        estimate = <long long>nearbyint(_unescaped(&t) * <double>n / <double>(SAMPLES * SAMPLE_BYTES))
    i = 0
    while True:  # bytes.count(b'"role"'): not overlapping
        at = memmem(p + i, n - i, b'"role"', 6)
        if at == NULL:
            break
        roles += 1
        i = <const unsigned char*>at - p + 6
    syntax = REQUEST_SYNTAX + PER_MESSAGE_SYNTAX * roles
    half = (estimate + 1) // 2
    return estimate - syntax if estimate - syntax > half else half


cdef long long _prompt_with_blobs(Reader* r) except -1:
    """core/tokens.prompt_estimate(body, blobs): IMAGE_TOKENS a blob, the estimate of the text around them."""
    cdef unsigned char* text = <unsigned char*>PyMem_Malloc(r.n + 1)
    cdef Py_ssize_t pos = 0, o = 0, start, end
    cdef long long extra = 0
    cdef int k
    if text == NULL:
        raise MemoryError()
    try:
        for k in range(r.nblobs):
            start, end = r.blob_start[k], r.blob_end[k]
            if start < pos:
                continue
            memcpy(text + o, r.p + pos, start - pos)
            o += start - pos
            pos = end
            extra += IMAGE_TOKENS
        memcpy(text + o, r.p + pos, r.n - pos)
        o += r.n - pos
        return extra + _prompt_tokens(text, o)
    finally:
        PyMem_Free(text)


def prompt_estimate(bytes body not None):
    """core/tokens.prompt_estimate(body, []) (tests: the same int for every body)."""
    return _prompt_tokens(<const unsigned char*>PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))


cdef str _last_model = None  # the model str of the last body that named one (ASCII)


cdef str _model(const char* chars, Py_ssize_t n):
    """The model's str: the last one again when its bytes are the same (ASCII: its UTF-8 is its data), so a
    run of requests naming the same model decodes no str per request."""
    global _last_model
    cdef str last = _last_model
    if (
        last is not None
        and PyUnicode_GET_LENGTH(last) == n
        and memcmp(PyUnicode_DATA(last), chars, n) == 0
    ):
        return last
    model = PyUnicode_DecodeUTF8(chars, n, NULL)
    if PyUnicode_IS_ASCII(model):
        _last_model = model
    return model


def request_facts(body, *, bint estimate_prompt=True, bint precise=True, bint truncated=False):
    """nexus_authz.core.body.request_facts, the same RequestFacts for every input (see the module)."""
    return facts_of(body, estimate_prompt, precise, truncated)


cdef inline bint _blob_marker(const unsigned char* p, Py_ssize_t n) noexcept:
    """core/body.py `_blob_spans`' `b"base64," in body or b'"data"' in body` (glibc's memmem: ~3x
    faster than bytes' `in` on a prompt)."""
    return memmem(p, n, b"base64,", 7) != NULL or memmem(p, n, b'"data"', 6) != NULL


cdef object facts_of(object body, bint estimate_prompt, bint precise, bint truncated):
    """`request_facts` for a C caller (native/_fast.pyx): no keyword arguments to pass and parse."""
    cdef Reader r
    cdef Facts f
    cdef Py_ssize_t n
    cdef object model, cap, blobs
    cdef long long prompt, count
    if type(body) is not bytes or truncated:
        return _python_request_facts(
            body, estimate_prompt=estimate_prompt, precise=precise, truncated=truncated
        )
    n = PyBytes_GET_SIZE(body)
    if n == 0 or n > MAX_PARSE_BYTES:
        return _python_request_facts(body, estimate_prompt=estimate_prompt, precise=precise)
    r.p = <const unsigned char*>PyBytes_AS_STRING(body)
    r.n = n
    r.i = 0
    r.non_ascii = False
    r.esc = False
    r.include_usage = False
    r.large = n > PARSE_BELOW
    # the reference looks for blobs in a small body only with a marker (_blob_spans), in a large one always
    r.count = r.large or (estimate_prompt and n > BLOB_MIN and _blob_marker(r.p, n))
    r.matches = 0
    r.candidates = 0
    r.nblobs = 0
    f.model_start = -1
    f.model_end = -1
    f.cap = -1
    f.n = -1
    f.stream = False
    f.include_usage = False
    if read_top(&r, &f) == FAIL:
        return _python_request_facts(body, estimate_prompt=estimate_prompt, precise=precise)
    if not estimate_prompt:
        prompt = 0
    elif r.nblobs:  # tokens.prompt_estimate(body, blobs), in C
        prompt = _prompt_with_blobs(&r)
    elif not precise and not r.non_ascii:
        prompt = <long long>ceil(n * QUICK_TOKENS_PER_BYTE)
    else:
        prompt = _prompt_tokens(r.p, n)  # tokens.prompt_estimate(body, []), in C
    model = None
    if f.model_start >= 0:
        model = _model(PyBytes_AS_STRING(body) + f.model_start, f.model_end - f.model_start)
    cap = f.cap if f.cap >= 0 else None
    count = f.n if 1 <= f.n <= 128 else 1
    # core.body._object_facts, its cache probed here (no Python call when the shape was seen before): with
    # the last probe's key tuple and hash when the fields are the same (found by identity; no tuple made,
    # hashed and compared item by item), else a new key
    cdef PyObject* found
    if (
        _last_key is not None
        and model is _last_key_model
        and f.cap == _last_cap
        and f.stream == _last_stream
        and f.include_usage == _last_include_usage
        and count == _last_count
        and prompt == _last_prompt
    ):
        found = _PyDict_GetItem_KnownHash(_FACTS_CACHE, _last_key, _last_hash)
        if found != NULL:
            return <object>found
        return _object_facts(model, cap, f.stream, f.include_usage, count, prompt)
    key = (model, cap, f.stream, f.include_usage, count, prompt)
    facts = _FACTS_CACHE.get(key)
    _remember_key(key, model, f.cap, f.stream, f.include_usage, count, prompt)
    if facts is not None:
        return facts
    return _object_facts(model, cap, f.stream, f.include_usage, count, prompt)


# the facts cache's last key (a tuple of a model str, or None, and ints) and its fields as facts_of has them
cdef tuple _last_key = None
cdef object _last_key_model = None
cdef Py_hash_t _last_hash = 0
cdef long long _last_cap = 0, _last_count = 0, _last_prompt = 0
cdef bint _last_stream = False, _last_include_usage = False


cdef int _remember_key(tuple key, object model, long long cap, bint stream, bint include_usage, long long count,
                       long long prompt) except -1:
    global _last_key, _last_key_model, _last_hash, _last_cap, _last_count, _last_prompt, _last_stream
    global _last_include_usage
    _last_hash = hash(key)
    _last_key = key
    _last_key_model = model
    _last_cap = cap
    _last_stream = stream
    _last_include_usage = include_usage
    _last_count = count
    _last_prompt = prompt
    return 0
