"""gRPC ext_authz (`Authorization/Check`): random CheckRequest messages, and random bytes on the wire.

Every message (headers in the string map or the raw header_map, any body, any path, method and source)
gets a CheckResponse that parses, with a gRPC status matching the HTTP status of its denial and an
OpenAI-style JSON error body; random bytes either fail to parse (grpc answers INTERNAL, and Envoy's
failure_mode_allow decides) or parse into a message that gets a decision like any other. A real grpc.aio
server fed garbage keeps answering the next valid Check.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2
from hypothesis import event, given
from hypothesis import strategies as st

from nexus_authz.adapters.envoy_authz import SERVICE, AuthorizationService
from nexus_authz.engine import Engine
from tests.fuzz import _strategies as S
from tests.fuzz._support import (
    HTTP_ALLOWED,
    SECRETS,
    check_error_json,
    fuzz_settings,
    no_bugs_logged,
    reset,
    time_bound,
)

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

_CODES = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    413: code_pb2.INVALID_ARGUMENT,
    429: code_pb2.RESOURCE_EXHAUSTED,
}


def _text(b: bytes) -> str:
    return b.decode("latin-1")


text = st.text(max_size=40)
header_names = (
    st.sampled_from(
        [
            "authorization",
            "x-api-key",
            "api-key",
            "content-type",
            "x-request-id",
            "x-envoy-auth-partial-body",
            "x-forwarded-for",
            "Authorization",
            ":path",
            "",
        ]
    )
    | text
)


@st.composite
def check_requests(draw: st.DrawFn) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    if draw(st.integers(0, 9)):
        http.method = draw(st.sampled_from(["POST", "GET", "", "post", "BREW"]) | text)
    if draw(st.integers(0, 9)):
        http.path = _text(draw(S.paths)) if draw(st.booleans()) else draw(text)
    if draw(st.booleans()):
        http.id = draw(text)
    keys = [(_text(k).lower(), _text(v)) for k, v in draw(S.key_headers())]
    others = draw(
        st.lists(st.tuples(header_names, text | st.sampled_from(["true", "application/json"])), max_size=5)
    )
    if draw(st.integers(0, 3)):  # the string map (Envoy's default)
        for k, v in keys + others:
            http.headers[k] = v
    else:  # encode_raw_headers: the raw header_map, repeated names allowed
        for k, v in keys + others:
            if draw(st.booleans()):
                http.header_map.headers.add(key=k, raw_value=v.encode("utf-8", "surrogatepass"))
            else:
                http.header_map.headers.add(key=k, value=v)
    body = draw(S.bodies())
    where = draw(st.integers(0, 3))
    if where == 0:
        http.raw_body = body
    elif where == 1:
        http.body = body.decode("utf-8", "replace")
    if draw(st.booleans()):
        http.size = draw(st.integers(-1, 2**62))
    if draw(st.booleans()):
        req.attributes.source.address.socket_address.address = _text(draw(S.addresses))
    if draw(st.integers(0, 4)) == 0:
        req.attributes.context_extensions.update(draw(st.dictionaries(text, text, max_size=3)))
    return req


def check_response(decision_status: int, data: bytes) -> external_auth_pb2.CheckResponse:
    response = external_auth_pb2.CheckResponse.FromString(data)
    assert decision_status in HTTP_ALLOWED
    if response.status.code == code_pb2.OK:
        assert decision_status == 200
        names = {h.header.key for h in response.ok_response.headers}
        assert {"x-nexus-key-id", "x-nexus-tenant"} <= names
    else:
        denied = response.denied_response
        assert response.status.code == _CODES[denied.status.code]
        assert denied.status.code == decision_status
        headers = {h.header.key: h.header.value for h in denied.headers}
        assert headers["content-type"] == "application/json"
        check_error_json(denied.body)
    return response


@fuzz_settings(300)
@given(request=check_requests())
def test_any_check_request_gets_a_defined_answer(
    engine: Engine, request: external_auth_pb2.CheckRequest
) -> None:
    service = AuthorizationService(engine)
    reset(engine)
    with no_bugs_logged(), time_bound(20):
        decision, data = service.decide(request)
    check_response(decision.status, data)
    event(f"{decision.status} {decision.reason.value}")


@fuzz_settings(300)
@given(
    data=st.binary(max_size=512)
    | st.builds(lambda r, cut: r.SerializeToString()[:cut], check_requests(), st.integers(0, 400))
    | st.builds(lambda r, flip: _flip(r.SerializeToString(), flip), check_requests(), st.integers(0, 2**16))
)
def test_random_bytes_either_fail_to_parse_or_get_a_decision(engine: Engine, data: bytes) -> None:
    try:
        request = external_auth_pb2.CheckRequest.FromString(data)
    except DecodeError:
        event("undecodable")
        return
    event("decoded")
    reset(engine)
    with no_bugs_logged(), time_bound(20):
        decision, answer = AuthorizationService(engine).decide(request)
    check_response(decision.status, answer)


def _flip(data: bytes, where: int) -> bytes:
    if not data:
        return data
    i = where % len(data)
    return data[:i] + bytes([data[i] ^ (1 << (where >> 8) % 8)]) + data[i + 1 :]


def test_a_server_fed_garbage_keeps_answering(engine: Engine) -> None:
    """Undecodable requests fail the RPC (grpc.aio answers UNKNOWN: the deserializer raised; Envoy's
    failure_mode_allow decides, as for any transport failure), and the next Check works."""
    garbage = [b"\xff" * 10, b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256)), b"\x12" + b"\x80" * 20]
    valid = external_auth_pb2.CheckRequest()
    valid.attributes.request.http.headers["authorization"] = f"Bearer {SECRETS[0]}"

    async def main() -> list[object]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((AuthorizationService(engine).handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        out: list[object] = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_unary(f"/{SERVICE}/Check")
                for data in [*garbage, valid.SerializeToString()]:
                    try:
                        out.append(external_auth_pb2.CheckResponse.FromString(await call(data, timeout=10)))
                    except grpc.aio.AioRpcError as exc:
                        out.append(exc.code())
        finally:
            await server.stop(None)
        return out

    reset(engine)
    with no_bugs_logged():
        *bad, good = asyncio.run(main())
    for code in bad:
        assert code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) or isinstance(
            code, external_auth_pb2.CheckResponse
        )
    assert isinstance(good, external_auth_pb2.CheckResponse) and good.status.code == code_pb2.OK
