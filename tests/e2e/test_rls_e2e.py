"""Envoy's real `ratelimit` filter (envoy/envoy-ratelimit.yaml) against nexus-authz's RateLimitService.

One stack: mock upstream, nexus-authz with `ratelimit.config_dir` (envoyproxy/ratelimit YAML), Envoy with
ext_authz + ext_proc + ratelimit. The limits are enforced per API key (descriptor `nexus_key_id` from the
x-nexus-key-id header ext_authz sets) and per plan (`nexus_plan`, filled in by nexus); 429s carry nexus's
OpenAI-style JSON body and retry-after, and every answer the IETF RateLimit headers; config edits apply
without a restart.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nexus_authz.demo import mock_upstream
from nexus_authz.render import envoy as envoy_config
from tests.e2e.stack import REPO, HttpResult, Stack
from tests.helpers import KeySpec

ENVOY_RLS = REPO / "envoy" / "envoy-ratelimit.yaml"
RLS_CONFIG = """
domain: nexus
descriptors:
  - key: nexus_key_id
    rate_limit: {unit: minute, requests_per_unit: 3}
  - key: nexus_key_id
    value: solo
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: nexus_plan
    value: free
    descriptors:
      - key: nexus_key_id
        rate_limit: {unit: day, requests_per_unit: 2, name: free-daily}
"""
NEXUS_CONFIG = """
ratelimit:
  config_dir: rls
  reload_interval: 100ms
plans:
  free: {}
"""
ALICE = KeySpec("alice")
BOB = KeySpec("bob")
FREE = KeySpec("freebie", extra={"plan": "free"})
DAVE = KeySpec("dave")
SOLO = KeySpec("solo", extra={"limits": [{"concurrent": 1}]})
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5}


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    workdir = Path(tempfile.mkdtemp(prefix="nx-rls-"))
    (workdir / "rls").mkdir()
    (workdir / "rls" / "nexus.yaml").write_text(RLS_CONFIG)
    s = Stack(
        workdir=workdir,
        keys=(ALICE, BOB, FREE, DAVE, SOLO),
        extra_config=NEXUS_CONFIG,
        envoy_template=ENVOY_RLS,
    )
    try:
        s.mock = mock_upstream.start_in_thread(always_usage=False)
        s.start_nexus()
        # The ratelimit cluster is nexus's gRPC port, known once nexus runs.
        s.envoy_render = {"clusters": {"nexus_ratelimit": f"127.0.0.1:{s.grpc_port}"}}
        s.start_envoy()
        yield s
    finally:
        s.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_the_config_puts_the_ratelimit_filter_after_ext_authz() -> None:
    """ext_authz first (it sets the identity the descriptors read), the Lua usage tap before the ratelimit
    filter, the router last; the gRPC access log (which also logs the filter's 429s, so their reservations
    are settled) is configured on the connection manager."""
    doc = envoy_config.load(ENVOY_RLS)
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"].removeprefix("envoy.filters.http.") for f in hcm["http_filters"]]
    assert names == ["header_mutation", "ext_authz", "lua", "ratelimit", "router"]
    assert [log["name"] for log in hcm["access_log"]] == ["envoy.access_loggers.http_grpc"]
    (ratelimit,) = [f["typed_config"] for f in hcm["http_filters"] if f["name"].endswith(".ratelimit")]
    assert ratelimit["domain"] == "nexus" and ratelimit["failure_mode_deny"] is False
    assert ratelimit["rate_limit_service"]["grpc_service"]["envoy_grpc"]["cluster_name"] == "nexus_ratelimit"
    per_key, per_plan = (r["actions"] for r in ratelimit["rate_limits"])
    from_header = {"request_headers": {"header_name": "x-nexus-key-id", "descriptor_key": "nexus_key_id"}}
    assert per_key == [from_header]
    placeholder = {"generic_key": {"descriptor_key": "nexus_plan", "descriptor_value": "-"}}
    assert per_plan == [placeholder, from_header]


def chat(stack: Stack, key: KeySpec, **headers: str) -> HttpResult:
    return stack.post("/v1/chat/completions", CHAT, key=key.secret, **headers)


def test_the_limit_is_enforced_per_key_with_headers(stack: Stack) -> None:
    for remaining in (2, 1, 0):
        resp = chat(stack, ALICE)
        assert resp.status == 200, (resp.body, stack.nexus_log()[-2000:])
        assert resp.json()["object"] == "chat.completion"  # the upstream answered
        assert resp.headers["ratelimit-policy"] == '"nexus.nexus_key_id";q=3;w=60'
        assert resp.headers["ratelimit"].startswith(f'"nexus.nexus_key_id";r={remaining};t=')
        assert "x-ratelimit-limit" not in resp.headers  # Envoy's draft-03 headers are off
    resp = chat(stack, ALICE)
    assert resp.status == 429
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert error["type"] == "rate_limit_exceeded" and error["code"] == "rate_limit_exceeded"
    assert "nexus.nexus_key_id" in error["message"]
    assert 1 <= int(resp.headers["retry-after"]) <= 20
    assert resp.headers["ratelimit"].startswith('"nexus.nexus_key_id";r=0;t=')
    # A spoofed identity header changes nothing: Envoy strips it and ext_authz sets the real one.
    spoofed = chat(stack, ALICE, x_nexus_key_id="bob")
    assert spoofed.status == 429
    # Another key has its own counter.
    assert chat(stack, BOB).status == 200


def test_a_plan_is_enforced_through_the_key_identity(stack: Stack) -> None:
    first = chat(stack, FREE)
    assert first.status == 200
    assert first.headers["ratelimit-policy"] == ('"nexus.nexus_key_id";q=3;w=60, "free-daily";q=2;w=86400')
    assert chat(stack, FREE).status == 200
    resp = chat(stack, FREE)
    assert resp.status == 429
    assert "free-daily" in resp.json()["error"]["message"]
    # Keys without the plan are not touched by the plan's rule.
    assert "free-daily" not in chat(stack, BOB).headers["ratelimit-policy"]


def test_a_429_from_the_rls_releases_what_ext_authz_reserved(stack: Stack) -> None:
    """ext_authz admitted the request (and took its one concurrency slot) before the ratelimit filter
    refused it; ext_proc sits before the ratelimit filter, sees the 429 and settles, so the slot is free
    again at once rather than after `reservations.ttl`."""
    assert chat(stack, SOLO).status == 200
    time.sleep(0.5)  # accounting is asynchronous (ext_proc observability mode); within the 1 s window
    refused = chat(stack, SOLO)
    assert refused.status == 429 and "nexus.nexus_key_id_solo" in refused.json()["error"]["message"]
    time.sleep(1.2)  # the RLS window (1 a second) has room again; the slot must be free too
    resp = chat(stack, SOLO)
    assert resp.status == 200, resp.body


def test_config_changes_apply_without_a_restart(stack: Stack) -> None:
    assert stack.config_path is not None
    path = stack.workdir / "rls" / "nexus.yaml"
    path.write_text(RLS_CONFIG.replace("requests_per_unit: 3", "requests_per_unit: 1"))
    deadline = time.monotonic() + 10
    resp = chat(stack, DAVE)
    while '"nexus.nexus_key_id";q=1;' not in resp.headers.get("ratelimit-policy", ""):
        assert time.monotonic() < deadline, "the new config was not picked up"
        time.sleep(0.1)
        resp = chat(stack, DAVE)
    assert resp.status in (200, 429)
    assert chat(stack, DAVE).status == 429
    # A broken edit keeps the last good config in force and is reported in the log.
    path.write_text(RLS_CONFIG.replace("unit: minute", "unit: fortnight"))
    deadline = time.monotonic() + 10
    while "ratelimit config rejected" not in stack.nexus_log():
        assert time.monotonic() < deadline, "the broken config was not reported"
        time.sleep(0.1)
    assert "descriptors[0].rate_limit.unit: unknown unit 'fortnight'" in stack.nexus_log()
    assert chat(stack, DAVE).status == 429  # still limited by the previous config


def test_the_service_statistics_are_on_metrics(stack: Stack) -> None:
    """Issue 18 item 10: after the calls above (429s, a rejected reload), /metrics shows them."""
    from tests.e2e.stack import http

    text = http("GET", stack.admin + "/metrics").body.decode()
    over = [
        line
        for line in text.splitlines()
        if line.startswith('nexus_authz_ratelimit_calls_total{result="over_limit"}')
    ]
    assert over and float(over[0].split()[-1]) >= 1, over
    assert 'nexus_authz_ratelimit_rule_hits_total{rule="nexus.nexus_key_id"}' in text
    assert 'nexus_authz_ratelimit_config_reloads_total{outcome="rejected"}' in text
    assert "nexus_authz_ratelimit_config_error 1.0" in text
