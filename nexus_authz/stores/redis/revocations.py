"""Key revocation across replicas: a Redis set plus a pub/sub channel, both `<prefix>revocations`.

A key-file change reaches each pod at its next reload; a revocation must not wait for that. `publish`
adds the key id to the set (so a replica that starts or reconnects later still learns it) and announces
it on the channel (so running replicas learn it at once: typically within a few milliseconds, and within
`reconnect_delay` + one round trip after a lost connection). The subscriber subscribes first and then
reads the set, so nothing published in between is missed; after a reconnect it reads the set again.

The callback gets key ids (a frozenset: the whole set on (re)connect, one id per message) and is called
on the event loop; it should only swap a reference (e.g. a snapshot minus those keys). Errors in it are
logged, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

__all__ = ["RevocationChannel"]

log = logging.getLogger("nexus_authz.redis")


class RevocationChannel:
    def __init__(
        self,
        client: Any,
        *,
        key_prefix: str = "nexus:",
        on_revoked: Callable[[frozenset[str]], None] | None = None,
        reconnect_delay: float = 0.5,
    ) -> None:
        """`client`: a redis.asyncio.Redis (with a Redis Cluster, a client of one node: PUBLISH reaches
        every node's subscribers; the set key is hash-tagged)."""
        self._client = client
        self.channel = f"{key_prefix}revocations"
        self.set_key = f"{key_prefix}{{revocations}}"
        self._on_revoked = on_revoked
        self._reconnect_delay = reconnect_delay
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.received = 0
        self.reconnects = 0
        self.last_error: str | None = None

    async def publish(self, key_id: str) -> int:
        """Revoke `key_id` everywhere. Returns how many subscribers heard it now. Raises RedisError."""
        pipe = self._client.pipeline(transaction=True)
        pipe.sadd(self.set_key, key_id)
        pipe.publish(self.channel, key_id)
        _, heard = await pipe.execute()
        return int(heard)

    async def unrevoke(self, key_id: str) -> None:
        """Take a key id off the set (e.g. once it is gone from every key file for good)."""
        await self._client.srem(self.set_key, key_id)

    async def revoked(self) -> frozenset[str]:
        members = await self._client.smembers(self.set_key)
        return frozenset(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    async def start(self) -> None:
        """Subscribe in the background (returns at once; `connected` is set once subscribed)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _deliver(self, key_ids: frozenset[str]) -> None:
        if not key_ids or self._on_revoked is None:
            return
        try:
            self._on_revoked(key_ids)
        except Exception:  # the callback's bug must not stop revocations
            log.exception("revocation callback failed", extra={"keys": len(key_ids)})

    async def _run(self) -> None:
        first = True
        logged_down = False
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self._deliver(await self.revoked())
                self.connected.set()
                if not first:
                    log.info("revocation channel reconnected", extra={"channel": self.channel})
                first = False
                logged_down = False
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None:
                        continue
                    data = message.get("data")
                    if isinstance(data, bytes):
                        data = data.decode()
                    if isinstance(data, str) and data:
                        self.received += 1
                        self._deliver(frozenset((data,)))
            except (RedisError, OSError) as exc:
                self.connected.clear()
                self.reconnects += 1
                if not logged_down:  # one line per loss, not one per retry
                    log.warning("revocation channel lost; retrying", extra={"error": str(exc)[:300]})
                    logged_down = True
                self.last_error = str(exc)[:300]
                await asyncio.sleep(self._reconnect_delay)
            finally:
                with contextlib.suppress(RedisError, OSError, asyncio.CancelledError):
                    await pubsub.aclose()
