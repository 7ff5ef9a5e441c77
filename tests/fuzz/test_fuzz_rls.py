"""Envoy's RateLimitService (`ShouldRateLimit`): random domains, descriptors, hits and limit overrides.

Against the shipped example configs (tests/fixtures/rls/valid: three domains using every feature of the
format) and the fuzz engine's key identities: every request gets a RateLimitResponse that parses, with one
status per descriptor of a known domain, an overall code consistent with them, and an OpenAI-style JSON
body when it is over the limit; random bytes either fail to parse or get such an answer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf.message import DecodeError
from hypothesis import event, given
from hypothesis import strategies as st

from nexus_authz.adapters.envoy_rls import RateLimitService, RlsConfigSource, engine_identity
from nexus_authz.decide import Decider
from nexus_authz.engine import Engine
from nexus_authz.stores.base import LocalCounters
from nexus_authz.stores.memory import MemoryCounterStore
from tests.fuzz._support import check_error_json, fuzz_settings, no_bugs_logged, time_bound

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rls" / "valid"
Response = rls_pb2.RateLimitResponse
DOMAINS = ("nexus", "features", "messaging")
KEYS = (
    "nexus_key_id",
    "nexus_plan",
    "nexus_tenant",
    "path",
    "ldap",
    "azure",
    "service",
    "user",
    "key_1",
    "key_2",
    "remote_address",
    "generic_key",
    "message_type",
    "to_number",
    "",
)
VALUES = (
    "open",
    "scoped",
    "tight",
    "free",
    "enterprise",
    "/v1/chat/completions",
    "/v1/models",
    "user-a",
    "user-b",
    "bkthomps",
    "value_1",
    "value_2",
    "marketing",
    "",
    "*",
)
UINT64 = st.sampled_from([0, 1, 2, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1)


@pytest.fixture(scope="module")
def services(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> list[RateLimitService]:
    directory = tmp_path_factory.mktemp("rls")
    for path in FIXTURES.iterdir():
        shutil.copy(path, directory / path.name)
    out = []
    for headers, shadow in ((True, False), (False, False), (True, True)):
        source = RlsConfigSource(str(directory))
        source.load()
        out.append(
            RateLimitService(
                source,
                Decider(LocalCounters(MemoryCounterStore())),
                identity=engine_identity(engine),
                response_headers=headers,
                shadow_mode=shadow,
            )
        )
    return out


@st.composite
def descriptors(draw: st.DrawFn) -> ratelimit_pb2.RateLimitDescriptor:
    d = ratelimit_pb2.RateLimitDescriptor()
    for _ in range(draw(st.integers(0, 4))):
        d.entries.add(
            key=draw(st.sampled_from(KEYS) | st.text(max_size=10)),
            value=draw(st.sampled_from(VALUES) | st.text(max_size=30) | st.just("v" * 5000)),
        )
    if draw(st.integers(0, 3)) == 0:
        d.hits_addend.value = draw(UINT64)
    if draw(st.integers(0, 4)) == 0:
        d.limit.requests_per_unit = draw(st.integers(0, 2**32 - 1))
        d.limit.unit = draw(st.integers(-3, 12))  # open enum: unknown values are kept
    return d


@st.composite
def rls_requests(draw: st.DrawFn) -> rls_pb2.RateLimitRequest:
    request = rls_pb2.RateLimitRequest(domain=draw(st.sampled_from(DOMAINS) | st.text(max_size=10)))
    request.descriptors.extend(draw(st.lists(descriptors(), max_size=6)))
    if draw(st.booleans()):
        request.hits_addend = draw(st.integers(0, 2**32 - 1))
    return request


def check(request: rls_pb2.RateLimitRequest, data: bytes, known: bool) -> rls_pb2.RateLimitResponse:
    response = Response.FromString(data)
    assert response.overall_code in (Response.OK, Response.OVER_LIMIT)
    if known and request.descriptors:
        assert len(response.statuses) == len(request.descriptors)
    for status in response.statuses:
        assert status.code in (Response.OK, Response.OVER_LIMIT)
    headers = {h.key: h.value for h in response.response_headers_to_add}
    if response.raw_body:
        assert response.overall_code == Response.OVER_LIMIT
        assert headers.get("content-type") == "application/json"
        check_error_json(response.raw_body)
    return response


@fuzz_settings(300)
@given(request=rls_requests(), which=st.integers(0, 2), repeat=st.integers(1, 3))
def test_any_rate_limit_request_gets_a_defined_answer(
    services: list[RateLimitService], request: rls_pb2.RateLimitRequest, which: int, repeat: int
) -> None:
    service = services[which]
    known = request.domain in DOMAINS
    with no_bugs_logged(), time_bound(20):
        for _ in range(repeat):  # the same again: counters fill up, answers turn OVER_LIMIT
            response = check(request, service.decide(request), known)
    event("over limit" if response.overall_code == Response.OVER_LIMIT else "ok")
    if service.shadow_mode:
        assert response.overall_code == Response.OK


@fuzz_settings(200)
@given(
    data=st.binary(max_size=256)
    | st.builds(lambda r, cut: r.SerializeToString()[:cut], rls_requests(), st.integers(0, 200))
)
def test_random_bytes_either_fail_to_parse_or_get_an_answer(
    services: list[RateLimitService], data: bytes
) -> None:
    try:
        request = rls_pb2.RateLimitRequest.FromString(data)
    except DecodeError:
        event("undecodable")
        return
    event("decoded")
    with no_bugs_logged(), time_bound(20):
        check(request, services[0].decide(request), request.domain in DOMAINS)
