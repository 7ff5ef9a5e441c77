# The time module's clocks read in C, as the same float CPython makes of them, where the platform's clock
# is the one a function is known to read (Linux: time.time is clock_gettime(CLOCK_REALTIME),
# time.perf_counter clock_gettime(CLOCK_MONOTONIC)): shared by the compiled modules that read a clock per
# check or per entry (`include "_clocks.pxi"`; Cython pastes it into each module, one source).

from cpython.float cimport PyFloat_FromDouble as _clocks_float
from posix.time cimport CLOCK_MONOTONIC as _CLOCK_MONOTONIC
from posix.time cimport CLOCK_REALTIME as _CLOCK_REALTIME
from posix.time cimport clock_gettime as _clocks_gettime
from posix.time cimport timespec as _clocks_timespec


cdef inline double _seconds(long long ns) noexcept:
    """_PyTime_AsSecondsDouble (CPython's pytime.c): a whole second's count divided as an integer."""
    if ns % 1000000000LL == 0:
        return <double>(ns // 1000000000LL)
    return <double>ns / 1e9


cdef inline bint _clock_now(int clock_id, double* out) noexcept:
    """The clock's time in seconds, as time.time / time.perf_counter make it of the same reading; False
    when it cannot be read (`out` untouched)."""
    cdef _clocks_timespec ts
    if _clocks_gettime(clock_id, &ts) != 0:
        return False
    out[0] = _seconds(<long long>ts.tv_sec * 1000000000LL + ts.tv_nsec)
    return True


cdef object _clock_of(str name, str clock):
    """time.<name> when it reads clock_gettime(<clock>) here (time.get_clock_info), else None: what
    `_clock_call` and its kind may read in C in its place."""
    import time

    if time.get_clock_info(name).implementation == f"clock_gettime({clock})":
        return getattr(time, name)
    return None


cdef inline object _clock_call(object clock, object known, int clock_id):
    """clock(): read in C (the same float, no call) when it is `known` (`_clock_of`'s function of
    `clock_id`); any other clock (a test's, a fake) is called."""
    cdef double now
    if clock is known and known is not None and _clock_now(clock_id, &now):
        return _clocks_float(now)
    return clock()
