"""The CLI against a real `nexus-authz serve` process, through the policy API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nexus_authz.cli import main
from nexus_authz.stores.ledger import SQLiteLedger, UsageRecord
from tests.helpers import KeySpec, write_config

TOKEN = "cli-admin-token-0123456789abcdef"
CONFIG = """
plans:
  standard:
    limits:
      - {requests: 10, per: minute}
      - {tokens: 50000, per: day}
ledger:
  path: usage.sqlite3
  flush_interval: 50ms
"""
TEAM = KeySpec("team-a", extra={"tenant": "acme", "plan": "standard", "models": ["gpt-4o*"]})
OTHER = KeySpec("team-b", extra={"tenant": "umbrella"})


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    api: str
    socket: Path
    log: Path
    db: Path


def _wait_serving(process: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if '"nexus-authz serving"' in line:
                return dict(json.loads(line))
        if process.poll() is not None:
            raise AssertionError(f"nexus-authz exited early:\n{log.read_text()}")
        time.sleep(0.05)
    raise AssertionError(f"nexus-authz did not start:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("cli-remote")
    path = write_config(tmp, TEAM, OTHER, extra=CONFIG)
    path.write_text(path.read_text().replace("listen:\n", "listen:\n  api: 127.0.0.1:0\n"))
    # some usage already in the ledger file
    ledger = SQLiteLedger(str(tmp / "usage.sqlite3"))
    ledger.record(
        UsageRecord("team-a", "acme", "gpt-4o", time.time() - 60, prompt_tokens=120, completion_tokens=30)
    )
    assert ledger.flush_now()
    log = tmp / "nexus.log"
    env = {**os.environ, "NEXUS_ADMIN_TOKEN": TOKEN}
    env.pop("NEXUS_API_ADDR", None)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "nexus_authz.cli", "serve", "-c", str(path), "--log-level", "debug"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        started = _wait_serving(process, log)
        yield Running(process, str(started["api"]), tmp / "authz.sock", log, tmp / "usage.sqlite3")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def env(server: Running, monkeypatch: pytest.MonkeyPatch) -> Running:
    monkeypatch.setenv("NEXUS_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("NEXUS_API_ADDR", server.api)
    monkeypatch.delenv("NEXUS_CONFIG", raising=False)
    return server


def _authz(sock: Path, key: str, body: bytes, request_id: str) -> int:
    """One real decision over the HTTP fast path (the Unix socket Envoy uses)."""
    head = (
        "POST /ext_authz/v1/chat/completions HTTP/1.1\r\nhost: nexus\r\n"
        f"x-request-id: {request_id}\r\nauthorization: Bearer {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    request = head.encode() + body
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_keys_list_and_show(env: Running, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "TENANT", "PLAN", "STATE", "EXPIRES", "(UTC)", "MODELS", "LIMITS"]
    assert lines[1].split()[:4] == ["team-a", "acme", "standard", "active"]
    assert lines[2].split()[:2] == ["team-b", "umbrella"]
    assert TEAM.secret not in out and "hmac-sha256" not in out

    assert main(["keys", "list", "--tenant", "umbrella", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [k["id"] for k in listed["keys"]] == ["team-b"]

    assert main(["keys", "show", "team-a"]) == 0
    shown = capsys.readouterr().out
    assert "tenant      acme" in shown and "models      gpt-4o*" in shown
    assert "limits      10 requests/minute; 50,000 tokens/day" in shown
    assert main(["keys", "show", "team-a", "--json"]) == 0
    key = json.loads(capsys.readouterr().out)["key"]
    assert key["limits"][0]["limit"] == 10 and key["state"] == "KEY_STATE_ACTIVE"

    assert main(["keys", "show", "nobody"]) == 1
    assert "no key with id 'nobody'" in capsys.readouterr().err


def test_limits_after_real_decisions(env: Running, capsys: pytest.CaptureFixture[str]) -> None:
    body = json.dumps({"model": "gpt-4o", "max_tokens": 100, "messages": []}).encode()
    assert _authz(env.socket, TEAM.secret, body, "req-1") == 200
    assert _authz(env.socket, TEAM.secret, body, "req-2") == 200
    assert main(["limits", "team-a"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:-1]}
    assert rows["requests/minute"][1:5] == ["requests", "10", "2", "8"]
    assert rows["tokens/day"][1] == "tokens" and int(rows["tokens/day"][5].replace(",", "")) > 0
    assert out.splitlines()[-1] == "reservations in flight: 2"  # no responses came back
    assert main(["limits", "team-a", "--json"]) == 0
    windows = json.loads(capsys.readouterr().out)["windows"]
    assert windows[0]["used"] == 2 and windows[0]["remaining"] == 8


def test_check_dry_runs(
    env: Running, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["check", "--key-id", "team-a", "--model", "gpt-4o", "--max-tokens", "50"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ALLOWED 200 ok (key team-a, tenant acme, model gpt-4o)")
    assert "x-ratelimit-limit-requests: 10" in out and "upstream credential: openai" in out
    assert main(["check", "--key-id", "team-a", "--model", "o1"]) == 3
    assert capsys.readouterr().out.startswith("DENIED 403 model_not_allowed")
    # the client key itself, read from stdin
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(TEAM.secret + "\n"))
    assert main(["check", "--key", "-", "--model", "gpt-4o-mini", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["allowed"] is True and answer["key_id"] == "team-a"
    assert main(["check", "--key", "nx-nobody-0123456789abcdef"]) == 3
    assert capsys.readouterr().out.startswith("DENIED 401 unknown_key")
    assert main(["check", "--key-id", "team-a", "--header", "no colon"]) == 2


def test_usage_through_the_api_and_from_the_file(env: Running, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "--server", env.api, "--key", "team-a", "--since", "1h"]) == 0
    remote = capsys.readouterr().out
    assert remote.splitlines()[1].split()[:4] == ["team-a", "gpt-4o", "1", "120"]
    assert main(["usage", "--db", str(env.db), "--key", "team-a", "--since", "1h"]) == 0
    assert capsys.readouterr().out == remote  # the same table both ways
    assert main(["usage", "--server", env.api, "--by", "tenant,hour", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["tenant"] == "acme" and rows[0]["key_id"] is None and rows[0]["period"] is not None
    assert main(["usage", "--server", env.api, "--since", "yesterday-ish"]) == 2


def test_errors_are_one_line(env: Running, tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "nexus_authz.cli"]
    base = {**os.environ, "NEXUS_API_ADDR": env.api, "NEXUS_ADMIN_TOKEN": "wrong-token-0123456789abcdef"}
    base.pop("NEXUS_CONFIG", None)
    wrong = subprocess.run([*cli, "keys", "list"], capture_output=True, text=True, env=base, timeout=60)
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == (
        f"nexus-authz: error: the policy API at {env.api} refused the admin token "
        "(check --token / NEXUS_ADMIN_TOKEN)"
    )
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        down = f"127.0.0.1:{s.getsockname()[1]}"
    result = subprocess.run(
        [*cli, "limits", "team-a", "--server", down, "--timeout", "3"],
        capture_output=True,
        text=True,
        env={**base, "NEXUS_ADMIN_TOKEN": TOKEN},
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"nexus-authz: error: cannot reach the policy API at {down}")
    assert len(result.stderr.strip().splitlines()) == 1
    no_token = {k: v for k, v in base.items() if k != "NEXUS_ADMIN_TOKEN"}
    missing = subprocess.run(
        [*cli, "keys", "list"], capture_output=True, text=True, env=no_token, cwd=tmp_path, timeout=60
    )
    assert missing.returncode == 2 and "no admin token" in missing.stderr
    # nothing secret reached the server's log, at debug level
    log = env.log.read_text()
    for secret in (TOKEN, "wrong-token-0123456789abcdef", TEAM.secret, "sk-upstream-test-credential"):
        assert secret not in log
