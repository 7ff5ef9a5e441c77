"""The per key/tenant/model/minute aggregation, written once for both ledgers (SQLite buffers its
pending batch in such a table, the memory ledger keeps its whole state in one).

A row is a list, not a dataclass, so the hot path updates it in place with no allocation:
[requests, prompt, cached prompt, completion, reasoning, cost, records]. With the compiled extension
loaded it is a native/_account.pyx LedgerRow: the same reads and writes, its sums kept as C integers, so
the compiled settlement adds into it with no int object per sum (`make_row`)."""

from __future__ import annotations

from collections.abc import Callable

from nexus_authz import native
from nexus_authz.stores.ledger.types import UsageRecord

Key = tuple[str, str, str, int, str, str]
"""(key_id, tenant, model, minute, source, price_rule): the minute is the epoch second (UTC) of the
minute's start; source and price_rule: UsageRecord's."""
Row = list[int]
Table = dict[Key, Row]
N_SUMS = 6
"""Row[:N_SUMS] are the sums the store keeps; Row[RECORDS] counts the records added into the row."""
RECORDS = 6


def _list_row(*values: int) -> Row:
    return list(values)


make_row: Callable[..., Row] = native.account.LedgerRow if native.account is not None else _list_row
"""A new row of its 7 values (the pure path's list, or the compiled LedgerRow)."""


def key_of(rec: UsageRecord) -> Key:
    """The row a record is added into."""
    ts = rec.ts
    return (rec.key_id, rec.tenant, rec.model, int(ts - ts % 60), rec.source, rec.price_rule)


def add(table: Table, rec: UsageRecord, new_row: bool) -> bool:
    """Add `rec` into its row of `table`. A record that needs a row the table lacks is added only if
    `new_row` (the caller's bound); False means it was not added (the caller counts it as dropped)."""
    return add_usage(
        table,
        key_of(rec),
        rec.prompt_tokens,
        rec.cached_prompt_tokens,
        rec.completion_tokens,
        rec.reasoning_tokens,
        rec.cost_micro_usd,
        new_row,
        rec.requests,
    )


def add_usage(
    table: Table,
    key: Key,
    prompt: int,
    cached: int,
    completion: int,
    reasoning: int,
    cost: int,
    new_row: bool,
    requests: int = 1,
) -> bool:
    """`add` of usage given as its fields under its row's key (one request's by default), without a
    UsageRecord: one dict lookup and the row updated in place (the per-response path)."""
    row = table.get(key)
    if row is None:
        if not new_row:
            return False
        table[key] = make_row(requests, prompt, cached, completion, reasoning, cost, 1)
        return True
    row[0] += requests
    if prompt:
        row[1] += prompt
    if cached:
        row[2] += cached
    if completion:
        row[3] += completion
    if reasoning:
        row[4] += reasoning
    if cost:
        row[5] += cost
    row[6] += 1
    return True


def merge(dst: Table, src: Table) -> None:
    """Add src's rows into dst (src is consumed; both are owned by the calling thread)."""
    for key, row in src.items():
        have = dst.get(key)
        if have is None:
            dst[key] = row
        else:
            for i in range(N_SUMS + 1):
                have[i] += row[i]


def records(table: Table) -> int:
    """How many usage records the table's rows hold."""
    return sum(row[RECORDS] for row in table.values())
