"""Soak: a bounded run at a steady 1,000 requests/s through the real Envoy with 10,000 distinct keys.

Issue 10 section 4: the whole default stack (envoy/envoy.yaml: HTTP ext_authz over the Unix socket and
token accounting by the Lua usage tap + gRPC access log; nexus-authz with the benchmark plan's limits:
requests and tokens per minute, tokens per day, so every key gets its counters and its reservations are
settled) against the mock upstream, loaded open loop (benchmarks/harness.py ``run_open_loop``: evenly
spaced arrivals, latency from the scheduled send time) round-robin over 10,000 keys. It reports:

- errors (transport errors, timeouts, unsent requests, and any status but 200): must be 0 (exit 1 otherwise);
- latency p50/p90/p99/p99.9/max through Envoy;
- nexus-authz RSS before the load, once every key has been used (its counters and caches exist), and at
  the end; growth after that point means memory that grows with time rather than with keys;
- CPU per request of nexus-authz and Envoy over the measured window;
- nexus-authz's own view at the end (/metrics): decisions, counters, reservations still in flight.

Run (default 60 s after a 2 s warm-up; the stack starts in ~5 s):

    .venv/bin/python benchmarks/soak.py [--seconds 60] [--rate 1000] [--keys 10000] [--procs 4] [--json PATH]

Reuses bench_envoy.py's stack building (mock upstream, nexus-authz with a generated key file, Envoy from
the shipped template); the key file of 10,000 keys is written in ~50 ms (one precomputed-pad HMAC each).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import bench_envoy  # noqa: E402
import harness  # noqa: E402

from nexus_authz.demo import procs  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


class RssSampler(threading.Thread):
    """RSS of one process once a second while the load runs: (seconds since start, bytes)."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop_event = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append((time.monotonic() - self._t0, rss(self.pid)))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)

    def at(self, seconds: float) -> int:
        """The first sample taken at or after `seconds` (the last one if none)."""
        for t, value in self.samples:
            if t >= seconds:
                return value
        return self.samples[-1][1] if self.samples else 0


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return harness.parse_proc_status(f.read()).get("VmRSS", 0)


def nexus_metrics(admin_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def run(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="nexus-soak-"))
    processes = []
    started = time.monotonic()
    try:
        mock, upstream_port = bench_envoy.start_mock(tmp)
        processes.append(mock)
        spec = bench_envoy.NexusSpec(
            config_extra=bench_envoy.LIMITS_CONFIG, key_fields=bench_envoy.LIMITS_KEY_FIELDS, keys=args.keys
        )
        t0 = time.monotonic()
        nexus = bench_envoy.start_nexus(spec, tmp / "nexus", args.keys)
        processes.append(nexus.process)
        nexus_ready = time.monotonic() - t0
        scenario = bench_envoy.Scenario("soak", bench_envoy.ENVOY_HTTP, "http", spec)
        envoy = bench_envoy.start_scenario_envoy(
            scenario, nexus, upstream_port, tmp / "envoy", 1, nexus.secrets
        )
        processes.append(envoy.process)
        bench_envoy.preflight(envoy)
        admin_port = getattr(nexus, "admin_port", None)
        time.sleep(1.0)  # let the first requests' accounting settle before the baseline
        rss_start = rss(nexus.process.pid)
        args.load_before = [round(x, 2) for x in os.getloadavg()]  # the machine is shared: say how busy
        print(
            f"# soak: {args.seconds:g} s at {args.rate:g} requests/s over {args.keys} keys through Envoy "
            f"({', '.join(envoy.filters)}); nexus-authz ready in {nexus_ready:.1f} s, "
            f"RSS {rss_start / 2**20:.1f} MB; load average {args.load_before}",
            flush=True,
        )
        sampler = RssSampler(nexus.process.pid)
        sampler.start()
        result = harness.run_open_loop(
            ("127.0.0.1", envoy.port),
            rate=args.rate,
            duration=args.seconds,
            warmup=args.warmup,
            procs=args.procs,
            request_bytes=envoy.requests,
            measure_pids={"nexus": nexus.process.pid, "envoy": envoy.process.pid},
            timeout=args.timeout,
        )
        time.sleep(1.0)  # the last responses' access-log batches
        sampler.stop()
        rss_end = rss(nexus.process.pid)
        metrics = nexus_metrics(admin_port) if admin_port else {}
        # every key has been used once after keys/rate seconds (plus the warm-up): from then on the
        # keys' state exists, and the RSS should stay flat
        all_keys_at = args.warmup + args.keys / args.rate + 1.0
        rss_all_keys = sampler.at(all_keys_at)
        figures = report(args, result, rss_start, rss_all_keys, rss_end, all_keys_at, sampler, metrics)
        figures["elapsed_s"] = round(time.monotonic() - started, 1)
        figures["nexus_ready_s"] = round(nexus_ready, 2)
        figures["envoy_filters"] = envoy.filters
        path = Path(args.json) if args.json else RESULTS / f"soak-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2, default=str))
        print(f"- raw figures: {path}")
        return 0 if figures["errors"] == 0 else 1
    finally:
        for process in reversed(processes):
            procs.stop_process(process, timeout=10)
        if args.keep:
            print(f"- work directory kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def report(
    args: argparse.Namespace,
    result: harness.LoadResult,
    rss_start: int,
    rss_all_keys: int,
    rss_end: int,
    all_keys_at: float,
    sampler: RssSampler,
    metrics: dict[str, float],
) -> dict[str, Any]:
    s = result.summary()
    non_2xx = result.completed - result.ok
    errors = result.error_count + non_2xx
    mb = 2**20
    nexus_cpu = result.cpu["nexus"].cpu_us_per_request(result.sent)
    envoy_cpu = result.cpu["envoy"].cpu_us_per_request(result.sent)
    figures: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "load_average_before": args.load_before,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seconds": args.seconds,
        "rate": args.rate,
        "keys": args.keys,
        "achieved_rps": round(result.achieved_rate, 1),
        "sent": result.sent,
        "completed": result.completed,
        "errors": errors,
        "error_kinds": dict(result.errors),
        "unsent": result.unsent,
        "statuses": {str(k): v for k, v in result.statuses.items()},
        "latency_ms": {k: round(v / 1000, 3) for k, v in s.items() if k != "n"},
        "nexus_cpu_us_per_request": round(nexus_cpu, 1),
        "envoy_cpu_us_per_request": round(envoy_cpu, 1),
        "nexus_cpu_cores": round(result.cpu["nexus"].cpu_fraction, 3),
        "nexus_rss_mb": {
            "start": round(rss_start / mb, 1),
            "all_keys_used": round(rss_all_keys / mb, 1),
            "end": round(rss_end / mb, 1),
            "peak": round(max((v for _, v in sampler.samples), default=rss_end) / mb, 1),
        },
        "rss_growth_per_key_bytes": round((rss_all_keys - rss_start) / args.keys),
        "rss_growth_after_all_keys_mb": round((rss_end - rss_all_keys) / mb, 2),
        "rss_timeline_mb": [
            (round(t), round(v / mb, 1)) for t, v in sampler.samples[:: max(1, len(sampler.samples) // 12)]
        ],
        "nexus_metrics": {
            k: v
            for k, v in metrics.items()
            if k.startswith(("nexus_authz_decisions", "nexus_authz_counters", "nexus_authz_reservations"))
            or k.startswith(("nexus_authz_accounted", "nexus_authz_keys"))
        },
    }
    print("| figure | value |\n|---|---:|")
    rows = [
        ("requests sent / completed", f"{result.sent} / {result.completed} ({result.achieved_rate:.0f}/s)"),
        ("errors (must be 0)", f"{errors} (transport {result.error_count}, non-200 {non_2xx})"),
        (
            "latency p50 / p99 / p99.9 / max",
            " / ".join(f"{s[k] / 1000:.2f} ms" for k in ("p50", "p99", "p99.9", "max")),
        ),
        ("nexus-authz CPU per request", f"{nexus_cpu:.0f} µs ({result.cpu['nexus'].cpu_fraction:.2f} cores)"),
        ("Envoy CPU per request", f"{envoy_cpu:.0f} µs"),
        ("nexus-authz RSS before the load", f"{rss_start / mb:.1f} MB"),
        (f"... once all {args.keys} keys were used (t={all_keys_at:.0f} s)", f"{rss_all_keys / mb:.1f} MB"),
        ("... at the end", f"{rss_end / mb:.1f} MB"),
        ("RSS growth per key", f"{(rss_all_keys - rss_start) / args.keys:.0f} bytes"),
        ("RSS growth after all keys were used", f"{(rss_end - rss_all_keys) / mb:+.2f} MB"),
    ]
    for name, value in rows:
        print(f"| {name} | {value} |")
    if metrics:
        decisions = {
            m.group(1): int(v)
            for k, v in metrics.items()
            if k.startswith("nexus_authz_decisions_total") and v and (m := re.search(r'reason="([^"]*)"', k))
        }
        print(f"- nexus-authz decisions: {decisions}")
        for name in ("nexus_authz_reservations_in_flight", 'nexus_authz_counters{store="limits"}'):
            if name in metrics:
                print(f"- {name}: {metrics[name]:g}")
    return figures


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="measured seconds (default 60)")
    ap.add_argument("--rate", type=float, default=1000.0, help="requests/s, open loop (default 1000)")
    ap.add_argument("--keys", type=int, default=10_000, help="distinct keys, round-robin (default 10000)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the measured window")
    ap.add_argument("--procs", type=int, default=4, help="load processes (one connection each)")
    ap.add_argument("--timeout", type=float, default=2.0, help="a response slower than this is an error")
    ap.add_argument("--json", default="", help="raw figures (default benchmarks/results/soak-<time>.json)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    args = ap.parse_args(argv)
    if (
        args.seconds <= 0
        or args.rate <= 0
        or args.keys < 1
        or args.procs < 1
        or not math.isfinite(args.seconds)
    ):
        ap.error("need --seconds > 0, --rate > 0, --keys >= 1, --procs >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
