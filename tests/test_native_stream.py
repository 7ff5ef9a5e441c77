"""The compiled reading of a whole stream without a usage record (native/_usage.pyx `stream_text`, which
`_counted` accounts with) against the reference, core/usage.StreamUsage: the text its completion count
reads. Whenever the compiled reading answers, it must be exactly the text StreamUsage hands its counter,
and it must find content exactly when StreamUsage counts any; it may hand any stream back (None), and
must for the ones StreamUsage reads in a way it does not (a surrogate escape out of its pair, invalid
UTF-8, an escape json refuses)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus_authz import native
from nexus_authz.core import usage_records
from nexus_authz.core.usage import StreamUsage
from tests.adapters.test_als_fast import _compiled  # noqa: F401
from tests.fuzz._support import fuzz_settings

pytestmark = pytest.mark.usefixtures("_compiled")

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "usage"

_NO_COUNT = object()


def pure_text(data: bytes, split: bool) -> object:
    """The text StreamUsage counts for `data` fed in one chunk as an event stream (_NO_COUNT: it counts
    nothing). `split`: Engine.account_response's exact count (count_exactly drains what is complete first;
    finish reads the rest), else finish alone."""
    seen: list[str] = []

    def counter(text: str) -> int:
        seen.append(text)
        return 0

    parser = StreamUsage(content_type="text/event-stream")
    parser.feed(data)
    if split:
        parser.count_exactly(counter, 1 << 30)
    else:
        parser.count_tokens = counter
    parser.finish()
    assert len(seen) <= 1
    return seen[0] if seen else _NO_COUNT


def compiled_text(data: bytes, split: bool) -> object:
    assert native.usage is not None
    found = native.usage.stream_text(data, split)
    if found is None:
        return None
    text, matches = found
    return text if matches else _NO_COUNT


def test_the_tables_are_the_cores() -> None:
    """The kind markers, each format's content keys and the error markers are usage_records'."""
    assert native.usage is not None
    markers, content, errors = native.usage.stream_tables()
    assert markers == usage_records._KIND_MARKERS
    assert errors == usage_records._ERROR_MARKERS
    assert set(content) == set(usage_records._CONTENT)
    for kind, keys in content.items():
        assert usage_records._content_pattern(*keys).pattern == usage_records._CONTENT[kind].pattern


def _chunk(key: str, text: str, ascii_only: bool = True) -> bytes:
    event = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {key: text}}]}
    return b"data: " + json.dumps(event, ensure_ascii=ascii_only).encode() + b"\n\n"


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize(
    "data",
    [
        _chunk("content", "Hello") + _chunk("content", ", world") + b"data: [DONE]\n\n",
        _chunk("content", 'a\n\t"b" \\ / \x00 \x7f é 東 😀') + _chunk("refusal", "no"),
        _chunk("content", "é 東 😀", ascii_only=False),
        _chunk("reasoning_content", "think") + _chunk("reasoning", "more") + _chunk("text", "legacy"),
        b'data: {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}}\n\n',
        b'data: {"type": "response.output_text.delta", "delta": "Hi", "text": "not twice"}\n\n',
        b'data: {"content" : "spaced",  "content":\n"newline"}\n\n',
        b'data: {"content": "unterminated',
        b'data: {"x": {"partial_json": "first window"}}\n\n' + _chunk("content", "second")[:-1],
        b"data: {}\n\n",
    ],
)
def test_streams_read_as_the_reference(data: bytes, split: bool) -> None:
    assert compiled_text(data, split) == pure_text(data, split)


@pytest.mark.parametrize(
    "literal",
    [b"x\\ud800y", b"\\udc00", b"\\ud83d\\u0041", b"x\\qy", b"\\u12", b"\\u12g4", b"a\xe6", b"\xed\xa0\x80"],
)
def test_what_json_reads_otherwise_is_handed_back(literal: bytes) -> None:
    """A surrogate escape out of its pair, an escape json refuses, invalid UTF-8: handed back (the
    reference then keeps a lone surrogate, estimates the literal, or replaces the bytes)."""
    data = b'data: {"choices": [{"delta": {"content": "' + literal + b'"}}]}\n\n'
    for split in (False, True):
        assert compiled_text(data, split) is None


# The pieces of a generated stream: JSON punctuation, content keys of every format and others, kind
# markers, escapes (valid and not, surrogates paired and not), multi-byte and invalid UTF-8, the SSE
# framing, raw control characters.
_KEYS = [b"content", b"arguments", b"refusal", b"reasoning_content", b"reasoning", b"text", b"partial_json"]
_KEYS += [b"thinking", b"delta", b"contents", b"tex", b"role", b"model"]
_PIECES = [b'"' + k + b'"' for k in _KEYS] + [
    b'"',
    b":",
    b" : ",
    b"\n",
    b",",
    b"{",
    b"}",
    b"[",
    b"]",
    b"data: ",
    b"\n\n",
    b"data: [DONE]\n\n",
    b'"chat.completion.chunk"',
    b'"choices"',
    b'"message_start"',
    b'"content_block_delta"',
    b'"response.output_text.delta"',
    b'"text_completion"',
    b"\\",
    b'\\"',
    b"\\\\",
    b"\\n",
    b"\\t",
    b"\\/",
    b"\\u0041",
    b"\\u00e9",
    b"\\u6771",
    b"\\ud83d\\ude00",
    b"\\ud83d",
    b"\\ude00",
    b"\\uD83D\\uDE00",
    b"\\x",
    b"\\u12",
    b"\xc3\xa9",
    b"\xe6\x9d\xb1",
    b"\xf0\x9f\x98\x80",
    b"\xe6",
    b"\x80",
    b"\xed\xa0\x80",
    b"\x00",
    b"\x1f",
    b"\t",
    b"word ",
    b"Hello, world",
]


_BODY = [p for p in _PIECES if p not in (b'"', b"\n\n", b"data: [DONE]\n\n") and not p.startswith(b'"')]
# a member whose string value a content pattern may match (its key of any format, spacing, the value's text)
_MEMBER = st.builds(
    lambda key, before, after, body: b'"' + key + b'"' + before + b":" + after + b'"' + b"".join(body) + b'"',
    st.sampled_from(_KEYS),
    st.sampled_from([b"", b" ", b"\n", b"\t "]),
    st.sampled_from([b"", b" ", b"\n"]),
    st.lists(st.sampled_from(_BODY), max_size=8),
)


@fuzz_settings(1500, deadline=None)
@given(
    pieces=st.lists(st.one_of(st.sampled_from(_PIECES), _MEMBER), max_size=40),
    head=st.sampled_from([b"data: ", b"data:", b""]),
    split=st.booleans(),
)
def test_generated_streams_read_as_the_reference(pieces: list[bytes], head: bytes, split: bool) -> None:
    data = head + b"".join(pieces)
    got = compiled_text(data, split)
    if got is None:  # handed back: only for an escape or a non-ASCII byte, where the readings may differ
        assert b"\\" in data or not data.isascii(), data
        return
    assert got == pure_text(data, split), data


@fuzz_settings(300, deadline=None)
@given(
    texts=st.lists(st.text(st.characters(exclude_categories=()), max_size=40), min_size=1, max_size=8),
    key=st.sampled_from(["content", "arguments", "text", "partial_json", "delta"]),
    ascii_only=st.booleans(),
    split=st.booleans(),
)
def test_any_text_the_provider_sends_reads_as_the_reference(
    texts: list[str], key: str, ascii_only: bool, split: bool
) -> None:
    """Every text json.dumps writes (either escaping), surrogates included: the same text, always when it
    holds no surrogate (else handed back, unless its escapes pair up as json reads them)."""
    events = [json.dumps({"choices": [{"delta": {key: t}}]}, ensure_ascii=ascii_only) for t in texts]
    data = b"".join(b"data: " + e.encode("utf-8", "surrogatepass") + b"\n\n" for e in events)
    got = compiled_text(data, split)
    if got is not None or not any(0xD800 <= ord(c) <= 0xDFFF for t in texts for c in t):
        assert got == pure_text(data, split), data


# -- named usage events (native/_usage.pyx `named_sse_counts`, the "sse" snippet): Anthropic's, Responses' ---

_FIELDS = ["input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "output_tokens"]
_OPENAI_FIELDS = [
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "input_tokens_details",
    "output_tokens_details",
]
_VALUES = ["0", "7", "123456", "1099511627776", "1099511627777", "7.0", "-1", "true", '"5"', "null", "1e3"]
_VALUES = _VALUES[:4] * 6 + _VALUES  # mostly plain counts: the compiled reading answers most events
_USAGE_MEMBERS = st.lists(
    st.tuples(
        st.sampled_from([*_FIELDS, "prompt_tokens", "total_tokens", "service_tier", "x"]),
        st.sampled_from(_VALUES),
    ),
    max_size=5,
)


@st.composite
def anthropic_events(draw: st.DrawFn, clean: bool, responses: bool = False) -> bytes:
    """Usage events as the Lua tap keeps them. `clean`: as Anthropic sends them (message_start, then
    message_delta events, the usage object at its place with counts only), or with `responses` as a
    Responses stream does (response.created, .completed, .incomplete, its data.response.usage), named by
    an event: line or their data's "type"; else also other names, no name, the usage object elsewhere,
    any members, data over two lines, CR line ends."""
    out = b""
    count = draw(st.integers(1, 4))
    for i in range(count):
        if clean and responses:
            name = draw(st.sampled_from(["response.created", "response.completed", "response.incomplete"]))
            keys = draw(st.lists(st.sampled_from(_OPENAI_FIELDS), min_size=1, max_size=4))
            members = [(k, draw(st.sampled_from(["0", "7", "123456", '{"cached_tokens":3}']))) for k in keys]
            place = "right"
        elif clean:
            name = "message_start" if i == 0 and count > 1 else "message_delta"
            keys = draw(st.lists(st.sampled_from(_FIELDS), min_size=1, max_size=4))
            members = [(k, draw(st.sampled_from(["0", "7", "123456", "999999999999"]))) for k in keys]
            place = "right"
        else:
            name = draw(
                st.sampled_from(
                    ["message_start"] * 3 + ["message_delta"] * 5 + ["ping", "response.completed"]
                )
            )
            members = draw(_USAGE_MEMBERS)
            place = draw(st.sampled_from(["right"] * 8 + ["top", "deep"]))
        usage = "{" + ",".join(f'"{k}":{v}' for k, v in members) + "}"
        nested = (name != "message_delta") == (place == "right") or place == "deep"
        outer = "response" if name.startswith("response.") else "message"
        body = f'"{outer}":{{"id":"m","usage":{usage},"x":1}}' if nested else f'"usage":{usage}'
        if place == "deep":
            body = f'"message":{{"inner":{{{body}}}}}'
        line = draw(st.sampled_from([f"event: {name}\n", f"event:{name}\n", ""]))
        typed_first = draw(st.booleans()) or (clean and not line)  # a clean event is named somewhere
        data = f'{{"type":"{name}",{body}}}' if typed_first else f'{{{body},"type":"{name}"}}'
        if not clean and draw(st.integers(0, 9)) == 0:
            data = data.replace(',"', ',\ndata: "', 1)
        out += (line + "data: " + data + "\n\n").encode()
    if not clean and draw(st.integers(0, 9)) == 0:
        out = out.replace(b"\n", b"\r\n")
    return out


def pure_usage(data: bytes, split: bool) -> object:
    parser = StreamUsage(content_type="text/event-stream")
    parser.feed(data)
    if split:
        parser.count_exactly(lambda text: 0, 1 << 30)
    return parser.finish()


@fuzz_settings(1500, deadline=None)
@given(
    data=st.one_of(anthropic_events(True), anthropic_events(True, True), anthropic_events(False)),
    split=st.booleans(),
)
def test_named_usage_events_read_as_the_reference(data: bytes, split: bool) -> None:
    """Anthropic's usage events and Responses' final ones (with a client's "usage" echoed in
    response.created): whenever the compiled reading answers, StreamUsage reads the same provider Usage
    (with and without count_exactly's drain first)."""
    assert native.usage is not None
    counts = native.usage.named_sse_counts(data)
    if counts is not None:
        assert pure_usage(data, split) == usage_records.usage_from_counts(counts), data


def test_anthropic_usage_events_are_read_in_c() -> None:
    """Not vacuous: the fixture's usage events, and events named only by their data's type."""
    assert native.usage is not None
    events = (FIXTURE_DIR / "anthropic_stream.sse").read_bytes().split(b"\n\n")
    snippet = b"".join(e + b"\n\n" for e in events if b'"usage"' in e)
    assert native.usage.named_sse_counts(snippet) == ("anthropic", 472, 2048, 0, 89)
    typed = b"".join(
        b"\n".join(line for line in e.split(b"\n") if not line.startswith(b"event:")) + b"\n\n"
        for e in events
        if b'"usage"' in e
    )
    assert native.usage.named_sse_counts(typed) == ("anthropic", 472, 2048, 0, 89)
    assert pure_usage(typed, False) == usage_records._anthropic_counts(472, 2048, 0, 89)
