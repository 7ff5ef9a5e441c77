"""Limit maths: the stated guarantees hold, nothing that fits is refused, and the figures a client sees
(remaining, reset, retry) agree with what its next request gets. Fake clock throughout.

The exact properties use dyadic rationals (emission intervals and slot widths of k/64 s, arrival times
on a 1/64 s grid) so every float operation is exact and the implementation can be compared decision by
decision with a brute-force reference in `Fraction` arithmetic. A second GCRA property uses arbitrary
limits and Unix-epoch times and allows for float rounding.
"""

from __future__ import annotations

import math
from array import array
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_authz.core.config import parse_limits
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.limits import (
    PERIODS,
    Algorithm,
    Kind,
    LimitSpec,
    applicable,
    gauge_adjust,
    gauge_take,
    gcra_adjust,
    gcra_is_fresh,
    gcra_take,
    make_limit,
    sliding_charge,
    sliding_is_fresh,
    sliding_refund,
    sliding_take,
    sliding_used,
    slot_of,
)

BASE = 1_000_000.0  # far from 0, so now >= boundary / 2 (Sterbenz) as with real clocks
GRID = 64  # arrival times on a 1/64 s grid: exact in doubles


def gcra_spec(interval: Fraction, limit: int, burst: int) -> LimitSpec:
    return LimitSpec(
        kind=Kind.TOKENS,
        limit=limit,
        period=float(interval * limit),
        burst=burst,
        algorithm=Algorithm.GCRA,
        slots=0,
        shadow=False,
        model=None,
        name="t",
    )


def sliding_spec(width: Fraction, slots: int, limit: int) -> LimitSpec:
    return LimitSpec(
        kind=Kind.TOKENS,
        limit=limit,
        period=float(width * slots),
        burst=limit,
        algorithm=Algorithm.SLIDING,
        slots=slots,
        shadow=False,
        model=None,
        name="t",
    )


@st.composite
def gcra_cases(draw: st.DrawFn) -> tuple[LimitSpec, list[tuple[float, int]]]:
    interval = Fraction(draw(st.integers(1, 128)), GRID)
    limit = draw(st.integers(1, 30))
    burst = draw(st.integers(1, 2 * limit))
    steps = draw(
        st.lists(st.tuples(st.integers(0, 3 * GRID), st.integers(0, burst + 2)), min_size=1, max_size=50)
    )
    t = Fraction(int(BASE))
    arrivals = []
    for dt, cost in steps:
        t += Fraction(dt, GRID)
        arrivals.append((float(t), cost))
    return gcra_spec(interval, limit, burst), arrivals


def gcra_reference_fits(spec: LimitSpec, admitted: list[tuple[float, int]], now: float, cost: int) -> bool:
    """Admit iff admitting keeps `sum <= burst + (now - s) / T` for every interval [s, now]."""
    if cost > spec.burst:
        return False
    interval = Fraction(spec.period) / spec.limit
    total = Fraction(cost)
    starts = [now, *(t for t, _ in reversed(admitted))]
    costs = [0, *(c for _, c in reversed(admitted))]
    for s, c in zip(starts, costs, strict=True):  # walking back, adding earlier arrivals
        total += c
        if total > spec.burst + (Fraction(now) - Fraction(s)) / interval:
            return False
    return True


# -- GCRA ------------------------------------------------------------------------------------------------
# The state is (debt, since); these helpers thread it through like a store does.

FRESH = (0.0, 0.0)


def take(
    state: tuple[float, float], now: float, spec: LimitSpec, cost: int
) -> tuple[bool, tuple[float, float], int, float, float]:
    allowed, debt, remaining, reset_after, retry_after = gcra_take(state[0], state[1], now, spec, cost)
    return allowed, ((debt, now) if allowed else state), remaining, reset_after, retry_after


def fits(state: tuple[float, float], now: float, spec: LimitSpec, cost: int) -> bool:
    return gcra_take(state[0], state[1], now, spec, cost)[0]


@settings(max_examples=150, deadline=None)
@given(gcra_cases())
def test_gcra_matches_the_brute_force_reference_and_never_exceeds_its_guarantee(
    case: tuple[LimitSpec, list[tuple[float, int]]],
) -> None:
    spec, arrivals = case
    state = FRESH
    admitted: list[tuple[float, int]] = []
    for now, cost in arrivals:
        expected = gcra_reference_fits(spec, admitted, now, cost)
        allowed, state, _, _, _ = take(state, now, spec, cost)
        assert allowed == expected, (now, cost, admitted)
        if allowed:
            admitted.append((now, cost))
    # the guarantee, over every interval between admitted arrivals
    rate = Fraction(spec.limit) / Fraction(spec.period)
    for i in range(len(admitted)):
        total = 0
        for j in range(i, len(admitted)):
            total += admitted[j][1]
            assert total <= spec.burst + rate * (Fraction(admitted[j][0]) - Fraction(admitted[i][0]))


@settings(max_examples=150, deadline=None)
@given(gcra_cases())
def test_gcra_figures_agree_with_what_the_next_request_gets(
    case: tuple[LimitSpec, list[tuple[float, int]]],
) -> None:
    spec, arrivals = case
    state = FRESH
    for now, cost in arrivals:
        before = state
        allowed, state, remaining, reset_after, retry_after = take(state, now, spec, cost)
        if allowed:
            assert retry_after == 0.0
            # exactly `remaining` more units fit right now
            probe = state
            for _ in range(remaining):
                ok, probe, _, _, _ = take(probe, now, spec, 1)
                assert ok
            assert not fits(probe, now, spec, 1)
        elif cost > spec.burst:
            assert retry_after == math.inf
        else:
            # retry_after later the same request is admitted; a moment before it is not
            assert retry_after > 0 and state == before
            assert fits(state, now + retry_after, spec, cost)
            assert not fits(state, now + retry_after - 1 / 1024, spec, cost)
            assert remaining < cost
        # reset_after later the window is back to its initial state, not before
        assert gcra_is_fresh(*state, now + reset_after)
        assert take(state, now + reset_after, spec, 0)[2] == spec.burst
        if reset_after > 0:
            assert not gcra_is_fresh(*state, now + reset_after - 1 / 1024)


@settings(max_examples=100, deadline=None)
@given(
    limit=st.integers(1, 200_000),
    per=st.sampled_from(["second", "minute", "hour"]),
    burst_factor=st.floats(0.05, 2.0),
    steps=st.lists(st.tuples(st.floats(0, 30), st.integers(1, 50_000)), min_size=1, max_size=40),
)
def test_gcra_guarantee_holds_with_arbitrary_limits_and_epoch_times(
    limit: int, per: str, burst_factor: float, steps: list[tuple[float, int]]
) -> None:
    burst = max(1, int(limit * burst_factor))
    spec = make_limit("requests", limit, per, burst=burst, algorithm="gcra")
    interval = Fraction(spec.period) / limit
    tol = Fraction(burst, 10**8)  # admission tolerates 1e-9 of the burst; a little more for the reference
    now = 1_700_000_000.0
    state = FRESH
    admitted: list[tuple[float, int]] = []
    for dt, raw_cost in steps:
        now += dt
        cost = min(raw_cost, burst)
        allowed, state, _, _, _ = take(state, now, spec, cost)
        if allowed:
            admitted.append((now, cost))
        else:  # refused: it really would have broken the bound
            total = Fraction(cost)
            violated = False
            for s, c in reversed([*admitted, (now, 0)]):
                total += c
                if total > burst + (Fraction(now) - Fraction(s)) / interval - tol:
                    violated = True
                    break
            assert violated
    for i in range(len(admitted)):
        total = 0
        for j in range(i, len(admitted)):
            total += admitted[j][1]
            assert total <= burst + (Fraction(admitted[j][0]) - Fraction(admitted[i][0])) / interval + tol


def test_gcra_a_burst_at_epoch_times_admits_exactly_the_burst() -> None:
    # one epoch-sized float tat would round each charge to 2.4e-7 s and admit only 2 of these 3
    spec = make_limit("requests", 5, "second", burst=3)
    state, now = FRESH, 1_700_000_000.123
    for expected in (2, 1, 0):
        allowed, state, remaining, _, _ = take(state, now, spec, 1)
        assert allowed and remaining == expected
    assert not fits(state, now, spec, 1)
    assert fits(state, now + 0.2, spec, 1)


def test_gcra_burst_then_rate() -> None:
    spec = make_limit("requests", 60, "minute", burst=10)  # one per second, ten at once
    state, now = FRESH, BASE
    for i in range(10):
        allowed, state, remaining, _, _ = take(state, now, spec, 1)
        assert allowed and remaining == 9 - i
    allowed, _, remaining, reset_after, retry_after = take(state, now, spec, 1)
    assert not allowed and remaining == 0 and retry_after == 1.0 and reset_after == 10.0
    assert fits(state, now + 1.0, spec, 1)


def test_gcra_adjust_refunds_never_below_fresh_and_extra_charges_overdraw() -> None:
    spec = make_limit("tokens", 600, "minute")  # 10 tokens per second, burst 600
    now = BASE
    _, (debt, since), _, _, _ = take(FRESH, now, spec, 500)
    assert gcra_adjust(debt, since, now, spec, -400) == pytest.approx(10.0)  # 100 tokens left charged
    assert gcra_adjust(debt, since, now + 45, spec, -400) == 0.0  # drained to 50 meanwhile: never below 0
    over = gcra_adjust(debt, since, now, spec, +300)  # 800 charged: 200 over the burst
    allowed, _, remaining, _, retry_after = take((over, now), now, spec, 1)
    assert not allowed and remaining == 0 and retry_after == pytest.approx(20.1)
    assert gcra_adjust(0.0, now, now, spec, -5) == 0.0  # refund on an idle window: nothing to give


def test_gcra_clock_stepping_back_drains_nothing() -> None:
    spec = make_limit("requests", 1, "second", burst=1)
    _, state, _, _, _ = take(FRESH, BASE, spec, 1)
    assert not fits(state, BASE - 5, spec, 1)
    assert fits(state, BASE + 1, spec, 1)


# -- sliding window ---------------------------------------------------------------------------------------


@st.composite
def sliding_cases(draw: st.DrawFn) -> tuple[LimitSpec, list[tuple[float, int]]]:
    width = Fraction(draw(st.integers(1, 128)), 16)
    slots = draw(st.integers(2, 12))
    limit = draw(st.integers(1, 40))
    step = st.tuples(st.integers(0, int(width * slots * GRID)), st.integers(0, limit + 2))
    steps = draw(st.lists(step, min_size=1, max_size=60))
    t = Fraction(int(BASE))
    arrivals = []
    for dt, cost in steps:
        t += Fraction(dt, GRID)
        arrivals.append((float(t), cost))
    return sliding_spec(width, slots, limit), arrivals


def exact_slot(now: float, spec: LimitSpec) -> int:
    return math.floor(Fraction(now) / (Fraction(spec.period) / spec.slots))


@settings(max_examples=150, deadline=None)
@given(sliding_cases())
def test_sliding_matches_the_brute_force_reference_and_never_exceeds_its_guarantee(
    case: tuple[LimitSpec, list[tuple[float, int]]],
) -> None:
    spec, arrivals = case
    n = spec.slots
    state: array[float] | None = None
    per_slot: dict[int, int] = {}
    for now, cost in arrivals:
        k = exact_slot(now, spec)
        assert slot_of(now, spec.slot_width) == k
        held = sum(per_slot.get(s, 0) for s in range(k - n + 1, k + 1))
        expected = held + cost <= spec.limit
        allowed, _, remaining, _, _ = sliding_take(state, now, spec, cost)
        assert allowed == expected
        assert sliding_used(state, now, spec) == held
        if allowed:
            state = sliding_charge(state, now, spec, cost)
            per_slot[k] = per_slot.get(k, 0) + cost
            assert remaining == spec.limit - held - cost
    # guarantee: at most the limit in any N consecutive slots
    if per_slot:
        for first in range(min(per_slot) - n, max(per_slot) + 1):
            assert sum(per_slot.get(s, 0) for s in range(first, first + n)) <= spec.limit


@settings(max_examples=150, deadline=None)
@given(sliding_cases())
def test_sliding_figures_agree_with_what_the_next_request_gets(
    case: tuple[LimitSpec, list[tuple[float, int]]],
) -> None:
    spec, arrivals = case
    state: array[float] | None = None
    for now, cost in arrivals:
        allowed, _, remaining, reset_after, retry_after = sliding_take(state, now, spec, cost)
        if allowed:
            state = sliding_charge(state, now, spec, cost)
            probe = array("d", state)
            for _ in range(remaining):
                assert sliding_take(probe, now, spec, 1)[0]
                sliding_charge(probe, now, spec, 1)
            assert not sliding_take(probe, now, spec, 1)[0]
        elif cost > spec.limit:
            assert retry_after == math.inf
        else:
            assert retry_after > 0
            assert sliding_take(state, now + retry_after, spec, cost)[0]
            assert not sliding_take(state, now + retry_after - 1 / 1024, spec, cost)[0]
        if state is not None:
            assert sliding_used(state, now + reset_after, spec) == 0
            if reset_after > 0:
                assert sliding_used(state, now + reset_after - 1 / 1024, spec) > 0
                assert not sliding_is_fresh(state, now + reset_after - 1 / 1024)
            assert sliding_take(state, now + reset_after, spec, spec.limit)[0]  # back to its initial state


def test_sliding_day_window_rolls_hour_by_hour() -> None:
    spec = make_limit("tokens", 1000, "day")  # 24 hourly slots by default
    assert spec.algorithm is Algorithm.SLIDING and spec.slots == 24
    now = 1_700_000_000.0 - 1_700_000_000.0 % 3600  # the start of an hour
    state = sliding_charge(None, now, spec, 600)
    state = sliding_charge(state, now + 3600, spec, 400)
    allowed, _, remaining, reset_after, retry_after = sliding_take(state, now + 7200, spec, 1)
    assert not allowed and remaining == 0
    assert retry_after == 86400 - 7200  # the first hour's 600 leave the window after 24 hours
    assert reset_after == 86400 + 3600 - 7200
    assert sliding_take(state, now + 86400, spec, 600)[0]
    assert not sliding_take(state, now + 86400, spec, 601)[0]


def test_sliding_refund_takes_from_the_charged_slot_only_while_it_is_in_the_window() -> None:
    spec = make_limit("usd", 5, "day")  # 5_000_000 micro-dollars
    now = 1_700_002_800.0  # an exact hour boundary
    state = sliding_charge(None, now, spec, 3_000_000)
    state = sliding_charge(state, now + 3600, spec, 1_000_000)
    sliding_refund(state, now + 3700, spec, 2_500_000, charged_at=now)
    assert sliding_used(state, now + 3700, spec) == 1_500_000
    # the refunded slot empties before the later one: the window is exact
    assert sliding_used(state, now + 86400, spec) == 1_000_000
    # a refund for a charge that has left the window gives nothing back
    sliding_refund(state, now + 86400, spec, 400_000, charged_at=now)
    assert sliding_used(state, now + 86400, spec) == 1_000_000
    # without charged_at: the newest slots first, never more than is held
    sliding_refund(state, now + 86400, spec, 9_000_000)
    assert sliding_used(state, now + 86400, spec) == 0
    assert sliding_is_fresh(state, now + 86400)


def test_sliding_clock_stepping_back_keeps_counting_newer_slots() -> None:
    spec = sliding_spec(Fraction(1), 4, 10)
    state = sliding_charge(None, BASE + 3, spec, 6)
    assert sliding_used(state, BASE + 1, spec) == 6
    assert not sliding_take(state, BASE + 1, spec, 5)[0]
    sliding_charge(state, BASE + 1, spec, 4)  # lands in the newest slot, not in the past
    assert sliding_used(state, BASE + 6, spec) == 10
    assert sliding_used(state, BASE + 7, spec) == 0


def test_slot_of_is_consistent_with_float_boundaries() -> None:
    width = 60 / 7  # not representable: boundaries are defined as slot * width
    for s in range(10**6, 10**6 + 500):
        boundary = s * width
        assert slot_of(boundary, width) == s
        assert slot_of(math.nextafter(boundary, -math.inf), width) == s - 1


# -- concurrency ---------------------------------------------------------------------------------------------


def test_gauge() -> None:
    spec = make_limit("concurrent", 2)
    assert spec.algorithm is Algorithm.GAUGE and spec.period == 0
    assert gauge_take(0, spec, 1) == (True, 1, 1, 0.0, 0.0)
    assert gauge_take(1, spec, 1) == (True, 2, 0, 0.0, 0.0)
    allowed, in_flight, remaining, _, retry_after = gauge_take(2, spec, 1)
    assert not allowed and in_flight == 2 and remaining == 0 and retry_after == 1.0
    assert gauge_take(0, spec, 3)[4] == math.inf
    assert gauge_adjust(2, -1) == 1 and gauge_adjust(0, -1) == 0


# -- specs --------------------------------------------------------------------------------------------------


def test_defaults() -> None:
    assert make_limit("requests", 60, "minute").algorithm is Algorithm.GCRA
    assert make_limit("requests", 60, "minute").burst == 60
    assert make_limit("requests", 60, "minute").interval == 1.0
    assert make_limit("tokens", 10, "month").slots == 30
    assert make_limit("usd", 5_000_000, "day").algorithm is Algorithm.SLIDING
    assert make_limit("usd", 5_000_000, "month").period == 30 * 86400
    assert make_limit("tokens", 10, "day", algorithm="gcra").algorithm is Algorithm.GCRA
    assert make_limit("requests", 10, "minute", algorithm="sliding").slots == 60
    assert make_limit("requests", 10, "minute", model="gpt-4*").name == "requests/minute@gpt-4*"
    assert make_limit("tokens", 10, "minute", shadow=True).name == "tokens/minute:shadow"
    assert make_limit("concurrent", 4).name == "concurrent"
    with pytest.raises(ValueError):
        make_limit("tokens", 10, "second")
    with pytest.raises(ValueError):
        make_limit("tokens", 0, "minute")


def test_model_globs() -> None:
    specs = (
        make_limit("requests", 60, "minute"),
        make_limit("requests", 10, "minute", model="gpt-4*"),
        make_limit("tokens", 10, "minute", model="claude-3-?-sonnet"),
    )
    assert applicable(specs, "gpt-4o") == (0, 1)
    assert applicable(specs, "gpt-3.5-turbo") == (0,)
    assert applicable(specs, "claude-3-5-sonnet") == (0, 2)
    assert applicable(specs, None) == (0,)
    assert specs[1].applies_to("GPT-4") is False  # globs are case-sensitive, like model ids


# -- YAML -----------------------------------------------------------------------------------------------


def parse(raw: object) -> tuple[LimitSpec, ...]:
    return parse_limits(raw, source="nexus.yaml", field="plans.free.limits")


def test_parse_the_documented_example() -> None:
    specs = parse(
        [
            {"requests": 60, "per": "minute", "burst": 10},
            {"tokens": 100000, "per": "minute"},
            {"tokens": 2000000, "per": "day"},
            {"usd": 5.00, "per": "month"},
            {"concurrent": 4},
            {"requests": 10, "per": "minute", "model": "gpt-4*"},
            {"tokens": 5000, "per": "minute", "shadow": True},
            {"tokens": 9, "per": "hour", "algorithm": "sliding", "slots": 12, "name": "hourly-trial"},
        ]
    )
    assert [s.name for s in specs] == [
        "requests/minute",
        "tokens/minute",
        "tokens/day",
        "usd/month",
        "concurrent",
        "requests/minute@gpt-4*",
        "tokens/minute:shadow",
        "hourly-trial",
    ]
    assert specs[0].burst == 10 and specs[0].limit == 60 and specs[0].period == 60
    assert specs[2].algorithm is Algorithm.SLIDING and specs[2].slots == 24
    assert specs[3].kind is Kind.USD and specs[3].limit == 5_000_000
    assert specs[4].kind is Kind.CONCURRENCY and specs[4].limit == 4
    assert specs[6].shadow and not specs[0].shadow
    assert specs[7].slot_width == 300
    assert parse(None) == ()
    assert parse([]) == ()


@pytest.mark.parametrize(
    ("value", "micros"),
    [(5, 5_000_000), (5.1, 5_100_000), ("0.000001", 1), (0.0000015, 2), ("12.34", 12_340_000)],
)
def test_usd_amounts_are_exact_micro_dollars(value: object, micros: int) -> None:
    assert parse([{"usd": value, "per": "day"}])[0].limit == micros


@pytest.mark.parametrize(
    ("entry", "field", "message"),
    [
        ({"requests": 60, "per": "fortnight"}, "plans.free.limits[0].per", "unknown unit 'fortnight'"),
        ({"requests": 60, "per": "month"}, "plans.free.limits[0].per", "not available for requests"),
        ({"tokens": 60, "per": "second"}, "plans.free.limits[0].per", "not available for tokens"),
        ({"usd": 1, "per": "hour"}, "plans.free.limits[0].per", "not available for usd"),
        ({"requests": 60}, "plans.free.limits[0].per", "is required"),
        ({"per": "minute"}, "plans.free.limits[0]", "exactly one of requests, tokens, usd, concurrent"),
        ({"requests": 1, "tokens": 2, "per": "minute"}, "plans.free.limits[0].tokens", "also has 'requests'"),
        ({"requests": 0, "per": "minute"}, "plans.free.limits[0].requests", "between 1 and"),
        ({"requests": -1, "per": "minute"}, "plans.free.limits[0].requests", "between 1 and"),
        ({"requests": 1.5, "per": "minute"}, "plans.free.limits[0].requests", "positive integer"),
        ({"requests": True, "per": "minute"}, "plans.free.limits[0].requests", "positive integer"),
        ({"tokens": "lots", "per": "minute"}, "plans.free.limits[0].tokens", "positive integer"),
        ({"usd": 0, "per": "day"}, "plans.free.limits[0].usd", "positive amount"),
        ({"usd": "five", "per": "day"}, "plans.free.limits[0].usd", "amount in USD"),
        ({"usd": float("nan"), "per": "day"}, "plans.free.limits[0].usd", "positive amount"),
        ({"requests": 1, "per": "minute", "brust": 3}, "plans.free.limits[0].brust", "unknown field"),
        ({"requests": 1, "per": "minute", "algorithm": "leaky"}, "plans.free.limits[0].algorithm", "unknown"),
        ({"tokens": 1, "per": "day", "burst": 3}, "plans.free.limits[0].burst", "gcra only"),
        ({"tokens": 1, "per": "minute", "slots": 3}, "plans.free.limits[0].slots", "sliding only"),
        ({"tokens": 1, "per": "day", "slots": 1}, "plans.free.limits[0].slots", "between 2 and"),
        ({"concurrent": 2, "per": "minute"}, "plans.free.limits[0].per", "concurrency"),
        ({"concurrent": 2, "burst": 3}, "plans.free.limits[0].burst", "concurrency"),
        ({"requests": 1, "per": "minute", "shadow": "yes"}, "plans.free.limits[0].shadow", "true or false"),
        ({"requests": 1, "per": "minute", "model": ""}, "plans.free.limits[0].model", "model name or glob"),
        ({"requests": 1, "per": "minute", "name": 'a "b"'}, "plans.free.limits[0].name", "printable ASCII"),
        ("60/minute", "plans.free.limits[0]", "expected a mapping"),
    ],
)
def test_parse_errors_name_the_field(entry: object, field: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse([entry])
    assert info.value.field == field
    assert message in info.value.detail
    assert str(info.value).startswith(f"nexus.yaml: {field}: ")


def test_parse_error_example_from_the_brief() -> None:
    with pytest.raises(ConfigError) as info:
        parse(
            [
                {"requests": 1, "per": "minute"},
                {"tokens": 1, "per": "minute"},
                {"tokens": 1, "per": "fortnight"},
            ]
        )
    assert str(info.value).startswith("nexus.yaml: plans.free.limits[2].per: unknown unit 'fortnight'")


def test_parse_rejects_a_non_list_and_duplicate_names() -> None:
    with pytest.raises(ConfigError, match="expected a list of limits"):
        parse({"requests": 60})
    with pytest.raises(ConfigError) as info:
        parse([{"requests": 60, "per": "minute"}, {"requests": 100, "per": "minute"}])
    assert info.value.field == "plans.free.limits[1].name" and "limits[0]" in info.value.detail
    # an enforced limit and its shadow trial may sit side by side
    assert (
        len(parse([{"requests": 60, "per": "minute"}, {"requests": 30, "per": "minute", "shadow": True}]))
        == 2
    )


def test_parse_points_at_the_line_when_the_yaml_has_lines() -> None:
    from nexus_authz.core.yamlsrc import load_yaml

    text = (
        "plans:\n  free:\n    limits:\n"
        "      - {requests: 60, per: minute}\n"
        "      - tokens: 5\n        per: fortnight\n"
    )
    raw = load_yaml(text, "nexus.yaml")["plans"]["free"]["limits"]
    with pytest.raises(ConfigError) as info:
        parse_limits(raw, source="nexus.yaml:3", field="plans.free.limits")
    assert str(info.value) == (
        "nexus.yaml:6: plans.free.limits[1].per: unknown unit 'fortnight' (expected minute, hour, day, month)"
    )


def test_periods_are_the_documented_ones() -> None:
    assert PERIODS == {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "month": 2_592_000}
