"""Time bounds on the parsers that read client and upstream bytes: request bodies (core/body.py) and
responses (core/usage.py), on the pathological inputs a backtracking regex or a rescanning loop turns
into a hang: long runs of one token repeated up to a few MB, alone and combined, whole and streamed.

tests/unit/test_usage.py and test_body.py already check that garbage never raises and the answers agree
with a full parse; this adds the one thing they leave out, how long an adversarial input may take. Each
input must be answered (a defined result) in well under a second per MB; the bound asserted is loose
(the CI machine is shared), a hang or a quadratic blow-up is far beyond it.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus_authz.core.body import inject_include_usage, multipart_model, request_facts
from nexus_authz.core.usage import StreamUsage, Usage, usage_from_body
from tests.fuzz._strategies import split_at
from tests.fuzz._support import fuzz_settings, time_bound

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

SIZE = 2 << 20  # each pathological input is about this long
BOUND = 5.0  # seconds allowed for one input of SIZE (measured: well under 0.1 s each)

REQUEST_UNITS = [
    b'"model":',
    b'"model":"',
    b'\\"',
    b"\\",
    b'"',
    b"[",
    b'{"a":',
    b"{",
    b'"data":"',
    b"A",
    b'{"role":"user","content":"x"},',
    b'name="model"\r\n',
    b'name="model"\r\nx\r\n',
    b'"\\u006d',
    b'"model"     ',
    b'"max_tokens":1e999,',
    b'"stream_options":{',
    b"data:image/png;base64,",
    b'"image_url":"data:;base64,',
    b" ",
]
RESPONSE_UNITS = [
    b'"usage":{',
    b'data: {"usage":{',
    b"\n",
    b"\r",
    b"\r\n",
    b"data: x\n\n",
    b"data: x\n",
    b'"content":"',
    b'data: {"choices":[{"delta":{"content":"\\"',
    b"\\",
    b'{"usage":',
    b"event: error\n",
    b'"model":"',
    b":\n\n",
    b'"message_start"',
    b'"text":"a","text":"',
    b"[",
]
PREFIXES = [b"", b"{", b'{"model":"gpt-4o",', b"data: ", b'{"messages":[', b"--b\r\n"]


def _request_parsers(body: bytes) -> None:
    for truncated in (False, True):
        facts = request_facts(body, truncated=truncated)
        assert facts.prompt_tokens >= 0 and 1 <= facts.n <= 128
        assert facts.problem is None or facts.model is None
        model, problem = multipart_model(body, "multipart/form-data; boundary=b", truncated=truncated)
        assert model is None or isinstance(model, str)
        assert problem is None or isinstance(problem, str)
    rewritten = inject_include_usage(body)
    assert rewritten is None or isinstance(rewritten, bytes)


def _response_parsers(body: bytes, chunks: list[bytes]) -> None:
    for ctype in ("text/event-stream", "application/json", None):
        whole = usage_from_body(body, content_type=ctype, content_encoding=None, prompt_tokens_hint=3)
        parser = StreamUsage(content_type=ctype, prompt_tokens_hint=3)
        for chunk in chunks:
            parser.feed(chunk)
        for usage in (whole, parser.finish()):
            assert isinstance(usage, Usage)
            assert min(usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens) >= 0


def _timed(fn: object, *args: object) -> float:
    started = time.perf_counter()
    with time_bound(60):
        fn(*args)  # type: ignore[operator]
    return time.perf_counter() - started


@pytest.mark.parametrize("unit", REQUEST_UNITS, ids=repr)
def test_request_body_pathologies_are_bounded(unit: bytes) -> None:
    body = b"{" + unit * (SIZE // len(unit))
    took = _timed(_request_parsers, body)
    assert took < BOUND, f"{took:.2f} s for {len(body)} bytes of {unit!r}"


@pytest.mark.parametrize("unit", RESPONSE_UNITS, ids=repr)
def test_response_pathologies_are_bounded(unit: bytes) -> None:
    body = unit * (SIZE // len(unit))
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    took = _timed(_response_parsers, body, chunks)
    assert took < BOUND, f"{took:.2f} s for {len(body)} bytes of {unit!r}"


@st.composite
def mixtures(draw: st.DrawFn, units: list[bytes]) -> bytes:
    """A prefix, then up to three units each repeated up to about a megabyte."""
    parts = [draw(st.sampled_from(PREFIXES))]
    for _ in range(draw(st.integers(1, 3))):
        unit = draw(st.sampled_from(units) | st.binary(min_size=1, max_size=6))
        parts.append(unit * max(1, ((1 << 20) // len(unit)) >> draw(st.integers(0, 12))))
    return b"".join(parts)


@fuzz_settings(40, deadline=None)
@given(body=mixtures(REQUEST_UNITS))
def test_mixed_request_pathologies_are_bounded(body: bytes) -> None:
    took = _timed(_request_parsers, body)
    assert took < BOUND, f"{took:.2f} s for {len(body)} bytes: {body[:80]!r}..."


@fuzz_settings(40, deadline=None)
@given(body=mixtures(RESPONSE_UNITS), cuts=st.lists(st.integers(0, 4 << 20), max_size=20))
def test_mixed_response_pathologies_are_bounded(body: bytes, cuts: list[int]) -> None:
    took = _timed(_response_parsers, body, split_at(body, cuts))
    assert took < BOUND, f"{took:.2f} s for {len(body)} bytes: {body[:80]!r}..."
