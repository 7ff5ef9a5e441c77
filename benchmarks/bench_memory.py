"""Memory per client of a real nexus-authz process, from its RSS: the key snapshot, and the state of each
client that made a request (the performance issue's "≤ 512 B per active client at 100k keys").

For each key count N (10,000 and 100,000 by default) one nexus-authz process (`nexus-authz serve`, the
benchmark's limits + token accounting config; benchmarks/bench_envoy.py starts it) is measured three times:

  baseline   a process with 1 key, warmed up (the fixed cost: interpreter, gRPC, caches)
  snapshot   the process with N keys, warmed up the same way: (snapshot - baseline) / N is what each key
             costs before it is used (the parsed key file, whatever the parser left behind)
  active     after one request from every key, straight to the fast-path Unix socket (pipelined, what Envoy
             sends minus the x-request-id, so no reservation waits for a settlement that will not come):
             (active - snapshot) / N is each active client's state (limit windows, per-key caches)

The windows are those of the benchmark plan (requests and tokens per minute: GCRA; tokens per day: a
sliding window of 24 slots), with limits small enough that every window of every key still holds state
when RSS is read (a GCRA window drained to its fresh state is dropped, exactly, so a generous limit would
measure nothing); the size of a window's state does not depend on its limit. The /metrics gauge
``nexus_authz_counters{store="limits"}`` is read at the same time to show how many windows were live.

RSS counts pages, not objects: memory the key-file parser freed stays in the process and new objects
fill it without RSS growing, so the "active" RSS figure can read far too low (0 here). The cross-check
counts objects instead: the same config and key file in-process (``heap_per_client``, in a fresh
interpreter), bytes in use as the allocators see them (pymalloc's allocated blocks + glibc malloc's in-use
bytes) before and after the same requests; ``--sites`` adds tracemalloc's breakdown by source line (10x
slower). A figure is judged on the larger of the two per-client values.

    .venv/bin/python benchmarks/bench_memory.py [--keys 10000,100000] [--sites 10000] [--json PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import bench_envoy as be  # noqa: E402
import harness  # noqa: E402

from nexus_authz.demo import procs  # noqa: E402

__all__ = [
    "MEMORY_CONFIG",
    "HeapResult",
    "MemoryResult",
    "allocator_bytes",
    "authz_request",
    "heap_in_subprocess",
    "heap_per_client",
    "measure",
    "measure_keys",
    "send_pipelined",
]

# The benchmark plan's three windows, with limits that keep a single request's state alive for longer
# than a run: 10 requests/hour (a request leaves 6 minutes of GCRA debt), 1,000 tokens/hour (~26 tokens
# per request: ~1.5 minutes), 100,000 tokens/day (24 hourly slots: a day). Same state shapes as
# bench_envoy.LIMITS_CONFIG, whose limits are sized for one key sending 1,000 requests/s.
MEMORY_CONFIG = (
    "plans:\n  bench:\n    limits:\n"
    "      - {requests: 10, per: hour, algorithm: gcra}\n"
    "      - {tokens: 1000, per: hour, algorithm: gcra}\n"
    "      - {tokens: 100000, per: day}\n"
)
WINDOWS_PER_KEY = 3
WARMUP_REQUESTS = 200  # to key 0, in every process measured: first-use allocations are not per-client
PIPELINE = 64  # requests in flight on the one connection


def authz_request(secret: str) -> bytes:
    """What Envoy's HTTP ext_authz sends for the benchmark request (path prefix /ext_authz), less the
    x-request-id: with it, each admitted request would wait in the reservation book for its usage."""
    return harness.build_request(
        "POST",
        "/ext_authz" + be.PATH,
        host="127.0.0.1",
        headers={
            "authorization": f"Bearer {secret}",
            "content-type": "application/json",
            "x-envoy-auth-partial-body": "false",
            "x-nexus-content-length": str(len(be.BODY)),  # the shipped configs' headers_to_add
            "x-forwarded-for": "192.0.2.2",
        },
        body=be.BODY,
    )


def send_pipelined(
    path: str, requests: Sequence[bytes], *, depth: int = PIPELINE, timeout: float = 120.0
) -> dict[int, int]:
    """Send every request over one keep-alive connection to a Unix socket, ``depth`` at a time, and count
    the answers' statuses. Bounded: raises TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    statuses: dict[int, int] = {}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        buf = bytearray()
        for start in range(0, len(requests), depth):
            batch = requests[start : start + depth]
            sock.sendall(b"".join(batch))
            pos = 0
            left = len(batch)
            while left:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(requests)} requests took over {timeout:g} s")
                resp = harness.parse_response(buf, pos)
                if resp is None:
                    chunk = sock.recv(1 << 18)
                    if not chunk:
                        raise ConnectionError("nexus-authz closed the connection")
                    buf += chunk
                    continue
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                pos = resp.end
                left -= 1
            del buf[:pos]
    return statuses


def rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        vm = harness.parse_proc_status(f.read())
    return vm.get("VmRSS", 0), vm.get("VmHWM", 0)


def live_counters(admin_port: int) -> int | None:
    """``nexus_authz_counters{store="limits"}`` from /metrics, or None if it cannot be read."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith('nexus_authz_counters{store="limits"}'):
            return int(float(line.split()[-1]))
    return None


def _settle(pid: int, seconds: float = 1.0) -> tuple[int, int]:
    """RSS after the event loop had time for its periodic work (maintenance ticks every second)."""
    time.sleep(seconds)
    return rss(pid)


@dataclass(frozen=True, slots=True)
class MemoryResult:
    """One key count's figures; bytes unless named otherwise."""

    keys: int
    baseline_rss: int  # a 1-key process, warmed up
    snapshot_rss: int  # the N-key process, warmed up, before its keys are used
    active_rss: int  # after one request from every key
    hwm: int  # VmHWM of the N-key process at the end (the parser's peak, usually)
    start_s: float  # from spawn to ready (key file parsed)
    send_s: float  # the N requests
    live_windows: int | None  # limit windows holding state when active_rss was read
    statuses: dict[int, int] = field(default_factory=dict)
    heap: HeapResult | None = None  # the in-process cross-check (allocators)
    traced: HeapResult | None = None  # the same with tracemalloc, for where the bytes are

    @property
    def active(self) -> int:
        """Clients whose first request was measured: every key but the warm-up's."""
        return max(1, self.keys - 1)

    @property
    def snapshot_per_key(self) -> float:
        return (self.snapshot_rss - self.baseline_rss) / self.keys

    @property
    def per_active_client(self) -> float:
        return (self.active_rss - self.snapshot_rss) / self.active

    @property
    def per_active_client_judged(self) -> float:
        """The larger of the RSS figure and the in-process one: RSS misses state placed in freed memory."""
        heap = self.heap.per_active_client if self.heap is not None else -math.inf
        return max(self.per_active_client, heap)

    @property
    def total_per_client(self) -> float:
        return (self.active_rss - self.baseline_rss) / self.keys

    @property
    def windows_live_fraction(self) -> float:
        if self.live_windows is None:
            return math.nan
        return self.live_windows / (self.keys * WINDOWS_PER_KEY)

    @property
    def errors(self) -> int:
        """Answers other than 200 (each key but the warm-up's makes one request, within its limits)."""
        return sum(n for s, n in self.statuses.items() if s != 200)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["statuses"] = {str(k): v for k, v in self.statuses.items()}
        d.update(
            snapshot_per_key=self.snapshot_per_key,
            per_active_client=self.per_active_client,
            per_active_client_judged=self.per_active_client_judged,
            total_per_client=self.total_per_client,
            windows_live_fraction=self.windows_live_fraction,
        )
        return d


SPEC = be.NexusSpec(MEMORY_CONFIG, be.LIMITS_KEY_FIELDS)


def _warm(nexus: be.NexusProc) -> None:
    send_pipelined(nexus.socket, [authz_request(nexus.secrets[0])] * WARMUP_REQUESTS)


def measure_keys(
    n: int, baseline_rss: int, workdir: Path, *, log: Callable[[str], None] = lambda s: None
) -> MemoryResult:
    t0 = time.monotonic()
    nexus = be.start_nexus(SPEC, workdir, n)
    start_s = time.monotonic() - t0
    log(f"[memory] {n:,} keys: nexus-authz ready in {start_s:.1f} s")
    try:
        pid = nexus.process.pid
        _warm(nexus)
        snapshot_rss, _ = _settle(pid)
        requests = [authz_request(s) for s in nexus.secrets[1:]]  # key 0 was the warm-up's
        t0 = time.monotonic()
        statuses = send_pipelined(nexus.socket, requests, timeout=max(60.0, n / 500))
        send_s = time.monotonic() - t0
        del requests
        active_rss, hwm = _settle(pid)
        windows = live_counters(nexus.admin_port)
        log(f"[memory] {n:,} keys: {n - 1:,} requests in {send_s:.1f} s, {windows} live windows")
    finally:
        procs.stop_process(nexus.process, timeout=10)
    return MemoryResult(n, baseline_rss, snapshot_rss, active_rss, hwm, start_s, send_s, windows, statuses)


def measure_baseline(workdir: Path) -> int:
    nexus = be.start_nexus(SPEC, workdir, 1)
    try:
        _warm(nexus)
        return _settle(nexus.process.pid)[0]
    finally:
        procs.stop_process(nexus.process, timeout=10)


def measure(
    key_counts: Sequence[int],
    *,
    heap: bool = True,
    sites_for: Sequence[int] = (),
    log: Callable[[str], None] = lambda s: None,
) -> list[MemoryResult]:
    """One fresh process per figure, one after the other (so they never compete for memory or CPU);
    with ``heap``, each key count's in-process cross-check (``heap_in_subprocess``), and for the key counts
    in ``sites_for`` tracemalloc's breakdown by source line."""
    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-memory-"))
    try:
        baseline = measure_baseline(tmp / "baseline")
        log(f"[memory] baseline (1 key): RSS {baseline / 2**20:.1f} MiB")
        results = []
        for n in key_counts:
            r = measure_keys(n, baseline, tmp / f"keys-{n}", log=log)
            if heap:
                h = heap_in_subprocess(n)
                log(f"[memory] {n:,} keys, in-process ({h.method}): {h.per_active_client:,.0f} B per client")
                r = dataclasses.replace(r, heap=h)
            if n in sites_for:
                t = heap_in_subprocess(n, trace=True)
                log(f"[memory] {n:,} keys, tracemalloc: {t.per_active_client:,.0f} B/active client")
                r = dataclasses.replace(r, traced=t)
            results.append(r)
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# the cross-check: the same state counted in-process by the allocators (or tracemalloc)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeapResult:
    """Bytes in use by the in-process fast path with the same config and key file as the RSS runs."""

    keys: int
    method: str  # "allocator" (pymalloc + malloc bytes in use) or "tracemalloc"
    snapshot_per_key: float  # the key's own entry: the parsed key file as kept (no parser garbage, imports
    # or the benchmark's secrets)
    per_active_client: float  # kept after one request from each key
    seconds: float
    sites: list[str] = field(default_factory=list)  # tracemalloc: where the per-client bytes are
    # per active client, measured apart by releasing each piece after the requests (see `_pieces`):
    limiter: float = math.nan  # the limit windows' state (the counter store)
    bookkeeping: float = math.nan  # the auth throttle's known keys, the reservation book, answer caches

    @property
    def issue_figure(self) -> float:
        """What the issue bounds at 512 B: the key's own entry plus what its first request kept."""
        return self.snapshot_per_key + self.per_active_client

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_PYMALLOC_IN_USE = re.compile(rb"# bytes in allocated blocks\s*=\s*([\d,]+)")


def allocator_bytes() -> int | None:
    """Bytes the interpreter has allocated and not freed: pymalloc's allocated blocks (objects of up to
    512 B, from ``sys._debugmallocstats``) plus glibc malloc's in-use bytes (``mallinfo2``: larger blocks,
    dict tables, arrays). Live objects only, unlike RSS; None where either is unavailable. Fast (~5 ms)
    and, unlike tracemalloc, free of overhead while the requests run."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    with tempfile.TemporaryFile() as f:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(f.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        m = _PYMALLOC_IN_USE.search(f.read())
    if m is None:  # PYTHONMALLOC=malloc, or another interpreter
        return None
    info = mallinfo2()
    return int(m.group(1).replace(b",", b"")) + int(info.uordblks) + int(info.hblkhd)


def heap_per_client(n: int, *, trace: bool = False) -> HeapResult:
    """Build the fast path with N keys, warm it up like the RSS runs, then one request from every other
    key: the bytes in use that the key file and then the requests added, per key and per client. Counted
    by the allocators (``allocator_bytes``), or with ``trace`` by tracemalloc, which also says where
    (by source line) but makes the run ~10 times slower. Either sees what RSS cannot: objects placed in
    memory the key-file parser freed."""
    import bench_alloc  # the in-process fast path (imports the server's modules)

    method = "tracemalloc" if trace or allocator_bytes() is None else "allocator"

    def in_use() -> int:
        gc.collect()
        if method == "tracemalloc":
            return tracemalloc.get_traced_memory()[0]
        return allocator_bytes() or 0

    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-heap-"))
    try:
        # a 1-key fast path first: the modules it imports and its fixed caches are not per key
        bench_alloc.build_fastpath(tmp / "warm", 1, config_extra=MEMORY_CONFIG)
        if method == "tracemalloc":
            tracemalloc.start(1)
        base = in_use()
        fp = bench_alloc.build_fastpath(tmp, n, config_extra=MEMORY_CONFIG)
        # less the benchmark's own list of the plaintext secrets (the server keeps none)
        secrets_bytes = sys.getsizeof(fp.secrets) + sum(sys.getsizeof(s) for s in fp.secrets)
        snapshot_bytes = in_use() - base - secrets_bytes
        warm = authz_request(fp.secrets[0])
        for _ in range(WARMUP_REQUESTS):
            fp.proto.data_received(warm)
        requests = [authz_request(s) for s in fp.secrets[1:]]
        before_bytes = in_use()
        before = tracemalloc.take_snapshot() if method == "tracemalloc" else None
        receive = fp.proto.data_received
        for raw in requests:
            receive(raw)
        if not fp.sink.last.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"a key's first request was refused: {fp.sink.last[:200]!r}")
        kept = in_use() - before_bytes
        after = tracemalloc.take_snapshot() if method == "tracemalloc" else None
        limiter, bookkeeping = _pieces(fp, in_use)
    finally:
        tracemalloc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    active = max(1, n - 1)
    sites = []
    if before is not None and after is not None:
        for d in sorted(after.compare_to(before, "lineno"), key=lambda d: -d.size_diff)[:6]:
            if d.size_diff > 0:
                frame = d.traceback[0]
                where = frame.filename
                if where.startswith(str(REPO)):
                    where = str(Path(where).relative_to(REPO))
                sites.append(f"{where}:{frame.lineno}: {d.size_diff / active:,.0f} B")
    return HeapResult(
        n,
        method,
        snapshot_bytes / n,
        kept / active,
        time.monotonic() - t_start,
        sites,
        limiter=limiter / active,
        bookkeeping=bookkeeping / active,
    )


def _pieces(fp: Any, in_use: Callable[[], int]) -> tuple[int, int]:
    """(limiter, bookkeeping) bytes, each measured by releasing it: the counter store's window states
    first, then the per-client bookkeeping (the auth throttle's known (address, key) pairs, the
    reservation book's entries and retired contexts, the bounded answer caches)."""
    engine = fp.engine
    before = in_use()
    engine.counters.clear()  # the window states and the sweep's walk over their ids
    after_limiter = in_use()
    engine.policy._known._seen.clear()
    book = engine.book
    book._entries.clear()
    book._retired.clear()
    fp.app._allow_cache._entries = {}
    fp.app._deny_cache._entries = {}
    after_bookkeeping = in_use()
    return before - after_limiter, after_limiter - after_bookkeeping


def heap_in_subprocess(n: int, *, trace: bool = False, timeout: float = 300.0) -> HeapResult:
    """``heap_per_client`` in a fresh interpreter (its memory is gone afterwards; nothing before skews it)."""
    out = subprocess.run(
        [sys.executable, __file__, "--heap", str(n), *(["--trace"] if trace else [])],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
        cwd=REPO,
    ).stdout
    return HeapResult(**json.loads(out))


def print_results(results: Sequence[MemoryResult]) -> None:
    rows = [
        {
            "keys": r.keys,
            "baseline": r.baseline_rss / 2**20,
            "snapshot": r.snapshot_rss / 2**20,
            "active": r.active_rss / 2**20,
            "hwm": r.hwm / 2**20,
            "per_key": r.snapshot_per_key,
            "per_active": r.per_active_client,
            "heap_active": r.heap.per_active_client if r.heap else math.nan,
            "heap_key": r.heap.snapshot_per_key if r.heap else math.nan,
            "traced_active": r.traced.per_active_client if r.traced else math.nan,
            "limiter": r.heap.limiter if r.heap else math.nan,
            "bookkeeping": r.heap.bookkeeping if r.heap else math.nan,
            "issue": r.heap.issue_figure if r.heap else math.nan,
            "total": r.total_per_client,
            "live": f"{r.live_windows} ({100 * r.windows_live_fraction:.0f}%)",
            "start": r.start_s,
            "errors": r.errors,
        }
        for r in results
    ]
    harness.print_table(
        rows,
        [
            "keys",
            ("baseline", "RSS 1 key MiB"),
            ("snapshot", "RSS N keys MiB"),
            ("active", "RSS N active MiB"),
            ("hwm", "peak MiB"),
            ("per_key", "snapshot B/key"),
            ("per_active", "B per active client"),
            ("heap_key", "in use B/key"),
            ("heap_active", "in use B per active client"),
            ("traced_active", "tracemalloc B per active client"),
            ("limiter", "of which limiter B"),
            ("bookkeeping", "of which bookkeeping B"),
            ("issue", "key entry + active client B (target 512)"),
            ("total", "total B/client"),
            ("live", "live windows"),
            ("start", "start s"),
            ("errors", "non-200"),
        ],
        formats={
            "per_key": lambda v: f"{v:,.0f}",
            "per_active": lambda v: f"{v:,.0f}",
            "heap_active": lambda v: "-" if math.isnan(v) else f"{v:,.0f}",
            "heap_key": lambda v: "-" if math.isnan(v) else f"{v:,.0f}",
            "traced_active": lambda v: "-" if math.isnan(v) else f"{v:,.0f}",
            "limiter": lambda v: "-" if math.isnan(v) else f"{v:,.0f}",
            "bookkeeping": lambda v: "-" if math.isnan(v) else f"{v:,.0f}",
            "issue": lambda v: "-" if math.isnan(v) else f"{v:,.0f}",
            "total": lambda v: f"{v:,.0f}",
            "start": lambda v: f"{v:.1f}",
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--keys", default="10000,100000", help="comma list of key counts")
    ap.add_argument("--json", default="", help="also write the figures here")
    ap.add_argument("--no-heap", action="store_true", help="skip the in-process cross-check")
    ap.add_argument(
        "--sites",
        default="10000",
        help="key counts to break down by source line (tracemalloc, slow); '' none",
    )
    ap.add_argument("--heap", type=int, metavar="N", help=argparse.SUPPRESS)  # heap_in_subprocess's child
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.heap:
        print(json.dumps(heap_per_client(args.heap, trace=args.trace).as_dict()))
        return 0
    counts = [int(x) for x in args.keys.split(",") if x.strip()]
    if not counts or min(counts) < 2:
        ap.error("--keys needs counts of at least 2")
    sites = [int(x) for x in args.sites.split(",") if x.strip()]
    results = measure(
        counts, heap=not args.no_heap, sites_for=sites, log=lambda s: print(s, file=sys.stderr, flush=True)
    )
    print_results(results)
    for r in results:
        if r.traced is not None and r.traced.sites:
            print(f"\n{r.keys:,} keys, where each active client's bytes are (tracemalloc, by line):")
            print("\n".join(f"- {site}" for site in r.traced.sites))
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_dict() for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
