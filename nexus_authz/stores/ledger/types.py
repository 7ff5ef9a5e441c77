"""The ledger's vocabulary: one request's usage (`UsageRecord`), an aggregate (`UsageRow`), the
figures for metrics (`LedgerStats`) and the `Ledger` protocol both backends implement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

GROUP_FIELDS = ("key_id", "tenant", "model", "source", "price_rule", "minute", "hour", "day")
"""What `query(group_by=...)` accepts; at most one of minute/hour/day (UTC buckets)."""
DEFAULT_GROUP_BY = ("key_id", "model")
PERIODS = {"minute": 60, "hour": 3600, "day": 86400}


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
    # Where the usage came from (reported / counted / estimated / none: core.accounting.ledger_source)
    # and the price rule that priced it (a prices glob, "unpriced:<policy>", "" without a price table).
    source: str = ""
    price_rule: str = ""


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
    source: str | None = None  # "" in rows written before the ledger recorded it (schema 1)
    price_rule: str | None = None


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
        """`record(UsageRecord(key_id, tenant, model, ts, 1, prompt_tokens, ...))` without building the
        record (the engine's per-response path); the same rules."""
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
