"""A known client key, its hash, the upstream credential, the pepper and the admin token appear in none of:
the logs (debug level, JSON), /metrics, policy API answers and errors, denial bodies.

(The upstream credential does go to Envoy in an allowed ext_authz answer: that is its purpose, and that
answer is not scanned.)"""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from nexus_authz._gen.nexus.authz.v1 import policy_pb2 as pb
from nexus_authz._gen.nexus.authz.v1 import policy_pb2_grpc as pb_grpc
from nexus_authz.core import keys as keys_mod
from nexus_authz.core.config import SecretRef
from nexus_authz.core.usage import Usage
from nexus_authz.demo.procs import free_port
from nexus_authz.engine import Engine
from nexus_authz.logs import setup_logging
from nexus_authz.server import Server
from nexus_authz.settings import HostPort, load_settings
from tests.helpers import PEPPER, KeySpec, write_config

ADMIN_TOKEN = "admin-token-for-the-secret-scan-0123"
CREDENTIAL = "sk-upstream-test-credential"
KEY = KeySpec("scanned", extra={"tenant": "acme", "plan": "p", "models": ["gpt-4o*"]})
CONFIG = """
plans:
  p:
    limits:
      - {requests: 3, per: minute}
      - {tokens: 100000, per: day}
ledger:
  backend: memory
"""


def _http(sock: Path, secret: str, body: bytes, request_id: str) -> bytes:
    head = (
        "POST /ext_authz/v1/chat/completions HTTP/1.1\r\nhost: nexus\r\n"
        f"x-request-id: {request_id}\r\nauthorization: Bearer {secret}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(head.encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


@pytest.fixture
def debug_log() -> io.StringIO:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buf = io.StringIO()
    setup_logging("debug", "json", stream=buf)
    yield buf
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def test_no_secret_anywhere(tmp_path: Path, debug_log: io.StringIO) -> None:
    engine = Engine.from_settings(load_settings(str(write_config(tmp_path, KEY, extra=CONFIG))))
    admin_port = free_port()
    settings = replace(
        engine.settings,
        http_socket=str(tmp_path / "authz.sock"),
        grpc="127.0.0.1:0",
        admin=HostPort("127.0.0.1", admin_port),
        api="127.0.0.1:0",
        api_auth=replace(engine.settings.api_auth, admin_token=SecretRef(value=ADMIN_TOKEN)),
    )
    seen: list[bytes] = []  # everything a client, an operator or Prometheus gets to see

    async def main() -> None:
        server = Server(settings, engine)
        await server.start()
        loop = asyncio.get_running_loop()
        try:
            sock = tmp_path / "authz.sock"
            chat = b'{"model":"gpt-4o","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}'

            async def requests(*cases: tuple[str, bytes]) -> None:
                for secret, body in cases:
                    answer = await loop.run_in_executor(None, _http, sock, secret, body, f"req-{len(seen)}")
                    # an allowed answer carries the credential for Envoy, by design: not scanned
                    if not answer.startswith(b"HTTP/1.1 200"):
                        seen.append(answer)

            await requests(
                (KEY.secret, chat),
                (KEY.secret, chat.replace(b"gpt-4o", b"o1")),  # model not allowed
                (KEY.secret[:-1] + "X", chat),  # a near miss: unknown key
                (KEY.secret, b"\xff not json"),  # bad body
                (KEY.secret, chat),
            )
            assert len(seen) == 3
            engine.account("req-0", Usage(prompt_tokens=5, completion_tokens=7, source="provider"))

            async with grpc.aio.insecure_channel(server.addresses["api"]) as channel:
                stub = pb_grpc.PolicyServiceStub(channel)
                good = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
                for method, request in (
                    ("GetKey", pb.GetKeyRequest(key_id="scanned")),
                    ("ListKeys", pb.ListKeysRequest()),
                    ("GetLimitStatus", pb.GetLimitStatusRequest(key_id="scanned")),
                    ("GetUsage", pb.GetUsageRequest()),
                    ("Check", pb.CheckRequest(headers={"authorization": f"Bearer {KEY.secret}"}, body=chat)),
                    ("Check", pb.CheckRequest(headers={"x-api-key": KEY.secret}, body=b"{}")),
                    ("Check", pb.CheckRequest(key_id="scanned", body=chat)),
                ):
                    answer = await getattr(stub, method)(request, metadata=good)
                    seen.append(answer.SerializeToString())
                    if method == "Check" and request.body == chat:
                        assert answer.allowed and answer.credential == "openai"  # the credential is named
                failing = [
                    ("GetKey", pb.GetKeyRequest(key_id=KEY.secret), good),
                    ("GetKey", pb.GetKeyRequest(key_id=CREDENTIAL), good),
                    ("Check", pb.CheckRequest(key_id="scanned", headers={"x-api-key": KEY.secret}), good),
                    ("ListKeys", pb.ListKeysRequest(page_token=KEY.secret), good),
                    (
                        "GetKey",
                        pb.GetKeyRequest(key_id="scanned"),
                        (("authorization", f"Bearer {KEY.secret}"),),
                    ),
                    ("GetKey", pb.GetKeyRequest(key_id="scanned"), (("authorization", KEY.secret),)),
                ]
                for method, request, metadata in failing:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await getattr(stub, method)(request, metadata=metadata)
                    seen.append((info.value.details() or "").encode())
                    seen.append(repr(info.value).encode())
                # a bug whose exception message holds a secret: logged (scrubbed), answered INTERNAL
                clock = engine.clock

                def broken() -> float:
                    raise RuntimeError(f"boom {KEY.secret} {CREDENTIAL}")

                engine.clock = broken  # type: ignore[assignment]
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.GetKey(pb.GetKeyRequest(key_id="scanned"), metadata=good)
                engine.clock = clock
                assert info.value.code() == grpc.StatusCode.INTERNAL
                seen.append((info.value.details() or "").encode())

            def metrics() -> bytes:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as resp:
                    return resp.read()

            await requests((KEY.secret, chat), (KEY.secret, chat))  # the last one over the 3/minute limit
            assert b"429" in seen[-1]
            seen.append(await loop.run_in_executor(None, metrics))
            # a broken key file is reported in the log, naming the file and field, not its content
            (tmp_path / "keys.yaml").write_text(
                (tmp_path / "keys.yaml").read_text().replace("tenant:", "tenant: [") + "\n"
            )
            engine.reload_keys(force=True)
        finally:
            await server.drain()

    asyncio.run(main())
    logs = debug_log.getvalue()
    assert '"level": "debug"' in logs or '"level": "info"' in logs  # the capture works
    assert "internal error in the policy API" in logs and "[redacted]" in logs
    digest = keys_mod.format_hash(PEPPER.encode(), KEY.secret)
    secrets = {
        "client key": KEY.secret,
        "client key (near miss)": KEY.secret[:-1] + "X",
        "credential": CREDENTIAL,
        "key hash": digest.split(":")[1],
        "pepper": PEPPER,
        "admin token": ADMIN_TOKEN,
    }
    everything = {"logs": logs.encode(), **{f"answer {i}": blob for i, blob in enumerate(seen)}}
    for where, blob in everything.items():
        for what, secret in secrets.items():
            assert secret.encode() not in blob, f"{what} found in {where}"
