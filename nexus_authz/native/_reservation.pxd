cdef class Reservation:
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


cdef Reservation new_reservation(object counter_ids, object specs, object costs, object uncharged,
                                 double charged_at, double expires_at, bint tracked, object key_id,
                                 object tenant, object model, object prompt_tokens, object body)
