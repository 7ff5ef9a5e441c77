"""How many distinct cache lines the accounting of one access-log entry touches when the caches are cold
(valgrind).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_footprint_als.py [--messages 20] [--per 20]
        [--evict 8388608] [--top 14] [--keep FILE]
    .venv/bin/python benchmarks/bench_footprint_als.py --file callgrind.out --messages 20 --per 20

Under load (1,000 requests/s behind Envoy) the access-log stream delivers a message of ~20 entries every
20 ms (Envoy's buffer_flush_interval) and the process sleeps between events, so each message starts with
cold caches; its entries then share what the first ones brought in. The cost per entry tracks the distinct
memory the message's handling touches, code and data, not its instructions. This counts that memory
deterministically: the real handler (adapters/envoy_als.py `stream_access_logs`, fed serialized messages
as its gRPC handler receives them: a bytes object just written) accounts messages of --per entries built
from a real Envoy's recorded entries (benchmarks/fixtures/envoy_als_message_batch.bin, each entry's bytes
as Envoy wrote them, with the request id of a check made just before: every entry settles a real
reservation of bench_breakdown's engine, bench_envoy.ISSUE15_CONFIG, accounting on, the SQLite ledger's
writer not started). It runs under valgrind's callgrind with its cache simulator (I1/D1 32 KiB 8-way, LL
4 MiB 16-way, 64-byte lines), collecting only inside the compiled scan of a message and the compiled loop
over its entries (native/_usage.pyx `log_entries` and `account_run`, with everything they call: the
settlement, the windows, the ledger row, the settled ids, any entry handed back to Python; not the
handler's Python lines around them, a few per message), with --evict bytes of other memory copied
between two messages (outside the collection: the message's checks run first, then the copy, then the
message is handed over), so each message starts with cold caches. 5 messages run first (warm-up, then
gc.freeze(), whose C function zeroes callgrind's counts: only the measured messages are reported).
valgrind runs the process ~50x slower, so the handler's 100 us slices would end after every entry: the
slice is set to 1 s here (an entry per slice is not what happens under load).

Printed, per entry: instructions (Ir); cold lines = last-level misses: code (ILmr), data read (DLmr),
data written (DLmw), and their total in lines and KB; then the modules (shared objects) and functions
with the most cold lines (self cost: a function's own lines, not its callees'). Only the compiled lane is
measured (`python setup.py build_ext --inplace` first). Needs valgrind; ~1-2 minutes. `--keep FILE`
keeps the callgrind output, which `callgrind_annotate --sort=ILmr FILE` (or `--file FILE` here) reads
again. Do not use callgrind_control while it runs: it dumps every callgrind run on the machine (the parts
of an output are summed here for that reason).

The reading of callgrind's output (`parse`, `module_of`) and the cache configuration are
benchmarks/bench_footprint.py's (the HTTP check's footprint).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

# the cache configuration, the cold events and the reading of callgrind's output are the HTTP check's
import bench_footprint  # noqa: E402

# the compiled scan of a message and the compiled loop over its entries: their C wrappers' names, found in
# the built module (callgrind honours one wildcard pattern only, so the exact names are given)
ENTRIES = re.compile(rb"__pyx_pw_11nexus_authz_6native_6_usage_\d+(?:log_entries|account_run)\x00")
WARMUP = 5  # messages


# -- the measured process (under valgrind) --------------------------------------------------------------


def _entries_of(message: bytes) -> list[tuple[bytes, str]]:
    """(the bytes of each HTTPAccessLogEntry of a StreamAccessLogsMessage as Envoy wrote them, its request
    id), as the compiled scan finds them."""
    from nexus_authz import native

    return [(message[item[6] : item[7]], item[0]) for item in native.usage.log_entries(message)]


def child(messages: int, per: int, evict: int) -> int:
    """The messages, each after the checks that reserve its entries, through the real handler."""
    import asyncio
    import gc

    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.path.insert(0, str(REPO))
    import bench_breakdown as bb
    import grpc

    from nexus_authz import native
    from nexus_authz.adapters import als_fast, envoy_als, http_authz
    from nexus_authz.core import tokens

    if native.usage is None or als_fast.RUN is None or native.http1 is None:
        print(
            f"bench_footprint_als: the compiled extensions are not in use (native path: {native.PATH}); "
            "build them with `python setup.py build_ext --inplace`",
            file=sys.stderr,
        )
        return 2
    envoy_als._SLICE = 1.0  # type: ignore[misc]  # valgrind's pace would end a slice after every entry
    tokens.warm_up()
    fx = bb.Fixtures()
    engine = bb.build_engine(Path(tempfile.mkdtemp(prefix="nexus-footprint-als-")), fx)
    settings = engine.settings
    app = http_authz.HttpApp(
        engine, max_header_bytes=settings.max_header_bytes, max_body=settings.max_body_bytes
    )
    proto = app.protocol()
    proto.connection_made(bb.Sink())  # type: ignore[arg-type]
    service = envoy_als.AccessLogService(engine)

    from nexus_authz.tools.pgo_train import log_message  # a StreamAccessLogsMessage of these entries

    recorded = _entries_of(fx.als_batch)
    plan: list[tuple[list[bytes], bytes]] = []  # per message: its checks, its bytes
    for m in range(messages + WARMUP):
        checks, entries = [], []
        for j in range(per):
            k = m * per + j
            data, rid = fx.with_request_id(k)
            entry, old_id = recorded[k % len(recorded)]
            old = old_id.encode()
            if not entry.count(old) or len(rid) != len(old):  # (the stream id repeats it: both replaced)
                print(
                    "bench_footprint_als: a recorded entry's request id is not where expected",
                    file=sys.stderr,
                )
                return 2
            checks.append(data)
            entries.append(entry.replace(old, rid.encode()))
        plan.append((checks, log_message(entries)))

    feed = proto.data_received
    src, dst = bytearray(evict // 2), bytearray(evict // 2)
    position = [0]

    class Reader:
        """grpc.aio's servicer context as stream_access_logs uses it: each read() makes the next message's
        checks (its reservations), then evicts the caches, then hands over the message."""

        async def read(self) -> Any:
            m = position[0]
            if m >= len(plan):
                return grpc.aio.EOF
            position[0] = m + 1
            if m == WARMUP:
                gc.collect()
                gc.freeze()
            checks, message = plan[m]
            for data in checks:
                feed(data)
            if evict:
                dst[:] = src  # every line of both buffers: the simulated caches lose what came before
            # the message as grpc hands it over: a bytes object it has just written (its lines are warm)
            return bytes(memoryview(message))

    usage_taken = native.usage.taken[0]
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(service.stream_access_logs(None, Reader()))  # type: ignore[arg-type]
    finally:
        loop.close()
    total = (messages + WARMUP) * per
    taken = native.usage.taken[0] - usage_taken
    print(
        f"native path: {native.PATH}; {service.entries} of {total} entries accounted "
        f"({taken} by the compiled loop), {len(engine.book)} reservations left",
        file=sys.stderr,
    )
    return 0 if service.entries == taken == total and len(engine.book) == 0 else 3


def report(paths: list[str], entries: int, per: int, top: int) -> str:
    """The figures per entry of one run: its output file and the parts dumped before it (a dump, e.g.
    `callgrind_control -d` from any process on the machine, starts a new part: the parts add up)."""
    head = f"per entry ({entries} entries, {per} a message, caches evicted between messages)"
    return bench_footprint.report(paths, entries, top, head=head, digits=2)


# -- the driver -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--messages", type=int, default=20, help="messages measured (after 5 of warm-up)")
    ap.add_argument("--per", type=int, default=20, help="entries per message")
    ap.add_argument("--evict", type=int, default=8 << 20, help="bytes copied between messages (0: hot)")
    ap.add_argument("--top", type=int, default=14, help="modules and functions listed")
    ap.add_argument(
        "--keep", metavar="FILE", help="keep callgrind's output here (FILE, FILE.1 ... if dumped in parts)"
    )
    ap.add_argument(
        "--file",
        metavar="FILE",
        nargs="+",
        help="report a kept callgrind output, all its parts (with its --messages and --per)",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.messages < 1 or args.per < 1:
        ap.error("--messages and --per must be at least 1")
    if args.child:
        return child(args.messages, args.per, args.evict)
    entries = args.messages * args.per
    if args.file:
        return bench_footprint.report_file(
            "bench_footprint_als", lambda: report(args.file, entries, args.per, args.top)
        )
    valgrind = bench_footprint.find_valgrind("bench_footprint_als")
    if valgrind is None:
        return 2
    sys.path.insert(0, str(REPO))
    from nexus_authz import native

    if native.usage is None:
        print(
            f"bench_footprint_als: the compiled extensions are not in use (native path: {native.PATH})",
            file=sys.stderr,
        )
        return 2
    names = sorted(
        {m.rstrip(b"\x00").decode() for m in ENTRIES.findall(Path(native.usage.__file__).read_bytes())}
    )
    if len(names) != 2:
        print(
            f"bench_footprint_als: {native.usage.__file__} does not name log_entries and account_run "
            f"as expected ({names})",
            file=sys.stderr,
        )
        return 2
    return bench_footprint.measure(
        "bench_footprint_als",
        valgrind,
        [f"--toggle-collect={name}" for name in names],
        [f"--messages={args.messages}", f"--per={args.per}", f"--evict={args.evict}"],
        args.keep,
        lambda parts: report(parts, entries, args.per, args.top),
    )


if __name__ == "__main__":
    sys.exit(main())
