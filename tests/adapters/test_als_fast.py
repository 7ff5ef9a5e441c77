"""The access-log entry's compiled scans (adapters/als_fast.py, nexus_authz/native/_usage.pyx) against the
pure path they accelerate: for every input where they answer, the same snippet as envoy_als.snippet_of
and the same (usage, model) as the core parser StreamUsage fed the whole body; and they do answer for the
common case (a provider's JSON document with its usage record, a canonical Lua record), so that these
tests cannot pass with scans that never answer."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
from typing import Any

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import struct_pb2
from hypothesis import event, given
from hypothesis import strategies as st

from nexus_authz import native
from nexus_authz.adapters import als_fast
from nexus_authz.adapters.envoy_als import METADATA_NAMESPACE, snippet_of
from nexus_authz.core.usage import StreamUsage
from tests.fuzz._strategies import USAGE_FIXTURES
from tests.fuzz._support import fuzz_settings
from tests.helpers import protobuf_len_field as _field
from tests.helpers import protobuf_varint as _varint


@pytest.fixture(autouse=True)
def _compiled() -> None:
    if native.usage is None:
        if os.environ.get(native.PURE_ENV, "") not in ("", "0"):
            pytest.skip("NEXUS_AUTHZ_PURE is set: the compiled scans are not loaded")
        pytest.fail(f"the compiled scans did not build or load ({native.WHY_PURE_USAGE}): pip install -e .")


def pure(body: bytes, content_type: str | None, encoding: str | None) -> tuple[Any, str | None]:
    parser = StreamUsage(content_type=content_type, content_encoding=encoding, prompt_tokens_hint=7)
    parser.feed(body)
    return parser.finish(), parser.model


# -- generated documents ------------------------------------------------------------------------------------

counts = (
    st.integers(0, 5000)
    | st.sampled_from([-1, 2**40, 2**40 + 1, 2**70, 0.0, 3.0, 2.5, -0.0, 1e300, True, None, "12", [], {}])
    | st.floats(allow_nan=False)
)
DETAILS = ["cached_tokens", "cache_write_tokens", "reasoning_tokens", "audio_tokens"]
details = st.dictionaries(st.sampled_from(DETAILS), counts, max_size=3) | counts


@st.composite
def usage_records(draw: st.DrawFn) -> dict[str, object] | object:
    shape = draw(st.integers(0, 4))
    if shape == 0:  # chat / completions / embeddings
        names = ["prompt_tokens", "completion_tokens", "total_tokens"]
        subs = ["prompt_tokens_details", "completion_tokens_details"]
    elif shape == 1:  # Responses
        names = ["input_tokens", "output_tokens", "total_tokens"]
        subs = ["input_tokens_details", "output_tokens_details"]
    elif shape == 2:  # Anthropic
        names = ["input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"]
        subs = ["server_tool_use"]
    elif shape == 3:  # something else
        names, subs = ["tokens", "requests"], ["details"]
    else:
        return draw(st.none() | st.integers() | st.text(max_size=5) | st.lists(st.integers(), max_size=2))
    record: dict[str, object] = {}
    for name in draw(st.lists(st.sampled_from(names), max_size=4)):
        record[name] = draw(counts)
    for name in draw(st.lists(st.sampled_from(subs), max_size=2)):
        record[name] = draw(details)
    return record


texts = st.text(st.characters(blacklist_categories=["Cs"]), max_size=12) | st.sampled_from(
    ['a"b', "a\\b", "é", "\u2028", "\U0001f600", "\x00", "\x7f", "\ud800"]
)
plain_values = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts
)
values = st.recursive(
    plain_values,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
KEYS = ["id", "object", "model", "choices", "content", "usage", "error", "type", "response", "status", "x"]


def dumps(value: object, draw: st.DrawFn) -> bytes:
    text = json.dumps(
        value, ensure_ascii=draw(st.booleans()), separators=draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    )
    return text.encode("utf-8", "surrogatepass")


@st.composite
def members(draw: st.DrawFn) -> bytes:
    key = draw(st.sampled_from(KEYS) | texts)
    if key == "usage":
        value: object = draw(usage_records())
    elif key == "error":
        value = draw(st.sampled_from([{"message": "x"}, None, "x", {}]) | values)
    elif key == "type":
        value = draw(st.sampled_from(["error", "message", "response.completed", "chat.completion"]) | values)
    elif key == "model":
        value = draw(st.sampled_from(["gpt-4o-mini", "claude-3-5", 'a"b', "x" * 300]) | values)
    elif key == "response":
        value = {"usage": draw(usage_records()), "model": "gpt-4o"}
    else:
        value = draw(values)
    raw_key = dumps(key, draw)
    if draw(st.integers(0, 30)) == 0:  # a key spelled with escapes
        raw_key = raw_key.replace(b"u", b"\\u0075")
    colon = draw(st.sampled_from([b":", b" : ", b":\n"]))
    raw = dumps(value, draw)
    if draw(st.integers(0, 40)) == 0:  # number tokens json.loads reads differently, or not at all
        raw = draw(
            st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"-0", b"1e5", b"1.5E-3", b"01", b"1.", b"-"])
        )
    return raw_key + colon + raw


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    parts = draw(st.lists(members(), max_size=6))
    if draw(st.integers(0, 3)):  # usually a record somewhere, sometimes twice
        parts.insert(draw(st.integers(0, len(parts))), b'"usage":' + dumps(draw(usage_records()), draw))
    sep = draw(st.sampled_from([b",", b", ", b",\n  "]))
    body = b"{" + sep.join(parts) + b"}"
    mutation = draw(st.integers(0, 20))
    if mutation == 0:
        body = body[: draw(st.integers(0, len(body)))]
    elif mutation == 1 and body:
        i = draw(st.integers(0, len(body) - 1))
        body = body[:i] + draw(st.binary(min_size=1, max_size=2)) + body[i + 1 :]
    elif mutation == 2:
        body = draw(st.sampled_from([b" ", b"\r\n", b"\xef\xbb\xbf", b"\t\n", b"x", b"[", b"\x00"])) + body
    elif mutation == 3:
        body = body + draw(st.sampled_from([b" ", b"\n", b"}", b"{}", b"x", b"\n\n", b"\x00"]))
    elif mutation == 4:
        body = b'{"wrap":' + body + b"}"
    elif mutation == 5:
        body = b"[" + body + b"]"
    elif mutation == 6:  # deep nesting inside a member
        depth = draw(st.integers(150, 1200))
        body = b'{"deep":' + b"[" * depth + b"]" * depth + b"," + body[1:]
    return body


@st.composite
def provider_documents(draw: st.DrawFn) -> bytes:
    """Documents as providers send them (chat, Responses, Anthropic), with random counts and text."""
    text = draw(texts)
    shape = draw(st.integers(0, 2))
    doc: dict[str, object]
    if shape == 0:
        doc = {"id": "chatcmpl-1", "object": "chat.completion", "model": draw(texts | st.just("gpt-4o-mini"))}
        doc["choices"] = [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ]
    elif shape == 1:
        doc = {"id": "resp_1", "object": "response", "status": "completed", "model": "gpt-4.1"}
        doc["output"] = [{"type": "message", "content": [{"type": "output_text", "text": text}]}]
    else:
        doc = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4"}
        doc["content"] = [{"type": "text", "text": text}]
    doc["usage"] = draw(usage_records())
    errors = draw(st.integers(0, 9))
    if errors == 0:  # an error document that also carries usage: no record (the pure path says so)
        doc["type"] = draw(st.sampled_from(["error", "errors"]))
    elif errors == 1:
        doc["error"] = draw(st.sampled_from([{"message": "overloaded"}, {}, None, "x", []]))
    body = dumps(doc, draw)
    if draw(st.integers(0, 5)) == 0:
        body = body[:-1] + b',"usage":' + dumps(draw(usage_records()), draw) + b"}"
    if draw(st.integers(0, 5)) == 0:
        body = json.dumps(doc, indent=draw(st.sampled_from([1, "\t"]))).encode()
    if draw(st.integers(0, 5)) == 0:
        body = body.replace(b'"error"', b'"\\u0065rror"')  # the same document, an escape in "error"
    return body


content_types = st.sampled_from(
    [
        None,
        "application/json",
        "application/json; charset=utf-8",
        "text/event-stream",
        "TEXT/EVENT-STREAM",
        "text/plain",
        "",
    ]
)
encodings = st.sampled_from([None, None, "", "identity", " Identity ", "gzip", "br", "deflate"])


@fuzz_settings(1000, deadline=None)
@given(body=documents() | provider_documents(), content_type=content_types, encoding=encodings)
def test_a_json_body_gives_the_core_parsers_usage_and_model(
    body: bytes, content_type: str | None, encoding: str | None
) -> None:
    fast = als_fast.body_usage(body, content_type, encoding)
    event("fast" if fast is not None else "pure")
    if fast is not None:
        assert fast == pure(body, content_type, encoding)


@pytest.mark.parametrize("name", sorted(USAGE_FIXTURES))
@pytest.mark.parametrize("content_type", ["application/json", None])
def test_provider_documents_take_the_fast_path(name: str, content_type: str | None) -> None:
    body = USAGE_FIXTURES[name]
    fast = als_fast.body_usage(body, content_type, None)
    reference = pure(body, content_type, None)
    if name.endswith(".json") and "error" not in name:  # a document with its usage record
        assert fast == reference and reference[0].source == "provider"
    else:  # an error document, or an event stream: the pure path reads it
        assert fast is None
    pretty = (
        json.dumps(json.loads(body), indent=2, ensure_ascii=False).encode() if name.endswith(".json") else b""
    )
    if pretty and "error" not in name:
        assert als_fast.body_usage(pretty, content_type, None) == pure(pretty, content_type, None)


RECORD_KEYS = [
    "prompt_tokens",
    "completion_tokens",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
    "input_tokens_details",
    "output_tokens_details",
    "server_tool_use",
    "x",
]
count_texts = st.sampled_from(
    [b"0", b"7", b"15", b"999999999999", b"1000000000000", b"1099511627776", b"1099511627777"]
    + [b"-1", b"-0", b"3.0", b"2.5", b"1e3", b"null", b"true", b'"12"', b"[]", b"{}", b"1E400"]
) | st.integers(0, 10**14).map(lambda n: str(n).encode())


@st.composite
def record_texts(draw: st.DrawFn) -> bytes:
    """A usage object's JSON text as a provider (or a hostile upstream) may write it: repeated members
    (the last wins), keys spelled with escapes, details objects or other values, any spacing."""
    sep = draw(st.sampled_from([b",", b", ", b",\n  "]))
    colon = draw(st.sampled_from([b":", b": ", b" : "]))

    def key(name: str) -> bytes:
        raw = json.dumps(name).encode()
        return raw.replace(b"t", b"\\u0074", 1) if draw(st.integers(0, 15)) == 0 else raw

    def member(names: list[str], value: st.SearchStrategy[bytes]) -> bytes:
        return key(draw(st.sampled_from(names))) + colon + draw(value)

    detail = st.lists(
        st.builds(
            lambda k, v: k + v,
            st.sampled_from(DETAILS + ["x"]).map(lambda n: json.dumps(n).encode() + b":"),
            count_texts,
        ),
        max_size=4,
    ).map(lambda parts: b"{" + b",".join(parts) + b"}")
    parts = []
    for _ in range(draw(st.integers(0, 7))):
        name = draw(st.sampled_from(RECORD_KEYS))
        value = detail | count_texts if name.endswith(("_details", "_use")) else count_texts | detail
        parts.append(member([name], value))
    return b"{" + sep.join(parts) + b"}"


@fuzz_settings(1500, deadline=None)
@given(text=record_texts())
def test_the_compiled_counts_read_a_record_as_record_usage_does(text: bytes) -> None:
    """usage_counts (C) against the core's reader of the decoded object, over records with repeated
    members, escaped keys and counts of every JSON type: the same Usage whenever it answers."""
    from nexus_authz.core.usage_records import record_usage, usage_from_counts

    record = json.loads(text)
    assert native.usage is not None
    counts = native.usage.usage_counts(text, 0, len(text))
    event("fast" if counts is not None else "pure")
    if counts is not None:
        assert usage_from_counts(counts) == record_usage(record)


@pytest.mark.parametrize(
    "record",
    [
        {"prompt_tokens": 10, "completion_tokens": 15, "total_tokens": 25},
        {
            "prompt_tokens": 1000,
            "completion_tokens": 300,
            "prompt_tokens_details": {"cached_tokens": 400, "cache_write_tokens": 700, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 200},
        },
        {
            "input_tokens": 12,
            "output_tokens": 30,
            "total_tokens": 42,
            "input_tokens_details": {"cached_tokens": 5},
            "output_tokens_details": {"reasoning_tokens": 9},
        },
        {
            "input_tokens": 3,
            "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 20,
            "output_tokens": 8,
        },
        {"prompt_tokens": 4, "prompt_tokens_details": None, "completion_tokens_details": "x"},
    ],
)
def test_common_records_are_read_in_c(record: dict[str, object]) -> None:
    from nexus_authz.core.usage_records import record_usage, usage_from_counts

    text = json.dumps(record).encode()
    assert native.usage is not None
    counts = native.usage.usage_counts(text, 0, len(text))
    assert counts is not None and usage_from_counts(counts) == record_usage(record)


SSE_USAGE_CHUNK = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
    b'"choices":[],"usage":{"prompt_tokens":24,"completion_tokens":17,"total_tokens":41}}'
)


@st.composite
def sse_snippets(draw: st.DrawFn) -> bytes:
    """What the Lua tap keeps of a stream ("sse"): its usage events, sometimes with content chunks, named
    events, comments, [DONE], CRLF line ends, multi-line data, several records, broken JSON around them."""
    plain = st.builds(
        lambda p, c, d: b'{"prompt_tokens":%d,"completion_tokens":%d%s}' % (p, c, d),
        st.integers(0, 10**6),
        st.integers(0, 10**6),
        st.sampled_from([b"", b',"total_tokens":3', b',"prompt_tokens_details":{"cached_tokens":9}']),
    )
    clean = draw(st.booleans())  # half: the usage event among events without a record, unmutated
    record = draw(record_texts()) if draw(st.integers(0, 2)) == 0 else draw(plain)
    sep = draw(st.sampled_from([b":", b": ", b" : "]))
    usage = b'data: {"id":"c","model":' + draw(st.sampled_from([b'"gpt-4o-mini"', b'"a\\"b"', b"1"]))
    usage += b',"choices":[],"usage"' + sep + record
    closers = [b"}", b' ,"x":[1,{"y":null}]}', b"} ", b"}}", b"", b',"z":NaN}', b"} x", b',"a" "b"}']
    usage += draw(st.sampled_from(closers[:3] if clean else closers))
    others = [
        b'data: {"id":"c","choices":[{"delta":{"content":"hi"}}],"usage":null}',
        b"data: [DONE]",
        b": keep-alive",
        b'data: {"type":"response.in_progress"}',  # a type or a name near the record: the pure path
        b"event: ping\ndata: {}",
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":5}}',
        b'data: {"type":"response.completed","response":{"usage":{"input_tokens":1}}}',
        b'data: {"error":{"message":"x"}}',
        b'data: {"usage":\n{"prompt_tokens":1}}',
        b'data: {"usage":{"prompt_tokens":3}}\ndata: {"x":1}',
        usage,
    ]
    events = draw(st.lists(st.sampled_from(others[:3] if clean else others), max_size=3))
    events.insert(draw(st.integers(0, len(events))), usage)
    body = draw(st.sampled_from([b"\n\n", b"\n\n\n", b"\n\n"])).join(events) + draw(
        st.sampled_from([b"\n\n", b"", b"\n"])
    )
    mutation = draw(st.integers(0, 12)) if not clean else -1
    if mutation == 0:
        body = body.replace(b"\n", b"\r\n")
    elif mutation == 1:
        body = b"x" * draw(st.integers(400, 600)) + b"\n\n" + body
    elif mutation == 2 and body:
        i = draw(st.integers(0, len(body) - 1))
        body = body[:i] + draw(st.binary(min_size=1, max_size=2)) + body[i + 1 :]
    elif mutation == 3:
        body = body[: draw(st.integers(0, len(body)))]
    return body


def pure_sse(data: bytes) -> tuple[Any, str | None]:
    from nexus_authz.adapters.envoy_als import Snippet, usage_of

    usage, model, keep = usage_of(Snippet("sse", data), content_type=None, content_encoding=None)
    assert not keep or usage.source != "provider"
    return usage, model


@fuzz_settings(1500, deadline=None)
@given(data=sse_snippets())
def test_a_stream_snippet_gives_the_core_parsers_usage_and_model(data: bytes) -> None:
    fast = als_fast.sse_usage(data)
    event("fast" if fast is not None else "pure")
    if fast is not None:
        assert fast == pure_sse(data)


@pytest.mark.parametrize(
    "data",
    [
        SSE_USAGE_CHUNK + b"\n\n",
        SSE_USAGE_CHUNK + b"\n\ndata: [DONE]\n\n",
        b'data: {"id":"c","choices":[{"delta":{"content":"hi"}}]}\n\n' + SSE_USAGE_CHUNK,
        USAGE_FIXTURES["openai_chat_stream_usage.sse"],
    ],
)
def test_openai_usage_chunks_take_the_fast_path(data: bytes) -> None:
    fast = als_fast.sse_usage(data)
    assert fast is not None and fast == pure_sse(data) and fast[0].source == "provider"


# -- the Lua tap's record -----------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


base64_texts = st.builds(lambda b: _b64(b), st.binary(max_size=64)) | st.sampled_from(
    [
        "",
        "=",
        "==",
        "A",
        "AA",
        "AA=",
        "AA==",
        "AAA=",
        "AAAA",
        "A===",
        "AB=C",
        "AA==AA==",
        " QUFB",
        "QU FB",
        "QUFB\n",
        "QUFB-_",
        "QUF",
        "QUFBé",
        "Zm9v!",
        "Zm9vYg",
        "Zm9vYh==",
        "Zm9vYmF=",
        "////",
        "++++",
    ]
)
numbers = (
    st.sampled_from([0.0, -1.0, 1.5, 2.0**53, 2.0**53 - 1, 1e300, float("nan"), float("inf"), 7.0])
    | st.floats()
)
values_any = (
    st.none() | st.booleans() | numbers | st.text(max_size=6) | st.lists(st.integers(0, 3), max_size=2)
)


@st.composite
def metadata(draw: st.DrawFn) -> dict[str, object] | None:
    shape = draw(st.integers(0, 9))
    if shape == 0:
        return None
    if shape == 1:  # a cut-off stream's pieces
        return {f"p{i}": draw(base64_texts) for i in range(1, draw(st.integers(1, 3)) + 1)}
    record: dict[str, object] = {}
    if draw(st.integers(0, 6)):
        record["k"] = draw(st.sampled_from(["body", "sse", "tail", "over", "", "Body", "bodyx"]) | values_any)
    if draw(st.integers(0, 6)):
        record["b"] = draw(base64_texts | values_any) if draw(st.integers(0, 4)) else draw(base64_texts)
    if draw(st.booleans()):
        record["x"] = draw(numbers | values_any)
    for junk in draw(st.lists(st.sampled_from(["q", "kk", "b2", ""]), max_size=2)):
        record[junk] = draw(values_any)
    meta: dict[str, object] = {"u": record if draw(st.integers(0, 9)) else draw(values_any)}
    if draw(st.integers(0, 4)) == 0:
        meta["p1"] = draw(base64_texts | values_any)
    if draw(st.integers(0, 4)) == 0:
        meta["x"] = draw(numbers)
    return meta


def entry_with(meta: dict[str, object] | None, other: bool) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.request.request_id = "r"
    if other:  # another filter's metadata beside the tap's
        entry.common_properties.metadata.filter_metadata["envoy.lb"].update({"u": "x", "k": 1})
    if meta is not None:
        struct = struct_pb2.Struct()
        struct.update(meta)
        entry.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].CopyFrom(struct)
    return entry


@fuzz_settings(600, deadline=None)
@given(meta=metadata(), other=st.booleans())
def test_the_lua_record_reads_as_snippet_of_reads_it(meta: dict[str, object] | None, other: bool) -> None:
    entry = entry_with(meta, other)
    fields = als_fast.snippet_fields(entry)
    event("fast" if fields is not None else "pure")
    if fields is not None:
        reference = snippet_of(entry)
        assert fields == (reference.kind, reference.data, reference.skipped)


@pytest.mark.parametrize("kind", ["body", "sse", "tail", "over"])
@pytest.mark.parametrize("data", [b"", b"x", b"xy", b"xyz", bytes(range(256)) * 3])
@pytest.mark.parametrize("skipped", [None, 0.0, 12.0, 1e20])
def test_a_canonical_record_takes_the_fast_path(kind: str, data: bytes, skipped: float | None) -> None:
    record: dict[str, object] = {"k": kind, "b": _b64(data)}
    if skipped is not None:
        record["x"] = skipped
    entry = entry_with({"u": record, "p1": None}, other=True)
    reference = snippet_of(entry)
    assert als_fast.snippet_fields(entry) == (reference.kind, reference.data, reference.skipped)
    assert reference.data == (data if kind != "over" or data else b"") and reference.kind == kind
    assert als_fast.snippet_fields(entry_with(None, other=True)) == ("none", b"", 0)


def test_the_pure_switch_turns_the_scans_off(monkeypatch: pytest.MonkeyPatch) -> None:
    body = USAGE_FIXTURES["openai_chat.json"]
    assert als_fast.body_usage(body, "application/json", None) is not None
    monkeypatch.setattr(als_fast, "SCAN", None)
    assert als_fast.body_usage(body, "application/json", None) is None
    assert als_fast.snippet_fields(entry_with({"u": {"k": "body", "b": _b64(body)}}, other=False)) is None


# -- a whole serialized message ------------------------------------------------------------------------------


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """Serialized StreamAccessLogsMessages of generated entries, sometimes damaged: bytes changed, cut short,
    an entry's fields repeated (protobuf merges them), an identifier, TCP entries."""
    from envoy.service.accesslog.v3 import als_pb2

    message = als_pb2.StreamAccessLogsMessage()
    if draw(st.booleans()):
        message.identifier.log_name = "nexus_usage"
    for _ in range(draw(st.integers(0, 4))):
        entry = entry_with(draw(metadata()), draw(st.booleans()))
        entry.request.request_id = draw(st.sampled_from(["r", "", "é-1", "a" * 40]))
        if draw(st.integers(0, 4)):
            entry.request.request_headers["x-nexus-key-id"] = draw(st.sampled_from(["k", "", "é"]))
        for name in draw(st.lists(st.sampled_from(["content-type", "content-encoding", "x"]), max_size=3)):
            entry.response.response_headers[name] = draw(st.sampled_from(["application/json", "", "gzip"]))
        message.http_logs.log_entry.append(entry)
    if draw(st.integers(0, 15)) == 0:
        message.tcp_logs.log_entry.add()
    raw = message.SerializeToString()
    mutation = draw(st.integers(0, 8))
    if mutation == 0 and raw:
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1 :]
    elif mutation == 1:
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif mutation == 2 and message.http_logs.log_entry:  # a repeated field inside the first entry
        entry = message.http_logs.log_entry[0]
        extra = accesslog_pb2.HTTPAccessLogEntry()
        extra.request.request_headers["x-nexus-key-id"] = "k2"
        extra.request.request_id = "r2"
        doubled = entry.SerializeToString() + extra.SerializeToString()
        message.http_logs.log_entry[0].ParseFromString(doubled)  # what protobuf makes of it
        raw = b"\x12" + _varint(len(_field(1, doubled))) + _field(1, doubled)
    return raw


def _assert_later(scanned: Any, later: Any, raw: bytes) -> int:
    """log_entries(raw, later=True) is log_entries(raw) but for the data of a record of a known kind with
    base64: where that base64 is in its entry (one int), whose decoding is that data, or whose base64 is not
    canonical when log_entries(raw) made it an unusual entry (protobuf's). The number of those records."""
    assert (later is None) == (scanned is None)
    records = 0
    for item, lazy in zip(scanned or [], later or [], strict=True):
        if lazy is None or type(lazy[4]) is not int:
            assert lazy == item
            continue
        records += 1
        at = lazy[6] + (lazy[4] >> 16)  # its start in the entry, its size (native/_usage.pyx _later)
        text = raw[at : at + (lazy[4] & 0xFFFF)]
        assert lazy[3] in ("body", "sse", "tail", "over") and text
        if item[3] is None:
            assert item == (None, None, None, None, b"", 0, lazy[6], lazy[7])
            with contextlib.suppress(binascii.Error):  # not canonical base64
                assert base64.b64encode(base64.b64decode(text, validate=True)) != text
        else:
            assert item == (*lazy[:4], base64.b64decode(text, validate=True), *lazy[5:])
    return records


def test_the_compiled_loop_s_scan_leaves_each_record_s_base64_to_decode_later() -> None:
    """log_entries(raw, later=True), the compiled loop's scan: a known kind's base64 stays in the message
    (decoded by the loop into one reused buffer, not a bytes object per entry), every other entry is as
    log_entries(raw) reads it."""
    from envoy.service.accesslog.v3 import als_pb2

    if native.usage is None:
        pytest.skip("the compiled scans are not loaded (NEXUS_AUTHZ_PURE, or not built)")
    records: list[dict[str, object]] = [
        {"u": {"k": kind, "b": _b64(data), "x": 3.0}}
        for kind in ("body", "sse", "tail", "over", "strange")
        for data in (b"", b"x", b"xy", b"xyz", bytes(range(256)) * 3)
    ]
    records += [{"u": {"k": "body", "b": "eyJ1c2FnZSI6e319\n"}}, {"u": {"k": "strange", "b": "e==="}}]
    message = als_pb2.StreamAccessLogsMessage()
    for record in [*records, {"p1": _b64(b"xy")}]:
        entry = entry_with(record, other=True)
        entry.request.request_headers["x-nexus-key-id"] = "k"
        message.http_logs.log_entry.append(entry)
    raw = message.SerializeToString()
    scanned, later = native.usage.log_entries(raw), native.usage.log_entries(raw, True)
    _assert_later(scanned, later, raw)
    assert [type(item[4]) is int for item in later] == [
        kind != "strange" and data != b""
        for kind in ("body", "sse", "tail", "over", "strange")
        for data in (b"", b"x", b"xy", b"xyz", bytes(range(256)) * 3)
    ] + [True, False, False]
    assert scanned[-3][3] is None and scanned[-2][3] is None and scanned[-1][3] is None  # protobuf's
    # base64 of 64 KiB or more: decoded by the scan
    message = als_pb2.StreamAccessLogsMessage()
    for size in (49_149, 49_150):  # 65,532 and 65,536 bytes of base64
        entry = entry_with({"u": {"k": "body", "b": _b64(b"x" * size)}}, other=False)
        entry.request.request_headers["x-nexus-key-id"] = "k"
        message.http_logs.log_entry.append(entry)
    raw = message.SerializeToString()
    later = native.usage.log_entries(raw, True)
    assert type(later[0][4]) is int and later[1][4] == b"x" * 49_150
    _assert_later(native.usage.log_entries(raw), later, raw)


@fuzz_settings(800, deadline=None)
@given(raw=messages())
def test_the_message_scan_reads_entries_as_protobuf_does(raw: bytes) -> None:
    """Whenever the compiled scan answers for a message protobuf reads, it reads every entry as the
    per-entry path does: not admitted, or protobuf's request id, content type and encoding and
    snippet_of's record, or an unusual entry whose bytes protobuf reads as the same entry."""
    from envoy.service.accesslog.v3 import als_pb2
    from google.protobuf.message import DecodeError

    assert native.usage is not None
    scanned = native.usage.log_entries(raw)  # never raises, whatever the bytes
    # as the compiled loop takes them: each record's data where its base64 is in raw (decoded then)
    if _assert_later(scanned, native.usage.log_entries(raw, True), raw):
        event("a record decoded later")
    try:
        parsed = als_pb2.StreamAccessLogsMessage.FromString(raw)
    except DecodeError:
        event("protobuf refuses")
        return  # the stream fails on it (protobuf raises) whether or not the scan answered
    event("scan" if scanned is not None else "protobuf")
    if scanned is None:
        return
    entries = parsed.http_logs.log_entry
    assert len(scanned) == len(entries) and parsed.WhichOneof("log_entries") in (None, "http_logs")
    for item, entry in zip(scanned, entries, strict=True):
        if item is None:
            assert not entry.request.request_headers.get("x-nexus-key-id")
            continue
        request_id, content_type, content_encoding, kind, data, skipped, start, end = item
        assert accesslog_pb2.HTTPAccessLogEntry.FromString(raw[start:end]) == entry
        if kind is None:
            continue
        headers = entry.response.response_headers
        assert entry.request.request_headers.get("x-nexus-key-id")
        assert request_id == entry.request.request_id
        assert (content_type, content_encoding) == (
            headers.get("content-type"),
            headers.get("content-encoding"),
        )
        snippet = snippet_of(entry)
        assert (kind, data, skipped) == (snippet.kind, snippet.data, snippet.skipped)
