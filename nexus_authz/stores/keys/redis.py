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
# New keys in bulk (put_many): KEYS = version, changes, then one hash per key; ARGV = channel, then an id
# and its JSON per key. Nothing is written if any exists; one PUBLISH for the batch.
_PUT_MANY = """
for i = 3, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then return {0, ARGV[2 * i - 4]} end
end
local v = 0
for i = 3, #KEYS do
  v = redis.call('INCR', KEYS[1])
  redis.call('HSET', KEYS[i], 'v', v, 'd', ARGV[2 * i - 3])
  redis.call('ZADD', KEYS[2], v, ARGV[2 * i - 4])
end
if v > 0 then redis.call('PUBLISH', ARGV[1], v .. ' *') end
return {1, v}
"""
# One page of changes (changed_since): the ids changed after ARGV[1], oldest first, at most ARGV[2], each
# as `<score>\t<v>\t<json>` (empty v and json: the hash is gone), joined by newlines, in ONE bulk string
# (the JSON never holds a raw tab or newline: json.dumps escapes them). redis-py parses a reply element
# by element in Python: one string per 5,000 keys instead of a pipelined HMGET each is what lets a replica
# load 1,000,000 keys in seconds. The hashes read are the `{rtkeys}` ones (ARGV[3] is their prefix), in
# the slot of KEYS[1] on a Redis Cluster.
_PAGE = r"""
local m = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, ARGV[2])
local out = {}
for i = 1, #m, 2 do
  local h = redis.call('HMGET', ARGV[3] .. m[i], 'v', 'd')
  out[#out + 1] = m[i + 1] .. '\t' .. (h[1] or '') .. '\t' .. (h[2] or '')
end
return table.concat(out, '\n')
"""
# Records by id (get_many, the admin list's page): ARGV[1] is the hashes' prefix, then the ids; one
# `<v>\t<json>` line per id (empty: none), in one string, for the same reason.
_GET_MANY = r"""
local out = {}
for i = 2, #ARGV do
  local h = redis.call('HMGET', ARGV[1] .. ARGV[i], 'v', 'd')
  out[#out + 1] = (h[1] or '') .. '\t' .. (h[2] or '')
end
return table.concat(out, '\n')
"""
_BATCH = 1000
_PAGE_ALL = 5000  # keys per script call when changed_since is asked for everything


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
        self._put_many = client.register_script(_PUT_MANY)
        self._page = client.register_script(_PAGE)
        self._get_many = client.register_script(_GET_MANY)
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

    async def changed_since(self, version: int, limit: int | None = None) -> tuple[int, list[RuntimeKey]]:
        """The keys changed after `version`, oldest change first: all of them, or the first `limit` (one
        page: the caller asks again from the version returned; each id has one score, its last change's
        version, and versions are unique, so pages neither overlap nor skip)."""
        top = version
        out: list[RuntimeKey] = []
        while True:
            size = min(limit - len(out), _PAGE_ALL) if limit is not None else _PAGE_ALL
            if size <= 0:
                return top, out
            text = await self._page(keys=[self._changes_key], args=[top, size, f"{self._prefix}k:"])
            lines = _text(text).split("\n") if text else []
            for line in lines:
                score, v, d = line.split("\t", 2)
                top = max(top, int(float(score)))
                if v and d:
                    try:
                        out.append(decode(d, int(v)))
                    except ValueError as exc:  # one bad record must not stop every other key
                        log.error("runtime key record unreadable; skipped", extra={"error": str(exc)})
            if len(lines) < size:
                return top, out

    async def get(self, key_id: str) -> RuntimeKey | None:
        v, d = await self._client.hmget(self._key(key_id), "v", "d")
        return None if v is None or d is None else decode(d, int(v))

    async def get_many(self, key_ids: list[str]) -> list[RuntimeKey | None]:
        """The stored keys of `key_ids` (None where there is none): one script call per 1,000 ids."""
        out: list[RuntimeKey | None] = []
        for start in range(0, len(key_ids), _BATCH):
            chunk = key_ids[start : start + _BATCH]
            text = _text(await self._get_many(keys=[self._changes_key], args=[f"{self._prefix}k:", *chunk]))
            for line in text.split("\n"):
                v, d = line.split("\t", 1)
                out.append(decode(d, int(v)) if v and d else None)
        return out

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
        """New keys (benchmarks, imports), one script call per 1,000 keys (a round trip and a PUBLISH per
        batch, not per key); StoreConflict if any existed (the batches before it are written)."""
        last = 0
        for start in range(0, len(keys), _BATCH):
            batch = keys[start : start + _BATCH]
            args: list[str] = [self.channel]
            for key in batch:
                args += (key.key_id, encode(key))
            ok, found = await self._put_many(
                keys=[self._version_key, self._changes_key, *(self._key(k.key_id) for k in batch)], args=args
            )
            if not ok:
                raise StoreConflict(f"key {_text(found)!r} exists already")
            last = max(last, int(found))
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
