"""Issue 18, with real processes: a second `serve` or `demo` must not take anything from a running one;
/readyz with Redis stopped; the demo keeps the logs it pointed to."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nexus_authz.demo import procs
from tests.helpers import PEPPER, KeySpec, write_config

KEY = KeySpec("ops")
ENV = {**os.environ, "NEXUS_KEY_PEPPER": PEPPER}


def serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "nexus_authz.cli", "serve", "-c", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=ENV,
        )


def check(socket_path: str | Path) -> int:
    """One fast-path check over the Unix socket; the HTTP status."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(socket_path))
        sock.sendall(
            b"GET /ext_authz/v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n\r\n"
            % KEY.secret.encode()
        )
        return int(sock.recv(4096).split()[1])


def inode(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


@pytest.fixture
def first(short_tmp: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[bytes]]]:
    """A running `serve`: (config, socket path, process)."""
    admin = procs.free_port()
    config = write_config(short_tmp, KEY, admin=f"127.0.0.1:{admin}", extra="ledger:\n  backend: none\n")
    proc = serve(config, short_tmp / "first.log")
    try:
        procs.wait_http_ready(f"http://127.0.0.1:{admin}/readyz", timeout=20, process=proc)
        yield config, short_tmp / "authz.sock", proc
    finally:
        procs.stop_process(proc, timeout=15)


# -- item 1: a second serve ----------------------------------------------------------------------------------
@pytest.mark.parametrize("same_admin_port", [False, True])
def test_second_serve_leaves_the_running_socket_alone(
    first: tuple[Path, Path, subprocess.Popen[bytes]], short_tmp: Path, same_admin_port: bool
) -> None:
    config, sock, _ = first
    assert check(sock) == 200
    before = inode(sock)
    if not same_admin_port:  # only the socket is shared: its check must refuse, naming the path
        text = config.read_text()
        other = short_tmp / "second.yaml"
        other.write_text(re.sub(r"admin: 127\.0\.0\.1:\d+", f"admin: 127.0.0.1:{procs.free_port()}", text))
        config = other
    second = subprocess.run(
        [sys.executable, "-m", "nexus_authz.cli", "serve", "-c", str(config)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=30,
    )
    assert second.returncode == 1, second.stderr
    if same_admin_port:
        assert "address already in use" in second.stderr.lower()
    else:
        assert f"another process is serving on {sock}" in second.stderr
    assert "Traceback" not in second.stderr
    assert inode(sock) == before and check(sock) == 200  # the first still answers on its own socket


def test_stale_socket_is_replaced(short_tmp: Path) -> None:
    admin = procs.free_port()
    config = write_config(short_tmp, KEY, admin=f"127.0.0.1:{admin}", extra="ledger:\n  backend: none\n")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(short_tmp / "authz.sock"))  # left behind by a process that is gone
    stale.close()
    assert (short_tmp / "authz.sock").exists()
    proc = serve(config, short_tmp / "n.log")
    try:
        procs.wait_http_ready(f"http://127.0.0.1:{admin}/readyz", timeout=20, process=proc)
        assert check(short_tmp / "authz.sock") == 200
    finally:
        assert procs.stop_process(proc, timeout=15) == 0
    assert not (short_tmp / "authz.sock").exists()  # our own socket is removed on shutdown


def test_shutdown_leaves_a_socket_that_replaced_ours(
    first: tuple[Path, Path, subprocess.Popen[bytes]],
) -> None:
    _, sock, proc = first
    os.rename(sock, sock.with_name("old.sock"))
    newer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        newer.bind(str(sock))
        newer.listen()
        ours = inode(sock)
        assert procs.stop_process(proc, timeout=15) == 0
        assert sock.exists() and inode(sock) == ours
    finally:
        newer.close()


# -- item 7: /readyz with Redis stopped ----------------------------------------------------------------------
@pytest.mark.parametrize("failure_mode", ["fail_open", "fail_closed"])
def test_readyz_with_redis_stopped(short_tmp: Path, failure_mode: str) -> None:
    import json
    import urllib.error
    import urllib.request

    from tests.e2e.test_distributed_e2e import OPEN_LIMITED, one_check, start_nexus
    from tests.stores.conftest import REDIS_SERVER, RedisServer

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    redis = RedisServer(short_tmp / "redis")
    redis.start()
    nexus = None
    try:
        nexus = start_nexus(short_tmp / "n", redis, "exact", failure_mode, timeout="100ms")

        def readyz() -> tuple[int, dict[str, object]]:
            try:
                with urllib.request.urlopen(nexus.admin + "/readyz", timeout=5) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())

        assert readyz() == (200, {"ready": True, "detail": "ok"})
        redis.stop()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the breaker opens on failed calls: make some
            asyncio.run(one_check(nexus.socket, OPEN_LIMITED))
            status, body = readyz()
            if "counter store" in str(body["detail"]):  # (the runtime key store may say so first)
                break
            time.sleep(0.1)
        if failure_mode == "fail_open":  # still serving, on local limits: ready, and says it is degraded
            assert status == 200 and body["ready"] is True, body
            assert "degraded" in str(body["detail"]) and "local limits" in str(body["detail"])
            assert asyncio.run(one_check(nexus.socket, OPEN_LIMITED))[0] == 200
        else:  # every limited check answers 503: not ready
            assert status == 503 and body["ready"] is False and "Redis" in str(body["detail"]), body
    finally:
        if nexus is not None:
            assert nexus.stop() == 0
        redis.stop()


# -- item 2 and 14: the demo ---------------------------------------------------------------------------------
class DemoProc:
    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nexus_authz.cli", "demo", "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ,
        )
        self.lines: list[str] = []

    def wait_started(self, timeout: float = 60) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"demo exited: {self.proc.wait()} {self.proc.stderr.read()}")  # type: ignore[union-attr]
            self.lines.append(line)
            if line.startswith("(metrics:"):
                return
        raise AssertionError(self.lines)

    def stop(self) -> tuple[int | None, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        return self.proc.returncode, out


def _demo(port: int) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "nexus_authz.cli", "demo", "--port", str(port), "--smoke"],
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=60,
    )
    assert time.monotonic() - started < 15, "the demo took its time to say the port is taken"
    return result


def test_second_demo_on_a_busy_port_fails_fast() -> None:
    port = procs.free_port()
    first = DemoProc(port)
    try:
        first.wait_started()
        second = _demo(port)
        assert second.returncode == 1, second.stdout
        assert f"port {port}" in second.stderr and "gateway:" not in second.stdout
    finally:
        first.stop()


def test_demo_on_a_port_held_by_another_program_fails_fast() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = _demo(port)
    assert result.returncode == 1 and f"port {port}" in result.stderr


def test_demo_keeps_the_logs_it_printed() -> None:
    demo = DemoProc(procs.free_port())
    try:
        demo.wait_started()
        match = re.search(r"logs in (\S+);", demo.lines[-1])
        assert match, demo.lines
        logs = Path(match.group(1))
    finally:
        code, out = demo.stop()
    assert code == 0
    try:
        assert logs.is_dir() and {"nexus-authz.log", "envoy.log", "mock-upstream.log"} <= {
            p.name for p in logs.iterdir()
        }
        assert "nexus-authz serving" in (logs / "nexus-authz.log").read_text()
        assert {p.suffix for p in logs.iterdir()} == {".log"}  # the key file and credential are gone
        assert f"logs kept in {logs}" in out
    finally:
        import shutil

        shutil.rmtree(logs, ignore_errors=True)


@pytest.mark.parametrize(
    "name", ["envoy.yaml", "envoy-extproc.yaml", "envoy-grpc.yaml", "envoy-ratelimit.yaml"]
)
def test_shipped_envoy_configs_do_not_share_their_port(name: str, short_tmp: Path) -> None:
    """Two Envoys on one shipped config and port: the second fails at start-up instead of splitting the
    first one's connections (enable_reuse_port: false)."""
    from nexus_authz.render import envoy as envoy_config

    port = procs.free_port()
    envoys = []
    try:
        for i in range(2):
            admin = procs.free_port()
            rendered = envoy_config.render(envoy_config.ENVOY_DIR / name, listen_port=port, admin_port=admin)
            log = short_tmp / f"envoy{i}.log"
            proc = procs.start_envoy(rendered, admin_port=admin, workdir=short_tmp / f"e{i}", log_path=log)
            envoys.append(proc)
            if i == 0:
                procs.wait_envoy_ready(admin, timeout=30, process=proc, log_path=log)
        assert envoys[1].wait(timeout=15) != 0
        assert "address already in use" in (short_tmp / "envoy1.log").read_text().lower()
        assert envoys[0].poll() is None
    finally:
        for proc in envoys:
            procs.stop_process(proc)
