"""Usage records and where providers put them: the formats half of token accounting (core.usage reads
streams and bodies with them).

`Usage` is the normalised result. The record readers (`_openai_usage`, `_anthropic_usage`) turn a
provider's usage object into it; the byte patterns say where a record may sit in an event or document
(a usage object counts only at its provider's place, see core.usage), which string fields are generated
content per format, and which events are errors. `_document_text` is a document's generated text, for
an estimate when it carries no record. Pure, no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["Usage", "UsageSource", "document_model", "document_usage", "record_usage", "usage_from_counts"]


UsageSource = Literal["provider", "estimated", "none"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens a response consumed, normalised across providers.

    `prompt_tokens` always means all input tokens: for Anthropic, whose `input_tokens` excludes cache
    traffic, it is input_tokens + cache_read_input_tokens + cache_creation_input_tokens.
    `cached_prompt_tokens` (cache reads) and `cache_write_tokens` (Anthropic cache creation, OpenAI
    `cache_write_tokens` where reported) are subsets of it, priced differently. `completion_tokens`
    includes `reasoning_tokens`. `source` says how much to trust it: "provider" is the upstream's own
    record, "estimated" was counted from what the stream showed (cut off, or never sent a record),
    "none" means an error response or nothing usable: charge nothing or the configured minimum.
    """

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    cache_write_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    source: UsageSource = "provider"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# Limits of a usage object
_MAX_TOKENS: Final = 1 << 40  # larger "token counts" in a usage record are nonsense: read as 0
_USAGE_SPAN: Final = 16 << 10  # a usage object is a few hundred bytes; never decode more than this

# --------------------------------------------------------------------------------------------------
# Usage records
# --------------------------------------------------------------------------------------------------


def _count(value: object) -> int:
    if type(value) is int:
        return value if 0 <= value <= _MAX_TOKENS else 0
    if type(value) is float and value.is_integer() and 0 <= value <= _MAX_TOKENS:
        return int(value)
    return 0


_NO_DETAILS: Final[dict[str, object]] = {}


def _sub(record: dict[str, object], key: str) -> dict[str, object]:
    value = record.get(key)
    return value if isinstance(value, dict) else _NO_DETAILS


# A frozen dataclass's generated __init__ sets each field through object.__setattr__; the record readers
# build one Usage per response, so they set the slots through their descriptors (as core.model's
# hot-path constructors do): the identical frozen object in a fraction of the time.
_USAGE_SLOTS = tuple(
    getattr(Usage, name).__set__
    for name in (
        "prompt_tokens",
        "cached_prompt_tokens",
        "cache_write_tokens",
        "completion_tokens",
        "reasoning_tokens",
        "source",
    )
)


def new_usage(
    prompt: int, cached: int, cache_write: int, completion: int, reasoning: int, source: UsageSource
) -> Usage:
    """`Usage(...)` with every field given, without the frozen dataclass's per-field __setattr__."""
    usage: Usage = object.__new__(Usage)
    s0, s1, s2, s3, s4, s5 = _USAGE_SLOTS
    s0(usage, prompt)
    s1(usage, cached)
    s2(usage, cache_write)
    s3(usage, completion)
    s4(usage, reasoning)
    s5(usage, source)
    return usage


def _openai_usage(record: dict[str, object]) -> Usage | None:
    """A chat/completions/embeddings or Responses usage record, or None when it is neither."""
    get = record.get
    if "prompt_tokens" in record or "completion_tokens" in record:
        prompt = _count(get("prompt_tokens"))
        completion = _count(get("completion_tokens"))
        prompt_details = _sub(record, "prompt_tokens_details")
        completion_details = _sub(record, "completion_tokens_details")
    elif "input_tokens_details" in record or "output_tokens_details" in record or "total_tokens" in record:
        prompt = _count(get("input_tokens"))
        completion = _count(get("output_tokens"))
        prompt_details = _sub(record, "input_tokens_details")
        completion_details = _sub(record, "output_tokens_details")
    else:
        return None
    return _openai_counts(
        prompt,
        completion,
        _count(prompt_details.get("cached_tokens")),
        _count(prompt_details.get("cache_write_tokens")),
        _count(completion_details.get("reasoning_tokens")),
    )


def _openai_counts(prompt: int, completion: int, cached: int, cache_write: int, reasoning: int) -> Usage:
    """An OpenAI (chat/completions/embeddings or Responses) record's Usage from its counts (`_count`ed):
    the cached and cache-write parts within the prompt, the reasoning part within the completion."""
    cached = min(cached, prompt)
    return new_usage(
        prompt, cached, min(cache_write, prompt - cached), completion, min(reasoning, completion), "provider"
    )


_ANTHROPIC_FIELDS: Final = (
    "input_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "output_tokens",
)


def _is_anthropic(record: dict[str, object]) -> bool:
    return any(key in record for key in _ANTHROPIC_FIELDS)


def record_usage(record: dict[str, object]) -> Usage | None:
    """A provider's usage object at its place (a document's top level): OpenAI's or Responses', else
    Anthropic's; None when it is neither (the document is then read for text to estimate)."""
    usage = _openai_usage(record)
    if usage is not None:
        return usage
    if _is_anthropic(record):
        return _anthropic_usage({k: _count(record[k]) for k in _ANTHROPIC_FIELDS if k in record})
    return None


def _anthropic_usage(fields: dict[str, int], source: UsageSource = "provider") -> Usage:
    return _anthropic_counts(
        fields.get("input_tokens", 0),
        fields.get("cache_read_input_tokens", 0),
        fields.get("cache_creation_input_tokens", 0),
        fields.get("output_tokens", 0),
        source,
    )


def _anthropic_counts(
    input_tokens: int, read: int, write: int, output: int, source: UsageSource = "provider"
) -> Usage:
    """Anthropic's record: `input_tokens` excludes the cache traffic, which the prompt includes."""
    return new_usage(input_tokens + read + write, read, write, output, 0, source)


def usage_from_counts(counts: tuple[object, ...]) -> Usage:
    """The Usage of a record an accelerator read as counts (native/_usage.pyx `usage_counts`: the plain
    integers `_count` reads as is, at the members `record_usage` reads, in its order of precedence):
    ("openai", prompt, completion, cached, cache_write, reasoning) or ("anthropic", input, cache_read,
    cache_creation, output)."""
    if counts[0] == "openai":
        return _openai_counts(*counts[1:])  # type: ignore[arg-type]
    return _anthropic_counts(*counts[1:])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Byte patterns
# --------------------------------------------------------------------------------------------------

_WS: Final = rb"[ \t\r\n]*"
_STRING_BODY: Final = rb'([^"\\]*(?:\\.[^"\\]*)*)"'
# A usage object (not `"usage": null`): a quoted key cannot occur inside a JSON string unescaped.
_USAGE_OBJECT: Final = re.compile(rb'"usage"' + _WS + rb":" + _WS + rb"\{")
# Where each provider puts its usage record (issue 13: a `"usage": {...}` anywhere else, e.g. in the
# request's tools echoed by Responses' response.created, is client-chosen content, never a record).
# An event is named by its `event:` line, else by the "type" its data starts with; the record is the
# `usage` member of the object at depth 1 (the event's data) or 2 (data.response / data.message).
_EVENT_NAME: Final = re.compile(rb"(?:^|\n)event:[ \t]*([^\s]{1,64})")
_DATA_TYPE: Final = re.compile(
    rb"(?:^|\n)data:[ \t]*\{" + _WS + rb'"type"' + _WS + rb":" + _WS + rb'"([^"\\]{1,64})"'
)
_RESPONSES_FINAL: Final = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})
_HEAD_BYTES: Final = 512  # an event's name is in its first bytes
_CANDIDATES: Final = 4  # usage objects of one event tried, from its end (a record is its event's last)
_MODEL_SCAN_BYTES: Final = 8 << 10  # the response's model is looked for in its first bytes only
_MODEL_FIELD: Final = re.compile(rb'"model"[ \t\r\n]*:[ \t\r\n]*"([^"\\]{1,200})"')
_CLOSE: Final = {1: '{"_":0', 2: '{"_":{"_":0'}  # + what follows a usage object at that depth: valid JSON
# Error events, found with substring checks (a regex without a literal prefix scans at ~60 MB/s):
# Anthropic `{"type": "error", ...}` / `event: error`, Responses `error` and `response.failed`, an
# OpenAI `data: {"error": {...}}`. Quoted markers only match structure, never text inside strings.
_ERROR_MARKERS: Final = (
    b'"type":"error"',
    b'"type": "error"',
    b'"response.failed"',
    b"event: error\n",
    b"event:error\n",
    b'data: {"error":',
    b'data: {"error" :',
    b'data:{"error":',
)


def _content_pattern(*keys: str) -> re.Pattern[bytes]:
    names = "|".join(keys).encode()
    return re.compile(rb'"(?:' + names + rb')"' + _WS + rb":" + _WS + rb'"' + _STRING_BODY, re.DOTALL)


# Which string fields of a stream are generated content, per format. Each regex matches only keys
# (structure), never text inside strings, since quotes there are escaped.
_OPENAI, _ANTHROPIC, _RESPONSES, _UNKNOWN = 1, 2, 3, 0
_CONTENT: Final = {
    # chat deltas (content, tool-call arguments, refusal; reasoning as some compatible servers send it)
    # and legacy completions (choices[].text)
    _OPENAI: _content_pattern("content", "arguments", "refusal", "reasoning_content", "reasoning", "text"),
    # content_block_delta: text_delta.text, input_json_delta.partial_json, thinking_delta.thinking
    _ANTHROPIC: _content_pattern("text", "partial_json", "thinking"),
    # response.*.delta events carry their text in "delta"; the *.done events repeat it as "text",
    # which must not count twice
    _RESPONSES: _content_pattern("delta"),
    _UNKNOWN: _content_pattern(
        "content", "arguments", "refusal", "text", "partial_json", "thinking", "delta"
    ),
}
_KIND_MARKERS: Final = (
    (b'"response.', _RESPONSES),  # "type":"response.created" ...
    (b'"message_start"', _ANTHROPIC),
    (b'"content_block_', _ANTHROPIC),
    (b'"chat.completion', _OPENAI),
    (b'"text_completion"', _OPENAI),
    (b'"choices"', _OPENAI),
)

_decoder = json.JSONDecoder()
_lenient = json.JSONDecoder(strict=False)  # content strings may carry raw control characters


def _record_at(segment: bytes, depth: int) -> dict[str, object] | None:
    """The usage object `segment` starts with (its `{`), if it is a member of the object at `depth`:
    what follows it (up to the end of the event or document) must close exactly `depth` objects."""
    if b"\n" in segment:  # the JSON continues on other data lines: rebuild it (other fields dropped)
        lines = segment.split(b"\n")
        segment = b"\n".join(
            [lines[0]] + [line[5:].removeprefix(b" ") for line in lines[1:] if line.startswith(b"data:")]
        )
    text = segment.decode("utf-8", "replace")
    try:
        record, end = _decoder.raw_decode(text[:_USAGE_SPAN])
        if not isinstance(record, dict):
            return None
        _decoder.decode(_CLOSE[depth] + text[end:])
    except (ValueError, RecursionError):
        return None
    return record


def _document_text(obj: dict[str, object]) -> str:
    """The generated text of a response document without a usage record (chat, completions,
    Responses, Anthropic), for an estimate."""
    parts: list[str] = []
    choices = obj.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            if isinstance(choice.get("text"), str):
                parts.append(choice["text"])
            message = choice.get("message")
            if isinstance(message, dict):
                for key in ("content", "refusal", "reasoning_content"):
                    if isinstance(message.get(key), str):
                        parts.append(message[key])
                calls = message.get("tool_calls")
                for call in calls if isinstance(calls, list) else ():
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                        parts.append(fn["arguments"])
    blocks = obj.get("content") if obj.get("type") == "message" else None
    for block in blocks if isinstance(blocks, list) else ():
        if isinstance(block, dict):
            for key in ("text", "thinking"):
                if isinstance(block.get(key), str):
                    parts.append(block[key])
            if isinstance(block.get("input"), dict):
                parts.append(json.dumps(block["input"]))
    output = obj.get("output") if obj.get("object") == "response" else None
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("arguments"), str):
            parts.append(item["arguments"])
        content = item.get("content")
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
    return "".join(parts)


def document_usage(body: bytes, start: int, end: int) -> tuple[Usage, str | None] | None:
    """(usage, model) of a whole JSON document (no content-encoding) whose top-level `"usage"` object is
    body[start:end], as StreamUsage reads the same body, for an accelerator that found that object and
    checked that the document is one valid JSON object with no top-level error (native/_usage.pyx
    `usage_span`); None when the object is no usage record (StreamUsage must read the document)."""
    try:
        record, _ = _decoder.raw_decode(body[start:end].decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    usage = record_usage(record) if isinstance(record, dict) else None
    if usage is None:
        return None
    return usage, document_model(body)


def document_model(body: bytes) -> str | None:
    """The model a whole document names, as StreamUsage._find_model finds it (in one chunk)."""
    match = _MODEL_FIELD.search(body, 0, _MODEL_SCAN_BYTES)
    return match.group(1).decode("utf-8", "replace") if match is not None else None
