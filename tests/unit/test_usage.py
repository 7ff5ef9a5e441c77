"""Conformance suite for usage extraction: every fixture gives its expected Usage one-shot, streamed in
random byte splits, gzip/deflate encoded, with CRLF line endings, cut off, and under adversarial input."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexus_authz.core.tokens import count_tokens
from nexus_authz.core.usage import MAX_DECODED_BYTES, MAX_EVENT_BYTES, StreamUsage, Usage, usage_from_body

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "usage"
HINT = 100  # the prompt estimate a reservation would pass in

CHAT_TEXT = 'Sure! Here\'s a "quoted" line:\n- café — 東京 😀 done.'
TOOL_ARGS = '{"location":"Paris, France","unit":"celsius"}'
RESPONSES_TEXT = 'In a quiet forest, a unicorn named "Luna" found a glowing stone.\n'
ANTHROPIC_THINKING = "The user wants a haiku. Keep it short."
ANTHROPIC_TEXT = 'Okay, here is a "haiku":\n\nQuiet pond— a frog leaps.'
ANTHROPIC_TOOL = '{"query": "frog haiku"}'


def estimated(text: str, prompt: int = HINT) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=count_tokens(text), source="estimated")


NONE = Usage(source="none")

EXPECTED: dict[str, Usage] = {
    "openai_chat.json": Usage(prompt_tokens=19, completion_tokens=10),
    "openai_chat_cached_reasoning.json": Usage(
        prompt_tokens=2306, cached_prompt_tokens=1920, completion_tokens=470, reasoning_tokens=448
    ),
    "openai_chat_stream_usage.sse": Usage(prompt_tokens=24, completion_tokens=17),
    "openai_chat_stream_no_usage.sse": estimated(CHAT_TEXT),
    "openai_chat_stream_tool_calls.sse": estimated(TOOL_ARGS),
    "openai_embeddings.json": Usage(prompt_tokens=8),
    "openai_responses.json": Usage(
        prompt_tokens=1536, cached_prompt_tokens=1280, completion_tokens=320, reasoning_tokens=256
    ),
    "openai_responses_stream.sse": Usage(
        prompt_tokens=1536, cached_prompt_tokens=1280, completion_tokens=320, reasoning_tokens=256
    ),
    # the same stream, echoing a request whose tools and metadata hold fake usage objects (issue 13)
    "openai_responses_stream_echoed_usage.sse": Usage(
        prompt_tokens=1536, cached_prompt_tokens=1280, completion_tokens=320, reasoning_tokens=256
    ),
    # Anthropic: prompt_tokens = input + cache reads + cache writes
    "anthropic_message.json": Usage(
        prompt_tokens=12 + 8000 + 1500,
        cached_prompt_tokens=8000,
        cache_write_tokens=1500,
        completion_tokens=18,
    ),
    # two cumulative message_delta events (61, then 89): the latest wins, never the sum
    "anthropic_stream.sse": Usage(prompt_tokens=472 + 2048, cached_prompt_tokens=2048, completion_tokens=89),
    "openai_error.json": NONE,
    "anthropic_error.json": NONE,
    "anthropic_stream_error.sse": NONE,
}


def load(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def content_type(name: str) -> str:
    return "text/event-stream" if name.endswith(".sse") else "application/json"


def test_every_fixture_has_an_expectation() -> None:
    assert sorted(p.name for p in FIXTURES.iterdir()) == sorted(EXPECTED)


def one_shot(body: bytes, **kwargs: object) -> Usage:
    kwargs.setdefault("content_type", None)
    kwargs.setdefault("content_encoding", None)
    return usage_from_body(body, prompt_tokens_hint=HINT, count_tokens=count_tokens, **kwargs)  # type: ignore[arg-type]


def streamed(body: bytes, cuts: list[int], *, window: int = 1024, encoding: str | None = None) -> StreamUsage:
    parser = StreamUsage(
        content_encoding=encoding, prompt_tokens_hint=HINT, count_tokens=count_tokens, window=window
    )
    points = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    for start, end in zip(points, points[1:], strict=False):
        parser.feed(body[start:end])
    return parser


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_one_shot(name: str) -> None:
    body = load(name)
    assert one_shot(body) == EXPECTED[name]
    assert one_shot(body, content_type=content_type(name)) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=60),
    window=st.sampled_from([64, 300, 4096]),
)
def test_fixture_split_at_random_bytes(name: str, cuts: list[int], window: int) -> None:
    body = load(name)
    assert streamed(body, cuts, window=window).finish() == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_split_at_every_byte(name: str) -> None:
    body = load(name)
    parser = StreamUsage(prompt_tokens_hint=HINT, count_tokens=count_tokens, window=64)
    for i in range(len(body)):
        parser.feed(body[i : i + 1])
    assert parser.finish() == EXPECTED[name]


def _deflate_raw(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


ENCODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,  # zlib-wrapped, as RFC 9110 means it
    "Deflate ": _deflate_raw,  # raw deflate, as some servers send it
}


@pytest.mark.parametrize("encoding", sorted(ENCODERS))
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_compressed(name: str, encoding: str) -> None:
    compressed = ENCODERS[encoding](load(name))
    assert one_shot(compressed, content_encoding=encoding) == EXPECTED[name]
    cuts = list(range(1, len(compressed), 7))
    assert streamed(compressed, cuts, window=128, encoding=encoding).finish() == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if n.endswith(".sse")))
@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
def test_fixture_other_line_endings(name: str, newline: bytes) -> None:
    body = load(name).replace(b"\n", newline)
    assert one_shot(body) == EXPECTED[name]
    assert streamed(body, list(range(1, len(body), 3)), window=64).finish() == EXPECTED[name]


# --- cut-off streams ------------------------------------------------------------------------------


def _events(name: str) -> list[bytes]:
    return [e + b"\n\n" for e in load(name).split(b"\n\n") if e]


def _delta_text(events: list[bytes], field: str) -> str:
    text = ""
    for event in events:
        data = json.loads(event.split(b"data: ", 1)[1])
        if field == "openai":
            for choice in data.get("choices") or []:
                delta = choice.get("delta") or {}
                text += delta.get("content") or ""
                for call in delta.get("tool_calls") or []:
                    text += call["function"].get("arguments") or ""
        elif field == "responses" and data["type"].endswith(".delta"):
            text += data["delta"]
        elif field == "anthropic" and data["type"] == "content_block_delta":
            delta = data["delta"]
            text += delta.get("text") or delta.get("thinking") or delta.get("partial_json") or ""
    return text


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("openai_chat_stream_usage.sse", "openai"),
        ("openai_chat_stream_tool_calls.sse", "openai"),
        ("openai_responses_stream.sse", "responses"),
        ("openai_responses_stream_echoed_usage.sse", "responses"),
    ],
)
def test_cut_off_at_an_event_boundary_charges_hint_plus_content_seen(name: str, field: str) -> None:
    events = [e for e in _events(name) if b"[DONE]" not in e and b'"response.completed"' not in e]
    events = [e for e in events if b'"choices":[]' not in e]  # drop the usage chunk: cut off before it
    for k in range(1, len(events) + 1):
        body = b"".join(events[:k])
        text = _delta_text(events[:k], field)
        expected = estimated(text)
        assert one_shot(body) == expected, k
        assert streamed(body, list(range(0, len(body), 50)), window=64).finish() == expected, k


def test_responses_cut_off_counts_deltas_not_the_done_events() -> None:
    body = b"".join(e for e in _events("openai_responses_stream.sse") if b'"response.completed"' not in e)
    assert one_shot(body) == estimated(RESPONSES_TEXT)


def test_anthropic_cut_off_keeps_the_exact_prompt_from_message_start() -> None:
    events = _events("anthropic_stream.sse")
    before_delta = [e for e in events if b"message_delta" not in e and b"message_stop" not in e]
    usage = one_shot(b"".join(before_delta))
    seen = ANTHROPIC_THINKING + ANTHROPIC_TEXT + ANTHROPIC_TOOL
    assert usage == Usage(
        prompt_tokens=2520,
        cached_prompt_tokens=2048,
        completion_tokens=count_tokens(seen),
        source="estimated",
    )
    only_start = one_shot(events[0])  # message_start says output_tokens: 2 and nothing else came
    assert only_start == Usage(
        prompt_tokens=2520, cached_prompt_tokens=2048, completion_tokens=2, source="estimated"
    )


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(min_value=0, max_value=10_000), name=st.sampled_from(sorted(EXPECTED)))
def test_cut_off_anywhere_is_defined(cut: int, name: str) -> None:
    body = load(name)
    body = body[: cut % (len(body) + 1)]
    usage = one_shot(body)
    assert usage == streamed(body, [cut // 3, cut // 2], window=64).finish()
    assert usage.source in ("provider", "estimated", "none")
    assert usage.prompt_tokens >= 0 and usage.completion_tokens >= 0
    if usage.source == "estimated" and name.startswith("openai_chat_stream"):
        assert usage.prompt_tokens == HINT


def test_empty_stream_charges_the_prompt_hint() -> None:
    parser = StreamUsage(prompt_tokens_hint=42)
    assert parser.finish() == Usage(prompt_tokens=42, source="estimated")


# --- errors ---------------------------------------------------------------------------------------


def test_error_stream_is_none_and_flagged() -> None:
    parser = StreamUsage(prompt_tokens_hint=HINT)
    parser.feed(load("anthropic_stream_error.sse"))
    assert parser.finish() == NONE
    assert parser.saw_error


def test_openai_stream_error_event() -> None:
    body = b'data: {"error":{"message":"The server had an error","type":"server_error","code":null}}\n\n'
    assert one_shot(body) == NONE


def test_error_after_content_is_charged_for_the_content() -> None:
    events = _events("anthropic_stream.sse")
    overloaded = b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error"}}\n\n'
    body = b"".join(events[:4]) + overloaded
    parser = StreamUsage(prompt_tokens_hint=HINT, count_tokens=count_tokens)
    parser.feed(body)
    usage = parser.finish()
    assert parser.saw_error
    assert usage.source == "estimated" and usage.prompt_tokens == 2520
    assert usage.completion_tokens == count_tokens("The user wants a haiku")


def test_responses_failed_without_usage_is_none() -> None:
    body = (
        b"event: response.failed\n"
        b'data: {"type":"response.failed","sequence_number":3,"response":{"id":"resp_1","object":"response",'
        b'"status":"failed","error":{"code":"server_error","message":"boom"},"output":[],"usage":null}}\n\n'
    )
    assert one_shot(body) == NONE
    failed_doc = b'{"id":"resp_1","object":"response","status":"failed","error":{"code":"x"},"usage":null}'
    assert one_shot(failed_doc) == NONE


def test_html_error_page_is_none() -> None:
    page = b"<html><head><title>502 Bad Gateway</title></head><body>upstream connect error</body></html>"
    assert one_shot(page, content_type="text/html") == NONE


# --- shapes and semantics ---------------------------------------------------------------------------


def test_usage_in_every_chunk_takes_the_latest() -> None:
    # vLLM's continuous_usage_stats: a cumulative usage object on every chunk
    chunk = (
        '{{"object":"chat.completion.chunk","choices":[{{"delta":{{"content":"x"}}}}],'
        '"usage":{{"prompt_tokens":7,"completion_tokens":{n},"total_tokens":{t}}}}}'
    )
    body = "".join(f"data: {chunk.format(n=n, t=7 + n)}\n\n" for n in range(1, 6)) + "data: [DONE]\n\n"
    assert one_shot(body.encode()) == Usage(prompt_tokens=7, completion_tokens=5)


def test_multi_line_data_field_is_joined() -> None:
    body = (
        b'data: {"object":"chat.completion.chunk","choices":[],\n'
        b'data: "usage":{"prompt_tokens":3,\n'
        b'data: "completion_tokens":4,"total_tokens":7}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert one_shot(body) == Usage(prompt_tokens=3, completion_tokens=4)


def test_whitespace_and_comments_in_the_stream() -> None:
    body = (
        b": keep-alive\n\n"
        b'data: {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "Hi"}}], '
        b'"usage": null}\n\n'
        b": keep-alive\n\n"
        b'data: {"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 5, '
        b'"completion_tokens": 1, "total_tokens": 6, "prompt_tokens_details": {"cached_tokens": 2}}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert one_shot(b"\xef\xbb\xbf" + body) == Usage(
        prompt_tokens=5, cached_prompt_tokens=2, completion_tokens=1
    )


def test_legacy_completions_stream_without_usage_counts_text() -> None:
    body = (
        b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"text":"Hello","index":0}]}\n\n'
        b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"text":" world","index":0}]}\n\n'
        b"data: [DONE]\n\n"
    )
    assert one_shot(body) == estimated("Hello world")


def test_json_without_usage_estimates_from_the_generated_text() -> None:
    doc = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Bonjour à tous"}}],
    }
    assert one_shot(json.dumps(doc).encode()) == estimated("Bonjour à tous")
    anthropic = {"type": "message", "content": [{"type": "text", "text": "Hi there"}]}
    assert one_shot(json.dumps(anthropic).encode()) == estimated("Hi there")
    assert one_shot(b"{}") == NONE


def test_nonsense_counts_are_sanitised() -> None:
    record = {
        "prompt_tokens": -5,
        "completion_tokens": True,
        "prompt_tokens_details": {"cached_tokens": 10**20},
        "completion_tokens_details": {"reasoning_tokens": "many"},
    }
    assert one_shot(json.dumps({"usage": record}).encode()) == Usage()
    record = {"prompt_tokens": 10, "completion_tokens": 5.0, "prompt_tokens_details": {"cached_tokens": 50}}
    assert one_shot(json.dumps({"usage": record}).encode()) == Usage(
        prompt_tokens=10, cached_prompt_tokens=10, completion_tokens=5
    )
    both = {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 6, "cache_write_tokens": 9}}
    assert one_shot(json.dumps({"usage": both}).encode()) == Usage(
        prompt_tokens=10, cached_prompt_tokens=6, cache_write_tokens=4
    )


def test_total_tokens() -> None:
    assert EXPECTED["anthropic_stream.sse"].total_tokens == 2520 + 89
    assert NONE.total_tokens == 0


def test_finish_is_idempotent_and_later_feeds_are_ignored() -> None:
    parser = StreamUsage()
    parser.feed(load("openai_chat_stream_usage.sse"))
    first = parser.finish()
    parser.feed(b'data: {"usage":{"prompt_tokens":999,"completion_tokens":1}}\n\n')
    assert parser.finish() is first


def test_a_failing_counter_falls_back_to_the_estimate() -> None:
    def broken(text: str) -> int:
        raise RuntimeError("tokenizer unavailable")

    parser = StreamUsage(prompt_tokens_hint=HINT, count_tokens=broken)
    parser.feed(load("openai_chat_stream_no_usage.sse"))
    usage = parser.finish()
    assert usage.source == "estimated" and usage.completion_tokens > 0


def test_default_counter_is_the_fast_estimate() -> None:
    parser = StreamUsage(prompt_tokens_hint=HINT)
    parser.feed(load("openai_chat_stream_no_usage.sse"))
    usage = parser.finish()
    assert usage.source == "estimated" and abs(usage.completion_tokens - count_tokens(CHAT_TEXT)) <= 5


def test_long_stream_processed_in_windows_gives_the_same_answer() -> None:
    events = _events("openai_chat_stream_no_usage.sse")
    body = events[0] + b"".join(events[1:-2] * 200) + events[-2] + events[-1]
    text = _delta_text(events[1:-2], "openai") * 200
    assert streamed(body, list(range(0, len(body), 997)), window=4096).finish() == estimated(text)
    with_usage = body.replace(events[-1], load("openai_chat_stream_usage.sse").split(b"\n\n")[-3] + b"\n\n")
    assert streamed(with_usage, list(range(0, len(with_usage), 997)), window=4096).finish() == Usage(
        prompt_tokens=24, completion_tokens=17
    )


# --- adversarial input ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(body=st.binary(max_size=4096), cuts=st.lists(st.integers(0, 4096), max_size=10))
def test_garbage_never_raises(body: bytes, cuts: list[int]) -> None:
    usage = one_shot(body)
    assert usage.source in ("provider", "estimated", "none")
    assert streamed(body, cuts, window=64).finish() == usage


@settings(max_examples=100, deadline=None)
@given(
    garbage=st.lists(st.binary(min_size=1, max_size=200).filter(lambda b: b"usage" not in b), max_size=5),
    name=st.sampled_from(
        [n for n in sorted(EXPECTED) if n.endswith(".sse") and EXPECTED[n].source == "provider"]
    ),
)
def test_garbage_events_between_real_ones_are_ignored(garbage: list[bytes], name: str) -> None:
    events = _events(name)
    body = b"".join(
        e + b"data: " + g.replace(b"\n", b" ").replace(b"\r", b" ") + b"\n\n"
        for e, g in zip(events, garbage + [b"x"] * len(events), strict=False)
    )
    assert one_shot(body) == EXPECTED[name]


def test_enormous_line_is_bounded_and_skipped() -> None:
    events = _events("openai_chat_stream_usage.sse")
    parser = StreamUsage(prompt_tokens_hint=HINT)
    parser.feed(events[0])
    junk = b"data: " + b"A" * (64 << 10)
    for _ in range(48):  # 3 MiB without a newline
        parser.feed(junk)
        assert len(parser._buf) <= MAX_EVENT_BYTES + (256 << 10)
    parser.feed(b"\n\n")
    for event in events[1:]:
        parser.feed(event)
    assert parser.finish() == EXPECTED["openai_chat_stream_usage.sse"]
    assert parser.limited


def test_huge_final_event_keeps_its_usage() -> None:
    # A Responses `response.completed` whose output is larger than the event limit.
    big = "word " * (MAX_EVENT_BYTES // 4)
    completed = {
        "type": "response.completed",
        "response": {
            "object": "response",
            "output": [{"type": "message", "content": [{"type": "output_text", "text": big}]}],
            "usage": {"input_tokens": 11, "output_tokens": 262_144, "total_tokens": 262_155},
        },
    }
    body = b"event: response.completed\ndata: " + json.dumps(completed).encode() + b"\n\n"
    parser = StreamUsage()
    for i in range(0, len(body), 65_536):
        parser.feed(body[i : i + 65_536])
    assert parser.finish() == Usage(prompt_tokens=11, completion_tokens=262_144)
    assert parser.limited
    assert one_shot(body) == Usage(prompt_tokens=11, completion_tokens=262_144)


def test_huge_json_body_keeps_its_usage() -> None:
    doc = {
        "object": "chat.completion",
        "choices": [{"message": {"content": "x " * (5 << 20)}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5_000_000, "total_tokens": 5_000_003},
    }
    parser = StreamUsage()
    body = json.dumps(doc).encode()
    for i in range(0, len(body), 1 << 20):
        parser.feed(body[i : i + (1 << 20)])
    assert parser.finish() == Usage(prompt_tokens=3, completion_tokens=5_000_000)
    assert parser.limited
    assert one_shot(body) == Usage(prompt_tokens=3, completion_tokens=5_000_000)


def test_non_utf8_content_is_counted_not_fatal() -> None:
    body = (
        b'data: {"object":"chat.completion.chunk","choices":[{"delta":{"content":"ok \xff\xfe bytes"}}]}\n\n'
        b'data: {"object":"chat.completion.chunk","choices":[{"delta":{"content":"bad \\u12 escape"}}]}\n\n'
    )
    usage = one_shot(body)
    assert usage.source == "estimated" and usage.completion_tokens > 0


def test_deep_nesting_is_none() -> None:
    assert one_shot(b"[" * 200_000 + b"]" * 200_000) == NONE
    assert one_shot(b'{"a":' * 100_000 + b"1" + b"}" * 100_000) == NONE
    deep_usage = b'data: {"usage":' + b"{" * 50_000 + b"}" * 50_000 + b"}\n\n"
    assert one_shot(deep_usage).source == "estimated"


def test_zip_bomb_stops_at_the_cap() -> None:
    bomb = gzip.compress(b"\0" * (MAX_DECODED_BYTES + (16 << 20)), compresslevel=9)
    assert len(bomb) < 200_000
    parser = StreamUsage(content_encoding="gzip", prompt_tokens_hint=HINT)
    for i in range(0, len(bomb), 8192):
        parser.feed(bomb[i : i + 8192])
    usage = parser.finish()
    assert parser.limited
    assert usage.source in ("estimated", "none")
    assert one_shot(bomb, content_encoding="gzip").source in ("estimated", "none")


def test_corrupt_and_unknown_encodings() -> None:
    good = gzip.compress(load("openai_chat_stream_usage.sse"))
    corrupt = good[:40] + bytes(b ^ 0x5A for b in good[40:80]) + good[80:]
    usage = one_shot(corrupt, content_encoding="gzip")
    assert usage.source in ("estimated", "none")
    parser = StreamUsage(content_encoding="br", prompt_tokens_hint=HINT)
    parser.feed(b"\x1b\x00\x00")
    assert parser.finish() == Usage(prompt_tokens=HINT, source="estimated")
    assert parser.undecodable
    assert one_shot(b"x", content_encoding="deflate") == Usage(prompt_tokens=HINT, source="estimated")


def test_comment_only_stream_is_a_cut_off_stream() -> None:
    assert one_shot(b": ping\n\n: ping\n\n") == Usage(prompt_tokens=HINT, source="estimated")


def test_leading_blank_bytes_longer_than_a_window() -> None:
    body = b"\r\n \t" * 5000 + load("openai_chat.json")
    assert streamed(body, list(range(0, len(body), 100)), window=64).finish() == EXPECTED["openai_chat.json"]
    assert one_shot(b" \n" * 10) == Usage(prompt_tokens=HINT, source="estimated")


def test_raw_control_characters_in_content_are_counted() -> None:
    body = b'data: {"object":"chat.completion.chunk","choices":[{"delta":{"content":"tab\there"}}]}\n\n'
    assert one_shot(body) == estimated("tab\there")


def test_event_stuffed_with_usage_keys_stays_linear() -> None:
    stuffed = (
        b'data: {"x":['
        + b'{"usage":{"prompt_tokens":9,"completion_tokens":9}},' * 100_000
        + b'0],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    )
    assert one_shot(stuffed) == Usage(prompt_tokens=1, completion_tokens=2)
    assert streamed(stuffed, list(range(0, len(stuffed), 65_536)), window=1 << 20).finish() == Usage(
        prompt_tokens=1, completion_tokens=2
    )


def test_response_model_is_read_from_the_first_bytes() -> None:
    import re

    from nexus_authz.core.usage import StreamUsage

    names = [
        "openai_chat.json",
        "openai_chat_stream_usage.sse",
        "anthropic_stream.sse",
        "anthropic_message.json",
        "openai_responses.json",
        "openai_responses_stream.sse",
    ]
    for name in names:
        data = (FIXTURES / name).read_bytes()
        first = re.search(rb'"model"\s*:\s*"([^"\\]{1,200})"', data)
        assert first is not None, name
        for step in (1, 7, len(data)):  # split anywhere, even inside the field
            parser = StreamUsage()
            for i in range(0, len(data), step):
                parser.feed(data[i : i + step])
            parser.finish()
            assert parser.model == first.group(1).decode(), (name, step)


# --- usage only where the provider puts it (issue 13) ---------------------------------------------------

FAKE = {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}
OPENAI_FAKE = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}


def _sse(*events: tuple[str | None, dict[str, object]]) -> bytes:
    return b"".join(
        (f"event: {name}\n".encode() if name else b"") + b"data: " + json.dumps(data).encode() + b"\n\n"
        for name, data in events
    )


def test_cut_responses_stream_echoing_a_fake_usage_is_not_charged_the_fake() -> None:
    # A request's tools are echoed in response.created: a client-chosen `"usage": {...}` object there is
    # no usage record; cut before response.completed, the stream is charged what it showed.
    events = [
        e for e in _events("openai_responses_stream_echoed_usage.sse") if b"response.completed" not in e
    ]
    body = b"".join(events)
    assert one_shot(body) == estimated(RESPONSES_TEXT)
    assert streamed(body, list(range(0, len(body), 50)), window=64).finish() == estimated(RESPONSES_TEXT)


def test_responses_usage_is_read_from_the_final_events_only() -> None:
    created = {"type": "response.created", "response": {"object": "response", "usage": FAKE}}
    delta = {"type": "response.output_text.delta", "delta": "hello there", "usage": FAKE}
    done = {"type": "response.output_text.done", "text": "hello there", "usage": FAKE}
    body = _sse(("response.created", created), ("response.output_text.delta", delta), ("x", done))
    assert one_shot(body) == estimated("hello there")
    for final in ("response.completed", "response.incomplete", "response.failed"):
        record = {"input_tokens": 7, "output_tokens": 5, "total_tokens": 12}
        event = {"type": final, "response": {"object": "response", "usage": record, "metadata": {}}}
        assert one_shot(body + _sse((final, event))) == Usage(prompt_tokens=7, completion_tokens=5), final
        # data-only streams (no `event:` lines) are read by their "type"
        assert one_shot(body + _sse((None, event))) == Usage(prompt_tokens=7, completion_tokens=5), final
        nested = {"type": final, "response": {"object": "response", "tools": [{"usage": FAKE}]}}
        assert one_shot(body + _sse((final, nested))) == estimated("hello there"), final


def test_chat_usage_is_read_from_the_top_level_only() -> None:
    chunk = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "hi you"}}]}
    nested = {
        "object": "chat.completion.chunk",
        "choices": [{"delta": {"content": " there"}, "logprobs": {"usage": OPENAI_FAKE}}],
        "x": {"usage": OPENAI_FAKE},
    }
    body = _sse((None, chunk), (None, nested))
    assert one_shot(body) == estimated("hi you there")
    final = {
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4},
    }
    assert one_shot(body + _sse((None, final))) == Usage(prompt_tokens=9, completion_tokens=4)


def test_anthropic_usage_is_read_from_message_start_and_message_delta_only() -> None:
    start = {
        "type": "message_start",
        "message": {"type": "message", "content": [], "usage": {"input_tokens": 30, "output_tokens": 1}},
    }
    tool = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "tool_use", "input": {"usage": FAKE}},
    }
    delta = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "abc def"},
        "usage": FAKE,
    }
    body = _sse(("message_start", start), ("content_block_start", tool), ("content_block_delta", delta))
    assert one_shot(body) == Usage(
        prompt_tokens=30, completion_tokens=count_tokens("abc def"), source="estimated"
    )
    fake_final = {"type": "message_delta", "delta": {"stop_reason": None}, "x": {"usage": FAKE}}
    assert one_shot(body + _sse(("message_delta", fake_final))).source == "estimated"
    real = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 12}}
    assert one_shot(body + _sse(("message_delta", real))) == Usage(prompt_tokens=30, completion_tokens=12)
    # a usage object nested in message_start's content is not the message's usage
    fake_start = {"type": "message_start", "message": {"content": [{"input": {"usage": FAKE}}]}}
    assert one_shot(_sse(("message_start", fake_start), ("content_block_delta", delta))) == estimated(
        "abc def"
    )


def test_json_usage_is_read_from_the_top_level_only() -> None:
    doc = {"object": "chat.completion", "choices": [{"message": {"content": "four words right here"}}]}
    assert one_shot(json.dumps({**doc, "metadata": {"usage": OPENAI_FAKE}}).encode()) == estimated(
        "four words right here"
    )
    event_doc = {"type": "response.created", "response": {"object": "response", "usage": FAKE}}
    assert one_shot(json.dumps(event_doc).encode()).source != "provider"


def test_huge_json_body_ignores_a_nested_usage_after_the_real_one() -> None:
    doc = {
        "object": "chat.completion",
        "choices": [{"message": {"content": "x " * (5 << 20)}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5_000_000, "total_tokens": 5_000_003},
        "metadata": {"usage": OPENAI_FAKE},
    }
    body = json.dumps(doc).encode()
    assert one_shot(body) == Usage(prompt_tokens=3, completion_tokens=5_000_000)
    parser = StreamUsage()
    for i in range(0, len(body), 1 << 20):
        parser.feed(body[i : i + (1 << 20)])
    assert parser.finish() == Usage(prompt_tokens=3, completion_tokens=5_000_000)


def test_huge_nested_fake_usage_event_is_not_a_record() -> None:
    # an event over the size limit keeps only its tail: its name is still known from its head
    big = "word " * (MAX_EVENT_BYTES // 4)
    created = {"type": "response.created", "response": {"instructions": big, "tools": [{"usage": FAKE}]}}
    body = b"event: response.created\ndata: " + json.dumps(created).encode() + b"\n\n"
    parser = StreamUsage(prompt_tokens_hint=HINT)
    for i in range(0, len(body), 65_536):
        parser.feed(body[i : i + 65_536])
    assert parser.finish().source == "estimated"


def test_a_short_stream_with_its_usage_record_needs_no_exact_count() -> None:
    """A few SSE events with the usage record, shorter than the parser's window (the Lua tap's "sse"
    snippet): count_exactly must see the record before finish(), or every such entry would be counted
    in a worker thread (and tiktoken loaded) for nothing."""
    events = (FIXTURES / "openai_chat_stream_usage.sse").read_bytes()
    usage_event = [e for e in events.split(b"\n\n") if b'"usage":{' in e][-1] + b"\n\n"
    parser = StreamUsage(content_type="text/event-stream")
    parser.feed(usage_event)
    counted: list[str] = []
    assert parser.count_exactly(lambda text: counted.append(text) or 0, 0) is False
    assert parser.finish() == Usage(prompt_tokens=24, completion_tokens=17)
    assert counted == []
    # without a usage record the count is still asked for
    cut = StreamUsage(content_type="text/event-stream")
    cut.feed(b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n')
    assert cut.count_exactly(lambda text: 0, 0) is True
