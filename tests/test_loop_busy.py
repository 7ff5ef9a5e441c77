"""nexus_authz_loop_busy_cpu_seconds (metrics.loop_cpu_time): each event-loop callback's own CPU time next to
its wall time, so a callback that held the loop because the thread waited for a core (descheduled on a busy
machine) tells itself apart from one that did 200 µs of our own work. Real callbacks, real clocks: one
burns CPU, one sleeps; both are long in wall time, only the first is long in CPU time."""

from __future__ import annotations

import asyncio
import gc
import time
from bisect import bisect_left
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nexus_authz import native
from nexus_authz.adapters import http_native  # noqa: F401  (installs the compiled read handler)
from nexus_authz.adapters.envoy_als import AccessLogService
from nexus_authz.adapters.http_authz import AuthzProtocol
from nexus_authz.core.errors import ConfigError
from nexus_authz.engine import Engine
from nexus_authz.latency import LOOP_BUSY, LatencyHistogram
from nexus_authz.settings import load_settings
from tests.helpers import KeySpec, write_config
from tests.test_metrics import samples, scrape

LIMIT = 0.0002  # the performance target: 200 µs
LONG = 0.0004  # each callback below holds the loop this long (wall)


def burn(seconds: float = LONG) -> None:
    """Our own work: `seconds` of this thread's CPU."""
    t0 = time.thread_time()
    while time.thread_time() - t0 < seconds:
        pass


def sleep(seconds: float = LONG) -> None:
    """Not our work: the thread holds the callback but runs nothing (as when it is descheduled)."""
    time.sleep(seconds)


def over(h: LatencyHistogram) -> int:
    return sum(h.counts[bisect_left(h.bounds, LIMIT) + 1 :])


def within(h: LatencyHistogram) -> int:
    return sum(h.counts[: bisect_left(h.bounds, LIMIT) + 1])


@pytest.fixture
def measured() -> Iterator[None]:
    LOOP_BUSY.measure_cpu(True)
    try:
        yield
    finally:
        LOOP_BUSY.measure_cpu(False)


def snapshot(source: str) -> tuple[int, int, int, int]:
    wall = getattr(LOOP_BUSY, source)
    cpu = getattr(LOOP_BUSY, f"{source}_cpu")
    assert cpu is not None
    return over(wall), within(wall), over(cpu), within(cpu)


def delta(before: tuple[int, ...], after: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(a - b for a, b in zip(after, before, strict=True))


class _Parser:
    def __init__(self, work: Any) -> None:
        self.work = work

    def feed(self, data: bytes) -> bool:  # the compiled parser's: False = taken, nothing to replay
        self.work()
        return False


class _Protocol:
    """What data_received reads of a protocol: a read that runs `work`."""

    def __init__(self, work: Any) -> None:
        self._closing = False
        self._fast = self._parser = _Parser(work)
        self.work = work

    def _feed(self, data: bytes) -> None:  # AuthzProtocol.data_received's (the pure path)
        self.work()


READS = [
    pytest.param(lambda p, d: AuthzProtocol.data_received(p, d), id="pure"),
    pytest.param(
        lambda p, d: native.fast.data_received(p, d),  # type: ignore[union-attr]
        id="compiled",
        marks=pytest.mark.skipif(native.fast is None, reason="the compiled modules did not build"),
    ),
]


@pytest.mark.parametrize("read", READS)
def test_an_http_read_burning_cpu_counts_in_cpu_time_a_sleeping_one_not(read: Any, measured: None) -> None:
    before = snapshot("http")
    for _ in range(3):
        read(_Protocol(burn), b"x")
    # wall over 200 µs, and so is its own CPU
    assert delta(before, snapshot("http")) == (3, 0, 3, 0)
    before = snapshot("http")
    for _ in range(3):
        read(_Protocol(sleep), b"x")
    # wall over 200 µs, its own CPU within: the callback waited, it did not work
    assert delta(before, snapshot("http")) == (3, 0, 0, 3)


@pytest.mark.parametrize("read", READS)
def test_cpu_time_is_not_read_while_the_setting_is_off(read: Any) -> None:
    assert LOOP_BUSY.http_cpu is None and LOOP_BUSY.cpu_sources() == ()
    cpu = LOOP_BUSY._cpu[0]
    wall, counted = sum(LOOP_BUSY.http.counts), sum(cpu.counts)
    read(_Protocol(burn), b"x")
    assert sum(LOOP_BUSY.http.counts) == wall + 1 and sum(cpu.counts) == counted


def test_access_log_slices_burning_cpu_count_in_cpu_time_sleeping_ones_do_not(measured: None) -> None:
    service = object.__new__(AccessLogService)  # _account_batch reads nothing of the service

    def run(work: Any) -> tuple[int, ...]:
        before = snapshot("access_log")
        asyncio.run(service._account_batch([1, 2, 3], lambda item, raw: work(), b""))
        return delta(before, snapshot("access_log"))

    # each entry is longer than a slice (_SLICE, 100 µs): one slice each, and the empty one after the last
    assert run(burn) == (3, 1, 3, 1)
    assert run(sleep) == (3, 1, 0, 4)


class _SlowFinalizer:
    def __init__(self) -> None:
        self.cycle = self

    def __del__(self) -> None:  # runs inside the collection, between gc's "start" and "stop"
        sleep(0.001)


def test_a_collection_traversing_many_objects_counts_in_cpu_time_one_waiting_does_not(measured: None) -> None:
    gc.callbacks.append(LOOP_BUSY.gc_callback)
    enabled = gc.isenabled()
    gc.disable()  # the objects below stay in the young generation until the collection we time
    try:
        gc.collect()
        before = snapshot("gc")
        young = [[i] for i in range(300_000)]
        gc.collect(0)  # traverses them all: CPU
        after = snapshot("gc")
        assert delta(before, after) == (1, 0, 1, 0)
        del young
        _SlowFinalizer()
        gc.collect(0)  # a few objects, and a finalizer that sleeps: wall, not CPU
        assert delta(after, snapshot("gc")) == (1, 0, 0, 1)
    finally:
        gc.callbacks.remove(LOOP_BUSY.gc_callback)
        if enabled:
            gc.enable()


def test_the_cpu_histogram_is_exported_only_when_measured(tmp_path: Path) -> None:
    def engine() -> Engine:  # one server per engine (its ledger opens once)
        directory = tmp_path / str(len(list(tmp_path.iterdir())))
        directory.mkdir()
        return Engine.from_settings(load_settings(str(write_config(directory, KeySpec("plain")))))

    assert not [k for k in samples(scrape(engine())) if k[0].startswith("nexus_authz_loop_busy_cpu")]
    LOOP_BUSY.measure_cpu(True)
    try:
        burned = sum(LOOP_BUSY._cpu[0].counts)
        AuthzProtocol.data_received(_Protocol(burn), b"x")  # type: ignore[arg-type]
        m = samples(scrape(engine()))
    finally:
        LOOP_BUSY.measure_cpu(False)
    for source in ("http", "access_log", "gc"):
        assert ("nexus_authz_loop_busy_cpu_seconds_bucket", (("le", "0.0002"), ("source", source))) in m
    # the burning read (and the scrape's own reads, done before the answer was written: not yet)
    assert m[("nexus_authz_loop_busy_cpu_seconds_count", (("source", "http"),))] >= burned + 1
    assert m[("nexus_authz_loop_busy_cpu_seconds_sum", (("source", "http"),))] >= LONG


def test_the_setting_is_metrics_loop_cpu_time(tmp_path: Path) -> None:
    assert load_settings(str(write_config(tmp_path, KeySpec("plain")))).loop_cpu_time is False
    on = write_config(tmp_path, KeySpec("plain"), extra="metrics:\n  loop_cpu_time: true\n")
    assert load_settings(str(on)).loop_cpu_time is True
    bad = write_config(tmp_path, KeySpec("plain"), extra="metrics:\n  loop_cpu_time: sometimes\n")
    with pytest.raises(ConfigError, match="loop_cpu_time"):
        load_settings(str(bad))
    unknown = write_config(tmp_path, KeySpec("plain"), extra="metrics:\n  loop_cpu: true\n")
    with pytest.raises(ConfigError, match="loop_cpu"):
        load_settings(str(unknown))
