# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The rate-limit headers of an answer in C: core/ratelimit_headers.py's `plan_headers`, installed as
`core.ratelimit_headers.build_headers` (nexus_authz/native/__init__.py).

The fixed parts (the ratelimit-policy header, each window's RateLimit item prefix) come made from the plan;
what changes per request (remaining, the reset seconds, the OpenAI durations, retry-after) is formatted
here from the statuses' slots, with the same integer and float operations as the pure function
(`math.ceil(x - 1e-9)` is C's ceil on the same double, exact for the integers in range). Anything this
code does not know takes the pure function for the whole call: statuses that are not a tuple of
WindowStatus, a `remaining` or `limit` that is not an int within ±2**62, times that are not finite floats,
a RateLimit header longer than its buffer. The differential test is tests/test_native_headers.py.

The plan's third item is the header families the policy chose (core/ratelimit_headers.py FAMILIES): with
OpenAI's left out the plan marks no window as requests or tokens (none is tracked as the tightest), with
IETF's left out no RateLimit item is formatted, and with neither an admission's headers are none at all.
"""

from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM, PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_FromStringAndSize
from libc.math cimport ceil, isfinite, INFINITY
from libc.string cimport memcpy

from nexus_authz.core.limits import WindowStatus
from nexus_authz.core.ratelimit_headers import BOTH as _BOTH
from nexus_authz.core.ratelimit_headers import plan_header_block as _py_plan_header_block
from nexus_authz.core.ratelimit_headers import plan_headers as _py_plan_headers


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL
    bint PyLong_CheckExact(object o)
    bint PyFloat_CheckExact(object o)
    bint PyTuple_CheckExact(object o)
    bint PyUnicode_CheckExact(object o)


cdef enum:
    BUF = 16384
    FALLBACK = 1
    IETF = 2  # ratelimit_headers.IETF

cdef long long RANGE = 1LL << 62
cdef type STATUS = WindowStatus
cdef object TRUE = True
cdef object BOTH = _BOTH  # the default families: a plan's third item is this very int (a cached small int)
cdef object FALSE = False


include "_slots.pxi"


cdef Py_ssize_t O_LIMIT = _offset(WindowStatus, "limit")
cdef Py_ssize_t O_REMAINING = _offset(WindowStatus, "remaining")
cdef Py_ssize_t O_RESET = _offset(WindowStatus, "reset_after")
cdef Py_ssize_t O_RETRY = _offset(WindowStatus, "retry_after")
cdef Py_ssize_t O_ALLOWED = _offset(WindowStatus, "allowed")


cdef struct Window:
    PyObject* status  # NULL: a Figure's (its limit below)
    long long remaining
    double reset_after
    long long limit


cdef inline bint _tighter(Window* a, Window* b):
    return a.remaining < b.remaining or (a.remaining == b.remaining and a.reset_after > b.reset_after)


cdef inline Py_ssize_t _lld(char* out, long long v) noexcept:
    """`v` in decimal into `out` (at most 20 bytes): its length. snprintf's "%lld" without the format
    interpreter (glibc's vfprintf was ~3% of the server's CPU per request)."""
    cdef char digits[20]
    cdef unsigned long long u
    cdef Py_ssize_t n = 0, i = 0
    if v < 0:
        out[0] = b"-"
        n = 1
        u = <unsigned long long>(-(v + 1)) + 1
    else:
        u = <unsigned long long>v
    while True:
        digits[i] = <char>(48 + u % 10)
        i += 1
        u //= 10
        if u == 0:
            break
    while i > 0:
        i -= 1
        out[n] = digits[i]
        n += 1
    return n


cdef inline Py_ssize_t _text(char* out, const char* text) noexcept:
    """A NUL-terminated `text` into `out`: its length."""
    cdef Py_ssize_t n = 0
    while text[n] != 0:
        out[n] = text[n]
        n += 1
    return n


cdef inline Py_ssize_t _ratelimit_item(
    char* buf, Py_ssize_t used, bint first, const char* text, Py_ssize_t size, bint windowed, Window* w
):
    """One window's item of the IETF `ratelimit` header (`, ` between items): the new length of `buf`
    (the caller checked that size + 64 bytes fit)."""
    if not first:
        buf[used] = b","
        buf[used + 1] = b" "
        used += 2
    memcpy(buf + used, text, size)
    used += size
    used += _lld(buf + used, w.remaining)
    if windowed:
        memcpy(buf + used, b";t=", 3)
        used += 3
        used += _lld(buf + used, _ceil_seconds(w.reset_after, 0))
    return used


cdef inline void _keep_tightest(
    long kind, Window* w, Window* requests, bint* has_requests, Window* tokens, bint* has_tokens
):
    """The tightest requests window and the tightest tokens window so far (the OpenAI-style headers')."""
    if kind == 1:
        if not has_requests[0] or _tighter(w, requests):
            requests[0] = w[0]
            has_requests[0] = True
    elif kind == 2 and (not has_tokens[0] or _tighter(w, tokens)):
        tokens[0] = w[0]
        has_tokens[0] = True


cdef inline long long _ceil_seconds(double seconds, long long minimum):
    cdef long long value = <long long>ceil(seconds - 1e-9)
    return value if value > minimum else minimum


cdef inline bint _seconds_in_range(double seconds):
    """ceil(seconds * 1000) fits a long long (and seconds is finite)."""
    return isfinite(seconds) and -1e15 < seconds < 1e15


cdef Py_ssize_t _seconds_text(long long secs, long long millis, char* out):
    """f"{secs}.{millis:03d}".rstrip("0") + "s" if millis else f"{secs}s"."""
    cdef Py_ssize_t n
    n = _lld(out, secs)
    if millis:
        out[n] = b"."
        out[n + 1] = <char>(48 + millis // 100 % 10)
        out[n + 2] = <char>(48 + millis // 10 % 10)
        out[n + 3] = <char>(48 + millis % 10)
        n += 4
        while out[n - 1] == b"0":
            n -= 1
    out[n] = b"s"
    return n + 1


cdef Py_ssize_t _duration_text(double seconds, char* buf):
    """ratelimit_headers.openai_duration into `buf` (128 bytes): its length."""
    cdef long long ms, hours, minutes, rest, secs, millis
    cdef Py_ssize_t t
    if seconds <= 0:
        memcpy(buf, b"0s", 2)
        return 2
    ms = <long long>ceil(seconds * 1000.0 - 1e-6)
    if ms < 1000:
        if ms <= 0:
            memcpy(buf, b"0s", 2)
            return 2
        t = _lld(buf, ms)
        buf[t] = b"m"
        buf[t + 1] = b"s"
        return t + 2
    if ms < 60000:
        return _seconds_text(ms // 1000, ms % 1000, buf)
    hours = ms // 3600000
    rest = ms % 3600000
    minutes = rest // 60000
    rest = rest % 60000
    t = 0
    if hours:
        t = _lld(buf, hours)
        buf[t] = b"h"
        t += 1
    t += _lld(buf + t, minutes)
    buf[t] = b"m"
    t += 1
    return t + _seconds_text(rest // 1000, rest % 1000, buf + t)


cdef object _duration(double seconds):
    """ratelimit_headers.openai_duration."""
    cdef char buf[128]
    return PyUnicode_FromStringAndSize(buf, _duration_text(seconds, buf))


cdef inline int _read(object status, Window* w):
    cdef int overflow = 0
    cdef PyObject* remaining
    cdef PyObject* reset
    if type(status) is not STATUS:
        return FALLBACK
    remaining = _slot_value(status, O_REMAINING)
    reset = _slot_value(status, O_RESET)
    if remaining == NULL or reset == NULL or _slot_value(status, O_LIMIT) == NULL:
        return FALLBACK
    if _slot_value(status, O_RETRY) == NULL or _slot_value(status, O_ALLOWED) == NULL:
        return FALLBACK
    if not PyLong_CheckExact(<object>remaining) or not PyFloat_CheckExact(<object>reset):
        return FALLBACK
    w.remaining = PyLong_AsLongLongAndOverflow(<object>remaining, &overflow)
    if overflow or not (-RANGE < w.remaining < RANGE):
        return FALLBACK
    w.reset_after = PyFloat_AS_DOUBLE(<object>reset)
    if not _seconds_in_range(w.reset_after):
        return FALLBACK
    if not PyFloat_CheckExact(<object>_slot_value(status, O_RETRY)):
        return FALLBACK
    if _slot_value(status, O_ALLOWED) != <PyObject*>TRUE and _slot_value(status, O_ALLOWED) != <PyObject*>FALSE:
        return FALLBACK
    w.status = <PyObject*>status
    return 0


cdef inline void _put(tuple out, Py_ssize_t n, object name, object value):
    """out[n] = (name, value), in a tuple being built."""
    cdef tuple pair = PyTuple_New(2)
    Py_INCREF(name)
    PyTuple_SET_ITEM(pair, 0, name)
    Py_INCREF(value)
    PyTuple_SET_ITEM(pair, 1, value)
    Py_INCREF(pair)
    PyTuple_SET_ITEM(out, n, pair)


def plan_headers(tuple plan, statuses, bint denied):
    """ratelimit_headers.plan_headers, in C."""
    cdef char buf[BUF]
    cdef Py_ssize_t used = 0, size, n, count, k, index, nitems
    cdef const char* text
    cdef Window w
    cdef Window requests
    cdef Window tokens
    cdef bint has_requests = False, has_tokens = False, refused = False, retry_after, ietf
    cdef double wait = 0.0, retry
    cdef tuple items, item, out
    cdef object prefix
    cdef long families
    requests.status = tokens.status = NULL
    requests.remaining = tokens.remaining = 0
    requests.reset_after = tokens.reset_after = 0.0
    policy = plan[0]
    families = <long>plan[2]
    if policy is None or not (families or denied):
        return ()
    ietf = (families & IETF) != 0
    if not PyTuple_CheckExact(statuses):
        return _py_plan_headers(plan, statuses, denied)
    items = <tuple>plan[1]
    nitems = PyTuple_GET_SIZE(items)
    for k in range(nitems):
        item = <tuple><object>PyTuple_GET_ITEM(items, k)
        index = <Py_ssize_t><object>PyTuple_GET_ITEM(item, 0)
        if not 0 <= index < PyTuple_GET_SIZE(statuses):
            return _py_plan_headers(plan, statuses, denied)
        if _read(<object>PyTuple_GET_ITEM(statuses, index), &w):
            return _py_plan_headers(plan, statuses, denied)
        if ietf:
            prefix = <object>PyTuple_GET_ITEM(item, 1)
            text = PyUnicode_AsUTF8AndSize(prefix, &size)
            if used + size + 64 > BUF:
                return _py_plan_headers(plan, statuses, denied)
            used = _ratelimit_item(buf, used, k == 0, text, size, <bint><object>PyTuple_GET_ITEM(item, 2), &w)
        _keep_tightest(
            <long><object>PyTuple_GET_ITEM(item, 3), &w, &requests, &has_requests, &tokens, &has_tokens
        )
        if _slot_value(<object>w.status, O_ALLOWED) == <PyObject*>FALSE:
            refused = True
            retry = PyFloat_AS_DOUBLE(<object>_slot_value(<object>w.status, O_RETRY))
            if retry > wait:
                wait = retry
    retry_after = denied and refused and wait != INFINITY
    if retry_after and not _seconds_in_range(wait):
        return _py_plan_headers(plan, statuses, denied)  # NaN
    count = 2 * ietf + 3 * has_requests + 3 * has_tokens + retry_after
    out = PyTuple_New(count)
    n = 0
    if has_requests:
        _put(out, 0, "x-ratelimit-limit-requests", str(<object>_slot_value(<object>requests.status, O_LIMIT)))
        _put(out, 1, "x-ratelimit-remaining-requests", str(<object>_slot_value(<object>requests.status, O_REMAINING)))
        _put(out, 2, "x-ratelimit-reset-requests", _duration(requests.reset_after))
        n = 3
    if has_tokens:
        _put(out, n, "x-ratelimit-limit-tokens", str(<object>_slot_value(<object>tokens.status, O_LIMIT)))
        _put(out, n + 1, "x-ratelimit-remaining-tokens", str(<object>_slot_value(<object>tokens.status, O_REMAINING)))
        _put(out, n + 2, "x-ratelimit-reset-tokens", _duration(tokens.reset_after))
        n += 3
    if ietf:
        Py_INCREF(policy)
        PyTuple_SET_ITEM(out, n, policy)
        _put(out, n + 1, "ratelimit", PyUnicode_FromStringAndSize(buf, used))
        n += 2
    if retry_after:
        _put(out, n, "retry-after", str(_ceil_seconds(wait, 1)))
    return out


cdef inline Py_ssize_t _ascii(object text, const char** data) except -2:
    """The UTF-8 of a str that is ASCII (the same bytes as its latin-1), else -1."""
    cdef Py_ssize_t size
    if not PyUnicode_CheckExact(text):
        return -1
    data[0] = PyUnicode_AsUTF8AndSize(text, &size)
    return size if size == len(<str>text) else -1


cdef Py_ssize_t _openai_lines(char* out, Window* w, const char* kind) except -2:
    """The three x-ratelimit-*-<kind> lines of the binding window; -1: its limit is not a plain int."""
    cdef int overflow = 0
    cdef PyObject* limit_obj
    cdef long long limit = w.limit
    cdef Py_ssize_t n
    if w.status != NULL:
        limit_obj = _slot_value(<object>w.status, O_LIMIT)
        if not PyLong_CheckExact(<object>limit_obj):
            return -1
        limit = PyLong_AsLongLongAndOverflow(<object>limit_obj, &overflow)
    if overflow or not (-RANGE < limit < RANGE):
        return -1
    n = _text(out, b"x-ratelimit-limit-")
    n += _text(out + n, kind)
    out[n] = b":"
    out[n + 1] = b" "
    n += 2
    n += _lld(out + n, limit)
    n += _text(out + n, b"\r\nx-ratelimit-remaining-")
    n += _text(out + n, kind)
    out[n] = b":"
    out[n + 1] = b" "
    n += 2
    n += _lld(out + n, w.remaining)
    n += _text(out + n, b"\r\nx-ratelimit-reset-")
    n += _text(out + n, kind)
    out[n] = b":"
    out[n + 1] = b" "
    n += 2
    n += _duration_text(w.reset_after, out + n)
    out[n] = b"\r"
    out[n + 1] = b"\n"
    return n + 2


def plan_header_block(tuple plan, statuses):
    """ratelimit_headers.plan_header_block (an admission's headers as HTTP/1.1 lines), in C."""
    cdef char out[BUF]
    cdef Py_ssize_t n
    cdef long families = <long>plan[2]
    if plan[0] is None or not families:
        return b""
    if not PyTuple_CheckExact(statuses):
        return _py_plan_header_block(plan, statuses)
    n = _block(plan, <tuple>statuses, NULL, PyTuple_GET_SIZE(statuses), out, (families & IETF) != 0)
    if n < 0:
        return _py_plan_header_block(plan, statuses)
    return PyBytes_FromStringAndSize(out, n)


cdef Py_ssize_t figure_block(tuple plan, Figure* figures, Py_ssize_t count, char* out) except -2:
    """plan_header_block of the statuses `figures[:count]` stand for (_windows.acquire_figures), written to
    `out` (BLOCK_BYTES): its length; -1 where plan_header_block would take the pure function (the caller
    makes the statuses and calls it)."""
    cdef long families
    if plan[0] is None:
        return 0
    if plan[2] is BOTH:  # the default: no conversion
        return _block(plan, None, figures, count, out, True)
    families = <long>plan[2]
    if not families:
        return 0
    return _block(plan, None, figures, count, out, (families & IETF) != 0)


def figure_block_of(tuple plan, tuple statuses):
    """`figure_block` as the tests call it, on the figures of `statuses` (WindowStatus with int limits and
    remainings within ±2**63, float times): its bytes, or None where it leaves the answer to the caller."""
    cdef Figure figures[64]
    cdef char out[BUF]
    cdef Py_ssize_t i, n = len(statuses)
    if n > 64:
        raise ValueError("at most 64 windows")
    for i in range(n):
        s = statuses[i]
        figures[i].remaining = s.remaining
        figures[i].limit = s.limit
        figures[i].reset_after = s.reset_after
        figures[i].retry_after = s.retry_after
        figures[i].allowed = s.allowed
    n = figure_block(plan, figures, n, out)
    return None if n < 0 else PyBytes_FromStringAndSize(out, n)


cdef inline int _figure(Figure* f, Window* w):
    """`_read` of the status a Figure stands for (the same checks)."""
    if not (-RANGE < f.remaining < RANGE) or not _seconds_in_range(f.reset_after):
        return FALLBACK
    w.status = NULL
    w.remaining = f.remaining
    w.reset_after = f.reset_after
    w.limit = f.limit
    return 0


cdef Py_ssize_t _block(
    tuple plan, tuple statuses, Figure* figures, Py_ssize_t count, char* out, bint ietf
) except -2:
    """The block's bytes in `out` (BUF) from `statuses` or, when it is None, `figures` (`count` of either):
    their length, or -1 (the pure function's case). `plan[0]` is not None, and a family is chosen (`ietf`:
    IETF's)."""
    cdef char rl[BUF]
    cdef Py_ssize_t used = 0, size, k, index, nitems, n, m
    cdef const char* text
    cdef Window w
    cdef Window requests
    cdef Window tokens
    cdef bint has_requests = False, has_tokens = False
    cdef tuple items, item
    requests.status = tokens.status = NULL
    requests.remaining = tokens.remaining = requests.limit = tokens.limit = 0
    requests.reset_after = tokens.reset_after = 0.0
    policy = plan[0]
    items = <tuple>plan[1]
    nitems = PyTuple_GET_SIZE(items)
    for k in range(nitems):
        item = <tuple><object>PyTuple_GET_ITEM(items, k)
        index = <Py_ssize_t><object>PyTuple_GET_ITEM(item, 0)
        if not 0 <= index < count:
            return -1
        if statuses is None:
            if _figure(&figures[index], &w):
                return -1
        elif _read(<object>PyTuple_GET_ITEM(statuses, index), &w):
            return -1
        if ietf:
            size = _ascii(<object>PyTuple_GET_ITEM(item, 1), &text)
            if size < 0 or used + size + 64 > BUF:
                return -1
            used = _ratelimit_item(rl, used, k == 0, text, size, <bint><object>PyTuple_GET_ITEM(item, 2), &w)
        _keep_tightest(
            <long><object>PyTuple_GET_ITEM(item, 3), &w, &requests, &has_requests, &tokens, &has_tokens
        )
    n = 0
    if has_requests:
        m = _openai_lines(out, &requests, "requests")
        if m < 0:
            return -1
        n += m
    if has_tokens:
        m = _openai_lines(out + n, &tokens, "tokens")
        if m < 0:
            return -1
        n += m
    if not ietf:
        return n
    size = _ascii(<object>PyTuple_GET_ITEM(policy, 1), &text)
    if size < 0 or n + size + used + 64 > BUF:
        return -1
    memcpy(out + n, b"ratelimit-policy: ", 18)
    n += 18
    memcpy(out + n, text, size)
    n += size
    memcpy(out + n, b"\r\nratelimit: ", 13)
    n += 13
    memcpy(out + n, rl, used)
    n += used
    out[n] = b"\r"
    out[n + 1] = b"\n"
    return n + 2
