"""Envoy's gRPC access log (`AccessLogService/StreamAccessLogs`), the default accounting path: random
HTTPAccessLogEntry messages with random `nexus.usage` metadata (what the Lua usage tap leaves: a record
`u` {k, b, x} or cut-off pieces p1..pn, here with wrong types, bad base64, NaN and infinite numbers, gaps
and junk) carrying mutated provider responses. Each batch is accounted without an exception or a caught
bug, every entry with a key id exactly once, and the usage derived for it is a defined, non-negative one.
"""

from __future__ import annotations

import asyncio
import base64
import math

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from hypothesis import event, given
from hypothesis import strategies as st

from nexus_authz.adapters.envoy_als import METADATA_NAMESPACE, AccessLogService, snippet_of, usage_of
from nexus_authz.engine import Engine
from tests.fuzz import _strategies as S
from tests.fuzz._support import fuzz_settings, no_bugs_logged

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

numbers = (
    st.sampled_from([0.0, -1.0, 1e300, -1e300, math.nan, math.inf, -math.inf, 2.0**63, 0.5]) | st.floats()
)
values = st.none() | st.booleans() | numbers | st.text(max_size=20) | st.lists(st.integers(), max_size=3)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@st.composite
def usage_metadata(draw: st.DrawFn, body: bytes) -> dict[str, object] | None:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return None
    if kind <= 2:  # a finished response's record
        record: dict[str, object] = {}
        if draw(st.integers(0, 5)):
            kinds = st.sampled_from(["sse", "body", "tail", "over", "", "SSE"])
            record["k"] = draw(kinds if draw(st.integers(0, 5)) else values)
        if draw(st.integers(0, 5)):
            data = st.sampled_from([_b64(body)] * 4 + [_b64(body)[:-3], "!!not base64!!", ""])
            record["b"] = draw(data if draw(st.integers(0, 5)) else values)
        if draw(st.booleans()):
            record["x"] = draw(numbers | values)
        meta: dict[str, object] = {"u": record if draw(st.integers(0, 9)) else draw(values)}
    else:  # a cut-off stream's pieces, in order or not, with junk names
        pieces = S.split_at(body, draw(st.lists(st.integers(0, 10**6), max_size=6)))
        meta = {f"p{i + 1}": _b64(p) for i, p in enumerate(pieces)}
        for _ in range(draw(st.integers(0, 3))):
            meta[draw(st.sampled_from(["p0", "p-1", "pX", "p", "p99999999999999999999", "q1"]))] = draw(
                values
            )
        if draw(st.booleans()):
            meta.pop(draw(st.sampled_from(sorted(meta))), None)
        if draw(st.booleans()):
            meta["x"] = draw(numbers | values)
    return meta


@st.composite
def entries(draw: st.DrawFn) -> accesslog_pb2.HTTPAccessLogEntry:
    body, ctype, encoding = draw(S.response_bodies())
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.request.request_id = draw(st.sampled_from(["req-als", "", "x" * 2000]) | st.text(max_size=10))
    if draw(st.integers(0, 4)):
        entry.request.request_headers["x-nexus-key-id"] = draw(
            st.sampled_from(["open", "scoped", "ghost", "\x7f"])
        )
    if draw(st.booleans()):
        entry.request.request_headers["x-nexus-tenant"] = draw(st.sampled_from(["acme", ""]))
    if ctype is not None:
        entry.response.response_headers["content-type"] = ctype
    if encoding is not None:
        entry.response.response_headers["content-encoding"] = encoding
    entry.response.response_code.value = draw(st.sampled_from([200, 429, 500, 0]))
    meta = draw(usage_metadata(body))
    if meta is not None:
        entry.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].update(meta)
    return entry


class FakeContext:
    """grpc.aio's servicer context as stream_access_logs uses it: read() until EOF."""

    def __init__(self, messages: list[bytes]) -> None:
        self._messages = list(messages)

    async def read(self) -> object:
        await asyncio.sleep(0)
        return self._messages.pop(0) if self._messages else grpc.aio.EOF


@fuzz_settings(300, deadline=None)
@given(batch=st.lists(entries(), min_size=1, max_size=8))
def test_any_access_log_batch_is_accounted(
    engine: Engine, batch: list[accesslog_pb2.HTTPAccessLogEntry]
) -> None:
    service = AccessLogService(engine)
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.extend(batch)
    for entry in batch:  # what each entry is accounted as: defined, non-negative
        snippet = snippet_of(entry)
        headers = entry.response.response_headers
        usage, model, keep = usage_of(
            snippet,
            content_type=headers.get("content-type"),
            content_encoding=headers.get("content-encoding"),
        )
        assert usage.source in ("provider", "estimated", "none")
        assert min(usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens) >= 0
        assert snippet.skipped >= 0 and isinstance(keep, bool)
        event(f"{snippet.kind} {usage.source}")
    with no_bugs_logged():
        # serialized, as the gRPC handler receives it (the compiled scan reads it)
        raw = message.SerializeToString()
        asyncio.run(asyncio.wait_for(service.stream_access_logs(None, FakeContext([raw])), 30))  # type: ignore[arg-type]
    admitted = sum(1 for e in batch if e.request.request_headers.get("x-nexus-key-id"))
    assert service.entries == admitted and service.ignored == len(batch) - admitted
