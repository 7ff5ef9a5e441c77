"""The command line: help, config checks with clear errors, key generation, usage from the ledger."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nexus_authz.cli import main
from nexus_authz.core import keys
from nexus_authz.stores.ledger import SQLiteLedger, UsageRecord
from tests.helpers import PEPPER, KeySpec, write_config


def run(*args: str, env: dict[str, str] | None = None, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nexus_authz.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        input=stdin,
        timeout=60,
    )


def test_help_lists_the_commands() -> None:
    out = run("--help").stdout
    for command in ("serve", "check-config", "keys", "usage", "demo"):
        assert command in out


def test_check_config_ok_and_errors(tmp_path: Path) -> None:
    path = write_config(tmp_path, KeySpec("a"))
    ok = run("check-config", "-c", str(path))
    assert ok.returncode == 0 and "1 keys" in ok.stdout
    (tmp_path / "keys.yaml").write_text("keys:\n  - id: a\n    hash: nope\n")
    bad = run("check-config", "-c", str(path))
    assert bad.returncode == 2
    assert "keys.yaml:3: keys[0].hash" in bad.stderr and "Traceback" not in bad.stderr
    missing = run("check-config", "-c", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "config file not found" in missing.stderr


def test_missing_pepper_is_explained(tmp_path: Path) -> None:
    (tmp_path / "keys.yaml").write_text("keys: []\n")
    (tmp_path / "nexus.yaml").write_text("keys:\n  file: keys.yaml\n")
    env = {k: v for k, v in os.environ.items() if k != "NEXUS_KEY_PEPPER"}
    result = subprocess.run(
        [sys.executable, "-m", "nexus_authz.cli", "check-config", "-c", str(tmp_path / "nexus.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert "NEXUS_KEY_PEPPER is not set" in result.stderr and "keys pepper" in result.stderr


def test_generate_then_hash_round_trip(tmp_path: Path) -> None:
    env = {"NEXUS_KEY_PEPPER": PEPPER}
    out = run("keys", "generate", "--id", "team-a", "--tenant", "acme", "--models", "gpt-4o*", env=env).stdout
    secret = out.splitlines()[0].removeprefix("secret: ")
    assert secret.startswith("nx-")
    assert f'hash: "{keys.format_hash(PEPPER.encode(), secret)}"' in out
    assert 'models: ["gpt-4o*"]' in out and "tenant: acme" in out
    hashed = run("keys", "hash", env=env, stdin=secret + "\n").stdout.strip()
    assert hashed == keys.format_hash(PEPPER.encode(), secret)
    # the generated entry is a valid key file
    path = write_config(tmp_path, KeySpec("x"))
    (tmp_path / "keys.yaml").write_text("keys:\n" + "\n".join(out.splitlines()[3:]) + "\n")
    assert run("check-config", "-c", str(path)).returncode == 0


def test_usage_reads_the_ledger(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import time

    path = write_config(tmp_path, KeySpec("a"), extra="ledger:\n  path: ledger.db\n")
    ledger = SQLiteLedger(str(tmp_path / "ledger.db"))
    ledger.record(
        UsageRecord("team-a", "acme", "gpt-4o", time.time(), prompt_tokens=100, completion_tokens=20)
    )
    assert ledger.flush_now()
    assert main(["usage", "-c", str(path), "--key", "team-a", "--since", "1h"]) == 0
    table = capsys.readouterr().out
    assert "team-a" in table and "gpt-4o" in table and "100" in table
    assert main(["usage", "--db", str(tmp_path / "nope.db")]) == 1
