"""`nexus-authz usage`: what keys used and cost, read straight from the SQLite ledger file.

It opens the file read-only, so it works while the server runs (WAL lets a reader see every committed
flush without blocking the writer) and can never damage the ledger. It shows what has been flushed,
i.e. up to about one flush interval behind the server. The query-API flavour (asking a running server)
comes with the policy API; this one needs only the file.

The lead's CLI wires it as a subcommand: `add_arguments(parser)` then `cmd_usage(args)`.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime

from nexus_authz.stores.ledger import DEFAULT_GROUP_BY, GROUP_FIELDS, UsageRow, query_db

__all__ = ["add_arguments", "cmd_usage", "main", "parse_time", "rows_to_json", "usage_table"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PERIOD_FORMAT = {"minute": "%Y-%m-%d %H:%M", "hour": "%Y-%m-%d %H:00", "day": "%Y-%m-%d"}


def parse_time(text: str, now: float) -> float:
    """A point in time: a duration back from now ("90s", "30m", "24h", "7d", "2w"), epoch seconds, or
    an ISO 8601 date/time (UTC unless it says otherwise). ValueError names what was expected."""
    text = text.strip()
    m = _DURATION.match(text)
    if m:
        return now - float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()]
    if text.lower() == "now":
        return now
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"cannot read time {text!r}: expected a duration like 24h/30m/7d, epoch seconds, "
            "or an ISO 8601 date/time"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _usd(micro: int) -> str:
    return f"${micro / 1_000_000:,.6f}"


def _int(n: int) -> str:
    return f"{n:,}"


def _period_text(row: UsageRow, unit: str | None) -> str:
    if row.period is None or unit is None:
        return ""
    return time.strftime(_PERIOD_FORMAT[unit], time.gmtime(row.period))


def _field_getter(name: str) -> Callable[[UsageRow], str]:
    def get(row: UsageRow) -> str:
        value = getattr(row, name)
        return str(value) if value else "-"

    return get


def usage_table(rows: Sequence[UsageRow], *, group_by: Sequence[str] | None = None) -> str:
    """A plain-text table: one column per grouping field, then the sums, and a TOTAL line when there
    is more than one row. Grouping columns come from `group_by`, else from the fields the rows set."""
    if group_by is None:
        group_by = [
            f
            for f in ("key_id", "tenant", "model", "source", "price_rule")
            if any(getattr(r, f) is not None for r in rows)
        ]
        if any(r.period is not None for r in rows):
            group_by.insert(0, "minute")
    unit = next((f for f in group_by if f in _PERIOD_FORMAT), None)
    group_cols: list[tuple[str, Callable[[UsageRow], str]]] = []
    for f in group_by:
        if f in _PERIOD_FORMAT:
            group_cols.append(((f.upper() + " (UTC)"), lambda r: _period_text(r, unit)))
        else:
            group_cols.append(
                ({"key_id": "KEY", "price_rule": "PRICE RULE"}.get(f, f.upper()), _field_getter(f))
            )
    sum_cols: list[tuple[str, Callable[[UsageRow], str]]] = [
        ("REQUESTS", lambda r: _int(r.requests)),
        ("PROMPT", lambda r: _int(r.prompt_tokens)),
        ("CACHED", lambda r: _int(r.cached_prompt_tokens)),
        ("COMPLETION", lambda r: _int(r.completion_tokens)),
        ("REASONING", lambda r: _int(r.reasoning_tokens)),
        ("COST (USD)", lambda r: _usd(r.cost_micro_usd)),
    ]
    header = [name for name, _ in group_cols] + [name for name, _ in sum_cols]
    body = [[fn(r) for _, fn in group_cols] + [fn(r) for _, fn in sum_cols] for r in rows]
    if not body:
        return "no usage recorded for this selection"
    footer: list[list[str]] = []
    if len(rows) > 1:
        total = [
            _int(sum(r.requests for r in rows)),
            _int(sum(r.prompt_tokens for r in rows)),
            _int(sum(r.cached_prompt_tokens for r in rows)),
            _int(sum(r.completion_tokens for r in rows)),
            _int(sum(r.reasoning_tokens for r in rows)),
            _usd(sum(r.cost_micro_usd for r in rows)),
        ]
        label = ["TOTAL"] + [""] * (len(group_cols) - 1) if group_cols else []
        footer = [label + total]
    widths = [max(len(line[i]) for line in [header, *body, *footer]) for i in range(len(header))]
    n_group = len(group_cols)

    def fmt(line: list[str]) -> str:
        cells = [
            cell.ljust(widths[i]) if i < n_group else cell.rjust(widths[i]) for i, cell in enumerate(line)
        ]
        return "  ".join(cells).rstrip()

    out = [fmt(header), *(fmt(line) for line in body)]
    if footer:
        out.append("  ".join("-" * w for w in widths))
        out.append(fmt(footer[0]))
    return "\n".join(out)


def rows_to_json(rows: Sequence[UsageRow]) -> str:
    """One JSON document for scripts: {"rows": [...]} with every UsageRow field (None when not grouped)."""
    return json.dumps({"rows": [asdict(r) for r in rows]}, indent=2)


# What --by accepts, in the words of both its help and its errors (`key` is the ledger's key_id).
BY_NAMES = "key, tenant, model, source, price_rule and at most one of minute, hour, day"


def _group_by_arg(text: str) -> tuple[str, ...]:
    fields = tuple(f.strip() for f in text.split(",") if f.strip())
    aliases = {"key": "key_id"}
    fields = tuple(aliases.get(f, f) for f in fields)
    for f in fields:
        if f not in GROUP_FIELDS:
            raise argparse.ArgumentTypeError(f"unknown field {f!r}: expected {BY_NAMES}, comma-separated")
    if sum(f in _PERIOD_FORMAT for f in fields) > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {BY_NAMES}, comma-separated")
    return fields


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `nexus-authz usage` (reading the ledger file)."""
    p.add_argument("--db", help="the ledger's SQLite file (default: ledger.path of the config file)")
    p.add_argument("--key", dest="key_id", help="only this key id")
    p.add_argument("--tenant", help="only this tenant")
    p.add_argument("--model", help="only this model")
    p.add_argument(
        "--since", default="24h", help="start: a duration back from now (24h, 30m, 7d), epoch or ISO 8601"
    )
    p.add_argument("--until", help="end (exclusive), same forms as --since (default: now)")
    p.add_argument(
        "--by",
        dest="group_by",
        type=_group_by_arg,
        default=DEFAULT_GROUP_BY,
        help=f"group by these fields, comma-separated: {BY_NAMES} (default: key,model)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cmd_usage(args: argparse.Namespace, *, now: float | None = None) -> int:
    """Run `usage`: 0 ok, 1 no/unreadable ledger file, 2 bad arguments; errors are one line on stderr."""
    now = time.time() if now is None else now
    try:
        since = parse_time(args.since, now) if args.since else None
        until = parse_time(args.until, now) if args.until else None
        rows = query_db(
            args.db,
            key_id=args.key_id,
            tenant=args.tenant,
            model=args.model,
            since=since,
            until=until,
            group_by=args.group_by,
        )
    except ValueError as exc:
        print(f"nexus-authz: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError:
        print(f"nexus-authz: error: no ledger database at {args.db}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print(f"nexus-authz: error: cannot read the ledger {args.db}: {exc}", file=sys.stderr)
        return 1
    print(rows_to_json(rows) if args.json else usage_table(rows, group_by=args.group_by))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nexus-authz usage", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return cmd_usage(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
