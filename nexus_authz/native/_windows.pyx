# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The memory counter store's hot path in C: `acquire` and `adjust` of stores/memory.py's MemoryCounterStore.

The same state, in the same dict, as the pure-Python store (GCRA: complex(debt, since); sliding:
array('d') [fresh_at, last_slot, total, counts...], or the one-slot form [fresh_at, last_slot, total,
total, -N] that a new window of N > 2 slots starts in (when the store's `_compact` is set) and that is
widened in place when a second slot is charged, exactly as core/windows.py does; gauge: int; the same
walk for the incremental sweep), so everything else that reads or writes that state (peek, adjust, the sweep,
the Redis write-behind's LocalView) keeps working on the same objects. The same decisions and the same WindowStatus / AcquireResult objects, with
bit-for-bit the same floats: every formula below is core/windows.py's, in the same operation order, on IEEE
doubles (x86-64 SSE2; setup.py builds with -ffp-contract=off so no multiply-add is fused). Python's float
floor division (`now // width`) is reproduced exactly (`_floor_div`).

Anything this code does not know takes the pure-Python acquire for the whole call, before anything is
written: a spec whose algorithm is not GCRA / SLIDING / GAUGE (e.g. one added later), a spec that is not
exactly a LimitSpec, more than MAX_WINDOWS windows, a cost that is not a plain int in 0..2**62, a time or a
stored number outside the range where C integers and doubles behave as Python's ints and floats do here,
a stored array of either form that is not of doubles. The pure path (core/windows.py) is the reference: the differential
tests (tests/test_native_windows.py) run both on random specs, costs, times and interleavings.
"""

from cpython.array cimport array, clone
from cpython.complex cimport PyComplex_FromDoubles
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_FromDouble
from cpython.long cimport PyLong_AsLongLong, PyLong_AsLongLongAndOverflow, PyLong_FromLongLong, PyLong_FromUnsignedLongLong
from cpython.object cimport PyObject, PyObject_IsTrue
from cpython.ref cimport Py_INCREF, Py_XDECREF, Py_XINCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_New, PyTuple_SET_ITEM
from libc.math cimport copysign, floor, fmod, INFINITY

from array import array as _array_type

from nexus_authz.core.limits import AcquireResult, Algorithm, LimitSpec, WindowStatus
from nexus_authz.core.windows import CONCURRENCY_RETRY_AFTER


cdef extern from "Python.h":
    ctypedef struct PyTypeObject:
        void* tp_alloc
    PyTypeObject* Py_TYPE(object o)
    PyObject* PyDict_GetItemWithError(object d, object key) except? NULL
    object PyType_GenericAlloc(PyTypeObject* t, Py_ssize_t nitems)
    bint PyComplex_CheckExact(object o)
    bint PyTuple_CheckExact(object o)
    bint PyLong_CheckExact(object o)
    bint PyFloat_CheckExact(object o)
    Py_ssize_t Py_SIZE(object o)
    ctypedef struct _CValue "Py_complex":
        double real
        double imag
    ctypedef struct _Complex "PyComplexObject":
        _CValue cval
    bint _is_complex "PyComplex_CheckExact"(PyObject* o)
    Py_ssize_t _refs "Py_REFCNT"(PyObject* o)


cdef extern from *:
    """
    /* fmod(x, y) without the call into libm (its generic __ieee754_fmod: ~190 instructions and ~9 cold
       code lines per call here): the x87 FPREM loop, glibc's own i386 fmod. Both are exact (the remainder
       of two doubles is a double, FPREM truncates the quotient as fmod does), so the same bits, signed
       zeros included; tests/test_native_windows.py checks it against math.fmod. Elsewhere: libm's. */
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    static inline double _nx_fmod(double x, double y) {
        long double r;
        __asm__ ("1:\\tfprem\\n\\tfnstsw %%ax\\n\\ttestb $4, %%ah\\n\\tjnz 1b"
                 : "=t" (r) : "0" ((long double)x), "u" ((long double)y) : "ax", "cc");
        return (double)r;
    }
    #else
    #define _nx_fmod fmod
    #endif
    """
    double _nx_fmod(double x, double y) noexcept nogil


cdef inline bint _overwrite(PyObject* state, Py_ssize_t refs, double debt, double since) noexcept:
    """A GCRA state rewritten in place, when the store's dict and the caller's reference (`refs` in all)
    are its only holders: nobody can see the change but the dict, which then holds complex(debt, since)
    as a new object would, with no allocation. False: the caller makes a new one."""
    if state == NULL or not _is_complex(state) or _refs(state) != refs:
        return False
    (<_Complex*>state).cval.real = debt
    (<_Complex*>state).cval.imag = since
    return True


cdef inline double _real(object state) noexcept:
    """state.real of an exact complex (PyComplex_RealAsDouble's value, read in place: no call)."""
    return (<_Complex*><PyObject*>state).cval.real


cdef inline double _imag(object state) noexcept:
    """state.imag of an exact complex."""
    return (<_Complex*><PyObject*>state).cval.imag


cdef enum:
    MAX_WINDOWS = 64
    A_GCRA = 0
    A_SLIDING = 1
    A_GAUGE = 2
    FALLBACK = 1

cdef enum:
    _FRESH = 0
    _LAST = 1
    _TOTAL = 2
    _BASE = 3
    _ONE_SLOT = 5  # the one-slot form's length: [fresh_at, last_slot, total, total, -N] (core/windows.py)

cdef enum:
    F_NONE = 0
    F_FULL = 1
    F_ONE = 2

cdef long long MAX_COST = 1LL << 62  # costs and counts: sums and differences stay inside an int64
cdef double TIME_RANGE = 1e15  # |now|: below 2**53, so an int time converts exactly
cdef double SLOT_RANGE = 4e15  # slot numbers: below 2**53, so they compare with doubles exactly

cdef object GCRA = Algorithm.GCRA
cdef object SLIDING = Algorithm.SLIDING
cdef object GAUGE = Algorithm.GAUGE
cdef double RETRY_CONCURRENCY = CONCURRENCY_RETRY_AFTER
cdef type SPEC = LimitSpec
cdef type STATUS = WindowStatus
cdef type RESULT = AcquireResult
cdef type ARRAY = _array_type
cdef array DOUBLES = _array_type("d")


include "_slots.pxi"


# LimitSpec fields, read straight from the frozen dataclass's slots
cdef Py_ssize_t O_ALGORITHM = _offset(LimitSpec, "algorithm")
cdef Py_ssize_t O_SHADOW = _offset(LimitSpec, "shadow")
cdef Py_ssize_t O_LIMIT = _offset(LimitSpec, "limit")
cdef Py_ssize_t O_BURST = _offset(LimitSpec, "burst")
cdef Py_ssize_t O_SLOTS = _offset(LimitSpec, "slots")
cdef Py_ssize_t O_INTERVAL = _offset(LimitSpec, "interval")
cdef Py_ssize_t O_TOLERANCE = _offset(LimitSpec, "tolerance")
cdef Py_ssize_t O_MAX_DEBT = _offset(LimitSpec, "max_debt")
cdef Py_ssize_t O_SLOT_WIDTH = _offset(LimitSpec, "slot_width")
# WindowStatus / AcquireResult fields, written as new_status / new_result write them
cdef Py_ssize_t O_S_SPEC = _offset(WindowStatus, "spec")
cdef Py_ssize_t O_S_LIMIT = _offset(WindowStatus, "limit")
cdef Py_ssize_t O_S_REMAINING = _offset(WindowStatus, "remaining")
cdef Py_ssize_t O_S_RESET = _offset(WindowStatus, "reset_after")
cdef Py_ssize_t O_S_RETRY = _offset(WindowStatus, "retry_after")
cdef Py_ssize_t O_S_ALLOWED = _offset(WindowStatus, "allowed")
cdef Py_ssize_t O_R_ALLOWED = _offset(AcquireResult, "allowed")
cdef Py_ssize_t O_R_STATUSES = _offset(AcquireResult, "statuses")
cdef Py_ssize_t O_R_UNCHARGED = _offset(AcquireResult, "uncharged")
if (<PyTypeObject*>WindowStatus).tp_alloc != (<PyTypeObject*>object).tp_alloc:
    raise ImportError("WindowStatus has its own allocator")  # object.__new__ would not be tp_alloc alone
if (<PyTypeObject*>AcquireResult).tp_alloc != (<PyTypeObject*>object).tp_alloc:
    raise ImportError("AcquireResult has its own allocator")


cdef inline void _put(object obj, Py_ssize_t offset, object value):
    """Set an unset slot of a new object (what the member descriptor's __set__ does on it)."""
    Py_INCREF(value)
    (<PyObject**>((<char*><PyObject*>obj) + offset))[0] = <PyObject*>value


# The store's own fields (MemoryCounterStore's __slots__), read and written in place as its member descriptors
# do, when the store is exactly of the class the first `acquire` / `adjust` saw (resolved then: `_store_slots`);
# getattr / setattr otherwise (another class, an unset slot: the same value or the same AttributeError).
cdef PyTypeObject* _STORE = NULL
cdef object _store_class = None  # (held: its address is compared)
cdef Py_ssize_t SO_STATES = -1, SO_SWEEP = -1, SO_EVICTED = -1, SO_WALK = -1, SO_NEXT = -1, SO_CURSOR = -1
cdef Py_ssize_t SO_HELD = -1, SO_OWED = -1


cdef int _store_slots(object store) except -1:
    global _STORE, _store_class, SO_STATES, SO_SWEEP, SO_EVICTED, SO_WALK, SO_NEXT, SO_CURSOR, SO_HELD, SO_OWED
    cls = type(store)
    SO_STATES = _slot_offset(cls, "_states")
    SO_SWEEP = _slot_offset(cls, "_sweep_per_call")
    SO_EVICTED = _slot_offset(cls, "_evicted")
    SO_WALK = _slot_offset(cls, "_walk")
    SO_NEXT = _slot_offset(cls, "_next")
    SO_CURSOR = _slot_offset(cls, "_cursor")
    SO_HELD = _slot_offset(cls, "_held")
    SO_OWED = _slot_offset(cls, "_owed")
    _store_class = cls
    _STORE = <PyTypeObject*>cls
    return 0


cdef inline object _sget(object store, Py_ssize_t offset, str name):
    """getattr(store, name), from its slot when it is one of the store's class."""
    cdef PyObject* value
    if offset >= 0 and Py_TYPE(store) == _STORE:
        value = _slot_value(store, offset)
        if value != NULL:
            return <object>value
    return getattr(store, name)


cdef inline int _sset(object store, Py_ssize_t offset, str name, object value) except -1:
    """setattr(store, name, value), in its slot when it is one of the store's class."""
    if offset >= 0 and Py_TYPE(store) == _STORE:
        _slot_store(store, offset, value)
        return 0
    setattr(store, name, value)
    return 0


# the pure-Python methods this module stands in for (set by stores/memory.py through `install`)
cdef object _py_acquire = None
cdef object _py_adjust = None
cdef object _py_is_fresh = None
cdef long long _sweep_batch = 1  # memory.SWEEP_BATCH (set by install)


def install(py_acquire, py_adjust, py_is_fresh, long long sweep_batch):
    """Register the pure-Python acquire and adjust (the fallbacks), `_is_fresh` (for state types this
    module does not know) and the store's SWEEP_BATCH; returns the compiled (acquire, adjust), to be set on
    MemoryCounterStore."""
    global _py_acquire, _py_adjust, _py_is_fresh, _sweep_batch
    _py_acquire = py_acquire
    _py_adjust = py_adjust
    _py_is_fresh = py_is_fresh
    _sweep_batch = sweep_batch
    return acquire, adjust


# -- the window maths (core/windows.py, operation for operation) -----------------------------------------

cdef struct Spec:
    int algorithm
    bint shadow
    long long limit
    long long burst
    long long slots
    double interval
    double tolerance
    double max_debt
    double width
    PyObject* obj  # the LimitSpec (borrowed from the caller's sequence, which holds it)


cdef struct Outcome:  # (the two ints first: 48 bytes, not 56, so the five of a check span fewer lines)
    bint fits
    int form  # sliding: the state's form as read (F_NONE: none, or not this spec's: a fresh window)
    double debt  # GCRA: the new debt (or the current one when refused)
    long long in_flight  # gauge: the new count (or the current one when refused); sliding: the slot now is in
    long long remaining
    double reset_after
    double retry_after


cdef inline double _floor_div(double vx, double wx):
    """Python's float floor division (floatobject.c, _float_div_mod), for wx > 0."""
    cdef double mod = _nx_fmod(vx, wx)
    cdef double div = (vx - mod) / wx
    cdef double floordiv
    if mod:
        if (wx < 0) != (mod < 0):
            mod += wx
            div -= 1.0
    if div:
        floordiv = floor(div)
        if div - floordiv > 0.5:
            floordiv += 1.0
    else:
        floordiv = copysign(0.0, vx / wx)
    return floordiv


cdef inline int _slot_of(double now, double width, long long* out):
    """windows.slot_of; returns FALLBACK when the slot number would not fit an int64."""
    cdef double slot = _floor_div(now, width)
    if not (-SLOT_RANGE < slot < SLOT_RANGE):
        return FALLBACK
    if slot * width > now:
        out[0] = <long long>slot - 1
    elif (slot + 1.0) * width <= now:
        out[0] = <long long>slot + 1
    else:
        out[0] = <long long>slot
    return 0


def fmod_of(double x, double y):
    """The fmod `_floor_div` uses (for the tests: math.fmod's bits)."""
    return _nx_fmod(x, y)


def slot_of(double now, double width):
    """windows.slot_of, as computed here (for the differential tests)."""
    cdef long long slot
    if not width > 0 or _slot_of(now, width, &slot):
        raise ValueError("out of range")
    return slot


cdef inline long long _mod(long long s, long long n):
    """Python's s % n for n > 0."""
    cdef long long r = s % n
    return r + n if r < 0 else r


cdef inline void _gcra_take(double debt, double since, double now, Spec* spec, long long cost, Outcome* o):
    cdef double interval = spec.interval, elapsed, new_debt, admit, free
    if debt > 0:
        elapsed = now - since
        if elapsed > 0:
            debt = debt - elapsed if debt > elapsed else 0.0
    new_debt = debt + <double>cost * interval
    admit = spec.max_debt
    if new_debt <= admit:
        o.fits = True
        o.debt = new_debt
        o.remaining = <long long>((admit - new_debt) / interval)
        if o.remaining > spec.burst - cost:  # never above the bucket (windows.gcra_take)
            o.remaining = spec.burst - cost if spec.burst > cost else 0
        o.reset_after = new_debt
        o.retry_after = 0.0
        return
    free = admit - debt
    o.fits = False
    o.debt = debt
    o.remaining = <long long>(free / interval) if free > 0 else 0
    if o.remaining > spec.burst:
        o.remaining = spec.burst
    o.reset_after = debt
    o.retry_after = new_debt - spec.tolerance if cost <= spec.burst else INFINITY


cdef inline double _count(double* st, bint one, long long s, long long n, long long last):
    """Slot s's count in the full form, or in the one-slot form as windows._full would widen it (the only
    count, st[_BASE], at slot `last`; every other slot zero)."""
    if one:
        return st[_BASE] if _mod(s, n) == _mod(last, n) else 0.0
    return st[_BASE + _mod(s, n)]


cdef inline double _used(double* st, bint one, long long top, long long last, long long n):
    cdef long long gap = top - last, s
    cdef double used
    if gap == 0:
        return st[_TOTAL]
    if gap >= n:
        return 0.0
    used = st[_TOTAL]
    for s in range(last - n + 1, top - n + 1):
        used -= _count(st, one, s, n, last)
    return used


cdef inline double _reset_after(double* st, bint one, long long top, long long last, long long n,
                                double width, double now):
    cdef long long s = last
    while s > top - n:
        if _count(st, one, s, n, last) > 0:
            return <double>(s + n) * width - now
        s -= 1
    return 0.0


cdef inline int _sliding_take(double* st, bint one, double now, Spec* spec, long long cost, Outcome* o):
    """windows.sliding_take on a state's doubles (NULL: none; `one`: the one-slot form). FALLBACK when the
    slot is out of range."""
    cdef long long n = spec.slots, limit = spec.limit, cur, last, top, s
    cdef double width = spec.width, used, excess, freed
    if _slot_of(now, width, &cur):
        return FALLBACK
    o.in_flight = cur  # (for the charge: the same (now, width))
    if st == NULL or st[_TOTAL] <= 0:
        if cost <= limit:
            o.fits = True
            o.remaining = limit - cost
            o.reset_after = (<double>(cur + n) * width - now) if cost else 0.0
            o.retry_after = 0.0
        else:
            o.fits = False
            o.remaining = limit
            o.reset_after = 0.0
            o.retry_after = INFINITY
        return 0
    last = <long long>st[_LAST]
    if cur == last:
        top = cur
        used = st[_TOTAL]
    else:
        top = cur if cur > last else last
        used = _used(st, one, top, last, n)
    if used + <double>cost <= <double>limit:
        o.fits = True
        o.remaining = <long long>(<double>limit - used - <double>cost)
        o.reset_after = ((<double>(top + n) * width - now) if cost
                         else _reset_after(st, one, top, last, n, width, now))
        o.retry_after = 0.0
        return 0
    o.fits = False
    o.remaining = <long long>(<double>limit - used) if used < <double>limit else 0
    o.reset_after = _reset_after(st, one, top, last, n, width, now)
    if cost > limit:
        o.retry_after = INFINITY
        return 0
    excess = used + <double>cost - <double>limit
    freed = 0.0
    for s in range(top - n + 1, last + 1):
        freed += _count(st, one, s, n, last)
        if freed >= excess:
            o.retry_after = <double>(s + n) * width - now
            return 0
    o.retry_after = INFINITY
    return 0


cdef inline long long _roll(double* st, long long cur, long long n):
    cdef long long last = <long long>st[_LAST], s, i
    cdef double total
    if cur <= last:
        return last
    if cur - last >= n:
        for i in range(_BASE, _BASE + n):
            st[i] = 0.0
        st[_TOTAL] = 0.0
    else:
        total = st[_TOTAL]
        for s in range(last + 1, cur + 1):
            i = _BASE + _mod(s, n)
            total -= st[i]
            st[i] = 0.0
        st[_TOTAL] = total
    st[_LAST] = <double>cur
    return cur


cdef double* _widen(array arr, long long n) except NULL:
    """windows._widen: the one-slot form -> the full form, in place (the same array object, grown by
    frombytes as the pure path grows it, so it holds the same length and allocation). Returns the moved
    doubles."""
    cdef double* st = arr.data.as_doubles
    cdef double count = st[_BASE]
    cdef long long last = <long long>st[_LAST]
    st[_BASE] = 0.0
    st[_BASE + 1] = 0.0
    arr.frombytes(bytes(8 * (n - 2)))
    st = arr.data.as_doubles
    st[_BASE + _mod(last, n)] = count
    return st


cdef object _sliding_charge(object state, double now, long long cur, Spec* spec, long long amount, object store):
    """windows.sliding_charge(state, now, spec, amount, store._compact), step for step: in place on `state`
    (an array memory._sliding_state accepted for this spec: full or one-slot) or on a new array. `cur`: the
    slot `now` is in (`_slot_of`: the take before it computed it, in range)."""
    cdef long long n = spec.slots, top
    cdef double width = spec.width
    cdef double* st
    cdef array arr
    if state is None:
        if n > 2 and store._compact:  # a new window starts in the one-slot form
            arr = clone(DOUBLES, _ONE_SLOT, True)
            st = arr.data.as_doubles
            st[_BASE + 1] = <double>-n
        else:
            arr = clone(DOUBLES, n + _BASE, True)
            st = arr.data.as_doubles
        st[_LAST] = <double>cur
        top = cur
    else:
        arr = <array>state
        st = arr.data.as_doubles
        if st[_TOTAL] <= 0:
            st[_LAST] = <double>cur
            top = cur
        elif <double>cur == st[_LAST]:
            top = cur
        else:
            if Py_SIZE(arr) != n + _BASE:  # the one-slot form: a second slot is charged
                if cur - <long long>st[_LAST] >= n:  # unless the first has left the window
                    st[_BASE] = 0.0
                    st[_TOTAL] = 0.0
                    st[_LAST] = <double>cur
                else:
                    st = _widen(arr, n)
            top = _roll(st, cur, n)
    if Py_SIZE(arr) != n + _BASE:
        st[_BASE] += <double>amount
    else:
        st[_BASE + _mod(top, n)] += <double>amount
    st[_TOTAL] += <double>amount
    st[_FRESH] = <double>(top + n) * width
    return arr


# -- reading the inputs -------------------------------------------------------------------------------------

cdef int _read_spec(object spec, Spec* out):
    """FALLBACK for anything but a LimitSpec of a known algorithm with numbers in range."""
    cdef PyObject* algorithm
    cdef int overflow = 0
    if type(spec) is not SPEC:
        return FALLBACK
    if (_slot_value(spec, O_ALGORITHM) == NULL or _slot_value(spec, O_SHADOW) == NULL or _slot_value(spec, O_LIMIT) == NULL
            or _slot_value(spec, O_BURST) == NULL or _slot_value(spec, O_SLOTS) == NULL or _slot_value(spec, O_INTERVAL) == NULL
            or _slot_value(spec, O_TOLERANCE) == NULL or _slot_value(spec, O_MAX_DEBT) == NULL
            or _slot_value(spec, O_SLOT_WIDTH) == NULL):
        return FALLBACK  # a field not set (never, for a constructed LimitSpec)
    algorithm = _slot_value(spec, O_ALGORITHM)
    if algorithm == <PyObject*>GCRA:
        out.algorithm = A_GCRA
    elif algorithm == <PyObject*>SLIDING:
        out.algorithm = A_SLIDING
    elif algorithm == <PyObject*>GAUGE:
        out.algorithm = A_GAUGE
    else:
        return FALLBACK  # an algorithm this code does not know: the pure path decides
    out.obj = <PyObject*>spec
    out.shadow = PyObject_IsTrue(<object>_slot_value(spec, O_SHADOW))
    out.limit = PyLong_AsLongLongAndOverflow(<object>_slot_value(spec, O_LIMIT), &overflow)
    if overflow or not (0 < out.limit <= MAX_COST):
        return FALLBACK
    out.burst = PyLong_AsLongLongAndOverflow(<object>_slot_value(spec, O_BURST), &overflow)
    if overflow or not (0 <= out.burst <= MAX_COST):
        return FALLBACK
    out.slots = PyLong_AsLongLongAndOverflow(<object>_slot_value(spec, O_SLOTS), &overflow)
    if overflow or not (0 <= out.slots <= 1 << 20):
        return FALLBACK
    out.interval = _float(_slot_value(spec, O_INTERVAL))
    out.tolerance = _float(_slot_value(spec, O_TOLERANCE))
    out.max_debt = _float(_slot_value(spec, O_MAX_DEBT))
    out.width = _float(_slot_value(spec, O_SLOT_WIDTH))
    if out.algorithm == A_GCRA and not out.interval > 0:
        return FALLBACK  # Python would divide by zero
    if out.algorithm == A_SLIDING and not (out.width > 0 and out.slots >= 2):
        return FALLBACK  # one slot: a LimitSpec refuses it (and the one-slot form assumes N > 2)
    return 0


# The Specs of the specs tuple `acquire` read last, kept: a plan's tuple comes back with every check of its
# key, and its LimitSpecs (frozen, their fields ints, floats and an Algorithm) read the same each time, so
# a check of the same tuple (`is`: it is held here, so its id is not reused) reads no LimitSpec. In use by
# one call at a time (`_specs_busy`): a call made meanwhile (from a finalizer, say) reads its own.
cdef enum:
    CACHED_WINDOWS = 16
cdef object _specs_tuple = None
cdef Spec _specs_cache[CACHED_WINDOWS]
cdef bint _specs_busy = False


cdef inline double _float(PyObject* value):
    if PyFloat_CheckExact(<object>value):
        return PyFloat_AS_DOUBLE(<object>value)
    return 0.0 / 0.0  # not a float: NaN fails every range check above


cdef inline int _cost(object cost, long long* out):
    cdef int overflow = 0
    if not PyLong_CheckExact(cost):
        return FALLBACK
    out[0] = PyLong_AsLongLongAndOverflow(cost, &overflow)
    if overflow or not (0 <= out[0] <= MAX_COST):
        return FALLBACK
    return 0


cdef inline double* _sliding_doubles(object state, Spec* spec, int* fallback, int* form):
    """memory._sliding_state: the stored doubles if the state is an array of this spec's shape (*form
    F_FULL) or the one-slot form for its N (*form F_ONE), else NULL (fresh, *form F_NONE). Sets *fallback
    for an array of either length this code cannot read as Python would (not of doubles, or a last-slot
    number out of range)."""
    cdef array arr
    cdef double last
    cdef Py_ssize_t size
    form[0] = F_NONE
    if type(state) is not ARRAY:
        return NULL
    arr = <array>state
    size = Py_SIZE(arr)
    if size != spec.slots + _BASE and size != _ONE_SLOT:
        return NULL
    if arr.ob_descr.typecode != b"d":
        fallback[0] = FALLBACK
        return NULL
    if size != spec.slots + _BASE:  # 5 doubles for N > 2: the one-slot form if it says -N
        if arr.data.as_doubles[_BASE + 1] != <double>-spec.slots:
            return NULL
        form[0] = F_ONE
    else:
        form[0] = F_FULL
    last = arr.data.as_doubles[_LAST]
    if not (-SLOT_RANGE < last < SLOT_RANGE):
        fallback[0] = FALLBACK
        form[0] = F_NONE
        return NULL
    return arr.data.as_doubles


cdef int _take(object state, Spec* spec, long long cost, double now, Outcome* o):
    """memory._take on C numbers; FALLBACK when the state is one this code cannot read exactly."""
    cdef int fallback = 0, overflow = 0
    cdef double* st
    cdef long long in_flight, new
    if spec.algorithm == A_GCRA:
        if PyComplex_CheckExact(state):
            _gcra_take(_real(state), _imag(state), now, spec, cost, o)
        else:
            _gcra_take(0.0, now, now, spec, cost, o)
        return 0
    if spec.algorithm == A_SLIDING:
        st = _sliding_doubles(state, spec, &fallback, &o.form)
        if fallback:
            return FALLBACK
        return _sliding_take(st, o.form == F_ONE, now, spec, cost, o)
    in_flight = 0
    if PyLong_CheckExact(state):
        in_flight = PyLong_AsLongLongAndOverflow(state, &overflow)
        if overflow or not (-MAX_COST <= in_flight <= MAX_COST):
            return FALLBACK
    new = in_flight + cost
    if new <= spec.limit:
        o.fits = True
        o.in_flight = new
        o.remaining = spec.limit - new
    else:
        o.fits = False
        o.in_flight = in_flight
        o.remaining = spec.limit - in_flight if in_flight < spec.limit else 0
        o.retry_after = RETRY_CONCURRENCY if cost <= spec.limit else INFINITY
        o.reset_after = 0.0
        return 0
    o.reset_after = 0.0
    o.retry_after = 0.0
    return 0


# -- the answer objects -------------------------------------------------------------------------------------

cdef object _status(Spec* spec, long long remaining, double reset_after, double retry_after, bint fits):
    """limits.new_status."""
    status = PyType_GenericAlloc(<PyTypeObject*>STATUS, 0)
    _put(status, O_S_SPEC, <object>spec.obj)
    _put(status, O_S_LIMIT, <object>_slot_value(<object>spec.obj, O_LIMIT))
    _put(status, O_S_REMAINING, PyLong_FromLongLong(remaining))
    _put(status, O_S_RESET, PyFloat_FromDouble(reset_after))
    _put(status, O_S_RETRY, PyFloat_FromDouble(retry_after))
    _put(status, O_S_ALLOWED, True if fits else False)
    return status


cdef object _result(bint allowed, tuple statuses, unsigned long long uncharged):
    """limits.new_result."""
    result = PyType_GenericAlloc(<PyTypeObject*>RESULT, 0)
    _put(result, O_R_ALLOWED, True if allowed else False)
    _put(result, O_R_STATUSES, statuses)
    _put(result, O_R_UNCHARGED, PyLong_FromUnsignedLongLong(uncharged))
    return result


# -- eviction (MemoryCounterStore._sweep) --------------------------------------------------------------------

cdef bint _is_fresh(object state, double now) except -1:
    cdef array arr
    if PyComplex_CheckExact(state):
        return _real(state) <= now - _imag(state)
    if type(state) is ARRAY:
        arr = <array>state
        if arr.ob_descr.typecode == b"d" and Py_SIZE(arr) >= _BASE:
            return now >= arr.data.as_doubles[_FRESH] or arr.data.as_doubles[_TOTAL] <= 0.0
    elif PyLong_CheckExact(state):
        return not state
    return _py_is_fresh(state, now)  # a state type this code does not know


cdef extern from "Python.h":
    ctypedef struct PyListObject:
        PyObject** ob_item
        Py_ssize_t allocated
    void _set_size "Py_SET_SIZE"(object o, Py_ssize_t n)


cdef int _empty(list items) except -1:
    """del items[:], keeping the list's array (list_clear frees it: the next append would allocate one)."""
    cdef PyObject** item = (<PyListObject*>items).ob_item
    cdef Py_ssize_t n = Py_SIZE(items), i
    _set_size(items, 0)
    for i in range(n):
        Py_XDECREF(item[i])
        item[i] = NULL
    return 0


cdef inline int _append(list items, object value) except -1:
    """items.append(value), in the list's array while it has room (list.append would shrink an array more
    than half empty: a realloc)."""
    cdef Py_ssize_t n = Py_SIZE(items)
    if n < (<PyListObject*>items).allocated:
        Py_INCREF(value)
        (<PyListObject*>items).ob_item[n] = <PyObject*>value
        _set_size(items, n + 1)
        return 0
    items.append(value)
    return 0


cdef long long _sweep(object store, dict states, double now, long long budget) except -1:
    """MemoryCounterStore._sweep: the next `budget` ids of the walk (the next walk when one ends)."""
    cdef long long evicted = 0, size = len(states)
    cdef list walk = _sget(store, SO_WALK, "_walk")
    cdef list keep = _sget(store, SO_NEXT, "_next")
    cdef Py_ssize_t i = _sget(store, SO_CURSOR, "_cursor")
    cdef PyObject* found
    if budget > size:
        budget = size
    while budget > 0:
        if i >= len(walk):  # this walk ended: the next one starts
            done = walk
            walk = keep
            _sset(store, SO_WALK, "_walk", walk)
            if done is walk:  # (never: the two lists are distinct)
                keep = []
            else:  # the walked list (all None now), emptied, is the next: its array kept, none allocated
                keep = <list>done
                _empty(keep)
            _sset(store, SO_NEXT, "_next", keep)
            i = 0
            if not walk:
                break
        cid = walk[i]
        walk[i] = None
        i += 1
        budget -= 1
        found = PyDict_GetItemWithError(states, cid)
        if found == NULL:  # only a store changed behind its back
            continue
        state = <object>found
        if state is False:  # memory._IDLE: fresh at the last look, no write since: dropped
            del states[cid]
            _sset(store, SO_HELD, "_held", _sget(store, SO_HELD, "_held") - 1)
            evicted += 1
        elif state is None:  # left fresh by a write since the last look
            states[cid] = False
            _append(keep, cid)
        else:
            if _is_fresh(state, now):
                states[cid] = False
                _sset(store, SO_HELD, "_held", _sget(store, SO_HELD, "_held") + 1)
            _append(keep, cid)
    _sset(store, SO_CURSOR, "_cursor", i)
    return evicted


cdef inline int _set_state(object store, dict states, object cid, object state) except -1:
    """MemoryCounterStore._put: store a window's state; a new id joins the next walk."""
    cdef PyObject* old = PyDict_GetItemWithError(states, cid)
    cdef bint was_held = old != NULL and (<object>old is None or <object>old is False)
    states[cid] = state
    if old == NULL:
        _append(<list>_sget(store, SO_NEXT, "_next"), cid)
    elif was_held:
        _sset(store, SO_HELD, "_held", _sget(store, SO_HELD, "_held") - 1)
    return 0


cdef inline int _drop_state(object store, dict states, object cid) except -1:
    """MemoryCounterStore._drop: a write left the window fresh: held as None until the walk drops it."""
    cdef PyObject* old = PyDict_GetItemWithError(states, cid)
    if old == NULL or <object>old is None:
        return 0
    states[cid] = None
    if <object>old is not False:  # (memory._IDLE: held already)
        _sset(store, SO_HELD, "_held", _sget(store, SO_HELD, "_held") + 1)
    return 0


# -- acquire ---------------------------------------------------------------------------------------------

def acquire(self, counter_ids, specs, costs, now):
    """MemoryCounterStore.acquire (see stores/memory.py): decide every window, then charge them all or none."""
    return _acquire(self, counter_ids, specs, costs, now, NULL, NULL)


cdef object acquire_figures(object self, object counter_ids, object specs, object costs, object now,
                            Figure* figures, unsigned long long* uncharged):
    """`acquire` for a caller that only reads the figures of an admission (the compiled HTTP lane): when
    every window is decided here and the request is admitted, the same charges, sweep and figures as
    `acquire`'s statuses (remaining, limit, reset_after, retry_after, allowed) written to `figures[i]` and
    the uncharged mask to `uncharged`, with no WindowStatus / AcquireResult made: True. None, with nothing
    written or swept, for anything else (a refusal, a spec or state this code hands to the pure acquire):
    the caller then calls `acquire` (a refusal is decided twice, the same way: nothing was charged)."""
    return _acquire(self, counter_ids, specs, costs, now, figures, uncharged)


cdef tuple figure_statuses(object specs, Figure* figures, Py_ssize_t n):
    """The statuses tuple `acquire` would have made of the figures `acquire_figures` wrote."""
    cdef Spec spec
    cdef Py_ssize_t i
    statuses = PyTuple_New(n)
    for i in range(n):
        if _read_spec(specs[i], &spec):
            raise TypeError("a spec acquire_figures decided is no longer readable")
        status = _status(&spec, figures[i].remaining, figures[i].reset_after, figures[i].retry_after,
                         figures[i].allowed)
        Py_INCREF(status)
        PyTuple_SET_ITEM(statuses, i, status)
    return statuses


def figures_of(self, counter_ids, specs, costs, now):
    """`acquire_figures` as the tests call it: None, or (uncharged, the statuses `figure_statuses` makes)."""
    cdef Figure figures[MAX_WINDOWS]
    cdef unsigned long long uncharged = 0
    if acquire_figures(self, counter_ids, specs, costs, now, figures, &uncharged) is None:
        return None
    return uncharged, figure_statuses(specs, figures, len(specs))


cdef object _acquire(object self, object counter_ids, object specs, object costs, object now, Figure* fig,
                     unsigned long long* uncharged_out):
    """`acquire` (fig NULL) or `acquire_figures`."""
    cdef Spec spec_c[MAX_WINDOWS]
    cdef Outcome out[MAX_WINDOWS]
    cdef long long cost_c[MAX_WINDOWS]
    cdef PyObject* kept[MAX_WINDOWS]  # each window's state as read (strong references)
    cdef Py_ssize_t n, i, taken = 0
    cdef double t
    cdef bint allowed = True
    cdef unsigned long long uncharged = 0
    cdef Spec* sp
    cdef Spec* specs_c = spec_c
    cdef bint cached = False, hit = False
    cdef PyObject* found
    global _specs_tuple, _specs_busy
    if not (PyFloat_CheckExact(now) or PyLong_CheckExact(now)):
        return None if fig != NULL else _py_acquire(self, counter_ids, specs, costs, now)
    t = now
    n = PyTuple_GET_SIZE(specs) if PyTuple_CheckExact(specs) else len(specs)
    if n > MAX_WINDOWS or not (-TIME_RANGE < t < TIME_RANGE):
        return None if fig != NULL else _py_acquire(self, counter_ids, specs, costs, now)
    if _STORE == NULL:
        _store_slots(self)
    states = _sget(self, SO_STATES, "_states")
    ids_t = _first_items(counter_ids, n)
    costs_t = _first_items(costs, n)
    if type(states) is not dict or ids_t is None or costs_t is None:
        return None if fig != NULL else _py_acquire(self, counter_ids, specs, costs, now)
    if not _specs_busy and n <= CACHED_WINDOWS and PyTuple_CheckExact(specs):
        cached = True
        _specs_busy = True
        specs_c = _specs_cache
        if specs is _specs_tuple:
            hit = True
        else:
            _specs_tuple = None  # the cache is rewritten below
    try:
        for i in range(n):  # decide every window first; nothing is written yet
            sp = &specs_c[i]
            if (not hit and _read_spec(specs[i], sp)) or _cost(<object>PyTuple_GET_ITEM(costs_t, i), &cost_c[i]):
                return None if fig != NULL else _py_acquire(self, counter_ids, specs, costs, now)
            found = PyDict_GetItemWithError(states, <object>PyTuple_GET_ITEM(ids_t, i))
            state = <object>found if found != NULL else None
            Py_XINCREF(<PyObject*>state)
            kept[i] = <PyObject*>state
            taken = i + 1
            if _take(state, sp, cost_c[i], t, &out[i]):
                return None if fig != NULL else _py_acquire(self, counter_ids, specs, costs, now)
            if not out[i].fits and not sp.shadow:
                allowed = False
        state = None  # (its reference would count as another holder of the last state: _overwrite)
        if cached and not hit:
            _specs_tuple = specs  # every spec read
        if fig != NULL and not allowed:
            return None  # the object API decides the refusal again (nothing was written)
        statuses = PyTuple_New(n) if fig == NULL else None
        if allowed:  # commit every enforced window, and each shadow one that fits
            for i in range(n):
                sp = &specs_c[i]
                if out[i].fits:
                    cid = <object>PyTuple_GET_ITEM(ids_t, i)
                    if sp.algorithm == A_GCRA:
                        if out[i].debt:
                            # the dict's and kept's references, and still the dict's value (a counter id
                            # given twice: the first write replaced it, kept[i] is then an orphan)
                            if not (
                                kept[i] != NULL
                                and PyDict_GetItemWithError(states, cid) == kept[i]
                                and _overwrite(kept[i], 2, out[i].debt, t)
                            ):
                                _set_state(self, states, cid, PyComplex_FromDoubles(out[i].debt, t))
                        else:
                            _drop_state(self, states, cid)
                    elif sp.algorithm == A_SLIDING:
                        if not cost_c[i]:
                            pass
                        elif out[i].form == F_NONE:  # a new window (memory.acquire: its new_state None)
                            _set_state(self, states, cid,
                                       _sliding_charge(None, t, out[i].in_flight, sp, cost_c[i], self))
                        else:  # charged in place: stored again only if the dict no longer holds it (an id
                            # given twice, whose first window replaced it), as memory._put would
                            _sliding_charge(<object>kept[i], t, out[i].in_flight, sp, cost_c[i], self)
                            if PyDict_GetItemWithError(states, cid) != kept[i]:
                                _set_state(self, states, cid, <object>kept[i])
                    elif out[i].in_flight:
                        _set_state(self, states, cid, PyLong_FromLongLong(out[i].in_flight))
                    else:
                        _drop_state(self, states, cid)
                else:
                    uncharged |= (<unsigned long long>1) << i
                if fig != NULL:
                    fig[i].remaining = out[i].remaining
                    fig[i].limit = sp.limit
                    fig[i].reset_after = out[i].reset_after
                    fig[i].retry_after = out[i].retry_after
                    fig[i].allowed = out[i].fits
                    continue
                status = _status(sp, out[i].remaining, out[i].reset_after, out[i].retry_after, out[i].fits)
                Py_INCREF(status)
                PyTuple_SET_ITEM(statuses, i, status)
            if fig != NULL:
                uncharged_out[0] = uncharged
                result = True
            else:
                result = _result(True, statuses, uncharged)
        else:  # nothing is charged: windows that would have fitted report their figures as they are
            for i in range(n):
                sp = &specs_c[i]
                if out[i].fits:
                    _take(<object>kept[i], sp, 0, t, &out[i])
                    status = _status(sp, out[i].remaining, out[i].reset_after, out[i].retry_after, True)
                else:
                    status = _status(sp, out[i].remaining, out[i].reset_after, out[i].retry_after, False)
                Py_INCREF(status)
                PyTuple_SET_ITEM(statuses, i, status)
            result = _result(False, statuses, _all_bits(n))
    finally:
        for i in range(taken):
            Py_XDECREF(kept[i])
        if cached:
            _specs_busy = False
    _owe(self, states, t)
    return result


cdef inline int _owe(object store, dict states, double now) except -1:
    """memory.acquire's per-call sweep: the call owes `_sweep_per_call` ids to the walk, looked at when a
    batch (SWEEP_BATCH) is owed. Here, the common call (a batch not due, both fields small ints in the
    store's slots) in a few instructions; anything else in `_owe_batch`, out of line."""
    cdef PyObject* per
    cdef PyObject* owed
    cdef long long n, m
    cdef int overflow = 0
    if Py_TYPE(store) == _STORE and SO_SWEEP >= 0 and SO_OWED >= 0:
        per = _slot_value(store, SO_SWEEP)
        owed = _slot_value(store, SO_OWED)
        if per != NULL and owed != NULL and PyLong_CheckExact(<object>per) and PyLong_CheckExact(<object>owed):
            n = PyLong_AsLongLongAndOverflow(<object>per, &overflow)
            if not overflow and n == 0:
                return 0  # no per-call sweep
            m = PyLong_AsLongLongAndOverflow(<object>owed, &overflow)
            if not overflow and 0 < n < _sweep_batch and 0 <= m < _sweep_batch and n + m < _sweep_batch:
                _slot_store(store, SO_OWED, PyLong_FromLongLong(n + m))  # (a small int: cached)
                return 0
    return _owe_batch(store, states, now)


cdef int _owe_any(object store, dict states, double now) except -1:
    """`_owe` on the fields as objects, as memory.acquire does it (a batch due, another class, ...)."""
    sweep_per_call = _sget(store, SO_SWEEP, "_sweep_per_call")
    if not sweep_per_call:
        return 0
    owed = _sget(store, SO_OWED, "_owed") + sweep_per_call
    if owed < _sweep_batch:
        _sset(store, SO_OWED, "_owed", owed)
        return 0
    _sset(store, SO_OWED, "_owed", 0)
    evicted = _sweep(store, states, now, owed)
    if evicted:
        _sset(store, SO_EVICTED, "_evicted", _sget(store, SO_EVICTED, "_evicted") + evicted)
    return 0


# called through a pointer, so that the C compiler keeps it (and the sweep) out of _acquire's lines
ctypedef int (*_owe_fn)(object, dict, double) except -1
cdef _owe_fn _owe_batch = _owe_any


cdef inline object _first_items(object seq, Py_ssize_t n):
    """`seq` as a tuple of at least n items (itself when it is one: the compiled lane's), so that its first n
    are read in place; None (the pure path's: it indexes them, and raises as it does) when it is shorter."""
    if PyTuple_CheckExact(seq) and PyTuple_GET_SIZE(seq) >= n:
        return seq
    return _items_of(seq, n)


cdef object _items_of(object seq, Py_ssize_t n):
    """The tuple of seq[0] .. seq[n-1] (the items the pure path reads, in its order), or None if it is
    shorter."""
    cdef Py_ssize_t i
    try:
        if len(seq) < n:
            return None
    except TypeError:  # no len(): the pure path indexes it
        return None
    items = PyTuple_New(n)
    for i in range(n):
        item = seq[i]
        Py_INCREF(item)
        PyTuple_SET_ITEM(items, i, item)
    return items


cdef inline unsigned long long _all_bits(Py_ssize_t n):
    """(1 << n) - 1, for n <= 64."""
    if n >= 64:
        return <unsigned long long>0xFFFFFFFFFFFFFFFF
    return ((<unsigned long long>1) << n) - 1


cdef inline object _sliding_state_object(object state, Spec* spec, int* form):
    """memory._sliding_state: the array itself (*form F_FULL or F_ONE), or None (F_NONE)."""
    cdef Py_ssize_t size
    form[0] = F_NONE
    if type(state) is not ARRAY or (<array>state).ob_descr.typecode != b"d":
        return None  # (adjust checked every state before writing: not one this spec reads)
    size = Py_SIZE(state)
    if size == spec.slots + _BASE:
        form[0] = F_FULL
        return state
    if size == _ONE_SLOT and (<array>state).data.as_doubles[_BASE + 1] == <double>-spec.slots:
        form[0] = F_ONE
        return state
    return None


# -- adjust (settle differences) ---------------------------------------------------------------------------

cdef void _sliding_refund(double* st, bint one, double now, Spec* spec, long long amount, bint exact,
                          double charged_at):
    """windows.sliding_refund in place (`one`: on the one-slot form, which it keeps; `exact`: a charged_at
    was given)."""
    cdef long long n = spec.slots, top, s = 0, cur = 0, i, last
    cdef double width = spec.width, left, take, count
    if st[_TOTAL] <= 0:
        return
    _slot_of(now, width, &cur)  # in range: checked before anything was written
    if one:  # windows._refund_one_slot: the only count is slot last_slot's
        last = <long long>st[_LAST]
        if cur - last >= n:  # the count has left the window: rolled to empty, as the full form would be
            st[_BASE] = 0.0
            st[_TOTAL] = 0.0
            st[_LAST] = <double>cur
            return
        if exact:
            _slot_of(charged_at, width, &s)
            if s != last:
                return  # that slot holds nothing (or has left the window)
        # Python compares the int amount with the float count exactly; the rounded double compares the
        # same way except when it equals the count, and then both take the count (amount rounds to it)
        left = <double>amount
        count = st[_BASE]
        take = left if left < count else count
        st[_BASE] = count - take
        st[_TOTAL] -= take
        return
    top = _roll(st, cur, n)
    left = <double>amount
    if exact:
        _slot_of(charged_at, width, &s)
        if top - n < s <= top:
            i = _BASE + _mod(s, n)
            take = left if left < st[i] else st[i]
            st[i] -= take
            st[_TOTAL] -= take
        return
    s = top
    while s > top - n:
        i = _BASE + _mod(s, n)
        take = left if left < st[i] else st[i]
        if take > 0:
            st[i] -= take
            st[_TOTAL] -= take
            left -= take
            if left <= 0:
                return
        s -= 1


cdef inline bint _in_range(object t):
    return (PyFloat_CheckExact(t) or PyLong_CheckExact(t)) and -TIME_RANGE < <double>t < TIME_RANGE


def adjust(self, counter_ids, specs, deltas, now, charged_at=None):
    """MemoryCounterStore.adjust (see stores/memory.py): apply settle differences now, window by window."""
    return _adjust(self, counter_ids, specs, deltas, NULL, now, charged_at)


cdef object adjust_c(object self, object counter_ids, object specs, const long long* deltas, object now,
                     object charged_at):
    """`adjust` with its deltas as len(specs) C integers (native/_account.pyx: a settlement's), no tuple
    of ints made unless the pure path takes them."""
    return _adjust(self, counter_ids, specs, None, deltas, now, charged_at)


cdef object _py_adjust_of(object self, object counter_ids, object specs, object deltas, const long long* given,
                          object now, object charged_at):
    """The pure adjust, with `given`'s deltas as the tuple of ints it takes when there is no `deltas`."""
    cdef Py_ssize_t i, n
    if deltas is None:
        n = len(specs)
        deltas = PyTuple_New(n)
        for i in range(n):
            delta = PyLong_FromLongLong(given[i])
            Py_INCREF(delta)
            PyTuple_SET_ITEM(deltas, i, delta)
    return _py_adjust(self, counter_ids, specs, deltas, now, charged_at)


cdef object _adjust(object self, object counter_ids, object specs, object deltas, const long long* given,
                    object now, object charged_at):
    cdef Spec spec_c[MAX_WINDOWS]
    cdef long long delta_c[MAX_WINDOWS]
    cdef Py_ssize_t n, i
    cdef double t, at = 0.0, debt, elapsed
    cdef long long slot = 0, in_flight
    cdef int fallback = 0, overflow = 0, form = F_NONE
    cdef bint exact = charged_at is not None
    cdef Spec* sp
    cdef double* st
    if not _in_range(now) or (exact and not _in_range(charged_at)):
        return _py_adjust_of(self, counter_ids, specs, deltas, given, now, charged_at)
    t = now
    if exact:
        at = charged_at
    n = len(specs)
    if _STORE == NULL:
        _store_slots(self)
    states = _sget(self, SO_STATES, "_states")
    if n > MAX_WINDOWS or type(states) is not dict:
        return _py_adjust_of(self, counter_ids, specs, deltas, given, now, charged_at)
    for i in range(n):  # everything this code cannot do exactly goes to the pure path before any write
        sp = &spec_c[i]
        if _read_spec(specs[i], sp):
            return _py_adjust_of(self, counter_ids, specs, deltas, given, now, charged_at)
        if given != NULL:
            delta_c[i] = given[i]
        else:
            delta = deltas[i]
            if not PyLong_CheckExact(delta):
                return _py_adjust_of(self, counter_ids, specs, deltas, given, now, charged_at)
            delta_c[i] = PyLong_AsLongLongAndOverflow(delta, &overflow)
        if overflow or not (-MAX_COST <= delta_c[i] <= MAX_COST):
            return _py_adjust_of(self, counter_ids, specs, deltas, given, now, charged_at)
        if not delta_c[i]:
            continue
        found = PyDict_GetItemWithError(states, counter_ids[i])
        state = <object>found if found != NULL else None
        if sp.algorithm == A_SLIDING:
            _sliding_doubles(state, sp, &fallback, &form)
            if fallback or _slot_of(t, sp.width, &slot) or (exact and _slot_of(at, sp.width, &slot)):
                return _py_adjust_of(self, counter_ids, specs, deltas, given, now, charged_at)
        elif sp.algorithm == A_GAUGE and PyLong_CheckExact(state):
            in_flight = PyLong_AsLongLongAndOverflow(state, &overflow)
            if overflow or not (-MAX_COST <= in_flight <= MAX_COST):
                return _py_adjust_of(self, counter_ids, specs, deltas, given, now, charged_at)
    for i in range(n):
        if not delta_c[i]:
            continue
        sp = &spec_c[i]
        cid = counter_ids[i]
        found = PyDict_GetItemWithError(states, cid)
        state = <object>found if found != NULL else None
        if sp.algorithm == A_GCRA:
            if PyComplex_CheckExact(state):
                debt = _real(state)
                if debt > 0:
                    elapsed = t - _imag(state)
                    if elapsed > 0:
                        debt = debt - elapsed if debt > elapsed else 0.0
            else:
                debt = 0.0
            debt += <double>delta_c[i] * sp.interval
            if debt > 0:
                if not _overwrite(found, 2, debt, t):  # the dict's and `state`'s
                    _set_state(self, states, cid, PyComplex_FromDoubles(debt, t))
            else:
                _drop_state(self, states, cid)
        elif sp.algorithm == A_SLIDING:
            window = _sliding_state_object(state, sp, &form)
            if delta_c[i] > 0:
                _slot_of(t, sp.width, &slot)  # in range: checked before anything was written
                _set_state(self, states, cid, _sliding_charge(window, t, slot, sp, delta_c[i], self))
            elif window is not None:
                st = (<array>window).data.as_doubles
                _sliding_refund(st, form == F_ONE, t, sp, -delta_c[i], exact, at)
                if t >= st[_FRESH] or st[_TOTAL] <= 0.0:
                    _drop_state(self, states, cid)
        else:
            in_flight = PyLong_AsLongLong(state) if PyLong_CheckExact(state) else 0
            in_flight += delta_c[i]
            if in_flight > 0:
                _set_state(self, states, cid, PyLong_FromLongLong(in_flight))
            else:
                _drop_state(self, states, cid)
