"""Calendar periods (core/calendar.py): the bounds in a zone, DST, the window's guarantee, the config's
fields and errors, the headers of a refused request."""

from __future__ import annotations

import json
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_authz.core.calendar import Calendar, calendar_charge, calendar_of, calendar_take
from nexus_authz.core.config import PolicySet, parse_key_file, parse_limits, parse_policy
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.limits import Algorithm, make_limit
from nexus_authz.core.model import Reason, Request
from nexus_authz.core.policy import Policy
from nexus_authz.core.reservations import ReservationBook
from nexus_authz.core.yamlsrc import Fields, load_yaml
from nexus_authz.settings import parse_settings
from nexus_authz.stores.memory import MemoryCounterStore
from tests.helpers import PEPPER, KeySpec, decide_local, key_file


def ts(text: str, zone: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()


# -- the bounds --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "zone", "at", "start", "end", "hours"),
    [
        ("day", "UTC", "2024-05-17 13:00", "2024-05-17 00:00", "2024-05-18 00:00", 24),
        ("day", "Europe/Berlin", "2024-03-31 12:00", "2024-03-31 00:00", "2024-04-01 00:00", 23),
        ("day", "Europe/Berlin", "2024-10-27 01:30", "2024-10-27 00:00", "2024-10-28 00:00", 25),
        ("day", "Asia/Kolkata", "2024-05-17 00:00", "2024-05-17 00:00", "2024-05-18 00:00", 24),
        ("month", "America/New_York", "2024-02-29 23:59", "2024-02-01 00:00", "2024-03-01 00:00", 29 * 24),
        (
            "month",
            "America/New_York",
            "2024-03-15 00:00",
            "2024-03-01 00:00",
            "2024-04-01 00:00",
            31 * 24 - 1,
        ),
        ("month", "Europe/Berlin", "2024-12-31 23:59", "2024-12-01 00:00", "2025-01-01 00:00", 31 * 24),
        # Santiago's clocks go forward at midnight: 2024-09-08 begins at 01:00 local
        ("day", "America/Santiago", "2024-09-08 12:00", "2024-09-08 01:00", "2024-09-09 00:00", 23),
    ],
)
def test_period_bounds_are_local_midnights(
    unit: str, zone: str, at: str, start: str, end: str, hours: int
) -> None:
    cal = Calendar(unit, zone)
    now = ts(at, zone)
    lo, hi = cal.period(now)
    assert (lo, hi) == (ts(start, zone), ts(end, zone))
    assert hi - lo == hours * 3600
    assert cal.period(lo) == (lo, hi) and cal.period(hi)[0] == hi  # [start, end)


@settings(max_examples=300, deadline=None)
@given(
    now=st.floats(1_600_000_000, 2_000_000_000),
    zone=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Tehran"]),
    unit=st.sampled_from(["day", "month"]),
)
def test_now_is_always_inside_its_period_and_the_cache_agrees(now: float, zone: str, unit: str) -> None:
    cal = calendar_of(unit, zone)
    start, end = cal.period(now)
    assert start <= now < end
    assert cal.period(now) == cal.bounds(now) == (start, end)
    local = datetime.fromtimestamp(start, ZoneInfo(zone))
    assert (local.hour, local.minute) in ((0, 0), (1, 0)) and (unit == "day" or local.day == 1)


# -- the window's guarantee ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6 * 3600), st.integers(0, 40)), max_size=60))
def test_at_most_the_limit_within_one_period_and_nothing_that_fits_is_refused(
    steps: list[tuple[int, int]],
) -> None:
    spec = make_limit("tokens", 100, "day", calendar=True, timezone="Europe/Berlin")
    cal = spec.calendar
    assert cal is not None and spec.algorithm is Algorithm.CALENDAR
    now = ts("2024-03-30 12:00", "Europe/Berlin")  # the night before a 23-hour day
    state = None
    admitted: dict[float, int] = {}
    for gap, cost in steps:
        now += gap
        period = cal.period(now)[0]
        ok, state, remaining, reset_after, retry_after = calendar_take(state, now, spec, cost)
        used = admitted.get(period, 0)
        assert ok == (used + cost <= 100)  # exactly: nothing that fits is refused
        if ok:
            state = calendar_charge(state, now, spec, cost) if cost else state
            admitted[period] = used + cost
            assert remaining == 100 - used - cost
        else:
            assert retry_after == cal.period(now)[1] - now  # fits again when the next day begins
    assert all(v <= 100 for v in admitted.values())


# -- config ------------------------------------------------------------------------------------------------


def parse(raw: object, timezone: str = "UTC") -> tuple:  # type: ignore[type-arg]
    return parse_limits(raw, source="nexus.yaml", field="plans.free.limits", timezone=timezone)


def test_parse_a_calendar_limit_with_its_zone_or_the_default() -> None:
    own, default = parse(
        [
            {"usd": 500, "per": "month", "calendar": True, "timezone": "Europe/Berlin"},
            {"tokens": 1000, "per": "day", "calendar": True},
        ],
        timezone="Asia/Tokyo",
    )
    assert own.algorithm is Algorithm.CALENDAR and own.calendar == Calendar("month", "Europe/Berlin")
    assert own.name == "usd/calendar-month" and own.limit == 500_000_000
    assert default.calendar == Calendar("day", "Asia/Tokyo") and default.name == "tokens/calendar-day"
    rolling = parse([{"usd": 500, "per": "month", "calendar": False}])[0]
    assert rolling.algorithm is Algorithm.SLIDING and rolling.calendar is None


@pytest.mark.parametrize(
    ("entry", "field", "message"),
    [
        (
            {"usd": 5, "per": "day", "calendar": True, "timezone": "Mars/Olympus"},
            "timezone",
            "unknown time zone",
        ),
        ({"usd": 5, "per": "day", "calendar": True, "timezone": "../etc/passwd"}, "timezone", "unknown time"),
        ({"usd": 5, "per": "day", "calendar": True, "timezone": 3}, "timezone", "IANA time zone"),
        ({"requests": 5, "per": "minute", "calendar": True}, "calendar", "a day or a month"),
        ({"requests": 5, "per": "hour", "calendar": True}, "calendar", "no calendar start"),
        ({"tokens": 5, "per": "day", "calendar": True, "slots": 4}, "slots", "calendar limit"),
        ({"tokens": 5, "per": "day", "calendar": True, "burst": 4}, "burst", "calendar limit"),
        ({"tokens": 5, "per": "day", "calendar": True, "algorithm": "gcra"}, "algorithm", "calendar limit"),
        ({"tokens": 5, "per": "day", "calendar": "yes"}, "calendar", "true or false"),
        ({"tokens": 5, "per": "day", "timezone": "UTC"}, "timezone", "calendar limits only"),
        ({"concurrent": 5, "calendar": True}, "calendar", "concurrency"),
    ],
)
def test_calendar_field_errors_name_the_field(entry: object, field: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse([entry])
    assert info.value.field == f"plans.free.limits[0].{field}"
    assert message in info.value.detail


def test_calendar_errors_name_file_line_and_field() -> None:
    text = (
        "timezone: Europe/Berlin\n"
        "plans:\n  team:\n    limits:\n"
        "      - usd: 500\n        per: month\n        calendar: true\n        timezone: Europe/Berln\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "nexus.yaml", {})
    assert str(info.value).startswith(
        "nexus.yaml:8: plans.team.limits[0].timezone: unknown time zone 'Europe/Berln'"
    )
    with pytest.raises(ConfigError) as info:
        parse_settings("timezone: Moon/Base\n", "nexus.yaml", {})
    assert str(info.value).startswith("nexus.yaml:1: timezone: unknown time zone 'Moon/Base'")


POLICY = """
timezone: America/New_York
plans:
  monthly:
    limits:
      - {usd: 0.01, per: month, calendar: true}
prices:
  "gpt-4o*": {input: 2.5, output: 10}
"""


def test_a_spent_calendar_month_is_insufficient_quota_until_the_next_month_begins() -> None:
    """Through the policy: the key's plan takes the config's zone, the 429 says when the month starts."""
    policy_set = parse_policy(Fields(load_yaml(POLICY, "nexus.yaml"), "nexus.yaml", ""))
    assert policy_set.timezone == "America/New_York"
    key = KeySpec("m", extra={"plan": "monthly"})
    snapshot = parse_key_file(
        key_file(key), "keys.yaml", policy=policy_set, credentials={}, pepper=PEPPER.encode(), loaded_at=0.0
    )
    assert snapshot.by_id["m"].limits[0].calendar == Calendar("month", "America/New_York")
    policy, counters, book = Policy(policy_set), MemoryCounterStore(), ReservationBook(ttl=60, max_entries=10)
    body = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    ).encode()

    def check(now: float, n: int):  # type: ignore[no-untyped-def]
        headers = {"authorization": f"Bearer {key.secret}", "content-type": "application/json"}
        req = Request("POST", "/v1/chat/completions", headers, body, request_id=f"r{n}")
        return decide_local(policy, snapshot, req, now, counters, book)

    month_end = ts("2024-07-01 00:00", "America/New_York")
    now = month_end - 7200.5
    n = 0
    while (decision := check(now, n)).allowed:
        n += 1
        assert n < 100
    assert decision.status == 429 and decision.reason is Reason.QUOTA_EXCEEDED
    assert json.loads(decision.body)["error"]["type"] == "insufficient_quota"
    headers = dict(decision.response_headers)
    assert headers["retry-after"] == "7201"
    assert "t=7201" in headers["ratelimit"]
    assert check(month_end, n + 1).allowed  # July: a fresh budget
    assert isinstance(PolicySet().timezone, str) and PolicySet().timezone == "UTC"


def test_the_test_clock_is_off_by_default_and_follows_its_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import time

    from nexus_authz.testclock import FileClock

    assert parse_settings("{}\n", "nexus.yaml", {}).test_clock_file is None
    path = tmp_path / "clock"
    assert parse_settings("{}\n", "nexus.yaml", {"NEXUS_TEST_CLOCK_FILE": str(path)}).test_clock_file == str(
        path
    )
    clock = FileClock(str(path))
    assert abs(clock() - time.time()) < 1  # no file yet: no shift
    path.write_text("86400")
    assert abs(clock() - time.time() - 86400) < 1
    path.write_text("-3600.5")
    assert abs(clock() - time.time() + 3600.5) < 1
