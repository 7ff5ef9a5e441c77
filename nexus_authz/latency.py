"""Fixed-bucket latency histograms counted in a plain list, cheap enough for every Check.

A prometheus_client Histogram takes a lock and walks its buckets on every observation; here an
observation is one bisect over a tuple of bounds (C code) and two in-place adds, with no allocation and no
label lookup. The metrics collector turns the counts into a histogram family when Prometheus scrapes.
Not thread-safe by design: the server observes from its one event loop thread, and a scrape that runs
between two adds sees a count and a sum one observation apart, which Prometheus tolerates.
"""

from __future__ import annotations

import asyncio
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from time import perf_counter, thread_time

from nexus_authz.core.model import Reason

__all__ = [
    "BUSY_BUCKETS",
    "CHECK_BUCKETS",
    "LOOP_BUSY",
    "SLICE",
    "SOURCES",
    "LatencyHistogram",
    "LoopBusy",
    "ReasonCounts",
    "sliced",
]

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
        # C longs, not a list of ints: an increment from the compiled lane writes in place, no int object
        self.counts = array("q", bytes(8 * (len(self.bounds) + 1)))
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


_REASON_INDEX: dict[object, int] = {reason: i for i, reason in enumerate(Reason)}


class ReasonCounts(MutableMapping[Reason, int]):
    """Decisions by reason (`dict.fromkeys(Reason, 0)` as a mapping): the counts in an array('q'), in the
    order of Reason, so the compiled lane counts an admission in place (no int object per decision); the
    reference path's `counts[reason] += 1` reads and writes the same figures."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts = array("q", bytes(8 * len(_REASON_INDEX)))

    def __getitem__(self, reason: Reason) -> int:
        return self.counts[_REASON_INDEX[reason]]

    def __setitem__(self, reason: Reason, count: int) -> None:
        self.counts[_REASON_INDEX[reason]] = count

    def __delitem__(self, reason: Reason) -> None:
        raise TypeError("a reason's count cannot be removed")

    def __iter__(self) -> Iterator[Reason]:
        return iter(Reason)

    def __len__(self) -> int:
        return len(_REASON_INDEX)

    def __repr__(self) -> str:
        return f"ReasonCounts({dict(self)!r})"


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


# What holds the event loop, as `nexus_authz_loop_busy_seconds` labels them.
SOURCES: tuple[str, ...] = ("http", "access_log", "gc", "maintenance")
SLICE = 0.0001  # seconds of work between two yields of the loop, for work done in slices (`sliced`)


class LoopBusy:
    """How long the event loop was held, per source, one observation per callback: each read of the
    HTTP listeners (ext_authz: framing, decision and answer; the admin one), each slice of an
    access-log batch between two yields, each pass of the cyclic garbage collector (`gc_callback`,
    installed by the server), each slice of the server's periodic upkeep (`sliced`: expiring reservations,
    sweeping drained counters).
    Exported as `nexus_authz_loop_busy_seconds{source}`; benchmarks/run_all.py judges its maximum.

    That is wall time: a callback during which the thread was descheduled (a busy machine) counts the
    time it waited. With `measure_cpu(True)` (the setting `metrics.loop_cpu_time`) each callback's own CPU
    time (the thread's CPU clock, CLOCK_THREAD_CPUTIME_ID) is observed too, into `<source>_cpu`
    (`nexus_authz_loop_busy_cpu_seconds{source}`): a callback long in wall time and short in CPU time
    waited for a core; one long in CPU time is our own work. Off by default: that clock is a system call
    (no vDSO), ~0.5 µs per read of it, two per callback."""

    __slots__ = (
        "_cpu",
        "_gc_cpu_started",
        "_gc_started",
        "access_log",
        "access_log_cpu",
        "gc",
        "gc_cpu",
        "http",
        "http_cpu",
        "maintenance",
        "maintenance_cpu",
    )

    def __init__(self) -> None:
        self.http = LatencyHistogram(BUSY_BUCKETS)
        self.access_log = LatencyHistogram(BUSY_BUCKETS)
        self.gc = LatencyHistogram(BUSY_BUCKETS)
        self.maintenance = LatencyHistogram(BUSY_BUCKETS)
        # the CPU histograms live as long as this (turning the measurement off and on keeps their counts);
        # the attributes are None while it is off (the observers' one test)
        self._cpu = tuple(LatencyHistogram(BUSY_BUCKETS) for _ in SOURCES)
        self.http_cpu: LatencyHistogram | None = None
        self.access_log_cpu: LatencyHistogram | None = None
        self.gc_cpu: LatencyHistogram | None = None
        self.maintenance_cpu: LatencyHistogram | None = None
        self._gc_started = 0.0
        self._gc_cpu_started = 0.0

    def sources(self) -> tuple[tuple[str, LatencyHistogram], ...]:
        return tuple((source, getattr(self, source)) for source in SOURCES)

    def cpu_sources(self) -> tuple[tuple[str, LatencyHistogram], ...]:
        """The own-CPU-time histograms by source; empty while the measurement is off."""
        if self.http_cpu is None:
            return ()
        return tuple(zip(SOURCES, self._cpu, strict=True))

    def measure_cpu(self, on: bool) -> None:
        """Observe each callback's own CPU time too (on) or not (off, the default)."""
        for source, histogram in zip(SOURCES, self._cpu, strict=True):
            setattr(self, f"{source}_cpu", histogram if on else None)
        self._gc_cpu_started = 0.0
        from nexus_authz import native  # the compiled read handler holds its own reference

        if native.fast is not None:
            native.fast.busy_cpu(self.http_cpu)

    def cpu_timer(self, source: str) -> tuple[Callable[[], float], Callable[[float], None]]:
        """(clock, observe) for timing one source's own CPU by hand: the thread's CPU clock and the
        source's CPU histogram's observe while measured, else a clock that reads 0.0 and an observe that
        drops its value (so a caller times unconditionally, with no system call)."""
        histogram = getattr(self, f"{source}_cpu")
        if histogram is None:
            return _zero, _drop
        return thread_time, histogram.observe

    def gc_callback(self, phase: str, info: dict[str, int]) -> None:
        """For `gc.callbacks`: times each collection (start to stop)."""
        cpu = self.gc_cpu
        if phase == "start":
            self._gc_started = perf_counter()
            if cpu is not None:
                self._gc_cpu_started = thread_time()
        elif self._gc_started:
            if cpu is not None and self._gc_cpu_started:
                cpu.observe(thread_time() - self._gc_cpu_started)
                self._gc_cpu_started = 0.0
            self.gc.observe(perf_counter() - self._gc_started)
            self._gc_started = 0.0


class Slice:
    """One slice of work holding the event loop, timed from `start()` to `end()`: its wall time and, while
    measured, its own CPU time, each one observation of LOOP_BUSY's `source` (`observe`: the wall time's
    observer instead of the source's own)."""

    __slots__ = ("_cpu", "_observe", "_observe_cpu", "cpu_started", "started")

    def __init__(self, source: str, observe: Callable[[float], None] | None = None) -> None:
        self._observe = observe if observe is not None else getattr(LOOP_BUSY, source).observe
        self._cpu, self._observe_cpu = LOOP_BUSY.cpu_timer(source)
        self.start()

    def start(self) -> None:
        self.started = perf_counter()
        self.cpu_started = self._cpu()

    def elapsed(self) -> float:
        return perf_counter() - self.started

    def end(self) -> None:
        self._observe_cpu(self._cpu() - self.cpu_started)
        self._observe(perf_counter() - self.started)


async def sliced(steps: Iterable[object], source: str, seconds: float = SLICE) -> None:
    """Run `steps` (each item taken is a step of work, of well under `seconds`) on the event loop in slices
    of about `seconds` (a slice ends after the step that reaches it), letting the loop run what is queued
    between two; each slice is one observation of LOOP_BUSY's `source` (wall, and own CPU when measured)."""
    timer = Slice(source)
    for _ in steps:
        if timer.elapsed() >= seconds:
            timer.end()
            await asyncio.sleep(0)
            timer.start()
    timer.end()


def _zero() -> float:
    return 0.0


def _drop(seconds: float) -> None:
    return None


LOOP_BUSY = LoopBusy()  # the process's one event loop (the server runs one)


def _le(bound: float) -> str:
    return repr(float(bound))
