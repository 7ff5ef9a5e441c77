"""Every listener of a running nexus-authz, scanned with check-shaped requests (issue 13.1).

A real `nexus-authz serve` with all its listeners open: the Unix socket and `listen.http_tcp` (the proxy
listeners, which decide checks and answer an allowed one with the provider credential), the admin
listener (health and metrics only), and the gRPC listener (Envoy's gRPC ext_authz: documented to decide
checks too, and to be bound to loopback or a Unix socket only). The scan asserts that the credential
comes back only where it is meant to, and that the admin listener answers nothing but its three paths.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2

from nexus_authz.demo import procs
from tests.helpers import PEPPER, KeySpec, write_config

CREDENTIAL = "sk-upstream-test-credential"
OPEN = KeySpec("open", extra={"tenant": "acme"})
CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
PATHS = (
    "/ext_authz/v1/chat/completions",
    "/ext_authz/v1/models",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/nginx/auth",
    "/",
    "/healthz",
    "/readyz",
    "/metrics",
    "/metrics?format=json",
    "/healthz/../ext_authz/v1/models",
)
METHODS = ("GET", "POST", "HEAD")
ADMIN = ("/healthz", "/readyz", "/metrics")
KEY_HEADERS = {
    "authorization": f"Bearer {OPEN.secret}",
    "x-api-key": OPEN.secret,
    "api-key": OPEN.secret,
}


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    socket: Path
    tcp: int
    admin: int
    grpc: int


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    import shutil
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="nx-scan-"))
    tcp, admin, grpc_port = procs.free_port(), procs.free_port(), procs.free_port()
    path = write_config(
        workdir,
        OPEN,
        socket=str(workdir / "authz.sock"),
        grpc=f"127.0.0.1:{grpc_port}",
        admin=f"127.0.0.1:{admin}",
    )
    path.write_text(path.read_text().replace("listen:\n", f"listen:\n  http_tcp: 127.0.0.1:{tcp}\n", 1))
    log = open(workdir / "nexus.log", "ab")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "nexus_authz.cli", "serve", "-c", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "NEXUS_KEY_PEPPER": PEPPER},
    )
    log.close()
    try:
        procs.wait_http_ready(f"http://127.0.0.1:{admin}/readyz", timeout=20)
        yield Server(process, workdir / "authz.sock", tcp, admin, grpc_port)
    finally:
        procs.stop_process(process, timeout=15)
        shutil.rmtree(workdir, ignore_errors=True)


def _request(method: str, path: str, key_header: str, address: str = "203.0.113.7") -> bytes:
    body = CHAT if method == "POST" else b""
    lines = [
        f"{method} {path} HTTP/1.1",
        "host: nexus",
        f"{key_header}: {KEY_HEADERS[key_header]}",
        f"x-forwarded-for: {address}",
        "x-real-ip: 203.0.113.7",
        "x-original-uri: /v1/models",
        "x-original-method: GET",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _send(family: str, target: str | int, payload: bytes) -> bytes:
    if family == "unix":
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(target))
    else:
        conn = socket.create_connection(("127.0.0.1", int(target)))
    conn.settimeout(10)
    try:
        conn.sendall(payload)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        conn.close()


def _scan(family: str, target: str | int) -> dict[tuple[str, str, str], bytes]:
    return {
        (method, path, header): _send(family, target, _request(method, path, header))
        for method in METHODS
        for path in PATHS
        for header in KEY_HEADERS
    }


def test_only_the_proxy_listeners_answer_checks(server: Server) -> None:
    answers = {
        "unix": _scan("unix", server.socket),
        "http_tcp": _scan("tcp", server.tcp),
        "admin": _scan("tcp", server.admin),
    }
    # The proxy listeners decide: a valid key gets the credential (the scan would find a leak).
    for listener in ("unix", "http_tcp"):
        carrying = [k for k, raw in answers[listener].items() if CREDENTIAL.encode() in raw]
        assert ("POST", "/ext_authz/v1/chat/completions", "api-key") in carrying, listener
        assert ("HEAD", "/v1/nginx/auth", "authorization") in carrying, listener
    # The admin listener: /healthz, /readyz, /metrics (GET, HEAD; with a query too), 404 for the rest,
    # never a credential, an identity header or a decision.
    for (method, path, header), raw in answers["admin"].items():
        assert CREDENTIAL.encode() not in raw, (method, path, header)
        status_line, _, rest = raw.partition(b"\r\n")
        assert b"x-nexus-" not in rest and b"www-authenticate" not in rest.lower()
        expected = {b"HTTP/1.1 200 OK" if path.partition("?")[0] in ADMIN else b"HTTP/1.1 404 Not Found"}
        if method == "POST":  # the admin listener reads no body: 413, whatever the path
            expected.add(b"HTTP/1.1 413 Payload Too Large")
        assert status_line in expected, (method, path, raw[:200])


def test_admin_cannot_poison_the_throttle_of_an_address(server: Server) -> None:
    # 31 bad keys sent to the admin port "from" an address used to lock that address out of the gateway.
    victim = "198.51.100.23"
    for i in range(35):
        payload = _request("GET", "/ext_authz/v1/models", "x-api-key", victim).replace(
            OPEN.secret.encode(), f"nx-wrong-guess-{i:05d}".encode()
        )
        assert _send("tcp", server.admin, payload).startswith(b"HTTP/1.1 404 ")
    # The victim's first request through the proxy listener is decided on its key alone.
    answer = _send("unix", server.socket, _request("GET", "/ext_authz/v1/models", "x-api-key", victim))
    assert answer.startswith(b"HTTP/1.1 200 ") and CREDENTIAL.encode() in answer


def test_grpc_listener_is_envoys_ext_authz_on_loopback(server: Server) -> None:
    # Documented (README, SECURITY.md): the gRPC listener serves Envoy's gRPC ext_authz, which answers an
    # allowed Check with the credential for Envoy to inject; it must stay on loopback or a Unix socket.
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.id = "GET", "/v1/models", "scan-1"
    http.headers.update({"api-key": OPEN.secret, "x-forwarded-for": "203.0.113.7"})
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc}") as channel:
        answer = external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=10)
    assert answer.status.code == code_pb2.OK
    headers = {h.header.key: h.header.value for h in answer.ok_response.headers}
    assert headers["authorization"] == f"Bearer {CREDENTIAL}"
    assert set(answer.ok_response.headers_to_remove) == {"x-api-key", "api-key"}
