"""Hypothesis strategies for hostile requests: key headers, bodies, paths, as bytes (HTTP) or text (gRPC).

Large inputs (multi-MB bodies, huge headers) are built by repetition from a small drawn unit, so Hypothesis
draws a few bytes and a count instead of megabytes of choices.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

from hypothesis import strategies as st

from tests.fuzz._support import SECRETS

MODELS = ("gpt-4o", "gpt-4o-mini", "o1", "whisper-1", "claude-3-5-sonnet", "", "gpt-4o\x00", "GPT-4O")


def repeated(unit: st.SearchStrategy[bytes], max_count: int) -> st.SearchStrategy[bytes]:
    return st.builds(lambda u, n: u * n, unit, st.integers(1, max_count))


junk_bytes = st.binary(max_size=64)
non_utf8 = st.sampled_from(
    [b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x80" * 7, b"caf\xe9", b"\x00\x01\x02"]
)
secrets = st.sampled_from(SECRETS)


@st.composite
def key_values(draw: st.DrawFn) -> bytes:
    """A value for authorization / x-api-key / api-key: valid, near miss, junk, huge or not UTF-8."""
    secret = draw(secrets).encode()
    kind = draw(st.integers(0, 15))
    if kind == 0:
        return secret[:-1] + draw(st.sampled_from([b"X", b"\xff", b" ", b"\x00"]))
    if kind == 1:
        return draw(junk_bytes)
    if kind == 2:
        return draw(repeated(st.sampled_from([b"a", b"nx-", b"\xff", b"Bearer "]), 70_000))
    if kind == 3:
        return secret + draw(non_utf8)
    if kind == 4:
        return b"Bearer " + secret + b", Bearer " + secret
    return secret


@st.composite
def key_headers(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """Zero or more key headers (duplicates and mixed case included)."""
    out = []
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 1, 2, 3]))):
        name = draw(
            st.sampled_from([b"authorization", b"x-api-key", b"api-key", b"Authorization", b"X-API-KEY"])
        )
        value = draw(key_values())
        if name.lower() == b"authorization":
            value = (
                draw(st.sampled_from([b"Bearer "] * 6 + [b"bearer ", b"Basic ", b"Bearer  ", b""])) + value
            )
        out.append((name, value))
    return out


def _chat(model: object, **extra: object) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}).encode()


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    """LLM request bodies, well-formed and not: truncated, nested, duplicated keys, escaped keys."""
    model = draw(st.sampled_from(MODELS) | st.text(max_size=20))
    extra = draw(
        st.dictionaries(
            st.sampled_from(
                ["max_tokens", "max_completion_tokens", "n", "stream", "stream_options", "tools"]
            ),
            st.none()
            | st.booleans()
            | st.integers(-(2**70), 2**70)
            | st.floats(allow_nan=False)
            | st.text(max_size=8)
            | st.just({"include_usage": True}),
            max_size=4,
        )
    )
    body = _chat(model, **extra)
    kind = draw(st.integers(0, 9))
    if kind == 0:  # truncated anywhere
        return body[: draw(st.integers(0, len(body)))]
    if kind == 1:  # a decoy model nested, the real one missing or duplicated
        return (
            b'{"x":{"model":"gpt-4o"},' + body[1:] if draw(st.booleans()) else body[:-1] + b',"model":"o1"}'
        )
    if kind == 2:  # the key spelled with escapes
        return body.replace(b'"model"', b'"\\u006dodel"')
    if kind == 3:  # padded past the parse-below size so the scanner runs
        return body[:-1] + b',"pad":"' + b"x" * draw(st.integers(16_000, 40_000)) + b'"}'
    return body


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 12))
    if kind == 0:
        return b""
    if kind == 1:
        return draw(st.binary(max_size=256))
    if kind == 2:  # deep nesting, closed or not
        depth = draw(st.integers(1, 200_000))
        opener = draw(st.sampled_from([b"[", b'{"a":', b'{"model":']))
        return opener * depth + (b"1" + b"]" * depth if opener == b"[" and draw(st.booleans()) else b"")
    if kind == 3:  # non-UTF-8 inside an otherwise fine document
        return b'{"model":"gpt-4o","messages":[{"role":"user","content":"' + draw(non_utf8) + b'"}]}'
    if kind == 4:  # multipart (audio endpoints): the model in a form field, or many false starts
        field = b'Content-Disposition: form-data; name="model"\r\n'
        if draw(st.booleans()):
            return b"--b\r\n" + field + b"\r\n" + draw(st.sampled_from(MODELS)).encode() + b"\r\n--b--\r\n"
        return draw(repeated(st.sampled_from([b'name="model"\r\n', b'name="model"\r\nx\r\n']), 20_000))
    if kind == 5:  # escapes and quotes that could make a scanner backtrack
        unit = draw(
            st.sampled_from([b'\\"', b"\\\\", b'"model":', b'"', b"\\", b'{"model":"\\', b'"usage":{'])
        )
        return b'{"model":"' + unit * draw(st.integers(1, 100_000))
    if kind == 6:  # large, near Envoy's 256 KiB buffer
        return _chat("gpt-4o", pad="x" * draw(st.integers(100_000, 300_000)))
    return draw(json_bodies())


content_types = st.sampled_from(
    [
        b"application/json",
        b"application/json; charset=utf-8",
        b"multipart/form-data; boundary=b",
        b"text/plain",
        b"",
        b"\xff",
    ]
)

paths = st.sampled_from(
    [
        b"/v1/chat/completions",
        b"/v1/models",
        b"/v1/audio/transcriptions",
        b"/admin",
        b"/v1/../admin",
        b"/v1/chat/completions?x=1",
        b"/",
        b"",
        b"/v1/%2e%2e/x",
    ]
) | st.binary(min_size=1, max_size=40).map(lambda b: b"/" + b.replace(b" ", b"%20"))

addresses = st.sampled_from(
    [b"", b"10.0.0.1", b"10.0.0.1, 10.0.0.2", b"::1", b"x" * 300, b"\xff"]
) | st.binary(max_size=20)


# -- response bodies (the accounting side) ----------------------------------------------------------------

USAGE_FIXTURES = {
    p.name: p.read_bytes()
    for p in sorted((Path(__file__).resolve().parents[1] / "fixtures" / "usage").iterdir())
}

garbage_events = (
    st.sampled_from(
        [
            b"data: {",
            b'data: {"usage":',
            b'data: {"usage":{"prompt_tokens":1e999,"completion_tokens":-5}}',
            b'data: {"usage":{"prompt_tokens":"7"}}',
            b'data: {"choices":[{"delta":{"content":"\\ud800\\',
            b"event: error\ndata: {}",
            b'data: {"type":"message_delta","usage":{"output_tokens":' + b"9" * 400 + b"}}",
            b"data: [DONE]",
            b":",
            b"retry: x",
            b"\xff\xfe\x00",
            b'data: {"model":"' + b"m" * 300,
            b"data: " + b"[" * 5000,
        ]
    )
    | st.binary(max_size=80)
    | st.builds(
        lambda u, n: b"data: " + u * n,
        st.sampled_from([b"x", b'"usage":{', b"\\", b'{"a":']),
        st.integers(1, 40_000),
    )
)


@st.composite
def response_bodies(draw: st.DrawFn) -> tuple[bytes, str | None, str | None]:
    """(body, content-type, content-encoding): provider responses mutated, or junk, possibly compressed."""
    name = draw(st.sampled_from(sorted(USAGE_FIXTURES)))
    body = USAGE_FIXTURES[name]
    ctype: str | None = "text/event-stream" if name.endswith(".sse") else "application/json"
    kind = draw(st.integers(0, 9))
    if kind <= 3:  # events dropped, repeated, reordered, garbage in between
        events = body.split(b"\n\n")
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.integers(0, 3))
            i = draw(st.integers(0, len(events)))
            if op == 0:
                events.insert(i, draw(garbage_events))
            elif op == 1 and events:
                events.pop(min(i, len(events) - 1))
            elif op == 2 and events:
                events.insert(i, events[min(i, len(events) - 1)])
            else:
                events.insert(i, draw(garbage_events) + b"\n" + draw(garbage_events))
        body = b"\n\n".join(events)
    elif kind == 4:  # cut anywhere
        body = body[: draw(st.integers(0, len(body)))]
    elif kind == 5:  # an enormous line, terminated or not
        body = body + b"data: " + b"y" * draw(st.integers(1, 3 << 20)) + draw(st.sampled_from([b"", b"\n\n"]))
    elif kind == 6:
        body = draw(st.binary(max_size=2000))
    elif kind == 7:  # other line endings
        body = body.replace(b"\n", draw(st.sampled_from([b"\r\n", b"\r"])))
    if draw(st.integers(0, 4)) == 0:
        ctype = draw(
            st.sampled_from([None, "", "text/html", "application/json", "text/event-stream", "\xff"])
        )
    encoding = None
    if draw(st.integers(0, 5)) == 0:
        encoding = draw(st.sampled_from(["gzip", "deflate", "br", "x-gzip", "identity", "gzip, gzip"]))
        if encoding in ("gzip", "x-gzip"):
            body = gzip.compress(body)
        elif encoding == "deflate":
            body = zlib.compress(body) if draw(st.booleans()) else zlib.compress(body)[2:-4]
        if draw(st.integers(0, 3)) == 0:  # corrupted or cut
            body = body[: draw(st.integers(0, len(body)))] + draw(st.binary(max_size=8))
    return body, ctype, encoding


def split_at(data: bytes, points: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (taken modulo its length, in order)."""
    if not data:
        return [data]
    cuts = sorted({p % len(data) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
