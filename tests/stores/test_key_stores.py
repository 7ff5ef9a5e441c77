"""Runtime key stores (issue 17) against a real redis-server: two replicas (two engines, each with its
own RuntimeKeys on its own connection) share one Redis, as two processes would."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from nexus_authz.core import runtime_keys as rk
from nexus_authz.core.model import Reason, Request
from nexus_authz.core.runtime_keys import KeyChanges, KeySpec
from nexus_authz.engine import Engine
from nexus_authz.runtime_keys import RuntimeKeys
from nexus_authz.server import Server
from nexus_authz.settings import load_settings
from nexus_authz.stores.keys import StoreConflict
from nexus_authz.stores.keys.redis import RedisKeyStore
from tests.helpers import KeySpec as FileKey
from tests.helpers import write_config
from tests.stores.conftest import RedisServer, unique_prefix


def chat(secret: str) -> Request:
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
    return Request("POST", "/v1/chat/completions", {"authorization": f"Bearer {secret}"}, body)


class Replica:
    def __init__(self, config: Path, url: str, prefix: str) -> None:
        self.engine = Engine.from_settings(load_settings(str(config)))
        self.client = aioredis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.store = RedisKeyStore(self.client, key_prefix=prefix, reconnect_delay=0.1)
        self.runtime = RuntimeKeys(self.engine, self.store, poll_interval=5.0)
        self.store.on_change = self.runtime.notify
        self.engine.runtime = self.runtime

    async def start(self) -> None:
        await self.runtime.start(first_load_timeout=2.0)
        await asyncio.wait_for(self.store.connected.wait(), 5)

    async def close(self) -> None:
        await self.runtime.close()
        await self.client.aclose()

    def status(self, secret: str) -> Reason:
        return self.engine.check(chat(secret)).reason


async def until(predicate: Callable[[], bool], timeout: float = 1.0) -> float:
    """Seconds until `predicate` holds (polled every ms); fails after `timeout`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(0.001)
    return time.monotonic() - started


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, FileKey("filekey"), extra="ledger:\n  backend: none\n")


def test_the_store_checks_versions(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        prefix = unique_prefix("ks")
        store = RedisKeyStore(client, key_prefix=prefix)
        key = rk.create(KeySpec(key_id="a"), key_hash=b"\x01" * 32, now=1.0)
        v1 = await store.put(key, expected=None)
        with pytest.raises(StoreConflict, match="exists already"):
            await store.put(key, expected=None)
        with pytest.raises(StoreConflict, match="changed meanwhile"):
            await store.put(key, expected=v1 + 5)
        v2 = await store.put(rk.revoke(key, now=2.0), expected=v1)
        assert v2 > v1
        got = await store.get("a")
        assert got is not None and got.disabled and got.version == v2
        top, changed = await store.changed_since(0)
        assert top == v2 and [k.key_id for k in changed] == ["a"]
        assert await store.changed_since(v2) == (v2, [])
        many = [rk.create(KeySpec(key_id=f"m{i}"), key_hash=bytes([i + 2]) * 32, now=3.0) for i in range(3)]
        assert await store.put_many(many) == v2 + 3
        top, changed = await store.changed_since(v2)
        assert top == v2 + 3 and [k.key_id for k in changed] == ["m0", "m1", "m2"]
        with pytest.raises(StoreConflict):
            await store.put_many(many[:1])
        # a record that cannot be read is skipped (and logged), the others still load
        await client.hset(f"{prefix}{{rtkeys}}:k:bad", mapping={"v": 99, "d": "not json"})
        await client.zadd(f"{prefix}{{rtkeys}}:changes", {"bad": 99})
        top, changed = await store.changed_since(0)
        assert top == 99 and sorted(k.key_id for k in changed) == ["a", "m0", "m1", "m2"]
        await client.aclose()

    asyncio.run(scenario())


def test_the_store_pages_changes_and_writes_in_bulk(redis_server: RedisServer) -> None:
    """At 1,000,000 keys: a replica reads changes a page at a time (one script call and one reply per
    page), bulk creation is one script call and one notification per 1,000 keys, and the admin list
    reads records by id."""

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        prefix = unique_prefix("kp")
        store = RedisKeyStore(client, key_prefix=prefix)
        pubsub = client.pubsub()
        await pubsub.subscribe(store.channel)
        many = [
            rk.create(KeySpec(key_id=f"m{i:04d}"), key_hash=i.to_bytes(32, "big"), now=3.0)
            for i in range(2500)
        ]
        assert await store.put_many(many) == 2500
        messages, deadline = 0, time.monotonic() + 0.5
        while time.monotonic() < deadline:  # (a subscribe confirmation reads as None: poll until then)
            m = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
            messages += 1 if m is not None and m["type"] == "message" else 0
        assert messages == 3  # one per batch of 1,000, not one per key
        pages, version = [], 0
        while True:
            version, page = await store.changed_since(version, 1000)
            pages.append([k.key_id for k in page])
            if len(page) < 1000:
                break
        assert [len(p) for p in pages] == [1000, 1000, 500] and version == 2500
        assert sum(pages, []) == [k.key_id for k in many]  # in order, no overlap, nothing skipped
        # an unreadable record inside a page is skipped, and the page is still filled
        await client.hset(f"{prefix}{{rtkeys}}:k:bad", mapping={"v": 2501, "d": "not json"})
        await client.zadd(f"{prefix}{{rtkeys}}:changes", {"bad": 2501})
        await client.incr(f"{prefix}{{rtkeys}}:version")  # its version taken
        await store.put(rk.create(KeySpec(key_id="z"), key_hash=b"\xff" * 32, now=4.0), expected=None)
        top, page = await store.changed_since(2499, 2)
        assert [k.key_id for k in page] == ["m2499", "z"] and top == 2502
        got = await store.get_many(["m0007", "nope", "m2000"])
        assert [k.key_id if k else None for k in got] == ["m0007", None, "m2000"]
        assert got[0] is not None and got[0].version == 8 and got[0].key_hash == (7).to_bytes(32, "big")
        with pytest.raises(StoreConflict, match="'m0001' exists already"):
            await store.put_many([rk.create(KeySpec(key_id="new"), key_hash=b"\xee" * 32, now=5.0), many[1]])
        assert await store.get("new") is None  # nothing of a refused batch is written
        await pubsub.aclose()
        await client.aclose()

    asyncio.run(scenario())


def test_every_change_reaches_the_other_replica_within_a_second(
    redis_server: RedisServer, config: Path
) -> None:
    prefix = unique_prefix("rt")

    async def scenario() -> list[float]:
        a, b = Replica(config, redis_server.url, prefix), Replica(config, redis_server.url, prefix)
        await a.start()
        await b.start()
        seen: list[float] = []
        try:
            _, secret = await a.runtime.create(KeySpec(key_id="k1"))
            seen.append(await until(lambda: b.status(secret) is Reason.OK))
            _, new = await a.runtime.rotate("k1", grace=0.3)
            seen.append(await until(lambda: b.status(new) is Reason.OK))
            assert b.status(secret) is Reason.OK  # grace period
            await asyncio.sleep(0.35)
            assert b.status(secret) is Reason.EXPIRED_KEY and a.status(secret) is Reason.EXPIRED_KEY
            await b.runtime.update("k1", KeyChanges(models=("claude-*",)))  # a change made on B
            seen.append(await until(lambda: a.status(new) is Reason.MODEL_NOT_ALLOWED))
            await a.runtime.update("k1", KeyChanges(models=()))
            seen.append(await until(lambda: b.status(new) is Reason.OK))
            await a.runtime.revoke("k1")
            seen.append(await until(lambda: b.status(new) is Reason.DISABLED_KEY))
            await a.runtime.restore("k1")  # un-revocation too
            seen.append(await until(lambda: b.status(new) is Reason.OK))
            # a replica started later loads every key
            c = Replica(config, redis_server.url, prefix)
            await c.start()
            assert c.status(new) is Reason.OK and c.status("nx-unknown-secret") is Reason.UNKNOWN_KEY
            assert b.runtime.state() == ("ok", "ok")
            await c.close()
        finally:
            await a.close()
            await b.close()
        return seen

    seen = asyncio.run(scenario())
    assert max(seen) < 1.0
    print(f"propagation: median {statistics.median(seen) * 1000:.1f} ms, max {max(seen) * 1000:.1f} ms")


def test_a_missed_message_is_caught_up_by_version_and_an_outage_keeps_the_keys(
    redis_server_factory: Callable[[], RedisServer], config: Path
) -> None:
    server = redis_server_factory()
    prefix = unique_prefix("rt")

    async def scenario() -> None:
        a, b = Replica(config, server.url, prefix), Replica(config, server.url, prefix)
        await a.start()
        await b.start()
        try:
            _, secret = await a.runtime.create(KeySpec(key_id="k1"))
            await until(lambda: b.status(secret) is Reason.OK)
            # B's subscription is cut: A's change is published while B does not listen
            admin = aioredis.Redis.from_url(server.url)
            b.store.on_change = None  # B hears nothing until it resubscribes...
            await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            await until(lambda: not b.store.connected.is_set(), timeout=3)
            await a.runtime.revoke("k1")
            b.store.on_change = b.runtime.notify
            # ...and catches up by version once it is back
            await until(lambda: b.status(secret) is Reason.DISABLED_KEY, timeout=3)
            await a.runtime.restore("k1")
            await until(lambda: b.status(secret) is Reason.OK)
            await admin.aclose()
            # Redis goes away: the keys in force stay, readiness says degraded
            server.kill()
            await until(lambda: not b.store.connected.is_set(), timeout=3)
            state, detail = b.runtime.state()
            assert state == "degraded" and "runtime key store (redis) unreachable" in detail
            assert b.status(secret) is Reason.OK
            # readiness says so and stays ready (every replica keeps the same last keys)
            server_b = Server(b.engine.settings, b.engine, runtime=b.runtime)
            ready, why = server_b.readiness()
            assert ready and why.startswith("degraded: runtime key store (redis) unreachable")
            # a replica that never loaded the runtime keys is not ready: it would refuse valid keys
            late = Replica(config, server.url, prefix)
            await late.runtime.start(first_load_timeout=0.5)
            ready, why = Server(late.engine.settings, late.engine, runtime=late.runtime).readiness()
            assert not ready and "runtime keys not loaded yet" in why
            await late.close()
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_a_runtime_keys_group_reaches_the_other_replica_with_its_windows(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The group is stored and read back: B charges a key created (and moved) on A its group's window."""
    tenants = (
        "tenants:\n  acme:\n    groups:\n      research:\n        limits: [{requests: 1, per: minute}]\n"
    )
    config = write_config(tmp_path, FileKey("filekey"), extra="ledger:\n  backend: none\n" + tenants)
    prefix = unique_prefix("rtg")

    async def scenario() -> None:
        a, b = Replica(config, redis_server.url, prefix), Replica(config, redis_server.url, prefix)
        await a.start()
        await b.start()
        try:
            _, secret = await a.runtime.create(KeySpec(key_id="k1", tenant="acme", group="research"))
            await until(lambda: "k1" in b.engine.snapshot.by_id)
            assert b.engine.snapshot.by_id["k1"].group == "research"
            assert b.status(secret) is Reason.OK and b.status(secret) is Reason.RATE_LIMITED
            await a.runtime.update("k1", KeyChanges(group=""))
            await until(lambda: b.engine.snapshot.by_id["k1"].group == "")
            assert b.status(secret) is Reason.OK
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())
