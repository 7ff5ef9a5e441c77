"""Token accounting through the real Envoy (Lua usage tap + gRPC access log by default, or ext_proc): the
upstream's usage settles the reservation and feeds the ledger."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nexus_authz.core.body import request_facts
from nexus_authz.stores.ledger import UsageRow, query_db
from tests.e2e.stack import Stack
from tests.helpers import KeySpec

CONFIG = """
ledger:
  path: usage.sqlite3
  flush_interval: 100ms
plans:
  metered:
    limits:
      - {tokens: 100000, per: day}
prices:
  "gpt-4o*": {input: 2.5, cached_input: 1.25, output: 10}
  "claude-*": {input: 3, output: 15}
"""
CHAT_KEY = KeySpec("chat", extra={"plan": "metered"})
STREAM_KEY = KeySpec("stream", extra={"plan": "metered"})
CLAUDE_KEY = KeySpec("claude", extra={"credential": "openai"})
SETTLE_KEY = KeySpec("settle", extra={"plan": "metered"})
CUT_KEY = KeySpec("cut")
ERROR_KEY = KeySpec("error", extra={"plan": "metered"})
GONE_KEYS = {
    "mid_stream": KeySpec("gone-stream", extra={"plan": "metered"}),
    "before_response": KeySpec("gone-early", extra={"plan": "metered"}),
}
VICTIM_KEY = KeySpec("victim", extra={"tenant": "victim-co"})
BARRIER_KEY = KeySpec("barrier")
NO_USAGE_KEYS = (KeySpec("bare"), KeySpec("bare-metered", extra={"plan": "metered"}))
KEYS = (
    *NO_USAGE_KEYS,
    CHAT_KEY,
    STREAM_KEY,
    CLAUDE_KEY,
    SETTLE_KEY,
    CUT_KEY,
    ERROR_KEY,
    *GONE_KEYS.values(),
    VICTIM_KEY,
    BARRIER_KEY,
)


# (ext_authz transport, accounting path): the default configs (Lua usage tap + gRPC access log) and the
# ext_proc variant (envoy/envoy-extproc.yaml)
@pytest.fixture(params=[("http", "als"), ("grpc", "als"), ("http", "extproc")], ids="-".join, scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    workdir = Path(tempfile.mkdtemp(prefix="nx-acct-"))
    mode, accounting = request.param
    s = Stack(workdir=workdir, mode=mode, accounting=accounting, keys=KEYS, extra_config=CONFIG)
    try:
        s.start()
        yield s
    finally:
        s.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def ledger_rows(stack: Stack, key_id: str, *, expect_requests: int, timeout: float = 10.0) -> list[UsageRow]:
    """The key's ledger rows once they account for `expect_requests` requests (flushes are batched)."""
    deadline = time.monotonic() + timeout
    rows: list[UsageRow] = []
    while time.monotonic() < deadline:
        try:
            rows = query_db(stack.workdir / "usage.sqlite3", key_id=key_id)
        except FileNotFoundError:
            rows = []
        if sum(r.requests for r in rows) >= expect_requests:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"ledger for {key_id} has {rows}, expected {expect_requests} requests")


def sse_usage(body: bytes) -> dict[str, int]:
    usage = None
    for line in body.splitlines():
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
    assert usage is not None
    return usage


def test_json_response_usage_lands_in_the_ledger(stack: Stack) -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 50,
    }
    resp = stack.post("/v1/chat/completions", body, key=CHAT_KEY.secret)
    assert resp.status == 200
    usage = resp.json()["usage"]
    (row,) = ledger_rows(stack, "chat", expect_requests=1)
    assert row.model == "gpt-4o-mini"
    assert (row.prompt_tokens, row.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    expected_cost = usage["prompt_tokens"] * 2.5 + usage["completion_tokens"] * 10
    assert row.cost_micro_usd == pytest.approx(expected_cost, abs=1)
    (origin,) = query_db(stack.workdir / "usage.sqlite3", key_id="chat", group_by=("source", "price_rule"))
    assert (origin.source, origin.price_rule) == ("reported", "gpt-4o*")  # issue 16 item 6


def test_streaming_response_usage_lands_in_the_ledger(stack: Stack) -> None:
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "Stream please"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    resp = stack.post("/v1/chat/completions", body, key=STREAM_KEY.secret)
    assert resp.status == 200
    usage = sse_usage(resp.body)
    (row,) = ledger_rows(stack, "stream", expect_requests=1)
    assert (row.prompt_tokens, row.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])


def test_anthropic_stream(stack: Stack) -> None:
    body = {
        "model": "claude-3-5-haiku",
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    resp = stack.post("/v1/messages", body, key=CLAUDE_KEY.secret)
    assert resp.status == 200
    start = delta = None
    for line in resp.body.splitlines():
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            if event["type"] == "message_start":
                start = event["message"]["usage"]
            elif event["type"] == "message_delta":
                delta = event["usage"]
    assert start is not None and delta is not None
    (row,) = ledger_rows(stack, "claude", expect_requests=1)
    assert row.model == "claude-3-5-haiku"
    assert row.prompt_tokens == start["input_tokens"]
    assert row.completion_tokens == delta["output_tokens"]  # cumulative: the latest, never summed


def test_remaining_tokens_reflect_the_settled_amount(stack: Stack) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Count"}], "max_tokens": 5000}
    first = stack.post("/v1/chat/completions", body, key=SETTLE_KEY.secret)
    assert first.status == 200
    reserved_first = 100000 - int(first.headers["x-ratelimit-remaining-tokens"])
    actual_first = first.json()["usage"]["total_tokens"]
    assert reserved_first > 5000 > actual_first
    ledger_rows(stack, "settle", expect_requests=1)  # accounted (settled) by now
    second = stack.post("/v1/chat/completions", body, key=SETTLE_KEY.secret)
    reserve_second = request_facts(json.dumps(body).encode(), precise=False).prompt_tokens + 5000
    # The day window is a sliding one: nothing refills within the test, so the figure is exact.
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == 100000 - actual_first - reserve_second


def test_error_response_is_charged_nothing(stack: Stack) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}
    resp = stack.post("/v1/chat/completions", body, key=ERROR_KEY.secret, x_mock_status="500")
    assert resp.status == 500
    (row,) = ledger_rows(stack, "error", expect_requests=1)
    assert row.prompt_tokens == row.completion_tokens == row.cost_micro_usd == 0
    ok = stack.post("/v1/chat/completions", body, key=ERROR_KEY.secret)
    # the failed request's reservation was released: only this one is reserved now
    reserve = request_facts(json.dumps(body).encode(), precise=False).prompt_tokens + 1000
    assert int(ok.headers["x-ratelimit-remaining-tokens"]) == 100000 - reserve


def test_a_stream_without_usage_records_the_prompt_on_any_key(stack: Stack) -> None:
    # issue 16 item 7: a stream without a usage record (no include_usage) is charged the prompt estimate
    # plus the completion counted; a key without token limits once recorded 0 prompt tokens.
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "No usage, please"}],
        "stream": True,
    }
    prompt = request_facts(json.dumps(body).encode(), precise=False).prompt_tokens
    assert prompt > 0
    recorded = []
    for key in NO_USAGE_KEYS:
        resp = stack.post("/v1/chat/completions", body, key=key.secret)
        assert resp.status == 200 and b'"usage"' not in resp.body
        (row,) = ledger_rows(stack, key.id, expect_requests=1)
        recorded.append((row.prompt_tokens, row.completion_tokens > 0))
        (origin,) = query_db(stack.workdir / "usage.sqlite3", key_id=key.id, group_by=("source",))
        assert origin.source == "counted"
    assert recorded == [(prompt, True), (prompt, True)]


def test_stream_cut_off_is_charged_what_was_seen(stack: Stack) -> None:
    import http.client

    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "cut"}], "stream": True}
    with pytest.raises(http.client.IncompleteRead):  # the upstream hangs up mid-stream
        stack.post("/v1/chat/completions", body, key=CUT_KEY.secret, x_mock_cut_after="5")
    (row,) = ledger_rows(stack, "cut", expect_requests=1)
    # role chunk + 4 content tokens seen before the cut: some completion tokens, charged from content
    assert 1 <= row.completion_tokens <= 8


def _hang_up(stack: Stack, body: dict[str, object], key: KeySpec, after: float, **headers: str) -> bytes:
    """Send a request and drop the connection `after` seconds later (as `curl -m`); the bytes read."""
    import socket

    raw = json.dumps(body).encode()
    port = int(stack.gateway.rsplit(":", 1)[1])
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {key.secret}\r\ncontent-length: {len(raw)}\r\n"
        + "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
        + "\r\n"
    )
    seen = b""
    with socket.create_connection(("127.0.0.1", port), timeout=after) as sock:
        sock.sendall(head.encode() + raw)
        deadline = time.monotonic() + after
        try:
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                data = sock.recv(65536)
                if not data:
                    break
                seen += data
        except TimeoutError:
            pass
    return seen


@pytest.mark.parametrize("when", sorted(GONE_KEYS))
def test_client_that_hangs_up_keeps_its_reservation_charged(stack: Stack, when: str) -> None:
    # issue 13 item 4: a 2,000-token reservation dropped with `curl -m 0.5` must stay charged (SECURITY.md),
    # not shrink to the prompt estimate plus what the stream showed before the client left.
    key = GONE_KEYS[when]
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "long"}], "max_tokens": 2000}
    reserve = request_facts(json.dumps(body).encode(), precise=False).prompt_tokens + 2000
    if when == "mid_stream":
        seen = _hang_up(stack, {**body, "stream": True}, key, 0.5, x_mock_chunk_delay_ms="150")
        assert b"200 OK" in seen and b"data: " in seen  # the stream had started
        reserve = (
            request_facts(json.dumps({**body, "stream": True}).encode(), precise=False).prompt_tokens + 2000
        )
    else:
        assert _hang_up(stack, body, key, 0.5, x_mock_delay_ms="1500") == b""
    (row,) = ledger_rows(stack, key.id, expect_requests=1)  # accounted (settled) by now
    assert row.completion_tokens < 20  # the ledger records what was seen...
    probe = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10}
    resp = stack.post("/v1/chat/completions", probe, key=key.secret)
    assert resp.status == 200
    probe_reserve = request_facts(json.dumps(probe).encode(), precise=False).prompt_tokens + 10
    # ...and the limits keep the whole first reservation (the window is sliding: nothing refills here)
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) == 100000 - reserve - probe_reserve


def test_a_request_envoy_refuses_early_adds_no_ledger_row(stack: Stack) -> None:
    # issue 13 item 8: Envoy refuses a path with %00 before its header_mutation filter runs, and still
    # logs the request with the client's own x-nexus-key-id / x-nexus-tenant. nexus-authz never admitted
    # it: no ledger row, under any key.
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    forged = {"x_nexus_key_id": VICTIM_KEY.id, "x_nexus_tenant": "victim-co"}
    for path in ("/v1/chat/completions%00", "/v1/%00/completions"):
        resp = stack.post(path, body, key=CHAT_KEY.secret, **forged)
        assert resp.status == 400, (path, resp.status)
    # a normal request after them: once it is in the ledger, so would they be (one stream, in order)
    assert stack.post("/v1/chat/completions", body, key=BARRIER_KEY.secret, **forged).status == 200
    ledger_rows(stack, BARRIER_KEY.id, expect_requests=1)
    assert query_db(stack.workdir / "usage.sqlite3", key_id=VICTIM_KEY.id) == []
    assert query_db(stack.workdir / "usage.sqlite3", tenant="victim-co") == []
