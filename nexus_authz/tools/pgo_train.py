"""The training run of the profile-guided build (setup.py): the compiled paths, fed what production feeds.

    python -m nexus_authz.tools.pgo_train [--expect NATIVE_DIR] [--rounds 5]
    python -m nexus_authz.tools.pgo_train --check   # only: can it run here (its imports)?

setup.py builds the native modules instrumented (GCC's -fprofile-generate), runs this in a subprocess, and
builds them again with the profile it wrote (-fprofile-use): GCC then lays out the code the training ran
hot and together, the rest apart, so a check touches fewer cache lines (docs/design.md, "Why": a
profile-guided native build). What runs here decides that layout, so it is the two per-request paths as
the benchmarks and a real gateway run them, in process, from the bytes Envoy sends:

- HTTP ext_authz checks through the compiled protocol (adapters/http_native.py), on issue 15's plan
  (requests, tokens per minute and per day, USD per month, concurrency; prices; accounting on): allowed
  OpenAI and Anthropic requests, with and without max_tokens, streamed or not, each followed by the Lua
  tap's release of its concurrency slot, and a few denials (an unknown key, a model the key may not
  use, a rate-limited key); also the shapes the compiled paths took later: a stream without
  `include_usage` (what the OpenAI SDKs send), a Responses stream, a chat history over 16 KiB that is not
  ASCII, an image sent as base64;
- access-log accounting through the real handler (adapters/envoy_als.py `stream_access_logs`, serialized
  StreamAccessLogsMessages of 20 entries shaped as Envoy 1.40 writes them with the shipped envoy.yaml's
  Lua tap): JSON bodies and SSE usage events of both providers and of the Responses API, and a stream
  without a usage record (its completion counted), each settling its check's reservation.

Deterministic inputs, no network, no file outside a temporary directory; a few seconds. Exit status 0 when
every check and entry went as expected through the compiled paths; else 1 with the reason on stderr (the
build then skips the profile). Imports nothing from benchmarks/ (an sdist has none).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PEPPER = "pgo-training-pepper-0123456789abcdef"
SECRET = "nx-pgo-train-0123456789abcdef0123456789abcd"  # the key most requests use (plan "issue15")
TIGHT = "nx-pgo-train-tight-0123456789abcdef01234567"  # a key rate limited after 2 requests a minute
UNKNOWN = "nx-pgo-train-unknown-0123456789abcdef012345"
PER_MESSAGE = 20  # access-log entries per message (Envoy's buffer at ~1,000 requests/s)
CHECKS_PER_ROUND = 1000

CONFIG = """\
listen:
  http_socket: {dir}/authz.sock
  grpc: null
  admin: null
keys:
  file: keys.yaml
  pepper:
    value: {pepper}
credentials:
  openai:
    value: sk-upstream-pgo-credential
default_credential: openai
ledger:
  path: {dir}/usage.sqlite3
plans:
  issue15:
    limits:
      - {{requests: 1000000000, per: minute}}
      - {{tokens: 1000000000000, per: minute}}
      - {{tokens: 100000000000000, per: day}}
      - {{usd: 1000000000, per: month}}
      - {{concurrent: 100000}}
  tight:
    limits:
      - {{requests: 2, per: minute}}
auth_failures:
  limit: 1000000
prices:
  "gpt-4o*": {{input: 2.5, cached_input: 1.25, output: 10}}
  "claude-*": {{input: 3, output: 15}}
"""

_MESSAGES = [{"role": "user", "content": "Say hello."}]


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# the request bodies: (path, body, anthropic)
OPENAI = ("/v1/chat/completions", _json({"model": "gpt-4o-mini", "messages": _MESSAGES, "max_tokens": 16}))
OPENAI_STREAM = (
    "/v1/chat/completions",
    _json(
        {
            "model": "gpt-4o-mini",
            "messages": _MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ),
)
OPENAI_NO_MAX = ("/v1/chat/completions", _json({"model": "gpt-4o", "messages": _MESSAGES}))
ANTHROPIC = (
    "/v1/messages",
    _json({"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": _MESSAGES}),
)
ANTHROPIC_STREAM = (
    "/v1/messages",
    _json({"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": _MESSAGES, "stream": True}),
)
NOT_ALLOWED = ("/v1/chat/completions", _json({"model": "o1-pro", "messages": _MESSAGES, "max_tokens": 16}))
# what every OpenAI SDK streams unless asked for usage: no include_usage (the completion is counted)
OPENAI_PLAIN_STREAM = (
    "/v1/chat/completions",
    _json({"model": "gpt-4o-mini", "messages": _MESSAGES, "max_tokens": 16, "stream": True}),
)
RESPONSES_STREAM = (
    "/v1/responses",
    _json({"model": "gpt-4o-mini", "input": "Say hello.", "max_output_tokens": 16, "stream": True}),
)
# a chat that resends its history (over 16 KiB, curly apostrophes: not ASCII), and one with an image
_HISTORY = [
    {"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i}: the model\u2019s answer, " * 40}
    for i in range(24)
]
LONG_CHAT = (
    "/v1/chat/completions",
    json.dumps({"model": "gpt-4o-mini", "messages": _HISTORY, "max_tokens": 16}, ensure_ascii=False).encode(),
)
_IMAGE = "data:image/png;base64," + base64.b64encode(bytes(range(256)) * 24).decode()
VISION = (
    "/v1/chat/completions",
    _json(
        {
            "model": "gpt-4o-mini",
            "max_tokens": 16,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in this image?"},
                        {"type": "image_url", "image_url": {"url": _IMAGE}},
                    ],
                }
            ],
        }
    ),
)

# the responses, as the Lua tap keeps them: (kind, bytes, content type)
_OPENAI_USAGE = {
    "prompt_tokens": 10,
    "completion_tokens": 15,
    "total_tokens": 25,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}
OPENAI_BODY = _json(
    {
        "id": "chatcmpl-pgo",
        "object": "chat.completion",
        "created": 1796561695,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the training!", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _OPENAI_USAGE,
        "system_fingerprint": "fp_pgo",
    }
)
_CHUNK = {
    "id": "chatcmpl-pgo",
    "object": "chat.completion.chunk",
    "created": 1796561695,
    "model": "gpt-4o-mini",
}
OPENAI_SSE = (
    b"data: "
    + _json({**_CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None})
    + b"\n\ndata: "
    + _json({**_CHUNK, "choices": [], "usage": _OPENAI_USAGE})
    + b"\n\ndata: [DONE]\n\n"
)
ANTHROPIC_BODY = _json(
    {
        "id": "msg_pgo",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [{"type": "text", "text": "Hello from the training!"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 12,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 18,
            "service_tier": "standard",
        },
    }
)
ANTHROPIC_SSE = (
    b"event: message_start\ndata: "
    + _json(
        {
            "type": "message_start",
            "message": {
                "id": "msg_pgo",
                "type": "message",
                "role": "assistant",
                "model": "claude-sonnet-4-5-20250929",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 12, "cache_read_input_tokens": 0, "output_tokens": 1},
            },
        }
    )
    + b"\n\nevent: message_delta\ndata: "
    + _json(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 18},
        }
    )
    + b"\n\nevent: message_stop\ndata: "
    + _json({"type": "message_stop"})
    + b"\n\n"
)
OPENAI_PLAIN_SSE = (
    b"".join(
        b"data: " + _json({**_CHUNK, "choices": [{"index": 0, "delta": d, "finish_reason": end}]}) + b"\n\n"
        for d, end in (
            ({"role": "assistant", "content": ""}, None),
            ({"content": "Hello"}, None),
            ({"content": " from the \u2019training\u2019!"}, None),
            ({}, "stop"),
        )
    )
    + b"data: [DONE]\n\n"
)
_RESPONSE = {"id": "resp_pgo", "object": "response", "model": "gpt-4o-mini", "status": "completed"}
RESPONSES_SSE = (
    b"event: response.created\ndata: "
    + _json({"type": "response.created", "response": {**_RESPONSE, "status": "in_progress", "usage": None}})
    + b"\n\nevent: response.output_text.delta\ndata: "
    + _json({"type": "response.output_text.delta", "item_id": "msg_pgo", "delta": "Hello!"})
    + b"\n\nevent: response.completed\ndata: "
    + _json(
        {
            "type": "response.completed",
            "response": {
                **_RESPONSE,
                "usage": {
                    "input_tokens": 10,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": 3,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": 13,
                },
            },
        }
    )
    + b"\n\n"
)
RESPONSES = {
    OPENAI: ("body", OPENAI_BODY, "application/json"),
    OPENAI_NO_MAX: ("body", OPENAI_BODY, "application/json"),
    OPENAI_STREAM: ("sse", OPENAI_SSE, "text/event-stream"),
    ANTHROPIC: ("body", ANTHROPIC_BODY, "application/json"),
    ANTHROPIC_STREAM: ("sse", ANTHROPIC_SSE, "text/event-stream"),
    OPENAI_PLAIN_STREAM: ("body", OPENAI_PLAIN_SSE, "text/event-stream"),
    RESPONSES_STREAM: ("sse", RESPONSES_SSE, "text/event-stream"),
    LONG_CHAT: ("body", OPENAI_BODY, "application/json"),
    VISION: ("body", OPENAI_BODY, "application/json"),
}
# the cycle of 50 checks (CHECKS_PER_ROUND is a whole number of them): mostly admitted OpenAI requests
# (as the benchmarks and most traffic), then the other shapes; 4 of 50 are refused (an unknown key, a model
# not allowed, a rate-limited key twice: after its first two requests). The invalid-key throttle
# (auth_failures) counts, but never refuses here.
CYCLE: list[tuple[str, tuple[str, bytes]]] = (
    [(SECRET, OPENAI)] * 20
    + [(SECRET, OPENAI_STREAM)] * 6
    + [(SECRET, OPENAI_PLAIN_STREAM)] * 4
    + [(SECRET, OPENAI_NO_MAX)] * 2
    + [(SECRET, ANTHROPIC)] * 4
    + [(SECRET, ANTHROPIC_STREAM)] * 4
    + [(SECRET, RESPONSES_STREAM)] * 2
    + [(SECRET, LONG_CHAT)] * 2
    + [(SECRET, VISION)] * 2
    + [(UNKNOWN, OPENAI), (SECRET, NOT_ALLOWED), (TIGHT, OPENAI), (TIGHT, ANTHROPIC)]
)


def _unexpected(path: str, body: bytes) -> tuple[str, bytes, str]:
    raise RuntimeError(f"a check that should be refused was admitted: {path} {body[:60]!r}")


def request_id(i: int) -> str:
    return f"{i:08x}-0000-4000-8000-000000000000"


def check_bytes(secret: str, rid: str, path: str, body: bytes) -> bytes:
    """The HTTP ext_authz check Envoy 1.40 sends with the shipped envoy.yaml (its header order)."""
    anthropic = path.startswith("/v1/messages")
    key = (
        f"x-api-key: {secret}\r\nanthropic-version: 2023-06-01"
        if anthropic
        else f"authorization: Bearer {secret}"
    )
    head = (
        f"POST /ext_authz{path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {len(body)}\r\n"
        "content-type: application/json\r\nx-forwarded-for: 192.0.2.2\r\nx-envoy-auth-partial-body: false\r\n"
        f"{key}\r\nx-request-id: {rid}\r\nx-nexus-content-length: {len(body)}\r\n"
        "x-envoy-internal: true\r\nx-envoy-expected-rq-timeout-ms: 500\r\n\r\n"
    )
    return head.encode() + body


RELEASED = b"HTTP/1.1 204 No Content\r\n\r\n"


def release_bytes(rid: str) -> bytes:
    """The Lua tap's `POST /_nexus/release` (envoy/nexus-usage.lua, an Envoy httpCall on the same socket)."""
    return (
        "POST /_nexus/release HTTP/1.1\r\nhost: nexus-authz\r\nx-nexus-release: 1\r\n"
        f"content-length: {len(rid)}\r\nx-envoy-internal: true\r\n"
        f"x-envoy-expected-rq-timeout-ms: 200\r\n\r\n{rid}"
    ).encode()


def log_entry(rid: str, path: str, kind: str, data: bytes, content_type: str, i: int) -> bytes:
    """A serialized HTTPAccessLogEntry as Envoy 1.40 writes it for an admitted request (the Lua tap's
    record in the `nexus.usage` metadata)."""
    from envoy.data.accesslog.v3 import accesslog_pb2

    e = accesslog_pb2.HTTPAccessLogEntry()
    c = e.common_properties
    c.downstream_remote_address.socket_address.address = "127.0.0.1"
    c.downstream_remote_address.socket_address.port_value = 38000 + i % 1000
    c.downstream_local_address.socket_address.address = "127.0.0.1"
    c.downstream_local_address.socket_address.port_value = 58053
    c.start_time.seconds, c.start_time.nanos = 1796561695 + i // 1000, (i % 1000) * 1000
    c.time_to_last_rx_byte.nanos = 126588
    c.time_to_first_upstream_tx_byte.nanos = 512923
    c.time_to_last_upstream_tx_byte.nanos = 515807
    c.time_to_first_upstream_rx_byte.nanos = 881511
    c.time_to_last_upstream_rx_byte.nanos = 978335
    c.time_to_first_downstream_tx_byte.nanos = 953578
    c.time_to_last_downstream_tx_byte.nanos = 1003993
    c.upstream_remote_address.socket_address.address = "127.0.0.1"
    c.upstream_remote_address.socket_address.port_value = 54203
    c.upstream_cluster = "llm_upstream"
    record = c.metadata.filter_metadata["nexus.usage"].fields["u"].struct_value.fields
    record["k"].string_value = kind
    record["b"].string_value = base64.b64encode(data).decode()
    c.duration.nanos = 1007268
    c.upstream_request_attempt_count = 1
    c.stream_id = rid
    c.downstream_wire_bytes_sent = 753
    c.downstream_wire_bytes_received = 292
    c.access_log_type = accesslog_pb2.DownstreamEnd
    e.protocol_version = accesslog_pb2.HTTPAccessLogEntry.HTTP11
    r = e.request
    r.request_method = 1  # POST (config.core.v3.RequestMethod)
    r.scheme, r.authority, r.path, r.forwarded_for, r.request_id = "http", "127.0.0.1", path, "192.0.2.2", rid
    r.request_headers_bytes, r.request_body_bytes = 364, 91
    r.request_headers["x-nexus-tenant"] = "training"
    r.request_headers["x-nexus-key-id"] = "pgo-0"
    s = e.response
    s.response_code.value = 200
    s.response_headers_bytes, s.response_body_bytes = 129, len(data)
    s.response_headers["content-type"] = content_type
    s.response_code_details = "via_upstream"
    return e.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def log_message(entries: list[bytes]) -> bytes:
    """A serialized StreamAccessLogsMessage of these entries (http_logs = 2, log_entry = 1)."""
    logs = b"".join(b"\x0a" + _varint(len(e)) + e for e in entries)
    return b"\x12" + _varint(len(logs)) + logs


def write_config(workdir: Path) -> Path:
    from nexus_authz.core import keys

    hasher = keys.KeyHasher(PEPPER.encode())
    keys_yaml = "keys:\n"
    for i, (secret, plan) in enumerate(((SECRET, "issue15"), (TIGHT, "tight"))):
        keys_yaml += (
            f"  - id: pgo-{i}\n    hash: {keys.HASH_SCHEME}:{hasher(secret).hex()}\n"
            f'    tenant: training\n    plan: {plan}\n    models: ["gpt-4o*", "claude-*"]\n'
        )
    (workdir / "keys.yaml").write_text(keys_yaml)
    path = workdir / "nexus.yaml"
    path.write_text(CONFIG.format(dir=workdir, pepper=PEPPER))
    return path


class _Sink:
    """The transport the protocol writes its answers to: keeps the last one."""

    last = b""

    def write(self, data: bytes) -> None:
        self.last = data

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def check_loaded(expect: str | None) -> str:
    """ "" when the compiled modules are loaded (from `expect`, instrumented, when given); else why not."""
    import os

    from nexus_authz import native

    if native.PATH != "compiled":
        return f"the compiled path is not loaded ({native.WHY_PURE})"
    if expect is None:
        return ""
    if native.BUILD != "instrumented":
        return f"the modules loaded are not the instrumented build ({native.BUILD or 'no build record'})"
    want = os.path.realpath(expect)
    for name in (*native.MODULES, "_build"):
        module = sys.modules.get(f"nexus_authz.native.{name}")
        where = os.path.dirname(os.path.realpath(getattr(module, "__file__", "") or ""))
        if where != want:
            return f"nexus_authz.native.{name} was loaded from {where}, not {want}"
    return ""


def train(workdir: Path, rounds: int) -> str:
    """The training itself; its summary line. Raises RuntimeError when something went otherwise than
    expected (a path not taken, a refusal that was not)."""
    import asyncio

    import grpc

    from nexus_authz import native
    from nexus_authz.adapters import envoy_als, http_authz
    from nexus_authz.adapters.http_native import CompiledAuthzProtocol
    from nexus_authz.core import tokens
    from nexus_authz.core.model import Reason
    from nexus_authz.engine import Engine
    from nexus_authz.settings import load_settings

    started = time.perf_counter()
    tokens.warm_up()
    settings = load_settings(str(write_config(workdir)))
    engine = Engine.from_settings(settings)
    app = http_authz.HttpApp(
        engine, max_header_bytes=settings.max_header_bytes, max_body=settings.max_body_bytes
    )
    proto = CompiledAuthzProtocol(app)
    sink = _Sink()
    proto.connection_made(sink)  # type: ignore[arg-type]
    service = envoy_als.AccessLogService(engine)
    decisions = engine.decider.decisions
    admitted_before = decisions[Reason.OK]
    taken = getattr(native.usage, "taken", None)
    taken_before = taken[0] if taken is not None else 0

    n = 0
    admitted = 0
    messages: list[bytes] = []
    pending: list[bytes] = []
    for _ in range(rounds):
        for j in range(CHECKS_PER_ROUND):
            secret, (path, body) = CYCLE[j % len(CYCLE)]
            rid = request_id(n)
            proto.data_received(check_bytes(secret, rid, path, body))
            if sink.last.startswith(b"HTTP/1.1 200 "):
                admitted += 1
                # the Lua tap's early release of the concurrency slot, when the response's head arrives
                proto.data_received(release_bytes(rid))
                if sink.last != RELEASED:
                    raise RuntimeError(f"the slot's release was answered {sink.last[:40]!r}")
                kind, data, content_type = RESPONSES.get((path, body)) or _unexpected(path, body)
                pending.append(log_entry(rid, path, kind, data, content_type, n))
                if len(pending) == PER_MESSAGE:
                    messages.append(log_message(pending))
                    pending = []
            n += 1
    if pending:
        messages.append(log_message(pending))
    allowed = decisions[Reason.OK] - admitted_before
    # refused: 4 checks of 40, but for the tight key's first two a minute
    expected = n - n // len(CYCLE) * 4
    if not allowed == admitted or not expected <= admitted <= expected + 2:
        raise RuntimeError(f"{allowed} checks admitted ({admitted} answered 200), expected {expected} (+2)")

    position = [0]

    class Reader:
        """grpc.aio's servicer context as stream_access_logs reads it: one serialized message a read."""

        async def read(self) -> Any:
            m = position[0]
            if m >= len(messages):
                return grpc.aio.EOF
            position[0] = m + 1
            return messages[m]

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(service.stream_access_logs(None, Reader()))  # type: ignore[arg-type]
    finally:
        loop.close()
    compiled = (taken[0] - taken_before) if taken is not None else admitted
    if service.entries != admitted or compiled == 0 or len(engine.book) != 0:
        raise RuntimeError(
            f"{service.entries} of {admitted} access-log entries accounted "
            f"({compiled} by the compiled loop), "
            f"{len(engine.book)} reservations left"
        )
    return (
        f"trained on {n} checks ({allowed} admitted) and {service.entries} access-log entries "
        f"in {len(messages)} messages, {time.perf_counter() - started:.1f} s"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--check", action="store_true", help="only import what the training needs")
    ap.add_argument("--expect", metavar="DIR", help="the instrumented modules must load from DIR")
    ap.add_argument("--rounds", type=int, default=5, help=f"rounds of {CHECKS_PER_ROUND} checks")
    args = ap.parse_args(argv)
    try:
        import grpc  # noqa: F401
        from envoy.data.accesslog.v3 import accesslog_pb2  # noqa: F401

        from nexus_authz.adapters import envoy_als, http_native  # noqa: F401
        from nexus_authz.engine import Engine  # noqa: F401
    except ImportError as exc:
        print(f"pgo_train: cannot import what the training needs ({exc})", file=sys.stderr)
        return 1
    if args.check:
        return 0
    why = check_loaded(args.expect)
    if why:
        print(f"pgo_train: {why}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="nexus-authz-pgo-train-") as tmp:
        try:
            print(train(Path(tmp), args.rounds))
        except RuntimeError as exc:
            print(f"pgo_train: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
