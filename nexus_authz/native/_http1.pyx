# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""HTTP/1.1 request framing in C for the ext_authz / auth_request listener (see nexus_authz/native/).

`RequestParser` scans whole request heads in C, with no Python call per header: it keeps only the
headers the decision reads (the `keep` map: lower-case name -> header key) and hands one complete request
at a time to the protocol, setting the same fields the httptools callbacks set (`_url`, `_headers`,
`_body`) and calling its `on_message_complete`, which routes, decides and answers exactly as with httptools.

It accepts a strict subset of HTTP/1.1: the requests Envoy and nginx send. Anything else (another method
or version, chunked or other transfer codings, `upgrade`, obs-fold, bare LF, control bytes, a limit
exceeded, a content-length over the body limit, leading empty lines, an absolute URL ...) makes `feed`
return True: the caller replays the current request, from its first byte and with the same read
boundaries (`take_replay`), through the httptools protocol, which answers or refuses it as it always did
(400/413/414/431 + close). Every prefix this parser accepts is accepted by llhttp too, and no limit the
httptools path checks can fire on it, so the two paths write the same bytes for any stream (the
differential tests check this on streams split at random points).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.list cimport PyList_GET_ITEM, PyList_SET_ITEM
from cpython.unicode cimport PyUnicode_DecodeLatin1
from libc.string cimport memcmp


include "_slots.pxi"


cdef inline int _put(object obj, Py_ssize_t offset, str name, object value) except -1:
    """setattr(obj, name, value), straight into the slot when `offset` is known."""
    if offset < 0:
        setattr(obj, name, value)
        return 0
    _slot_store(obj, offset, value)
    return 0


cdef inline object _get(object obj, Py_ssize_t offset, str name):
    """getattr(obj, name), straight from the slot when `offset` is known and the slot is set."""
    cdef PyObject* value
    if offset >= 0:
        value = (<PyObject**>((<char*><PyObject*>obj) + offset))[0]
        if value != NULL:
            return <object>value
    return getattr(obj, name)


# bytes of a header name (RFC 9110 token)
cdef bint TOKEN[256]
# bytes of a header value llhttp accepts: HTAB, SP..~, obs-text
cdef bint VALUE[256]
cdef int _i
for _i in range(256):
    TOKEN[_i] = (
        (48 <= _i <= 57) or (65 <= _i <= 90) or (97 <= _i <= 122) or _i in b"!#$%&'*+-.^_`|~"
    )
    VALUE[_i] = _i == 9 or (32 <= _i <= 126) or _i >= 128

cdef bytes M_GET = b"GET", M_POST = b"POST", M_PUT = b"PUT", M_DELETE = b"DELETE"
cdef bytes M_PATCH = b"PATCH", M_HEAD = b"HEAD", M_OPTIONS = b"OPTIONS"


cdef extern from "Python.h":
    void* PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    Py_ssize_t Py_REFCNT(object o)
    Py_ssize_t PyDict_GET_SIZE(object o)
    bint PyDict_Next(object d, Py_ssize_t* pos, PyObject** key, PyObject** value)
    void* PyCapsule_GetPointer(object capsule, const char* name) except? NULL


# -- the hand-over's direct call ------------------------------------------------------------------------------
# `proto.on_message_complete()` looks the method up by name on the protocol's class per request (the type's
# method cache, the descriptor, the instance) and calls the compiled handler through its Python entry.
# When that attribute is the compiled handler `direct_handler` registered (native/_fast.pyx), on a class
# whose instances have no __dict__ and the generic getattr, the hand-over calls its C body instead, the
# class checked by its version tag, which CPython changes whenever the class or a base is modified (a
# class that rebinds on_message_complete is looked up again, as is any other class).
cdef extern from *:
    """
    typedef int (*_nx_handler)(PyObject *);
    static inline int _nx_type_tagged(PyObject *o, PyObject *t, unsigned int tag) {
        PyTypeObject *ot = Py_TYPE(o);
        return (PyObject *)ot == t && tag != 0 && ot->tp_version_tag == tag
    #ifdef Py_TPFLAGS_VALID_VERSION_TAG
            && (ot->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG)
    #endif
            ;
    }
    /* the version tag of o's class when its attribute `name` is `func`, found as _PyObject_GetMethod
       finds a method (a method descriptor on the class, no instance __dict__): else 0 */
    static unsigned int _nx_method_tag(PyObject *o, PyObject *name, PyObject *func) {
        PyTypeObject *t = Py_TYPE(o);
        PyObject *found;
        if (func == NULL || t->tp_getattro != PyObject_GenericGetAttr || t->tp_dictoffset != 0)
            return 0;
        found = _PyType_Lookup(t, name);  /* borrowed; gives the class a version tag */
        if (found != func || !(Py_TYPE(found)->tp_flags & Py_TPFLAGS_METHOD_DESCRIPTOR))
            return 0;
    #ifdef Py_TPFLAGS_VALID_VERSION_TAG
        if (!(t->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG))
            return 0;
    #endif
        return t->tp_version_tag;
    }
    """
    ctypedef int (*Handler "_nx_handler")(object) except -1
    bint _type_tagged "_nx_type_tagged"(object o, PyObject* t, unsigned int tag)
    unsigned int _method_tag "_nx_method_tag"(object o, str name, PyObject* func) except? 0


cdef Handler _handler = NULL  # the registered handler's C body
cdef object _handler_func = None  # ... and its function object (the class attribute it must be)
cdef object _handler_type = None  # the last protocol class found to hold it, and its version tag
cdef unsigned int _handler_tag = 0


def direct_handler(func, capsule):
    """Register the compiled on_message_complete `func` and its C body (a capsule named
    "nexus_authz.native._http1.handler": int(PyObject* proto), -1 with an exception set)."""
    global _handler, _handler_func, _handler_type, _handler_tag
    _handler = <Handler>PyCapsule_GetPointer(capsule, "nexus_authz.native._http1.handler")
    _handler_func = func
    _handler_type = None
    _handler_tag = 0


def handed_over_directly(proto):
    """Whether the next hand-over to `proto` calls the handler's C body (tests)."""
    return _handler != NULL and _type_tagged(proto, <PyObject*>_handler_type, _handler_tag)


cdef int _hand_over_slow(object proto) except -1:
    """proto.on_message_complete(); the class remembered when that attribute is the registered handler."""
    global _handler_type, _handler_tag
    cdef unsigned int tag
    proto.on_message_complete()
    if _handler != NULL:
        tag = _method_tag(proto, "on_message_complete", <PyObject*>_handler_func)
        if tag != 0:
            _handler_type = type(proto)
            _handler_tag = tag
    return 0


cdef inline bint _same(const unsigned char* a, const unsigned char* b, Py_ssize_t n) noexcept nogil:
    """a[:n] == b[:n] in time that depends on n only (a value may be another client's key)."""
    cdef unsigned char acc = 0
    cdef Py_ssize_t i
    for i in range(n):
        acc |= a[i] ^ b[i]
    return acc == 0


cdef inline unsigned char lower(unsigned char c) nogil:
    return c + 32 if 65 <= c <= 90 else c


cdef inline bint name_is(const char* p, Py_ssize_t n, const char* lit, Py_ssize_t litn) nogil:
    """Case-insensitive comparison of a header name with a lower-case literal."""
    cdef Py_ssize_t i
    if n != litn:
        return False
    for i in range(n):
        if lower(<unsigned char>p[i]) != <unsigned char>lit[i]:
            return False
    return True


cdef class RequestParser:
    """One connection's framing. The httptools parser's `get_method` / `should_keep_alive` answer for the
    request being handed over, so the protocol's shared code reads them the same way."""

    # (its fields and C methods: _http1.pxd, which native/_fast.pyx reads them through)

    def __cinit__(
        self,
        object proto,
        Py_ssize_t max_header_bytes,
        Py_ssize_t max_body,
        Py_ssize_t max_url,
        Py_ssize_t max_headers,
        dict keep,
    ):
        self.proto = proto
        cls = type(proto)
        self.o_url = _slot_offset(cls, "_url")
        self.o_headers = _slot_offset(cls, "_headers")
        self.o_body = _slot_offset(cls, "_body")
        self.o_closing = _slot_offset(cls, "_closing")
        self.max_header_bytes = max_header_bytes
        self.max_body = max_body
        self.max_url = max_url
        self.max_headers = max_headers
        if len(keep) > MAX_KEEP:
            raise ValueError(f"at most {MAX_KEEP} kept headers")
        self.keep_keys = []
        blob = []
        self.keep_n = 0
        self.keep_max = 0
        self.keep_off[0] = 0
        for name, key in keep.items():
            lname = bytes(name).lower()
            blob.append(lname)
            self.keep_keys.append(key)
            self.keep_off[self.keep_n + 1] = self.keep_off[self.keep_n] + len(lname)
            self.keep_n += 1
            self.keep_max = max(self.keep_max, len(lname))
        self.keep_blob = b"".join(blob)
        self.keep_last = [None] * self.keep_n
        self.kept = [None] * self.keep_n
        for k in range(self.keep_n):  # names of one key (as a dict holds them): one value, joined
            self.keep_slot[k] = self.keep_keys.index(self.keep_keys[k])
        self.kept_n = 0
        self.last_url = None
        self.pending = None
        self.splits = None
        self.replay = None
        self.method = None
        self.keep_alive = True
        self.need = -1

    # -- the httptools parser's interface the protocol reads ---------------------------------------------
    def get_method(self):
        return self.method

    def should_keep_alive(self):
        return self.keep_alive

    def take_replay(self):
        """The reads (their parts from the current request's first byte) to replay through httptools."""
        out = self.replay if self.replay is not None else []
        self.replay = None
        return out

    @property
    def pending_bytes(self):
        return 0 if self.pending is None else len(self.pending)

    # -- feeding -------------------------------------------------------------------------------------
    def feed(self, bytes data not None):
        """Parse one read. False: done (requests handed over, a partial one kept). True: fall back, the
        current request is in `take_replay()` and this parser holds nothing."""
        return self.read(data)

    cdef object read(self, bytes data):
        """`feed`, called from C (native/_fast.pyx's data_received)."""
        cdef Py_ssize_t total, need
        cdef bytes buf
        if self.pending is None:
            return self._feed_bytes(data)
        self.pending += data
        self.splits.append(len(data))
        total = len(self.pending)
        need = self.need
        if need < 0 or total >= need:
            buf = bytes(self.pending)
            r = self._message(buf, 0, &need)
            if r == FALLBACK:
                return self._fall_back()
            if r == NEED_MORE:
                self.need = need
                return False
            # complete: the rest of the buffer began in this read
            self.pending = None
            self.splits = None
            self.need = -1
            if self._hand_over():
                return False
            if need < total:
                return self._feed_bytes(buf[need:])
            return False
        return False

    cdef bint _fall_back(self):
        cdef list chunks = []
        cdef Py_ssize_t start = 0, n
        cdef bytes whole = bytes(self.pending)
        for n in self.splits:
            chunks.append(whole[start : start + n])
            start += n
        self.replay = chunks
        self.pending = None
        self.splits = None
        self.need = -1
        return True

    cdef object _feed_bytes(self, bytes data):
        cdef Py_ssize_t pos = 0, n = PyBytes_GET_SIZE(data), used
        cdef int r
        while pos < n:
            r = self._message(data, pos, &used)
            if r == COMPLETE:
                pos = used
                if self._hand_over():
                    return False
                continue
            if r == NEED_MORE:
                self.pending = bytearray(data[pos:] if pos else data)
                self.splits = [n - pos]
                self.need = used - pos if used >= 0 else -1  # from the request's first byte
                self.proto._in_message = True
                return False
            self.replay = [data[pos:] if pos else data]
            return True
        return False

    cdef bint _hand_over(self) except -1:
        """Hand the parsed request to the protocol; True when it closed the connection."""
        proto = self.proto
        if _handler != NULL and _type_tagged(proto, <PyObject*>_handler_type, _handler_tag):
            _handler(proto)
        else:
            _hand_over_slow(proto)
        return _get(proto, self.o_closing, "_closing")

    cdef int _message(self, bytes data, Py_ssize_t start, Py_ssize_t* end) except -1:
        """Parse the request starting at `start`. COMPLETE: set the protocol's fields and `end` to the
        offset after it; NEED_MORE: a valid prefix within every limit, `end` the request's total size once
        known (else -1); FALLBACK: not in the subset (or over a limit)."""
        cdef const unsigned char* base = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef const unsigned char* p = base + start
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data) - start
        cdef Py_ssize_t i = 0, j, name0, name_len, value0, value_len, url0, url_len
        cdef Py_ssize_t header_bytes = 0, header_count = 0, k
        cdef long long content_length = -1
        cdef bint close = False
        cdef object method
        cdef Py_ssize_t mlen
        cdef const unsigned char* q
        end[0] = -1
        # -- request line: METHOD SP /target SP HTTP/1.1 CRLF --------------------------------------------
        method = None
        mlen = 0
        if n >= 4 and memcmp(p, b"GET ", 4) == 0:
            method, mlen = M_GET, 3
        elif n >= 5 and memcmp(p, b"POST ", 5) == 0:
            method, mlen = M_POST, 4
        elif n >= 4 and memcmp(p, b"PUT ", 4) == 0:
            method, mlen = M_PUT, 3
        elif n >= 5 and memcmp(p, b"HEAD ", 5) == 0:
            method, mlen = M_HEAD, 4
        elif n >= 6 and memcmp(p, b"PATCH ", 6) == 0:
            method, mlen = M_PATCH, 5
        elif n >= 7 and memcmp(p, b"DELETE ", 7) == 0:
            method, mlen = M_DELETE, 6
        elif n >= 8 and memcmp(p, b"OPTIONS ", 8) == 0:
            method, mlen = M_OPTIONS, 7
        else:
            return NEED_MORE if n < 8 and _method_prefix(p, n) else FALLBACK
        i = mlen + 1
        url0 = i
        if i < n and p[i] != 47:  # '/': origin-form only
            return FALLBACK
        while i < n and 33 <= p[i] <= 126:
            i += 1
        url_len = i - url0
        if url_len > self.max_url:
            return FALLBACK
        if i >= n:
            return NEED_MORE
        if p[i] != 32 or url_len == 0:
            return FALLBACK
        i += 1
        if n - i < 10:
            return NEED_MORE if memcmp(p + i, b"HTTP/1.1\r\n", n - i) == 0 else FALLBACK
        if memcmp(p + i, b"HTTP/1.1\r\n", 10) != 0:
            return FALLBACK
        i += 10
        # -- header lines ---------------------------------------------------------------------------------
        for k in range(self.kept_n):  # the last parse's values
            _list_clear(self.kept, self.kept_order[k])
        self.kept_n = 0
        while True:
            if i >= n:
                return self._partial(n)
            if p[i] == 13:  # CR: the end of the head?
                if i + 1 >= n:
                    return self._partial(n)
                if p[i + 1] != 10:
                    return FALLBACK
                i += 2
                break
            name0 = i
            while i < n and TOKEN[p[i]]:
                i += 1
            if i >= n:
                return FALLBACK if _framing_prefix(p + name0, i - name0) else self._partial(n)
            name_len = i - name0
            if p[i] != 58 or name_len == 0:  # ':' right after a non-empty name
                return FALLBACK
            i += 1
            while i < n and (p[i] == 32 or p[i] == 9):
                i += 1
            value0 = i
            while i < n and VALUE[p[i]]:
                i += 1
            if i + 1 >= n:
                if i < n and p[i] != 13:
                    return FALLBACK
                # llhttp checks the framing headers' values as they arrive (a non-digit in
                # content-length is an error before its line ends): let it see those
                return FALLBACK if _framing_prefix(p + name0, name_len) else self._partial(n)
            if p[i] != 13 or p[i + 1] != 10:
                return FALLBACK
            value_len = i - value0
            i += 2
            header_count += 1
            header_bytes += name_len + value_len + 4
            if header_count > self.max_headers or header_bytes > self.max_header_bytes:
                return FALLBACK
            q = p + name0
            # the headers framing depends on
            if name_len == 14 and name_is(<const char*>q, 14, b"content-length", 14):
                if content_length >= 0 or value_len == 0 or value_len > 15:
                    return FALLBACK
                content_length = 0
                for k in range(value_len):
                    if not (48 <= p[value0 + k] <= 57):
                        return FALLBACK
                    content_length = content_length * 10 + (p[value0 + k] - 48)
            elif name_len == 10 and name_is(<const char*>q, 10, b"connection", 10):
                if close or value_len == 0:
                    return FALLBACK  # a second connection header: llhttp's token rules, not ours
                if name_is(<const char*>(p + value0), value_len, b"close", 5):
                    close = True
                elif not name_is(<const char*>(p + value0), value_len, b"keep-alive", 10):
                    return FALLBACK
            elif (
                (name_len == 17 and name_is(<const char*>q, 17, b"transfer-encoding", 17))
                or (name_len == 7 and name_is(<const char*>q, 7, b"upgrade", 7))
                or (name_len == 16 and name_is(<const char*>q, 16, b"proxy-connection", 16))
            ):
                return FALLBACK
            elif name_len <= self.keep_max:
                self._keep(q, name_len, p + value0, value_len)
        # -- body -----------------------------------------------------------------------------------------
        if content_length > self.max_body:
            return FALLBACK  # httptools answers 413 once that many bytes arrive
        if content_length < 0:
            content_length = 0
        if n - i < content_length:
            end[0] = start + i + content_length
            return NEED_MORE
        proto = self.proto
        url = self.last_url
        if url is None or PyBytes_GET_SIZE(url) != url_len or not _same(
            <const unsigned char*>PyBytes_AS_STRING(url), p + url0, url_len
        ):
            url = PyBytes_FromStringAndSize(<const char*>(p + url0), url_len)
            self.last_url = url
        _put(proto, self.o_url, "_url", url)
        self._headers(proto)
        if content_length > 0:  # a tuple: the protocol only joins it (a new list of chunks per httptools request)
            _put(proto, self.o_body, "_body", (PyBytes_FromStringAndSize(<const char*>(p + i), content_length),))
        else:
            _put(proto, self.o_body, "_body", ())
        self.method = method
        self.keep_alive = not close
        end[0] = start + i + content_length
        return COMPLETE

    cdef int _partial(self, Py_ssize_t buffered):
        # An unfinished head within the limits so far: wait for more, unless it is so long that the
        # httptools path's guard on unfinished heads could fire (it never counts more than is buffered).
        return FALLBACK if buffered > self.max_header_bytes else NEED_MORE

    cdef int _headers(self, object proto) except -1:
        """The protocol's `_headers`: the kept headers, as a dict in the order they first came. The dict
        the protocol holds from the last request, when nothing else does and its keys are these in this
        order, gets the new values in place (the same keys, order and values as a new dict), else a new
        one: no dict made, grown and freed per request on a connection whose requests carry the same
        headers."""
        cdef Py_ssize_t pos = 0, j
        cdef PyObject* key
        cdef PyObject* value
        cdef list kept = self.kept
        old = _get(proto, self.o_headers, "_headers")
        if (
            type(old) is dict
            and Py_REFCNT(old) == 2  # the protocol's slot and `old`: nobody sees it change
            and PyDict_GET_SIZE(old) == self.kept_n
        ):
            # one pass: a key out of place leaves it half refilled, then replaced by a new one (and freed)
            for j in range(self.kept_n):
                if not PyDict_Next(old, &pos, &key, &value) or key != PyList_GET_ITEM(
                    self.keep_keys, self.kept_order[j]
                ):
                    break
                if value != PyList_GET_ITEM(kept, self.kept_order[j]):  # (else: the same str again)
                    (<dict>old)[<object>key] = <object>PyList_GET_ITEM(kept, self.kept_order[j])
            else:
                return 0
        headers = {}
        for j in range(self.kept_n):
            headers[self.keep_keys[self.kept_order[j]]] = <object>PyList_GET_ITEM(kept, self.kept_order[j])
        _put(proto, self.o_headers, "_headers", headers)
        return 0

    cdef int _keep(
        self, const unsigned char* name, Py_ssize_t name_len, const unsigned char* value, Py_ssize_t value_len
    ) except -1:
        cdef const char* blob = PyBytes_AS_STRING(self.keep_blob)
        cdef int k
        for k in range(self.keep_n):
            if self.keep_off[k + 1] - self.keep_off[k] == name_len and name_is(
                <const char*>name, name_len, blob + self.keep_off[k], name_len
            ):
                text = <object>PyList_GET_ITEM(self.keep_last, k)
                # the str decoded from these bytes last time (latin-1: one byte per char), else a new one
                if text is None or PyUnicode_GET_LENGTH(text) != value_len or not _same(
                    <const unsigned char*>PyUnicode_DATA(text), value, value_len
                ):
                    text = PyUnicode_DecodeLatin1(<const char*>value, value_len, NULL)
                    _list_put(self.keep_last, k, text)
                k = self.keep_slot[k]
                previous = <object>PyList_GET_ITEM(self.kept, k)
                if previous is None:
                    self.kept_order[self.kept_n] = k
                    self.kept_n += 1
                    _list_put(self.kept, k, text)
                else:
                    _list_put(self.kept, k, previous + ", " + text)
                return 0
        return 0


cdef inline int _list_put(list items, Py_ssize_t k, object value) except -1:
    """items[k] = value, for k in range (no bounds or type check, no index conversion)."""
    cdef PyObject* old = PyList_GET_ITEM(items, k)
    Py_INCREF(value)
    PyList_SET_ITEM(items, k, value)
    Py_XDECREF(old)
    return 0


cdef inline int _list_clear(list items, Py_ssize_t k) except -1:
    _list_put(items, k, None)
    return 0


cdef bint _framing_prefix(const unsigned char* name, Py_ssize_t n):
    """Whether a (maybe unfinished) header name is, or begins, one llhttp reads for framing."""
    return (
        (n <= 14 and name_is(<const char*>name, n, b"content-length", n))
        or (n <= 17 and name_is(<const char*>name, n, b"transfer-encoding", n))
        or (n <= 10 and name_is(<const char*>name, n, b"connection", n))
        or (n <= 7 and name_is(<const char*>name, n, b"upgrade", n))
        or (n <= 16 and name_is(<const char*>name, n, b"proxy-connection", n))
    )


cdef bint _method_prefix(const unsigned char* p, Py_ssize_t n):
    """Whether the n (< 8) bytes at p begin one of the methods of the subset (with its space)."""
    return (
        memcmp(p, b"GET ", min(n, 4)) == 0
        or memcmp(p, b"POST ", min(n, 5)) == 0
        or memcmp(p, b"PUT ", min(n, 4)) == 0
        or memcmp(p, b"HEAD ", min(n, 5)) == 0
        or memcmp(p, b"PATCH ", min(n, 6)) == 0
        or memcmp(p, b"DELETE ", min(n, 7)) == 0
        or memcmp(p, b"OPTIONS ", n) == 0
    )
