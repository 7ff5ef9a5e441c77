"""Limit maths: the limit specs of a key and the algorithms, on plain numbers (their YAML form is parsed
in core/config.py, `parse_limits`).

This module owns what a limit *means*. The counter stores (memory now; Redis/Lua and Envoy's ratelimit
service later) keep the state and call these functions, so every backend makes the same decision; the
state of a window is therefore a few plain numbers (two doubles, an array of doubles, an integer), which a
Lua script can mirror.

Algorithms and their exact guarantees (admissions at Check time, in units of cost):

* GCRA (generic cell rate algorithm; a token bucket of capacity `burst` refilled at rate r = limit/period,
  kept as its theoretical arrival time). Default for second/minute/hour windows, burst defaults to the
  limit. Guarantee: **at most burst + r*t admitted in any interval of length t** (closed, between any two
  arrivals). It is also the greedy optimum: a request is admitted exactly when admitting it keeps that
  bound for every interval ending now, so nothing that fits is refused. State: two doubles, the debt and
  the time it was taken (tat = since + debt; see the GCRA section for why not one epoch-sized float).
* Slotted sliding window (N slots of width period/N; default 24 hourly slots for a day, 30 daily slots for
  a month, 60 for a minute or hour, 10 for a second). Default for day/month windows and for USD budgets,
  because a budget must not be spendable twice within one period, which a bucket with burst = limit allows.
  Guarantee: **at most the limit in any N consecutive slots**; hence at most the limit in any interval
  shorter than period*(N-1)/N, and, because the window moves a slot at a time, at most 2*limit in the
  worst case over a full period (a clock-aligned fixed window allows 2*limit within two instants).
  It admits exactly when the N-slot window ending at the current slot has room, so nothing that fits is
  refused. State: N + 3 doubles (`[fresh_at, last_slot, total, counts...]`).
* Concurrency ("gauge"): requests in flight; admitted while in_flight + 1 <= limit; released at settle.
* Calendar (opt-in, `calendar: true` on a day or month): a fixed window from the start of the day or month
  in an IANA zone to the start of the next, DST-correct; at most the limit within one period
  (core/calendar.py has the algorithm and its guarantee).

No clock-aligned fixed windows other than the calendar periods asked for. Costs are integers (requests 1,
tokens the reserved estimate, USD in micro-dollars, concurrency 1). A request whose cost exceeds a
window's capacity (burst, or the limit of a sliding window) can never fit: it is refused with
`retry_after = inf`.

Atomicity: one Check evaluates all windows of the key (key-level and matching key+model ones) and is
admitted only if every enforced window fits; then it charges them all; a refused request charges nothing.
Shadow windows never refuse. A shadow window is charged only when it would have admitted the request on
its own, so its counter holds exactly what it would hold if it were enforced: its violations count the
requests enforcement would refuse, and switching it to enforced changes nothing abruptly. (Charging it
on every admitted request instead would saturate it under overload and overstate the violations.)

Reserve then settle: at Check the estimate is charged; at settle the difference is applied *then*, never
retroactively: a refund gives capacity back now (GCRA: the debt shrinks, but never below zero, like
tokens put back in a bucket capped at its burst; sliding: taken from the slot the reservation was charged
in, if that slot is still in the window, else there is nothing left to give back), an extra charge is
taken now and may push a window over its limit, which then delays the next request.

Arithmetic is IEEE double, as in Lua, on small numbers (debts, counts, time differences), never by
accumulating into epoch-sized times. The guarantees are exact in real arithmetic, except that GCRA
admission tolerates rounding noise of 1e-9 of the burst (so: at most burst*(1 + 1e-9) + r*t). Slot
boundaries are defined as `slot * width` (one float product). `retry_after` is exact: a request sent
retry_after later fits, one sent noticeably earlier does not (the caller's clock still rounds now +
retry_after to its own resolution, so headers round up to whole seconds).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from fnmatch import translate
from typing import Any, Final

from nexus_authz.core.calendar import DEFAULT_TIMEZONE, Calendar, calendar_of

__all__ = [
    "ALLOWED_UNITS",
    "CONCURRENCY_RETRY_AFTER",
    "DEFAULT_SLOTS",
    "MAX_LIMIT",
    "MAX_SLOTS",
    "PERIODS",
    "AcquireResult",
    "Algorithm",
    "Kind",
    "LimitSpec",
    "WindowStatus",
    "applicable",
    "clamp_minimum",
    "gauge_adjust",
    "gauge_take",
    "gcra_adjust",
    "gcra_is_fresh",
    "gcra_take",
    "make_limit",
    "new_result",
    "new_status",
    "sliding_charge",
    "sliding_is_fresh",
    "sliding_new",
    "sliding_refund",
    "sliding_take",
    "sliding_used",
    "slot_of",
]


class Kind(StrEnum):
    """What a window counts. Values are the YAML keys."""

    REQUESTS = "requests"
    TOKENS = "tokens"
    USD = "usd"
    CONCURRENCY = "concurrent"


class Algorithm(StrEnum):
    GCRA = "gcra"
    SLIDING = "sliding"
    GAUGE = "gauge"  # concurrency: a count of requests in flight
    CALENDAR = "calendar"  # a calendar day or month in a time zone (core/calendar.py)


PERIODS: Final[dict[str, float]] = {
    "second": 1.0,
    "minute": 60.0,
    "hour": 3600.0,
    "day": 86400.0,
    "month": 30 * 86400.0,
}
ALLOWED_UNITS: Final[dict[Kind, tuple[str, ...]]] = {
    Kind.REQUESTS: ("second", "minute", "hour", "day"),
    Kind.TOKENS: ("minute", "hour", "day", "month"),
    Kind.USD: ("day", "month"),
}
DEFAULT_SLOTS: Final[dict[str, int]] = {"second": 10, "minute": 60, "hour": 60, "day": 24, "month": 30}
SLIDING_BY_DEFAULT: Final = frozenset({"day", "month"})
MIN_SLOTS: Final = 2  # one slot would be a clock-aligned fixed window
MAX_SLOTS: Final = 1440  # 8 bytes each per active key: a minute-slotted day is the most we allow
MAX_LIMIT: Final = 10**15  # every count stays an exact integer in a double (2**53), here and in Lua
_RELATIVE_NOISE: Final = 1e-9  # GCRA admission tolerates this fraction of the burst as rounding noise
NAME_RE: Final = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]{1,128}$")  # printable ASCII, no space, '"' or '\'


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One limit of a key: immutable, shared by every request of every key on the same plan.

    `limit` is in units of cost (micro-dollars for USD); `period` in seconds (0 for concurrency). The
    derived fields are computed once here so that the hot path does no division.
    """

    kind: Kind
    limit: int
    period: float
    burst: int
    algorithm: Algorithm
    slots: int
    shadow: bool
    model: str | None
    name: str
    # Whose limit this is: "key" (the key's own or its plan's), "group" or "tenant" (shared by keys).
    level: str = "key"
    # Clamping (core/clamp.py): 0 off; else a request this window cannot fit is admitted with its
    # completion cap lowered to what fits, if at least this many completion tokens do (tokens, USD only).
    clamp: int = 0
    calendar: Calendar | None = None  # the CALENDAR algorithm's unit and zone (and its cached period)
    interval: float = field(init=False, repr=False, compare=False)  # GCRA: seconds per unit (1/rate)
    tolerance: float = field(init=False, repr=False, compare=False)  # GCRA: tau = burst * interval
    max_debt: float = field(init=False, repr=False, compare=False)  # GCRA: tau plus rounding noise
    slot_width: float = field(init=False, repr=False, compare=False)  # sliding: period / slots
    _model_re: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or not 0 < self.limit <= MAX_LIMIT:
            raise ValueError(f"limit must be an integer in 1..{MAX_LIMIT}, got {self.limit!r}")
        if self.algorithm is Algorithm.GAUGE:
            if self.kind is not Kind.CONCURRENCY or self.period != 0:
                raise ValueError("the gauge algorithm is for concurrency limits, which have no period")
        elif self.kind is Kind.CONCURRENCY or not (self.period > 0 and math.isfinite(self.period)):
            raise ValueError("a rate or budget limit needs a positive period and gcra or sliding")
        if self.algorithm is Algorithm.GCRA and not 0 < self.burst <= MAX_LIMIT:
            raise ValueError(f"burst must be in 1..{MAX_LIMIT}, got {self.burst!r}")
        if (self.algorithm is Algorithm.CALENDAR) is (self.calendar is None):
            raise ValueError("a calendar limit, and only one, has a calendar period")
        if self.algorithm is Algorithm.SLIDING and not MIN_SLOTS <= self.slots <= MAX_SLOTS:
            raise ValueError(f"slots must be in {MIN_SLOTS}..{MAX_SLOTS}, got {self.slots!r}")
        if self.clamp and (self.kind not in (Kind.TOKENS, Kind.USD) or not 0 < self.clamp <= MAX_LIMIT):
            raise ValueError("clamp applies to tokens and usd limits, with a minimum of 1 or more tokens")
        if not NAME_RE.match(self.name):
            raise ValueError(f"name must be 1-128 printable ASCII characters without quotes: {self.name!r}")
        setattr_ = object.__setattr__
        interval = self.period / self.limit if self.period else 0.0
        setattr_(self, "interval", interval)
        setattr_(self, "tolerance", self.burst * interval)
        setattr_(self, "max_debt", self.burst * interval * (1.0 + _RELATIVE_NOISE) + 1e-12)
        setattr_(self, "slot_width", self.period / self.slots if self.slots else 0.0)
        setattr_(self, "_model_re", re.compile(translate(self.model)) if self.model is not None else None)
        fields = (self.kind, self.limit, self.period, self.burst, self.algorithm, self.slots, self.shadow)
        setattr_(self, "_hash", hash((*fields, self.model, self.name, self.level, self.clamp)))

    def __hash__(self) -> int:
        """Cached: specs key per-spec caches (header fragments, per-model selections) on the hot path."""
        return self._hash

    @property
    def enforced(self) -> bool:
        return not self.shadow

    @property
    def capacity(self) -> int:
        """The largest cost that can ever fit: requests above it are refused with retry_after = inf."""
        return self.burst if self.algorithm is Algorithm.GCRA else self.limit

    def applies_to(self, model: str | None) -> bool:
        """A key-level limit applies to every request; a per-model one when the model matches its glob."""
        pattern = self._model_re
        if pattern is None:
            return True
        return model is not None and pattern.match(model) is not None


def make_limit(
    kind: Kind | str,
    limit: int,
    per: str | None = None,
    *,
    burst: int | None = None,
    algorithm: Algorithm | str | None = None,
    slots: int | None = None,
    shadow: bool = False,
    model: str | None = None,
    name: str | None = None,
    clamp: int = 0,
    calendar: bool = False,
    timezone: str = DEFAULT_TIMEZONE,
) -> LimitSpec:
    """Builds a spec with the documented defaults (also for tests and code, not only YAML).

    Raises ValueError on an invalid combination; `core.config.parse_limits` reports the same problems as
    ConfigErrors that name the field.
    """
    kind = Kind(kind)
    if kind is Kind.CONCURRENCY:
        if per is not None or burst is not None or slots is not None or algorithm not in (None, "gauge"):
            raise ValueError("a concurrency limit takes no period, burst, slots or algorithm")
        if calendar:
            raise ValueError("a concurrency limit has no calendar period")
        base = "concurrent"
        return LimitSpec(
            kind=kind,
            limit=limit,
            period=0.0,
            burst=limit,
            algorithm=Algorithm.GAUGE,
            slots=0,
            shadow=shadow,
            model=model,
            name=name or _default_name(base, model, shadow),
        )
    if per not in ALLOWED_UNITS[kind]:
        raise ValueError(f"unit {per!r} is not allowed for {kind} ({', '.join(ALLOWED_UNITS[kind])})")
    if calendar or algorithm in (Algorithm.CALENDAR, "calendar"):
        if burst is not None or slots is not None or algorithm not in (None, "calendar"):
            raise ValueError("a calendar limit takes no burst, slots or other algorithm")
        period = calendar_of(per, timezone)  # ValueError: not a day or month, unknown zone
        return LimitSpec(
            kind=kind,
            limit=limit,
            period=PERIODS[per],
            burst=limit,
            algorithm=Algorithm.CALENDAR,
            slots=0,
            shadow=shadow,
            model=model,
            name=name or _default_name(f"{kind}/calendar-{per}", model, shadow),
            clamp=clamp,
            calendar=period,
        )
    if algorithm is None:
        algorithm = Algorithm.SLIDING if (kind is Kind.USD or per in SLIDING_BY_DEFAULT) else Algorithm.GCRA
    algorithm = Algorithm(algorithm)
    if algorithm is Algorithm.GAUGE:
        raise ValueError("the gauge algorithm is for concurrency limits")
    if algorithm is Algorithm.GCRA:
        if slots is not None:
            raise ValueError("slots applies to the sliding algorithm only")
        resolved_burst, resolved_slots = (limit if burst is None else burst), 0
    else:
        if burst is not None:
            raise ValueError("burst applies to the gcra algorithm only")
        resolved_burst, resolved_slots = limit, (DEFAULT_SLOTS[per] if slots is None else slots)
    return LimitSpec(
        kind=kind,
        limit=limit,
        period=PERIODS[per],
        burst=resolved_burst,
        algorithm=algorithm,
        slots=resolved_slots,
        shadow=shadow,
        model=model,
        name=name or _default_name(f"{kind}/{per}", model, shadow),
        clamp=clamp,
    )


CLAMP_MIN_TOKENS: Final = 16  # `clamp: true`: the smallest completion worth admitting


def clamp_minimum(value: object, kind: Kind) -> int:
    """A limit's `clamp:` field -> its minimum completion (0: off). `true` (minimum CLAMP_MIN_TOKENS),
    `{min_tokens: N}`, or false/absent. ValueError names what is wrong."""
    if value is None or value is False:
        return 0
    if kind not in (Kind.TOKENS, Kind.USD):
        raise ValueError("applies to tokens and usd limits only (it lowers the completion cap)")
    if value is True:
        return CLAMP_MIN_TOKENS
    if isinstance(value, dict):
        for k in value:
            if k != "min_tokens":
                raise ValueError(f"unknown field {k!r} (expected min_tokens)")
        minimum = value.get("min_tokens", CLAMP_MIN_TOKENS)
        if isinstance(minimum, int) and not isinstance(minimum, bool) and 0 < minimum <= MAX_LIMIT:
            return minimum
        raise ValueError(f"min_tokens must be a positive integer, got {minimum!r}")
    raise ValueError(f"expected true, false or {{min_tokens: N}}, got {value!r}")


def _default_name(base: str, model: str | None, shadow: bool) -> str:
    name = base if model is None else f"{base}@{model}"
    if shadow:
        name += ":shadow"  # so that an enforced limit and its shadow trial can sit side by side
    return "".join(c if NAME_RE.match(c) else "_" for c in name)[:128]


def applicable(specs: Sequence[LimitSpec], model: str | None) -> tuple[int, ...]:
    """Indices of the specs that apply to a request for `model` (cache per (limits, model) if hot)."""
    return tuple(i for i, spec in enumerate(specs) if spec.applies_to(model))


# -- statuses ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WindowStatus:
    """One window's answer to one request, in the window's units.

    `remaining`: what still fits now (after this request's charge if it was charged). `reset_after`:
    seconds until the window is back to its initial state (0 for concurrency). `retry_after`: seconds
    until this request's cost would fit (0 if it fits now; inf if it never can; a hint for concurrency).
    `allowed`: this window alone would admit the request (for a shadow window: "would have admitted").
    """

    spec: LimitSpec
    limit: int
    remaining: int
    reset_after: float
    retry_after: float
    allowed: bool


_SETTERS: Final[tuple[Any, ...]] = tuple(
    getattr(WindowStatus, name).__set__
    for name in ("spec", "limit", "remaining", "reset_after", "retry_after", "allowed")
)
_S_SPEC, _S_LIMIT, _S_REMAINING, _S_RESET, _S_RETRY, _S_ALLOWED = _SETTERS
_new_object = object.__new__


def new_status(
    spec: LimitSpec, remaining: int, reset_after: float, retry_after: float, allowed: bool
) -> WindowStatus:
    """The hot path's constructor: the same frozen object as `WindowStatus(...)`, at half the cost.

    A frozen dataclass's generated __init__ goes through object.__setattr__ per field (about 1 µs for six);
    setting the slots directly is the same operation without the lookups.
    """
    status: WindowStatus = _new_object(WindowStatus)
    _S_SPEC(status, spec)
    _S_LIMIT(status, spec.limit)
    _S_REMAINING(status, remaining)
    _S_RESET(status, reset_after)
    _S_RETRY(status, retry_after)
    _S_ALLOWED(status, allowed)
    return status


@dataclass(frozen=True, slots=True)
class AcquireResult:
    """The answer of a counter store to one Check.

    `allowed`: every enforced window fits (so all of them were charged). `statuses`: one per spec, in
    order. `uncharged`: bit i is set when window i was *not* charged: every window of a denied request,
    and a shadow window that would have refused an admitted one (see `charged`).
    """

    allowed: bool
    statuses: tuple[WindowStatus, ...]
    uncharged: int = 0

    def charged(self, index: int) -> bool:
        return not (self.uncharged >> index) & 1

    @property
    def denied_by(self) -> tuple[WindowStatus, ...]:
        """The enforced windows that refused the request (empty when allowed)."""
        return tuple(s for s in self.statuses if not s.allowed and not s.spec.shadow)

    @property
    def shadow_violations(self) -> tuple[WindowStatus, ...]:
        """Shadow windows that would have refused the request: for metrics, never for the decision."""
        return tuple(s for s in self.statuses if not s.allowed and s.spec.shadow)


_R_SETTERS: Final[tuple[Any, ...]] = tuple(
    getattr(AcquireResult, name).__set__ for name in ("allowed", "statuses", "uncharged")
)
_R_ALLOWED, _R_STATUSES, _R_UNCHARGED = _R_SETTERS


def new_result(allowed: bool, statuses: tuple[WindowStatus, ...], uncharged: int) -> AcquireResult:
    """The hot path's constructor for `AcquireResult` (see `new_status`)."""
    result: AcquireResult = _new_object(AcquireResult)
    _R_ALLOWED(result, allowed)
    _R_STATUSES(result, statuses)
    _R_UNCHARGED(result, uncharged)
    return result


# The algorithms live in core/windows.py (re-exported here, where every caller imported them from).
from nexus_authz.core.windows import (  # noqa: E402
    CONCURRENCY_RETRY_AFTER,
    gauge_adjust,
    gauge_take,
    gcra_adjust,
    gcra_is_fresh,
    gcra_take,
    sliding_charge,
    sliding_is_fresh,
    sliding_new,
    sliding_refund,
    sliding_take,
    sliding_used,
    slot_of,
)
