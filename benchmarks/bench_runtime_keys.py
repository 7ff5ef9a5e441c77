"""Runtime keys at scale (issue 17): creation rate, propagation to a second replica, memory per key.

Starts its own redis-server on a free loopback port (or `--url`), then:
  1. bulk creation: `--keys` runtime keys written to the Redis key store (put_many: one Lua call per
     1,000 keys), keys/s; and the same into the SQLite store (embedded mode), keys/s;
  2. replica B (an Engine with its RuntimeKeys, subscribed to the store) starts and loads every key:
     the load time (wall and this process's CPU), the longest event-loop stall meanwhile, the peak RSS,
     and the memory it takes per key (RSS and Python heap, after `gc.collect`, before vs after the
     load, divided by the number of keys: the KeyRecords in the snapshot, both map entries, and the
     replica's entry per key); then a key-file reload on B beside the N keys, and two pages of the
     admin list (records read from the store);
  3. API-path creation: `--api-keys` keys created one at a time through replica A's RuntimeKeys.create
     (a secret, its HMAC, the store write, the local snapshot update), keys/s;
  4. propagation: `--changes` changes made on replica A (create, rotate, update, revoke, restore in
     turn), each timed from just before A's call until B's snapshot answers for it (B polled every
     0.2 ms on the same event loop, so B's apply work is inside the figure); p50 / p99 / max.
Both replicas run in this one process on one event loop (A only writes: it does not load the N keys);
B's snapshot of N keys is what a second sidecar holds. The default sizes run in well under a minute;
`--keys 1000000` gives the full figure (~2.5 GB of RAM with redis-server, 3-4 minutes). Run:
    .venv/bin/python benchmarks/bench_runtime_keys.py [--keys 20000] [--changes 200] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_redis import start_redis  # type: ignore[import-not-found]  # noqa: E402

from nexus_authz.core import keys as keys_mod  # noqa: E402
from nexus_authz.core import runtime_keys as rk  # noqa: E402
from nexus_authz.core.model import Reason, Request  # noqa: E402
from nexus_authz.core.runtime_keys import KeyChanges, KeySpec  # noqa: E402
from nexus_authz.engine import Engine  # noqa: E402
from nexus_authz.runtime_keys import RuntimeKeys  # noqa: E402
from nexus_authz.settings import load_settings  # noqa: E402
from nexus_authz.stores.keys.redis import RedisKeyStore  # noqa: E402
from nexus_authz.stores.keys.sqlite import SQLiteKeyStore  # noqa: E402
from nexus_authz.stores.redis import RedisSettings, make_client  # noqa: E402

PEPPER = "bench-pepper-0123456789abcdef"
CONFIG = f"""
listen:
  http_socket: null
  grpc: null
  admin: null
  api: null
keys:
  file: keys.yaml
  pepper:
    value: {PEPPER}
credentials:
  openai:
    value: sk-bench
default_credential: openai
ledger:
  backend: none
plans:
  standard:
    limits:
      - {{requests: 600, per: minute}}
      - {{tokens: 1000000, per: day}}
"""
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def request(secret: str) -> Request:
    return Request("POST", "/v1/chat/completions", {"authorization": f"Bearer {secret}"}, BODY)


def bulk_keys(n: int, pepper: bytes) -> list[rk.RuntimeKey]:
    now = time.time()
    hasher = keys_mod.KeyHasher(pepper)
    return [
        rk.RuntimeKey(
            key_id=f"bulk-{i:07d}",
            key_hash=hasher(f"nx-bulk-secret-{i:07d}"),
            tenant=f"tenant-{i % 100}",
            plan="standard",
            created_at=now,
            updated_at=now,
        )
        for i in range(n)
    ]


class Replica:
    def __init__(self, config: Path, url: str, prefix: str, *, subscribe: bool) -> None:
        self.engine = Engine.from_settings(load_settings(str(config)))
        self.client = make_client(RedisSettings(url=url, timeout=5.0))
        self.store = RedisKeyStore(self.client, key_prefix=prefix)
        self.runtime = RuntimeKeys(self.engine, self.store, poll_interval=5.0)
        if subscribe:
            self.store.on_change = self.runtime.notify
        self.engine.runtime = self.runtime

    async def close(self) -> None:
        await self.runtime.close()
        await self.client.aclose()


async def run(args: argparse.Namespace, url: str, workdir: Path) -> dict[str, Any]:
    config = workdir / "nexus.yaml"
    config.write_text(CONFIG)
    (workdir / "keys.yaml").write_text("keys: []\n")
    prefix = f"bench-rt-{os.getpid()}:"
    out: dict[str, Any] = {"keys": args.keys, "changes": args.changes}

    # 1. bulk creation into each store
    keys = bulk_keys(args.keys, PEPPER.encode())
    writer = make_client(RedisSettings(url=url, timeout=30.0))
    started = time.perf_counter()
    await RedisKeyStore(writer, key_prefix=prefix).put_many(keys)
    out["redis_bulk_create_per_s"] = args.keys / (time.perf_counter() - started)
    await writer.aclose()
    sqlite_store = SQLiteKeyStore(str(workdir / "runtime-keys.sqlite3"))
    started = time.perf_counter()
    await sqlite_store.put_many(keys)
    out["sqlite_bulk_create_per_s"] = args.keys / (time.perf_counter() - started)
    await sqlite_store.close()
    del keys

    # 2. replica B loads them all: time and memory per key
    b = Replica(config, url, prefix, subscribe=True)
    gc.collect()
    rss_before = rss_bytes()
    if args.heap:
        tracemalloc.start()
    peak = [rss_before]
    sampling = threading.Event()

    def sample() -> None:  # the peak RSS while B loads (the temporary lists, decoded records...)
        while not sampling.wait(0.02):
            peak[0] = max(peak[0], rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stall = [0.0]

    async def tick() -> None:  # the longest the event loop did not run other work during the load
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stall[0] = max(stall[0], now - last)
            last = now

    ticker = asyncio.get_running_loop().create_task(tick())
    started, cpu = time.perf_counter(), time.process_time()
    await b.runtime.start(first_load_timeout=3600)
    out["load_seconds"] = time.perf_counter() - started
    out["load_cpu_seconds"] = time.process_time() - cpu  # this process only (not redis-server)
    ticker.cancel()
    sampling.set()
    sampler.join()
    out["load_max_loop_stall_ms"] = stall[0] * 1000
    out["load_peak_rss_bytes_over_before"] = peak[0] - rss_before
    gc.collect()
    if args.heap:
        heap, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out["heap_bytes_per_key"] = heap / args.keys
    out["rss_bytes_per_key"] = (rss_bytes() - rss_before) / args.keys
    assert len(b.engine.snapshot) == args.keys, len(b.engine.snapshot)
    assert b.engine.check(request("nx-bulk-secret-0000007")).allowed
    # a key-file reload on B: the N runtime keys are merged into the new file snapshot
    file_snapshot = b.engine._read_keys()
    started = time.perf_counter()
    b.engine.snapshot = b.engine._in_force(file_snapshot)
    out["reload_merge_seconds"] = time.perf_counter() - started
    assert len(b.engine.snapshot) == args.keys and b.engine.check(request("nx-bulk-secret-0000007")).allowed
    # the admin API's list: the first page (sorts the ids once) and a next one
    started = time.perf_counter()
    first, _ = await b.runtime.page(size=1000)
    out["list_first_page_ms"] = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    await b.runtime.page(after=first[-1].key_id, size=1000)
    out["list_next_page_ms"] = (time.perf_counter() - started) * 1000
    await asyncio.wait_for(b.store.connected.wait(), 10)

    # 3. replica A: creations through the API path, one at a time
    a = Replica(config, url, prefix, subscribe=False)
    await a.store.start()
    a.runtime.loaded = True  # A only writes here: it does not hold the N keys
    started = time.perf_counter()
    for i in range(args.api_keys):
        await a.runtime.create(KeySpec(key_id=f"api-{i:06d}", plan="standard"))
    out["api_create_per_s"] = args.api_keys / (time.perf_counter() - started)

    # 4. propagation of each kind of change to B
    async def until_b(predicate: Any) -> None:
        deadline = time.perf_counter() + 5.0
        while not predicate():
            if time.perf_counter() > deadline:
                raise SystemExit("a change did not reach replica B within 5 s")
            await asyncio.sleep(0.0002)

    def reason(secret: str) -> Reason:
        return b.engine.check(request(secret)).reason

    seen: list[float] = []
    by_op: dict[str, list[float]] = {}
    secrets: dict[str, str] = {}
    await until_b(lambda: f"api-{args.api_keys - 1:06d}" in b.runtime.keys)  # A's creations are in
    for i in range(args.changes):
        op = ("create", "rotate", "update", "revoke", "restore")[i % 5]
        key_id = f"prop-{i // 5:05d}"
        started = time.perf_counter()
        if op == "create":
            _, secrets[key_id] = await a.runtime.create(KeySpec(key_id=key_id, plan="standard"))
            await until_b(lambda k=key_id: reason(secrets[k]) is Reason.OK)
        elif op == "rotate":
            _, secrets[key_id] = await a.runtime.rotate(key_id, grace=60)
            await until_b(lambda k=key_id: reason(secrets[k]) is Reason.OK)
        elif op == "update":
            await a.runtime.update(key_id, KeyChanges(models=("claude-*",)))
            await until_b(lambda k=key_id: reason(secrets[k]) is Reason.MODEL_NOT_ALLOWED)
        elif op == "revoke":
            await a.runtime.revoke(key_id)
            await until_b(lambda k=key_id: reason(secrets[k]) is Reason.DISABLED_KEY)
        else:
            await a.runtime.restore(key_id)
            await until_b(lambda k=key_id: reason(secrets[k]) is not Reason.DISABLED_KEY)
        elapsed = time.perf_counter() - started
        seen.append(elapsed)
        by_op.setdefault(op, []).append(elapsed)
    out["propagation_ms"] = {
        "p50": statistics.median(seen) * 1000,
        "p99": pct(seen, 0.99) * 1000,
        "max": max(seen) * 1000,
    }
    out["propagation_ms_by_op"] = {op: statistics.median(v) * 1000 for op, v in by_op.items()}
    await a.close()
    await b.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keys", type=int, default=20_000, help="runtime keys in the store (default 20000)")
    parser.add_argument("--api-keys", type=int, default=500, help="keys created one at a time on replica A")
    parser.add_argument("--changes", type=int, default=200, help="changes timed to replica B (default 200)")
    parser.add_argument("--url", help="an existing Redis (default: start a redis-server)")
    parser.add_argument("--heap", action="store_true", help="also count the Python heap (tracemalloc; slow)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="nx-bench-rt-"))
    proc = None
    try:
        url = args.url
        if url is None:
            proc, url = start_redis(str(workdir))
        out = asyncio.run(run(args, url, workdir))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    p = out["propagation_ms"]
    print(f"runtime keys: {args.keys} in the store, {args.changes} changes timed (one process, one loop)")
    print(f"  bulk creation, Redis store:   {out['redis_bulk_create_per_s']:>10,.0f} keys/s")
    print(f"  bulk creation, SQLite store:  {out['sqlite_bulk_create_per_s']:>10,.0f} keys/s")
    print(f"  API-path creation (one by one, Redis): {out['api_create_per_s']:,.0f} keys/s")
    cpu = out["load_cpu_seconds"]
    print(f"  replica B loads every key:    {out['load_seconds']:.2f} s ({cpu:.2f} s CPU)")
    print(f"  memory per key on replica B:  {out['rss_bytes_per_key']:,.0f} B (RSS)", end="")
    print(f", {out['heap_bytes_per_key']:,.0f} B (Python heap)" if "heap_bytes_per_key" in out else "")
    peak = out["load_peak_rss_bytes_over_before"] / 1e6
    print(f"  peak RSS during the load:     {peak:,.0f} MB over before")
    print(f"  longest event-loop stall during the load: {out['load_max_loop_stall_ms']:.0f} ms")
    print(f"  key-file reload merging every runtime key: {out['reload_merge_seconds'] * 1000:,.0f} ms")
    print(
        f"  admin list, 1,000 keys from the store: first page {out['list_first_page_ms']:.0f} ms, "
        f"next {out['list_next_page_ms']:.0f} ms"
    )
    print(
        f"  propagation A -> B:           p50 {p['p50']:.1f} ms, p99 {p['p99']:.1f} ms, max {p['max']:.1f} ms"
    )
    by_op = ", ".join(f"{op} {ms:.1f}" for op, ms in out["propagation_ms_by_op"].items())
    print(f"  median by change (ms):        {by_op}")


if __name__ == "__main__":
    main()
