"""The usage ledger: aggregation, batching, durability, faults, and the writer-thread rule.

Faults are real SQLite faults, made without root: a connection opened `mode=ro` (SQLITE_READONLY),
another connection holding `BEGIN EXCLUSIVE` (SQLITE_BUSY), and `PRAGMA max_page_count` pinned to the
file's current size (SQLITE_FULL, what a full disk returns). Waits poll for a condition with a generous
deadline; nothing asserts on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexus_authz.cli import usage as cli_usage
from nexus_authz.stores.ledger import (
    Ledger,
    MemoryLedger,
    SQLiteLedger,
    UsageRecord,
    UsageRow,
    query_db,
)

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_040.0  # a minute boundary (UTC)


def rec(
    key: str = "k1", ts: float = T0, *, tenant: str = "acme", model: str = "gpt-4o", **kw: int
) -> UsageRecord:
    return UsageRecord(key_id=key, tenant=tenant, model=model, ts=ts, **kw)


def totals(rows: list[UsageRow]) -> tuple[int, int, int, int, int, int]:
    return (
        sum(r.requests for r in rows),
        sum(r.prompt_tokens for r in rows),
        sum(r.cached_prompt_tokens for r in rows),
        sum(r.completion_tokens for r in rows),
        sum(r.reasoning_tokens for r in rows),
        sum(r.cost_micro_usd for r in rows),
    )


def rows_in_db(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0])
    finally:
        conn.close()


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


class Faults:
    """A connection factory whose connections can be made read-only or 'full' (for the next open)."""

    def __init__(self) -> None:
        self.readonly = False
        self.full = False
        self.opens = 0

    def __call__(self, path: str) -> sqlite3.Connection:
        self.opens += 1
        if self.readonly:
            conn = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None)
        else:
            conn = sqlite3.connect(path, isolation_level=None)
        if self.full:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {max(pages, 1)}")
        return conn


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def make_sqlite(db: Path) -> Iterator[Callable[..., SQLiteLedger]]:
    made: list[SQLiteLedger] = []

    def make(**kw: object) -> SQLiteLedger:
        ledger = SQLiteLedger(kw.pop("path", db), **kw)  # type: ignore[arg-type]
        made.append(ledger)
        return ledger

    yield make
    for ledger in made:  # release writer threads of ledgers a test did not close
        if not ledger._closed:
            asyncio.run(ledger.close())


# -- aggregation and queries (both backends) -----------------------------------------------------------
@pytest.fixture(params=["memory", "sqlite"])
def ledger(request: pytest.FixtureRequest, make_sqlite: Callable[..., SQLiteLedger]) -> Ledger:
    if request.param == "memory":
        return MemoryLedger()
    return make_sqlite(flush_interval=60.0)


def test_both_backends_implement_the_protocol(ledger: Ledger) -> None:
    assert isinstance(ledger, Ledger)


def test_records_of_one_key_model_minute_add_up_into_one_row(ledger: Ledger) -> None:
    for i in range(5):
        ledger.record(
            rec(
                ts=T0 + i * 10,
                prompt_tokens=100,
                cached_prompt_tokens=40,
                completion_tokens=20,
                reasoning_tokens=5,
                cost_micro_usd=1500,
            )
        )
    ledger.record(rec(ts=T0 + 60, prompt_tokens=1))  # next minute
    ledger.record(rec(model="claude", prompt_tokens=2))
    ledger.record(rec(tenant="other", prompt_tokens=3))
    ledger.record(rec(key="k2", prompt_tokens=4, requests=0))
    assert ledger.flush_now()

    rows = ledger.query(group_by=("key_id", "tenant", "model", "minute"))
    assert [(r.key_id, r.tenant, r.model, r.period, r.requests, r.prompt_tokens) for r in rows] == [
        ("k1", "acme", "claude", int(T0), 1, 2),
        ("k1", "acme", "gpt-4o", int(T0), 5, 500),
        ("k1", "acme", "gpt-4o", int(T0) + 60, 1, 1),
        ("k1", "other", "gpt-4o", int(T0), 1, 3),
        ("k2", "acme", "gpt-4o", int(T0), 0, 4),
    ]
    first = rows[1]
    assert (first.cached_prompt_tokens, first.completion_tokens, first.reasoning_tokens) == (200, 100, 25)
    assert first.cost_micro_usd == 7500
    assert ledger.stats().recorded_records == 9


def test_query_filters_and_groupings(ledger: Ledger) -> None:
    ledger.record(rec("a", T0, prompt_tokens=1))
    ledger.record(rec("a", T0 + 3600, prompt_tokens=10))
    ledger.record(rec("b", T0 + 7200, prompt_tokens=100, model="claude"))
    ledger.record(rec("c", T0 + 86400, prompt_tokens=1000, tenant="beta"))
    ledger.flush_now()

    assert [(r.key_id, r.model, r.prompt_tokens) for r in ledger.query()] == [
        ("a", "gpt-4o", 11),
        ("b", "claude", 100),
        ("c", "gpt-4o", 1000),
    ]
    assert ledger.query(key_id="a")[0].first_minute == int(T0)
    assert ledger.query(key_id="a")[0].last_minute == int(T0) + 3600
    assert [r.prompt_tokens for r in ledger.query(tenant="beta")] == [1000]
    assert [r.prompt_tokens for r in ledger.query(model="claude")] == [100]
    # since is floored to its minute; until is exclusive
    assert totals(ledger.query(since=T0 + 59, until=T0 + 7200))[1] == 11
    assert totals(ledger.query(since=T0 + 61))[1] == 1110
    (total,) = ledger.query(group_by=())
    assert (total.key_id, total.model, total.period, total.prompt_tokens) == (None, None, None, 1111)
    by_day = ledger.query(group_by=("day",))
    assert [r.prompt_tokens for r in by_day] == [11, 1100]  # T0 + 7200 is past midnight UTC
    assert all(r.period is not None and r.period % 86400 == 0 for r in by_day)
    assert [r.tenant for r in ledger.query(group_by=["tenant"])] == ["acme", "beta"]
    assert ledger.query(key_id="nobody") == []
    assert ledger.query(key_id="nobody", group_by=()) == []


@pytest.mark.parametrize("bad", [("key",), ("minute", "hour"), ("model", "model")])
def test_bad_group_by_is_a_value_error(ledger: Ledger, bad: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        ledger.query(group_by=bad)


_records = st.lists(
    st.builds(
        UsageRecord,
        key_id=st.sampled_from(["a", "b", "ü"]),
        tenant=st.sampled_from(["", "t1", "t2"]),
        model=st.sampled_from(["gpt-4o", "claude", "o3"]),
        source=st.sampled_from(["", "reported", "counted"]),
        price_rule=st.sampled_from(["", "gpt-*", "unpriced:charged"]),
        ts=st.floats(min_value=T0 - 3 * 86400, max_value=T0 + 3 * 86400),
        requests=st.integers(0, 3),
        prompt_tokens=st.integers(0, 10**6),
        cached_prompt_tokens=st.integers(0, 10**6),
        completion_tokens=st.integers(0, 10**6),
        reasoning_tokens=st.integers(0, 10**6),
        cost_micro_usd=st.integers(0, 10**9),
    ),
    max_size=40,
)
_groupings = st.sampled_from(
    [
        (),
        ("key_id", "model"),
        ("tenant",),
        ("model", "hour"),
        ("day", "key_id"),
        ("key_id", "tenant", "model", "minute"),
    ]
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    records=_records,
    group_by=_groupings,
    since=st.none() | st.floats(T0 - 86400, T0 + 86400),
    key=st.none() | st.sampled_from(["a", "ü"]),
    batches=st.integers(1, 3),
)
def test_sqlite_and_memory_answer_every_query_alike(
    tmp_path: Path,
    records: list[UsageRecord],
    group_by: tuple[str, ...],
    since: float | None,
    key: str | None,
    batches: int,
) -> None:
    """One contract for both backends, and flushing in several batches gives the same sums as one."""
    path = tmp_path / f"h{time.monotonic_ns()}.db"
    sqlite_ledger = SQLiteLedger(path, flush_interval=60.0)
    memory = MemoryLedger()
    try:
        for i, r in enumerate(records):
            sqlite_ledger.record(r)
            memory.record(r)
            if batches > 1 and i % batches == 0:
                assert sqlite_ledger.flush_now()
        assert sqlite_ledger.flush_now()
        kw = {"group_by": group_by, "since": since, "key_id": key}
        assert sqlite_ledger.query(**kw) == memory.query(**kw)  # type: ignore[arg-type]
    finally:
        asyncio.run(sqlite_ledger.close())


@settings(max_examples=40, deadline=None)
@given(records=_records, bound=st.integers(1, 50))
def test_sqlite_and_memory_aggregate_the_same_records_into_the_same_rows(
    records: list[UsageRecord], bound: int
) -> None:
    """Both backends aggregate with the one function in stores/ledger/aggregate.py: fed the same records
    under the same row bound, the SQLite ledger's pending batch and the memory ledger's table hold the
    same rows (per-row record counts included) and both drop the same records."""
    with tempfile.TemporaryDirectory() as tmp:
        sqlite_ledger = SQLiteLedger(Path(tmp) / "agg.db", flush_interval=60.0, max_pending=bound)
        memory = MemoryLedger(max_rows=bound)
        try:
            for r in records:
                sqlite_ledger.record(r)
                memory.record(r)
            assert sqlite_ledger._pending == memory._table
            assert sqlite_ledger.stats().recorded_records == memory.stats().recorded_records
            assert sqlite_ledger.stats().dropped_records == memory.stats().dropped_records
        finally:
            sqlite_ledger._pending = {}  # compared, not worth writing
            asyncio.run(sqlite_ledger.close())


@settings(max_examples=40, deadline=None)
@given(records=_records, bound=st.integers(1, 50))
def test_record_usage_is_record_of_one_request_without_the_record(
    records: list[UsageRecord], bound: int
) -> None:
    """The engine's per-response path (`record_usage`: the fields, no UsageRecord) adds into the same rows
    as `record` of the same one-request record, on both backends, under the same bound (drops too)."""
    records = [r for r in records if r.requests == 1]
    with tempfile.TemporaryDirectory() as tmp:
        for make in (
            lambda: MemoryLedger(max_rows=bound),
            lambda: SQLiteLedger(
                Path(tmp) / f"u{time.monotonic_ns()}.db", flush_interval=60.0, max_pending=bound
            ),
        ):
            by_record, by_fields = make(), make()
            try:
                for r in records:
                    by_record.record(r)
                    by_fields.record_usage(
                        r.key_id,
                        r.tenant,
                        r.model,
                        r.ts,
                        r.prompt_tokens,
                        r.cached_prompt_tokens,
                        r.completion_tokens,
                        r.reasoning_tokens,
                        r.cost_micro_usd,
                        r.source,
                        r.price_rule,
                    )
                for ledger in (by_record, by_fields):
                    if isinstance(ledger, SQLiteLedger):
                        assert ledger.flush_now()
                assert by_fields.query(
                    group_by=("key_id", "tenant", "model", "minute", "source", "price_rule")
                ) == (
                    by_record.query(group_by=("key_id", "tenant", "model", "minute", "source", "price_rule"))
                )
                assert by_fields.stats().recorded_records == by_record.stats().recorded_records
                assert by_fields.stats().dropped_records == by_record.stats().dropped_records
            finally:
                for ledger in (by_record, by_fields):
                    if isinstance(ledger, SQLiteLedger):
                        asyncio.run(ledger.close())


# -- batching ------------------------------------------------------------------------------------------
def test_flushes_on_the_interval(make_sqlite: Callable[..., SQLiteLedger], db: Path) -> None:
    async def run() -> None:
        ledger = make_sqlite(flush_interval=0.05, batch_size=1000)
        await ledger.start()
        ledger.record(rec())
        ledger.record(rec(prompt_tokens=5))
        await wait_for(lambda: ledger.stats().flushes >= 1)
        assert ledger.stats().pending_rows == 0
        assert totals(ledger.query())[:2] == (2, 5)
        await ledger.close()

    asyncio.run(run())


def test_flushes_when_batch_size_rows_are_pending(make_sqlite: Callable[..., SQLiteLedger]) -> None:
    async def run() -> None:
        ledger = make_sqlite(flush_interval=3600.0, batch_size=100)
        await ledger.start()
        for i in range(99):
            ledger.record(rec(f"k{i}"))
        for _ in range(50):  # more records into existing rows do not count towards the batch size
            ledger.record(rec("k0"))
        await asyncio.sleep(0.1)
        assert ledger.stats().flushes == 0 and ledger.stats().pending_rows == 99
        ledger.record(rec("k99"))
        await wait_for(lambda: ledger.stats().flushes == 1)
        stats = ledger.stats()
        assert (stats.flushed_rows, stats.flushed_records, stats.pending_rows) == (100, 150, 0)
        await ledger.close()

    asyncio.run(run())


def test_close_does_a_final_flush(make_sqlite: Callable[..., SQLiteLedger], db: Path) -> None:
    async def run() -> None:
        ledger = make_sqlite(flush_interval=3600.0, batch_size=10**6)
        await ledger.start()
        for i in range(1000):
            ledger.record(rec(f"k{i % 37}", T0 + i, completion_tokens=3))
        assert ledger.stats().flushes == 0
        await ledger.close()
        ledger.record(rec())  # after close: counted, not silently lost
        assert ledger.stats().dropped_records == 1

    asyncio.run(run())
    rows = query_db(db, group_by=())
    assert totals(rows)[:4] == (1000, 0, 0, 3000)


def test_several_flushes_of_one_minute_add_up(make_sqlite: Callable[..., SQLiteLedger], db: Path) -> None:
    ledger = make_sqlite()
    for _ in range(3):
        ledger.record(rec(prompt_tokens=7))
        assert ledger.flush_now()
    assert rows_in_db(db) == 1
    assert [(r.requests, r.prompt_tokens) for r in ledger.query()] == [(3, 21)]


def test_two_ledgers_flushing_into_one_file_concurrently_add_up(
    make_sqlite: Callable[..., SQLiteLedger], db: Path
) -> None:
    ledgers = [make_sqlite(busy_timeout=5.0), make_sqlite(busy_timeout=5.0)]
    start = threading.Barrier(2)
    results: list[bool] = []

    def work(ledger: SQLiteLedger) -> None:  # each ledger owned by its own thread
        start.wait()
        for i in range(200):
            ledger.record(rec(f"k{i % 5}", T0 + (i % 3) * 60, prompt_tokens=1, cost_micro_usd=2))
            if i % 10 == 9:
                results.append(ledger.flush_now())

    threads = [threading.Thread(target=work, args=(led,)) for led in ledgers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results and all(results)
    assert totals(query_db(db, group_by=())) == (400, 400, 0, 0, 0, 800)
    assert rows_in_db(db) == 15


_CHILD = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {repo!r})
    from nexus_authz.stores.ledger import SQLiteLedger, UsageRecord
    ledger = SQLiteLedger({db!r}, busy_timeout=10.0)
    mode = sys.argv[1]
    for i in range(int(sys.argv[2])):
        ledger.record(UsageRecord("k%d" % (i % 4), "acme", "gpt-4o", {t0!r}, prompt_tokens=1))
        if i % 25 == 24:
            assert ledger.flush_now()
    ledger.flush_now()
    if mode == "crash":
        ledger.record(UsageRecord("lost", "acme", "gpt-4o", {t0!r}, prompt_tokens=999))
        os._exit(9)  # no close(), no atexit: what SIGKILL or an OOM kill leaves behind
    """
)


def _child(db: Path, mode: str, n: int) -> subprocess.Popen[bytes]:
    code = _CHILD.format(repo=str(REPO), db=str(db), t0=T0)
    return subprocess.Popen([sys.executable, "-c", code, mode, str(n)])


def test_two_processes_flushing_into_one_file_add_up(db: Path) -> None:
    procs = [_child(db, "ok", 500), _child(db, "ok", 500)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert totals(query_db(db, group_by=()))[:2] == (1000, 1000)


def test_a_crash_keeps_everything_flushed_before_it(db: Path) -> None:
    proc = _child(db, "crash", 100)
    assert proc.wait(timeout=60) == 9
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
    rows = query_db(db)
    assert [r.key_id for r in rows] == ["k0", "k1", "k2", "k3"]  # the unflushed "lost" record is gone
    assert totals(rows)[:2] == (100, 100)


# -- the writer thread ---------------------------------------------------------------------------------
def test_the_event_loop_thread_never_executes_sqlite(make_sqlite: Callable[..., SQLiteLedger]) -> None:
    threads: set[int] = set()
    statements: list[str] = []

    def connect(path: str) -> sqlite3.Connection:
        threads.add(threading.get_ident())
        conn = sqlite3.connect(path, isolation_level=None)  # check_same_thread stays on

        def trace(sql: str) -> None:
            threads.add(threading.get_ident())
            statements.append(sql)

        conn.set_trace_callback(trace)
        return conn

    async def run() -> int:
        ledger = make_sqlite(flush_interval=0.02, batch_size=50, connect=connect)
        await ledger.start()
        for i in range(500):  # size-triggered flushes
            ledger.record(rec(f"k{i}"))
            if i % 50 == 0:
                await asyncio.sleep(0)
        await wait_for(lambda: ledger.stats().pending_rows == 0)
        ledger.record(rec("late"))  # interval-triggered flush
        await wait_for(lambda: ledger.stats().flushed_rows == 501)
        ledger.record(rec("last"))  # close's final flush
        await ledger.close()
        return threading.get_ident()

    loop_thread = asyncio.run(run())
    assert any("INSERT INTO usage" in s for s in statements)
    assert loop_thread not in threads
    assert len(threads) == 1  # one writer thread did all of it


# -- faults --------------------------------------------------------------------------------------------
def test_read_only_database_keeps_records_until_it_is_writable(
    make_sqlite: Callable[..., SQLiteLedger], db: Path
) -> None:
    faults = Faults()
    ledger = make_sqlite(connect=faults)
    ledger.record(rec(prompt_tokens=1))
    assert ledger.flush_now()  # creates the file
    faults.readonly = True
    ledger.record(rec(prompt_tokens=10))
    assert ledger.flush_now()  # the open connection is still writable
    asyncio.run(_reopen(ledger))
    ledger.record(rec(prompt_tokens=100))
    assert not ledger.flush_now()
    stats = ledger.stats()
    assert stats.pending_rows == 1 and stats.consecutive_failures == 1
    assert stats.last_error is not None and "readonly" in stats.last_error
    ledger.record(rec(prompt_tokens=1000))  # merged with the buffered batch
    assert not ledger.flush_now()
    faults.readonly = False
    assert ledger.flush_now()
    assert [(r.requests, r.prompt_tokens) for r in ledger.query()] == [(4, 1111)]
    assert ledger.stats().consecutive_failures == 0 and ledger.stats().dropped_records == 0


async def _reopen(ledger: SQLiteLedger) -> None:
    """Make the ledger open a fresh connection next time (as it does after any failure)."""
    await asyncio.get_running_loop().run_in_executor(ledger._executor, ledger._discard_conn)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_file_permissions(make_sqlite: Callable[..., SQLiteLedger], db: Path) -> None:
    ledger = make_sqlite()
    ledger.record(rec())
    assert ledger.flush_now()
    asyncio.run(_reopen(ledger))
    os.chmod(db, 0o444)
    try:
        ledger.record(rec())
        assert not ledger.flush_now()
    finally:
        os.chmod(db, 0o644)
    assert ledger.flush_now()
    assert totals(ledger.query())[0] == 2


def test_locked_database_keeps_records_until_the_lock_goes(
    make_sqlite: Callable[..., SQLiteLedger], db: Path
) -> None:
    ledger = make_sqlite(busy_timeout=0.05)
    ledger.record(rec())
    assert ledger.flush_now()
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        ledger.record(rec(prompt_tokens=5))
        ledger.record(rec("k2", prompt_tokens=6))
        assert not ledger.flush_now()
        assert ledger.stats().pending_rows == 2
        assert "locked" in (ledger.stats().last_error or "")
        # readers are not blocked by the writer's lock (WAL): the CLI works while the server writes
        assert totals(query_db(db, group_by=()))[0] == 1
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert ledger.flush_now()
    assert [(r.key_id, r.requests, r.prompt_tokens) for r in ledger.query()] == [("k1", 2, 5), ("k2", 1, 6)]


def test_full_disk_keeps_records_until_there_is_room(
    make_sqlite: Callable[..., SQLiteLedger], db: Path
) -> None:
    faults = Faults()
    ledger = make_sqlite(connect=faults)
    ledger.record(rec())
    assert ledger.flush_now()
    faults.full = True
    asyncio.run(_reopen(ledger))
    for i in range(2000):
        ledger.record(rec(f"key-with-a-long-name-{i}", prompt_tokens=1))
    assert not ledger.flush_now()
    assert "full" in (ledger.stats().last_error or "")
    assert not ledger.flush_now()  # still full: still buffered
    assert ledger.stats().pending_rows == 2000
    faults.full = False
    assert ledger.flush_now()
    assert totals(ledger.query(group_by=()))[:2] == (2001, 2000)


def test_beyond_max_pending_records_are_dropped_and_counted_once_per_episode(
    make_sqlite: Callable[..., SQLiteLedger], db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = make_sqlite(busy_timeout=0.01, max_pending=10)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    caplog.set_level(logging.INFO, logger="nexus_authz.ledger")
    try:
        for i in range(6):
            ledger.record(rec(f"k{i}"))
        assert not ledger.flush_now()
        for i in range(6, 15):  # 4 more rows fit, 5 are dropped
            ledger.record(rec(f"k{i}"))
        for _ in range(3):  # an existing pending row still takes records
            ledger.record(rec("k7"))
        stats = ledger.stats()
        assert (stats.pending_rows, stats.dropped_records, stats.recorded_records) == (10, 5, 13)
        assert not ledger.flush_now()
    finally:
        other.execute("ROLLBACK")
        other.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "dropping" in r.getMessage()]
    assert len(warnings) == 1
    assert ledger.flush_now()
    assert ledger.stats().pending_rows == 0
    assert totals(ledger.query(group_by=()))[0] == 13
    assert any("5 usage records were dropped" in r.getMessage() for r in caplog.records)
    assert ledger.stats().dropped_records == 5


def test_the_flush_task_retries_with_backoff_until_the_fault_clears(
    make_sqlite: Callable[..., SQLiteLedger], db: Path
) -> None:
    async def run() -> None:
        ledger = make_sqlite(flush_interval=0.02, max_backoff=0.1, busy_timeout=0.01)
        await ledger.start()
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        ledger.record(rec(prompt_tokens=3))
        await wait_for(lambda: ledger.stats().consecutive_failures >= 3)
        ledger.record(rec(prompt_tokens=4))
        other.execute("ROLLBACK")
        other.close()
        await wait_for(lambda: ledger.stats().pending_rows == 0)
        stats = ledger.stats()
        assert stats.consecutive_failures == 0 and stats.failed_flushes >= 3 and stats.dropped_records == 0
        assert [(r.requests, r.prompt_tokens) for r in ledger.query()] == [(2, 7)]
        await ledger.close()

    asyncio.run(run())


def test_close_with_a_failing_store_counts_what_it_could_not_write(
    make_sqlite: Callable[..., SQLiteLedger], db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    faults = Faults()
    faults.readonly = True
    sqlite3.connect(db).close()  # an empty file: opens read-only, cannot take the schema

    async def run() -> SQLiteLedger:
        ledger = make_sqlite(flush_interval=3600.0, close_timeout=0.2, connect=faults)
        await ledger.start()
        assert ledger.stats().consecutive_failures == 1  # start() tried, logged, and carried on
        for _ in range(7):
            ledger.record(rec())
        await ledger.close()
        return ledger

    ledger = asyncio.run(run())
    assert ledger.stats().dropped_records == 7
    assert any(
        r.levelno == logging.ERROR and "7 usage records not persisted" in r.getMessage()
        for r in caplog.records
    )


def test_a_row_sqlite_cannot_store_is_dropped_and_the_rest_lands(
    make_sqlite: Callable[..., SQLiteLedger], db: Path
) -> None:
    ledger = make_sqlite()
    ledger.record(rec("good", prompt_tokens=1))
    ledger.record(rec("bad", cost_micro_usd=2**70))  # cannot be a SQLite INTEGER
    ledger.record(rec("good2", prompt_tokens=2))
    assert ledger.flush_now()
    assert [r.key_id for r in ledger.query()] == ["good", "good2"]
    assert ledger.stats().dropped_records == 1
    ledger.record(rec("good", prompt_tokens=1))
    assert ledger.flush_now()
    assert [r.prompt_tokens for r in ledger.query(key_id="good")] == [2]


def test_stats_report_flush_lag_from_the_oldest_unpersisted_record(
    make_sqlite: Callable[..., SQLiteLedger], db: Path
) -> None:
    now = [1000.0]
    ledger = make_sqlite(clock=lambda: now[0], busy_timeout=0.01)
    assert ledger.stats().flush_lag == 0.0
    ledger.record(rec())
    now[0] = 1004.0
    ledger.record(rec("k2"))
    now[0] = 1005.0
    assert ledger.stats().flush_lag == 5.0
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        assert not ledger.flush_now()
        now[0] = 1010.0
        assert ledger.stats().flush_lag == 10.0  # still counted from the first buffered record
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert ledger.flush_now()
    stats = ledger.stats()
    assert (stats.flush_lag, stats.last_flush_at, stats.pending_rows) == (0.0, 1010.0, 0)


# -- CLI -----------------------------------------------------------------------------------------------
def _usage(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli_usage.add_arguments(parser)
    return cli_usage.cmd_usage(parser.parse_args(argv), now=T0 + 3600)


def test_cli_prints_a_table_and_json_from_the_file(
    make_sqlite: Callable[..., SQLiteLedger], db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger = make_sqlite()
    ledger.record(rec("alice", T0, prompt_tokens=1200, completion_tokens=300, cost_micro_usd=4_500_000))
    ledger.record(rec("bob", T0 + 60, prompt_tokens=10, model="claude", cost_micro_usd=12))
    ledger.record(rec("alice", T0 - 2 * 86400, prompt_tokens=99))  # outside --since 24h
    assert ledger.flush_now()

    assert _usage("--db", str(db), "--since", "24h") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [
        "KEY",
        "MODEL",
        "REQUESTS",
        "PROMPT",
        "CACHED",
        "COMPLETION",
        "REASONING",
        "COST",
        "(USD)",
    ]
    assert out[1].split() == ["alice", "gpt-4o", "1", "1,200", "0", "300", "0", "$4.500000"]
    assert out[2].split() == ["bob", "claude", "1", "10", "0", "0", "0", "$0.000012"]
    assert out[-1].split() == ["TOTAL", "2", "1,210", "0", "300", "0", "$4.500012"]

    assert _usage("--db", str(db), "--key", "alice", "--since", "7d", "--by", "key,day", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(r["key_id"], r["prompt_tokens"], r["model"]) for r in doc["rows"]] == [
        ("alice", 99, None),
        ("alice", 1200, None),
    ]

    assert _usage("--db", str(db), "--key", "nobody") == 0
    assert "no usage" in capsys.readouterr().out


def test_cli_errors_are_one_line_with_an_exit_code(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _usage("--db", str(db)) == 1
    assert capsys.readouterr().err.strip() == f"nexus-authz: error: no ledger database at {db}"
    sqlite3.connect(db).close()
    assert _usage("--db", str(db), "--since", "last tuesday") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read time" in err
    with pytest.raises(SystemExit):
        _usage("--db", str(db), "--by", "colour")


def test_cli_reads_an_empty_file_as_no_usage(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sqlite3.connect(db).close()
    assert _usage("--db", str(db)) == 0
    assert "no usage" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", T0 - 86400),
        ("30m", T0 - 1800),
        ("90s", T0 - 90),
        ("7d", T0 - 7 * 86400),
        ("1w", T0 - 7 * 86400),
        ("now", T0),
        ("1700000000", 1_700_000_000.0),
        ("2023-11-14T22:13:20Z", 1_700_000_000.0),
        ("2023-11-14T22:13:20", 1_700_000_000.0),
        ("2023-11-14T23:13:20+01:00", 1_700_000_000.0),
        ("2023-11-14", 1_699_920_000.0),
    ],
)
def test_parse_time(text: str, expected: float) -> None:
    assert cli_usage.parse_time(text, T0) == expected


def test_usage_table_with_periods_and_without_rows() -> None:
    row = UsageRow("k", None, None, int(T0), 1, 2, 3, 4, 5, 6, int(T0), int(T0))
    table = cli_usage.usage_table([row], group_by=("hour", "key_id"))
    assert table.splitlines()[1].split()[:3] == ["2023-11-14", "22:00", "k"]
    assert "TOTAL" not in table
    assert cli_usage.usage_table([]) == "no usage recorded for this selection"
