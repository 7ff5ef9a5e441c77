"""The access-log message as the gRPC handler now receives it (serialized) and the compiled scan reads it
(adapters/als_fast.log_entries, native/_usage.pyx) against the reference path: protobuf entries through
AccessLogService.account_now with the scans off (what NEXUS_AUTHZ_PURE=1 runs). Over one broad set of
batches (JSON, SSE and Anthropic shapes, missing usage, errors, compressed and over-the-cap bodies, reset
streams with the Lua tap's `p` checkpoints, duplicates, unknown request ids, unadmitted entries, expired
reservations, a key whose prompt is estimated at accounting time, entries protobuf must merge) both
engines must end in the same state: accounted counters, token metrics, unpriced counts, the reservation
book, the limit windows (as the next Check reports them) and every ledger row with its source and price
rule."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import math
import time
import zlib
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import struct_pb2
from hypothesis import given
from hypothesis import strategies as st

from nexus_authz import native
from nexus_authz.adapters import als_fast, envoy_als
from nexus_authz.adapters.envoy_als import METADATA_NAMESPACE, AccessLogService
from nexus_authz.core import tokens
from nexus_authz.core.model import Request
from nexus_authz.core.usage import MAX_BODY_BYTES
from nexus_authz.core.usage_records import document_model
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from nexus_authz.stores.memory import MemoryCounterStore
from tests.adapters.test_als import FIXTURES, body_meta, entry_with, message
from tests.fuzz._support import fuzz_settings
from tests.helpers import KeySpec, write_config
from tests.helpers import protobuf_len_field as _len_field

CONFIG = """
ledger: {backend: LEDGER}
reservations: {ttl: 60s}
prices:
  "gpt-4o-mini*": {input: 0.15, output: 0.6}
  "gpt-4o*": {input: 2.5, cached_input: 1.25, output: 10}
"""
METERED = KeySpec(
    "metered",
    extra={
        "tenant": "acme",
        "limits": [{"tokens": 10_000_000, "per": "day"}, {"usd": 1000, "per": "day"}, {"concurrent": 1000}],
    },
)
OPEN = KeySpec("open")  # no limits: the Check estimates no prompt, accounting does (core.prompt_later)
# more windows than the compiled accounting's bit mask holds (native/_account.pyx: Engine.account takes it)
WIDE = KeySpec(
    "wide", extra={"limits": [{"tokens": 10_000_000 + i, "per": "day", "name": f"t{i}"} for i in range(63)]}
)
CHAT = (FIXTURES / "openai_chat.json").read_bytes()
NO_USAGE = (FIXTURES / "openai_chat_stream_no_usage.sse").read_bytes()


class _Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _engine(tmp_path: Path, ledger: str = "memory", error_tokens: int = 0) -> tuple[Engine, _Clock]:
    tmp_path.mkdir()
    clock = _Clock()
    backend = "memory" if ledger == "memory" else f"sqlite, path: {tmp_path / 'usage.sqlite3'}"
    extra = CONFIG.replace("LEDGER", backend) + f"accounting: {{error_charge_tokens: {error_tokens}}}\n"
    path = write_config(tmp_path, METERED, OPEN, WIDE, extra=extra)
    return Engine.from_settings(load_settings(str(path)), clock=clock), clock


def _check(
    engine: Engine, key: KeySpec, request_id: str, model: str | None = "gpt-4o-mini"
) -> dict[str, str]:
    request: dict[str, Any] = {"messages": [{"role": "user", "content": "hello " * 40}], "max_tokens": 300}
    if model is not None:  # none: the model the response names is the one accounted (document_model)
        request["model"] = model
    body = json.dumps(request).encode()
    decision = engine.check(
        Request(
            method="POST",
            path="/v1/chat/completions",
            headers={"authorization": f"Bearer {key.secret}", "content-type": "application/json"},
            body=body,
            request_id=request_id,
        )
    )
    assert decision.allowed, decision
    return dict(decision.response_headers)


def _pieces(data: bytes, order: tuple[int, ...] = (1, 2, 3)) -> dict[str, Any]:
    size = len(data) // 3 + 1
    return {f"p{i}": base64.b64encode(data[(i - 1) * size : i * size]).decode() for i in order}


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def _chat(usage: dict[str, Any], model: str | None = "gpt-4o-2024-08-06", pad: int = 0) -> bytes:
    document: dict[str, Any] = {"id": "c", "object": "chat.completion", "pad": "p" * pad}
    if model is not None:
        document["model"] = model
    return json.dumps(document | {"choices": [], "usage": usage}, ensure_ascii=False).encode()


def test_a_body_decompressed_in_one_step_is_within_the_bodies_the_compiled_loop_reads() -> None:
    """native/_usage.pyx takes a compressed body only when it decompresses in one of StreamUsage's steps,
    and then reads it as an identity body, which it takes up to MAX_BODY_BYTES: one step must fit."""
    from nexus_authz.core import usage

    assert usage._DECODE_STEP <= usage.MAX_BODY_BYTES


def _raw_deflate(data: bytes) -> bytes:
    """`data` as raw deflate (no zlib header): what some servers send as Content-Encoding: deflate."""
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def _error(model: str | None = None, usage: dict[str, Any] | None = None) -> bytes:
    """An OpenAI error document (a 429's), with a model and a usage record when given."""
    document: dict[str, Any] = {"error": {"message": "Rate limit reached", "type": "requests", "code": "rl"}}
    if model is not None:
        document["model"] = model
    if usage is not None:
        document["usage"] = usage
    return json.dumps(document, ensure_ascii=False).encode()


def _stream(*contents: str, key: str = "content", ascii_only: bool = True) -> bytes:
    """An OpenAI chat stream without a usage chunk (no stream_options.include_usage): one delta a content."""
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06"}
    return (
        b"".join(
            b"data: "
            + json.dumps(
                chunk | {"choices": [{"index": 0, "delta": {key: c}}]}, ensure_ascii=ascii_only
            ).encode()
            + b"\n\n"
            for c in contents
        )
        + b"data: [DONE]\n\n"
    )


def _anthropic(
    event_lines: bool = True, deltas: int = 1, delta_input: bool = False, extra: str = ""
) -> bytes:
    """An Anthropic stream's usage events as the Lua tap keeps them (`extra`: added to the last record)."""
    start = {
        "type": "message_start",
        "message": {
            "id": "m",
            "model": "claude-x",
            "usage": {"input_tokens": 40, "cache_read_input_tokens": 300},
        },
    }
    events = [("message_start", json.dumps(start, separators=(",", ":")))]
    for i in range(deltas):
        usage: dict[str, int] = {"output_tokens": 10 * (i + 1)}
        if delta_input:
            usage |= {"input_tokens": 41, "cache_creation_input_tokens": 5}
        delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage}
        events.append(("message_delta", json.dumps(delta, separators=(",", ":"))))
    name, data = events[-1]
    events[-1] = (name, data[: data.rindex("}", 0, len(data) - 1)] + extra + "}}")
    return b"".join(
        (f"event: {name}\n" if event_lines else "").encode() + b"data: " + data.encode() + b"\n\n"
        for name, data in events
    )


CACHED = {
    "prompt_tokens": 1200,
    "completion_tokens": 30,
    "prompt_tokens_details": {"cached_tokens": 1000},
    "completion_tokens_details": {"reasoning_tokens": 50},  # more than the completion: clamped
}
# The entries the compiled loop (native/_usage.pyx account_run) accounts itself, and the ones it hands to
# the per-entry Python code (each for one of its reasons), by name: their index in _responses() is
# len(fixtures) + their place in EXTRA. The model the Check names: gpt-4o for "*-gpt-4o" (a cached-input
# price), none for "*-no-model" (the response's model is accounted), else gpt-4o-mini.
EXTRA: list[tuple[str, dict[str, Any] | None, str | None, str | None]] = [
    ("taken-identity", body_meta(CHAT), "application/json", " Identity "),
    ("taken-ctype-case", body_meta(CHAT), "Application/JSON; charset=utf-8", None),
    ("taken-cached-json-gpt-4o", body_meta(_chat(CACHED)), "application/json", None),
    (
        "taken-cached-sse-gpt-4o",
        body_meta(_sse({"choices": [], "model": "gpt-4o", "usage": CACHED}), "sse"),
        None,
        None,
    ),
    (
        "taken-cached-over-prompt",
        body_meta(_chat({"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 9}})),
        None,
        None,
    ),
    (
        "taken-model-utf8-no-model",
        body_meta(_chat({"prompt_tokens": 7, "completion_tokens": 3}, "gpt-4o-ü")),
        None,
        None,
    ),
    (
        "taken-model-late-no-model",
        body_meta(_chat({"prompt_tokens": 7, "completion_tokens": 3}, pad=9000)),
        None,
        None,
    ),
    (
        "taken-model-absent-no-model",
        body_meta(_chat({"prompt_tokens": 7, "completion_tokens": 3}, None)),
        None,
        None,
    ),
    (
        "taken-responses-sse",
        body_meta(
            _sse(
                {"model": "gpt-4o-mini", "usage": {"input_tokens": 9, "output_tokens": 4, "total_tokens": 13}}
            ),
            "sse",
        ),
        None,
        None,
    ),
    (
        "taken-anthropic-no-model",
        body_meta(
            _chat(
                {
                    "input_tokens": 3,
                    "cache_read_input_tokens": 40,
                    "cache_creation_input_tokens": 5,
                    "output_tokens": 6,
                },
                "claude-x",
            )
        ),
        None,
        None,
    ),
    ("taken-zero-usage", body_meta(_chat({"prompt_tokens": 0, "completion_tokens": 0})), None, None),
    # counts past the small ints (the compiled step adds them in C: tests below for its bounds)
    ("taken-large-counts", body_meta(_chat({"prompt_tokens": 123456, "completion_tokens": 789})), None, None),
    # the content type and encoding read without a lowered copy when ASCII: str.strip's whitespace
    # (\x1c-\x1f, \v), str.lower's non-ASCII case, the same bytes as the previous entry's type
    ("taken-identity-odd-space", body_meta(CHAT), "application/json", "\x1f\x0bidentity\x1c "),
    ("back-identity-unicode-case", body_meta(CHAT), "application/json", "\u0130dentity"),
    ("back-identity-padded", body_meta(CHAT), "application/json", "identity\x00"),
    ("taken-ctype-unicode", body_meta(CHAT), "application/jsön", "\u00a0identity"),
    ("back-ctype-event-stream-case", body_meta(CHAT), "x; q=Event-STREAM", None),
    ("back-ctype-event-stream-unicode", body_meta(CHAT), "tëxt/EVENT-STREAM", None),
    ("taken-ctype-near-event-stream", body_meta(CHAT), "event-strea", None),
    ("back-skipped", {"u": {"k": "body", "b": base64.b64encode(CHAT).decode(), "x": 10}}, None, None),
    ("back-event-stream-body", body_meta(CHAT), "text/event-stream", None),
    ("back-encoded", body_meta(CHAT), "application/json", "br"),
    # compressed bodies (what providers send the SDKs, which accept gzip): read decompressed when
    # StreamUsage decodes them in one step, handed back otherwise
    ("taken-gzip-error", body_meta(gzip.compress(_error("gpt-4o"))), "application/json", "gzip"),
    ("taken-x-gzip-odd-case", body_meta(gzip.compress(CHAT)), "application/json", " X-Gzip\t"),
    ("taken-deflate-zlib", body_meta(zlib.compress(CHAT)), "application/json", "deflate"),
    ("taken-deflate-raw", body_meta(_raw_deflate(CHAT)), "application/json", "Deflate"),
    ("back-gzip-empty", body_meta(gzip.compress(b"")), "application/json", "gzip"),  # as an empty body
    ("counted-gzip-stream", body_meta(gzip.compress(NO_USAGE)), "text/event-stream", "gzip"),
    ("back-gzip-cut", body_meta(gzip.compress(CHAT)[:-9]), "application/json", "gzip"),
    (
        "back-gzip-two-members",
        body_meta(gzip.compress(CHAT) + gzip.compress(b"{}")),
        "application/json",
        "gzip",
    ),
    ("back-gzip-trailing", body_meta(gzip.compress(CHAT) + b"\n"), "application/json", "gzip"),
    ("back-gzip-corrupt", body_meta(b"\x1f\x8b\x08\x00" + CHAT), "application/json", "gzip"),
    ("back-gzip-as-deflate", body_meta(gzip.compress(CHAT)), "application/json", "deflate"),
    (
        "back-gzip-past-a-step",
        body_meta(gzip.compress(_chat({"prompt_tokens": 3}, pad=300_000))),
        None,
        "gzip",
    ),
    ("back-gzip-unicode-name", body_meta(gzip.compress(CHAT)), "application/json", "gz\u0131p"),
    ("back-deflate-one-byte", body_meta(b"x"), "application/json", "deflate"),
    ("back-no-usage-object", body_meta(_chat({"prompt_tokens": 1})[:-1] + b', "usage": null}'), None, None),
    ("back-float-count", body_meta(_chat({"prompt_tokens": 19.0, "completion_tokens": 2})), None, None),
    (
        "back-anthropic-sse",
        body_meta(_sse({"usage": {"input_tokens": 5, "output_tokens": 7}}), "sse"),
        None,
        None,
    ),
    ("back-named-sse", body_meta(b"event: x\n" + _sse({"usage": {"prompt_tokens": 5}}), "sse"), None, None),
    ("back-tail", body_meta(CHAT, "tail"), None, None),
    (
        "back-invalid-utf8-model",
        body_meta(_chat({"prompt_tokens": 7}, "gpt").replace(b"gpt", b"g\xffp")),
        None,
        None,
    ),
    # Anthropic streams' usage events as the Lua tap keeps them (message_start's data.message.usage, then
    # message_delta's cumulative data.usage: the later event's fields win), named by an event: line or by
    # their data's "type"; and what the pure parser reads otherwise
    ("taken-anthropic-sse-typed", body_meta(_anthropic(event_lines=False), "sse"), None, None),
    ("taken-anthropic-sse-delta-fields", body_meta(_anthropic(delta_input=True), "sse"), None, None),
    ("taken-anthropic-sse-two-deltas", body_meta(_anthropic(deltas=2), "sse"), None, None),
    ("back-anthropic-sse-start-only", body_meta(_anthropic(deltas=0), "sse"), None, None),
    (
        "back-anthropic-sse-openai-field",
        body_meta(_anthropic(extra=', "prompt_tokens": 3'), "sse"),
        None,
        None,
    ),
    ("back-anthropic-sse-float", body_meta(_anthropic(extra=', "output_tokens": 7.0'), "sse"), None, None),
    (  # the event's data on two lines, its usage object whole on the second: read from that line
        "taken-anthropic-sse-two-lines",
        body_meta(_anthropic().replace(b',"usage"', b',\ndata: "usage"', 1), "sse"),
        None,
        None,
    ),
    (  # the usage object itself over two data lines: the pure parser joins them
        "back-anthropic-sse-multiline",
        body_meta(_anthropic().replace(b',"cache_read', b',\ndata: "cache_read', 1), "sse"),
        None,
        None,
    ),
    ("back-anthropic-sse-crlf", body_meta(_anthropic().replace(b"\n", b"\r\n"), "sse"), None, None),
    # responses without usage the compiled loop settles as Usage(source="none"): an error document (its
    # "error" an object, or its "type" "error": before any usage record; the last of repeated keys), and
    # a JSON response without the Lua tap's record (keep_estimate)
    ("taken-error-with-usage", body_meta(_error(usage={"prompt_tokens": 5})), "application/json", None),
    ("taken-error-type", body_meta(b'{"type": "error", "message": "overloaded"}'), None, None),
    ("taken-error-model-no-model", body_meta(_error(model="gpt-4o-\u00fc")), "application/json", None),
    ("taken-error-last-wins", body_meta(b'{"error": 1, "type": "x", "error": {"m": 1}}'), None, None),
    (
        "taken-error-overridden",
        body_meta(
            b'{"error": {"m": 1}, "error": null, "usage": {"prompt_tokens": 3, "completion_tokens": 2}}'
        ),
        None,
        None,
    ),
    ("back-error-type-escaped", body_meta(b'{"type": "\\u0065rror", "message": "x"}'), None, None),
    ("back-error-key-escaped", body_meta(b'{"\\u0065rror": {"m": 1}}'), None, None),
    ("back-error-not-an-object", body_meta(b'{"error": "overloaded"}'), None, None),
    ("back-error-trailing", body_meta(_error() + b" x"), "application/json", None),
    ("back-error-encoded", body_meta(_error()), "application/json", "gzip"),
    # whole streams without a usage chunk, their completion counted (native/_usage.pyx `_counted`): taken
    # for the metered key ("counted-"), whose Check estimated the prompt, handed back for the open one
    # (its prompt is estimated at accounting time from the body its reservation kept: core.prompt_later)
    ("counted-stream", body_meta(NO_USAGE), "text/event-stream", None),
    (
        "counted-stream-escapes-no-model",
        body_meta(_stream('line\n\t"q" \\ / \x00\x1f', "café 東京 😀", "")),
        "Text/Event-Stream; charset=utf-8",
        " identity",
    ),
    ("counted-stream-utf8", body_meta(_stream("café 東京 😀", ascii_only=False)), "text/event-stream", None),
    ("counted-stream-arguments", body_meta(_stream('{"a": 1}', key="arguments")), "text/event-stream", None),
    (
        "counted-stream-no-content",
        body_meta(_sse({"object": "chat.completion.chunk", "choices": [{"delta": {"role": "assistant"}}]})),
        "text/event-stream",
        None,
    ),
    (
        "counted-stream-error-after-content",
        body_meta(_stream("partial") + b'data: {"error": {"message": "server error"}}\n\n'),
        "text/event-stream",
        None,
    ),
    (  # the format is named by each window's first bytes (the first one's has no marker): two readings
        "counted-stream-two-windows",
        body_meta(
            b'data: {"x": {"partial_json": "alpha beta gamma delta", "content": "b"}}\n\n'
            b'data: {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "c"}}]}\n'
        ),
        "text/event-stream",
        None,
    ),
    ("back-stream-error-only", body_meta(b'data: {"error": {"m": "x"}}\n\n'), "text/event-stream", None),
    (
        "back-stream-usage-chunk",
        body_meta(_sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}})),
        "text/event-stream",
        None,
    ),
    ("back-stream-crlf", body_meta(_stream("a", "b").replace(b"\n", b"\r\n")), "text/event-stream", None),
    (
        "back-stream-lone-surrogate",
        body_meta(b'data: {"choices": [{"delta": {"content": "x\\ud800y"}}]}\n\n'),
        "text/event-stream",
        None,
    ),
    (
        "back-stream-bad-escape",
        body_meta(b'data: {"choices": [{"delta": {"content": "x\\qy"}}]}\n\n'),
        "text/event-stream",
        None,
    ),
    (
        "back-stream-invalid-utf8",
        body_meta(_stream("ab", "cd", ascii_only=False).replace(b"ab", b"a\xe6").replace(b"cd", b"\x97d")),
        "text/event-stream",
        None,
    ),
    # 8 KiB or more: read in C, counted in a worker thread, then Engine.account (both keys: _count_later)
    ("taken-stream-long", body_meta(_stream(*["word " * 20] * 80)), "text/event-stream", None),
    ("taken-stream-long-empty", body_meta(_stream(*[""] * 120)), "text/event-stream", None),
    (
        "back-stream-long-error",
        body_meta(_stream(*["w " * 60] * 80) + b"event: error\ndata: {}\n\n"),
        "text/event-stream",
        None,
    ),
    ("back-stream-comment-first", body_meta(b": keep-alive\n\n" + _stream("a")), "text/event-stream", None),
    ("back-stream-encoded", body_meta(_stream("a")), "text/event-stream", "gzip"),
    ("taken-none-ctype-case", None, "Application/JSON; charset=utf-8", None),
    ("taken-none-identity", None, "application/json", " identity"),
    ("back-none-event-stream", None, "application/json+event-stream", None),
    ("back-none-encoded", None, "application/json", "gzip"),
    ("back-none-other-type", None, "text/plain", None),
]
TAKEN = ["metered-1", "open-1", "metered-4", "open-4", "metered-5", "open-5", "metered-8", "open-8"]
TAKEN += ["metered-9", "open-9", "metered-11", "open-11", "metered-split"]
TAKEN += ["metered-2", "open-2"]  # Anthropic's stream: its message_start and message_delta usage events
# Responses' streams: response.completed's record (and a client's "usage" echoed in response.created)
TAKEN += ["metered-12", "open-12", "metered-13", "open-13"]
# the error fixtures (0: Anthropic's, 10: OpenAI's), and the JSON responses without a record of the tap
# (an unknown kind, none at all) among _responses()' own
TAKEN += [f"{key}-{i}" for i in (0, 10) for key in ("metered", "open")]
TAKEN += [f"{key}-{len(list(FIXTURES.iterdir())) + i}" for i in (10, 11) for key in ("metered", "open")]
TAKEN += [f"{key}-{len(list(FIXTURES.iterdir())) + 1}" for key in ("metered", "open")]  # a gzip body


def _index(name: str) -> int:
    return len(list(FIXTURES.iterdir())) + 15 + [e[0] for e in EXTRA].index(name)


def _model_for(request_id: str) -> str | None:
    name = request_id.split("-", 1)[1]
    if name.isdigit() and int(name) >= _index(EXTRA[0][0]):
        extra = EXTRA[int(name) - _index(EXTRA[0][0])][0]
        return "gpt-4o" if extra.endswith("gpt-4o") else None if extra.endswith("no-model") else "gpt-4o-mini"
    return "gpt-4o" if request_id.endswith("3") else "gpt-4o-mini"


def _responses() -> list[tuple[dict[str, Any] | None, str | None, str | None]]:
    """(Lua record, content type, content encoding) of every kind of response."""
    out: list[tuple[dict[str, Any] | None, str | None, str | None]] = []
    for path in sorted(FIXTURES.iterdir()):
        body = path.read_bytes()
        ctype = "text/event-stream" if path.suffix == ".sse" else "application/json"
        out.append((body_meta(body, "sse" if path.suffix == ".sse" else "body"), ctype, None))
    out += [
        (body_meta(CHAT.replace(b'"prompt_tokens": 19', b'"prompt_tokens": 19.0')), "application/json", None),
        (body_meta(gzip.compress(CHAT)), "application/json", "gzip"),
        ({"u": {"k": "over", "x": 5_000_000}}, "application/json", "gzip"),
        (body_meta(CHAT[-300:], "tail") | {"x": 1}, "application/json", None),
        (
            {"u": {"k": "tail", "b": base64.b64encode(CHAT[-300:]).decode(), "x": 4000}},
            "application/json",
            None,
        ),
        ({"u": {"k": "sse", "b": base64.b64encode(NO_USAGE[:900]).decode(), "x": 90_000}}, None, None),
        (_pieces(NO_USAGE[:1500]), "text/event-stream", None),  # a stream reset mid-way
        (_pieces(NO_USAGE[:1500], (2, 1, 3)), "text/event-stream", None),
        ({"p1": "not base64!", "p2": base64.b64encode(NO_USAGE[:400]).decode()}, "text/event-stream", None),
        ({"u": {"k": "body", "b": "eyJ1c2FnZSI6e319\n"}}, "application/json", None),  # non-canonical base64
        ({"u": {"k": "strange", "b": base64.b64encode(CHAT).decode()}}, "application/json", None),
        (None, "application/json", None),  # the client went away before the body
        (None, None, None),
        (body_meta(b"<html>bad gateway</html>"), "text/html", None),
        (body_meta(b""), "application/json", None),
    ]
    assert len(out) == _index(EXTRA[0][0])
    return out + [(meta, ctype, encoding) for _, meta, ctype, encoding in EXTRA]


def _batches() -> tuple[list[bytes], list[tuple[KeySpec, str]], set[str]]:
    """Serialized messages, the requests to admit first (key, request id), and the ids to expire."""
    admit: list[tuple[KeySpec, str]] = []
    entries: list[bytes] = []
    for i, (meta, ctype, encoding) in enumerate(_responses()):
        for key in (METERED, OPEN):
            rid = f"{key.id}-{i}"
            admit.append((key, rid))
            entries.append(
                entry_with(
                    meta, content_type=ctype, encoding=encoding, key_id="x", request_id=rid
                ).SerializeToString()
            )
    chat = entry_with(body_meta(CHAT), content_type="application/json", key_id="x", request_id="metered-0")
    entries += [
        chat.SerializeToString(),  # a duplicate of an entry accounted already
        entry_with(
            body_meta(CHAT), content_type="application/json", key_id="x", request_id="never"
        ).SerializeToString(),  # nexus admitted no such request
        entry_with(
            body_meta(CHAT), content_type="application/json", key_id=None, request_id="metered-late"
        ).SerializeToString(),  # no x-nexus-key-id: not admitted through nexus (and not accounted)
        entry_with(
            body_meta(CHAT), content_type="application/json", key_id="x", request_id="expired"
        ).SerializeToString(),  # its reservation expired: ledgered under its retired context
    ]
    admit += [(METERED, "metered-late"), (METERED, "expired")]
    # protobuf merges a repeated singular field: an entry whose common properties come in two parts,
    # the second holding the Lua record
    split = entry_with(None, content_type="application/json", key_id="x", request_id="metered-split")
    tail = accesslog_pb2.HTTPAccessLogEntry()
    tail.common_properties.CopyFrom(entry_with(body_meta(CHAT)).common_properties)
    entries.append(split.SerializeToString() + tail.SerializeToString())
    admit.append((METERED, "metered-split"))
    # and one whose Lua record comes in two parts of its map entry (protobuf merges the two Structs)
    half = entry_with(None, content_type="application/json", key_id="x", request_id="metered-merged")
    record = entry_with(body_meta(CHAT)).common_properties.metadata.filter_metadata[METADATA_NAMESPACE]
    other = struct_pb2.Struct()
    other.update({"x": 4000})
    map_entry = _len_field(1, METADATA_NAMESPACE.encode())
    map_entry += _len_field(2, record.SerializeToString()) + _len_field(2, other.SerializeToString())
    entries.append(half.SerializeToString() + _len_field(1, _len_field(17, _len_field(1, map_entry))))
    admit.append((METERED, "metered-merged"))
    entries.append(entries[3])  # a duplicate in the same batch
    identifier = als_pb2.StreamAccessLogsMessage()
    identifier.identifier.log_name = "nexus_usage"
    messages = []
    for start in range(0, len(entries), 7):
        body = b"".join(_len_field(1, e) for e in entries[start : start + 7])
        head = identifier.SerializeToString() if start == 0 else b""
        messages.append(head + _len_field(2, body))
    messages.append(messages[1])  # Envoy resending a batch
    return messages, admit, {"expired"}


class _Counting(AccessLogService):
    """The service, counting the entries protobuf reads (account_now: the reference per-entry path)."""

    __slots__ = ("by_protobuf",)

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.by_protobuf = 0

    def account_now(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> Any:
        self.by_protobuf += 1
        return super().account_now(entry)


class _Context:
    def __init__(self, messages: list[Any]) -> None:
        self._messages = iter(messages)

    async def read(self) -> Any:
        return next(self._messages, grpc.aio.EOF)


def _run(
    tmp_path: Path, *, compiled: bool, ledger: str = "memory", error_tokens: int = 0
) -> tuple[dict[str, Any], int]:
    engine, clock = _engine(tmp_path, ledger, error_tokens)
    messages, admit, expire = _batches()
    for key, rid in admit:  # late ones first: their reservations expire before their entries arrive
        if rid in expire:
            _check(engine, key, rid)
    clock.now += 61
    engine.maintain()
    for key, rid in admit:
        if rid not in expire:
            _check(engine, key, rid, model=_model_for(rid))
    clock.now += 30
    service = _Counting(engine)
    if compiled:  # the handler's input: the serialized messages, read by the compiled scan
        feed: list[Any] = list(messages)
    else:  # the reference: protobuf entries, the pure per-entry path
        feed = [als_pb2.StreamAccessLogsMessage.FromString(m) for m in messages]
    asyncio.run(service.stream_access_logs(None, _Context(feed)))  # type: ignore[arg-type]
    clock.now += 1
    assert engine.ledger is not None
    if ledger == "sqlite":
        assert engine.ledger.flush_now()  # type: ignore[attr-defined]
    rows = engine.ledger.query(group_by=("key_id", "tenant", "model", "source", "price_rule", "minute"))
    state = {
        "accounted": dict(engine.accounted),
        "usage_tokens": dict(engine.usage_tokens),
        "unpriced": dict(engine.unpriced),
        "book": engine.book.stats(),
        "slot_releases": dict(engine.decider.slot_releases),
        "ledger_stats": (engine.ledger.stats().recorded_records, engine.ledger.stats().dropped_records),
        "service": (service.messages, service.entries, service.ignored),
        "ledger": sorted(rows, key=repr),
        "windows": _check(engine, METERED, "after"),  # what the limits hold now, as the Check says it
    }
    return state, service.by_protobuf


@pytest.mark.parametrize(
    ("ledger", "error_tokens"),
    [("memory", 0), ("sqlite", 0), ("memory", 7)],
    ids=["memory", "sqlite", "charged"],
)
def test_the_compiled_message_scan_accounts_as_the_reference_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ledger: str, error_tokens: int
) -> None:
    """`error_tokens`: accounting.error_charge_tokens, what a response without usage charges (priced, in
    the token metrics and the limits: the compiled settlement of Usage(source="none") charges it too)."""
    if native.usage is None or native.account is None:
        pytest.skip("the compiled scans are not loaded (NEXUS_AUTHZ_PURE, or not built)")
    accounted: list[str] = []  # the request ids the Python Engine.account settled
    python_account = Engine.account

    def counting(self: Engine, request_id: str, *args: Any, **kwargs: Any) -> None:
        accounted.append(request_id)
        python_account(self, request_id, *args, **kwargs)

    monkeypatch.setattr(Engine, "account", counting)
    handed: list[str] = []  # the request ids of the entries the compiled loop handed to Python
    per_entry = AccessLogService._account_scanned

    def scanned(self: AccessLogService, item: Any, raw: bytes) -> Any:
        handed.append(item[0] if item is not None else "unadmitted")  # None: protobuf reads it
        return per_entry(self, item, raw)

    monkeypatch.setattr(AccessLogService, "_account_scanned", scanned)
    tokens.warm_up()  # a stream's completion is counted inline once the encoding is loaded (else in a thread)
    taken, looped = native.account.taken[0], native.usage.taken[0]
    fast, unusual = _run(tmp_path / "compiled", compiled=True, ledger=ledger, error_tokens=error_tokens)
    taken = native.account.taken[0] - taken  # entries the compiled accounting step took
    looped = native.usage.taken[0] - looped  # of which the compiled loop over the message
    by_python = list(accounted)
    accounted.clear()
    monkeypatch.setattr(als_fast, "SCAN", None)
    monkeypatch.setattr(als_fast, "ACCOUNT", None)
    reference, all_entries = _run(
        tmp_path / "reference", compiled=False, ledger=ledger, error_tokens=error_tokens
    )
    assert fast == reference
    # the common entries went from the scan to the settled reservation without the per-entry Python code
    # (none of the loop's entries reached _account_scanned), every other one for each of its reasons did
    common = TAKEN + [
        f"{key}-{_index(name)}"
        for name, *_ in EXTRA
        if name.startswith("taken")
        for key in ("metered", "open")
    ]
    common += [f"metered-{_index(name)}" for name, *_ in EXTRA if name.startswith("counted")]
    # (only a duplicate of one, in the same batch or Envoy's resent batch, went that way: no reservation)
    assert {rid: handed.count(rid) for rid in common} == {rid: accounted.count(rid) - 1 for rid in common}
    assert looped == len(common) and taken > looped, (looped, taken, len(common))
    back = [
        f"{key}-{_index(name)}"
        for name, *_ in EXTRA
        if name.startswith("back")
        for key in ("metered", "open")
    ]
    back += [f"open-{_index(name)}" for name, *_ in EXTRA if name.startswith("counted")]
    assert set(back) <= set(handed) and "unadmitted" not in handed  # those are counted in C
    assert handed.count(None) == unusual  # the entries protobuf reads
    # not vacuous: the common entries (a live reservation, a provider record the scan read) were settled
    # by the compiled step, Engine.account ran only for the others (duplicates, unknown and expired ids,
    # the usage concluded by the core)
    assert taken >= 10, taken
    assert len(by_python) + taken == len(accounted)
    assert "never" in by_python and "expired" in by_python
    # a JSON body's and an OpenAI stream's provider record (fixtures 1, 4 and 8) on both keys; metered-4
    # once more as the resent batch's duplicate
    assert not {"metered-1", "open-1", "metered-8", "open-8"} & set(by_python[: by_python.index("never")])
    assert by_python.count("metered-4") == 1
    # the scan read most entries itself; protobuf only the unusual ones (pieces, odd records, a merge)
    assert 0 < unusual < all_entries / 3, (unusual, all_entries)
    assert reference["accounted"]["duplicate"] >= 3 and reference["accounted"]["unadmitted"] == 1
    assert reference["service"][2] == 1  # the entry without x-nexus-key-id
    assert reference["accounted"]["unmatched"] == 1
    assert {row.source for row in reference["ledger"]} >= {"reported", "counted", "estimated", "none"}
    # responses without usage (errors, no record of the tap) charge error_charge_tokens of prompt each
    unused = [row for row in reference["ledger"] if row.source == "none"]
    assert unused and all(row.prompt_tokens == error_tokens * row.requests for row in unused)


def test_a_malformed_message_fails_the_stream_as_protobuf_did(tmp_path: Path) -> None:
    engine, _ = _engine(tmp_path / "e")
    good = message(entry_with(body_meta(CHAT), content_type="application/json", request_id="r"))
    raw = good.SerializeToString()
    service = AccessLogService(engine)
    with pytest.raises(Exception, match="(?i)pars|decod"):
        asyncio.run(service.stream_access_logs(None, _Context([raw[:-3]])))  # type: ignore[arg-type]
    assert engine.accounted["unadmitted"] == 0


class _Then:
    """A servicer context that hands out `messages`, then waits for a message that never comes."""

    def __init__(self, messages: list[Any]) -> None:
        self._messages = list(messages)
        self.reads = 0

    async def read(self) -> Any:
        self.reads += 1
        if self._messages:
            return self._messages.pop(0)
        await asyncio.Event().wait()


def _chats(*request_ids: str) -> bytes:
    return message(
        *(entry_with(body_meta(CHAT), content_type="application/json", request_id=r) for r in request_ids)
    ).SerializeToString()


class _StopsMidBatch(AccessLogService):
    """Ends its streams (as drain() does at its deadline) while accounting the first entry of a batch."""

    __slots__ = ()

    def account_now(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> Any:
        for stop in list(self._streams):
            if not stop.done():
                stop.set_result(None)
        return super().account_now(entry)


def test_a_stream_ended_mid_batch_finishes_the_batch_and_reads_no_more(tmp_path: Path) -> None:
    engine, _ = _engine(tmp_path / "e")
    # an unusual first entry (a cut-off stream's pieces: account_now reads it) ends the stream mid-batch
    first = entry_with(_pieces(NO_USAGE[:900]), content_type="text/event-stream", request_id="a")
    batch = message(first, *(entry_with(body_meta(CHAT), request_id=r) for r in "bcd")).SerializeToString()
    service = _StopsMidBatch(engine)
    context = _Then([batch, _chats("e")])
    asyncio.run(asyncio.wait_for(service.stream_access_logs(None, context), 5))  # type: ignore[arg-type]
    assert (service.messages, service.entries, context.reads) == (1, 4, 1)
    assert not service.open_streams


def test_drain_ends_a_stream_waiting_for_its_next_message(tmp_path: Path) -> None:
    engine, _ = _engine(tmp_path / "e")
    service = AccessLogService(engine)

    async def scenario() -> None:
        task = asyncio.ensure_future(service.stream_access_logs(None, _Then([_chats("a", "b")])))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        await service.drain(1.0)
        assert await asyncio.wait_for(task, 5) is not None  # ended normally, with its response

    asyncio.run(scenario())
    assert (service.messages, service.entries, service.open_streams) == (1, 2, 0)


def test_a_stream_cancelled_from_outside_stays_cancelled(tmp_path: Path) -> None:
    engine, _ = _engine(tmp_path / "e")
    service = AccessLogService(engine)

    async def scenario() -> None:
        task = asyncio.ensure_future(service.stream_access_logs(None, _Then([_chats("a")])))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        task.cancel()  # the server stopping: not the drain's stop
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled() and not service.open_streams

    asyncio.run(scenario())


# -- the compiled loop over a message (native/_usage.pyx account_run) ------------------------------------


def _pure(monkeypatch: pytest.MonkeyPatch, compiled: bool) -> None:
    if not compiled:
        monkeypatch.setattr(als_fast, "SCAN", None)
        monkeypatch.setattr(als_fast, "ACCOUNT", None)
    elif native.usage is None or native.account is None:
        pytest.skip("the compiled scans are not loaded (NEXUS_AUTHZ_PURE, or not built)")


@pytest.mark.parametrize("compiled", [True, False])
def test_a_batch_yields_to_the_loop_after_each_slice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    """With a slice shorter than any entry, every entry is a slice of its own (one LOOP_BUSY observation
    each) and other tasks run between two entries, the compiled loop as the per-entry one."""
    _pure(monkeypatch, compiled)
    tokens.warm_up()  # else an entry waits for the encoding to load off the loop: two slices, not one
    engine, _ = _engine(tmp_path / "e")
    for rid in "abcde":
        _check(engine, METERED, rid)
    observed: list[float] = []
    monkeypatch.setattr(envoy_als, "_BUSY", type("Busy", (), {"observe": staticmethod(observed.append)}))
    monkeypatch.setattr(envoy_als, "_SLICE", 0.0)
    seen: list[int] = []  # the book's size each time another task ran
    looped = native.usage.taken[0] if native.usage is not None else 0

    async def scenario() -> None:
        async def other() -> None:
            while True:
                seen.append(len(engine.book))
                await asyncio.sleep(0)

        task = asyncio.ensure_future(other())
        await asyncio.sleep(0)
        await AccessLogService(engine).stream_access_logs(None, _Context([_chats(*"abcde")]))  # type: ignore[arg-type]
        task.cancel()

    asyncio.run(scenario())
    assert len(observed) == 7  # the scan, five slices of one entry, and the (empty) rest
    assert [n for i, n in enumerate(seen) if i == 0 or n != seen[i - 1]] == [5, 4, 3, 2, 1, 0]
    if compiled:
        assert native.usage is not None and native.usage.taken[0] - looped == 5


@pytest.mark.parametrize("compiled", [True, False])
def test_an_entry_that_raises_is_logged_and_the_batch_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, compiled: bool
) -> None:
    """An exception from an entry the compiled loop accounts (the ledger's record) and from one it hands
    to Python (the core's conclusion) is logged with that entry's request id, as the per-entry loop does."""
    _pure(monkeypatch, compiled)
    engine, _ = _engine(tmp_path / "e")
    for rid in "abcd":
        _check(engine, OPEN, rid)
    assert engine.ledger is not None
    record_usage = engine.ledger.record_usage

    def failing(key_id: str, *args: Any) -> None:
        if engine.book.settled == 2:  # b's
            raise RuntimeError("disk full")
        record_usage(key_id, *args)

    monkeypatch.setattr(engine.ledger, "record_usage", failing)
    account_response = Engine.account_response

    def failing_response(self: Engine, request_id: str, *args: Any) -> Any:
        if request_id == "c":
            raise RuntimeError("no parser")
        return account_response(self, request_id, *args)

    monkeypatch.setattr(Engine, "account_response", failing_response)
    batch = message(
        *(entry_with(body_meta(CHAT), content_type="application/json", request_id=r) for r in "ab"),
        entry_with(body_meta(NO_USAGE[:400], "sse"), content_type="text/event-stream", request_id="c"),
        entry_with(body_meta(CHAT), content_type="application/json", request_id="d"),
    ).SerializeToString()
    service = AccessLogService(engine)
    with caplog.at_level("ERROR", logger="nexus_authz.als"):
        asyncio.run(service.stream_access_logs(None, _Context([batch])))  # type: ignore[arg-type]
    failures = [(r.getMessage(), getattr(r, "request_id", None), r.exc_info) for r in caplog.records]
    assert [(m, rid, str(exc[1])) for m, rid, exc in failures if exc] == [
        ("accounting failed", "b", "disk full"),
        ("accounting failed", "c", "no parser"),
    ]
    assert service.entries == 4 and engine.book.settled == 3 and len(engine.book) == 1  # c's stays
    caplog.clear()


def test_the_compiled_loop_hands_back_what_it_does_not_take_before_changing_anything(tmp_path: Path) -> None:
    """account_run's own reasons that no message of the differential test reaches: a body over the core's
    size limit, an item that is not a scanned entry, an unknown kind; each goes to the fallback (or the
    failure log) with the reservation untouched."""
    if native.usage is None or native.account is None:
        pytest.skip("the compiled scans are not loaded (NEXUS_AUTHZ_PURE, or not built)")
    engine, _ = _engine(tmp_path / "e")
    _check(engine, METERED, "big")
    service = AccessLogService(engine)
    handed: list[Any] = []
    failed: list[Any] = []
    big = CHAT + b" " * (MAX_BODY_BYTES + 1 - len(CHAT))  # valid JSON: only the size sends it back
    items: list[Any] = [
        ("big", "application/json", None, "body", big, 0, 0, 0),
        ("big", "application/json", None, "strange", CHAT, 0, 0, 0),
        ["big", "application/json", None, "body", CHAT, 0, 0, 0],
    ]
    end, pending, sliced = native.usage.account_run(
        items, 0, b"", service, lambda item, raw: handed.append(item), failed.append, lambda: 0.0, 0.0, 1.0
    )
    assert (end, pending, sliced) == (3, None, False)
    assert handed == items[:2] and failed == items[2:]
    assert "big" in engine.book._entries and service.entries == 0 and not engine.accounted["provider"]
    # and the one taken: the same body within the limit
    assert native.usage.account_run(
        [("big", None, None, "body", CHAT, 0, 0, 0)],
        0,
        b"",
        service,
        handed.append,
        failed.append,
        lambda: 0.0,
        0.0,
        1.0,
    ) == (1, None, False)
    assert "big" not in engine.book._entries and service.entries == 1 and engine.accounted["provider"] == 1


_MODEL_PARTS = st.sampled_from(
    [
        b'"model"',
        b'"model" ',
        b"\t:\r\n ",
        b":",
        b'"',
        b"\\",
        b"gpt-4o",
        b"\xc3\xbc",
        b"\xff",
        b" ",
        b"x" * 199,
        b"{",
    ]
)


@fuzz_settings(500)
@given(
    st.sampled_from([0, 3, (8 << 10) - 40, (8 << 10) - 12, (8 << 10) - 8, 8 << 10]),
    st.lists(_MODEL_PARTS | st.binary(max_size=8), max_size=12),
)
def test_the_compiled_model_is_document_model(pad: int, parts: list[bytes]) -> None:
    """The model the compiled loop accounts is core/usage_records.document_model's, for any bytes (the
    8 KiB scan limit, whitespace, escapes, 200 bytes, invalid UTF-8, several candidates)."""
    if native.usage is None:
        pytest.skip("the compiled scans are not loaded (NEXUS_AUTHZ_PURE, or not built)")
    body = b"p" * pad + b"".join(parts)
    assert native.usage.document_model(body) == document_model(body)
    body = b"p" * pad + b'"model": "' + b"".join(parts) + b'"'
    assert native.usage.document_model(body) == document_model(body)


class _OtherStore(MemoryCounterStore):
    """A counter store of another class (as Redis is): the compiled accounting leaves it to Python."""

    __slots__ = ()


@pytest.mark.parametrize("variant", ["other-store", "many-windows"])
def test_what_the_compiled_settlement_does_not_take_goes_the_python_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant: str
) -> None:
    """An entry the compiled loop reads but whose settlement native/_account.pyx does not take (a store
    of another class, more than 62 windows) is handed to _account_scanned, then Engine.account, with
    nothing changed before: the same state as the pure path."""
    if native.usage is None or native.account is None:
        pytest.skip("the compiled scans are not loaded (NEXUS_AUTHZ_PURE, or not built)")
    key = WIDE if variant == "many-windows" else METERED
    sse = body_meta(_sse({"choices": [], "model": "gpt-4o", "usage": CACHED}), "sse")
    batch = message(
        entry_with(body_meta(CHAT), content_type="application/json", request_id="a"),
        entry_with(sse, content_type="text/event-stream", request_id="b"),
    ).SerializeToString()
    handed: list[str] = []
    per_entry = AccessLogService._account_scanned

    def scanned(self: AccessLogService, item: Any, raw: bytes) -> Any:
        handed.append(item[0])
        return per_entry(self, item, raw)

    def run(directory: Path) -> dict[str, Any]:
        engine, _ = _engine(directory)
        if variant == "other-store":
            engine.counters.__class__ = _OtherStore
        for rid in "ab":
            _check(engine, key, rid)
        service = AccessLogService(engine)
        if als_fast.SCAN is not None:
            asyncio.run(service.stream_access_logs(None, _Context([batch])))  # type: ignore[arg-type]
        else:
            parsed = als_pb2.StreamAccessLogsMessage.FromString(batch)
            asyncio.run(service.stream_access_logs(None, _Context([parsed])))  # type: ignore[arg-type]
        assert engine.ledger is not None
        return {
            "accounted": dict(engine.accounted),
            "usage_tokens": dict(engine.usage_tokens),
            "book": engine.book.stats(),
            "ledger": sorted(
                engine.ledger.query(group_by=("key_id", "model", "source", "price_rule")), key=repr
            ),
            "windows": _check(engine, key, "after"),
        }

    monkeypatch.setattr(AccessLogService, "_account_scanned", scanned)
    taken, looped = native.account.taken[0], native.usage.taken[0]
    compiled = run(tmp_path / "compiled")
    assert (native.account.taken[0], native.usage.taken[0]) == (taken, looped)  # neither took them
    assert handed == ["a", "b"]
    monkeypatch.setattr(als_fast, "SCAN", None)
    monkeypatch.setattr(als_fast, "ACCOUNT", None)
    assert compiled == run(tmp_path / "reference")
    assert compiled["accounted"]["provider"] == 2


VAST = KeySpec(  # limits that hold the largest counts below
    "vast",
    extra={"limits": [{"tokens": 10**15, "per": "day"}, {"usd": 10**6, "per": "day"}, {"concurrent": 9}]},
)


@pytest.mark.parametrize(
    "counts",
    [
        (123456, 1000, 7890, 99),  # past the small ints
        (2**53 - 1, 2**52, 2**53 - 1, 2**53 - 1),  # the largest counts the compiled step keeps in C
        (2**53, 0, 1, 0),  # past them: Engine.account
        (5, 0, 2**53, 0),
        (10**15, 9 * 10**14, 10**13, 10**12),  # a cost past 2**53 micro-USD at gpt-4o's price: Engine.account
        (0, 0, 0, 0),
        (7, 9, 3, 5),  # cached and reasoning over their totals (clamped the same way)
    ],
)
@pytest.mark.parametrize("spied", [False, True])
def test_the_compiled_settlement_of_any_counts_is_engine_account(
    tmp_path: Path, counts: tuple[int, int, int, int], spied: bool
) -> None:
    """native/_account.pyx adds a settlement's counts and cost in C (below 2**53, the sums below 2**62)
    and hands anything larger to Engine.account before changing anything: the same counters, windows,
    ledger rows and metrics as the pure path for counts on either side of its bounds. Its deltas go to
    the memory store's compiled adjust as C integers, or (spied: adjust_soon is not that adjust) as the
    tuple Decider.adjust passes on, the same as the pure path's."""
    if native.account is None:
        pytest.skip("the compiled accounting is not loaded (NEXUS_AUTHZ_PURE, or not built)")
    from nexus_authz.core.usage import Usage

    prompt, cached, completion, reasoning = counts
    usage = Usage(
        prompt_tokens=prompt,
        cached_prompt_tokens=cached,
        completion_tokens=completion,
        reasoning_tokens=reasoning,
    )

    def run(directory: Path, compiled: bool) -> tuple[dict[str, Any], int]:
        directory.mkdir()
        clock = _Clock()
        path = write_config(directory, VAST, OPEN, extra=CONFIG.replace("LEDGER", "memory"))
        engine = Engine.from_settings(load_settings(str(path)), clock=clock)
        adjusted: list[tuple[Any, ...]] = []
        if spied:
            local = engine.decider.store
            adjust = local.adjust_soon

            def spy(*args: Any) -> None:
                adjusted.append(args[2:])  # deltas, now, charged_at
                adjust(*args)

            local.adjust_soon = spy  # type: ignore[attr-defined]
        taken = 0
        rids = [f"{key.id}-{n}" for n in range(3) for key in (VAST, OPEN)]
        for rid in rids:
            vast = rid.startswith("vast")
            _check(engine, VAST if vast else OPEN, rid, model="gpt-4o" if vast else None)
        for rid in rids:  # the later ones add into the ledger rows the first ones made
            if compiled and native.account.account_provider(engine, rid, usage, "gpt-4o-mini"):
                taken += 1
            else:
                engine.account(rid, usage, response_model="gpt-4o-mini")
        clock.now += 1
        assert engine.ledger is not None
        after = engine.check(
            Request(
                method="POST",
                path="/v1/chat/completions",
                headers={"authorization": f"Bearer {VAST.secret}", "content-type": "application/json"},
                body=b'{"model": "gpt-4o", "max_tokens": 1}',
                request_id="after",
            )
        )
        return {
            "accounted": dict(engine.accounted),
            "usage_tokens": dict(engine.usage_tokens),
            "book": engine.book.stats(),
            "ledger": sorted(
                engine.ledger.query(group_by=("key_id", "model", "source", "price_rule", "minute")), key=repr
            ),
            "windows": (after.allowed, after.status, dict(after.response_headers)),
            "adjusted": adjusted,
        }, taken

    compiled, taken = run(tmp_path / "compiled", True)
    reference, _ = run(tmp_path / "reference", False)
    assert compiled == reference
    assert len(compiled["adjusted"]) == (3 if spied else 0)  # vast's settlements (open has no window)

    def fits(price_in: float, price_cached: float, price_out: float) -> bool:  # the cost, micro-USD
        kept = min(max(cached, 0), prompt)
        cost = (prompt - kept) * price_in + kept * price_cached + completion * price_out
        return max(counts) < 2**53 and math.ceil(cost) < 2**53

    # vast's requests name gpt-4o, open's none (the response's gpt-4o-mini is priced)
    assert taken == 3 * fits(2.5, 1.25, 10) + 3 * fits(0.15, 0.15, 0.6), taken


def test_the_compiled_loop_counts_its_entries_before_other_code_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """account_run adds the entries it took to service.entries once per message, but before it hands an
    entry to the per-entry code or returns: that code and the caller see the count the pure path's
    per-entry counting would show."""
    if native.usage is None or native.account is None:
        pytest.skip("the compiled scans are not loaded (NEXUS_AUTHZ_PURE, or not built)")
    engine, _ = _engine(tmp_path / "engine")
    for rid in "abcde":
        _check(engine, METERED, rid)
    batch = message(
        entry_with(body_meta(CHAT), content_type="application/json", request_id="a"),
        entry_with(body_meta(CHAT), content_type="application/json", request_id="b"),
        entry_with(body_meta(CHAT), content_type="application/json", encoding="br", request_id="c"),
        entry_with(body_meta(CHAT), content_type="application/json", request_id="d"),
        entry_with(body_meta(CHAT), content_type="application/json", request_id="e"),
    ).SerializeToString()
    seen: list[tuple[str, int]] = []
    per_entry = AccessLogService._account_scanned

    def scanned(self: AccessLogService, item: Any, raw: bytes) -> Any:
        seen.append((item[0], self.entries))
        return per_entry(self, item, raw)

    monkeypatch.setattr(AccessLogService, "_account_scanned", scanned)
    service = AccessLogService(engine)
    looped = native.usage.taken[0]
    asyncio.run(service.stream_access_logs(None, _Context([batch])))  # type: ignore[arg-type]
    assert native.usage.taken[0] - looped == 4  # a, b, d, e in C; c (br) handed over
    assert seen == [("c", 2)]
    assert service.entries == 5


def test_the_compiled_settlement_reads_the_engine_s_real_clock_as_time_time(tmp_path: Path) -> None:
    """With the engine's default clock (time.time), the compiled settlement reads CLOCK_REALTIME itself
    (native/_account.pyx `_wall`): the ledger row's minute is the minute time.time() gives around it."""
    if native.usage is None or native.account is None:
        pytest.skip("the compiled scans are not loaded (NEXUS_AUTHZ_PURE, or not built)")
    path = write_config(tmp_path, METERED, OPEN, WIDE, extra=CONFIG.replace("LEDGER", "memory"))
    engine = Engine.from_settings(load_settings(str(path)))  # clock: time.time
    _check(engine, METERED, "a")
    batch = message(entry_with(body_meta(CHAT), content_type="application/json", request_id="a"))
    looped = native.usage.taken[0]
    before = time.time()
    asyncio.run(AccessLogService(engine).stream_access_logs(None, _Context([batch.SerializeToString()])))  # type: ignore[arg-type]
    after = time.time()
    assert native.usage.taken[0] - looped == 1 and len(engine.book) == 0
    assert engine.ledger is not None
    (row,) = engine.ledger.query(group_by=("minute",))
    assert row.period in {int(before - before % 60), int(after - after % 60)}, (row, before, after)
