"""One request sequence through every transport and every counter store requires the same decisions
(issue 14: one decision driver).

Transports: HTTP ext_authz over a real TCP socket (the fast-path protocol), gRPC ext_authz over a real
grpc.aio server and over the check socket's HTTP/2 (als_h2, as envoy-grpc.yaml sends it; a real gRPC
client), the policy API's dry-run Check in between (over gRPC), and the rate limit service with
an equivalent descriptor config. Stores: the memory store; Redis exact; Redis batched (one replica: its
documented over-admission bound, (N - 1) * ..., is zero, so its decisions must be exact), against a real
redis-server.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.rpc import code_pb2

from nexus_authz import app as app_root
from nexus_authz._gen.nexus.authz.v1 import policy_pb2 as pb
from nexus_authz._gen.nexus.authz.v1 import policy_pb2_grpc as pb_grpc
from nexus_authz.adapters import http_authz
from nexus_authz.adapters.envoy_als import AccessLogService
from nexus_authz.adapters.envoy_authz import AuthorizationService
from nexus_authz.adapters.envoy_rls import RateLimitService, RlsConfigSource, engine_identity
from nexus_authz.adapters.h2_listener import H2Receiver
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from tests.helpers import KeySpec, write_config
from tests.stores.conftest import RedisServer, unique_prefix

LIMITED = KeySpec("limited", extra={"limits": [{"requests": 2, "per": "minute"}]})
RESTRICTED = KeySpec("restricted", extra={"models": ["gpt-4o*"]})
CONC = KeySpec("conc", extra={"limits": [{"concurrent": 1}]})
NOBODY = KeySpec("nobody")
TOKEN = "test-admin-token-0123456789abcdef"
RLS_CONFIG = """
domain: nexus
descriptors:
  - key: nexus_key_id
    rate_limit: {unit: minute, requests_per_unit: 2}
"""

# (what, key, model, request id): "check" through the transport, "dry" through the policy API's
# dry-run Check (charges nothing), "release" the request's concurrency slot (its response ended).
SEQUENCE = [
    ("check", LIMITED, "gpt-4o", "l1"),
    ("dry", LIMITED, "gpt-4o", ""),
    ("check", LIMITED, "gpt-4o", "l2"),
    ("dry", LIMITED, "gpt-4o", ""),
    ("check", LIMITED, "gpt-4o", "l3"),
    ("check", NOBODY, "gpt-4o", "n1"),
    ("check", RESTRICTED, "o1", "m1"),
    ("dry", RESTRICTED, "o1", ""),
    ("check", RESTRICTED, "gpt-4o-mini", "m2"),
    ("check", CONC, "gpt-4o", "c1"),
    ("dry", CONC, "gpt-4o", ""),
    ("check", CONC, "gpt-4o", "c2"),
    ("release", CONC, "", "c1"),
    ("dry", CONC, "gpt-4o", ""),
    ("check", CONC, "gpt-4o", "c3"),
]
EXPECTED = [
    (200, "ok"),
    (200, "ok"),
    (200, "ok"),
    (429, "rate_limited"),
    (429, "rate_limited"),
    (401, "unknown_key"),
    (403, "model_not_allowed"),
    (403, "model_not_allowed"),
    (200, "ok"),
    (200, "ok"),
    (429, "concurrency_limited"),
    (429, "concurrency_limited"),
    (0, "released"),
    (200, "ok"),
    (200, "ok"),
]
STORES = ["memory", "redis-exact", "redis-batched"]


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/setup installs it)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def make_engine(directory: Path, store: str, redis: RedisServer | None) -> Engine:
    extra = ""
    if store != "memory":
        assert redis is not None
        mode = store.removeprefix("redis-")
        extra = (
            "counters:\n  backend: redis\n  redis:\n"
            f"    url: {redis.url}\n    mode: {mode}\n    key_prefix: '{unique_prefix(mode)}'\n"
            "    timeout: 500ms\n    flush_interval: 50ms\n"
        )
    directory.mkdir(parents=True, exist_ok=True)
    return Engine.from_settings(
        load_settings(str(write_config(directory, LIMITED, RESTRICTED, CONC, extra=extra)))
    )


def body(model: str) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()


async def http_check(port: int, key: KeySpec, model: str, request_id: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = body(model)
    writer.write(
        b"POST /ext_authz/v1/chat/completions HTTP/1.1\r\nhost: nexus\r\n"
        b"authorization: Bearer %s\r\ncontent-type: application/json\r\nx-request-id: %s\r\n"
        b"content-length: %d\r\nx-nexus-content-length: %d\r\n\r\n%s"
        % (key.secret.encode(), request_id.encode(), len(payload), len(payload), payload)
    )
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if line)
    status = int(lines[0].split()[1])
    return status, headers.get("x-nexus-reason", "ok" if status == 200 else "?")


async def grpc_check(
    stub: external_auth_pb2_grpc.AuthorizationStub, key: KeySpec, model: str, request_id: str
) -> tuple[int, str]:
    check = external_auth_pb2.CheckRequest()
    http = check.attributes.request.http
    http.method, http.path, http.raw_body = "POST", "/v1/chat/completions", body(model)
    http.headers.update(
        {
            "authorization": f"Bearer {key.secret}",
            "content-type": "application/json",
            "x-request-id": request_id,
        }
    )
    answer = await stub.Check(check)
    if answer.status.code == code_pb2.OK:
        return 200, "ok"
    denied = answer.denied_response
    headers = {h.header.key: h.header.value for h in denied.headers}
    return denied.status.code, headers["x-nexus-reason"]


async def run_sequence(engine: Engine, transport: str) -> list[tuple[int, str]]:
    """The sequence through `transport`, dry runs through the policy API; the decisions in order."""
    if engine.remote is not None:
        await engine.remote.start()
    api = await app_root.start_api_server(engine, "127.0.0.1:0", TOKEN)
    closers: list[Callable[[], Awaitable[object]]] = [lambda: api.server.stop(None)]
    try:
        if transport == "http":
            app = http_authz.HttpApp(engine, max_header_bytes=16384, max_body=65536)
            server = await http_authz.serve_tcp(app, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]

            async def stop_http() -> None:
                server.close()
                await server.wait_closed()

            closers.append(stop_http)

            async def check(key: KeySpec, model: str, request_id: str) -> tuple[int, str]:
                return await http_check(port, key, model, request_id)
        else:
            if transport == "grpc":
                grpc_server = grpc.aio.server()
                grpc_server.add_generic_rpc_handlers((AuthorizationService(engine).handler(),))
                grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
                await grpc_server.start()
                closers.append(lambda: grpc_server.stop(None))
                target = f"127.0.0.1:{grpc_port}"
            else:  # the check socket's HTTP/2, on a TCP check listener
                app = http_authz.HttpApp(engine, max_header_bytes=16384, max_body=65536)
                receiver = H2Receiver(AccessLogService(engine), engine)
                app.h2 = receiver.factory(app.protocol)
                server = await http_authz.serve_tcp(app, "127.0.0.1", 0)

                async def stop_socket() -> None:
                    receiver.close()
                    server.close()
                    await server.wait_closed()

                closers.append(stop_socket)
                target = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
            channel = grpc.aio.insecure_channel(target)
            closers.append(channel.close)
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)

            async def check(key: KeySpec, model: str, request_id: str) -> tuple[int, str]:
                return await grpc_check(stub, key, model, request_id)

        api_channel = grpc.aio.insecure_channel(api.address)
        closers.append(api_channel.close)
        api_stub = pb_grpc.PolicyServiceStub(api_channel)
        out: list[tuple[int, str]] = []
        for what, key, model, request_id in SEQUENCE:
            if what == "check":
                out.append(await check(key, model, request_id))
            elif what == "dry":
                request = pb.CheckRequest(headers={"authorization": f"Bearer {key.secret}"}, body=body(model))
                answer = await api_stub.Check(request, metadata=(("authorization", f"Bearer {TOKEN}"),))
                out.append((answer.http_status, answer.reason))
            else:
                assert engine.release(request_id)
                out.append((0, "released"))
                await asyncio.sleep(0.05)  # Redis exact: the release goes out in the background
        return out
    finally:
        for close in reversed(closers):
            await close()
        if engine.remote is not None:
            await engine.remote.close()


async def run_rls(engine: Engine, directory: Path) -> list[str]:
    """The rate limit service with the same limit as LIMITED (2 a minute per key id), over gRPC."""
    (directory / "rls").mkdir()
    (directory / "rls" / "nexus.yaml").write_text(RLS_CONFIG)
    if engine.remote is not None:
        await engine.remote.start()
    source = RlsConfigSource(str(directory / "rls"))
    source.load()
    service = RateLimitService(source, engine.decider, identity=engine_identity(engine))
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((service.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    codes = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            entry = ratelimit_pb2.RateLimitDescriptor.Entry(key="nexus_key_id", value="limited")
            for domain in ("nexus", "nexus", "other", "nexus"):
                request = rls_pb2.RateLimitRequest(
                    domain=domain, descriptors=[ratelimit_pb2.RateLimitDescriptor(entries=[entry])]
                )
                answer = await stub.ShouldRateLimit(request)
                codes.append(rls_pb2.RateLimitResponse.Code.Name(answer.overall_code))
    finally:
        await server.stop(None)
        if engine.remote is not None:
            await engine.remote.close()
    return codes


@pytest.mark.parametrize("store", STORES)
@pytest.mark.parametrize("transport", ["http", "grpc", "grpc-socket"])
def test_one_sequence_gets_the_same_decisions_through_every_transport_and_store(
    request: pytest.FixtureRequest, tmp_path: Path, transport: str, store: str
) -> None:
    server = request.getfixturevalue("redis") if store != "memory" else None
    engine = make_engine(tmp_path, store, server)
    assert asyncio.run(run_sequence(engine, transport)) == EXPECTED
    if store != "memory":
        assert engine.remote is not None and engine.remote.health().state == "ok"


@pytest.mark.parametrize("store", STORES)
def test_the_rate_limit_service_decides_the_same_on_every_store(
    request: pytest.FixtureRequest, tmp_path: Path, store: str
) -> None:
    server = request.getfixturevalue("redis") if store != "memory" else None
    engine = make_engine(tmp_path, store, server)
    assert asyncio.run(run_rls(engine, tmp_path)) == ["OK", "OK", "OK", "OVER_LIMIT"]
