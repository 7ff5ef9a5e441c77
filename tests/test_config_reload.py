"""nexus.yaml reloads in a running `nexus-authz serve` (issue 18, item 6).

SIGHUP and the reload poll read the config file as they read the key file: policy sections (plans,
limits, prices, credentials), the key file and its pepper take effect; a broken file keeps the last good
config in force, is logged and turns /readyz to 503; a changed field that needs a restart (listeners,
stores, logging) is logged by name and keeps its running value. Limits that did not change keep their
state across a reload.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from nexus_authz.demo import procs
from tests.helpers import KeySpec
from tests.test_faults import Served, check, get, ready, serve, stop, wait_for, workdir  # noqa: F401

ALICE = KeySpec("alice", extra={"plan": "small"})
BOB = KeySpec("bob", extra={"plan": "steady"})
CAROL = KeySpec("carol", extra={"plan": "small"})

PLANS = """\
plans:
  small:
    limits:
      - {requests: 2, per: minute}
  steady:
    limits:
      - {requests: 3, per: minute}
"""


def _config(workdir: Path) -> Path:
    return workdir / "nexus.yaml"


def _records(served: Served, msg_start: str) -> list[dict[str, object]]:
    return [r for r in served.records() if str(r.get("msg", "")).startswith(msg_start)]


def _replace(path: Path, text: str) -> None:
    """Write the new version beside it and rename it over (as config management does): a poll never sees
    a half-written file, so each change is one reload or one rejection."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rewrite_same_stamp(path: Path, old: str, new: str) -> None:
    """Change the file in place keeping its size and mtime (and inode): only SIGHUP can notice."""
    st = path.stat()
    text = path.read_text()
    assert old in text and len(old) == len(new)
    path.write_text(text.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def test_sighup_applies_a_changed_plan_limit_and_keeps_unchanged_limits_state(workdir: Path) -> None:
    served = serve(workdir, ALICE, BOB, CAROL, extra=PLANS)
    try:
        assert [check(served, ALICE.secret) for _ in range(3)] == [200, 200, 429]
        assert [check(served, BOB.secret) for _ in range(2)] == [200, 200]
        # small: 2 -> 5 requests per minute, the file's stamp unchanged: the poll cannot see it
        _rewrite_same_stamp(_config(workdir), "{requests: 2, per: minute}", "{requests: 5, per: minute}")
        before = len(_records(served, "config file reloaded"))
        served.process.send_signal(signal.SIGHUP)
        wait_for("the reload logged", lambda: len(_records(served, "config file reloaded")) > before)
        reloaded = _records(served, "config file reloaded")[-1]
        assert reloaded["changed"] == "plans" and reloaded["not_applied"] == ""
        # the new limit applies (carol, on the same plan, had not used it yet)
        assert [check(served, CAROL.secret) for _ in range(6)] == [200] * 5 + [429]
        # alice's window keeps its state: the 2 requests charged at 2/minute (one per 30 s) still
        # take the whole minute of the GCRA window at 5/minute, which frees one every 12 s
        assert check(served, ALICE.secret) == 429
        # bob's plan did not change: its counter kept the 2 requests used before the reload
        assert [check(served, BOB.secret) for _ in range(2)] == [200, 429]
        assert ready(served)[0] == 200
    finally:
        assert stop(served) == 0


def test_a_broken_config_keeps_the_last_good_one_and_readyz_says_so(workdir: Path) -> None:
    fresh = [KeySpec(f"k{i}", extra={"plan": "small"}) for i in range(4)]  # one unused key per check
    served = serve(workdir, ALICE, BOB, *fresh, extra=PLANS)
    config = _config(workdir)
    good = config.read_text()
    try:
        wait_for("ready", lambda: ready(served)[0] == 200)
        # a plan the key file names disappears, then a YAML error: both are refused by the poll
        for i, (broken, reason) in enumerate(
            (
                (good.replace("  small:", "  large:"), "keys[0].plan: no plan named 'small'"),
                (good + "plans: [\n", str(config)),
            )
        ):
            _replace(config, broken)
            wait_for("readyz 503", lambda: ready(served)[0] == 503)
            assert ready(served)[1] == {
                "ready": False,
                "detail": "config file rejected; serving the previous config",
            }
            rejected = _records(served, "config file rejected")[-1]
            assert rejected["config"] == str(config) and reason in str(rejected["error"]), rejected
            # the previous config answers: plan small still allows 2 per minute
            assert [check(served, fresh[2 * i].secret) for _ in range(3)] == [200, 200, 429]
            _replace(config, good.replace("{requests: 2,", "{requests: 3,"))  # fixed, and changed
            wait_for("readyz 200 again", lambda: ready(served)[0] == 200)
            assert [check(served, fresh[2 * i + 1].secret) for _ in range(4)] == [200, 200, 200, 429]
            reloads = len(_records(served, "config file reloaded"))
            _replace(config, good)
            wait_for(
                "the good file back",
                lambda reloads=reloads: len(_records(served, "config file reloaded")) > reloads,
            )
        assert len(_records(served, "config file rejected")) == 2  # once per change, not per poll
    finally:
        assert stop(served) == 0


def test_a_changed_listener_is_logged_by_name_and_not_rebound(workdir: Path) -> None:
    served = serve(workdir, ALICE, BOB, extra=PLANS)
    config = _config(workdir)
    new_admin = procs.free_port()
    try:
        text = config.read_text()
        old_admin = served.admin.rsplit(":", 1)[1]
        changed = text.replace(f"admin: 127.0.0.1:{old_admin}", f"admin: 127.0.0.1:{new_admin}")
        changed = changed.replace("{requests: 2, per: minute}", "{requests: 4, per: minute}")
        assert changed.count(str(new_admin)) == 1
        _replace(config, changed)
        wait_for("the reload logged", lambda: _records(served, "config file reloaded"))
        warnings = _records(served, "config field")
        assert [w["field"] for w in warnings] == ["listen.admin"], warnings
        assert warnings[0]["msg"] == (
            "config field listen.admin changed but needs a restart; the running value stays"
        )
        reloaded = _records(served, "config file reloaded")[-1]
        assert reloaded["changed"] == "plans" and reloaded["not_applied"] == "listen.admin"
        # the old admin port still answers, the new one was never bound
        assert get(f"{served.admin}/readyz")[0] == 200
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", new_admin)) != 0
        # the rest of the change took effect
        assert [check(served, ALICE.secret) for _ in range(5)] == [200, 200, 200, 200, 429]
    finally:
        assert stop(served) == 0


TENANTS = """\
tenants:
  acme:
    limits:
      - {requests: 3, per: minute}
"""


def test_a_reload_of_either_file_rebuilds_the_hierarchy_keeping_the_tenants_window(workdir: Path) -> None:
    from tests.helpers import key_file

    alice, bob = KeySpec("alice", extra={"tenant": "acme"}), KeySpec("bob", extra={"tenant": "acme"})
    served = serve(workdir, alice, bob, extra=PLANS + TENANTS)
    try:
        assert [check(served, alice.secret) for _ in range(2)] == [200, 200]
        # nexus.yaml: acme gains a group (the tenant's limit unchanged): its window keeps its 2 requests
        grouped = (
            TENANTS + "    groups:\n      ml:\n        limits:\n          - {requests: 9, per: minute}\n"
        )
        before = len(_records(served, "config file reloaded"))
        _replace(_config(workdir), _config(workdir).read_text().replace(TENANTS, grouped))
        served.process.send_signal(signal.SIGHUP)
        wait_for("the reload logged", lambda: len(_records(served, "config file reloaded")) > before)
        assert _records(served, "config file reloaded")[-1]["changed"] == "tenants"
        assert [check(served, bob.secret) for _ in range(2)] == [200, 429]  # one left, for every key
        # the key file: a new key of that group shares the spent tenant window from its first request
        dave = KeySpec("dave", extra={"tenant": "acme", "group": "ml"})
        loads = len(_records(served, "key file loaded"))
        _replace(workdir / "keys.yaml", key_file(alice, bob, dave))  # the poll's reload (its new stamp)
        wait_for("the key file reloaded", lambda: len(_records(served, "key file loaded")) > loads)
        assert check(served, dave.secret) == 429
    finally:
        assert stop(served) == 0
