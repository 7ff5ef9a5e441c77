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

`Entries` is the book's table (core.reservations.new_entries when the modules load): the OrderedDict's
operations the book uses, over a plain dict of request id -> node with the order linked through the nodes,
a Reservation being its own node; so an admission adds no object to the table either.
"""

from cpython.float cimport PyFloat_FromDouble
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM

from nexus_authz.core.model import InFlight

cdef extern from "Python.h":
    PyObject* PyDict_GetItemWithError(object d, object key) except? NULL
    ctypedef struct PyTypeObject:
        object (*tp_alloc)(PyTypeObject*, Py_ssize_t)  # a new reference, owned

cdef object _InFlight = InFlight  # a NamedTuple: a tuple subtype of 5 items


cdef class _Node:
    """A value's place in an Entries' order (a Reservation is its own; any other value is held by a _Link)."""


cdef class _Link(_Node):
    cdef object value


cdef class Reservation(_Node):
    """ReservationBook's entry (counter_ids, specs, costs, uncharged, charged_at, expires_at, context),
    read as that 7-tuple; `context` is None or an InFlight."""

    def __init__(self, counter_ids, specs, costs, uncharged, double charged_at, double expires_at,
                 context=None):
        _fill(self, counter_ids, specs, costs, uncharged, charged_at, expires_at)
        if context is not None:
            if type(context) is not _InFlight:
                raise TypeError(f"a Reservation's context is an InFlight or None, not {type(context).__name__}")
            self.tracked = True
            self.key_id, self.tenant, self.model, self.prompt_tokens, self.body = context

    cdef object _context(self):
        """The InFlight of the fields (as tuple.__new__(InFlight, ...) makes it), or None."""
        if not self.tracked:
            return None
        cdef object t = (<PyTypeObject*>_InFlight).tp_alloc(<PyTypeObject*>_InFlight, 5)
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


cdef inline void _fill(Reservation r, object counter_ids, object specs, object costs, object uncharged,
                       double charged_at, double expires_at):
    """The fields both constructors set (the context's are set apart)."""
    r.counter_ids = counter_ids
    r.specs = specs
    r.costs = costs
    r.uncharged = uncharged
    r.charged_at = charged_at
    r.expires_at = expires_at


cdef Reservation new_reservation(object counter_ids, object specs, object costs, object uncharged,
                                 double charged_at, double expires_at, bint tracked, object key_id,
                                 object tenant, object model, object prompt_tokens, object body):
    """Reservation(...) without the argument tuple (the compiled lane's)."""
    cdef Reservation r = Reservation.__new__(Reservation)
    _fill(r, counter_ids, specs, costs, uncharged, charged_at, expires_at)
    if tracked:
        r.tracked = True
        r.key_id = key_id
        r.tenant = tenant
        r.model = model
        r.prompt_tokens = prompt_tokens
        r.body = body
    return r


# -- the book's table ----------------------------------------------------------------------------------------

cdef object _MISSING = object()


cdef class Entries:
    """ReservationBook's table (request id -> entry, oldest first) as its OrderedDict is used, without the
    OrderedDict's node per entry: a plain dict of request id -> node, the order linked through the nodes;
    a Reservation is its own node (an admission by the compiled lane adds no object here), any other
    entry (the pure path's tuple) gets a _Link. The same order as the OrderedDict: setting an id that is
    there keeps its place, any other goes last. Installed as core.reservations' table (new_entries) when
    the compiled modules load; tests/test_native_reservation.py runs both tables through the same books."""

    def __cinit__(self):
        self._nodes = {}
        self._head = NULL
        self._tail = NULL
        self._state = 0

    def __dealloc__(self):
        """Its nodes leave it (a Reservation that outlives the table names no request id, links nothing);
        not after the collector cleared the table (its dict gone: the nodes may be too)."""
        cdef _Node node
        cdef PyObject* at = self._head
        if self._nodes is None:
            return
        while at != NULL:
            node = <_Node>at
            at = node.next
            node.key = None
            node.prev = NULL
            node.next = NULL

    cdef object _first(self):
        """The oldest entry, or None."""
        if self._head == NULL:
            return None
        node = <_Node>self._head
        return node if type(node) is Reservation else (<_Link>node).value

    cdef object _get(self, object key):
        cdef PyObject* found = PyDict_GetItemWithError(self._nodes, key)
        if found == NULL:
            return None
        node = <object>found
        return node if type(node) is Reservation else (<_Link>node).value

    cdef int _set(self, object key, object value) except -1:
        cdef _Node node
        cdef PyObject* found = PyDict_GetItemWithError(self._nodes, key)
        if found != NULL and <object>found is value:  # (the same Reservation again: nothing changes)
            return 0
        if type(value) is Reservation and (<_Node>value).key is None:
            node = <_Node>value
        else:
            node = _Link.__new__(_Link)
            (<_Link>node).value = value
        self._state += 1
        if found != NULL:  # in its place
            old = <_Node>found
            if old is node:
                return 0
            node.prev = old.prev
            node.next = old.next
            if old.prev != NULL:
                (<_Node>old.prev).next = <PyObject*>node
            else:
                self._head = <PyObject*>node
            if old.next != NULL:
                (<_Node>old.next).prev = <PyObject*>node
            else:
                self._tail = <PyObject*>node
            node.key = key
            old.key = None
            old.prev = NULL
            old.next = NULL
            self._nodes[key] = node  # (drops the old node last: the links no longer name it)
            return 0
        node.key = key
        node.prev = self._tail
        node.next = NULL
        if self._tail != NULL:
            (<_Node>self._tail).next = <PyObject*>node
        else:
            self._head = <PyObject*>node
        self._tail = <PyObject*>node
        self._nodes[key] = node
        return 0

    cdef object _take(self, object key):
        """Remove key's node and return its entry; _MISSING if it is not there."""
        cdef PyObject* found = PyDict_GetItemWithError(self._nodes, key)
        if found == NULL:
            return _MISSING
        node = <_Node>found
        self._state += 1
        if node.prev != NULL:
            (<_Node>node.prev).next = node.next
        else:
            self._head = node.next
        if node.next != NULL:
            (<_Node>node.next).prev = node.prev
        else:
            self._tail = node.prev
        node.prev = NULL
        node.next = NULL
        node.key = None
        value = node if type(node) is Reservation else (<_Link>node).value
        del self._nodes[key]
        return value

    def __len__(self):
        return len(self._nodes)

    def __contains__(self, key):
        return key in self._nodes

    def __getitem__(self, key):
        node = self._nodes[key]
        return node if type(node) is Reservation else (<_Link>node).value

    def __setitem__(self, key, value):
        self._set(key, value)

    def __delitem__(self, key):
        if self._take(key) is _MISSING:
            raise KeyError(key)

    def get(self, key, default=None):
        cdef PyObject* found = PyDict_GetItemWithError(self._nodes, key)
        if found == NULL:
            return default
        node = <object>found
        return node if type(node) is Reservation else (<_Link>node).value

    def pop(self, key, default=_MISSING):
        value = self._take(key)
        if value is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return value

    def popitem(self, bint last=True):
        if self._head == NULL:
            raise KeyError("dictionary is empty")
        key = (<_Node>(self._tail if last else self._head)).key
        return key, self._take(key)

    def clear(self):
        cdef _Node node
        cdef PyObject* at = self._head
        self._state += 1
        while at != NULL:
            node = <_Node>at
            at = node.next
            node.key = None
            node.prev = NULL
            node.next = NULL
        self._head = NULL
        self._tail = NULL
        self._nodes.clear()

    def __iter__(self):
        return _Iter(self, 0)

    def keys(self):
        return _View(self, 0)

    def values(self):
        return _View(self, 1)

    def items(self):
        return _View(self, 2)

    def __repr__(self):
        return f"Entries({list(_Iter(self, 2))!r})"


cdef class _View:
    """A live view of an Entries' keys, values or items, oldest first (as odict_keys/values/items)."""

    cdef Entries _entries
    cdef int _kind

    def __cinit__(self, Entries entries, int kind):
        self._entries = entries
        self._kind = kind

    def __len__(self):
        return len(self._entries._nodes)

    def __iter__(self):
        return _Iter(self._entries, self._kind)


cdef class _Iter:
    cdef Entries _entries
    cdef object _node  # the next node (held: it stays valid even if taken out meanwhile)
    cdef Py_ssize_t _state
    cdef int _kind

    def __cinit__(self, Entries entries, int kind):
        self._entries = entries
        self._kind = kind
        self._state = entries._state
        self._node = <object>entries._head if entries._head != NULL else None

    def __iter__(self):
        return self

    def __next__(self):
        if self._entries._state != self._state:
            raise RuntimeError("the reservation table changed size during iteration")
        if self._node is None:
            raise StopIteration
        node = <_Node>self._node
        self._node = <object>node.next if node.next != NULL else None
        if self._kind == 0:
            return node.key
        value = node if type(node) is Reservation else (<_Link>node).value
        return value if self._kind == 1 else (node.key, value)
