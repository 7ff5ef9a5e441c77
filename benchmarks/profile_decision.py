"""cProfile of the decision alone (Engine.check_fast + release), in-process, on the issue-15 plan.

    .venv/bin/python benchmarks/profile_decision.py [--n 20000] [--top 25]

The engine and the check request are bench_breakdown's (the recorded Envoy check, bench_envoy's
ISSUE15_CONFIG: requests/min GCRA, tokens/min GCRA, tokens/day sliding, usd/month sliding, concurrency).
Each request has its own request id and is released right after, so the windows stay steady. Prints the
top functions by own time: where the decision's microseconds go (cProfile inflates small calls; read the
shares, not the absolute figures, and use bench_breakdown's "decision" row for those).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import bench_breakdown as bb  # noqa: E402

from nexus_authz import native  # noqa: E402
from nexus_authz.core.model import new_request  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=20000, help="decisions profiled")
    ap.add_argument("--top", type=int, default=25, help="functions listed")
    args = ap.parse_args(argv)
    fx = bb.Fixtures()
    engine = bb.build_engine(Path(tempfile.mkdtemp()), fx)
    head, body = fx.check.split(b"\r\n\r\n", 1)
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, value = line.split(b":", 1)
        headers[name.decode().lower()] = value.strip().decode()
    requests = [
        new_request("POST", "/v1/chat/completions", headers, body, False, f"{i:08x}-r", "192.0.2.2")
        for i in range(args.n)
    ]
    print(f"# compiled: windows {native.windows is not None}, framing {native.http1 is not None}")
    profile = cProfile.Profile()
    profile.enable()
    for request in requests:
        engine.check_fast(request)
        engine.release(request.request_id)
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
