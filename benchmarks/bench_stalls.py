"""Structural stalls of the event loop's work, in process: the longest checks and settlements of a long run.

    .venv/bin/python benchmarks/bench_stalls.py [--n 300000] [--lag 20] [--over 150]

Target 6 of the performance issue: no event-loop callback over 200 µs. Through Envoy (run_all.py) a
callback's own CPU also moves with the machine (other processes, the host), so a stall that nexus-authz
makes itself every few thousand requests hides in that noise. This finds those: the compiled HTTP check
and the access log's compiled settlement (the same calls a loop callback makes: `data_received` of one
request, `als_fast.ACCOUNT` of one entry) run back to back N times in one process, each settling the
request made --lag checks before it (the reservations in flight at 1,000 requests/s with a 20 ms access-log
flush), each timed in thread CPU. Printed: how many took longer than --over µs, the longest of each, and
the commonest distance between two slow calls of a kind (a table rebuilt or freed every K calls shows up
as K repeating; machine noise does not repeat). The book, the windows and the settled-ids record grow to
their working size as under load (bench_alloc's fast path: one key, bench_envoy's LIMITS_CONFIG).

Found with it: the settled-ids record freed a chunk of 4,096 ids at once, 110-235 µs every 4,096
settlements; in chunks of 512 the longest settlement left is machine noise.
"""

from __future__ import annotations

import argparse
import collections
import gc
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import bench_alloc as ba  # noqa: E402

from nexus_authz import native, server  # noqa: E402
from nexus_authz.adapters import als_fast  # noqa: E402


def period(indices: list[int]) -> tuple[int, int]:
    """The commonest distance between two successive indices and how often it occurs ((0, 0): none)."""
    gaps = collections.Counter(b - a for a, b in zip(indices, indices[1:], strict=False))
    return gaps.most_common(1)[0] if gaps else (0, 0)


def _note(
    kind: str,
    i: int,
    took: int,
    keys: int,
    limit: int,
    slow: dict[str, list[tuple[int, int]]],
    longest: dict[str, int],
    seen: dict[str, int],
) -> None:
    """Record call `i` of `kind` that took `took` ns of thread CPU."""
    if took > longest[kind]:
        longest[kind] = took
    if i >= keys and took > seen[kind]:
        seen[kind] = took
    if took > limit:
        slow[kind].append((i, took))


def run(
    n: int, lag: int, over_us: float, keys: int = 1, plan: str = "limits", rate: float = 0.0
) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="nexus-stalls-"))
    if plan == "issue15":  # bench_envoy's http-uds-issue15 configuration (five windows a key)
        be = ba.be
        fp = ba.build_fastpath(workdir, keys, config_extra=be.ISSUE15_CONFIG, key_fields=be.LIMITS_KEY_FIELDS)
    else:
        fp = ba.build_fastpath(workdir, keys)
    ids = [f"5f2d6f1e-1c7b-4a53-9d2e-{i:012d}" for i in range(n)]
    raws = [ba.ext_authz_request(fp.secrets[i % keys], rid) for i, rid in enumerate(ids)]
    receive, engine, usage = fp.proto.data_received, fp.engine, ba.USAGE
    compiled = als_fast.ACCOUNT
    clock = time.thread_time_ns
    limit = int(over_us * 1000)
    slow: dict[str, list[tuple[int, int]]] = {"check": [], "settle": [], "upkeep": []}
    longest = {"check": 0, "settle": 0, "upkeep": 0}
    seen = {"check": 0, "settle": 0, "upkeep": 0}  # the longest once every key was seen
    tick = [0]
    every = 0
    if rate > 0:  # the engine's clock at `rate` checks a second: minutes pass, windows drain, pairs refresh
        start = time.time()
        engine.clock = lambda: start + tick[0] / rate
        every = max(1, round(rate))
    gc.collect()
    gc.freeze()  # as the server's upkeep does (gcupkeep.settle)
    for i, raw in enumerate(raws):
        tick[0] = i
        if every and i % every == 0:  # a simulated second: the server's upkeep, each slice timed
            if engine.ledger is not None:
                engine.ledger.flush_now()  # (its writer thread's work: untimed)
            steps = server._maintenance_steps(engine)
            while True:
                t0 = clock()
                more = next(steps, steps)
                took = clock() - t0
                if more is steps:
                    break
                _note("upkeep", i, took, keys, limit, slow, longest, seen)
        t0 = clock()
        receive(raw)
        t1 = clock()
        if i >= lag:
            rid = ids[i - lag]
            if compiled is None or not compiled(engine, rid, usage, None):
                engine.account(rid, usage)
        t2 = clock()
        _note("check", i, t1 - t0, keys, limit, slow, longest, seen)
        _note("settle", i, t2 - t1, keys, limit, slow, longest, seen)
    if not fp.sink.last.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"the benchmark request is not allowed: {fp.sink.last[:200]!r}")
    return {"slow": slow, "longest": longest, "seen": seen, "book": len(engine.book)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=300_000, help="checks (and settlements)")
    ap.add_argument("--lag", type=int, default=20, help="requests in flight: each settles this many later")
    ap.add_argument("--over", type=float, default=150.0, help="µs of thread CPU that make a call slow")
    ap.add_argument("--keys", type=int, default=1, help="keys, round-robin (bench_envoy's 10,000-key run)")
    ap.add_argument(
        "--plan",
        choices=("limits", "issue15"),
        default="limits",
        help="the keys' plan: bench_envoy's http-uds-limits one, or its issue-15 one (five windows)",
    )
    ap.add_argument(
        "--list",
        type=float,
        default=0.0,
        metavar="US",
        help="also list every call over US µs with its index (a structural stall comes back at the same "
        "index in every run; the machine's do not)",
    )
    ap.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="the engine's clock advances 1/RATE s a check, and the server's upkeep of a second (its "
        "slices timed as `upkeep`; the ledger flushed, untimed) runs every RATE checks: 300,000 checks at "
        "1000 are five minutes of a 1,000 req/s server. 0 (default): the real clock, no upkeep",
    )
    args = ap.parse_args(argv)
    if args.n <= args.lag or args.lag < 0 or args.over <= 0 or args.keys < 1 or args.rate < 0:
        ap.error("need --n > --lag >= 0, --over > 0, --keys >= 1 and --rate >= 0")
    r = run(args.n, args.lag, args.over, args.keys, args.plan, args.rate)
    print(f"native path: {native.PATH}; {args.n:,} checks of {args.keys:,} key(s)", end="")
    clocked = f", the clock at {args.rate:g} checks/s with the upkeep" if args.rate > 0 else ""
    print(f" ({args.plan} plan{clocked}),", end="")
    print(f" each settled {args.lag} checks later", end="")
    print(f" (reservations in the book at the end: {r['book']})")
    slow: dict[str, list[tuple[int, int]]] = r["slow"]  # type: ignore[assignment]
    longest: dict[str, int] = r["longest"]  # type: ignore[assignment]
    seen: dict[str, int] = r["seen"]  # type: ignore[assignment]
    for kind in ("check", "settle", "upkeep") if args.rate > 0 else ("check", "settle"):
        calls = slow[kind]
        every, times = period([i for i, _ in calls])
        repeat = f"; commonest distance between two: {every:,} calls ({times} times)" if times > 1 else ""
        later = f" ({seen[kind] / 1000:,.0f} µs once every key was seen)" if args.keys > 1 else ""
        print(
            f"{kind}: {len(calls)} over {args.over:g} µs, the longest {longest[kind] / 1000:,.0f} µs"
            f"{later}{repeat}"
        )
    if args.list > 0:
        for kind in slow:
            listed = [f"{i:,} ({took / 1000:,.0f} µs)" for i, took in slow[kind] if took > args.list * 1000]
            print(f"{kind} calls over {args.list:g} µs: {', '.join(listed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
