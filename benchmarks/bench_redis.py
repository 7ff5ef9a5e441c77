"""Redis counter store: check latency, Redis calls per decision, throughput of one process vs two.

Starts its own redis-server on a free loopback port (Debian's package; `--url` to use another) and runs,
for each mode (exact, batched):
  * serial: one check at a time (the latency a lone request sees), median and p99;
  * closed loop: `--concurrency` checks in flight for `--seconds`: decisions/s, median/p99 of a check,
    round trips (pipelines) and script calls per decision, Redis server CPU per decision;
  * processes: the closed loop in 1 process, then in 2 processes at once (two sidecars sharing Redis).
Each check is a typical key: requests/minute + tokens/minute (GCRA) + tokens/day (sliding window), on
`--keys` distinct API keys, with limits high enough that everything is admitted (the cost measured is
the store's, not a denial's). Run: .venv/bin/python benchmarks/bench_redis.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nexus_authz.core.limits import AcquireResult, make_limit  # noqa: E402
from nexus_authz.stores.redis import RedisSettings, make_client, open_redis_store  # noqa: E402

SPECS = (
    make_limit("requests", 10**9, "minute"),
    make_limit("tokens", 10**12, "minute"),
    make_limit("tokens", 10**12, "day"),
)


def ids(key: int) -> tuple[str, ...]:
    return tuple(f"key{key}\x00{s.name}" for s in SPECS)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def redis_usec(url: str) -> float:
    client = make_client(RedisSettings(url=url))
    stats = await client.info("commandstats")
    await client.aclose()
    return float(stats.get("cmdstat_evalsha", {}).get("usec", 0))


async def check(store: Any, key: int) -> float:
    """One check; its latency in seconds. Batched answers synchronously when it can."""
    started = time.perf_counter()
    result = store.acquire_nowait(ids(key), SPECS, (1, 500, 500), time.time())
    if result is None:
        result = await store.acquire(ids(key), SPECS, (1, 500, 500), time.time())
    assert isinstance(result, AcquireResult) and result.allowed, result
    return time.perf_counter() - started


async def serial(url: str, mode: str, n: int, keys: int) -> dict[str, float]:
    store = open_redis_store(RedisSettings(url=url, mode=mode, key_prefix=f"bench:{mode}:s:", timeout=1.0))
    await store.start()
    for k in range(keys):  # warm: every key pulled once (batched), the script loaded
        await check(store, k)
    lat = [await check(store, i % keys) for i in range(n)]
    await store.close()
    return {"p50_us": pct(lat, 0.5) * 1e6, "p99_us": pct(lat, 0.99) * 1e6}


async def closed_loop(
    url: str, mode: str, seconds: float, concurrency: int, keys: int, tag: str
) -> dict[str, Any]:
    store = open_redis_store(
        RedisSettings(url=url, mode=mode, key_prefix=f"bench:{mode}:{tag}:", timeout=1.0)
    )
    await store.start()
    for k in range(keys):
        await check(store, k)
    h0 = store.health()
    usec0 = await redis_usec(url)
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        i = w
        while time.perf_counter() < stop:
            lat.append(await check(store, i % keys))
            i += concurrency
            if mode == "batched":
                await asyncio.sleep(0)  # a synchronous answer never yields: let the flush run

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - started
    h1 = store.health()
    usec1 = await redis_usec(url)
    await store.close()
    n = len(lat)
    return {
        "decisions_per_s": n / elapsed,
        "p50_us": pct(lat, 0.5) * 1e6,
        "p99_us": pct(lat, 0.99) * 1e6,
        "round_trips_per_decision": (h1.pipelines - h0.pipelines) / n,
        "script_calls_per_decision": (h1.calls - h0.calls) / n,
        "redis_cpu_us_per_decision": (usec1 - usec0) / n,
        "decisions": n,
    }


def _process(url: str, mode: str, seconds: float, concurrency: int, keys: int, tag: str, out: Any) -> None:
    out.put(asyncio.run(closed_loop(url, mode, seconds, concurrency, keys, tag)))


def processes(
    url: str, mode: str, count: int, seconds: float, concurrency: int, keys: int
) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_process, args=(url, mode, seconds, concurrency, keys, f"p{count}-{i}", out))
        for i in range(count)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    return results


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found (apt-get install redis-server), or pass --url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            directory,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="use this Redis instead of starting one")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--hot-keys", type=int, default=10, help="keys of the hot-key closed loop")
    parser.add_argument("--serial", type=int, default=3000)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = (None, args.url) if args.url else start_redis(tmp)
        try:
            figures: dict[str, Any] = {"cpus": os.cpu_count()}
            for mode in ("exact", "batched"):
                figures[mode] = {
                    "serial": asyncio.run(serial(url, mode, args.serial, min(args.keys, 200))),
                    "loop": asyncio.run(
                        closed_loop(url, mode, args.seconds, args.concurrency, args.keys, "loop")
                    ),
                    "hot": asyncio.run(
                        closed_loop(url, mode, args.seconds, args.concurrency, args.hot_keys, "hot")
                    ),
                    "one_process": processes(url, mode, 1, args.seconds, args.concurrency, args.keys),
                    "two_processes": processes(url, mode, 2, args.seconds, args.concurrency, args.keys),
                }
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
    print(
        f"Redis counter store ({figures['cpus']} CPUs, redis-server on the same machine; 3 windows per check)"
    )
    print(f"serial: one check at a time over {min(args.keys, 200)} keys")
    for mode in ("exact", "batched"):
        s = figures[mode]["serial"]
        print(f"  {mode:8} p50 {s['p50_us']:6.0f} us   p99 {s['p99_us']:6.0f} us")
    for name, keys in (("loop", args.keys), ("hot", args.hot_keys)):
        print(f"closed loop: {args.concurrency} checks in flight over {keys} keys, {args.seconds:.0f} s")
        print(
            f"  {'mode':8} {'checks/s':>9} {'p50':>9} {'p99':>9} {'trips/check':>12} "
            f"{'calls/check':>12} {'redis us/check':>15}"
        )
        for mode in ("exact", "batched"):
            lp = figures[mode][name]
            print(
                f"  {mode:8} {lp['decisions_per_s']:9.0f} {lp['p50_us']:7.0f}us {lp['p99_us']:7.0f}us "
                f"{lp['round_trips_per_decision']:12.4f} {lp['script_calls_per_decision']:12.4f} "
                f"{lp['redis_cpu_us_per_decision']:15.1f}"
            )
    print("\nthroughput, closed loop of", args.concurrency, "checks per process:")
    for mode in ("exact", "batched"):
        one = sum(r["decisions_per_s"] for r in figures[mode]["one_process"])
        two = [r["decisions_per_s"] for r in figures[mode]["two_processes"]]
        print(
            f"  {mode:8} 1 process {one:8.0f}/s   2 processes {sum(two):8.0f}/s "
            f"({' + '.join(f'{x:.0f}' for x in two)})"
        )
    if args.json:
        print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
