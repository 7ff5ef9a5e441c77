"""The core limit check: ns per acquire (one key; 100,000 keys round-robin) and bytes per active client
with 100,000 active keys (tracemalloc and RSS delta), one figure per line.

    .venv/bin/python benchmarks/bench_limits.py [--quick]

Plans measured (counter ids are f"{key_id}\\x00{limit name}", as the caller would build them):
  1w  requests/minute                                   (1 GCRA window)
  2w  requests/minute + tokens/minute                   (2 GCRA windows)
  3w  requests/minute + tokens/minute + tokens/day      (2 GCRA + 1 sliding window of 24 hourly slots)
  denied  one requests/hour window that refuses every timed request (the 429 path)
The machine may be shared: each figure is the best and the median of 5 runs.
Memory runs each in a fresh subprocess so RSS deltas do not reuse each other's freed pages. "store only"
excludes the id strings (a caller that keeps them in its key snapshot pays them anyway); "with ids" counts
them as the store's.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nexus_authz.core.limits import LimitSpec, make_limit  # noqa: E402
from nexus_authz.core.ratelimit_headers import rate_limit_headers  # noqa: E402
from nexus_authz.stores.memory import MemoryCounterStore  # noqa: E402

NOW = 1_700_000_000.0
KEYS = 100_000
# limits high enough that every timed request is admitted (the common path); see "denied" for the other
PLANS: dict[str, tuple[tuple[LimitSpec, ...], tuple[int, ...]]] = {
    "1w": ((make_limit("requests", 1_000_000, "minute"),), (1,)),
    "2w": (
        (make_limit("requests", 1_000_000, "minute"), make_limit("tokens", 10**9, "minute")),
        (1, 500),
    ),
    "3w": (
        (
            make_limit("requests", 1_000_000, "minute"),
            make_limit("tokens", 10**9, "minute"),
            make_limit("tokens", 10**12, "day"),
        ),
        (1, 500, 500),
    ),
    "denied": ((make_limit("requests", 1, "hour"),), (1,)),
}
REPEATS = 5


def ids_for(key: str, specs: tuple[LimitSpec, ...]) -> tuple[str, ...]:
    return tuple(f"{key}\x00{s.name}" for s in specs)


def bench_acquire(plan: str, keys: int, ops: int) -> tuple[float, float, float]:
    """-> (best, median ns per acquire over REPEATS runs, fraction allowed). 1 ms of fake time per call."""
    specs, costs = PLANS[plan]
    key_ids = [ids_for(f"key-{k:06d}", specs) for k in range(keys)]
    store = MemoryCounterStore()
    acquire = store.acquire
    now = NOW
    for ids in key_ids:  # warm: every key active
        acquire(ids, specs, costs, now)
    allowed = 0
    n = len(key_ids)
    per_run = ops // REPEATS
    runs: list[float] = []
    i = 0
    gc.disable()
    for _ in range(REPEATS):
        start = time.perf_counter_ns()
        for _ in range(per_run):
            now += 0.001
            if acquire(key_ids[i % n], specs, costs, now).allowed:
                allowed += 1
            i += 1
        runs.append((time.perf_counter_ns() - start) / per_run)
    gc.enable()
    runs.sort()
    return runs[0], runs[len(runs) // 2], allowed / (per_run * REPEATS)


def bench_headers(ops: int) -> float:
    specs, costs = PLANS["3w"]
    store = MemoryCounterStore()
    statuses = store.acquire(ids_for("k", specs), specs, costs, NOW).statuses
    start = time.perf_counter_ns()
    for _ in range(ops):
        rate_limit_headers(statuses, denied=False)
    return (time.perf_counter_ns() - start) / ops


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(plan: str) -> str:
    specs, costs = PLANS[plan]
    key_names = [f"key-{k:06d}" for k in range(KEYS)]
    gc.collect()
    tracemalloc.start()
    base_ids = tracemalloc.get_traced_memory()[0]
    key_ids = [ids_for(name, specs) for name in key_names]
    # the tuples holding the ids are the benchmark's, not the store's: count the strings only
    id_bytes = tracemalloc.get_traced_memory()[0] - base_ids - sum(sys.getsizeof(t) for t in key_ids)
    id_bytes -= sys.getsizeof(key_ids)
    gc.collect()
    rss0 = rss_bytes()
    before = tracemalloc.get_traced_memory()[0]
    store = MemoryCounterStore()
    for ids in key_ids:
        store.acquire(ids, specs, costs, NOW)
    gc.collect()
    store_bytes = tracemalloc.get_traced_memory()[0] - before
    rss1 = rss_bytes()
    tracemalloc.stop()
    assert len(store) == KEYS * len(specs)
    return (
        f"bytes per active client, {KEYS} keys, plan {plan} ({len(specs)} windows): "
        f"{store_bytes / KEYS:.0f} B store only, {(store_bytes + id_bytes) / KEYS:.0f} B with ids "
        f"(tracemalloc); RSS delta {(rss1 - rss0) / KEYS:.0f} B (store only, under tracemalloc)"
    )


def measure_rss_only(plan: str) -> str:
    """RSS without tracemalloc's own bookkeeping: the number an operator sees."""
    specs, costs = PLANS[plan]
    key_ids = [ids_for(f"key-{k:06d}", specs) for k in range(KEYS)]
    gc.collect()
    rss0 = rss_bytes()
    store = MemoryCounterStore()
    for ids in key_ids:
        store.acquire(ids, specs, costs, NOW)
    gc.collect()
    rss1 = rss_bytes()
    per_client = (rss1 - rss0) / KEYS
    return f"RSS per active client, {KEYS} keys, plan {plan}: {per_client:.0f} B (store only, no tracemalloc)"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--memory":
        print(measure_memory(sys.argv[2]))
        print(measure_rss_only_in_child(sys.argv[2]))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--rss":
        print(measure_rss_only(sys.argv[2]))
        return
    quick = "--quick" in sys.argv
    ops = 50_000 if quick else 200_000
    print(
        f"python {sys.version.split()[0]}, {ops} acquires per figure in {REPEATS} runs (best / median), "
        "1 ms of fake time per call"
    )
    for plan in PLANS:
        for keys in (1, KEYS) if plan != "denied" else (1,):
            best, median, allowed = bench_acquire(plan, keys, ops)
            label = "1 key" if keys == 1 else f"{keys} keys round-robin"
            print(f"acquire, plan {plan}, {label}: {best:.0f} / {median:.0f} ns/op ({allowed:.0%} allowed)")
    print(f"rate_limit_headers, plan 3w: {bench_headers(ops // 5):.0f} ns/op")
    for plan in ("1w", "2w", "3w"):
        out = subprocess.run(
            [sys.executable, __file__, "--memory", plan],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        print(out.stdout.strip())


def measure_rss_only_in_child(plan: str) -> str:
    out = subprocess.run(
        [sys.executable, __file__, "--rss", plan], capture_output=True, text=True, check=True, timeout=120
    )
    return out.stdout.strip()


if __name__ == "__main__":
    main()
