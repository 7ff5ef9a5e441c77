# cython: language_level=3, boundscheck=False, wraparound=False
"""A reservation in flight as the compiled lane records it: core/reservations.py's 7-tuple entry
(counter_ids, specs, costs, uncharged, charged_at, expires_at, context) in one object, with the two times
as C doubles and the context (an InFlight) as its five fields, so an admission keeps one object where the
tuple form kept four (the tuple, its InFlight, two floats).

It reads as that tuple everywhere the book and its readers look (`entry[i]`, unpacking, len, ==, hash,
repr: the floats and the InFlight are made when asked for), so ReservationBook, metrics, explain and the
policy API take it as they take the tuple; the compiled steps (native/_fast.pyx's check and release,
native/_account.pyx's settlement) read its fields in place. Immutable, as the tuple is: a release
records a new one. The pure path (and NEXUS_AUTHZ_PURE=1) keeps the tuple; tests/test_native_reservation.py
checks both forms read the same.
"""

from cpython.float cimport PyFloat_FromDouble
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM

from nexus_authz.core.model import InFlight

cdef extern from "Python.h":
    ctypedef struct PyTypeObject:
        PyObject* (*tp_alloc)(PyTypeObject*, Py_ssize_t) except NULL

cdef object _InFlight = InFlight  # a NamedTuple: a tuple subtype of 5 items


cdef class Reservation:
    """ReservationBook's entry (counter_ids, specs, costs, uncharged, charged_at, expires_at, context),
    read as that 7-tuple; `context` is None or an InFlight."""

    def __init__(self, counter_ids, specs, costs, uncharged, double charged_at, double expires_at,
                 context=None):
        self.counter_ids = counter_ids
        self.specs = specs
        self.costs = costs
        self.uncharged = uncharged
        self.charged_at = charged_at
        self.expires_at = expires_at
        if context is not None:
            if type(context) is not _InFlight:
                raise TypeError(f"a Reservation's context is an InFlight or None, not {type(context).__name__}")
            self.tracked = True
            self.key_id, self.tenant, self.model, self.prompt_tokens, self.body = context

    cdef object _context(self):
        """The InFlight of the fields (as tuple.__new__(InFlight, ...) makes it), or None."""
        if not self.tracked:
            return None
        cdef object t = <object>(<PyTypeObject*>_InFlight).tp_alloc(<PyTypeObject*>_InFlight, 5)
        for i, item in enumerate((self.key_id, self.tenant, self.model, self.prompt_tokens, self.body)):
            Py_INCREF(item)
            PyTuple_SET_ITEM(t, i, item)
        return t

    cdef tuple _tuple(self):
        return (
            self.counter_ids,
            self.specs,
            self.costs,
            self.uncharged,
            PyFloat_FromDouble(self.charged_at),
            PyFloat_FromDouble(self.expires_at),
            self._context(),
        )

    @property
    def context(self):
        return self._context()

    def __len__(self):
        return 7

    def __getitem__(self, index):
        if type(index) is int:
            if index == 5:
                return PyFloat_FromDouble(self.expires_at)
            if index == 6 or index == -1:
                return self._context()
        return self._tuple()[index]

    def __iter__(self):
        return iter(self._tuple())

    def __hash__(self):
        return hash(self._tuple())

    def __richcmp__(self, other, int op):
        if op != 2 and op != 3:
            return NotImplemented
        if type(other) is Reservation:
            other = (<Reservation>other)._tuple()
        elif not isinstance(other, tuple):
            return NotImplemented
        same = self._tuple() == other
        return same if op == 2 else not same

    def __repr__(self):
        return f"Reservation{self._tuple()!r}"

    def __reduce__(self):
        return (Reservation, self._tuple())


cdef Reservation new_reservation(object counter_ids, object specs, object costs, object uncharged,
                                 double charged_at, double expires_at, bint tracked, object key_id,
                                 object tenant, object model, object prompt_tokens, object body):
    """Reservation(...) without the argument tuple (the compiled lane's)."""
    cdef Reservation r = Reservation.__new__(Reservation)
    r.counter_ids = counter_ids
    r.specs = specs
    r.costs = costs
    r.uncharged = uncharged
    r.charged_at = charged_at
    r.expires_at = expires_at
    if tracked:
        r.tracked = True
        r.key_id = key_id
        r.tenant = tenant
        r.model = model
        r.prompt_tokens = prompt_tokens
        r.body = body
    return r
