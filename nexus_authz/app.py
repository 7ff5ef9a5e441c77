"""The composition root: everything the server runs with is built here, once, from `Settings`.

- `build_engine`: the secrets (through settings.py, the only reader of the environment and secret
  files), the counter store (in memory, or Redis in distributed mode), the usage ledger, and the
  `Engine` that receives them, with its first key snapshot;
- `validate`: every start-up check that needs more than the config file (the rate limit service's
  config directory, the admin token, the Redis password), building what it checks;
- `revocation_channel`, `grpc_server` (Envoy's services) and `start_api_server` (the policy API),
  both gRPC servers with grpc.health.v1 and reflection set up by one helper, `add_health`.

`server.py` runs what is built here (the listeners' lifecycle, readiness, reloads, the drain); tests,
benchmarks and the CLI's `check-config` build the same things through the same functions, so every
entry point gets the same wiring.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nexus_authz._gen.nexus.authz.v1 import policy_pb2_grpc
from nexus_authz.adapters import envoy_als, envoy_authz, envoy_extproc, envoy_rls, key_admin, policy_api
from nexus_authz.core.errors import ConfigError
from nexus_authz.engine import Engine
from nexus_authz.runtime_keys import RuntimeKeys
from nexus_authz.settings import (
    Settings,
    redis_password,
    resolve_admin_token,
    resolve_credentials,
    resolve_path,
    resolve_pepper,
)
from nexus_authz.stores.ledger import Ledger, MemoryLedger, SQLiteLedger
from nexus_authz.stores.memory import MemoryCounterStore
from nexus_authz.stores.redis import RedisSettings, RedisStore, make_client, open_redis_store
from nexus_authz.stores.redis.revocations import RevocationChannel

__all__ = [
    "GRPC_SERVICES",
    "ApiServer",
    "GrpcServer",
    "StartupError",
    "Validated",
    "add_health",
    "build_engine",
    "grpc_server",
    "max_grpc_message",
    "make_ledger",
    "open_counter_store",
    "revocation_channel",
    "runtime_keys",
    "start_api_server",
    "validate",
]

GRPC_SERVICES = (envoy_authz.SERVICE, envoy_extproc.SERVICE, envoy_als.SERVICE)
_HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class StartupError(Exception):
    """A listener could not be opened (address in use, permission denied...)."""


# -- the engine and its stores ---------------------------------------------------------------------------
def make_ledger(settings: Settings, clock: Callable[[], float]) -> Ledger | None:
    ls = settings.ledger
    if ls.backend == "none":
        return None
    if ls.backend == "memory":
        return MemoryLedger(clock=clock)
    return SQLiteLedger(
        resolve_path(settings, ls.path),
        flush_interval=ls.flush_interval,
        batch_size=ls.batch_size,
        max_pending=ls.max_pending,
        clock=clock,
    )


def open_counter_store(settings: Settings) -> RedisStore | None:
    """The shared Redis counter store of distributed mode (not started), or None: counters in memory."""
    rs = settings.counters.redis
    if settings.counters.backend != "redis" or rs is None:
        return None
    return open_redis_store(
        rs,
        password=redis_password(rs, base_dir=settings.base_dir),
        base_dir=settings.base_dir,
        gauge_ttl=settings.policy.reservations.ttl + 30,
        name="counters",
    )


def build_engine(settings: Settings, *, clock: Callable[[], float] = time.time) -> Engine:
    """The engine with its stores, ledger and first key snapshot; ConfigError if anything is wrong."""
    if settings.test_clock_file and clock is time.time:
        clock = test_clock(settings.test_clock_file)
    pepper = resolve_pepper(settings)
    credentials = resolve_credentials(settings)
    remote = open_counter_store(settings)
    engine = Engine(
        settings,
        pepper=pepper,
        credentials=credentials,
        counters=remote if remote is not None else MemoryCounterStore(),
        remote=remote,
        ledger=make_ledger(settings, clock),
        clock=clock,
    )
    engine.load_first_keys()
    return engine


def test_clock(path: str) -> Callable[[], float]:
    """NEXUS_TEST_CLOCK_FILE: the wall clock shifted by the seconds in `path`, for end-to-end tests."""
    from nexus_authz.testclock import FileClock

    logging.getLogger("nexus_authz").warning("test clock in use (NEXUS_TEST_CLOCK_FILE): for tests only")
    return FileClock(path)


# -- start-up validation ------------------------------------------------------------------------------------
@dataclass
class Validated:
    """What start-up validation built from the configuration, for `Server.start` to use."""

    ratelimit: envoy_rls.RateLimitService | None = None
    admin_token: str | None = None


def validate(settings: Settings, engine: Engine) -> Validated:
    """Every check of the configuration that `serve` makes before it opens anything; `check-config` runs
    exactly this (after `Engine.from_settings`), so both accept and refuse the same files. Reads files
    (the rate limit service's config directory, secret files) but opens no socket and no connection.
    Raises ConfigError."""
    out = Validated()
    if settings.ratelimit.enabled:  # Envoy's RateLimitService (issue 7), on the gRPC listener
        if not settings.grpc:
            raise ConfigError(
                "ratelimit needs listen.grpc (Envoy's ratelimit filter speaks gRPC)",
                source=settings.config_path,
                field="listen.grpc",
            )
        out.ratelimit = envoy_rls.RateLimitService.from_settings(
            settings.ratelimit,
            engine.decider,
            clock=engine.clock,
            identity=envoy_rls.engine_identity(engine),
            families=envoy_rls.engine_header_families(engine),
        )
    if settings.api:
        out.admin_token = resolve_admin_token(settings)
    rs = settings.counters.redis
    if rs is not None:
        redis_password(rs, base_dir=settings.base_dir)  # the revocation channel's client needs it too
    return out


def revocation_channel(settings: Settings, engine: Engine) -> RevocationChannel:
    """Revocations published through Redis reach this replica within a second (issue 5); not started."""
    rs = settings.counters.redis
    assert rs is not None
    return RevocationChannel(_side_client(settings, rs), key_prefix=rs.key_prefix, on_revoked=engine.revoke)


def _side_client(settings: Settings, rs: RedisSettings) -> Any:
    """A Redis client of its own (the revocation channel's, the runtime key store's), on the counters'
    connection settings; a bad setting is a StartupError."""
    try:
        return make_client(
            rs, password=redis_password(rs, base_dir=settings.base_dir), base_dir=settings.base_dir
        )
    except ConfigError as exc:
        raise StartupError(str(exc)) from None


def runtime_keys(settings: Settings, engine: Engine) -> RuntimeKeys | None:
    """The runtime key store (issue 17), not started: Redis in distributed mode, else SQLite beside the
    ledger; None with `keys.runtime: none`."""
    kind = settings.runtime_keys
    rs = settings.counters.redis
    if kind == "none":
        return None
    if kind == "redis" or (kind == "auto" and rs is not None):
        from nexus_authz.stores.keys.redis import RedisKeyStore

        assert rs is not None
        store = RedisKeyStore(_side_client(settings, rs), key_prefix=rs.key_prefix)
        runtime = RuntimeKeys(engine, store, poll_interval=5.0, clock=engine.clock)
        store.on_change = runtime.notify
        return runtime
    from nexus_authz.stores.keys.sqlite import SQLiteKeyStore

    store_path = resolve_path(settings, settings.runtime_keys_path)
    return RuntimeKeys(engine, SQLiteKeyStore(store_path), poll_interval=1.0, clock=engine.clock)


# -- the gRPC servers ---------------------------------------------------------------------------------------
def add_health(server: grpc.aio.Server, services: Iterable[str]) -> health.HealthServicer:
    """grpc.health.v1 and server reflection for `services` (and themselves): one setup for both gRPC
    servers. Health needs no token on either: it reveals no state."""
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection((*services, _HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    return servicer


def _listen(server: grpc.aio.Server, address: str, what: str) -> int:
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen for {what} on {address}: {exc}") from None
    if port == 0 and not address.startswith("unix:"):
        raise StartupError(f"cannot listen for {what} on {address}")
    return port


@dataclass
class GrpcServer:
    """Envoy's gRPC services on `listen.grpc`, bound (not started)."""

    server: grpc.aio.Server
    health: health.HealthServicer
    services: tuple[str, ...]
    port: int
    als: envoy_als.AccessLogService


def max_grpc_message(settings: Settings) -> int:
    """The largest gRPC message taken, on the gRPC port and on the check socket's HTTP/2: an ext_authz
    CheckRequest with the largest body read, or an access-log batch."""
    return max(settings.max_body_bytes + 64 * 1024, envoy_als.MAX_MESSAGE_BYTES)


def grpc_server(
    settings: Settings,
    engine: Engine,
    address: str,
    *,
    ratelimit: envoy_rls.RateLimitService | None = None,
    als: envoy_als.AccessLogService | None = None,
) -> GrpcServer:
    """Envoy's Authorization, ExternalProcessor, AccessLogService (and RateLimitService when
    configured) on one grpc.aio server bound to `address`. StartupError if it cannot listen."""
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            # ext_authz bodies, and the access-log batches of token accounting (envoy_als)
            ("grpc.max_receive_message_length", max_grpc_message(settings)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
    )
    if als is None:  # the server's, shared with the HTTP listeners' access-log receiver (als_h2)
        als = envoy_als.AccessLogService(engine)
    handlers: list[grpc.GenericRpcHandler] = [
        envoy_authz.AuthorizationService(engine).handler(),
        envoy_extproc.ExternalProcessorService(engine).handler(),
        als.handler(),
        envoy_authz.release_handler(engine),
    ]
    services: Sequence[str] = GRPC_SERVICES
    if ratelimit is not None:
        handlers.append(ratelimit.handler())
        services = (*GRPC_SERVICES, envoy_rls.SERVICE)
    server.add_generic_rpc_handlers(tuple(handlers))
    servicer = add_health(server, services)
    port = _listen(server, address, "gRPC")
    return GrpcServer(server, servicer, tuple(services), port, als)


@dataclass
class ApiServer:
    """The running policy API listener: its grpc.aio server, health servicer and bound address."""

    server: grpc.aio.Server
    health: health.HealthServicer
    servicer: policy_api.PolicyApi
    address: str

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.health.set("", status)
        self.health.set(policy_api.SERVICE, status)

    async def stop(self, grace: float | None) -> None:
        self.set_serving(False)
        await self.server.stop(grace)


async def start_api_server(
    engine: Engine,
    address: str,
    admin_token: str,
    *,
    calls: MutableMapping[tuple[str, str], int] | None = None,
) -> ApiServer:
    """The policy API on `address` (host:port, port 0 picks one; or unix:/path), started and serving.
    StartupError if it cannot listen."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    servicer = policy_api.PolicyApi(engine, admin_token, calls=calls)
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, server)
    key_admin.add_to_server(server, servicer)  # runtime keys (issue 17), same token
    health_servicer = add_health(server, (policy_api.SERVICE, key_admin.SERVICE))
    port = _listen(server, address, "the policy API")
    bound = address
    if not address.startswith("unix:"):
        host = address.rpartition(":")[0]
        bound = f"{host}:{port}"
    await server.start()
    api = ApiServer(server=server, health=health_servicer, servicer=servicer, address=bound)
    api.set_serving(True)
    return api
