"""Envoy ext_proc (`ExternalProcessor/Process`): random message streams through the accounting adapter.

A stream is what Envoy could send for one request (headers, body chunks, trailers, in any order, with
end_of_stream anywhere, observability mode or not) carrying mutated provider responses: garbage events,
unterminated and enormous lines, other line endings, corrupt compression. Each stream must end within its
bound without an exception, answer every message that waits for an answer with the matching kind (a
request-body rewrite must be valid JSON asking for the usage chunk, with its content-length), account the
response exactly once when its headers were seen, and log no caught bug.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from hypothesis import event, given
from hypothesis import strategies as st

from nexus_authz.adapters.envoy_extproc import ExternalProcessorService
from nexus_authz.core.model import Request
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from tests.fuzz import _strategies as S
from tests.fuzz._support import SECRETS, fuzz_settings, no_bugs_logged, write_fuzz_config

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

KINDS = (
    "request_headers",
    "request_body",
    "request_trailers",
    "response_headers",
    "response_body",
    "response_trailers",
)


@pytest.fixture(scope="module")
def injecting(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """An engine whose ext_proc rewrites streaming requests to ask for the usage chunk."""
    config = write_fuzz_config(
        tmp_path_factory.mktemp("inject"), "accounting: {inject_include_usage: true}\n"
    )
    return Engine.from_settings(load_settings(str(config)))


def _headers(pairs: list[tuple[str, str | bytes]], end: bool) -> ep.HttpHeaders:
    h = ep.HttpHeaders(end_of_stream=end)
    for k, v in pairs:
        if isinstance(v, bytes):
            h.headers.headers.add(key=k, raw_value=v)
        else:
            h.headers.headers.add(key=k, value=v)
    return h


@st.composite
def streams(draw: st.DrawFn) -> list[ep.ProcessingRequest]:
    request_id = draw(st.sampled_from(["req-fuzz", "", "r" * 3000, "\x00"]) | st.text(max_size=12))
    observe = draw(st.sampled_from(["all", "none", "mixed"]))
    body, ctype, encoding = draw(S.response_bodies())
    request_body = (
        draw(S.json_bodies()) if draw(st.booleans()) else b'{"model":"gpt-4o","stream":true,"messages":[]}'
    )
    messages: list[tuple[str, object]] = []
    req_headers: list[tuple[str, str | bytes]] = [("x-request-id", request_id)]
    if draw(st.booleans()):
        req_headers += [
            ("x-nexus-key-id", draw(st.sampled_from(["open", "scoped", "", "ghost"]))),
            ("X-Nexus-Tenant", draw(st.sampled_from(["acme", "", "\xff"]))),
        ]
    resp_headers: list[tuple[str, str | bytes]] = [
        (":status", draw(st.sampled_from(["200", "429", "abc", "", "9" * 40, "-1"])))
    ]
    if ctype is not None:
        resp_headers.append(("content-type", ctype))
    if encoding is not None:
        resp_headers.append(("content-encoding", encoding.encode() if draw(st.booleans()) else encoding))
    messages.append(("request_headers", _headers(req_headers, draw(st.integers(0, 5)) == 0)))
    for chunk in S.split_at(request_body, draw(st.lists(st.integers(0, 10**6), max_size=3))):
        messages.append(("request_body", ep.HttpBody(body=chunk, end_of_stream=False)))
    if draw(st.integers(0, 5)) == 0:
        messages.append(("request_trailers", ep.HttpTrailers()))
    messages.append(("response_headers", _headers(resp_headers, draw(st.integers(0, 9)) == 0)))
    chunks = S.split_at(body, draw(st.lists(st.integers(0, 10**7), max_size=12)))
    for i, chunk in enumerate(chunks):
        end = i == len(chunks) - 1 and draw(st.integers(0, 5)) > 0
        messages.append(
            ("response_body", ep.HttpBody(body=chunk, end_of_stream=end or draw(st.integers(0, 30)) == 0))
        )
    if draw(st.integers(0, 5)) == 0:
        messages.append(("response_trailers", ep.HttpTrailers()))
    # disorder: drop, duplicate or move messages, and empty ones (no oneof set)
    for _ in range(draw(st.integers(0, 3))):
        op, i = draw(st.integers(0, 3)), draw(st.integers(0, len(messages) - 1))
        if op == 0:
            messages.pop(i)
        elif op == 1:
            messages.insert(i, messages[i])
        elif op == 2:
            messages.insert(draw(st.integers(0, len(messages))), messages.pop(i))
        else:
            messages.insert(i, ("", None))
        if not messages:
            break
    out = []
    for kind, payload in messages:
        request = ep.ProcessingRequest(
            observability_mode=observe == "all" or (observe == "mixed" and draw(st.booleans()))
        )
        if kind:
            getattr(request, kind).CopyFrom(payload)
        out.append(request)
    return out


async def _drive(
    service: ExternalProcessorService, messages: list[ep.ProcessingRequest]
) -> list[ep.ProcessingResponse]:
    async def requests() -> AsyncIterator[ep.ProcessingRequest]:
        for m in messages:
            yield m
            await asyncio.sleep(0)

    return [r async for r in service.process(requests(), None)]


def _expected_replies(messages: list[ep.ProcessingRequest]) -> tuple[list[str], bool]:
    """The reply kinds the adapter owes (one per waiting message, until the response ended), and whether
    the response is accounted (its headers arrived before the end, or the stream ended early with a
    request id: a response cut off before it started keeps its reservation)."""
    kinds: list[str] = []
    parser = done = False
    request_id = ""
    for m in messages:
        kind = m.WhichOneof("request")
        if kind == "request_headers":
            request_id = next(
                (
                    h.raw_value.decode("latin-1") if h.raw_value else h.value
                    for h in m.request_headers.headers.headers
                    if h.key.lower() == "x-request-id"
                ),
                "",
            )
        elif kind == "response_headers":
            parser = parser or not done
            done = done or m.response_headers.end_of_stream
        elif kind == "response_body" and parser and m.response_body.end_of_stream:
            done = True
        if not m.observability_mode and kind is not None:
            kinds.append(kind)
        if done and parser:
            break
    return kinds, parser or (not done and request_id != "")


def _responses(engine: Engine) -> int:
    """Responses accounted so far (by source, or dropped as not admitted; "unmatched" counts some of them
    again)."""
    return sum(n for source, n in engine.accounted.items() if source != "unmatched")


@fuzz_settings(400, deadline=None)
@given(messages=streams(), inject=st.booleans(), reserve=st.booleans())
def test_any_message_stream_is_processed(
    engine: Engine, injecting: Engine, messages: list[ep.ProcessingRequest], inject: bool, reserve: bool
) -> None:
    target = injecting if inject else engine
    service = ExternalProcessorService(target)
    if reserve:  # the request was admitted by a Check: its reservation waits for this response
        target.check(
            Request(
                method="POST",
                path="/v1/chat/completions",
                headers={"authorization": f"Bearer {SECRETS[1]}", "x-request-id": "req-fuzz"},
                body=b'{"model":"gpt-4o","max_tokens":10}',
                request_id="req-fuzz",
            )
        )
    before = _responses(target)
    with no_bugs_logged():
        replies = asyncio.run(asyncio.wait_for(_drive(service, messages), 30))
    expected, accounted = _expected_replies(messages)
    assert [r.WhichOneof("response") for r in replies] == expected
    assert _responses(target) - before == (1 if accounted else 0)
    for reply in replies:
        if reply.WhichOneof("response") == "request_body" and reply.request_body.HasField("response"):
            mutation = reply.request_body.response
            body = mutation.body_mutation.body
            assert json.loads(body)["stream_options"]["include_usage"] is True
            (header,) = mutation.header_mutation.set_headers
            assert (
                header.header.key == "content-length" and header.header.raw_value == str(len(body)).encode()
            )
            event("rewritten")
    event("accounted" if accounted else "not accounted")
