"""The run loop: starts what the composition root (`nexus_authz.app`) builds, on one uvloop loop, and
drains it on SIGTERM.

Listeners (all on one event loop, all calling the same engine):
  - the HTTP fast path (Envoy http_service / nginx auth_request) on a Unix socket and optionally TCP;
  - the operations endpoints (/healthz, /readyz, /metrics) on the admin TCP address, and nothing else
    there: an allowed check carries the provider credential, so only the proxy's listeners (the fast
    path, gRPC) answer checks, and a warning is logged when one of those is not private;
  - grpc.aio: Envoy's Authorization service, grpc.health.v1 and server reflection;
  - the policy query API (its own grpc.aio server on `listen.api`, with health and reflection), started
    only when an admin token is configured.
gRPC health follows readiness, per service, within a second of it changing.
Shutdown (SIGTERM or SIGINT): readiness goes false and gRPC health NOT_SERVING, listeners stop accepting,
in-flight requests finish (up to `server.shutdown_grace`), keep-alive connections are closed (one
carrying a request after answering it, with `connection: close`), the ledger flushes, and the process
exits 0. SIGHUP makes the next poll (`keys.reload_interval`, 1 s by default) reload the config file and
the key file even when they look unchanged (the config's policy sections, key file and pepper take
effect; a changed listener or store setting is logged by name and needs a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import math
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2

from nexus_authz import app, native
from nexus_authz.adapters import envoy_als, envoy_authz, envoy_rls, h2_listener, http_authz
from nexus_authz.app import GRPC_SERVICES, StartupError, Validated, validate
from nexus_authz.core.errors import ConfigError
from nexus_authz.engine import Engine
from nexus_authz.gcupkeep import SETTLE_EVERY
from nexus_authz.latency import LOOP_BUSY, Slice, sliced
from nexus_authz.metrics import RlsCollector, make_registry, render_sliced
from nexus_authz.runtime_keys import RuntimeKeys
from nexus_authz.settings import Settings
from nexus_authz.stores.redis.revocations import RevocationChannel
from nexus_authz.unixsock import UnixSocketError, identity, unlink_if_ours

__all__ = [
    "GRPC_SERVICES",
    "Server",
    "StartupError",
    "Validated",
    "private_address",
    "run",
    "serve",
    "validate",
]

log = logging.getLogger("nexus_authz.server")

# On SIGTERM an HTTP connection that has carried no request for this long is closed (one that does is
# closed by the answer); a request a peer sends at that very moment is lost: stop the proxy first.
HTTP_DRAIN_IDLE = 0.5


def private_address(address: str) -> bool:
    """A Unix socket or a loopback address: where the listeners that answer checks belong (issue 13.1)."""
    if address.startswith(("unix:", "/")):
        return True
    host = address.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass
class Server:
    settings: Settings
    engine: Engine
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    grpc_server: grpc.aio.Server | None = None
    health: health.HealthServicer | None = None
    apps: list[http_authz.HttpApp] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    draining: bool = False
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    addresses: dict[str, str] = field(default_factory=dict)
    grpc_port: int = 0
    revocations: RevocationChannel | None = None
    runtime: RuntimeKeys | None = None  # keys managed at runtime (issue 17)
    api: app.ApiServer | None = None
    api_calls: dict[tuple[str, str], int] = field(default_factory=dict)
    serving: bool | None = None
    ratelimit: envoy_rls.RateLimitService | None = None
    als: envoy_als.AccessLogService | None = None
    h2: h2_listener.H2Receiver | None = None
    validated: Validated | None = None  # from validate(); start() runs it when not given
    socket_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we bound

    @property
    def grpc_services(self) -> tuple[str, ...]:
        return (*GRPC_SERVICES, envoy_rls.SERVICE) if self.ratelimit is not None else GRPC_SERVICES

    # -- readiness --------------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.engine.key_status().loaded:
            return False, "no key snapshot loaded"
        for what, kept, source in self.engine.sources():
            if source.last_error:
                # Still serving the last good version, but the file on disk is broken: say so.
                return False, f"{what} rejected; serving the previous {kept}"
        runtime_detail = None
        if self.runtime is not None:
            state, runtime_detail = self.runtime.state()
            if state == "loading":  # a replica that does not know the runtime keys would refuse them
                return False, runtime_detail
            runtime_detail = runtime_detail if state == "degraded" else None
        remote = self.engine.remote
        if remote is not None:
            health = remote.health()
            if not health.ready:  # fail_closed: every limited check answers 503, so take no traffic
                return False, f"counter store (Redis) {health.state}"
            if health.state == "degraded":
                # fail_open: this replica still decides, with local limits, which is what fail_open asks
                # for; turning unready would take every replica out at once for a shared Redis outage.
                detail = "degraded: counter store (Redis) unreachable, deciding with local limits"
                if runtime_detail:
                    detail += "; " + runtime_detail.removeprefix("degraded: ")
                return True, detail
        return True, runtime_detail or "ok"

    # -- start ------------------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        engine = self.engine
        if self.validated is None:
            try:
                self.validated = validate(s, engine)
            except ConfigError as exc:
                raise StartupError(str(exc)) from None
        if engine.ledger is not None:
            try:
                await engine.ledger.start()
            except Exception as exc:
                raise StartupError(f"cannot open the usage ledger: {exc}") from None
        if engine.remote is not None:
            await engine.remote.start()  # connects lazily: an unreachable Redis is a state, not a crash
            self.revocations = app.revocation_channel(s, engine)
            await self.revocations.start()
        self.runtime = app.runtime_keys(s, engine)
        if self.runtime is not None:
            engine.runtime = self.runtime
            await self.runtime.start()
        registry = make_registry(engine, ready=self.readiness, api_calls=self.api_calls)
        native.announce()  # one log line: the compiled fast path or the pure-Python one
        fast = http_authz.HttpApp(engine, max_header_bytes=s.max_header_bytes, max_body=s.max_body_bytes)
        # token accounting's access log: on the gRPC port, and on the check listeners over HTTP/2 (the
        # shipped envoy.yaml sends it there: no gRPC threads per batch), one service for both
        self.als = envoy_als.AccessLogService(engine)
        self.h2 = h2_listener.H2Receiver(
            self.als,
            engine,
            envoy_authz.AuthorizationService(engine),  # gRPC ext_authz on the check listener too
            max_check_bytes=app.max_grpc_message(s),
        )
        fast.h2 = self.h2.factory(fast.protocol)
        self.apps.append(fast)
        try:
            # TCP ports first: a second `serve` on the same ports fails before it goes near the socket path
            if s.http_tcp:
                self.servers.append(await http_authz.serve_tcp(fast, s.http_tcp.host, s.http_tcp.port))
                self.addresses["http_tcp"] = str(s.http_tcp)
            if s.admin:
                admin = http_authz.HttpApp(
                    engine,
                    max_header_bytes=s.max_header_bytes,
                    max_body=0,
                    admin=True,
                    readiness=self.readiness,
                    metrics_text=lambda: render_sliced(registry),
                )
                self.apps.append(admin)
                self.servers.append(await http_authz.serve_tcp(admin, s.admin.host, s.admin.port))
                self.addresses["admin"] = str(s.admin)
            if s.http_socket:
                self.servers.append(await http_authz.serve_unix(fast, s.http_socket, s.http_socket_mode))
                self.socket_id = identity(s.http_socket)
                self.addresses["http_socket"] = s.http_socket
        except UnixSocketError as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"cannot open a listener: {exc.strerror or exc}") from None
        if self.validated.ratelimit is not None:
            self.ratelimit = self.validated.ratelimit
            registry.register(RlsCollector(self.ratelimit))  # its statistics, read at scrape time
            reload = self.ratelimit.source.run(s.ratelimit.reload_interval)
            self.tasks.append(asyncio.create_task(reload, name="ratelimit-reload"))
        if s.grpc:
            await self._start_grpc(s.grpc)
        for name, address in (("listen.http_tcp", s.http_tcp and str(s.http_tcp)), ("listen.grpc", s.grpc)):
            if address and not private_address(address):
                log.warning(
                    "this listener answers policy checks with the provider credential: keep it on loopback "
                    "or a Unix socket, reachable by the proxy only (SECURITY.md)",
                    extra={"listener": name, "address": address},
                )
        if s.api:
            await self._start_api(s.api)
        self.tasks.append(asyncio.create_task(self._health_loop(), name="health"))
        self.tasks.append(asyncio.create_task(self._reload_loop(), name="key-reload"))
        self.tasks.append(asyncio.create_task(self._idle_loop(), name="idle-sweep"))
        self.tasks.append(asyncio.create_task(self._maintenance_loop(), name="maintenance"))
        self.tasks.append(asyncio.create_task(self._collector_loop(), name="collector"))

    async def _start_grpc(self, address: str) -> None:
        built = app.grpc_server(self.settings, self.engine, address, ratelimit=self.ratelimit, als=self.als)
        self.als, self.health, self.grpc_port = built.als, built.health, built.port
        await built.server.start()
        self.grpc_server = built.server
        self.addresses["grpc"] = address
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def _start_api(self, address: str) -> None:
        assert self.validated is not None
        token = self.validated.admin_token
        if token is None:
            log.info(
                "policy API disabled: no admin token (set NEXUS_ADMIN_TOKEN or api.admin_token)",
                extra={"listen": address},
            )
            return
        self.api = await app.start_api_server(self.engine, address, token, calls=self.api_calls)
        self.addresses["api"] = self.api.address

    def _set_health(self, status: int) -> None:
        ready = status == health_pb2.HealthCheckResponse.SERVING
        self.serving = ready
        if self.api is not None:
            self.api.set_serving(ready)
        if self.health is None:
            return
        self.health.set("", status)
        for name in self.grpc_services:
            self.health.set(name, status if ready else health_pb2.HealthCheckResponse.NOT_SERVING)

    # -- background ---------------------------------------------------------------------------------
    async def _health_loop(self) -> None:
        """gRPC health follows readiness (key snapshot in force, file accepted, not draining)."""
        while True:
            await asyncio.sleep(1.0)
            ready = self.readiness()[0]
            if ready != self.serving and not self.draining:
                self._set_health(
                    health_pb2.HealthCheckResponse.SERVING
                    if ready
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )

    async def _reload_loop(self) -> None:
        interval = self.settings.reload_interval
        while True:
            await asyncio.sleep(interval)
            await self.engine.reload_off_loop()

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await sliced(_maintenance_steps(self.engine), "maintenance")
            except Exception:
                log.exception("maintenance failed")

    async def _collector_loop(self) -> None:
        """gcupkeep's look, every SETTLE_EVERY seconds: each freeze then walks a quarter second's new
        clients, not a second's (a loop slice of the "maintenance" source)."""
        while True:
            await asyncio.sleep(SETTLE_EVERY)
            timer = Slice("maintenance")
            try:
                self.engine.collector_upkeep()
            except Exception:
                log.exception("collector upkeep failed")
            timer.end()

    async def _idle_loop(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.settings.idle_timeout
        while True:
            await asyncio.sleep(min(30.0, timeout / 2))
            for http_app in self.apps:
                http_authz.close_idle(http_app, timeout, loop.time())

    # -- stop -------------------------------------------------------------------------------------------
    async def drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        grace = self.settings.shutdown_grace
        log.info("draining", extra={"grace_seconds": grace})
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        for srv in self.servers:
            srv.close()
        # HTTP keep-alive connections: requests already sent are answered (with `connection: close`),
        # idle connections closed; meanwhile the gRPC side and the ledger drain.
        http = asyncio.create_task(http_authz.drain(self.apps, idle=HTTP_DRAIN_IDLE, grace=grace))
        for task in self.tasks:
            task.cancel()
        if self.als is not None:  # token accounting's last access-log batches, while gRPC still accepts
            await self.als.drain(grace)
        if self.h2 is not None:  # the access log's HTTP/2 connections: GOAWAY, once their streams ended
            self.h2.close()
        stops = []
        if self.grpc_server is not None:
            stops.append(self.grpc_server.stop(grace))
        if self.api is not None:
            stops.append(self.api.stop(grace))
        loop = asyncio.get_running_loop()
        started = loop.time()
        if stops:
            await asyncio.gather(*stops, return_exceptions=True)
        grpc_done = loop.time()
        if self.engine.ledger is not None:
            # After the gRPC drain: the last responses' usage has been accounted. Nothing is lost.
            await self.engine.ledger.close()
        if self.revocations is not None:
            await self.revocations.close()
        if self.runtime is not None:
            await self.runtime.close()
        if self.engine.remote is not None:
            await self.engine.remote.close()  # flushes queued counter changes to Redis
        ledger_done = loop.time()
        await http
        for srv in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), timeout=grace)
        log.debug(
            "drained",
            extra={
                "grpc_seconds": round(grpc_done - started, 3),
                "ledger_seconds": round(ledger_done - grpc_done, 3),
                "listeners_seconds": round(loop.time() - ledger_done, 3),
            },
        )
        self._unlink_socket()
        self.stopped.set()

    def _unlink_socket(self) -> None:
        """Remove our socket file, but never one that has replaced it since (another server's)."""
        if self.settings.http_socket:
            with contextlib.suppress(OSError):
                unlink_if_ours(self.settings.http_socket, self.socket_id)
            self.socket_id = None

    def abort(self) -> None:
        """After a failed start: close what was opened, so a refused `serve` leaves nothing behind."""
        for srv in self.servers:
            srv.close()
        self._unlink_socket()


MAINTAIN_IDS = 10_000  # at most, ids of each counter store swept per second
MAINTAIN_STEP = 20  # ids per step of it (~0.5-1 µs each), and a tenth as many reservations expired at most
# Seconds one walk over a counter store may take: a drained window of an idle key is dropped within about
# this long (the hot path drops a few too). 30,000 windows (10,000 active keys) are 1,000 ids a second,
# ~0.7 ms of CPU, where walking them every 3 s (MAINTAIN_IDS a second) cost ~7 ms a second.
SWEEP_EVERY = 30.0


def _maintenance_steps(engine: Engine, ids: int | None = None) -> Iterator[None]:
    """Engine.maintain's upkeep of one second in steps (`latency.sliced` runs them a slice of the loop at
    a time; in one call it held the loop ~5-10 ms with 10,000 keys): every reservation due expired, and
    the next `ids` ids of the counter stores looked at (default: a walk every SWEEP_EVERY seconds, at
    least a step's and at most MAINTAIN_IDS a second)."""
    n = max(len(engine.counters), len(engine.failures))
    todo = min(n, MAINTAIN_IDS, max(MAINTAIN_STEP, math.ceil(n / SWEEP_EVERY))) if ids is None else ids
    while True:
        more = engine.maintain(MAINTAIN_STEP, MAINTAIN_STEP // 10)
        todo -= MAINTAIN_STEP
        yield None
        if todo <= 0 and not more:
            return


async def serve(settings: Settings, engine: Engine, validated: Validated | None = None) -> int:
    loop = asyncio.get_running_loop()
    server = Server(settings, engine, validated=validated)
    stop = asyncio.Event()
    # Before the listeners open: a SIGTERM while they do is a graceful stop right after, not a kill.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, engine.request_reload)  # picked up by the next poll
    try:
        await server.start()
    except BaseException:
        server.abort()
        raise
    status = engine.key_status()
    log.info(
        "nexus-authz serving",
        extra={**server.addresses, "keys": status.keys, "keys_version": status.version, "pid": os.getpid()},
    )
    LOOP_BUSY.measure_cpu(settings.loop_cpu_time)  # nexus_authz_loop_busy_cpu_seconds, when set
    gc.callbacks.append(LOOP_BUSY.gc_callback)  # every collection's pause: nexus_authz_loop_busy_seconds
    try:
        await stop.wait()
    finally:
        gc.callbacks.remove(LOOP_BUSY.gc_callback)
    await server.drain()
    log.info("stopped")
    return 0


def run(settings: Settings, engine: Engine, validated: Validated | None = None) -> int:
    import uvloop

    return uvloop.run(serve(settings, engine, validated))
