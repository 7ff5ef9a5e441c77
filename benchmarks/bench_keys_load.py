"""Loading a large key file: time, peak RSS and what each key keeps (the performance issue's "1,000,000 keys
load in <= 10 s with peak RSS <= 1.5 GB").

The key file is the benchmarks' (benchmarks/bench_envoy.py `key_file`: id, hash and plan per key, the
plan of benchmarks/bench_memory.py). A fresh interpreter imports the server's modules, reads the settings,
then builds the key snapshot exactly as the server does at start and on reload
(`nexus_authz.engine.read_key_snapshot`: read the file, parse, validate, index). Printed:

  load s        the snapshot build, from reading the file to the finished snapshot (and its CPU time)
  peak MiB      VmHWM of that process (the interpreter and imports included), and above the RSS before
  RSS MiB       after the build, with the snapshot held
  in use B/key  bytes the allocators hold for the snapshot (pymalloc + malloc, after a collection)

    .venv/bin/python benchmarks/bench_keys_load.py [--keys 100000] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import bench_envoy as be  # noqa: E402
import bench_memory as bm  # noqa: E402

PEAK_TARGET = 1.5 * 2**30  # bytes, at 1,000,000 keys
TIME_TARGET = 10.0  # seconds, at 1,000,000 keys


def write_files(workdir: Path, n: int) -> Path:
    """nexus.yaml + keys.yaml for n keys (secrets need not be kept: nothing is sent)."""
    workdir.mkdir(parents=True, exist_ok=True)
    secrets = (f"nx-bench-load-{i:08d}" for i in range(n))
    (workdir / "keys.yaml").write_text(be.key_file(list(secrets), be.LIMITS_KEY_FIELDS))
    path = workdir / "nexus.yaml"
    path.write_text(be.nexus_config(str(workdir / "authz.sock"), extra=bm.MEMORY_CONFIG))
    return path


def _vm() -> tuple[int, int]:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    kib = lambda name: int(fields[name].split()[0]) * 1024  # noqa: E731
    return kib("VmRSS"), kib("VmHWM")


def child(config: str) -> dict[str, float]:
    """In the fresh interpreter: build the snapshot once and measure."""
    from nexus_authz import app
    from nexus_authz import engine as engine_mod
    from nexus_authz.settings import load_settings

    settings = load_settings(config)
    pepper = app.resolve_pepper(settings)
    credentials = app.resolve_credentials(settings)
    gc.collect()
    rss_before, _ = _vm()
    in_use_before = bm.allocator_bytes() or 0
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    snapshot = engine_mod.read_key_snapshot(settings, pepper=pepper, credentials=credentials, now=time.time())
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    gc.collect()
    rss_after, hwm = _vm()
    in_use = (bm.allocator_bytes() or 0) - in_use_before
    n = len(snapshot)
    return {
        "keys": n,
        "seconds": seconds,
        "cpu_seconds": cpu,  # steadier than `seconds` on a shared machine
        "rss_before": rss_before,
        "peak": hwm,
        "rss_after": rss_after,
        "in_use_per_key": in_use / n if n else 0.0,
    }


def measure(n: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-keys-load-"))
    try:
        config = write_files(tmp, n)
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(config)],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
            cwd=REPO,
        ).stdout
        result: dict[str, float] = json.loads(out)
        result["file_bytes"] = (tmp / "keys.yaml").stat().st_size
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--json", default="")
    ap.add_argument("--child", metavar="CONFIG", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    r = measure(args.keys)
    mib = 2**20
    scale = 1_000_000 / max(1, r["keys"])
    print(
        f"{r['keys']:,} keys ({r['file_bytes'] / mib:.0f} MiB file): load {r['seconds']:.2f} s "
        f"({r['cpu_seconds']:.2f} s CPU), "
        f"peak RSS {r['peak'] / mib:.0f} MiB ({(r['peak'] - r['rss_before']) / mib:.0f} MiB above the "
        f"{r['rss_before'] / mib:.0f} MiB before), RSS after {r['rss_after'] / mib:.0f} MiB, "
        f"in use {r['in_use_per_key']:,.0f} B/key"
    )
    peak_1m = r["rss_before"] + (r["peak"] - r["rss_before"]) * scale
    seconds_1m = r["seconds"] * scale
    verdict = lambda ok: "PASS" if ok else "MISS"  # noqa: E731
    what = "measured" if r["keys"] == 1_000_000 else "extrapolated linearly"
    print(
        f"1,000,000 keys ({what}): load {seconds_1m:.1f} s (target <= {TIME_TARGET:g} s: "
        f"{verdict(seconds_1m <= TIME_TARGET)}), peak RSS {peak_1m / mib:,.0f} MiB "
        f"(target <= {PEAK_TARGET / mib:,.0f} MiB: {verdict(peak_1m <= PEAK_TARGET)})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
