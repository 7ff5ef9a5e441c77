"""The SQLite ledger (the default): batches in memory, one writer thread, one SQLite file.

Threading model (the part to get right):
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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from nexus_authz.stores.ledger import aggregate
from nexus_authz.stores.ledger.aggregate import N_SUMS, RECORDS, Key, Table
from nexus_authz.stores.ledger.query import SCHEMA, SCHEMA_VERSION, UPSERT, check_group_by, migrate, query_db
from nexus_authz.stores.ledger.types import DEFAULT_GROUP_BY, LedgerStats, UsageRecord, UsageRow

log = logging.getLogger("nexus_authz.ledger")

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
        self._pending: Table = {}
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
        self._carry: Table = {}
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
        self.record_usage(
            rec.key_id,
            rec.tenant,
            rec.model,
            rec.ts,
            rec.prompt_tokens,
            rec.cached_prompt_tokens,
            rec.completion_tokens,
            rec.reasoning_tokens,
            rec.cost_micro_usd,
            rec.source,
            rec.price_rule,
            rec.requests,
        )

    def record_usage(
        self,
        key_id: str,
        tenant: str,
        model: str,
        ts: float,
        prompt_tokens: int,
        cached_prompt_tokens: int,
        completion_tokens: int,
        reasoning_tokens: int,
        cost_micro_usd: int,
        source: str,
        price_rule: str,
        requests: int = 1,
    ) -> None:
        """`record` of one request's usage given as its fields (no UsageRecord built): one dict update
        of its pending row (aggregate.key_of's row)."""
        if self._closed:
            self._drop(1)
            return
        pending = self._pending
        n = len(pending)
        new_row = n + self._inflight_rows + self._carry_rows < self._max_pending
        if not aggregate.add_usage(
            pending,
            (key_id, tenant, model, int(ts - ts % 60), source, price_rule),
            prompt_tokens,
            cached_prompt_tokens,
            completion_tokens,
            reasoning_tokens,
            cost_micro_usd,
            new_row,
            requests,
        ):
            self._drop(1)
            return
        self._recorded += 1
        if len(pending) == n:  # added into a row it had
            return
        if n == 0:
            self._pending_first = self._clock()
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
    def _swap(self) -> tuple[Table, float | None]:
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
        lost += aggregate.records(self._pending)
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
                conn.executescript(f"BEGIN IMMEDIATE;{SCHEMA}PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
            elif version < SCHEMA_VERSION:
                migrate(conn)
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

    def _write(self, batch: Table) -> _Outcome:
        """Merge the swapped-out batch into the carry and write it in one transaction."""
        carry = self._carry
        if carry:
            if len(carry) < len(batch):
                carry, batch = batch, carry
            aggregate.merge(carry, batch)
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
        records = aggregate.records(batch)
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
    def _params(batch: Table) -> list[tuple[object, ...]]:
        return [(*key, *row[:N_SUMS]) for key, row in batch.items()]

    def _upsert(self, conn: sqlite3.Connection, batch: Table) -> None:
        params = self._params(batch)
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(UPSERT, params)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _write_rows_one_by_one(self, batch: Table) -> int:
        """A batch with a bad row (a bug upstream): write the good rows, drop and count the bad ones.
        Returns the number of records dropped, or -1 if the store itself failed meanwhile."""
        conn = self._conn
        if conn is None:
            return -1
        bad: list[Key] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for key, row in batch.items():
                conn.execute("SAVEPOINT one")
                try:
                    conn.execute(UPSERT, (*key, *row[:N_SUMS]))
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
            dropped += batch.pop(key)[RECORDS]
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
        lost = aggregate.records(self._carry)
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
            check_group_by(group_by)
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
