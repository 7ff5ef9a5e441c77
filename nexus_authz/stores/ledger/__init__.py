"""The usage ledger: what each key used and cost, per model and minute, kept for reporting and GetUsage.

Records are aggregated in memory (one dict keyed by (key_id, tenant, model, minute)) and written in
batches, because a row per request would cost a disk write per request and the ledger only ever
answers per-minute questions. `SQLiteLedger` persists to one SQLite file (WAL, upserts that add, so
several flushes of one minute and several processes sharing the file add up); `MemoryLedger` keeps
the same aggregation in memory for tests and `ledger: {backend: memory}`.

Modules: `types` (records, rows, stats, the `Ledger` protocol), `aggregate` (the per key/tenant/model/
minute aggregation both backends use), `query` (the SQLite schema, `query_db` and its in-memory twin),
`sqlite` (`SQLiteLedger`: the writer thread), `memory` (`MemoryLedger`).
"""

from nexus_authz.stores.ledger.memory import MemoryLedger
from nexus_authz.stores.ledger.query import query_db
from nexus_authz.stores.ledger.sqlite import SQLiteLedger
from nexus_authz.stores.ledger.types import (
    DEFAULT_GROUP_BY,
    GROUP_FIELDS,
    Ledger,
    LedgerStats,
    UsageRecord,
    UsageRow,
)

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
