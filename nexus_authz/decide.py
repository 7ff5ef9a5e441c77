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

import asyncio
import dataclasses
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence

from nexus_authz.core.clamp import Clamp, clamps, default_cap, lowered
from nexus_authz.core.fastpath import FastAdmit, Plan
from nexus_authz.core.keys import KeySnapshot
from nexus_authz.core.limits import AcquireResult, LimitSpec, WindowStatus, new_result
from nexus_authz.core.model import Decision, InFlight, KeyRecord, Reason, Request, new_allow, new_request
from nexus_authz.core.policy import Admission, Policy, marks_release, unavailable
from nexus_authz.core.ports import AsyncCounterStore, CounterStore, StoreUnavailable
from nexus_authz.core.reservations import ReservationBook, Settlement, settle_with
from nexus_authz.core.shapes import shape_of
from nexus_authz.latency import LatencyHistogram, ReasonCounts

__all__ = ["SLOT_WAIT", "Allowed", "Decider"]

# What `Decider.check_plain` returns for an admission: (plan, key, the windows' statuses, release id or "").
Allowed = tuple[Plan, KeyRecord, tuple[WindowStatus, ...], str]

# How long a request refused only for a concurrency slot waits for one to be released before its 429.
# A slot is freed either by the proxy as the last bytes of a response pass (envoy/nexus-usage.lua, a
# call it does not wait for, made only for a slot near its window's limit: core/shapes.py `near_limit`)
# or by the access log that settles the request, up to Envoy's buffer_flush_interval (0.02 s in the
# shipped configs) after the response ended. A client that sends its next request the moment it has the
# previous response can get here before either: the wait, comfortably past one flush, makes back-to-back
# requests exact (`concurrent: 1`, or a key at its limit). Only refusals wait; admissions never do.
SLOT_WAIT = 0.05
_new_tuple = tuple.__new__  # InFlight(...) without the NamedTuple's Python-level __new__


class Decider:
    """Decides requests against one counter store; counts what it decided (`decisions`, `latency`).

    `book`: the reservation book (None: nothing is reserved, e.g. the rate limit service alone).
    `failures`: the local store counting invalid keys per address (brute-force protection).
    """

    __slots__ = (
        "_fast",
        "_slot_freed",
        "book",
        "clock",
        "decisions",
        "failures",
        "latency",
        "slot_releases",
        "store",
    )

    def __init__(
        self,
        store: AsyncCounterStore,
        *,
        book: ReservationBook | None = None,
        failures: CounterStore | None = None,
        clock: Callable[[], float] = time.time,
        decisions: MutableMapping[Reason, int] | None = None,
        latency: LatencyHistogram | None = None,
    ) -> None:
        self.store = store
        self.book = book
        self.failures = failures
        self.clock = clock
        self.decisions: MutableMapping[Reason, int] = decisions if decisions is not None else ReasonCounts()
        self.latency = latency if latency is not None else LatencyHistogram()
        self._slot_freed: asyncio.Future[None] | None = None  # set only while a refused request waits
        self._fast: FastAdmit | None = None  # the common request's admission (check_plain)
        # Concurrency slots freed, by who freed them: "proxy" (the early release call), "access_log"
        # (the settlement of the response's usage: Envoy's access log, or ext_proc).
        self.slot_releases: dict[str, int] = {"proxy": 0, "access_log": 0}

    # -- ext_authz: the whole decision ---------------------------------------------------------------
    def check(
        self, policy: Policy, snapshot: KeySnapshot, request: Request, *, wait: bool = True
    ) -> Decision | Awaitable[Decision]:
        """The decision, at once whenever it can be made without waiting (a request refused before any
        limit, the memory store, Redis's batched mode), else an awaitable. Callers test
        `result.__class__ is Decision` and await only otherwise. `wait` False: a concurrency refusal is
        final at once (no SLOT_WAIT; for callers that cannot await)."""
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
            return self._check_later(policy, admission, now, started, request)
        return self._finish(policy, admission, request, result, now, started, wait)

    def check_plain(
        self,
        policy: Policy,
        snapshot: KeySnapshot,
        headers: Mapping[str, str],
        path: str,
        body: bytes,
        request_id: str,
        client_address: str,
    ) -> Allowed | Decision | Awaitable[Decision] | None:
        """`check` of a POST whose body the proxy forwarded whole, for the common request in one call.

        An admission is (plan, the windows' statuses, release: the request id when its slot is to be
        released early, else ""); a refusal by the counters, or a store that must be awaited, goes on as
        `check` goes (a Decision or an awaitable). None: not the common request (core/fastpath.py):
        nothing was charged or counted, decide it with `check`. The same state and answers as `check`
        (tests/adapters/test_http_fastpath.py)."""
        started = time.perf_counter()
        fast = self._fast
        if fast is None or fast.policy is not policy or fast.snapshot is not snapshot:
            fast = self._fast = FastAdmit(policy, snapshot)
        now = self.clock()
        admitted = fast.admit(headers, path, body, client_address, now, self.failures)
        if admitted is None:
            return None
        plan, key, costs, prompt, kept, facts = admitted
        book = self.book
        specs = plan.specs
        release = ""
        if not specs:  # Decider.check, nothing to charge
            statuses: tuple[WindowStatus, ...] = ()
            if book is not None and request_id and policy.track:
                context = InFlight(key.key_id, key.tenant, plan.model, prompt, kept)
                settle_with(self.store.adjust_soon, book.track(request_id, context, now), now)
        else:
            store = self.store
            counter_ids = key.counter_ids if plan.counter_ids is None else plan.counter_ids
            result = store.acquire_nowait(counter_ids, specs, costs, now)
            if result is None or not result.allowed:  # the reference path from here
                request = new_request("POST", path, headers, body, False, request_id, client_address)
                admission = fast.admission(plan, key, costs, request_id, prompt, kept, facts, path)
                if result is None:
                    return self._check_later(policy, admission, now, started, request)
                return self._finish(policy, admission, request, result, now, started, True)
            shape = plan.shape
            assert shape is not None
            # Policy.conclude of an admission (no clamp: a clamping key's requests take the reference path);
            # the rate-limit headers are the transport's to write (ratelimit_headers.build_header_block)
            statuses = result.statuses
            if book is not None and request_id:
                uncharged = result.uncharged
                track = policy.track
                displaced = book.reserve(
                    request_id,
                    counter_ids,
                    specs,
                    costs,
                    now,
                    uncharged,
                    context=_new_tuple(InFlight, (key.key_id, key.tenant, plan.model, prompt, kept))
                    if track
                    else None,
                    settles=shape.settle_mask & ~uncharged != 0,
                )
                if displaced:
                    settle_with(store.adjust_soon, displaced, now)
                if marks_release(shape, result):
                    release = request_id
        self.decisions[Reason.OK] += 1  # _counted
        latency = self.latency
        seconds = time.perf_counter() - started
        latency.counts[bisect_left(latency.bounds, seconds)] += 1
        latency.sum += seconds
        return plan, key, statuses, release

    def _finish(
        self,
        policy: Policy,
        admission: Admission,
        request: Request,
        result: AcquireResult,
        now: float,
        started: float,
        wait: bool,
    ) -> Decision | Awaitable[Decision]:
        """The counters' answer -> the decision: a refusal a smaller completion may turn into an
        admission (core.clamp), the default cap written for an uncapped request on a clamping key, a
        refusal for a concurrency slot waiting for a release (`wait`)."""
        if not result.allowed and clamps(admission.specs):  # a smaller completion may fit (core.clamp)
            return self._clamp(policy, admission, request, result, now, started)
        decision = policy.conclude(admission, result, now, self.store.adjust_soon, self.book)
        if admission.uncapped and decision.allowed and clamps(admission.specs):
            decision = _capped(decision, request, policy)
        if decision.reason is Reason.CONCURRENCY_LIMITED and wait and self.book is not None:
            return self._wait_for_slot(policy, admission, decision, started)
        return self._counted(decision, started)

    async def _check_later(
        self, policy: Policy, admission: Admission, now: float, started: float, request: Request
    ) -> Decision:
        try:
            result = await self.store.acquire(admission.counter_ids, admission.specs, admission.costs, now)
        except StoreUnavailable as exc:  # fail_closed and the store is away: 503, retry soon
            return self._counted(unavailable(exc.retry_after), started)
        decision = self._finish(policy, admission, request, result, now, started, True)
        return decision if isinstance(decision, Decision) else await decision

    async def _wait_for_slot(
        self, policy: Policy, admission: Admission, refused: Decision, started: float
    ) -> Decision:
        """A request refused for a concurrency slot only: try again whenever a slot is released, for up to
        SLOT_WAIT; the refusal stands if none frees in time (or the store cannot answer)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SLOT_WAIT
        store = self.store
        decision = refused
        while (remaining := deadline - loop.time()) > 0:
            freed = self._slot_freed
            if freed is None:
                freed = self._slot_freed = loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(freed), remaining)
            except TimeoutError:
                break
            now = self.clock()
            try:
                result = store.acquire_nowait(admission.counter_ids, admission.specs, admission.costs, now)
                if result is None:
                    result = await store.acquire(admission.counter_ids, admission.specs, admission.costs, now)
            except StoreUnavailable:
                break
            decision = policy.conclude(admission, result, now, store.adjust_soon, self.book)
            if decision.reason is not Reason.CONCURRENCY_LIMITED:
                break
        return self._counted(decision, started)

    def slot_freed(self) -> None:
        """A concurrency slot was released: wake the requests waiting for one (none, nearly always)."""
        freed = self._slot_freed
        if freed is not None:
            self._slot_freed = None
            if not freed.done():
                freed.set_result(None)

    # -- clamping (core/clamp.py): only after a refusal ------------------------------------------------
    @staticmethod
    def _plan(policy: Policy, admission: Admission, request: Request, result: AcquireResult) -> Clamp | None:
        return lowered(
            request,
            result,
            admission.specs,
            admission.costs,
            admission.model,
            policy.prices,
            policy.default_max_tokens,
        )

    def _clamp(
        self,
        policy: Policy,
        admission: Admission,
        request: Request,
        result: AcquireResult,
        now: float,
        started: float,
    ) -> Decision | Awaitable[Decision]:
        """A refused request, admitted with a lowered completion cap when one fits (one more acquire)."""
        store = self.store
        plan = self._plan(policy, admission, request, result)
        if plan is None:
            return self._counted(
                policy.conclude(admission, result, now, store.adjust_soon, self.book), started
            )
        lowered_admission = admission._replace(costs=plan.costs)
        second = store.acquire_nowait(admission.counter_ids, admission.specs, plan.costs, now)
        if second is None:
            return self._clamp_later(policy, lowered_admission, plan, now, started)
        decision = policy.conclude(lowered_admission, second, now, store.adjust_soon, self.book)
        return self._counted(_with_clamp(decision, plan), started)

    async def _clamp_later(
        self, policy: Policy, admission: Admission, plan: Clamp, now: float, started: float
    ) -> Decision:
        store = self.store
        try:
            result = await store.acquire(admission.counter_ids, admission.specs, plan.costs, now)
        except StoreUnavailable as exc:
            return self._counted(unavailable(exc.retry_after), started)
        decision = policy.conclude(admission, result, now, store.adjust_soon, self.book)
        return self._counted(_with_clamp(decision, plan), started)

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
        if self._slot_freed is not None:  # a request waits for a concurrency slot: this may free one
            self.slot_freed()

    def adjust(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        deltas: Sequence[int],
        now: float,
        charged_at: float,
    ) -> None:
        """`apply` of one settlement given as its parts (ReservationBook.settle_parts: no Settlement
        object on the accounting path)."""
        self.store.adjust_soon(counter_ids, specs, deltas, now, charged_at)
        # none unless the key has a concurrency window (tuple() of the key's specs tuple is that tuple)
        for i in shape_of(tuple(specs)).slot_indices:
            if deltas[i]:  # a slot the proxy did not release early
                self.slot_releases["access_log"] += 1
                break
        if self._slot_freed is not None:
            self.slot_freed()


def _with_clamp(decision: Decision, plan: Clamp) -> Decision:
    """The admitted decision carrying the body splices for the proxy (a refusal is returned as is)."""
    if not decision.allowed or not plan.rewrite:
        return decision
    return dataclasses.replace(decision, clamp=plan.rewrite)


def _capped(decision: Decision, request: Request, policy: Policy) -> Decision:
    """An admitted uncapped request on a clamping key: the reserved default cap written upstream too
    (as is when the proxy cannot rewrite, e.g. nginx: see docs/limits.md)."""
    rewrite = default_cap(request, policy.default_max_tokens)
    return dataclasses.replace(decision, clamp=rewrite) if rewrite else decision
