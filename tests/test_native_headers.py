"""The answers' rate-limit headers built from a per-windows plan (core/ratelimit_headers.py `plan_headers`,
and its compiled equivalent nexus_authz/native/_headers.pyx) against the reference `rate_limit_headers`:
the same headers, string for string, for every kind of window (GCRA, sliding, calendar, concurrency;
shadow; a key's, a group's, a tenant's), allowed and refused, zero and huge numbers, and the pure path for
whatever the compiled one does not read (ints as reset times, numbers beyond 2**62, NaN, a list); and for
every choice of header families (the policy's `rate_limit_headers`: both, OpenAI's, IETF's, none)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_authz import native
from nexus_authz.adapters.answers import header_block
from nexus_authz.core import ratelimit_headers
from nexus_authz.core.limits import MAX_LIMIT, LimitSpec, WindowStatus, make_limit
from nexus_authz.core.ratelimit_headers import (
    BOTH,
    IETF,
    OPENAI,
    header_plan,
    plan_header_block,
    plan_headers,
    rate_limit_headers,
)
from nexus_authz.core.shapes import shape_of
from nexus_authz.stores.memory import MemoryCounterStore


@pytest.fixture(scope="module")
def compiled() -> Any:
    if native.headers is None:
        if os.environ.get(native.PURE_ENV, "") not in ("", "0"):
            pytest.skip("NEXUS_AUTHZ_PURE is set: the compiled headers are not loaded")
        pytest.fail(f"the compiled headers did not build or load ({native.WHY_PURE}): pip install -e .")
    return native.headers.plan_headers


def test_the_policy_uses_the_compiled_headers_when_they_loaded() -> None:
    if native.headers is None:
        assert ratelimit_headers.build_headers is plan_headers
    else:
        assert ratelimit_headers.build_headers is native.headers.plan_headers


_NAMES = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters='"\\'))


@st.composite
def specs(draw: st.DrawFn) -> LimitSpec:
    kind = draw(st.sampled_from(["requests", "tokens", "usd", "concurrent"]))
    limit = draw(st.one_of(st.integers(1, 100), st.integers(1, MAX_LIMIT), st.just(MAX_LIMIT)))
    shadow = draw(st.booleans())
    name = draw(st.one_of(st.none(), _NAMES.filter(lambda s: 1 <= len(s) <= 40)))
    if kind == "concurrent":
        spec = make_limit(kind, limit, shadow=shadow, name=name)
    else:
        per = draw(st.sampled_from({"requests": ["second", "minute", "hour", "day"],
                                    "tokens": ["minute", "hour", "day", "month"],
                                    "usd": ["day", "month"]}[kind]))  # fmt: skip
        calendar = per in ("day", "month") and draw(st.booleans())
        spec = make_limit(kind, limit, per, shadow=shadow, name=name, calendar=calendar)
    level = draw(st.sampled_from(["key", "key", "group", "tenant"]))
    return dataclasses.replace(spec, level=level) if level != "key" else spec


_SECONDS = st.one_of(
    st.just(0.0),
    st.just(-0.0),
    st.floats(-5, 5),
    st.floats(0, 3e6),
    st.sampled_from([0.0004, 0.02, 0.999, 0.9991, 1.0, 1.5, 8.64, 59.9999, 360.0, 3723.5, 86400.0, 1e-9]),
    st.floats(0, 1e14),
)
_RETRY = st.one_of(_SECONDS, st.just(math.inf))
_REMAINING = st.one_of(st.integers(0, 100), st.integers(0, 2 * MAX_LIMIT), st.integers(-10, 0))
_FAMILIES = st.sampled_from([BOTH, OPENAI, IETF, 0])


@st.composite
def answers(draw: st.DrawFn) -> tuple[tuple[LimitSpec, ...], tuple[WindowStatus, ...], bool]:
    windows = tuple(draw(st.lists(specs(), min_size=0, max_size=7)))
    statuses = tuple(
        WindowStatus(
            spec,
            spec.limit,
            draw(_REMAINING),
            draw(_SECONDS),
            draw(_RETRY),
            draw(st.booleans()),
        )
        for spec in windows
    )
    return windows, statuses, draw(st.booleans())


def _assert_same(
    windows: Sequence[LimitSpec],
    statuses: Sequence[WindowStatus],
    denied: bool,
    built: Any,
    families: int = BOTH,
) -> None:
    expected = tuple(rate_limit_headers(statuses, denied=denied, families=families))
    got = built(header_plan(windows, families), statuses, denied)
    assert got == expected
    assert all(type(name) is str and type(value) is str for name, value in got)


@settings(max_examples=400, deadline=None)
@given(answers(), _FAMILIES)
def test_the_plan_gives_the_reference_headers(answer: Any, families: int) -> None:
    windows, statuses, denied = answer
    _assert_same(windows, statuses, denied, plan_headers, families)


@settings(max_examples=700, deadline=None)
@given(answers(), _FAMILIES)
def test_the_compiled_headers_are_the_reference_headers(compiled: Any, answer: Any, families: int) -> None:
    windows, statuses, denied = answer
    _assert_same(windows, statuses, denied, compiled, families)


def test_what_the_compiled_code_does_not_read_goes_to_the_pure_function(compiled: Any) -> None:
    rpm = make_limit("requests", 10, "minute")
    tpd = make_limit("tokens", 10**6, "day")
    windows = (rpm, tpd)
    odd = [
        (WindowStatus(rpm, 10, 3, 2, 0.0, True), WindowStatus(tpd, 10**6, 5, 1.0, 0.0, True)),  # int time
        (WindowStatus(rpm, 10, 2**70, 1.0, 0.0, True), WindowStatus(tpd, 10**6, 5, 1.0, 0.0, True)),
        (WindowStatus(rpm, 10, 3, 1e300, 0.0, True), WindowStatus(tpd, 10**6, 5, 1.0, 0.0, True)),
        (WindowStatus(rpm, 10, 3, 1.0, 1e300, False), WindowStatus(tpd, 10**6, 5, 1.0, 0.0, True)),
        (WindowStatus(rpm, 10, 3, 1.0, math.nan, False), WindowStatus(tpd, 10**6, 5, 1.0, 0.0, True)),
        (WindowStatus(rpm, 10, True, 1.0, 0.0, True), WindowStatus(tpd, 10**6, 5, 1.0, 0.0, True)),
        (WindowStatus(rpm, 10, 3, 1.0, 0.0, 1), WindowStatus(tpd, 10**6, 5, 1.0, 0.0, True)),
    ]
    for statuses in odd:
        for denied in (False, True):
            for families in (BOTH, OPENAI, IETF, 0):
                _assert_same(windows, statuses, denied, compiled, families)
                _assert_same(windows, list(statuses), denied, compiled, families)  # not a tuple
    with pytest.raises(OverflowError):  # the reference raises, and so does the compiled path
        compiled(header_plan(windows), (WindowStatus(rpm, 10, 3, math.inf, 0.0, True),) * 2, False)


def test_long_names_on_many_windows_fit_or_fall_back(compiled: Any) -> None:
    windows = tuple(make_limit("tokens", 10**12, "minute", name=f"{i:03d}" + "x" * 125) for i in range(64))
    statuses = tuple(WindowStatus(s, s.limit, 10**12 - i, 0.5 + i, 0.0, True) for i, s in enumerate(windows))
    for families in (BOTH, OPENAI, IETF, 0):
        _assert_same(windows, statuses, False, compiled, families)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(specs(), min_size=1, max_size=5),
    st.lists(st.tuples(st.floats(0, 4e6), st.integers(0, 10**13)), min_size=1, max_size=6),
    _FAMILIES,
)
def test_a_counter_stores_answers_get_the_reference_headers(
    windows: list[LimitSpec], steps: Any, families: int
) -> None:
    """Statuses as the memory store makes them (the compiled store's on the compiled path)."""
    windows_t = tuple(windows)
    ids = tuple(f"c{i}" for i in range(len(windows_t)))
    store = MemoryCounterStore()
    shape = shape_of(windows_t, families)
    assert shape_of(windows_t, families) is shape and shape_of(windows_t) is shape  # None: any families
    for offset, cost in steps:
        costs = tuple(1 if s.kind in ("requests", "concurrent") else cost for s in windows_t)
        result = store.acquire(ids, windows_t, costs, 1_700_000_000.0 + offset)
        for denied in (False, True):
            expected = tuple(rate_limit_headers(result.statuses, denied=denied, families=families))
            assert ratelimit_headers.build_headers(shape.headers, result.statuses, denied) == expected


def test_a_shape_of_other_families_is_made_again() -> None:
    windows = (make_limit("requests", 10, "minute"), make_limit("tokens", 10**6, "day"))
    statuses = tuple(WindowStatus(s, s.limit, 3, 1.5, 0.0, True) for s in windows)
    for families in (OPENAI, 0, IETF, BOTH, OPENAI):
        shape = shape_of(windows, families)
        assert shape.headers == header_plan(windows, families)
        assert ratelimit_headers.build_headers(shape.headers, statuses, False) == tuple(
            rate_limit_headers(statuses, denied=False, families=families)
        )


# -- an admission's headers as HTTP/1.1 lines (the HTTP listener's fast path) --------------------------


@pytest.fixture(scope="module")
def compiled_block() -> Any:
    if native.headers is None:
        if os.environ.get(native.PURE_ENV, "") not in ("", "0"):
            pytest.skip("NEXUS_AUTHZ_PURE is set: the compiled headers are not loaded")
        pytest.fail(f"the compiled headers did not build or load ({native.WHY_PURE}): pip install -e .")
    assert ratelimit_headers.build_header_block is native.headers.plan_header_block
    return native.headers.plan_header_block


def _assert_same_block(
    windows: Sequence[LimitSpec], statuses: Sequence[WindowStatus], built: Any, families: int = BOTH
) -> None:
    expected = header_block(tuple(rate_limit_headers(statuses, denied=False, families=families)))
    assert built(header_plan(windows, families), statuses) == expected


@settings(max_examples=300, deadline=None)
@given(answers(), _FAMILIES)
def test_the_header_lines_are_the_reference_headers(answer: Any, families: int) -> None:
    windows, statuses, _ = answer
    _assert_same_block(windows, statuses, plan_header_block, families)


@settings(max_examples=700, deadline=None)
@given(answers(), _FAMILIES)
def test_the_compiled_header_lines_are_the_reference_headers(
    compiled_block: Any, answer: Any, families: int
) -> None:
    windows, statuses, _ = answer
    _assert_same_block(windows, statuses, compiled_block, families)


def test_header_lines_the_compiled_code_does_not_read_go_to_the_pure_function(compiled_block: Any) -> None:
    rpm = make_limit("requests", 10, "minute")
    tpd = make_limit("tokens", 10**6, "day")
    windows = (rpm, tpd)
    fine = WindowStatus(tpd, 10**6, 5, 1.0, 0.0, True)
    odd = [
        (WindowStatus(rpm, 10, 3, 2, 0.0, True), fine),  # an int time
        (WindowStatus(rpm, 10, 2**70, 1.0, 0.0, True), fine),
        (WindowStatus(rpm, 2**70, 3, 1.0, 0.0, True), fine),  # a limit beyond 2**62
        (WindowStatus(rpm, 10.0, 3, 1.0, 0.0, True), fine),  # a limit that is not an int
        (WindowStatus(rpm, True, 3, 1.0, 0.0, True), fine),
        (WindowStatus(rpm, 10, 3, 1e300, 0.0, True), fine),
        (WindowStatus(rpm, 10, True, 1.0, 0.0, True), fine),
    ]
    for statuses in odd:
        for families in (BOTH, OPENAI, IETF, 0):
            _assert_same_block(windows, statuses, compiled_block, families)
            _assert_same_block(windows, list(statuses), compiled_block, families)  # not a tuple
    with pytest.raises(OverflowError):  # the reference raises, and so does the compiled path
        compiled_block(header_plan(windows), (WindowStatus(rpm, 10, 3, math.inf, 0.0, True),) * 2)
    long_names = tuple(make_limit("tokens", 10**12, "minute", name=f"{i:03d}" + "x" * 125) for i in range(64))
    statuses = tuple(
        WindowStatus(s, s.limit, 10**12 - i, 0.5 + i, 0.0, True) for i, s in enumerate(long_names)
    )
    _assert_same_block(long_names, statuses, compiled_block)


@settings(max_examples=500, deadline=None)
@given(answers(), _FAMILIES)
def test_the_header_lines_of_figures_are_the_reference_headers(
    compiled_block: Any, answer: Any, families: int
) -> None:
    """native/_headers figure_block (the compiled HTTP lane's block, from an admission's figures in C):
    the reference lines, or nothing where the compiled function would take the pure one."""
    windows, statuses, _ = answer
    if any(not -(2**63) <= s.remaining < 2**63 or not -(2**63) <= s.limit < 2**63 for s in statuses):
        return  # no C figure holds them: acquire_figures hands such windows to the pure acquire
    got = native.headers.figure_block_of(header_plan(windows, families), statuses)
    expected = header_block(tuple(rate_limit_headers(statuses, denied=False, families=families)))
    if got is None:
        assert any(
            not -(2**62) < s.remaining < 2**62 or not -(2**62) < s.limit < 2**62 for s in statuses
        ) or any(not (math.isfinite(s.reset_after) and abs(s.reset_after) < 1e15) for s in statuses)
    else:
        assert got == expected


def test_figures_the_block_cannot_write_are_left_to_the_caller(compiled_block: Any) -> None:
    rpm = make_limit("requests", 10, "minute")
    tpd = make_limit("tokens", 10**6, "day")
    fine = WindowStatus(tpd, 10**6, 5, 1.0, 0.0, True)
    plan = header_plan((rpm, tpd))
    for odd in (
        WindowStatus(rpm, 10, 2**62, 1.0, 0.0, True),  # beyond the compiled range
        WindowStatus(rpm, 2**62, 3, 1.0, 0.0, True),
        WindowStatus(rpm, 10, 3, math.inf, 0.0, True),
    ):
        assert native.headers.figure_block_of(plan, (odd, fine)) is None
    good = (WindowStatus(rpm, 10, 3, 1.5, 0.0, True), fine)
    assert native.headers.figure_block_of(plan, good) == header_block(
        tuple(rate_limit_headers(good, denied=False))
    )
