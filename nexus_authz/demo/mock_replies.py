"""The mock upstream's replies: the fixed reply text and its "tokens", the deterministic usage
(`prompt_tokens`, `completion_tokens`) and the OpenAI chat, Anthropic messages, OpenAI Responses and
model-list bodies, plain and as SSE events. The server that sends them is demo/mock_upstream.py (whose
docstring describes the endpoints and the usage formula)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MODELS",
    "REPLY_TEXT",
    "REPLY_TOKENS",
    "MockOptions",
    "completion_tokens",
    "prompt_tokens",
]

REPLY_TEXT = "Hello from the nexus-authz mock upstream! This reply is sent one token at a time."
#: The reply split into "tokens": each word with its leading space. The mock's tokenizer, for counting.
REPLY_TOKENS: tuple[str, ...] = tuple(
    word if i == 0 else " " + word for i, word in enumerate(REPLY_TEXT.split(" "))
)
MODELS: tuple[str, ...] = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "o3-mini",
    "claude-3-5-haiku-latest",
    "claude-sonnet-4-0",
)
_TOKEN_DELTAS: tuple[str, ...] = tuple(
    json.dumps({"content": token}, separators=(",", ":"), ensure_ascii=False) for token in REPLY_TOKENS
)
_JSON = "application/json"
_SSE = "text/event-stream; charset=utf-8"


@dataclass(frozen=True, slots=True)
class MockOptions:
    """Server-wide behaviour; the x-mock-* request headers override the delays per request."""

    always_usage: bool = False  # emit the chat usage chunk even without stream_options.include_usage
    delay_ms: float = 0.0  # before each response
    chunk_delay_ms: float = 0.0  # between SSE events
    record_limit: int = 1000  # recorded requests kept (0: record nothing, e.g. in benchmarks)
    max_body_bytes: int = 8 * 1024 * 1024
    fixtures_dir: str | None = None  # files x-mock-fixture may name (None: fixture replay off)


# --- deterministic usage ----------------------------------------------------------------------------------


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def prompt_tokens(payload: dict[str, Any], api: str) -> int:
    """The mock's prompt token count for a request body; api is "chat", "messages" or "responses"."""
    if api == "chat":
        prompt: object = payload.get("messages", [])
    elif api == "messages":
        messages = payload.get("messages", [])
        prompt = [payload["system"], messages] if payload.get("system") is not None else messages
    elif api == "responses":
        given = payload.get("input", "")
        prompt = [payload["instructions"], given] if payload.get("instructions") is not None else given
    else:
        raise ValueError(f"unknown api {api!r}")
    return max(1, math.ceil(len(_compact(prompt)) / 4))


def _max_tokens(payload: dict[str, Any], api: str) -> int | None:
    if api == "chat":
        names: tuple[str, ...] = ("max_completion_tokens", "max_tokens")
    elif api == "messages":
        names = ("max_tokens",)
    else:
        names = ("max_output_tokens",)
    for name in names:
        value = payload.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _ClientError(f"'{name}' must be a positive integer", param=name)
            return value
    return None


def completion_tokens(payload: dict[str, Any], api: str) -> int:
    """The mock's completion token count: the reply's tokens, capped by the request's max tokens."""
    cap = _max_tokens(payload, api)
    return len(REPLY_TOKENS) if cap is None else min(cap, len(REPLY_TOKENS))


# --- responses ------------------------------------------------------------------------------------------


class _ClientError(Exception):
    def __init__(self, message: str, *, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass(slots=True)
class _Reply:
    status: int
    content_type: str
    body: bytes = b""
    events: list[bytes] | None = None  # SSE events, each sent as one HTTP chunk
    delay: float = 0.0
    chunk_delay: float = 0.0
    cut_after: int | None = None
    encoding: str | None = None  # content-encoding of body / events (fixture replay)


def _error_body(api: str, status: int, message: str, param: str | None = None) -> bytes:
    if api == "messages":
        kind = "invalid_request_error" if status < 500 else "api_error"
        return _compact({"type": "error", "error": {"type": kind, "message": message}}).encode()
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 429:
        kind = "rate_limit_exceeded"
    error = {"message": message, "type": kind, "param": param, "code": None}
    return _compact({"error": error}).encode()


def _sse(data: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {_compact(data)}\n\n".encode()


def _chat(payload: dict[str, Any], n: int, opts: MockOptions) -> _Reply:
    model = str(payload.get("model", "gpt-4o-mini"))
    p = prompt_tokens(payload, "chat")
    c = completion_tokens(payload, "chat")
    finish = "length" if c < len(REPLY_TOKENS) else "stop"
    usage = {
        "prompt_tokens": p,
        "completion_tokens": c,
        "total_tokens": p + c,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    ident = f"chatcmpl-mock{n:08d}"
    created = int(time.time())
    if not payload.get("stream"):
        body = {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(REPLY_TOKENS[:c]), "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage,
            "system_fingerprint": "fp_mock",
        }
        return _Reply(200, _JSON, _compact(body).encode())
    options = payload.get("stream_options")
    include_usage = opts.always_usage or (isinstance(options, dict) and options.get("include_usage") is True)
    base: dict[str, Any] = {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_mock",
    }

    # The chunks differ only in their delta: serialise the common part once (this is the streaming
    # baseline of the benchmarks, so per-chunk json.dumps of the whole object would dominate its cost).
    head = _compact(base)[:-1] + ',"choices":[{"index":0,"delta":'
    # OpenAI sends "usage": null on every chunk but the last when usage is requested.
    tail = "}]" + (',"usage":null}' if include_usage else "}")

    def chunk(delta_json: str, finish_json: str = "null") -> bytes:
        return f'data: {head}{delta_json},"logprobs":null,"finish_reason":{finish_json}{tail}\n\n'.encode()

    events = [chunk('{"role":"assistant","content":"","refusal":null}')]
    events.extend(chunk(delta) for delta in _TOKEN_DELTAS[:c])
    events.append(chunk("{}", _compact(finish)))
    if include_usage:
        events.append(_sse({**base, "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return _Reply(200, _SSE, events=events)


def _messages(payload: dict[str, Any], n: int) -> _Reply:
    model = str(payload.get("model", "claude-3-5-haiku-latest"))
    p = prompt_tokens(payload, "messages")
    c = completion_tokens(payload, "messages")
    stop = "max_tokens" if c < len(REPLY_TOKENS) else "end_turn"
    ident = f"msg_mock{n:08d}"
    usage = {
        "input_tokens": p,
        "output_tokens": c,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    if not payload.get("stream"):
        body = {
            "id": ident,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": "".join(REPLY_TOKENS[:c])}],
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": usage,
        }
        return _Reply(200, _JSON, _compact(body).encode())
    start_message: dict[str, Any] = {
        "id": ident,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        # Like the real API: input usage up front and a small placeholder output count, superseded by
        # the cumulative count in message_delta (summing the two would over-count).
        "usage": {**usage, "output_tokens": 1},
    }
    events = [
        _sse({"type": "message_start", "message": start_message}, "message_start"),
        _sse(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            "content_block_start",
        ),
        _sse({"type": "ping"}, "ping"),
    ]
    events.extend(
        _sse(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token}},
            "content_block_delta",
        )
        for token in REPLY_TOKENS[:c]
    )
    events.append(_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
    events.append(
        _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": c},
            },
            "message_delta",
        )
    )
    events.append(_sse({"type": "message_stop"}, "message_stop"))
    return _Reply(200, _SSE, events=events)


def _responses(payload: dict[str, Any], n: int) -> _Reply:
    model = str(payload.get("model", "gpt-4o-mini"))
    p = prompt_tokens(payload, "responses")
    c = completion_tokens(payload, "responses")
    complete = c == len(REPLY_TOKENS)
    text = "".join(REPLY_TOKENS[:c])
    ident = f"resp_mock{n:08d}"
    item_id = f"msg_mock{n:08d}"
    usage = {
        "input_tokens": p,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": c,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": p + c,
    }
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {"id": item_id, "type": "message", "status": "completed", "role": "assistant", "content": [part]}
    response: dict[str, Any] = {
        "id": ident,
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed" if complete else "incomplete",
        "error": None,
        "incomplete_details": None if complete else {"reason": "max_output_tokens"},
        "instructions": payload.get("instructions"),
        "max_output_tokens": payload.get("max_output_tokens"),
        "model": model,
        "output": [item],
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "usage": usage,
    }
    if not payload.get("stream"):
        return _Reply(200, _JSON, _compact(response).encode())
    pending = {**response, "status": "in_progress", "incomplete_details": None, "output": [], "usage": None}
    seq = iter(range(1_000_000))

    def event(kind: str, data: dict[str, Any]) -> bytes:
        return _sse({"type": kind, "sequence_number": next(seq), **data}, kind)

    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    events = [
        event("response.created", {"response": pending}),
        event("response.in_progress", {"response": pending}),
        event(
            "response.output_item.added",
            {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}},
        ),
        event("response.content_part.added", {**where, "part": {**part, "text": ""}}),
    ]
    events.extend(
        event("response.output_text.delta", {**where, "delta": token}) for token in REPLY_TOKENS[:c]
    )
    events.append(event("response.output_text.done", {**where, "text": text}))
    events.append(event("response.content_part.done", {**where, "part": part}))
    events.append(event("response.output_item.done", {"output_index": 0, "item": item}))
    final = "response.completed" if complete else "response.incomplete"
    events.append(event(final, {"response": response}))
    return _Reply(200, _SSE, events=events)


def _models() -> _Reply:
    data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "nexus-mock"} for m in MODELS]
    return _Reply(200, _JSON, _compact({"object": "list", "data": data}).encode())


_API_OF_PATH = {"/v1/chat/completions": "chat", "/v1/messages": "messages", "/v1/responses": "responses"}
