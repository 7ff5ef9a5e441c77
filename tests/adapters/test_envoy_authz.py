"""gRPC ext_authz over an in-process grpc.aio server, with Envoy's own CheckRequest/CheckResponse types."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st

from nexus_authz.adapters.answers import ALLOW_CACHE
from nexus_authz.adapters.envoy_authz import (
    AuthorizationService,
    _extra_headers_message,
    extra_headers,
    request_from_check,
)
from nexus_authz.adapters.http_authz import HttpApp
from nexus_authz.core.model import Reason, new_allow
from nexus_authz.engine import Engine
from nexus_authz.server import Server
from tests.adapters.conftest import ALICE, BOB


def check_request(headers: dict[str, str], body: bytes = b"", path: str = "/v1/chat/completions"):  # type: ignore[no-untyped-def]
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method = "POST"
    http.path = path
    http.id = "req-1"
    http.headers.update(headers)
    http.raw_body = body
    return req


@asynccontextmanager
async def grpc_port(engine: Engine) -> AsyncIterator[grpc.aio.Channel]:
    """A grpc.aio server with the Authorization service, as on the gRPC port, and a channel to it."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((AuthorizationService(engine).handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


async def _serve_and_call(engine: Engine, requests: list[external_auth_pb2.CheckRequest]):  # type: ignore[no-untyped-def]
    async with grpc_port(engine) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        return [await stub.Check(r) for r in requests]


def call(engine: Engine, *requests: external_auth_pb2.CheckRequest) -> list[external_auth_pb2.CheckResponse]:
    return asyncio.run(_serve_and_call(engine, list(requests)))


def test_allow_swaps_credentials(engine: Engine) -> None:
    (resp,) = call(
        engine,
        check_request({"authorization": f"Bearer {ALICE.secret}"}, b'{"model":"gpt-4o","messages":[]}'),
    )
    assert resp.status.code == code_pb2.OK
    headers = {h.header.key: h.header.value for h in resp.ok_response.headers}
    assert headers == {
        "x-nexus-key-id": "alice",
        "x-nexus-tenant": "acme",
        "authorization": "Bearer sk-upstream-test-credential",
    }
    assert all(h.append_action == h.OVERWRITE_IF_EXISTS_OR_ADD for h in resp.ok_response.headers)
    assert set(resp.ok_response.headers_to_remove) == {"x-api-key", "api-key"}
    assert resp.dynamic_metadata.fields["key_id"].string_value == "alice"


def test_denials(engine: Engine) -> None:
    responses = call(
        engine,
        check_request({}),
        check_request({"x-api-key": "nx-nobody-0123456789"}),
        check_request({"x-api-key": BOB.secret}),
        check_request({"x-api-key": ALICE.secret}, b'{"model":"o1"}'),
        check_request({"x-api-key": ALICE.secret}, b"\x00\xff not json"),
    )
    expected = [
        (401, code_pb2.UNAUTHENTICATED, "missing_api_key"),
        (401, code_pb2.UNAUTHENTICATED, "invalid_api_key"),
        (401, code_pb2.UNAUTHENTICATED, "revoked_api_key"),
        (403, code_pb2.PERMISSION_DENIED, "model_not_allowed"),
        (400, code_pb2.INVALID_ARGUMENT, "invalid_request_body"),
    ]
    for resp, (http_status, grpc_code, error_code) in zip(responses, expected, strict=True):
        assert resp.status.code == grpc_code
        assert resp.denied_response.status.code == http_status
        assert json.loads(resp.denied_response.body)["error"]["code"] == error_code
        headers = {h.header.key: h.header.value for h in resp.denied_response.headers}
        assert headers["content-type"] == "application/json"
    assert engine.decisions[Reason.UNKNOWN_KEY] == 1 and engine.decisions[Reason.MISSING_KEY] == 1


def test_empty_and_odd_check_requests_are_decisions(engine: Engine) -> None:
    empty = external_auth_pb2.CheckRequest()
    raw = external_auth_pb2.CheckRequest()
    hv = raw.attributes.request.http.header_map.headers.add()
    hv.key = "X-Api-Key"
    hv.raw_value = ALICE.secret.encode()
    resp_empty, resp_raw = call(engine, empty, raw)
    assert resp_empty.denied_response.status.code == 401
    assert resp_raw.status.code == code_pb2.OK
    assert request_from_check(raw).headers == {"x-api-key": ALICE.secret}


def test_cached_answers_are_rebuilt_after_a_reload(engine: Engine, tmp_path) -> None:  # type: ignore[no-untyped-def]
    service = AuthorizationService(engine)
    req = check_request({"x-api-key": ALICE.secret})
    first = external_auth_pb2.CheckResponse.FromString(service.decide(req)[1])
    assert first.ok_response.headers[1].header.value == "acme"
    text = (tmp_path / "keys.yaml").read_text().replace('tenant: "acme"', 'tenant: "umbrella"')
    (tmp_path / "keys.yaml").write_text(text)
    assert engine.reload_keys(force=True)
    second = external_auth_pb2.CheckResponse.FromString(service.decide(req)[1])
    assert second.ok_response.headers[1].header.value == "umbrella"


def test_server_health_and_reflection(engine: Engine) -> None:
    async def run() -> tuple[int, list[str]]:
        from dataclasses import replace

        settings = replace(engine.settings, http_socket=None, admin=None, grpc="127.0.0.1:0")
        server = Server(settings, engine)
        # port 0: ask the OS, then read the port back from the bound address
        await server.start()
        assert server.grpc_server is not None
        port = server.grpc_port
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                status = (
                    await health.Check(
                        health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization")
                    )
                ).status
                refl = reflection_pb2_grpc.ServerReflectionStub(channel)
                names: list[str] = []
                async for answer in refl.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                ):
                    names = [s.name for s in answer.list_services_response.service]
                return status, names
        finally:
            await server.drain()

    status, names = asyncio.run(run())
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert "envoy.service.auth.v3.Authorization" in names and "grpc.health.v1.Health" in names


def test_a_cut_body_is_measured_by_the_clients_content_length_not_envoys_size() -> None:
    # Envoy's `size` is what it had buffered when it asked (seen: 425,984 to 1,176,576 for one 2 MB
    # body), so a cut body reserved by it came out small and random; the client's content-length is the
    # body's real length, and a forged x-nexus-content-length is dropped.
    cut = b"x" * 1024
    headers = {
        "content-length": "2000000",
        "x-envoy-auth-partial-body": "true",
        "x-nexus-content-length": "1",
    }
    req = check_request(headers, cut)
    req.attributes.request.http.size = 425984
    assert request_from_check(req).headers["x-nexus-content-length"] == "2000000"
    del req.attributes.request.http.headers["content-length"]
    assert "x-nexus-content-length" not in request_from_check(req).headers  # unknown: a cut body gets 413


def test_a_body_shorter_than_its_content_length_is_cut_whatever_envoys_flag_says() -> None:
    # Envoy's flag is "false" when its buffer held exactly max_request_bytes (core.forwarded.cut_by_proxy)
    cut = b'{"model":"gpt-4o","messages":[{"role":"user","content":"' + b"a" * 262000
    flagged = {"content-length": "2000000", "x-envoy-auth-partial-body": "false"}
    assert request_from_check(check_request(flagged, cut)).body_truncated
    whole = cut + b'"}]}'
    flagged["content-length"] = str(len(whole))
    assert not request_from_check(check_request(flagged, whole)).body_truncated
    del flagged["content-length"]  # none declared (HTTP/2): whole only when it is one whole object
    assert not request_from_check(check_request(flagged, whole)).body_truncated
    assert request_from_check(check_request(flagged, cut)).body_truncated


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_the_allow_answer_cache_is_bounded_on_both_transports(engine: Engine, transport: str) -> None:
    # issue 14: the HTTP adapter kept at most 4,096 allow answers, the gRPC adapter one per key record
    # ever seen (100,000 active keys: ~40 MB per snapshot). One bounded cache class serves both now.
    record = engine.snapshot.by_id["alice"]
    records = [
        dataclasses.replace(record, key_id=f"k{i}", upstream_headers=(("x-nexus-key-id", f"k{i}"),))
        for i in range(ALLOW_CACHE + 10)
    ]
    if transport == "grpc":
        service = AuthorizationService(engine)
        for r in records:
            answer = external_auth_pb2.CheckResponse.FromString(service.serialize(new_allow(r, None, ())))
            assert answer.dynamic_metadata.fields["key_id"].string_value == r.key_id
        cache = service._allow_cache
    else:
        app = HttpApp(engine, max_header_bytes=8192, max_body=0)
        for r in records:
            assert b"x-nexus-key-id: %s\r\n" % r.key_id.encode() in app.response(
                new_allow(r, None, ()), nginx=False, close=False
            )
        cache = app._allow_cache
    assert 0 < len(cache) <= ALLOW_CACHE


_HEADER_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)


@given(
    st.lists(st.tuples(_HEADER_TEXT, _HEADER_TEXT), max_size=12),
    st.booleans(),
)
def test_extra_headers_are_written_as_protobuf_serializes_them(
    pairs: list[tuple[str, str]], allowed: bool
) -> None:
    # written field by field (adapters/envoy_authz._option): every length on both sides of one varint byte
    assert extra_headers(pairs, allowed) == _extra_headers_message(pairs, allowed)
