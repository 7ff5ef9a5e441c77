# The compiled parser's fields and C methods (_http1.pyx), read in place by native/_fast.pyx.

cdef enum:
    MAX_KEEP = 32
    COMPLETE = 0
    NEED_MORE = 1
    FALLBACK = 2


cdef class RequestParser:
    cdef object proto
    cdef Py_ssize_t max_header_bytes, max_body, max_url, max_headers
    cdef list keep_keys  # header key (str) of each kept name
    # the value (str) each kept header had last, and the last target (bytes): a request that repeats one
    # (every header but the request id, from one client) gets that object again, not a new one
    cdef list keep_last
    cdef bytes last_url
    # the request being parsed: each kept header's value (None: absent; a repeated header's values joined
    # with ", "), `kept_n` of them set, their indexes in the order they first came
    cdef list kept
    cdef int keep_slot[MAX_KEEP]  # each kept name's place in `kept`: the first name of its header key
    cdef int kept_order[MAX_KEEP]
    cdef int kept_n
    cdef bytes keep_blob  # the kept names, lower-case, end to end
    cdef Py_ssize_t keep_off[MAX_KEEP + 1]  # where each name starts in keep_blob (and where the last ends)
    cdef int keep_n
    cdef Py_ssize_t keep_max  # longest kept name
    cdef bytearray pending  # an incomplete request, from its first byte
    cdef list splits  # how many of `pending`'s bytes each read brought (for a replay)
    cdef list replay
    cdef object method
    cdef bint keep_alive
    cdef Py_ssize_t need  # bytes of the pending request once its head is known, else -1
    # the protocol's slots this writes and reads per request (at their offsets: no type look-up each time)
    cdef Py_ssize_t o_url, o_headers, o_body, o_closing

    cdef object read(self, bytes data)
    cdef bint _fall_back(self)
    cdef object _feed_bytes(self, bytes data)
    cdef bint _hand_over(self) except -1
    cdef int _message(self, bytes data, Py_ssize_t start, Py_ssize_t* end) except -1
    cdef int _partial(self, Py_ssize_t buffered)
    cdef int _headers(self, object proto) except -1
    cdef int _keep(
        self, const unsigned char* name, Py_ssize_t name_len, const unsigned char* value, Py_ssize_t value_len
    ) except -1
