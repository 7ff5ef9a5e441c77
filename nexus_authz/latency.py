"""Fixed-bucket latency histograms counted in a plain list, cheap enough for every Check.

A prometheus_client Histogram takes a lock and walks its buckets on every observation; here an
observation is one bisect over a tuple of bounds (C code) and two in-place adds, with no allocation and no
label lookup. The metrics collector turns the counts into a histogram family when Prometheus scrapes.
Not thread-safe by design: the server observes from its one event loop thread, and a scrape that runs
between two adds sees a count and a sum one observation apart, which Prometheus tolerates.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from time import perf_counter

__all__ = ["BUSY_BUCKETS", "CHECK_BUCKETS", "LOOP_BUSY", "LatencyHistogram", "LoopBusy"]

# Seconds. A local decision takes a few µs; the upper buckets catch a stalled loop or a remote store.
CHECK_BUCKETS: tuple[float, ...] = (
    0.000005,
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
)


class LatencyHistogram:
    """Counts per bucket (`counts[i]`: observations <= bounds[i], above bounds[i-1]; the last: above all)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = CHECK_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("bucket bounds must be distinct and increasing")
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus' `le`).
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> tuple[list[tuple[str, int]], float, int]:
        """(`le` buckets with cumulative counts, ending with "+Inf"), sum, count: the exposition form."""
        counts = list(self.counts)  # one copy, so the buckets agree with each other
        total = 0
        buckets: list[tuple[str, int]] = []
        for bound, n in zip((*map(_le, self.bounds), "+Inf"), counts, strict=True):
            total += n
            buckets.append((bound, total))
        return buckets, self.sum, total


# Seconds one callback holds the event loop: the performance target is 200 µs, the top buckets catch a
# stall.
BUSY_BUCKETS: tuple[float, ...] = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.05,
    0.1,
    1.0,
)


class LoopBusy:
    """How long the event loop was held, per source, one observation per callback: each read of the
    HTTP listeners (ext_authz: framing, decision and answer; the admin one), each slice of an
    access-log batch between two yields, each pass of the cyclic garbage collector (`gc_callback`,
    installed by the server).
    Exported as `nexus_authz_loop_busy_seconds{source}`; benchmarks/run_all.py judges its maximum."""

    __slots__ = ("_gc_started", "access_log", "gc", "http")

    def __init__(self) -> None:
        self.http = LatencyHistogram(BUSY_BUCKETS)
        self.access_log = LatencyHistogram(BUSY_BUCKETS)
        self.gc = LatencyHistogram(BUSY_BUCKETS)
        self._gc_started = 0.0

    def sources(self) -> tuple[tuple[str, LatencyHistogram], ...]:
        return (("http", self.http), ("access_log", self.access_log), ("gc", self.gc))

    def gc_callback(self, phase: str, info: dict[str, int]) -> None:
        """For `gc.callbacks`: times each collection (start to stop)."""
        if phase == "start":
            self._gc_started = perf_counter()
        elif self._gc_started:
            self.gc.observe(perf_counter() - self._gc_started)
            self._gc_started = 0.0


LOOP_BUSY = LoopBusy()  # the process's one event loop (the server runs one)


def _le(bound: float) -> str:
    return repr(float(bound))
