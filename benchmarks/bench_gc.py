"""The cyclic garbage collector against the per-client state: tracked objects per active client, µs per
collection by generation, and the longest collection during a steady request stream (target 6: no
callback holds the event loop longer than 200 µs; a collection runs inside whichever callback triggers it).

In-process, no sockets: bench_alloc's fast path (the real HTTP ext_authz protocol, its config: limits and
token accounting on) with K keys. The key snapshot is frozen by the load (`gc.freeze()`); then one
request from every key (what each client's first request leaves: plans, known (address, key) pairs,
counter ids, window states ...), counted as the objects the collector tracks (`gc.get_objects()`, the
frozen ones excluded). Then N requests round-robin over the K keys with every collection timed (a
`gc.callbacks` hook, as the server's LOOP_BUSY.gc_callback), with the server's collector task's look
(`Engine.collector_upkeep`, see docs/operations.md) every `--look` requests (250: its SETTLE_EVERY of
0.25 s at 1,000 requests/s) and its maintenance tick (`Engine.maintain`) every `--tick` requests.

    .venv/bin/python benchmarks/bench_gc.py [--keys 10000 100000] [--requests 200000] [--tick 5000]
    [--look 250] [--no-tick: the collector as before the upkeep, for comparison]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import bench_alloc  # noqa: E402

PLACEHOLDER = "x" * 36
PLACEHOLDER_B = PLACEHOLDER.encode()


def tracked() -> int:
    """Objects in the collector's generations (frozen ones are not returned)."""
    return len(gc.get_objects())


def time_collections(repeat: int = 5) -> dict[int, float]:
    """µs per explicit collection of each generation (median of `repeat`)."""
    out = {}
    for generation in (0, 1, 2):
        samples = []
        for _ in range(repeat):
            started = time.perf_counter()
            gc.collect(generation)
            samples.append(time.perf_counter() - started)
        samples.sort()
        out[generation] = samples[len(samples) // 2] * 1e6
    return out


def run(keys: int, requests: int, tick: int | None, window: int = 64, look: int | None = None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-gc-"))
    try:
        # a fresh process's stream: every client's first request among it (the per-client state is made
        # during the stream), every collection the interpreter triggers by itself timed
        fresh = bench_alloc.build_fastpath(tmp / "fresh", keys)
        raws = [bench_alloc.ext_authz_request(s, PLACEHOLDER) for s in fresh.secrets]
        del fresh.secrets[:]
        engine, receive = fresh.engine, fresh.proto.data_received
        gc.collect()
        gc.freeze()
        pauses: list[tuple[int, float]] = []
        started = [0.0]

        def hook(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                started[0] = time.thread_time()
            else:
                pauses.append((info["generation"], time.thread_time() - started[0]))
                at.append(count[0])

        usage = bench_alloc.USAGE
        at: list[int] = []
        count = [0]
        gc.callbacks.append(hook)
        t0 = time.perf_counter()
        try:
            for i in range(requests):
                count[0] = i
                rid = f"{i:036d}"
                receive(raws[i % keys].replace(PLACEHOLDER_B, rid.encode()))
                if i >= window:
                    engine.account(f"{i - window:036d}", usage)
                if tick is not None and look and i % look == look - 1:
                    engine._settle_at = 0.0  # SETTLE_EVERY has passed: the collector task looks
                    engine.collector_upkeep()
                if tick is not None and i % tick == tick - 1:
                    engine._settle_at = 0.0  # a second has passed: the next maintain looks
                    engine.maintain()
        finally:
            gc.callbacks.remove(hook)
        elapsed = time.perf_counter() - t0
        if not fresh.sink.last.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"refused: {fresh.sink.last[:200]!r}")
        by_gen = {g: [p for gg, p in pauses if gg == g] for g in (0, 1, 2)}
        worst = {g: max(by_gen[g], default=0.0) * 1e6 for g in (0, 1, 2)}
        over = sum(1 for _, p in pauses if p > 200e-6)
        later = [p for (_, p), i in zip(pauses, at, strict=True) if i >= keys]
        mode = f"a tick every {tick:,} requests, a look every {look or 0:,}" if tick else "no tick"
        print(
            f"{keys:>7,} keys, {requests:,} requests round-robin, {mode} ({requests / elapsed:,.0f}/s): "
            f"collections gen0/1/2 {len(by_gen[0])} / {len(by_gen[1])} / {len(by_gen[2])}, longest "
            f"{worst[0]:,.0f} / {worst[1]:,.0f} / {worst[2]:,.0f} µs of CPU, {over} over 200 µs"
        )
        print(
            f"  after the first round (every client known): {len(later)} collections, longest "
            f"{max(later, default=0.0) * 1e6:,.0f} µs; at the end {tracked():,} objects in the "
            f"generations, {gc.get_freeze_count():,} frozen"
        )
        del fresh, raws
        gc.collect()
        fp = bench_alloc.build_fastpath(tmp, keys)
        engine = fp.engine
        # each key's request with a placeholder x-request-id (each request gets its own, settled `window`
        # requests later with the response's usage, as the access log does)
        plain = [bench_alloc.ext_authz_request(s, None) for s in fp.secrets]
        del fp.secrets[:]
        receive = fp.proto.data_received
        for _ in range(200):  # first-use allocations that are not per client
            receive(plain[0])
        gc.collect()
        gc.freeze()  # as after a load: only what the requests add is left in the generations
        before = tracked()
        for raw in plain:
            receive(raw)
        if not fp.sink.last.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"refused: {fp.sink.last[:200]!r}")
        gc.collect()
        per_client = (tracked() - before) / keys
        print(
            f"{keys:>7,} keys: {per_client:.1f} tracked objects per active client (one request each, "
            f"no request id); µs per collection gen0/1/2 with them: "
            + " / ".join(f"{us:,.0f}" for us in time_collections().values())
        )
        engine._settle_at = 0.0
        engine.maintain()  # the upkeep tick
        print(
            f"  after the upkeep tick: {tracked():,} objects in the generations; µs per collection "
            "gen0/1/2: " + " / ".join(f"{us:,.0f}" for us in time_collections().values())
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[10_000])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--tick", type=int, default=5_000, help="requests between two maintenance ticks")
    parser.add_argument("--look", type=int, default=250, help="requests between two collector looks")
    parser.add_argument("--no-tick", action="store_true")
    parser.add_argument("--thresholds", type=int, nargs=3, help="gc.set_threshold for the run")
    args = parser.parse_args()
    if args.thresholds:
        gc.set_threshold(*args.thresholds)
    for keys in args.keys:
        run(keys, args.requests, None if args.no_tick else args.tick, look=args.look)
        gc.unfreeze()
        gc.collect()


if __name__ == "__main__":
    main()
