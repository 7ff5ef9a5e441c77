"""The mock upstream's wire shapes: what the e2e tests, the demo and the usage parsers rely on."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from nexus_authz.demo.mock_upstream import (
    MODELS,
    REPLY_TOKENS,
    MockUpstreamThread,
    completion_tokens,
    prompt_tokens,
    start_in_thread,
)
from nexus_authz.demo.procs import free_port, stop_process, wait_http_ready

pytestmark = pytest.mark.e2e

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello in five words."}]}


@pytest.fixture(scope="module")
def mock() -> Iterator[MockUpstreamThread]:
    with start_in_thread() as server:
        yield server


@pytest.fixture(scope="module")
def mock_always_usage() -> Iterator[MockUpstreamThread]:
    with start_in_thread(always_usage=True) as server:
        yield server


def request(
    server: MockUpstreamThread,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        payload = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        conn.request(method, path, payload, {"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def sse_events(raw: bytes) -> list[tuple[str | None, str]]:
    """Split an SSE body into (event name, data) pairs, the way a client parser would."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        name, data = None, []
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        events.append((name, "\n".join(data)))
    return events


# --- OpenAI chat completions ------------------------------------------------------------------------------


def test_chat_json_has_deterministic_usage(mock: MockUpstreamThread) -> None:
    status, headers, body = request(mock, "POST", "/v1/chat/completions", CHAT)
    assert status == 200
    assert headers["content-type"] == "application/json"
    data = json.loads(body)
    assert data["object"] == "chat.completion"
    assert data["model"] == "gpt-4o-mini"
    assert data["choices"][0]["message"]["content"] == "".join(REPLY_TOKENS)
    assert data["choices"][0]["finish_reason"] == "stop"
    p = prompt_tokens(CHAT, "chat")
    assert p == -(-len(json.dumps(CHAT["messages"], separators=(",", ":"))) // 4)
    assert data["usage"]["prompt_tokens"] == p
    assert data["usage"]["completion_tokens"] == len(REPLY_TOKENS)
    assert data["usage"]["total_tokens"] == p + len(REPLY_TOKENS)


def test_chat_max_tokens_caps_completion(mock: MockUpstreamThread) -> None:
    payload = {**CHAT, "max_completion_tokens": 3}
    data = json.loads(request(mock, "POST", "/v1/chat/completions", payload)[2])
    assert data["usage"]["completion_tokens"] == 3 == completion_tokens(payload, "chat")
    assert data["choices"][0]["message"]["content"] == "".join(REPLY_TOKENS[:3])
    assert data["choices"][0]["finish_reason"] == "length"


def test_chat_stream_with_include_usage(mock: MockUpstreamThread) -> None:
    payload = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 5}
    status, headers, body = request(mock, "POST", "/v1/chat/completions", payload)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["transfer-encoding"] == "chunked"
    events = sse_events(body)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert content == list(REPLY_TOKENS[:5])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5
    assert usage_chunk["usage"]["prompt_tokens"] == prompt_tokens(payload, "chat")
    assert all(c["usage"] is None for c in chunks[:-1])  # as OpenAI sends it


def test_chat_stream_without_include_usage_has_no_usage(mock: MockUpstreamThread) -> None:
    events = sse_events(request(mock, "POST", "/v1/chat/completions", {**CHAT, "stream": True})[2])
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert events[-1] == (None, "[DONE]")
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert len(chunks) == 1 + len(REPLY_TOKENS) + 1


def test_always_usage_sends_the_usage_chunk_anyway(mock_always_usage: MockUpstreamThread) -> None:
    events = sse_events(
        request(mock_always_usage, "POST", "/v1/chat/completions", {**CHAT, "stream": True})[2]
    )
    last = json.loads(events[-2][1])
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == len(REPLY_TOKENS)


# --- Anthropic messages -----------------------------------------------------------------------------------

MESSAGES = {
    "model": "claude-3-5-haiku-latest",
    "max_tokens": 100,
    "system": "Be brief.",
    "messages": [{"role": "user", "content": "Hi"}],
}


def test_messages_json(mock: MockUpstreamThread) -> None:
    data = json.loads(request(mock, "POST", "/v1/messages", MESSAGES)[2])
    assert data["type"] == "message"
    assert data["content"] == [{"type": "text", "text": "".join(REPLY_TOKENS)}]
    assert data["stop_reason"] == "end_turn"
    p = prompt_tokens(MESSAGES, "messages")
    assert p == -(-len(json.dumps(["Be brief.", MESSAGES["messages"]], separators=(",", ":"))) // 4)
    assert data["usage"]["input_tokens"] == p
    assert data["usage"]["output_tokens"] == len(REPLY_TOKENS)


def test_messages_stream_event_sequence_and_cumulative_usage(mock: MockUpstreamThread) -> None:
    payload = {**MESSAGES, "stream": True, "max_tokens": 4}
    events = sse_events(request(mock, "POST", "/v1/messages", payload)[2])
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    datas = [json.loads(data) for _, data in events]
    assert all(d["type"] == name for d, name in zip(datas, names, strict=True))
    assert datas[0]["message"]["usage"]["input_tokens"] == prompt_tokens(payload, "messages")
    assert "".join(d["delta"]["text"] for d in datas[3:7]) == "".join(REPLY_TOKENS[:4])
    delta = datas[-2]
    assert delta["delta"]["stop_reason"] == "max_tokens"
    # Cumulative: the latest value, not a sum with message_start's.
    assert delta["usage"]["output_tokens"] == 4


# --- OpenAI Responses -------------------------------------------------------------------------------------


def test_responses_json(mock: MockUpstreamThread) -> None:
    payload = {"model": "gpt-4o", "instructions": "Be brief.", "input": "Hello"}
    data = json.loads(request(mock, "POST", "/v1/responses", payload)[2])
    assert data["object"] == "response"
    assert data["status"] == "completed"
    assert data["output"][0]["content"][0]["text"] == "".join(REPLY_TOKENS)
    assert data["usage"]["input_tokens"] == prompt_tokens(payload, "responses")
    assert data["usage"]["output_tokens"] == len(REPLY_TOKENS)


def test_responses_stream_ends_with_completed(mock: MockUpstreamThread) -> None:
    payload = {"model": "gpt-4o", "input": [{"role": "user", "content": "Hi"}], "stream": True}
    events = sse_events(request(mock, "POST", "/v1/responses", payload)[2])
    names = [name for name, _ in events]
    assert names[0] == "response.created"
    assert names[-1] == "response.completed"
    assert names.count("response.output_text.delta") == len(REPLY_TOKENS)
    datas = [json.loads(data) for _, data in events]
    assert [d["sequence_number"] for d in datas] == list(range(len(datas)))
    final = datas[-1]["response"]
    assert final["usage"]["output_tokens"] == len(REPLY_TOKENS)
    assert final["usage"]["input_tokens"] == prompt_tokens(payload, "responses")


def test_responses_stream_cut_by_max_output_tokens_is_incomplete(mock: MockUpstreamThread) -> None:
    payload = {"model": "gpt-4o", "input": "Hi", "stream": True, "max_output_tokens": 2}
    events = sse_events(request(mock, "POST", "/v1/responses", payload)[2])
    assert events[-1][0] == "response.incomplete"
    final = json.loads(events[-1][1])["response"]
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["usage"]["output_tokens"] == 2


# --- models, errors, knobs --------------------------------------------------------------------------------


def test_models(mock: MockUpstreamThread) -> None:
    data = json.loads(request(mock, "GET", "/v1/models")[2])
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == list(MODELS)


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/chat/completions", b"{not json", 400),
        ("POST", "/v1/chat/completions", b"[1, 2]", 400),
        ("POST", "/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400),
        ("GET", "/v1/chat/completions", None, 405),
        ("POST", "/v1/nope", {}, 404),
    ],
)
def test_errors_are_openai_shaped(
    mock: MockUpstreamThread, method: str, path: str, body: Any, status: int
) -> None:
    got, headers, raw = request(mock, method, path, body)
    assert got == status
    assert headers["content-type"] == "application/json"
    assert set(json.loads(raw)["error"]) >= {"message", "type", "code"}


def test_forced_status(mock: MockUpstreamThread) -> None:
    status, _, raw = request(mock, "POST", "/v1/chat/completions", CHAT, {"x-mock-status": "429"})
    assert status == 429
    assert json.loads(raw)["error"]["type"] == "rate_limit_exceeded"
    status, _, raw = request(mock, "POST", "/v1/messages", MESSAGES, {"x-mock-status": "529"})
    assert status == 529
    assert json.loads(raw)["type"] == "error"


def test_cut_after_closes_mid_stream(mock: MockUpstreamThread) -> None:
    body = json.dumps({**CHAT, "stream": True, "stream_options": {"include_usage": True}}).encode()
    raw = _raw_exchange(
        mock,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"x-mock-cut-after: 3\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body),
    )
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert raw.count(b"data: ") == 3
    assert not raw.endswith(b"0\r\n\r\n")  # no terminating chunk: the stream was cut off


def test_stream_events_are_sent_as_they_are_produced(mock: MockUpstreamThread) -> None:
    body = json.dumps({**CHAT, "stream": True}).encode()
    with socket.create_connection((mock.host, mock.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"x-mock-chunk-delay-ms: 100\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)
        )
        first = b""
        while b"data: " not in first:
            first += sock.recv(65536)
        # 16 more events are 1.6 s away: the first arrives alone, not with the whole stream.
        assert b"[DONE]" not in first


def test_oversized_body_is_413() -> None:
    with start_in_thread(max_body_bytes=1000) as server:
        assert request(server, "POST", "/v1/chat/completions", b"x" * 5000)[0] == 413
        assert request(server, "POST", "/v1/chat/completions", b"{bad")[0] == 400


def test_keep_alive_and_pipelining(mock: MockUpstreamThread) -> None:
    one = b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n"
    raw = _raw_exchange(mock, one * 3, expect_responses=3)
    assert raw.count(b"HTTP/1.1 200 OK") == 3


def _raw_exchange(mock: MockUpstreamThread, data: bytes, expect_responses: int | None = None) -> bytes:
    with socket.create_connection((mock.host, mock.port), timeout=5) as sock:
        sock.sendall(data)
        raw = b""
        while True:
            done = expect_responses is not None and raw.count(b"HTTP/1.1 ") == expect_responses
            if done and raw.endswith(b"]}"):
                return raw
            chunk = sock.recv(65536)
            if not chunk:
                return raw
            raw += chunk


# --- recording --------------------------------------------------------------------------------------------


def test_recording_newest_last_and_clear() -> None:
    with start_in_thread(record_limit=2) as server:
        for n in range(3):
            request(server, "POST", f"/v1/chat/completions?n={n}", CHAT, {"authorization": f"Bearer k{n}"})
        status, _, raw = request(server, "GET", "/__mock__/requests")
        assert status == 200
        seen = json.loads(raw)
        assert [r["path"] for r in seen] == ["/v1/chat/completions?n=1", "/v1/chat/completions?n=2"]
        assert seen[-1]["method"] == "POST"
        assert seen[-1]["headers"]["authorization"] == "Bearer k2"
        assert json.loads(seen[-1]["body"]) == CHAT
        assert server.requests() == seen  # the in-process view is the same list
        assert request(server, "DELETE", "/__mock__/requests")[0] == 200
        assert json.loads(request(server, "GET", "/__mock__/requests")[2]) == []


def test_recording_joins_repeated_headers() -> None:
    with start_in_thread() as server:
        _raw_exchange(server, b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-a: 1\r\nx-a: 2\r\n\r\n", 1)
        assert server.requests()[-1]["headers"]["x-a"] == "1, 2"


# --- clients and the command line -------------------------------------------------------------------------


def test_openai_sdk_parses_every_shape(mock: MockUpstreamThread) -> None:
    client = openai.OpenAI(base_url=mock.url + "/v1", api_key="sk-test", max_retries=0)
    chat = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert chat.usage is not None and chat.usage.completion_tokens == len(REPLY_TOKENS)
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(REPLY_TOKENS)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(REPLY_TOKENS)
    response = client.responses.create(model="gpt-4o", input="hello")
    assert response.output_text == "".join(REPLY_TOKENS)
    assert [m.id for m in client.models.list()] == list(MODELS)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="m", messages=[], extra_headers={"x-mock-status": "429"})
    assert mock.requests()[-1]["headers"]["authorization"] == "Bearer sk-test"
    client.close()


def test_command_line_serves_and_stops_on_sigterm(tmp_path: Any) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus_authz.demo.mock_upstream", "--port", str(port), "--always-usage"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http_ready(f"http://127.0.0.1:{port}/healthz", 10, process=proc, expect_status=200)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/v1/chat/completions", json.dumps({**CHAT, "stream": True}))
        events = sse_events(conn.getresponse().read())
        conn.close()
        assert json.loads(events[-2][1])["choices"] == []  # --always-usage took effect
    finally:
        code = stop_process(proc)
        output = proc.stdout.read().decode() if proc.stdout else ""
        if proc.stdout:
            proc.stdout.close()
    assert code == 0, output
    assert f"listening on http://127.0.0.1:{port}" in output
