"""The CounterStore contract: one suite, every backend.

To add a backend, add one line to BACKENDS (a factory taking pytest's request, so it can pull in fixtures
such as a redis-server on a free port). Every test below then runs against it, including a differential
property test against `ReferenceStore`, the plainest possible reading of the semantics.
"""

from __future__ import annotations

import math
import tracemalloc
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexus_authz.core.calendar import calendar_charge, calendar_refund, calendar_take
from nexus_authz.core.limits import (
    AcquireResult,
    Algorithm,
    LimitSpec,
    WindowStatus,
    gauge_adjust,
    gauge_take,
    gcra_adjust,
    gcra_take,
    make_limit,
    sliding_charge,
    sliding_refund,
    sliding_take,
)
from nexus_authz.core.reservations import ReservationBook
from nexus_authz.stores.base import CounterStore, apply_settlements
from nexus_authz.stores.memory import SWEEP_BATCH, MemoryCounterStore

BACKENDS: dict[str, Callable[[pytest.FixtureRequest], CounterStore]] = {
    "memory": lambda request: MemoryCounterStore(),
    "redis-exact": lambda request: request.getfixturevalue("redis_contract_store")("exact"),
    "redis-batched": lambda request: request.getfixturevalue("redis_contract_store")("batched"),
}

NOW = 1_700_002_800.0  # an hour boundary, so sliding figures are round


@pytest.fixture(params=sorted(BACKENDS))
def make_store(request: pytest.FixtureRequest) -> Callable[[], CounterStore]:
    factory = BACKENDS[request.param]
    return lambda: factory(request)


@pytest.fixture
def store(make_store: Callable[[], CounterStore]) -> CounterStore:
    return make_store()


def ids_for(key: str, specs: Sequence[LimitSpec]) -> tuple[str, ...]:
    return tuple(f"{key}\x00{s.name}" for s in specs)


def figures(statuses: Sequence[WindowStatus]) -> list[tuple[int, float, float, bool]]:
    return [(s.remaining, s.reset_after, s.retry_after, s.allowed) for s in statuses]


# -- basics -----------------------------------------------------------------------------------------------


def test_a_key_without_limits_is_allowed_with_no_statuses(store: CounterStore) -> None:
    result = store.acquire((), (), (), NOW)
    assert result.allowed and result.statuses == () and result.uncharged == 0
    assert store.peek((), (), NOW) == ()


def test_is_a_counter_store(store: CounterStore) -> None:
    assert isinstance(store, CounterStore)


def test_requests_per_minute(store: CounterStore) -> None:
    specs = (make_limit("requests", 3, "minute"),)
    ids = ids_for("alice", specs)
    assert [store.acquire(ids, specs, (1,), NOW).statuses[0].remaining for _ in range(3)] == [2, 1, 0]
    denied = store.acquire(ids, specs, (1,), NOW)
    assert not denied.allowed
    assert figures(denied.statuses) == [(0, 60.0, 20.0, False)]
    assert denied.denied_by == denied.statuses
    assert not store.acquire(ids, specs, (1,), NOW + 19.9).allowed
    assert store.acquire(ids, specs, (1,), NOW + 20).allowed


def test_remaining_never_exceeds_the_bucket_at_a_huge_limit(store: CounterStore) -> None:
    # A GCRA bucket admits within a rounding allowance of 1e-9 of its burst: 1,000 tokens at 10**12,
    # which once showed as `remaining` above the limit (the benchmark's "never refuse" plan).
    specs = (make_limit("tokens", 10**12, "minute"),)
    ids = ids_for("huge", specs)
    first = store.acquire(ids, specs, (10,), NOW)
    assert first.allowed and first.statuses[0].remaining == 10**12 - 10
    later = store.acquire(ids, specs, (7,), NOW + 0.5)
    assert later.allowed and 10**12 - 17 <= later.statuses[0].remaining <= 10**12 - 7
    refused = store.acquire(ids, specs, (10**12 + 10**6,), NOW + 1)  # past the allowance
    assert not refused.allowed and refused.statuses[0].remaining <= 10**12


def test_a_usd_budget_per_day_is_a_sliding_window(store: CounterStore) -> None:
    specs = (make_limit("usd", 1_000_000, "day"),)  # $1.00
    ids = ids_for("alice", specs)
    assert store.acquire(ids, specs, (700_000,), NOW).allowed
    assert store.acquire(ids, specs, (300_000,), NOW + 3600).allowed
    denied = store.acquire(ids, specs, (1,), NOW + 7200)
    assert figures(denied.statuses) == [(0, 86400 + 3600 - 7200, 86400 - 7200, False)]
    assert store.acquire(ids, specs, (700_000,), NOW + 86400).allowed  # the first hour left the window


def test_concurrency_until_released(store: CounterStore) -> None:
    specs = (make_limit("concurrent", 2),)
    ids = ids_for("alice", specs)
    assert store.acquire(ids, specs, (1,), NOW).allowed
    assert store.acquire(ids, specs, (1,), NOW).allowed
    denied = store.acquire(ids, specs, (1,), NOW + 100)
    assert figures(denied.statuses) == [(0, 0.0, 1.0, False)]
    store.adjust(ids, specs, (-1,), NOW + 100)
    assert store.acquire(ids, specs, (1,), NOW + 100).allowed
    store.adjust(ids, specs, (-5,), NOW + 100)  # over-release clamps at zero
    assert store.peek(ids, specs, NOW + 100)[0].remaining == 2


def test_a_cost_beyond_capacity_never_fits_and_charges_nothing(store: CounterStore) -> None:
    specs = (make_limit("tokens", 1000, "minute"), make_limit("tokens", 5000, "day"))
    ids = ids_for("alice", specs)
    result = store.acquire(ids, specs, (1001, 1001), NOW)
    assert not result.allowed
    assert result.statuses[0].retry_after == math.inf and result.statuses[1].allowed
    assert figures(store.peek(ids, specs, NOW)) == [(1000, 0.0, 0.0, True), (5000, 0.0, 0.0, True)]


def test_counters_are_independent(store: CounterStore) -> None:
    specs = (make_limit("requests", 1, "minute"),)
    assert store.acquire(ids_for("alice", specs), specs, (1,), NOW).allowed
    assert store.acquire(ids_for("bob", specs), specs, (1,), NOW).allowed
    assert not store.acquire(ids_for("alice", specs), specs, (1,), NOW).allowed


# -- atomicity and shadow ---------------------------------------------------------------------------------


def test_a_denial_consumes_nothing_in_any_window(store: CounterStore) -> None:
    rpm = make_limit("requests", 10, "minute")
    tpm = make_limit("tokens", 1000, "minute")
    tpd = make_limit("tokens", 5000, "day")
    conc = make_limit("concurrent", 3)
    specs = (rpm, tpm, tpd, conc)
    ids = ids_for("alice", specs)
    assert store.acquire(ids, specs, (1, 900, 900, 1), NOW).allowed
    before = store.peek(ids, specs, NOW + 1)
    denied = store.acquire(ids, specs, (1, 200, 200, 1), NOW + 1)  # tokens/minute refuses
    assert not denied.allowed and denied.uncharged == 0b1111
    assert [s.spec for s in denied.denied_by] == [tpm]
    # the windows that would have fitted report themselves as they are, not as if charged
    assert [denied.statuses[i] for i in (0, 2, 3)] == [before[i] for i in (0, 2, 3)]
    assert denied.statuses[0].remaining == 9 and denied.statuses[3].remaining == 2
    assert denied.statuses[1].remaining == before[1].remaining and denied.statuses[1].retry_after > 0
    assert store.peek(ids, specs, NOW + 1) == before
    for _ in range(5):
        store.acquire(ids, specs, (1, 200, 200, 1), NOW + 1)
    assert store.peek(ids, specs, NOW + 1) == before


def test_tenant_and_group_windows_are_shared_and_charged_all_or_nothing(store: CounterStore) -> None:
    """The budget hierarchy (core/hierarchy.py): a tenant's and a group's windows have one counter id for
    every key; a request charges its key's windows and the shared ones in one step, or none of them."""
    import dataclasses

    from nexus_authz.core.hierarchy import group_counter_id, tenant_counter_id

    own = make_limit("requests", 10, "minute")
    group = dataclasses.replace(make_limit("requests", 3, "minute"), level="group")
    budget = dataclasses.replace(make_limit("usd", 1_000_000, "month"), level="tenant")
    specs = (own, group, budget)
    shared = (group_counter_id("acme", "ml", group.name), tenant_counter_id("acme", budget.name))

    def ids(key: str) -> tuple[str, ...]:
        return (f"{key}\x00{own.name}", *shared)

    assert store.acquire(ids("k1"), specs, (1, 1, 600_000), NOW).allowed
    after_k1 = store.peek(ids("k2"), specs, NOW)
    assert [s.remaining for s in after_k1] == [10, 2, 400_000]  # k2's own window is untouched
    denied = store.acquire(ids("k2"), specs, (1, 1, 500_000), NOW)  # the tenant's budget refuses k2
    assert not denied.allowed and [s.spec for s in denied.denied_by] == [budget]
    assert denied.uncharged == 0b111 and store.peek(ids("k2"), specs, NOW) == after_k1  # nothing charged
    assert store.acquire(ids("k2"), specs, (1, 1, 400_000), NOW).allowed
    assert [s.remaining for s in store.peek(ids("k3"), specs, NOW)] == [10, 1, 0]
    store.adjust((shared[1],), (budget,), (-300_000,), NOW)  # a settlement's refund reaches every key
    assert [s.remaining for s in store.peek(ids("k1"), specs, NOW)] == [9, 1, 300_000]


def test_shadow_limits_are_reported_never_enforced_and_charged_as_if_enforced(store: CounterStore) -> None:
    real = make_limit("requests", 100, "minute")
    trial = make_limit("requests", 2, "minute", shadow=True)
    specs = (real, trial)
    ids = ids_for("alice", specs)
    results = [store.acquire(ids, specs, (1, 1), NOW) for _ in range(4)]
    assert all(r.allowed for r in results)
    assert [r.statuses[1].allowed for r in results] == [True, True, False, False]
    assert [r.uncharged for r in results] == [0, 0, 0b10, 0b10]
    assert [r.statuses[0].remaining for r in results] == [99, 98, 97, 96]
    assert results[2].shadow_violations == (results[2].statuses[1],) and results[2].denied_by == ()
    # the shadow window holds what it would hold if enforced: 2, not 4
    assert store.peek(ids, specs, NOW)[1].remaining == 0
    assert store.peek(ids, specs, NOW + 30)[1].remaining == 1


def test_a_shadow_window_alone_never_denies(store: CounterStore) -> None:
    specs = (make_limit("tokens", 10, "minute", shadow=True),)
    ids = ids_for("alice", specs)
    result = store.acquire(ids, specs, (50,), NOW)
    assert result.allowed and not result.statuses[0].allowed and result.uncharged == 1


# -- settle -----------------------------------------------------------------------------------------------


def test_adjust_refunds_and_charges_extra_now(store: CounterStore) -> None:
    tpm = make_limit("tokens", 1000, "minute")
    tpd = make_limit("tokens", 5000, "day")
    specs = (tpm, tpd)
    ids = ids_for("alice", specs)
    assert store.acquire(ids, specs, (800, 800), NOW).allowed
    store.adjust(ids, specs, (-600, -600), NOW + 60, charged_at=NOW)
    assert [s.remaining for s in store.peek(ids, specs, NOW + 60)] == [1000, 4800]
    store.adjust(ids, specs, (+1500, +1500), NOW + 60, charged_at=NOW)  # more than the whole minute
    peek = store.peek(ids, specs, NOW + 60, (1, 1))
    assert not peek[0].allowed and peek[0].remaining == 0
    assert peek[0].retry_after == pytest.approx(30.06)  # 1500 tokens at 60 ms each, minus the 60 s burst
    assert peek[1].allowed and peek[1].remaining == 3300  # as it is: the request as a whole is refused


def test_a_sliding_refund_comes_out_of_the_slot_it_was_charged_in(store: CounterStore) -> None:
    specs = (make_limit("tokens", 5000, "day"),)
    ids = ids_for("alice", specs)
    store.acquire(ids, specs, (3000,), NOW)
    store.acquire(ids, specs, (1000,), NOW + 3600)
    store.adjust(ids, specs, (-2500,), NOW + 3700, charged_at=NOW)
    assert store.peek(ids, specs, NOW + 3700)[0].remaining == 3500
    assert store.peek(ids, specs, NOW + 86400)[0].remaining == 4000  # the 500 left, the 1000 stays


def test_peek_is_a_dry_run_of_acquire(make_store: Callable[[], CounterStore]) -> None:
    specs = (make_limit("requests", 5, "minute"), make_limit("tokens", 100, "minute"))
    ids = ids_for("alice", specs)
    dry_run, real = make_store(), make_store()
    for s in (dry_run, real):
        s.acquire(ids, specs, (1, 60), NOW)
    for costs in [(1, 30), (1, 50), (9, 10), (1, 10)]:
        dry = dry_run.peek(ids, specs, NOW + 1, costs)
        assert dry == dry_run.peek(ids, specs, NOW + 1, costs)  # changes nothing
        result = real.acquire(ids, specs, costs, NOW + 1)
        assert dry == result.statuses
        if result.allowed:  # keep the two in step
            dry_run.acquire(ids, specs, costs, NOW + 1)


def test_the_reserve_settle_cycle(store: CounterStore) -> None:
    specs = (
        make_limit("requests", 100, "minute"),
        make_limit("tokens", 1000, "minute"),
        make_limit("concurrent", 1),
    )
    ids = ids_for("alice", specs)
    book = ReservationBook(ttl=300, max_entries=100)
    result = store.acquire(ids, specs, (1, 900, 1), NOW)
    assert result.allowed
    assert book.reserve("req-1", ids, specs, (1, 900, 1), NOW, result.uncharged) == ()
    assert not store.acquire(ids, specs, (1, 10, 1), NOW + 1).allowed  # one in flight
    settlement = book.settle("req-1", NOW + 2, tokens=120)
    assert settlement is not None and settlement.deltas == (0, -780, -1)
    apply_settlements(store, [settlement], NOW + 2)
    statuses = store.peek(ids, specs, NOW + 2)
    # requests: drained again; tokens: 900 at 60 ms each, 2 s drained, 780 back: 86.7 owed; the slot free
    assert [s.remaining for s in statuses] == [100, 913, 1]


# -- calendar periods ---------------------------------------------------------------------------------------
BERLIN_FEB_1 = 1_706_742_000.0  # 2024-02-01 00:00 Europe/Berlin (2024-01-31 23:00 UTC)
BERLIN_MAR_1 = 1_709_247_600.0  # 2024-03-01 00:00 Europe/Berlin


def test_a_calendar_month_resets_at_its_start_in_its_zone(store: CounterStore) -> None:
    specs = (make_limit("usd", 1_000_000, "month", calendar=True, timezone="Europe/Berlin"),)
    ids = ids_for("alice", specs)
    t = BERLIN_FEB_1 - 1800  # 2024-01-31 23:30 in Berlin, 22:30 UTC: still January there
    assert figures(store.acquire(ids, specs, (700_000,), t).statuses) == [(300_000, 1800.0, 0.0, True)]
    denied = store.acquire(ids, specs, (400_000,), t + 1000)
    assert figures(denied.statuses) == [(300_000, 800.0, 800.0, False)]  # retry at the month's start
    assert not store.acquire(ids, specs, (400_000,), BERLIN_FEB_1 - 0.001).allowed
    result = store.acquire(ids, specs, (400_000,), BERLIN_FEB_1)  # February: a fresh budget
    assert figures(result.statuses) == [(600_000, BERLIN_MAR_1 - BERLIN_FEB_1, 0.0, True)]
    assert store.peek(ids, specs, BERLIN_MAR_1 - 1)[0].remaining == 600_000
    assert figures(store.peek(ids, specs, BERLIN_MAR_1)) == [(1_000_000, 0.0, 0.0, True)]


def test_a_calendar_refund_only_within_the_period_it_was_charged_in(store: CounterStore) -> None:
    specs = (make_limit("tokens", 1000, "month", calendar=True, timezone="Europe/Berlin"),)
    ids = ids_for("alice", specs)
    t = BERLIN_FEB_1 - 600
    assert store.acquire(ids, specs, (800,), t).allowed
    store.adjust(ids, specs, (-300,), t + 60, charged_at=t)  # same period: given back
    assert store.peek(ids, specs, t + 60)[0].remaining == 500
    assert store.acquire(ids, specs, (400,), t + 120).allowed  # 900 used in January
    assert store.acquire(ids, specs, (600,), BERLIN_FEB_1 + 10).allowed  # February
    # a January reservation settled in February: its period is over, nothing comes back to February
    store.adjust(ids, specs, (-400,), BERLIN_FEB_1 + 20, charged_at=t + 120)
    assert store.peek(ids, specs, BERLIN_FEB_1 + 20)[0].remaining == 400
    # an extra charge is taken now, in the current period
    store.adjust(ids, specs, (+100,), BERLIN_FEB_1 + 30, charged_at=t + 120)
    assert store.peek(ids, specs, BERLIN_FEB_1 + 30)[0].remaining == 300
    store.adjust(ids, specs, (-5000,), BERLIN_FEB_1 + 40, charged_at=BERLIN_FEB_1 + 10)  # never below 0
    assert figures(store.peek(ids, specs, BERLIN_FEB_1 + 40)) == [(1000, 0.0, 0.0, True)]


def test_a_calendar_state_that_ended_reads_as_fresh_after_a_reload_changes_its_unit(
    store: CounterStore,
) -> None:
    """A reload that keeps a calendar limit's name but changes its unit (or zone) leaves the old period's
    state under the same counter id. Once that period has ended it counts for nothing: the new limit's
    first request sees a fresh window ending at its own period's end (before the fix the memory store and
    the Redis script both counted it, with a reset in the past: a negative reset_after)."""
    day = (make_limit("tokens", 1000, "day", calendar=True, timezone="Europe/Berlin", name="budget"),)
    month = (make_limit("tokens", 1000, "month", calendar=True, timezone="Europe/Berlin", name="budget"),)
    ids = ids_for("alice", day)
    assert ids == ids_for("alice", month)
    feb_10 = BERLIN_FEB_1 + 9 * 86400 + 36000  # 2024-02-10 10:00 in Berlin
    assert store.acquire(ids, day, (300,), feb_10).allowed
    feb_11 = feb_10 + 86400  # the day's period ended 10 hours ago
    assert figures(store.peek(ids, month, feb_11)) == [(1000, 0.0, 0.0, True)]
    result = store.acquire(ids, month, (200,), feb_11)
    assert figures(result.statuses) == [(800, BERLIN_MAR_1 - feb_11, 0.0, True)]
    store.adjust(ids, month, (-50,), feb_11 + 60, charged_at=feb_11)
    assert store.peek(ids, month, feb_11 + 60)[0].remaining == 850


@pytest.mark.parametrize(
    ("local_midnight", "hours"),
    [
        (1_710_046_800.0, 23),  # 2024-03-10 00:00 America/New_York: clocks go forward, a 23-hour day
        (1_730_606_400.0, 25),  # 2024-11-03 00:00 America/New_York: clocks go back, a 25-hour day
    ],
)
def test_a_calendar_day_across_dst_lasts_23_or_25_hours(
    store: CounterStore, local_midnight: float, hours: int
) -> None:
    specs = (make_limit("requests", 2, "day", calendar=True, timezone="America/New_York"),)
    ids = ids_for("alice", specs)
    assert figures(store.acquire(ids, specs, (1,), local_midnight).statuses) == [
        (1, hours * 3600.0, 0.0, True)
    ]
    assert store.acquire(ids, specs, (1,), local_midnight + 3 * 3600).allowed  # past the change of clocks
    last = local_midnight + hours * 3600 - 1
    assert figures(store.acquire(ids, specs, (1,), last).statuses) == [(0, 1.0, 1.0, False)]
    assert store.acquire(ids, specs, (1,), last + 1).allowed  # the next local midnight


# -- differential: every backend behaves like the reference reading of the semantics -------------------------


class ReferenceStore:
    """The semantics with nothing clever: plain dict, no eviction, copy-then-commit."""

    def __init__(self) -> None:
        self.states: dict[str, Any] = {}

    def _take(self, cid: str, spec: LimitSpec, cost: int, now: float) -> tuple[Any, ...]:
        state = self.states.get(cid)
        if spec.algorithm is Algorithm.GCRA:
            debt, since = state if state is not None else (0.0, now)
            return gcra_take(debt, since, now, spec, cost)
        if spec.algorithm is Algorithm.SLIDING:
            return sliding_take(state, now, spec, cost)
        if spec.algorithm is Algorithm.CALENDAR:
            return calendar_take(state, now, spec, cost)
        return gauge_take(state or 0, spec, cost)

    def acquire(
        self, ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
    ) -> AcquireResult:
        outs = [self._take(c, s, k, now) for c, s, k in zip(ids, specs, costs, strict=True)]
        allowed = all(o[0] or s.shadow for o, s in zip(outs, specs, strict=True))
        statuses = []
        uncharged = 0
        for i, (cid, spec, cost, out) in enumerate(zip(ids, specs, costs, outs, strict=True)):
            if allowed and out[0]:
                if spec.algorithm is Algorithm.GCRA:
                    self.states[cid] = (out[1], now)
                elif spec.algorithm is Algorithm.SLIDING:
                    if cost:
                        self.states[cid] = sliding_charge(self.states.get(cid), now, spec, cost)
                elif spec.algorithm is Algorithm.CALENDAR:
                    if cost:
                        self.states[cid] = calendar_charge(self.states.get(cid), now, spec, cost)
                else:
                    self.states[cid] = out[1]
            else:
                uncharged |= 1 << i
            if not allowed and out[0]:
                out = self._take(cid, spec, 0, now)
            statuses.append(WindowStatus(spec, spec.limit, out[2], out[3], out[4], out[0]))
        return AcquireResult(allowed, tuple(statuses), uncharged)

    def adjust(
        self,
        ids: Sequence[str],
        specs: Sequence[LimitSpec],
        deltas: Sequence[int],
        now: float,
        charged_at: float | None = None,
    ) -> None:
        for cid, spec, delta in zip(ids, specs, deltas, strict=True):
            if not delta:
                continue
            state = self.states.get(cid)
            if spec.algorithm is Algorithm.GCRA:
                debt, since = state if state is not None else (0.0, now)
                self.states[cid] = (gcra_adjust(debt, since, now, spec, delta), now)
            elif spec.algorithm is Algorithm.SLIDING:
                if delta > 0:
                    self.states[cid] = sliding_charge(state, now, spec, delta)
                elif state is not None:
                    sliding_refund(state, now, spec, -delta, charged_at)
            elif spec.algorithm is Algorithm.CALENDAR:
                if delta > 0:
                    self.states[cid] = calendar_charge(state, now, spec, delta)
                elif state is not None:
                    calendar_refund(state, now, spec, -delta, charged_at)
            else:
                self.states[cid] = gauge_adjust(state or 0, delta)

    def peek(
        self, ids: Sequence[str], specs: Sequence[LimitSpec], now: float, costs: Sequence[int] | None = None
    ) -> tuple[WindowStatus, ...]:
        saved = {k: (array("d", v) if isinstance(v, array) else v) for k, v in self.states.items()}
        try:
            return self.acquire(ids, specs, costs or [0] * len(specs), now).statuses
        finally:
            self.states = saved


SPEC_POOL = (
    make_limit("requests", 3, "second", burst=2),
    make_limit("requests", 20, "minute"),
    make_limit("tokens", 50, "minute"),
    make_limit("tokens", 120, "day", slots=6),
    make_limit("tokens", 30, "minute", algorithm="sliding", slots=4),
    make_limit("usd", 80, "day", slots=3),
    make_limit("concurrent", 2),
    make_limit("tokens", 20, "minute", shadow=True),
    make_limit("requests", 4, "minute", algorithm="sliding", slots=3, shadow=True),
    make_limit("tokens", 90, "day", calendar=True, timezone="America/New_York"),  # midnight: NOW + 6 h
)
_N = len(SPEC_POOL)
op = st.one_of(
    st.tuples(st.just("acquire"), st.integers(0, 2), st.lists(st.integers(0, 40), min_size=_N, max_size=_N)),
    st.tuples(st.just("adjust"), st.integers(0, 2), st.lists(st.integers(-40, 40), min_size=_N, max_size=_N)),
    st.tuples(st.just("peek"), st.integers(0, 2), st.lists(st.integers(0, 40), min_size=_N, max_size=_N)),
)
gaps = st.one_of(st.integers(0, 64), st.integers(0, 64 * 30), st.integers(0, 64 * 20_000))  # 1/64 s units
ops = st.lists(st.tuples(gaps, st.sets(st.integers(0, _N - 1), min_size=1), op), max_size=40)


def run_ops(store: Any, steps: list[Any]) -> list[Any]:
    """Apply the steps; returns every answer. Gaps are on a 1/64 s grid, from 0 to ~3.5 days."""
    now = NOW
    answers: list[Any] = []
    for gap, chosen, (kind, key, numbers) in steps:
        now += gap / 64
        picked = sorted(chosen)
        specs = tuple(SPEC_POOL[i] for i in picked)
        ids = tuple(f"k{key}\x00{i}" for i in picked)
        values = tuple(numbers[i] for i in picked)
        if kind == "acquire":
            costs = tuple(
                1 if s.kind in ("requests", "concurrent") else v for s, v in zip(specs, values, strict=True)
            )
            r = store.acquire(ids, specs, costs, now)
            answers.append((r.allowed, r.uncharged, figures(r.statuses)))
        elif kind == "adjust":
            store.adjust(ids, specs, values, now, charged_at=now - (gap / 64) / 2)
        else:
            answers.append(figures(store.peek(ids, specs, now, values)))
    return answers


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=ops)
def test_behaves_like_the_reference(make_store: Callable[[], CounterStore], steps: list[Any]) -> None:
    assert run_ops(make_store(), steps) == run_ops(ReferenceStore(), steps)


# -- memory only: exact eviction ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(steps=ops)
def test_memory_eviction_is_exact(steps: list[Any]) -> None:
    """A store that drops every fresh window at every call answers exactly like one that keeps them."""

    class EagerlySwept(MemoryCounterStore):
        def acquire(self, *args: Any) -> AcquireResult:
            self.sweep(args[-1])
            return super().acquire(*args)

        def peek(self, ids: Any, specs: Any, now: float, costs: Any = None) -> tuple[WindowStatus, ...]:
            self.sweep(now)
            return super().peek(ids, specs, now, costs)

    keeper = MemoryCounterStore(sweep_per_call=0)
    sweeper = EagerlySwept(sweep_per_call=10**6)
    assert run_ops(sweeper, steps) == run_ops(keeper, steps)
    assert len(sweeper) <= len(keeper)


def test_memory_idle_windows_are_evicted_a_few_per_call() -> None:
    store = MemoryCounterStore(sweep_per_call=1)
    specs = (make_limit("requests", 10, "minute"), make_limit("tokens", 100, "day"))
    for k in range(500):
        store.acquire(ids_for(f"k{k}", specs), specs, (1, 1), NOW)
    assert len(store) == 1000
    # an hour later the minute windows are fresh, the day windows are not
    hot = ids_for("hot", specs[:1])
    for i in range(100):
        store.acquire(hot, specs[:1], (1,), NOW + 3600 + i)
    # at most one id looked at per call (no scan); a fresh one is marked at its first look (no longer
    # counted), dropped at its next if nothing wrote to it meanwhile
    assert 1001 - 100 <= len(store) < 1001 and store.stats()["evicted"] == 0
    store.sweep(NOW + 3600 + 100)
    assert len(store) == 501  # the 500 day windows and the hot key; nothing else
    store.sweep(NOW + 2 * 86400)
    assert len(store) == 0 and store.stats() == {"counters": 0, "evicted": 1001}


def test_memory_the_per_call_sweep_looks_at_its_ids_a_batch_at_a_time() -> None:
    """Each acquire owes the walk `sweep_per_call` ids; they are looked at a batch at a time, when SWEEP_BATCH
    ids are owed (the sweep's code and the walk's lists touched once per batch, not on every check): no id
    before, then the whole batch's."""
    assert 1 < SWEEP_BATCH <= 64
    store = MemoryCounterStore(sweep_per_call=1)
    drained = make_limit("requests", 10, "second")  # one request: 0.1 s of debt
    for k in range(3 * SWEEP_BATCH):
        store.acquire(ids_for(f"k{k}", (drained,)), (drained,), (1,), NOW)
    store.sweep(NOW, 0)
    hot = make_limit("requests", 10**6, "second")
    hot_ids = ids_for("hot", (hot,))
    owed = (3 * SWEEP_BATCH) % SWEEP_BATCH  # what the first calls owed already (none: a multiple)
    for i in range(SWEEP_BATCH - 1 - owed):
        store.acquire(hot_ids, (hot,), (1,), NOW + 10 + i * 1e-3)
        assert len(store) == 3 * SWEEP_BATCH + 1  # owed, not looked at yet
    store.acquire(hot_ids, (hot,), (1,), NOW + 11)
    # the batch: every id it looked at was drained: marked idle (no longer counted), dropped at its next look
    assert len(store) == 2 * SWEEP_BATCH + 1 and store.stats()["evicted"] == 0
    for i in range(8 * SWEEP_BATCH):  # the rest of this walk, and the next: each drained id looked at again
        store.acquire(hot_ids, (hot,), (1,), NOW + 12 + i * 1e-3)
    assert len(store) == 1 and store.stats()["evicted"] == 3 * SWEEP_BATCH


def test_memory_the_batched_sweep_keeps_a_store_of_drained_windows_bounded() -> None:
    """A new key a call, each drained a few calls later: the per-call sweep (a batch at a time) drops them
    as fast as they come, so the store holds a bounded number of ids (without it: one per call)."""
    spec = make_limit("requests", 10, "second")
    store = MemoryCounterStore(sweep_per_call=2)
    most = 0
    for k in range(4000):
        store.acquire(ids_for(f"k{k}", (spec,)), (spec,), (1,), NOW + k * 0.05)
        most = max(most, len(store._states))
        assert len(store._walk) - store._cursor + len(store._next) == len(store._states)
    assert most <= 4 * SWEEP_BATCH + 8, most
    assert store.stats()["evicted"] >= 4000 - most


def test_memory_a_window_a_write_leaves_fresh_is_dropped_by_the_walk_and_walked_once() -> None:
    """A window drained by a write is held as None (read as fresh, not `in` the store nor counted by
    len) until the sweep's walk drops it; a window drained and charged again and again is still one id
    in the walk (its lists do not grow), and every id is looked at within two walks."""
    store = MemoryCounterStore(sweep_per_call=0)
    gauge = make_limit("concurrent", 2)
    ids = ids_for("k", (gauge,))
    for i in range(1000):  # take a slot, give it back: fresh each time
        assert store.acquire(ids, (gauge,), (1,), NOW + i).allowed
        assert ids[0] in store
        store.adjust(ids, (gauge,), (-1,), NOW + i)
        assert ids[0] not in store and store.peek(ids, (gauge,), NOW + i)[0].remaining == 2
    assert len(store) == 0 and len(store._states) == 1  # held as None: not counted
    assert len(store._walk) + len(store._next) == 1  # one id, once
    specs = (make_limit("requests", 10, "minute"),)
    for k in range(50):
        store.acquire(ids_for(f"x{k}", specs), specs, (1,), NOW)
    assert store.sweep(NOW + 3600, 51) == 0  # a walk: every id looked at once, each fresh: marked idle
    assert len(store) == 0 and len(store._states) == 51
    assert store.sweep(NOW + 3600, 51) == 51  # the next walk: none written since, all dropped
    assert len(store._states) == 0 and store.stats()["evicted"] == 51


def test_memory_a_window_written_between_two_looks_stays() -> None:
    """The walk drops a window fresh at two looks in a row with no write between them: one whose key
    keeps coming (a per-minute window of a generous limit, fresh within microseconds; a concurrency slot
    taken and given back) keeps its id in the dict, instead of leaving at each look and coming back as a
    new entry (whose deleted slots made a 10,000-key store's dict rebuild whole every minute or so)."""
    store = MemoryCounterStore(sweep_per_call=0)
    specs = (make_limit("requests", 10**9, "minute"), make_limit("concurrent", 10))
    ids = ids_for("busy", specs)
    for i in range(20):
        assert store.acquire(ids, specs, (1, 1), NOW + i).allowed
        store.adjust(ids[1:], specs[1:], (-1,), NOW + i)  # the slot back: that window fresh again
        assert ids[1] not in store  # the slot's window fresh: its answers are an empty window's
        assert store.sweep(NOW + i + 0.5, 2) == 0  # a look between two requests: marked, never dropped
        assert ids[0] not in store  # (the requests window, fresh half a second later)
        assert set(store._states) == set(ids)  # the same two entries all along
    assert store.sweep(NOW + 30, 2) == 2 and not store._states  # no request since the last look: gone
    assert store.stats() == {"counters": 0, "evicted": 2}


def test_memory_a_window_costs_its_state_and_a_dict_slot() -> None:
    """~70 B a GCRA window besides its id (complex 32 B, dict slot, the walk's reference); an
    OrderedDict's LRU order cost ~45 B more (benchmarks/bench_memory.py: the limiter's bytes)."""
    spec = make_limit("requests", 10, "hour")
    ids = [ids_for(f"key-{i}", (spec,)) for i in range(20_000)]
    store = MemoryCounterStore(sweep_per_call=1)
    tracemalloc.start()
    try:
        for i, cid in enumerate(ids):
            store.acquire(cid, (spec,), (1,), NOW + i * 1e-3)
        used = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(store) == 20_000
    assert used / 20_000 < 90, used / 20_000


def test_memory_a_window_that_changed_shape_starts_fresh() -> None:
    store = MemoryCounterStore()
    old = make_limit("tokens", 100, "day", slots=24)
    new = make_limit("tokens", 100, "day", slots=12)
    store.acquire(("k",), (old,), (100,), NOW)
    assert store.peek(("k",), (new,), NOW)[0].remaining == 100
    gcra = make_limit("tokens", 100, "day", algorithm="gcra")
    assert store.acquire(("k",), (gcra,), (100,), NOW).allowed


@settings(max_examples=150, deadline=None)
@given(steps=ops)
def test_memory_one_slot_windows_answer_like_full_ones(steps: list[Any]) -> None:
    """Sliding windows kept in the one-slot form until a second slot is charged (core/windows.py) give
    the same answers as windows kept in the full form from the start."""

    class Full(MemoryCounterStore):
        _compact = False

    assert run_ops(MemoryCounterStore(), steps) == run_ops(Full(), steps)


def test_memory_a_sliding_window_stays_small_until_a_second_slot_is_charged() -> None:
    store = MemoryCounterStore()
    spec = make_limit("tokens", 1000, "day", slots=24)  # hourly slots
    ids = ("k\x00day",)
    store.acquire(ids, (spec,), (10,), NOW)
    store.adjust(ids, (spec,), (-4,), NOW + 1, charged_at=NOW)  # a refund keeps the one-slot form
    store.acquire(ids, (spec,), (10,), NOW + 60)
    state = store._states[ids[0]]
    assert isinstance(state, array) and len(state) == 5  # not 3 + 24 doubles
    assert store.peek(ids, (spec,), NOW + 61)[0].remaining == 1000 - 16
    store.acquire(ids, (spec,), (10,), NOW + 3 * 3600)  # another slot: the full form
    assert len(store._states[ids[0]]) == 27
    assert store.peek(ids, (spec,), NOW + 3 * 3600)[0].remaining == 1000 - 26
    assert store.peek(ids, (spec,), NOW + 25 * 3600)[0].remaining == 1000 - 10  # the first slot left
