"""Exact mode: every decision is one atomic script call, pipelined with the others in flight."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nexus_authz.core.limits import AcquireResult, LimitSpec, WindowStatus
from nexus_authz.core.ports import StoreUnavailable
from nexus_authz.stores.redis.settings import RedisSettings
from nexus_authz.stores.redis.store import _EMPTY, _no_base, _RedisStore, log
from nexus_authz.stores.redis.wire import decode_acquire, decode_statuses, segment


class ExactRedisStore(_RedisStore):
    """Exact global limits: every decision is one atomic script call (pipelined)."""

    mode = "exact"

    def __init__(self, settings: RedisSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self._link.before_send = self._front
        self._link.after_send = self._landed

    # -- decisions ---------------------------------------------------------------------------------------
    async def acquire(
        self, counter_ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
    ) -> AcquireResult:
        if not specs:
            return _EMPTY
        if not self._breaker.would_allow():
            return self._fallback_acquire(counter_ids, specs, costs, now)
        keys = self._keys_of(counter_ids)
        try:
            reply = await self._link.request(keys, segment(b"A", now, None, specs, costs))
        except StoreUnavailable:
            return self._fallback_acquire(counter_ids, specs, costs, now)
        return decode_acquire(specs, reply)

    def acquire_nowait(
        self, counter_ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
    ) -> AcquireResult | None:
        """Exact mode answers synchronously only when it has to decide locally (Redis away, fail_open,
        breaker open); otherwise None: await `acquire`."""
        if not specs:
            return _EMPTY
        if self._fail_open and not self._breaker.would_allow():
            return self._fallback_acquire(counter_ids, specs, costs, now)
        return None

    def _fallback_acquire(
        self, counter_ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
    ) -> AcquireResult:
        if not self._fail_open:
            self.unavailable += 1
            raise self._unavailable()
        self.fallbacks += 1
        result = self._local.acquire(counter_ids, specs, costs, now)
        if result.allowed:
            self._record(counter_ids, specs, result, costs, now, _no_base)
        return result

    async def adjust(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        deltas: Sequence[int],
        now: float,
        charged_at: float | None = None,
    ) -> None:
        if not any(deltas):
            return
        if not self._breaker.would_allow():
            self._fallback_adjust(counter_ids, specs, deltas, now, charged_at)
            return
        keys = self._keys_of(counter_ids)
        try:
            await self._link.request(keys, segment(b"J", now, charged_at, specs, deltas))
        except StoreUnavailable:
            self._fallback_adjust(counter_ids, specs, deltas, now, charged_at)

    def adjust_nowait(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        deltas: Sequence[int],
        now: float,
        charged_at: float | None = None,
    ) -> bool:
        """Applied locally (to the write-behind queue) only while the breaker is open; else False: await
        `adjust`."""
        if self._breaker.would_allow():
            return False
        self._fallback_adjust(counter_ids, specs, deltas, now, charged_at)
        return True

    def _fallback_adjust(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        deltas: Sequence[int],
        now: float,
        charged_at: float | None,
    ) -> None:
        """Settle differences are never lost: queued for Redis in either failure mode."""
        self._local.adjust(counter_ids, specs, deltas, now, charged_at)
        self._record_adjust(counter_ids, specs, deltas, now, charged_at, _no_base)

    async def peek(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        now: float,
        costs: Sequence[int] | None = None,
    ) -> tuple[WindowStatus, ...]:
        if not specs:
            return ()
        values = costs if costs is not None else [0] * len(specs)
        if self._breaker.would_allow():
            keys = self._keys_of(counter_ids)
            try:
                reply = await self._link.request(keys, segment(b"P", now, None, specs, values))
                return decode_statuses(specs, reply)
            except StoreUnavailable:
                pass
        if not self._fail_open:
            raise self._unavailable()
        return self._local.peek(counter_ids, specs, now, costs)

    # -- reconciliation: the queue goes out ahead of the next pipeline -----------------------------------
    def _wants_send(self) -> bool:
        return bool(len(self._wb))

    def _front(self) -> tuple[list[tuple[Sequence[bytes], Sequence[bytes]]], Any] | None:
        wb = self._wb
        if not len(wb) or not self._breaker.would_allow():
            return None
        calls, parts = self._batches(replace=False)
        return [(k, a) for k, a, _ in calls], parts

    def _landed(self, parts: Any, replies: list[Any] | None, maybe: bool) -> None:
        self._sent_back(parts, replies is not None, maybe)
        if replies is not None and not len(self._wb):
            self._local.clear()  # reconciled: the outage's local counters have served their purpose
            log.info("redis write-behind queue reconciled", extra={"store": self.name})
