"""Issue 18, the command line as a new user meets it: check-config refuses what serve refuses, with the
same message and exit code; `keys revoke` of an unknown id; `keys generate` options checked against the
config; `--version`; `usage --by` names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nexus_authz.cli import main
from nexus_authz.demo.procs import free_port
from tests.helpers import PEPPER, KeySpec, write_config

ENV = {"NEXUS_KEY_PEPPER": PEPPER}


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("NEXUS_ADMIN_TOKEN", "NEXUS_CONFIG")}
    return subprocess.run(
        [sys.executable, "-m", "nexus_authz.cli", *args],
        capture_output=True,
        text=True,
        env={**base, **ENV, **(env or {})},
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _with_listen(path: Path, *lines: str) -> None:
    text = path.read_text()
    path.write_text(text.replace("listen:\n", "listen:\n" + "".join(f"  {line}\n" for line in lines), 1))


def _unit_fortnight(tmp: Path) -> tuple[Path, dict[str, str], str]:
    (tmp / "rls").mkdir()
    (tmp / "rls" / "a.yaml").write_text(
        "domain: api\ndescriptors:\n  - key: tenant\n"
        "    rate_limit: {unit: fortnight, requests_per_unit: 1}\n"
    )
    path = write_config(
        tmp, KeySpec("a"), grpc=f"127.0.0.1:{free_port()}", extra="ratelimit:\n  config_dir: rls\n"
    )
    _with_listen(path, "api: null")
    return path, {}, "a.yaml:4: descriptors[0].rate_limit.unit: unknown unit"


def _missing_config_dir(tmp: Path) -> tuple[Path, dict[str, str], str]:
    path = write_config(
        tmp, KeySpec("a"), grpc=f"127.0.0.1:{free_port()}", extra="ratelimit:\n  config_dir: nope\n"
    )
    _with_listen(path, "api: null")
    return path, {}, "nope"


def _admin_token_file_missing(tmp: Path) -> tuple[Path, dict[str, str], str]:
    path = write_config(tmp, KeySpec("a"), extra="api:\n  admin_token: {value_file: /nonexistent}\n")
    _with_listen(path, f"api: 127.0.0.1:{free_port()}")
    return path, {}, "api.admin_token: cannot read secret file /nonexistent"


def _admin_token_short(tmp: Path) -> tuple[Path, dict[str, str], str]:
    path = write_config(tmp, KeySpec("a"))
    _with_listen(path, f"api: 127.0.0.1:{free_port()}")
    return path, {"NEXUS_ADMIN_TOKEN": "short"}, "must be at least"


@pytest.mark.parametrize(
    "case", [_unit_fortnight, _missing_config_dir, _admin_token_file_missing, _admin_token_short]
)
def test_check_config_refuses_what_serve_refuses(tmp_path: Path, case) -> None:  # type: ignore[no-untyped-def]
    path, env, expected = case(tmp_path)
    check = run("check-config", "-c", str(path), env=env)
    serve = run("serve", "-c", str(path), env=env, timeout=30)
    for result in (check, serve):
        assert result.returncode == 2, (result.returncode, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr
    # one validation: the same first line from both
    assert check.stderr.splitlines()[0] == serve.stderr.splitlines()[0]
    assert not (tmp_path / "authz.sock").exists()  # serve refused before opening anything


# -- keys revoke ---------------------------------------------------------------------------------------------
def _redis_config(tmp: Path) -> Path:
    # nothing listens on this port: reaching the publish step shows as "cannot reach Redis" (exit 1)
    extra = (
        "counters:\n  backend: redis\n  redis:\n"
        f"    url: redis://127.0.0.1:{free_port()}/0\n    timeout: 100ms\n"
    )
    return write_config(tmp, KeySpec("known"), extra=extra)


def test_revoke_unknown_id_is_refused(tmp_path: Path) -> None:
    path = _redis_config(tmp_path)
    unknown = run("keys", "revoke", "no-such-id", "-c", str(path))
    assert unknown.returncode == 2, unknown
    assert "no key with id 'no-such-id'" in unknown.stderr and "keys.yaml" in unknown.stderr
    assert "notified" not in unknown.stdout
    # a known id goes on to publish (and here fails to reach Redis); so does an unknown one with --force
    known = run("keys", "revoke", "known", "-c", str(path))
    forced = run("keys", "revoke", "no-such-id", "--force", "-c", str(path))
    for result in (known, forced):
        assert result.returncode == 1 and "cannot reach Redis" in result.stderr, result


def test_revoke_with_an_unreadable_key_file_warns_and_publishes(tmp_path: Path) -> None:
    path = _redis_config(tmp_path)
    (tmp_path / "keys.yaml").unlink()
    result = run("keys", "revoke", "whatever", "-c", str(path))
    assert (
        "cannot check the key id against the key file" in result.stderr
        and "key file not found" in result.stderr
    )
    assert result.returncode == 1 and "cannot reach Redis" in result.stderr


# -- keys generate --------------------------------------------------------------------------------------
def _plan_config(tmp: Path) -> Path:
    extra = (
        "plans:\n  pro:\n    limits:\n      - {requests: 600, per: minute}\n"
        "prices:\n  '*': {input: 1, output: 2}\n"
    )
    path = write_config(tmp, KeySpec("x"), extra=extra)
    return path


def test_generate_checks_plan_and_credential_against_the_config(tmp_path: Path) -> None:
    path = _plan_config(tmp_path)
    bad_plan = run("keys", "generate", "--id", "k", "--plan", "nosuchplan", "-c", str(path))
    assert bad_plan.returncode == 2 and "no plan named 'nosuchplan' (plans: pro)" in bad_plan.stderr
    assert "secret:" not in bad_plan.stdout
    bad_cred = run("keys", "generate", "--id", "k", "--credential", "anthropic", "-c", str(path))
    assert bad_cred.returncode == 2 and "no credential named 'anthropic'" in bad_cred.stderr
    bad_limit = run("keys", "generate", "--id", "k", "--limit", "requests=5/fortnight", "-c", str(path))
    assert (
        bad_limit.returncode == 2 and "fortnight" in bad_limit.stderr and "Traceback" not in bad_limit.stderr
    )
    bad_path = run("keys", "generate", "--id", "k", "--paths", "v1/*", "-c", str(path))
    assert bad_path.returncode == 2 and "path patterns start with '/'" in bad_path.stderr


def test_generate_with_paths_credential_and_limits_makes_a_valid_entry(tmp_path: Path) -> None:
    path = _plan_config(tmp_path)
    out = run(
        "keys", "generate", "--id", "team-b", "--plan", "pro", "--credential", "openai",
        "--paths", "/v1/chat/*", "/v1/models",
        "--limit", "tokens=100000/day", "--limit", "{usd: 5, per: month}", "--limit", "concurrent=2",
        "-c", str(path),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert 'paths: ["/v1/chat/*", "/v1/models"]' in out.stdout and "credential: openai" in out.stdout
    entry = out.stdout.splitlines()[3:]
    (tmp_path / "keys.yaml").write_text("keys:\n" + "\n".join(entry) + "\n")
    assert run("check-config", "-c", str(path)).returncode == 0
    from nexus_authz.engine import Engine
    from nexus_authz.settings import load_settings

    record = Engine.from_settings(load_settings(str(path))).snapshot.by_id["team-b"]
    names = {spec.name for spec in record.limits}
    assert record.paths == ("/v1/chat/*", "/v1/models") and record.credential.name == "openai"
    assert len(record.limits) == 4 and len(names) == 4  # the plan's requests/minute + three own


def test_generate_without_a_config_says_what_it_could_not_check(tmp_path: Path) -> None:
    env = {"NEXUS_CONFIG": ""}
    result = subprocess.run(
        [sys.executable, "-m", "nexus_authz.cli", "keys", "generate", "--id", "k", "--plan", "nosuchplan"],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # no ./nexus.yaml
        env={**{k: v for k, v in os.environ.items() if k != "NEXUS_CONFIG"}, **ENV, **env},
        timeout=60,
    )
    assert result.returncode == 0 and "plan: nosuchplan" in result.stdout
    assert "warning: no config file" in result.stderr and "plan 'nosuchplan'" in result.stderr


# -- --version, usage --by -----------------------------------------------------------------------------
def test_version(capsys) -> None:  # type: ignore[no-untyped-def]
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"nexus-authz {version('nexus-authz')}"


def test_usage_by_names_agree_between_help_and_errors(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    db = str(tmp_path / "ledger.db")
    with pytest.raises(SystemExit):
        main(["usage", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for bad in ("key,foo", "hour,day"):
        with pytest.raises(SystemExit) as exit_info:
            main(["usage", "--db", db, "--by", bad])
        assert exit_info.value.code == 2
        error = " ".join(capsys.readouterr().err.split())
        # the error lists exactly the names the help lists
        names = "key, tenant, model, source, price_rule and at most one of minute, hour, day"
        assert names in help_text and names in error, (help_text, error)
        assert "key_id" not in error and "group_by" not in error
