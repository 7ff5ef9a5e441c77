"""`nexus-authz explain` against a real `nexus-authz serve` process: spend part of a budget through real
decisions, then explain it and dry-run a hypothetical token count; nothing is charged by either."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nexus_authz.cli import main
from tests.helpers import KeySpec, write_config
from tests.test_cli_remote import _authz, _wait_serving

TOKEN = "cli-admin-token-0123456789abcdef"
CONFIG = """
plans:
  standard:
    limits:
      - {requests: 10, per: day}
      - {tokens: 2000, per: day}
      - {tokens: 500, per: day, model: "o3*"}
reservations:
  default_max_tokens: 100
"""
TEAM = KeySpec("team-a", extra={"tenant": "acme", "plan": "standard"})


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("cli-explain")
    path = write_config(tmp, TEAM, extra=CONFIG)
    path.write_text(path.read_text().replace("listen:\n", "listen:\n  api: 127.0.0.1:0\n"))
    log = tmp / "nexus.log"
    env = {**os.environ, "NEXUS_ADMIN_TOKEN": TOKEN}
    env.pop("NEXUS_API_ADDR", None)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "nexus_authz.cli", "serve", "-c", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        started = _wait_serving(process, log)
        yield str(started["api"]), tmp / "authz.sock"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def server(api: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NEXUS_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("NEXUS_API_ADDR", api[0])
    monkeypatch.delenv("NEXUS_CONFIG", raising=False)
    return api[1]


def _windows(capsys: pytest.CaptureFixture[str]) -> dict[str, tuple[int, int, int]]:
    assert main(["limits", "team-a", "--json"]) == 0
    windows = json.loads(capsys.readouterr().out)["windows"]
    return {w["name"]: (w["used"], w["remaining"], w["reserved"]) for w in windows}


def test_explain_a_spent_budget(server: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = json.dumps({"model": "gpt-4o", "max_tokens": 700, "messages": []}).encode()
    assert _authz(server, TEAM.secret, body, "spend-1") == 200
    assert _authz(server, TEAM.secret, body, "spend-2") == 200  # in flight: their reservations hold
    before = _windows(capsys)
    used, remaining, reserved = before["tokens/day"]
    assert used == reserved > 1400 and remaining == 2000 - used

    assert main(["explain", "team-a", "--model", "gpt-4o"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "key team-a (tenant acme), model gpt-4o"
    assert lines[1] == "hypothetical request: 0 prompt + 100 completion tokens, $0"
    assert lines[2].split() == [
        "LEVEL",
        "WINDOW",
        "KIND",
        "LIMIT",
        "USED",
        "REMAINING",
        "RESERVED",
        "RESETS",
        "IN",
        "COST",
        "FITS",
        "NOTE",
    ]
    rows = {line.split()[1]: line.split() for line in lines[3:6]}
    assert rows["requests/day"][:6] == ["key", "requests/day", "requests", "10", "2", "8"]
    tokens = rows["tokens/day"]
    assert tokens[4:7] == [f"{used:,}", f"{remaining:,}", f"{reserved:,}"]
    fits = remaining / 100  # fewer requests of 100 tokens fit than the 8 requests left: tokens bind
    assert fits < 8 and tokens[8:] == ["100", f"{fits:,.0f}" if fits == int(fits) else f"{fits:.2f}", "BINDS"]
    assert rows["requests/day"][8:] == ["1", "8", "ok"]
    assert rows["tokens/day@o3*"][8:] == ["-", "-", "not", "for", "this", "model"]
    assert "binding: tokens/day (key)" in out and "dry run: ALLOWED 200 ok" in out
    assert lines[-1] == "reservations in flight: 2"

    # a hypothetical request bigger than what remains: refused by the token budget, exit 3
    assert main(["explain", "team-a", "--tokens", str(remaining + 1)]) == 3
    out = capsys.readouterr().out
    assert "binding: tokens/day (key)" in out
    assert "dry run: DENIED 429 rate_limited: Rate limit reached for 'tokens/day'" in out
    assert "(retry-after " in out and "refuses, fits in" in out
    assert (
        main(["explain", "team-a", "--prompt-tokens", "10", "--completion-tokens", str(remaining - 10)]) == 0
    )
    capsys.readouterr()
    assert main(["explain", "team-a", "--model", "o3-mini", "--tokens", "501", "--json"]) == 3
    answer = json.loads(capsys.readouterr().out)
    (level,) = answer["levels"]
    o3 = {lim["name"]: lim for lim in level["limits"]}["tokens/day@o3*"]
    assert o3["applies"] and o3["never_fits"] and o3["binding"] and answer["binding"] == "tokens/day@o3*"
    assert answer["decision"]["allowed"] is False and answer["decision"]["http_status"] == 429

    assert _windows(capsys) == before  # neither explain nor its dry runs charged anything


def test_explain_bad_arguments(server: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "team-a", "--tokens", "5", "--prompt-tokens", "1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["explain", "team-a", "--tokens", "-5"]) == 2
    assert "--tokens must not be negative" in capsys.readouterr().err
    assert main(["explain", "nobody"]) == 1
    assert "no key with id 'nobody'" in capsys.readouterr().err
