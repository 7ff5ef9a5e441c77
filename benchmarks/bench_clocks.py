"""What a clock read costs from Python: the wall clock every loop callback reads, and the thread CPU clock
the benchmark's per-callback probe reads (`metrics.loop_cpu_time`, two reads per callback).

    .venv/bin/python benchmarks/bench_clocks.py [--calls 200000]

`time.perf_counter` and `time.monotonic` are served by the vDSO (no system call); `time.thread_time`
(CLOCK_THREAD_CPUTIME_ID) is a system call, whose price depends on the machine (a VM's is higher). Each
figure is the best of 5 timed loops, ns per call including Python's call overhead.
"""

from __future__ import annotations

import argparse
import sys
import time
import timeit

CLOCKS = (time.perf_counter, time.monotonic, time.thread_time)


def cost_ns(clock: object, calls: int) -> float:
    """ns per call of `clock()`: the best of 5 loops of `calls` calls."""
    return min(timeit.repeat(clock, number=calls, repeat=5)) / calls * 1e9  # type: ignore[arg-type]


def calls_arg(argv: list[str] | None, doc: str | None) -> int:
    """The command line of a timing script (this one, bench_hmac.py): `--calls` per timed loop."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n", 1)[0])
    ap.add_argument("--calls", type=int, default=200_000, help="calls per timed loop")
    args = ap.parse_args(argv)
    if args.calls <= 0:
        ap.error("--calls must be positive")
    return int(args.calls)


def main(argv: list[str] | None = None) -> int:
    calls = calls_arg(argv, __doc__)
    for clock in CLOCKS:
        print(f"time.{clock.__name__}: {cost_ns(clock, calls):,.1f} ns per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
