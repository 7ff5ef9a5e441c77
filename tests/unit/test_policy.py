"""The decision core: every outcome of `Policy.authorize`, with an injected clock."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_authz.core.body import multipart_model, request_facts
from nexus_authz.core.config import PolicySet, parse_key_file, parse_timestamp
from nexus_authz.core.denials import ERRORS, error_body
from nexus_authz.core.model import Credential, Reason, Request
from nexus_authz.core.policy import Policy
from tests.helpers import PEPPER, KeySpec, decide_local, key_file

pytestmark = pytest.mark.usefixtures("body_reading")  # both body readings: tests/native_params.py

CRED = {"openai": Credential(name="openai", header="authorization", value="Bearer sk-up")}
EXPIRY = "2030-01-01T00:00:00Z"
NOW = parse_timestamp("2029-06-01T00:00:00Z")
assert NOW is not None

ALICE = KeySpec(
    "alice", extra={"tenant": "acme", "models": ["gpt-4o*", "text-embedding-*"], "credential": "openai"}
)
OPEN = KeySpec("open", extra={"expires_at": EXPIRY})
GONE = KeySpec("gone", extra={"disabled": True})
PATHS = KeySpec("paths", extra={"paths": ["/v1/chat/*", "/v1/models"]})

SNAP = parse_key_file(
    key_file(ALICE, OPEN, GONE, PATHS),
    "keys.yaml",
    policy=PolicySet(),
    credentials=CRED,
    pepper=PEPPER.encode(),
    loaded_at=0.0,
)
POLICY = Policy()


def req(
    key: str | None = None, body: object = None, path: str = "/v1/chat/completions", **headers: str
) -> Request:
    h = {k.replace("_", "-"): v for k, v in headers.items()}
    if key is not None:
        h["authorization"] = f"Bearer {key}"
    raw = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
    return Request(method="POST", path=path, headers=h, body=raw)


def decide(r: Request, now: float = NOW):  # type: ignore[no-untyped-def]
    return decide_local(POLICY, SNAP, r, now)


def test_allowed_with_credential_swap() -> None:
    d = decide(req(ALICE.secret, {"model": "gpt-4o-mini", "messages": []}))
    assert d.allowed and d.status == 200 and d.reason is Reason.OK
    assert d.key is not None and d.key.key_id == "alice" and d.model == "gpt-4o-mini"
    assert dict(d.upstream_headers) == {
        "x-nexus-key-id": "alice",
        "x-nexus-tenant": "acme",
        "authorization": "Bearer sk-up",
    }
    assert set(d.remove_headers) == {"x-api-key", "api-key"}


@pytest.mark.parametrize(
    ("request_", "reason", "status"),
    [
        (req(None), Reason.MISSING_KEY, 401),
        (req("nx-unknown-0123456789"), Reason.UNKNOWN_KEY, 401),
        (req(GONE.secret), Reason.DISABLED_KEY, 401),
        (req(ALICE.secret, {"model": "gpt-3.5-turbo"}), Reason.MODEL_NOT_ALLOWED, 403),
        (req(ALICE.secret, b"this is not json"), Reason.BAD_REQUEST, 400),
        (req(ALICE.secret, {"messages": []}), Reason.MODEL_NOT_ALLOWED, 403),
        (req(ALICE.secret, {"model": 42}), Reason.MODEL_NOT_ALLOWED, 403),
        (req(PATHS.secret, path="/v1/embeddings"), Reason.PATH_NOT_ALLOWED, 403),
    ],
)
def test_denials(request_: Request, reason: Reason, status: int) -> None:
    d = decide(request_)
    assert not d.allowed and d.reason is reason and d.status == status
    error = json.loads(d.body)["error"]
    assert error["message"] and error["type"] and error["code"]
    assert d.upstream_headers == ()


def test_expiry_uses_the_injected_clock() -> None:
    expiry = parse_timestamp(EXPIRY)
    assert expiry is not None
    assert decide(req(OPEN.secret), now=expiry - 0.001).allowed
    d = decide(req(OPEN.secret), now=expiry)
    assert d.reason is Reason.EXPIRED_KEY and d.status == 401


def test_key_in_other_headers() -> None:
    r = Request(method="GET", path="/v1/models", headers={"x-api-key": OPEN.secret})
    assert decide(r).allowed
    r = Request(method="GET", path="/v1/models", headers={"api-key": OPEN.secret})
    assert decide(r).allowed


def test_unrestricted_key_ignores_the_body() -> None:
    assert decide(req(OPEN.secret, b"\xff\xfe binary junk")).allowed
    assert decide(req(OPEN.secret, {"model": "anything"})).model is None


def test_restricted_key_without_body_is_allowed() -> None:
    # GET /v1/models and the like carry no model: the model rule does not apply.
    assert decide(
        Request(method="GET", path="/v1/models", headers={"authorization": f"Bearer {ALICE.secret}"})
    ).allowed


def test_truncated_body_of_a_restricted_key_is_refused() -> None:
    # A cut body proves nothing about its top-level model: a duplicate "model" could follow the cut, so
    # even a model at the front is not enough (issue 13, item 2b/c).
    for body in (
        b'{"messages": [{"role": "user", "content": "' + b"x" * 1000,
        b'{"model": "gpt-4o", "messages": [{"content": "' + b"x" * 1000,
        b'{"metadata": {"model": "gpt-4o"}, "messages": [{"content": "' + b"x" * 1000,
    ):
        r = Request(
            method="POST",
            path="/v1/chat/completions",
            headers={"authorization": f"Bearer {ALICE.secret}"},
            body=body,
            body_truncated=True,
        )
        d = decide(r)
        assert d.status == 413 and d.reason is Reason.BODY_TOO_LARGE
        error = json.loads(d.body)["error"]
        assert error["code"] == "request_too_large" and f"{len(body)} bytes" in error["message"]


def test_paths_with_query_strings() -> None:
    assert decide(req(PATHS.secret, path="/v1/models?limit=5")).allowed
    assert decide(req(PATHS.secret, path="/v1/chat/completions")).allowed


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/..%2fmessages",  # issue 13.10: `*` spans `/`, the upstream decodes %2f
        "/v1/chat/..%2Fembeddings",
        "/v1/chat/%5c..%5cembeddings",
        "/v1/chat/%5C..%5Cembeddings",
        "/v1/chat/%2e%2e/embeddings",
        "/v1/chat/%2E%2E%2Fembeddings",
        "/v1/chat/%252fembeddings",  # decoded twice somewhere
        "/v1/chat/x%00",
        "/v1/chat/../embeddings",
        "/v1/chat/./../embeddings",
        "/v1/chat/completions/..",
        "/v1/chat/x\\..\\embeddings",
    ],
)
def test_path_scopes_refuse_encoded_separators_and_dot_segments(path: str) -> None:
    # nexus stays safe behind a proxy that forwards paths without decoding or normalising them.
    d = decide(req(PATHS.secret, path=path))
    assert not d.allowed and d.reason is Reason.PATH_NOT_ALLOWED and d.status == 403
    assert decide(req(OPEN.secret, path=path)).allowed  # keys without path scopes: the path is not ours


def test_path_scopes_still_allow_plain_paths() -> None:
    for path in ("/v1/chat/completions", "/v1/chat/completions?x=%2f..%5c", "/v1/chat/a.b", "/v1/chat/..x"):
        assert decide(req(PATHS.secret, path=path)).allowed, path


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (b'{"model":"gpt-4o","messages":[]}', "gpt-4o"),
        (b'{ "model" : "gpt-4o" }', "gpt-4o"),
        (b'{"messages":[{"content":"say \\"model\\": \\"x\\""}],"model":"gpt-4o"}', "gpt-4o"),
        (b'{"tools":[{"model":"evil"}],"model":"gpt-4o"}', "gpt-4o"),
        # Only the top level counts: a nested "model" alone is no model.
        (b'{"tools":[{"model":"evil"}]}', None),
        (b'{"mod\\u0065l":"o1","tools":[{"model":"gpt-4o"}]}', "o1"),
        (b'{"model":"gpt-\\u0034o"}', "gpt-4o"),
        (b"[1,2]", None),
        (b"", None),
    ],
)
def test_model_of_a_json_body(body: bytes, model: str | None) -> None:
    assert request_facts(body, estimate_prompt=False).model == model


def test_multipart_model() -> None:
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF....\r\n'
        b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--b--\r\n'
    )
    assert multipart_model(body, "multipart/form-data; boundary=b") == ("whisper-1", None)


def test_deeply_nested_body_is_a_decision() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    d = decide(req(ALICE.secret, body))
    assert d.reason is Reason.BAD_REQUEST


@settings(max_examples=300)
@given(
    headers=st.dictionaries(
        st.sampled_from(["authorization", "x-api-key", "api-key", "content-type", "x-junk"]),
        st.text(max_size=80) | st.sampled_from([f"Bearer {ALICE.secret}", ALICE.secret, "Bearer "]),
    ),
    body=st.binary(max_size=300) | st.sampled_from([b'{"model":"gpt-4o"}', b'{"model":', b"{" * 50]),
    path=st.text(max_size=40),
    truncated=st.booleans(),
)
def test_any_input_is_a_decision(headers: dict[str, str], body: bytes, path: str, truncated: bool) -> None:
    d = decide(Request(method="POST", path=path, headers=headers, body=body, body_truncated=truncated))
    assert d.status in (200, 400, 401, 403, 413)
    assert d.allowed == (d.status == 200)
    if not d.allowed:  # OpenAI's error shape (a code), or Anthropic's on its paths (denials.py: a type)
        error = json.loads(d.body)["error"]
        assert error["type"] if path.startswith("/v1/messages") or path == "/v1/complete" else error["code"]


def test_fast_constructors_build_the_same_objects() -> None:
    from nexus_authz.core.model import Decision, new_allow, new_request

    key = SNAP.by_id["alice"]
    assert new_request("GET", "/p", {"a": "b"}, b"x", True, "id", "1.2.3.4") == Request(
        "GET", "/p", {"a": "b"}, b"x", True, "id", "1.2.3.4"
    )
    fast = new_allow(key, "m", (("h", "v"),))
    slow = Decision(
        allowed=True,
        status=200,
        reason=Reason.OK,
        key=key,
        model="m",
        upstream_headers=key.upstream_headers,
        remove_headers=key.remove_headers,
        response_headers=(("h", "v"),),
    )
    fields = [f for f in Decision.__slots__ if not f.startswith("__")]
    assert [getattr(fast, f) for f in fields] == [getattr(slow, f) for f in fields]


@given(st.sampled_from(list(ERRORS)), st.none() | st.text())
def test_error_bodies_are_json_dumps_byte_for_byte(reason: Reason, message: str | None) -> None:
    # written with json's string encoder (core/denials.error_body): any message, quotes, controls, any
    # code point, gives the bytes json.dumps gives
    _, etype, code, default = ERRORS[reason]
    want = json.dumps(
        {"error": {"message": message or default, "type": etype, "param": None, "code": code}},
        separators=(",", ":"),
    ).encode()
    assert error_body(reason, message) == want
