"""The Redis counter store: Lua == memory, pipelining, replicas, the batched bound, outages, revocations.

Everything runs against a real redis-server (tests/stores/conftest.py). Maths time is a fake clock
(`now` passed in); real time only drives timeouts and the outage tests, which assert that nothing hangs,
not how fast anything is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from nexus_authz.core.errors import ConfigError
from nexus_authz.core.limits import AcquireResult, LimitSpec, make_limit
from nexus_authz.core.ports import StoreUnavailable
from nexus_authz.core.yamlsrc import Fields, load_yaml
from nexus_authz.settings import redis_password
from nexus_authz.stores.memory import MemoryCounterStore
from nexus_authz.stores.redis import (
    BatchedRedisStore,
    ExactRedisStore,
    RedisSettings,
    RevocationChannel,
    make_client,
    open_redis_store,
    parse_redis_settings,
)
from nexus_authz.stores.redis.link import Breaker
from tests.stores.conftest import (
    RedisServer,
    SyncRedisStore,
    free_port,
    open_store,
    redis_settings,
    unique_prefix,
)

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_700_002_800.0


def ids_for(key: str, specs: tuple[LimitSpec, ...]) -> tuple[str, ...]:
    return tuple(f"{key}\x00{s.name}" for s in specs)


class FakeClock:
    """Monotonic seconds for the breaker and the batched freshness, moved by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# -- Lua == memory ---------------------------------------------------------------------------------------

POOL = (
    make_limit("requests", 3, "second", burst=2),
    make_limit("requests", 7, "minute", burst=3),
    make_limit("tokens", 50, "minute"),
    make_limit("tokens", 1000, "hour", burst=100),
    make_limit("tokens", 120, "day", slots=6),
    make_limit("tokens", 30, "minute", algorithm="sliding", slots=4, name="tokens/minute/sliding"),
    make_limit("requests", 10, "second", algorithm="sliding", slots=10, name="requests/second/sliding"),
    make_limit("usd", 80, "day", slots=3),
    make_limit("usd", 500, "month"),
    make_limit("concurrent", 2),
    make_limit("tokens", 20, "minute", shadow=True),
    make_limit("requests", 4, "minute", algorithm="sliding", slots=3, shadow=True),
    make_limit("tokens", 200, "day", calendar=True, timezone="America/New_York"),
    make_limit("usd", 400, "month", calendar=True, timezone="Pacific/Chatham"),
)
# the same names with another shape: a reloaded limit must read the old state as fresh, as in memory
RESHAPED = {
    1: make_limit("requests", 7, "minute", algorithm="sliding", slots=6, name=POOL[1].name),
    4: make_limit("tokens", 120, "day", slots=4, name=POOL[4].name),
    9: make_limit("tokens", 9, "minute", name=POOL[9].name),
    12: make_limit("tokens", 200, "day", slots=4, name=POOL[12].name),
    13: make_limit("usd", 400, "day", calendar=True, timezone="Asia/Kolkata", name=POOL[13].name),
}

step = st.tuples(
    st.one_of(st.integers(0, 8), st.integers(0, 64 * 40), st.integers(0, 64 * 30_000)),  # 1/64 s units
    st.sets(st.integers(0, len(POOL) - 1), min_size=1, max_size=6),
    st.sampled_from(["acquire", "acquire", "adjust", "refund", "peek"]),
    st.integers(0, 2),
    st.lists(st.integers(-60, 60), min_size=len(POOL), max_size=len(POOL)),
    st.booleans(),
)


def run_steps(store: Any, steps: list[Any], reshaping: bool = True) -> list[Any]:
    now = NOW
    out: list[Any] = []
    for gap, chosen, kind, key, numbers, reshape_ in steps:
        reshape = reshape_ and reshaping
        now += gap / 64
        picked = sorted(chosen)
        specs = tuple(RESHAPED[i] if reshape and i in RESHAPED else POOL[i] for i in picked)
        ids = tuple(f"k{key}\x00{POOL[i].name}" for i in picked)
        values = tuple(numbers[i] for i in picked)
        if kind == "acquire":
            costs = tuple(
                abs(v) if s.kind in ("tokens", "usd") else (abs(v) % 2)
                for s, v in zip(specs, values, strict=True)
            )
            r = store.acquire(ids, specs, costs, now)
            out.append(
                (
                    r.allowed,
                    r.uncharged,
                    [(x.remaining, x.reset_after, x.retry_after, x.allowed) for x in r.statuses],
                )
            )
        elif kind in ("adjust", "refund"):
            charged_at = now - (gap / 64) / 3 if kind == "refund" else None
            store.adjust(ids, specs, values, now, charged_at)
        else:
            costs = tuple(abs(v) for v in values)
            out.append(
                [
                    (x.remaining, x.reset_after, x.retry_after, x.allowed)
                    for x in store.peek(ids, specs, now, costs)
                ]
            )
    return out


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, max_size=30))
def test_lua_answers_exactly_like_the_memory_store(
    redis_contract_store: Callable[[str], SyncRedisStore], steps: list[Any]
) -> None:
    """Bit for bit: every status figure of every window, with zero costs, overdraws, refunds with and
    without charged_at, shadow windows, gaps from 0 to ~5 days and limits that change shape."""
    assert run_steps(redis_contract_store("exact"), steps) == run_steps(MemoryCounterStore(), steps)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, max_size=25))
def test_one_batched_replica_is_exact_and_leaves_redis_as_memory(
    redis_server: RedisServer,
    store_loop: asyncio.AbstractEventLoop,
    steps: list[Any],
) -> None:
    """A single batched replica decides like memory, and what it flushes is the exact state: a second
    replica starting afterwards reads the same figures from Redis."""
    settings_ = redis_settings(redis_server, mode="batched", flush_interval=0.002)
    first = SyncRedisStore(open_store(settings_), store_loop)
    memory = MemoryCounterStore()
    try:
        # (no limit changes shape here: the write-behind drops a counter's queued changes when it does)
        assert run_steps(first, steps, False) == run_steps(memory, steps, False)
        store_loop.run_until_complete(first.store.flush())
    finally:
        first.close()
    second = SyncRedisStore(
        open_store(redis_settings(redis_server, mode="exact", key_prefix=settings_.key_prefix)), store_loop
    )
    try:
        end = NOW + sum(s[0] for s in steps) / 64
        for key in range(3):
            for i, spec in enumerate(POOL):
                cid = f"k{key}\x00{spec.name}"
                for s in (spec, RESHAPED.get(i, spec)):
                    assert second.peek((cid,), (s,), end, (1,)) == memory.peek((cid,), (s,), end, (1,))
    finally:
        second.close()


def test_every_counter_in_redis_expires_once_fresh(
    redis_contract_store: Callable[[str], SyncRedisStore],
) -> None:
    store = redis_contract_store("exact")
    specs = (
        make_limit("requests", 10, "second"),
        make_limit("tokens", 1000, "day"),
        make_limit("concurrent", 5),
    )
    ids = ids_for("alice", specs)
    assert store.acquire(ids, specs, (1, 100, 1), NOW).allowed
    client = store.store._client
    ttls = [store.loop.run_until_complete(client.pttl(store.store._key(cid))) for cid in ids]
    # GCRA: 0.1 s of debt; sliding: until the slot leaves the day (+1 h - now); gauge: gauge_ttl; each + 5 s
    assert 5000 < ttls[0] <= 5100
    assert 86_400_000 < ttls[1] <= 86_400_000 + 5000 + 3_600_000
    assert 320_000 < ttls[2] <= 330_000
    store.adjust(ids, specs, (0, 0, -1), NOW + 1)  # released: nothing in flight, the key is gone
    assert store.loop.run_until_complete(client.exists(store.store._key(ids[2]))) == 0


# -- pipelining and replicas ------------------------------------------------------------------------------


async def _admitted(store: Any, n: int, specs: tuple[LimitSpec, ...], key: str, now: float) -> int:
    results = await asyncio.gather(
        *(store.acquire(ids_for(key, specs), specs, (1,) * len(specs), now) for _ in range(n))
    )
    assert all(isinstance(r, AcquireResult) for r in results)
    return sum(r.allowed for r in results)


def test_concurrent_decisions_share_one_round_trip(redis_server: RedisServer) -> None:
    async def main() -> None:
        store = open_store(redis_settings(redis_server))
        await store.start()
        specs = (make_limit("requests", 50, "minute"), make_limit("tokens", 10_000, "day"))
        before = store.health()
        assert await _admitted(store, 200, specs, "alice", NOW) == 50
        after = store.health()
        assert after.pipelines - before.pipelines <= 2  # one pipeline (two if the first was already out)
        assert after.calls - before.calls <= 2  # and one script call for all 200 decisions
        assert store._link.requests == 200
        await store.close()

    asyncio.run(main())


def test_two_exact_replicas_admit_exactly_the_global_limit(redis_server: RedisServer) -> None:
    async def main() -> None:
        prefix = unique_prefix()
        a = open_store(redis_settings(redis_server, key_prefix=prefix))
        b = open_store(redis_settings(redis_server, key_prefix=prefix))
        await asyncio.gather(a.start(), b.start())
        specs = (make_limit("requests", 97, "hour"), make_limit("concurrent", 1000))
        counts = await asyncio.gather(*(_admitted(s, 150, specs, "k", NOW) for s in (a, b, a, b)))
        assert sum(counts) == 97
        await asyncio.gather(a.close(), b.close())

    asyncio.run(main())


def _worker(url: str, prefix: str, mode: str, n: int, now: float) -> None:
    """Run in a child process: once told to go, offer n checks to one key in small concurrent waves; print
    how many were admitted."""

    async def main() -> None:
        settings_ = RedisSettings(url=url, key_prefix=prefix, mode=mode, timeout=2.0, flush_interval=0.01)
        store = open_redis_store(settings_)
        await store.start()
        specs = (make_limit("requests", 300, "hour"),)
        await _admitted(store, 1, (make_limit("requests", 10, "hour"),), "warm-up", now)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # the start line
        admitted = 0
        for _ in range(n // 10):  # waves of 10 concurrent checks, the two processes interleaved
            admitted += await _admitted(store, 10, specs, "shared", now)
            await asyncio.sleep(0.001)
        print(json.dumps({"admitted": admitted}), flush=True)
        await store.close()

    asyncio.run(main())


def _run_workers(server: RedisServer, mode: str, n: int) -> list[dict[str, int]]:
    prefix = unique_prefix("proc")
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.stores.test_redis import _worker; "
        "a = sys.argv; _worker(a[1], a[2], a[3], int(a[4]), float(a[5]))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, server.url, prefix, mode, str(n), repr(NOW)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:  # both connected and warm: then start them together
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    return [json.loads(p.communicate(timeout=60)[0]) for p in procs]


def test_two_processes_in_exact_mode_admit_exactly_the_limit(redis_server: RedisServer) -> None:
    results = _run_workers(redis_server, "exact", 400)
    assert sum(r["admitted"] for r in results) == 300
    assert all(r["admitted"] > 0 for r in results)  # both really competed


def test_two_processes_in_batched_mode_stay_within_the_bound(redis_server: RedisServer) -> None:
    """`now` fixed (t = 0: no refill), 400 offered by each: each replica admits what its own view allows;
    the excess over the limit is what the other admitted unseen: at most (N - 1) * burst (b + r*0)."""
    results = _run_workers(redis_server, "batched", 400)
    total = sum(r["admitted"] for r in results)
    assert 300 <= total <= 300 + (2 - 1) * 300


# -- batched: the documented over-admission bound, deterministically -----------------------------------------


def test_batched_replicas_stay_within_the_documented_bound(redis_server: RedisServer) -> None:
    """N replicas flush every T (staggered); each is offered rho requests/s on one key limited to r/s with
    burst b. In fake time a flush takes no time (d = 0), so S = 2T, and in every interval of length t the
    admitted count must be at most b + r*t + (N - 1) * min(b + r*S, rho*S + 1); over the whole run the
    rate must still be about r (the excess is paid back, not lost)."""
    n_rep, period, rho, duration = 3, 0.1, 40.0, 12.0
    spec = make_limit("requests", 600, "minute", burst=5)  # r = 10/s, b = 5
    r, b = spec.limit / spec.period, spec.burst
    s = 2 * period
    bound_extra = (n_rep - 1) * min(b + r * s, rho * s + 1)

    async def main() -> list[float]:
        clock = FakeClock()
        prefix = unique_prefix("bound")
        stores = [
            open_store(
                redis_settings(
                    redis_server, key_prefix=prefix, mode="batched", flush_interval=period, timeout=0.5
                ),
                clock=clock,
            )
            for _ in range(n_rep)
        ]
        for store in stores:
            await store._link.start()  # no ticker: flushes happen in fake time below
        events: list[tuple[float, int, str]] = []
        for i in range(n_rep):
            k = 0
            while (t := (k + 0.37 * i) / rho) < duration:
                events.append((t, i, "check"))
                k += 1
            k = 1
            while (t := k * period + i * period / n_rep) < duration:
                events.append((t, i, "flush"))
                k += 1
        events.sort()
        admitted: list[float] = []
        for t, i, what in events:
            clock.t = 1000.0 + t
            if what == "flush":
                await stores[i].flush()
                continue
            result = await stores[i].acquire(("key\x00rps",), (spec,), (1,), NOW + t)
            assert isinstance(result, AcquireResult)
            if result.allowed:
                admitted.append(t)
        for store in stores:
            await store.close()
        return admitted

    admitted = asyncio.run(main())
    worst = max(
        (j - i + 1) - (b + r * (admitted[j] - admitted[i]))
        for i in range(len(admitted))
        for j in range(i, len(admitted))
    )
    assert worst <= bound_extra + 1e-9, (worst, bound_extra)
    assert len(admitted) >= 0.9 * (b + r * duration)  # and it does not starve


def test_batched_answers_from_local_counters_without_awaiting(redis_server: RedisServer) -> None:
    async def main() -> None:
        clock = FakeClock()
        store = open_store(redis_settings(redis_server, mode="batched", flush_interval=0.05), clock=clock)
        assert isinstance(store, BatchedRedisStore)
        await store._link.start()
        specs = (make_limit("requests", 2, "minute"),)
        ids = ids_for("alice", specs)
        assert store.acquire_nowait(ids, specs, (1,), NOW) is None  # never pulled: the caller awaits
        assert (await store.acquire(ids, specs, (1,), NOW)).allowed  # type: ignore[union-attr]
        calls = store.health().calls
        first = store.acquire_nowait(ids, specs, (1,), NOW)
        second = store.acquire_nowait(ids, specs, (1,), NOW)
        assert first is not None and first.allowed and second is not None and not second.allowed
        assert store.health().calls == calls  # no Redis call on the hot path
        clock.t += 1  # the view is stale (> 2T + timeout): pull again, unless known to be over its limit
        assert store.acquire_nowait(ids, specs, (1,), NOW + 10) is not None  # over: still answered locally
        other = ids_for("bob", specs)
        assert (await store.acquire(other, specs, (1,), NOW)).allowed  # type: ignore[union-attr]
        clock.t += 60
        assert store.acquire_nowait(other, specs, (1,), NOW) is None
        await store.close()

    asyncio.run(main())


# -- outages ----------------------------------------------------------------------------------------------


class Tracking(ExactRedisStore):
    """Remembers the decisions made locally (fallback), to check what reconciliation must bring back."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.local_tokens = 0

    def _fallback_acquire(self, ids: Any, specs: Any, costs: Any, now: float) -> Any:
        result = super()._fallback_acquire(ids, specs, costs, now)
        if isinstance(result, AcquireResult) and result.allowed:
            self.local_tokens += costs[0]
        return result


SPECS = (make_limit("tokens", 10**9, "day"), make_limit("concurrent", 1000))


async def _load(
    store: Any, keys: list[str], until: float, durations: list[float], results: list[Any]
) -> None:
    i = 0
    while time.monotonic() < until:
        key = keys[i % len(keys)]
        i += 1
        ids = ids_for(key, SPECS)
        started = time.monotonic()
        result = await store.acquire(ids, SPECS, (10, 1), time.time())
        if isinstance(result, AcquireResult) and result.allowed:
            await store.adjust(ids, SPECS, (0, -1), time.time())  # release the slot
        durations.append(time.monotonic() - started)
        results.append(result)
        await asyncio.sleep(0.001)


async def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_redis_killed_during_load_fail_open_then_reconciled(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()

    async def main() -> None:
        settings_ = redis_settings(
            server, timeout=0.05, breaker_failures=2, breaker_reset=0.2, flush_interval=0.02, max_queue=10_000
        )
        store = Tracking(settings_, client=make_client(settings_))
        await store.start()
        durations: list[float] = []
        results: list[Any] = []
        keys = [f"key{i}" for i in range(8)]
        load = [
            asyncio.create_task(_load(store, keys, time.monotonic() + 1.0, durations, results))
            for _ in range(8)
        ]
        await asyncio.sleep(0.3)
        server.kill()  # a crash, mid-load
        await asyncio.gather(*load)
        assert store.health().state == "degraded" and store.health().breaker != "closed"
        assert all(isinstance(r, AcquireResult) for r in results)  # fail_open: every check answered
        assert max(durations) < 1.0  # nothing hung (timeout 50 ms; generous for a loaded CI machine)
        assert store.local_tokens > 0 and store.health().queue > 0
        server.start()  # back, empty (no persistence): it must get the outage's usage from the queue
        await _wait_for(lambda: store.health().queue == 0 and store.health().state == "ok")
        await store.close()
        check = open_store(redis_settings(server, key_prefix=settings_.key_prefix))
        await check.start()
        used = 0
        for key in keys:
            statuses = await check.peek(ids_for(key, SPECS), SPECS, time.time())
            used += 10**9 - statuses[0].remaining
            assert statuses[1].remaining == 1000  # every slot taken during the outage was released
        assert used == store.local_tokens  # exactly what was decided locally, reconciled
        await check.close()

    asyncio.run(main())


def test_redis_down_fail_closed_answers_unavailable_and_recovers(
    redis_server_factory: Callable[[], RedisServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_factory()

    async def main() -> None:
        settings_ = redis_settings(
            server, timeout=0.05, breaker_failures=2, breaker_reset=0.2, failure_mode="fail_closed"
        )
        store = open_store(settings_)
        await store.start()
        ids = ids_for("k", SPECS)
        assert isinstance(await store.acquire(ids, SPECS, (10, 1), NOW), AcquireResult)
        server.kill()
        for _ in range(6):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as raised:
                await store.acquire(ids, SPECS, (10, 1), NOW)
            assert time.monotonic() - started < 1.0
            assert raised.value.transient and raised.value.retry_after > 0
        await store.adjust(ids, SPECS, (0, -1), NOW)  # a settle while down is queued, not lost
        health = store.health()
        assert health.state == "down" and not health.ready and health.unavailable == 6 and health.queue == 1
        server.start()
        # past the breaker's reset, the queued settle goes out as the probe and closes the breaker
        await _wait_for(lambda: store.health().breaker == "closed", 2.0)
        result = await store.acquire(ids, SPECS, (10, 1), NOW)
        assert isinstance(result, AcquireResult) and result.allowed
        assert store.health().state == "ok" and store.health().queue == 0
        await store.close()

    with caplog.at_level(logging.INFO, logger="nexus_authz.redis"):
        asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "nexus_authz.redis"]
    assert lines.count("redis unreachable: answering 503 (fail_closed)") == 1  # one line per change
    assert lines.count("redis counter store ok") == 1


def test_the_write_behind_queue_stays_bounded(redis_server_factory: Callable[[], RedisServer]) -> None:
    server = redis_server_factory()

    async def main() -> None:
        settings_ = redis_settings(
            server, mode="batched", timeout=0.05, breaker_reset=0.2, max_queue=25, flush_interval=0.01
        )
        store = open_store(settings_)
        await store.start()
        server.kill()
        for i in range(200):  # 200 distinct counters while Redis is away
            result = await store.acquire(ids_for(f"k{i}", SPECS[:1]), SPECS[:1], (5,), NOW)
            assert isinstance(result, AcquireResult) and result.allowed  # fail_open: local limits
        health = store.health()
        assert health.queue <= 25 and health.queue_dropped >= 175 and health.state == "degraded"
        server.start()
        await _wait_for(lambda: store.health().queue == 0 and store.health().state == "ok")
        await store.close()
        check = open_store(redis_settings(server, key_prefix=settings_.key_prefix))
        await check.start()
        assert await check.counters() == 25  # what fitted in the queue reached Redis; the rest was counted
        await check.close()

    asyncio.run(main())


def test_batched_replica_keeps_deciding_through_an_outage_and_reconciles(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()

    async def main() -> None:
        settings_ = redis_settings(
            server, mode="batched", timeout=0.05, breaker_reset=0.2, flush_interval=0.01
        )
        store = open_store(settings_)
        await store.start()
        ids = ids_for("k", SPECS[:1])
        assert (await store.acquire(ids, SPECS[:1], (100,), NOW)).allowed  # type: ignore[union-attr]
        await store.flush()
        server.kill()
        for _ in range(10):
            assert (await store.acquire(ids, SPECS[:1], (100,), NOW)).allowed  # type: ignore[union-attr]
        await _wait_for(lambda: store.health().state == "degraded")  # the flushes fail: breaker open
        server.start()  # empty again: the deltas (not the lost state) are what comes back
        await _wait_for(lambda: store.health().queue == 0 and store.health().state == "ok")
        await store.close()
        check = open_store(redis_settings(server, key_prefix=settings_.key_prefix))
        await check.start()
        statuses = await check.peek(ids, SPECS[:1], NOW)
        assert 10**9 - statuses[0].remaining == 1000  # the 10 of the outage; the 100 before died with Redis
        await check.close()

    asyncio.run(main())


def test_a_flush_whose_answer_was_lost_is_applied_once(redis_server: RedisServer) -> None:
    """Redis applied the batch, the answer never came: it is resent under its token, not applied again."""

    async def main() -> None:
        store = open_store(redis_settings(redis_server, breaker_failures=100))
        await store.start()
        ids = ids_for("k", SPECS[:1])
        assert isinstance(store, ExactRedisStore)
        store._fallback_adjust(ids, SPECS[:1], (500,), NOW, None)  # queued, as during an outage
        link = store._link
        send = link._send

        async def answer_lost(calls: Any) -> list[Any]:
            await send(calls)  # applied by Redis...
            raise RedisConnectionError("connection reset by peer")  # ...but the answer is lost

        link._send = answer_lost  # type: ignore[method-assign]
        with pytest.raises(StoreUnavailable):
            await store.flush()
        assert store._wb.in_doubt and len(store._wb) == 1
        link._send = send  # type: ignore[method-assign]
        await store.flush()
        assert not store._wb.in_doubt and len(store._wb) == 0
        statuses = await store.peek(ids, SPECS[:1], NOW)
        assert 10**9 - statuses[0].remaining == 500  # once, not twice
        await store.close()

    asyncio.run(main())


def test_no_redis_at_all_start_does_not_fail(tmp_path: Path) -> None:
    """A store pointed at nothing starts (the failure mode applies) and never hangs."""

    async def main() -> None:
        settings_ = RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", timeout=0.05, breaker_failures=1)
        store = open_store(settings_)
        await store.start()
        result = await store.acquire(ids_for("k", SPECS), SPECS, (1, 1), NOW)
        assert isinstance(result, AcquireResult) and result.allowed
        assert store.acquire_nowait(ids_for("k", SPECS), SPECS, (1, 1), NOW) is not None  # local, no await
        assert store.health().state == "degraded" and store.health().last_error
        await store.close()

    asyncio.run(main())


def test_adjust_soon_settles_from_synchronous_code(redis_server: RedisServer) -> None:
    async def main() -> None:
        for mode in ("exact", "batched"):
            store = open_store(redis_settings(redis_server, mode=mode))
            await store.start()
            specs = (make_limit("concurrent", 1),)
            ids = ids_for("k", specs)
            assert (await store.acquire(ids, specs, (1,), NOW)).allowed  # type: ignore[union-attr]
            store.adjust_soon(ids, specs, (-1,), NOW)  # e.g. from Engine.settle, which is synchronous
            await store.close()  # waits for it (and flushes)
            check = open_store(redis_settings(redis_server, key_prefix=store.settings.key_prefix))
            await check.start()
            assert (await check.peek(ids, specs, NOW))[0].remaining == 1  # type: ignore[index]
            await check.close()

    asyncio.run(main())


def test_breaker_transitions() -> None:
    clock = FakeClock()
    breaker = Breaker(3, 2.0, clock)
    assert breaker.allow() and breaker.state == "closed"
    breaker.failure()
    breaker.failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.success()  # consecutive failures only
    for _ in range(3):
        breaker.failure()
    assert breaker.state == "open" and not breaker.allow() and not breaker.would_allow()
    clock.t += 1.9
    assert not breaker.allow()
    clock.t += 0.1
    assert breaker.would_allow()
    assert breaker.allow() and breaker.state == "half_open"  # the probe
    assert not breaker.allow() and not breaker.would_allow()  # only one
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.t += 2.0
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()


# -- revocations -------------------------------------------------------------------------------------------


def test_revocations_reach_every_replica_within_a_second(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()

    async def main() -> None:
        prefix = unique_prefix("rev")
        settings_ = RedisSettings(url=server.url, key_prefix=prefix)
        publisher = RevocationChannel(make_client(settings_), key_prefix=prefix)
        await publisher.publish("revoked-before-start")
        seen: list[frozenset[str]] = []
        event = asyncio.Event()

        def on_revoked(key_ids: frozenset[str]) -> None:
            seen.append(key_ids)
            event.set()

        replica = RevocationChannel(
            make_client(settings_), key_prefix=prefix, on_revoked=on_revoked, reconnect_delay=0.1
        )
        await replica.start()
        await asyncio.wait_for(replica.connected.wait(), 2)
        assert seen == [frozenset({"revoked-before-start"})]  # a (re)starting replica reads the set
        event.clear()
        await publisher.publish("key-1")
        await asyncio.wait_for(event.wait(), 1.0)
        assert seen[-1] == frozenset({"key-1"})
        server.kill()
        server.start()  # empty: the set is gone with it, but the subscription comes back
        await asyncio.wait_for(replica.connected.wait(), 3)
        publisher2 = RevocationChannel(make_client(settings_), key_prefix=prefix)
        event.clear()
        await publisher2.publish("key-2")
        await asyncio.wait_for(event.wait(), 1.0)
        assert seen[-1] == frozenset({"key-2"}) and replica.reconnects >= 1
        assert await publisher2.revoked() == frozenset({"key-2"})
        await replica.close()
        for channel in (publisher, publisher2, replica):
            await channel._client.aclose()

    asyncio.run(main())


# -- settings ----------------------------------------------------------------------------------------------


def _parse(text: str) -> RedisSettings:
    data = load_yaml(text, "nexus.yaml")
    return parse_redis_settings(Fields(data["counters"]["redis"], "nexus.yaml", "counters.redis"))


def test_settings_full() -> None:
    s = _parse(
        """
counters:
  redis:
    url: rediss://redis.internal:6380/2
    password_file: secrets/redis
    tls: {ca_file: ca.pem, cert_file: c.pem, key_file: k.pem}
    key_prefix: "nx:"
    mode: batched
    timeout: 20ms
    flush_interval: 250ms
    max_queue: 5000
    failure_mode: fail_closed
    breaker: {failures: 3, reset: 5s}
"""
    )
    assert s.url == "rediss://redis.internal:6380/2" and s.password_file == "secrets/redis"
    assert s.tls.ca_file == "ca.pem" and s.key_prefix == "nx:" and s.mode == "batched"
    assert (s.timeout, s.flush_interval, s.max_queue) == (0.02, 0.25, 5000)
    assert not s.fail_open and (s.breaker_failures, s.breaker_reset) == (3, 5.0)
    assert _parse("counters:\n  redis: {}\n") == RedisSettings()


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ("url: redis://:hunter2@h:6379", "counters.redis.url", "password"),
        ("password: hunter2", "counters.redis.password", "never inline"),
        ("url: http://h", "counters.redis.url", "redis://"),
        ("mode: eventual", "counters.redis.mode", "exact, batched"),
        ("tls: {ca_file: ca.pem}", "counters.redis.tls", "rediss://"),
        ("timeout: soon", "counters.redis.timeout", "duration"),
        ("key_prefix: 'a{b}'", "counters.redis.key_prefix", "hash tags"),
        ("cluster: true\n    url: redis://h:6379/3", "counters.redis.url", "database 0"),
        ("breaker: {failures: 0}", "counters.redis.breaker.failures", "at least 1"),
        ("pasword_env: X", "counters.redis.pasword_env", "unknown field"),
    ],
)
def test_settings_errors_name_the_file_line_and_field(body: str, field: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _parse(f"counters:\n  redis:\n    {body}\n")
    assert info.value.field == field and message in str(info.value)
    assert (info.value.source or "").startswith("nexus.yaml:")


def test_password_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    assert redis_password(RedisSettings(password_file="pw"), base_dir=str(tmp_path)) == "s3cret"
    assert redis_password(RedisSettings(password_env="RPW"), environ={"RPW": "x"}) == "x"
    with pytest.raises(ConfigError, match="RPW is not set"):
        redis_password(RedisSettings(password_env="RPW"), environ={})
    assert redis_password(RedisSettings()) is None


def test_a_password_protected_redis(redis_server_factory: Callable[[], RedisServer]) -> None:
    server = redis_server_factory()
    server.stop()
    server.start("--requirepass", "s3cret-pw")

    async def main() -> None:
        rs = redis_settings(server, password_env="RPW")
        good = open_redis_store(rs, password=redis_password(rs, environ={"RPW": "s3cret-pw"}))
        await good.start()
        assert (await good.acquire(("k\x00a",), SPECS[:1], (1,), NOW)).allowed  # type: ignore[union-attr]
        assert good.health().state == "ok"
        await good.close()
        rs = redis_settings(server, password_env="RPW", failure_mode="fail_closed", breaker_failures=1)
        bad = open_redis_store(rs, password=redis_password(rs, environ={"RPW": "wrong"}))
        await bad.start()
        with pytest.raises(StoreUnavailable):
            await bad.acquire(("k\x00a",), SPECS[:1], (1,), NOW)
        assert bad.health().last_error and "wrong" not in bad.health().last_error  # type: ignore[operator]
        await bad.close()

    asyncio.run(main())


# -- Redis Cluster (one node holding every slot: the same protocol as a real cluster) ------------------------


def _cluster_port() -> int:
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no port pair free for a cluster node")


def test_cluster_mode_keeps_a_keys_windows_in_one_slot(
    redis_server_factory: Callable[[], RedisServer],
) -> None:
    server = redis_server_factory()
    server.stop()
    server.port = _cluster_port()  # the cluster bus listens on port + 10000
    server.start("--cluster-enabled", "yes", "--cluster-config-file", str(server.directory / "nodes.conf"))
    subprocess.run(
        ["redis-cli", "-p", str(server.port), "cluster", "addslotsrange", "0", "16383"],
        check=True,
        capture_output=True,
    )
    deadline = time.monotonic() + 10
    while (
        b"cluster_state:ok"
        not in subprocess.run(
            ["redis-cli", "-p", str(server.port), "cluster", "info"], capture_output=True
        ).stdout
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)

    async def main() -> None:
        for mode in ("exact", "batched"):
            settings_ = redis_settings(server, cluster=True, mode=mode, flush_interval=0.01)
            store = open_store(settings_)
            await store.start()
            specs = (make_limit("requests", 3, "minute"), make_limit("tokens", 100, "day"))
            results = await asyncio.gather(
                *(store.acquire(ids_for(f"key{i % 2}", specs), specs, (1, 10), NOW) for i in range(10))
            )
            assert sum(r.allowed for r in results) == 6  # type: ignore[union-attr]
            await store.flush()
            keys = [store._key(cid) for cid in ids_for("key0", specs)]
            slots = {key_slot(k) for k in keys}
            assert len(slots) == 1
            assert store.health().state == "ok"
            await store.close()

    asyncio.run(main())


def test_a_script_flushed_from_redis_is_loaded_again(
    redis_contract_store: Callable[[str], SyncRedisStore],
) -> None:
    store = redis_contract_store("exact")
    specs = (make_limit("requests", 5, "minute"),)
    assert store.acquire(ids_for("a", specs), specs, (1,), NOW).allowed
    store.loop.run_until_complete(store.store._client.script_flush())
    assert store.acquire(ids_for("a", specs), specs, (1,), NOW).statuses[0].remaining == 3
    assert store.store.health().failures == 0


def test_a_key_that_can_never_fit(redis_contract_store: Callable[[str], SyncRedisStore]) -> None:
    store = redis_contract_store("exact")
    specs = (make_limit("tokens", 100, "minute"),)
    result = store.acquire(ids_for("a", specs), specs, (101,), NOW)
    assert not result.allowed and result.statuses[0].retry_after == math.inf
