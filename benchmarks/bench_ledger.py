"""Usage ledger: the hot-path cost of record(), flush throughput to SQLite, and what a flush costs the loop.

Run: .venv/bin/python benchmarks/bench_ledger.py [--rounds 3] [--seconds 2]
Prints:
- record() ns per call (median and p99 over batches of 1,000, records pre-built): one hot row (the
  steady state: many requests per key and minute), 1,000 keys round-robin, a new row on every call,
  and MemoryLedger for comparison; plus what building a UsageRecord costs the caller;
- flush throughput in rows/s for 10k and 100k distinct rows, into a fresh file (inserts) and again into
  the same minute (upserts that add), median of --rounds; wall time of flush_now() including the
  hand-over to the writer thread, and the writer's own time;
- event-loop stalls while the writer thread flushes 100k rows (the GIL is shared): lateness of a 1 ms
  ticker during the flush vs. idle.
Everything runs in this process on a temporary directory; a default run takes well under 60 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nexus_authz.stores.ledger import MemoryLedger, SQLiteLedger, UsageRecord  # noqa: E402

BATCH = 1000
T0 = 1_700_000_040.0


def measure_ns(make_batch: Callable[[], Callable[[], None]], seconds: float) -> tuple[float, float, int]:
    """Median and p99 ns per call, from batches of BATCH calls. make_batch returns a function that
    makes BATCH calls (so per-batch setup stays out of the timing)."""
    per_call: list[float] = []
    deadline = time.perf_counter() + seconds
    make_batch()()  # warm up
    while time.perf_counter() < deadline:
        run = make_batch()
        t0 = time.perf_counter_ns()
        run()
        per_call.append((time.perf_counter_ns() - t0) / BATCH)
    per_call.sort()
    return statistics.median(per_call), per_call[int(len(per_call) * 0.99)], len(per_call) * BATCH


def bench_record(directory: Path, seconds: float) -> None:
    print("## record() on the hot path (owner thread, no I/O)")
    hot = [UsageRecord("k1", "acme", "gpt-4o", T0 + i % 60, 1, 812, 256, 143, 0, 4215) for i in range(BATCH)]
    keyed = [
        UsageRecord(f"key-{i}", "acme", "gpt-4o", T0 + 1.5, 1, 812, 256, 143, 0, 4215) for i in range(BATCH)
    ]
    counter = [0]

    def fresh_batch() -> list[UsageRecord]:
        base = counter[0]
        counter[0] += 1
        return [
            UsageRecord(f"k{base}-{i}", "acme", "gpt-4o", T0, 1, 812, 256, 143, 0, 4215) for i in range(BATCH)
        ]

    # no start(): nothing flushes while measuring; batch/pending bounds far away
    sqlite_ledger = SQLiteLedger(directory / "hot.db", batch_size=10**9, max_pending=10**9)
    memory = MemoryLedger(max_rows=10**9)

    def loop_over(ledger: SQLiteLedger | MemoryLedger, records: list[UsageRecord]) -> Callable[[], None]:
        record = ledger.record

        def run() -> None:
            for r in records:
                record(r)

        return run

    def new_rows() -> Callable[[], None]:
        if len(sqlite_ledger._pending) > 200_000:  # keep the dict a realistic size (a flush resets it)
            sqlite_ledger._pending = {}
        return loop_over(sqlite_ledger, fresh_batch())

    def construct() -> Callable[[], None]:
        def run() -> None:
            for i in range(BATCH):
                UsageRecord("k1", "acme", "gpt-4o", T0, 1, i, 256, 143, 0, 4215)

        return run

    scenarios: list[tuple[str, Callable[[], Callable[[], None]]]] = [
        ("SQLiteLedger.record, one hot row", lambda: loop_over(sqlite_ledger, hot)),
        ("SQLiteLedger.record, 1,000 keys round-robin", lambda: loop_over(sqlite_ledger, keyed)),
        ("SQLiteLedger.record, a new row every call", new_rows),
        ("MemoryLedger.record, one hot row", lambda: loop_over(memory, hot)),
        ("UsageRecord(...) construction (caller)", construct),
    ]
    for name, make in scenarios:
        med, p99, n = measure_ns(make, seconds)
        print(f"{name:46s} median {med:7.0f} ns  p99 {p99:7.0f} ns  ({n:,} calls)")
    sqlite_ledger._pending = {}  # millions of synthetic rows: not worth writing
    asyncio.run(sqlite_ledger.close())


def _fill(ledger: SQLiteLedger, n: int, ts: float) -> None:
    for i in range(n):
        ledger.record(
            UsageRecord(
                f"key-{i % 5000}", f"tenant-{i % 50}", f"model-{i // 5000}", ts, 1, 812, 256, 143, 17, 4215
            )
        )


def bench_flush(directory: Path, rounds: int) -> None:
    print()
    print("## flush throughput to SQLite (WAL, synchronous=NORMAL, one transaction per flush)")
    for n in (10_000, 100_000):
        results: dict[str, list[tuple[float, float]]] = {"insert": [], "upsert": []}
        size = 0
        for r in range(rounds):
            path = directory / f"flush-{n}-{r}.db"
            ledger = SQLiteLedger(path, batch_size=10**9, max_pending=10**9)
            for phase in ("insert", "upsert"):
                _fill(ledger, n, T0)
                t0 = time.perf_counter()
                assert ledger.flush_now()
                wall = time.perf_counter() - t0
                results[phase].append((wall, ledger.stats().last_flush_duration))
            asyncio.run(ledger.close())
            size = path.stat().st_size
            path.unlink()
        for phase, samples in results.items():
            wall = statistics.median(s[0] for s in samples)
            writer = statistics.median(s[1] for s in samples)
            print(
                f"{n:>7,} rows {phase:6s}: {n / wall:>9,.0f} rows/s  (flush_now {wall * 1000:7.1f} ms, "
                f"writer {writer * 1000:7.1f} ms, median of {rounds})"
            )
        print(f"{'':>7}   file size after two flushes: {size / 1e6:.1f} MB ({size / n:.0f} bytes/row)")


async def _ticker_lateness(stop: Callable[[], bool]) -> list[float]:
    lateness: list[float] = []
    while not stop():
        t0 = time.perf_counter()
        await asyncio.sleep(0.001)
        lateness.append((time.perf_counter() - t0 - 0.001) * 1000)
    return lateness


def bench_loop_stall(directory: Path) -> None:
    print()
    print("## event loop during a 100k-row flush on the writer thread (1 ms ticker lateness, ms)")
    n = 100_000

    async def run() -> tuple[list[float], list[float], float]:
        deadline = time.perf_counter() + 0.5
        idle = await _ticker_lateness(lambda: time.perf_counter() > deadline)
        ledger = SQLiteLedger(directory / "stall.db", batch_size=n, max_pending=10**9, flush_interval=3600)
        await ledger.start()
        for i in range(n - 1):
            ledger.record(UsageRecord(f"key-{i}", "acme", "gpt-4o", T0, 1, 812, 256, 143, 0, 4215))
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        ledger.record(UsageRecord("last", "acme", "gpt-4o", T0))  # the size trigger
        busy = await _ticker_lateness(lambda: ledger.stats().flushes >= 1)
        took = time.perf_counter() - t0
        await ledger.close()
        return idle, busy, took

    idle, busy, took = asyncio.run(run())
    for name, values in (("idle", idle), ("flushing", busy)):
        values.sort()
        print(
            f"{name:9s} ticks {len(values):5d}  median {statistics.median(values):6.3f}  "
            f"p99 {values[int(len(values) * 0.99)]:6.3f}  max {values[-1]:6.3f}"
        )
    print(
        f"flush of {n:,} rows took {took * 1000:.0f} ms wall; "
        f"GIL switch interval {sys.getswitchinterval() * 1000:.0f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="flush rounds per size (median)")
    parser.add_argument("--seconds", type=float, default=1.5, help="per record() scenario")
    args = parser.parse_args()
    print(f"# bench_ledger: python {sys.version.split()[0]}, pid {os.getpid()}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        bench_record(directory, args.seconds)
        bench_flush(directory, args.rounds)
        bench_loop_stall(directory)
    print(f"# done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
