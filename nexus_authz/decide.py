"""The one decision driver: the pure core says what to do, this does the counter store's I/O.

Every transport decides through a `Decider`: HTTP ext_authz and nginx auth_request
(`adapters.http_authz`), gRPC ext_authz (`adapters.envoy_authz`), the policy API's dry-run Check
(`adapters.policy_api`), all through `Engine.check_fast` / `Engine.dry_run`, and the rate limit service
(`adapters.envoy_rls`) through `charge` / `read`. The flow, written once:

    Policy.admit -> (tracking only: the book) -> store.acquire_nowait, else await store.acquire
                 -> Policy.conclude (reserve; displaced reservations back through store.adjust_soon)

The store is an `AsyncCounterStore` (`core.ports`): a Redis store, or the memory store behind
`stores.base.LocalCounters`, whose nowait calls always answer. So there is one path for every store,
no adapter looks at a store's type, and the common case (the memory store, or Redis's batched mode from
its local view) returns the `Decision` itself without creating a coroutine; only a store that must wait
costs an awaitable. A store that cannot decide raises `StoreUnavailable`: ext_authz answers 503 with
Retry-After, the rate limit service fails the RPC (Envoy's `failure_mode_deny` decides).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

from nexus_authz.core.keys import KeySnapshot
from nexus_authz.core.limits import AcquireResult, LimitSpec, WindowStatus, new_result
from nexus_authz.core.model import Decision, InFlight, Reason, Request, new_allow
from nexus_authz.core.policy import Admission, Policy, unavailable
from nexus_authz.core.ports import AsyncCounterStore, CounterStore, StoreUnavailable
from nexus_authz.core.reservations import ReservationBook, Settlement, settle_with
from nexus_authz.latency import LatencyHistogram

__all__ = ["Decider"]


class Decider:
    """Decides requests against one counter store; counts what it decided (`decisions`, `latency`).

    `book`: the reservation book (None: nothing is reserved, e.g. the rate limit service alone).
    `failures`: the local store counting invalid keys per address (brute-force protection).
    """

    __slots__ = ("book", "clock", "decisions", "failures", "latency", "store")

    def __init__(
        self,
        store: AsyncCounterStore,
        *,
        book: ReservationBook | None = None,
        failures: CounterStore | None = None,
        clock: Callable[[], float] = time.time,
        decisions: dict[Reason, int] | None = None,
        latency: LatencyHistogram | None = None,
    ) -> None:
        self.store = store
        self.book = book
        self.failures = failures
        self.clock = clock
        self.decisions: dict[Reason, int] = decisions if decisions is not None else dict.fromkeys(Reason, 0)
        self.latency = latency if latency is not None else LatencyHistogram()

    # -- ext_authz: the whole decision ---------------------------------------------------------------
    def check(
        self, policy: Policy, snapshot: KeySnapshot, request: Request
    ) -> Decision | Awaitable[Decision]:
        """The decision, at once whenever it can be made without waiting (a request refused before any
        limit, the memory store, Redis's batched mode), else an awaitable. Callers test
        `result.__class__ is Decision` and await only otherwise."""
        started = time.perf_counter()
        now = self.clock()
        admission = policy.admit(request, snapshot, now, self.failures)
        if isinstance(admission, Decision):
            return self._counted(admission, started)
        if not admission.specs:  # nothing to charge: remember who it was, for accounting
            book = self.book
            if book is not None and admission.request_id and policy.track:
                key = admission.key
                context = InFlight(
                    key.key_id, key.tenant, admission.model, admission.prompt_tokens, admission.body
                )
                settle_with(self.store.adjust_soon, book.track(admission.request_id, context, now), now)
            return self._counted(new_allow(admission.key, admission.model, ()), started)
        store = self.store
        result = store.acquire_nowait(admission.counter_ids, admission.specs, admission.costs, now)
        if result is None:
            return self._check_later(policy, admission, now, started)
        return self._counted(policy.conclude(admission, result, now, store.adjust_soon, self.book), started)

    async def _check_later(
        self, policy: Policy, admission: Admission, now: float, started: float
    ) -> Decision:
        store = self.store
        try:
            result = await store.acquire(admission.counter_ids, admission.specs, admission.costs, now)
        except StoreUnavailable as exc:  # fail_closed and the store is away: 503, retry soon
            return self._counted(unavailable(exc.retry_after), started)
        return self._counted(policy.conclude(admission, result, now, store.adjust_soon, self.book), started)

    def _counted(self, decision: Decision, started: float) -> Decision:
        self.decisions[decision.reason] += 1
        self.latency.observe(time.perf_counter() - started)
        return decision

    async def dry_run(self, policy: Policy, snapshot: KeySnapshot, request: Request) -> Decision:
        """The decision `check` would make, charging, reserving and counting nothing (no failure
        counting either)."""
        now = self.clock()
        admission = policy.admit(request, snapshot, now)
        if isinstance(admission, Decision):
            return admission
        if not admission.specs:
            return new_allow(admission.key, admission.model, ())
        statuses = await self.peek(admission.counter_ids, admission.specs, now, admission.costs)
        if statuses is None:
            return unavailable(1.0)
        allowed = all(s.allowed or s.spec.shadow for s in statuses)
        return policy.conclude(admission, new_result(allowed, statuses, 0 if allowed else -1), now)

    # -- the store calls, for every transport ----------------------------------------------------------
    def charge(
        self, counter_ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
    ) -> AcquireResult | Awaitable[AcquireResult]:
        """Charge one request's windows (all or none): the result at once when the store can answer
        without waiting, else an awaitable (which raises `StoreUnavailable` if the store cannot decide)."""
        result = self.store.acquire_nowait(counter_ids, specs, costs, now)
        return self.store.acquire(counter_ids, specs, costs, now) if result is None else result

    def read(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        now: float,
        costs: Sequence[int] | None = None,
    ) -> tuple[WindowStatus, ...] | Awaitable[tuple[WindowStatus, ...]]:
        """The windows' statuses, charging nothing: at once when possible, else an awaitable (which
        raises `StoreUnavailable` if the store cannot answer)."""
        statuses = self.store.peek_nowait(counter_ids, specs, now, costs)
        return self.store.peek(counter_ids, specs, now, costs) if statuses is None else statuses

    async def peek(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        now: float,
        costs: Sequence[int] | None = None,
    ) -> tuple[WindowStatus, ...] | None:
        """`read`, awaited; None when the store cannot answer."""
        statuses = self.store.peek_nowait(counter_ids, specs, now, costs)
        if statuses is not None:
            return statuses
        try:
            return await self.store.peek(counter_ids, specs, now, costs)
        except StoreUnavailable:
            return None

    def apply(self, settlements: Iterable[Settlement], now: float) -> None:
        """Apply what the reservation book returned (settle, release, expiry): never waits (a remote
        store queues the change)."""
        settle_with(self.store.adjust_soon, settlements, now)
