"""The policy query API over an in-process grpc.aio server: every method, auth failures, paging."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nexus_authz import app
from nexus_authz._gen.nexus.authz.v1 import policy_pb2 as pb
from nexus_authz._gen.nexus.authz.v1 import policy_pb2_grpc as pb_grpc
from nexus_authz.adapters import policy_api
from nexus_authz.core import keys as keys_mod
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.usage import Usage
from nexus_authz.engine import Engine
from nexus_authz.server import Server, StartupError
from nexus_authz.settings import load_settings
from tests.helpers import PEPPER, KeySpec, write_config

TOKEN = "admin-token-0123456789abcdef"
NOW = 1_900_000_000.0  # a fixed clock: 2030-03-17

PLAN = """
plans:
  standard:
    limits:
      - {requests: 5, per: minute}
      - {tokens: 10000, per: minute}
      - {concurrent: 2}
      - {requests: 100, per: day, model: "gpt-4*", shadow: true}
ledger:
  backend: memory
"""
LIMITED = KeySpec("limited", extra={"tenant": "acme", "plan": "standard", "metadata": {"owner": "ml"}})
OPEN = KeySpec("open", extra={"tenant": "acme", "models": ["gpt-4o*"], "paths": ["/v1/*"]})
REVOKED = KeySpec("revoked", extra={"tenant": "other", "disabled": True})
EXPIRED = KeySpec("expired", extra={"tenant": "other", "expires_at": "2020-01-01T00:00:00Z"})
FILLER = tuple(KeySpec(f"bulk-{i:02d}", extra={"tenant": "bulk"}) for i in range(23))
ALL = (LIMITED, OPEN, REVOKED, EXPIRED, *FILLER)
CREDENTIAL = "sk-upstream-test-credential"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    path = write_config(tmp_path, *ALL, extra=PLAN)
    return Engine.from_settings(load_settings(str(path)), clock=Clock(NOW))


@dataclass
class Api:
    stub: pb_grpc.PolicyServiceStub
    channel: grpc.aio.Channel
    servicer: policy_api.PolicyApi

    async def call(self, method: str, request: object, token: str | None = TOKEN) -> object:
        metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
        return await getattr(self.stub, method)(request, metadata=metadata, timeout=10)

    async def error(self, method: str, request: object, token: str | None = TOKEN) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await self.call(method, request, token)
        return info.value


@asynccontextmanager
async def serving(engine: Engine) -> AsyncIterator[Api]:
    server = await app.start_api_server(engine, "127.0.0.1:0", TOKEN)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield Api(pb_grpc.PolicyServiceStub(channel), channel, server.servicer)
    finally:
        await server.stop(None)


def run(engine: Engine, body: Callable[[Api], Awaitable[None]]) -> None:
    async def main() -> None:
        async with serving(engine) as api:
            await body(api)

    asyncio.run(main())


def chat(model: str = "gpt-4o", max_tokens: int = 100) -> bytes:
    return json.dumps(
        {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()


def client_request(key: KeySpec, body: bytes = b"", request_id: str = "", path: str = "/v1/chat/completions"):  # type: ignore[no-untyped-def]
    from nexus_authz.core.model import Request

    headers = {"authorization": f"Bearer {key.secret}", "content-type": "application/json"}
    return Request("POST", path, headers, body, request_id=request_id)


# -- auth ------------------------------------------------------------------------------------------------
CALLS: list[tuple[str, object]] = [
    ("GetKey", pb.GetKeyRequest(key_id="limited")),
    ("ListKeys", pb.ListKeysRequest()),
    ("GetLimitStatus", pb.GetLimitStatusRequest(key_id="limited")),
    ("GetUsage", pb.GetUsageRequest()),
    ("Check", pb.CheckRequest(key_id="limited")),
    ("Explain", pb.ExplainRequest(key_id="limited")),
]


def test_every_method_needs_the_admin_token(engine: Engine) -> None:
    assert {m for m, _ in CALLS} == set(pb.DESCRIPTOR.services_by_name["PolicyService"].methods_by_name)

    async def body(api: Api) -> None:
        for method, request in CALLS:
            for token in (None, "", "wrong-token-0123456789abcdef", TOKEN + "x", TOKEN[:-1]):
                err = await api.error(method, request, token)
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (method, token)
                assert "admin token" in (err.details() or "")
            # the wrong scheme, or the token in another header, is no token either
            for metadata in ((("authorization", f"Basic {TOKEN}"),), (("x-api-key", TOKEN),)):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await getattr(api.stub, method)(request, metadata=metadata, timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await api.call(method, request)  # and the right one works
        assert api.servicer.calls[("GetKey", "UNAUTHENTICATED")] == 7
        assert api.servicer.calls[("GetKey", "OK")] == 1

    run(engine, body)


def test_health_and_reflection_need_no_token(engine: Engine) -> None:
    async def body(api: Api) -> None:
        health = health_pb2_grpc.HealthStub(api.channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=policy_api.SERVICE))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(api.channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=policy_api.SERVICE),
        ]
        answers = [a async for a in refl.ServerReflectionInfo(iter(requests))]
        names = [s.name for s in answers[0].list_services_response.service]
        assert "nexus.authz.v1.PolicyService" in names and "grpc.health.v1.Health" in names
        assert answers[1].file_descriptor_response.file_descriptor_proto  # grpcurl can describe it

    run(engine, body)


def test_admin_token_resolution(tmp_path: Path) -> None:
    path = write_config(tmp_path, LIMITED, extra=PLAN)
    settings = load_settings(str(path))
    # not configured: from NEXUS_ADMIN_TOKEN, and no token means no API (None), never an open one
    assert policy_api.resolve_admin_token(settings, environ={}) is None
    assert policy_api.resolve_admin_token(settings, environ={"NEXUS_ADMIN_TOKEN": TOKEN}) == TOKEN
    with pytest.raises(ConfigError, match="at least 16"):
        policy_api.resolve_admin_token(settings, environ={"NEXUS_ADMIN_TOKEN": "short"})
    # configured in the file: must resolve
    text = path.read_text() + "api:\n  admin_token: {value_file: token.txt}\n"
    path.write_text(text)
    configured = load_settings(str(path))
    with pytest.raises(ConfigError, match=r"api\.admin_token"):
        policy_api.resolve_admin_token(configured, environ={"NEXUS_ADMIN_TOKEN": TOKEN})
    (tmp_path / "token.txt").write_text(TOKEN + "\n")
    assert policy_api.resolve_admin_token(configured, environ={}) == TOKEN


# -- keys ------------------------------------------------------------------------------------------------
def test_get_key(engine: Engine) -> None:
    async def body(api: Api) -> None:
        answer = await api.call("GetKey", pb.GetKeyRequest(key_id="limited"))
        key = answer.key
        assert (key.id, key.tenant, key.plan, key.state) == (
            "limited",
            "acme",
            "standard",
            pb.KEY_STATE_ACTIVE,
        )
        assert key.credential == "openai" and dict(key.metadata) == {"owner": "ml"}
        assert not key.HasField("expires_at")
        names = [(lim.name, lim.kind, lim.limit, lim.shadow) for lim in key.limits]
        assert names == [
            ("requests/minute", pb.LIMIT_KIND_REQUESTS, 5, False),
            ("tokens/minute", pb.LIMIT_KIND_TOKENS, 10000, False),
            ("concurrent", pb.LIMIT_KIND_CONCURRENT, 2, False),
            ("requests/day@gpt-4*:shadow", pb.LIMIT_KIND_REQUESTS, 100, True),
        ]
        assert key.limits[0].period.seconds == 60 and key.limits[0].algorithm == pb.LIMIT_ALGORITHM_GCRA
        assert key.limits[3].model == "gpt-4*" and key.limits[3].algorithm == pb.LIMIT_ALGORITHM_SLIDING
        assert not key.limits[2].HasField("period")
        assert answer.snapshot.keys == len(ALL) and answer.snapshot.version == engine.snapshot.version

        opened = (await api.call("GetKey", pb.GetKeyRequest(key_id="open"))).key
        assert list(opened.models) == ["gpt-4o*"] and list(opened.paths) == ["/v1/*"]
        revoked = (await api.call("GetKey", pb.GetKeyRequest(key_id="revoked"))).key
        assert revoked.state == pb.KEY_STATE_DISABLED
        expired = (await api.call("GetKey", pb.GetKeyRequest(key_id="expired"))).key
        assert expired.state == pb.KEY_STATE_EXPIRED
        assert expired.expires_at.ToJsonString() == "2020-01-01T00:00:00Z"

        # never the hash or the credential's value
        wire = answer.SerializeToString() + opened.SerializeToString()
        digest = keys_mod.format_hash(PEPPER.encode(), LIMITED.secret)
        for secret in (digest, digest.split(":")[1], CREDENTIAL, LIMITED.secret):
            assert secret.encode() not in wire

        err = await api.error("GetKey", pb.GetKeyRequest(key_id="nobody"))
        assert err.code() == grpc.StatusCode.NOT_FOUND and "nobody" in (err.details() or "")
        err = await api.error("GetKey", pb.GetKeyRequest())
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        # a client key pasted as an id is not echoed back
        err = await api.error("GetKey", pb.GetKeyRequest(key_id=LIMITED.secret))
        assert err.code() == grpc.StatusCode.NOT_FOUND and LIMITED.secret not in (err.details() or "")

    run(engine, body)


def test_list_keys_pages_through_every_key_once(engine: Engine) -> None:
    async def body(api: Api) -> None:
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            page = await api.call("ListKeys", pb.ListKeysRequest(page_size=10, page_token=token))
            assert page.total_size == len(ALL) and len(page.keys) <= 10
            seen += [k.id for k in page.keys]
            pages += 1
            token = page.next_page_token
            if not token:
                break
        assert pages == 3 and seen == sorted(k.id for k in ALL)

        default = await api.call("ListKeys", pb.ListKeysRequest())
        assert len(default.keys) == len(ALL) and not default.next_page_token
        huge = await api.call("ListKeys", pb.ListKeysRequest(page_size=1_000_000))
        assert len(huge.keys) == len(ALL)  # clamped to the maximum, not an error

        acme = await api.call("ListKeys", pb.ListKeysRequest(tenant="acme", page_size=1))
        assert [k.id for k in acme.keys] == ["limited"] and acme.total_size == 2
        rest = await api.call(
            "ListKeys", pb.ListKeysRequest(tenant="acme", page_size=1, page_token=acme.next_page_token)
        )
        assert [k.id for k in rest.keys] == ["open"] and not rest.next_page_token
        none = await api.call("ListKeys", pb.ListKeysRequest(tenant="nobody"))
        assert not none.keys and none.total_size == 0

        for bad in (
            pb.ListKeysRequest(page_token="not a token"),
            pb.ListKeysRequest(page_token=acme.next_page_token),  # issued for tenant acme
            pb.ListKeysRequest(page_size=-1),
        ):
            err = await api.error("ListKeys", bad)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT

    run(engine, body)


def test_list_keys_survives_a_reload_between_pages(engine: Engine, tmp_path: Path) -> None:
    async def body(api: Api) -> None:
        first = await api.call("ListKeys", pb.ListKeysRequest(page_size=5))
        assert [k.id for k in first.keys][-1] == "bulk-04"
        # drop a key already listed, add one after the cursor
        remaining = [k for k in ALL if k.id != "bulk-00"] + [KeySpec("zeta")]
        write_config(tmp_path, *remaining, extra=PLAN)
        assert engine.reload_keys(force=True)
        rest: list[str] = []
        token = first.next_page_token
        while token:
            page = await api.call("ListKeys", pb.ListKeysRequest(page_size=5, page_token=token))
            rest += [k.id for k in page.keys]
            token = page.next_page_token
        assert rest[0] == "bulk-05" and rest[-1] == "zeta" and "bulk-04" not in rest

    run(engine, body)


# -- limits ------------------------------------------------------------------------------------------------
def test_limit_status_counts_and_reservations(engine: Engine) -> None:
    clock = engine.clock
    assert isinstance(clock, Clock)

    def admit(request_id: str) -> None:
        assert engine.check(client_request(LIMITED, chat(max_tokens=100), request_id=request_id)).allowed

    admit("r0")
    admit("r1")
    engine.settle("r0", tokens=50, usd_micros=None)  # one response arrived (concurrency: 2 at most)
    admit("r2")

    async def body(api: Api) -> None:
        status = await api.call("GetLimitStatus", pb.GetLimitStatusRequest(key_id="limited"))
        windows = {w.name: w for w in status.windows}
        assert list(windows) == [
            "requests/minute",
            "tokens/minute",
            "concurrent",
            "requests/day@gpt-4*:shadow",
        ]
        requests = windows["requests/minute"]
        assert (requests.limit, requests.capacity, requests.used, requests.remaining) == (5, 5, 3, 2)
        assert requests.reserved == 0 and requests.kind == pb.LIMIT_KIND_REQUESTS
        assert 0 < requests.reset_after.ToNanoseconds() / 1e9 <= 36.0  # 3 requests at 12 s each
        assert requests.reset_at.ToNanoseconds() / 1e9 == pytest.approx(
            NOW + requests.reset_after.ToNanoseconds() / 1e9
        )
        concurrent = windows["concurrent"]
        assert (concurrent.used, concurrent.remaining, concurrent.reserved) == (2, 0, 2)
        tokens = windows["tokens/minute"]
        per_request = tokens.reserved // 2
        assert per_request > 100  # prompt estimate + max_tokens
        assert tokens.used == 2 * per_request + 50 and tokens.remaining == 10000 - tokens.used
        shadow = windows["requests/day@gpt-4*:shadow"]
        assert shadow.shadow and shadow.model == "gpt-4*" and shadow.used == 3
        assert status.reservations_in_flight == 2 and status.as_of.seconds == int(NOW)

        engine.settle("r1", tokens=10, usd_micros=None)
        engine.settle("r2", tokens=10, usd_micros=None)
        after = await api.call("GetLimitStatus", pb.GetLimitStatusRequest(key_id="limited"))
        assert after.reservations_in_flight == 0
        assert {w.name: w.reserved for w in after.windows}["tokens/minute"] == 0
        assert {w.name: w.used for w in after.windows}["tokens/minute"] == 70

        clock.now += 3600  # everything drains
        drained = await api.call("GetLimitStatus", pb.GetLimitStatusRequest(key_id="limited"))
        by_name = {w.name: w for w in drained.windows}
        assert by_name["requests/minute"].used == 0 and by_name["requests/minute"].reset_after.seconds == 0
        assert by_name["requests/day@gpt-4*:shadow"].used == 3  # a day window remembers

        unlimited = await api.call("GetLimitStatus", pb.GetLimitStatusRequest(key_id="open"))
        assert not unlimited.windows and unlimited.reservations_in_flight == 0
        err = await api.error("GetLimitStatus", pb.GetLimitStatusRequest(key_id="nobody"))
        assert err.code() == grpc.StatusCode.NOT_FOUND

    run(engine, body)


# -- usage ---------------------------------------------------------------------------------------------------
def test_usage_from_the_ledger(engine: Engine) -> None:
    for i, (model, prompt) in enumerate((("gpt-4o", 100), ("gpt-4o", 50), ("gpt-4o-mini", 7))):
        engine.check(client_request(LIMITED, chat(model), request_id=f"u{i}"))
        engine.account(f"u{i}", Usage(prompt_tokens=prompt, completion_tokens=10, source="provider"))
    engine.clock.now += 7200  # type: ignore[attr-defined]
    from nexus_authz.core.model import InFlight

    engine.book.track("late", InFlight("open", "acme", None, 0), engine.clock())  # admitted, no model read
    engine.account("late", Usage(prompt_tokens=1, completion_tokens=1, source="provider"))

    async def body(api: Api) -> None:
        usage = await api.call("GetUsage", pb.GetUsageRequest())
        rows = [(r.key_id, r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in usage.rows]
        assert rows == [
            ("limited", "gpt-4o", 2, 150, 20),
            ("limited", "gpt-4o-mini", 1, 7, 10),
            ("open", "unknown", 1, 1, 1),
        ]
        assert not usage.rows[0].HasField("tenant") and usage.rows[0].HasField("key_id")
        assert (usage.total.requests, usage.total.prompt_tokens) == (4, 158)
        assert not usage.total.HasField("key_id")

        start = pb.GetUsageRequest(key_id="limited", group_by=[pb.USAGE_GROUP_TENANT, pb.USAGE_GROUP_HOUR])
        start.end_time.FromSeconds(int(NOW) + 3600)
        by_hour = await api.call("GetUsage", start)
        assert [(r.tenant, r.requests) for r in by_hour.rows] == [("acme", 3)]
        assert by_hour.rows[0].period_start.seconds == int(NOW) - int(NOW) % 3600

        recent = pb.GetUsageRequest(group_by=[pb.USAGE_GROUP_KEY])
        recent.start_time.FromSeconds(int(NOW) + 3600)
        assert [r.key_id for r in (await api.call("GetUsage", recent)).rows] == ["open"]

        by_model = await api.call("GetUsage", pb.GetUsageRequest(model="gpt-4o-mini", group_by=[3]))
        assert [(r.model, r.requests) for r in by_model.rows] == [("gpt-4o-mini", 1)]

        for bad in (
            pb.GetUsageRequest(group_by=[pb.USAGE_GROUP_HOUR, pb.USAGE_GROUP_DAY]),
            pb.GetUsageRequest(group_by=[pb.USAGE_GROUP_UNSPECIFIED]),
            pb.GetUsageRequest(group_by=[pb.USAGE_GROUP_KEY, pb.USAGE_GROUP_KEY]),
        ):
            err = await api.error("GetUsage", bad)
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        backwards = pb.GetUsageRequest()
        backwards.start_time.FromSeconds(int(NOW))
        backwards.end_time.FromSeconds(int(NOW) - 60)
        assert (await api.error("GetUsage", backwards)).code() == grpc.StatusCode.INVALID_ARGUMENT

    run(engine, body)


def test_usage_without_a_ledger(tmp_path: Path) -> None:
    path = write_config(tmp_path, LIMITED, extra=PLAN.replace("backend: memory", "backend: none"))
    engine = Engine.from_settings(load_settings(str(path)))

    async def body(api: Api) -> None:
        err = await api.error("GetUsage", pb.GetUsageRequest())
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "ledger" in (err.details() or "")

    run(engine, body)


# -- dry run -------------------------------------------------------------------------------------------------
def _counter_state(engine: Engine) -> tuple[object, ...]:
    key = engine.snapshot.by_id["limited"]
    statuses = engine.counters.peek(key.counter_ids, key.limits, engine.clock())
    return (
        tuple((s.remaining, s.reset_after) for s in statuses),
        dict(engine.decisions),
        engine.book.stats(),
        len(engine.counters),
    )


def test_check_is_a_dry_run(engine: Engine) -> None:
    engine.check(client_request(LIMITED, chat(), request_id="before"))

    async def body(api: Api) -> None:
        before = _counter_state(engine)
        request = pb.CheckRequest(
            headers={"Authorization": f"Bearer {LIMITED.secret}", "content-type": "application/json"},
            body=chat(max_tokens=500),
        )
        for _ in range(10):  # far more than the 5/minute limit: nothing is charged
            answer = await api.call("Check", request)
            assert answer.allowed and answer.http_status == 200 and answer.reason == "ok"
        assert _counter_state(engine) == before
        assert (answer.key_id, answer.tenant, answer.model, answer.credential) == (
            "limited",
            "acme",
            "gpt-4o",
            "openai",
        )
        headers = {h.name: h.value for h in answer.response_headers}
        assert headers["x-ratelimit-limit-requests"] == "5"
        assert headers["x-ratelimit-remaining-requests"] == "3"  # what the real request would leave
        upstream = {h.name: h.value for h in answer.upstream_headers}
        assert upstream == {
            "x-nexus-key-id": "limited",
            "x-nexus-tenant": "acme",
            "authorization": "<credential openai>",
        }
        assert set(answer.removed_headers) == {"x-api-key", "api-key"}
        assert CREDENTIAL.encode() not in answer.SerializeToString()

        as_id = await api.call("Check", pb.CheckRequest(key_id="limited", body=chat(max_tokens=500)))
        assert as_id.allowed and as_id.key_id == "limited"
        assert [(h.name, h.value) for h in as_id.response_headers] == [
            (h.name, h.value) for h in answer.response_headers
        ]
        assert _counter_state(engine) == before

    run(engine, body)


def test_check_denials(engine: Engine) -> None:
    for i in range(5):
        assert engine.check(client_request(LIMITED, chat(), request_id=f"d{i}")).allowed
        engine.settle(f"d{i}", tokens=10, usd_micros=None)

    async def body(api: Api) -> None:
        limited = await api.call("Check", pb.CheckRequest(key_id="limited", body=chat()))
        assert not limited.allowed and limited.http_status == 429
        assert limited.reason == "rate_limited" and "limit 5, remaining 0" in limited.message
        assert int({h.name: h.value for h in limited.response_headers}["retry-after"]) >= 1
        assert json.loads(limited.error_body)["error"]["type"] == "rate_limit_exceeded"
        assert not limited.upstream_headers and not limited.credential

        cases = [
            (pb.CheckRequest(), 401, "missing_key"),
            (pb.CheckRequest(headers={"x-api-key": "nx-nobody-0123456789abcdef"}), 401, "unknown_key"),
            (pb.CheckRequest(key_id="revoked"), 401, "disabled_key"),
            (pb.CheckRequest(key_id="expired"), 401, "expired_key"),
            (pb.CheckRequest(key_id="open", body=chat("o1")), 403, "model_not_allowed"),
            (pb.CheckRequest(key_id="open", path="/admin", body=chat()), 403, "path_not_allowed"),
            (pb.CheckRequest(key_id="open", body=b"not json"), 400, "bad_request"),
        ]
        for request, status, reason in cases:
            answer = await api.call("Check", request)
            assert (answer.allowed, answer.http_status, answer.reason) == (False, status, reason)
            assert answer.message and json.loads(answer.error_body)["error"]["message"]
        ok = await api.call("Check", pb.CheckRequest(key_id="open", method="GET", path="/v1/models"))
        assert ok.allowed

        both = pb.CheckRequest(key_id="open", headers={"x-api-key": OPEN.secret})
        assert (await api.error("Check", both)).code() == grpc.StatusCode.INVALID_ARGUMENT
        huge = pb.CheckRequest(key_id="open", body=b"x" * (engine.settings.max_body_bytes + 1))
        assert (await api.error("Check", huge)).code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            await api.error("Check", pb.CheckRequest(key_id="nobody"))
        ).code() == grpc.StatusCode.NOT_FOUND

    run(engine, body)


def test_internal_errors_are_internal_and_logged(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    async def body(api: Api) -> None:
        def broken() -> object:
            raise RuntimeError(f"boom {LIMITED.secret}")

        engine.clock = broken  # type: ignore[assignment]
        err = await api.error("GetKey", pb.GetKeyRequest(key_id="limited"))
        assert err.code() == grpc.StatusCode.INTERNAL and "boom" not in (err.details() or "")

    with caplog.at_level("ERROR", logger="nexus_authz.api"):
        run(engine, body)
    assert any("internal error in the policy API" in r.getMessage() for r in caplog.records)


# -- inside the server --------------------------------------------------------------------------------------
def test_server_runs_the_api_with_health_following_readiness(engine: Engine, tmp_path: Path) -> None:
    settings = replace(
        engine.settings,
        http_socket=None,
        admin=None,
        grpc="127.0.0.1:0",
        api="127.0.0.1:0",
        api_auth=replace(engine.settings.api_auth, admin_token=replace_secret(TOKEN)),
    )

    async def main() -> None:
        server = Server(settings, engine)
        await server.start()
        try:
            assert server.api is not None
            address = server.addresses["api"]
            assert not address.endswith(":0")
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.PolicyServiceStub(channel)
                answer = await stub.GetKey(
                    pb.GetKeyRequest(key_id="open"), metadata=(("authorization", f"Bearer {TOKEN}"),)
                )
                assert answer.key.id == "open"
                health = health_pb2_grpc.HealthStub(channel)

                async def status() -> int:
                    req = health_pb2.HealthCheckRequest(service=policy_api.SERVICE)
                    return int((await health.Check(req)).status)

                assert await status() == health_pb2.HealthCheckResponse.SERVING
                (tmp_path / "keys.yaml").write_text("keys: [")  # a broken key file: not ready
                engine.reload_keys(force=True)
                for _ in range(100):
                    if await status() == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
                    await asyncio.sleep(0.05)
                assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as envoy_channel:
                envoy = await health_pb2_grpc.HealthStub(envoy_channel).Check(
                    health_pb2.HealthCheckRequest(service="envoy.service.auth.v3.Authorization")
                )
                assert envoy.status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            await server.drain()

    asyncio.run(main())


def replace_secret(value: str):  # type: ignore[no-untyped-def]
    from nexus_authz.core.config import SecretRef

    return SecretRef(value=value)


def test_server_without_a_token_runs_no_api(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEXUS_ADMIN_TOKEN", raising=False)
    settings = replace(engine.settings, http_socket=None, admin=None, grpc=None, api="127.0.0.1:0")

    async def main() -> None:
        server = Server(settings, engine)
        await server.start()
        try:
            assert server.api is None and "api" not in server.addresses
        finally:
            await server.drain()

    asyncio.run(main())
    monkeypatch.setenv("NEXUS_ADMIN_TOKEN", "short")
    with pytest.raises(StartupError, match="at least 16"):
        asyncio.run(Server(settings, engine).start())


def test_limit_status_with_a_large_reservation_book(engine: Engine) -> None:
    """Past a few thousand reservations the walk runs in a worker thread; the figures are the same."""
    from nexus_authz.core.model import InFlight

    mine = engine.snapshot.by_id["limited"]
    other = engine.snapshot.by_id["open"]
    for i in range(3000):
        engine.book.reserve(f"o{i}", (), (), (), NOW, 0, context=InFlight("open", "acme", None, 1))
    for i in range(3):
        engine.book.reserve(
            f"m{i}",
            mine.counter_ids,
            mine.limits,
            (1, 40, 1, 1),
            NOW,
            0,
            context=InFlight("limited", "acme", None, 1),
        )
    assert other.limits == ()

    async def body(api: Api) -> None:
        status = await api.call("GetLimitStatus", pb.GetLimitStatusRequest(key_id="limited"))
        assert status.reservations_in_flight == 3
        reserved = {w.name: w.reserved for w in status.windows}
        assert reserved == {
            "requests/minute": 0,
            "tokens/minute": 120,
            "concurrent": 3,
            "requests/day@gpt-4*:shadow": 0,
        }

    run(engine, body)


def test_listen_api_setting(tmp_path: Path) -> None:
    from nexus_authz.settings import DEFAULT_API_LISTEN, parse_settings

    base = "keys:\n  file: keys.yaml\n"
    path = str(tmp_path / "nexus.yaml")
    assert parse_settings(base, path, {}).api == DEFAULT_API_LISTEN == "127.0.0.1:9002"
    assert parse_settings("listen:\n  api: null\n" + base, path, {}).api is None
    assert parse_settings("listen:\n  api: unix:/run/api.sock\n" + base, path, {}).api == "unix:/run/api.sock"
    assert parse_settings(base, path, {"NEXUS_API_LISTEN": "0.0.0.0:7000"}).api == "0.0.0.0:7000"
    assert parse_settings(base, path, {"NEXUS_API_LISTEN": ""}).api is None
    configured = parse_settings(base + "api:\n  admin_token: {value_env: MY_TOKEN}\n", path, {})
    assert configured.api_auth.admin_token_configured and configured.api_auth.admin_token.env == "MY_TOKEN"
    inline = parse_settings(base + "api:\n  admin_token: {value: inline-token-0123456789}\n", path, {})
    assert "inline-token" not in repr(inline)  # never printed with the settings
    with pytest.raises(ConfigError, match=r"api\.admin_token"):
        parse_settings(base + "api:\n  admin_token: {}\n", path, {})
    with pytest.raises(ConfigError, match="api"):
        parse_settings(base + "api:\n  token: x\n", path, {})


# -- the budget hierarchy ------------------------------------------------------------------------------------
def test_key_and_limit_status_show_each_limit_with_its_level(tmp_path: Path) -> None:
    tenants = PLAN + (
        "tenants:\n  acme:\n    limits:\n      - {requests: 50, per: minute}\n"
        "    groups:\n      ml:\n        limits:\n          - {requests: 20, per: minute}\n"
    )
    member = KeySpec("member", extra={"tenant": "acme", "group": "ml", "plan": "standard"})
    path = write_config(tmp_path, LIMITED, OPEN, member, extra=tenants)
    engine = Engine.from_settings(load_settings(str(path)), clock=Clock(NOW))
    for key in (OPEN, OPEN, LIMITED, member):  # three requests of other keys in acme's window
        assert engine.check(client_request(key, chat())).allowed

    async def body(api: Api) -> None:
        key = await api.call("GetKey", pb.GetKeyRequest(key_id="member"))
        assert [(limit.level, limit.name) for limit in key.key.limits] == [
            ("key", "requests/minute"),
            ("key", "tokens/minute"),
            ("key", "concurrent"),
            ("key", "requests/day@gpt-4*:shadow"),
            ("group", "requests/minute"),
            ("tenant", "requests/minute"),
        ]
        status = await api.call("GetLimitStatus", pb.GetLimitStatusRequest(key_id="member"))
        used = {w.name: w.used for w in status.windows}
        assert used["requests/minute"] == 1 and used["group:requests/minute"] == 1
        assert used["tenant:requests/minute"] == 4  # shared by every key of the tenant

    run(engine, body)
