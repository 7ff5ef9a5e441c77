"""The token-accounting conformance suite through the real Envoy, on the default path (Lua usage tap +
gRPC access log) and on the ext_proc variant: every usage fixture, replayed by the mock upstream in
small HTTP chunks (plain, gzip- and deflate-encoded, cut off mid-stream, as an error status), lands in
the ledger exactly as the core parser reads the same bytes in one piece (`usage_from_body`), which the
unit conformance suite (tests/unit/test_usage.py) pins to each fixture's expected usage."""

from __future__ import annotations

import gzip
import itertools
import json
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from nexus_authz.core.body import request_facts
from nexus_authz.core.tokens import count_tokens
from nexus_authz.core.usage import Usage, usage_from_body
from nexus_authz.stores.ledger import UsageRow, query_db
from tests.e2e.stack import Stack
from tests.helpers import KeySpec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "usage"
NAMES = sorted(p.name for p in FIXTURES.iterdir())
SSE = [n for n in NAMES if n.endswith(".sse")]
ERRORS = {"openai_error.json": 400, "anthropic_error.json": 529}  # served with an error status
MODEL = "gpt-4o-mini"
REQUEST = {"model": MODEL, "messages": [{"role": "user", "content": "conformance"}]}
HINT = request_facts(json.dumps(REQUEST).encode(), precise=False).prompt_tokens  # the Check's estimate
# A token limit makes the Check estimate the prompt, which a response without usage is charged.
CONFIG = """
ledger:
  path: usage.sqlite3
  flush_interval: 50ms
plans:
  metered:
    limits:
      - {tokens: 100000000, per: day}
"""
_ids = itertools.count()
KEYS = tuple(
    KeySpec(f"k{i}", extra={"plan": "metered"}) for i in range(120)
)  # one key per case: its ledger rows are the case's


def expected(body: bytes, content_type: str) -> Usage:
    return usage_from_body(
        body,
        content_type=content_type,
        content_encoding=None,
        prompt_tokens_hint=HINT,
        count_tokens=count_tokens,
    )


def content_type(name: str) -> str:
    return "text/event-stream" if name.endswith(".sse") else "application/json"


# The default path (Lua + access log) runs every case; the ext_proc alternative a reference subset (one
# chunking, one encoding, one cut-off: Envoy holds an observability ext_proc stream open for
# deferred_close_timeout, 5 s, after a reset, so each cut-off case costs 5 s there).
def cases(full: list[object], reference: list[object]) -> list[object]:
    return [pytest.param("als", c, id=f"als-{c}") for c in full] + [
        pytest.param("extproc", c, id=f"extproc-{c}") for c in reference
    ]


def _stack(accounting: str) -> Iterator[Stack]:
    workdir = Path(tempfile.mkdtemp(prefix="nx-conf-"))
    s = Stack(
        workdir=workdir,
        accounting=accounting,
        keys=KEYS,
        extra_config=CONFIG,
        mock_options={"fixtures_dir": str(FIXTURES)},
    )
    try:
        s.start()
        yield s
    finally:
        s.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def als_stack() -> Iterator[Stack]:
    yield from _stack("als")


@pytest.fixture(scope="module")
def extproc_stack() -> Iterator[Stack]:
    yield from _stack("extproc")


@pytest.fixture
def stack(request: pytest.FixtureRequest) -> Stack:
    """The stack of the accounting path each test names (indirect parameter); one per module each."""
    return request.getfixturevalue(f"{request.param}_stack")  # type: ignore[no-any-return]


@pytest.fixture
def key(stack: Stack) -> KeySpec:
    return KEYS[next(_ids) % len(KEYS)]


def ledger_row(stack: Stack, key_id: str, timeout: float = 10.0) -> UsageRow:
    deadline = time.monotonic() + timeout
    rows: list[UsageRow] = []
    while time.monotonic() < deadline:
        try:
            rows = query_db(stack.workdir / "usage.sqlite3", key_id=key_id)
        except FileNotFoundError:
            rows = []
        if rows:
            assert len(rows) == 1 and rows[0].requests == 1, rows
            return rows[0]
        time.sleep(0.05)
    raise AssertionError(f"nothing accounted for {key_id}")


def assert_accounted(row: UsageRow, usage: Usage) -> None:
    if usage.source == "none":  # an error: charged accounting.error_charge_tokens (0)
        assert (row.prompt_tokens, row.completion_tokens) == (0, 0)
        return
    got = (row.prompt_tokens, row.cached_prompt_tokens, row.completion_tokens, row.reasoning_tokens)
    assert got == (
        usage.prompt_tokens,
        usage.cached_prompt_tokens,
        usage.completion_tokens,
        usage.reasoning_tokens,
    )


def replay(stack: Stack, key: KeySpec, name: str, **headers: str) -> int:
    import http.client

    try:
        resp = stack.post("/v1/chat/completions", REQUEST, key=key.secret, x_mock_fixture=name, **headers)
    except http.client.IncompleteRead:
        return -1  # cut off by the upstream, as asked
    return resp.status


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("stack", "chunk"), cases([13, 256], [13]), indirect=["stack"])
def test_fixture_in_chunks(stack: Stack, key: KeySpec, name: str, chunk: int) -> None:
    status = ERRORS.get(name, 200)
    got = replay(
        stack,
        key,
        name,
        x_mock_chunk_bytes=str(chunk),
        x_mock_chunk_delay_ms="1" if chunk > 100 else "0",
        **({"x_mock_status": str(status)} if status != 200 else {}),
    )
    assert got == status
    body = (FIXTURES / name).read_bytes()
    usage = expected(body, content_type(name))
    assert_accounted(ledger_row(stack, key.id), usage)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("stack", "encoding"), cases(["gzip", "deflate"], ["gzip"]), indirect=["stack"])
def test_fixture_compressed(stack: Stack, key: KeySpec, name: str, encoding: str) -> None:
    body = (FIXTURES / name).read_bytes()
    compressed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    chunk = max(1, len(compressed) // 5)
    assert replay(stack, key, name, x_mock_content_encoding=encoding, x_mock_chunk_bytes=str(chunk)) == 200
    # nexus-authz decodes gzip/deflate itself (the Lua filter passes compressed bodies through)
    assert_accounted(ledger_row(stack, key.id), expected(body, content_type(name)))


@pytest.mark.parametrize(("stack", "name"), cases(SSE, ["openai_chat_stream_usage.sse"]), indirect=["stack"])
def test_stream_cut_off(stack: Stack, key: KeySpec, name: str) -> None:
    body = (FIXTURES / name).read_bytes()
    chunk, chunks = max(16, len(body) // 10), 5  # cut after half the body: before any final record
    got = replay(
        stack,
        key,
        name,
        x_mock_chunk_bytes=str(chunk),
        x_mock_chunk_delay_ms="5",
        x_mock_cut_after=str(chunks),
    )
    assert got == -1
    seen = body[: chunk * chunks]
    usage = expected(seen, "text/event-stream")
    assert usage.source in ("estimated", "none")
    assert_accounted(ledger_row(stack, key.id), usage)


@pytest.mark.parametrize("stack", ["als", "extproc"], indirect=True)
def test_a_denied_request_is_not_accounted(stack: Stack, key: KeySpec) -> None:
    before = sum(r.requests for r in query_db(stack.workdir / "usage.sqlite3"))
    resp = stack.post("/v1/chat/completions", REQUEST, key="nx-not-a-key-0123456789")
    assert resp.status == 401
    assert replay(stack, key, "openai_chat.json") == 200  # accounted after the denial would have been
    body = (FIXTURES / "openai_chat.json").read_bytes()
    assert_accounted(ledger_row(stack, key.id), expected(body, "application/json"))
    assert sum(r.requests for r in query_db(stack.workdir / "usage.sqlite3")) == before + 1
