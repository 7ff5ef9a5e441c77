"""Prometheus metrics, read from plain in-process counters at scrape time.

The hot path only increments ints in dicts and lists the engine owns (decisions by reason, the Check
latency histogram's buckets, tokens by model); this collector turns them into metric families when
Prometheus scrapes. No label lookup, lock or allocation happens per request, and nothing needs flushing:
the scrape is the batch. Everything else (ledger, counter store, reservations, key snapshot, readiness,
the policy API's calls) is read from the objects that own it, also at scrape time.

Metric names and what they mean are listed in docs/api.md ("Policy API, CLI and metrics"). Labels are
bounded: reasons and outcomes are enums, models come from the key configuration's traffic (tokens by
model) and API methods from the proto.
"""

from __future__ import annotations

import copy
import itertools
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from nexus_authz import native
from nexus_authz.core.limits import Kind
from nexus_authz.core.model import InFlight, Reason
from nexus_authz.core.reservations import ReservationBook, ReservationEntry
from nexus_authz.latency import LOOP_BUSY, sliced

if TYPE_CHECKING:
    from nexus_authz.engine import Engine

__all__ = [
    "EngineCollector",
    "RlsCollector",
    "ReservationEntry",
    "make_registry",
    "render",
    "reservation_entries",
]

# A scrape runs on the event loop: cap the walk over reservations (each ~0.2 µs) so a book filled by
# responses that never report usage cannot stall decisions for long. Beyond it the gauge is a lower bound.
MAX_RESERVATIONS_SCANNED = 10_000
MAX_MODEL_LABELS = 100


def reservation_entries(book: ReservationBook) -> Iterable[ReservationEntry]:
    """Every reservation in flight, oldest first (`ReservationBook.entries`); iterate it without awaiting
    (the loop mutates the book)."""
    return book.entries()


def _reserved_tokens_by_model(book: ReservationBook) -> tuple[dict[str, int], bool]:
    """Token estimates held by in-flight reservations, per model; and whether the walk was cut short."""
    result: list[tuple[dict[str, int], bool]] = []
    for _ in _reserved_steps(book, result, MAX_RESERVATIONS_SCANNED):
        pass
    return result[0]


RESERVATIONS_PER_STEP = 100  # ~0.75 µs each


def _reserved_steps(
    book: ReservationBook, result: list[tuple[dict[str, int], bool]], per_step: int = RESERVATIONS_PER_STEP
) -> Iterator[None]:
    """`_reserved_tokens_by_model` in steps (appended to `result`), over a copy of the book's first
    entries (taken at once: the loop mutates the book between two steps)."""
    entries = list(itertools.islice(reservation_entries(book), MAX_RESERVATIONS_SCANNED + 1))
    out: dict[str, int] = {}
    for start in range(0, min(len(entries), MAX_RESERVATIONS_SCANNED), per_step):
        yield None
        _tally(entries[start : min(start + per_step, MAX_RESERVATIONS_SCANNED)], out)
    result.append((out, len(entries) > MAX_RESERVATIONS_SCANNED))


def _tally(entries: Iterable[ReservationEntry], out: dict[str, int]) -> None:
    for _ids, specs, costs, uncharged, _at, _expires, context in entries:
        for i, spec in enumerate(specs):
            if spec.kind is Kind.TOKENS and not (uncharged >> i) & 1:
                model = context.model if isinstance(context, InFlight) and context.model else "unknown"
                out[model] = out.get(model, 0) + costs[i]
                break  # every token window of a request holds the same estimate: count it once


def _bounded_models(counts: Mapping[tuple[str, ...], int]) -> dict[tuple[str, ...], int]:
    """At most MAX_MODEL_LABELS models as labels; the rest summed as "other".

    Model names come from requests and responses; a client sending many made-up names must not create a
    series each. The first models seen keep their labels (dict order is insertion order, so the set is
    stable and every series stays monotonic).
    """
    out: dict[tuple[str, ...], int] = {}
    models: set[str] = set()
    for key, n in list(counts.items()):
        model = key[0]
        if model not in models:
            if len(models) >= MAX_MODEL_LABELS:
                key = ("other", *key[1:])
            else:
                models.add(model)
        out[key] = out.get(key, 0) + n
    return out


class EngineCollector(Collector):
    def __init__(
        self,
        engine: Engine,
        *,
        ready: Callable[[], tuple[bool, str]] | None = None,
        api_calls: Mapping[tuple[str, str], int] | None = None,
    ) -> None:
        self.engine = engine
        self.ready = ready
        self.api_calls = api_calls
        # set by render_sliced, which walks the reservations in steps before it collects
        self.reserved: tuple[dict[str, int], bool] | None = None

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        yield from self._decisions(engine)
        reserved, self.reserved = self.reserved, None
        yield from self._accounting(engine, reserved or _reserved_tokens_by_model(engine.book))
        yield from self._stores(engine)
        yield from self._keys(engine)
        if self.api_calls is not None:
            calls = CounterMetricFamily(
                "nexus_authz_api_requests",
                "Policy API calls by method and gRPC status code (UNAUTHENTICATED: a missing or wrong "
                "token).",
                labels=["method", "code"],
            )
            for (method, code), n in sorted(self.api_calls.items()):
                calls.add_metric([method, code], n)
            yield calls
        runtime = engine.runtime
        if runtime is not None:  # keys managed at runtime (issue 17)
            changes = CounterMetricFamily(
                "nexus_authz_key_changes",
                "Runtime key changes made through this replica's API, by operation.",
                labels=["op"],
            )
            for op, n in runtime.changes.items():
                changes.add_metric([op], n)
            yield changes
        if self.ready is not None:
            yield GaugeMetricFamily(
                "nexus_authz_ready", "1 when the service is ready.", value=float(self.ready()[0])
            )
        yield _native_path()

    # -- decisions -------------------------------------------------------------------------------------
    @staticmethod
    def _decisions(engine: Engine) -> Iterator[Metric]:
        decisions = CounterMetricFamily(
            "nexus_authz_decisions", "Check decisions by result and reason.", labels=["result", "reason"]
        )
        for reason, count in list(engine.decisions.items()):
            decisions.add_metric(["allow" if reason is Reason.OK else "deny", reason.value], count)
        yield decisions
        latency = getattr(engine, "check_latency", None)
        if latency is not None:
            buckets, total, _ = latency.cumulative()
            yield HistogramMetricFamily(
                "nexus_authz_check_duration_seconds",
                "Time to decide one Check in the engine (key lookup, rules, limits), in seconds.",
                buckets=buckets,
                sum_value=total,
            )
        busy = HistogramMetricFamily(
            "nexus_authz_loop_busy_seconds",
            "How long one callback held the event loop, in seconds, by source: a read of an HTTP "
            "listener (ext_authz: framing, decision, answer; admin), a slice of an access-log batch, "
            "a garbage collection.",
            labels=["source"],
        )
        for source, histogram in LOOP_BUSY.sources():
            buckets, total, _ = histogram.cumulative()
            busy.add_metric([source], buckets, total)
        yield busy
        cpu_sources = LOOP_BUSY.cpu_sources()
        if cpu_sources:  # metrics.loop_cpu_time
            cpu = HistogramMetricFamily(
                "nexus_authz_loop_busy_cpu_seconds",
                "The CPU time of this thread during each callback of nexus_authz_loop_busy_seconds, in "
                "seconds, by source: the callback's own work, without the time it waited for a core.",
                labels=["source"],
            )
            for source, histogram in cpu_sources:
                buckets, total, _ = histogram.cumulative()
                cpu.add_metric([source], buckets, total)
            yield cpu

    # -- tokens and accounting -------------------------------------------------------------------------
    @staticmethod
    def _accounting(engine: Engine, reserved_by_model: tuple[dict[str, int], bool]) -> Iterator[Metric]:
        used = CounterMetricFamily(
            "nexus_authz_tokens_used",
            "Tokens used according to responses (the provider's usage, or the estimate for a cut-off "
            "stream), by model and kind (prompt, cached_prompt, completion).",
            labels=["model", "kind"],
        )
        for (model, kind), n in sorted(_bounded_models(engine.usage_tokens).items()):
            used.add_metric([model, kind], n)
        yield used

        reserved, truncated = reserved_by_model
        family = GaugeMetricFamily(
            "nexus_authz_tokens_reserved",
            "Token estimates held now by in-flight reservations (charged at Check, not yet settled), "
            "by model.",
            labels=["model"],
        )
        for (model,), n in sorted(_bounded_models({(m,): n for m, n in reserved.items()}).items()):
            family.add_metric([model], n)
        yield family
        yield GaugeMetricFamily(
            "nexus_authz_tokens_reserved_truncated",
            f"1 when more than {MAX_RESERVATIONS_SCANNED} reservations were in flight at the scrape and "
            "nexus_authz_tokens_reserved counts only the oldest of them.",
            value=float(truncated),
        )

        accounted = dict(engine.accounted)
        responses = CounterMetricFamily(
            "nexus_authz_accounted_responses",
            "Responses accounted, by where the usage came from: provider (the response's usage), estimated "
            "(a stream cut off before its usage), none (an error response without usage).",
            labels=["source"],
        )
        for source in ("provider", "estimated", "none"):
            responses.add_metric([source], accounted.get(source, 0))
        yield responses
        yield CounterMetricFamily(
            "nexus_authz_accounted_unmatched",
            "Responses accounted after their reservation ended unsettled (expired, evicted or replaced): "
            "recorded in the ledger, nothing left to settle.",
            value=accounted.get("unmatched", 0),
        )
        yield CounterMetricFamily(
            "nexus_authz_accounted_unadmitted",
            "Responses dropped unaccounted: nexus-authz admitted no request with their id (e.g. "
            "requests the proxy refused before its own identity headers replaced the client's), or "
            "knows it no longer.",
            value=accounted.get("unadmitted", 0),
        )
        yield CounterMetricFamily(
            "nexus_authz_accounted_duplicate",
            "Responses dropped as repeats: their request id's usage was accounted already (Envoy's access "
            "log resending an entry, a repeated ext_proc stream); settlement charges each request once.",
            value=accounted.get("duplicate", 0),
        )

        unpriced = CounterMetricFamily(
            "nexus_authz_unpriced_requests",
            "Requests for a model no price matches, by the unpriced policy in force and what happened: "
            "refused (at Check), or charged highest / default / zero (at accounting).",
            labels=["policy", "outcome"],
        )
        for (policy, outcome), n in sorted(getattr(engine, "unpriced", {}).items()):
            unpriced.add_metric([policy, outcome], n)
        yield unpriced

        releases = CounterMetricFamily(
            "nexus_authz_slot_releases",
            "Concurrency slots freed, by who freed them: proxy (its early release call as the response "
            "ends, made only for a slot near its window's limit), access_log (the settlement of the "
            "response's usage: Envoy's access log, or ext_proc).",
            labels=["via"],
        )
        for via, n in engine.decider.slot_releases.items():
            releases.add_metric([via], n)
        yield releases

        stats = engine.book.stats()
        yield GaugeMetricFamily(
            "nexus_authz_reservations_in_flight",
            "Requests admitted whose usage has not been settled yet.",
            value=stats["pending"],
        )
        outcomes = CounterMetricFamily(
            "nexus_authz_reservations",
            "Reservations ended, by outcome: settled (usage arrived), expired (none within the ttl), evicted "
            "(the book was full), replaced (the same request id was reserved again).",
            labels=["outcome"],
        )
        for outcome in ("settled", "expired", "evicted", "replaced"):
            outcomes.add_metric([outcome], stats[outcome])
        yield outcomes
        memory = GaugeMetricFamily(
            "nexus_authz_reservation_ids",
            "Request ids the reservation book remembers beyond those in flight (both bounded): settled "
            "(accounted: a repeat is dropped as a duplicate), retired (ended unsettled: late usage is "
            "still accounted under its admitted identity).",
            labels=["record"],
        )
        memory.add_metric(["settled"], stats["settled_ids"])
        memory.add_metric(["retired"], stats["retired_ids"])
        yield memory

    # -- stores ----------------------------------------------------------------------------------------
    @staticmethod
    def _stores(engine: Engine) -> Iterator[Metric]:
        size = GaugeMetricFamily(
            "nexus_authz_counters",
            "Limit counters held in the counter store (idle ones are dropped).",
            labels=["store"],
        )
        evicted = CounterMetricFamily(
            "nexus_authz_counters_evicted", "Idle counters dropped from the counter store.", labels=["store"]
        )
        for name, store in (
            ("limits", engine.counters),
            ("auth_failures", getattr(engine, "failures", None)),
        ):
            if store is None:
                continue
            stats = store.stats()
            size.add_metric([name], stats.get("counters", stats.get("local_counters", 0)))
            evicted.add_metric([name], stats.get("evicted", 0))
        yield size
        yield evicted

        up = GaugeMetricFamily(
            "nexus_authz_store_up",
            "1 when a store answers: limits (the counter store) and ledger (its last write succeeded).",
            labels=["store"],
        )
        remote = getattr(engine, "remote", None)
        health = remote.health() if remote is not None else None
        # The in-process store cannot be unreachable; Redis is up unless its breaker says it is down.
        up.add_metric(["limits"], 1.0 if health is None or health.state != "down" else 0.0)
        ls = engine.ledger.stats() if engine.ledger is not None else None
        if ls is not None:
            up.add_metric(["ledger"], 0.0 if ls.consecutive_failures else 1.0)
        yield up
        if health is not None:
            yield from _redis_metrics(health)
        if ls is None:
            return
        yield GaugeMetricFamily(
            "nexus_authz_ledger_flush_lag_seconds",
            "How far the ledger's store is behind: seconds since the oldest record not yet written (0 when "
            "nothing is pending).",
            value=ls.flush_lag,
        )
        yield GaugeMetricFamily(
            "nexus_authz_ledger_pending_rows",
            "Aggregated usage rows held in memory, not yet written.",
            value=ls.pending_rows,
        )
        for name, help_text, value in (
            ("nexus_authz_ledger_records", "Usage records received by the ledger.", ls.recorded_records),
            ("nexus_authz_ledger_flushed_rows", "Rows written to the ledger's store.", ls.flushed_rows),
            ("nexus_authz_ledger_flushes", "Successful ledger flushes.", ls.flushes),
            ("nexus_authz_ledger_failed_flushes", "Ledger flushes that failed (retried).", ls.failed_flushes),
            (
                "nexus_authz_ledger_dropped_records",
                "Usage records dropped because the ledger's buffer was full or the ledger closed.",
                ls.dropped_records,
            ),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
        yield GaugeMetricFamily(
            "nexus_authz_ledger_consecutive_failures",
            "Ledger flushes failed in a row (0 when the last one succeeded).",
            value=ls.consecutive_failures,
        )
        yield GaugeMetricFamily(
            "nexus_authz_ledger_last_flush_duration_seconds",
            "Duration of the last ledger flush.",
            value=ls.last_flush_duration,
        )

    # -- keys --------------------------------------------------------------------------------------------
    @staticmethod
    def _keys(engine: Engine) -> Iterator[Metric]:
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


class RlsCollector(Collector):
    """Envoy's RateLimitService (`ratelimit:`): its plain counters, read at scrape time.

    `service` is an envoy_rls.RateLimitService: `counts` (calls by result), `rule_stats` (upstream's
    per-rule stats by stats key: hits, over limit, shadow-mode hits, within limit; bounded by the
    service) and its config source's reload counts and status.
    """

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service = self.service
        calls = CounterMetricFamily(
            "nexus_authz_ratelimit_calls",
            "ShouldRateLimit calls by result: ok, over_limit, shadow_overridden (global shadow mode turned "
            "an OVER_LIMIT into OK), unknown_domain, store_unavailable, error.",
            labels=["result"],
        )
        for result, n in sorted(service.counts.items()):
            calls.add_metric([result], n)
        yield calls
        families = {
            name: CounterMetricFamily(f"nexus_authz_ratelimit_rule_{name}", help_text, labels=["rule"])
            for name, help_text in (
                (
                    "hits",
                    "Hits (hits_addend summed) per rule, by upstream's stats key (domain.key_value...).",
                ),
                ("over_limit", "Descriptors answered OVER_LIMIT per rule."),
                (
                    "shadow_mode",
                    "Descriptors over a shadow_mode rule's limit (counted, not refused) per rule.",
                ),
                ("within_limit", "Descriptors answered within the limit per rule."),
            )
        }
        for rule, row in sorted(list(service.rule_stats.items())):
            for family, n in zip(families.values(), row, strict=True):
                family.add_metric([rule], n)
        yield from families.values()
        source = service.source
        reloads = CounterMetricFamily(
            "nexus_authz_ratelimit_config_reloads",
            "Config directory reloads after the first load, by outcome: loaded (a new config in force), "
            "rejected (invalid: the previous config stays; the log says why).",
            labels=["outcome"],
        )
        for outcome, n in sorted(source.reloads.items()):
            reloads.add_metric([outcome], n)
        yield reloads
        status = source.status()
        yield GaugeMetricFamily(
            "nexus_authz_ratelimit_config_error",
            "1 when the config directory on disk was rejected and an older config is in force.",
            value=1.0 if status.last_error else 0.0,
        )
        yield GaugeMetricFamily(
            "nexus_authz_ratelimit_rules", "Rate limit rules in the config in force.", value=status.rules
        )


def _native_path() -> Metric:
    """Which fast path runs: the compiled extension (nexus_authz/native/) or the pure-Python fallback."""
    gauge = GaugeMetricFamily(
        "nexus_authz_native_path",
        'The fast path that runs: path="compiled" (the C extension built) or "python" (pure fallback).',
        labels=["path"],
    )
    gauge.add_metric([native.PATH], 1.0)
    return gauge


def make_registry(
    engine: Engine,
    *,
    ready: Callable[[], tuple[bool, str]] | None = None,
    api_calls: Mapping[tuple[str, str], int] | None = None,
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    collector = EngineCollector(engine, ready=ready, api_calls=api_calls)
    registry.register(collector)
    _ENGINE_COLLECTORS[registry] = collector
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


async def render_sliced(registry: CollectorRegistry) -> bytes:
    """`render`, a metric family at a time, in slices of the event loop (latency.sliced; source `http`, the
    admin listener's): in one call a scrape held the loop ~1.5-4 ms. The same text; its families are
    read at moments a few slices apart, which Prometheus tolerates as it does a scrape between two adds."""
    out: list[bytes] = []
    collector = _ENGINE_COLLECTORS.get(registry)
    steps: Iterable[None] = _render_steps(registry, out)
    if collector is not None:  # the reservations in flight first, in steps (~0.75 µs each, up to 10,000)
        result: list[tuple[dict[str, int], bool]] = []
        steps = itertools.chain(
            _reserved_steps(collector.engine.book, result), _store(result, collector), steps
        )
    await sliced(steps, "http", RENDER_SLICE)
    return b"".join(out)


def _store(result: list[tuple[dict[str, int], bool]], collector: EngineCollector) -> Iterator[None]:
    collector.reserved = result[0]  # what its next collect() reports as nexus_authz_tokens_reserved
    yield None


# make_registry's collector per registry (render_sliced walks its engine's reservations in steps)
_ENGINE_COLLECTORS: weakref.WeakKeyDictionary[CollectorRegistry, EngineCollector]
_ENGINE_COLLECTORS = weakref.WeakKeyDictionary()


RENDER_SLICE = 0.00005  # s: a step (collecting a family, writing some of its samples) takes up to ~100 µs
RENDER_SAMPLES = 12  # samples written per step (generate_latest: ~5-8 µs each)
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")  # samples generate_latest writes as families of their own


def _render_steps(registry: CollectorRegistry, out: list[bytes]) -> Iterator[None]:
    for family in registry.collect():
        yield None  # collected
        samples = family.samples
        if len(samples) <= RENDER_SAMPLES or any(s.name.endswith(_OM_SUFFIXES) for s in samples):
            out.append(generate_latest(_One(family)))
            yield None
            continue
        for i in range(0, len(samples), RENDER_SAMPLES):  # a histogram of 4 sources has 72 samples
            part = copy.copy(family)
            part.samples = samples[i : i + RENDER_SAMPLES]
            text = generate_latest(_One(part))
            out.append(text.split(b"\n", 2)[2] if i else text)  # the HELP and TYPE lines once
            yield None


class _One:
    """A registry of one metric family, for generate_latest."""

    __slots__ = ("family",)

    def __init__(self, family: Metric) -> None:
        self.family = family

    def collect(self) -> Iterable[Metric]:
        return (self.family,)


def _redis_metrics(health: Any) -> Iterator[Metric]:
    """Distributed mode: which state the Redis counter store is in, and what its calls cost."""
    state = GaugeMetricFamily(
        "nexus_authz_redis_state", "1 for the Redis counter store's current state.", labels=["state"]
    )
    for name in ("ok", "degraded", "down"):
        state.add_metric([name], 1.0 if health.state == name else 0.0)
    yield state
    breaker = GaugeMetricFamily(
        "nexus_authz_redis_breaker", "1 for the circuit breaker's current state.", labels=["state"]
    )
    for name in ("closed", "open", "half_open"):
        breaker.add_metric([name], 1.0 if str(health.breaker).replace("-", "_") == name else 0.0)
    yield breaker
    for name, help_text, value in (
        ("nexus_authz_redis_calls", "Calls made to Redis.", health.calls),
        ("nexus_authz_redis_pipelines", "Pipelines (round trips) sent to Redis.", health.pipelines),
        ("nexus_authz_redis_failures", "Redis calls that failed.", health.failures),
        ("nexus_authz_redis_timeouts", "Redis calls that timed out.", health.timeouts),
        (
            "nexus_authz_redis_fallbacks",
            "Decisions made with local limits while Redis was away (fail_open).",
            health.fallbacks,
        ),
        (
            "nexus_authz_redis_unavailable",
            "Decisions answered 503 while Redis was away (fail_closed).",
            health.unavailable,
        ),
        (
            "nexus_authz_redis_queue_dropped",
            "Counter changes dropped because the write-behind queue was full.",
            health.queue_dropped,
        ),
    ):
        yield CounterMetricFamily(name, help_text, value=value)
    yield GaugeMetricFamily(
        "nexus_authz_redis_queue", "Counter changes waiting to be written to Redis.", value=health.queue
    )
    yield GaugeMetricFamily(
        "nexus_authz_redis_latency_milliseconds", "Recent Redis round-trip latency.", value=health.latency_ms
    )
