"""Batched mode (write-behind): decisions from local counters, changes flushed and state pulled every
`flush_interval` (the over-admission bound is in the package's docstring)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, Final

from cachetools import TLRUCache, TTLCache

from nexus_authz.core.limits import AcquireResult, LimitSpec, WindowStatus
from nexus_authz.core.ports import StoreUnavailable
from nexus_authz.stores.redis.link import CLOSED
from nexus_authz.stores.redis.settings import RedisSettings
from nexus_authz.stores.redis.store import MAX_TRACKED, _FEntry, _RedisStore
from nexus_authz.stores.redis.wire import unpack_state
from nexus_authz.stores.redis.writebehind import merge_deltas

_INF: Final = math.inf


class BatchedRedisStore(_RedisStore):
    """Write-behind: local decisions (no await), deltas flushed and global state pulled every interval."""

    mode = "batched"

    def __init__(self, settings: RedisSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        clock = self._clock
        # counter id -> the Redis version our local state derives from (None: not known to Redis yet,
        # e.g. decided while Redis was away); an entry is dropped once older than `staleness`
        self._known: TTLCache[str, float | None] = TTLCache(MAX_TRACKED, settings.staleness, timer=clock)
        # counter id -> monotonic time until which it refuses even a unit cost, whatever others do
        self._over: TLRUCache[str, float] = TLRUCache(MAX_TRACKED, _expiry, timer=clock)
        self._touched: dict[str, LimitSpec] = {}
        self._flush_due = False
        self._link.before_send = self._front
        self._link.after_send = self._landed

    # -- decisions ---------------------------------------------------------------------------------------
    def _ready(self, counter_ids: Sequence[str]) -> bool:
        known = self._known
        over = self._over
        return all(cid in known or cid in over for cid in counter_ids)

    def acquire_nowait(
        self, counter_ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
    ) -> AcquireResult | None:
        """The hot path, synchronous: the decision from local counters, or None if one of them must be
        pulled from Redis first (or Redis is away and the mode is fail_closed): then await `acquire`."""
        if not self._ready(counter_ids):
            return None
        if not self._fail_open and self._breaker.state != CLOSED:
            return None
        return self._decide(counter_ids, specs, costs, now)

    def _decide(
        self, counter_ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
    ) -> AcquireResult:
        result = self._local.acquire(counter_ids, specs, costs, now)
        touched = self._touched
        if len(touched) > MAX_TRACKED:  # Redis away for long: pull them again when needed instead
            touched.clear()
        for i, spec in enumerate(specs):
            touched[counter_ids[i]] = spec
        if result.allowed:
            self._record(counter_ids, specs, result, costs, now, self._base)
        else:
            for i, status in enumerate(result.statuses):
                if not status.allowed and not specs[i].shadow:
                    self._mark_over(counter_ids[i], specs[i], now)
        return result

    def _base(self, cid: str) -> float | None:
        return self._known.get(cid)

    def _mark_over(self, cid: str, spec: LimitSpec, now: float) -> None:
        retry = self._local.peek((cid,), (spec,), now, (1,))[0].retry_after
        if 0 < retry < _INF:
            self._over[cid] = self._clock() + min(retry, 60.0)

    async def acquire(
        self, counter_ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
    ) -> AcquireResult:
        result = self.acquire_nowait(counter_ids, specs, costs, now)
        if result is not None:
            return result
        if not await self._pull(counter_ids, specs):
            if not self._fail_open:
                self.unavailable += 1
                raise self._unavailable()
            self.fallbacks += 1
        return self._decide(counter_ids, specs, costs, now)

    async def _pull(self, counter_ids: Sequence[str], specs: Sequence[LimitSpec]) -> bool:
        """Fetch the counters not known fresh. False if Redis could not be asked (then, in fail_open, they
        are taken as they are locally, and reconciled by the deltas later)."""
        missing = [
            (cid, spec)
            for cid, spec in zip(counter_ids, specs, strict=True)
            if cid not in self._known and cid not in self._over
        ]
        if not missing:
            return self._fail_open or self._breaker.state == CLOSED
        ok = False
        if self._breaker.would_allow():
            entries: list[_FEntry] = [(cid, spec, b"G", -1.0, b"", b"", []) for cid, spec in missing]
            futures = [
                self._link.submit("C", keys, args, partial(self._pulled, chunk))
                for keys, args, chunk in self._flush_calls(entries, 0.0)
            ]
            try:
                await self._link.wait_all(futures)
                ok = True
            except StoreUnavailable:
                pass
        if not ok and self._fail_open:
            for cid, _ in missing:
                self._known[cid] = None  # provisional: decided locally until Redis is back
        return ok

    def _pulled(self, entries: list[_FEntry], reply: list[Any]) -> None:
        """A pull landed: install what this replica does not know yet (a flush in the same pipeline,
        which goes first, may just have installed it)."""
        known = self._known
        for j, (cid, spec, *_) in enumerate(entries):
            if cid not in known:
                self._install(cid, spec, reply[3 * j + 2], reply[3 * j + 1])

    def _install(self, cid: str, spec: LimitSpec, raw: bytes, version: float) -> None:
        entry = self._wb.pending.get(cid)
        if entry is not None and entry.base == version:
            # nobody wrote it since our base: the local state already is Redis's plus our pending changes
            self._known[cid] = version
            return
        state = unpack_state(raw)
        if entry is not None:
            state = merge_deltas(state, entry.spec, entry, self._wb.carry)
            entry.base = version
        self._local.install(cid, state)
        self._known[cid] = version

    async def adjust(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        deltas: Sequence[int],
        now: float,
        charged_at: float | None = None,
    ) -> None:
        self.adjust_nowait(counter_ids, specs, deltas, now, charged_at)

    def adjust_nowait(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        deltas: Sequence[int],
        now: float,
        charged_at: float | None = None,
    ) -> bool:
        """Always applied locally at once (and queued for Redis): True."""
        self._local.adjust(counter_ids, specs, deltas, now, charged_at)
        self._record_adjust(counter_ids, specs, deltas, now, charged_at, self._base)
        over = self._over
        for i, delta in enumerate(deltas):
            if delta < 0:
                over.pop(counter_ids[i], None)  # a refund or release: it may fit again sooner
        return True

    async def peek(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        now: float,
        costs: Sequence[int] | None = None,
    ) -> tuple[WindowStatus, ...]:
        if not self._ready(counter_ids) or self._breaker.state != CLOSED:
            ok = await self._pull(counter_ids, specs)
            if not ok and not self._fail_open:
                raise self._unavailable()
        return self._local.peek(counter_ids, specs, now, costs)

    # -- the flush: changes out, global state back ---------------------------------------------------------
    def _due(self) -> None:
        self._flush_due = True

    def _wants_send(self) -> bool:
        return bool(self._touched)

    def _front(self) -> tuple[list[tuple[Sequence[bytes], Sequence[bytes]]], Any] | None:
        if not self._flush_due or not self._breaker.would_allow():
            return None
        self._flush_due = False
        touched, self._touched = self._touched, {}
        if not len(self._wb) and not touched:
            return None
        calls, parts = self._batches(replace=True)
        sent = {cid for _, cut, _ in parts for cid in cut}
        over = self._over
        known = self._known
        pulls: list[_FEntry] = []
        for cid, spec in touched.items():
            if cid in sent or cid in over:
                continue
            base = known.get(cid)
            pulls.append((cid, spec, b"G", -1.0 if base is None else base, b"", b"", []))
        calls.extend(self._flush_calls(pulls, 0.0))
        entries = [e for _, _, chunk in calls for e in chunk]
        return [(k, a) for k, a, _ in calls], (parts, touched, entries)

    def _landed(self, token: Any, replies: list[Any] | None, maybe: bool) -> None:
        parts, touched, entries = token
        self._sent_back(parts, replies is not None, maybe)
        if replies is None:
            for cid, spec in touched.items():
                self._touched.setdefault(cid, spec)
            return
        flat = [x for reply in replies for x in reply]
        pending = self._wb.pending
        for j, (cid, spec, _, base, _, _, _) in enumerate(entries):
            status, version, raw = flat[3 * j], flat[3 * j + 1], flat[3 * j + 2]
            if status == 1 or (status == 2 and version == base and not raw):
                self._known[cid] = version  # Redis holds exactly our state (or what we already had)
                entry = pending.get(cid)
                if entry is not None:
                    entry.base = version
            else:
                self._install(cid, spec, raw, version)


def _expiry(_key: str, until: float, _now: float) -> float:
    return until
