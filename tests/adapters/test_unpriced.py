"""Prices that cannot silently lie (issue 16 item 6): a model no price matches follows `unpriced.policy`
and is counted; every ledger row says where its usage came from and which price rule priced it; an old
ledger file opens; check-config warns about keys that may reach an unpriced model."""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path

import pytest

from nexus_authz.adapters.envoy_als import AccessLogService
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.model import Request
from nexus_authz.core.price_policy import unpriced_warnings
from nexus_authz.core.usage import usage_from_body
from nexus_authz.engine import Engine
from nexus_authz.metrics import EngineCollector
from nexus_authz.settings import load_settings
from nexus_authz.stores.ledger import SQLiteLedger, UsageRecord, query_db
from tests.adapters.test_als import FIXTURES, body_meta, entry_with, message, stream
from tests.helpers import KeySpec, write_config
from tests.test_cli import run

PRICES = """
ledger: {backend: memory}
prices:
  "gpt-4o-mini*": {input: 0.15, output: 0.6}
  "gpt-4o*": {input: 2.5, cached_input: 1.25, output: 10}
"""
OPEN = KeySpec("open")  # no models, no limits: the Check does not read the body
BUDGET = KeySpec("budget", extra={"limits": [{"usd": 100, "per": "day"}]})  # the Check reads the model
CLAUDE = (FIXTURES / "anthropic_message.json").read_bytes()
CHAT = (FIXTURES / "openai_chat.json").read_bytes()


def _engine(tmp_path: Path, unpriced: str = "") -> Engine:
    path = write_config(tmp_path, OPEN, BUDGET, extra=PRICES + unpriced)
    return Engine.from_settings(load_settings(str(path)))


def _check(engine: Engine, key: KeySpec, model: str, request_id: str) -> int:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10})
    decision = engine.check(
        Request(
            method="POST",
            path="/v1/chat/completions",
            headers={"authorization": f"Bearer {key.secret}", "content-type": "application/json"},
            body=body.encode(),
            request_id=request_id,
        )
    )
    if not decision.allowed:
        return decision.status
    return 200


def _respond(
    engine: Engine,
    request_id: str,
    body: bytes,
    meta: dict[str, object] | None = None,
    content_type: str = "application/json",
) -> None:
    meta = body_meta(body) if meta is None else meta
    entry = entry_with(meta, content_type=content_type, key_id="x", request_id=request_id)
    stream(AccessLogService(engine), message(entry))


def _rows(engine: Engine) -> list[tuple[str | None, str | None, str | None, int]]:
    assert engine.ledger is not None
    rows = engine.ledger.query(group_by=("model", "source", "price_rule"))
    return [(r.model, r.source, r.price_rule, r.cost_micro_usd) for r in rows]


def _claude_cost(input_price: float, cached_price: float, output_price: float) -> int:
    import math

    u = usage_from_body(CLAUDE, content_type="application/json", content_encoding=None)
    fresh = u.prompt_tokens - u.cached_prompt_tokens
    return math.ceil(
        fresh * input_price + u.cached_prompt_tokens * cached_price + u.completion_tokens * output_price
    )


def _metric(engine: Engine) -> dict[tuple[str, str], float]:
    return {
        (s.labels["policy"], s.labels["outcome"]): s.value
        for m in EngineCollector(engine).collect()
        for s in m.samples
        if s.name == "nexus_authz_unpriced_requests_total"
    }


def test_an_unpriced_claude_request_is_no_longer_silently_priced_at_gpt_4o(tmp_path: Path) -> None:
    # the report: a claude-* request on a table without a claude price was charged gpt-4o's
    # rate (the table's most expensive entry) with nothing saying so. The charge stays (the default
    # policy, `highest`: a budget cannot be bypassed by an unknown model) but it is visible now.
    engine = _engine(tmp_path)
    assert _check(engine, OPEN, "claude-sonnet-4-5", "c1") == 200
    _respond(engine, "c1", CLAUDE)
    assert _rows(engine) == [
        ("claude-sonnet-4-5-20250929", "reported", "unpriced:highest", _claude_cost(2.5, 1.25, 10))
    ]
    assert _metric(engine) == {("highest", "highest"): 1}


@pytest.mark.parametrize(
    ("policy", "cost"),
    [
        ("{policy: zero}", 0),
        ("{policy: default, price: {input: 3, cached_input: 0.3, output: 15}}", _claude_cost(3, 0.3, 15)),
    ],
)
def test_the_unpriced_policy_decides_the_charge(tmp_path: Path, policy: str, cost: int) -> None:
    engine = _engine(tmp_path, f"unpriced: {policy}\n")
    name = "zero" if "zero" in policy else "default"
    assert _check(engine, OPEN, "claude-sonnet-4-5", "c1") == 200
    _respond(engine, "c1", CLAUDE)
    assert _check(engine, OPEN, "gpt-4o", "g1") == 200
    _respond(engine, "g1", CHAT)
    rows = _rows(engine)
    assert rows[0] == ("claude-sonnet-4-5-20250929", "reported", f"unpriced:{name}", cost)
    assert rows[1][2] == "gpt-4o*"  # the glob that priced it: first match wins, -mini is not it
    assert _metric(engine) == {(name, name): 1}


def test_refuse_refuses_at_check_where_the_model_is_known(tmp_path: Path) -> None:
    engine = _engine(tmp_path, "unpriced: {policy: refuse}\n")
    body = json.dumps({"model": "claude-sonnet-4-5", "messages": [], "max_tokens": 10}).encode()
    decision = engine.check(
        Request(
            method="POST",
            path="/v1/chat/completions",
            headers={"authorization": f"Bearer {BUDGET.secret}"},
            body=body,
            request_id="r1",
        )
    )
    assert decision.status == 403
    error = json.loads(decision.body)["error"]
    assert error["code"] == "model_not_allowed" and "no price" in error["message"]
    assert "claude-sonnet-4-5" in error["message"]
    assert _check(engine, BUDGET, "gpt-4o-mini", "r2") == 200
    # a key whose Check does not read the body cannot be refused: the response's model is charged the
    # highest price, counted under the policy in force
    assert _check(engine, OPEN, "claude-sonnet-4-5", "r3") == 200
    _respond(engine, "r3", CLAUDE)
    assert _rows(engine)[0][2] == "unpriced:highest"
    assert _metric(engine) == {("refuse", "refused"): 1, ("refuse", "highest"): 1}


def test_each_row_says_where_its_usage_came_from(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    for rid in ("a", "b", "c"):
        assert _check(engine, OPEN, "gpt-4o-mini", rid) == 200
    _respond(engine, "a", CHAT)  # the provider's usage record
    cut = (FIXTURES / "openai_chat_stream_no_usage.sse").read_bytes()[:600]
    _respond(
        engine, "b", b"", {"p1": base64.b64encode(cut).decode()}, "text/event-stream"
    )  # cut off: counted
    _respond(engine, "c", b"", {"u": {"k": "over", "b": ""}})  # a compressed body over the cap: unread
    assert engine.ledger is not None
    sources = {r.source: r.requests for r in engine.ledger.query(group_by=("source",))}
    assert sources == {"reported": 1, "counted": 1, "estimated": 1}


def test_bad_unpriced_config_is_a_clear_error(tmp_path: Path) -> None:
    for text, needle in (
        ("unpriced: {policy: cheapest}\n", "must be one of highest, default, zero, refuse"),
        ("unpriced: {policy: default}\n", "policy: default needs a price"),
        ("unpriced: {policy: zero, price: {input: 1, output: 1}}\n", "with policy: default only"),
    ):
        path = write_config(tmp_path, OPEN, extra=PRICES + text)
        with pytest.raises(ConfigError, match=needle) as info:
            load_settings(str(path))
        assert "unpriced" in str(info.value) and "nexus.yaml:" in str(info.value)


def test_an_old_ledger_file_opens_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE usage (key_id TEXT NOT NULL, tenant TEXT NOT NULL, model TEXT NOT NULL,
            minute INTEGER NOT NULL, requests INTEGER NOT NULL DEFAULT 0,
            prompt_tokens INTEGER NOT NULL DEFAULT 0, cached_prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0, reasoning_tokens INTEGER NOT NULL DEFAULT 0,
            cost_micro_usd INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (key_id, tenant, model, minute)
        ) WITHOUT ROWID;
        CREATE INDEX usage_by_minute ON usage (minute);
        CREATE INDEX usage_by_tenant ON usage (tenant, minute);
        INSERT INTO usage VALUES ('k', 't', 'gpt-4o', 1800000000, 2, 20, 0, 10, 0, 150);
        PRAGMA user_version = 1;
        """
    )
    conn.close()
    # read before any writer migrated it (the CLI on an old file)
    (old,) = query_db(path, group_by=("key_id", "source", "price_rule"))
    assert (old.key_id, old.source, old.price_rule, old.requests) == ("k", "", "", 2)
    ledger = SQLiteLedger(str(path))
    ledger.record(
        UsageRecord(
            "k", "t", "gpt-4o", 1800000010.0, prompt_tokens=5, source="reported", price_rule="gpt-4o*"
        )
    )
    assert ledger.flush_now()
    rows = query_db(path, group_by=("key_id", "source", "price_rule"))
    assert [(r.source, r.price_rule, r.requests, r.prompt_tokens) for r in rows] == [
        ("", "", 2, 20),
        ("reported", "gpt-4o*", 1, 5),
    ]
    (total,) = query_db(path, group_by=("key_id",))
    assert (total.requests, total.cost_micro_usd) == (3, 150)
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA user_version").fetchone()[0] == 2
        indexes = {r[0] for r in check.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"usage_by_minute", "usage_by_tenant"} <= indexes
    SQLiteLedger(str(path)).flush_now()  # a second open finds it migrated


def test_check_config_warns_about_keys_that_may_reach_an_unpriced_model(tmp_path: Path) -> None:
    assert unpriced_warnings([("a", ("gpt-4o-mini",)), ("b", ("claude-*",))], ["gpt-4o*"], "highest") == [
        "key b may use models claude-*, which no price covers: such requests are charged per "
        "unpriced.policy: highest"
    ]
    assert unpriced_warnings([("a", ())], ["*"], "refuse") == []  # a catch-all covers any model
    assert unpriced_warnings([("a", ())], [], "refuse") == []  # no price table: costs are not tracked
    scoped = KeySpec("scoped", extra={"models": ["gpt-4o*"]})
    path = write_config(tmp_path, OPEN, scoped, extra=PRICES + "unpriced: {policy: refuse}\n")
    result = run("check-config", "-c", str(path))
    assert result.returncode == 0, result.stderr
    warnings = [line.strip() for line in result.stdout.splitlines() if "warning" in line]
    assert warnings == [
        "warning: key open may use any model, which no price covers: such requests are refused"
    ]


def test_usage_output_and_get_usage_show_source_and_price_rule(tmp_path: Path) -> None:
    from nexus_authz.adapters.policy_api import usage_row_message

    path = tmp_path / "usage.sqlite3"
    ledger = SQLiteLedger(str(path))
    for source, rule in (("reported", "gpt-4o*"), ("counted", "unpriced:highest")):
        ledger.record(
            UsageRecord("k", "t", "m", 1800000000.0, prompt_tokens=3, source=source, price_rule=rule)
        )
    assert ledger.flush_now()
    result = run("usage", "--db", str(path), "--by", "key,source,price_rule", "--since", "2020-01-01")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["KEY", "SOURCE", "PRICE", "RULE"]
    assert lines[1].split()[:3] == ["k", "counted", "unpriced:highest"]
    assert lines[2].split()[:3] == ["k", "reported", "gpt-4o*"]
    rows = query_db(path, group_by=("source", "price_rule"))
    msg = usage_row_message(rows[1])
    assert (msg.source, msg.price_rule, msg.HasField("model")) == ("reported", "gpt-4o*", False)
