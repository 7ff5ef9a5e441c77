"""The in-process fast path with limits and token accounting on: µs and Python allocations per decision.

The fast path here is what the server runs per Envoy Check, minus the socket: ``AuthzProtocol.data_received``
with the bytes Envoy's HTTP ext_authz sends (httptools parse, key lookup, limit windows charged, the
reservation, the answer's bytes), and, for token accounting, ``Engine.account`` with the response's usage
(what the access-log and ext_proc adapters call once per response: settle the reservation, count tokens,
aggregate into the ledger; the access-log adapter's compiled step for a provider record,
adapters/als_fast.ACCOUNT, when it is loaded). The config is the benchmark's (bench_envoy.LIMITS_CONFIG:
requests and tokens per minute, tokens per day; accounting on; the default SQLite ledger, whose writer is
not started here, so records only aggregate in memory as they do between two flushes).

Steady state: one key, 10,000 requests with distinct x-request-ids, replayed batch after batch (every
reservation is settled before its id comes back); two warm-up batches fill the caches first.

- allocations per decision: memory blocks the interpreter allocates (PyMem/PyObject domains: every object,
  every buffer), counted by a tiny C allocator hook (built with ``cc`` on first use, like tracemalloc's own
  hook it wraps the allocators in place); tracemalloc cannot count blocks that are freed again. Blocks
  that are freed at once are still work a cached or preallocated object could avoid. Objects CPython
  serves from its free lists (tuples, floats, lists, dicts) reach no allocator and are not counted.
- net blocks retained per 10,000 decisions (decisions + their settlements; the target is zero): exact from
  the hook (allocations minus frees over whole batches), and from tracemalloc snapshots, whose
  ``growth_sites`` name the lines any growth comes from.
- µs per decision / per settlement: medians over timed batches.

    .venv/bin/python benchmarks/bench_alloc.py [--batches 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import fnmatch
import gc
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import bench_envoy as be  # noqa: E402
import harness  # noqa: E402

from nexus_authz.adapters import als_fast  # noqa: E402
from nexus_authz.adapters.http_authz import AuthzProtocol, HttpApp  # noqa: E402
from nexus_authz.core.model import Request  # noqa: E402
from nexus_authz.core.usage import Usage  # noqa: E402
from nexus_authz.engine import Engine  # noqa: E402
from nexus_authz.settings import load_settings  # noqa: E402

__all__ = [
    "AllocCounter",
    "AllocResult",
    "Counts",
    "FastPath",
    "build_fastpath",
    "ext_authz_request",
    "measure",
]

BATCH = 10_000
USAGE = Usage(prompt_tokens=9, completion_tokens=12)  # what the mock upstream reports for the bench body

# ----------------------------------------------------------------------------------------------------
# the in-process fast path
# ----------------------------------------------------------------------------------------------------


class _Sink:
    """A transport that keeps the last answer (the protocol writes one per request)."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = b""

    def write(self, data: bytes) -> None:
        self.last = data

    def close(self) -> None:
        pass


@dataclass
class FastPath:
    engine: Engine
    app: HttpApp
    proto: AuthzProtocol
    sink: _Sink
    secrets: list[str]


def build_fastpath(
    workdir: Path,
    n_keys: int = 1,
    *,
    config_extra: str = be.LIMITS_CONFIG,
    key_fields: Mapping[str, object] = be.LIMITS_KEY_FIELDS,
) -> FastPath:
    """An Engine and one fast-path connection, from a nexus.yaml + key file written as the server reads
    them (no sockets, no event loop)."""
    workdir.mkdir(parents=True, exist_ok=True)
    secrets = [f"nx-bench-inproc-{i:07d}" for i in range(n_keys)]
    (workdir / "keys.yaml").write_text(be.key_file(secrets, key_fields))
    path = workdir / "nexus.yaml"
    path.write_text(be.nexus_config(str(workdir / "authz.sock"), extra=config_extra))
    settings = load_settings(str(path))
    engine = Engine.from_settings(settings)
    app = HttpApp(engine, max_header_bytes=settings.max_header_bytes, max_body=settings.max_body_bytes)
    proto = app.protocol()
    sink = _Sink()
    proto.connection_made(sink)  # type: ignore[arg-type]
    return FastPath(engine, app, proto, sink, secrets)


def ext_authz_request(secret: str, request_id: str | None) -> bytes:
    """The bytes Envoy's HTTP ext_authz sends nexus-authz for the benchmark request (envoy-findings.md)."""
    headers = {
        "authorization": f"Bearer {secret}",
        "content-type": "application/json",
        "x-envoy-auth-partial-body": "false",
        "x-nexus-content-length": str(len(be.BODY)),  # the shipped configs' headers_to_add
        "x-envoy-internal": "true",
        "x-forwarded-for": "192.0.2.2",
        "x-envoy-expected-rq-timeout-ms": "500",
    }
    if request_id is not None:
        headers["x-request-id"] = request_id
    return harness.build_request(
        "POST", "/ext_authz" + be.PATH, host="127.0.0.1", headers=headers, body=be.BODY
    )


# ----------------------------------------------------------------------------------------------------
# counting allocations: a C hook around the PyMem/PyObject allocators
# ----------------------------------------------------------------------------------------------------

_HOOK_C = r"""
#include <stddef.h>
typedef struct {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr);
} Alloc;                                  /* PyMemAllocatorEx */
typedef void (*getset)(int domain, Alloc *allocator);

static Alloc orig[3];
static unsigned long long allocs, reallocs, frees;
static int on;
#define D(ctx) ((int)(size_t)(ctx))

static void *h_malloc(void *c, size_t n) { allocs++; return orig[D(c)].malloc(orig[D(c)].ctx, n); }
static void *h_calloc(void *c, size_t a, size_t b) {
    allocs++;
    return orig[D(c)].calloc(orig[D(c)].ctx, a, b);
}
static void *h_realloc(void *c, void *p, size_t n) {
    if (p) reallocs++; else allocs++;
    return orig[D(c)].realloc(orig[D(c)].ctx, p, n);
}
static void h_free(void *c, void *p) { if (p) frees++; orig[D(c)].free(orig[D(c)].ctx, p); }

/* PYMEM_DOMAIN_MEM = 1 and PYMEM_DOMAIN_OBJ = 2: both need the GIL, so plain counters are safe. */
int hook_install(getset get, getset set) {
    if (on) return 0;
    for (int d = 1; d <= 2; d++) {
        get(d, &orig[d]);
        Alloc h = {(void *)(size_t)d, h_malloc, h_calloc, h_realloc, h_free};
        set(d, &h);
    }
    on = 1;
    return 1;
}
void hook_uninstall(getset set) {
    if (!on) return;
    for (int d = 1; d <= 2; d++) set(d, &orig[d]);
    on = 0;
}
unsigned long long hook_allocs(void) { return allocs; }
unsigned long long hook_reallocs(void) { return reallocs; }
unsigned long long hook_frees(void) { return frees; }
"""


class AllocCounter:
    """Counts allocations (malloc/calloc, and realloc of NULL) in the PyMem and PyObject domains."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        for name in ("hook_allocs", "hook_reallocs", "hook_frees"):
            getattr(lib, name).restype = ctypes.c_ulonglong
        lib.hook_install.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.hook_uninstall.argtypes = [ctypes.c_void_p]
        api = ctypes.pythonapi
        self._get = ctypes.cast(api.PyMem_GetAllocator, ctypes.c_void_p).value
        self._set = ctypes.cast(api.PyMem_SetAllocator, ctypes.c_void_p).value
        self._overhead: Counts | None = None

    @classmethod
    def load(cls, cache_dir: Path | None = None) -> AllocCounter | None:
        """Build (once per source version, with ``cc``) and load the hook; None without a C compiler."""
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            return None
        cache = cache_dir or Path(tempfile.gettempdir()) / f"nexus-bench-{os.getuid()}"
        cache.mkdir(parents=True, exist_ok=True)
        tag = hashlib.sha256(_HOOK_C.encode()).hexdigest()[:12]
        lib_path = cache / f"alloc_hook_{tag}.so"
        if not lib_path.exists():
            src = cache / f"alloc_hook_{tag}.c"
            src.write_text(_HOOK_C)
            tmp = cache / f"alloc_hook_{tag}.{os.getpid()}.so"
            try:
                subprocess.run(
                    [cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src)],
                    check=True,
                    capture_output=True,
                    timeout=60,
                )
            except (OSError, subprocess.SubprocessError):
                return None
            os.replace(tmp, lib_path)
        return cls(ctypes.CDLL(str(lib_path)))

    def count(self, fn: Callable[[], object]) -> Counts:
        """What ``fn()`` allocated, reallocated and freed (blocks), less what counting itself costs (the
        ints ctypes returns, measured with an empty function)."""
        if self._overhead is None:
            self._overhead = min((self._count(_nothing) for _ in range(5)), key=lambda c: c.allocs)
        c, o = self._count(fn), self._overhead
        return Counts(c.allocs - o.allocs, c.reallocs - o.reallocs, c.frees - o.frees)

    def _count(self, fn: Callable[[], object]) -> Counts:
        lib = self._lib
        if not lib.hook_install(self._get, self._set):
            raise RuntimeError("allocation hook already installed")
        try:
            a0, r0, f0 = lib.hook_allocs(), lib.hook_reallocs(), lib.hook_frees()
            fn()
            a1, r1, f1 = lib.hook_allocs(), lib.hook_reallocs(), lib.hook_frees()
        finally:
            lib.hook_uninstall(self._set)
        return Counts(a1 - a0, r1 - r0, f1 - f0)


@dataclass(frozen=True, slots=True)
class Counts:
    allocs: int
    reallocs: int
    frees: int

    @property
    def net(self) -> int:
        """Blocks still allocated afterwards that were not before (negative: more freed)."""
        return self.allocs - self.frees


# ----------------------------------------------------------------------------------------------------
# the measurement
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AllocResult:
    """Per decision unless named otherwise; ``None`` where the allocation hook could not be built."""

    decision_us: float  # AuthzProtocol.data_received: parse + decide + answer (median over batches)
    account_us: float  # Engine.account of the response's usage (median over batches)
    check_us: float  # Engine.check of a prebuilt Request without a request id (no reservation)
    allocs_per_decision: float | None
    reallocs_per_decision: float | None
    allocs_per_account: float | None
    loop_allocs: float | None  # the measuring loop's own allocations per iteration (should be 0)
    net_blocks_per_10k: float | None  # allocations minus frees over whole batches (exact), median
    tracemalloc_net_blocks_per_10k: float  # tracemalloc snapshots around whole batches, mean
    tracemalloc_net_bytes_per_10k: float
    inflight_bytes_per_reservation: float  # held between a decision and its settlement (tracemalloc)
    batches: int
    growth_sites: list[str] = field(default_factory=list)  # tracemalloc: lines whose blocks grew, if any

    @property
    def net_blocks(self) -> float:
        """The net growth figure to judge: the exact count when there is one, else tracemalloc's."""
        return (
            self.tracemalloc_net_blocks_per_10k
            if self.net_blocks_per_10k is None
            else self.net_blocks_per_10k
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1000


def _tracemalloc_filters() -> list[tracemalloc.Filter]:
    return [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
        tracemalloc.Filter(False, "<unknown>"),
    ]


def measure(batches: int = 5, *, log: Callable[[str], None] = lambda s: None) -> AllocResult:
    """``batches`` batches of 10,000 decisions per figure (timing, counting), 1 + max(2, batches // 2)
    under tracemalloc (the first traced batch is a warm-up: see ``_tracemalloc_growth``)."""
    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-alloc-"))
    try:
        fp = build_fastpath(tmp)
        return _measure(fp, batches, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measure(fp: FastPath, batches: int, log: Callable[[str], None]) -> AllocResult:
    secret = fp.secrets[0]
    ids = [f"5f2d6f1e-1c7b-4a53-9d2e-{i:012d}" for i in range(BATCH)]
    raws = [ext_authz_request(secret, rid) for rid in ids]
    proto, engine, sink, usage = fp.proto, fp.engine, fp.sink, USAGE
    receive, account = proto.data_received, engine.account

    def decide() -> None:
        for raw in raws:
            receive(raw)

    compiled = als_fast.ACCOUNT  # what the access-log adapter calls first for a provider record

    def settle() -> None:
        if compiled is None:
            for rid in ids:
                account(rid, usage)
        else:
            for rid in ids:
                if not compiled(engine, rid, usage, None):
                    account(rid, usage)

    def cycle() -> None:
        decide()
        settle()

    def empty() -> None:
        for raw in raws:
            _noop(raw)

    decide()
    if not sink.last.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"the benchmark request is not allowed: {sink.last[:200]!r}")
    settle()
    cycle()  # warm-up: every cache filled, the reservation book at its working size
    gc.collect()

    # µs per call: decisions and settlements timed as separate loops, medians over batches
    decide_us, settle_us = [], []
    for _ in range(batches):
        decide_us.append(_timed(decide) / BATCH)
        settle_us.append(_timed(settle) / BATCH)
    request = Request(
        "POST",
        be.PATH,
        {"authorization": f"Bearer {secret}", "content-type": "application/json"},
        be.BODY,
    )
    check_us = _check_us(engine, request)
    log(f"[alloc] fast path {statistics.median(decide_us):.1f} µs/decision, counting allocations")

    allocs = reallocs = per_account = loop = net = None
    counter = AllocCounter.load()
    if counter is None:
        log("[alloc] no C compiler (cc): allocations per decision not counted")
    else:
        counts = [
            (counter.count(decide), counter.count(settle), counter.count(empty), counter.count(cycle))
            for _ in range(batches)
        ]
        allocs = statistics.median(c[0].allocs for c in counts) / BATCH
        reallocs = statistics.median(c[0].reallocs for c in counts) / BATCH
        per_account = statistics.median(c[1].allocs for c in counts) / BATCH
        loop = statistics.median(c[2].allocs for c in counts) / BATCH
        net = float(statistics.median(c[3].net for c in counts))  # whole cycles: nothing left in flight

    log("[alloc] tracemalloc")
    tm_blocks, tm_bytes, inflight, sites = _tracemalloc_growth(decide, settle, 1 + max(2, batches // 2))
    return AllocResult(
        decision_us=statistics.median(decide_us),
        account_us=statistics.median(settle_us),
        check_us=check_us,
        allocs_per_decision=allocs,
        reallocs_per_decision=reallocs,
        allocs_per_account=per_account,
        loop_allocs=loop,
        net_blocks_per_10k=net,
        tracemalloc_net_blocks_per_10k=tm_blocks,
        tracemalloc_net_bytes_per_10k=tm_bytes,
        inflight_bytes_per_reservation=inflight,
        batches=batches,
        growth_sites=sites,
    )


def _tracemalloc_growth(
    decide: Callable[[], None], settle: Callable[[], None], batches: int
) -> tuple[float, float, float, list[str]]:
    """(net blocks, net bytes per 10,000 decisions, bytes per in-flight reservation, growth sites).

    tracemalloc only sees blocks allocated while it traces: when an object that predates it is replaced
    (a dict resized, a counter state rewritten, a tuple taken from CPython's free list of 2,000), the new
    block shows as growth and the freed one not at all. The first traced batch is therefore a warm-up,
    and the net is the mean over the others (from the snapshot after the warm-up to the last). Free lists
    (tuples, floats, lists, dicts) also make both counts wobble by a few blocks between batches: a leak
    is a net that stays positive batch after batch.
    """
    filters = _tracemalloc_filters()
    for f in filters:  # compile the filters' patterns now: fnmatch caches them, and would be traced
        fnmatch.fnmatch(__file__, f.filename_pattern)
    gc.collect()
    tracemalloc.start(1)
    try:
        decide()
        settle()
        first = tracemalloc.take_snapshot().filter_traces(filters)
        inflight = []
        for _ in range(batches - 1):
            decide()
            mid = tracemalloc.get_traced_memory()[0]
            settle()
            inflight.append((mid - tracemalloc.get_traced_memory()[0]) / BATCH)
        last = tracemalloc.take_snapshot().filter_traces(filters)
    finally:
        tracemalloc.stop()
    diff = last.compare_to(first, "lineno")
    n = batches - 1
    blocks = sum(d.count_diff for d in diff) / n
    size = sum(d.size_diff for d in diff) / n
    sites = []
    for d in sorted(diff, key=lambda d: -d.count_diff)[:5]:
        if d.count_diff > 0:
            frame = d.traceback[0]
            where = (
                os.path.relpath(frame.filename, REPO)
                if frame.filename.startswith(str(REPO))
                else frame.filename
            )
            sites.append(f"{where}:{frame.lineno}: {d.count_diff / n:+.1f} blocks, {d.size_diff / n:+,.0f} B")
    return blocks, size, statistics.median(inflight), sites


def _noop(_: object) -> None:
    pass


def _nothing() -> None:
    pass


def _check_us(engine: Engine, request: Request) -> float:
    """Engine.check alone, the decision core every transport calls, timed by bench_core (batches of
    1,000 calls for a second, the median batch), on this config (bench_core's own has no limits)."""
    import bench_core

    check = engine.check
    median, _p99, _n = bench_core.measure(lambda: check(request), 1.0)
    return float(median)


def format_result(r: AllocResult) -> str:
    def fmt(v: float | None, spec: str = ".2f") -> str:
        return "n/a (no C compiler)" if v is None else format(v, spec)

    lines = [
        f"fast path (parse + decide + answer):   {r.decision_us:7.2f} µs/decision",
        f"Engine.check alone (no reservation):   {r.check_us:7.2f} µs/decision",
        f"accounting (Engine.account):           {r.account_us:7.2f} µs/response",
        f"allocations per decision:              {fmt(r.allocs_per_decision)} "
        f"(+{fmt(r.reallocs_per_decision)} reallocs); per settlement {fmt(r.allocs_per_account)}; "
        f"measuring loop {fmt(r.loop_allocs)}",
        f"net blocks per 10,000 decisions:       {fmt(r.net_blocks_per_10k, '+.0f')} "
        f"(allocations - frees, settlements included, median of {r.batches} batches)",
        f"  tracemalloc:                         {r.tracemalloc_net_blocks_per_10k:+.1f} blocks, "
        f"{r.tracemalloc_net_bytes_per_10k:+,.0f} B",
        f"held per in-flight reservation:        {r.inflight_bytes_per_reservation:,.0f} B",
    ]
    lines += [f"  growth: {s}" for s in r.growth_sites]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batches", type=int, default=5, help="batches of 10,000 decisions per figure")
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.batches < 1:
        ap.error("--batches must be >= 1")
    result = measure(args.batches, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
