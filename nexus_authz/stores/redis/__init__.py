"""Distributed mode: counter stores on Redis, so every limit holds across all replicas.

Two consistency modes (`counters.redis.mode`):

* `exact`: one atomic script call per decision evaluates all of a key's windows with the same maths as
  the memory store (`lua`), pipelined with every other decision in flight (one round trip for all
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

Failures (`failure_mode`): a per-call timeout, then a circuit breaker (`link`). `fail_open`
decides with local limits while Redis is away: every replica enforces the limits on its own traffic
(so up to N times the global limit), its changes go to the bounded write-behind queue, and they are
reconciled when Redis answers again (before any later call on the same connection). `fail_closed`
raises `StoreUnavailable` (`core.ports`; the caller answers 503); settle differences are still queued,
never lost.
A call that timed out may still have been applied by Redis; its fallback charge is then counted twice
(conservative). `health()` gives the state (ok / degraded / down) for metrics and readiness, and each
change of state is logged once.

Keys: `<key_prefix>{<key id>}\\x00<limit name>`: the key id is a Redis Cluster hash tag, so one key's
windows live in one slot and a decision is one single-slot script call. State layout: `lua`.

The package: `settings` (the `counters.redis` section, the password, the client), `link` (the pipelined
connection, timeouts, the breaker), `lua` (the script) and `wire` (its argument and reply format),
`store` (what both modes share), `exact` and `batched` (the two modes), `writebehind` (the local view
and the queue of changes for Redis), `revocations` (the revocation channel).
"""

from __future__ import annotations

from typing import Any

from nexus_authz.stores.redis.batched import BatchedRedisStore
from nexus_authz.stores.redis.exact import ExactRedisStore
from nexus_authz.stores.redis.link import Health
from nexus_authz.stores.redis.revocations import RevocationChannel
from nexus_authz.stores.redis.settings import (
    RedisSettings,
    TlsFiles,
    make_client,
    parse_redis_settings,
)

__all__ = [
    "BatchedRedisStore",
    "ExactRedisStore",
    "Health",
    "RedisSettings",
    "RedisStore",
    "RevocationChannel",
    "TlsFiles",
    "make_client",
    "open_redis_store",
    "parse_redis_settings",
]

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
    (settings.redis_password): this package reads no environment and no secret file."""
    cls = BatchedRedisStore if settings.mode == "batched" else ExactRedisStore
    return cls(settings, client=client, password=password, base_dir=base_dir, gauge_ttl=gauge_ttl, name=name)
