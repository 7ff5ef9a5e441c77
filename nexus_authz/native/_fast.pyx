# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The common ext_authz check's flat path in C: admit, charge, reserve, count and answer in one call.

`on_message_complete` (installed on adapters/http_native.py's CompiledAuthzProtocol by `install`) is
adapters/http_fast.py's `on_message_complete` with `Decider.check_plain` and `FastAdmit.admit`
(core/fastpath.py) written into it: the key's HMAC look-up, the body's facts (the compiled reading), the
per-(key, model, path) `Plan` (the same cache, `FastAdmit._plans`), the costs, the prompt estimate, the
known-keys note, the counters' charge (the store's `acquire_nowait`: the compiled memory store's acquire),
the reservation's insert into the ReservationBook's OrderedDict, the early-release mark (shapes.near_limit),
the decision and latency counts, and the allow answer (the plan's cached header block, or its recipe's
with the key id spliced in, the compiled
rate-limit header lines, the release line and the tail joined in one buffer), with no Python frame on
the way for the common admitted request. Those pure functions stay the reference, line for line in the
same order; every step here says which one it mirrors.

What this code does not take returns, before any state is changed, to the pure flat path
(`Decider.check_plain`: headers that are not a dict, a book, known-keys record or failure store of another
class, more than 62 windows) or to the reference path (None: not the common request, exactly where
`FastAdmit.admit` says so); a refusal by the counters or a store that must be awaited goes on through
`Decider._finish` / `_check_later` as in `check_plain`. tests/adapters/test_http_fastpath.py compares the
bytes and the state this writes with the reference path's.

`data_received` (installed by `install_framing`) is the compiled protocol's read handler: AuthzProtocol's
timing of each read and CompiledAuthzProtocol._feed (the compiled parser, the httptools replay) in one
call, so a read holding one common check runs no Python frame from the transport's callback to its write
(tests/adapters/test_http_native.py compares it with the httptools protocol).

The Lua tap's `POST /_nexus/release` (`x-nexus-release: 1`, the request id as the body), which Envoy sends
for a request holding a concurrency slot, is answered by `_release` next to the check: AuthzProtocol's
`_route` / `_release` and Engine.release (ReservationBook.release, the proxy's release count,
Decider.apply on the local memory store) inline; what it does not take (the admin listener, another
store, ...) goes to the reference path before any state is changed (tests/adapters/test_http_release.py).
"""

from cpython cimport array as carray
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_AsDouble, PyFloat_FromDouble
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_FromDouble, PyLong_FromLongLong, PyLong_FromVoidPtr
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_New, PyTuple_SET_ITEM
from libc.math cimport ceil, isfinite
from libc.stdint cimport uint32_t
from libc.string cimport memcmp, memcpy, memset
from posix.time cimport CLOCK_THREAD_CPUTIME_ID, clock_gettime, timespec

from nexus_authz.native._body cimport facts_of
from nexus_authz.native._figures cimport Figure
from nexus_authz.native._headers cimport BLOCK_BYTES, figure_block
from nexus_authz.native._http1 cimport RequestParser
from nexus_authz.native._reservation cimport Entries, Reservation, new_reservation
from nexus_authz.native._windows cimport acquire_figures, figure_statuses

import math
import time as _time
from array import array as _array_type
from collections import OrderedDict

from nexus_authz.core import body as _core_body
from nexus_authz.core import ratelimit_headers as _core_headers
from nexus_authz.core.fastpath import FastAdmit, Plan
from nexus_authz.core.keys import MAX_KEY_LENGTH
from nexus_authz.core.known import REFRESH_AFTER, KnownKeys
from nexus_authz.core.model import Decision, InFlight, Reason, new_request
from nexus_authz.core.prompt_later import KEEP_BODY_BYTES, deferred_body
from nexus_authz.core.reservations import ReservationBook, settle_with
from nexus_authz.latency import ReasonCounts as _ReasonCounts
from nexus_authz.native._body import request_facts as _native_facts
from nexus_authz.native._headers import plan_header_block as _native_block
from nexus_authz.native._http1 import RequestParser as _Parser
from nexus_authz.native._http1 import direct_handler as _direct_handler
from nexus_authz.native._windows import acquire as _native_acquire

cdef extern from "Python.h":
    ctypedef struct PyTypeObject:
        object (*tp_alloc)(PyTypeObject* t, Py_ssize_t n)
    PyTypeObject* Py_TYPE(object o)
    Py_ssize_t Py_SIZE(object o)
    object PyUnicode_Substring(object s, Py_ssize_t start, Py_ssize_t end)
    bint PyUnicode_IS_ASCII(object o)
    void* PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    object PyUnicode_DecodeLatin1(const char* s, Py_ssize_t size, const char* errors)
    bint PyFloat_CheckExact(object o)
    bint PyLong_CheckExact(object o)
    bint PyTuple_CheckExact(object o)
    bint PyMethod_Check(object o)
    PyObject* PyMethod_GET_FUNCTION(object o)
    PyObject* PyMethod_GET_SELF(object o)
    int PyUnicode_KIND(object o)
    int PyUnicode_1BYTE_KIND
    object PyCapsule_New(void* pointer, const char* name, void* destructor)


cdef extern from *:
    """
    /* Objects/odictobject.c's node and the head of its object (CPython 3.5+): the first key of an
       OrderedDict without an iterator object. `_odict_layout` checks it at import; unused if it fails. */
    typedef struct _nx_odict_node {
        PyObject *key;
        Py_hash_t hash;
        struct _nx_odict_node *next;
        struct _nx_odict_node *prev;
    } _nx_odict_node;
    typedef struct { PyDictObject od_dict; _nx_odict_node *od_first; } _nx_odict;
    static PyObject *_nx_odict_first(PyObject *od) {
        _nx_odict_node *node = ((_nx_odict *)od)->od_first;
        return node ? node->key : NULL;
    }
    """
    PyObject* _nx_odict_first(object od)


include "_slots.pxi"
include "_clocks.pxi"


cdef bytes _PREFIX = b"/ext_authz/"  # set by install: EXT_AUTHZ_PREFIX + "/"
cdef Py_ssize_t _SKIP = 10  # len(EXT_AUTHZ_PREFIX): the path keeps its leading "/"
cdef bytes _TAIL = b"content-length: 0\r\n\r\n"
cdef bytes _RELEASE = b"x-nexus-release: "
cdef object _OK = Reason.OK
# the compiled parser (exactly that class): its fields read and its read handler called in C (_http1.pxd)
# the modules' namespaces: their attributes read as the module's getattr finds them (ModuleType defines none
# of these names), without its look-up on the type first
cdef dict _body_names = _core_body.__dict__
cdef dict _headers_names = _core_headers.__dict__


# -- a module's attribute, looked up again only when its namespace changed --------------------------------
# A dict's ma_version_tag (PEP 509; CPython 3.6-3.11 keep it, nonzero, new at every change of the dict): the
# value read last is read again while the tag is the one it was read under (one cache line, the dict's
# head, instead of a look-up's three or four: its keys, index and entry).
cdef extern from *:
    """
    static inline unsigned long long _nx_dict_tag(PyObject *d) {
    #if PY_VERSION_HEX < 0x030C0000
        return (unsigned long long)((PyDictObject *)d)->ma_version_tag;
    #else
        return 0;  /* 3.12+: deprecated and not kept up: always looked up */
    #endif
    }
    """
    unsigned long long _dict_tag "_nx_dict_tag"(dict d)


cdef struct Named:
    unsigned long long tag  # the namespace's tag the value was read under (0: never)
    PyObject* value  # a strong reference


cdef Named _READ_FACTS, _BUILD_BLOCK


# -- the last look-up in a dict again, while the dict has not changed -------------------------------------------
# The key snapshot's digests, the plans and the known keys are read per check and rarely written: the same
# key object (the digest, the owner, the address pair: the same objects when the request repeats) in the
# same unchanged dict (its ma_version_tag) has the same value, without the look-up's lines.
cdef struct Memo:
    # The dict is not held: it is only compared by address, and a tag is never given twice (3.11 takes each
    # new dict's and each change's tag from one global counter), so a dict freed and another made at its
    # address cannot match. Holding it would keep a replaced key snapshot (every record of it) alive until
    # the next check, which an idle sidecar may not see for hours after a reload.
    PyObject* d  # borrowed, never dereferenced (NULL: nothing remembered)
    PyObject* key  # strong references: a key object's address must not be reused while remembered
    PyObject* value  # NULL: the key was missing
    unsigned long long tag


cdef Memo _KEY_MEMO, _PLAN_MEMO, _SEEN_MEMO


cdef inline object _memo_get(dict d, object key, Memo* m):
    """d.get(key), the value remembered for that same dict and key object while the dict is unchanged."""
    cdef unsigned long long tag = _dict_tag(d)
    if tag != 0 and m.tag == tag and m.d == <PyObject*>d and m.key == <PyObject*>key:
        return <object>m.value if m.value != NULL else None
    return _memo_again(d, key, m, tag)


cdef object _memo_again(dict d, object key, Memo* m, unsigned long long tag):
    value = d.get(key)
    Py_INCREF(key)
    Py_XDECREF(m.key)
    Py_XDECREF(m.value)
    m.d = <PyObject*>d
    m.key = <PyObject*>key
    if value is None:
        m.value = NULL
    else:
        Py_INCREF(value)
        m.value = <PyObject*>value
    m.tag = tag
    return value


def memo_get(d, key, int which):
    """`_memo_get` (tests): which 0, 1, 2 = the key snapshot's, the plans', the known keys' memo."""
    return _memo_get(d, key, &_KEY_MEMO if which == 0 else &_PLAN_MEMO if which == 1 else &_SEEN_MEMO)


cdef inline object _named(dict names, Named* cached, str name):
    """names[name] (KeyError as a look-up), the last value again while `names` has not changed."""
    cdef unsigned long long tag = _dict_tag(names)
    if tag != 0 and tag == cached.tag:
        return <object>cached.value
    return _named_again(names, cached, name, tag)


cdef object _named_again(dict names, Named* cached, str name, unsigned long long tag):
    value = names[name]
    Py_INCREF(value)
    Py_XDECREF(cached.value)
    cached.value = <PyObject*>value
    cached.tag = tag
    return value
cdef Py_ssize_t _OK_INDEX = list(Reason).index(Reason.OK)  # its place in a ReasonCounts' array
cdef object _ONE = 1
cdef object _UNAVAILABLE = Reason.UNAVAILABLE
cdef object _InFlight = InFlight  # a NamedTuple: a tuple subtype of 5 items, no __dict__
cdef Py_ssize_t _MAX_KEY = MAX_KEY_LENGTH
cdef Py_ssize_t _KEEP = KEEP_BODY_BYTES
cdef double _REFRESH = REFRESH_AFTER
cdef int _MAX_WINDOWS = 62  # the masks (uncharged, settle, slot) fit a C long long

# set by install (adapters/http_native.py): the reference protocol's on_message_complete, the 500 answer,
# the HTTP log, the failure store's class (stores/memory.py), http_fast.allow_answer and .plan_wire
cdef object _reference = None
cdef object _allow_answer = None
cdef object _plan_wire = None
cdef object _internal_error = None
cdef object _log = None
cdef object _failure_store = None
cdef object _reference_feed = None
cdef object _busy = None
# set by _slots (install_framing): the Lua tap's release (http_authz.RELEASE_PATH, its 204 answer
# http_authz._RELEASED), the classes `_release` takes, shapes.shape_of and its cache
# the header names the lane reads: the very str objects the headers dicts' keys are (http_authz._KEEP's,
# which both parsers key by, set by `_slots`), so a look-up finds its entry by identity, not by comparing text
cdef str H_AUTHORIZATION = "authorization"
cdef str H_X_API_KEY = "x-api-key"
cdef str H_API_KEY = "api-key"
cdef str H_CONTENT_TYPE = "content-type"
cdef str H_CONTENT_ENCODING = "content-encoding"
cdef str H_PARTIAL_BODY = "x-envoy-auth-partial-body"
cdef str H_DECLARED = "x-nexus-content-length"
cdef str H_FORWARDED_FOR = "x-forwarded-for"
cdef str H_REQUEST_ID = "x-request-id"
cdef bytes _RELEASE_URL = None
cdef bytes _RELEASED_ANSWER = None
cdef object _Engine = None
cdef object _Decider = None
cdef object _LocalCounters = None
cdef object _MemoryStore = None
cdef object _shape_of = None
cdef dict _SHAPES = None

# the last request's target and its path (one str per distinct target, not per request: the compiled
# parser hands over the same bytes object for a repeated target), and the last Authorization value's digest
# under the last hasher (the parser hands over the same str when a connection's key repeats)
cdef object _last_url = None
cdef object _last_path = None
cdef object _last_auth = None
cdef object _last_hasher = None
cdef object _last_digest = None


def _odict_layout():
    """Whether `_nx_odict_first` reads this interpreter's OrderedDict as next(iter(od)) does."""
    od = OrderedDict()
    if _nx_odict_first(od) != NULL:
        return False
    probe = [("a", 1), ("b", 2), ("c", 3), ("d", 4)]
    for k, v in probe:
        od[k] = v
    steps = [lambda: None, lambda: od.pop("a"), lambda: od.move_to_end("b"), lambda: od.popitem(last=False),
             lambda: od.__setitem__("e", 5), lambda: od.move_to_end("e", last=False), lambda: od.pop("e")]
    for step in steps:
        step()
        if not od or _nx_odict_first(od) == NULL or <object>_nx_odict_first(od) is not next(iter(od)):
            return False
    return True


cdef bint _ODICT_FIRST = _odict_layout()


# -- attributes read straight from their slots ---------------------------------------------------------------
# Every object the lane reads per request is of a __slots__ class. `getattr` finds a slot through the type's
# method cache and its member descriptor (three or four cache lines, cold at real request rates) before it
# reaches the instance; `_at` reads the instance's slot at the descriptor's offset, found once by `_slots`
# (called from `install`), when the object is exactly of that class, and is `getattr` otherwise (another
# class, a subclass, an empty slot: the same value or the same AttributeError).
# `_at` is C, inlined at each of its ~100 call sites (gcc would not inline it: a call per read, with its
# `name` loaded from the module's string table, a cache line of names, even when the slot is read) and its
# getattr out of line (cold: laid out apart from the hot path): the lane reads the Slot and the object only.
cdef extern from *:
    """
    typedef struct { PyTypeObject *cls; Py_ssize_t offset; } _nx_slot;
    #define _nx_float_set(o, value) (((PyFloatObject *)(o))->ob_fval = (value))

    /* getattr(o, name) for an attribute o's class defines as a plain value (no descriptor) on instances without a __dict__ and with the generic getattr: remembered with the
       class's version tag, which CPython changes (or zeroes) whenever the class or a base is modified, as
       its own method cache does; anything else: getattr, every time. */
    typedef struct { PyTypeObject *type; unsigned int tag; PyObject *value; } _nx_cattr;
    static __attribute__((noinline, cold)) PyObject *_nx_class_attr_slow(PyObject *o, _nx_cattr *c, PyObject *name) {
        PyTypeObject *t = Py_TYPE(o);
        PyObject *v = PyObject_GetAttr(o, name);
        if (v == NULL)
            return NULL;
        if (t->tp_getattro == PyObject_GenericGetAttr && t->tp_dictoffset == 0) {
            PyObject *found = _PyType_Lookup(t, name);  /* borrowed; gives the class a version tag */
            if (found == v && Py_TYPE(found)->tp_descr_get == NULL && t->tp_version_tag != 0
    #ifdef Py_TPFLAGS_VALID_VERSION_TAG
                && (t->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG)
    #endif
            ) {
                Py_INCREF(t);
                Py_INCREF(v);
                Py_XDECREF((PyObject *)c->type);
                Py_XDECREF(c->value);
                c->type = t;
                c->tag = t->tp_version_tag;
                c->value = v;
            }
        }
        return v;
    }
    static inline __attribute__((always_inline)) PyObject *_nx_class_attr(PyObject *o, _nx_cattr *c, PyObject *name) {
        PyTypeObject *t = Py_TYPE(o);
        if (t == c->type && c->tag != 0 && t->tp_version_tag == c->tag
    #ifdef Py_TPFLAGS_VALID_VERSION_TAG
            && (t->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG)
    #endif
        ) {
            Py_INCREF(c->value);
            return c->value;
        }
        return _nx_class_attr_slow(o, c, name);
    }  /* cls NULL: not resolved (getattr) */
    static __attribute__((noinline, cold)) PyObject *_nx_getattr(PyObject *obj, PyObject *name) {
        return PyObject_GetAttr(obj, name);
    }
    static inline __attribute__((always_inline)) PyObject *_nx_at(PyObject *obj, _nx_slot *s, PyObject *name) {
        if (Py_TYPE(obj) == s->cls) {
            PyObject *value = *(PyObject **)((char *)obj + s->offset);
            if (value != NULL) {
                Py_INCREF(value);
                return value;
            }
        }
        return _nx_getattr(obj, name);
    }
    """
    Py_ssize_t _refcount "Py_REFCNT"(object o)
    void _float_set "_nx_float_set"(object o, double value)
    ctypedef struct ClassAttr "_nx_cattr":
        PyTypeObject* type
        unsigned int tag
        PyObject* value
    object _class_attr "_nx_class_attr"(object obj, ClassAttr* c, str name)
    ctypedef struct Slot "_nx_slot":
        PyTypeObject* cls
        Py_ssize_t offset
    object _at "_nx_at"(object obj, Slot* s, str name)


cdef ClassAttr _FAST_PATH  # the protocol's class attribute fast_path


cdef inline int _set(object obj, Slot* s, str name, object value) except -1:
    """setattr(obj, name, value), in place as `_at` reads."""
    if Py_TYPE(obj) == s.cls:
        _slot_store(obj, s.offset, value)
        return 0
    setattr(obj, name, value)
    return 0


cdef inline object _item(object obj, PyTypeObject* cls, Py_ssize_t index, str name):
    """A NamedTuple's field (its item) when `obj` is exactly that class, else getattr."""
    if Py_TYPE(obj) == cls:
        return <object>PyTuple_GET_ITEM(obj, index)
    return getattr(obj, name)


cdef Slot _resolve(type cls, str name):
    """Slot of `cls`'s field `name`: a member descriptor of an object slot (T_OBJECT_EX), found on the MRO as
    getattr finds it (a class attribute or a property: unresolved)."""
    cdef Slot s
    cdef Py_ssize_t offset = _slot_offset(cls, name)
    s.cls = <PyTypeObject*>cls if offset >= 0 else NULL
    s.offset = offset if offset >= 0 else 0
    if s.cls == NULL:
        _unresolved.append(f"{cls.__name__}.{name}")
    return s


def header_names():
    """The header names the lane looks up (after `install_framing`: http_authz._KEEP's own objects)."""
    return (
        H_AUTHORIZATION, H_X_API_KEY, H_API_KEY, H_CONTENT_TYPE, H_CONTENT_ENCODING, H_PARTIAL_BODY, H_DECLARED,
        H_FORWARDED_FOR, H_REQUEST_ID,
    )


def unresolved():
    """The fields `_at` reads through getattr after `install_framing` (none: tests/adapters/test_http_fastpath)."""
    return list(_unresolved)


cdef list _unresolved = []
cdef list _pinned = []  # the classes resolved (kept alive: their addresses are compared)
cdef Slot S_PROTO_APP, S_PROTO_PARSER, S_PROTO_URL, S_PROTO_CLOSING, S_PROTO_OUTBOX, S_PROTO_TRANSPORT
cdef Slot S_PROTO_HEADERS, S_PROTO_BODY, S_PROTO_FAST, S_PROTO_SLOW, S_PROTO_IN_MESSAGE, S_PROTO_LAST_ACTIVE
cdef Slot S_APP_DRAINING, S_APP_ADMIN, S_APP_ENGINE, S_APP_LOOP
cdef Slot S_ENGINE_DECIDER, S_ENGINE_POLICY, S_ENGINE_SNAPSHOT
cdef Slot S_DEC_FAST, S_DEC_CLOCK, S_DEC_FAILURES, S_DEC_BOOK, S_DEC_STORE, S_DEC_DECISIONS, S_DEC_LATENCY
cdef Slot S_FAST_POLICY, S_FAST_SNAPSHOT, S_FAST_PLANS
cdef Slot S_POL_AUTH, S_POL_KNOWN, S_POL_TRACK, S_POL_MAX_TOKENS
cdef Slot S_SNAP_HASHER, S_SNAP_DIGEST
cdef Slot S_KEY_DISABLED, S_KEY_EXPIRES, S_KEY_NEEDS_FACTS, S_KEY_MODELS, S_KEY_ID, S_KEY_TENANT
cdef Slot S_KEY_RECIPE, S_KEY_SCOPED, S_KEY_LIMITS, S_KEY_PATHS, S_KEY_PATH_RULE, S_KEY_MODEL_RULE
cdef Slot S_KEY_REMOVE, S_KEY_COUNTER_IDS, S_PLAN_SOURCE
cdef Slot S_PLAN_USABLE, S_PLAN_SPECS, S_PLAN_COST_INDEX, S_PLAN_METERED, S_PLAN_COMPLETES, S_PLAN_PRICE
cdef Slot S_PLAN_COUNTER_IDS, S_PLAN_SHAPE, S_PLAN_WIRE, S_PLAN_MODEL, S_PLAN_PATH
cdef Slot S_STORE_ACQUIRE, S_RESULT_ALLOWED, S_RESULT_STATUSES, S_RESULT_UNCHARGED
cdef Slot S_BOOK_ENTRIES, S_BOOK_TTL, S_BOOK_MAX, S_KNOWN_SEEN, S_HIST_BOUNDS, S_HIST_COUNTS, S_HIST_SUM
cdef Slot S_STATUS_REMAINING, S_STATUS_LIMIT
cdef Slot S_FACTS_PROBLEM, S_FACTS_MODEL, S_FACTS_PROMPT, S_FACTS_N, S_FACTS_MAX_TOKENS
cdef Slot S_PRICE_INPUT, S_PRICE_CACHED, S_PRICE_OUTPUT
cdef Slot S_ENGINE_BOOK, S_ENGINE_CLOCK, S_DEC_RELEASES, S_DEC_FREED, S_STORE_ADJUST, S_STORE_STORE
cdef Slot S_COUNTS_COUNTS, S_MEM_STATES, S_MEM_HELD
cdef PyTypeObject* _SHAPE = NULL
cdef Py_ssize_t I_SETTLE_MASK = 0, I_SLOT_MASK = 0, I_SLOT_INDICES = 0, I_HEADERS = 0, I_SPECS = 0


cdef int _slots(type protocol) except -1:
    """Resolve the slots `_at` reads (the protocol's class is the compiled protocol's)."""
    global S_PROTO_APP, S_PROTO_PARSER, S_PROTO_URL, S_PROTO_CLOSING, S_PROTO_OUTBOX, S_PROTO_TRANSPORT
    global S_PROTO_HEADERS, S_PROTO_BODY, S_PROTO_FAST, S_PROTO_SLOW, S_PROTO_IN_MESSAGE, S_PROTO_LAST_ACTIVE
    global S_APP_DRAINING, S_APP_ADMIN, S_APP_ENGINE, S_APP_LOOP
    global S_ENGINE_DECIDER, S_ENGINE_POLICY, S_ENGINE_SNAPSHOT
    global S_DEC_FAST, S_DEC_CLOCK, S_DEC_FAILURES, S_DEC_BOOK, S_DEC_STORE, S_DEC_DECISIONS, S_DEC_LATENCY
    global S_FAST_POLICY, S_FAST_SNAPSHOT, S_FAST_PLANS
    global S_POL_AUTH, S_POL_KNOWN, S_POL_TRACK, S_POL_MAX_TOKENS
    global S_SNAP_HASHER, S_SNAP_DIGEST
    global S_KEY_DISABLED, S_KEY_EXPIRES, S_KEY_NEEDS_FACTS, S_KEY_MODELS, S_KEY_ID, S_KEY_TENANT
    global S_KEY_RECIPE, S_KEY_SCOPED, S_KEY_LIMITS, S_KEY_PATHS, S_KEY_PATH_RULE, S_KEY_MODEL_RULE
    global S_KEY_REMOVE, S_KEY_COUNTER_IDS, S_PLAN_SOURCE
    global S_PLAN_USABLE, S_PLAN_SPECS, S_PLAN_COST_INDEX, S_PLAN_METERED, S_PLAN_COMPLETES, S_PLAN_PRICE
    global S_PLAN_COUNTER_IDS, S_PLAN_SHAPE, S_PLAN_WIRE, S_PLAN_MODEL, S_PLAN_PATH
    global S_STORE_ACQUIRE, S_RESULT_ALLOWED, S_RESULT_STATUSES, S_RESULT_UNCHARGED
    global S_BOOK_ENTRIES, S_BOOK_TTL, S_BOOK_MAX, S_KNOWN_SEEN, S_HIST_BOUNDS, S_HIST_COUNTS, S_HIST_SUM
    global S_STATUS_REMAINING, S_STATUS_LIMIT
    global S_FACTS_PROBLEM, S_FACTS_MODEL, S_FACTS_PROMPT, S_FACTS_N, S_FACTS_MAX_TOKENS
    global S_PRICE_INPUT, S_PRICE_CACHED, S_PRICE_OUTPUT
    global S_ENGINE_BOOK, S_ENGINE_CLOCK, S_DEC_RELEASES, S_DEC_FREED, S_STORE_ADJUST, S_STORE_STORE
    global S_COUNTS_COUNTS, S_MEM_STATES, S_MEM_HELD
    global _SHAPE, I_SETTLE_MASK, I_SLOT_MASK, I_SLOT_INDICES, I_HEADERS, I_SPECS
    global _RELEASE_URL, _RELEASED_ANSWER, _Engine, _Decider, _LocalCounters, _MemoryStore, _shape_of, _SHAPES
    global H_AUTHORIZATION, H_X_API_KEY, H_API_KEY, H_CONTENT_TYPE, H_CONTENT_ENCODING, H_PARTIAL_BODY
    global H_DECLARED, H_FORWARDED_FOR, H_REQUEST_ID
    from nexus_authz.adapters.http_authz import _KEEP, _RELEASED, RELEASE_PATH, HttpApp
    kept = {key: key for key in _KEEP.values()}  # each name's own object (an equal str where not kept)
    H_AUTHORIZATION = kept.get(H_AUTHORIZATION, H_AUTHORIZATION)
    H_X_API_KEY = kept.get(H_X_API_KEY, H_X_API_KEY)
    H_API_KEY = kept.get(H_API_KEY, H_API_KEY)
    H_CONTENT_TYPE = kept.get(H_CONTENT_TYPE, H_CONTENT_TYPE)
    H_CONTENT_ENCODING = kept.get(H_CONTENT_ENCODING, H_CONTENT_ENCODING)
    H_PARTIAL_BODY = kept.get(H_PARTIAL_BODY, H_PARTIAL_BODY)
    H_DECLARED = kept.get(H_DECLARED, H_DECLARED)
    H_FORWARDED_FOR = kept.get(H_FORWARDED_FOR, H_FORWARDED_FOR)
    H_REQUEST_ID = kept.get(H_REQUEST_ID, H_REQUEST_ID)
    from nexus_authz.core import shapes
    from nexus_authz.core.body import RequestFacts
    from nexus_authz.core.config import Price
    from nexus_authz.core.keys import KeySnapshot
    from nexus_authz.core.limits import AcquireResult, WindowStatus
    from nexus_authz.core.model import KeyRecord
    from nexus_authz.core.policy import Policy
    from nexus_authz.core.shapes import Shape
    from nexus_authz.decide import Decider
    from nexus_authz.engine import Engine
    from nexus_authz.latency import LatencyHistogram
    from nexus_authz.stores.base import LocalCounters
    from nexus_authz.stores.memory import MemoryCounterStore

    _pinned.extend((protocol, HttpApp, KeySnapshot, AcquireResult, WindowStatus, KeyRecord, Policy, Shape))
    _pinned.extend((Decider, Engine, LatencyHistogram, LocalCounters, RequestFacts, Price, MemoryCounterStore))
    _pinned.append(_ReasonCounts)
    S_PROTO_APP = _resolve(protocol, "_app")
    S_PROTO_PARSER = _resolve(protocol, "_parser")
    S_PROTO_URL = _resolve(protocol, "_url")
    S_PROTO_CLOSING = _resolve(protocol, "_closing")
    S_PROTO_OUTBOX = _resolve(protocol, "_outbox")
    S_PROTO_TRANSPORT = _resolve(protocol, "_transport")
    S_PROTO_HEADERS = _resolve(protocol, "_headers")
    S_PROTO_BODY = _resolve(protocol, "_body")
    S_PROTO_FAST = _resolve(protocol, "_fast")
    S_PROTO_SLOW = _resolve(protocol, "_slow")
    S_PROTO_IN_MESSAGE = _resolve(protocol, "_in_message")
    S_PROTO_LAST_ACTIVE = _resolve(protocol, "last_active")
    S_APP_DRAINING = _resolve(HttpApp, "draining")
    S_APP_ADMIN = _resolve(HttpApp, "admin")
    S_APP_ENGINE = _resolve(HttpApp, "engine")
    S_APP_LOOP = _resolve(HttpApp, "loop")
    S_ENGINE_DECIDER = _resolve(Engine, "decider")
    S_ENGINE_POLICY = _resolve(Engine, "policy")
    S_ENGINE_SNAPSHOT = _resolve(Engine, "snapshot")
    S_DEC_FAST = _resolve(Decider, "_fast")
    S_DEC_CLOCK = _resolve(Decider, "clock")
    S_DEC_FAILURES = _resolve(Decider, "failures")
    S_DEC_BOOK = _resolve(Decider, "book")
    S_DEC_STORE = _resolve(Decider, "store")
    S_DEC_DECISIONS = _resolve(Decider, "decisions")
    S_DEC_LATENCY = _resolve(Decider, "latency")
    S_FAST_POLICY = _resolve(FastAdmit, "policy")
    S_FAST_SNAPSHOT = _resolve(FastAdmit, "snapshot")
    S_FAST_PLANS = _resolve(FastAdmit, "_plans")
    S_POL_AUTH = _resolve(Policy, "_auth_spec")
    S_POL_KNOWN = _resolve(Policy, "_known")
    S_POL_TRACK = _resolve(Policy, "track")
    S_POL_MAX_TOKENS = _resolve(Policy, "_default_max_tokens")
    S_SNAP_HASHER = _resolve(KeySnapshot, "hasher")
    S_SNAP_DIGEST = _resolve(KeySnapshot, "by_digest")
    S_KEY_DISABLED = _resolve(KeyRecord, "disabled")
    S_KEY_EXPIRES = _resolve(KeyRecord, "expires_at")
    S_KEY_NEEDS_FACTS = _resolve(KeyRecord, "needs_facts")
    S_KEY_MODELS = _resolve(KeyRecord, "models")
    S_KEY_ID = _resolve(KeyRecord, "key_id")
    S_KEY_TENANT = _resolve(KeyRecord, "tenant")
    S_KEY_RECIPE = _resolve(KeyRecord, "recipe")
    S_KEY_SCOPED = _resolve(KeyRecord, "model_scoped")
    S_KEY_LIMITS = _resolve(KeyRecord, "limits")
    S_KEY_PATHS = _resolve(KeyRecord, "paths")
    S_KEY_PATH_RULE = _resolve(KeyRecord, "path_rule")
    S_KEY_MODEL_RULE = _resolve(KeyRecord, "model_rule")
    S_KEY_REMOVE = _resolve(KeyRecord, "remove_headers")
    S_KEY_COUNTER_IDS = _resolve(KeyRecord, "counter_ids")  # (unset until read: then the recipe makes them)
    S_PLAN_SOURCE = _resolve(Plan, "source")
    S_PLAN_USABLE = _resolve(Plan, "usable")
    S_PLAN_SPECS = _resolve(Plan, "specs")
    S_PLAN_COST_INDEX = _resolve(Plan, "cost_index")
    S_PLAN_METERED = _resolve(Plan, "metered")
    S_PLAN_COMPLETES = _resolve(Plan, "completes")
    S_PLAN_PRICE = _resolve(Plan, "price")
    S_PLAN_COUNTER_IDS = _resolve(Plan, "counter_ids")
    S_PLAN_SHAPE = _resolve(Plan, "shape")
    S_PLAN_WIRE = _resolve(Plan, "wire")
    S_PLAN_MODEL = _resolve(Plan, "model")
    S_PLAN_PATH = _resolve(Plan, "path")
    S_STORE_ACQUIRE = _resolve(LocalCounters, "acquire_nowait")
    S_RESULT_ALLOWED = _resolve(AcquireResult, "allowed")
    S_RESULT_STATUSES = _resolve(AcquireResult, "statuses")
    S_RESULT_UNCHARGED = _resolve(AcquireResult, "uncharged")
    S_BOOK_ENTRIES = _resolve(ReservationBook, "_entries")
    S_BOOK_TTL = _resolve(ReservationBook, "_ttl")
    S_BOOK_MAX = _resolve(ReservationBook, "_max")
    S_KNOWN_SEEN = _resolve(KnownKeys, "_seen")
    S_HIST_BOUNDS = _resolve(LatencyHistogram, "bounds")
    S_HIST_COUNTS = _resolve(LatencyHistogram, "counts")
    S_HIST_SUM = _resolve(LatencyHistogram, "sum")
    S_STATUS_REMAINING = _resolve(WindowStatus, "remaining")
    S_STATUS_LIMIT = _resolve(WindowStatus, "limit")
    S_FACTS_PROBLEM = _resolve(RequestFacts, "problem")
    S_FACTS_MODEL = _resolve(RequestFacts, "model")
    S_FACTS_PROMPT = _resolve(RequestFacts, "prompt_tokens")
    S_FACTS_N = _resolve(RequestFacts, "n")
    S_FACTS_MAX_TOKENS = _resolve(RequestFacts, "max_tokens")
    S_PRICE_INPUT = _resolve(Price, "input")
    S_PRICE_CACHED = _resolve(Price, "cached_input")
    S_PRICE_OUTPUT = _resolve(Price, "output")
    fields = Shape._fields
    I_SETTLE_MASK = fields.index("settle_mask")
    I_SLOT_MASK = fields.index("slot_mask")
    I_SLOT_INDICES = fields.index("slot_indices")
    I_HEADERS = fields.index("headers")
    I_SPECS = fields.index("specs")
    _SHAPE = <PyTypeObject*>Shape
    S_ENGINE_BOOK = _resolve(Engine, "book")
    S_ENGINE_CLOCK = _resolve(Engine, "_clock")
    S_DEC_RELEASES = _resolve(Decider, "slot_releases")
    S_DEC_FREED = _resolve(Decider, "_slot_freed")
    S_STORE_ADJUST = _resolve(LocalCounters, "adjust_soon")
    S_STORE_STORE = _resolve(LocalCounters, "store")
    S_COUNTS_COUNTS = _resolve(<type>_ReasonCounts, "counts")  # (an ABCMeta instance)
    S_MEM_STATES = _resolve(MemoryCounterStore, "_states")
    S_MEM_HELD = _resolve(MemoryCounterStore, "_held")
    _Engine, _Decider, _LocalCounters, _MemoryStore = Engine, Decider, LocalCounters, MemoryCounterStore
    _shape_of = shapes.shape_of
    _SHAPES = shapes._SHAPES
    _RELEASE_URL = RELEASE_PATH.encode("latin-1")
    _RELEASED_ANSWER = _RELEASED
    return 0


# -- HMAC-SHA256 (keys.KeyHasher) in C: FIPS 180-4's SHA-256 on the two pad states, with no hashlib object,
# OpenSSL context or intermediate bytes per request; the states are derived once per hasher (`_pads`)
cdef uint32_t _K[64]
for _i, _k in enumerate((
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
)):
    _K[_i] = _k
cdef uint32_t _IV[8]
for _i, _k in enumerate((
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19
)):
    _IV[_i] = _k
cdef object _pads_of = None  # the hasher whose pad states are below (held: its id is not reused)
cdef uint32_t _inner_state[8]
cdef uint32_t _outer_state[8]


cdef inline uint32_t _rotr(uint32_t x, int n) noexcept nogil:
    return (x >> n) | (x << (32 - n))


cdef extern from "_sha_ni.h":
    int nx_sha_ni_supported() noexcept nogil
    void nx_sha256_block_ni(uint32_t* state, const unsigned char* block, const uint32_t* k) noexcept nogil

cdef bint _CPU_SHA = nx_sha_ni_supported()  # the CPU has the SHA extensions (native/_sha_ni.h)
cdef bint _SHA_NI = _CPU_SHA  # _compress uses them


def sha_ni(enable=None):
    """Whether the keyed hash's SHA-256 uses the CPU's SHA extensions; `enable` False (tests: the portable
    code on the same machine) or True (only where the CPU has them) chooses first."""
    global _SHA_NI
    if enable is not None:
        _SHA_NI = bool(enable) and _CPU_SHA
    return _SHA_NI


cdef inline void _compress(uint32_t* state, const unsigned char* block) noexcept nogil:
    """One SHA-256 block into `state`: with the SHA extensions where the CPU has them (~150 instructions
    instead of ~4,000)."""
    if _SHA_NI:
        nx_sha256_block_ni(state, block, _K)
    else:
        _compress_c(state, block)


cdef void _compress_c(uint32_t* state, const unsigned char* block) noexcept nogil:
    """One SHA-256 block into `state` (portable C)."""
    cdef uint32_t w[64]
    cdef uint32_t a, b, c, d, e, f, g, h, t1, t2
    cdef int i
    for i in range(16):
        w[i] = (
            (<uint32_t>block[4 * i] << 24) | (<uint32_t>block[4 * i + 1] << 16)
            | (<uint32_t>block[4 * i + 2] << 8) | <uint32_t>block[4 * i + 3]
        )
    for i in range(16, 64):
        w[i] = (
            w[i - 16] + (_rotr(w[i - 15], 7) ^ _rotr(w[i - 15], 18) ^ (w[i - 15] >> 3))
            + w[i - 7] + (_rotr(w[i - 2], 17) ^ _rotr(w[i - 2], 19) ^ (w[i - 2] >> 10))
        )
    a, b, c, d, e, f, g, h = state[0], state[1], state[2], state[3], state[4], state[5], state[6], state[7]
    for i in range(64):
        t1 = h + (_rotr(e, 6) ^ _rotr(e, 11) ^ _rotr(e, 25)) + ((e & f) ^ (~e & g)) + _K[i] + w[i]
        t2 = (_rotr(a, 2) ^ _rotr(a, 13) ^ _rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))
        h = g
        g = f
        f = e
        e = d + t1
        d = c
        c = b
        b = a
        a = t1 + t2
    state[0] += a
    state[1] += b
    state[2] += c
    state[3] += d
    state[4] += e
    state[5] += f
    state[6] += g
    state[7] += h


cdef void _finish(uint32_t* state, const unsigned char* data, Py_ssize_t n, unsigned long long prefix,
                  unsigned char* out) noexcept nogil:
    """Hash the n bytes at `data` after `prefix` bytes already in `state` (whole blocks); the 32-byte digest
    to `out`."""
    cdef unsigned char block[64]
    cdef Py_ssize_t rest
    cdef unsigned long long bits = (prefix + <unsigned long long>n) * 8
    cdef int i
    while n >= 64:
        _compress(state, data)
        data += 64
        n -= 64
    rest = n
    memcpy(block, data, rest)
    block[rest] = 0x80
    if rest + 1 > 56:
        memset(block + rest + 1, 0, 63 - rest)
        _compress(state, block)
        memset(block, 0, 56)
    else:
        memset(block + rest + 1, 0, 55 - rest)
    for i in range(8):
        block[56 + i] = <unsigned char>(bits >> (56 - 8 * i))
    _compress(state, block)
    for i in range(8):
        out[4 * i] = <unsigned char>(state[i] >> 24)
        out[4 * i + 1] = <unsigned char>(state[i] >> 16)
        out[4 * i + 2] = <unsigned char>(state[i] >> 8)
        out[4 * i + 3] = <unsigned char>state[i]


cdef int _pads(object hasher) except -1:
    """The inner and outer pad states of keys.KeyHasher `hasher` (its padded 64-byte key, `_pad`)."""
    global _pads_of
    cdef bytes key = hasher._pad
    cdef unsigned char block[64]
    cdef int i
    if PyBytes_GET_SIZE(key) != 64:
        raise ValueError("KeyHasher._pad is not 64 bytes")
    for i in range(64):
        block[i] = (<const unsigned char*>PyBytes_AS_STRING(key))[i] ^ 0x36
    memcpy(_inner_state, _IV, sizeof(_IV))
    _compress(_inner_state, block)
    for i in range(64):
        block[i] = (<const unsigned char*>PyBytes_AS_STRING(key))[i] ^ 0x5C
    memcpy(_outer_state, _IV, sizeof(_IV))
    _compress(_outer_state, block)
    _pads_of = hasher
    return 0


cdef bytes _hmac(object hasher, const unsigned char* secret, Py_ssize_t n):
    """keys.KeyHasher.__call__ of the ASCII secret at `secret` (its UTF-8 bytes are its bytes)."""
    cdef uint32_t state[8]
    cdef unsigned char inner[32]
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 32)
    if hasher is not _pads_of:
        _pads(hasher)
    memcpy(state, _inner_state, sizeof(state))
    _finish(state, secret, n, 64, inner)
    memcpy(state, _outer_state, sizeof(state))
    _finish(state, inner, 32, 64, <unsigned char*>PyBytes_AS_STRING(out))
    return out


cdef tuple _last_costs = ()


cdef tuple _costs(tuple cost_index, Py_ssize_t n, object tokens, object usd):
    """shapes.costs_of: (1, tokens, usd)[cost_index[i]] for each window; the last request's tuple again
    when its items are the same ints (a tuple is only read: the charge and the reservation keep it)."""
    global _last_costs
    cdef tuple last = _last_costs
    cdef bint same = PyTuple_GET_SIZE(last) == n
    cdef Py_ssize_t i, source
    cdef object item, prev
    for i in range(n):
        source = <Py_ssize_t>(<object>PyTuple_GET_ITEM(cost_index, i))
        item = _ONE if source == 0 else tokens if source == 1 else usd
        if same:
            prev = <object>PyTuple_GET_ITEM(last, i)
            same = prev is item or (PyLong_CheckExact(prev) and PyLong_CheckExact(item) and prev == item)
    if same:
        return last
    cdef tuple costs = PyTuple_New(n)
    for i in range(n):
        source = <Py_ssize_t>(<object>PyTuple_GET_ITEM(cost_index, i))
        item = _ONE if source == 0 else tokens if source == 1 else usd
        Py_INCREF(item)
        PyTuple_SET_ITEM(costs, i, item)
    _last_costs = costs
    return costs


cdef bytes _digest(object hasher, object value, const unsigned char* secret, Py_ssize_t n):
    """`_hmac` of the secret (at `secret`, from the Authorization str `value`), the last digest again when
    `value` is the same str object under the same hasher (the compiled parser's repeated value)."""
    global _last_auth, _last_hasher, _last_digest
    if value is _last_auth and hasher is _last_hasher:
        return _last_digest
    digest = _hmac(hasher, secret, n)
    _last_auth = value
    _last_hasher = hasher
    _last_digest = digest
    return digest


cdef tuple _last_pair = (None, None)


cdef tuple _pair(object address, object key_id):
    """(address, key_id), KnownKeys' key: the last check's tuple again for the same two objects (the
    parser's repeated address str, the key's id), which a dict finds by identity, not compared item by item."""
    global _last_pair
    if <object>PyTuple_GET_ITEM(_last_pair, 0) is address and <object>PyTuple_GET_ITEM(_last_pair, 1) is key_id:
        return _last_pair
    _last_pair = (address, key_id)
    return _last_pair


cdef object _path(bytes url):
    """The check's path: the target after the prefix, latin-1 (the last one again for the same bytes)."""
    global _last_url, _last_path
    if url is not _last_url:
        _last_path = PyUnicode_DecodeLatin1(PyBytes_AS_STRING(url) + _SKIP, PyBytes_GET_SIZE(url) - _SKIP, NULL)
        _last_url = url
    return _last_path


def hmac_sha256(hasher, bytes secret not None):
    """The compiled lane's keys.KeyHasher.__call__ on `secret`'s bytes (tests compare it with hashlib's)."""
    return _hmac(hasher, <const unsigned char*>PyBytes_AS_STRING(secret), PyBytes_GET_SIZE(secret))


def install_framing(reference_feed, busy, protocol=None):
    """Register AuthzProtocol._feed (the httptools parser, for what the compiled parser does not take) and
    the event loop's HTTP busy histogram (latency.LOOP_BUSY.http); returns the compiled `data_received`,
    to be set on the compiled protocol (adapters/http_native.py: its `_feed` is the pure twin). `protocol`:
    the compiled protocol's class, whose slots (and the decision's objects') are then read in place."""
    global _reference_feed, _busy
    _reference_feed = reference_feed
    _busy = busy
    if protocol is not None:
        _slots(protocol)
    return data_received


def install(reference, internal_error, log, failure_store, str prefix, allow_answer, plan_wire):
    """Register what the compiled handler needs from the adapters (imported here they would be a cycle:
    the native package loads first) and return the handler, to be set as the compiled protocol's
    `on_message_complete`. `reference`: AuthzProtocol.on_message_complete; `failure_store`: the class
    whose `_states` (a dict; fresh windows held as None) the brute-force throttle's counts are read from directly (any other: through its
    own `__len__` / `__contains__`, as FastAdmit does); `prefix`: EXT_AUTHZ_PREFIX; `allow_answer`:
    http_fast.allow_answer (the answer of check_plain's admissions, when the lane hands a request to it);
    `plan_wire`: http_fast.plan_wire (what a plan keeps of its key's allow head)."""
    global _reference, _internal_error, _log, _failure_store, _PREFIX, _SKIP, _allow_answer, _last_url
    global _plan_wire
    _allow_answer = allow_answer
    _plan_wire = plan_wire
    _last_url = None  # its path was cut at the old prefix
    _PREFIX = prefix.encode("latin-1") + b"/"
    _SKIP = len(prefix)
    _reference = reference
    _internal_error = internal_error
    _log = log
    _failure_store = failure_store
    return on_message_complete


cdef inline bint _space(unsigned char c) noexcept:
    """Python's whitespace among ASCII characters (str.strip's)."""
    return c == 32 or 9 <= c <= 13 or 28 <= c <= 31


cdef object _client_address(object xff):
    """http_authz._client_address: xff.rpartition(",")[2].strip(), one substring for an ASCII value."""
    cdef const unsigned char* chars
    cdef Py_ssize_t start, end, i
    if not xff:
        return ""
    if type(xff) is not str or not PyUnicode_IS_ASCII(xff):
        return xff.rpartition(",")[2].strip()
    chars = <const unsigned char*>PyUnicode_DATA(xff)
    end = PyUnicode_GET_LENGTH(xff)
    start = 0
    i = end
    while i > 0:
        i -= 1
        if chars[i] == 44:  # ","
            start = i + 1
            break
    while start < end and _space(chars[start]):
        start += 1
    while end > start and _space(chars[end - 1]):
        end -= 1
    return PyUnicode_Substring(xff, start, end)


cdef object _in_flight(object key_id, object tenant, object model, object prompt, object kept):
    """InFlight(...) as tuple.__new__(InFlight, ...) makes it, with no argument tuple."""
    cdef object t = (<PyTypeObject*>_InFlight).tp_alloc(<PyTypeObject*>_InFlight, 5)
    Py_INCREF(key_id)
    PyTuple_SET_ITEM(t, 0, key_id)
    Py_INCREF(tenant)
    PyTuple_SET_ITEM(t, 1, tenant)
    Py_INCREF(model)
    PyTuple_SET_ITEM(t, 2, model)
    Py_INCREF(prompt)
    PyTuple_SET_ITEM(t, 3, prompt)
    Py_INCREF(kept)
    PyTuple_SET_ITEM(t, 4, kept)
    return t


cdef inline double _mono() noexcept:
    """time.perf_counter()'s clock on Linux (CLOCK_MONOTONIC), without the call."""
    cdef double now = 0.0
    _clock_now(_CLOCK_MONOTONIC, &now)
    return now


# Decider's default clock, time.time: read here as it reads it, without the call (_clocks.pxi)
cdef object _time_time = _clock_of("time", "CLOCK_REALTIME")


cdef object _now(object clock):
    """clock(): time.time()'s value without the call when `clock` is time.time itself (on CLOCK_REALTIME);
    any other clock (a test's, a fake) is called."""
    return _clock_call(clock, _time_time, _CLOCK_REALTIME)


def wall_seconds(long long ns):
    """The float time.time() makes of `ns` nanoseconds (tests compare it with CPython's conversion)."""
    return _seconds(ns)


def wall_now(clock):
    """`_now(clock)`: the compiled check's read of its decider's clock."""
    return _now(clock)


cdef inline double _thread_cpu() noexcept:
    """time.thread_time()'s clock (CLOCK_THREAD_CPUTIME_ID: this thread's CPU time), without the call; a
    system call, not vDSO (~0.5 µs here), so only read while `busy_cpu` set a histogram."""
    cdef timespec ts
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
    return <double>(ts.tv_sec * 1000000000LL + ts.tv_nsec) / 1e9


cdef object _busy_cpu = None  # latency.LOOP_BUSY.http_cpu: each read's own CPU time, or None (not measured)


def busy_cpu(histogram):
    """Set (latency.LoopBusy.measure_cpu) the histogram of each read's own CPU time; None: not measured."""
    global _busy_cpu
    _busy_cpu = histogram


cdef inline bint _multipart(str content_type) except -1:
    """core.multipart.is_multipart, inline."""
    if len(content_type) < 19:
        return False
    return content_type.partition(";")[0].strip().lower() == "multipart/form-data"


cdef bint _fits(object source, object key) except -1:
    """fastpath._fits: a plan made for `source` serves `key` of the same recipe."""
    return (
        _at(source, &S_KEY_LIMITS, "limits") is _at(key, &S_KEY_LIMITS, "limits")
        and _at(source, &S_KEY_PATHS, "paths") is _at(key, &S_KEY_PATHS, "paths")
        and _at(source, &S_KEY_MODELS, "models") is _at(key, &S_KEY_MODELS, "models")
        and _at(source, &S_KEY_PATH_RULE, "path_rule") is _at(key, &S_KEY_PATH_RULE, "path_rule")
        and _at(source, &S_KEY_MODEL_RULE, "model_rule") is _at(key, &S_KEY_MODEL_RULE, "model_rule")
        and _at(source, &S_KEY_REMOVE, "remove_headers") is _at(key, &S_KEY_REMOVE, "remove_headers")
    )


cdef inline bint _same(object kept, object asked) except -1:
    """kept == asked (a plan's model or path against the request's), the same object first."""
    return kept is asked or kept == asked


cdef inline bytes _latin1(object text, const char** chars, Py_ssize_t* size):
    """`text`'s latin-1 bytes at *chars, *size of them: a str of 1-byte characters' own, else its
    .encode("latin-1") (UnicodeEncodeError beyond latin-1), returned: held while *chars is read."""
    cdef bytes encoded
    if type(text) is str and PyUnicode_KIND(text) == PyUnicode_1BYTE_KIND:
        chars[0] = <const char*>PyUnicode_DATA(text)
        size[0] = PyUnicode_GET_LENGTH(text)
        return None
    encoded = (<str>text).encode("latin-1")
    chars[0] = PyBytes_AS_STRING(encoded)
    size[0] = PyBytes_GET_SIZE(encoded)
    return encoded


cdef bytes _join(object wire, object key_id, const char* block, Py_ssize_t nb, object release):
    """wire + the nb bytes at block [+ b"x-nexus-release: " + release (a str, latin-1) + b"\\r\\n"] + the
    tail, in one buffer (release: None or "" for none). `wire`: the key's head (bytes), or a recipe's
    head split around the key id (http_fast.plan_wire), `key_id`'s latin-1 bytes written between."""
    cdef Py_ssize_t nw, nr = 0, nt = PyBytes_GET_SIZE(_TAIL), size = 0
    cdef Py_ssize_t nl = PyBytes_GET_SIZE(_RELEASE)
    cdef const char* chars = NULL
    cdef bytes r = None
    cdef bytes head, rest = None, k = None
    cdef const char* kid = NULL
    cdef Py_ssize_t nk = 0, nh, ns = 0
    if type(wire) is tuple:  # (head, rest): the key id between
        head = (<tuple>wire)[0]
        rest = (<tuple>wire)[1]
        k = _latin1(key_id, &kid, &nk)  # UnicodeEncodeError, as allow_block
        ns = PyBytes_GET_SIZE(rest)
    else:
        head = wire
    nh = PyBytes_GET_SIZE(head)
    nw = nh + nk + ns
    if release:
        r = _latin1(release, &chars, &size)  # UnicodeEncodeError, as before
        nr = nl + size + 2
    cdef bytes out = PyBytes_FromStringAndSize(NULL, nw + nb + nr + nt)
    cdef char* p = PyBytes_AS_STRING(out)
    memcpy(p, PyBytes_AS_STRING(head), nh)
    p += nh
    if kid != NULL:
        memcpy(p, kid, nk)
        p += nk
        memcpy(p, PyBytes_AS_STRING(rest), ns)
        p += ns
    if nb:
        memcpy(p, block, nb)
    p += nb
    if nr:
        memcpy(p, PyBytes_AS_STRING(_RELEASE), nl)
        p += nl
        memcpy(p, chars, size)
        p += size
        p[0] = 13
        p[1] = 10
        p += 2
    memcpy(p, PyBytes_AS_STRING(_TAIL), nt)
    return out


cdef inline bint _at_least(Py_ssize_t size, object limit) except -1:
    """size >= limit (ReservationBook._max: an int), without making an int of size."""
    cdef int overflow = 0
    cdef long long bound
    if PyLong_CheckExact(limit):
        bound = PyLong_AsLongLongAndOverflow(limit, &overflow)
        if overflow:
            return overflow < 0
        return size >= bound
    return size >= limit


cdef object _usd(object estimate, object completion, object price):
    """pricing._cost with nothing cached, as FastAdmit.admit writes it: C doubles when every operand is
    one Python would convert exactly (ints below 2**53, floats), else the same expression on objects."""
    cdef object pin = _at(price, &S_PRICE_INPUT, "input")
    cdef object pcached = _at(price, &S_PRICE_CACHED, "cached_input")
    cdef object pout = _at(price, &S_PRICE_OUTPUT, "output")
    cdef long long e, c
    cdef int overflow = 0
    cdef double total
    if PyFloat_CheckExact(pin) and PyFloat_CheckExact(pcached) and PyFloat_CheckExact(pout):
        if PyLong_CheckExact(estimate) and PyLong_CheckExact(completion):
            e = PyLong_AsLongLongAndOverflow(estimate, &overflow)
            if not overflow:
                c = PyLong_AsLongLongAndOverflow(completion, &overflow)
            if not overflow and -(1LL << 53) < e < (1LL << 53) and -(1LL << 53) < c < (1LL << 53):
                total = ceil(
                    <double>e * PyFloat_AS_DOUBLE(pin)
                    + 0.0 * PyFloat_AS_DOUBLE(pcached)
                    + <double>c * PyFloat_AS_DOUBLE(pout)
                )
                if isfinite(total):
                    return PyLong_FromDouble(total)
    return math.ceil((estimate - 0) * pin + 0 * pcached + completion * pout)


# the bounds of the histograms observed per check (two tuples: the check's latency, the loop's busy time) as
# C doubles next to each other: a bisect reads one or two cache lines, not one float object per probe
cdef enum:
    BOUNDS_MAX = 32
cdef struct Bounds:
    PyObject* tuple  # a strong reference (a tuple of exact floats), or NULL
    Py_ssize_t n
    double at[BOUNDS_MAX]
cdef Bounds _BOUNDS[2]
cdef int _bounds_next = 0


cdef Bounds* _bounds(object bounds):
    """The C copy of `bounds` (an immutable tuple of exact floats, at most BOUNDS_MAX), else NULL."""
    global _bounds_next
    cdef Bounds* b
    cdef Py_ssize_t i, n
    if _BOUNDS[0].tuple == <PyObject*>bounds:
        return &_BOUNDS[0]
    if _BOUNDS[1].tuple == <PyObject*>bounds:
        return &_BOUNDS[1]
    if type(bounds) is not tuple or PyTuple_GET_SIZE(bounds) > BOUNDS_MAX:
        return NULL
    n = PyTuple_GET_SIZE(bounds)
    for i in range(n):
        if not PyFloat_CheckExact(<object>PyTuple_GET_ITEM(bounds, i)):
            return NULL
    b = &_BOUNDS[_bounds_next]
    _bounds_next ^= 1
    Py_INCREF(bounds)
    Py_XDECREF(b.tuple)
    b.tuple = <PyObject*>bounds
    b.n = n
    for i in range(n):
        b.at[i] = PyFloat_AS_DOUBLE(<object>PyTuple_GET_ITEM(bounds, i))
    return b


def bisect_bounds(bounds, double seconds):
    """`_observe`'s bisect_left(bounds, seconds) (tests compare it with bisect's)."""
    return _bisect(bounds, seconds)


cdef Py_ssize_t _bisect(object bounds, double seconds) except -1:
    """bisect_left(bounds, seconds): on the C copy of `bounds` when there is one."""
    cdef Bounds* b = _bounds(bounds)
    cdef Py_ssize_t lo = 0, hi, mid
    if b != NULL:
        hi = b.n
        while lo < hi:
            mid = (lo + hi) >> 1
            if b.at[mid] < seconds:
                lo = mid + 1
            else:
                hi = mid
        return lo
    hi = len(bounds)
    cdef bint items = type(bounds) is tuple
    while lo < hi:  # bisect_left
        mid = (lo + hi) >> 1
        bound = <object>PyTuple_GET_ITEM(bounds, mid) if items else bounds[mid]
        if (PyFloat_AS_DOUBLE(bound) < seconds) if PyFloat_CheckExact(bound) else (bound < seconds):
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef int _observe(object histogram, double seconds) except -1:
    """LatencyHistogram.observe, inline: counts[bisect_left(bounds, seconds)] += 1; sum += seconds."""
    cdef Py_ssize_t lo = _bisect(_at(histogram, &S_HIST_BOUNDS, "bounds"), seconds)
    counts = _at(histogram, &S_HIST_COUNTS, "counts")
    if (
        type(counts) is _array_type
        and (<carray.array>counts).ob_descr.typecode == 113  # "q": the count written in place
        and lo < Py_SIZE(counts)
    ):
        (<carray.array>counts).data.as_longlongs[lo] += 1
    else:
        counts[lo] += 1
    total = _at(histogram, &S_HIST_SUM, "sum")
    if PyFloat_CheckExact(total) and _refcount(total) == 2:  # the slot's and `total`'s: nobody else sees it
        _float_set(total, PyFloat_AS_DOUBLE(total) + seconds)  # the same sum, no float made and freed
    else:
        _set(histogram, &S_HIST_SUM, "sum", total + seconds)
    return 0


cdef inline bint _due(object entry, object now) except -1:
    """entry[5] <= now: whether a reservation (the book's tuple or a Reservation) has expired."""
    if type(entry) is Reservation and PyFloat_CheckExact(now):
        return (<Reservation>entry).expires_at <= PyFloat_AS_DOUBLE(now)
    return entry[5] <= now


cdef int _count_ok(object decisions) except -1:
    """decisions[Reason.OK] += 1: in place in a ReasonCounts' array('q') (no int object per admission)."""
    if type(decisions) is _ReasonCounts:
        counts = _at(decisions, &S_COUNTS_COUNTS, "counts")
        if (
            type(counts) is _array_type
            and (<carray.array>counts).ob_descr.typecode == 113  # "q"
            and _OK_INDEX < Py_SIZE(counts)
        ):
            (<carray.array>counts).data.as_longlongs[_OK_INDEX] += 1
            return 0
    decisions[_OK] += 1
    return 0


def data_received(self, data):
    """AuthzProtocol.data_received with CompiledAuthzProtocol._feed inline: each read timed into the loop's
    busy histogram (its own CPU time too, into `_busy_cpu`, when measured); the compiled parser first, the
    httptools parser for a request it does not take (replayed read by read), the compiled parser again
    between requests. The answers the compiled lane writes to the requests of one read (a check and its
    release, pipelined) are held and leave in one write at its end, or before anything else writes
    (`_emit`, `_flush`): one send per read, in request order."""
    global _holder
    cdef double started = _mono()
    cdef object cpu = _busy_cpu
    cdef double cpu_started = _thread_cpu() if cpu is not None else 0.0
    if not _at(self, &S_PROTO_CLOSING, "_closing"):
        fast = _at(self, &S_PROTO_FAST, "_fast")
        if _at(self, &S_PROTO_PARSER, "_parser") is fast:
            outer = _holder  # (None: data_received is not re-entered)
            _holder = self  # the lane's answers to this read leave in one write (`_emit`)
            try:
                if type(fast) is _Parser and type(data) is bytes:  # feed's body
                    taken = (<RequestParser>fast).read(<bytes>data)
                else:
                    taken = fast.feed(data)
            finally:
                _flush()
                _holder = outer
            if taken:  # not in the subset: the httptools path takes this request
                self._parser = self._slow
                for chunk in fast.take_replay():
                    _reference_feed(self, chunk)
                    if self._closing:
                        break
                else:
                    if not self._in_message and not self._closing:
                        self._parser = fast
        else:
            _reference_feed(self, data)
            if not self._in_message and not self._closing:
                self._parser = fast
    if cpu is not None:
        _observe(cpu, _thread_cpu() - cpu_started)
    _observe(_busy, _mono() - started)


cdef object _check(object decider, object policy, object snapshot, object headers, str path, bytes body,
                   str request_id, str client_address, object app):
    """Decider.check_plain with FastAdmit.admit inline, then the answer: the allow answer's bytes, None
    (the reference path decides), a Decision or an awaitable (a refusal by the counters, a store that
    must be awaited: check_plain's reference tail)."""
    cdef double started = _mono()
    cdef Py_ssize_t i, n, length
    cdef const unsigned char* chars
    cdef Py_ssize_t start, end
    cdef double seconds, last_d, now_d
    cdef long long uncharged, slot_mask
    cdef Figure figures[62]  # _MAX_WINDOWS: the admission's figures, when the store wrote them here
    cdef Py_ssize_t figures_n = -1, block_n
    cdef unsigned long long figures_uncharged = 0
    cdef char block[BLOCK_BYTES]
    cdef object idx
    cdef int overflow = 0
    if type(headers) is not dict:
        return _plain(decider, policy, snapshot, headers, path, body, request_id, client_address, app)
    cdef dict h = <dict>headers
    fast = _at(decider, &S_DEC_FAST, "_fast")
    if (
        fast is None
        or _at(fast, &S_FAST_POLICY, "policy") is not policy
        or _at(fast, &S_FAST_SNAPSHOT, "snapshot") is not snapshot
    ):
        fast = FastAdmit(policy, snapshot)
        decider._fast = fast
    now = _now(_at(decider, &S_DEC_CLOCK, "clock"))
    failures = _at(decider, &S_DEC_FAILURES, "failures")
    # -- FastAdmit.admit: the key --------------------------------------------------------------------
    value = h.get(H_AUTHORIZATION)
    if value is None:  # keys.extract_key: x-api-key (Anthropic's), else api-key (Azure's), stripped
        value = h.get(H_X_API_KEY)
        if value is None:
            value = h.get(H_API_KEY)
        if type(value) is not str:
            return None
        start = 0
    elif type(value) is not str:
        return None
    else:
        if PyUnicode_IS_ASCII(value):  # value.startswith("Bearer ")
            if PyUnicode_GET_LENGTH(value) < 7 or memcmp(PyUnicode_DATA(value), b"Bearer ", 7) != 0:
                return None
        elif not (<str>value).startswith("Bearer "):
            return None
        start = 7
    if PyUnicode_IS_ASCII(value):  # value[start:].strip(), in place (ASCII whitespace: \t-\r, \x1c-\x1f, " ")
        chars = <const unsigned char*>PyUnicode_DATA(value)
        end = PyUnicode_GET_LENGTH(value)
        while start < end and _space(chars[start]):
            start += 1
        while end > start and _space(chars[end - 1]):
            end -= 1
        chars += start
        length = end - start
    else:  # a stripped non-ASCII space may leave an ASCII secret
        secret = (<str>value)[start:].strip()
        if not PyUnicode_IS_ASCII(secret):
            return None
        chars = <const unsigned char*>PyUnicode_DATA(secret)
        length = PyUnicode_GET_LENGTH(secret)
    if length == 0 or length > _MAX_KEY:
        return None
    for i in range(length):  # isprintable and no " ": \x21-\x7e
        if chars[i] < 0x21 or chars[i] > 0x7e:
            return None
    counted = failures is not None and _at(policy, &S_POL_AUTH, "_auth_spec") is not None
    states = None
    if counted:
        if type(failures) is _failure_store:
            # MemoryCounterStore: a dict of id -> state, where a window a write left fresh is held as
            # None until its sweep drops it (`_held` of them): its len() and `in` count only the others
            states = _at(failures, &S_MEM_STATES, "_states")
            if type(states) is not dict:
                return _plain(decider, policy, snapshot, headers, path, body, request_id, client_address, app)
            nonempty = len(<dict>states) != <Py_ssize_t>_at(failures, &S_MEM_HELD, "_held")
        else:
            nonempty = bool(failures)
        if nonempty:
            if client_address and (
                ((<dict>states).get("\x01auth\x00" + client_address) is not None) if states is not None
                else (("\x01auth\x00" + client_address) in failures)
            ):
                return None
        else:
            counted = False
    # KeySnapshot.lookup: keys.KeyHasher's HMAC in C (ASCII: the secret's UTF-8 bytes are its chars)
    by_digest = _at(snapshot, &S_SNAP_DIGEST, "by_digest")
    digest = _digest(_at(snapshot, &S_SNAP_HASHER, "hasher"), value, chars, length)
    key = _memo_get(<dict>by_digest, digest, &_KEY_MEMO) if type(by_digest) is dict else by_digest.get(digest)
    if key is None or _at(key, &S_KEY_DISABLED, "disabled"):
        return None
    expires_at = _at(key, &S_KEY_EXPIRES, "expires_at")
    if expires_at is not None and now >= expires_at:
        return None
    # -- the body's facts --------------------------------------------------------------------------------
    facts = None
    model = None
    content_type = h.get(H_CONTENT_TYPE, "")
    needs_facts = _at(key, &S_KEY_NEEDS_FACTS, "needs_facts")
    key_id = _at(key, &S_KEY_ID, "key_id")
    if body and (_at(key, &S_KEY_MODELS, "models") or needs_facts):
        if H_CONTENT_ENCODING in h or _multipart(content_type):
            return None
        if counted and (
            ((<dict>states).get("\x01denied\x00" + key_id) is not None) if states is not None
            else (("\x01denied\x00" + key_id) in failures)
        ):
            return None
        read_facts = _named(_body_names, &_READ_FACTS, "read_facts")
        if read_facts is _native_facts:  # its C entry, the same call
            facts = facts_of(body, needs_facts, False, False)
        else:
            facts = read_facts(body, estimate_prompt=needs_facts, precise=False, truncated=False)
        if _at(facts, &S_FACTS_PROBLEM, "problem") is not None:
            return None
        model = _at(facts, &S_FACTS_MODEL, "model")
        if model is None and _at(key, &S_KEY_MODELS, "models"):
            return None
    # -- the plan ----------------------------------------------------------------------------------------
    cdef dict plans = _at(fast, &S_FAST_PLANS, "_plans")
    owner = _at(key, &S_KEY_RECIPE, "recipe")  # fastpath._owner: the recipe's plans, shared, or the key's
    if owner is None or _at(key, &S_KEY_SCOPED, "model_scoped"):
        owner = key
    plan = _memo_get(plans, owner, &_PLAN_MEMO)  # the owner's first plan, under the owner itself (FastAdmit._plans)
    if plan is not None and not (
        _same(_at(plan, &S_PLAN_MODEL, "model"), model) and _same(_at(plan, &S_PLAN_PATH, "path"), path)
    ):
        # another model or path of the owner (a key whose application uses several): FastAdmit._kept's
        # second place, (owner, model, path), read here (a plan kept there is that model's and path's);
        # absent, plan_of makes it
        plan = plans.get((owner, model, path))
    if plan is None or not (owner is key or _fits(_at(plan, &S_PLAN_SOURCE, "source"), key)):
        plan = fast.plan_of(key, model, path)  # kept (and the cache bounded) in Python: a miss is rare
    if not _at(plan, &S_PLAN_USABLE, "usable"):
        return None
    specs = _at(plan, &S_PLAN_SPECS, "specs")
    book = _at(decider, &S_DEC_BOOK, "book")
    if len(<tuple>specs) > _MAX_WINDOWS or (book is not None and type(book) is not ReservationBook):
        return _plain(decider, policy, snapshot, headers, path, body, request_id, client_address, app)
    if client_address and failures is not None and _at(policy, &S_POL_AUTH, "_auth_spec") is not None:
        known = _at(policy, &S_POL_KNOWN, "_known")  # KnownKeys.note, its common case inline
        if type(known) is not KnownKeys:
            return _plain(decider, policy, snapshot, headers, path, body, request_id, client_address, app)
        seen = _at(known, &S_KNOWN_SEEN, "_seen")
        pair = _pair(client_address, key_id)
        last = _memo_get(<dict>seen, pair, &_SEEN_MEMO)
        if last is None:
            known.note(client_address, key_id, now)
        elif PyFloat_CheckExact(last) and PyFloat_CheckExact(now):
            last_d = PyFloat_AS_DOUBLE(last)
            now_d = PyFloat_AS_DOUBLE(now)
            if not (last_d <= now_d < last_d + _REFRESH):
                # KnownKeys.note of a pair it holds: moved to the end (the LRU order), noted now (every
                # visit of a key seen less often than REFRESH_AFTER, e.g. 10,000 keys in turn)
                del (<dict>seen)[pair]
                (<dict>seen)[pair] = now
        elif not (last <= now < last + _REFRESH):
            known.note(client_address, key_id, now)
    # -- the prompt estimate and the charges -------------------------------------------------------------
    prompt = _at(facts, &S_FACTS_PROMPT, "prompt_tokens") if facts is not None else 0
    kept = None
    track = _at(policy, &S_POL_TRACK, "track")
    if track and not needs_facts and body:  # prompt_later.deferred_body
        if not _multipart(content_type) and PyBytes_GET_SIZE(body) <= _KEEP:
            prompt = 0
            kept = body
        else:
            prompt, kept = deferred_body(body, content_type, prompt)
    cdef tuple cost_index = _at(plan, &S_PLAN_COST_INDEX, "cost_index")
    n = PyTuple_GET_SIZE(cost_index)
    cdef tuple costs
    tokens = 0
    usd = 0
    if _at(plan, &S_PLAN_METERED, "metered"):
        if facts is not None:
            estimate = _at(facts, &S_FACTS_PROMPT, "prompt_tokens")
            choices = _at(facts, &S_FACTS_N, "n")
            if not choices > 0:
                choices = 1
            max_tokens = _at(facts, &S_FACTS_MAX_TOKENS, "max_tokens") or None
        else:
            estimate, choices, max_tokens = 0, 1, None
        completion = (
            (max_tokens or _at(policy, &S_POL_MAX_TOKENS, "_default_max_tokens")) * choices
            if _at(plan, &S_PLAN_COMPLETES, "completes") else 0
        )
        price = _at(plan, &S_PLAN_PRICE, "price")
        usd = _usd(estimate, completion, price) if price is not None else 0
        tokens = estimate + completion
    costs = _costs(cost_index, n, tokens, usd)
    # -- Decider.check_plain: charge, reserve ------------------------------------------------------------
    release = None
    if not specs:  # nothing to charge
        statuses = ()
        if book is not None and request_id and track:
            context = _in_flight(key_id, _at(key, &S_KEY_TENANT, "tenant"), _at(plan, &S_PLAN_MODEL, "model"), prompt, kept)
            settle_with(_at(decider, &S_DEC_STORE, "store").adjust_soon, book.track(request_id, context, now), now)
    else:
        store = _at(decider, &S_DEC_STORE, "store")
        counter_ids = _at(plan, &S_PLAN_COUNTER_IDS, "counter_ids")
        if counter_ids is None:  # a shared plan: the key's own
            counter_ids = _at(key, &S_KEY_COUNTER_IDS, "counter_ids")
        acquire = _at(store, &S_STORE_ACQUIRE, "acquire_nowait")
        # the compiled memory store's own acquire: an admission's figures in C, no status objects (a
        # refusal, or what it hands to the pure acquire, is left untouched: the object API then decides)
        if (
            PyMethod_Check(acquire) and PyMethod_GET_FUNCTION(acquire) == <PyObject*>_native_acquire
            and acquire_figures(
                <object>PyMethod_GET_SELF(acquire), counter_ids, specs, costs, now, figures, &figures_uncharged
            ) is not None
        ):
            figures_n = len(<tuple>specs)
            statuses = None
        else:
            result = acquire(counter_ids, specs, costs, now)
            if result is None or not _at(result, &S_RESULT_ALLOWED, "allowed"):  # the reference path from here
                request = new_request("POST", path, headers, body, False, request_id, client_address)
                admission = fast.admission(plan, key, costs, request_id, prompt, kept, facts, path)
                if result is None:
                    return decider._check_later(policy, admission, now, started, request)
                return decider._finish(policy, admission, request, result, now, started, True)
            statuses = _at(result, &S_RESULT_STATUSES, "statuses")
        shape = _at(plan, &S_PLAN_SHAPE, "shape")
        if book is not None and request_id:
            if figures_n >= 0:
                uncharged = <long long>figures_uncharged
            else:
                uncharged = _at(result, &S_RESULT_UNCHARGED, "uncharged")
            # ReservationBook.reserve, then _insert
            entries = _at(book, &S_BOOK_ENTRIES, "_entries")
            out = None
            if entries:
                if type(entries) is Entries:  # the compiled table: its first node
                    if _due((<Entries>entries)._first(), now):
                        out = book._expire(now, book._expire_per_call)
                elif _ODICT_FIRST and type(entries) is OrderedDict:  # the oldest, without an iterator
                    if _due(entries[<object>_nx_odict_first(entries)], now):
                        out = book._expire(now, book._expire_per_call)
                else:
                    for first in entries:  # the oldest
                        if _due(entries[first], now):
                            out = book._expire(now, book._expire_per_call)
                        break
            if track or (
                <long long>_item(shape, _SHAPE, I_SETTLE_MASK, "settle_mask") & ~uncharged
            ) != 0:
                ttl = _at(book, &S_BOOK_TTL, "_ttl")
                if PyFloat_CheckExact(now) and (PyFloat_CheckExact(ttl) or PyLong_CheckExact(ttl)):
                    # the entry as one object (the times as doubles, the InFlight as its fields): float +
                    # int converts the int as PyFloat_AsDouble does, so expires_at is `now + ttl`'s float
                    now_d = PyFloat_AS_DOUBLE(now)
                    entry = new_reservation(
                        counter_ids if PyTuple_CheckExact(counter_ids) else tuple(counter_ids),
                        specs if PyTuple_CheckExact(specs) else tuple(specs),
                        costs,
                        uncharged,
                        now_d,
                        now_d + PyFloat_AsDouble(ttl),
                        bool(track),
                        key_id,
                        _at(key, &S_KEY_TENANT, "tenant"),
                        _at(plan, &S_PLAN_MODEL, "model"),
                        prompt,
                        kept,
                    )
                else:
                    entry = (
                        counter_ids if PyTuple_CheckExact(counter_ids) else tuple(counter_ids),
                        specs if PyTuple_CheckExact(specs) else tuple(specs),
                        costs,
                        uncharged,
                        now,
                        now + ttl,
                        _in_flight(
                            key_id, _at(key, &S_KEY_TENANT, "tenant"), _at(plan, &S_PLAN_MODEL, "model"), prompt, kept
                        ) if track else None,
                    )
                if request_id in entries:
                    old = entries.pop(request_id)
                    book.replaced += 1
                    if not out:
                        out = []
                    out.append(book._retire(request_id, old))
                elif _at_least(len(entries), _at(book, &S_BOOK_MAX, "_max")):
                    oldest_id, oldest = entries.popitem(last=False)
                    book.evicted += 1
                    if not out:
                        out = []
                    out.append(book._retire(oldest_id, oldest))
                entries[request_id] = entry
            if out:
                settle_with(store.adjust_soon, tuple(out), now)
            slot_mask = _item(shape, _SHAPE, I_SLOT_MASK, "slot_mask")
            if slot_mask != 0:  # policy.marks_release: shapes.near_limit
                indices = _item(shape, _SHAPE, I_SLOT_INDICES, "slot_indices")
                for idx in (<tuple>indices if type(indices) is tuple else tuple(indices)):
                    if not (uncharged >> <int>idx) & 1:
                        if figures_n >= 0:
                            if figures[<int>idx].remaining <= figures[<int>idx].limit >> 1:
                                release = request_id
                                break
                            continue
                        status = statuses[idx]
                        if _at(status, &S_STATUS_REMAINING, "remaining") <= _at(status, &S_STATUS_LIMIT, "limit") >> 1:
                            release = request_id
                            break
    # -- Decider._counted -----------------------------------------------------------------------------------
    _count_ok(_at(decider, &S_DEC_DECISIONS, "decisions"))
    _observe(_at(decider, &S_DEC_LATENCY, "latency"), _mono() - started)
    # -- the answer (http_fast.on_message_complete) ---------------------------------------------------------
    wire = _at(plan, &S_PLAN_WIRE, "wire")
    if wire is None:
        wire = _plan_wire(app, key)
        plan.wire = wire
    if figures_n > 0:  # the plan's headers of the figures, written here (plan_header_block's bytes)
        header_plan = _item(_at(plan, &S_PLAN_SHAPE, "shape"), _SHAPE, I_HEADERS, "headers")
        block_n = -1
        if type(header_plan) is tuple and _named(_headers_names, &_BUILD_BLOCK, "build_header_block") is _native_block:
            block_n = figure_block(<tuple>header_plan, figures, figures_n, block)
        if block_n >= 0:
            return _join(wire, key_id, block, block_n, release)
        statuses = figure_statuses(specs, figures, figures_n)  # the objects, for the function in place
    if statuses:
        block_bytes = _named(_headers_names, &_BUILD_BLOCK, "build_header_block")(
            _item(_at(plan, &S_PLAN_SHAPE, "shape"), _SHAPE, I_HEADERS, "headers"), statuses
        )
        return _join(wire, key_id, PyBytes_AS_STRING(block_bytes), PyBytes_GET_SIZE(block_bytes), release)
    return _join(wire, key_id, NULL, 0, release)


cdef object _plain(object decider, object policy, object snapshot, object headers, str path, bytes body,
                   str request_id, str client_address, object app):
    """The pure flat path (Decider.check_plain) and http_fast's answer of its admission."""
    out = decider.check_plain(policy, snapshot, headers, path, body, request_id, client_address)
    if out.__class__ is not tuple:
        return out
    return _allow_answer(app, *out)


cdef inline bint _is_post(object method) except -1:
    """method == b"POST" (the parser's method: bytes or None), in place for bytes."""
    if type(method) is bytes:
        return PyBytes_GET_SIZE(method) == 4 and memcmp(PyBytes_AS_STRING(method), b"POST", 4) == 0
    return method == b"POST"


cdef inline bint _ascii_is(object text, const char* ascii, Py_ssize_t n) noexcept:
    """text == the n-byte ASCII literal at `ascii`, for a str `text` (in place: no comparison call)."""
    return (
        PyUnicode_GET_LENGTH(text) == n
        and PyUnicode_KIND(text) == PyUnicode_1BYTE_KIND
        and memcmp(PyUnicode_DATA(text), ascii, n) == 0
    )


cdef bint _declared_is(object value, Py_ssize_t n):
    """core.forwarded.declared_length(value) == n, for a str header value (anything else: False)."""
    cdef Py_ssize_t i = 0, end
    cdef long long v = 0
    cdef const unsigned char* p
    cdef unsigned char c
    if type(value) is not str or PyUnicode_KIND(value) != PyUnicode_1BYTE_KIND:
        return False
    p = <const unsigned char*>PyUnicode_DATA(value)
    end = PyUnicode_GET_LENGTH(value)
    while i < end and (p[i] == 32 or p[i] == 9):
        i += 1
    while end > i and (p[end - 1] == 32 or p[end - 1] == 9):
        end -= 1
    if end == i or end - i > 15:
        return False
    while i < end:
        c = p[i]
        if c < 48 or c > 57:
            return False
        v = v * 10 + (c - 48)
        i += 1
    return v == n


cdef inline object _hget(object headers, str name, object default):
    """headers.get(name, default), the dict's own lookup when it is a dict (no method look-up)."""
    if type(headers) is dict:
        return (<dict>headers).get(name, default)
    return headers.get(name, default)


def on_message_complete(self):
    """adapters/http_fast.on_message_complete, compiled, with the decision inline (see the module)."""
    _complete(self)


cdef int _complete(object self) except -1:
    """on_message_complete's body: the compiled parser calls it directly (_http1.direct_handler)."""
    app = _at(self, &S_PROTO_APP, "_app")
    parser = _at(self, &S_PROTO_PARSER, "_parser")
    url = _at(self, &S_PROTO_URL, "_url")
    if (
        _class_attr(self, &_FAST_PATH, "fast_path")
        and not _at(self, &S_PROTO_CLOSING, "_closing")
        and type(url) is bytes
        and PyBytes_GET_SIZE(url) > _SKIP
        and memcmp(PyBytes_AS_STRING(url), PyBytes_AS_STRING(_PREFIX), _SKIP + 1) == 0
        and (_is_post((<RequestParser>parser).method) if type(parser) is _Parser else parser.get_method() == b"POST")
        and ((<RequestParser>parser).keep_alive if type(parser) is _Parser else parser.should_keep_alive())
        and not _at(app, &S_APP_DRAINING, "draining")
        and not _at(app, &S_APP_ADMIN, "admin")
        and not _at(self, &S_PROTO_OUTBOX, "_outbox")
        and _at(self, &S_PROTO_TRANSPORT, "_transport") is not None
    ):
        headers = _at(self, &S_PROTO_HEADERS, "_headers")
        partial = _hget(headers, H_PARTIAL_BODY, None)
        body = _body_of(_at(self, &S_PROTO_BODY, "_body"))
        # core.forwarded.whole_by_its_length (the reference path decides the others: cut_by_proxy)
        if (
            partial is None or ((not _ascii_is(partial, b"true", 4)) if type(partial) is str else partial != "true")
        ) and (PyBytes_GET_SIZE(body) == 0 or _declared_is(_hget(headers, H_DECLARED, None), PyBytes_GET_SIZE(body))):
            engine = _at(app, &S_APP_ENGINE, "engine")
            try:
                xff = _hget(headers, H_FORWARDED_FOR, None)
                out = _check(
                    _at(engine, &S_ENGINE_DECIDER, "decider"),
                    _at(engine, &S_ENGINE_POLICY, "policy"),
                    _at(engine, &S_ENGINE_SNAPSHOT, "snapshot"),
                    headers,
                    _path(<bytes>url),
                    body,
                    _hget(headers, H_REQUEST_ID, ""),
                    _client_address(xff),
                    app,
                )
                if out is None or type(out) is bytes:
                    data = out
                elif out.__class__ is Decision:
                    data = app.response(out, nginx=False, close=False)
                else:  # the counter store is awaited: the answer leaves from the outbox
                    self._in_message = False
                    _flush()
                    self._queue(self._answer_later(out, nginx=False, close=False), True)
                    return 0
            except Exception:  # a bug: answer 500 for this request, keep serving the others
                _internal(self, engine)
                return 0
            if data is not None:  # else not the common request: nothing was charged or counted
                _answered(self, app, data)
                return 0
    elif _RELEASED_ANSWER is not None and type(url) is bytes and url == _RELEASE_URL and _release(self, app, parser):
        return 0
    _flush()
    _reference(self)
    return 0


_direct_handler(on_message_complete, PyCapsule_New(<void*>_complete, b"nexus_authz.native._http1.handler", NULL))


cdef inline object _body_of(object chunks):
    """The request body from the protocol's `_body`: the compiled parser's 1-tuple, httptools' list."""
    if not chunks:
        return b""
    if type(chunks) is tuple and PyTuple_GET_SIZE(chunks) == 1 and type((<tuple>chunks)[0]) is bytes:
        return (<tuple>chunks)[0]
    if type(chunks) is list and len(<list>chunks) == 1 and type((<list>chunks)[0]) is bytes:
        return (<list>chunks)[0]
    return b"".join(chunks)


cdef int _internal(object self, object engine) except -1:
    """A bug while answering on the lane (logged with its traceback): 500 for this request, the
    connection closed after it, the others served on."""
    _log.exception("internal error in the HTTP check")
    engine.count(_UNAVAILABLE)
    self._in_message = False
    self._closing = True
    _flush()
    self._transport.write(_internal_error)
    self._hang_up(self._transport)
    return 0


cdef int _answered(object self, object app, bytes data) except -1:
    """The lane's answer `data` to the request just parsed: written (or held for the read's one write)."""
    _set(self, &S_PROTO_IN_MESSAGE, "_in_message", False)
    _emit(self, data)
    loop = _at(app, &S_APP_LOOP, "loop")
    if loop is not None:
        _set(self, &S_PROTO_LAST_ACTIVE, "last_active", loop.time())
    return 0


# -- the Lua tap's release of a concurrency slot (POST /_nexus/release) ----------------------------------------
cdef bint _release(object self, object app, object parser) except -1:
    """AuthzProtocol.on_message_complete of the Lua tap's release (`_route`, `_release`, Engine.release): 1
    answered (204, the slot freed when the request held one), 0 not taken: nothing was changed and the
    reference path answers (a closing, draining or not kept-alive connection, answers still queued, the
    admin listener, not a POST, no `x-nexus-release: 1`, or what `_release_slot` does not take)."""
    if not (
        self.fast_path
        and not _at(self, &S_PROTO_CLOSING, "_closing")
        and not _at(self, &S_PROTO_OUTBOX, "_outbox")
        and _at(self, &S_PROTO_TRANSPORT, "_transport") is not None
        and parser.get_method() == b"POST"
        and parser.should_keep_alive()
        and not _at(app, &S_APP_DRAINING, "draining")
        and not _at(app, &S_APP_ADMIN, "admin")
    ):
        return 0
    headers = _at(self, &S_PROTO_HEADERS, "_headers")
    if type(headers) is not dict or (<dict>headers).get("x-nexus-release") != "1":
        return 0
    engine = _at(app, &S_APP_ENGINE, "engine")
    try:
        body = _body_of(_at(self, &S_PROTO_BODY, "_body"))
        if not _release_slot(engine, PyUnicode_DecodeLatin1(PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), NULL)):
            return 0
    except Exception:  # a bug: answer 500 for this request, keep serving the others (as the check)
        _internal(self, engine)
        return 1
    _answered(self, app, _RELEASED_ANSWER)
    return 1


cdef bint _release_slot(object engine, str request_id) except -1:
    """Engine.release(request_id) with ReservationBook.release and Decider.apply (settle_with, one
    settlement, no Settlement object) inline, in the same order, on the local memory store; 0, before any
    state is changed, for what it does not take: an engine, decider, book or store of another class (a
    Redis store), an entry that is not the book's 7-tuple, more than 62 windows."""
    cdef long long uncharged, held
    cdef int overflow = 0
    cdef Py_ssize_t i, n
    if type(engine) is not _Engine:
        return 0
    book = _at(engine, &S_ENGINE_BOOK, "book")
    decider = _at(engine, &S_ENGINE_DECIDER, "decider")
    if type(book) is not ReservationBook or type(decider) is not _Decider:
        return 0
    store = _at(decider, &S_DEC_STORE, "store")
    if type(store) is not _LocalCounters or type(_at(store, &S_STORE_STORE, "store")) is not _MemoryStore:
        return 0
    entries = _at(book, &S_BOOK_ENTRIES, "_entries")
    if type(entries) is Entries:
        entry = (<Entries>entries)._get(request_id)
    elif type(entries) is OrderedDict:
        entry = (<dict>entries).get(request_id)
    else:
        return 0
    # -- ReservationBook.release ------------------------------------------------------------------------
    if entry is None:  # unknown, settled or expired: nothing to free
        return 1
    if type(entry) is Reservation:
        counter_ids = (<Reservation>entry).counter_ids
        specs = (<Reservation>entry).specs
        costs = (<Reservation>entry).costs
        uncharged_o = (<Reservation>entry).uncharged
        charged_at = PyFloat_FromDouble((<Reservation>entry).charged_at)
    elif type(entry) is tuple and PyTuple_GET_SIZE(entry) == 7:
        counter_ids, specs, costs, uncharged_o, charged_at, expires_at, context = <tuple>entry
    else:
        return 0
    if (
        type(specs) is not tuple
        or PyTuple_GET_SIZE(specs) > _MAX_WINDOWS
        or type(costs) is not tuple
        or PyTuple_GET_SIZE(costs) != PyTuple_GET_SIZE(specs)
        or not PyLong_CheckExact(uncharged_o)
    ):
        return 0
    uncharged = PyLong_AsLongLongAndOverflow(uncharged_o, &overflow)
    if overflow:
        return 0
    shape = (<dict>_SHAPES).get(PyLong_FromVoidPtr(<void*>specs))  # shapes.shape_of: its cache first
    if shape is None or Py_TYPE(shape) != _SHAPE or <object>PyTuple_GET_ITEM(shape, I_SPECS) is not specs:
        shape = _shape_of(specs)
    held = <long long>_item(shape, _SHAPE, I_SLOT_MASK, "slot_mask") & ~uncharged
    if not held:  # no slot, or released already
        return 1
    n = PyTuple_GET_SIZE(specs)
    deltas = PyTuple_New(n)
    for i in range(n):
        item = -(<object>PyTuple_GET_ITEM(costs, i)) if (held >> i) & 1 else 0
        Py_INCREF(item)
        PyTuple_SET_ITEM(deltas, i, item)
    # -- from here on, state changes (Engine.release's order) -------------------------------------------
    if type(entry) is Reservation:  # settle and expiry must not release them again
        r = <Reservation>entry
        entries[request_id] = new_reservation(
            counter_ids, specs, costs, PyLong_FromLongLong(uncharged | held), r.charged_at, r.expires_at,
            r.tracked, r.key_id, r.tenant, r.model, r.prompt_tokens, r.body
        )
    else:
        entries[request_id] = (
            counter_ids, specs, costs, PyLong_FromLongLong(uncharged | held), charged_at, expires_at, context
        )
    _at(decider, &S_DEC_RELEASES, "slot_releases")["proxy"] += 1
    now = _at(engine, &S_ENGINE_CLOCK, "_clock")()
    # -- Decider.apply --------------------------------------------------------------------------------------
    _at(store, &S_STORE_ADJUST, "adjust_soon")(counter_ids, specs, deltas, now, charged_at)
    if _at(decider, &S_DEC_FREED, "_slot_freed") is not None:  # a request waits for a slot
        decider.slot_freed()
    return 1


# -- the lane's answers to one read in one write -------------------------------------------------------------
# wrk and Envoy's Lua tap pipeline a check and its release: two transport writes, two send(2) calls, which
# on a loopback socket cost more than the decision (the receiver's wake-up is in the sender's system
# call). While data_received feeds the compiled parser, the answers on_message_complete's lane writes
# (`_emit`) are held and written once at the end of the read; anything else that writes (the reference
# path, a queued answer, a 500) writes them first (`_flush`), so the bytes and their order are the same.
cdef object _holder = None  # the protocol whose lane answers are held (in its data_received), or None
cdef object _held = None  # None, the one answer held, or a list of them


cdef int _emit(object self, bytes data) except -1:
    """The lane's answer `data`, written or held (see above)."""
    global _held
    if self is not _holder:
        _at(self, &S_PROTO_TRANSPORT, "_transport").write(data)
    elif _held is None:
        _held = data
    elif type(_held) is list:
        (<list>_held).append(data)
    else:
        _held = [_held, data]
    return 0


cdef int _flush() except -1:
    """Write the answers held (one write), before anything else writes."""
    global _held
    held = _held
    if held is None:
        return 0
    _held = None
    transport = _at(_holder, &S_PROTO_TRANSPORT, "_transport")
    if transport is not None:  # (each was written with a transport there; nothing removes it meanwhile)
        transport.write(held if type(held) is bytes else b"".join(<list>held))
    return 0
