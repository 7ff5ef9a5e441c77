"""The compiled acquire and adjust of the memory store (nexus_authz/native/_windows.pyx) against the
pure-Python ones (stores/memory.py `acquire_python` / `adjust_python`, on core/windows.py): the same
statuses, results and store state, bit for bit, on random specs, costs, times and interleavings of
acquire / adjust / peek / sweep; and the pure path for whatever the compiled one does not know."""

from __future__ import annotations

import math
import os
from array import array
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_authz import native
from nexus_authz.core import windows
from nexus_authz.core.limits import LimitSpec, WindowStatus, make_limit
from nexus_authz.stores import memory
from nexus_authz.stores.memory import MemoryCounterStore, acquire_python, adjust_python


@pytest.fixture(scope="module")
def compiled() -> Any:
    if native.windows is None:
        if os.environ.get(native.PURE_ENV, "") not in ("", "0"):
            pytest.skip("NEXUS_AUTHZ_PURE is set: the compiled windows are not loaded")
        why = native.WHY_PURE_WINDOWS
        pytest.fail(f"the compiled windows did not build or load ({why}): pip install -e .")
    return native.windows


# -- exact comparison ----------------------------------------------------------------------------------------


def _f(x: float) -> str:
    return x.hex() if isinstance(x, float) else repr(x)  # hex: -0.0 and 0.0 differ, as bits do


def status_bits(s: WindowStatus) -> tuple[Any, ...]:
    return (s.spec, s.limit, type(s.remaining), s.remaining, _f(s.reset_after), _f(s.retry_after), s.allowed)


def result_bits(r: Any) -> Any:
    if isinstance(r, tuple):  # peek
        return tuple(status_bits(s) for s in r)
    statuses = tuple(status_bits(s) for s in r.statuses)
    return (type(r).__name__, r.allowed, type(r.uncharged), r.uncharged, statuses)


def state_bits(store: MemoryCounterStore) -> list[Any]:
    out: list[Any] = []
    for cid, state in store._states.items():
        if isinstance(state, complex):
            out.append((cid, "gcra", _f(state.real), _f(state.imag)))
        elif isinstance(state, array):
            out.append((cid, state.typecode, tuple(_f(x) for x in state)))
        else:
            out.append((cid, type(state).__name__, state))
    # fresh (None), or marked idle at the walk's last look (False): held until the walk drops them
    held = sum(state is None or state is False for state in store._states.values())
    assert store._held == held and len(store) == len(store._states) - held
    walking = [cid for cid in store._walk[store._cursor :] + store._next if cid is not None]
    assert sorted(walking) == sorted(store._states)  # every id in the walk once
    # the walk itself, in order (the compiled sweep empties the walked list in place as the next one)
    walk = ("walk", tuple(store._walk[store._cursor :]), tuple(store._next))
    return out + [("evicted", store._evicted, "owed", store._owed), walk]


# -- strategies ----------------------------------------------------------------------------------------------

gcra = st.builds(
    lambda kind, limit, per, burst, shadow: make_limit(
        kind, limit, per, algorithm="gcra", burst=burst, shadow=shadow
    ),
    st.sampled_from(["requests", "tokens"]),
    st.sampled_from([1, 2, 3, 5, 7, 10, 60, 1000, 10**9, 10**15]),
    st.sampled_from(["minute", "hour", "day"]),
    st.none() | st.sampled_from([1, 2, 3, 4, 10, 1000, 10**15]),
    st.booleans(),
)
sliding = st.builds(
    lambda kind, limit, per, slots, shadow: make_limit(
        kind, limit, per, algorithm="sliding", slots=slots, shadow=shadow
    ),
    st.sampled_from(["tokens", "usd"]),
    st.sampled_from([1, 2, 3, 5, 10, 100, 1000, 10**12, 10**15]),
    st.sampled_from(["day", "month"]),
    st.none() | st.integers(2, 61),
    st.booleans(),
)
gauge = st.builds(
    lambda limit, shadow: make_limit("concurrent", limit, shadow=shadow),
    st.sampled_from([1, 2, 3, 10, 100000]),
    st.booleans(),
)
second = st.builds(  # small periods and slot widths: many slot boundaries within a few steps
    lambda limit, sliding, shadow: make_limit(
        "requests", limit, "second", algorithm="sliding" if sliding else "gcra", shadow=shadow
    ),
    st.sampled_from([1, 2, 3, 7, 10]),
    st.booleans(),
    st.booleans(),
)
spec_st = st.one_of(gcra, sliding, gauge, second)
cid_st = st.sampled_from(["a", "b", "c", "d"])  # few ids: windows share them, and specs change shape
cost_st = st.sampled_from([0, 1, 2, 3, 5, 100, 999, 10**6]) | st.integers(0, 2**40)
step_st = st.one_of(
    st.just(0.0),
    st.sampled_from([1e-9, 0.001, 0.1, 0.5, 1.0, 3.0, 60.0, 3600.0, 86400.0, 40 * 86400.0]),
    st.floats(0, 100, allow_nan=False),
    st.floats(-2, 0, allow_nan=False),  # jitter: a clock that steps back
)
start_st = st.sampled_from([1_700_002_800.0, 1_700_000_000.123, 0.0, 59.99, -3600.5, 12345]) | st.floats(
    -1e9, 1e10, allow_nan=False
)


@st.composite
def call_st(draw: st.DrawFn) -> tuple[Any, ...]:
    n = draw(st.integers(0, 6))
    specs = tuple(draw(spec_st) for _ in range(n))
    ids = tuple(draw(cid_st) for _ in range(n))
    op = draw(st.sampled_from(["acquire"] * 5 + ["adjust", "peek", "sweep"]))
    if op == "adjust":
        amounts: tuple[int, ...] = tuple(draw(st.integers(-(10**6), 10**6) | cost_st) for _ in range(n))
        charged_back = draw(st.none() | st.floats(0, 7200, allow_nan=False))
        return op, ids, specs, amounts, draw(step_st), charged_back
    if op == "sweep":
        return op, ids, specs, (), draw(step_st), draw(st.none() | st.integers(0, 5))
    return op, ids, specs, tuple(draw(cost_st) for _ in range(n)), draw(step_st), None


PURE = (acquire_python, adjust_python)


def run(store: MemoryCounterStore, path: Any, start: float, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
    acquire, adjust = path
    now = start
    trace: list[Any] = []
    for op, ids, specs, numbers, step, extra in calls:
        now += step
        if op == "acquire":
            trace.append(result_bits(acquire(store, ids, specs, numbers, now)))
        elif op == "peek":
            trace.append(result_bits(store.peek(ids, specs, now)))
        elif op == "adjust":
            charged_at = None if extra is None else now - extra
            adjust(store, ids, specs, numbers, now, charged_at)
        else:
            trace.append(store.sweep(now, extra))
        trace.append(state_bits(store))
    return trace


@settings(max_examples=400, deadline=None)
@given(start=start_st, sweep=st.integers(0, 3), calls=st.lists(call_st(), max_size=30))
def test_compiled_acquire_is_the_pure_one(compiled: Any, start: float, sweep: int, calls: list[Any]) -> None:
    pure = run(MemoryCounterStore(sweep_per_call=sweep), PURE, start, calls)
    fast = run(MemoryCounterStore(sweep_per_call=sweep), (compiled.acquire, compiled.adjust), start, calls)
    assert fast == pure


@settings(max_examples=150, deadline=None)
@given(
    specs=st.lists(spec_st, min_size=1, max_size=5),
    costs=st.lists(st.sampled_from([0, 1, 1, 1, 2, 50]), min_size=1, max_size=5),
    steps=st.lists(st.sampled_from([0.0, 0.001, 0.05, 0.3, 1.0, 7.0, 3599.0]), min_size=1, max_size=60),
)
def test_a_busy_key_decides_the_same(
    compiled: Any, specs: list[LimitSpec], costs: list[int], steps: list[float]
) -> None:
    """One key hammered with the same plan: long runs of admissions up to the limits and refusals."""
    ids = tuple(f"k\x00{i}" for i in range(len(specs)))
    cost = tuple(costs[i % len(costs)] for i in range(len(specs)))
    calls = [("acquire", ids, tuple(specs), cost, step, None) for step in steps]
    start = 1_700_002_800.0
    fast = (compiled.acquire, compiled.adjust)
    assert run(MemoryCounterStore(), fast, start, calls) == run(MemoryCounterStore(), PURE, start, calls)


@settings(max_examples=150, deadline=None)
@given(
    plans=st.lists(st.lists(spec_st, min_size=1, max_size=5).map(tuple), min_size=1, max_size=3),
    uses=st.lists(
        st.tuples(st.integers(0, 2), st.sampled_from([0.0, 0.01, 0.5, 3.0, 61.0])), min_size=1, max_size=40
    ),
)
def test_plans_that_come_back_decide_the_same(
    compiled: Any, plans: list[tuple[LimitSpec, ...]], uses: list[tuple[int, float]]
) -> None:
    """The same specs tuples (objects) again and again, interleaved, as plans' tuples come back: the compiled
    acquire keeps the Specs of the last tuple it read, and must read another tuple's own."""
    calls = []
    for pick, step in uses:
        specs = plans[pick % len(plans)]
        ids = tuple(f"p{pick % len(plans)}\x00{i}" for i in range(len(specs)))
        calls.append(("acquire", ids, specs, tuple(1 + i for i in range(len(specs))), step, None))
    start = 1_700_002_800.0
    fast = (compiled.acquire, compiled.adjust)
    assert run(MemoryCounterStore(), fast, start, calls) == run(MemoryCounterStore(), PURE, start, calls)


@settings(max_examples=3000, deadline=None)
@given(
    now=st.floats(-1e12, 1e12, allow_nan=False) | st.integers(-(10**9), 10**9).map(float),
    width=st.sampled_from([0.1, 1.0, 60.0, 3600.0, 86400.0 / 24, 30 * 86400.0 / 30, 86400 / 7, 60 / 61])
    | st.floats(1e-3, 1e7),
)
def test_slot_numbers_are_pythons(compiled: Any, now: float, width: float) -> None:
    """Python's float floor division reproduced in C, and slot_of on top of it, including at boundaries."""
    for t in (now, math.nextafter(now, math.inf), math.nextafter(now, -math.inf), round(now / width) * width):
        assert compiled.slot_of(t, width) == windows.slot_of(t, width)


@settings(max_examples=3000, deadline=None)
@given(
    x=st.floats(allow_nan=False, allow_infinity=False) | st.floats(-1e16, 1e16),
    y=st.floats(min_value=5e-324, allow_nan=False)
    | st.sampled_from([0.1, 60.0, 3600.0, 86400.0 / 7, 60 / 61]),
)
def test_the_fmod_of_the_floor_division_is_maths(compiled: Any, x: float, y: float) -> None:
    """The slot numbers' fmod (x87 FPREM on x86, not libm's call) gives math.fmod's bits: signs, zeros, a
    quotient far beyond 2**64, subnormal and infinite divisors."""
    for a in (x, -x):
        assert compiled.fmod_of(a, y).hex() == math.fmod(a, y).hex()


# -- what the compiled path does not know goes to the pure one -----------------------------------------------


@pytest.fixture
def fallbacks(compiled: Any) -> Iterator[list[Any]]:
    """Calls the compiled acquire and adjust handed to the pure ones."""
    seen: list[Any] = []

    def acquire_spy(store: Any, ids: Any, specs: Any, costs: Any, now: Any) -> Any:
        seen.append(specs)
        return acquire_python(store, ids, specs, costs, now)

    def adjust_spy(store: Any, ids: Any, specs: Any, deltas: Any, now: Any, charged_at: Any = None) -> Any:
        seen.append(("adjust", specs))
        return adjust_python(store, ids, specs, deltas, now, charged_at)

    compiled.install(acquire_spy, adjust_spy, memory._is_fresh, memory.SWEEP_BATCH)
    try:
        yield seen
    finally:
        compiled.install(acquire_python, adjust_python, memory._is_fresh, memory.SWEEP_BATCH)


def test_the_compiled_acquire_and_adjust_run_by_default(compiled: Any) -> None:
    assert MemoryCounterStore.acquire is compiled.acquire
    assert MemoryCounterStore.adjust is compiled.adjust
    assert native.WHY_PURE_WINDOWS == ""


def test_a_gcra_state_only_the_store_holds_is_rewritten_in_place_and_a_held_one_never(compiled: Any) -> None:
    """The compiled acquire and adjust write a GCRA window's new (debt, since) into its complex when the
    store's dict is its only other holder (no allocation per charge); a state anyone else holds keeps
    its value and the store gets a new object, exactly as the pure store would."""
    store = MemoryCounterStore()
    specs = (make_limit("tokens", 1000, "minute"), make_limit("requests", 50, "minute"))
    ids = ("k\x00t", "k\x00r")
    now = 1_700_000_000.0
    store.acquire(ids, specs, (10, 1), now)
    first = [id(store._states[c]) for c in ids]
    store.acquire(ids, specs, (10, 1), now + 0.1)
    assert [id(store._states[c]) for c in ids] == first
    store.adjust(ids, specs, (-5, 0), now + 0.2, now + 0.1)
    assert id(store._states[ids[0]]) == first[0]
    reference = MemoryCounterStore()
    for t, costs in ((now, (10, 1)), (now + 0.1, (10, 1))):
        acquire_python(reference, ids, specs, costs, t)
    adjust_python(reference, ids, specs, (-5, 0), now + 0.2, now + 0.1)
    assert [store._states[c] for c in ids] == [reference._states[c] for c in ids]
    held = store._states[ids[0]]
    value = (held.real, held.imag)
    store.acquire(ids, specs, (1, 1), now + 0.3)
    store.adjust(ids, specs, (-1, 0), now + 0.4, now + 0.3)
    assert (held.real, held.imag) == value  # what a caller holds never changes under it
    assert store._states[ids[0]] is not held and store._states[ids[0]] != held


def test_an_unknown_algorithm_takes_the_pure_path(fallbacks: list[Any]) -> None:
    known = make_limit("requests", 5, "minute")
    odd = make_limit("tokens", 1000, "day")
    object.__setattr__(odd, "algorithm", "calendar")  # a window kind added later, unknown to the C code
    store = MemoryCounterStore()
    store.acquire(("a",), (known,), (1,), 1000.0)
    assert fallbacks == []
    store.acquire(("a", "b"), (known, odd), (1, 1), 1000.0)
    assert fallbacks == [(known, odd)]
    store.adjust(("a",), (known,), (-1,), 1001.0)
    assert len(fallbacks) == 1
    store.adjust(("a", "b"), (known, odd), (-1, 0), 1001.0)
    assert fallbacks[1] == ("adjust", (known, odd))


def test_ids_and_costs_in_lists_or_too_few_are_read_as_the_pure_path_reads_them(fallbacks: list[Any]) -> None:
    """The compiled acquire reads a tuple's ids and costs in place; a list's (or any sequence's) are the
    same items: the same answers and state, not the pure path; too few ids or costs for the specs go to the
    pure path, which raises as it does (IndexError)."""
    specs = (make_limit("requests", 5, "minute"), make_limit("tokens", 100, "day"))
    now = 1_700_000_000.0
    as_tuples, as_lists = MemoryCounterStore(), MemoryCounterStore()
    for i in range(3):
        a = as_tuples.acquire(("a", "b"), specs, (1, 40), now + i)
        b = as_lists.acquire(["a", "b"], specs, [1, 40], now + i)
        assert result_bits(a) == result_bits(b)
        assert state_bits(as_tuples) == state_bits(as_lists)
    assert fallbacks == []
    for ids, costs in ((("a",), (1, 1)), (("a", "b"), (1,)), (["a"], [1, 1])):
        with pytest.raises(IndexError):
            MemoryCounterStore().acquire(ids, specs, costs, now)
    assert len(fallbacks) == 3


@pytest.mark.parametrize(
    "costs, now",
    [((-1,), 1000.0), ((2**62 + 1,), 1000.0), ((1.0,), 1000.0), ((True,), 1000.0), ((1,), 1e16)],
)
def test_numbers_out_of_range_take_the_pure_path(fallbacks: list[Any], costs: Any, now: float) -> None:
    spec = make_limit("tokens", 1000, "day")
    MemoryCounterStore().acquire(("a",), (spec,), costs, now)
    assert len(fallbacks) == 1


def test_a_stored_array_of_another_type_takes_the_pure_path(fallbacks: list[Any]) -> None:
    spec = make_limit("tokens", 1000, "day")
    store = MemoryCounterStore()
    store._put("a", array("f", bytes(4 * (spec.slots + 3))))
    store.acquire(("a",), (spec,), (1,), 1000.0)
    store.adjust(("a",), (spec,), (-1,), 1000.0)
    assert len(fallbacks) == 2


@pytest.mark.parametrize("deltas, now, charged_at", [((2**63,), 1000.0, None), ((-1,), 1000.0, 1e16)])
def test_adjust_out_of_range_takes_the_pure_path(
    fallbacks: list[Any], deltas: Any, now: float, charged_at: Any
) -> None:
    spec = make_limit("tokens", 1000, "day")
    MemoryCounterStore().adjust(("a",), (spec,), deltas, now, charged_at)
    assert len(fallbacks) == 1


def test_more_windows_than_the_c_arrays_hold_take_the_pure_path(fallbacks: list[Any]) -> None:
    specs = tuple(make_limit("requests", 5, "minute", name=f"r{i}") for i in range(65))
    store = MemoryCounterStore()
    result = store.acquire(tuple(s.name for s in specs), specs, (1,) * 65, 1000.0)
    assert result.allowed and len(fallbacks) == 1


@settings(max_examples=200, deadline=None)
@given(
    specs=st.lists(spec_st, min_size=1, max_size=5),
    rounds=st.lists(
        st.tuples(
            st.sampled_from([1, 2, 10, 500]),  # reserved
            st.sampled_from([-500, -10, -1, 0, 1, 10]),  # settle difference
            st.sampled_from([0.0, 0.01, 0.4, 2.0, 1800.0, 3599.0, 86400.0]),  # until the settle
            st.booleans(),  # with charged_at
        ),
        min_size=1,
        max_size=40,
    ),
)
def test_reserve_then_settle_is_the_same(compiled: Any, specs: list[LimitSpec], rounds: list[Any]) -> None:
    """The engine's pattern: acquire the estimate, settle the difference later (exactly, or newest first)."""
    ids = tuple(f"k\x00{i}" for i in range(len(specs)))
    plan = tuple(specs)
    calls: list[Any] = []
    for reserved, delta, delay, exact in rounds:
        calls.append(("acquire", ids, plan, (reserved,) * len(plan), 1.0, None))
        calls.append(("adjust", ids, plan, (delta,) * len(plan), delay, delay if exact else None))
    start = 1_700_002_800.0
    fast = (compiled.acquire, compiled.adjust)
    assert run(MemoryCounterStore(), fast, start, calls) == run(MemoryCounterStore(), PURE, start, calls)


# -- the one-slot form of the sliding window (core/windows.py) -----------------------------------------------

one_slot_sliding = st.builds(  # N > 2: new windows start in the one-slot form; widths from 0.1 s to a day
    lambda limit, per, slots, shadow: make_limit(
        "requests", limit, per, algorithm="sliding", slots=slots, shadow=shadow
    ),
    st.sampled_from([3, 10, 100, 10**6]),
    st.sampled_from(["second", "minute", "day"]),
    st.none() | st.sampled_from([2, 3, 4, 7]),
    st.booleans(),
)
mixed_step_st = st.one_of(  # within the slot, the next slots, and past the window (the one-slot reset)
    st.sampled_from([0.0, 0.05, 0.1, 0.3, 1.0, 1.5, 10.0, 30.0, 61.0, 3600.0, 86400.0, 2 * 86400.0]),
    st.floats(-1, 0, allow_nan=False),
)


@st.composite
def mixed_calls_st(draw: st.DrawFn) -> list[tuple[bool, tuple[Any, ...]]]:
    """A plan of windows (mostly sliding; ids shared now and then, so a window meets another shape) and
    calls on it (the whole plan or part of it), each with the path that makes it (True: compiled)."""
    plan = draw(
        st.lists(
            st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.one_of(one_slot_sliding, sliding, second)),
            min_size=1,
            max_size=4,
        )
    )
    calls = []
    for _ in range(draw(st.integers(0, 30))):
        part = tuple(w for w in plan if draw(st.integers(0, 4)))  # each window in 4 calls of 5
        ids, specs = tuple(w[0] for w in part), tuple(w[1] for w in part)
        op = draw(st.sampled_from(["acquire"] * 4 + ["adjust"] * 2 + ["peek", "sweep"]))
        step = draw(mixed_step_st)
        if op == "adjust":
            amounts = tuple(draw(st.sampled_from([-(10**6), -5, -1, 1, 2, 7])) for _ in part)
            back = draw(st.none() | st.sampled_from([0.0, 0.1, 1.0, 3600.0]))
            call: tuple[Any, ...] = (op, ids, specs, amounts, step, back)
        elif op == "sweep":
            call = (op, ids, specs, (), step, draw(st.none() | st.integers(0, 3)))
        else:
            call = (op, ids, specs, tuple(draw(st.sampled_from([0, 1, 1, 2, 5])) for _ in part), step, None)
        calls.append((draw(st.booleans()), call))
    return calls


def _local_view() -> MemoryCounterStore:
    from nexus_authz.stores.redis.writebehind import LocalView  # full-form sliding windows (_compact False)

    return LocalView()


@settings(max_examples=400, deadline=None)
@given(
    start=st.sampled_from([1_700_002_800.0, 1_700_000_000.05, 0.0, -3600.5]),
    sweep=st.integers(0, 2),
    local_view=st.booleans(),
    calls=mixed_calls_st(),
)
def test_states_from_either_path_are_read_by_the_other(
    compiled: Any, start: float, sweep: int, local_view: bool, calls: list[Any]
) -> None:
    """One store driven by both paths in turn (pure adjust then compiled acquire and vice versa), on
    one-slot and full windows, across slot rollovers, widening and the "first slot has left the window"
    reset: every trace and state is the all-pure run's."""
    mixed_store = _local_view() if local_view else MemoryCounterStore(sweep_per_call=sweep)
    pure_store = _local_view() if local_view else MemoryCounterStore(sweep_per_call=sweep)
    fast = (compiled.acquire, compiled.adjust)
    mixed: list[Any] = []
    now = start
    for use_compiled, call in calls:  # run() adds each call's step to the time it is given
        mixed += run(mixed_store, fast if use_compiled else PURE, now, [call])
        now += call[4]
    assert mixed == run(pure_store, PURE, start, [c for _, c in calls])


def _issue15_plan() -> tuple[LimitSpec, ...]:
    """bench_envoy.ISSUE15_CONFIG's windows (what profile_decision / bench_breakdown decide on)."""
    return (
        make_limit("requests", 600, "minute", name="rpm"),
        make_limit("tokens", 100000, "minute", name="tpm"),
        make_limit("tokens", 10**9, "day", name="tpd"),
        make_limit("usd", 10**9, "month", name="usd"),
        make_limit("concurrent", 100000, name="conc"),
    )


def test_the_compiled_path_handles_one_slot_windows_itself(fallbacks: list[Any]) -> None:
    """The issue-15 plan's sliding windows start, widen and settle in the compiled code, with no pure
    fallback, and end as the pure path's objects."""
    plan = _issue15_plan()
    ids = tuple(f"key\x00{s.name}" for s in plan)
    fast, pure = MemoryCounterStore(), MemoryCounterStore()
    trace: list[Any] = []
    now = 19675 * 86400.0 + 60.0  # a minute into a day (UTC): the hour's slot turns before the day's
    for step, costs, deltas in [
        (0.0, (1, 500, 500, 3, 1), (0, -200, -200, -1, -1)),  # a first slot: one-slot form, then refunds
        (1.0, (1, 500, 500, 3, 1), (0, 100, 100, 2, -1)),  # the same slot, an extra charge
        (3600.0, (1, 500, 500, 3, 1), (0, -10, -10, -1, -1)),  # tpd's second slot: widened in place
        (86400.0 * 40, (1, 7, 7, 1, 1), (0, -7, -7, -1, -1)),  # everything has left the windows
    ]:
        now += step
        for store in (fast, pure):
            path = (MemoryCounterStore.acquire, MemoryCounterStore.adjust) if store is fast else PURE
            trace.append(result_bits(path[0](store, ids, plan, costs, now)))
            trace.append(state_bits(store))
            if step == 0.0:
                assert [len(store._states[i]) for i in ids[2:4]] == [5, 5]  # one-slot: tpd, usd
            if step == 3600.0:
                assert [len(store._states[i]) for i in ids[2:4]] == [27, 5]  # tpd widened, usd not
            path[1](store, ids, plan, deltas, now + 0.5, now if store is fast else now)
            trace.append(state_bits(store))
        assert trace[-3:] == trace[-6:-3]  # the compiled store's step == the pure store's
    assert fallbacks == []


def test_the_local_view_keeps_full_windows_in_the_compiled_path(fallbacks: list[Any]) -> None:
    """The write-behind's LocalView (_compact False) exports full arrays: the compiled path makes those."""
    spec = make_limit("tokens", 1000, "day")
    view = _local_view()
    view.acquire(("a",), (spec,), (3,), 1000.0)
    view.adjust(("b",), (spec,), (2,), 1000.0)
    assert [len(view._states[c]) for c in "ab"] == [spec.slots + 3] * 2
    assert fallbacks == []


@pytest.mark.parametrize(
    "state",
    [
        array("f", [86400.0, 0.0, 1.0, 1.0, -24.0]),  # the one-slot shape, but not doubles
        array("d", [86400.0, 1e300, 1.0, 1.0, -24.0]),  # a last slot outside the exact range
    ],
)
def test_a_one_slot_shape_the_compiled_path_cannot_read_takes_the_pure_path(
    fallbacks: list[Any], state: array[float]
) -> None:
    spec = make_limit("tokens", 1000, "day")
    assert spec.slots == 24
    for op in ("acquire", "adjust"):
        store = MemoryCounterStore()
        store._put("a", array(state.typecode, state))
        if op == "acquire":
            store.acquire(("a",), (spec,), (1,), 1000.0)
        else:
            store.adjust(("a",), (spec,), (-1,), 1000.0)
    assert len(fallbacks) == 2


@pytest.mark.parametrize("slots", [2, 3, 24, 30])
def test_five_doubles_of_another_shape_are_read_as_the_pure_path_reads(compiled: Any, slots: int) -> None:
    """A 5-double array is a full 2-slot window, the one-slot form for the N it names (24), and fresh for any
    other N (a spec whose slots changed): never misread as another spec's."""
    spec = make_limit("tokens", 10, "day", slots=slots)
    for stored in ([86400.0 * 2, 1.0, 9.0, 9.0, -24.0], [86400.0 * 2, 1.0, 9.0, 4.0, 5.0]):
        traces = []
        for path in ((compiled.acquire, compiled.adjust), PURE):
            store = MemoryCounterStore()
            store._put("a", array("d", stored))
            calls = [
                ("acquire", ("a",), (spec,), (1,), 0.0, None),
                ("adjust", ("a",), (spec,), (-3,), 0.5, None),
                ("acquire", ("a",), (spec,), (2,), 86400.0 / slots, None),
            ]
            traces.append(run(store, path, 3600.0, calls))
        assert traces[0] == traces[1]


# -- the figures of an admission (the compiled HTTP lane's acquire: no status objects) -----------------------


def _figures_then_acquire(compiled: Any, seen: list[bool]) -> Any:
    """An acquire that tries `acquire_figures` first (as native/_fast does), then the object API; the result
    rebuilt from the figures for the comparison."""
    from nexus_authz.core.limits import new_result

    def acquire(store: MemoryCounterStore, ids: Any, specs: Any, costs: Any, now: float) -> Any:
        figures = compiled.figures_of(store, ids, specs, costs, now)
        seen.append(figures is not None)
        if figures is None:
            return compiled.acquire(store, ids, specs, costs, now)
        uncharged, statuses = figures
        return new_result(True, statuses, uncharged)

    return acquire


@settings(max_examples=300, deadline=None)
@given(start=start_st, sweep=st.integers(0, 3), calls=st.lists(call_st(), max_size=30))
def test_the_figures_of_an_admission_are_the_statuses(
    compiled: Any, start: float, sweep: int, calls: list[Any]
) -> None:
    """acquire_figures admits, charges and sweeps as acquire does, and its figures are the statuses'; a
    refusal (or what goes to the pure path) is left untouched for acquire to decide."""
    seen: list[bool] = []
    pure = run(MemoryCounterStore(sweep_per_call=sweep), PURE, start, calls)
    via = run(
        MemoryCounterStore(sweep_per_call=sweep),
        (_figures_then_acquire(compiled, seen), compiled.adjust),
        start,
        calls,
    )
    assert via == pure


def test_the_figures_take_admissions_and_leave_refusals(compiled: Any) -> None:
    seen: list[bool] = []
    rpm = make_limit("requests", 2, "minute")
    tpd = make_limit("tokens", 100, "day", algorithm="sliding", slots=24)
    ids, specs = ("r", "t"), (rpm, tpd)
    calls = [("acquire", ids, specs, (1, 40), 0.5, None)] * 3
    pure = run(MemoryCounterStore(), PURE, 1_700_000_000.0, calls)
    via = run(
        MemoryCounterStore(), (_figures_then_acquire(compiled, seen), compiled.adjust), 1_700_000_000.0, calls
    )
    assert via == pure
    assert seen == [True, True, False]  # the third is refused: acquire decides it
    assert [bits[1] for bits in via[::2]] == [True, True, False]
