ctypedef object (*model_of_t)(const unsigned char* s, Py_ssize_t n)

cdef int counted_ready(object engine, str request_id) except -1

cdef int account_c(object engine, str request_id, long long prompt, long long cached, long long completion,
                   long long reasoning, object response_model, model_of_t model_of,
                   const unsigned char* body, Py_ssize_t body_n, bint none=*, bint at_least=*,
                   bint counted=*) except -1


cdef class _Tally:
    """A count read as `taken[0]` (tests), kept as a C integer: no int object per increment (shared with
    _usage.pyx's)."""
    cdef long long n
