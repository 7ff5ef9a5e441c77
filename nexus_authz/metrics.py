"""Prometheus metrics, read from plain in-process counters at scrape time.

The hot path only increments ints in dicts the engine owns; this collector turns them into metric
families when Prometheus scrapes. No label lookup, lock or allocation happens per request, and nothing
needs flushing: the scrape is the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nexus_authz.core.model import Reason
from nexus_authz.engine import Engine


class EngineCollector(Collector):
    def __init__(self, engine: Engine, *, ready: Callable[[], tuple[bool, str]] | None = None) -> None:
        self.engine = engine
        self.ready = ready

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        engine = self.engine
        decisions = CounterMetricFamily(
            "nexus_authz_decisions", "Check decisions by result and reason.", labels=["result", "reason"]
        )
        for reason, count in engine.decisions.items():
            decisions.add_metric(["allow" if reason is Reason.OK else "deny", reason.value], count)
        yield decisions

        status = engine.key_status()
        yield GaugeMetricFamily("nexus_authz_keys", "Keys in the snapshot in force.", value=status.keys)
        age = time.time() - status.loaded_at if status.loaded else 0.0
        yield GaugeMetricFamily(
            "nexus_authz_key_snapshot_age_seconds",
            "Seconds since the key snapshot in force was loaded.",
            value=age,
        )
        yield GaugeMetricFamily(
            "nexus_authz_key_file_error",
            "1 when the key file on disk was rejected and an older snapshot is in force.",
            value=1.0 if status.last_error else 0.0,
        )
        if self.ready is not None:
            yield GaugeMetricFamily(
                "nexus_authz_ready", "1 when the service is ready.", value=float(self.ready()[0])
            )


def make_registry(
    engine: Engine, *, ready: Callable[[], tuple[bool, str]] | None = None
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, ready=ready))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
