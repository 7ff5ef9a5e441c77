"""The memory ledger (`ledger: {backend: memory}`, tests): the same aggregation with no persistence."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from nexus_authz.stores.ledger import aggregate
from nexus_authz.stores.ledger.query import query_table
from nexus_authz.stores.ledger.types import DEFAULT_GROUP_BY, LedgerStats, UsageRecord, UsageRow

log = logging.getLogger("nexus_authz.ledger")


class MemoryLedger:
    """The same aggregation with no persistence: records are visible to `query` at once. Bounded by
    `max_rows` distinct (key, tenant, model, minute) rows; past it records are dropped and counted.
    Owner-thread only, like SQLiteLedger's `record` (and `query` here too: it reads the live dict)."""

    def __init__(self, *, max_rows: int = 1_000_000, clock: Callable[[], float] = time.time) -> None:
        self._table: aggregate.Table = {}
        self._max_rows = max_rows
        self._clock = clock
        self._recorded = 0
        self._dropped = 0
        self._closed = False
        self._warned = False

    def record(self, rec: UsageRecord) -> None:
        self._added(not self._closed and aggregate.add(self._table, rec, len(self._table) < self._max_rows))

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
    ) -> None:
        """`record` of one request's usage given as its fields (no UsageRecord built)."""
        table = self._table
        self._added(
            not self._closed
            and aggregate.add_usage(
                table,
                (key_id, tenant, model, int(ts - ts % 60), source, price_rule),
                prompt_tokens,
                cached_prompt_tokens,
                completion_tokens,
                reasoning_tokens,
                cost_micro_usd,
                len(table) < self._max_rows,
            )
        )

    def _added(self, added: bool) -> None:
        if added:
            self._recorded += 1
            return
        self._dropped += 1
        if not self._warned:
            self._warned = True
            log.warning("memory usage ledger full or closed; dropping usage records (counted)")

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
        return query_table(
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
