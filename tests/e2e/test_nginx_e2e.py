"""nginx `auth_request` through the real nginx: deploy/nginx/nginx.conf, nexus-authz and the mock upstream.

nginx runs from a private prefix (its own pid file, temp directories and log) on a free port, with the
config rendered from deploy/nginx/ by `nexus_authz.render.nginx`; nexus-authz is a process (the Envoy
stack's `Stack.start_nexus`) that nginx reaches over its TCP fast path on the loopback, as the README's
recipe does (so it works as root too: no `user` directive), the mock upstream a thread.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from nexus_authz.demo import mock_upstream, procs
from nexus_authz.render import nginx as nginx_config
from tests.e2e.stack import REPO, HttpResult, Stack, http
from tests.helpers import KeySpec

NGINX_CONF = REPO / "deploy" / "nginx" / "nginx.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

LIMITS = """
plans:
  three:
    limits:
      - {requests: 3, per: minute}
      - {tokens: 100000, per: minute}
"""
ALICE = KeySpec("alice", extra={"tenant": "acme"})
THREE = KeySpec("three", extra={"tenant": "acme", "plan": "three"})
SDK = KeySpec("sdk", extra={"plan": "three"})
CHAT_ONLY = KeySpec("chat-only", extra={"paths": ["/v1/chat/*"]})
REVOKED = KeySpec("revoked", extra={"disabled": True})
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20}

pytestmark = pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx is not installed (bash .ci/setup)")


@dataclass
class Nginx:
    workdir: Path
    process: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        procs.stop_process(self.process, timeout=10)


def start_nginx(workdir: Path, *, authz: str, upstream: str) -> Nginx:
    """nginx on a free port with deploy/nginx/nginx.conf rendered for these addresses, in its own prefix."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = procs.free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(
        nginx_config.render(
            NGINX_CONF,
            listen=port,
            authz=authz,
            upstream=upstream,
            runtime_dir=workdir,
            worker_processes=1,
        )
    )
    with open(workdir / "nginx.log", "ab") as log:
        process = subprocess.Popen(
            [NGINX, "-p", str(workdir), "-c", str(conf), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        procs.wait_http_ready(url + "/", timeout=10, process=process)
    except procs.ProcessError:
        procs.stop_process(process)
        raise AssertionError("nginx did not start:\n" + (workdir / "nginx.log").read_text()) from None
    return Nginx(workdir, process, url)


@dataclass
class NginxStack:
    stack: Stack
    nginx: Nginx

    def call(
        self, method: str, path: str, key: str | None = None, body: object = None, **headers: str
    ) -> HttpResult:
        h = {k.replace("_", "-"): v for k, v in headers.items()}
        if key is not None:
            h.setdefault("authorization", f"Bearer {key}")
        raw = None
        if body is not None:
            raw = json.dumps(body).encode()
            h["content-type"] = "application/json"
        return http(method, self.nginx.url + path, h, raw)

    def upstream_requests(self) -> list[dict[str, Any]]:
        """What the mock upstream received, oldest first."""
        assert self.stack.mock is not None
        return self.stack.mock.requests()


@pytest.fixture(scope="module")
def ngx() -> Iterator[NginxStack]:
    yield from _nginx_stack(LIMITS)


def _nginx_stack(extra_config: str) -> Iterator[NginxStack]:
    workdir = Path(tempfile.mkdtemp(prefix="nx-ngx-"))
    stack = Stack(workdir=workdir, keys=(ALICE, THREE, SDK, CHAT_ONLY, REVOKED), extra_config=extra_config)
    nginx: Nginx | None = None
    try:
        stack.mock = mock_upstream.start_in_thread(always_usage=False)
        authz = f"127.0.0.1:{procs.free_port()}"
        os.environ["NEXUS_HTTP_TCP"] = authz  # what the recipe sets; read by start_nexus's process
        try:
            stack.start_nexus()
        finally:
            del os.environ["NEXUS_HTTP_TCP"]
        nginx = start_nginx(workdir / "nginx", authz=authz, upstream=f"127.0.0.1:{stack.mock.port}")
        yield NginxStack(stack, nginx)
    finally:
        if nginx is not None:
            nginx.stop()
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_valid_key_reaches_upstream_with_identity_and_without_the_client_key(ngx: NginxStack) -> None:
    resp = ngx.call(
        "POST", "/v1/chat/completions", key=ALICE.secret, body=CHAT, x_nexus_key_id="spoofed", api_key="x"
    )
    assert resp.status == 200, resp.body
    assert resp.json()["choices"][0]["message"]["content"]
    seen = ngx.upstream_requests()[-1]
    headers = seen["headers"]
    assert seen["path"] == "/v1/chat/completions" and json.loads(seen["body"]) == CHAT
    assert headers["x-nexus-key-id"] == "alice" and headers["x-nexus-tenant"] == "acme"
    assert headers["authorization"] == "Bearer sk-upstream-test-credential"
    assert "api-key" not in headers and "x-api-key" not in headers
    assert ALICE.secret not in json.dumps(headers)
    assert len(headers["x-request-id"]) == 32  # nginx's $request_id, also what nexus reserved under


def test_key_in_x_api_key_is_removed_too(ngx: NginxStack) -> None:
    resp = ngx.call("GET", "/v1/models", x_api_key=ALICE.secret)
    assert resp.status == 200
    headers = ngx.upstream_requests()[-1]["headers"]
    assert "x-api-key" not in headers and headers["authorization"] == "Bearer sk-upstream-test-credential"


def test_bad_key_is_401_json(ngx: NginxStack) -> None:
    before = len(ngx.upstream_requests())
    for key, code in (("nx-not-a-key-0123456789", "invalid_api_key"), (REVOKED.secret, "revoked_api_key")):
        resp = ngx.call("POST", "/v1/chat/completions", key=key, body=CHAT)
        assert resp.status == 401
        assert resp.headers["content-type"] == "application/json"
        assert resp.json()["error"]["code"] == code
    resp = ngx.call("GET", "/v1/models")
    assert resp.status == 401 and resp.json()["error"]["code"] == "missing_api_key"
    assert len(ngx.upstream_requests()) == before


def test_path_not_allowed_is_403_json(ngx: NginxStack) -> None:
    assert ngx.call("POST", "/v1/chat/completions", key=CHAT_ONLY.secret, body=CHAT).status == 200
    resp = ngx.call("POST", "/v1/embeddings", key=CHAT_ONLY.secret, body={"model": "x", "input": "a"})
    assert resp.status == 403 and resp.json()["error"]["code"] == "path_not_allowed"
    # A path the upstream would resolve elsewhere than what nexus checked never gets that far.
    resp = ngx.call("POST", "/v1/chat/../embeddings", key=CHAT_ONLY.secret, body={"model": "x"})
    assert resp.status == 400 and resp.json()["error"]["code"] == "invalid_path"
    resp = ngx.call("POST", "/v1/chat/%2e%2e/embeddings", key=CHAT_ONLY.secret, body={"model": "x"})
    assert resp.status == 400


def test_over_limit_is_429_with_retry_after_and_json(ngx: NginxStack) -> None:
    for i in range(3):
        resp = ngx.call("POST", "/v1/chat/completions", key=THREE.secret, body=CHAT)
        assert resp.status == 200, resp.body
        assert resp.headers["x-ratelimit-limit-requests"] == "3"
        assert resp.headers["x-ratelimit-remaining-requests"] == str(2 - i)
        assert "x-ratelimit-remaining-tokens" in resp.headers and "ratelimit-policy" in resp.headers
        assert "retry-after" not in resp.headers
    resp = ngx.call("POST", "/v1/chat/completions", key=THREE.secret, body=CHAT)
    assert resp.status == 429
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert error["type"] == "rate_limit_exceeded" and error["code"] == "rate_limit_exceeded"
    assert "limit 3" in error["message"]
    assert 1 <= int(resp.headers["retry-after"]) <= 20
    assert resp.headers["x-ratelimit-remaining-requests"] == "0" and "ratelimit" in resp.headers


@pytest.fixture(scope="module")
def ngx_openai() -> Iterator[NginxStack]:
    """The policy's rate_limit_headers: [openai]."""
    yield from _nginx_stack(LIMITS + "rate_limit_headers: [openai]\n")


def test_only_the_chosen_header_family_reaches_the_client(ngx_openai: NginxStack) -> None:
    for i in range(3):
        resp = ngx_openai.call("POST", "/v1/chat/completions", key=THREE.secret, body=CHAT)
        assert resp.status == 200, resp.body
        assert resp.headers["x-ratelimit-remaining-requests"] == str(2 - i)
        assert "x-ratelimit-reset-tokens" in resp.headers
        assert "ratelimit" not in resp.headers and "ratelimit-policy" not in resp.headers
    resp = ngx_openai.call("POST", "/v1/chat/completions", key=THREE.secret, body=CHAT)
    assert resp.status == 429
    assert 1 <= int(resp.headers["retry-after"]) <= 20  # always sent on a denial
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    assert "ratelimit" not in resp.headers and "ratelimit-policy" not in resp.headers


def test_openai_sdk_through_nginx(ngx: NginxStack) -> None:
    client = openai.OpenAI(api_key=SDK.secret, base_url=ngx.nginx.url + "/v1", max_retries=0)
    try:
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], max_tokens=20, stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text == mock_upstream.REPLY_TEXT
        for _ in range(2):
            client.models.list()
        with pytest.raises(openai.RateLimitError) as info:
            client.models.list()
        assert info.value.response.headers["retry-after"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(api_key="nx-wrong", base_url=ngx.nginx.url + "/v1", max_retries=0).models.list()
    finally:
        client.close()


def test_nexus_unreachable_fails_closed_with_503_json(ngx: NginxStack, tmp_path: Path) -> None:
    assert ngx.stack.mock is not None
    nginx = start_nginx(
        tmp_path / "nginx",
        authz=str(tmp_path / "nobody-listens.sock"),
        upstream=f"127.0.0.1:{ngx.stack.mock.port}",
    )
    before = len(ngx.upstream_requests())
    try:
        resp = http("GET", nginx.url + "/v1/models", {"authorization": f"Bearer {ALICE.secret}"})
    finally:
        nginx.stop()
    assert resp.status == 503 and resp.headers["retry-after"] == "1"
    assert resp.json()["error"]["code"] == "authz_unavailable"
    assert len(ngx.upstream_requests()) == before


def test_render_changes_only_the_named_directives(tmp_path: Path) -> None:
    text = nginx_config.render(
        NGINX_CONF, listen="0.0.0.0:80", authz="nexus:9191", upstream="llm:8000", runtime_dir=tmp_path
    )
    assert "listen 0.0.0.0:80;" in text and "server nexus:9191;" in text and "server llm:8000;" in text
    assert f"pid {tmp_path}/nginx.pid;" in text and f"proxy_temp_path {tmp_path}/proxy_temp;" in text
    original = NGINX_CONF.read_text().splitlines()
    assert len(text.splitlines()) == len(original)
    assert sum(a != b for a, b in zip(original, text.splitlines(), strict=True)) == 9
    with pytest.raises(nginx_config.NginxConfigError, match="upstream 'nexus_authz'"):
        nginx_config.render("events {}\nhttp {}\n", authz="/x.sock")
    with pytest.raises(nginx_config.NginxConfigError, match="invalid"):
        nginx_config.render(NGINX_CONF, upstream="evil; include /etc/passwd")
