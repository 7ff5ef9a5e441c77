"""Measuring machinery shared by every benchmark script: load, CPU, tables, plots, interleaving.

What it owns and why (the method of the performance issue):
- ``run_open_loop``: a fixed request rate from several single-connection worker *processes*
  (benchmarks/loadgen.py) offset in time so arrivals are evenly spaced; latency counts from the scheduled
  send time, so a slow server cannot hide its stalls by slowing the client (no coordinated omission).
  ``h2load --rps`` with many connections sends bursts, which is why this exists.
- ``ProcStats``: CPU seconds of a process (utime+stime of all its threads, /proc/PID/stat) and RSS,
  sampled around the measured window, giving CPU µs per request for nexus-authz or Envoy.
- ``run_max_rps``: closed-loop maximum throughput with ``wrk`` (TCP) or ``h2load --h1`` (Unix socket,
  or HTTP/2 with ``h2=True``); a Python closed loop when neither tool is installed.
- ``interleave``: A,B,C,A,B,C,... and medians per scenario, because this 2-core machine is shared and noisy.
- ``percentile``/``summarize``/``print_table``/``plot_latency``: one way of reporting for every script.

Load only ever goes to 127.0.0.1 or a Unix socket, and every run is bounded in time.
"""

from __future__ import annotations

import math
import os
import pickle
import select
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # imported as benchmarks.harness rather than from a script in benchmarks/
    sys.path.insert(0, _HERE)
import loadgen as _lg  # noqa: E402

Target = _lg.Target
build_request = _lg.build_request
parse_response = _lg.parse_response
parse_target = _lg.parse_target
schedule_ns = _lg.schedule_ns

__all__ = [
    "InterleaveResult",
    "LoadResult",
    "MaxRpsResult",
    "ProcDelta",
    "ProcSample",
    "ProcStats",
    "Target",
    "build_request",
    "interleave",
    "parse_h2load_output",
    "parse_proc_stat",
    "parse_proc_status",
    "parse_response",
    "parse_target",
    "parse_wrk_output",
    "percentile",
    "plot_latency",
    "print_table",
    "run_h2load",
    "run_max_rps",
    "run_open_loop",
    "run_wrk",
    "summarize",
    "worker_offsets_us",
]

LOADGEN_PATH = Path(_lg.__file__).resolve()
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------------
# statistics and tables
# --------------------------------------------------------------------------------------------------


def percentile(values: Iterable[float], p: float) -> float:
    """The p-th percentile (0..100), linear between closest ranks (numpy's default); nan when empty."""
    return _pct_sorted(sorted(values), p)  # Timsort is linear on already sorted data


def _pct_sorted(data: Sequence[float], p: float) -> float:
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} outside 0..100")
    n = len(data)
    if n == 0:
        return math.nan
    rank = p / 100 * (n - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    return float(data[lo] + (data[hi] - data[lo]) * (rank - lo))


def _pct_key(p: float) -> str:
    return f"p{p:g}"


def summarize(values: Iterable[float], percentiles: Sequence[float] = (50, 90, 99, 99.9)) -> dict[str, float]:
    """n, mean, min, the given percentiles (keys ``p50``, ``p99.9``...) and max of a sample."""
    data = sorted(values)
    out: dict[str, float] = {"n": float(len(data))}
    if not data:
        out.update({"mean": math.nan, "min": math.nan, "max": math.nan})
        out.update({_pct_key(p): math.nan for p in percentiles})
        return out
    out["mean"] = math.fsum(data) / len(data)
    out["min"] = float(data[0])
    for p in percentiles:
        out[_pct_key(p)] = _pct_sorted(data, p)
    out["max"] = float(data[-1])
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        a = abs(value)
        if a >= 999.5:
            return f"{value:,.0f}"
        if a >= 100:
            return f"{value:.0f}"
        if a >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def print_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str | tuple[str, str]] | None = None,
    *,
    formats: Mapping[str, Callable[[Any], str]] | None = None,
    file: TextIO | None = None,
    quiet: bool = False,
) -> str:
    """Print (and return) a markdown table; numbers right-aligned. Columns: key or (key, header)."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    cols = [(c, c) if isinstance(c, str) else c for c in columns]
    formats = formats or {}
    cells = [[formats.get(k, _fmt)(row.get(k)) if k in row else "" for k, _ in cols] for row in rows]
    numeric = [
        all(
            isinstance(row.get(k), int | float) and not isinstance(row.get(k), bool)
            for row in rows
            if k in row
        )
        and any(k in row for row in rows)
        for k, _ in cols
    ]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, (_, h) in enumerate(cols)]

    def line(items: Sequence[str]) -> str:
        padded = [s.rjust(w) if num else s.ljust(w) for s, w, num in zip(items, widths, numeric, strict=True)]
        return "| " + " | ".join(padded) + " |"

    sep = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=True)
        )
        + "|"
    )
    text = "\n".join([line([h for _, h in cols]), sep] + [line(r) for r in cells])
    if not quiet:
        print(text, file=file or sys.stdout, flush=True)
    return text


def plot_latency(
    series: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    *,
    title: str = "latency by percentile (open loop)",
) -> bool:
    """Write a PNG percentile-spectrum plot (latencies in µs, drawn in ms); False if matplotlib is missing.

    The x axis is 1/(1-q) on a log scale (HdrHistogram style) so the tail is readable next to the median.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print(f"plot skipped ({path}): matplotlib is not installed (.venv/bin/pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for name, values in series.items():
        data = sorted(values)
        if not data:
            continue
        # 10 points per decade of 1/(1-q), up to the sample's own resolution, then the maximum
        steps = int(10 * math.log10(max(len(data), 2)))
        xs = [10 ** (k / 10) for k in range(steps + 1)] + [float(len(data))]
        ys = [_pct_sorted(data, (1 - 1 / x) * 100) / 1000 for x in xs]
        ax.plot(xs, ys, marker=".", markersize=3, label=name)
    ax.set_xscale("log")
    longest = max((len(v) for v in series.values()), default=10)
    ticks = [1, 2] + [10**k for k in range(1, max(1, math.ceil(math.log10(max(longest, 2))) + 1))]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{100 * (1 - 1 / t):.10g}%" for t in ticks])
    ax.set_xlabel("percentile")
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms, log scale)")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------
# CPU and memory from /proc
# --------------------------------------------------------------------------------------------------


def parse_proc_stat(text: str) -> tuple[int, int, int]:
    """(utime, stime, num_threads) from /proc/PID/stat; the process's own totals over all its threads,
    including threads that have already exited. The command name may contain spaces and parentheses."""
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): utime is field 14, stime 15, num_threads 20
    return int(fields[11]), int(fields[12]), int(fields[17])


def parse_proc_status(text: str) -> dict[str, int]:
    """The ``Vm*`` and ``Rss*`` lines of /proc/PID/status, in bytes."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if sep and (name.startswith("Vm") or name.startswith("Rss")):
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[name] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


@dataclass(frozen=True, slots=True)
class ProcSample:
    t: float  # time.monotonic()
    cpu_s: float  # utime+stime of the process(es), clock-tick resolution
    sched_cpu_s: float  # sum of /proc/PID/task/*/schedstat run time: ns resolution, live threads only
    rss_bytes: int
    hwm_bytes: int
    threads: int


@dataclass(frozen=True, slots=True)
class ProcDelta:
    wall_s: float
    cpu_s: float
    sched_cpu_s: float
    rss_before: int
    rss_after: int
    hwm_after: int
    threads: int

    def cpu_us_per_request(self, requests: int) -> float:
        return self.cpu_s * 1e6 / requests if requests else math.nan

    def sched_cpu_us_per_request(self, requests: int) -> float:
        """Same from schedstat: finer than the 10 ms tick, but blind to threads that exited mid-run."""
        return self.sched_cpu_s * 1e6 / requests if requests else math.nan

    @property
    def cpu_fraction(self) -> float:
        """CPU seconds per wall second (1.0 = one core busy)."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else math.nan


class ProcStats:
    """CPU and memory of one process (or several summed, e.g. Envoy + nexus-authz), sampled before and
    after a run. Use as a context manager or with ``start()``/``stop()``."""

    def __init__(self, pid: int | Sequence[int]) -> None:
        self.pids: tuple[int, ...] = (pid,) if isinstance(pid, int) else tuple(pid)
        self._start: ProcSample | None = None
        self.delta: ProcDelta | None = None

    def sample(self) -> ProcSample:
        t = time.monotonic()
        ticks = threads = rss = hwm = 0
        sched_ns = 0
        for pid in self.pids:
            with open(f"/proc/{pid}/stat") as f:
                ut, st, nth = parse_proc_stat(f.read())
            ticks += ut + st
            threads += nth
            with open(f"/proc/{pid}/status") as f:
                vm = parse_proc_status(f.read())
            rss += vm.get("VmRSS", 0)
            hwm += vm.get("VmHWM", 0)
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    try:
                        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                            sched_ns += int(f.read().split()[0])
                    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                        pass
            except FileNotFoundError:
                pass
        return ProcSample(t, ticks / _CLK_TCK, sched_ns / 1e9, rss, hwm, threads)

    def start(self) -> ProcSample:
        self._start = self.sample()
        self.delta = None
        return self._start

    def stop(self) -> ProcDelta:
        if self._start is None:
            raise RuntimeError("ProcStats.stop() without start()")
        self.delta = self.between(self._start, self.sample())
        return self.delta

    @staticmethod
    def between(a: ProcSample, b: ProcSample) -> ProcDelta:
        return ProcDelta(
            wall_s=b.t - a.t,
            cpu_s=b.cpu_s - a.cpu_s,
            sched_cpu_s=b.sched_cpu_s - a.sched_cpu_s,
            rss_before=a.rss_bytes,
            rss_after=b.rss_bytes,
            hwm_after=b.hwm_bytes,
            threads=b.threads,
        )

    def cpu_us_per_request(self, requests: int) -> float:
        if self.delta is None:
            raise RuntimeError("ProcStats.cpu_us_per_request() before stop()")
        return self.delta.cpu_us_per_request(requests)

    def __enter__(self) -> ProcStats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# open-loop load
# --------------------------------------------------------------------------------------------------


def worker_offsets_us(rate: float, procs: int) -> list[float]:
    """Start offset of each worker in µs: worker k sends request k first, at k/rate."""
    return [schedule_ns(k, rate) / 1000 for k in range(procs)]


@dataclass(frozen=True, slots=True)
class LoadResult:
    """Everything one open-loop (or closed-loop) run measured; latencies sorted, in µs."""

    target: str
    rate: float  # requested, requests/s (0 = closed loop)
    duration: float  # measured window, s (after warm-up)
    procs: int
    latencies_us: list[float]
    send_lag_us: list[float]  # actual send minus scheduled send: the generator's own punctuality
    statuses: dict[int, int]
    errors: dict[str, int]
    scheduled: int  # requests in the measured window
    sent: int
    completed: int
    unsent: int  # still unsent at the hard deadline (server far too slow)
    achieved_rate: float
    loadgen_cpu_s: float  # user + system, all workers, warm-up included
    loadgen_sys_s: float
    loadgen_requests: int  # requests sent by the workers, warm-up included
    reconnects: int
    cpu: dict[str, ProcDelta] = field(default_factory=dict)  # measured processes, over the window

    def percentile(self, p: float) -> float:
        return _pct_sorted(self.latencies_us, p)

    def summary(self, percentiles: Sequence[float] = (50, 90, 99, 99.9)) -> dict[str, float]:
        return summarize(self.latencies_us, percentiles)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values()) + self.unsent

    @property
    def ok(self) -> int:
        return sum(n for s, n in self.statuses.items() if 200 <= s < 300)

    @property
    def loadgen_cpu_us_per_request(self) -> float:
        return self.loadgen_cpu_s * 1e6 / self.loadgen_requests if self.loadgen_requests else math.nan

    def cpu_us_per_request(self, name: str) -> float:
        """CPU µs per request of a process given to ``run_open_loop(measure_pids=...)``."""
        return self.cpu[name].cpu_us_per_request(self.sent)

    def metrics(self) -> dict[str, float | int]:
        """A flat row for ``print_table`` and ``interleave`` (medians are taken per key)."""
        s = self.summary()
        row: dict[str, float | int] = {
            "rate": self.rate,
            "achieved_rps": self.achieved_rate,
            "p50_us": s["p50"],
            "p90_us": s["p90"],
            "p99_us": s["p99"],
            "p99.9_us": s["p99.9"],
            "max_us": s["max"],
            "errors": self.error_count,
            "non_2xx": self.completed - self.ok,
            "send_lag_p99_us": _pct_sorted(self.send_lag_us, 99),
            "loadgen_cpu_us_per_req": self.loadgen_cpu_us_per_request,
        }
        for name, d in self.cpu.items():
            row[f"{name}_cpu_us_per_req"] = d.cpu_us_per_request(self.sent)
            row[f"{name}_sched_cpu_us_per_req"] = d.sched_cpu_us_per_request(self.sent)
            row[f"{name}_rss_mb"] = d.rss_after / 2**20
        return row


def _requests_list(
    request_bytes: bytes | Sequence[bytes] | None,
    builder: Callable[[int], bytes] | None,
    variants: int,
) -> list[bytes]:
    if builder is not None:
        if request_bytes is not None:
            raise ValueError("give request_bytes or builder, not both")
        return [builder(i) for i in range(variants)]
    if request_bytes is None:
        return [build_request("GET", "/")]
    if isinstance(request_bytes, bytes | bytearray):
        return [bytes(request_bytes)]
    reqs = [bytes(r) for r in request_bytes]
    if not reqs:
        raise ValueError("empty request list")
    return reqs


def _read_exact_fd(fd: int, n: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("load worker did not answer in time")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        part = os.read(fd, min(n - len(data), 1 << 20))
        if not part:
            raise EOFError("load worker exited early (see its stderr above)")
        data += part
    return bytes(data)


def run_open_loop(
    target: str | tuple[str, int] | Target,
    *,
    rate: float,
    duration: float,
    procs: int = 4,
    request_bytes: bytes | Sequence[bytes] | None = None,
    builder: Callable[[int], bytes] | None = None,
    variants: int = 1,
    warmup: float = 0.0,
    timeout: float = 2.0,
    drain: float = 2.0,
    measure_pids: Mapping[str, int | Sequence[int]] | None = None,
    spin_us: float = _lg.DEFAULT_SPIN_US,
) -> LoadResult:
    """Send ``rate`` requests/s for ``warmup + duration`` seconds from ``procs`` worker processes.

    Requests: one ``request_bytes``, a list of variants used round-robin (e.g. 10,000 distinct keys), or
    ``builder(i)`` for ``i`` in ``range(variants)``; all are built once, before the clock starts.
    ``rate=0`` runs closed loop (each connection sends as soon as its last response arrives).
    ``measure_pids`` names processes whose CPU/RSS are sampled over the measured window (after warm-up).
    ``spin_us``: each worker sleeps until that long before a send time and spins the rest (see
    ``loadgen.DEFAULT_SPIN_US``); 0 saves a little CPU and adds the wake-up lateness (~50 µs here) to
    every latency. The run is bounded: workers stop sending ``drain`` s after the end (the rest count
    as ``unsent``) and a response slower than ``timeout`` is an error.
    """
    if procs < 1 or duration <= 0 or rate < 0:
        raise ValueError("need procs >= 1, duration > 0, rate >= 0")
    tgt = parse_target(target)
    requests = _requests_list(request_bytes, builder, variants)
    base = {
        "target": str(tgt),
        "rate": rate,
        "procs": procs,
        "duration": duration,
        "warmup": warmup,
        "timeout": timeout,
        "drain": drain,
        "requests": requests,
        "spin_us": spin_us,
    }
    workers: list[subprocess.Popen[bytes]] = []
    try:
        for k in range(procs):
            p = subprocess.Popen(
                [sys.executable, str(LOADGEN_PATH), "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            workers.append(p)
            payload = pickle.dumps({**base, "worker": k}, protocol=pickle.HIGHEST_PROTOCOL)
            assert p.stdin is not None
            p.stdin.write(struct.pack("!Q", len(payload)) + payload)
            p.stdin.flush()
        startup_deadline = time.monotonic() + 30 + timeout
        for p in workers:
            assert p.stdout is not None
            if _read_exact_fd(p.stdout.fileno(), 1, startup_deadline) != b"R":
                raise RuntimeError("load worker sent an unexpected handshake")
        start_ns = time.monotonic_ns() + 50_000_000
        for p in workers:
            assert p.stdin is not None
            p.stdin.write(struct.pack("!q", start_ns))
            p.stdin.flush()
        stats = {name: ProcStats(pid) for name, pid in (measure_pids or {}).items()}
        if stats:
            wait = (start_ns + int(warmup * 1e9) - time.monotonic_ns()) / 1e9
            if wait > 0:
                time.sleep(wait)
            for s in stats.values():
                s.start()
        deadline = time.monotonic() + warmup + duration + drain + timeout + 10
        results = []
        for p in workers:
            assert p.stdout is not None
            fd = p.stdout.fileno()
            (size,) = struct.unpack("!Q", _read_exact_fd(fd, 8, deadline))
            results.append(pickle.loads(_read_exact_fd(fd, size, deadline)))
        cpu = {name: s.stop() for name, s in stats.items()}
        for p in workers:
            p.wait(timeout=5)
    finally:
        for p in workers:
            if p.poll() is None:
                p.kill()
                p.wait()
            for stream in (p.stdin, p.stdout):
                if stream is not None:
                    stream.close()
    return _merge(str(tgt), rate, duration, warmup, procs, results, cpu)


def _merge(
    target: str,
    rate: float,
    duration: float,
    warmup: float,
    procs: int,
    results: list[dict[str, Any]],
    cpu: dict[str, ProcDelta],
) -> LoadResult:
    lat = array("q")
    lag = array("q")
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    for r in results:
        lat.frombytes(r["latencies_ns"])
        lag.frombytes(r["send_lag_ns"])
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    completed = sum(r["completed"] for r in results)
    window = results[0]["window_start_ns"] if results else 0
    last = max((r["last_done_ns"] for r in results), default=0)
    if rate > 0:
        n_warm, n_total = _lg.request_counts(rate, duration, warmup)
        scheduled = n_total - n_warm
        span = (last - window) / 1e9 if last > window else math.nan
    else:
        scheduled = completed
        span = duration
    return LoadResult(
        target=target,
        rate=rate,
        duration=duration,
        procs=procs,
        latencies_us=sorted(v / 1000 for v in lat),
        send_lag_us=sorted(v / 1000 for v in lag),
        statuses=dict(sorted(statuses.items())),
        errors=errors,
        scheduled=scheduled,
        sent=sum(r["sent"] for r in results),
        completed=completed,
        unsent=sum(r["unsent"] for r in results),
        achieved_rate=completed / span if span and not math.isnan(span) else math.nan,
        loadgen_cpu_s=sum(r["cpu_user_s"] + r["cpu_sys_s"] for r in results),
        loadgen_sys_s=sum(r["cpu_sys_s"] for r in results),
        loadgen_requests=sum(r["sent_total"] for r in results),
        reconnects=sum(r["reconnects"] for r in results),
        cpu=cpu,
    )


# --------------------------------------------------------------------------------------------------
# closed-loop maximum throughput: wrk (TCP), h2load (Unix socket, HTTP/2), Python fallback
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MaxRpsResult:
    tool: str  # "wrk", "h2load" or "python"
    rps: float
    requests: int
    errors: int  # socket errors / failed requests
    non_2xx: int
    p50_us: float
    p99_us: float
    raw: str  # the tool's output, for the record

    def metrics(self) -> dict[str, float | int]:
        return {
            "max_rps": self.rps,
            "max_rps_p50_us": self.p50_us,
            "max_rps_p99_us": self.p99_us,
            "max_rps_errors": self.errors,
            "max_rps_non_2xx": self.non_2xx,
        }


_TIME_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
_SI = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}


def _time_us(text: str) -> float:
    text = text.strip()
    for unit in ("us", "ms", "s", "m", "h"):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * _TIME_UNITS[unit]
    return float(text)


def _si(text: str) -> float:
    text = text.strip()
    if text and text[-1] in _SI:
        return float(text[:-1]) * _SI[text[-1]]
    return float(text)


def parse_wrk_output(text: str) -> MaxRpsResult:
    """Parse ``wrk --latency`` output (requests/s, latency distribution, errors)."""
    rps = math.nan
    requests = errors = non_2xx = 0
    dist: dict[str, float] = {}
    in_dist = False
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if line.startswith("Requests/sec:"):
            rps = float(line.split(":", 1)[1])
        elif line.startswith("Latency Distribution"):
            in_dist = True
            continue
        elif in_dist and line[:1].isdigit() and "%" in line:
            pct, value = line.split()
            dist[pct.rstrip("%")] = _time_us(value)
        elif " requests in " in line:
            requests = int(_si(line.split()[0]))
        elif line.startswith("Socket errors:"):
            errors = sum(int(part.split()[-1]) for part in line.split(":", 1)[1].split(","))
        elif line.startswith("Non-2xx or 3xx responses:"):
            non_2xx = int(line.split(":", 1)[1])
        in_dist = in_dist and line[:1].isdigit()
    return MaxRpsResult(
        "wrk", rps, requests, errors, non_2xx, dist.get("50", math.nan), dist.get("99", math.nan), text
    )


def parse_h2load_output(text: str) -> MaxRpsResult:
    """Parse h2load's summary (``finished in``, ``requests:``, ``status codes:``, ``time for request:``)."""
    rps = math.nan
    requests = errors = non_2xx = 0
    mean_us = math.nan
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if line.startswith("finished in"):
            rps = float(line.split(",")[1].split()[0])
        elif line.startswith("requests:"):
            parts = {p.split()[1]: int(p.split()[0]) for p in line.split(":", 1)[1].split(",")}
            requests = parts.get("done", 0)
            errors = parts.get("errored", 0) + parts.get("timeout", 0)  # "failed" = non-2xx, counted below
        elif line.startswith("status codes:"):
            for part in line.split(":", 1)[1].split(","):
                n, cls = part.split()
                if cls != "2xx":
                    non_2xx += int(n)
        elif line.startswith("time for request:"):
            mean_us = _time_us(line.split(":", 1)[1].split()[2])
    # h2load prints min/max/mean/sd, no percentiles: report the mean as p50's stand-in, p99 unknown
    return MaxRpsResult("h2load", rps, requests, errors, non_2xx, mean_us, math.nan, text)


def _lua_string(data: bytes) -> str:
    return '"' + "".join(f"\\{b:03d}" for b in data) + '"'


def run_wrk(
    target: str | tuple[str, int] | Target,
    duration: float,
    connections: int,
    *,
    threads: int | None = None,
    method: str = "GET",
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 2.0,
) -> MaxRpsResult:
    """wrk against a TCP target (wrk has no Unix sockets); a Lua script sets the method and body."""
    tgt = parse_target(target)
    if tgt.is_unix:
        raise ValueError("wrk cannot use a Unix socket; use run_h2load(..., h1=True)")
    threads = threads or min(connections, os.cpu_count() or 1)
    cmd = ["wrk", "--latency", "-t", str(threads), "-c", str(connections)]
    cmd += ["-d", f"{max(1, round(duration))}s", "--timeout", f"{max(1, round(timeout))}s"]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f'wrk.method = "{method}"\n')
        if body:
            script.write(f"wrk.body = {_lua_string(body)}\n")
    try:
        cmd += ["-s", script.name, f"http://{tgt.host}:{tgt.port}{path}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + timeout + 30, check=True)
    finally:
        os.unlink(script.name)
    return parse_wrk_output(out.stdout)


def run_h2load(
    target: str | tuple[str, int] | Target,
    duration: float,
    connections: int,
    *,
    streams: int = 1,
    threads: int | None = None,
    h1: bool = False,
    method: str = "GET",
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    warmup: float = 0.0,
) -> MaxRpsResult:
    """h2load (Debian ``nghttp2-client``): HTTP/2 by default (cleartext h2c), ``h1=True`` for HTTP/1.1;
    reaches Unix sockets through ``-B unix:PATH``. Use it closed loop only: ``--rps`` with many
    connections sends in bursts, which is what ``run_open_loop`` avoids."""
    tgt = parse_target(target)
    threads = threads or min(connections, os.cpu_count() or 1)
    cmd = [
        "h2load",
        "-c",
        str(connections),
        "-t",
        str(threads),
        "-m",
        str(streams),
        "-D",
        f"{max(1, round(duration))}",
    ]
    if warmup:
        cmd += [f"--warm-up-time={max(1, round(warmup))}"]
    if h1:
        cmd.append("--h1")
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    if method != "GET":
        cmd += ["-H", f":method: {method}"]
    data_path = None
    if body:
        with tempfile.NamedTemporaryFile("wb", delete=False) as f:
            f.write(body)
            data_path = f.name
        cmd += ["-d", data_path]
    try:
        if tgt.is_unix:
            cmd += ["-B", f"unix:{tgt.unix_path}", f"http://localhost{path}"]
        else:
            cmd.append(f"http://{tgt.host}:{tgt.port}{path}")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + warmup + 30, check=True)
    finally:
        if data_path:
            os.unlink(data_path)
    return parse_h2load_output(out.stdout)


def run_max_rps(
    target: str | tuple[str, int] | Target,
    duration: float,
    connections: int,
    *,
    method: str = "GET",
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    h2: bool = False,
) -> MaxRpsResult:
    """Closed-loop maximum requests/s: wrk for TCP, h2load --h1 for a Unix socket (h2load for ``h2``),
    else a Python closed loop from ``min(connections, 4)`` worker processes (slower: it measures itself
    too). The load tool shares the 2 cores with the server, so this is a lower bound of the server's max."""
    tgt = parse_target(target)
    if h2:
        return run_h2load(tgt, duration, connections, method=method, path=path, headers=headers, body=body)
    if not tgt.is_unix and shutil.which("wrk"):
        return run_wrk(tgt, duration, connections, method=method, path=path, headers=headers, body=body)
    if shutil.which("h2load"):
        return run_h2load(
            tgt, duration, connections, h1=True, method=method, path=path, headers=headers, body=body
        )
    req = build_request(method, path, headers=headers or {}, body=body)
    res = run_open_loop(tgt, rate=0, duration=duration, procs=min(connections, 4), request_bytes=req)
    return MaxRpsResult(
        "python",
        res.achieved_rate,
        res.completed,
        res.error_count,
        res.completed - res.ok,
        res.percentile(50),
        res.percentile(99),
        "",
    )


# --------------------------------------------------------------------------------------------------
# interleaving scenarios on a noisy machine
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InterleaveResult:
    order: list[str]
    runs: dict[str, list[Mapping[str, Any]]]  # every round's metrics, per scenario
    medians: dict[str, dict[str, Any]]  # numeric metrics: median across rounds; others: last value
    ranges: dict[str, dict[str, tuple[float, float]]]  # numeric metrics: (min, max) across rounds

    def rows(self, name_key: str = "scenario") -> list[dict[str, Any]]:
        return [{name_key: name, **self.medians[name]} for name in self.order]


def _numeric(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def interleave(
    configs: Mapping[str, Callable[[], Mapping[str, Any]]]
    | Sequence[tuple[str, Callable[[], Mapping[str, Any]]]],
    rounds: int = 3,
    *,
    pause: float = 0.0,
    verbose: bool = True,
) -> InterleaveResult:
    """Run scenarios A,B,C,A,B,C,... ``rounds`` times and take per-metric medians across rounds.

    Interleaving spreads the machine's slow phases over every scenario instead of penalising whichever
    ran during them; medians drop the odd disturbed round. Each scenario is a callable returning a flat
    mapping of metrics (e.g. ``LoadResult.metrics()``).
    """
    items = list(configs.items()) if isinstance(configs, Mapping) else list(configs)
    order = [name for name, _ in items]
    if len(set(order)) != len(order):
        raise ValueError("scenario names must be unique")
    runs: dict[str, list[Mapping[str, Any]]] = {name: [] for name in order}
    for r in range(rounds):
        for name, fn in items:
            if verbose:
                print(f"[round {r + 1}/{rounds}] {name}", file=sys.stderr, flush=True)
            runs[name].append(dict(fn()))
            if pause:
                time.sleep(pause)
    medians: dict[str, dict[str, Any]] = {}
    ranges: dict[str, dict[str, tuple[float, float]]] = {}
    for name in order:
        keys = list(dict.fromkeys(k for m in runs[name] for k in m))
        med: dict[str, Any] = {}
        rng: dict[str, tuple[float, float]] = {}
        for k in keys:
            vals = [m[k] for m in runs[name] if k in m]
            if all(_numeric(v) for v in vals):
                nums = [v for v in vals if not math.isnan(v)]
                med[k] = statistics.median(nums) if nums else math.nan
                if nums:
                    rng[k] = (min(nums), max(nums))
            else:
                med[k] = vals[-1]
        medians[name] = med
        ranges[name] = rng
    return InterleaveResult(order, runs, medians, ranges)
