# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The common access-log entry's accounting in C: settle, price, count and record in one call.

`account_provider(engine, request_id, usage, response_model)` (and `account_counts`, the same with the
Usage's counts as arguments, for native/_usage.pyx `account_run`) is `Engine.account(request_id, usage,
response_model=..., keep_estimate=False, unread=False)` (nexus_authz/engine.py) for the common entry (a
response whose provider usage record the compiled scans read, adapters/envoy_als.py `_account_snippet`),
with `accounting.charge_fields`, `ReservationBook.settle_parts`, `Decider.adjust`,
`accounting.count_tokens_used` and `SQLiteLedger.record_usage`'s update of an existing pending row written
into it, in the same order, so a common entry runs no Python frame from the ALS handler to the memory
store's (compiled) adjust. Those functions stay the reference; each step says which one it mirrors.
`account_c(..., none=True, at_least=...)` is the same for `Usage(source="none")` (an error document, a
JSON response without the Lua tap's record: native/_usage.pyx `_common`), with its keep_estimate;
`account_c(..., counted=True)` for a whole stream's counted completion (`_usage.pyx` `_counted`: the
`Usage(source="estimated")` of a stream without a usage record; `counted_ready` first says whether it will
take the entry, before the count is run).

It returns False, before any state is changed, for what it does not take: the Python `Engine.account`
then runs (an engine of another class; no reservation in the book: expired, retired, duplicate or unadmitted; a usage that is not the
provider's; a context that is not an InFlight; a store other than the local memory store (Redis); more
than 62 windows; a price that is not a finite number). A ledger of another class, or a pending row the SQLite ledger lacks, is recorded
through the ledger's own `record_usage` (the same call the Python path makes).
tests/adapters/test_als_batch.py compares the counters, ledger rows, metrics and book it leaves with the
pure path's.
"""

from cpython.dict cimport PyDict_GetItemWithError, PyDict_SetItem
from cpython.float cimport PyFloat_FromDouble
from cpython.method cimport PyMethod_Check, PyMethod_GET_FUNCTION, PyMethod_GET_SELF
from cpython.object cimport PyObject
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact, PyLong_FromLongLong
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from libc.math cimport ceil, fmod, isfinite

# Compiled for size: a settlement runs once per entry of a message that starts with cold caches, its
# code mostly straight-line and run once per entry, so its cost follows the distinct code lines it runs
# (bench_footprint_als: -Os here 13.3 -> 11.9 code lines per entry, the same instructions; not _usage.pyx,
# whose scans loop: +22% instructions there for 0.3 lines)
cdef extern from *:
    """
    #pragma GCC optimize ("Os")
    """

from nexus_authz.native._reservation cimport Entries, Reservation
from nexus_authz.native._windows cimport adjust_c

from nexus_authz.core import accounting as _accounting
from nexus_authz.core.config import Price
from nexus_authz.core.limits import Kind, LimitSpec
from nexus_authz.core.model import InFlight
from nexus_authz.core.policy import Policy
from nexus_authz.core.pricing import PriceTable, Priced
from nexus_authz.core.reservations import ReservationBook
from nexus_authz.core.settled import SettledIds

# the stores' classes, bound at the first call (stores/memory.py imports nexus_authz.native, which loads
# this module)
cdef object LocalCounters = None
cdef object MemoryCounterStore = None
cdef object SQLiteLedger = None
cdef object Engine = None
cdef object Decider = None
cdef object _ADJUST = None  # native/_windows.pyx adjust, MemoryCounterStore.adjust: adjust_c is the same
# SQLiteLedger's _closed, _pending and _recorded are plain instance attributes (its class defines none of
# those names): read and written in the instance's __dict__, as getattr and setattr do, without their
# look-up on the type (the type's attribute cache, distinct memory a message's first entry finds cold)
cdef bint _LEDGER_DICT = False
# time.time when it is clock_gettime(CLOCK_REALTIME) (Linux): the engine's clock read in C when it is that
# (_clocks.pxi `_clock_call`), with no call through Cython's and the time module's call paths
cdef object _TIME = None
cdef str _CLOSED = "_closed"
cdef str _PENDING = "_pending"
cdef str _RECORDED = "_recorded"


cdef extern from "Python.h":
    object PyObject_GenericGetDict(object o, void* context)

include "_slots.pxi"
include "_clocks.pxi"

# Where the objects a settlement reads keep their fields (__slots__), read in place (`_at`) rather than
# by name: a look-up by name touches the type's attribute cache, the descriptor and its member
# definition besides the object, distinct memory per field that a message's first entry finds cold.
# Read only from instances of exactly these classes (checked before).
cdef Py_ssize_t ENGINE_BOOK, ENGINE_DECIDER, ENGINE_POLICY, ENGINE_ACCOUNTED, ENGINE_CLOCK
cdef Py_ssize_t ENGINE_USAGE_TOKENS, ENGINE_LEDGER
cdef Py_ssize_t DECIDER_STORE, DECIDER_SLOT_RELEASES, DECIDER_SLOT_FREED
cdef Py_ssize_t LOCAL_STORE, LOCAL_ADJUST_SOON
cdef Py_ssize_t BOOK_ENTRIES = _offset(ReservationBook, "_entries")
cdef Py_ssize_t BOOK_SETTLED = _offset(ReservationBook, "settled")
cdef Py_ssize_t BOOK_SETTLED_MAX = _offset(ReservationBook, "_settled_max")
cdef Py_ssize_t BOOK_SETTLED_IDS = _offset(ReservationBook, "_settled")
cdef Py_ssize_t IDS_NEWEST = _offset(SettledIds, "newest")
cdef Py_ssize_t IDS_CHUNK = _offset(SettledIds, "chunk")
cdef Py_ssize_t POLICY_PRICES = _offset(Policy, "prices")
cdef Py_ssize_t PRICES_ENTRIES = _offset(PriceTable, "_entries")
cdef Py_ssize_t PRICES_CACHE = _offset(PriceTable, "_cache")
cdef Py_ssize_t PRICED_PRICE = _offset(Priced, "price")
cdef Py_ssize_t PRICED_MATCHED = _offset(Priced, "matched")
cdef Py_ssize_t PRICED_RULE = _offset(Priced, "rule")
cdef Py_ssize_t PRICED_OUTCOME = _offset(Priced, "outcome")
cdef Py_ssize_t PRICE_INPUT = _offset(Price, "input")
cdef Py_ssize_t PRICE_CACHED_INPUT = _offset(Price, "cached_input")
cdef Py_ssize_t PRICE_OUTPUT = _offset(Price, "output")
cdef Py_ssize_t SPEC_KIND = _offset(LimitSpec, "kind")


cdef int _bind() except -1:
    global LocalCounters, MemoryCounterStore, SQLiteLedger, Engine, Decider, _ADJUST
    global ENGINE_BOOK, ENGINE_DECIDER, ENGINE_POLICY, ENGINE_ACCOUNTED, ENGINE_CLOCK, ENGINE_USAGE_TOKENS
    global ENGINE_LEDGER, DECIDER_STORE, DECIDER_SLOT_RELEASES, DECIDER_SLOT_FREED, LOCAL_STORE
    global LOCAL_ADJUST_SOON, _LEDGER_DICT, _TIME
    from nexus_authz.native._windows import adjust

    from nexus_authz.decide import Decider as decider
    from nexus_authz.engine import Engine as engine
    from nexus_authz.stores.base import LocalCounters as local
    from nexus_authz.stores.ledger.sqlite import SQLiteLedger as sqlite
    from nexus_authz.stores.memory import MemoryCounterStore as memory

    ENGINE_BOOK = _offset(engine, "book")
    ENGINE_DECIDER = _offset(engine, "decider")
    ENGINE_POLICY = _offset(engine, "policy")
    ENGINE_ACCOUNTED = _offset(engine, "accounted")
    ENGINE_CLOCK = _offset(engine, "_clock")
    ENGINE_USAGE_TOKENS = _offset(engine, "usage_tokens")
    ENGINE_LEDGER = _offset(engine, "ledger")
    DECIDER_STORE = _offset(decider, "store")
    DECIDER_SLOT_RELEASES = _offset(decider, "slot_releases")
    DECIDER_SLOT_FREED = _offset(decider, "_slot_freed")
    LOCAL_STORE = _offset(local, "store")
    LOCAL_ADJUST_SOON = _offset(local, "adjust_soon")
    _ADJUST = adjust
    _LEDGER_DICT = not any(hasattr(sqlite, name) for name in (_CLOSED, _PENDING, _RECORDED))
    _TIME = _clock_of("time", "CLOCK_REALTIME")
    LocalCounters, MemoryCounterStore, SQLiteLedger, Decider = local, memory, sqlite, decider
    Engine = engine  # last: bound once every offset is
    return 0


# `_at`: the field in the slot at `offset` of `obj` (getattr's AttributeError when it is unset), in C and
# inlined at each call site with the error out of line (gcc kept a Cython inline a called function).
cdef extern from *:
    """
    static __attribute__((noinline, cold)) PyObject *_nx_account_unset(PyObject *obj) {
        PyErr_Format(PyExc_AttributeError, "'%.100s' object field not set", Py_TYPE(obj)->tp_name);
        return NULL;
    }
    static inline __attribute__((always_inline)) PyObject *_nx_account_at(PyObject *obj, Py_ssize_t offset) {
        PyObject *value = *(PyObject **)((char *)obj + offset);
        if (value == NULL)
            return _nx_account_unset(obj);
        Py_INCREF(value);
        return value;
    }
    """
    object _at "_nx_account_at"(object obj, Py_ssize_t offset)


cdef inline void _put_at(object obj, Py_ssize_t offset, object value):
    """setattr of the slot at `offset` of `obj` (what its member descriptor's __set__ does)."""
    _slot_store(obj, offset, value)


cdef inline object _kind(object spec):
    """spec.kind (a LimitSpec's slot in place)."""
    if type(spec) is LimitSpec:
        return _at(spec, SPEC_KIND)
    return spec.kind


cdef object _REQUESTS = Kind.REQUESTS
cdef object _TOKENS = Kind.TOKENS
cdef object _CONCURRENCY = Kind.CONCURRENCY
cdef dict _TOKEN_KEYS = _accounting._TOKEN_KEYS
cdef Py_ssize_t _TOKEN_KEYS_MAX = _accounting._TOKEN_KEYS_MAX
cdef str _PROVIDER = "provider"
cdef str _REPORTED = "reported"
cdef str _NONE = "none"  # an error response's usage source and ledger source (accounting.charge_fields)
cdef str _ESTIMATED = "estimated"  # a counted stream's usage source
cdef str _COUNTED = "counted"  # and its ledger source
cdef str _ACCESS_LOG = "access_log"

cdef class _Tally:
    """A count read as `taken[0]` (tests), kept as a C integer: no int object per increment."""

    def __len__(self):
        return 1

    def __getitem__(self, Py_ssize_t i):
        if i != 0:
            raise IndexError(i)
        return self.n

    def __setitem__(self, Py_ssize_t i, long long value):
        if i != 0:
            raise IndexError(i)
        self.n = value


# entries taken here (tests: the compiled step ran, not the Python Engine.account)
cdef _Tally _taken = _Tally()
taken = _taken


cdef class LedgerRow:
    """A ledger row (stores/ledger/aggregate.py: [requests, prompt, cached prompt, completion, reasoning,
    cost, records]) as seven C integers: the settlement below adds into it with no int object per sum.
    It reads and writes as the list it replaces (index, slice, iteration, len, equality with a list);
    a value that is not an int strictly between -2**62 and 2**62 turns it into that list (`_big`), kept
    from then on, so any value a list row held it holds the same."""

    cdef long long v[7]
    cdef list _big

    def __cinit__(self, *values):
        cdef Py_ssize_t i
        if len(values) != 7:
            raise TypeError(f"a ledger row holds 7 values, got {len(values)}")
        for i in range(7):
            if self._big is None and not _small(values[i], &self.v[i]):
                self._big = list(values)

    cdef inline bint add(self, Py_ssize_t i, long long n):
        """row[i] += n in C (|n| < 2**53); False when the Python way must do it."""
        if self._big is not None or not -MAX_SUM < self.v[i] < MAX_SUM:
            return False
        self.v[i] += n
        return True

    cdef list _list(self):
        if self._big is not None:
            return list(self._big)
        return [self.v[0], self.v[1], self.v[2], self.v[3], self.v[4], self.v[5], self.v[6]]

    def __len__(self):
        return 7

    def __getitem__(self, index):
        cdef Py_ssize_t i
        if PyLong_CheckExact(index) and self._big is None:
            i = index
            if i < 0:
                i += 7
            if not 0 <= i < 7:
                raise IndexError("list index out of range")
            return self.v[i]
        return self._list()[index]

    def __setitem__(self, index, value):
        cdef Py_ssize_t i
        cdef long long c
        if self._big is None and PyLong_CheckExact(index):
            i = index
            if i < 0:
                i += 7
            if not 0 <= i < 7:
                raise IndexError("list assignment index out of range")
            if _small(value, &c):
                self.v[i] = c
                return
        if self._big is None:
            self._big = self._list()
        big = self._big
        if not PyLong_CheckExact(index):  # a slice: a list row could change its length, this one cannot
            probe = list(big)
            probe[index] = value
            if len(probe) != 7:
                raise ValueError("a ledger row keeps its 7 values")
        big[index] = value

    def __iter__(self):
        return iter(self._list())

    def __eq__(self, other):
        if isinstance(other, (LedgerRow, list)):
            return self._list() == list(other)
        return NotImplemented

    def __ne__(self, other):
        if isinstance(other, (LedgerRow, list)):
            return self._list() != list(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self):
        return repr(self._list())

    def __reduce__(self):
        return (LedgerRow, tuple(self._list()))


cdef object _ZERO = 0
cdef object _last_key = None  # the last ledger row key built: the next entry of the same row reuses it
cdef double _last_minute = -1.0


cdef object _ledger_key(object key_id, object tenant, object model, object now, str source, object rule):
    """aggregate.key_of's (key_id, tenant, model, minute, source, rule), the last one reused when equal."""
    global _last_key, _last_minute
    cdef double ts, minute
    cdef tuple last
    if type(now) is not float or not now >= 0.0:
        return (key_id, tenant, model, int(now - now % 60), source, rule)
    ts = now
    minute = ts - fmod(ts, 60.0)  # a float's % 60 for ts >= 0
    if _last_key is not None and minute == _last_minute:
        last = _last_key
        if (last[0] == key_id and last[1] == tenant and last[2] == model and last[4] is source
                and last[5] == rule):
            return last
    _last_key = (key_id, tenant, model, int(minute), source, rule)
    _last_minute = minute
    return _last_key


cdef extern from *:
    """
    #define NX_MAX_COUNT 9007199254740992LL
    #define NX_MAX_SUM 4611686018427387904LL
    """
    # 2**53: counts and costs kept in C below it (their sums stay exact in 64 bits, and as doubles)
    const long long MAX_COUNT "NX_MAX_COUNT"
    const long long MAX_SUM "NX_MAX_SUM"  # 2**62: a Python int added to in C below it


cdef inline object _plus(object old, long long n):
    """`old + n` (a Python int `old`, |n| < 2**53), the sum made once in C when old fits."""
    cdef int overflow = 0
    cdef long long v
    if PyLong_CheckExact(old):
        v = PyLong_AsLongLongAndOverflow(old, &overflow)
        if not overflow and -MAX_SUM < v < MAX_SUM:
            return PyLong_FromLongLong(v + n)
    return old + PyLong_FromLongLong(n)


cdef inline object _minus(long long a, object b):
    """`a - b` (|a| < 2**54, a Python int `b`), made once in C when b fits."""
    cdef int overflow = 0
    cdef long long v
    if PyLong_CheckExact(b):
        v = PyLong_AsLongLongAndOverflow(b, &overflow)
        if not overflow and -MAX_SUM < v < MAX_SUM:
            return PyLong_FromLongLong(a - v)
    return PyLong_FromLongLong(a) - b


cdef inline bint _small(object value, long long* out):
    """A Python int strictly between -2**62 and 2**62 as a C integer; False for anything else."""
    cdef int overflow = 0
    if not PyLong_CheckExact(value):
        return False
    out[0] = PyLong_AsLongLongAndOverflow(value, &overflow)
    return not overflow and -MAX_SUM < out[0] < MAX_SUM


cdef inline void _row_add(object row, Py_ssize_t i, long long n):
    """aggregate.add_usage's `row[i] += n` (a LedgerRow in C, a list's the same sum)."""
    if type(row) is LedgerRow and (<LedgerRow>row).add(i, n):
        return
    row[i] = _plus(row[i], n)


cdef inline object _attribute(object obj, object attrs, str name):
    """getattr(obj, name) of an instance attribute, from `attrs` (its __dict__, or None)."""
    cdef PyObject* found = PyDict_GetItemWithError(attrs, name) if attrs is not None else NULL
    return <object>found if found != NULL else getattr(obj, name)


cdef inline void _add(dict counts, object key, long long n):
    cdef PyObject* found = PyDict_GetItemWithError(counts, key)
    PyDict_SetItem(counts, key, _plus(<object>found if found != NULL else _ZERO, n))


cdef inline int _incr(object counts, object key) except -1:
    """`counts[key] += 1` (in place for a dict that has the key: KeyError as the sum raises otherwise)."""
    cdef PyObject* found
    if type(counts) is dict:
        found = PyDict_GetItemWithError(counts, key)
        if found != NULL:
            PyDict_SetItem(counts, key, _plus(<object>found, 1))
            return 0
    counts[key] += 1
    return 0


cdef inline bint _count_of(object value, long long* out):
    """A Python int in [0, 2**53) as a C integer; False for anything else (the caller does not take it)."""
    cdef int overflow = 0
    if not PyLong_CheckExact(value):
        return False
    out[0] = PyLong_AsLongLongAndOverflow(value, &overflow)
    return not overflow and 0 <= out[0] < MAX_COUNT


def account_provider(object engine, str request_id, object usage, object response_model):
    """Engine.account of a provider usage record (keep_estimate=False, unread=False); False: not taken
    (nothing changed: the caller runs Engine.account)."""
    cdef long long c[4]
    c[0] = c[1] = c[2] = c[3] = 0
    if usage.source != _PROVIDER:
        return False
    if not (_count_of(usage.prompt_tokens, &c[0]) and _count_of(usage.cached_prompt_tokens, &c[1])
            and _count_of(usage.completion_tokens, &c[2]) and _count_of(usage.reasoning_tokens, &c[3])):
        return False
    return bool(account_c(engine, request_id, c[0], c[1], c[2], c[3], response_model, NULL, NULL, 0))


def account_counts(object engine, str request_id, object prompt, object cached, object completion,
                   object reasoning, object response_model):
    """`account_provider` of the provider Usage with these prompt, cached prompt, completion and reasoning
    tokens (no Usage object built; native/_usage.pyx `account_run` calls `account_c`, the same with C
    integers)."""
    cdef long long c[4]
    c[0] = c[1] = c[2] = c[3] = 0
    if not (_count_of(prompt, &c[0]) and _count_of(cached, &c[1]) and _count_of(completion, &c[2])
            and _count_of(reasoning, &c[3])):
        return False
    return bool(account_c(engine, request_id, c[0], c[1], c[2], c[3], response_model, NULL, NULL, 0))


cdef object _entry_of(object engine, str request_id):
    """The reservation book's entry of `request_id` when the engine and its book are of the classes
    account_c takes and the entry is one it reads (a tracked Reservation, or a 7-tuple); else None
    (expired, retired, duplicate, unadmitted: Engine.account's own branches)."""
    cdef object book, entries, entry
    if Engine is None:
        _bind()
    if type(engine) is not Engine or not request_id:
        return None
    book = _at(engine, ENGINE_BOOK)
    if type(book) is not ReservationBook:
        return None
    entries = _at(book, BOOK_ENTRIES)
    entry = (<Entries>entries)._get(request_id) if type(entries) is Entries else entries.get(request_id)
    if type(entry) is Reservation and not (<Reservation>entry).tracked:
        return None
    return entry


cdef bint _counted_prompt(object entry, long long* prompt):
    """charge_fields' prompt of a counted stream's Usage(source="estimated"): the reservation's estimate
    (StreamUsage's hint), as a C count; False when it is not one, when the entry holds no InFlight, or
    when it is 0 and the reservation kept the body (core/prompt_later.py estimates it then)."""
    if type(entry) is Reservation:
        hint, kept = (<Reservation>entry).prompt_tokens, (<Reservation>entry).body
    else:
        context = entry[6]
        if type(context) is not InFlight:
            return False
        hint, kept = context.prompt_tokens, context.body
    return _count_of(hint, prompt) and not (prompt[0] == 0 and kept is not None)


cdef int counted_ready(object engine, str request_id) except -1:
    """Whether account_c(counted=True) can take this request's entry, as far as it can tell before the
    count (native/_usage.pyx `_counted` runs the count only then): its engine, reservation, hint, stores
    and price table are of the kinds it takes (the price it looks up may still refuse it)."""
    cdef object entry, decider, local, policy
    cdef long long prompt
    entry = _entry_of(engine, request_id)
    if entry is None or not _counted_prompt(entry, &prompt):
        return 0
    specs = (<Reservation>entry).specs if type(entry) is Reservation else entry[1]
    if len(specs) > 62:
        return 0
    decider = _at(engine, ENGINE_DECIDER)
    if type(decider) is not Decider:
        return 0
    local = _at(decider, DECIDER_STORE)
    if type(local) is not LocalCounters or type(_at(local, LOCAL_STORE)) is not MemoryCounterStore:
        return 0
    policy = _at(engine, ENGINE_POLICY)
    return type(policy) is Policy and type(_at(policy, POLICY_PRICES)) is PriceTable


cdef int account_c(object engine, str request_id, long long prompt, long long cached, long long completion,
                   long long reasoning, object response_model, model_of_t model_of,
                   const unsigned char* body, Py_ssize_t body_n, bint none=False,
                   bint at_least=False, bint counted=False) except -1:
    """`account_counts` with C counts (each in [0, 2**53)); the response's model is `response_model`, or
    when `model_of` is given, `model_of(body, body_n)` (core/usage_records.document_model of the body),
    read only when the reservation names no model (the only case Engine.account uses it). 1 taken, 0 not
    (nothing changed).

    `none`: instead, Engine.account of `Usage(source="none")` (a response without usage: an error, or
    nothing read of it), which charge_fields charges accounting.error_charge_tokens of prompt (the counts
    given are ignored), under the source "none"; `at_least`: its keep_estimate (settle_parts keeps the
    larger of each reserved cost and the charge).

    `counted`: instead, Engine.account of a whole stream without a usage record whose completion was counted
    (`completion`; StreamUsage's `Usage(prompt_tokens=hint, completion_tokens=..., source="estimated")`,
    read, keep_estimate False): the prompt is the reservation's estimate (the hint; `prompt` is ignored),
    the ledger's source "counted"; not taken when that estimate is 0 and the reservation kept the body
    (charge_fields then estimates the prompt from it: core/prompt_later.py)."""
    cdef object book
    cdef str source
    cdef object context, entry, prices, priced, price, decider, local, ledger
    cdef object counter_ids, specs, costs, spec, kind, delta, rule, key, row, deltas
    cdef object entries
    cdef dict pending
    cdef double fcost, fceil
    cdef long long uncharged, cost, tokens, cached_c, r = 0
    cdef long long delta_c[62]
    cdef bint c_deltas
    cdef Py_ssize_t i, n
    cdef bint slot_released = False
    entry = _entry_of(engine, request_id)
    if entry is None:
        return 0
    if none:  # charge_fields of source "none": error_charge_tokens of prompt, nothing else
        if not _count_of(engine.settings.accounting.error_charge_tokens, &prompt):
            return 0
        cached = completion = reasoning = 0
    if not (0 <= prompt < MAX_COUNT and 0 <= cached < MAX_COUNT and 0 <= completion < MAX_COUNT
            and 0 <= reasoning < MAX_COUNT):
        return 0
    book = _at(engine, ENGINE_BOOK)  # (_entry_of checked both)
    entries = _at(book, BOOK_ENTRIES)
    if type(entry) is Reservation:  # the compiled lane's entry: its fields in place, no InFlight made
        c_key_id = (<Reservation>entry).key_id
        c_tenant = (<Reservation>entry).tenant
        c_model = (<Reservation>entry).model
        specs = (<Reservation>entry).specs
    else:
        context = entry[6]
        if type(context) is not InFlight:
            return 0
        c_key_id, c_tenant, c_model = context.key_id, context.tenant, context.model
        specs = entry[1]
    if counted:  # charge_fields of source "estimated": the hint (the reservation's prompt estimate) of prompt
        if not _counted_prompt(entry, &prompt):
            return 0
        cached = reasoning = 0
    if len(specs) > 62:  # the windows' bit mask in a C integer (as native/_fast.pyx)
        return 0
    decider = _at(engine, ENGINE_DECIDER)
    if type(decider) is not Decider:
        return 0
    local = _at(decider, DECIDER_STORE)
    if type(local) is not LocalCounters:
        return 0
    store = _at(local, LOCAL_STORE)
    if type(store) is not MemoryCounterStore:
        return 0
    policy = _at(engine, ENGINE_POLICY)
    if type(policy) is not Policy:
        return 0
    prices = _at(policy, POLICY_PRICES)
    if type(prices) is not PriceTable:
        return 0
    # charge_fields: the provider's record as reported, priced by the table's cached, matched rule
    if c_model:
        model = c_model
    else:
        model = model_of(body, body_n) if model_of is not NULL else response_model
    priced_any = len(<tuple>_at(prices, PRICES_ENTRIES)) > 0  # PriceTable.__bool__
    if priced_any:
        # PriceTable.charge: the cache first, else its look-up (which only fills the cache)
        cache = _at(prices, PRICES_CACHE)
        found = PyDict_GetItemWithError(cache, model) if type(cache) is dict else NULL
        priced = <object>found if found != NULL else prices.lookup(model)
        if type(priced) is not Priced:
            return 0
        price = _at(priced, PRICED_PRICE)
        if type(price) is not Price:
            return 0
        # pricing._cost, in the same double arithmetic (the counts are below 2**53: exact as doubles)
        cached_c = min(max(cached, 0), prompt)
        fcost = ((<double>(prompt - cached_c)) * <double>_at(price, PRICE_INPUT)
                 + (<double>cached_c) * <double>_at(price, PRICE_CACHED_INPUT)
                 + (<double>completion) * <double>_at(price, PRICE_OUTPUT))
        if not isfinite(fcost):
            return 0
        fceil = ceil(fcost)
        if not -<double>MAX_COUNT < fceil < <double>MAX_COUNT:
            return 0  # Engine.account's int of it
        cost = <long long>fceil
        rule = _at(priced, PRICED_RULE)
    else:
        cost, rule = 0, ""
    key_id = c_key_id
    tenant = c_tenant or ""
    model = model or "unknown"
    # -- from here on, state changes (Engine.account's order) --
    source = _NONE if none else _COUNTED if counted else _REPORTED  # the ledger's (accounting.ledger_source)
    _incr(_at(engine, ENGINE_ACCOUNTED), _NONE if none else _ESTIMATED if counted else _PROVIDER)
    if priced_any and not _at(priced, PRICED_MATCHED):  # PriceTable.charge counts an unpriced model
        prices._count(_at(priced, PRICED_OUTCOME))
    clock = _at(engine, ENGINE_CLOCK)
    now = _clock_call(clock, _TIME, _CLOCK_REALTIME)
    # ReservationBook.settle_parts
    if type(entries) is Entries:
        (<Entries>entries)._take(request_id)  # del entries[request_id], without the mapping protocol
    else:
        del entries[request_id]
    _put_at(book, BOOK_SETTLED, _plus(_at(book, BOOK_SETTLED), 1))
    if _at(book, BOOK_SETTLED_MAX):  # ReservationBook._mark_settled: SettledIds.add, its common case inline
        settled = _at(book, BOOK_SETTLED_IDS)
        if type(settled) is SettledIds:
            newest = _at(settled, IDS_NEWEST)
            if type(newest) is dict and len(<dict>newest) < <Py_ssize_t>_at(settled, IDS_CHUNK):
                (<dict>newest)[request_id] = None
            else:
                settled.add(request_id)
        else:
            settled.add(request_id)
    if type(entry) is Reservation:
        counter_ids = (<Reservation>entry).counter_ids
        costs = (<Reservation>entry).costs
        uncharged_o = (<Reservation>entry).uncharged
        charged_at = PyFloat_FromDouble((<Reservation>entry).charged_at)
    else:
        counter_ids, specs, costs, uncharged_o, charged_at, _, _ = entry
    n = len(specs)
    if n:
        uncharged = uncharged_o
        tokens = prompt + completion
        # settle_parts' deltas as C integers when every reserved cost is a Python int below 2**62
        c_deltas = True
        for i in range(n):
            delta_c[i] = 0
            kind = _kind(<object>specs[i])
            if kind is not _REQUESTS and not (uncharged >> i) & 1:
                reserved = costs[i]
                if not _small(reserved, &r):
                    c_deltas = False
                    break
                if kind is _CONCURRENCY:
                    delta_c[i] = -r
                    if r:  # a slot the proxy did not release early (Decider.adjust's count)
                        slot_released = True
                else:
                    delta_c[i] = (tokens if kind is _TOKENS else cost) - r
                    if at_least and delta_c[i] < 0:  # the reserved estimate stays charged
                        delta_c[i] = 0
        # Decider.adjust: the memory store's compiled adjust with the C deltas, else with their tuple
        adjust = _at(local, LOCAL_ADJUST_SOON)
        if (c_deltas and PyMethod_Check(adjust) and PyMethod_GET_FUNCTION(adjust) == <PyObject*>_ADJUST
                and PyMethod_GET_SELF(adjust) == <PyObject*>store):
            adjust_c(store, counter_ids, specs, delta_c, now, charged_at)
        else:
            slot_released = False
            deltas = PyTuple_New(n)  # settle_parts' deltas, built as the tuple Decider.adjust passes on
            for i in range(n):
                spec = specs[i]
                kind = _kind(spec)
                delta = _ZERO
                if kind is not _REQUESTS and not (uncharged >> i) & 1:
                    if kind is _CONCURRENCY:
                        delta = -costs[i]
                        if delta:  # a slot the proxy did not release early (Decider.adjust's count)
                            slot_released = True
                    else:
                        delta = _minus(tokens if kind is _TOKENS else cost, costs[i])
                        if at_least and delta < 0:
                            delta = _ZERO
                Py_INCREF(delta)
                PyTuple_SET_ITEM(deltas, i, delta)
            adjust(counter_ids, specs, deltas, now, charged_at)
        if slot_released:
            _incr(_at(decider, DECIDER_SLOT_RELEASES), _ACCESS_LOG)
        if _at(decider, DECIDER_SLOT_FREED) is not None:
            decider.slot_freed()
    # accounting.count_tokens_used
    if prompt or cached or completion:
        counts = _at(engine, ENGINE_USAGE_TOKENS)
        found = PyDict_GetItemWithError(_TOKEN_KEYS, model)
        if found == NULL:
            if len(_TOKEN_KEYS) >= _TOKEN_KEYS_MAX:
                _TOKEN_KEYS.clear()
            keys = _TOKEN_KEYS[model] = ((model, "prompt"), (model, "cached_prompt"), (model, "completion"))
        else:
            keys = <tuple>found
        if prompt:
            _add(counts, keys[0], prompt)
        if cached:
            _add(counts, keys[1], cached)
        if completion:
            _add(counts, keys[2], completion)
    # SQLiteLedger.record_usage: the update of a pending row it has (aggregate.add_usage); else its own call
    ledger = _at(engine, ENGINE_LEDGER)
    if ledger is not None:
        row = attrs = None
        if type(ledger) is SQLiteLedger:
            attrs = PyObject_GenericGetDict(ledger, NULL) if _LEDGER_DICT else None
            if not _attribute(ledger, attrs, _CLOSED):
                key = _ledger_key(key_id, tenant, model, now, source, rule)
                pending = _attribute(ledger, attrs, _PENDING)
                row = pending.get(key)
        if row is None:
            ledger.record_usage(
                key_id, tenant, model, now, prompt, cached, completion, reasoning, cost, source, rule
            )
        else:
            _row_add(row, 0, 1)
            if prompt:
                _row_add(row, 1, prompt)
            if cached:
                _row_add(row, 2, cached)
            if completion:
                _row_add(row, 3, completion)
            if reasoning:
                _row_add(row, 4, reasoning)
            if cost:
                _row_add(row, 5, cost)
            _row_add(row, 6, 1)
            found = PyDict_GetItemWithError(attrs, _RECORDED) if attrs is not None else NULL
            if found != NULL:
                PyDict_SetItem(attrs, _RECORDED, _plus(<object>found, 1))
            else:
                ledger._recorded += 1
    _taken.n += 1
    return 1
