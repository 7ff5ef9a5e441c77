"""A known client key, its hash, the upstream credential, the pepper and the admin token appear in none of:
the logs (debug level, JSON and text), exception traces (a bug on the HTTP check, the policy API and the
accounting paths), /metrics, policy API answers and errors, denial bodies (ext_authz and the nginx
auth_request route), and the usage ledger's files; whether they come in through a Check, the access-log
stream or ext_proc (whose request headers and response bodies carry the key here).

(The upstream credential does go to Envoy in an allowed ext_authz answer: that is its purpose, and that
answer is not scanned.)"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import logging
import socket
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from nexus_authz._gen.nexus.authz.v1 import policy_pb2 as pb
from nexus_authz._gen.nexus.authz.v1 import policy_pb2_grpc as pb_grpc
from nexus_authz.adapters.envoy_als import METADATA_NAMESPACE
from nexus_authz.core import keys as keys_mod
from nexus_authz.core.config import SecretRef
from nexus_authz.core.model import InFlight
from nexus_authz.core.usage import Usage
from nexus_authz.demo.procs import free_port
from nexus_authz.engine import Engine
from nexus_authz.logs import setup_logging
from nexus_authz.server import Server
from nexus_authz.settings import HostPort, load_settings
from nexus_authz.stores.ledger import query_db
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
  path: usage.sqlite3
  flush_interval: 100ms
"""


def _http(sock: Path, secret: str, body: bytes, request_id: str, *, nginx: bool = False) -> bytes:
    if nginx:  # nginx's auth_request subrequest: no body, the original request in headers
        head = (
            "GET /v1/nginx/auth HTTP/1.1\r\nhost: nexus\r\nx-original-uri: /v1/chat/completions\r\n"
            f"x-original-method: POST\r\nx-request-id: {request_id}\r\nauthorization: Bearer {secret}\r\n"
            "connection: close\r\n\r\n"
        )
        body = b""
    else:
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


ECHO = (
    '{"error":{"message":"Incorrect API key provided: %s","code":"invalid_api_key"},'
    '"model":"gpt-4o","usage":{"prompt_tokens":2,"completion_tokens":3}}'
)
# a completion without a usage record, echoing the key: accounted by the Python per-entry path (its
# completion counted), which records through the ledger's record_usage (an error document like ECHO is
# settled by the compiled loop, which updates a pending ledger row in place)
ECHO_COUNTED = '{"model":"gpt-4o","choices":[{"message":{"role":"assistant","content":"Your key: %s"}}]}'


def _access_log(request_id: str, echo: str = ECHO) -> als_pb2.StreamAccessLogsMessage:
    """An access-log entry whose logged request headers include the client's key headers, its response
    (`echo`) the key too."""
    message = als_pb2.StreamAccessLogsMessage()
    entry = message.http_logs.log_entry.add()
    entry.request.request_id = request_id
    headers = entry.request.request_headers
    headers.update({"x-nexus-key-id": "scanned", "x-nexus-tenant": "acme"})
    headers.update({"authorization": f"Bearer {KEY.secret}", "x-api-key": KEY.secret})
    entry.response.response_headers["content-type"] = "application/json"
    body = (echo % KEY.secret).encode()
    entry.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].update(
        {"u": {"k": "body", "b": base64.b64encode(body).decode()}}
    )
    return message


def _ext_proc_stream(request_id: str) -> list[ep.ProcessingRequest]:
    request = ep.ProcessingRequest()
    for k, v in (
        ("x-request-id", request_id),
        ("x-nexus-key-id", "scanned"),
        ("x-nexus-tenant", "acme"),
        ("authorization", f"Bearer {KEY.secret}"),
    ):
        request.request_headers.headers.headers.add(key=k, value=v)
    response = ep.ProcessingRequest()
    response.response_headers.headers.headers.add(key=":status", value="200")
    response.response_headers.headers.headers.add(key="content-type", value="application/json")
    body = ep.ProcessingRequest(
        response_body=ep.HttpBody(body=(ECHO % KEY.secret).encode(), end_of_stream=True)
    )
    return [request, response, body]


@pytest.fixture(params=["json", "text"])
def debug_log(request: pytest.FixtureRequest) -> io.StringIO:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buf = io.StringIO()
    setup_logging("debug", request.param, stream=buf)
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
        shutdown_grace=1.0,  # the drain waits for access logs of the checks still reserved: not here
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
            # only what nexus admitted is accounted: the access-log and ext_proc requests below too
            for request_id in ("req-1", "req-2", "req-4"):
                engine.book.track(request_id, InFlight("scanned", "acme", "gpt-4o", 0), engine.clock())

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
                    ("Explain", pb.ExplainRequest(key_id="scanned", model="gpt-4o", total_tokens=10)),
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

            # the nginx auth_request route: its denials carry the error in x-nexus-* headers
            for secret in (KEY.secret, KEY.secret[:-1] + "X"):
                answer = await loop.run_in_executor(
                    None, functools.partial(_http, sock, secret, b"", f"ng-{len(seen)}", nginx=True)
                )
                if not answer.startswith(b"HTTP/1.1 204"):
                    seen.append(answer)
            assert b"x-nexus-error" in seen[-1]

            # a bug in the HTTP check whose exception holds secrets: answered 500, logged (scrubbed)
            def broken_clock() -> float:
                raise RuntimeError(f"boom {KEY.secret} {CREDENTIAL}")

            clock = engine.clock
            engine.clock = broken_clock  # type: ignore[assignment]
            try:
                await requests((KEY.secret, chat))
            finally:
                engine.clock = clock
            assert seen[-1].startswith(b"HTTP/1.1 500")

            # token accounting: the access-log stream and ext_proc, with the key in the request headers
            # Envoy logs and in the response body (an upstream echoing it); then a bug while accounting
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                als = channel.stream_unary(
                    "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs",
                    request_serializer=als_pb2.StreamAccessLogsMessage.SerializeToString,
                    response_deserializer=als_pb2.StreamAccessLogsResponse.FromString,
                )
                await als(iter([_access_log("req-1"), _access_log("req-2")]))
                ledger = engine.ledger
                assert ledger is not None

                def broken_record(*args: object, **kwargs: object) -> None:
                    raise RuntimeError(f"boom {KEY.secret} {CREDENTIAL}")

                # (the engine records through record_usage; record is the same entry point for a record)
                ledger.record = ledger.record_usage = broken_record  # type: ignore[method-assign]
                try:
                    await als(iter([_access_log("req-3", ECHO_COUNTED)]))
                finally:
                    del ledger.record, ledger.record_usage
                process = channel.stream_stream(
                    "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
                    request_serializer=ep.ProcessingRequest.SerializeToString,
                    response_deserializer=ep.ProcessingResponse.FromString,
                )
                async for reply in process(iter(_ext_proc_stream("req-4"))):
                    seen.append(reply.SerializeToString())

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
    assert "DEBUG" in logs or '"level": "debug"' in logs  # the capture works
    assert "internal error in the policy API" in logs and "[redacted]" in logs
    assert "internal error in the HTTP check" in logs and "accounting failed" in logs
    assert logs.count("boom [redacted]") >= 3  # the three traces, scrubbed
    # the ledger got the accounted usage (and nothing else): scan its files too
    rows = query_db(tmp_path / "usage.sqlite3", key_id="scanned")
    assert sum(r.requests for r in rows) == 4  # req-0, two access-log entries, ext_proc
    for path in tmp_path.glob("usage.sqlite3*"):
        seen.append(path.read_bytes())
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
