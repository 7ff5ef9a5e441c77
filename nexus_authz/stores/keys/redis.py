"""Runtime keys in Redis (distributed mode): every replica sees a change within a second.

Layout, all keys hash-tagged `{rtkeys}` under the counters' key prefix (one slot on a Redis Cluster):
- `<prefix>{rtkeys}:k:<id>`: a hash per key, `v` (its version) and `d` (its JSON: hashes, never a
  secret; core.runtime_keys.encode);
- `<prefix>{rtkeys}:version`: the version counter (INCR per change);
- `<prefix>{rtkeys}:changes`: a sorted set, each key id scored by the version of its last change, so
  "what changed after version N" is one ZRANGEBYSCORE.
A write is one Lua script: compare the key's version with the one the writer read, take the next
version, write the hash and the sorted set, and PUBLISH `<version> <id>` on `<prefix>rtkeys`.

Replicas subscribe to that channel; a message (or a reconnect) tells the owner to catch up by version
(`changed_since(last seen)`), so a message lost while disconnected is not a change lost: the catch-up
after the reconnect reads it from the sorted set. A replica started later reads everything
(`changed_since(0)`). `connected` is false while the subscription is down (readiness says so; the last
keys loaded stay in force).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from nexus_authz.core.runtime_keys import RuntimeKey, decode, encode
from nexus_authz.stores.keys import StoreConflict

__all__ = ["RedisKeyStore"]

log = logging.getLogger("nexus_authz.redis")

_PUT = """
local cur = redis.call('HGET', KEYS[1], 'v')
if ARGV[1] == '' then
  if cur then return {0, cur} end
elseif cur ~= ARGV[1] then
  return {0, cur or ''}
end
local v = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'v', v, 'd', ARGV[2])
redis.call('ZADD', KEYS[3], v, ARGV[3])
redis.call('PUBLISH', ARGV[4], v .. ' ' .. ARGV[3])
return {1, v}
"""
_BATCH = 1000


class RedisKeyStore:
    kind = "redis"

    def __init__(
        self,
        client: Any,
        *,
        key_prefix: str = "nexus:",
        on_change: Callable[[], None] | None = None,
        reconnect_delay: float = 0.5,
    ) -> None:
        """`client`: a redis.asyncio.Redis. `on_change` is called on the event loop when the channel
        says something changed, and after every (re)subscription (the caller then catches up)."""
        self._client = client
        self._prefix = f"{key_prefix}{{rtkeys}}:"
        self.channel = f"{key_prefix}rtkeys"
        self._version_key = self._prefix + "version"
        self._changes_key = self._prefix + "changes"
        self.on_change = on_change
        self._reconnect_delay = reconnect_delay
        self._put = client.register_script(_PUT)
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.received = 0
        self.last_error: str | None = None

    def _key(self, key_id: str) -> str:
        return f"{self._prefix}k:{key_id}"

    async def start(self) -> None:
        """Subscribe in the background (returns at once; `connected` is set once subscribed)."""
        if self._task is None and self.on_change is not None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def changed_since(self, version: int) -> tuple[int, list[RuntimeKey]]:
        members = await self._client.zrangebyscore(self._changes_key, f"({version}", "+inf", withscores=True)
        top = version
        out: list[RuntimeKey] = []
        for start in range(0, len(members), _BATCH):
            chunk = members[start : start + _BATCH]
            pipe = self._client.pipeline(transaction=False)
            for member, _ in chunk:
                key_id = member.decode() if isinstance(member, bytes) else str(member)
                pipe.hmget(self._key(key_id), "v", "d")
            for (_, score), (v, d) in zip(chunk, await pipe.execute(), strict=True):
                top = max(top, int(score))
                if v is not None and d is not None:
                    try:
                        out.append(decode(d, int(v)))
                    except ValueError as exc:  # one bad record must not stop every other key
                        log.error("runtime key record unreadable; skipped", extra={"error": str(exc)})
        return top, out

    async def get(self, key_id: str) -> RuntimeKey | None:
        v, d = await self._client.hmget(self._key(key_id), "v", "d")
        return None if v is None or d is None else decode(d, int(v))

    async def put(self, key: RuntimeKey, *, expected: int | None) -> int:
        ok, version = await self._put(
            keys=[self._key(key.key_id), self._version_key, self._changes_key],
            args=["" if expected is None else str(expected), encode(key), key.key_id, self.channel],
        )
        if not ok:
            raise StoreConflict(
                f"key {key.key_id!r} exists already"
                if expected is None
                else f"key {key.key_id!r} changed meanwhile (expected version {expected})"
            )
        return int(version)

    async def put_many(self, keys: list[RuntimeKey]) -> int:
        """New keys, pipelined (benchmarks, imports); StoreConflict if any existed."""
        last = 0
        for start in range(0, len(keys), _BATCH):
            pipe = self._client.pipeline(transaction=False)
            for key in keys[start : start + _BATCH]:
                await self._put(  # queued on the pipeline (sent by execute)
                    keys=[self._key(key.key_id), self._version_key, self._changes_key],
                    args=["", encode(key), key.key_id, self.channel],
                    client=pipe,
                )
            for ok, version in await pipe.execute():
                if not ok:
                    raise StoreConflict("a key of the batch exists already")
                last = max(last, int(version))
        return last

    def _notify(self) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change()
        except Exception:  # the callback's bug must not stop notifications
            log.exception("runtime key notification failed")

    async def _run(self) -> None:
        logged_down = False
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self.connected.set()
                if logged_down:
                    log.info("runtime key channel reconnected", extra={"channel": self.channel})
                logged_down = False
                self._notify()  # catch up on whatever was missed while not subscribed
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self.received += 1
                        self._notify()
            except (RedisError, OSError) as exc:
                self.connected.clear()
                if not logged_down:  # one line per loss, not one per retry
                    log.warning(
                        "runtime key channel lost; the last keys loaded stay in force; retrying",
                        extra={"error": str(exc)[:300]},
                    )
                    logged_down = True
                self.last_error = str(exc)[:300]
                await asyncio.sleep(self._reconnect_delay)
            finally:
                with contextlib.suppress(RedisError, OSError, asyncio.CancelledError):
                    await pubsub.aclose()
