"""Envoy -> nexus-authz -> mock upstream, with the real Envoy binary, for both Envoy configs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.stack import Stack
from tests.helpers import KeySpec

ALICE = KeySpec("alice", extra={"tenant": "acme", "models": ["gpt-4o*"]})
ANTHROPIC_STYLE = KeySpec("carol", extra={"tenant": "acme"})
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture(params=["http", "grpc", "grpc-port"], scope="module")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="nx-e2e-"))
    s = Stack(workdir=workdir, mode=request.param, keys=(ALICE, ANTHROPIC_STYLE))
    try:
        s.start()
        yield s
    finally:
        s.stop()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


def test_valid_key_reaches_upstream_with_swapped_credential(stack: Stack) -> None:
    assert stack.mock is not None
    stack.mock.clear()
    resp = stack.post("/v1/chat/completions", CHAT, key=ALICE.secret, x_api_key=ALICE.secret)
    assert resp.status == 200, resp.body
    assert resp.json()["usage"]["total_tokens"] > 0
    (seen,) = stack.mock.requests()
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["authorization"] == "Bearer sk-upstream-test-credential"
    assert headers["x-nexus-key-id"] == "alice" and headers["x-nexus-tenant"] == "acme"
    assert "x-api-key" not in headers and "api-key" not in headers
    assert ALICE.secret not in repr(seen)


def test_streaming_passes_through(stack: Stack) -> None:
    resp = stack.post("/v1/chat/completions", {**CHAT, "stream": True}, key=ALICE.secret)
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.body.rstrip().endswith(b"data: [DONE]")


def test_bad_key_gets_401_from_nexus(stack: Stack) -> None:
    resp = stack.post("/v1/chat/completions", CHAT, key="nx-not-a-real-key-000000")
    assert resp.status == 401
    assert resp.headers["content-type"] == "application/json"
    assert resp.json()["error"]["code"] == "invalid_api_key"
    missing = stack.post("/v1/chat/completions", CHAT)
    assert missing.status == 401 and missing.json()["error"]["code"] == "missing_api_key"


def test_disallowed_model_gets_403(stack: Stack) -> None:
    resp = stack.post("/v1/chat/completions", {**CHAT, "model": "o1-preview"}, key=ALICE.secret)
    assert resp.status == 403
    assert resp.json()["error"]["code"] == "model_not_allowed"


def test_x_api_key_client_and_get_without_body(stack: Stack) -> None:
    resp = stack.get("/v1/models", x_api_key=ANTHROPIC_STYLE.secret)
    assert resp.status == 200 and resp.json()["data"]
    assert stack.mock is not None
    seen = stack.mock.requests()[-1]
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert "x-api-key" not in headers and headers["x-nexus-key-id"] == "carol"


def test_non_json_body_with_restricted_key(stack: Stack) -> None:
    resp = stack.post("/v1/chat/completions", b"\x00\x01 definitely not json", key=ALICE.secret)
    assert resp.status == 400 and resp.json()["error"]["code"] == "invalid_request_body"


def test_restricted_key_json_body_without_model_gets_403(stack: Stack) -> None:
    """Issue 18 item 9: a restricted key whose JSON body names no model is a permission question (403
    model_not_allowed), not a malformed request; README's decision table says the same."""
    resp = stack.post("/v1/chat/completions", {"messages": CHAT["messages"]}, key=ALICE.secret)
    assert resp.status == 403, resp.body
    assert resp.json()["error"]["code"] == "model_not_allowed"


@pytest.mark.parametrize(
    ("key", "body", "status", "etype"),
    [
        (None, CHAT, 401, "authentication_error"),
        ("nx-not-a-real-key-000000", CHAT, 401, "authentication_error"),
        ("alice", {**CHAT, "model": "o1-preview"}, 403, "permission_error"),
        ("alice", b"not json at all", 400, "invalid_request_error"),
    ],
)
def test_anthropic_paths_get_anthropic_error_bodies(
    stack: Stack, key: str | None, body: object, status: int, etype: str
) -> None:
    """Issue 18 item 14: a denial on /v1/messages has Anthropic's shape
    ({"type": "error", "error": {"type", "message"}}); OpenAI paths keep OpenAI's."""
    secret = ALICE.secret if key == "alice" else key
    resp = stack.post("/v1/messages", body, key=secret)
    assert resp.status == status, resp.body
    assert resp.headers["content-type"] == "application/json"
    doc = resp.json()
    assert doc["type"] == "error" and doc["error"]["type"] == etype and doc["error"]["message"]
    openai_shape = stack.post("/v1/chat/completions", body, key=secret).json()
    assert "type" not in openai_shape and openai_shape["error"]["code"]


def test_nexus_down_means_503_from_envoy(stack: Stack) -> None:
    # Last test of the module: stops nexus-authz. The shipped configs fail closed with 503.
    assert stack.stop_nexus() == 0
    resp = stack.post("/v1/chat/completions", CHAT, key=ALICE.secret)
    assert resp.status == 503
    assert stack.mock is not None
    assert all(ALICE.secret not in repr(r) for r in stack.mock.requests())
