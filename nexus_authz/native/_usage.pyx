# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The access-log entry's scans in C (see nexus_authz/native/ and adapters/als_fast.py): an accelerator of
the pure path's rules, never a second source of truth.

- `usage_snippet(metadata)`: the `nexus.usage` record the Lua tap left, read from the serialized
  `config.core.v3.Metadata` of an access-log entry (one SerializeToString instead of a walk of protobuf
  Struct objects), with its base64 decoded. The same answer as adapters/envoy_als.snippet_of for the
  "u" record; None (the caller runs snippet_of) for anything else: a cut-off stream's pieces, a value
  of an unexpected shape, base64 that is not canonical.
- `usage_span(body)`: where the top-level `"usage"` object of a whole JSON document is, after checking
  that the document is one valid JSON object (strict RFC 8259, UTF-8), as json.loads would read it.
  None whenever the answer could differ from the core's reading of the document (core/usage.py
  `StreamUsage._finish_json`): not an object, malformed, NaN/Infinity, nested deeper than MAX_DEPTH,
  a top-level key with escapes, an `"error"` object or `"type": "error"`, no `"usage"` object. The
  caller then decodes only the usage object and interprets it with the core's record readers.
- `log_entries(message)`: a serialized StreamAccessLogsMessage's HTTP entries in one pass (the gRPC
  handler takes the message serialized): per entry its request id, the x-nexus-key-id filter, the
  response's content type and encoding and `usage_snippet`'s record; an entry or message protobuf would
  read differently (a repeated field it merges, a cut-off stream's pieces, TCP entries, malformed bytes)
  is left to protobuf and the per-entry path. With `later` (the handler's call when account_run runs) a
  record's base64 is left where it is, and account_run decodes it into one reused buffer.
- `sse_usage_span(data)`: the usage record of a Lua "sse" snippet holding OpenAI's usage chunk, when
  core/usage.StreamUsage would read the snippet's usage from that record alone; `named_sse_counts`:
  the counts of a snippet of named events (an Anthropic stream's message_start and
  message_delta, merged as StreamUsage merges them; a Responses stream's final event), when it reads them
  from those events' last usage objects alone.
- `usage_counts(body, start, end)`: the counts of a usage object either span above found, when it is a
  common record (its counts plain integers, no escaped key): the members core/usage_records.record_usage
  reads, in its order of precedence, for its formulas (`usage_from_counts`); None (the core's reader
  decodes the object) for anything else.
- `account_run(items, ...)`: adapters/envoy_als.py `_account_batch`'s loop over `log_entries`' entries,
  the common entry (the record `usage_span` / `sse_usage_span` and `usage_counts` read, as
  adapters/als_fast.py takes it) accounted through native/_account.pyx `account_counts` with no Python
  frame; so is a response without usage that core/usage.StreamUsage reads as `Usage(source="none")`:
  a whole JSON error document (`document_kind`: its "error" an object or its "type" "error", a
  provider's 4xx/5xx) and a JSON response the Lua tap left no record for (the client went away first);
  and a whole event stream without a usage record (`_counted`: an OpenAI stream whose client did not ask
  for include_usage), its content deltas read as StreamUsage reads them (`stream_text`) and counted
  inline as Engine.account_response counts them; every other entry handed back to the service's
  per-entry code before anything changed.

The scans are bounded (linear in their input, no allocation but the results: `stream_text` one buffer of
its input's size, freed before it returns) and never raise on any input.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_AsLong, PyLong_FromLong
from cpython.ref cimport Py_INCREF
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memcmp, memcpy, strlen

from cpython.object cimport PyObject

from nexus_authz.native._account cimport _Tally, account_c, counted_ready, model_of_t

import zlib as _zlib


cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)
    const unsigned char* PyUnicode_1BYTE_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    bint Py_UNICODE_ISSPACE(Py_UCS4 ch)

cdef enum:
    MAX_DEPTH = 200  # deeper documents go to the pure path (json.loads' own recursion limit is ~1000)

cdef signed char B64[256]
cdef bint HEX[256]
cdef int _i
for _i in range(256):
    B64[_i] = -1
    HEX[_i] = (48 <= _i <= 57) or (65 <= _i <= 70) or (97 <= _i <= 102)
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
for _i in range(64):
    B64[<unsigned char>_ALPHABET[_i]] = _i


# -- protobuf wire format ------------------------------------------------------------------------------

cdef inline Py_ssize_t _varint(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, unsigned long long* out) noexcept:
    """Read a varint at s[i]; the index after it, or -1."""
    cdef unsigned long long v = 0
    cdef int shift = 0
    if i < n and s[i] < 0x80:  # one byte: most tags and lengths
        out[0] = s[i]
        return i + 1
    while i < n and shift < 64:
        v |= (<unsigned long long>(s[i] & 0x7F)) << shift
        if not s[i] & 0x80:
            out[0] = v
            return i + 1
        i += 1
        shift += 7
    return -1


cdef inline Py_ssize_t _varint2(const unsigned char* s, Py_ssize_t i, Py_ssize_t n,
                                unsigned long long* out) noexcept:
    """_varint, with a two-byte varint read at once too (the tags of fields 16 to 2047: _once's walk of an
    entry's common properties)."""
    if i < n and s[i] < 0x80:
        out[0] = s[i]
        return i + 1
    if i + 1 < n and s[i + 1] < 0x80:
        out[0] = (s[i] & 0x7F) | (<unsigned long long>s[i + 1] << 7)
        return i + 2
    return _varint(s, i, n, out)


cdef inline Py_ssize_t _skip(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, unsigned long long wire) noexcept:
    """Skip a field's value of wire type `wire` at s[i]; the index after it, or -1."""
    cdef unsigned long long v
    if wire == 2:  # the commonest: strings and messages
        i = _varint(s, i, n, &v)
        if i < 0 or v > <unsigned long long>(n - i):
            return -1
        return i + <Py_ssize_t>v
    if wire == 0:
        return _varint(s, i, n, &v)
    if wire == 1:
        return i + 8 if i + 8 <= n else -1
    if wire == 5:
        return i + 4 if i + 4 <= n else -1
    return -1  # groups: never in these messages


cdef struct Span:
    Py_ssize_t start
    Py_ssize_t end


cdef int _map_entry(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, Span* key, Span* value) noexcept:
    """A map entry message s[i:n] (key = field 1, string; value = field 2): their spans (value end < 0:
    absent; the last occurrence). 0; 1 when the value occurs more than once (a message value protobuf
    would merge: the caller lets protobuf read it); -1 when malformed or holding any other field."""
    cdef unsigned long long tag, length
    cdef int values = 0
    cdef Py_ssize_t k
    # the usual entry, as protobuf writes it: the key then the value, each with a one-byte length
    if n - i >= 4 and s[i] == 0x0A and s[i + 1] < 0x80:
        k = i + 2 + s[i + 1]
        if k + 2 <= n and s[k] == 0x12 and s[k + 1] < 0x80 and k + 2 + s[k + 1] == n:
            key.start = i + 2
            key.end = k
            value.start = k + 2
            value.end = n
            return 0
    key.start = key.end = 0
    value.start = value.end = -1
    while i < n:
        i = _varint(s, i, n, &tag)
        if i < 0:
            return -1
        if (tag >> 3) in (1, 2) and (tag & 7) == 2:
            i = _varint(s, i, n, &length)
            if i < 0 or length > <unsigned long long>(n - i):
                return -1
            if tag >> 3 == 1:
                key.start = i
                key.end = i + <Py_ssize_t>length
            else:
                value.start = i
                value.end = i + <Py_ssize_t>length
                values += 1
            i += <Py_ssize_t>length
        else:  # another field, or a key or value of another wire type: protobuf (upb) keeps the whole
            return -1  # entry as an unknown field of the map's message, not in the map: it decides
    return 1 if values > 1 else 0


cdef inline bint _is(const unsigned char* s, Span span, const char* word, Py_ssize_t length) noexcept:
    return span.end - span.start == length and memcmp(s + span.start, word, length) == 0


cdef inline int _map_value(const unsigned char* s, Span message, int number, const char* name,
                           Py_ssize_t length, bint message_values, Span* out) noexcept:
    """The value of key `name` in the map<string, ...> field `number` of the message at `message` (the
    last entry wins, as protobuf maps do; an entry without a value: an empty one). 1 found, 0 absent, -1
    malformed, or (`message_values`: the map's values are messages) a value protobuf would merge."""
    return _map_values(s, message, number, &name, &length, 1, message_values, out)


cdef int _map_values(const unsigned char* s, Span message, int number, const char** names,
                     const Py_ssize_t* lengths, int count, bint message_values, Span* out) noexcept:
    """_map_value of `count` names in one walk of the map: -1 as _map_value (whatever the names), else
    bit k set when names[k] is found (its value in out[k])."""
    cdef Py_ssize_t i = message.start, n = message.end
    cdef unsigned long long tag, size
    cdef Span key, value
    cdef int found = 0, entry, k
    while i < n:
        i = _varint(s, i, n, &tag)
        if i < 0:
            return -1
        if tag == ((<unsigned long long>number << 3) | 2):
            i = _varint(s, i, n, &size)
            if i < 0 or size > <unsigned long long>(n - i):
                return -1
            entry = _map_entry(s, i, i + <Py_ssize_t>size, &key, &value)
            if entry < 0 or (entry and message_values):
                return -1
            i += <Py_ssize_t>size
            for k in range(count):
                if _is(s, key, names[k], lengths[k]):
                    found |= 1 << k
                    if value.end < 0:  # no value: an empty one
                        value.start = value.end = i
                    out[k] = value
                    break
        else:
            i = _skip(s, i, n, tag & 7)
            if i < 0:
                return -1
    return found


cdef inline int _struct_field(const unsigned char* s, Span struct, const char* name, Py_ssize_t length,
                              Span* out) noexcept:
    """The Value of `name` in the Struct message at `struct` (Struct.fields: map<string, Value>, field 1)."""
    return _map_value(s, struct, 1, name, length, True, out)


cdef int _value_kind(const unsigned char* s, Span value, Span* payload, double* number) noexcept:
    """The one field set in the Value message at `value`: 2 number_value, 3 string_value, 5 struct_value,
    0 none or another kind; -1 malformed or more than one (the caller falls back)."""
    cdef Py_ssize_t i = value.start
    cdef unsigned long long tag, size
    cdef int kind = 0, seen = 0
    while i < value.end:
        i = _varint(s, i, value.end, &tag)
        if i < 0:
            return -1
        seen += 1
        if tag == ((2 << 3) | 1):
            if i + 8 > value.end:
                return -1
            memcpy(number, s + i, 8)  # little-endian double (x86-64, aarch64)
            kind = 2
            i += 8
        elif tag == ((3 << 3) | 2) or tag == ((5 << 3) | 2):
            i = _varint(s, i, value.end, &size)
            if i < 0 or size > <unsigned long long>(value.end - i):
                return -1
            payload.start = i
            payload.end = i + <Py_ssize_t>size
            kind = <int>(tag >> 3)
            i += <Py_ssize_t>size
        else:
            kind = 0
            i = _skip(s, i, value.end, tag & 7)
            if i < 0:
                return -1
    return -1 if seen > 1 else kind


cdef Py_ssize_t _b64size(const unsigned char* p, Py_ssize_t n) noexcept:
    """The size base64 p[:n] decodes to when canonical (padded to a multiple of 4 with at most two '='),
    or -1 when n is not a multiple of 4."""
    if n % 4:
        return -1
    if n == 0:
        return 0
    if p[n - 1] == 61:  # '='
        return n // 4 * 3 - (2 if p[n - 2] == 61 else 1)
    return n // 4 * 3


cdef extern from *:
    """
    #include <stdint.h>
    /* Decode `quads` whole quads of base64 at p into w, 3 bytes each, with `table` (a character's 6 bits, or
       0xFF outside the alphabet); false when a character is outside it. Two quads make one 8-byte store
       while three or more are left, then a quad makes one 4-byte store: the bytes a store writes past its
       quads' are written over by the next ones, and the caller has at least one more byte after the last. */
    static inline int _nx_b64quads(const unsigned char *p, Py_ssize_t quads, unsigned char *w,
                                   const unsigned char *table) {
        uint64_t bad = 0, a, b, c, d, e, f, g, h, v;
        uint32_t v4;
        for (; quads >= 3; quads -= 2, p += 8, w += 6) {
            a = table[p[0]];
            b = table[p[1]];
            c = table[p[2]];
            d = table[p[3]];
            e = table[p[4]];
            f = table[p[5]];
            g = table[p[6]];
            h = table[p[7]];
            bad |= a | b | c | d | e | f | g | h;
            v = (a << 58) | (b << 52) | (c << 46) | (d << 40) | (e << 34) | (f << 28) | (g << 22) | (h << 16);
    #if !(defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__)
            v = __builtin_bswap64(v);
    #endif
            memcpy(w, &v, 8);
        }
        for (; quads > 0; quads--, p += 4, w += 3) {
            a = table[p[0]];
            b = table[p[1]];
            c = table[p[2]];
            d = table[p[3]];
            bad |= a | b | c | d;
            v4 = (uint32_t)((a << 26) | (b << 20) | (c << 14) | (d << 8));
    #if !(defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__)
            v4 = __builtin_bswap32(v4);
    #endif
            memcpy(w, &v4, 4);
        }
        return !(bad & 0x80);
    }
    """
    bint _b64quads "_nx_b64quads"(const unsigned char* p, Py_ssize_t quads, unsigned char* w,
                                  const unsigned char* table) nogil


cdef bint _b64into(const unsigned char* p, Py_ssize_t n, unsigned char* w) noexcept:
    """Decode canonical base64 p[:n] (n a positive multiple of 4) into w (its _b64size bytes), as
    binascii.a2b_base64 decodes it; False when it is not canonical (w then holds any bytes). Every quad
    but the last in one pass (_b64quads), the last one (its padding) here."""
    cdef Py_ssize_t pad = 0, i = n - 4, o = (n // 4 - 1) * 3
    cdef int a, b, c, d
    if p[n - 1] == 61:  # '='
        pad = 2 if p[n - 2] == 61 else 1
    if not _b64quads(p, n // 4 - 1, w, <const unsigned char*>B64):
        return False
    a = B64[p[i]]
    b = B64[p[i + 1]]
    c = B64[p[i + 2]] if pad < 2 else 0
    d = B64[p[i + 3]] if pad < 1 else 0
    if (a | b | c | d) < 0:
        return False
    w[o] = <unsigned char>((a << 2) | (b >> 4))
    if pad < 2:
        w[o + 1] = <unsigned char>(((b & 15) << 4) | (c >> 2))
    if pad < 1:
        w[o + 2] = <unsigned char>(((c & 3) << 6) | d)
    return True


cdef object _b64decode(const unsigned char* s, Span span):
    """Canonical base64 (the alphabet, padded to a multiple of 4 with at most two '='): its bytes, as
    binascii.a2b_base64 decodes them; None otherwise (the caller falls back to the lenient decoder)."""
    cdef Py_ssize_t n = span.end - span.start
    cdef Py_ssize_t size = _b64size(s + span.start, n)
    if size <= 0:
        return b"" if size == 0 else None
    out = PyBytes_FromStringAndSize(NULL, size)
    if not _b64into(s + span.start, n, <unsigned char*>PyBytes_AS_STRING(out)):
        return None
    return out


cdef enum:
    # the record's kind (k), as _kind_code reads it
    K_UNKNOWN = 0, K_BODY = 1, K_SSE = 2, K_TAIL = 3, K_OVER = 4


cdef int _kind_code(const unsigned char* s, Span span) noexcept:
    if _is(s, span, b"body", 4):
        return K_BODY
    if _is(s, span, b"sse", 3):
        return K_SSE
    if _is(s, span, b"tail", 4):
        return K_TAIL
    if _is(s, span, b"over", 4):
        return K_OVER
    return K_UNKNOWN


cdef object _kind_name(int code):
    if code == K_BODY:
        return "body"
    if code == K_SSE:
        return "sse"
    if code == K_TAIL:
        return "tail"
    return "over"


def usage_snippet(bytes metadata):
    """(kind, data, skipped) of the Lua tap's record in a serialized Metadata, as snippet_of reads it:
    ("none", b"", 0) without the `nexus.usage` namespace or with an unknown kind; None when snippet_of
    must read it (no "u" record, an unexpected value shape, non-canonical base64)."""
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(metadata)
    cdef Span data_span
    cdef int code
    cdef long long skipped = 0
    found = _record(s, 0, PyBytes_GET_SIZE(metadata), &code, &data_span, &skipped)
    if found < 0:
        return None
    if not found:
        return ("none", b"", 0)
    data = _b64decode(s, data_span)
    if data is None:
        return None
    if code == K_UNKNOWN:
        return ("none", b"", 0)
    return (_kind_name(code), data, skipped)


cdef const char* RECORD_NAMES[3]
RECORD_NAMES[:] = [b"k", b"b", b"x"]
cdef Py_ssize_t RECORD_LENGTHS[3]
RECORD_LENGTHS[:] = [1, 1, 1]


cdef int _record(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, int* code, Span* data_span,
                 long long* skipped) noexcept:
    """The Lua tap's record in the serialized Metadata s[i:n], as usage_snippet reads it, without a Python
    object: 1 found (`code` its kind, `data_span` its base64, empty without one, `skipped` its x), 0 no
    `nexus.usage` namespace, -1 when snippet_of must read it (no "u" record, an unexpected value shape)."""
    cdef Span metadata, ns, field, payload, record, kind_span
    cdef Span fields[3]
    cdef double number = 0.0
    cdef int found = 0, kind
    metadata.start = i
    metadata.end = n
    data_span.start = data_span.end = 0
    skipped[0] = 0
    found = _map_value(s, metadata, 1, b"nexus.usage", 11, True, &ns)  # filter_metadata: map<string, Struct>
    if found < 0:
        return -1  # malformed, or a Struct protobuf would merge
    if not found:
        return 0
    found = _struct_field(s, ns, b"u", 1, &field)
    if found <= 0:
        return -1  # malformed, or a cut-off stream's pieces: snippet_of reads them
    kind = _value_kind(s, field, &record, &number)
    if kind != 5:
        return -1
    # the record's fields: k (string), b (base64 string), x (number), in one walk
    found = _map_values(s, record, 1, RECORD_NAMES, RECORD_LENGTHS, 3, True, fields)
    if found < 0:
        return -1
    kind_span.start = kind_span.end = 0
    if found & 1:
        kind = _value_kind(s, fields[0], &kind_span, &number)
        if kind < 0:
            return -1
        if kind != 3:
            kind_span.start = kind_span.end = 0
    code[0] = _kind_code(s, kind_span)
    if found & 2:
        kind = _value_kind(s, fields[1], &payload, &number)
        if kind < 0:
            return -1
        if kind == 3:
            data_span[0] = payload
    if found & 4:
        number = 0.0
        kind = _value_kind(s, fields[2], &payload, &number)
        if kind < 0:
            return -1
        if kind == 2 and 0 < number < 9007199254740992.0:  # 2**53, as envoy_als._byte_count
            skipped[0] = <long long>number
    return 1


# -- a whole StreamAccessLogsMessage ---------------------------------------------------------------------

cdef enum:
    # field numbers (envoy.service.accesslog.v3 / envoy.data.accesslog.v3)
    MSG_HTTP_LOGS = 2, MSG_TCP_LOGS = 3, LOGS_ENTRY = 1
    ENTRY_COMMON = 1, ENTRY_REQUEST = 3, ENTRY_RESPONSE = 4
    COMMON_METADATA = 17, REQUEST_ID = 9, REQUEST_HEADERS = 13, RESPONSE_HEADERS = 4


cdef int _once(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, int number, Span* out) noexcept:
    """The one occurrence of the message field `number` in the message s[i:n] (out: empty when absent).
    0, 1 more than once (protobuf merges the occurrences: the caller lets protobuf read it), -1 malformed."""
    cdef unsigned long long tag, size
    cdef int seen = 0
    out.start = out.end = 0
    while i < n:
        i = _varint2(s, i, n, &tag)
        if i < 0:
            return -1
        if tag == ((<unsigned long long>number << 3) | 2):
            i = _varint(s, i, n, &size)
            if i < 0 or size > <unsigned long long>(n - i):
                return -1
            seen += 1
            out.start = i
            out.end = i + <Py_ssize_t>size
            i = out.end
        else:
            i = _skip(s, i, n, tag & 7)
            if i < 0:
                return -1
    return 1 if seen > 1 else 0


cdef object _text(const unsigned char* s, Span span):
    """A string field's text (protobuf checks its UTF-8: an invalid one raises, and the caller lets
    protobuf read the message)."""
    return PyUnicode_DecodeUTF8(<const char*>(s + span.start), span.end - span.start, NULL)


cdef object _last_type = None  # the last content type read: the next entry's, when the same, is this str


cdef object _content_type(const unsigned char* s, Span span):
    """_text of a content type, the previous entry's str again when its bytes are the same (an ASCII str's
    bytes are its UTF-8): most entries of a message name the same type."""
    global _last_type
    cdef Py_ssize_t n = span.end - span.start
    last = _last_type
    if (last is not None and PyUnicode_GET_LENGTH(last) == n
            and memcmp(PyUnicode_1BYTE_DATA(last), s + span.start, n) == 0):
        return last
    text = _text(s, span)
    if PyUnicode_IS_ASCII(text):
        _last_type = text
    return text


cdef inline int _header(const unsigned char* s, Span headers_of, int number, const char* name, Py_ssize_t length,
                        Span* out) noexcept:
    """The value of header `name` in the map<string, string> field `number` of the message at
    `headers_of`. 1 found, 0 absent, -1 malformed."""
    return _map_value(s, headers_of, number, name, length, False, out)


cdef int _string_field(const unsigned char* s, Span message, int number, Span* out) noexcept:
    """The string field `number` of the message (the last occurrence wins, as protobuf reads it; empty when
    absent). 0, -1 malformed."""
    return -1 if _once(s, message.start, message.end, number, out) < 0 else 0


cdef const char* RESPONSE_NAMES[2]
RESPONSE_NAMES[:] = [b"content-type", b"content-encoding"]
cdef Py_ssize_t RESPONSE_LENGTHS[2]
RESPONSE_LENGTHS[:] = [12, 16]


cdef object _entry(const unsigned char* s, Py_ssize_t start, Py_ssize_t end, bint later):
    """One HTTPAccessLogEntry s[start:end]: None when nexus-authz did not admit it (no x-nexus-key-id),
    else (request_id, content_type, content_encoding, kind, data, skipped, start, end), or
    (None, None, None, None, b"", 0, start, end) when the entry is unusual (its snippet for snippet_of to
    read, a field protobuf would merge): the caller parses s[start:end] with protobuf. Raises ValueError
    when malformed. `later`: a known kind's base64 data is not decoded here: `data` is the int
    `_later(span, start)` of where it is in s, for account_run to decode (`_common`, `_whole`)."""
    cdef Span common, request, response, metadata, rid, value, data_span
    cdef Span values[2]
    cdef int found, a, b, c, code = 0
    cdef long long skipped = 0
    a = _once(s, start, end, ENTRY_COMMON, &common)
    b = _once(s, start, end, ENTRY_REQUEST, &request)
    c = _once(s, start, end, ENTRY_RESPONSE, &response)
    if a < 0 or b < 0 or c < 0:
        raise ValueError("malformed entry")
    if a or b or c:  # repeated: protobuf merges them
        return (None, None, None, None, b"", 0, start, end)
    found = _header(s, request, REQUEST_HEADERS, b"x-nexus-key-id", 14, &value)
    if found < 0:
        raise ValueError("malformed entry")
    if not found or value.end == value.start:
        return None
    if _string_field(s, request, REQUEST_ID, &rid) < 0:
        raise ValueError("malformed entry")
    request_id = _text(s, rid)
    found = _map_values(s, response, RESPONSE_HEADERS, RESPONSE_NAMES, RESPONSE_LENGTHS, 2, False, values)
    if found < 0:
        raise ValueError("malformed entry")
    content_type = _content_type(s, values[0]) if found & 1 else None
    content_encoding = _text(s, values[1]) if found & 2 else None
    found = _once(s, common.start, common.end, COMMON_METADATA, &metadata)
    if found < 0:
        raise ValueError("malformed entry")
    found = _record(s, metadata.start, metadata.end, &code, &data_span, &skipped) if found == 0 else -1
    if found < 0:  # snippet_of reads it (or protobuf merges a repeated metadata)
        return (None, None, None, None, b"", 0, start, end)
    if not found:
        return (request_id, content_type, content_encoding, "none", b"", 0, start, end)
    if (later and code != K_UNKNOWN and data_span.end > data_span.start
            and data_span.start - start < LATER_AT and data_span.end - data_span.start < LATER_SIZE):
        data = _later(data_span, start)
    else:
        data = _b64decode(s, data_span)
        if data is None:  # non-canonical: snippet_of's lenient decoder
            return (None, None, None, None, b"", 0, start, end)
        if code == K_UNKNOWN:
            return (request_id, content_type, content_encoding, "none", b"", 0, start, end)
    return (request_id, content_type, content_encoding, _kind_name(code), data, skipped, start, end)


cdef enum:
    # a record's base64 decoded later: where it starts in its entry and its size, packed in one int of one
    # 30-bit digit (read back without _PyLong_AsByteArray); any other record is decoded by the scan
    LATER_BITS = 16, LATER_AT = 1 << 14, LATER_SIZE = 1 << LATER_BITS


cdef inline object _later(Span span, Py_ssize_t entry_start):
    """The span of a record's base64 in its entry at `entry_start`, as one int (no bytes object)."""
    return PyLong_FromLong(((span.start - entry_start) << LATER_BITS) | (span.end - span.start))


cdef inline Span _span_of(tuple item):
    """The span in the message of a record's base64 that log_entries(later=True) left in `item`."""
    cdef Span span
    cdef long packed = PyLong_AsLong(item[4])
    span.start = <Py_ssize_t>item[6] + (packed >> LATER_BITS)
    span.end = span.start + (packed & (LATER_SIZE - 1))
    return span


def log_entries(bytes message not None, bint later=False):
    """The HTTP entries of a serialized StreamAccessLogsMessage, each as `_entry` reads it (None: not
    admitted), in order; None when protobuf must read the message (malformed, a field it would merge
    or choose between, a string it returns that is not UTF-8: protobuf raises or reads it its way).
    Strings it does not return are not checked for UTF-8 (protobuf would refuse the whole message over
    one; Envoy never sends such a message). `later`: for account_run only, which decodes each entry's
    base64 into one reused buffer when it reads the entry (see `_entry`)."""
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(message)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(message), i, end, count, k
    cdef Span http
    cdef unsigned long long tag, size
    if _once(s, 0, n, MSG_HTTP_LOGS, &http) != 0 or _has_field(s, n, MSG_TCP_LOGS):
        return None  # malformed, repeated, or TCP entries (or both kinds: the oneof keeps the last)
    count = _count_entries(s, http)
    if count < 0:
        return None
    out = PyList_New(count)  # made at its size (the entries counted first): no growth per entry
    k = 0
    i = http.start
    try:
        while i < http.end:
            i = _varint(s, i, http.end, &tag)
            if i < 0:
                return None
            if tag == ((LOGS_ENTRY << 3) | 2):
                i = _varint(s, i, http.end, &size)
                if i < 0 or size > <unsigned long long>(http.end - i):
                    return None
                end = i + <Py_ssize_t>size
                item = _entry(s, i, end, later)
                Py_INCREF(item)
                PyList_SET_ITEM(out, k, item)
                k += 1
                i = end
            else:
                i = _skip(s, i, http.end, tag & 7)
                if i < 0:
                    return None
    except (ValueError, UnicodeDecodeError):
        return None
    return out


cdef Py_ssize_t _count_entries(const unsigned char* s, Span http) noexcept:
    """How many HTTPAccessLogEntry fields the HTTPAccessLogEntries message at `http` holds; -1 malformed."""
    cdef Py_ssize_t i = http.start, count = 0
    cdef unsigned long long tag, size
    while i < http.end:
        i = _varint(s, i, http.end, &tag)
        if i < 0:
            return -1
        if tag == ((LOGS_ENTRY << 3) | 2):
            i = _varint(s, i, http.end, &size)
            if i < 0 or size > <unsigned long long>(http.end - i):
                return -1
            i += <Py_ssize_t>size
            count += 1
        else:
            i = _skip(s, i, http.end, tag & 7)
            if i < 0:
                return -1
    return count


cdef bint _has_field(const unsigned char* s, Py_ssize_t n, int number) noexcept:
    """Whether the message s[:n] (well-formed) has field `number` at all, of any wire type (an empty TCP
    log list too)."""
    cdef Py_ssize_t i = 0
    cdef unsigned long long tag
    while i < n:
        i = _varint(s, i, n, &tag)
        if i < 0:
            return False
        if tag >> 3 == <unsigned long long>number:
            return True
        i = _skip(s, i, n, tag & 7)
        if i < 0:
            return False
    return False


# -- JSON ----------------------------------------------------------------------------------------------

cdef inline Py_ssize_t _ws(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept:
    while i < n and (s[i] == 32 or s[i] == 10 or s[i] == 13 or s[i] == 9):
        i += 1
    return i


cdef inline bint _cont(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept:
    return i < n and (s[i] & 0xC0) == 0x80


cdef extern from "_plain8.h":
    unsigned int _plain8 "_nx_plain8"(const unsigned char* p) nogil  # plain string bytes at p, of 8


cdef inline unsigned int _utf8_len(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept:
    """The length of the UTF-8 sequence at s[i] (a byte >= 0x80) as Python's strict decoder accepts it (no
    overlong form, no surrogate, at most U+10FFFF), within s[:n]; 0 when it is invalid."""
    cdef unsigned char c = s[i]
    if 0xC2 <= c <= 0xDF:
        return 2 if _cont(s, i + 1, n) else 0
    if 0xE0 <= c <= 0xEF:
        if not (_cont(s, i + 1, n) and _cont(s, i + 2, n)):
            return 0
        if (c == 0xE0 and s[i + 1] < 0xA0) or (c == 0xED and s[i + 1] > 0x9F):
            return 0  # overlong, or a surrogate
        return 3
    if 0xF0 <= c <= 0xF4:
        if not (_cont(s, i + 1, n) and _cont(s, i + 2, n) and _cont(s, i + 3, n)):
            return 0
        if (c == 0xF0 and s[i + 1] < 0x90) or (c == 0xF4 and s[i + 1] > 0x8F):
            return 0
        return 4
    return 0


cdef Py_ssize_t _string(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, bint* escaped) noexcept:
    """A JSON string at s[i] == '"': the index after its closing quote, or -1 (invalid for json.loads
    with strict=True after a strict UTF-8 decode: control characters, bad escapes, bad UTF-8). Runs of
    plain text are skipped 8 bytes at a time (_plain8); every other byte is checked one at a time."""
    cdef unsigned char c
    cdef unsigned int k
    i += 1
    while True:
        while i + 8 <= n:  # plain text, a word at a time
            k = _plain8(s + i)
            i += k
            if k < 8:
                break
        while True:  # one byte at a time, back to words after the next plain byte
            if i >= n:
                return -1
            c = s[i]
            if c == 34:  # '"'
                return i + 1
            if c == 92:  # '\\'
                escaped[0] = True
                if i + 1 >= n:
                    return -1
                c = s[i + 1]
                if c == 117:  # 'u'
                    if i + 6 > n or not (HEX[s[i + 2]] and HEX[s[i + 3]] and HEX[s[i + 4]] and HEX[s[i + 5]]):
                        return -1
                    i += 6
                elif c in b'"\\/bfnrt':
                    i += 2
                else:
                    return -1
            elif c < 0x20:
                return -1
            elif c < 0x80:
                i += 1
                break
            else:
                k = _utf8_len(s, i, n)
                if k == 0:
                    return -1
                i += k


cdef inline Py_ssize_t _digits(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept:
    while i < n and 48 <= s[i] <= 57:
        i += 1
    return i


cdef Py_ssize_t _number(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept:
    cdef Py_ssize_t j
    if s[i] == 45:  # '-'
        i += 1
    if i >= n:
        return -1
    if s[i] == 48:
        i += 1
    elif 49 <= s[i] <= 57:
        i = _digits(s, i + 1, n)
    else:
        return -1  # -Infinity among others: the pure path decides
    if i < n and s[i] == 46:  # '.'
        j = _digits(s, i + 1, n)
        if j == i + 1:
            return -1
        i = j
    if i < n and (s[i] == 101 or s[i] == 69):  # 'e' 'E'
        i += 1
        if i < n and (s[i] == 43 or s[i] == 45):
            i += 1
        j = _digits(s, i, n)
        if j == i:
            return -1
        i = j
    return i


cdef Py_ssize_t _value(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, int depth) noexcept:
    """One JSON value at s[i] (no leading whitespace): the index after it, or -1."""
    cdef unsigned char c
    cdef bint escaped = False
    if i >= n:
        return -1
    c = s[i]
    if c == 34:
        return _string(s, i, n, &escaped)
    if c == 123 or c == 91:  # '{' '['
        if depth >= MAX_DEPTH:
            return -1
        i = _ws(s, i + 1, n)
        if i < n and s[i] == c + 2:  # '}' ']'
            return i + 1
        while True:
            if c == 123:
                if i >= n or s[i] != 34:
                    return -1
                i = _string(s, i, n, &escaped)
                if i < 0:
                    return -1
                i = _ws(s, i, n)
                if i >= n or s[i] != 58:  # ':'
                    return -1
                i = _ws(s, i + 1, n)
            i = _member(s, i, n, depth + 1)
            if i < 0:
                return -1
            i = _ws(s, i, n)
            if i >= n:
                return -1
            if s[i] == 44:  # ','
                i = _ws(s, i + 1, n)
            elif s[i] == c + 2:
                return i + 1
            else:
                return -1
    if c == 116:
        return i + 4 if i + 4 <= n and memcmp(s + i, b"true", 4) == 0 else -1
    if c == 102:
        return i + 5 if i + 5 <= n and memcmp(s + i, b"false", 5) == 0 else -1
    if c == 110:
        return i + 4 if i + 4 <= n and memcmp(s + i, b"null", 4) == 0 else -1
    return _number(s, i, n)


cdef inline Py_ssize_t _member(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, int depth) noexcept:
    """_value(s, i, n, depth), with no call for its commonest values: a string, and a number that is an
    integer (its digits, when no fraction or exponent follows them, are all _number reads)."""
    cdef Py_ssize_t j
    cdef bint escaped = False
    if i < n:
        if 48 <= s[i] <= 57:
            j = i + 1 if s[i] == 48 else _digits(s, i + 1, n)
            if j >= n or (s[j] != 46 and (s[j] | 0x20) != 101):  # not '.', 'e' or 'E'
                return j
        elif s[i] == 34:
            return _string(s, i, n, &escaped)
    return _value(s, i, n, depth)


cdef inline bint memchr_backslash(const unsigned char* s, Py_ssize_t start, Py_ssize_t end) noexcept:
    while start < end:
        if s[start] == 92:
            return True
        start += 1
    return False


def usage_span(bytes body not None):
    """(start, end) of the top-level `"usage"` object of the JSON document `body` (the last one, as
    json.loads keeps it), when `body` is one valid JSON object with leading whitespace at most, no
    top-level key holding an escape, no top-level `"error"` object and no `"type": "error"`; else None."""
    cdef Span span
    if not _usage_span(<const unsigned char*>PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), &span):
        return None
    return (span.start, span.end)


cdef bint _usage_span(const unsigned char* s, Py_ssize_t n, Span* out) noexcept:
    """usage_span of s[:n] (out: the span); False for None."""
    return _document(s, n, out) == DOC_USAGE


cdef enum:
    # what _document finds in a whole body
    DOC_OTHER = 0  # the pure path decides (not one plain JSON object, no record, anything unusual)
    DOC_USAGE = 1  # usage_span's record
    DOC_ERROR = 2  # an error document: core/usage.py `_usage_from_document` reads no usage from it


cdef int _document(const unsigned char* s, Py_ssize_t n, Span* out) noexcept:
    """What the JSON document s[:n] is, when it is one valid JSON object with leading and trailing
    whitespace at most and no top-level key holding an escape (json.loads keeping the last of repeated
    keys): DOC_ERROR when core/usage.py `_usage_from_document` sees an error in it (its "error" member
    an object, or its "type" the string "error"), else DOC_USAGE with `out` the span of its "usage"
    object (usage_span); DOC_OTHER for anything else, or when the pure path must decide (a "type" string
    with escapes, which might decode to "error")."""
    cdef Py_ssize_t i, key_start, key_end, v
    cdef Py_ssize_t usage_start = -1, usage_end = -1
    cdef bint escaped = False, error_object = False, type_error = False, type_escaped = False
    i = _ws(s, 0, n)
    if i >= n or s[i] != 123:
        return DOC_OTHER
    i = _ws(s, i + 1, n)
    if i < n and s[i] == 125:
        return DOC_OTHER  # {}: nothing to find
    while True:
        if i >= n or s[i] != 34:
            return DOC_OTHER
        key_start = i + 1
        i = _string(s, i, n, &escaped)
        if i < 0 or escaped:
            return DOC_OTHER
        key_end = i - 1
        i = _ws(s, i, n)
        if i >= n or s[i] != 58:
            return DOC_OTHER
        v = _ws(s, i + 1, n)
        i = _member(s, v, n, 1)
        if i < 0:
            return DOC_OTHER
        if key_end - key_start == 5 and memcmp(s + key_start, b"usage", 5) == 0:
            if s[v] == 123:
                usage_start, usage_end = v, i
            else:
                usage_start = usage_end = -1
        elif key_end - key_start == 5 and memcmp(s + key_start, b"error", 5) == 0:
            error_object = s[v] == 123  # obj["error"] is a dict: an error document
        elif key_end - key_start == 4 and memcmp(s + key_start, b"type", 4) == 0:
            # "error", or a string with escapes (which might decode to it: the pure path decides)
            type_escaped = s[v] == 34 and memchr_backslash(s, v, i)
            type_error = s[v] == 34 and i - v == 7 and memcmp(s + v, b'"error"', 7) == 0
        i = _ws(s, i, n)
        if i >= n:
            return DOC_OTHER
        if s[i] == 44:
            i = _ws(s, i + 1, n)
        elif s[i] == 125:
            i += 1
            break
        else:
            return DOC_OTHER
    if _ws(s, i, n) != n:
        return DOC_OTHER  # extra data after the document
    if error_object or type_error:  # _usage_from_document's first test: before any usage record
        return DOC_ERROR
    if usage_start < 0 or type_escaped:
        return DOC_OTHER
    out.start = usage_start
    out.end = usage_end
    return DOC_USAGE


def document_kind(bytes body not None):
    """_document of a whole body (tests): "usage", "error" or None."""
    cdef Span span
    cdef int kind = _document(<const unsigned char*>PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), &span)
    return "usage" if kind == DOC_USAGE else "error" if kind == DOC_ERROR else None


# -- a usage object's counts ---------------------------------------------------------------------------

cdef enum:
    # the members a usage record is read from (core/usage_records.py `_openai_usage`, `record_usage`)
    F_PROMPT, F_COMPLETION, F_INPUT, F_OUTPUT, F_TOTAL, F_CACHE_READ, F_CACHE_CREATION,
    F_PROMPT_DETAILS, F_COMPLETION_DETAILS, F_INPUT_DETAILS, F_OUTPUT_DETAILS, N_FIELDS
cdef enum:
    D_CACHED, D_CACHE_WRITE, D_REASONING, N_DETAILS
cdef enum:
    MAX_DIGITS = 12  # 10**12 - 1 < 2**40 (usage_records._MAX_TOKENS): a count read as is

cdef const char* FIELD_NAMES[11]
FIELD_NAMES[:] = [
    b"prompt_tokens", b"completion_tokens", b"input_tokens", b"output_tokens", b"total_tokens",
    b"cache_read_input_tokens", b"cache_creation_input_tokens", b"prompt_tokens_details",
    b"completion_tokens_details", b"input_tokens_details", b"output_tokens_details",
]
cdef const char* DETAIL_NAMES[3]
DETAIL_NAMES[:] = [b"cached_tokens", b"cache_write_tokens", b"reasoning_tokens"]
cdef unsigned char FIELD_LENGTHS[11]  # their lengths, measured once (no strlen per key)
cdef unsigned char DETAIL_LENGTHS[3]
for _i in range(11):
    FIELD_LENGTHS[_i] = <unsigned char>strlen(FIELD_NAMES[_i])
for _i in range(3):
    DETAIL_LENGTHS[_i] = <unsigned char>strlen(DETAIL_NAMES[_i])


cdef int _name(const unsigned char* s, Py_ssize_t start, Py_ssize_t end, const char** names,
               const unsigned char* lengths, int count) noexcept:
    """The index of s[start:end] among `names`, or -1."""
    cdef int k
    cdef Py_ssize_t length = end - start
    if length < 12 or length > 27:  # shorter or longer than every name
        return -1
    for k in range(count):
        if names[k][0] == s[start] and lengths[k] == length:
            if memcmp(s + start, names[k], length) == 0:
                return k
    return -1


cdef inline long long _plain_count(const unsigned char* s, Py_ssize_t start, Py_ssize_t end) noexcept:
    """A member's value s[start:end] that is a plain non-negative integer of at most MAX_DIGITS digits:
    its value (usage_records._count reads it as is); else -1 (the pure reader decides)."""
    cdef long long v = 0
    cdef Py_ssize_t i
    if end <= start or end - start > MAX_DIGITS:
        return -1
    for i in range(start, end):
        if not 48 <= s[i] <= 57:
            return -1
        v = v * 10 + (s[i] - 48)
    return v


cdef Py_ssize_t _details(const unsigned char* s, Py_ssize_t i, Py_ssize_t end, long long* out) noexcept:
    """The counts of a details object at s[i] == '{', read as _value parses it: out[D_*] (0 when absent, the
    last member of a name wins); the index after it, or -1 when it is not one valid object within `end` or
    the pure reader must decide (an escaped key, a count that is not a plain integer)."""
    cdef Py_ssize_t key_start, key_end, v
    cdef bint escaped = False
    cdef int k
    out[D_CACHED] = out[D_CACHE_WRITE] = out[D_REASONING] = 0
    i = _ws(s, i + 1, end)
    if i < end and s[i] == 125:
        return i + 1
    while True:
        if i >= end or s[i] != 34:
            return -1
        key_start = i + 1
        i = _string(s, i, end, &escaped)
        if i < 0 or escaped:
            return -1
        key_end = i - 1
        i = _ws(s, i, end)
        if i >= end or s[i] != 58:  # ':'
            return -1
        v = _ws(s, i + 1, end)
        i = _member(s, v, end, 2)
        if i < 0:
            return -1
        k = _name(s, key_start, key_end, DETAIL_NAMES, DETAIL_LENGTHS, N_DETAILS)
        if k >= 0:
            out[k] = _plain_count(s, v, i)
            if out[k] < 0:
                return -1
        i = _ws(s, i, end)
        if i >= end or s[i] != 44:
            return i + 1 if i < end and s[i] == 125 else -1  # '}'
        i = _ws(s, i + 1, end)


def usage_counts(bytes body not None, Py_ssize_t start, Py_ssize_t end):
    """The counts of the usage object body[start:end] (as `usage_span` found it: a valid JSON object),
    for core/usage_records.usage_from_counts: ("openai", prompt, completion, cached, cache_write,
    reasoning) for a chat/completions/embeddings or Responses record, ("anthropic", input, cache_read,
    cache_creation, output) for Anthropic's, in usage_records.record_usage's order of precedence; None
    when the pure reader must read it (no record, an escaped key, a count that is not a plain integer)."""
    cdef long long c[5]
    cdef int k
    if start < 0 or end > PyBytes_GET_SIZE(body) or start >= end:
        return None
    k = _counts(<const unsigned char*>PyBytes_AS_STRING(body), start, end, c)
    if k == 1:
        return ("openai", c[0], c[1], c[2], c[3], c[4])
    if k == 2:
        return ("anthropic", c[0], c[1], c[2], c[3])
    return None


cdef int _counts(const unsigned char* s, Py_ssize_t start, Py_ssize_t end, long long* out,
                 bint* present=NULL) noexcept:
    """usage_counts of s[start:end] (0 < start < end within s): 1 "openai" (out: prompt, completion,
    cached, cache_write, reasoning), 2 "anthropic" (out: input, cache_read, cache_creation, output; with
    `present`, which of those four members the object has), 0 None."""
    cdef Py_ssize_t i, key_start, key_end, v
    cdef bint escaped = False
    cdef bint seen[11]
    cdef long long value[11]
    cdef long long details[4][3]
    cdef int k, d
    if s[start] != 123:
        return 0
    for k in range(N_FIELDS):
        seen[k] = False
        value[k] = 0
    for d in range(4):
        details[d][0] = details[d][1] = details[d][2] = 0
    i = _ws(s, start + 1, end)
    if i < end and s[i] != 125:
        while True:
            if i >= end or s[i] != 34:
                return 0
            key_start = i + 1
            i = _string(s, i, end, &escaped)
            if i < 0 or escaped:
                return 0
            key_end = i - 1
            i = _ws(s, i, end)
            if i >= end or s[i] != 58:  # ':'
                return 0
            v = _ws(s, i + 1, end)
            k = _name(s, key_start, key_end, FIELD_NAMES, FIELD_LENGTHS, N_FIELDS)
            if k >= F_PROMPT_DETAILS and v < end and s[v] == 123:  # a details object, parsed as it is read
                i = _details(s, v, end, details[k - F_PROMPT_DETAILS])
            else:
                i = _member(s, v, end, 1)
            if i < 0:
                return 0
            if k >= 0:
                seen[k] = True
                if k >= F_PROMPT_DETAILS:
                    if s[v] != 123:  # anything but an object reads as no details
                        d = k - F_PROMPT_DETAILS
                        details[d][0] = details[d][1] = details[d][2] = 0
                elif k != F_TOTAL:  # total_tokens: only its presence counts
                    value[k] = _plain_count(s, v, i)
                    if value[k] < 0:
                        return 0
            i = _ws(s, i, end)
            if i >= end or s[i] != 44:
                break
            i = _ws(s, i + 1, end)
        if i >= end or s[i] != 125:
            return 0  # not one object (the callers pass a validated one)
    if seen[F_PROMPT] or seen[F_COMPLETION]:  # chat / completions / embeddings
        out[0], out[1], out[2] = value[F_PROMPT], value[F_COMPLETION], details[0][D_CACHED]
        out[3], out[4] = details[0][D_CACHE_WRITE], details[1][D_REASONING]
        return 1
    if seen[F_INPUT_DETAILS] or seen[F_OUTPUT_DETAILS] or seen[F_TOTAL]:  # Responses
        out[0], out[1], out[2] = value[F_INPUT], value[F_OUTPUT], details[2][D_CACHED]
        out[3], out[4] = details[2][D_CACHE_WRITE], details[3][D_REASONING]
        return 1
    if seen[F_INPUT] or seen[F_CACHE_READ] or seen[F_CACHE_CREATION] or seen[F_OUTPUT]:  # Anthropic
        out[0], out[1], out[2], out[3] = (
            value[F_INPUT], value[F_CACHE_READ], value[F_CACHE_CREATION], value[F_OUTPUT])
        if present != NULL:
            present[0], present[1] = seen[F_INPUT], seen[F_CACHE_READ]
            present[2], present[3] = seen[F_CACHE_CREATION], seen[F_OUTPUT]
        return 2
    return 0


# -- an event stream's usage record --------------------------------------------------------------------

cdef enum:
    MAX_SSE_SNIPPET = 64 << 10  # longer snippets go to the pure path (one parser window, no trimming)
    HEAD_BYTES = 512  # core/usage_records._HEAD_BYTES: where an event's name is looked for
    USAGE_SPAN = 16 << 10  # core/usage_records._USAGE_SPAN: the most of a record _record_at decodes


cdef Py_ssize_t _find(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, const char* word, Py_ssize_t length) noexcept:
    """bytes.find: the first index >= i where `word` starts and ends by n, or -1."""
    while i + length <= n:
        if s[i] == <unsigned char>word[0] and memcmp(s + i, word, length) == 0:
            return i
        i += 1
    return -1


cdef Py_ssize_t _usage_key(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, Py_ssize_t* brace) noexcept:
    """The next match of core/usage_records._USAGE_OBJECT (`"usage"` ws `:` ws `{`) from i: its start
    (brace: its `{`), or -1."""
    cdef Py_ssize_t j
    while True:
        i = _find(s, i, n, b'"usage"', 7)
        if i < 0:
            return -1
        j = i + 7
        while j < n and (s[j] == 32 or s[j] == 9 or s[j] == 13 or s[j] == 10):
            j += 1
        if j < n and s[j] == 58:  # ':'
            j += 1
            while j < n and (s[j] == 32 or s[j] == 9 or s[j] == 13 or s[j] == 10):
                j += 1
            if j < n and s[j] == 123:
                brace[0] = j
                return i
        i += 1


cdef inline Py_ssize_t _event_start(const unsigned char* s, Py_ssize_t brace) noexcept:
    """Where the event holding s[brace] starts: after the last blank line before it (`bytes.rfind(b"\\n\\n",
    0, brace) + 2`), or 0."""
    cdef Py_ssize_t i = brace - 2
    while i >= 0:
        if s[i] == 10 and s[i + 1] == 10:
            return i + 2
        i -= 1
    return 0


def sse_usage_span(bytes data not None):
    """(start, end) of the usage record of a Lua tap "sse" snippet (whole events of an event stream), when
    core/usage.StreamUsage reads that snippet's usage from that object alone, as the record of an event
    without a name at depth 1 (OpenAI's chat/completions usage chunk): one `"usage": {` in the whole
    snippet, on a single-line event whose first bytes name no event and carry no "type", the record one
    valid JSON object (as json's raw_decode reads it) followed by what closes exactly one object. None
    whenever the pure parser must decide (CR line ends, an event name or type nearby, several records,
    a multi-line event, anything unusual)."""
    cdef Span span
    if not _sse_span(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), &span):
        return None
    return (span.start, span.end)


cdef bint _sse_span(const unsigned char* s, Py_ssize_t n, Span* out) noexcept:
    """sse_usage_span of s[:n] (out: the span); False for None."""
    cdef Py_ssize_t key, brace = -1, other, start, stop, head, end
    if n == 0 or n > MAX_SSE_SNIPPET or _find(s, 0, n, b"\r", 1) >= 0:
        return False
    key = _usage_key(s, 0, n, &brace)
    if key < 0 or _usage_key(s, brace, n, &other) >= 0:
        return False  # no record, or several candidates: the pure parser picks
    # the event: after the last blank line before the brace (bytes.rfind), up to the next one after the key
    start = _event_start(s, brace)
    stop = _find(s, key, n, b"\n\n", 2)
    if stop < 0:
        stop = n
    if stop < brace or _find(s, start, stop, b"\n", 1) >= 0:
        return False  # a blank line inside the match, or an event of several lines
    head = start + HEAD_BYTES if start + HEAD_BYTES < n else n
    if _find(s, start, head, b"event:", 6) >= 0 or _find(s, start, head, b'"type"', 6) >= 0:
        return False  # an event name or type the pure parser reads
    if stop - brace > USAGE_SPAN:
        return False
    end = _value(s, brace, stop, 1)
    if end < 0 or not _closes(s, end, stop, 1):  # what follows closes exactly one object
        return False
    out.start = brace
    out.end = end
    return True


# -- named usage events: an Anthropic stream's, a Responses stream's final one -------------------------

cdef enum:
    NAME_MAX = 64  # core/usage_records._EVENT_NAME / _DATA_TYPE: a name of 1 to 64 bytes
    EV_NONE = 0  # an event without a name (OpenAI's chunks), or one whose name carries no usage record
    EV_START = 1  # message_start: its record is data.message.usage (depth 2)
    EV_DELTA = 2  # message_delta: data.usage (depth 1), cumulative
    EV_FINAL = 3  # response.completed / incomplete / failed: data.response.usage (depth 2), OpenAI's counts
    EV_OTHER = 4  # any other name: no usage record (StreamUsage passes the event over)


cdef inline bint _space(unsigned char c) noexcept:
    """bytes regex \\s: space, \\t, \\n, \\r, \\f, \\v."""
    return c == 32 or 9 <= c <= 13


cdef inline Py_ssize_t _sse_field(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, const char* word,
                                  Py_ssize_t length) noexcept:
    """After the SSE field `word` (its colon included) at s[i] and the spaces and tabs that follow: the
    index, or -1."""
    if i + length > n or memcmp(s + i, word, length) != 0:
        return -1
    i += length
    while i < n and (s[i] == 32 or s[i] == 9):
        i += 1
    return i


cdef int _named(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, Py_ssize_t* name_start,
                Py_ssize_t* name_end) noexcept:
    """The name s[name_start:name_end] of a match of _EVENT_NAME (`(?:^|\\n)event:[ \\t]*([^\\s]{1,64})`)
    at i (a line start): 1, or 0."""
    cdef Py_ssize_t j = _sse_field(s, i, n, b"event:", 6), k
    if j < 0:
        return 0
    k = j
    while k < n and k - j < NAME_MAX and not _space(s[k]):
        k += 1
    if k == j:
        return 0
    name_start[0], name_end[0] = j, k
    return 1


cdef int _typed(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, Py_ssize_t* name_start,
                Py_ssize_t* name_end) noexcept:
    """The same for _DATA_TYPE (`(?:^|\\n)data:[ \\t]*\\{ws"type"ws:ws"([^"\\\\]{1,64})"`)."""
    cdef Py_ssize_t j = _sse_field(s, i, n, b"data:", 5), k
    if j < 0 or j >= n or s[j] != 123:
        return 0
    j = _ws(s, j + 1, n)
    if j + 6 > n or memcmp(s + j, b'"type"', 6) != 0:
        return 0
    j = _ws(s, j + 6, n)
    if j >= n or s[j] != 58:
        return 0
    j = _ws(s, j + 1, n)
    if j >= n or s[j] != 34:
        return 0
    j += 1
    k = j
    while k < n and k - j <= NAME_MAX and s[k] != 34 and s[k] != 92:
        k += 1
    if k >= n or s[k] != 34 or k == j or k - j > NAME_MAX:
        return 0
    name_start[0], name_end[0] = j, k
    return 1


cdef bint _first_line(const unsigned char* s, Py_ssize_t i, Py_ssize_t head, bint typed, Py_ssize_t* a,
                      Py_ssize_t* b) noexcept:
    """The first match of _DATA_TYPE (`typed`) or _EVENT_NAME in s[i:head], tried where the regex can start
    (i, and after each \n): its name in a, b."""
    while i < head:
        if _typed(s, i, head, a, b) if typed else _named(s, i, head, a, b):
            return True
        i = _find(s, i, head, b"\n", 1)
        if i < 0:
            return False
        i += 1
    return False


cdef int _event_kind(const unsigned char* s, Py_ssize_t start, Py_ssize_t n) noexcept:
    """StreamUsage._take_usage's event name, from the event's first HEAD_BYTES (from `start`): the first
    _EVENT_NAME match when "event:" is there, else the first _DATA_TYPE match when '"type"' is."""
    cdef Py_ssize_t head = start + HEAD_BYTES if start + HEAD_BYTES < n else n, a = 0, b = 0
    if not (
        (_find(s, start, head, b"event:", 6) >= 0 and _first_line(s, start, head, False, &a, &b))
        or (_find(s, start, head, b'"type"', 6) >= 0 and _first_line(s, start, head, True, &a, &b))
    ):
        return EV_NONE
    if b - a == 13 and memcmp(s + a, b"message_start", 13) == 0:
        return EV_START
    if b - a == 13 and memcmp(s + a, b"message_delta", 13) == 0:
        return EV_DELTA
    if ((b - a == 18 and memcmp(s + a, b"response.completed", 18) == 0)
            or (b - a == 19 and memcmp(s + a, b"response.incomplete", 19) == 0)
            or (b - a == 15 and memcmp(s + a, b"response.failed", 15) == 0)):
        return EV_FINAL
    return EV_OTHER


cdef bint _closes(const unsigned char* s, Py_ssize_t i, Py_ssize_t stop, int depth) noexcept:
    """What follows a usage object (from i) up to its event's end closes exactly `depth` objects, as
    usage_records._record_at checks it (`{"_":0` + it, or `{"_":{"_":0` + it, is one JSON document)."""
    cdef bint escaped = False
    cdef int closed = 0
    i = _ws(s, i, stop)
    while closed < depth:
        while i < stop and s[i] == 44:  # ',' "key" : value
            i = _ws(s, i + 1, stop)
            if i >= stop or s[i] != 34:
                return False
            i = _string(s, i, stop, &escaped)
            if i < 0:
                return False
            i = _ws(s, i, stop)
            if i >= stop or s[i] != 58:
                return False
            i = _value(s, _ws(s, i + 1, stop), stop, 1)
            if i < 0:
                return False
            i = _ws(s, i, stop)
        if i >= stop or s[i] != 125:
            return False
        closed += 1
        i = _ws(s, i + 1, stop)
    return i == stop


cdef int _named_sse(const unsigned char* s, Py_ssize_t n, long long* out) noexcept:
    """The Usage core/usage.StreamUsage reads from a Lua tap "sse" snippet of named events (an Anthropic
    stream's message_start and message_delta, a Responses stream's final event), when it reads it from
    those events' last usage objects alone: every event holding a `"usage": {` has a name (events of other
    names are passed over, as it passes them), its last usage object on one data line, a valid JSON object
    at its place (data.message.usage, data.usage, data.response.usage) holding only the provider's counts
    as plain integers (`_counts`: Anthropic's members for Anthropic's events, an OpenAI record for
    Responses'). 2, Anthropic's (out: input, cache_read, cache_creation, output): the events' present
    members merged (a later one's win), a message_delta among them (else the completion is counted: the
    pure parser); 1, a Responses record (out: prompt, completion, cached, cache_write, reasoning; the last
    one's); 0 whenever the pure parser must read it (both kinds too)."""
    cdef Py_ssize_t i = 0, key, brace, last_brace, event_end, start, end
    cdef long long c[5]
    cdef bint present[4]
    cdef bint final = False, anthropic = False, openai = False
    cdef int kind, k, depth
    if n == 0 or n > MAX_SSE_SNIPPET or _find(s, 0, n, b"\r", 1) >= 0:
        return 0
    for k in range(5):
        out[k] = 0
    key = _usage_key(s, 0, n, &brace)
    if key < 0:
        return 0
    while key >= 0:
        # one event: its matches up to its end (the blank line after its first match), the last one read
        event_end = _find(s, key, n, b"\n\n", 2)
        if event_end < 0:
            event_end = n
        last_brace = brace
        while True:
            key = _usage_key(s, brace + 1, n, &brace)
            if key < 0 or key >= event_end:
                break
            last_brace = brace
        # the event: after the last blank line before its matches (bytes.rfind: none lies between them)
        kind = _event_kind(s, _event_start(s, last_brace), n)
        if kind == EV_OTHER:
            continue  # no usage record in it
        if kind == EV_NONE:
            return 0
        if _find(s, last_brace, event_end, b"\n", 1) >= 0 or event_end - last_brace > USAGE_SPAN:
            return 0  # a record over several data lines, or longer than _record_at decodes
        depth = 1 if kind == EV_DELTA else 2
        end = _value(s, last_brace, event_end, 1)
        if end < 0 or not _closes(s, end, event_end, depth):
            return 0
        if kind == EV_FINAL:
            if _counts(s, last_brace, end, c) != 1:
                return 0
            for k in range(5):
                out[k] = c[k]
            openai = True
            continue
        if _counts(s, last_brace, end, c, present) != 2:
            return 0
        anthropic = True
        for k in range(4):
            if present[k]:
                out[k] = c[k]
        if kind == EV_DELTA:
            final = True
    if openai and not anthropic:
        return 1
    if anthropic and final and not openai:
        return 2
    return 0


def named_sse_counts(bytes data not None):
    """_named_sse of a snippet, as usage_counts answers: ("anthropic", input, cache_read, cache_creation,
    output), ("openai", prompt, completion, cached, cache_write, reasoning), or None (tests)."""
    cdef long long c[5]
    cdef int shape = _named_sse(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), c)
    if shape == 2:
        return ("anthropic", c[0], c[1], c[2], c[3])
    if shape == 1:
        return ("openai", c[0], c[1], c[2], c[3], c[4])
    return None


# -- the common entry, accounted -----------------------------------------------------------------------

cdef enum:
    MODEL_SCAN_BYTES = 8 << 10  # core/usage_records._MODEL_SCAN_BYTES
    MODEL_MAX = 200  # core/usage_records._MODEL_FIELD: 1 to 200 bytes between the quotes


cdef object _model(const unsigned char* s, Py_ssize_t n):
    """core/usage_records.document_model: the first match of _MODEL_FIELD
    (`"model"[ \\t\\r\\n]*:[ \\t\\r\\n]*"([^"\\\\]{1,200})"`) within the first MODEL_SCAN_BYTES, its value decoded
    as UTF-8 with replacement; None without one."""
    cdef Py_ssize_t lim = n if n < MODEL_SCAN_BYTES else MODEL_SCAN_BYTES, p = 0, j, k
    while True:
        p = _find(s, p, lim, b'"model"', 7)
        if p < 0:
            return None
        j = _ws(s, p + 7, lim)
        if j < lim and s[j] == 58:  # ':'
            j = _ws(s, j + 1, lim)
            if j < lim and s[j] == 34:  # '"'
                j += 1
                k = j
                while k < lim and s[k] != 34 and s[k] != 92 and k - j <= MODEL_MAX:
                    k += 1
                if k < lim and s[k] == 34 and 1 <= k - j <= MODEL_MAX:
                    return PyUnicode_DecodeUTF8(<const char*>(s + j), k - j, "replace")
        p += 1


def document_model(bytes body not None):
    """_model of a whole body (tests: the same answer as core/usage_records.document_model)."""
    return _model(<const unsigned char*>PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))


# -- a whole stream without a usage record: its completion counted -------------------------------------------
# core/usage.StreamUsage of a Lua tap "body" record of an event stream that holds no usage record (an OpenAI
# chat stream whose client did not ask for stream_options.include_usage, the common case), for the stream
# it takes (`_stream_text`): its content deltas (usage_records._CONTENT of the format its first bytes name,
# _KIND_MARKERS) decoded as `_counted_completion` decodes them, for the count Engine.account_response runs.

cdef extern from "string.h":
    void* _memmem "memmem"(const void* haystack, size_t n, const void* needle, size_t m) nogil  # GNU
    void* _memchr "memchr"(const void* s, int c, size_t n) nogil

from cpython.mem cimport PyMem_Free, PyMem_Malloc

cdef enum:
    F_UNKNOWN = 0  # usage_records._UNKNOWN, _OPENAI, _ANTHROPIC, _RESPONSES
    F_OPENAI = 1
    F_ANTHROPIC = 2
    F_RESPONSES = 3
    KIND_HEAD = 4096  # StreamUsage._process: a window's first bytes name the format
    N_MARKERS = 6
    N_ERROR_MARKERS = 8

# usage_records._KIND_MARKERS, in its order (the first present wins), and each format's content keys
# (usage_records._CONTENT: the keys of its _content_pattern); tests/test_native_stream.py compares both
cdef const char* MARKERS[N_MARKERS]
MARKERS[:] = [b'"response.', b'"message_start"', b'"content_block_', b'"chat.completion', b'"text_completion"',
              b'"choices"']
cdef int MARKER_KINDS[N_MARKERS]
MARKER_KINDS[:] = [F_RESPONSES, F_ANTHROPIC, F_ANTHROPIC, F_OPENAI, F_OPENAI, F_OPENAI]
cdef const char* KEYS_OPENAI[6]
KEYS_OPENAI[:] = [b"content", b"arguments", b"refusal", b"reasoning_content", b"reasoning", b"text"]
cdef const char* KEYS_ANTHROPIC[3]
KEYS_ANTHROPIC[:] = [b"text", b"partial_json", b"thinking"]
cdef const char* KEYS_RESPONSES[1]
KEYS_RESPONSES[:] = [b"delta"]
cdef const char* KEYS_UNKNOWN[7]
KEYS_UNKNOWN[:] = [b"content", b"arguments", b"refusal", b"text", b"partial_json", b"thinking", b"delta"]


# each key's length, and per format the bytes a key of it starts with (the byte after a quote: most quotes
# of a stream, a key's or a value's closing one or another key's opening one, are passed over on that byte)
cdef Py_ssize_t LENGTHS_OPENAI[6]
cdef Py_ssize_t LENGTHS_ANTHROPIC[3]
cdef Py_ssize_t LENGTHS_RESPONSES[1]
cdef Py_ssize_t LENGTHS_UNKNOWN[7]
cdef bint FIRST[4][256]


cdef void _lengths(const char** keys, Py_ssize_t* lengths, int count, int kind) noexcept:
    cdef int i
    for i in range(count):
        lengths[i] = strlen(keys[i])
        FIRST[kind][<unsigned char>keys[i][0]] = True


_lengths(KEYS_OPENAI, LENGTHS_OPENAI, 6, F_OPENAI)
_lengths(KEYS_ANTHROPIC, LENGTHS_ANTHROPIC, 3, F_ANTHROPIC)
_lengths(KEYS_RESPONSES, LENGTHS_RESPONSES, 1, F_RESPONSES)
_lengths(KEYS_UNKNOWN, LENGTHS_UNKNOWN, 7, F_UNKNOWN)


cdef inline const Py_ssize_t* _lengths_of(int kind) noexcept:
    if kind == F_OPENAI:
        return LENGTHS_OPENAI
    if kind == F_ANTHROPIC:
        return LENGTHS_ANTHROPIC
    if kind == F_RESPONSES:
        return LENGTHS_RESPONSES
    return LENGTHS_UNKNOWN


cdef inline const char** _keys_of(int kind, int* count) noexcept:
    if kind == F_OPENAI:
        count[0] = 6
        return KEYS_OPENAI
    if kind == F_ANTHROPIC:
        count[0] = 3
        return KEYS_ANTHROPIC
    if kind == F_RESPONSES:
        count[0] = 1
        return KEYS_RESPONSES
    count[0] = 7
    return KEYS_UNKNOWN


# usage_records._ERROR_MARKERS (StreamUsage._scan_unsettled's error events)
cdef const char* ERROR_MARKERS[N_ERROR_MARKERS]
ERROR_MARKERS[:] = [b'"type":"error"', b'"type": "error"', b'"response.failed"', b"event: error\n", b"event:error\n",
                    b'data: {"error":', b'data: {"error" :', b'data:{"error":']


cdef bint _saw_error(const unsigned char* s, Py_ssize_t n) noexcept:
    """StreamUsage.saw_error after reading s[:n] (a marker never spans the blank line between two windows)."""
    cdef int i
    if _memmem(s, n, b"error", 5) == NULL:
        return False
    for i in range(N_ERROR_MARKERS):
        if _memmem(s, n, ERROR_MARKERS[i], strlen(ERROR_MARKERS[i])) != NULL:
            return True
    return False


def stream_tables():
    """(the kind markers with their kinds, {kind: content keys}, the error markers) as this module reads
    them (tests)."""
    cdef int i, k, count
    cdef const char** keys
    markers = tuple((<bytes>MARKERS[i], MARKER_KINDS[i]) for i in range(N_MARKERS))
    errors = tuple(<bytes>ERROR_MARKERS[i] for i in range(N_ERROR_MARKERS))
    content = {}
    for k in (F_UNKNOWN, F_OPENAI, F_ANTHROPIC, F_RESPONSES):
        keys = _keys_of(k, &count)
        content[k] = tuple((<bytes>keys[i]).decode() for i in range(count))
    return markers, content, errors


cdef int _kind_of(const unsigned char* s, Py_ssize_t n, int kind) noexcept:
    """StreamUsage._process's format: `kind` when known, else the first marker in s[:KIND_HEAD]."""
    cdef Py_ssize_t head = n if n < KIND_HEAD else KIND_HEAD
    cdef int i
    if kind != F_UNKNOWN:
        return kind
    for i in range(N_MARKERS):
        if _memmem(s, head, MARKERS[i], strlen(MARKERS[i])) != NULL:
            return MARKER_KINDS[i]
    return F_UNKNOWN


cdef Py_ssize_t _content_at(const unsigned char* s, Py_ssize_t p, Py_ssize_t b, int kind, Py_ssize_t* start) noexcept:
    """A match of usage_records._CONTENT[kind] (`"key"` ws `:` ws `"` string body `"`) at s[p] == '"',
    within s[:b]: the index of its closing quote (start: its first content byte), or -1. The keys differ
    before their closing quote, so at most one can match."""
    cdef int count, i
    cdef const char** keys
    cdef const Py_ssize_t* lengths
    cdef Py_ssize_t length, j
    if p + 1 >= b or not FIRST[kind][s[p + 1]]:
        return -1
    keys = _keys_of(kind, &count)
    lengths = _lengths_of(kind)
    for i in range(count):
        length = lengths[i]
        if p + 2 + length <= b and s[p + 1 + length] == 34 and memcmp(s + p + 1, keys[i], length) == 0:
            j = _ws(s, p + 2 + length, b)
            if j >= b or s[j] != 58:  # ':'
                return -1
            j = _ws(s, j + 1, b)
            if j >= b or s[j] != 34:  # '"'
                return -1
            j += 1
            start[0] = j
            while True:  # [^"\\]*(?:\\.[^"\\]*)*" (DOTALL): the first quote not escaped ends it
                while j < b and s[j] != 34 and s[j] != 92:
                    j += 1
                if j >= b:
                    return -1
                if s[j] == 34:
                    return j
                if j + 1 >= b:
                    return -1
                j += 2
    return -1


cdef inline int _hex4(const unsigned char* s, Py_ssize_t i) noexcept:
    """The value of the 4 hex digits at s[i] (checked by the caller)."""
    cdef int v = 0, k
    cdef unsigned char c
    for k in range(4):
        c = s[i + k]
        v = v * 16 + (c - 48 if c <= 57 else (c - 55 if c <= 70 else c - 87))
    return v


cdef Py_ssize_t _unescape(const unsigned char* s, Py_ssize_t i, Py_ssize_t e, unsigned char* w) noexcept:
    """The content literal s[i:e] (a string body: every backslash pairs with the byte after it) decoded as
    json's lenient decoder decodes it, as UTF-8 into w: the bytes written, or -1 when the decoder could
    read it differently from a valid UTF-8 text (an escape json refuses, a surrogate escape not in a pair,
    invalid UTF-8, which `decode("utf-8", "replace")` would replace): the caller hands the entry back."""
    cdef Py_ssize_t o = 0, length
    cdef unsigned char c
    cdef int cp, low
    while i < e:
        c = s[i]
        if c < 0x80:
            if c != 92:
                w[o] = c
                o += 1
                i += 1
                continue
            c = s[i + 1]
            if c == 117:  # \uXXXX
                if i + 6 > e or not (HEX[s[i + 2]] and HEX[s[i + 3]] and HEX[s[i + 4]] and HEX[s[i + 5]]):
                    return -1
                cp = _hex4(s, i + 2)
                i += 6
                if 0xD800 <= cp <= 0xDBFF:  # a pair's high half: json joins it with the low half after it
                    if not (i + 6 <= e and s[i] == 92 and s[i + 1] == 117 and HEX[s[i + 2]] and HEX[s[i + 3]]
                            and HEX[s[i + 4]] and HEX[s[i + 5]]):
                        return -1
                    low = _hex4(s, i + 2)
                    if not 0xDC00 <= low <= 0xDFFF:
                        return -1
                    i += 6
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00)
                elif 0xDC00 <= cp <= 0xDFFF:
                    return -1
                if cp < 0x80:
                    w[o] = cp
                    o += 1
                elif cp < 0x800:
                    w[o] = 0xC0 | (cp >> 6)
                    w[o + 1] = 0x80 | (cp & 0x3F)
                    o += 2
                elif cp < 0x10000:
                    w[o] = 0xE0 | (cp >> 12)
                    w[o + 1] = 0x80 | ((cp >> 6) & 0x3F)
                    w[o + 2] = 0x80 | (cp & 0x3F)
                    o += 3
                else:
                    w[o] = 0xF0 | (cp >> 18)
                    w[o + 1] = 0x80 | ((cp >> 12) & 0x3F)
                    w[o + 2] = 0x80 | ((cp >> 6) & 0x3F)
                    w[o + 3] = 0x80 | (cp & 0x3F)
                    o += 4
                continue
            if c == 34 or c == 92 or c == 47:  # \" \\ \/
                w[o] = c
            elif c == 98:  # \b
                w[o] = 8
            elif c == 102:  # \f
                w[o] = 12
            elif c == 110:  # \n
                w[o] = 10
            elif c == 114:  # \r
                w[o] = 13
            elif c == 116:  # \t
                w[o] = 9
            else:
                return -1
            o += 1
            i += 2
            continue
        length = _utf8_len(s, i, e)  # a multi-byte UTF-8 character, copied once checked
        if length == 0:
            return -1
        memcpy(w + o, s + i, length)
        o += length
        i += length
    return o


cdef Py_ssize_t _contents(const unsigned char* s, Py_ssize_t a, Py_ssize_t b, int kind, unsigned char* w,
                          Py_ssize_t o, Py_ssize_t* matches) noexcept:
    """StreamUsage._extract_content of the window s[a:b] (findall of _CONTENT[kind]), each literal decoded
    (_unescape) and appended to w at o: the new end of w, or -1 (hand the entry back)."""
    cdef Py_ssize_t p = a, start, end, written
    cdef const unsigned char* q
    while p < b:
        q = <const unsigned char*>_memchr(s + p, 34, b - p)
        if q == NULL:
            break
        p = q - s
        end = _content_at(s, p, b, kind, &start)
        if end < 0:
            p += 1
            continue
        written = _unescape(s, start, end, w + o)
        if written < 0:
            return -1
        o += written
        matches[0] += 1
        p = end + 1
    return o


cdef object _stream_text(const unsigned char* s, Py_ssize_t n, bint split, Py_ssize_t* matches):
    """The completion text StreamUsage._counted_completion counts for a whole event stream s[:n] fed in one
    chunk, for a stream `_counted` takes (no usage record, no CR, no error: one window, or with `split`
    the two that count_exactly's drain and finish's make: up to the last blank line, then the rest), with
    the number of literals found (0: the parser counts nothing); None: hand the entry back."""
    cdef unsigned char* w
    cdef Py_ssize_t o = 0, cut = 0
    cdef int kind
    w = <unsigned char*>PyMem_Malloc(n + 1)  # decoding never grows a literal
    if w == NULL:
        raise MemoryError()
    try:
        if split:  # bytes.rfind(b"\n\n") + 2, 0 without a blank line
            cut = _event_start(s, n)
        if cut >= 2:
            kind = _kind_of(s, cut, F_UNKNOWN)
            o = _contents(s, 0, cut, kind, w, 0, matches)
            if o < 0:
                return None
            kind = _kind_of(s + cut, n - cut, kind)
            o = _contents(s, cut, n, kind, w, o, matches)
        else:
            o = _contents(s, 0, n, _kind_of(s, n, F_UNKNOWN), w, 0, matches)
        if o < 0:
            return None
        return PyUnicode_DecodeUTF8(<const char*>w, o, NULL)
    finally:
        PyMem_Free(w)


def stream_text(bytes data not None, bint split=False):
    """_stream_text of a whole stream: (text, literals found), or None (tests: the same text as
    StreamUsage's)."""
    cdef Py_ssize_t matches = 0
    text = _stream_text(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), split, &matches)
    return None if text is None else (text, matches)


cdef Py_ssize_t _max_body = -1  # core/usage.MAX_BODY_BYTES, read at the first call
cdef Py_ssize_t _decode_step = 0  # core/usage._DECODE_STEP: StreamUsage's decompression step
# what Engine.account_response's count of a stream without a usage record reads, bound at the first call:
# the modules whose names it calls (a test's monkeypatch of them holds here too), the parser's window
# (usage.DEFAULT_WINDOW) and the count's executor threshold (accounting.needs_exact_count's)
cdef object _engine_module = None, _accounting_module = None, _usage_module = None
cdef Py_ssize_t _window = 0, _exact_below = 0
cdef str _BODY = "body"
cdef str _SSE = "sse"
cdef str _NONE = "none"


# entries account_run took (tests: the common entries never reached the per-entry Python code)
cdef _Tally _taken = _Tally()
taken = _taken


include "_slots.pxi"
include "_clocks.pxi"

# the service's fields account_run reads and counts in (adapters/envoy_als.py AccessLogService, __slots__),
# in place rather than by name (as native/_account.pyx reads the engine's): bound at the first call
cdef object _Service = None
cdef Py_ssize_t SERVICE_ENGINE = -1, SERVICE_ENTRIES = -1, SERVICE_IGNORED = -1
# time.perf_counter when it is clock_gettime(CLOCK_MONOTONIC) (Linux): account_run reads that clock itself,
# with no call into the time module and no float object per entry
cdef object _perf_counter = None


cdef int _bind() except -1:
    global _max_body, _decode_step, _Service, SERVICE_ENGINE, SERVICE_ENTRIES, SERVICE_IGNORED, _perf_counter
    global _engine_module, _accounting_module, _usage_module, _window, _exact_below
    from nexus_authz import engine as engine_module
    from nexus_authz.adapters.envoy_als import AccessLogService
    from nexus_authz.core import accounting as accounting_module
    from nexus_authz.core import usage as usage_module
    from nexus_authz.core.usage import MAX_BODY_BYTES

    _engine_module, _accounting_module, _usage_module = engine_module, accounting_module, usage_module
    _window = usage_module.DEFAULT_WINDOW
    _exact_below = accounting_module.needs_exact_count.__kwdefaults__["threshold"]

    _perf_counter = _clock_of("perf_counter", "CLOCK_MONOTONIC")

    SERVICE_ENGINE = _slot_offset(AccessLogService, "engine")
    SERVICE_ENTRIES = _slot_offset(AccessLogService, "entries")
    SERVICE_IGNORED = _slot_offset(AccessLogService, "ignored")
    if SERVICE_ENGINE >= 0 and SERVICE_ENTRIES >= 0 and SERVICE_IGNORED >= 0:
        _Service = AccessLogService
    _max_body = MAX_BODY_BYTES
    _decode_step = usage_module._DECODE_STEP
    return 0


cdef inline double _now(object clock) except? -1.0:
    """clock(), in C when it is time.perf_counter on CLOCK_MONOTONIC (the same double, _clocks.pxi)."""
    cdef double now
    if clock is _perf_counter and _perf_counter is not None and _clock_now(_CLOCK_MONOTONIC, &now):
        return now
    return clock()


cdef inline object _field(object service, Py_ssize_t offset, str name):
    """getattr(service, name), from its slot when the service is an AccessLogService."""
    cdef PyObject* value = _slot_value(service, offset) if type(service) is _Service else NULL
    return <object>value if value != NULL else getattr(service, name)


cdef inline int _add_to(object service, Py_ssize_t offset, str name, Py_ssize_t n) except -1:
    """`service.<name> += n`, in its slot when the service is an AccessLogService."""
    cdef PyObject* value = _slot_value(service, offset) if type(service) is _Service else NULL
    if value != NULL:
        _slot_store(service, offset, <object>value + n)
    else:
        setattr(service, name, getattr(service, name) + n)
    return 0


cdef int _has_word(object text, str word, const char* w, Py_ssize_t m) except -1:
    """`word in text.lower()` for a str (`w`: the m ASCII lower-case bytes of `word`), with no lowered
    copy when it is ASCII."""
    cdef const unsigned char* p
    cdef Py_ssize_t n, i, k
    cdef unsigned char c
    if not PyUnicode_IS_ASCII(text):
        return word in text.lower()
    p = PyUnicode_1BYTE_DATA(text)
    n = PyUnicode_GET_LENGTH(text)
    for i in range(n - m + 1):
        for k in range(m):
            c = p[i + k]
            if 65 <= c <= 90:
                c += 32
            if c != (<const unsigned char*>w)[k]:
                break
        else:
            return 1
    return 0


cdef inline int _event_stream(object text) except -1:
    """`"event-stream" in text.lower()` for a str."""
    return _has_word(text, "event-stream", b"event-stream", 12)


cdef int _identity(object text) except -1:
    """`text.strip().lower() in ("", "identity")` for a str, with no copies when it is ASCII."""
    cdef const unsigned char* p
    cdef Py_ssize_t i = 0, n, k
    cdef unsigned char c
    if not PyUnicode_IS_ASCII(text):
        return text.strip().lower() in ("", "identity")
    p = PyUnicode_1BYTE_DATA(text)
    n = PyUnicode_GET_LENGTH(text)
    while i < n and Py_UNICODE_ISSPACE(p[i]):
        i += 1
    while n > i and Py_UNICODE_ISSPACE(p[n - 1]):
        n -= 1
    if n == i:
        return 1
    if n - i != 8:
        return 0
    for k in range(8):
        c = p[i + k]
        if 65 <= c <= 90:
            c += 32
        if c != (<const unsigned char*>b"identity")[k]:
            return 0
    return 1


cdef enum:
    BUFFER = 64 << 10  # the reused buffer's bytes: a record's data decoded for the compiled loop

cdef unsigned char _buffer[BUFFER]  # one buffer for every entry: its lines stay in cache within a message


cdef object _whole(tuple item, bytes raw):
    """A log_entries(later=True) item as log_entries() makes it: its data decoded into a bytes object (the
    per-entry code's), or the unusual entry's tuple when that base64 is not canonical."""
    if type(item[4]) is not int:
        return item
    data = _b64decode(<const unsigned char*>PyBytes_AS_STRING(raw), _span_of(item))
    if data is None:
        return (None, None, None, None, b"", 0, item[6], item[7])
    return (item[0], item[1], item[2], item[3], data, item[5], item[6], item[7])


cdef int _common(tuple item, object service, object engine, Py_ssize_t* counted, bytes raw) except -1:
    """adapters/envoy_als.py `_account_snippet` of a scanned entry (log_entries' tuple) when it is the
    common entry: a whole JSON body's or an OpenAI stream chunk's provider record, read here as
    adapters/als_fast.py `body_usage` / `sse_usage` read it (the Usage of usage_records.usage_from_counts,
    the model of document_model), settled by native/_account.pyx `account_counts`. 1 taken (counted in
    `counted`, which the caller adds to service.entries before any other code runs); 0 not (nothing
    changed: the caller runs `_account_scanned`). `engine`: service.engine, which the caller reads. An
    item of log_entries(raw, later=True) has its data decoded here, into the reused buffer."""
    cdef object kind = item[3], data = item[4], content_type, content_encoding, taken_now, inflated = None
    cdef const unsigned char* s
    cdef Py_ssize_t n
    cdef Span span
    cdef const unsigned char* p
    cdef long long c[5]
    cdef long long prompt, cached, completion, reasoning
    cdef int shape
    if kind is None:
        return 0
    if kind == _NONE:  # no record from the Lua tap (the client went away first; a kind it does not know)
        content_type = item[1]
        content_encoding = item[2]
        # StreamUsage of nothing, as JSON: Usage(source="none"); the response did not end: keep_estimate
        if (
            item[5]
            or not content_type
            or not _has_word(content_type, "json", b"json", 4)
            or _event_stream(content_type)
            or (content_encoding and not _identity(content_encoding))
        ):
            return 0
        return _settle(item, service, engine, counted, 0, 0, 0, 0, True, True, NULL, 0)
    if type(data) is int:  # log_entries(later=True): where its base64 is in raw
        span = _span_of(item)
        if not 0 <= span.start < span.end <= PyBytes_GET_SIZE(raw):
            return 0
        p = <const unsigned char*>PyBytes_AS_STRING(raw) + span.start
        n = _b64size(p, span.end - span.start)
        if n < 0:
            return 0  # not canonical: the caller's _whole makes it the unusual entry
        if n > BUFFER:
            data = PyBytes_FromStringAndSize(NULL, n)
            s = <const unsigned char*>PyBytes_AS_STRING(data)
        else:
            s = _buffer
        if not _b64into(p, span.end - span.start, <unsigned char*>s):
            return 0
    elif type(data) is bytes:
        s = <const unsigned char*>PyBytes_AS_STRING(data)
        n = PyBytes_GET_SIZE(data)
    else:
        return 0
    if kind == _BODY:  # als_fast.body_usage
        content_type = item[1]
        content_encoding = item[2]
        if item[5] or n > _max_body:
            return 0
        if content_encoding and not _identity(content_encoding):
            # a compressed body (what providers send clients that accept gzip: the SDKs' default) read as
            # its decompressed bytes: StreamUsage's own reading when it decodes it in one step (under
            # _DECODE_STEP bytes, 256 KiB: within MAX_BODY_BYTES, as the identity body above)
            inflated = _inflated(content_encoding, s, n)
            if inflated is None:
                return 0
            s = <const unsigned char*>PyBytes_AS_STRING(inflated)
            n = PyBytes_GET_SIZE(inflated)
        if content_type and _event_stream(content_type):  # a whole stream: counted when it has no record
            return _counted(item, service, engine, counted, s, n)
        shape = _document(s, n, &span)
        if shape == DOC_ERROR:  # StreamUsage's Usage(source="none") of a whole response: no estimate kept
            return _settle(item, service, engine, counted, 0, 0, 0, 0, True, False, s, n)
        if shape != DOC_USAGE:
            return 0
        shape = _counts(s, span.start, span.end, c)
        if shape == 0:
            return 0  # document_usage decodes the record
    elif kind == _SSE:  # als_fast.sse_usage: OpenAI's usage chunk; Anthropic's usage events
        if _sse_span(s, n, &span):
            shape = _counts(s, span.start, span.end, c)
            if shape != 1:
                return 0
        else:  # named events: Anthropic's usage events, a Responses stream's final one
            shape = _named_sse(s, n, c)
            if shape == 0:
                return 0
    else:
        return 0
    if shape == 1:  # usage_records._openai_counts
        prompt, completion = c[0], c[1]
        cached = c[2] if c[2] < prompt else prompt
        reasoning = c[4] if c[4] < completion else completion
    else:  # usage_records._anthropic_counts
        prompt = c[0] + c[1] + c[2]
        cached, completion, reasoning = c[1], c[3], 0
    # the model of the body (document_model) read only when the reservation names none
    return _settle(item, service, engine, counted, prompt, cached, completion, reasoning, False, False, s, n)


cdef object _inflated(object encoding, const unsigned char* s, Py_ssize_t n):
    """The body s[:n] of content encoding `encoding` decompressed, as core/usage.py StreamUsage decodes a
    body fed whole (gzip and x-gzip: a gzip member; deflate: zlib-wrapped or raw by its first two bytes),
    when that decoding is one step of it: the whole stream ends within the data, with nothing after it,
    in fewer than _DECODE_STEP bytes. None otherwise (another encoding, an error, a cut or longer stream,
    trailing bytes): StreamUsage reads it."""
    cdef int wbits
    name = encoding.strip().lower()  # (a str: the scan's, as _identity reads it)
    if name == "gzip" or name == "x-gzip":
        wbits = _zlib.MAX_WBITS | 16
    elif name == "deflate" and n >= 2:
        wbits = _zlib.MAX_WBITS if (s[0] & 0x0F) == 8 and ((s[0] << 8) | s[1]) % 31 == 0 else -_zlib.MAX_WBITS
    else:
        return None
    decoder = _zlib.decompressobj(wbits)
    try:
        out = decoder.decompress(PyBytes_FromStringAndSize(<const char*>s, n), _decode_step)
    except _zlib.error:
        return None
    if not decoder.eof or decoder.unused_data or decoder.unconsumed_tail:  # (a longer one: a tail left)
        return None
    return out


cdef int _counted(tuple item, object service, object engine, Py_ssize_t* counted, const unsigned char* s,
                  Py_ssize_t n) except -1:
    """`_account_snippet` of a whole event stream s[:n] (a "body" record, nothing skipped, identity
    encoding) without a usage record, as Engine.account_response concludes it: StreamUsage's
    `Usage(prompt_tokens=hint, completion_tokens=<the content deltas counted>, source="estimated")` when
    the count runs inline (accounting.needs_exact_count False: tiktoken's count of a stream shorter than
    its executor threshold, or the estimate without exact_cutoff_count), settled by account_c(counted).
    Taken only when StreamUsage's reading is `_stream_text`'s: it starts with a `data:` line and holds no
    CR and no `"usage"` key (no record to find), and an error event with no content goes back
    (StreamUsage's Usage(source="none")); the parser's model is document_model's. A count that
    needs_exact_count runs in a worker thread goes to `_count_later`, for any reservation. 0 (nothing
    changed) for anything else, and before the count when account_c would not take the entry
    (counted_ready)."""
    cdef bint exact
    cdef Py_ssize_t matches = 0
    cdef long long completion = 0
    if n < 5 or n >= _window or memcmp(s, b"data:", 5) != 0:
        return 0
    if _memchr(s, 13, n) != NULL or _memmem(s, n, b'"usage"', 7) != NULL:
        return 0
    request_id = item[0]
    if type(request_id) is not str:
        return 0
    exact = engine.settings.accounting.exact_cutoff_count
    if exact:  # accounting.needs_exact_count: the count runs in a worker thread from this size on
        counter = _engine_module.count_tokens
        if n >= _exact_below or (counter is _accounting_module.count_tokens
                                 and not _accounting_module.encoding_loaded()):
            return _count_later(item, service, engine, counted, s, n, counter)
    else:
        counter = _usage_module.estimate_tokens
    if not counted_ready(engine, <str>request_id):
        return 0
    text = _stream_text(s, n, exact, &matches)
    if text is None:
        return 0
    if matches:  # StreamUsage._counted_completion: max(0, int(counter(text))); a failing count goes back
        try:
            completion = max(0, int(counter(text)))
        except Exception:
            return 0
    if completion == 0 and _saw_error(s, n):  # StreamUsage._finish: Usage(source="none")
        return 0
    return _settle(item, service, engine, counted, 0, 0, completion, 0, False, False, s, n, True)


cdef object _pending = None  # _count_later's awaitable, for account_run to return


cdef int _count_later(tuple item, object service, object engine, Py_ssize_t* counted, const unsigned char* s,
                      Py_ssize_t n, object counter) except -1:
    """`_counted` of a stream whose count Engine.account_response runs in a worker thread: its text read here
    (no error event in it: those go back), counted and accounted by the service's `count_later` (Python's
    Engine.account, after the count), whose awaitable account_run returns. 1 taken, 0 not."""
    global _pending
    cdef Py_ssize_t matches = 0
    if _saw_error(s, n):
        return 0
    text = _stream_text(s, n, True, &matches)
    if text is None:
        return 0
    request_id = item[0]
    model = _model(s, n)  # StreamUsage.model (its first 8 KiB), read before the buffer is reused
    hint = engine.prompt_hint(request_id)
    _pending = service.count_later(request_id, text if matches else None, counter, hint, model)
    counted[0] += 1
    _taken.n += 1
    return 1


cdef int _settle(tuple item, object service, object engine, Py_ssize_t* counted, long long prompt,
                 long long cached, long long completion, long long reasoning, bint none, bint at_least,
                 const unsigned char* s, Py_ssize_t n, bint counted_stream=False) except -1:
    """`_common`'s settlement of its entry (native/_account.pyx `account_c`): a provider's counts, or with
    `none` the Usage(source="none") of a response without usage (`at_least`: keep_estimate), or with
    `counted_stream` a stream's counted completion (`_counted`). The model the body names (document_model
    of s[:n]), when it has one (s not NULL). 1 taken, 0 not."""
    cdef model_of_t model_of = NULL
    if s != NULL:
        model_of = _model
    request_id = item[0]
    if type(request_id) is not str:
        return 0
    try:
        taken_now = account_c(engine, <str>request_id, prompt, cached, completion, reasoning, None,
                              model_of, s, n, none, at_least, counted_stream)
    except BaseException:
        service.entries += 1  # _account_snippet counts the entry before its accounting raises
        raise
    if not taken_now:
        return 0
    counted[0] += 1
    _taken.n += 1
    return 1


def account_run(list items, Py_ssize_t i, bytes raw, object service, object fallback, object failed,
                object clock, double started, double slice):
    """adapters/envoy_als.py `_account_batch`'s loop over log_entries' `items` from index i, in C: each
    entry `_common` takes is accounted here, any other one goes to `fallback(item, raw)` (the service's
    `_account_scanned`), an entry that raises to `failed(item)` (which logs it). Returns (next index,
    awaitable, sliced) after the entry whose fallback returned an awaitable (the caller awaits it), after
    the first entry that brings `clock() - started` to `slice` or more (sliced: the caller yields), or at
    the end."""
    global _pending
    cdef Py_ssize_t n = len(items)
    cdef Py_ssize_t counted = 0  # entries taken and not yet added to service.entries
    cdef object item, pending, engine = None
    if _max_body < 0:
        _bind()
    try:
        while i < n:
            item = items[i]
            i += 1
            pending = None
            try:
                if engine is None:  # read once, and again after any Python code ran
                    engine = _field(service, SERVICE_ENGINE, "engine")
                if item is None:  # not admitted by nexus-authz
                    _add_to(service, SERVICE_IGNORED, "ignored", 1)
                elif not _common(<tuple?>item, service, engine, &counted, raw):
                    _count(service, &counted)  # the per-entry code sees the count as it would
                    engine = None
                    pending = fallback(_whole(<tuple>item, raw), raw)
                    if pending is not None:
                        return (i, pending, False)
                elif _pending is not None:  # a count in a worker thread (_count_later): awaited by the caller
                    pending, _pending = _pending, None
                    engine = None
                    return (i, pending, False)
            except Exception:
                _count(service, &counted)
                engine = None
                failed(item)
            if _now(clock) - started >= slice:
                return (i, None, True)
        return (i, None, False)
    finally:
        _count(service, &counted)


cdef int _count(object service, Py_ssize_t* counted) except -1:
    """service.entries += the entries account_run took since the last time (one int per message, not one
    per entry)."""
    cdef Py_ssize_t n = counted[0]
    if n:
        counted[0] = 0
        _add_to(service, SERVICE_ENTRIES, "entries", n)
    return 0
