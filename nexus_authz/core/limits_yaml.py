"""The `limits:` list of a plan, key, group or tenant in nexus.yaml / the key file, parsed into LimitSpecs
(what a limit means: core/limits.py). Split from core/config.py, which re-exports `parse_limits`.
Every error names the file, the line and the field."""

from __future__ import annotations

from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Final

from nexus_authz.core.calendar import parse_calendar
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.limits import (
    ALLOWED_UNITS,
    MAX_LIMIT,
    MAX_SLOTS,
    MIN_SLOTS,
    NAME_RE,
    PERIODS,
    SLIDING_BY_DEFAULT,
    Kind,
    LimitSpec,
    clamp_minimum,
    make_limit,
)
from nexus_authz.core.yamlsrc import describe

__all__ = ["parse_limits"]

# -- the `limits:` list of a plan or key (what a limit means: core/limits.py) --------------------------
_Fail = Callable[[str], ConfigError]
_KIND_KEYS: Final = tuple(k.value for k in Kind)
_LIMIT_FIELDS: Final = {"per", "burst", "algorithm", "slots", "shadow", "model", "name", "clamp"}
_FIELDS: Final = frozenset(_KIND_KEYS) | _LIMIT_FIELDS | {"calendar", "timezone"}
_FIELD_LIST: Final = ", ".join(sorted(_FIELDS))


def parse_limits(raw: object, *, source: str, field: str, timezone: str = "UTC") -> tuple[LimitSpec, ...]:
    """Validate the `limits:` list of a plan or key.

    Each entry has exactly one of requests/tokens/usd/concurrent, and optionally per, burst, algorithm,
    slots, shadow, model, name, calendar, timezone (core/calendar.py; the argument: its default). Errors:
    `nexus.yaml:14: plans.free.limits[2].per: unknown unit 'fortnight' (expected second, minute, ...)`.
    Names must be unique within the list: they label metrics and the RateLimit headers.
    """
    if raw is None:
        return ()
    if not isinstance(raw, list | tuple):
        raise ConfigError(f"expected a list of limits, got {describe(raw)}", source=source, field=field)
    file_source = _strip_line(source)
    item_lines: list[int] | None = getattr(raw, "lines", None)
    specs: list[LimitSpec] = []
    names: dict[str, int] = {}
    for i, entry in enumerate(raw):
        where = f"{field}[{i}]"
        entry_source = f"{file_source}:{item_lines[i]}" if item_lines and i < len(item_lines) else source
        spec = _parse_entry(entry, file_source, entry_source, where, timezone)
        if spec.name in names:
            raise ConfigError(
                f"duplicate limit name {spec.name!r} (also {field}[{names[spec.name]}]); "
                "give one of them a `name:`",
                source=entry_source,
                field=f"{where}.name",
            )
        names[spec.name] = i
        specs.append(spec)
    return tuple(specs)


def _strip_line(source: str) -> str:
    head, sep, tail = source.rpartition(":")
    return head if sep and tail.isdigit() and head else source


def _parse_entry(entry: object, file_source: str, entry_source: str, where: str, zone: str) -> LimitSpec:
    if not isinstance(entry, dict):
        raise ConfigError(
            f"expected a mapping such as {{requests: 60, per: minute}}, got {describe(entry)}",
            source=entry_source,
            field=where,
        )
    key_lines: dict[str, int] = getattr(entry, "lines", {})

    def fail(key: str | None, message: str) -> ConfigError:
        line = key_lines.get(key) if key is not None else None
        return ConfigError(
            message,
            source=f"{file_source}:{line}" if line else entry_source,
            field=f"{where}.{key}" if key is not None else where,
        )

    for key in entry:
        if key not in _FIELDS:
            raise fail(str(key), f"unknown field (expected one of: {_FIELD_LIST})")
    present = [k for k in _KIND_KEYS if entry.get(k) is not None]
    if not present:
        raise fail(None, "needs exactly one of requests, tokens, usd, concurrent")
    if len(present) > 1:
        raise fail(
            present[1],
            f"a limit has one of requests, tokens, usd, concurrent; this one also has {present[0]!r}",
        )
    kind = Kind(present[0])
    if kind is Kind.USD:
        limit = _micro_usd(entry[kind.value], lambda m: fail(kind.value, m))
    else:
        limit = _positive_int(entry[kind.value], lambda m: fail(kind.value, m))

    per = entry.get("per")
    if kind is Kind.CONCURRENCY:
        for key in ("per", "burst", "slots", "algorithm"):
            if entry.get(key) is not None:
                raise fail(key, "does not apply to a concurrency limit (it counts requests in flight)")
    else:
        allowed = ALLOWED_UNITS[kind]
        if per is None:
            raise fail("per", f"is required ({', '.join(allowed)})")
        if not isinstance(per, str) or per not in PERIODS:
            raise fail("per", f"unknown unit {per!r} (expected {', '.join(allowed)})")
        if per not in allowed:
            raise fail(
                "per", f"unit {per!r} is not available for {kind} limits (expected {', '.join(allowed)})"
            )

    calendar = parse_calendar(entry, kind.value, per, zone, fail)
    algorithm = entry.get("algorithm")
    if algorithm is not None and algorithm not in ("gcra", "sliding"):
        raise fail("algorithm", f"unknown algorithm {algorithm!r} (expected gcra or sliding)")
    burst = entry.get("burst")
    if burst is not None:
        burst = _positive_int(burst, lambda m: fail("burst", m))
    slots = entry.get("slots")
    if slots is not None:
        slots = _positive_int(slots, lambda m: fail("slots", m))
        if not MIN_SLOTS <= slots <= MAX_SLOTS:
            raise fail("slots", f"must be between {MIN_SLOTS} and {MAX_SLOTS}, got {slots}")
    if kind is not Kind.CONCURRENCY and calendar is None:
        resolved = algorithm or ("sliding" if (kind is Kind.USD or per in SLIDING_BY_DEFAULT) else "gcra")
        if burst is not None and resolved != "gcra":
            raise fail("burst", "applies to algorithm gcra only (this limit uses sliding)")
        if slots is not None and resolved != "sliding":
            raise fail("slots", "applies to algorithm sliding only (this limit uses gcra)")
    shadow = entry.get("shadow", False)
    if shadow is None:
        shadow = False
    if not isinstance(shadow, bool):
        raise fail("shadow", f"expected true or false, got {describe(shadow)}")
    model = entry.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise fail("model", f'expected a model name or glob such as "gpt-4*", got {describe(model)}')
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or not NAME_RE.match(name)):
        raise fail("name", "expected 1-128 printable ASCII characters without spaces or quotes")
    try:
        clamp = clamp_minimum(entry.get("clamp"), kind)
    except ValueError as exc:
        raise fail("clamp", str(exc)) from None
    try:
        return make_limit(
            kind,
            limit,
            per,
            burst=burst,
            algorithm=algorithm,
            slots=slots,
            shadow=shadow,
            model=model.strip() if model is not None else None,
            name=name,
            clamp=clamp,
            calendar=calendar is not None,
            timezone=calendar.zone if calendar is not None else zone,
        )
    except ValueError as exc:  # anything the checks above did not word better
        raise fail(None, str(exc)) from None


def _positive_int(value: object, fail: _Fail) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(f"expected a positive integer, got {describe(value)}")
    if not 0 < value <= MAX_LIMIT:
        raise fail(f"must be between 1 and {MAX_LIMIT}, got {value}")
    return value


def _micro_usd(value: object, fail: _Fail) -> int:
    """USD -> integer micro-dollars, rounded half up (floats via their shortest repr: 5.1 is 5100000)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise fail(f"expected an amount in USD such as 5.00, got {describe(value)}")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise fail(f"expected an amount in USD such as 5.00, got {describe(value)}") from None
    if not amount.is_finite() or amount <= 0:
        raise fail(f"must be a positive amount, got {value!r}")
    micros = int((amount * 1_000_000).to_integral_value(rounding=ROUND_HALF_UP))
    if not 0 < micros <= MAX_LIMIT:
        raise fail(f"must be between 0.000001 and {MAX_LIMIT // 1_000_000}, got {value!r}")
    return micros
