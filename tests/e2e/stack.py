"""A real stack for end-to-end tests: mock upstream (thread) + nexus-authz (process) + Envoy (process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from nexus_authz.demo import mock_upstream, procs
from nexus_authz.render import envoy as envoy_config
from tests.helpers import PEPPER, KeySpec, write_config

REPO = Path(__file__).resolve().parents[2]
ENVOY_HTTP = REPO / "envoy" / "envoy.yaml"
ENVOY_GRPC = REPO / "envoy" / "envoy-grpc.yaml"
ENVOY_EXTPROC = REPO / "envoy" / "envoy-extproc.yaml"  # HTTP ext_authz + accounting over ext_proc


@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.body)


def http(
    method: str,
    url: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10,
) -> HttpResult:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return HttpResult(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as err:
        return HttpResult(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


@dataclass
class Stack:
    workdir: Path
    # "http" (ext_authz http_service over the Unix socket), "grpc" (gRPC ext_authz on the same socket's
    # HTTP/2, as envoy-grpc.yaml ships) or "grpc-port" (gRPC ext_authz on the gRPC port, grpc.aio)
    mode: str = "http"
    # token accounting: "als" (Lua usage tap + gRPC access log, the default configs) or "extproc"
    # (envoy-extproc.yaml; HTTP mode only)
    accounting: str = "als"
    # HTTP mode: the access log to the check socket (envoy.yaml, als_h2) or, False, to the gRPC port
    als_on_socket: bool = True
    keys: tuple[KeySpec, ...] = ()
    extra_config: str = ""
    envoy_template: Path | None = None
    envoy_render: dict[str, object] = field(default_factory=dict)
    mock_options: dict[str, object] = field(default_factory=dict)  # MockOptions fields
    mock: mock_upstream.MockUpstreamThread | None = None
    nexus: subprocess.Popen[bytes] | None = None
    envoy: subprocess.Popen[bytes] | None = None
    gateway: str = ""
    admin: str = ""
    grpc_port: int = 0
    config_path: Path | None = None

    @property
    def socket(self) -> Path:
        return self.workdir / "authz.sock"

    def start(self) -> Stack:
        self.mock = mock_upstream.start_in_thread(**{"always_usage": False, **self.mock_options})
        self.start_nexus()
        self.start_envoy()
        return self

    def start_nexus(self) -> None:
        admin_port = procs.free_port()
        self.grpc_port = procs.free_port()
        self.config_path = write_config(
            self.workdir,
            *self.keys,
            extra=self.extra_config,
            socket=str(self.socket),
            grpc=f"127.0.0.1:{self.grpc_port}",
            admin=f"127.0.0.1:{admin_port}",
        )
        self.admin = f"http://127.0.0.1:{admin_port}"
        log = open(self.workdir / "nexus.log", "ab")  # noqa: SIM115
        env = {**os.environ, "NEXUS_KEY_PEPPER": PEPPER}
        self.nexus = subprocess.Popen(
            [sys.executable, "-m", "nexus_authz.cli", "serve", "-c", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        procs.wait_http_ready(f"{self.admin}/readyz", timeout=20)

    def start_envoy(self) -> None:
        assert self.mock is not None
        if self.envoy_template is not None:
            template = self.envoy_template
        elif self.accounting == "extproc":
            assert self.mode == "http", "the ext_proc variant ships for HTTP ext_authz only"
            template = ENVOY_EXTPROC
        else:
            template = ENVOY_HTTP if self.mode == "http" else ENVOY_GRPC
        # A port free_port() found can be taken by another process before Envoy binds it (the shipped
        # configs refuse to share a port): Envoy then exits, and a second pair of ports is tried.
        for attempt in range(3):
            port, admin_port = procs.free_port(), procs.free_port()
            try:
                self._start_envoy_on(template, port, admin_port)
                break
            except procs.ProcessError:
                if self.envoy is not None and self.envoy.poll() is None or attempt == 2:
                    raise
        self.gateway = f"http://127.0.0.1:{port}"

    def _start_envoy_on(self, template: Path, port: int, admin_port: int) -> None:
        assert self.mock is not None
        addresses: dict[str, object] = {"upstream": f"127.0.0.1:{self.mock.port}"}
        clusters = {c.get("name") for c in envoy_config.load(template)["static_resources"]["clusters"]}
        if envoy_config.EXTPROC_CLUSTER in clusters:
            addresses["extproc"] = f"127.0.0.1:{self.grpc_port}"
        if envoy_config.ALS_CLUSTER in clusters:  # the check socket, as the shipped configs (als_h2)
            on_socket = self.mode == "grpc" or (self.mode == "http" and self.als_on_socket)
            addresses["als"] = str(self.socket) if on_socket else f"127.0.0.1:{self.grpc_port}"
        if self.mode == "http":
            addresses["authz_socket"] = str(self.socket)
        elif self.mode == "grpc":
            addresses["authz_grpc"] = str(self.socket)
        else:
            addresses["authz_grpc"] = f"127.0.0.1:{self.grpc_port}"
        rendered = envoy_config.render(
            template,
            listen_port=port,
            admin_port=admin_port,
            **addresses,
            **self.envoy_render,  # type: ignore[arg-type]
        )
        self.envoy = procs.start_envoy(
            rendered, admin_port=admin_port, workdir=self.workdir, log_path=self.workdir / "envoy.log"
        )
        log_path = self.workdir / "envoy.log"
        procs.wait_envoy_ready(admin_port, timeout=30, process=self.envoy, log_path=log_path)

    def stop_nexus(self) -> int | None:
        if self.nexus is None:
            return None
        code = procs.stop_process(self.nexus, timeout=15)
        self.nexus = None
        return code

    def stop(self) -> None:
        if self.envoy is not None:
            procs.stop_process(self.envoy, timeout=10)
            self.envoy = None
        self.stop_nexus()
        if self.mock is not None:
            self.mock.stop()
            self.mock = None

    def nexus_log(self) -> str:
        path = self.workdir / "nexus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def post(self, path: str, body: object, key: str | None = None, **headers: str) -> HttpResult:
        h = {"content-type": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}}
        if key is not None:
            h["authorization"] = f"Bearer {key}"
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return http("POST", self.gateway + path, h, raw)

    def get(self, path: str, key: str | None = None, **headers: str) -> HttpResult:
        h = {k.replace("_", "-"): v for k, v in headers.items()}
        if key is not None:
            h["authorization"] = f"Bearer {key}"
        return http("GET", self.gateway + path, h)
