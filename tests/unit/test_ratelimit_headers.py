"""Rate-limit headers: the formats clients parse, and the promise behind them: what the headers say is
what the next request gets."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_authz.core.limits import LimitSpec, WindowStatus, make_limit
from nexus_authz.core.ratelimit_headers import openai_duration, rate_limit_headers, sf_string
from nexus_authz.stores.memory import MemoryCounterStore

NOW = 1_700_000_000.0


def status(
    spec: LimitSpec, remaining: int, reset: float, retry: float = 0.0, allowed: bool = True
) -> WindowStatus:
    return WindowStatus(spec, spec.limit, remaining, reset, retry, allowed)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-1, "0s"),
        (0.0004, "1ms"),
        (0.02, "20ms"),
        (0.999, "999ms"),
        (0.9991, "1s"),
        (1, "1s"),
        (1.5, "1.5s"),
        (8.64, "8.64s"),
        (59.9999, "1m0s"),
        (360, "6m0s"),
        (3723.5, "1h2m3.5s"),
        (86400, "24h0m0s"),
    ],
)
def test_openai_durations(seconds: float, text: str) -> None:
    assert openai_duration(seconds) == text


def test_sf_strings_are_escaped() -> None:
    assert sf_string("tokens/minute@gpt-4*") == '"tokens/minute@gpt-4*"'
    assert sf_string('a"b\\c') == '"a\\"b\\\\c"'
    assert sf_string("modèle") == '"mod?le"'


def test_no_limits_no_headers() -> None:
    assert rate_limit_headers([], denied=False) == []
    assert rate_limit_headers([], denied=True) == []
    shadow = make_limit("requests", 10, "minute", shadow=True)
    assert rate_limit_headers([status(shadow, 0, 5.0, 1.0, False)], denied=False) == []


def test_all_formats_on_an_admitted_request() -> None:
    rpm = make_limit("requests", 60, "minute")
    rpd = make_limit("requests", 1000, "day")
    tpm = make_limit("tokens", 100_000, "minute")
    usd = make_limit("usd", 5_000_000, "month")
    conc = make_limit("concurrent", 4)
    shadow = make_limit("tokens", 10, "minute", shadow=True)
    headers = rate_limit_headers(
        [
            status(rpm, 59, 1.0),
            status(rpd, 12, 3600.2),
            status(tpm, 99_000, 0.6),
            status(usd, 4_000_000, 86400.0),
            status(conc, 3, 0.0),
            status(shadow, 0, 50.0, 3.0, False),
        ],
        denied=False,
    )
    assert headers == [
        ("x-ratelimit-limit-requests", "1000"),  # the most restrictive: smallest remaining
        ("x-ratelimit-remaining-requests", "12"),
        ("x-ratelimit-reset-requests", "1h0m0.2s"),
        ("x-ratelimit-limit-tokens", "100000"),
        ("x-ratelimit-remaining-tokens", "99000"),
        ("x-ratelimit-reset-tokens", "600ms"),
        (
            "ratelimit-policy",
            '"requests/minute";q=60;w=60, "requests/day";q=1000;w=86400, '
            '"tokens/minute";q=100000;qu="tokens";w=60, "usd/month";q=5000000;qu="usd-micros";w=2592000, '
            '"concurrent";q=4;qu="concurrent-requests"',
        ),
        (
            "ratelimit",
            '"requests/minute";r=59;t=1, "requests/day";r=12;t=3601, "tokens/minute";r=99000;t=1, '
            '"usd/month";r=4000000;t=86400, "concurrent";r=3',
        ),
    ]


def test_ties_pick_the_longer_reset() -> None:
    a = make_limit("requests", 10, "second")
    b = make_limit("requests", 100, "hour")
    headers = dict(rate_limit_headers([status(a, 0, 0.5), status(b, 0, 30.0)], denied=False))
    assert headers["x-ratelimit-limit-requests"] == "100"


def test_retry_after_only_on_denial_rounded_up_at_least_one() -> None:
    rpm = make_limit("requests", 60, "minute")
    tpm = make_limit("tokens", 1000, "minute")
    statuses = [status(rpm, 0, 30.0, 0.2, False), status(tpm, 10, 50.0, 2.01, False)]
    assert "retry-after" not in dict(rate_limit_headers(statuses, denied=False))
    assert dict(rate_limit_headers(statuses, denied=True))["retry-after"] == "3"
    assert dict(rate_limit_headers(statuses[:1], denied=True))["retry-after"] == "1"
    # denied for another reason than a limit (e.g. a model not allowed): no retry-after
    assert "retry-after" not in dict(rate_limit_headers([status(rpm, 5, 1.0)], denied=True))


def test_no_retry_after_when_the_request_can_never_fit() -> None:
    tpm = make_limit("tokens", 1000, "minute")
    headers = dict(rate_limit_headers([status(tpm, 1000, 0.0, math.inf, False)], denied=True))
    assert "retry-after" not in headers
    assert headers["x-ratelimit-remaining-tokens"] == "1000"


@settings(max_examples=100, deadline=None)
@given(
    limit=st.integers(1, 20),
    per=st.sampled_from(["second", "minute"]),
    burst=st.integers(1, 20),
    gaps=st.lists(st.integers(0, 64), min_size=1, max_size=40),
)
def test_headers_agree_with_what_the_next_request_gets(
    limit: int, per: str, burst: int, gaps: list[int]
) -> None:
    spec = make_limit("requests", limit, per, burst=burst)
    ids, specs = ("k",), (spec,)
    store = MemoryCounterStore()
    now = NOW
    for gap in gaps:
        now += gap / 64
        result = store.acquire(ids, specs, (1,), now)
        headers = dict(rate_limit_headers(result.statuses, denied=not result.allowed))
        remaining = int(headers["x-ratelimit-remaining-requests"])
        if result.allowed:
            assert "retry-after" not in headers
            # exactly `remaining` more requests fit right now (GCRA: r units at once iff r one by one)
            if remaining:
                assert store.peek(ids, specs, now, (remaining,))[0].allowed
            assert not store.peek(ids, specs, now, (remaining + 1,))[0].allowed
        else:
            retry = int(headers["retry-after"])
            assert remaining == 0
            assert store.peek(ids, specs, now + retry, (1,))[0].allowed  # honouring retry-after works
            if retry > 1:  # one second less is too early (the value is rounded up, at least 1)
                assert not store.peek(ids, specs, now + retry - 1, (1,))[0].allowed
        # ratelimit: t seconds later the window is full again
        t = int(headers["ratelimit"].rsplit("t=", 1)[1])
        assert store.peek(ids, specs, now + t, (0,))[0].remaining == burst
