"""What both Redis store modes share: keys, the link, the local view, the write-behind queue, the
lifecycle and health (the modes themselves: `exact`, `batched`; the design: the package's docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from nexus_authz.core.limits import AcquireResult, LimitSpec, WindowStatus, new_result
from nexus_authz.core.ports import StoreUnavailable
from nexus_authz.stores.redis.link import CLOSED, Breaker, Health, RedisLink
from nexus_authz.stores.redis.settings import RedisSettings, make_client
from nexus_authz.stores.redis.wire import pack_state, spec_arg
from nexus_authz.stores.redis.writebehind import LocalView, Pending, WriteBehind

log = logging.getLogger("nexus_authz.redis")

TTL_MARGIN: Final = 5.0  # seconds added to every TTL: covers clock skew between replicas and Redis
F_CHUNK: Final = 256  # counters per flush script call (one call must not block Redis for long)
MAX_TRACKED: Final = 200_000  # counters a batched replica keeps fresh (pulled) at once
_EMPTY: Final = new_result(True, (), 0)
# a flush entry: counter id, spec, mode (R/D/G), base version, packed state, GCRA cap, flat deltas
_FEntry = tuple[str, LimitSpec, bytes, float, bytes, bytes, list[bytes]]
TOKEN_TTL_MS: Final = b"600000"  # a flush batch's token outlives every resend of it
_INF: Final = math.inf


class _RedisStore:
    """What both modes share: keys, the link, the local view, the write-behind queue, health."""

    mode = "exact"

    def __init__(
        self,
        settings: RedisSettings,
        *,
        client: Any = None,
        password: str | None = None,
        base_dir: str = ".",
        gauge_ttl: float = 330.0,
        clock: Callable[[], float] = time.monotonic,
        name: str | None = None,
    ) -> None:
        """`gauge_ttl`: how long an untouched concurrency counter lives in Redis (set it above the
        reservation TTL: a replica that dies holding slots leaks them until then). `clock`: monotonic
        seconds for the breaker and the freshness of pulled counters (not the maths: that is `now`)."""
        self.settings = settings
        self.name = name or f"redis-{self.mode}"
        self._client = (
            client if client is not None else make_client(settings, password=password, base_dir=base_dir)
        )
        self._clock = clock
        self._breaker = Breaker(settings.breaker_failures, settings.breaker_reset, clock)
        self._margin = b"%d" % int(TTL_MARGIN * 1000)
        self._gauge_ttl = b"%d" % int(gauge_ttl * 1000)
        self._link = RedisLink(
            self._client,
            timeout=settings.timeout,
            breaker=self._breaker,
            cluster=settings.cluster,
            name=self.name,
            margin=self._margin,
            gauge_ttl=self._gauge_ttl,
            on_state=self._state_changed,
        )
        self._prefix = settings.key_prefix
        self._keys: dict[str, bytes] = {}
        self._local = LocalView(sweep_per_call=1)
        self._wb = WriteBehind(max_queue=settings.max_queue, carry=settings.flush_interval + settings.timeout)
        self._fail_open = settings.fail_open
        self._ticker: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._token_base = os.urandom(6).hex().encode()
        self._tokens = 0
        self._state = "ok"
        self._dropping = False
        self.fallbacks = 0
        self.unavailable = 0

    # -- keys and arguments ----------------------------------------------------------------------------
    def _key(self, cid: str) -> bytes:
        key = self._keys.get(cid)
        if key is None:
            key_id, sep, rest = cid.partition("\x00")
            key = f"{self._prefix}{{{key_id}}}{sep}{rest}".encode()
            if len(self._keys) >= 500_000:
                self._keys.clear()
            self._keys[cid] = key
        return key

    def _keys_of(self, counter_ids: Sequence[str]) -> list[bytes]:
        key = self._key
        return [key(cid) for cid in counter_ids]

    def _flush_calls(
        self, entries: list[_FEntry], now: float, token: bytes | None = None
    ) -> list[tuple[list[bytes], list[bytes], list[_FEntry]]]:
        """F calls for (cid, spec, mode, base, packed state, cap, flat deltas) entries, a bounded number of
        counters per call (a cluster: one call per hash tag, i.e. per slot). With a `token`, each call
        carries a key of its own derived from it, so a resent batch is applied once."""
        groups: dict[str, list[_FEntry]] = {}
        if self.settings.cluster:
            for entry in entries:
                groups.setdefault(entry[0].partition("\x00")[0], []).append(entry)
        else:
            groups["flush"] = entries
        calls: list[tuple[list[bytes], list[bytes], list[_FEntry]]] = []
        header = [
            b"F",
            self._margin,
            self._gauge_ttl,
            repr(now).encode(),
            b"" if token is None else TOKEN_TTL_MS,
        ]
        for tag, group in groups.items():
            for start in range(0, len(group), F_CHUNK):
                keys: list[bytes] = []
                args: list[bytes] = list(header)
                chunk = group[start : start + F_CHUNK]
                for cid, spec, mode, base, packed, cap, flat in chunk:
                    keys.append(self._key(cid))
                    args.extend(
                        (
                            spec_arg(spec, now),
                            mode,
                            repr(base).encode(),
                            packed,
                            cap,
                            b"%d" % (len(flat) // 3),
                        ),
                    )
                    args.extend(flat)
                if token is not None:
                    keys.append(f"{self._prefix}{{{tag}}}\x00flush\x00".encode() + token + b":%d" % start)
                calls.append((keys, args, chunk))
        return calls

    def _new_token(self) -> bytes:
        self._tokens += 1
        return b"%s:%d" % (self._token_base, self._tokens)

    def _entries(self, cut: dict[str, Pending], replace: bool) -> list[_FEntry]:
        """Flush entries for a batch: R (replace if unchanged, else the deltas) where the counter's Redis
        version is known and `replace`, D (the deltas) otherwise."""
        wb = self._wb
        out: list[_FEntry] = []
        for cid, entry in cut.items():
            flat, cap = wb.flat_items(entry), wb.cap(entry)
            if replace and entry.base is not None:
                out.append((cid, entry.spec, b"R", entry.base, pack_state(self._local.state(cid)), cap, flat))
            else:
                out.append((cid, entry.spec, b"D", -1.0, b"", cap, flat))
        return out

    def _batches(
        self, replace: bool
    ) -> tuple[
        list[tuple[list[bytes], list[bytes], list[_FEntry]]], list[tuple[bytes, dict[str, Pending], bool]]
    ]:
        """What goes out: the batches in doubt (again, same tokens), then a new one of what is pending."""
        wb = self._wb
        parts = [(token, cut, False) for token, cut in wb.in_doubt.items()]
        if wb.size:
            parts.append((self._new_token(), wb.cut(), True))
        calls: list[tuple[list[bytes], list[bytes], list[_FEntry]]] = []
        for token, cut, _ in parts:
            now = max((at for entry in cut.values() for _, at, _ in entry.items), default=0.0)
            calls.extend(self._flush_calls(self._entries(cut, replace), now, token))
        return calls, parts

    def _sent_back(
        self, parts: list[tuple[bytes, dict[str, Pending], bool]], answered: bool, maybe: bool
    ) -> None:
        """After a flush: answered batches are settled; a new batch that failed goes back to the queue, or
        in doubt if it may have been applied (its answer was lost)."""
        wb = self._wb
        for token, cut, new in parts:
            if answered:
                if not new:
                    wb.settle(token)
            elif new:
                if maybe:
                    wb.doubt(token, cut)
                else:
                    wb.restore(cut)

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and load the script. Never raises for an unreachable Redis: the failure mode applies
        from the first check, and the breaker keeps probing."""
        await self._link.start()
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def close(self) -> None:
        """Stop, after one last attempt to hand the write-behind queue to Redis."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if len(self._wb):
            with contextlib.suppress(StoreUnavailable):
                await self.flush()
        await self._link.close()

    async def flush(self) -> None:
        """Send what is pending now and wait for it (tests, shutdown). Raises StoreUnavailable."""
        self._due()
        await self._link.request([], [b"J", b"0.0", b"", b"0"])  # a no-op request: the barrier

    def _due(self) -> None:
        """Mark a flush as wanted with the next pipeline."""

    async def _tick(self) -> None:
        interval = self.settings.flush_interval
        while True:
            await asyncio.sleep(interval)
            self._due()
            if len(self._wb) or self._wants_send():
                self._link.kick()

    def _wants_send(self) -> bool:
        return False

    # -- health -----------------------------------------------------------------------------------------
    def health(self) -> Health:
        link = self._link
        return Health(
            state=self._compute_state(),
            mode=self.mode,
            failure_mode=self.settings.failure_mode,
            breaker=self._breaker.state,
            last_error=link.last_error,
            last_error_at=link.last_error_at,
            queue=len(self._wb),
            queue_dropped=self._wb.dropped,
            calls=link.calls,
            pipelines=link.pipelines,
            failures=link.failures,
            timeouts=link.timeouts,
            rejected=link.rejected,
            fallbacks=self.fallbacks,
            unavailable=self.unavailable,
            latency_ms=link.latency * 1000,
            latency_max_ms=link.latency_max * 1000,
        )

    def _compute_state(self) -> str:
        if self._breaker.state != CLOSED:
            return "degraded" if self._fail_open else "down"
        return "ok"

    def _state_changed(self) -> None:
        state = self._compute_state()
        if state == self._state:
            return
        was, self._state = self._state, state
        extra = {
            "store": self.name,
            "state": state,
            "was": was,
            "breaker": self._breaker.state,
            "failure_mode": self.settings.failure_mode,
            "error": self._link.last_error,
            "queue": len(self._wb),
        }
        if state == "ok":
            log.info("redis counter store ok", extra=extra)
        elif state == "degraded":
            log.warning("redis unreachable: deciding with local limits (fail_open)", extra=extra)
        else:
            log.error("redis unreachable: answering 503 (fail_closed)", extra=extra)

    def _note_drops(self) -> None:
        dropping = self._wb.dropped > 0 and len(self._wb) >= self._wb.max_queue
        if dropping and not self._dropping:
            log.error(
                "redis write-behind queue full: changes to further counters are dropped",
                extra={"store": self.name, "queue": len(self._wb), "dropped": self._wb.dropped},
            )
        self._dropping = dropping

    def stats(self) -> dict[str, int]:
        h = self.health()
        return {
            "queue": h.queue,
            "queue_dropped": h.queue_dropped,
            "calls": h.calls,
            "pipelines": h.pipelines,
            "failures": h.failures,
            "timeouts": h.timeouts,
            "fallbacks": h.fallbacks,
            "unavailable": h.unavailable,
            "local_counters": len(self._local),
        }

    def adjust_soon(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        deltas: Sequence[int],
        now: float,
        charged_at: float | None = None,
    ) -> None:
        """`adjust` for synchronous call sites (settle, reservation expiry): applied at once when the mode
        allows it (batched, or Redis away), else sent in the background, in order with every other call.
        Never raises: a failure queues the change for reconciliation. `close()` waits for it."""
        if not any(deltas) or self.adjust_nowait(counter_ids, specs, deltas, now, charged_at):
            return
        coro = self.adjust(counter_ids, specs, deltas, now, charged_at)
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def adjust_nowait(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        deltas: Sequence[int],
        now: float,
        charged_at: float | None = None,
    ) -> bool:
        raise NotImplementedError

    async def adjust(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        deltas: Sequence[int],
        now: float,
        charged_at: float | None = None,
    ) -> None:
        raise NotImplementedError

    def peek_nowait(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        now: float,
        costs: Sequence[int] | None = None,
    ) -> tuple[WindowStatus, ...] | None:
        """A peek always asks Redis (or, when it is away, decides as `peek` does): await `peek`."""
        return None

    def _unavailable(self) -> StoreUnavailable:
        """What `acquire` / `peek` raise when they cannot decide (fail_closed, Redis away)."""
        return StoreUnavailable(f"redis unavailable: {self._link.last_error or 'circuit breaker open'}")

    def __len__(self) -> int:
        """Counters held locally (the batched view, or the fallback's while Redis is away)."""
        return len(self._local)

    def sweep(self, now: float, max_items: int | None = None) -> int:
        """Drop drained local counters (the engine's periodic upkeep, as for the memory store)."""
        return self._local.sweep(now, max_items)

    async def counters(self) -> int:
        """Counters of this prefix currently held in Redis (a SCAN: for tests and diagnostics)."""
        n = 0
        async for key in self._client.scan_iter(match=self._prefix + "*", count=1000):
            if b"\x00flush\x00" not in key:  # not a flush batch's token
                n += 1
        return n

    # -- fallback: local limits ------------------------------------------------------------------------
    def _record(
        self,
        ids: Sequence[str],
        specs: Sequence[LimitSpec],
        result: AcquireResult,
        costs: Sequence[int],
        now: float,
        base: Callable[[str], float | None],
    ) -> None:
        uncharged = result.uncharged
        record = self._wb.record
        away = self.mode == "exact" or self._breaker.state != CLOSED  # exact: only fallbacks queue
        for i, spec in enumerate(specs):
            if costs[i] and not (uncharged >> i) & 1:
                cid = ids[i]
                record(cid, spec, costs[i], now, None, base(cid), away)
        if self._wb.dropped:
            self._note_drops()

    def _record_adjust(
        self,
        ids: Sequence[str],
        specs: Sequence[LimitSpec],
        deltas: Sequence[int],
        now: float,
        charged_at: float | None,
        base: Callable[[str], float | None],
    ) -> None:
        away = self.mode == "exact" or self._breaker.state != CLOSED  # exact: only fallbacks queue
        for i, spec in enumerate(specs):
            if deltas[i]:
                self._wb.record(ids[i], spec, deltas[i], now, charged_at, base(ids[i]), away)
        if self._wb.dropped:
            self._note_drops()


def _no_base(_cid: str) -> None:
    return None
