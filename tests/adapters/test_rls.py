"""Envoy's RateLimitService over an in-process grpc.aio server, with Envoy's own request/response types;
the config directory's hot reload; sync and async stores; the service inside the real Server."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest

from nexus_authz.adapters.envoy_rls import (
    SERVICE,
    RateLimitService,
    RlsConfigSource,
    encode_response,
    engine_header_families,
    engine_identity,
    response_message,
)
from nexus_authz.core import rls
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.limits import AcquireResult, LimitSpec, WindowStatus
from nexus_authz.core.ports import StoreUnavailable
from nexus_authz.core.ratelimit_headers import IETF, OPENAI
from nexus_authz.core.rls import RlsSettings
from nexus_authz.decide import Decider
from nexus_authz.engine import Engine
from nexus_authz.server import Server
from nexus_authz.stores.base import LocalCounters
from nexus_authz.stores.memory import MemoryCounterStore

Response = rls_pb2.RateLimitResponse
CONFIG = """
domain: nexus
descriptors:
  - key: nexus_key_id
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: ldap
    rate_limit: {unlimited: true}
  - key: blocked
    rate_limit: {unit: hour, requests_per_unit: 0}
  - key: nexus_plan
    value: free
    descriptors:
      - key: nexus_key_id
        rate_limit: {unit: day, requests_per_unit: 1, name: free-daily}
"""
T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def descriptor(*entries: tuple[str, str], hits: int | None = None) -> ratelimit_pb2.RateLimitDescriptor:
    d = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )
    if hits is not None:
        d.hits_addend.CopyFrom(wrappers_pb2.UInt64Value(value=hits))
    return d


def request(*descriptors: ratelimit_pb2.RateLimitDescriptor, domain: str = "nexus", hits: int = 0):  # type: ignore[no-untyped-def]
    return rls_pb2.RateLimitRequest(domain=domain, descriptors=list(descriptors), hits_addend=hits)


def key(key_id: str) -> ratelimit_pb2.RateLimitDescriptor:
    return descriptor(("nexus_key_id", key_id))


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    # A new mtime on every write, even within the filesystem's timestamp granularity.
    stamp = os.stat(path).st_mtime_ns + 1_000_000
    os.utime(path, ns=(stamp, stamp))
    return path


def service(directory: Path, store: object | None = None, **kwargs: object) -> RateLimitService:
    """The service over `store` (an AsyncCounterStore; default: a memory store behind the async port)."""
    source = RlsConfigSource(str(directory))
    source.load()
    port = store if store is not None else LocalCounters(MemoryCounterStore())
    return RateLimitService(source, Decider(port), **kwargs)  # type: ignore[arg-type]


async def _serve_and_call(
    svc: RateLimitService, requests: Sequence[rls_pb2.RateLimitRequest]
) -> list[object]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((svc.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    out: list[object] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = rls_pb2_grpc.RateLimitServiceStub(channel)
            for r in requests:
                try:
                    out.append(await stub.ShouldRateLimit(r))
                except grpc.aio.AioRpcError as exc:
                    out.append(exc.code())
        return out
    finally:
        await server.stop(None)


def call(svc: RateLimitService, *requests: rls_pb2.RateLimitRequest) -> list[Response]:
    return asyncio.run(_serve_and_call(svc, requests))  # type: ignore[return-value]


@pytest.fixture
def cfg_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "rls"
    directory.mkdir()
    write(directory, "nexus.yaml", CONFIG)
    return directory


def headers(response: Response) -> dict[str, str]:
    return {h.key: h.value for h in response.response_headers_to_add}


# -- the protocol --------------------------------------------------------------------------------------------


def test_ok_then_over_limit_with_statuses_headers_and_body(cfg_dir: Path) -> None:
    clock = Clock()
    svc = service(cfg_dir, clock=clock)
    first, second, third = call(svc, request(key("alice")), request(key("alice")), request(key("alice")))
    assert first.overall_code == Response.OK
    (status,) = first.statuses
    assert status.code == Response.OK and status.limit_remaining == 1
    assert (
        status.current_limit.requests_per_unit == 2 and status.current_limit.unit == Response.RateLimit.MINUTE
    )
    assert status.duration_until_reset.seconds == 30  # GCRA: one request's worth drains in 30 s
    assert headers(first) == {
        "ratelimit-policy": '"nexus.nexus_key_id";q=2;w=60',
        "ratelimit": '"nexus.nexus_key_id";r=1;t=30',
    }
    assert not first.raw_body
    assert second.overall_code == Response.OK and second.statuses[0].limit_remaining == 0
    assert third.overall_code == Response.OVER_LIMIT and third.statuses[0].code == Response.OVER_LIMIT
    h = headers(third)
    assert h["retry-after"] == "30" and h["content-type"] == "application/json"
    error = json.loads(third.raw_body)["error"]
    assert error["code"] == "rate_limit_exceeded" and "nexus.nexus_key_id" in error["message"]
    assert svc.counts["ok"] == 2 and svc.counts["over_limit"] == 1
    assert svc.rule_stats["nexus.nexus_key_id"] == [3, 1, 0, 2]
    # Another key has its own counter; the clock refills this one.
    clock.now += 30
    bob, alice = call(svc, request(key("bob")), request(key("alice")))
    assert bob.statuses[0].limit_remaining == 1 and alice.overall_code == Response.OK


def test_hits_addend_request_level_and_per_descriptor(cfg_dir: Path) -> None:
    svc = service(cfg_dir, clock=Clock())
    a, b, c, d = call(
        svc,
        request(descriptor(("nexus_key_id", "k"), hits=0), hits=7),  # the descriptor's 0 wins: check only
        request(key("k"), hits=2),  # the request's addend: both hits at once
        request(descriptor(("nexus_key_id", "k2"), hits=3)),  # more than the window can ever hold
        request(key("k2")),
    )
    assert a.overall_code == Response.OK and a.statuses[0].limit_remaining == 2
    assert b.overall_code == Response.OK and b.statuses[0].limit_remaining == 0
    assert c.overall_code == Response.OVER_LIMIT and "retry-after" not in headers(c)
    assert d.overall_code == Response.OK and d.statuses[0].limit_remaining == 1  # c charged nothing


def test_unlimited_blocked_unknown_and_override(cfg_dir: Path) -> None:
    svc = service(cfg_dir, clock=Clock())
    override = descriptor(("anything", "x"))
    override.limit.requests_per_unit = 1
    override.limit.unit = rls_pb2.RateLimitResponse.RateLimit.SECOND
    unlimited, blocked, unknown, empty, nothing, o1, o2 = call(
        svc,
        request(descriptor(("ldap", "cn=x")), hits=1000),
        request(descriptor(("blocked", "x")), key("alice")),
        request(key("alice"), domain="elsewhere"),
        request(),
        request(descriptor(("no", "rule"))),
        request(override),
        request(override),
    )
    assert unlimited.overall_code == Response.OK and unlimited.statuses[0].limit_remaining == 2**32 - 1
    assert not unlimited.statuses[0].HasField("current_limit")
    assert blocked.overall_code == Response.OVER_LIMIT
    assert blocked.statuses[0].current_limit.requests_per_unit == 0
    assert blocked.statuses[0].current_limit.unit == Response.RateLimit.HOUR
    assert blocked.statuses[1].code == Response.OK and blocked.statuses[1].limit_remaining == 2  # not charged
    assert unknown.overall_code == Response.OK and not unknown.statuses[0].HasField("current_limit")
    assert empty.overall_code == Response.OK and len(empty.statuses) == 0
    assert nothing.overall_code == Response.OK and len(nothing.statuses) == 1
    assert o1.overall_code == Response.OK and o2.overall_code == Response.OVER_LIMIT
    assert svc.counts["unknown_domain"] == 1


def test_identity_fills_the_plan(cfg_dir: Path) -> None:
    plans = {"alice": ("acme", "free"), "bob": ("acme", None)}
    svc = service(cfg_dir, clock=Clock(), identity=plans.get)
    by_plan = descriptor(("nexus_plan", "-"), ("nexus_key_id", "alice"))
    first, second, bob = call(
        svc,
        request(by_plan),
        request(by_plan),
        request(descriptor(("nexus_plan", "-"), ("nexus_key_id", "bob"))),
    )
    assert first.overall_code == Response.OK and first.statuses[0].current_limit.name == "free-daily"
    assert second.overall_code == Response.OVER_LIMIT
    assert bob.overall_code == Response.OK and not bob.statuses[0].HasField("current_limit")


def test_engine_identity_reads_the_snapshot_in_force(engine: Engine) -> None:
    identity = engine_identity(engine)
    assert identity("alice") == ("acme", None)
    assert identity("nobody") is None


def test_global_shadow_mode_and_switches(cfg_dir: Path) -> None:
    svc = service(cfg_dir, clock=Clock(), shadow_mode=True, response_headers=False, error_body=False)
    answers = call(svc, *(request(key("alice")) for _ in range(3)))
    assert [a.overall_code for a in answers] == [Response.OK] * 3
    assert answers[2].statuses[0].code == Response.OVER_LIMIT  # what enforcement would have said
    assert all(not a.response_headers_to_add and not a.raw_body for a in answers)
    assert svc.counts["shadow_overridden"] == 1


def test_the_policys_header_families_leave_the_ietf_headers_out_and_keep_retry_after(cfg_dir: Path) -> None:
    families = [OPENAI]  # the policy in force says `rate_limit_headers: [openai]`
    svc = service(cfg_dir, clock=Clock(), families=lambda: families[0])
    first, second, third = call(svc, *(request(key("alice")) for _ in range(3)))
    assert first.overall_code == Response.OK and not headers(first) and not headers(second)
    assert third.overall_code == Response.OVER_LIMIT
    assert headers(third) == {"retry-after": "30", "content-type": "application/json"}
    families[0] = OPENAI | IETF  # a reload: read at each answer
    (again,) = call(svc, request(key("bob")))
    assert set(headers(again)) == {"ratelimit", "ratelimit-policy"}


def test_engine_header_families_follow_a_config_reload(engine: Engine) -> None:
    families = engine_header_families(engine)
    assert families() == OPENAI | IETF
    config = Path(engine.settings.config_path)
    config.write_text(config.read_text() + "rate_limit_headers: [openai]\n")
    assert engine.reload_config(force=True)
    assert families() == OPENAI


def test_the_hand_encoding_is_the_protobuf_message(tmp_path: Path) -> None:
    """encode_response writes the wire format directly; it must parse to what the protobuf API builds."""
    text = (Path(__file__).resolve().parents[1] / "fixtures" / "rls" / "valid" / "features.yaml").read_text()
    cfg = rls.parse_rls_config([("f.yaml", text), ("n.yaml", CONFIG)])
    named = cfg.lookup("features", [("path", "/v1/chat/x")])
    week = cfg.lookup("features", [("unit", "week")])
    blocked = cfg.lookup("nexus", [("blocked", "x")])
    assert named is not None and week is not None and blocked is not None
    statuses = (
        rls.DescriptorStatus(False, None, 0, 0),
        rls.DescriptorStatus(False, None, rls.UNLIMITED_REMAINING, 0),
        rls.DescriptorStatus(False, named, 2, 0),
        rls.DescriptorStatus(True, named, 0, 127),
        rls.DescriptorStatus(False, week, 300, 128),
        rls.DescriptorStatus(False, week, rls.UNLIMITED_REMAINING - 1, 7 * 86400, True),
        rls.DescriptorStatus(True, blocked, 0, 3600),
    )
    body = b'{"error":{"message":"Rate limit reached for \xc3\xa9.","code":"rate_limit_exceeded"}}'
    headers = (("ratelimit-policy", '"chat";q=3;w=60'), ("retry-after", "1"), ("x-" + "a" * 200, "b" * 300))
    answers = [
        rls.RlsAnswer(False, (), (), b""),
        rls.RlsAnswer(False, statuses[:3], headers[:1], b""),
        rls.RlsAnswer(True, statuses, headers, body),
        rls.RlsAnswer(False, statuses, (), b"", shadow_overridden=True),
    ]
    for answer in answers:
        for error_body in (True, False):
            encoded = encode_response(answer, error_body=error_body)
            assert Response.FromString(encoded) == response_message(answer, error_body=error_body)
    assert Response.FromString(encode_response(answers[2])).raw_body == body


# -- stores ---------------------------------------------------------------------------------------------


class AsyncStore:
    """An async store (the Redis store's shape: core.ports.AsyncCounterStore) over the memory store, which
    always waits."""

    def __init__(self, fail: str | None = None) -> None:
        self.inner = MemoryCounterStore()
        self.fail = fail
        self.calls = 0

    async def acquire(
        self, ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
    ) -> AcquireResult | object:
        self.calls += 1
        await asyncio.sleep(0)
        if self.fail == "unavailable":
            raise StoreUnavailable("redis is down")
        if self.fail == "raise":
            raise ConnectionError("a store that lets its client's error out")  # a bug in that store
        return self.inner.acquire(ids, specs, costs, now)

    def acquire_nowait(
        self, ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
    ) -> AcquireResult | None:
        return None

    def peek_nowait(
        self, ids: Sequence[str], specs: Sequence[LimitSpec], now: float, costs: Sequence[int] | None = None
    ) -> tuple[WindowStatus, ...] | None:
        return None

    async def peek(
        self, ids: Sequence[str], specs: Sequence[LimitSpec], now: float, costs: Sequence[int] | None = None
    ) -> tuple[WindowStatus, ...]:
        return self.inner.peek(ids, specs, now, costs)


def test_an_async_store_is_awaited(cfg_dir: Path) -> None:
    store = AsyncStore()
    svc = service(cfg_dir, store, clock=Clock())
    answers = call(svc, *(request(key("alice")) for _ in range(3)), request(descriptor(("blocked", "x"))))
    codes = [a.overall_code for a in answers]
    assert codes == [Response.OK, Response.OK, Response.OVER_LIMIT, Response.OVER_LIMIT]
    assert store.calls == 3


@pytest.mark.parametrize(
    ("fail", "code", "counted"),
    [
        ("unavailable", grpc.StatusCode.UNAVAILABLE, "store_unavailable"),
        ("raise", grpc.StatusCode.INTERNAL, "error"),
    ],
)
def test_a_store_that_cannot_answer_fails_the_rpc_for_failure_mode_deny(
    cfg_dir: Path, fail: str, code: grpc.StatusCode, counted: str
) -> None:
    # StoreUnavailable is the store saying it cannot answer; any other exception is a bug (INTERNAL).
    # Either way the RPC fails and Envoy's failure_mode_deny decides.
    svc = service(cfg_dir, AsyncStore(fail), clock=Clock())
    failed, unlimited = call(svc, request(key("alice")), request(descriptor(("ldap", "x"))))
    assert failed == code
    assert unlimited.overall_code == Response.OK  # no store call needed: still answered
    assert svc.counts[counted] == 1


def test_a_bug_is_an_internal_error_not_a_crash(cfg_dir: Path) -> None:
    class Broken(MemoryCounterStore):
        def acquire(self, *args: object) -> AcquireResult:  # type: ignore[override]
            return AcquireResult(True, ())  # fewer statuses than windows: a bug in a store

    svc = service(cfg_dir, LocalCounters(Broken()), clock=Clock())
    (result,) = call(svc, request(key("alice")))
    assert result == grpc.StatusCode.INTERNAL and svc.counts["error"] == 1


class LocalFirstStore(AsyncStore):
    """An async store that can answer some calls without an await (the Redis store's acquire_nowait)."""

    def __init__(self) -> None:
        super().__init__()
        self.local = 0

    def acquire_nowait(
        self, ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
    ) -> AcquireResult | None:
        if ids[0].endswith("alice"):
            self.local += 1
            return self.inner.acquire(ids, specs, costs, now)
        return None


def test_a_local_answer_is_used_without_an_await(cfg_dir: Path) -> None:
    store = LocalFirstStore()
    svc = service(cfg_dir, store, clock=Clock())
    a, b, c = call(svc, request(key("alice")), request(key("bob")), request(key("alice")))
    assert (store.local, store.calls) == (2, 1)
    assert [x.statuses[0].limit_remaining for x in (a, b, c)] == [1, 1, 0]


def test_a_peek_that_cannot_answer_fails_the_rpc(cfg_dir: Path) -> None:
    class PeekDown(AsyncStore):
        async def peek(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
            raise StoreUnavailable("redis is down")

    svc = service(cfg_dir, PeekDown(), clock=Clock())
    (result,) = call(svc, request(descriptor(("blocked", "x"))))
    assert result == grpc.StatusCode.UNAVAILABLE


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_the_redis_store_serves_the_same_limits(cfg_dir: Path, tmp_path: Path) -> None:
    """The exact-mode Redis store (awaited), against a real redis-server."""
    from nexus_authz.stores.redis import RedisSettings, open_redis_store

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

        async def run() -> list[Any]:
            settings = RedisSettings(url=f"redis://127.0.0.1:{port}/0", mode="exact", timeout=1.0)
            store = open_redis_store(settings)
            await store.start()
            try:
                svc = service(cfg_dir, store, clock=Clock())
                requests = [request(key("alice"), descriptor(("ldap", "x"))) for _ in range(3)]
                return await _serve_and_call(svc, requests)
            finally:
                await store.close()

        answers = asyncio.run(run())
    finally:
        redis.terminate()
        redis.wait(timeout=10)
    assert [a.overall_code for a in answers] == [Response.OK, Response.OK, Response.OVER_LIMIT]
    assert [a.statuses[0].limit_remaining for a in answers] == [1, 0, 0]
    assert answers[0].statuses[1].limit_remaining == 2**32 - 1


# -- the config directory --------------------------------------------------------------------------------


def test_reload_picks_up_changes_and_keeps_the_last_good_config(
    cfg_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    svc = service(cfg_dir, clock=clock)
    source = svc.source
    v1 = source.status().version
    assert source.reload() is False  # unchanged
    write(cfg_dir, "nexus.yaml", CONFIG.replace("requests_per_unit: 2", "requests_per_unit: 5"))
    assert source.reload() is True and source.status().version != v1
    (ok,) = call(svc, request(key("alice")))
    assert ok.statuses[0].current_limit.requests_per_unit == 5
    good = source.config

    caplog.set_level(logging.ERROR, logger="nexus_authz.ratelimit")
    write(cfg_dir, "nexus.yaml", CONFIG.replace("unit: minute", "unit: fortnight"))
    assert source.reload() is False and source.reload() is False  # two polls, one change on disk
    assert source.config is good
    (record,) = [r for r in caplog.records if r.name == "nexus_authz.ratelimit"]
    error = record.__dict__["error"]
    assert error.startswith(
        f"{cfg_dir}/nexus.yaml:5: descriptors[0].rate_limit.unit: unknown unit 'fortnight'"
    )
    status = source.status()
    assert status.loaded and status.last_error == error and status.version == good.version
    (still,) = call(svc, request(key("alice")))
    assert still.statuses[0].current_limit.requests_per_unit == 5

    write(cfg_dir, "nexus.yaml", CONFIG)
    assert source.reload() is True and source.status().last_error is None

    # A second file, a dotfile and a non-YAML file: only the YAML files count.
    write(cfg_dir, "other.yml", "domain: other\ndescriptors: []\n")
    write(cfg_dir, ".hidden.yaml", "this is not: [valid")
    write(cfg_dir, "README.txt", "not config")
    assert source.reload() is True and source.status().files == 2 and source.status().domains == 2


def test_a_deleted_directory_keeps_the_config(cfg_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    svc = service(cfg_dir, clock=Clock())
    good = svc.source.config
    for child in cfg_dir.iterdir():
        child.unlink()
    cfg_dir.rmdir()
    caplog.set_level(logging.ERROR, logger="nexus_authz.ratelimit")
    assert svc.source.reload() is False and svc.source.config is good
    assert "ratelimit config directory not found" in (svc.source.status().last_error or "")


def test_configmap_style_symlink_swaps_are_seen(tmp_path: Path) -> None:
    """Kubernetes mounts a ConfigMap as symlinks into `..data`, which it swaps atomically."""
    root = tmp_path / "cm"
    root.mkdir()
    (root / "v1").mkdir()
    (root / "v1" / "nexus.yaml").write_text(CONFIG)
    (root / "..data").symlink_to("v1")
    (root / "nexus.yaml").symlink_to("..data/nexus.yaml")
    source = RlsConfigSource(str(root))
    source.load()
    assert len(source.config or ()) == 4
    (root / "v2").mkdir()
    (root / "v2" / "nexus.yaml").write_text(CONFIG.replace("requests_per_unit: 2", "requests_per_unit: 9"))
    (root / "..data_tmp").symlink_to("v2")
    os.replace(root / "..data_tmp", root / "..data")
    assert source.reload() is True
    rule = source.config.lookup("nexus", [("nexus_key_id", "a")]) if source.config else None
    assert rule is not None and rule.requests_per_unit == 9


def test_startup_errors_are_config_errors(tmp_path: Path) -> None:
    driver = Decider(LocalCounters(MemoryCounterStore()))
    with pytest.raises(ConfigError, match="ratelimit config directory not found"):
        RateLimitService.from_settings(RlsSettings(config_dir=str(tmp_path / "missing")), driver)
    (tmp_path / "bad.yaml").write_text("domain: x\ndescriptors: {}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: descriptors: expected a list"):
        RateLimitService.from_settings(RlsSettings(config_dir=str(tmp_path)), driver)
    with pytest.raises(ConfigError, match="config_dir is not set"):
        RateLimitService.from_settings(RlsSettings(), driver)


# -- inside the server ---------------------------------------------------------------------------------


def test_the_server_offers_the_service_with_health(engine: Engine, cfg_dir: Path) -> None:
    async def run() -> tuple[int, Response]:
        settings = replace(
            engine.settings,
            http_socket=None,
            admin=None,
            grpc="127.0.0.1:0",
            ratelimit=RlsSettings(config_dir=str(cfg_dir), reload_interval=0.05),
        )
        server = Server(settings, engine)
        await server.start()
        try:
            assert server.ratelimit is not None and server.ratelimit.driver is engine.decider
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                status = (await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))).status
                stub = rls_pb2_grpc.RateLimitServiceStub(channel)
                write(cfg_dir, "nexus.yaml", CONFIG.replace("requests_per_unit: 2", "requests_per_unit: 3"))
                await asyncio.sleep(0.3)  # the reload task polls every 50 ms
                return status, await stub.ShouldRateLimit(request(key("alice")))
        finally:
            await server.drain()

    status, response = asyncio.run(run())
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert (
        response.statuses[0].current_limit.requests_per_unit == 3
        and response.statuses[0].limit_remaining == 2
    )


def test_statistics_are_exported_at_scrape_time(tmp_path: Path) -> None:
    """Issue 18 item 10: counts, per-rule stats (shadow-mode hits included) and rejected reloads reach
    /metrics through RlsCollector."""
    from nexus_authz.metrics import RlsCollector

    directory = tmp_path / "rls"
    directory.mkdir()
    write(
        directory,
        "a.yaml",
        "domain: nexus\ndescriptors:\n"
        "  - key: nexus_key_id\n    rate_limit: {unit: minute, requests_per_unit: 1}\n"
        "  - key: tier\n    shadow_mode: true\n    rate_limit: {unit: minute, requests_per_unit: 1}\n",
    )
    svc = service(directory, clock=Clock())
    call(
        svc,
        *(request(key("alice")) for _ in range(2)),
        *(request(descriptor(("tier", "x"))) for _ in range(3)),
    )
    write(directory, "a.yaml", "domain: nexus\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight}\n")
    assert svc.source.reload() is False
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RlsCollector(svc))
    text = generate_latest(registry).decode()
    assert 'nexus_authz_ratelimit_calls_total{result="over_limit"} 1.0' in text
    assert 'nexus_authz_ratelimit_calls_total{result="ok"} 4.0' in text
    assert 'nexus_authz_ratelimit_rule_hits_total{rule="nexus.nexus_key_id"} 2.0' in text
    assert 'nexus_authz_ratelimit_rule_over_limit_total{rule="nexus.nexus_key_id"} 1.0' in text
    assert 'nexus_authz_ratelimit_rule_shadow_mode_total{rule="nexus.tier"} 2.0' in text
    assert 'nexus_authz_ratelimit_config_reloads_total{outcome="rejected"} 1.0' in text
    assert "nexus_authz_ratelimit_config_error 1.0" in text
