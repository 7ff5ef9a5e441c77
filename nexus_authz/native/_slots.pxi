# Where a __slots__ field lives in an instance: shared by the compiled modules that read the core's frozen
# objects in place (`include "_slots.pxi"`; Cython pastes it into each module, so each keeps its own copy
# of the function in C, and one source).

from cpython.ref cimport Py_INCREF as _slots_incref, Py_XDECREF as _slots_xdecref


cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        const char* name
        int type
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    int T_OBJECT_EX


cdef Py_ssize_t _slot_offset(type cls, str name):
    """Where instances of `cls` hold their object slot `name` (its member descriptor, found on the MRO as
    getattr and setattr find it), or -1 (not such a slot: a class attribute, a property ...)."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            descr = klass.__dict__[name]
            if type(descr).__name__ == "member_descriptor" and (
                (<PyMemberDescrObject*>descr).d_member.type == T_OBJECT_EX
            ):
                return (<PyMemberDescrObject*>descr).d_member.offset
            return -1
    return -1


cdef inline Py_ssize_t _offset(type cls, str name) except -1:
    """`_slot_offset` of a field the module cannot work without: TypeError (at import) if it is no slot.
    (inline: a module that includes this file without calling it compiles without an unused-function
    warning.)"""
    cdef Py_ssize_t offset = _slot_offset(cls, name)
    if offset < 0:
        raise TypeError(f"{cls.__name__}.{name} is not a slot")
    return offset


cdef inline PyObject* _slot_value(object obj, Py_ssize_t offset) noexcept:
    """The object in the slot at `offset` of `obj`, borrowed (NULL: the slot is unset)."""
    return (<PyObject**>((<char*><PyObject*>obj) + offset))[0]


cdef inline void _slot_store(object obj, Py_ssize_t offset, object value) noexcept:
    """`value` into the slot at `offset` of `obj`, the old value (if any) released: what the slot's member
    descriptor's __set__ does."""
    cdef PyObject** at = <PyObject**>((<char*><PyObject*>obj) + offset)
    cdef PyObject* old = at[0]
    _slots_incref(value)
    at[0] = <PyObject*>value
    _slots_xdecref(old)
