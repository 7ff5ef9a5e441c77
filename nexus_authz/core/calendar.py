"""Calendar periods: a day or a month that resets at its start in an IANA time zone (`zoneinfo`).

Beside the rolling windows of `core/windows.py`, a calendar limit counts what was charged since the start
of the current period, a fixed window [start of the day or month, start of the next) in its zone. DST
is honoured: a day may last 23 or 25 hours (the period's bounds are the instants local midnight falls
on). Guarantee: **at most the limit admitted within one period** (a charge settled later may push a
period over, as for every window); a period's usage never carries into the next.

State: three doubles, `[end, start, used]` (the same places as the sliding window's `[fresh_at,
last_slot, total]`, so "fresh" means the same: `now >= end or used <= 0`). A state counts when its start
is at or after the current period's start (a clock that stepped back keeps counting the newer period) and
its end is still ahead; anything else is the same as a window never used. (A state of this calendar that
starts in the current period always ends after now; one that does not was written under the same name
by a limit of another unit or zone before a reload, and is fresh, as the Redis store, which deletes a
state once it ends, reads it.)

Reserve then settle, as for the other windows: an extra charge is taken now, in the current period; a
refund is given back only within the period it was charged in (`charged_at` at or after the state's
start, and now still in that period): after the rollover there is nothing left to give back.

The bounds of `now`'s period are computed with zoneinfo and cached per (unit, zone), so the hot path is one
comparison. The Redis script never sees a zone: Python passes it the period's bounds (stores/redis).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

if TYPE_CHECKING:
    from nexus_authz.core.limits import LimitSpec

__all__ = [
    "CALENDAR_UNITS",
    "DEFAULT_TIMEZONE",
    "Calendar",
    "calendar_charge",
    "calendar_of",
    "calendar_refund",
    "calendar_take",
    "parse_calendar",
    "zone_problem",
]

CALENDAR_UNITS: Final = ("day", "month")
DEFAULT_TIMEZONE: Final = "UTC"
_END, _START, _USED = 0, 1, 2
_INF: Final = math.inf


class Calendar:
    """A calendar unit in a zone, with the current period's bounds cached. Shared (`calendar_of`)."""

    __slots__ = ("_tz", "current", "end", "start", "unit", "zone")

    def __init__(self, unit: str, zone: str) -> None:
        if unit not in CALENDAR_UNITS:
            raise ValueError(f"a calendar period is a day or a month, not {unit!r}")
        self.unit = unit
        self.zone = zone
        self._tz = _zone(zone)
        self.start = self.end = 0.0
        self.current: tuple[float, float] = (0.0, 0.0)

    def __repr__(self) -> str:
        return f"Calendar({self.unit!r}, {self.zone!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Calendar) and (self.unit, self.zone) == (other.unit, other.zone)

    def __hash__(self) -> int:
        return hash((self.unit, self.zone))

    def period(self, now: float) -> tuple[float, float]:
        """(start, end) of the period holding `now`, as epoch seconds: start <= now < end."""
        if self.start <= now < self.end:
            return self.current
        bounds = self.bounds(now)
        if now >= self.end:  # the clock moved on: cache the new period (never an older one)
            self.start, self.end = bounds
            self.current = bounds
        return bounds

    def bounds(self, now: float) -> tuple[float, float]:
        tz = self._tz
        local = datetime.fromtimestamp(now, tz)
        if self.unit == "day":
            first = date(local.year, local.month, local.day)
            following = first + timedelta(days=1)
        else:
            first = date(local.year, local.month, 1)
            year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
            following = date(year, month, 1)
        start = _midnight(first, tz)
        end = _midnight(following, tz)
        if start > now:  # cannot happen for a valid zone; never report a period that has not begun
            start = now
        return start, end


def _midnight(day: date, tz: tzinfo) -> float:
    """The first instant of `day` in `tz`. Local midnight may not exist (a DST gap at 00:00): fold=0
    then reads it with the offset before the gap, which is exactly the instant the day begins."""
    return datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()


def _zone(name: str) -> tzinfo:
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"unknown time zone {name!r} (expected an IANA name such as Europe/Berlin or UTC)")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        if name == DEFAULT_TIMEZONE:  # no time zone data installed (a slim image): UTC needs none
            return UTC
        raise ValueError(
            f"unknown time zone {name!r} (expected an IANA name such as Europe/Berlin or UTC)"
        ) from None


_CALENDARS: dict[tuple[str, str], Calendar] = {}


def calendar_of(unit: str, zone: str) -> Calendar:
    """The shared Calendar of (unit, zone): every spec using it shares its cached period."""
    cal = _CALENDARS.get((unit, zone))
    if cal is None:
        cal = Calendar(unit, zone)
        if len(_CALENDARS) > 10_000:  # zones come from config: keep the table bounded
            _CALENDARS.clear()
        _CALENDARS[(unit, zone)] = cal
    return cal


# -- the window ------------------------------------------------------------------------------------------


def calendar_take(
    state: array[float] | None, now: float, spec: LimitSpec, cost: int
) -> tuple[bool, array[float] | None, int, float, float]:
    """-> (allowed, state, remaining, reset_after, retry_after), the shape of `sliding_take`; pure.

    Admit iff what the current period holds plus `cost` is at most the limit. reset_after: until the next
    period starts (0 for an empty window); retry_after: the same when refused (inf if it can never fit).
    `state` is returned unchanged: the caller commits an admitted request with `calendar_charge`.
    """
    cal = spec.calendar
    assert cal is not None
    if cal.start <= now < cal.end:
        start, end = cal.current
    else:
        start, end = cal.period(now)
    limit = spec.limit
    used = 0.0
    if state is not None and state[_START] >= start and state[_USED] > 0 and now < state[_END]:
        used = state[_USED]
        end = state[_END]
    if used + cost <= limit:
        return True, state, int(limit - used - cost), (end - now) if used + cost > 0 else 0.0, 0.0
    remaining = int(limit - used) if used < limit else 0
    reset_after = (end - now) if used > 0 else 0.0
    return False, state, remaining, reset_after, (end - now) if cost <= limit else _INF


def calendar_charge(state: array[float] | None, now: float, spec: LimitSpec, amount: int) -> array[float]:
    """Add `amount` (>= 0) to the current period; modifies `state` in place (or makes one) and returns it."""
    cal = spec.calendar
    assert cal is not None
    start, end = cal.period(now)
    if state is None:
        return array("d", (end, start, float(amount)))
    if state[_START] >= start and state[_USED] > 0 and now < state[_END]:
        state[_USED] += amount
    else:  # an older period (or nothing counted): this period starts from zero
        state[_END] = end
        state[_START] = start
        state[_USED] = float(amount)
    return state


def calendar_refund(
    state: array[float], now: float, spec: LimitSpec, amount: int, charged_at: float | None = None
) -> None:
    """Give back up to `amount` (> 0) in place, only within the period it was charged in."""
    cal = spec.calendar
    assert cal is not None
    start = cal.period(now)[0]
    used = state[_USED]
    if used <= 0 or state[_START] < start or now >= state[_END]:  # the period is over: nothing to give back
        return
    if charged_at is not None and charged_at < state[_START]:  # charged in an earlier period
        return
    state[_USED] = used - amount if amount < used else 0.0


def zone_problem(name: object) -> str | None:
    """Why `name` is not a usable time zone (None if it is one)."""
    try:
        _zone(name)  # type: ignore[arg-type]
    except ValueError as exc:
        return str(exc)
    return None


# -- config: the calendar fields of a limit (core/config.py's `_parse_entry`) -------------------------------


def parse_calendar(
    entry: dict[str, Any], kind: str, per: object, default_zone: str, fail: Callable[[str, str], Exception]
) -> Calendar | None:
    """The Calendar of a limit entry with `calendar: true` (None without); `fail(field, message)` makes
    the error that names the field."""
    flag = entry.get("calendar")
    zone = entry.get("timezone")
    if flag is None or flag is False:
        if zone is not None:
            raise fail("timezone", "applies to calendar limits only (add `calendar: true`)")
        return None
    if flag is not True:
        raise fail("calendar", f"expected true or false, got {flag!r}")
    if kind == "concurrent":
        raise fail("calendar", "does not apply to a concurrency limit (it counts requests in flight)")
    if per not in CALENDAR_UNITS:
        raise fail(
            "calendar",
            f"a calendar period is a day or a month; {per!r} has no calendar start (use a rolling window)",
        )
    for other in ("algorithm", "burst", "slots"):
        if entry.get(other) is not None:
            raise fail(other, "does not apply to a calendar limit (it resets at the start of each period)")
    if zone is not None and not isinstance(zone, str):
        raise fail("timezone", f"expected an IANA time zone name such as Europe/Berlin, got {zone!r}")
    try:
        return calendar_of(per, default_zone if zone is None else zone)
    except ValueError as exc:
        raise fail("timezone", str(exc)) from None
