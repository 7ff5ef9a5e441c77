"""The counter-store seam: the one interface every limit backend implements (memory now, Redis later).

The decision logic lives in `nexus_authz.core.limits`; a store only keeps state and applies those
functions atomically for one Check. This keeps the algorithms in one place, lets one contract suite
(tests/stores/test_counter_contract.py) run against every backend, and keeps the API synchronous and
allocation-light for the embedded store (a remote store adds async twins of these methods).

Counter ids are opaque strings built by the caller (e.g. f"{key_id}\\x00{limit_name}"): the store never
parses them. Ids within one call must be distinct. If a limit changes shape on reload (algorithm, slots),
its state no longer matches and is treated as fresh; include something that identifies the spec in the
id if a changed limit should start from zero on purpose.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from nexus_authz.core.limits import AcquireResult, LimitSpec, WindowStatus
from nexus_authz.core.reservations import Settlement

__all__ = ["AcquireResult", "CounterStore", "apply_settlements"]


@runtime_checkable
class CounterStore(Protocol):
    def acquire(
        self, counter_ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
    ) -> AcquireResult:
        """Evaluate every window of one request and charge all of them or none.

        Allowed iff every enforced window fits its cost. Then each enforced window is charged, and each
        shadow window too if it would have admitted the request on its own (so a shadow counter is what
        the limit would hold if it were enforced). A denied request charges nothing.
        """
        ...

    def adjust(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        deltas: Sequence[int],
        now: float,
        charged_at: float | None = None,
    ) -> None:
        """Apply settle differences now: positive charges extra (may overdraw), negative refunds or
        releases (never below empty). `charged_at` is when the reservation was charged, so a sliding
        window refunds the right slot."""
        ...

    def peek(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        now: float,
        costs: Sequence[int] | None = None,
    ) -> tuple[WindowStatus, ...]:
        """What `acquire` would answer, changing nothing (dry runs, the query API). No costs: zero each."""
        ...

    def __len__(self) -> int:
        """Counters currently holding state (for metrics)."""
        ...

    def stats(self) -> dict[str, int]:
        """Plain counters for metrics, e.g. {"counters": ..., "evicted": ...}."""
        ...


def apply_settlements(store: CounterStore, settlements: Iterable[Settlement], now: float) -> None:
    """Apply what a ReservationBook returned (settle, expiry, early eviction) to the store."""
    for s in settlements:
        store.adjust(s.counter_ids, s.specs, s.deltas, now, s.charged_at)
