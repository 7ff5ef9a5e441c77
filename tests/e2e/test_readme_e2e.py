"""The README's copy-and-paste snippets, run as written (issue 18, items 11 and 12).

Blocks meant to be copied are marked `<!-- readme-test: NAME -->` in README.md or docs/*.md.
Substitutions are only those a parallel test run needs (free ports and private paths for the fixed
8000/9191/8080, `/tmp/...`, the admin and gRPC ports) and the venv's location (`.venv/bin/`); each
substituted text is asserted to be in the block, so a README change cannot make a substitution silently
miss.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from nexus_authz.demo import mock_upstream, procs
from nexus_authz.settings import DEFAULT_SOCKET, Settings
from tests.e2e.stack import REPO, Stack, http
from tests.helpers import PEPPER, KeySpec

README = REPO / "README.md"
DOCS = (README, *sorted((REPO / "docs").glob("*.md")))
VENV_BIN = Path(sys.executable).parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CHAT = b'{"model":"o1-mini","messages":[{"role":"user","content":"Hi"}]}'


def block(name: str) -> str:
    pattern = rf"<!-- readme-test: {re.escape(name)} -->\n```\w*\n(.*?)\n```"
    found = [text for doc in DOCS for text in re.findall(pattern, doc.read_text(), re.S)]
    assert len(found) == 1, f"README.md and docs/ have {len(found)} blocks marked readme-test: {name}"
    return found[0] + "\n"


def substitute(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in text, f"{old!r} is no longer in the README block"
        text = text.replace(old, new)
    return text


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    out.update(
        NEXUS_KEY_PEPPER=PEPPER,
        OPENAI_API_KEY="sk-readme-openai-upstream",
        ANTHROPIC_API_KEY="sk-readme-anthropic-upstream",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    return out


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nexus_authz.cli", *args],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def generate_key(workdir: Path) -> str:
    """The README's `keys generate` command; its entry written under `keys:`, as the output says."""
    out = cli("keys", "generate", "--id", "team-a", "--tenant", "acme", "--models", "gpt-4o*", cwd=workdir)
    assert out.returncode == 0, out.stderr
    secret = out.stdout.split("secret: ", 1)[1].split()[0]
    entry = [line for line in out.stdout.splitlines() if line.startswith("  ")]
    (workdir / "keys.yaml").write_text("keys:\n" + "\n".join(entry) + "\n")
    return secret


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nx-readme-"))
    path.chmod(0o755)  # like /tmp: nginx's workers (nobody, when started as root) reach their temp paths
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("name", ["nexus.yaml", "minimal"])
def test_minimal_config_passes_check_config_as_written(workdir: Path, name: str) -> None:
    (workdir / "nexus.yaml").write_text(block(name))
    generate_key(workdir)
    out = cli("check-config", "-c", "nexus.yaml", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok: nexus.yaml") and "(1 keys" in out.stdout


def test_tenants_block_passes_check_config_and_a_keys_group_is_checked(workdir: Path) -> None:
    (workdir / "nexus.yaml").write_text(block("tenants"))
    generate_key(workdir)  # tenant acme
    keys = workdir / "keys.yaml"
    keys.write_text(keys.read_text() + "    group: research\n")
    out = cli("check-config", "-c", "nexus.yaml", cwd=workdir)
    assert out.returncode == 0, out.stderr
    keys.write_text(keys.read_text().replace("group: research", "group: sales"))
    out = cli("check-config", "-c", "nexus.yaml", cwd=workdir)
    assert out.returncode != 0
    assert "keys[0].group: tenant 'acme' has no group 'sales' (groups: research)" in out.stderr + out.stdout
    assert "Traceback" not in out.stderr


def test_defaults_agree_everywhere() -> None:
    """One socket path and one gRPC address: nexus-authz's defaults, the README's config, the shipped
    Envoy configs (nexus_authz always on the socket) and the nginx config."""
    readme = yaml.safe_load(block("nexus.yaml"))["listen"]
    defaults = Settings(config_path="-", base_dir="/")
    assert readme["http_socket"] == DEFAULT_SOCKET == defaults.http_socket
    assert readme["grpc"] == defaults.grpc
    for path in sorted((REPO / "envoy").glob("*.yaml")):
        clusters = {c["name"]: c for c in yaml.safe_load(path.read_text())["static_resources"]["clusters"]}
        for name, cluster in clusters.items():
            (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            address = endpoint["endpoint"]["address"]
            if "pipe" in address:  # the check socket: ext_authz (HTTP, or gRPC over HTTP/2), the access log
                assert name in ("nexus_authz", "nexus_authz_grpc", "nexus_als"), (path, name)
                assert address == {"pipe": {"path": DEFAULT_SOCKET}}, (path, name)
            elif name.startswith("nexus_"):  # gRPC: ext_authz, ext_proc, rate limit service, access log
                sock = address["socket_address"]
                assert f"{sock['address']}:{sock['port_value']}" == defaults.grpc, (path, name)
    nginx = (REPO / "deploy" / "nginx" / "nginx.conf").read_text()
    assert re.search(r"upstream nexus_authz \{\s*server unix:" + re.escape(DEFAULT_SOCKET) + ";", nginx)


def test_envoy_config_snippet_renders_what_envoy_accepts(workdir: Path) -> None:
    (workdir / "nexus.yaml").write_text(block("nexus.yaml"))
    generate_key(workdir)
    render, run = block("envoy-config").splitlines()
    assert run.startswith(".venv/bin/envoy -c envoy.yaml")
    script = substitute(render, {".venv/bin/": f"{VENV_BIN}/"})
    out = subprocess.run(["bash", "-ec", script], cwd=workdir, env=env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = (workdir / "envoy.yaml").read_text()
    assert "nexus-usage.lua" not in text.split("\n", 1)[1]  # inlined: runs from any directory
    clusters = {c["name"]: c for c in yaml.safe_load(text)["static_resources"]["clusters"]}
    (endpoint,) = clusters["nexus_authz"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"] == {"pipe": {"path": DEFAULT_SOCKET}}  # the nexus.yaml's
    # the access log goes to the same socket, over HTTP/2 (adapters/als_h2.py)
    (endpoint,) = clusters["nexus_als"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert endpoint["endpoint"]["address"] == {"pipe": {"path": DEFAULT_SOCKET}}
    upstream = clusters["llm_upstream"]
    (endpoint,) = upstream["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address == {"address": "api.openai.com", "port_value": 443}
    tls = upstream["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.openai.com"
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"]["filename"].startswith("/etc/ssl/")
    protocol = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    options = upstream["typed_extension_protocol_options"][protocol]
    assert options["upstream_http_protocol_options"] == {"auto_sni": True, "auto_san_validation": True}
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    check = subprocess.run(
        [procs.find_envoy(), "--mode", "validate", "-c", str(workdir / "envoy.yaml")],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("mode", ["http", "grpc", "grpc-port"])
def test_envoy_config_carries_traffic(mode: str, workdir: Path) -> None:
    """`envoy-config -c nexus.yaml` for a running nexus-authz on private addresses: a request through the
    rendered Envoy (started outside envoy/) reaches the upstream with the credential; a bad key gets 401.
    gRPC mode goes to the check socket (HTTP/2), or with --grpc to the gRPC port."""
    key = KeySpec("alice")
    stack = Stack(workdir=workdir, keys=(key,))
    envoy: subprocess.Popen[bytes] | None = None
    try:
        stack.mock = mock_upstream.start_in_thread(always_usage=False)
        stack.start_nexus()
        port, admin = procs.free_port(), procs.free_port()
        port_args = ["--grpc", f"127.0.0.1:{stack.grpc_port}"] if mode == "grpc-port" else []
        out = cli(
            "envoy-config",
            "-c",
            str(stack.config_path),
            "--mode",
            mode.removesuffix("-port"),
            *port_args,
            "--upstream",
            f"http://127.0.0.1:{stack.mock.port}",
            "--listen",
            f"127.0.0.1:{port}",
            "--admin-port",
            str(admin),
            cwd=workdir,
        )
        assert out.returncode == 0, out.stderr
        clusters = {c["name"]: c for c in yaml.safe_load(out.stdout)["static_resources"]["clusters"]}
        authz_cluster = clusters["nexus_authz" if mode == "http" else "nexus_authz_grpc"]
        (endpoint,) = authz_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        address = endpoint["endpoint"]["address"]
        if mode == "grpc-port":
            assert address["socket_address"]["port_value"] == stack.grpc_port
        else:  # the check socket, for HTTP and gRPC alike
            assert address["pipe"]["path"] == str(stack.socket)
        log = workdir / "envoy.log"
        envoy = procs.start_envoy(out.stdout, admin_port=admin, workdir=workdir / "run", log_path=log)
        procs.wait_envoy_ready(admin, timeout=30, process=envoy, log_path=log)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        json_type = {"content-type": "application/json"}
        ok = http("POST", url, {"authorization": f"Bearer {key.secret}", **json_type}, CHAT)
        assert ok.status == 200, ok.body
        assert stack.mock.requests()[-1]["headers"]["authorization"] == "Bearer sk-upstream-test-credential"
        bad = http("POST", url, {"authorization": "Bearer nx-wrong-0123456789abcdef"}, CHAT)
        assert bad.status == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    finally:
        if envoy is not None:
            procs.stop_process(envoy)
        stack.stop()


@pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx is not installed (bash .ci/setup)")
def test_nginx_recipe_as_written(workdir: Path) -> None:
    """The README's nginx recipe with the README's nexus.yaml, as root too (no `user` directive added)."""
    upstream, authz, listen = procs.free_port(), procs.free_port(), procs.free_port()
    grpc, admin = procs.free_port(), procs.free_port()
    config = substitute(
        block("nexus.yaml"),
        {
            DEFAULT_SOCKET: str(workdir / "authz.sock"),
            "grpc: 127.0.0.1:9001": f"grpc: 127.0.0.1:{grpc}",
            "admin: 127.0.0.1:9090": f"admin: 127.0.0.1:{admin}",
        },
    )
    (workdir / "nexus.yaml").write_text(config)
    secret = generate_key(workdir)
    recipe = substitute(
        block("nginx"),
        {
            ".venv/bin/": f"{VENV_BIN}/",
            "--port 8000": f"--port {upstream}",
            "127.0.0.1:8000": f"127.0.0.1:{upstream}",
            "127.0.0.1:9191": f"127.0.0.1:{authz}",
            "--listen 8080": f"--listen {listen}",
            "-c nexus.yaml": f"-c {workdir / 'nexus.yaml'}",
            "/tmp/nginx-nexus": str(workdir / "nginx"),
            "nginx -p": f"{NGINX} -p",
        },
    )
    log = open(workdir / "recipe.log", "wb")  # noqa: SIM115
    shell = subprocess.Popen(
        ["bash", "-ec", recipe],
        cwd=REPO,  # the recipe names deploy/nginx/nginx.conf relative to the checkout
        env=env(),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the recipe's background jobs and nginx share its process group
    )
    log.close()
    base = f"http://127.0.0.1:{listen}"
    try:
        procs.wait_http_ready(f"http://127.0.0.1:{admin}/readyz", timeout=30, expect_status=200)
        procs.wait_http_ready(base + "/", timeout=30)
        headers = {"authorization": f"Bearer {secret}"}
        models = http("GET", base + "/v1/models", headers)
        assert models.status == 200, (models.body, (workdir / "recipe.log").read_text()[-3000:])
        wrong = http("GET", base + "/v1/models", {"authorization": "Bearer nx-wrong"})
        assert wrong.status == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        # What the README says nginx cannot do: the key allows gpt-4o* only, but nginx sends no body,
        # so a request for another model is not refused.
        json_type = {"content-type": "application/json"}
        other = http("POST", base + "/v1/chat/completions", {**headers, **json_type}, CHAT)
        assert other.status == 200, other.body
    finally:
        _stop_group(shell)


def _stop_group(shell: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the recipe's process group (the shell, the mock, nexus-authz, nginx), SIGKILL after 15 s."""
    os.killpg(shell.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        shell.poll()
        try:
            os.killpg(shell.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(shell.pid, signal.SIGKILL)
    shell.wait()
