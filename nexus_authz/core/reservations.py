"""The reservation book: what each in-flight request reserved at Check, until its usage settles it.

At Check a token or USD window is charged an *estimate* (prompt estimate + max_tokens) and a concurrency
window one slot. The book remembers, per request id, which counters were charged how much, so that
`settle` can turn the real usage into per-window differences (refund or extra charge) and release the
concurrency slot. `settle_with` applies them through a store's `adjust` (the one settle loop: the
decision driver and the memory store use it); the book itself is pure: time comes in as `now`, and it
returns data.

Expiry: a reservation not settled within `ttl` expires. Its concurrency slots are released (the request
is gone or its usage report was lost; holding the slot would lock the key out), but its estimate *stays
charged*: the upstream most likely served the request, the estimate is an upper bound of what it could
cost (max_tokens caps the completion), and refunding on silence would let a client that drops its
connection before the usage arrives spend without being counted. Usage that arrives after expiry finds
no reservation (`settle` returns None) and changes nothing.

Bounded: at most `max_entries` reservations. When full, the oldest one is expired early (same rule as
above) to make room, and counted. Expiry order is FIFO: one TTL for the book and a monotonic clock mean
insertion order is expiry order, so expiry pops from the front of an ordered dict, never scans.
A request id that is reserved again (ids come from the edge and could repeat) expires the earlier one.

Retired contexts: a reservation that expires (or is evicted or replaced) with a context keeps that context
in a small FIFO record (at least the last `retired_max`: core/settled.py), so usage that arrives late (a
stream longer than the ttl) is still accounted under the identity nexus admitted it with (`retired`),
never one the response's log entry claims (issue 13).

Settled ids: settlement is idempotent per request id (issue 16). A request id whose usage was accounted
(`settle`, or `retired` handing out a late context) goes into a bounded FIFO record (at least the last
`settled_max`); a second report for it (Envoy's access log service resending a batch, a repeated ext_proc
stream) finds neither a reservation nor a retired context, and `was_settled` tells the caller it is a
duplicate rather than a request nexus never admitted. Either way nothing is charged twice: the
reservation and the retired context are taken once. The record only names what a repeat is.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence, ValuesView
from dataclasses import dataclass

from nexus_authz.core.limits import Kind, LimitSpec
from nexus_authz.core.ports import Adjust
from nexus_authz.core.settled import ChunkedFifo, SettledIds
from nexus_authz.core.shapes import shape_of

__all__ = ["ReservationBook", "ReservationEntry", "Settlement", "new_entries", "settle_with"]

_REQUESTS, _TOKENS, _USD, _CONCURRENCY = Kind.REQUESTS, Kind.TOKENS, Kind.USD, Kind.CONCURRENCY
_NEEDS_SETTLE = frozenset({_TOKENS, _USD, _CONCURRENCY})
_NONE: tuple[Settlement, ...] = ()


@dataclass(frozen=True, slots=True)
class Settlement:
    """Differences to apply to counters: `store.adjust(counter_ids, specs, deltas, now, charged_at)`.

    `expired` is True when produced by expiry or early eviction rather than by a usage report.
    """

    request_id: str
    counter_ids: tuple[str, ...]
    specs: tuple[LimitSpec, ...]
    deltas: tuple[int, ...]
    charged_at: float
    expired: bool = False
    context: object = None  # what the caller attached at reserve time (e.g. key, model, prompt estimate)


ReservationEntry = tuple[tuple[str, ...], tuple[LimitSpec, ...], tuple[int, ...], int, float, float, object]
"""One reservation in flight: (counter_ids, specs, costs, uncharged mask, charged_at, expires_at, context).
Bit i of the mask is set when window i was not charged (a shadow window that would have refused). A plain
tuple: the smallest, and the cheapest to build on the Check path."""
_Entry = ReservationEntry


new_entries: Callable[[], OrderedDict[str, ReservationEntry]] = OrderedDict
"""The book's table (request id -> entry, oldest first). An OrderedDict; the compiled modules install
native/_reservation.pyx's Entries, the same operations without a node object per entry."""


class ReservationBook:
    __slots__ = (
        "_entries",
        "_expire_per_call",
        "_max",
        "_retired",
        "_retired_max",
        "_settled",
        "_settled_max",
        "_ttl",
        "evicted",
        "expired",
        "replaced",
        "settled",
    )

    def __init__(
        self,
        *,
        ttl: float,
        max_entries: int,
        expire_per_call: int = 4,
        retired_max: int = 16384,
        settled_max: int = 65536,
    ) -> None:
        if ttl <= 0 or max_entries <= 0:
            raise ValueError("ttl and max_entries must be positive")
        self._ttl = ttl
        self._max = max_entries
        self._expire_per_call = expire_per_call
        self._entries: OrderedDict[str, _Entry] = new_entries()
        self._retired = ChunkedFifo(max(0, retired_max))  # request id -> context (core/settled.py)
        self._retired_max = max(0, retired_max)
        self._settled = SettledIds(max(0, settled_max))  # request ids accounted lately (core/settled.py)
        self._settled_max = max(0, settled_max)
        self.settled = 0
        self.expired = 0
        self.evicted = 0  # expired early because the book was full
        self.replaced = 0  # expired early because the same request id was reserved again

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def entries(self) -> ValuesView[ReservationEntry]:
        """Every reservation in flight, oldest first (for metrics and the policy API). A live view of the
        book: iterate it without yielding to the event loop, or copy it (`list(...)`) to keep it."""
        return self._entries.values()

    def stats(self) -> dict[str, int]:
        return {
            "pending": len(self._entries),
            "settled": self.settled,
            "expired": self.expired,
            "evicted": self.evicted,
            "replaced": self.replaced,
            "retired_ids": len(self._retired),
            "settled_ids": len(self._settled),
        }

    def reserve(
        self,
        request_id: str,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        costs: Sequence[int],
        now: float,
        uncharged: int = 0,
        context: object = None,
        settles: bool | None = None,
    ) -> tuple[Settlement, ...]:
        """Record what an admitted request was charged (`uncharged`: AcquireResult.uncharged).

        Returns settlements the caller must apply now: reservations that expired meanwhile (a few per
        call), one displaced by a full book, or an earlier one under the same id. Usually empty.
        A request that only hit request-count windows needs no settling and is not recorded, unless it
        carries a `context` (the caller wants it back at settle time, e.g. to account its usage).
        `settles`: whether a charged window must be settled (tokens, USD, concurrency), when the caller
        knows it (core/shapes.py); computed here otherwise.
        """
        out: list[Settlement] | None = None
        entries = self._entries
        if entries and next(iter(entries.values()))[5] <= now:  # the oldest is due: expire a few
            out = self._expire(now, self._expire_per_call)
        if settles is None:
            settles = any(
                spec.kind in _NEEDS_SETTLE and not (uncharged >> i) & 1 for i, spec in enumerate(specs)
            )
        if context is None and not settles:
            return tuple(out) if out else _NONE
        return self._insert(
            request_id,
            (tuple(counter_ids), tuple(specs), tuple(costs), uncharged, now, now + self._ttl, context),
            out,
        )

    def track(self, request_id: str, context: object, now: float) -> tuple[Settlement, ...]:
        """Remember an admitted request that charged nothing to settle (no token, USD or concurrency
        window) until its usage is accounted: `reserve` without windows, on the per-request fast path."""
        out = self._expire(now, self._expire_per_call) if self._entries else None
        return self._insert(request_id, ((), (), (), 0, now, now + self._ttl, context), out)

    def _insert(self, request_id: str, entry: _Entry, out: list[Settlement] | None) -> tuple[Settlement, ...]:
        """Add an entry; an earlier one under the same id, or the oldest when full, expires early."""
        entries = self._entries
        old = entries.pop(request_id, None)
        if old is not None:
            self.replaced += 1
            out = out or []
            out.append(self._retire(request_id, old))
        elif len(entries) >= self._max:
            oldest_id, oldest = entries.popitem(last=False)
            self.evicted += 1
            out = out or []
            out.append(self._retire(oldest_id, oldest))
        entries[request_id] = entry
        return tuple(out) if out else _NONE

    def context(self, request_id: str) -> object:
        """The context attached at reserve time (None if unknown, expired or attached none)."""
        entry = self._entries.get(request_id)
        return entry[6] if entry is not None else None

    def retired(self, request_id: str) -> object:
        """The context of a reservation that expired, was evicted or replaced without being settled,
        once (it is forgotten here, and remembered as settled); None if unknown, already taken or pushed
        out of the record."""
        context = self._retired.pop(request_id, None)
        if context is not None:
            self._mark_settled(request_id)
        return context

    def was_settled(self, request_id: str) -> bool:
        """Whether this request id's usage was accounted already (among the last `settled_max` at least:
        core/settled.py): a repeated report of it is a duplicate, to drop."""
        return request_id in self._settled

    def _mark_settled(self, request_id: str) -> None:
        if self._settled_max:
            self._settled.add(request_id)

    def _retire(self, request_id: str, entry: _Entry) -> Settlement:
        context = entry[6]
        if context is not None and self._retired_max:
            self._retired.put(request_id, context)
        return _expiry(request_id, entry)

    def settle(
        self,
        request_id: str,
        now: float,
        *,
        tokens: int | None = None,
        usd_micros: int | None = None,
        at_least_reserved: bool = False,
    ) -> Settlement | None:
        """The real usage of a request: per-window differences (estimate -> actual) and slot releases.

        `tokens` / `usd_micros` None: keep the estimate for those windows. `at_least_reserved`: the usage
        is a lower bound (a response cut off before its usage record): charge the larger of it and the
        estimate, never refund. Unknown or expired id: None.
        """
        parts = self.settle_parts(request_id, tokens, usd_micros, at_least_reserved)
        if parts is None:
            return None
        counter_ids, specs, deltas, charged_at, context = parts
        return Settlement(request_id, counter_ids, specs, deltas, charged_at, context=context)

    def settle_parts(
        self, request_id: str, tokens: int | None, usd_micros: int | None, at_least_reserved: bool
    ) -> tuple[tuple[str, ...], tuple[LimitSpec, ...], tuple[int, ...], float, object] | None:
        """`settle` without the Settlement object (the accounting hot path): (counter_ids, specs,
        deltas, charged_at, context), or None. Apply it with `store.adjust(counter_ids, specs, deltas,
        now, charged_at)`."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return None
        self.settled += 1
        self._mark_settled(request_id)
        counter_ids, specs, costs, uncharged, charged_at, _, context = entry
        if not specs:  # tracked only (no window to settle)
            return counter_ids, specs, costs, charged_at, context
        deltas: list[int] = []
        append = deltas.append
        for i, spec in enumerate(specs):
            kind = spec.kind
            if kind is _REQUESTS or (uncharged >> i) & 1:
                append(0)
            elif kind is _CONCURRENCY:
                append(-costs[i])
            else:
                actual = tokens if kind is _TOKENS else usd_micros
                delta = 0 if actual is None else actual - costs[i]
                append(delta if delta >= 0 or not at_least_reserved else 0)
        return counter_ids, specs, tuple(deltas), charged_at, context

    def release(self, request_id: str) -> Settlement | None:
        """Free a request's concurrency slots now (its response has ended), keeping the rest of the
        reservation until its usage settles it. None if unknown or it holds no slot (already released).

        The response's usage reaches nexus-authz in Envoy's batched access log, up to
        buffer_flush_interval after the client has the whole response; a client that sends its next
        request at once would find its slot still held. The Envoy configs' Lua tap calls this before
        the last bytes of the response go to the client, for a request marked so (a slot near its
        window's limit: core/shapes.py `near_limit`; see envoy/nexus-usage.lua)."""
        entry = self._entries.get(request_id)
        if entry is None:
            return None
        counter_ids, specs, costs, uncharged, charged_at, expires_at, context = entry
        shape = shape_of(specs)
        held = shape.slot_mask & ~uncharged
        if not held:
            return None
        deltas = [0] * len(specs)
        for i in shape.slot_indices:
            if (held >> i) & 1:
                deltas[i] = -costs[i]
        # settle and expiry must not release them again
        self._entries[request_id] = (
            counter_ids,
            specs,
            costs,
            uncharged | held,
            charged_at,
            expires_at,
            context,
        )
        return _new_settlement(request_id, counter_ids, specs, tuple(deltas), charged_at, False, context)

    def holds_slot(self, specs: Sequence[LimitSpec], uncharged: int) -> bool:
        """Whether a reservation with these windows holds a concurrency slot (worth an early release)."""
        return any(spec.kind is _CONCURRENCY and not (uncharged >> i) & 1 for i, spec in enumerate(specs))

    def expire(self, now: float, max_items: int | None = None) -> list[Settlement]:
        """Expire due reservations, oldest first (all of them by default). For a periodic timer."""
        return self._expire(now, len(self._entries) if max_items is None else max_items)

    def _expire(self, now: float, budget: int) -> list[Settlement]:
        entries = self._entries
        out: list[Settlement] = []
        while budget > 0 and entries:
            request_id = next(iter(entries))
            entry = entries[request_id]
            if entry[5] > now:
                break
            del entries[request_id]
            self.expired += 1
            out.append(self._retire(request_id, entry))
            budget -= 1
        return out

    def next_expiry(self) -> float | None:
        """When the oldest reservation expires (for scheduling a timer)."""
        for entry in self._entries.values():
            return entry[5]
        return None


_SETTLEMENT_SLOTS = tuple(
    getattr(Settlement, name).__set__
    for name in ("request_id", "counter_ids", "specs", "deltas", "charged_at", "expired", "context")
)


def _new_settlement(
    request_id: str,
    counter_ids: tuple[str, ...],
    specs: tuple[LimitSpec, ...],
    deltas: tuple[int, ...],
    charged_at: float,
    expired: bool,
    context: object,
) -> Settlement:
    """`Settlement(...)` with every field given, without the frozen dataclass's per-field __setattr__
    (as limits.new_status)."""
    settlement: Settlement = object.__new__(Settlement)
    s0, s1, s2, s3, s4, s5, s6 = _SETTLEMENT_SLOTS
    s0(settlement, request_id)
    s1(settlement, counter_ids)
    s2(settlement, specs)
    s3(settlement, deltas)
    s4(settlement, charged_at)
    s5(settlement, expired)
    s6(settlement, context)
    return settlement


def _expiry(request_id: str, entry: _Entry) -> Settlement:
    """Release concurrency, keep every estimate charged."""
    counter_ids, specs, costs, uncharged, charged_at, _, context = entry
    deltas = tuple(
        -costs[i] if spec.kind is _CONCURRENCY and not (uncharged >> i) & 1 else 0
        for i, spec in enumerate(specs)
    )
    return Settlement(request_id, counter_ids, specs, deltas, charged_at, expired=True, context=context)


def settle_with(adjust: Adjust, settlements: Iterable[Settlement], now: float) -> None:
    """Apply what the book returned (settle, release, expiry, early eviction) through a store's `adjust`
    (a sync store's `adjust`, an async one's `adjust_soon`), each at the time its reservation was
    charged, so a sliding window refunds the slot that was charged."""
    for s in settlements:
        adjust(s.counter_ids, s.specs, s.deltas, now, s.charged_at)
