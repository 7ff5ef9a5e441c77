"""/metrics after real decisions: counters read at scrape time, the Check latency histogram, accounting,
stores, keys and readiness, served by the admin listener of an in-process server."""

from __future__ import annotations

import asyncio
import json
import math
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nexus_authz.core.model import Request
from nexus_authz.core.usage import Usage
from nexus_authz.demo.procs import free_port
from nexus_authz.engine import Engine
from nexus_authz.latency import LatencyHistogram
from nexus_authz.server import Server
from nexus_authz.settings import HostPort, load_settings
from tests.helpers import KeySpec, write_config

CONFIG = """
plans:
  standard:
    limits:
      - {requests: 100, per: minute}
      - {tokens: 100000, per: minute}
ledger:
  backend: memory
"""
KEY = KeySpec("metered", extra={"tenant": "acme", "plan": "standard", "models": ["gpt-4o*"]})


def request(secret: str, model: str, request_id: str) -> Request:
    body = json.dumps({"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]})
    headers = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
    return Request("POST", "/v1/chat/completions", headers, body.encode(), request_id=request_id)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(engine: Engine) -> str:
    port = free_port()
    settings = replace(
        engine.settings, http_socket=None, grpc=None, api=None, admin=HostPort("127.0.0.1", port)
    )

    async def main() -> str:
        server = Server(settings, engine)
        await server.start()
        try:
            loop = asyncio.get_running_loop()
            url = f"http://127.0.0.1:{port}/metrics"

            def get() -> str:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    assert resp.headers["content-type"].startswith("text/plain")
                    return resp.read().decode()

            return await loop.run_in_executor(None, get)
        finally:
            await server.drain()

    return asyncio.run(main())


def test_metrics_after_decisions(tmp_path: Path) -> None:
    engine = Engine.from_settings(load_settings(str(write_config(tmp_path, KEY, extra=CONFIG))))
    for i in range(3):
        assert engine.check(request(KEY.secret, "gpt-4o", f"ok-{i}")).allowed
    assert not engine.check(request("nx-nobody-0123456789abcdef", "gpt-4o", "x")).allowed
    assert not engine.check(request(KEY.secret, "o1", "y")).allowed
    engine.account("ok-0", Usage(prompt_tokens=12, completion_tokens=30, source="provider"))
    engine.account("ok-1", Usage(source="none"))
    engine.account("never-admitted", Usage(prompt_tokens=1, completion_tokens=1, source="provider"))

    m = samples(scrape(engine))

    def value(name: str, **labels: str) -> float:
        return m[(name, tuple(sorted(labels.items())))]

    assert value("nexus_authz_decisions_total", result="allow", reason="ok") == 3
    assert value("nexus_authz_decisions_total", result="deny", reason="unknown_key") == 1
    assert value("nexus_authz_decisions_total", result="deny", reason="model_not_allowed") == 1
    # the histogram counted every check, cumulatively, and its sum is a plausible time
    assert value("nexus_authz_check_duration_seconds_count") == 5
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in m.items()
        if name == "nexus_authz_check_duration_seconds_bucket"
    )
    assert buckets[-1] == (math.inf, 5) and all(
        a[1] <= b[1] for a, b in zip(buckets, buckets[1:], strict=False)
    )
    assert 0 < value("nexus_authz_check_duration_seconds_sum") < 5
    # tokens and accounting
    assert value("nexus_authz_tokens_used_total", model="gpt-4o", kind="prompt") == 12
    assert value("nexus_authz_tokens_used_total", model="gpt-4o", kind="completion") == 30
    assert value("nexus_authz_accounted_responses_total", source="provider") == 1
    assert value("nexus_authz_accounted_responses_total", source="none") == 1
    assert value("nexus_authz_accounted_unadmitted_total") == 1  # dropped, not in the counts above
    assert value("nexus_authz_reservations_in_flight") == 1  # ok-2 has no response yet
    assert value("nexus_authz_reservations_total", outcome="settled") == 2
    assert value("nexus_authz_tokens_reserved", model="gpt-4o") > 100  # prompt estimate + max_tokens
    assert value("nexus_authz_tokens_reserved_truncated") == 0
    # stores, keys, readiness
    assert value("nexus_authz_counters", store="limits") == 2  # requests/minute, tokens/minute
    assert value("nexus_authz_store_up", store="ledger") == 1
    assert value("nexus_authz_ledger_records_total") == 2
    assert value("nexus_authz_ledger_pending_rows") == 0
    assert value("nexus_authz_keys") == 1 and value("nexus_authz_key_file_error") == 0
    assert value("nexus_authz_key_snapshot_age_seconds") >= 0
    assert value("nexus_authz_ready") == 1


def test_histogram_buckets_follow_prometheus_le() -> None:
    h = LatencyHistogram((0.001, 0.01))
    for seconds in (0.0005, 0.001, 0.002, 0.01, 0.5):
        h.observe(seconds)
    buckets, total, count = h.cumulative()
    assert buckets == [("0.001", 2), ("0.01", 4), ("+Inf", 5)]  # a value equal to a bound is in it
    assert count == 5 and total == pytest.approx(0.5135)
    with pytest.raises(ValueError):
        LatencyHistogram((0.01, 0.001))


def test_model_labels_are_bounded() -> None:
    from nexus_authz import metrics

    counts = {
        (f"m{i}", kind): 1 for i in range(metrics.MAX_MODEL_LABELS + 50) for kind in ("prompt", "completion")
    }
    bounded = metrics._bounded_models(counts)
    models = {model for model, _ in bounded}
    assert len(models) == metrics.MAX_MODEL_LABELS + 1 and "other" in models
    assert bounded[("other", "prompt")] == 50 and bounded[("m0", "prompt")] == 1
    assert sum(bounded.values()) == sum(counts.values())


def test_loop_busy_counts_http_reads_and_garbage_collections(tmp_path: Path) -> None:
    """nexus_authz_loop_busy_seconds: one observation per read of an HTTP listener (the metrics scrape
    on the admin listener is one) and per garbage collection while the callback is installed."""
    import gc

    from nexus_authz.latency import LOOP_BUSY

    engine = Engine.from_settings(load_settings(str(write_config(tmp_path, KeySpec("plain")))))
    before_http, before_gc = sum(LOOP_BUSY.http.counts), sum(LOOP_BUSY.gc.counts)
    gc.callbacks.append(LOOP_BUSY.gc_callback)
    try:
        gc.collect()
        gc.collect()
    finally:
        gc.callbacks.remove(LOOP_BUSY.gc_callback)
    assert sum(LOOP_BUSY.gc.counts) == before_gc + 2
    m = samples(scrape(engine))
    assert m[("nexus_authz_loop_busy_seconds_count", (("source", "gc"),))] == before_gc + 2
    assert m[("nexus_authz_loop_busy_seconds_count", (("source", "http"),))] >= before_http
    # the scrape's own read is counted once it is done
    assert sum(LOOP_BUSY.http.counts) >= before_http + 1
    assert ("nexus_authz_loop_busy_seconds_bucket", (("le", "0.0002"), ("source", "access_log"))) in m


def test_slot_releases_count_who_freed_each_slot(tmp_path: Path) -> None:
    """Issue 15: the proxy's release call only for a slot near its limit; the access log frees the rest."""
    conc = KeySpec("conc", extra={"limits": [{"concurrent": 4}]})
    engine = Engine.from_settings(load_settings(str(write_config(tmp_path, conc))))
    first = engine.check(request(conc.secret, "gpt-4o", "c-0"))  # 3 of 4 left: not marked
    second = engine.check(request(conc.secret, "gpt-4o", "c-1"))  # 2 of 4 left: marked
    assert first.allowed and first.release == "" and second.release == "c-1"
    assert engine.release("c-1")  # the proxy's call
    engine.account("c-0", Usage(prompt_tokens=1, completion_tokens=1, source="provider"))
    engine.account("c-1", Usage(prompt_tokens=1, completion_tokens=1, source="provider"))  # freed already

    m = samples(scrape(engine))
    assert m[("nexus_authz_slot_releases_total", (("via", "proxy"),))] == 1
    assert m[("nexus_authz_slot_releases_total", (("via", "access_log"),))] == 1


def test_reason_counts_read_as_the_dict_of_reasons_they_replace() -> None:
    """Decisions by reason count in an array (the compiled lane's in-place increment); every reader still
    sees dict.fromkeys(Reason, 0) with the counts added."""
    from nexus_authz.core.model import Reason
    from nexus_authz.latency import ReasonCounts

    counts, plain = ReasonCounts(), dict.fromkeys(Reason, 0)
    for reason in (Reason.OK, Reason.OK, Reason.UNAVAILABLE, Reason.OK, Reason.BAD_REQUEST):
        counts[reason] += 1
        plain[reason] += 1
    assert dict(counts) == plain and list(counts.items()) == list(plain.items()) and counts == plain
    assert list(counts.counts) == list(plain.values()) and len(counts) == len(Reason)
    with pytest.raises(KeyError):
        counts["ok-but-a-str"]  # type: ignore[index]
    with pytest.raises(TypeError):
        del counts[Reason.OK]
