"""Reading the ledger: the SQLite schema and `query_db` (straight from a ledger file, read-only, from any
thread or process), and `query_table`, its in-memory twin over an aggregation table (the contract tests
check they agree)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path

from nexus_authz.stores.ledger.aggregate import N_SUMS, Key, Row
from nexus_authz.stores.ledger.types import DEFAULT_GROUP_BY, GROUP_FIELDS, PERIODS, UsageRow


def check_group_by(group_by: Sequence[str]) -> tuple[str, ...]:
    if isinstance(group_by, str):
        group_by = (group_by,)
    fields = tuple(group_by)
    unknown = [f for f in fields if f not in GROUP_FIELDS]
    if unknown:
        raise ValueError(f"unknown group_by field(s) {unknown}; expected some of {GROUP_FIELDS}")
    if len(set(fields)) != len(fields):
        raise ValueError(f"group_by has a repeated field: {fields}")
    if sum(1 for f in fields if f in PERIODS) > 1:
        raise ValueError("group_by takes at most one of minute, hour, day")
    return fields


def minute_floor(ts: float) -> int:
    return int(ts - ts % 60)


def query_table(
    items: list[tuple[Key, Row]],
    *,
    key_id: str | None,
    tenant: str | None,
    model: str | None,
    since: float | None,
    until: float | None,
    group_by: Sequence[str],
) -> list[UsageRow]:
    """The in-memory twin of `query_db`'s SQL (the contract tests check they agree)."""
    fields = check_group_by(group_by)
    period = next((PERIODS[f] for f in fields if f in PERIODS), None)
    lo = minute_floor(since) if since is not None else None
    groups: dict[tuple[str | int, ...], list[int]] = {}
    for (k_id, k_tenant, k_model, minute, k_source, k_rule), row in items:
        if key_id is not None and k_id != key_id:
            continue
        if tenant is not None and k_tenant != tenant:
            continue
        if model is not None and k_model != model:
            continue
        if lo is not None and minute < lo:
            continue
        if until is not None and minute >= until:
            continue
        values: dict[str, str | int] = {
            "key_id": k_id,
            "tenant": k_tenant,
            "model": k_model,
            "source": k_source,
            "price_rule": k_rule,
        }
        if period is not None:
            values["period"] = minute - minute % period
        gkey = tuple(values[f if f not in PERIODS else "period"] for f in fields)
        acc = groups.get(gkey)
        if acc is None:
            groups[gkey] = [*row[:N_SUMS], minute, minute]
        else:
            for i in range(N_SUMS):
                acc[i] += row[i]
            acc[N_SUMS] = min(acc[N_SUMS], minute)
            acc[N_SUMS + 1] = max(acc[N_SUMS + 1], minute)
    out = []
    for gkey in sorted(groups):  # each position holds one type; str order = SQLite's BINARY order
        named = dict(zip(fields, gkey, strict=True))
        p = next((named[f] for f in fields if f in PERIODS), None)
        out.append(_make_row(named, p, groups[gkey]))
    return out


def _make_row(named: Mapping[str, object], period: object, sums: Sequence[int]) -> UsageRow:
    return UsageRow(
        key_id=_opt_str(named.get("key_id")),
        tenant=_opt_str(named.get("tenant")),
        model=_opt_str(named.get("model")),
        period=None if period is None else int(period),  # type: ignore[call-overload]
        requests=int(sums[0]),
        prompt_tokens=int(sums[1]),
        cached_prompt_tokens=int(sums[2]),
        completion_tokens=int(sums[3]),
        reasoning_tokens=int(sums[4]),
        cost_micro_usd=int(sums[5]),
        first_minute=int(sums[6]),
        last_minute=int(sums[7]),
        source=_opt_str(named.get("source")),
        price_rule=_opt_str(named.get("price_rule")),
    )


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


# -- the SQLite schema and reads ----------------------------------------------------------------------
SCHEMA_VERSION = 2  # 2: source and price_rule (issue 16); a schema-1 file is migrated (MIGRATE_1_TO_2)
TABLE = """
CREATE TABLE IF NOT EXISTS usage (
    key_id               TEXT    NOT NULL,
    tenant               TEXT    NOT NULL,
    model                TEXT    NOT NULL,
    minute               INTEGER NOT NULL,  -- epoch seconds (UTC) of the minute's start
    source               TEXT    NOT NULL DEFAULT '',  -- reported | counted | estimated | none
    price_rule           TEXT    NOT NULL DEFAULT '',  -- the prices glob, or unpriced:<policy>
    requests             INTEGER NOT NULL DEFAULT 0,
    prompt_tokens        INTEGER NOT NULL DEFAULT 0,
    cached_prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens    INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens     INTEGER NOT NULL DEFAULT 0,
    cost_micro_usd       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, tenant, model, minute, source, price_rule)
) WITHOUT ROWID;
"""
INDEXES = """
CREATE INDEX IF NOT EXISTS usage_by_minute ON usage (minute);
CREATE INDEX IF NOT EXISTS usage_by_tenant ON usage (tenant, minute);
"""
SCHEMA = TABLE + INDEXES
SUM_COLUMNS = (
    "requests",
    "prompt_tokens",
    "cached_prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cost_micro_usd",
)
_KEY_COLUMNS = "key_id, tenant, model, minute, source, price_rule"
UPSERT = (
    f"INSERT INTO usage ({_KEY_COLUMNS}, "
    + ", ".join(SUM_COLUMNS)
    + f") VALUES ({', '.join('?' * 12)}) ON CONFLICT ({_KEY_COLUMNS}) DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in SUM_COLUMNS)
)
# A schema-1 ledger (no source, price_rule: its rows get ""), rebuilt in one transaction: the primary
# key changes, which SQLite's ALTER TABLE cannot do.
MIGRATE_1_TO_2 = (
    "ALTER TABLE usage RENAME TO usage_v1",
    TABLE,
    "INSERT INTO usage (key_id, tenant, model, minute, "
    + ", ".join(SUM_COLUMNS)
    + ") SELECT key_id, tenant, model, minute, "
    + ", ".join(SUM_COLUMNS)
    + " FROM usage_v1",
    "DROP TABLE usage_v1",
    *(s.strip() for s in INDEXES.strip().split(";") if s.strip()),
)


def migrate(conn: sqlite3.Connection) -> None:
    """Bring an older ledger file to SCHEMA_VERSION in one transaction (a second process migrating at
    the same time waits, then finds it done). Its rows keep their sums; source and price_rule are ""."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            have = {row[1] for row in conn.execute("PRAGMA table_info(usage)")}
            if "source" not in have:
                for statement in MIGRATE_1_TO_2:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _open_readonly(path: str) -> sqlite3.Connection:
    uri = Path(path).resolve().as_uri() + "?mode=ro"
    return sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0)


def query_db(
    path: str | os.PathLike[str],
    *,
    key_id: str | None = None,
    tenant: str | None = None,
    model: str | None = None,
    since: float | None = None,
    until: float | None = None,
    group_by: Sequence[str] = DEFAULT_GROUP_BY,
) -> list[UsageRow]:
    """Aggregates straight from a ledger file, read-only, from any thread or process (WAL lets this
    run while a server writes). A minute counts if it starts in [floor_minute(since), until).
    Raises FileNotFoundError if there is no file; a file with no ledger table yields []."""
    fields = check_group_by(group_by)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no ledger database at {path}")
    where: list[str] = []
    params: list[object] = []
    for column, value in (("key_id", key_id), ("tenant", tenant), ("model", model)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if since is not None:
        where.append("minute >= ?")
        params.append(minute_floor(since))
    if until is not None:
        where.append("minute < ?")
        params.append(until)
    conn = _open_readonly(path)
    try:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'usage'"
        ).fetchone()
        if exists is None:
            return []
        have = {row[1] for row in conn.execute("PRAGMA table_info(usage)")}
        columns: list[str] = []
        for f in fields:
            if f in PERIODS:
                columns.append(f"minute - minute % {PERIODS[f]}")
            else:  # a schema-1 file no writer has migrated yet has no source, price_rule: read as ""
                columns.append(f if f in have else "''")
        sql = (
            "SELECT "
            + ", ".join([*columns, *(f"SUM({c})" for c in SUM_COLUMNS), "MIN(minute)", "MAX(minute)"])
            + " FROM usage"
            + (" WHERE " + " AND ".join(where) if where else "")
            + (" GROUP BY " + ", ".join(columns) + " ORDER BY " + ", ".join(columns) if columns else "")
        )
        result = conn.execute(sql, params).fetchall()
    finally:
        conn.close()
    out = []
    n = len(fields)
    for raw in result:
        if raw[n] is None:  # no GROUP BY and nothing matched: one row of NULLs
            continue
        named = dict(zip(fields, raw[:n], strict=True))
        p = next((named[f] for f in fields if f in PERIODS), None)
        out.append(_make_row(named, p, raw[n:]))
    return out
