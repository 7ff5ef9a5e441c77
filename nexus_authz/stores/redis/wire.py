"""The Lua script's wire format (see `lua`): specs and requests as arguments, replies as statuses, and
the memory store's states as the bytes the script stores."""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from typing import Any, Final

from nexus_authz.core.limits import AcquireResult, Algorithm, LimitSpec, WindowStatus, new_result, new_status

__all__ = ["decode_acquire", "decode_statuses", "pack_state", "segment", "spec_arg", "unpack_state"]

_ALGO: Final = {Algorithm.GCRA: "g", Algorithm.SLIDING: "s", Algorithm.GAUGE: "c", Algorithm.CALENDAR: "k"}
_CALENDAR: Final = Algorithm.CALENDAR
_SPEC_ARGS: dict[LimitSpec, bytes] = {}


def spec_arg(spec: LimitSpec, now: float = 0.0) -> bytes:
    """A spec as the script reads it (derived doubles included, so Lua uses Python's exact values); a
    calendar spec with the bounds of `now`'s period appended (the script has no time zone database)."""
    arg = _SPEC_ARGS.get(spec)
    if spec.algorithm is _CALENDAR:
        return _spec_text(spec, arg) + period_arg(spec, now)
    return _spec_text(spec, arg)


def period_arg(spec: LimitSpec, now: float) -> bytes:
    assert spec.calendar is not None
    start, end = spec.calendar.period(now)
    return b" %r %r" % (start, end)


def _spec_text(spec: LimitSpec, arg: bytes | None) -> bytes:
    if arg is None:
        text = (
            f"{_ALGO[spec.algorithm]} {spec.limit} {spec.interval!r} {spec.max_debt!r} {spec.tolerance!r} "
            f"{spec.burst} {spec.slots} {spec.slot_width!r} {1 if spec.shadow else 0}"
        )
        arg = text.encode()
        if len(_SPEC_ARGS) > 100_000:  # specs come from config reloads: keep the cache bounded
            _SPEC_ARGS.clear()
        _SPEC_ARGS[spec] = arg
    return arg


def segment(
    op: bytes, now: float, charged_at: float | None, specs: Sequence[LimitSpec], values: Sequence[int]
) -> list[bytes]:
    """One request's part of an M call: op (A acquire, P peek, J adjust), now, charged_at, windows, then
    (spec, cost or delta) per window."""
    seg = [
        op,
        repr(now).encode(),
        b"" if charged_at is None else repr(charged_at).encode(),
        b"%d" % len(specs),
    ]
    for spec, value in zip(specs, values, strict=True):
        arg = _SPEC_ARGS.get(spec)
        if arg is None or spec.algorithm is _CALENDAR:
            arg = spec_arg(spec, now)
        seg.append(arg)
        seg.append(b"%d" % value)
    return seg


def _statuses(specs: Sequence[LimitSpec], parts: list[bytes]) -> tuple[WindowStatus, ...]:
    out: list[WindowStatus] = []
    j = 2
    for spec in specs:
        out.append(
            new_status(spec, int(parts[j]), float(parts[j + 1]), float(parts[j + 2]), parts[j + 3] == b"1")
        )
        j += 4
    return tuple(out)


def decode_statuses(specs: Sequence[LimitSpec], reply: bytes) -> tuple[WindowStatus, ...]:
    return _statuses(specs, reply.split(b" "))


def decode_acquire(specs: Sequence[LimitSpec], reply: bytes) -> AcquireResult:
    """A reply string: allowed, uncharged, then (remaining, reset_after, retry_after, allowed) per window."""
    parts = reply.split(b" ")
    return new_result(parts[0] == b"1", _statuses(specs, parts), int(parts[1]))


# -- states as bytes: the local view of the write-behind mode <-> Redis ---------------------------------

_BIG_ENDIAN: Final = sys.byteorder == "big"
_GCRA_PACK: Final = struct.Struct("<dd")
_GAUGE_PACK: Final = struct.Struct("<d")


def pack_state(state: Any) -> bytes:
    """A memory-store state (complex GCRA pair, sliding array, gauge int, None) as the script stores it,
    without the version."""
    if state is None:
        return b""
    if state.__class__ is complex:
        return _GCRA_PACK.pack(state.real, state.imag)
    if state.__class__ is array:
        if _BIG_ENDIAN:
            copy = array("d", state)
            copy.byteswap()
            return copy.tobytes()
        return bytes(state.tobytes())
    return _GAUGE_PACK.pack(float(state))


def unpack_state(raw: bytes) -> object:
    """The memory-store form of a state read back (no version), by its shape: the memory store keeps
    whatever was written last and reads a state of another shape as fresh; so does the local view."""
    n = len(raw)
    if n == 16:
        debt, since = _GCRA_PACK.unpack(raw)
        return complex(debt, since) if debt else None
    if n == 8:
        (x,) = _GAUGE_PACK.unpack(raw)
        return int(x) or None
    if n == 24 or (n >= 40 and n % 8 == 0):  # a calendar period's [end, start, used] or a sliding window
        state = array("d")
        state.frombytes(raw)
        if _BIG_ENDIAN:
            state.byteswap()
        return state
    return None
