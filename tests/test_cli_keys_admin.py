"""`nexus-authz keys create|rotate|update|revoke --runtime|restore|list --runtime` against a real server
(embedded mode: runtime keys in SQLite), decisions over its real HTTP fast path (issue 17)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from nexus_authz.cli import main
from nexus_authz.demo import procs
from tests.helpers import KeySpec, write_config
from tests.test_cli_remote import _authz, _wait_serving

TOKEN = "keys-admin-token-0123456789abcdef"
FILE_KEY = KeySpec("from-file")
# acme has no limits of its own; its group research allows 2 requests a minute (issue 16's hierarchy)
TENANTS = """
tenants:
  acme:
    groups:
      research:
        limits:
          - {requests: 2, per: minute}
"""
BODY = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()


class Server:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.admin_port = procs.free_port()
        path = write_config(
            tmp, FILE_KEY, extra="ledger:\n  backend: none\n" + TENANTS, admin=f"127.0.0.1:{self.admin_port}"
        )
        path.write_text(path.read_text().replace("listen:\n", "listen:\n  api: 127.0.0.1:0\n"))
        self.config = path
        self.log = tmp / "nexus.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.api = ""

    def start(self) -> None:
        env = {**os.environ, "NEXUS_ADMIN_TOKEN": TOKEN}
        env.pop("NEXUS_API_ADDR", None)
        self.log.write_bytes(b"")
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "nexus_authz.cli", "serve", "-c", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.api = str(_wait_serving(self.process, self.log)["api"])

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def check(self, secret: str) -> int:
        return _authz(self.tmp / "authz.sock", secret, BODY, f"r{time.monotonic_ns()}")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5) as r:
            return r.read().decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("keys-admin"))
    s.start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def env(server: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    monkeypatch.setenv("NEXUS_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("NEXUS_API_ADDR", server.api)
    monkeypatch.delenv("NEXUS_CONFIG", raising=False)
    return server


def _secret(out: str) -> str:
    return out.strip().splitlines()[-1]


def test_the_lifecycle_of_a_runtime_key(env: Server, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "create", "rt-cli", "--tenant", "acme", "--limit", "requests=100/minute"]) == 0
    captured = capsys.readouterr()
    secret = _secret(captured.out)
    assert secret.startswith("nx-") and "shown once" in captured.err
    assert env.check(secret) == 200

    assert main(["keys", "rotate", "rt-cli", "--grace", "1500ms"]) == 0
    new = _secret(capsys.readouterr().out)
    assert new != secret and env.check(secret) == 200 and env.check(new) == 200
    assert main(["keys", "list", "--runtime"]) == 0
    out = capsys.readouterr().out
    assert "rt-cli" in out and "grace until" in out and secret not in out and new not in out
    time.sleep(1.6)
    assert env.check(secret) == 401 and env.check(new) == 200
    assert main(["keys", "list", "--runtime", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["keys"]
    assert [(k["id"], k["rotation"]) for k in listed] == [("rt-cli", "ROTATION_STATE_EXPIRED")]

    assert main(["keys", "update", "rt-cli", "--model", "claude-*"]) == 0
    capsys.readouterr()
    assert env.check(new) == 403
    assert main(["keys", "update", "rt-cli", "--any-model"]) == 0
    assert main(["keys", "revoke", "--runtime", "rt-cli"]) == 0
    capsys.readouterr()
    assert env.check(new) == 401
    assert main(["keys", "restore", "rt-cli"]) == 0
    assert "active" in capsys.readouterr().out
    assert env.check(new) == 200
    assert env.check(secret) == 401  # the revocation ended the rotation: the old secret stays refused
    # the full list (every key in force) still works and includes both sources
    assert main(["keys", "list"]) == 0
    out = capsys.readouterr().out
    assert "rt-cli" in out and "from-file" in out

    metrics = env.metrics()
    for op, n in (("create", 1), ("rotate", 1), ("update", 2), ("revoke", 1), ("restore", 1)):
        assert f'nexus_authz_key_changes_total{{op="{op}"}} {n}.0' in metrics
    log = env.log.read_text()
    assert log.count('"runtime key create"') == 1 and log.count('"runtime key update"') == 2
    assert secret not in log and new not in log


def test_refusals_are_one_clear_line(env: Server, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "create", "from-file"]) == 1  # ALREADY_EXISTS
    assert "read-only to the API" in capsys.readouterr().err
    assert main(["keys", "create", "bad", "--limit", "{requests: 5, per: fortnight}"]) == 2
    assert "limits[0].per" in capsys.readouterr().err
    assert main(["keys", "restore", "nope"]) == 1
    assert "no runtime key with id 'nope'" in capsys.readouterr().err
    assert main(["keys", "create", "x1", "--token", "wrong-token"]) == 1
    assert "refused the admin token" in capsys.readouterr().err
    assert main(["keys", "revoke", "--runtime", "from-file"]) == 1
    assert "file keys are read-only" in capsys.readouterr().err


def test_a_runtime_keys_group_is_checked_against_the_config_and_charged(
    env: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "create", "rt-grp", "--tenant", "acme", "--group", "sales"]) == 2
    assert "group: tenant 'acme' has no group 'sales' (groups: research)" in capsys.readouterr().err
    assert main(["keys", "create", "rt-grp", "--tenant", "acme", "--group", "research"]) == 0
    secret = _secret(capsys.readouterr().out)
    # the group's 2 a minute bind the runtime key (the key has no limits of its own)
    assert [env.check(secret) for _ in range(3)] == [200, 200, 429]
    assert main(["keys", "update", "rt-grp", "--tenant", "initech"]) == 2  # keeps its group research
    assert "the key's tenant 'initech' is not defined under `tenants:`" in capsys.readouterr().err
    assert main(["keys", "list", "--runtime", "--json"]) == 0
    listed = {k["id"]: k for k in json.loads(capsys.readouterr().out)["keys"]}
    assert (listed["rt-grp"]["tenant"], listed["rt-grp"]["group"]) == ("acme", "research")
    assert main(["keys", "update", "rt-grp", "--group", ""]) == 0  # out of the group: no group limit
    capsys.readouterr()
    assert env.check(secret) == 200


def test_runtime_keys_survive_a_restart(
    server: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NEXUS_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("NEXUS_API_ADDR", server.api)
    assert main(["keys", "create", "survivor"]) == 0
    secret = _secret(capsys.readouterr().out)
    assert server.check(secret) == 200
    server.stop()
    assert (server.tmp / "runtime-keys.sqlite3").exists()
    server.start()
    assert server.check(secret) == 200
    assert server.check(FILE_KEY.secret) == 200
