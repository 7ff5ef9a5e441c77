"""Local counters and the bounded write-behind queue of the Redis store.

`LocalView` is the memory store, plus reading and replacing one counter's state: in batched mode it
holds, per counter, the global state last pulled from Redis with this replica's own charges applied on
top, and every decision is made from it with the same maths as the embedded store. In exact mode it
only serves while Redis is away (fail_open: "local limits").

`WriteBehind` remembers what this replica changed and Redis has not seen yet, per counter, as a few
coalesced deltas: GCRA and gauges one net amount (with the time of the last change), sliding windows one
amount per slot charged (and per slot refunded), calendar periods one per period charged (and
refunded), so a minute of traffic on one key is a handful of
entries, not one per request. Bounded: at most `max_queue` entries in all; past that, changes to counters
that have no entry yet are dropped and counted (they never reach Redis; the local decision stands).

Each pending counter also carries `base`, the Redis version its local state derives from. When the flush
finds that version still in Redis (nobody else wrote the counter since), it replaces the state with this
replica's own, which is exact; otherwise the deltas are applied to whatever is there, which is exact for
sliding windows and gauges and conservative for GCRA (the charge is applied at the time of the last one,
not drained for the time in between). A GCRA carry-over is capped at one burst plus `carry` seconds of
debt, so a replica that decided alone through a long outage does not lock its keys out for as long after
Redis returns.
"""

from __future__ import annotations

import math
from array import array
from typing import Any

from nexus_authz.core.calendar import calendar_charge, calendar_refund
from nexus_authz.core.limits import (
    Algorithm,
    LimitSpec,
    gauge_adjust,
    gcra_adjust,
    sliding_charge,
    sliding_refund,
    slot_of,
)
from nexus_authz.stores.memory import MemoryCounterStore

__all__ = ["LocalView", "Pending", "WriteBehind", "merge_deltas"]

_GCRA = Algorithm.GCRA
_SLIDING = Algorithm.SLIDING
_CALENDAR = Algorithm.CALENDAR
_NAN = math.nan
MAX_IN_DOUBT = 8


class LocalView(MemoryCounterStore):
    """The memory store with access to one counter's raw state (the write-behind imports/exports it)."""

    __slots__ = ()
    _compact = False  # states go to Redis as they are: sliding windows in the full form (wire.pack_state)

    def state(self, cid: str) -> object:
        return self._states.get(cid)

    def install(self, cid: str, state: Any) -> None:
        if state is not None:
            self._put(cid, state)
        else:
            self._drop(cid)


class Pending:
    """What one counter owes Redis: its changes in order, each [amount, at, charged_at (nan: none)]."""

    __slots__ = ("base", "capped", "index", "items", "keys", "spec")

    def __init__(self, spec: LimitSpec, base: float | None, capped: bool = False) -> None:
        self.spec = spec
        self.base = base
        self.capped = capped  # holds changes decided while Redis was away: GCRA carry-over is capped
        self.items: list[list[float]] = []
        self.keys: list[object] = []  # the exact-merge key of each item
        self.index: dict[object, list[float]] = {}  # coarse key -> item (coalescing anywhere)


class WriteBehind:
    """The bounded queue. Two ways of merging a change into what is pending for its counter:

    * exactly: into the counter's last change, only when applying both at once is the same as applying
      them in turn (a GCRA change at the same instant, a sliding change in the same slot, a gauge change
      of the same sign). Used while the counter's Redis version is unknown, because then the deltas are
      the only way its changes reach Redis, and with one replica they must arrive as they were made.
    * coarsely: into any earlier change of the same kind (GCRA: one net amount; sliding: one per slot;
      gauge: one net amount). Used when the version is known (the deltas then matter only if another
      replica wrote the counter meanwhile: an approximation is fine) and when the queue is full.
    """

    __slots__ = ("carry", "doubt_size", "dropped", "in_doubt", "max_queue", "pending", "size")

    def __init__(self, *, max_queue: int, carry: float) -> None:
        self.max_queue = max_queue
        self.carry = carry
        self.pending: dict[str, Pending] = {}
        self.size = 0  # items pending
        self.dropped = 0
        # batches sent whose answer was lost: resent as they were, under the same token, until answered
        self.in_doubt: dict[bytes, dict[str, Pending]] = {}
        self.doubt_size = 0

    def __len__(self) -> int:
        return self.size + self.doubt_size

    def doubt(self, token: bytes, cut: dict[str, Pending]) -> None:
        """A batch that may or may not have been applied: keep it apart, to resend under its token."""
        self.in_doubt[token] = cut
        self.doubt_size += _items(cut)
        while len(self.in_doubt) > MAX_IN_DOUBT:  # Redis keeps failing after the writes: stop tracking
            oldest = next(iter(self.in_doubt))
            old = self.in_doubt[oldest]
            self.settle(oldest)
            self.restore(old)  # its changes may now count twice: the conservative side

    def settle(self, token: bytes) -> None:
        """An in-doubt batch got its answer (applied now, or found applied before)."""
        cut = self.in_doubt.pop(token, None)
        if cut is not None:
            self.doubt_size -= _items(cut)

    def record(
        self,
        cid: str,
        spec: LimitSpec,
        amount: int,
        at: float,
        charged_at: float | None = None,
        base: float | None = None,
        capped: bool = False,
    ) -> bool:
        """Remember one change; False if the queue is full and it was dropped. `capped`: decided while
        Redis was away (see the module docstring)."""
        entry = self.pending.get(cid)
        if entry is not None and entry.spec is not spec and entry.spec != spec:
            # the limit changed on reload: its old state counts as fresh, so its old deltas are moot
            del self.pending[cid]
            self.size -= len(entry.items)
            entry = None
        algorithm = spec.algorithm
        if algorithm is _SLIDING:
            slot = slot_of(at, spec.slot_width)
            fine: object
            coarse: object
            if amount > 0:
                fine = coarse = slot
            else:
                charged_slot = None if charged_at is None else slot_of(charged_at, spec.slot_width)
                fine, coarse = ("r", slot, charged_slot), ("r", charged_slot)
        elif algorithm is _GCRA:
            fine, coarse = (at, amount > 0), "g"  # same instant and sign: no clamp in between
        elif algorithm is _CALENDAR:  # charges of one period add up; so do refunds of one period
            assert spec.calendar is not None
            period = spec.calendar.period(at)[0]
            if amount > 0:
                fine = coarse = ("k", period)
            else:
                charged = None if charged_at is None else spec.calendar.period(charged_at)[0]
                fine = coarse = ("r", period, charged)
        else:
            fine, coarse = amount > 0, "q"
        full = self.size + self.doubt_size >= self.max_queue
        if entry is not None:
            if capped:
                entry.capped = True
            if entry.base is None and not full:
                if entry.items and entry.keys[-1] == fine:
                    _merge(entry.items[-1], amount, at)
                    return True
            else:
                item = entry.index.get(coarse)
                if item is not None:
                    _merge(item, amount, at)
                    return True
        if full:
            self.dropped += 1
            return False
        if entry is None:
            entry = self.pending[cid] = Pending(spec, base, capped)
        item = [float(amount), at, _NAN if charged_at is None else charged_at]
        entry.items.append(item)
        entry.keys.append(fine)
        entry.index.setdefault(coarse, item)
        self.size += 1
        return True

    def cut(self) -> dict[str, Pending]:
        """Take everything pending (to send it); `restore` puts it back if the send fails."""
        out, self.pending = self.pending, {}
        self.size = 0
        return out

    def restore(self, cut: dict[str, Pending]) -> None:
        """Put back a batch that did not reach Redis, ahead of what was recorded since (it is older)."""
        newer, self.pending = self.pending, cut
        self.size = sum(len(entry.items) for entry in cut.values())
        for cid, entry in newer.items():
            mine = self.pending.get(cid)
            if mine is None or mine.spec != entry.spec:
                if mine is not None:
                    self.size -= len(mine.items)
                self.pending[cid] = entry
            else:
                mine.capped = mine.capped or entry.capped
                mine.items.extend(entry.items)
                mine.keys.extend(entry.keys)
                for key, item in entry.index.items():
                    mine.index.setdefault(key, item)
            self.size += len(entry.items)
        excess = self.size + self.doubt_size - self.max_queue
        if excess > 0:  # only by what was recorded during the send
            self.dropped += excess

    def flat_items(self, entry: Pending) -> list[bytes]:
        """The deltas as the script reads them: amount, at, charged_at (empty for none)."""
        out: list[bytes] = []
        for amount, at, charged_at in entry.items:
            out.append(repr(amount).encode())
            out.append(repr(at).encode())
            out.append(b"" if charged_at != charged_at else repr(charged_at).encode())
        return out

    def cap(self, entry: Pending) -> bytes:
        """The script's `cap` for an entry: one burst plus `carry` seconds of GCRA debt, if capped."""
        if not entry.capped or entry.spec.algorithm is not _GCRA:
            return b""
        return repr(entry.spec.tolerance + self.carry).encode()


def _items(cut: dict[str, Pending]) -> int:
    return sum(len(entry.items) for entry in cut.values())


def _merge(item: list[float], amount: int, at: float) -> None:
    item[0] += amount
    if at > item[1]:
        item[1] = at


def merge_deltas(state: Any, spec: LimitSpec, entry: Pending, carry: float) -> Any:
    """Apply coalesced deltas to a state the way the script's flush does (the local twin of it)."""
    algorithm = spec.algorithm
    cap = spec.tolerance + carry if entry.capped else math.inf
    for amount, at, charged_at in entry.items:
        if algorithm is _GCRA:
            if amount * spec.interval > cap:
                amount = cap / spec.interval
            if state.__class__ is complex:
                debt, since = state.real, state.imag
            else:
                debt, since = 0.0, at
            debt = gcra_adjust(debt, since, at, spec, amount)  # type: ignore[arg-type]
            state = complex(debt, since if since > at else at) if debt else None
        elif algorithm is _CALENDAR:
            period = state if state.__class__ is array and len(state) == 3 else None
            if amount > 0:
                state = calendar_charge(period, at, spec, int(amount))
            elif period is not None:
                refund_at = None if charged_at != charged_at else charged_at
                calendar_refund(period, at, spec, int(-amount), refund_at)
        elif algorithm is _SLIDING:
            window = state if state.__class__ is array and len(state) == spec.slots + 3 else None
            if amount > 0:
                state = sliding_charge(window, at, spec, amount)  # type: ignore[arg-type]
            elif window is not None:
                sliding_refund(window, at, spec, -amount, None if charged_at != charged_at else charged_at)  # type: ignore[arg-type]
        else:
            state = gauge_adjust(state if state.__class__ is int else 0, int(amount)) or None
    return state
