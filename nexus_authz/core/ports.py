"""The ports: what the core and the decision driver need from a counter store, and how a store says it
cannot answer.

Two shapes, both declared here (as Limitador declares `CounterStorage` and `AsyncCounterStorage`):

* `CounterStore`, synchronous: the embedded memory store (`stores.memory`). Every call answers at once.
* `AsyncCounterStore`, nowait-first: the Redis stores (`stores.redis`), and the memory store behind
  `stores.base.LocalCounters`. `acquire_nowait` / `peek_nowait` answer at once when the store can
  decide without waiting (the memory store always; Redis's batched mode from its local view), else
  return None and the caller awaits `acquire` / `peek`. So the one driver (`nexus_authz.decide`) has one
  path for every store, and the common case creates no coroutine.

Counter ids are opaque strings built by the caller (e.g. f"{key_id}\\x00{limit_name}"): a store never
parses them. Ids within one call must be distinct. If a limit changes shape on reload (algorithm, slots),
its state no longer matches and is treated as fresh.

`StoreUnavailable` is the one "store down" error: the async store's `acquire` / `peek` raise it when they
cannot decide (Redis away and `fail_closed`); the driver answers 503 (ext_authz) or fails the RPC (the
rate limit service). Anything else a store raises is a bug, and surfaces as one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from nexus_authz.core.limits import AcquireResult, LimitSpec, WindowStatus

__all__ = ["Adjust", "AsyncCounterStore", "CounterStore", "StoreHealth", "StoreUnavailable"]


class StoreUnavailable(Exception):
    """The counter store cannot answer now.

    `transient`: it may answer again soon (Redis unreachable, a timeout, the circuit breaker open);
    False when it will not without a change (the store was closed). `retry_after`: seconds a client
    should wait (the 503's Retry-After).
    """

    def __init__(self, reason: str, *, transient: bool = True, retry_after: float = 1.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.retry_after = retry_after


class Adjust(Protocol):
    """A store's way to apply settle differences without waiting: `CounterStore.adjust`, or
    `AsyncCounterStore.adjust_soon`."""

    def __call__(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        deltas: Sequence[int],
        now: float,
        charged_at: float | None = None,
        /,
    ) -> None: ...


@runtime_checkable
class CounterStore(Protocol):
    """A synchronous counter store: state only; the algorithms are `core.limits`'."""

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

    def sweep(self, now: float, max_items: int | None = None) -> int:
        """Drop drained counters (periodic upkeep); how many were dropped."""
        ...

    def __contains__(self, counter_id: object) -> bool:
        """False only if the counter certainly holds no state: a cheap test before a `peek` (True is
        always a correct answer)."""
        ...

    def __len__(self) -> int:
        """Counters currently holding state (for metrics)."""
        ...

    def stats(self) -> dict[str, int]:
        """Plain counters for metrics, e.g. {"counters": ..., "evicted": ...}."""
        ...


class StoreHealth(Protocol):
    """What readiness and metrics read of a store that can be unreachable."""

    @property
    def state(self) -> str:
        """ok, degraded (deciding locally, fail_open) or down (fail_closed: checks answer 503)."""
        ...

    @property
    def ready(self) -> bool: ...


@runtime_checkable
class AsyncCounterStore(Protocol):
    """A counter store that may have to wait (Redis), nowait-first. The same semantics as `CounterStore`;
    `acquire` and `peek` raise `StoreUnavailable` when the store cannot decide."""

    def acquire_nowait(
        self, counter_ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
    ) -> AcquireResult | None:
        """The answer if it can be given without waiting, else None (then await `acquire`). Never raises
        `StoreUnavailable`: a store that cannot decide returns None and `acquire` says why."""
        ...

    async def acquire(
        self, counter_ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
    ) -> AcquireResult: ...

    def peek_nowait(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        now: float,
        costs: Sequence[int] | None = None,
    ) -> tuple[WindowStatus, ...] | None:
        """`peek`'s answer if it can be given without waiting, else None (then await `peek`)."""
        ...

    async def peek(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        now: float,
        costs: Sequence[int] | None = None,
    ) -> tuple[WindowStatus, ...]: ...

    def adjust_nowait(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        deltas: Sequence[int],
        now: float,
        charged_at: float | None = None,
    ) -> bool:
        """Applied at once (True), or False: await `adjust` (or use `adjust_soon`)."""
        ...

    def adjust_soon(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        deltas: Sequence[int],
        now: float,
        charged_at: float | None = None,
    ) -> None:
        """`adjust` for synchronous call sites: applied now if possible, else sent in the background, in
        order with every other call. Never raises; a change is never lost."""
        ...

    async def adjust(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        deltas: Sequence[int],
        now: float,
        charged_at: float | None = None,
    ) -> None: ...

    def sweep(self, now: float, max_items: int | None = None) -> int: ...

    def __len__(self) -> int: ...

    def stats(self) -> dict[str, int]: ...

    def health(self) -> StoreHealth | None:
        """The store's health (None: it cannot be unreachable, e.g. in this process)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...
