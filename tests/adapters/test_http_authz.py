"""The HTTP fast path over a real Unix socket, in-process: Envoy http_service and nginx auth_request."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import httptools
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus_authz.adapters import envoy_authz, http_authz
from nexus_authz.adapters.answers import header_block
from nexus_authz.core.model import new_allow
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from tests.adapters.conftest import ALICE, BOB
from tests.adapters.test_envoy_authz import check_request
from tests.helpers import KeySpec, write_config

pytestmark = pytest.mark.usefixtures("http_framing")  # both framings: httptools and the compiled one

CAROL = KeySpec("carol", extra={"paths": ["/v1/chat/*"]})


class Response:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


def parse_responses(data: bytes) -> list[Response]:
    """Split a byte stream into responses (keep-alive, several per connection)."""
    out: list[Response] = []
    while data:
        resp = Response()
        parser = httptools.HttpResponseParser(resp)
        # feed byte by byte up to the end of one message
        for i in range(len(data)):
            parser.feed_data(data[i : i + 1])
            if resp.done:
                resp.status = parser.get_status_code()
                out.append(resp)
                data = data[i + 1 :]
                break
        else:
            raise AssertionError(f"incomplete response: {data[:200]!r}")
    return out


def http_request(
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    method: str = "POST",
    close: bool = False,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: nexus"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body or method == "POST":
        lines.append(f"content-length: {len(body)}")
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _exchange(
    engine: Engine, sock: Path, payload: bytes, *, admin: bool = False, max_body: int = 1 << 20
) -> bytes:
    app = http_authz.HttpApp(
        engine,
        max_header_bytes=8 * 1024,
        max_body=max_body,
        admin=admin,
        readiness=lambda: (True, "ok"),
        metrics_text=lambda: b"nexus_authz_test 1\n",
    )
    server = await http_authz.serve_unix(app, str(sock), 0o600)
    try:
        reader, writer = await asyncio.open_unix_connection(str(sock))
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), timeout=5)
        writer.close()
        return data
    finally:
        server.close()
        await server.wait_closed()


def exchange(engine: Engine, tmp_path: Path, payload: bytes, **kw: object) -> list[Response]:
    return parse_responses(asyncio.run(_exchange(engine, tmp_path / "t.sock", payload, **kw)))  # type: ignore[arg-type]


def test_allow_over_ext_authz_prefix(engine: Engine, tmp_path: Path) -> None:
    (resp,) = exchange(
        engine,
        tmp_path,
        http_request(
            "/ext_authz/v1/chat/completions",
            {"authorization": f"Bearer {ALICE.secret}", "x-request-id": "r1"},
            b'{"model":"gpt-4o-mini"}',
        ),
    )
    assert resp.status == 200
    assert resp.headers["x-nexus-key-id"] == "alice" and resp.headers["x-nexus-tenant"] == "acme"
    assert resp.headers["authorization"] == "Bearer sk-upstream-test-credential"
    assert resp.headers["x-envoy-auth-headers-to-remove"] == "x-api-key, api-key"
    assert resp.body == b""


def test_keep_alive_pipelining_in_order(engine: Engine, tmp_path: Path) -> None:
    payload = b"".join(
        [
            http_request("/ext_authz/v1/models", {"x-api-key": ALICE.secret}, method="GET"),
            http_request("/ext_authz/v1/models", {"x-api-key": BOB.secret}, method="GET"),
            http_request("/ext_authz/v1/chat/completions", {"x-api-key": ALICE.secret}, b'{"model":"o1"}'),
            http_request("/ext_authz/v1/models", {}, method="GET", close=True),
        ]
    )
    responses = exchange(engine, tmp_path, payload)
    assert [r.status for r in responses] == [200, 401, 403, 401]
    assert json.loads(responses[1].body)["error"]["code"] == "revoked_api_key"
    assert json.loads(responses[2].body)["error"]["code"] == "model_not_allowed"
    assert responses[2].headers["content-type"] == "application/json"
    assert responses[3].headers.get("connection") == "close"


def test_partial_body_marker(engine: Engine, tmp_path: Path) -> None:
    body = b'{"messages":[{"content":"' + b"x" * 500
    (resp,) = exchange(
        engine,
        tmp_path,
        http_request(
            "/ext_authz/v1/chat/completions",
            {"x-api-key": ALICE.secret, "x-envoy-auth-partial-body": "true"},
            body,
        ),
    )
    # A cut body cannot prove its model (issue 13): 413 naming how much the check reads.
    assert resp.status == 413 and b"larger than the %d bytes" % len(body) in resp.body


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nbad header line\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\nhost: a\r\nx-big: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 414),
    ],
)
def test_malformed_http_is_answered_and_closed(
    engine: Engine, tmp_path: Path, payload: bytes, status: int
) -> None:
    (resp,) = exchange(engine, tmp_path, payload)
    assert resp.status == status and resp.headers.get("connection") == "close"


def test_upgrade_is_decided_then_closed(engine: Engine, tmp_path: Path) -> None:
    payload = b"GET /x HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nrandom bytes"
    (resp,) = exchange(engine, tmp_path, payload)  # exactly one answer, then EOF
    assert resp.status == 401


def test_body_limit(engine: Engine, tmp_path: Path) -> None:
    (resp,) = exchange(
        engine,
        tmp_path,
        http_request("/ext_authz/v1/chat/completions", {"x-api-key": ALICE.secret}, b"x" * 2000),
        max_body=1000,
    )
    assert resp.status == 413


def test_many_headers(engine: Engine, tmp_path: Path) -> None:
    headers = {f"x-h{i}": "v" for i in range(http_authz.MAX_HEADERS + 5)}
    (resp,) = exchange(engine, tmp_path, http_request("/ext_authz/", headers, method="GET"))
    assert resp.status == 431


def test_non_utf8_headers_are_a_decision(engine: Engine, tmp_path: Path) -> None:
    payload = b"GET /ext_authz/v1/models HTTP/1.1\r\nx-api-key: \xff\xfe\x80\r\nx-junk: \xc3\x28\r\n\r\n"
    (resp,) = exchange(engine, tmp_path, payload)
    assert resp.status == 401


def test_nginx_auth_request(engine: Engine, tmp_path: Path) -> None:
    ok, denied = exchange(
        engine,
        tmp_path,
        http_request(
            "/v1/nginx/auth",
            {"x-api-key": ALICE.secret, "x-original-uri": "/v1/models", "x-original-method": "GET"},
            method="GET",
        )
        + http_request("/v1/nginx/auth", {"x-api-key": "nx-unknown-key-0123456"}, method="GET"),
    )
    assert ok.status == 204 and ok.headers["x-nexus-key-id"] == "alice"
    assert ok.headers["authorization"] == "Bearer sk-upstream-test-credential"
    assert "x-envoy-auth-headers-to-remove" not in ok.headers and ok.body == b""
    # A denial's JSON travels in a header: nginx discards the subrequest's body.
    assert denied.status == 401 and denied.headers["x-nexus-status"] == "401" and denied.body == b""
    assert json.loads(denied.headers["x-nexus-error"])["error"]["code"] == "invalid_api_key"


def _nginx_check(key: str, uri: str = "/v1/chat/completions", close: bool = False) -> bytes:
    headers = {"x-api-key": key, "x-original-uri": uri, "x-original-method": "POST"}
    return http_request("/v1/nginx/auth", headers, method="GET", close=close)


def _engine(directory: Path, *keys: KeySpec) -> Engine:
    directory.mkdir()
    return Engine.from_settings(load_settings(str(write_config(directory, *keys))))


def test_nginx_maps_every_denial_to_401_or_403_with_the_real_status(tmp_path: Path) -> None:
    # auth_request turns any status but 2xx/401/403 into a 500, so 429/400/403 all arrive as 401 or 403.
    engine = _engine(tmp_path / "cfg", BOB, CAROL)
    revoked, bad_path, missing = exchange(
        engine,
        tmp_path,
        _nginx_check(BOB.secret)
        + _nginx_check(CAROL.secret, uri="/v1/embeddings")
        + http_request("/v1/nginx/auth", {"x-original-uri": "/v1/models"}, method="GET", close=True),
    )
    assert (revoked.status, revoked.headers["x-nexus-status"]) == (401, "401")
    assert json.loads(revoked.headers["x-nexus-error"])["error"]["code"] == "revoked_api_key"
    assert (bad_path.status, bad_path.headers["x-nexus-status"]) == (403, "403")
    assert bad_path.headers["x-nexus-reason"] == "path_not_allowed"
    assert missing.status == 401 and missing.headers["connection"] == "close"
    assert json.loads(missing.headers["x-nexus-error"])["error"]["code"] == "missing_api_key"


def test_nginx_rate_limited_is_403_carrying_429_and_retry_after(tmp_path: Path) -> None:
    limited = KeySpec("limited", extra={"limits": [{"requests": 2, "per": "minute"}]})
    engine = _engine(tmp_path / "cfg", limited)
    responses = exchange(engine, tmp_path, b"".join(_nginx_check(limited.secret) for _ in range(3)))
    assert [r.status for r in responses] == [204, 204, 403]
    assert responses[0].headers["x-ratelimit-remaining-requests"] == "1"
    denied = responses[2]
    assert denied.headers["x-nexus-status"] == "429" and denied.headers["x-nexus-reason"] == "rate_limited"
    assert 1 <= int(denied.headers["retry-after"]) <= 60
    assert denied.headers["x-ratelimit-remaining-requests"] == "0" and "ratelimit" in denied.headers
    error = json.loads(denied.headers["x-nexus-error"])["error"]
    assert error["type"] == "rate_limit_exceeded" and "limit 2" in error["message"]
    assert denied.body == b""


def test_nginx_denial_header_cannot_split() -> None:
    from nexus_authz.core.model import Decision, Reason
    from nexus_authz.core.policy import denial

    decision = Decision(
        allowed=False, status=429, reason=Reason.RATE_LIMITED, body=b'{"error":"a\r\nx-evil: 1"}'
    )
    raw = http_authz.nginx_denial(decision, close=False)
    (resp,) = parse_responses(raw)
    assert "x-evil" not in resp.headers and resp.headers["x-nexus-error"] == '{"error":"ax-evil: 1"}'
    # the policy's fixed denials are cached per reason, built once
    fixed = denial(Reason.UNKNOWN_KEY)
    assert http_authz.nginx_denial(fixed, close=False) is http_authz.nginx_denial(fixed, close=False)


def test_admin_routes_only_on_admin_listener(engine: Engine, tmp_path: Path) -> None:
    health, ready, metrics = exchange(
        engine,
        tmp_path,
        http_request("/healthz", method="GET")
        + http_request("/readyz", method="GET")
        + http_request("/metrics", method="GET"),
        admin=True,
    )
    assert health.status == 200 and ready.status == 200 and json.loads(ready.body)["ready"] is True
    assert metrics.body == b"nexus_authz_test 1\n"
    # On the fast-path listener the same path is just a request to decide on (no key -> 401).
    (resp,) = exchange(engine, tmp_path, http_request("/healthz", method="GET"))
    assert resp.status == 401


ADMIN_PROBES = [
    ("POST", "/ext_authz/v1/chat/completions", b'{"model":"gpt-4o"}'),
    ("GET", "/ext_authz/v1/models", b""),
    ("GET", "/v1/models", b""),
    ("GET", "/v1/nginx/auth", b""),
    ("GET", "/", b""),
    ("GET", "/healthz/../ext_authz/v1/models", b""),
    ("GET", "/metrics/x", b""),
    ("HEAD", "/ext_authz/v1/models", b""),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_PROBES)
@pytest.mark.parametrize("header", ["authorization", "x-api-key", "api-key"])
def test_admin_listener_answers_no_checks(
    engine: Engine, tmp_path: Path, method: str, path: str, body: bytes, header: str
) -> None:
    # Issue 13.1: the admin listener treated every other path as an ext_authz check and answered a valid
    # key with the provider credential. It serves /healthz, /readyz and /metrics only.
    value = f"Bearer {ALICE.secret}" if header == "authorization" else ALICE.secret
    headers = {header: value, "x-forwarded-for": "203.0.113.7", "x-original-uri": "/v1/models"}
    if body:
        headers["content-type"] = "application/json"
    raw = asyncio.run(
        _exchange(engine, tmp_path / "t.sock", http_request(path, headers, body, method=method), admin=True)
    )
    assert b"sk-upstream-test-credential" not in raw and b"x-nexus-key-id" not in raw
    assert raw.startswith(b"HTTP/1.1 404 ") or raw.startswith(b"HTTP/1.1 413 "), raw[:200]


def test_admin_listener_does_not_feed_the_auth_throttle(engine: Engine, tmp_path: Path) -> None:
    # Issue 13.1: bad keys sent to the admin port "from" an address (x-forwarded-for) locked that address
    # out of the real gateway.
    victim = {"x-forwarded-for": "198.51.100.4"}
    bad = b"".join(
        http_request("/ext_authz/v1/models", {"x-api-key": f"nx-wrong-{i:04d}", **victim}, method="GET")
        for i in range(40)
    )
    raw = asyncio.run(_exchange(engine, tmp_path / "t.sock", bad, admin=True))
    assert raw.count(b"HTTP/1.1 404 ") == 40
    (resp,) = exchange(
        engine,
        tmp_path,
        http_request("/ext_authz/v1/models", {"x-api-key": ALICE.secret, **victim}, method="GET"),
    )
    assert resp.status == 200


def _raw_heads(engine: Engine, tmp_path: Path, payload: bytes, **kw: object) -> list[bytes]:
    """Responses to HEAD requests, split by their header blocks: a HEAD answer has no body, so each
    answer must end at its blank line and the next one start right after it."""
    raw = asyncio.run(_exchange(engine, tmp_path / "t.sock", payload, **kw))  # type: ignore[arg-type]
    parts = raw.split(b"\r\n\r\n")
    assert parts[-1] == b"", f"bytes after the last header block: {parts[-1][:200]!r}"
    for part in parts[:-1]:
        assert part.startswith(b"HTTP/1.1 "), f"a body where an answer should start: {part[:200]!r}"
    return [p + b"\r\n\r\n" for p in parts[:-1]]


def test_head_denials_carry_no_body_on_a_keep_alive_connection(engine: Engine, tmp_path: Path) -> None:
    # Issue 13.9: a denial to a HEAD check carried its JSON body; Envoy took those bytes for the start of
    # the next answer on the connection (upstream_cx_protocol_error).
    payload = (
        http_request("/ext_authz/v1/models", {"x-api-key": "nx-wrong-key-000000"}, method="HEAD")
        + http_request("/ext_authz/v1/models", {}, method="HEAD")
        + http_request("/ext_authz/v1/models", {"x-api-key": BOB.secret}, method="HEAD")
        + http_request("/ext_authz/v1/models", {"x-api-key": ALICE.secret}, method="HEAD")
        + http_request("/ext_authz/v1/models", {"x-api-key": "nx-wrong-key-000000"}, method="GET")
    )
    raw = asyncio.run(_exchange(engine, tmp_path / "t.sock", payload))
    heads, _, last = raw.rpartition(b"HTTP/1.1 401 ")
    answers = _raw_heads(engine, tmp_path, payload[: payload.rindex(b"GET ")])
    assert [a[:12] for a in answers] == [b"HTTP/1.1 401", b"HTTP/1.1 401", b"HTTP/1.1 401", b"HTTP/1.1 200"]
    # the would-be body's length, no body bytes
    first = answers[0].decode()
    assert "x-nexus-reason: unknown_key" in first and "content-length: 0" not in first
    # the GET after them on the same connection still gets its body
    assert heads.count(b"HTTP/1.1 ") == 4 and b"invalid_api_key" in last


def test_head_on_admin_paths_carries_no_body(engine: Engine, tmp_path: Path) -> None:
    answers = _raw_heads(
        engine,
        tmp_path,
        http_request("/healthz", method="HEAD")
        + http_request("/metrics", method="HEAD")
        + http_request("/nope", method="HEAD"),
        admin=True,
    )
    assert [a[:12] for a in answers] == [b"HTTP/1.1 200", b"HTTP/1.1 200", b"HTTP/1.1 404"]


MATRIX = [
    ({"authorization": f"Bearer {ALICE.secret}"}, b'{"model":"gpt-4o"}'),
    ({"x-api-key": ALICE.secret}, b'{"model":"o1"}'),
    ({"x-api-key": ALICE.secret}, b"junk"),
    ({"api-key": BOB.secret}, b""),
    ({"authorization": "Basic abc"}, b""),
    ({}, b""),
]


@pytest.mark.parametrize(("headers", "body"), MATRIX)
def test_http_and_grpc_decide_the_same(
    engine: Engine, tmp_path: Path, headers: dict[str, str], body: bytes
) -> None:
    (http_resp,) = exchange(engine, tmp_path, http_request("/ext_authz/v1/chat/completions", headers, body))
    decision, _ = envoy_authz.AuthorizationService(engine).decide(check_request(headers, body))
    assert http_resp.status == decision.status
    if decision.allowed:
        assert http_resp.headers["x-nexus-key-id"] == decision.key.key_id  # type: ignore[union-attr]
    else:
        assert http_resp.body == decision.body


def test_readiness_reflects_a_broken_key_file(engine: Engine, tmp_path: Path) -> None:
    from nexus_authz.server import Server

    server = Server(replace(engine.settings), engine)
    assert server.readiness() == (True, "ok")
    (tmp_path / "keys.yaml").write_text("keys: [")
    assert not engine.reload_keys(force=True)
    ready, detail = server.readiness()
    assert not ready and "previous snapshot" in detail
    # the last good snapshot still answers
    assert engine.snapshot.lookup(ALICE.secret) is not None


@pytest.mark.parametrize(
    ("address", "private"),
    [
        ("unix:/run/nexus-authz/grpc.sock", True),
        ("127.0.0.1:9001", True),
        ("127.0.0.2:9001", True),
        ("[::1]:9001", True),
        ("localhost:9001", True),
        ("0.0.0.0:9001", False),
        ("[::]:9001", False),
        ("10.0.0.5:9191", False),
        ("nexus.internal:9191", False),
    ],
)
def test_check_listeners_off_loopback_are_flagged(address: str, private: bool) -> None:
    from nexus_authz.server import private_address

    assert private_address(address) is private


def _cached_blocks(app: http_authz.HttpApp) -> list[bytes]:
    """Every allow header block the app keeps (its bounded answer caches)."""
    blocks: list[bytes] = []
    for name in app.__slots__:
        if name.endswith("_cache") and name != "_deny_cache":
            for value in getattr(app, name)._entries.values():
                blocks.extend(value if isinstance(value, tuple) else (value,))
    return blocks


def test_the_nginx_allow_block_is_built_only_when_nginx_asks(engine: Engine) -> None:
    # performance issue 15: each active key kept nginx's 204 header block (~160 B) next to Envoy's 200
    # one, built eagerly, also where nginx never asks
    app = http_authz.HttpApp(engine, max_header_bytes=8192, max_body=0)
    alice = engine.snapshot.by_id["alice"]
    envoy = app.response(new_allow(alice, None, ()), nginx=False, close=False)
    assert envoy.startswith(b"HTTP/1.1 200 OK\r\n") and b"x-envoy-auth-headers-to-remove: " in envoy
    assert not any(b"204 No Content" in block for block in _cached_blocks(app))
    nginx = app.response(new_allow(alice, None, (("x-ratelimit-limit", "5"),)), nginx=True, close=True)
    upstream = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in alice.upstream_headers)
    assert nginx == (
        b"HTTP/1.1 204 No Content\r\n"
        + upstream
        + b"x-ratelimit-limit: 5\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    )
    assert sum(b"204 No Content" in block for block in _cached_blocks(app)) == 1  # kept once asked for
    # and the Envoy answer is unchanged by it
    assert app.response(new_allow(alice, None, ()), nginx=False, close=False) == envoy


_LATIN1 = st.text(st.characters(max_codepoint=255))


@given(st.lists(st.tuples(_LATIN1, _LATIN1)))
def test_header_blocks_are_each_headers_latin1_line(headers: list[tuple[str, str]]) -> None:
    # one encode of the whole block (adapters/answers.header_block): each header's line, as before
    want = b"".join(b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1")) for k, v in headers)
    assert header_block(headers) == want
