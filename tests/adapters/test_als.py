"""Token accounting over Envoy's gRPC access log: the Lua usage tap (envoy/nexus-usage.lua, run in
LuaJIT through lupa with a fake stream handle) and the AccessLogService adapter (in-process grpc.aio,
hand-built StreamAccessLogsMessage). Together they must give what the core parser gives for the whole
body, whatever the chunking; the end-to-end suite checks the same through the real Envoy."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import struct_pb2

from nexus_authz.adapters.envoy_als import (
    METADATA_NAMESPACE,
    AccessLogService,
    Snippet,
    snippet_of,
    usage_of,
)
from nexus_authz.core.body import request_facts
from nexus_authz.core.tokens import count_tokens
from nexus_authz.core.usage import Usage, usage_from_body
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from tests.adapters.conftest import ALICE
from tests.helpers import KeySpec, write_config

REPO = Path(__file__).resolve().parents[2]
LUA_SOURCE = (REPO / "envoy" / "nexus-usage.lua").read_bytes()
FIXTURES = REPO / "tests" / "fixtures" / "usage"
NAMES = sorted(p.name for p in FIXTURES.iterdir())
HINT = 100
NULL = object()  # what Envoy stores for a key set to nil


def ctype(name: str) -> str:
    return "text/event-stream" if name.endswith(".sse") else "application/json"


def whole(body: bytes, content_type: str, encoding: str | None = None) -> Usage:
    return usage_from_body(
        body,
        content_type=content_type,
        content_encoding=encoding,
        prompt_tokens_hint=HINT,
        count_tokens=count_tokens,
    )


# --- the Lua filter, outside Envoy ------------------------------------------------------------------------

_HARNESS = b"""
local NULL = ...
return function(headers, chunks, delivered, b64)
  local meta = {}
  local handle = {}
  function handle:headers() return { get = function(_, k) return headers[k] end } end
  function handle:base64Escape(s) return b64(s) end
  function handle:streamInfo()
    return { dynamicMetadata = function()
      return { get = function(_, ns) return nil end, -- no ext_authz metadata: no slot to release
               set = function(_, ns, k, v)
        assert(ns == "nexus.usage")
        if v == nil then meta[k] = NULL else meta[k] = v end
      end }
    end }
  end
  function handle:bodyChunks()
    local i = 0
    return function()
      coroutine.yield() -- Envoy suspends the script until the next chunk (or the end) arrives
      i = i + 1
      local c = chunks[i]
      if c == nil then return nil end
      return { length = function() return #c end,
               getBytes = function(_, start, n) return string.sub(c, start + 1, start + n) end }
    end
  end
  local whole = false
  function handle:body() -- Envoy buffers the body and resumes the script once, at its end
    whole = true
    for _ = 1, #chunks + 1 do coroutine.yield() end
    if #chunks == 0 then return nil end
    local c = table.concat(chunks)
    return { length = function() return #c end,
             getBytes = function(_, start, n) return string.sub(c, start + 1, start + n) end }
  end
  local co = coroutine.create(envoy_on_response)
  assert(coroutine.resume(co, handle))
  for _ = 1, delivered do -- a reset: Envoy never resumes the coroutine again
    if coroutine.status(co) == "dead" then break end
    local ok, err = coroutine.resume(co)
    assert(ok, err)
  end
  return meta, coroutine.status(co), whole
end
"""


@pytest.fixture(scope="module")
def lua() -> Any:
    lupa = pytest.importorskip("lupa.luajit21")
    runtime = lupa.LuaRuntime(encoding=None)
    runtime.execute(LUA_SOURCE)
    return runtime, runtime.execute(_HARNESS, NULL)


def run_lua(
    lua: Any,
    body: bytes,
    cuts: Sequence[int],
    *,
    content_type: str,
    encoding: str | None = None,
    cut: int = -1,
) -> tuple[dict[str, Any], bool]:
    """Metadata the filter leaves for a body split at `cuts`; `cut` >= 0: the stream is reset after that
    many chunks. Returns (metadata as Python values, whether the script ran to its end)."""
    meta, finished, _ = run_lua_framed(lua, body, cuts, content_type=content_type, encoding=encoding, cut=cut)
    return meta, finished


def run_lua_framed(
    lua: Any,
    body: bytes,
    cuts: Sequence[int],
    *,
    content_type: str,
    encoding: str | None = None,
    cut: int = -1,
    content_length: bool = False,
) -> tuple[dict[str, Any], bool, bool]:
    """run_lua, with the response's content-length when `content_length`; also returns whether the
    script read the body whole (body()) rather than chunk by chunk (bodyChunks())."""
    points = sorted({c for c in cuts if 0 < c < len(body)} | {0, len(body)})
    chunks = [body[a:b] for a, b in zip(points, points[1:], strict=False)]
    headers = {b"content-type": content_type.encode()}
    if encoding:
        headers[b"content-encoding"] = encoding.encode()
    if content_length:
        headers[b"content-length"] = str(len(body)).encode()
    delivered = len(chunks) + 1 if cut < 0 else cut
    runtime, harness = lua
    meta, status, whole = harness(
        runtime.table_from(headers), runtime.table_from(chunks), delivered, base64.b64encode
    )
    return _python(meta), status == b"dead", bool(whole)


def _python(value: Any) -> Any:
    if value is NULL:
        return None
    if isinstance(value, bytes):
        return value.decode()
    if hasattr(value, "items"):
        return {_python(k): _python(v) for k, v in value.items()}
    return value


def entry_with(
    meta: dict[str, Any] | None,
    *,
    content_type: str | None = None,
    encoding: str | None = None,
    key_id: str | None = "alice",
    request_id: str = "req-1",
) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.request.request_id = request_id
    if key_id is not None:
        entry.request.request_headers["x-nexus-key-id"] = key_id
        entry.request.request_headers["x-nexus-tenant"] = "acme"
    entry.response.response_code.value = 200
    if content_type:
        entry.response.response_headers["content-type"] = content_type
    if encoding:
        entry.response.response_headers["content-encoding"] = encoding
    if meta is not None:
        struct = struct_pb2.Struct()
        struct.update(meta)
        entry.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].CopyFrom(struct)
    return entry


def accounted(meta: dict[str, Any], content_type: str, encoding: str | None = None) -> tuple[Usage, bool]:
    """The usage the adapter derives from the metadata (through a real protobuf entry)."""
    entry = entry_with(meta, content_type=content_type, encoding=encoding)
    usage, _, keep = usage_of(
        snippet_of(entry),
        content_type=content_type,
        content_encoding=encoding,
        prompt_tokens_hint=HINT,
        count_tokens=count_tokens,
    )
    return usage, keep


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", range(4))
def test_lua_snippet_gives_the_whole_body_usage(lua: Any, name: str, seed: int) -> None:
    body = (FIXTURES / name).read_bytes()
    rng = random.Random(seed)
    cuts = [rng.randrange(len(body) + 1) for _ in range(rng.choice([0, 3, 40]))]
    meta, finished = run_lua(lua, body, cuts, content_type=ctype(name))
    assert finished
    assert all(v is None for k, v in meta.items() if k.startswith("p")), "checkpoints nulled at the end"
    usage, keep = accounted(meta, ctype(name))
    assert usage == whole(body, ctype(name))
    assert not keep


def test_lua_keeps_only_usage_events_of_a_stream_with_a_final_record(lua: Any) -> None:
    body = (FIXTURES / "anthropic_stream.sse").read_bytes()
    meta, _ = run_lua(lua, body, range(0, len(body), 50), content_type="text/event-stream")
    assert meta["u"]["k"] == "sse"
    kept = base64.b64decode(meta["u"]["b"])
    events = [e for e in kept.split(b"\n\n") if e]
    assert len(events) == 3  # message_start + two cumulative message_delta events
    assert b"message_start" in events[0] and all(b"message_delta" in e for e in events[1:])
    assert len(kept) < len(body) / 3


@pytest.mark.parametrize("data_only", [False, True])
def test_lua_fake_usage_in_an_echoed_event_is_not_a_final_record(lua: Any, data_only: bool) -> None:
    # issue 13: response.created echoes the request's tools, which may hold a `"usage": {...}` object with
    # token counts. A stream that ends without response.completed must keep its content deltas, or it
    # would be charged only the prompt estimate.
    body = (FIXTURES / "openai_responses_stream_echoed_usage.sse").read_bytes()
    body = b"".join(e + b"\n\n" for e in body.split(b"\n\n") if e and b"response.completed" not in e)
    if data_only:
        body = b"".join(line + b"\n" for line in body.split(b"\n")[:-1] if not line.startswith(b"event:"))
    meta, finished = run_lua(lua, body, range(0, len(body), 300), content_type="text/event-stream")
    assert finished
    usage, _ = accounted(meta, "text/event-stream")
    assert usage == whole(body, "text/event-stream")
    assert usage.source == "estimated" and usage.completion_tokens > 5


def test_lua_crlf_stream(lua: Any) -> None:
    body = (FIXTURES / "openai_chat_stream_usage.sse").read_bytes().replace(b"\n", b"\r\n")
    meta, _ = run_lua(lua, body, range(1, len(body), 7), content_type="text/event-stream")
    assert meta["u"]["k"] == "sse"
    assert accounted(meta, "text/event-stream")[0] == whole(body, "text/event-stream")


@pytest.mark.parametrize("name", [n for n in NAMES if n.endswith(".sse")])
@pytest.mark.parametrize("delivered", [1, 3, 9])
def test_lua_cut_off_stream_leaves_the_chunks_seen(lua: Any, name: str, delivered: int) -> None:
    body = (FIXTURES / name).read_bytes()
    cuts = list(range(61, len(body), 61))
    delivered = min(delivered, len(cuts))  # always before the end
    meta, finished = run_lua(lua, body, cuts, content_type="text/event-stream", cut=delivered)
    assert not finished and "u" not in meta
    seen = body[: 61 * delivered]
    assert accounted(meta, "text/event-stream")[0] == whole(seen, "text/event-stream")


@pytest.mark.parametrize("name", ["openai_chat_stream_usage.sse", "openai_chat.json"])
def test_lua_compressed_body_is_passed_through(lua: Any, name: str) -> None:
    body = (FIXTURES / name).read_bytes()
    packed = gzip.compress(body)
    meta, _ = run_lua(lua, packed, range(5, len(packed), 11), content_type=ctype(name), encoding="gzip")
    assert meta["u"]["k"] == "body"
    assert accounted(meta, ctype(name), "gzip") == (whole(body, ctype(name)), False)


def test_lua_long_stream_keeps_head_and_tail_and_the_final_record(lua: Any) -> None:
    event = b'data: {"choices":[{"delta":{"content":"' + b"x" * 200 + b'"}}]}\n\n'
    usage_event = b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":99999}}\n\n'
    body = event * 8000 + usage_event + b"data: [DONE]\n\n"  # ~1.9 MiB: over the 1 MiB cap
    meta, _ = run_lua(lua, body, range(0, len(body), 4096), content_type="text/event-stream")
    assert meta["u"]["k"] == "sse" and meta["u"]["x"] > 0
    assert accounted(meta, "text/event-stream")[0] == Usage(prompt_tokens=7, completion_tokens=99999)


def test_lua_long_stream_without_usage_extrapolates_what_it_dropped(lua: Any) -> None:
    event = b'data: {"choices":[{"delta":{"content":"' + b"word " * 40 + b'"}}]}\n\n'
    body = event * 8000  # ~1.9 MiB, no usage record
    meta, _ = run_lua(lua, body, range(0, len(body), 4096), content_type="text/event-stream")
    assert meta["u"]["k"] == "sse" and meta["u"]["x"] > 0
    usage, _ = accounted(meta, "text/event-stream")
    exact = whole(body, "text/event-stream")
    assert usage.source == "estimated"
    assert abs(usage.completion_tokens - exact.completion_tokens) <= 0.02 * exact.completion_tokens


def test_lua_long_json_keeps_its_tail(lua: Any) -> None:
    doc = {"object": "list", "data": [{"embedding": [0.001] * 1000}] * 200, "usage": {"prompt_tokens": 8}}
    body = json.dumps(doc).encode()  # ~1.2 MiB, usage at the end (OpenAI embeddings)
    meta, _ = run_lua(lua, body, range(0, len(body), 16384), content_type="application/json")
    assert meta["u"]["k"] == "tail"
    usage, keep = accounted(meta, "application/json")
    assert usage == whole(body, "application/json") and not keep


def test_lua_long_compressed_body_is_over(lua: Any) -> None:
    body = bytes(random.Random(1).randbytes(1_200_000))  # incompressible
    meta, _ = run_lua(lua, body, range(0, len(body), 65536), content_type="application/json", encoding="gzip")
    assert meta["u"] == {"k": "over", "x": meta["u"]["x"]}
    usage, keep = accounted(meta, "application/json", "gzip")
    assert keep and usage == Usage(prompt_tokens=HINT, source="estimated")


def test_lua_empty_body(lua: Any) -> None:
    meta, finished = run_lua(lua, b"", [], content_type="application/json")
    assert finished and meta["u"]["k"] == "body"


@pytest.mark.parametrize("name", NAMES)
def test_lua_small_body_of_known_length_is_read_whole_to_the_same_snippet(lua: Any, name: str) -> None:
    """A plain body with a content-length up to 64 KiB (a JSON completion) is read whole: one resume of
    the script instead of one per chunk. It must leave what reading it chunk by chunk leaves; streams keep
    the chunk path (their checkpoints)."""
    body = (FIXTURES / name).read_bytes()
    cuts = range(0, len(body), 97)
    chunked, _ = run_lua(lua, body, cuts, content_type=ctype(name))
    meta, finished, whole_read = run_lua_framed(
        lua, body, cuts, content_type=ctype(name), content_length=True
    )
    assert finished and meta == chunked
    assert whole_read == (not name.endswith(".sse"))
    usage, keep = accounted(meta, ctype(name))
    assert usage == whole(body, ctype(name)) and not keep


def test_lua_only_small_plain_bodies_are_read_whole(lua: Any) -> None:
    small = json.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
    big = json.dumps({"pad": "x" * 70_000, "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
    packed = gzip.compress(small)
    for body, encoding, expected in (
        (small, None, True),
        (b"", None, True),
        (big, None, False),
        (packed, "gzip", False),
    ):
        meta, finished, whole_read = run_lua_framed(
            lua,
            body,
            range(0, len(body), 1000),
            content_type="application/json",
            encoding=encoding,
            content_length=True,
        )
        chunked, _ = run_lua(
            lua, body, range(0, len(body), 1000), content_type="application/json", encoding=encoding
        )
        assert (finished, whole_read, meta) == (True, expected, chunked)
    # reset before the end: nothing left (as for a plain body read chunk by chunk), the script never ends
    meta, finished, whole_read = run_lua_framed(
        lua, small, [10, 20], content_type="application/json", cut=2, content_length=True
    )
    assert (meta, finished, whole_read) == ({}, False, True)


# --- snippet decoding ---------------------------------------------------------------------------------------


def test_snippet_of_missing_or_garbled_metadata() -> None:
    assert snippet_of(entry_with(None)) == Snippet("none")
    assert snippet_of(entry_with({"u": {"k": "weird", "b": "eA=="}})) == Snippet("none")
    assert snippet_of(entry_with({"u": {"k": "body", "b": "!!not base64"}})).data == b""
    partial = snippet_of(entry_with({"p2": "Yg==", "p10": "Yw==", "p1": "YQ==", "px": "eg==", "p3": None}))
    assert partial == Snippet("partial", b"abc")


# --- the gRPC service ---------------------------------------------------------------------------------------

CONFIG = """
plans:
  metered:
    limits:
      - {tokens: 1000000, per: day}
"""
METERED = KeySpec("metered", extra={"plan": "metered"})


@pytest.fixture
def metered_engine(tmp_path: Path) -> Engine:
    path = write_config(tmp_path, ALICE, METERED, extra=CONFIG)
    return Engine.from_settings(load_settings(str(path)))


def message(
    *entries: accesslog_pb2.HTTPAccessLogEntry, identifier: bool = False
) -> als_pb2.StreamAccessLogsMessage:
    msg = als_pb2.StreamAccessLogsMessage()
    if identifier:
        msg.identifier.log_name = "nexus_usage"
    msg.http_logs.log_entry.extend(entries)
    return msg


async def _stream(service: AccessLogService, batches: list[als_pb2.StreamAccessLogsMessage]) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((service.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = als_pb2_grpc.AccessLogServiceStub(channel)

            async def requests() -> Any:
                for batch in batches:
                    yield batch

            await stub.StreamAccessLogs(requests())
    finally:
        await server.stop(None)


def stream(service: AccessLogService, *batches: als_pb2.StreamAccessLogsMessage) -> None:
    asyncio.run(_stream(service, list(batches)))


def body_meta(body: bytes, kind: str = "body") -> dict[str, Any]:
    return {"u": {"k": kind, "b": base64.b64encode(body).decode()}}


class Recorder:
    """The engine as the service sees it, recording account() calls."""

    def __init__(self, engine: Engine, fail_on: str = "") -> None:
        self.settings = engine.settings
        self.book = engine.book
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.fail_on = fail_on

    def prompt_hint(self, request_id: str) -> int:
        return 0

    # the engine's own conclusion of a response (core.accounting), ending in the recorded account()
    account_response = Engine.account_response
    _account_parsed = Engine._account_parsed

    def account(self, *args: Any, **kwargs: Any) -> None:
        if args[0] == self.fail_on:
            raise RuntimeError("boom")
        self.calls.append((args, kwargs))


def test_batched_entries_are_accounted_and_unadmitted_ones_ignored(engine: Engine) -> None:
    recorder = Recorder(engine)
    calls = recorder.calls
    chat = (FIXTURES / "openai_chat.json").read_bytes()
    stream_body = (FIXTURES / "anthropic_stream.sse").read_bytes()
    service = AccessLogService(recorder)  # type: ignore[arg-type]
    stream(
        service,
        message(
            entry_with(body_meta(chat), content_type="application/json", request_id="r1"),
            entry_with(body_meta(chat), content_type="application/json", key_id=None, request_id="r2"),
            identifier=True,
        ),
        message(entry_with(body_meta(stream_body), content_type="text/event-stream", request_id="r3")),
    )
    assert (service.messages, service.entries, service.ignored) == (2, 2, 1)
    assert [a[0] for a, _ in calls] == ["r1", "r3"]
    (_, usage1), kw1 = calls[0]
    assert usage1 == Usage(prompt_tokens=19, completion_tokens=10)
    assert kw1 == {"response_model": "gpt-4o-2024-08-06", "keep_estimate": False, "unread": False}
    assert calls[1][0][1] == Usage(prompt_tokens=472 + 2048, cached_prompt_tokens=2048, completion_tokens=89)


def test_settles_the_reservation_with_the_real_usage(metered_engine: Engine) -> None:
    from nexus_authz.core.model import Request

    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
    decision = metered_engine.check(
        Request(
            method="POST",
            path="/v1/chat/completions",
            headers={"authorization": f"Bearer {METERED.secret}"},
            body=body,
            request_id="req-9",
        )
    )
    assert decision.allowed
    assert metered_engine.prompt_hint("req-9") == request_facts(body, precise=False).prompt_tokens
    cut = (FIXTURES / "openai_chat_stream_no_usage.sse").read_bytes()[:1500]
    pieces = {f"p{i + 1}": base64.b64encode(cut[i * 500 : (i + 1) * 500]).decode() for i in range(3)}
    stream(
        AccessLogService(metered_engine),
        message(entry_with(pieces, content_type="text/event-stream", key_id="metered", request_id="req-9")),
    )
    assert metered_engine.prompt_hint("req-9") == 0  # settled: the reservation is gone
    assert metered_engine.accounted["estimated"] == 1


def _metered_check(engine: Engine, request_id: str) -> int:
    """Admit a 2,000-token request; the tokens the day window has left after it."""
    from nexus_authz.core.model import Request

    body = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000}
    ).encode()
    decision = engine.check(
        Request(
            method="POST",
            path="/v1/chat/completions",
            headers={"authorization": f"Bearer {METERED.secret}"},
            body=body,
            request_id=request_id,
        )
    )
    assert decision.allowed
    return int(dict(decision.response_headers)["x-ratelimit-remaining-tokens"])


@pytest.mark.parametrize("response", ["cut_stream", "no_response", "cut_json"])
def test_a_response_cut_off_keeps_its_reservation_charged(metered_engine: Engine, response: str) -> None:
    # issue 13 item 4: the client hangs up (or the upstream resets) before the usage record: the
    # reservation's estimate stays charged, never only the prompt estimate plus what was counted.
    left = _metered_check(metered_engine, "cut-1")
    reserved = 1_000_000 - left
    assert reserved > 2000
    if response == "cut_stream":  # the Lua tap's checkpoints of a stream reset mid-way
        cut = (FIXTURES / "openai_chat_stream_no_usage.sse").read_bytes()[:1500]
        meta: dict[str, Any] | None = {
            f"p{i + 1}": base64.b64encode(cut[i * 500 : (i + 1) * 500]).decode() for i in range(3)
        }
        entry = entry_with(meta, content_type="text/event-stream", key_id="metered", request_id="cut-1")
    else:  # gone before the response started, or during a JSON body (the tap checkpoints streams only)
        entry = entry_with(None, key_id="metered", request_id="cut-1")
        if response == "no_response":
            entry.response.ClearField("response_code")
        else:
            entry.response.response_headers["content-type"] = "application/json"
        entry.common_properties.response_flags.downstream_connection_termination = True
    stream(AccessLogService(metered_engine), message(entry))
    assert metered_engine.prompt_hint("cut-1") == 0  # settled: concurrency slots would be released
    assert _metered_check(metered_engine, "cut-2") == left - reserved  # the first one's estimate stays


def test_a_complete_response_still_settles_to_its_usage(metered_engine: Engine) -> None:
    left = _metered_check(metered_engine, "ok-1")
    chat = (FIXTURES / "openai_chat.json").read_bytes()
    entry = entry_with(body_meta(chat), content_type="application/json", key_id="metered", request_id="ok-1")
    stream(AccessLogService(metered_engine), message(entry))
    reserved = 1_000_000 - left
    assert _metered_check(metered_engine, "ok-2") == 1_000_000 - 29 - reserved


class _Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ledgered(tmp_path: Path) -> tuple[Engine, _Clock]:
    extra = CONFIG + "ledger: {backend: memory}\nreservations: {ttl: 60s}\n"
    path = write_config(tmp_path, ALICE, METERED, extra=extra)
    clock = _Clock()
    return Engine.from_settings(load_settings(str(path)), clock=clock), clock


def _rows(engine: Engine) -> list[tuple[str, str, int]]:
    assert engine.ledger is not None
    return [(r.key_id, r.tenant, r.requests) for r in engine.ledger.query(group_by=("key_id", "tenant"))]


def test_an_entry_nexus_did_not_admit_adds_no_ledger_row(ledgered: tuple[Engine, _Clock]) -> None:
    # issue 13 item 8: Envoy rejects some requests before its header_mutation filter (a path with %00)
    # and still logs them, with the client's own x-nexus-key-id / x-nexus-tenant. Only what nexus
    # admitted is accounted, under the identity nexus admitted it with.
    engine, _ = ledgered
    chat = (FIXTURES / "openai_chat.json").read_bytes()
    forged = entry_with(
        body_meta(chat), content_type="application/json", key_id="metered", request_id="never"
    )
    service = AccessLogService(engine)
    stream(service, message(forged))
    assert _rows(engine) == []
    assert engine.accounted["unadmitted"] == 1
    _metered_check(engine, "real")
    spoofed = entry_with(body_meta(chat), content_type="application/json", key_id="alice", request_id="real")
    stream(service, message(spoofed))  # the headers say alice; nexus admitted "metered"
    assert _rows(engine) == [("metered", "default", 1)]


def test_usage_arriving_after_its_reservation_expired_is_still_ledgered(
    ledgered: tuple[Engine, _Clock],
) -> None:
    engine, clock = ledgered
    _metered_check(engine, "slow")
    clock.now += 61  # a stream longer than the reservation ttl
    engine.maintain()
    assert engine.prompt_hint("slow") == 0  # expired
    chat = (FIXTURES / "openai_chat.json").read_bytes()
    entry = entry_with(body_meta(chat), content_type="application/json", key_id="alice", request_id="slow")
    stream(AccessLogService(engine), message(entry, entry))  # a duplicate entry is not counted twice
    assert _rows(engine) == [("metered", "default", 1)]
    assert (engine.accounted["unmatched"], engine.accounted["duplicate"]) == (1, 1)


def test_a_bad_entry_does_not_lose_the_batch(engine: Engine) -> None:
    recorder = Recorder(engine, fail_on="bad")
    chat = (FIXTURES / "openai_chat.json").read_bytes()
    entries = [
        entry_with(body_meta(chat), content_type="application/json", request_id=r) for r in ("a", "bad", "b")
    ]
    stream(AccessLogService(recorder), message(*entries))  # type: ignore[arg-type]
    assert [args[0] for args, _ in recorder.calls] == ["a", "b"]


async def _served(engine: Engine, quiet: float) -> tuple[AccessLogService, grpc.aio.Server, grpc.aio.Channel]:
    """The access-log service on a gRPC server of its own, and a channel to it."""
    service = AccessLogService(engine, quiet=quiet)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((service.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return service, server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


def test_drain_ends_an_idle_stream_early(engine: Engine) -> None:
    async def scenario() -> tuple[float, int]:
        service, server, channel = await _served(engine, quiet=0.2)
        queue: asyncio.Queue[als_pb2.StreamAccessLogsMessage] = asyncio.Queue()

        async def requests() -> Any:
            while True:
                yield await queue.get()

        call = als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(requests())
        await queue.put(message(identifier=True))
        while service.messages < 1:
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        # a batch Envoy flushes shortly after SIGTERM still arrives before the stream ends
        loop.call_later(0.1, queue.put_nowait, message())
        await asyncio.gather(service.drain(5.0), server.stop(5.0))
        elapsed = loop.time() - started
        await call  # ended with OK, not cancelled
        await channel.close()
        return elapsed, service.messages

    elapsed, messages = asyncio.run(scenario())
    assert messages == 2
    assert elapsed < 2.0


def test_drain_waits_for_owed_usage_only_while_envoy_is_connected(ledgered: tuple[Engine, _Clock]) -> None:
    """An admitted request not yet accounted holds the drain while an access-log stream is open (its
    entry may still come); once every stream has ended (Envoy gone) for `quiet` seconds, nothing more
    can, and the drain ends then rather than after its whole timeout (the reservation stays charged)."""
    engine, _ = ledgered
    _metered_check(engine, "owed")
    assert len(engine.book) == 1

    async def scenario(close_first: bool) -> float:
        service, server, channel = await _served(engine, quiet=0.2)
        queue: asyncio.Queue[als_pb2.StreamAccessLogsMessage | None] = asyncio.Queue()

        async def requests() -> Any:
            while (item := await queue.get()) is not None:
                yield item

        call = als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(requests())
        await queue.put(message(identifier=True))
        while service.messages < 1:
            await asyncio.sleep(0.01)
        if close_first:  # Envoy ends its stream (exits) before the drain
            await queue.put(None)
            await call
            while service.open_streams:
                await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await service.drain(1.5)
        elapsed = loop.time() - started
        await server.stop(1.0)
        await channel.close()
        return elapsed

    assert asyncio.run(scenario(close_first=True)) < 1.0  # `quiet` (0.2 s) after the drain began
    assert asyncio.run(scenario(close_first=False)) >= 1.4  # connected: waited for the entry, to the end
    assert len(engine.book) == 1
