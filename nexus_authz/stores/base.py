"""The counter-store seam, store side: the sync port re-exported, and the memory store behind the async
port.

The ports themselves are declared in the core (`nexus_authz.core.ports`): `CounterStore` (sync, the
memory store) and `AsyncCounterStore` (nowait-first, the Redis stores). `LocalCounters` puts a sync store
behind the async port, so the decision driver (`nexus_authz.decide`) has one path for every store: every
nowait call of a local store answers, and no coroutine is made. The decision logic lives in
`nexus_authz.core.limits`; a store only keeps state and applies those functions atomically for one
Check, so one contract suite (tests/stores/test_counter_contract.py) runs against every backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from nexus_authz.core.limits import AcquireResult, LimitSpec, WindowStatus
from nexus_authz.core.ports import AsyncCounterStore, CounterStore, StoreHealth
from nexus_authz.core.reservations import Settlement, settle_with

__all__ = ["AcquireResult", "AsyncCounterStore", "CounterStore", "LocalCounters", "apply_settlements"]


class LocalCounters:
    """A synchronous `CounterStore` as an `AsyncCounterStore`: every nowait call answers at once.

    The nowait methods are the store's own bound methods (no extra frame on the hot path); the async
    twins exist for the port's sake and never wait."""

    __slots__ = ("acquire_nowait", "adjust_soon", "peek_nowait", "store", "sweep", "stats")

    def __init__(self, store: CounterStore) -> None:
        self.store = store
        self.acquire_nowait = store.acquire
        self.peek_nowait = store.peek
        self.adjust_soon = store.adjust
        self.sweep = store.sweep
        self.stats = store.stats

    def __len__(self) -> int:
        return len(self.store)

    async def acquire(
        self, counter_ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
    ) -> AcquireResult:
        return self.store.acquire(counter_ids, specs, costs, now)

    async def peek(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        now: float,
        costs: Sequence[int] | None = None,
    ) -> tuple[WindowStatus, ...]:
        return self.store.peek(counter_ids, specs, now, costs)

    def adjust_nowait(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        deltas: Sequence[int],
        now: float,
        charged_at: float | None = None,
    ) -> bool:
        self.store.adjust(counter_ids, specs, deltas, now, charged_at)
        return True

    async def adjust(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        deltas: Sequence[int],
        now: float,
        charged_at: float | None = None,
    ) -> None:
        self.store.adjust(counter_ids, specs, deltas, now, charged_at)

    def health(self) -> StoreHealth | None:
        return None  # in this process: never unreachable

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def apply_settlements(store: CounterStore, settlements: Iterable[Settlement], now: float) -> None:
    """Apply what a ReservationBook returned (settle, expiry, early eviction) to a sync store."""
    settle_with(store.adjust, settlements, now)
