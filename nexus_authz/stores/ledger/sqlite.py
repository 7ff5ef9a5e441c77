"""The usage ledger: what each key used and cost, per model and minute, kept for reporting and GetUsage.

Records are aggregated in memory (one dict keyed by (key_id, tenant, model, minute)) and written in
batches, because a row per request would cost a disk write per request and the ledger only ever
answers per-minute questions. `SQLiteLedger` persists to one SQLite file (WAL, upserts that add, so
several flushes of one minute and several processes sharing the file add up); `MemoryLedger` keeps
the same aggregation in memory for tests and `ledger: {backend: memory}`.

Threading model of SQLiteLedger (the part to get right):
- The *owner thread* is the event loop thread. `record()`, `flush_now()`, `start()` and `close()` run
  only there (or, without a loop, in one thread of the caller's choosing). `record()` is a dict update
  and nothing else: no lock, no I/O, no await.
- The *writer thread* is the single worker of a private ThreadPoolExecutor. Every SQLite call that
  writes (connect, schema, upserts, close) runs there and nowhere else; connections keep sqlite3's
  `check_same_thread`, so a mistake would raise rather than race.
- Hand-over is one reference swap on the owner thread: `batch, self._pending = self._pending, {}`.
  From then on the owner never touches `batch` and the writer never touches `_pending`, so the two
  threads never share a mutable dict. A batch the writer could not write stays in the writer-owned
  `_carry` and is merged with the next swapped batch *in the writer thread*. The only values both
  threads see are ints and strings assigned whole (the size of the carry, counters for `stats()`),
  which the owner reads as hints: the pending bound may overcount for a moment, never undercount.
- `query()` opens its own read-only connection in the calling thread (WAL lets it read while the
  writer writes); async callers use `aquery()`, which runs it in a worker thread.

Durability: `close()` (SIGTERM) flushes everything and retries a failing store until `close_timeout`.
A crash (SIGKILL, OOM) loses what was recorded since the last successful flush: at most one
`flush_interval` in normal operation, or the whole buffer while the store is failing. Commits use
`synchronous=NORMAL`: they survive a process crash; a power loss may also drop the last commits.

Faults (disk full, database locked, read-only file, I/O errors): the batch stays buffered, merged
with newer records, and is retried with exponential backoff (the connection is reopened, so a file
made writable again is picked up). The buffer is bounded by `max_pending` rows; past it, records for
new rows are dropped and counted in `stats().dropped_records`, with one warning per episode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = [
    "DEFAULT_GROUP_BY",
    "GROUP_FIELDS",
    "Ledger",
    "LedgerStats",
    "MemoryLedger",
    "SQLiteLedger",
    "UsageRecord",
    "UsageRow",
    "query_db",
]

log = logging.getLogger("nexus_authz.ledger")

GROUP_FIELDS = ("key_id", "tenant", "model", "minute", "hour", "day")
"""What `query(group_by=...)` accepts; at most one of minute/hour/day (UTC buckets)."""
DEFAULT_GROUP_BY = ("key_id", "model")
_PERIODS = {"minute": 60, "hour": 3600, "day": 86400}

# One aggregated row in memory: [requests, prompt, cached prompt, completion, reasoning, cost, records].
# A list (not a dataclass) so the hot path updates it in place with no allocation.
_Key = tuple[str, str, str, int]
_Row = list[int]
_Table = dict[_Key, _Row]
_N_SUMS = 6
_RECORDS = 6


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One request's usage. Token counts are plain ints (the core's Usage is mapped by the caller)."""

    key_id: str
    tenant: str
    model: str
    ts: float
    requests: int = 1
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cost_micro_usd: int = 0


@dataclass(frozen=True, slots=True)
class UsageRow:
    """An aggregate over the ledger. A field not in `group_by` is None; `period` is the start (epoch
    seconds, UTC) of the minute/hour/day bucket when grouped by time. `first_minute`/`last_minute` are
    the first and last minutes with usage in the group."""

    key_id: str | None
    tenant: str | None
    model: str | None
    period: int | None
    requests: int
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost_micro_usd: int
    first_minute: int
    last_minute: int


@dataclass(frozen=True, slots=True)
class LedgerStats:
    """Plain figures for metrics and readiness. `pending_rows` counts rows held in memory and not yet
    persisted (including a batch being written); `flush_lag` is how far the store is behind: seconds
    since the last successful flush while anything is pending, else 0."""

    recorded_records: int
    pending_rows: int
    flushed_rows: int
    flushed_records: int
    flushes: int
    failed_flushes: int
    consecutive_failures: int
    dropped_records: int
    last_flush_at: float | None
    last_flush_duration: float
    last_error: str | None
    flush_lag: float


@runtime_checkable
class Ledger(Protocol):
    def record(self, rec: UsageRecord) -> None:
        """Add one request's usage. Owner (event loop) thread only; never blocks, never raises for a
        full buffer (the record is counted as dropped instead)."""
        ...

    async def start(self) -> None:
        """Start the periodic flush on the running loop."""
        ...

    async def close(self) -> None:
        """Final flush (SIGTERM path), then release the store. Records after close are dropped."""
        ...

    def flush_now(self) -> bool:
        """Write everything pending, blocking the caller (tests, CLI). True if nothing is left over."""
        ...

    def query(
        self,
        *,
        key_id: str | None = None,
        tenant: str | None = None,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        group_by: Sequence[str] = DEFAULT_GROUP_BY,
    ) -> list[UsageRow]:
        """Aggregates of what the store holds, for minutes starting in [since, until)."""
        ...

    async def aquery(
        self,
        *,
        key_id: str | None = None,
        tenant: str | None = None,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        group_by: Sequence[str] = DEFAULT_GROUP_BY,
    ) -> list[UsageRow]:
        """`query` without blocking the event loop."""
        ...

    def stats(self) -> LedgerStats: ...


# -- shared helpers ------------------------------------------------------------------------------------
def _merge(dst: _Table, src: _Table) -> None:
    """Add src's rows into dst (src is consumed; both are owned by the calling thread)."""
    for key, row in src.items():
        have = dst.get(key)
        if have is None:
            dst[key] = row
        else:
            for i in range(_N_SUMS + 1):
                have[i] += row[i]


def _check_group_by(group_by: Sequence[str]) -> tuple[str, ...]:
    if isinstance(group_by, str):
        group_by = (group_by,)
    fields = tuple(group_by)
    unknown = [f for f in fields if f not in GROUP_FIELDS]
    if unknown:
        raise ValueError(f"unknown group_by field(s) {unknown}; expected some of {GROUP_FIELDS}")
    if len(set(fields)) != len(fields):
        raise ValueError(f"group_by has a repeated field: {fields}")
    if sum(1 for f in fields if f in _PERIODS) > 1:
        raise ValueError("group_by takes at most one of minute, hour, day")
    return fields


def _minute_floor(ts: float) -> int:
    return int(ts - ts % 60)


def _query_table(
    items: list[tuple[_Key, _Row]],
    *,
    key_id: str | None,
    tenant: str | None,
    model: str | None,
    since: float | None,
    until: float | None,
    group_by: Sequence[str],
) -> list[UsageRow]:
    """The in-memory twin of `query_db`'s SQL (the contract tests check they agree)."""
    fields = _check_group_by(group_by)
    period = next((_PERIODS[f] for f in fields if f in _PERIODS), None)
    lo = _minute_floor(since) if since is not None else None
    groups: dict[tuple[str | int, ...], list[int]] = {}
    for (k_id, k_tenant, k_model, minute), row in items:
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
        values: dict[str, str | int] = {"key_id": k_id, "tenant": k_tenant, "model": k_model}
        if period is not None:
            values["period"] = minute - minute % period
        gkey = tuple(values[f if f not in _PERIODS else "period"] for f in fields)
        acc = groups.get(gkey)
        if acc is None:
            groups[gkey] = [*row[:_N_SUMS], minute, minute]
        else:
            for i in range(_N_SUMS):
                acc[i] += row[i]
            acc[_N_SUMS] = min(acc[_N_SUMS], minute)
            acc[_N_SUMS + 1] = max(acc[_N_SUMS + 1], minute)
    out = []
    for gkey in sorted(groups):  # each position holds one type; str order = SQLite's BINARY order
        named = dict(zip(fields, gkey, strict=True))
        p = next((named[f] for f in fields if f in _PERIODS), None)
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
    )


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


# -- SQLite schema and reads ---------------------------------------------------------------------------
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key_id               TEXT    NOT NULL,
    tenant               TEXT    NOT NULL,
    model                TEXT    NOT NULL,
    minute               INTEGER NOT NULL,  -- epoch seconds (UTC) of the minute's start
    requests             INTEGER NOT NULL DEFAULT 0,
    prompt_tokens        INTEGER NOT NULL DEFAULT 0,
    cached_prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens    INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens     INTEGER NOT NULL DEFAULT 0,
    cost_micro_usd       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, tenant, model, minute)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_by_minute ON usage (minute);
CREATE INDEX IF NOT EXISTS usage_by_tenant ON usage (tenant, minute);
"""
_SUM_COLUMNS = (
    "requests",
    "prompt_tokens",
    "cached_prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cost_micro_usd",
)
_UPSERT = (
    "INSERT INTO usage (key_id, tenant, model, minute, "
    + ", ".join(_SUM_COLUMNS)
    + ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key_id, tenant, model, minute) DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in _SUM_COLUMNS)
)
_TRANSIENT = (sqlite3.OperationalError,)
# Errors that belong to a row rather than to the store (a caller passed a non-int, a sum overflowed):
# retrying the batch would fail forever, so such rows are isolated and dropped (counted, logged).
_ROW_ERRORS = (
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.DataError,
    sqlite3.ProgrammingError,
    OverflowError,
    TypeError,
)


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
    fields = _check_group_by(group_by)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no ledger database at {path}")
    columns: list[str] = []
    for f in fields:
        columns.append(f if f not in _PERIODS else f"minute - minute % {_PERIODS[f]}")
    where: list[str] = []
    params: list[object] = []
    for column, value in (("key_id", key_id), ("tenant", tenant), ("model", model)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if since is not None:
        where.append("minute >= ?")
        params.append(_minute_floor(since))
    if until is not None:
        where.append("minute < ?")
        params.append(until)
    sql = (
        "SELECT "
        + ", ".join([*columns, *(f"SUM({c})" for c in _SUM_COLUMNS), "MIN(minute)", "MAX(minute)"])
        + " FROM usage"
        + (" WHERE " + " AND ".join(where) if where else "")
        + (" GROUP BY " + ", ".join(columns) + " ORDER BY " + ", ".join(columns) if columns else "")
    )
    conn = _open_readonly(path)
    try:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'usage'"
        ).fetchone()
        if exists is None:
            return []
        result = conn.execute(sql, params).fetchall()
    finally:
        conn.close()
    out = []
    n = len(fields)
    for raw in result:
        if raw[n] is None:  # no GROUP BY and nothing matched: one row of NULLs
            continue
        named = dict(zip(fields, raw[:n], strict=True))
        p = next((named[f] for f in fields if f in _PERIODS), None)
        out.append(_make_row(named, p, raw[n:]))
    return out


def _default_connect(path: str) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


@dataclass(frozen=True, slots=True)
class _Outcome:
    ok: bool
    carry_rows: int


# -- SQLite ledger -------------------------------------------------------------------------------------
class SQLiteLedger:
    """The default ledger: batches in memory, one writer thread, one SQLite file. See the module doc
    for the threading model; in short, call everything but `query`/`stats` from the loop thread."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        flush_interval: float = 1.0,
        batch_size: int = 1000,
        max_pending: int = 100_000,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 1.0,
        max_backoff: float = 30.0,
        close_timeout: float = 10.0,
        connect: Callable[[str], sqlite3.Connection] | None = None,
    ) -> None:
        if flush_interval <= 0 or batch_size < 1 or max_pending < 1:
            raise ValueError("flush_interval must be > 0, batch_size and max_pending >= 1")
        self.path = os.fspath(path)
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._max_pending = max_pending
        self._clock = clock
        self._busy_ms = max(0, int(busy_timeout * 1000))
        self._max_backoff = max(max_backoff, flush_interval)
        self._close_timeout = close_timeout
        self._connect = connect or _default_connect
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nexus-ledger-writer")
        # owner (loop) thread state
        self._pending: _Table = {}
        self._inflight_rows = 0  # rows swapped out and handed to the writer, not yet answered
        self._recorded = 0
        self._dropped = 0
        self._dropping = False  # inside a drop episode (one warning per episode)
        self._episode_dropped = 0
        self._closed = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._pending_first: float | None = None  # arrival of the first record in _pending
        self._held_first: float | None = None  # arrival of the oldest swapped-out, unpersisted record
        # writer thread state (the owner reads the ints below as hints, never the dict)
        self._conn: sqlite3.Connection | None = None
        self._carry: _Table = {}
        self._carry_rows = 0
        self._consecutive_failures = 0
        self._warned_journal = False
        # figures for stats(), written by the writer under _stats_lock
        self._stats_lock = threading.Lock()
        self._flushed_rows = 0
        self._flushed_records = 0
        self._flushes = 0
        self._failed_flushes = 0
        self._last_flush_at: float | None = None
        self._last_flush_duration = 0.0
        self._last_error: str | None = None
        self._bad_records = 0

    # -- hot path (owner thread) ----------------------------------------------------------------------
    def record(self, rec: UsageRecord) -> None:
        ts = rec.ts
        key = (rec.key_id, rec.tenant, rec.model, int(ts - ts % 60))
        pending = self._pending
        row = pending.get(key)
        if row is not None and not self._closed:
            row[0] += rec.requests
            row[1] += rec.prompt_tokens
            row[2] += rec.cached_prompt_tokens
            row[3] += rec.completion_tokens
            row[4] += rec.reasoning_tokens
            row[5] += rec.cost_micro_usd
            row[6] += 1
            self._recorded += 1
            return
        n = len(pending)
        if self._closed or n + self._inflight_rows + self._carry_rows >= self._max_pending:
            self._drop(1)
            return
        if n == 0:
            self._pending_first = self._clock()
        pending[key] = [
            rec.requests,
            rec.prompt_tokens,
            rec.cached_prompt_tokens,
            rec.completion_tokens,
            rec.reasoning_tokens,
            rec.cost_micro_usd,
            1,
        ]
        self._recorded += 1
        if n + 1 >= self._batch_size and self._wake is not None and self._consecutive_failures == 0:
            self._wake.set()

    def _drop(self, records: int) -> None:
        self._dropped += records
        self._episode_dropped += records
        if not self._dropping:
            self._dropping = True
            if self._closed:
                log.warning("usage ledger is closed; dropping usage records (counted as dropped)")
            else:
                log.warning(
                    "usage ledger buffer full (%d rows pending, store failing: %s); dropping usage "
                    "records until it drains (counted as dropped)",
                    self._max_pending,
                    self._last_error or "unknown",
                    extra={"max_pending": self._max_pending},
                )

    # -- flushing (owner thread side) -----------------------------------------------------------------
    def _swap(self) -> tuple[_Table, float | None]:
        batch, first = self._pending, self._pending_first
        self._pending, self._pending_first = {}, None
        self._inflight_rows += len(batch)
        return batch, first

    def _settled(self, batch_rows: int, first: float | None, outcome: _Outcome) -> None:
        self._inflight_rows -= batch_rows
        if outcome.ok:
            self._held_first = None
        elif first is not None and (self._held_first is None or first < self._held_first):
            self._held_first = first
        if outcome.ok and self._dropping and not self._closed:
            log.info(
                "usage ledger buffer drained; %d usage records were dropped while it was full",
                self._episode_dropped,
                extra={"dropped_records": self._episode_dropped},
            )
            self._dropping = False
            self._episode_dropped = 0

    def _nothing_to_do(self) -> bool:
        return not self._pending and self._carry_rows == 0 and self._inflight_rows == 0

    def flush_now(self) -> bool:
        if self._closed:
            return self._nothing_to_do()
        batch, first = self._swap()
        n = len(batch)
        outcome = _Outcome(False, self._carry_rows)
        try:
            outcome = self._executor.submit(self._write, batch).result()
        finally:
            self._settled(n, first, outcome)
        return outcome.ok and outcome.carry_rows == 0

    async def _flush_async(self) -> bool:
        if self._nothing_to_do():
            return True
        loop = asyncio.get_running_loop()
        batch, first = self._swap()
        n = len(batch)
        outcome = _Outcome(False, self._carry_rows)
        try:
            # shield: once swapped out the batch must reach the writer even if this task is cancelled
            # (a cancelled, not yet started executor job would lose it).
            outcome = await asyncio.shield(loop.run_in_executor(self._executor, self._write, batch))
        finally:
            self._settled(n, first, outcome)
        return outcome.ok

    def _backoff(self) -> float:
        failures = max(1, self._consecutive_failures)
        return float(min(self._max_backoff, self._flush_interval * 2 ** min(failures - 1, 30)))

    async def start(self) -> None:
        if self._task is not None or self._closed:
            raise RuntimeError("ledger already started or closed")
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        await loop.run_in_executor(self._executor, self._open_quietly)
        self._task = loop.create_task(self._run(), name="nexus-ledger-flush")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        wake = self._wake
        assert wake is not None
        while not self._stopping:
            failing = self._consecutive_failures > 0
            deadline = loop.time() + (self._backoff() if failing else self._flush_interval)
            while not self._stopping:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                if not failing and len(self._pending) >= self._batch_size:
                    break
                wake.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await wake.wait()
                except TimeoutError:
                    pass
            if self._stopping:
                break
            try:
                await self._flush_async()
            except Exception:  # a bug in the writer: keep the loop alive, the data stays buffered
                log.exception("usage ledger flush crashed")

    async def close(self) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        self._stopping = True
        if self._task is not None:
            assert self._wake is not None
            self._wake.set()
            # wait, not await: a task cancelled from outside (loop teardown) must not abort the flush
            await asyncio.wait([self._task])
        deadline = loop.time() + self._close_timeout
        while not self._nothing_to_do():
            ok = await self._flush_async()
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            if not ok:
                await asyncio.sleep(min(self._backoff(), remaining))
        # No await between the last check and this: a record() after it is counted as dropped.
        self._closed = True
        lost = await loop.run_in_executor(self._executor, self._shutdown_writer)
        lost += sum(row[_RECORDS] for row in self._pending.values())
        self._pending = {}
        if lost:
            self._dropped += lost
            log.error(
                "usage ledger closed with %d usage records not persisted (store failing: %s)",
                lost,
                self._last_error,
                extra={"dropped_records": lost},
            )
        self._executor.shutdown(wait=True)

    # -- writer thread --------------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        conn = self._connect(self.path)
        try:
            conn.isolation_level = None
            conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            mode = self._set_wal(conn)
            if (not mode or str(mode[0]).lower() != "wal") and not self._warned_journal:
                self._warned_journal = True
                log.warning("usage ledger %s is not in WAL mode (journal_mode=%s)", self.path, mode)
            conn.execute("PRAGMA synchronous = NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.OperationalError(
                    f"ledger schema version {version} is newer than this nexus-authz ({SCHEMA_VERSION})"
                )
            has_table = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'usage'"
            ).fetchone()
            if has_table is None:
                # one transaction, so a second process creating it at the same time is harmless
                conn.executescript(
                    f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                )
        except BaseException:
            conn.close()
            raise
        return conn

    def _set_wal(self, conn: sqlite3.Connection) -> object:
        """`PRAGMA journal_mode = WAL`, retried: SQLite does not apply the busy timeout to it, so two
        processes opening a new ledger at once see an immediate "database is locked" (seen in tests)."""
        deadline = time.monotonic() + max(self._busy_ms / 1000, 0.1)
        while True:
            try:
                return conn.execute("PRAGMA journal_mode = WAL").fetchone()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def _open_quietly(self) -> None:
        """Open at start so a bad path shows up in stats and logs at once; never fatal (retried)."""
        try:
            if self._conn is None:
                self._conn = self._open()
        except sqlite3.Error as exc:
            self._note_failure(exc, 0.0, self._carry_rows)

    def _discard_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _write(self, batch: _Table) -> _Outcome:
        """Merge the swapped-out batch into the carry and write it in one transaction."""
        carry = self._carry
        if carry:
            if len(carry) < len(batch):
                carry, batch = batch, carry
            _merge(carry, batch)
            batch = carry
        self._carry = batch
        self._carry_rows = len(batch)
        if not batch:
            return _Outcome(True, 0)
        started = time.perf_counter()
        try:
            conn = self._conn or self._open()
            self._conn = conn
            self._upsert(conn, batch)
        except _TRANSIENT as exc:
            self._discard_conn()
            return self._note_failure(exc, time.perf_counter() - started, len(batch))
        except _ROW_ERRORS:
            dropped = self._write_rows_one_by_one(batch)
            if dropped < 0:
                return self._note_failure(
                    sqlite3.OperationalError("row-by-row retry failed"),
                    time.perf_counter() - started,
                    len(batch),
                )
        except sqlite3.Error as exc:  # corrupt file, not a database, ...: keep buffering and retrying
            self._discard_conn()
            return self._note_failure(exc, time.perf_counter() - started, len(batch))
        duration = time.perf_counter() - started
        rows = len(batch)
        records = sum(row[_RECORDS] for row in batch.values())
        self._carry = {}
        self._carry_rows = 0
        recovered = self._consecutive_failures
        self._consecutive_failures = 0
        with self._stats_lock:
            self._flushed_rows += rows
            self._flushed_records += records
            self._flushes += 1
            self._last_flush_at = self._clock()
            self._last_flush_duration = duration
        if recovered:
            log.info("usage ledger writes recovered after %d failed flushes", recovered, extra={"rows": rows})
        return _Outcome(True, 0)

    @staticmethod
    def _params(batch: _Table) -> list[tuple[object, ...]]:
        return [(*key, *row[:_N_SUMS]) for key, row in batch.items()]

    def _upsert(self, conn: sqlite3.Connection, batch: _Table) -> None:
        params = self._params(batch)
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_UPSERT, params)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _write_rows_one_by_one(self, batch: _Table) -> int:
        """A batch with a bad row (a bug upstream): write the good rows, drop and count the bad ones.
        Returns the number of records dropped, or -1 if the store itself failed meanwhile."""
        conn = self._conn
        if conn is None:
            return -1
        bad: list[_Key] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for key, row in batch.items():
                conn.execute("SAVEPOINT one")
                try:
                    conn.execute(_UPSERT, (*key, *row[:_N_SUMS]))
                except _ROW_ERRORS:
                    conn.execute("ROLLBACK TO one")
                    bad.append(key)
                conn.execute("RELEASE one")
            conn.execute("COMMIT")
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._discard_conn()
            return -1
        if not bad:
            return 0
        dropped = 0
        for key in bad:
            dropped += batch.pop(key)[_RECORDS]
        log.error(
            "usage ledger dropped %d rows it could not store (a bug upstream), e.g. key_id=%s model=%s",
            len(bad),
            bad[0][0],
            bad[0][2],
            extra={"dropped_records": dropped},
        )
        with self._stats_lock:
            self._bad_records += dropped
        return dropped

    def _note_failure(self, exc: BaseException, duration: float, rows: int) -> _Outcome:
        self._consecutive_failures += 1
        message = f"{type(exc).__name__}: {exc}"
        with self._stats_lock:
            self._failed_flushes += 1
            self._last_error = message
            self._last_flush_duration = duration
        if self._consecutive_failures == 1:
            log.warning(
                "usage ledger write failed (%s); keeping %d rows buffered and retrying with backoff",
                message,
                rows,
                extra={"path": self.path, "rows": rows},
            )
        else:
            log.debug("usage ledger write failed again (%s)", message)
        return _Outcome(False, rows)

    def _shutdown_writer(self) -> int:
        """Close the connection; return the records still in the carry (lost: the store kept failing)."""
        lost = sum(row[_RECORDS] for row in self._carry.values())
        self._carry = {}
        self._carry_rows = 0
        self._discard_conn()
        return lost

    # -- reads --------------------------------------------------------------------------------------------
    def query(
        self,
        *,
        key_id: str | None = None,
        tenant: str | None = None,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        group_by: Sequence[str] = DEFAULT_GROUP_BY,
    ) -> list[UsageRow]:
        """What has been flushed (at most about `flush_interval` behind `record()`). Blocking I/O on
        its own read-only connection: from async code use `aquery`."""
        try:
            return query_db(
                self.path,
                key_id=key_id,
                tenant=tenant,
                model=model,
                since=since,
                until=until,
                group_by=group_by,
            )
        except FileNotFoundError:
            _check_group_by(group_by)
            return []

    async def aquery(
        self,
        *,
        key_id: str | None = None,
        tenant: str | None = None,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        group_by: Sequence[str] = DEFAULT_GROUP_BY,
    ) -> list[UsageRow]:
        return await asyncio.to_thread(
            self.query,
            key_id=key_id,
            tenant=tenant,
            model=model,
            since=since,
            until=until,
            group_by=group_by,
        )

    def stats(self) -> LedgerStats:
        pending = len(self._pending) + self._inflight_rows + self._carry_rows
        with self._stats_lock:
            last_at = self._last_flush_at
            stats = LedgerStats(
                recorded_records=self._recorded,
                pending_rows=pending,
                flushed_rows=self._flushed_rows,
                flushed_records=self._flushed_records,
                flushes=self._flushes,
                failed_flushes=self._failed_flushes,
                consecutive_failures=self._consecutive_failures,
                dropped_records=self._dropped + self._bad_records,
                last_flush_at=last_at,
                last_flush_duration=self._last_flush_duration,
                last_error=self._last_error,
                flush_lag=0.0,
            )
        firsts = [t for t in (self._held_first, self._pending_first) if t is not None]
        if pending and firsts:
            stats = replace(stats, flush_lag=max(0.0, self._clock() - min(firsts)))
        return stats


# -- memory ledger -------------------------------------------------------------------------------------
class MemoryLedger:
    """The same aggregation with no persistence: records are visible to `query` at once. Bounded by
    `max_rows` distinct (key, tenant, model, minute) rows; past it records are dropped and counted.
    Owner-thread only, like SQLiteLedger's `record` (and `query` here too: it reads the live dict)."""

    def __init__(self, *, max_rows: int = 1_000_000, clock: Callable[[], float] = time.time) -> None:
        self._table: _Table = {}
        self._max_rows = max_rows
        self._clock = clock
        self._recorded = 0
        self._dropped = 0
        self._closed = False
        self._warned = False

    def record(self, rec: UsageRecord) -> None:
        ts = rec.ts
        key = (rec.key_id, rec.tenant, rec.model, int(ts - ts % 60))
        row = self._table.get(key)
        if self._closed or (row is None and len(self._table) >= self._max_rows):
            self._dropped += 1
            if not self._warned:
                self._warned = True
                log.warning("memory usage ledger full or closed; dropping usage records (counted)")
            return
        if row is None:
            self._table[key] = [
                rec.requests,
                rec.prompt_tokens,
                rec.cached_prompt_tokens,
                rec.completion_tokens,
                rec.reasoning_tokens,
                rec.cost_micro_usd,
                1,
            ]
        else:
            row[0] += rec.requests
            row[1] += rec.prompt_tokens
            row[2] += rec.cached_prompt_tokens
            row[3] += rec.completion_tokens
            row[4] += rec.reasoning_tokens
            row[5] += rec.cost_micro_usd
            row[6] += 1
        self._recorded += 1

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._closed = True

    def flush_now(self) -> bool:
        return True

    def query(
        self,
        *,
        key_id: str | None = None,
        tenant: str | None = None,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        group_by: Sequence[str] = DEFAULT_GROUP_BY,
    ) -> list[UsageRow]:
        return _query_table(
            list(self._table.items()),
            key_id=key_id,
            tenant=tenant,
            model=model,
            since=since,
            until=until,
            group_by=group_by,
        )

    async def aquery(
        self,
        *,
        key_id: str | None = None,
        tenant: str | None = None,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        group_by: Sequence[str] = DEFAULT_GROUP_BY,
    ) -> list[UsageRow]:
        return self.query(
            key_id=key_id, tenant=tenant, model=model, since=since, until=until, group_by=group_by
        )

    def stats(self) -> LedgerStats:
        return LedgerStats(
            recorded_records=self._recorded,
            pending_rows=0,
            flushed_rows=len(self._table),
            flushed_records=self._recorded,
            flushes=0,
            failed_flushes=0,
            consecutive_failures=0,
            dropped_records=self._dropped,
            last_flush_at=None,
            last_flush_duration=0.0,
            last_error=None,
            flush_lag=0.0,
        )
