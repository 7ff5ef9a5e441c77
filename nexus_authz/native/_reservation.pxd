from cpython.object cimport PyObject


cdef class _Node:
    cdef object key  # the request id it is kept under in an Entries (None: in none)
    cdef PyObject* prev  # borrowed: the Entries' dict holds every node
    cdef PyObject* next


cdef class Reservation(_Node):
    cdef readonly object counter_ids
    cdef readonly object specs
    cdef readonly object costs
    cdef readonly object uncharged
    cdef readonly double charged_at
    cdef readonly double expires_at
    cdef bint tracked  # a context: the InFlight of the fields below
    cdef readonly object key_id
    cdef readonly object tenant
    cdef readonly object model
    cdef readonly object prompt_tokens
    cdef readonly object body
    cdef tuple _tuple(self)
    cdef object _context(self)


cdef class Entries:
    cdef dict _nodes
    cdef PyObject* _head
    cdef PyObject* _tail
    cdef Py_ssize_t _state
    cdef object _first(self)
    cdef object _get(self, object key)
    cdef int _set(self, object key, object value) except -1
    cdef object _take(self, object key)


cdef Reservation new_reservation(object counter_ids, object specs, object costs, object uncharged,
                                 double charged_at, double expires_at, bint tracked, object key_id,
                                 object tenant, object model, object prompt_tokens, object body)
