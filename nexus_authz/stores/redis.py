"""Distributed mode: counter stores on Redis, so every limit holds across all replicas.

Two consistency modes (`counters.redis.mode`):

* `exact`: one atomic script call per decision evaluates all of a key's windows with the same maths as
  the memory store (`redis_lua`), pipelined with every other decision in flight (one round trip for all
  the checks of an event-loop iteration). The admitted total across replicas is exactly the limit.
  Every call awaits Redis: the adapters must `await store.acquire(...)`.
* `batched` (write-behind, like Limitador's cached mode): decisions come from local counters (a memory
  store holding the global state pulled from Redis plus this replica's own changes), so
  `acquire_nowait` answers synchronously, with no await on the hot path, whenever every counter of the
  request has been pulled within the last 2*flush_interval + timeout (otherwise it returns None and the
  caller awaits `acquire`, which pulls first). Every `flush_interval` the changes go to Redis and the
  global state of the counters in use comes back, in one pipeline. Counters seen over their limit are
  cached (until they could admit again) and not pulled meanwhile: their state can only grow elsewhere.

  Over-admission bound (tests/stores/test_redis.py checks it): a replica's decision misses at most what
  the other replicas admitted in the last S = 2*T + d (T the flush interval, d a flush round trip: a
  change waits up to T to be flushed and up to T more to be pulled). For a GCRA limit of rate r and burst
  b (limit b + r*t in any interval t) and N replicas, each offered at most rho requests/s, the admitted
  total in any interval t is at most
      b + r*t + (N - 1) * min(b + r*S, rho*S + 1)      (unit costs; scale by the cost otherwise)
  and a sliding-window limit L admits at most L + (N - 1) * min(L, rho*S + 1) in any window. The excess
  is charged in Redis like everything else, so it is paid back afterwards (the long-run rate stays r).
  With one replica, batched is exact. It pays off when keys see several checks per flush interval (a
  hot key costs Redis one flush per interval instead of one call per check); for keys checked less
  often than that, each check still costs about one pull and one flush entry (see
  benchmarks/bench_redis.py). A limit that changes shape on reload drops its queued changes (its old
  state counts as fresh anyway).

Time: the caller's `now` (the engine's clock), not Redis's TIME. It keeps the maths identical to the
memory store and testable with a fake clock, and a Redis failover to a replica with another clock
changes nothing. The replicas' clocks must agree (NTP: milliseconds); a skew of e cannot be exploited
repeatedly, because GCRA anchors never move backwards: it shifts a window's edges by e (at most r*e more
or less, once), and TTLs carry a margin of TTL_MARGIN so a key never expires before it is fresh on any
clock within that skew.

Failures (`failure_mode`): a per-call timeout, then a circuit breaker (`redis_link`). `fail_open`
decides with local limits while Redis is away: every replica enforces the limits on its own traffic
(so up to N times the global limit), its changes go to the bounded write-behind queue, and they are
reconciled when Redis answers again (before any later call on the same connection). `fail_closed`
answers `Unavailable` (the caller answers 503); settle differences are still queued, never lost.
A call that timed out may still have been applied by Redis; its fallback charge is then counted twice
(conservative). `health()` gives the state (ok / degraded / down) for metrics and readiness, and each
change of state is logged once.

Keys: `<key_prefix>{<key id>}\\x00<limit name>`: the key id is a Redis Cluster hash tag, so one key's
windows live in one slot and a decision is one single-slot script call. State layout: `redis_lua`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final
from urllib.parse import urlsplit

from cachetools import TLRUCache, TTLCache

from nexus_authz.core.limits import AcquireResult, LimitSpec, WindowStatus, new_result
from nexus_authz.core.yamlsrc import Fields
from nexus_authz.stores.redis_link import (
    CLOSED,
    Breaker,
    Health,
    RedisLink,
    RedisUnavailable,
    Unavailable,
)
from nexus_authz.stores.redis_lua import (
    decode_acquire,
    decode_statuses,
    pack_state,
    segment,
    spec_arg,
    unpack_state,
)
from nexus_authz.stores.redis_revocations import RevocationChannel
from nexus_authz.stores.redis_writebehind import LocalView, Pending, WriteBehind, merge_deltas

__all__ = [
    "BatchedRedisStore",
    "ExactRedisStore",
    "Health",
    "RedisSettings",
    "RedisStore",
    "RevocationChannel",
    "TlsFiles",
    "Unavailable",
    "make_client",
    "open_redis_store",
    "parse_redis_settings",
]

log = logging.getLogger("nexus_authz.redis")

TTL_MARGIN: Final = 5.0  # seconds added to every TTL: covers clock skew between replicas and Redis
F_CHUNK: Final = 256  # counters per flush script call (one call must not block Redis for long)
MAX_TRACKED: Final = 200_000  # counters a batched replica keeps fresh (pulled) at once
_EMPTY: Final = new_result(True, (), 0)
# a flush entry: counter id, spec, mode (R/D/G), base version, packed state, GCRA cap, flat deltas
_FEntry = tuple[str, LimitSpec, bytes, float, bytes, bytes, list[bytes]]
TOKEN_TTL_MS: Final = b"600000"  # a flush batch's token outlives every resend of it
_INF: Final = math.inf
MODES: Final = ("exact", "batched")
FAILURE_MODES: Final = ("fail_open", "fail_closed")


# -- settings -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """The `counters.redis` section of nexus.yaml. Durations in seconds. Secrets by reference only."""

    url: str = "redis://127.0.0.1:6379/0"
    password_env: str | None = None
    password_file: str | None = None
    tls: TlsFiles = field(default_factory=TlsFiles)
    key_prefix: str = "nexus:"
    cluster: bool = False
    mode: str = "exact"
    timeout: float = 0.05
    flush_interval: float = 0.1
    max_queue: int = 100_000
    failure_mode: str = "fail_open"
    breaker_failures: int = 5
    breaker_reset: float = 2.0

    @property
    def fail_open(self) -> bool:
        return self.failure_mode == "fail_open"

    @property
    def staleness(self) -> float:
        """How old a batched replica's view of a counter may be before it pulls it again."""
        return 2 * self.flush_interval + self.timeout


def parse_redis_settings(f: Fields) -> RedisSettings:
    """Read and validate `counters.redis`; errors name the file, line and field."""
    d = RedisSettings()
    url = f.str("url", d.url)
    _check_url(f, url)
    password_env = f.str("password_env", None)
    password_file = f.str("password_file", None)
    if password_env is not None and password_file is not None:
        f.fail("password_file", "give either password_env or password_file, not both")
    if f.has("password"):
        f.fail("password", "passwords are never inline: use password_env or password_file")
    tls = TlsFiles()
    if f.has("tls"):
        t = f.mapping("tls")
        tls = TlsFiles(
            ca_file=t.str("ca_file", None),
            cert_file=t.str("cert_file", None),
            key_file=t.str("key_file", None),
        )
        t.done()
        if (tls.cert_file is None) != (tls.key_file is None):
            t.fail("key_file" if tls.key_file is None else "cert_file", "cert_file and key_file go together")
        if not url.startswith("rediss://"):
            f.fail("tls", "TLS options need a rediss:// url")
    key_prefix = str(f.raw("key_prefix", d.key_prefix))
    if "{" in key_prefix or "}" in key_prefix or len(key_prefix) > 64:
        f.fail("key_prefix", "at most 64 characters, without { or } (they are Redis Cluster hash tags)")
    cluster = f.bool("cluster", d.cluster)
    if cluster and url.startswith("unix:"):
        f.fail("cluster", "a Redis Cluster is reached over TCP (redis:// or rediss://)")
    if cluster and urlsplit(url).path.strip("/") not in ("", "0"):
        f.fail("url", "a Redis Cluster has only database 0")
    mode = f.choice("mode", MODES, d.mode)
    timeout = f.duration("timeout", d.timeout, minimum=0.001)
    if timeout > 10:
        f.fail("timeout", "at most 10s: the timeout bounds every check that waits for Redis")
    flush_interval = f.duration("flush_interval", d.flush_interval, minimum=0.001)
    max_queue = f.int("max_queue", d.max_queue, minimum=1)
    failure_mode = f.choice("failure_mode", FAILURE_MODES, d.failure_mode)
    failures, reset = d.breaker_failures, d.breaker_reset
    if f.has("breaker"):
        b = f.mapping("breaker")
        failures = b.int("failures", failures, minimum=1)
        reset = b.duration("reset", reset, minimum=0.01)
        b.done()
    f.done()
    return RedisSettings(
        url=url,
        password_env=password_env,
        password_file=password_file,
        tls=tls,
        key_prefix=key_prefix,
        cluster=cluster,
        mode=mode,
        timeout=timeout,
        flush_interval=flush_interval,
        max_queue=max_queue,
        failure_mode=failure_mode,
        breaker_failures=failures,
        breaker_reset=reset,
    )


def _check_url(f: Fields, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        f.fail("url", f"expected redis://, rediss:// or unix://, got {url!r}")
    if parts.password is not None:
        f.fail("url", "the url must not carry a password: use password_env or password_file")
    if parts.scheme == "unix":
        if not parts.path:
            f.fail("url", "a unix:// url needs a socket path")
        return
    if not parts.hostname:
        f.fail("url", f"the url needs a host, got {url!r}")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        f.fail("url", f"invalid port in {url!r}")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        f.fail("url", f"the path is a database number, got {db!r}")


def _resolve(base_dir: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base_dir, path)


def make_client(settings: RedisSettings, *, password: str | None = None, base_dir: str = ".") -> Any:
    """A redis-py asyncio client (RedisCluster when `cluster`), with no retries of its own: the store's
    timeout and breaker decide what a failure means."""
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    kwargs: dict[str, Any] = {
        "socket_timeout": max(settings.timeout * 4, 0.5),
        "socket_connect_timeout": settings.timeout * 4,
        "retry": Retry(NoBackoff(), 0),
        "password": password,
    }
    tls = settings.tls
    if settings.url.startswith("rediss://"):
        if tls.ca_file:
            kwargs["ssl_ca_certs"] = _resolve(base_dir, tls.ca_file)
        if tls.cert_file:
            kwargs["ssl_certfile"] = _resolve(base_dir, tls.cert_file)
        if tls.key_file:
            kwargs["ssl_keyfile"] = _resolve(base_dir, tls.key_file)
    if settings.cluster:
        return RedisCluster.from_url(settings.url, **kwargs)
    return Redis.from_url(settings.url, **kwargs)


# -- the stores -------------------------------------------------------------------------------------------


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
                        (spec_arg(spec), mode, repr(base).encode(), packed, cap, b"%d" % (len(flat) // 3))
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
            with contextlib.suppress(RedisUnavailable):
                await self.flush()
        await self._link.close()

    async def flush(self) -> None:
        """Send what is pending now and wait for it (tests, shutdown). Raises RedisUnavailable."""
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
    ) -> AcquireResult | Unavailable:
        if not specs:
            return _EMPTY
        if not self._breaker.would_allow():
            return self._fallback_acquire(counter_ids, specs, costs, now)
        keys = self._keys_of(counter_ids)
        try:
            reply = await self._link.request(keys, segment(b"A", now, None, specs, costs))
        except RedisUnavailable:
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
            result = self._fallback_acquire(counter_ids, specs, costs, now)
            assert not isinstance(result, Unavailable)
            return result
        return None

    def _fallback_acquire(
        self, counter_ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
    ) -> AcquireResult | Unavailable:
        if not self._fail_open:
            self.unavailable += 1
            return Unavailable(f"redis unavailable: {self._link.last_error or 'circuit breaker open'}")
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
        except RedisUnavailable:
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
    ) -> tuple[WindowStatus, ...] | Unavailable:
        if not specs:
            return ()
        values = costs if costs is not None else [0] * len(specs)
        if self._breaker.would_allow():
            keys = self._keys_of(counter_ids)
            try:
                reply = await self._link.request(keys, segment(b"P", now, None, specs, values))
                return decode_statuses(specs, reply)
            except RedisUnavailable:
                pass
        if not self._fail_open:
            return Unavailable(f"redis unavailable: {self._link.last_error or 'circuit breaker open'}")
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
    ) -> AcquireResult | Unavailable:
        result = self.acquire_nowait(counter_ids, specs, costs, now)
        if result is not None:
            return result
        if not await self._pull(counter_ids, specs):
            if not self._fail_open:
                self.unavailable += 1
                return Unavailable(f"redis unavailable: {self._link.last_error or 'circuit breaker open'}")
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
            except RedisUnavailable:
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
    ) -> tuple[WindowStatus, ...] | Unavailable:
        if not self._ready(counter_ids) or self._breaker.state != CLOSED:
            ok = await self._pull(counter_ids, specs)
            if not ok and not self._fail_open:
                return Unavailable(f"redis unavailable: {self._link.last_error or 'circuit breaker open'}")
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


RedisStore = ExactRedisStore | BatchedRedisStore


def open_redis_store(
    settings: RedisSettings,
    *,
    password: str | None = None,
    base_dir: str = ".",
    client: Any = None,
    gauge_ttl: float = 330.0,
    name: str | None = None,
) -> RedisStore:
    """The store for `settings.mode` (not started: `await store.start()`). The password comes resolved
    (settings.redis_password): this module reads no environment and no secret file."""
    cls = BatchedRedisStore if settings.mode == "batched" else ExactRedisStore
    return cls(settings, client=client, password=password, base_dir=base_dir, gauge_ttl=gauge_ttl, name=name)
