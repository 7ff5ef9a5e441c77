"""Fixtures for the store tests: a real `redis-server` on a free port, and Redis stores for the contract.

`redis_server` (session scope) is shared by every Redis test; each store gets its own key prefix, so
tests never see each other's counters. `RedisServer` can also be started privately (function scope, via
`redis_server_factory`) for the tests that kill and restart it. Debian's redis-server is installed by
`.ci/setup`; without it the Redis tests are skipped, not failed, on a developer machine.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from nexus_authz.core.limits import AcquireResult, LimitSpec, WindowStatus
from nexus_authz.stores.redis import (
    BatchedRedisStore,
    ExactRedisStore,
    RedisSettings,
    make_client,
)

REDIS_SERVER = shutil.which("redis-server")
SETPRIV = shutil.which("setpriv")
_prefixes = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process: no persistence, loopback only. `kill()` is SIGKILL (a crash)."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> None:
        assert REDIS_SERVER is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        # Dies with the test process (a killed pytest leaves no redis-server): setpriv sets the parent-
        # death signal and execs redis-server. Not a preexec_fn: forking with a Python callback while
        # gRPC's threads run can fail in the child before exec (seen: redis-server never started).
        wrapper = [SETPRIV, "--pdeathsig", "TERM"] if SETPRIV else []
        self.proc = subprocess.Popen(
            [
                *wrapper,
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.directory / "redis.log"
                raise RuntimeError(
                    f"redis-server exited ({self.proc.returncode}): "
                    f"{(log.read_text() if log.exists() else '(no log)')[-2000:]}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start in 10 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (.ci/setup installs it)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Private servers for tests that kill and restart Redis (stopped at the end of the test)."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (.ci/setup installs it)")
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(servers)}")
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


def unique_prefix(tag: str = "t") -> str:
    return f"test:{os.getpid()}:{tag}{next(_prefixes)}:"


def redis_settings(server: RedisServer, **overrides: Any) -> RedisSettings:
    values: dict[str, Any] = {"url": server.url, "key_prefix": unique_prefix(), "timeout": 0.5}
    values.update(overrides)
    return RedisSettings(**values)


def open_store(settings: RedisSettings, **kwargs: Any) -> ExactRedisStore | BatchedRedisStore:
    cls = BatchedRedisStore if settings.mode == "batched" else ExactRedisStore
    return cls(settings, client=make_client(settings), **kwargs)


# -- the contract suite is synchronous: run a Redis store on a loop of its own ------------------------------


@pytest.fixture(scope="session")
def store_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


class SyncRedisStore:
    """The CounterStore protocol over an async Redis store (each call runs the loop until it is done)."""

    def __init__(self, store: ExactRedisStore | BatchedRedisStore, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop
        loop.run_until_complete(store.start())

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)  # StoreUnavailable propagates

    def acquire(
        self, counter_ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
    ) -> AcquireResult:
        return self._run(self.store.acquire(counter_ids, specs, costs, now))  # type: ignore[no-any-return]

    def adjust(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        deltas: Sequence[int],
        now: float,
        charged_at: float | None = None,
    ) -> None:
        self._run(self.store.adjust(counter_ids, specs, deltas, now, charged_at))

    def peek(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        now: float,
        costs: Sequence[int] | None = None,
    ) -> tuple[WindowStatus, ...]:
        return self._run(self.store.peek(counter_ids, specs, now, costs))  # type: ignore[no-any-return]

    def __len__(self) -> int:
        return int(self._run(self.store.counters()))

    def __contains__(self, counter_id: object) -> bool:
        return True  # may hold state in Redis: the port allows the safe answer

    def sweep(self, now: float, max_items: int | None = None) -> int:
        return self.store.sweep(now, max_items)

    def stats(self) -> dict[str, int]:
        return self.store.stats()

    def close(self) -> None:
        self.loop.run_until_complete(self.store.close())


@pytest.fixture
def redis_contract_store(
    request: pytest.FixtureRequest, redis_server: RedisServer, store_loop: asyncio.AbstractEventLoop
) -> Callable[[str], SyncRedisStore]:
    """`make("exact")` / `make("batched")`: a fresh store (own key prefix), closed after the test.

    Batched flushes every 5 ms here, so the contract also runs through the write-behind round trips."""

    def make(mode: str) -> SyncRedisStore:
        settings = redis_settings(redis_server, mode=mode, flush_interval=0.005)
        sync = SyncRedisStore(open_store(settings), store_loop)
        request.addfinalizer(sync.close)
        return sync

    return make
