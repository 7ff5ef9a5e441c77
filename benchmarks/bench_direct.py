"""Checks per second of one nexus-authz process driven directly on its socket, no Envoy (issue 15, item 3).

    .venv/bin/python benchmarks/bench_direct.py [--seconds 5] [--connections 32] [--keys 1] [--no-release]

Starts a real nexus-authz with the performance issue's configuration (bench_envoy.ISSUE15_CONFIG: requests,
tokens per minute and per day, a USD budget, a concurrency limit, a price for the model, accounting and
the SQLite ledger on), with its HTTP ext_authz listener also on TCP (``NEXUS_HTTP_TCP``: wrk has no Unix
sockets), and drives it closed loop with wrk: each request is what Envoy's ``http_service`` sends (the
recorded bytes of benchmarks/fixtures/envoy_ext_authz_check.http with this run's key and a unique
``x-request-id``), followed on the same connection by the Lua tap's release of its concurrency slot
(``POST /_nexus/release``), as every admitted request of a key with a ``concurrent:`` limit gets through
Envoy (``--no-release`` leaves it out: the slots are then held until their reservations expire, so keep
such runs short of the 100,000 slots).

Prints checks/s (a check and its release count as one), nexus-authz's cores and CPU µs per check (from
/proc), wrk's latency percentiles and every non-2xx answer (a 429 would mean the limits interfered).
The load generator shares the 2 cores with the server: the figure is a lower bound of what one process
answers. The target: >= 30,000 checks/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import bench_envoy as be  # noqa: E402
import harness  # noqa: E402

from nexus_authz.demo import procs  # noqa: E402

TARGET_CHECKS_PER_S = 30_000.0
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'


def _lua(data: str) -> str:
    return json.dumps(data)  # a JSON string literal is a valid Lua string literal for this ASCII text


def wrk_script(secrets_: list[str], release: bool) -> str:
    """wrk's Lua: per request the check (a unique request id, the keys round-robin) and its release."""
    head = (
        "POST /ext_authz/v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"content-length: {len(BODY)}\r\ncontent-type: application/json\r\nx-forwarded-for: 192.0.2.2\r\n"
        f"x-envoy-auth-partial-body: false\r\nx-nexus-content-length: {len(BODY)}\r\n"
        "x-envoy-internal: true\r\nx-envoy-expected-rq-timeout-ms: 500\r\n"
    )
    keys = ", ".join(_lua(s) for s in secrets_)
    return f"""
local head = {_lua(head)}
local body = {_lua(BODY.decode())}
local keys = {{{keys}}}
local release = {"true" if release else "false"}
local n, tag = 0, "x"
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  tag = "t" .. tostring(tid) .. "-" .. tostring(os.time())
end
function request()
  n = n + 1
  local id = tag .. "-" .. n
  local key = keys[(n % #keys) + 1]
  local check = head .. "authorization: Bearer " .. key .. "\\r\\nx-request-id: " .. id
    .. "\\r\\n\\r\\n" .. body
  if not release then
    return check
  end
  return check .. "POST /_nexus/release HTTP/1.1\\r\\nhost: 127.0.0.1\\r\\nx-nexus-release: 1\\r\\n"
    .. "content-length: " .. #id .. "\\r\\n\\r\\n" .. id
end
"""


def measure(seconds: float, connections: int, keys: int, release: bool) -> dict[str, Any]:
    port = procs.free_port()
    spec = be.NexusSpec(
        be.ISSUE15_CONFIG, be.LIMITS_KEY_FIELDS, keys=keys, env=(("NEXUS_HTTP_TCP", f"127.0.0.1:{port}"),)
    )
    with tempfile.TemporaryDirectory(prefix="nexus-direct-") as tmp:
        nexus = be.start_nexus(spec, Path(tmp) / "nexus", keys)
        try:
            script = Path(tmp) / "direct.lua"
            script.write_text(wrk_script(nexus.secrets, release))
            threads = min(connections, os.cpu_count() or 1)
            url = f"http://127.0.0.1:{port}/ext_authz/v1/chat/completions"
            base = ["wrk", "--latency", "-t", str(threads), "-c", str(connections), "-s", str(script)]
            subprocess.run([*base, "-d", "1s", url], capture_output=True, text=True, timeout=60, check=True)
            stats = harness.ProcStats(nexus.process.pid)
            stats.start()
            run = subprocess.run(
                [*base, "-d", f"{max(1, round(seconds))}s", url],
                capture_output=True,
                text=True,
                timeout=seconds + 60,
                check=True,
            )
            delta = stats.stop()
            res = harness.parse_wrk_output(run.stdout)
        finally:
            procs.stop_process(nexus.process, timeout=10)
    per_check = 2 if release else 1
    checks = res.rps / per_check
    cores = delta.cpu_fraction
    return {
        "checks_per_s": checks,
        "nexus_cores": cores,
        "nexus_cpu_us_per_check": cores * 1e6 / checks if checks else math.nan,
        "responses": res.requests,
        "non_2xx": res.non_2xx,
        "socket_errors": res.errors,
        "p50_us": res.p50_us,
        "p99_us": res.p99_us,
        "connections": connections,
        "keys": keys,
        "release": release,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds (after a 1 s warm-up)")
    ap.add_argument("--connections", type=int, default=32, help="wrk connections")
    ap.add_argument("--keys", type=int, default=1, help="distinct keys, round-robin")
    ap.add_argument("--no-release", action="store_true", help="checks only, no slot release per request")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.connections < 1 or args.keys < 1:
        ap.error("need --seconds > 0, --connections >= 1, --keys >= 1")
    r = measure(args.seconds, args.connections, args.keys, not args.no_release)
    if args.json:
        print(json.dumps(r))
        return 0
    verdict = "PASS" if r["checks_per_s"] >= TARGET_CHECKS_PER_S else "MISS"
    print(
        f"direct on its TCP listener, wrk {r['connections']} connections, {r['keys']} key(s), "
        f"{'check + release' if r['release'] else 'check only'}, {r['seconds']:g} s:"
    )
    print(
        f"  checks/s            {r['checks_per_s']:,.0f}   (target >= {TARGET_CHECKS_PER_S:,.0f}: {verdict})"
    )
    print(
        f"  nexus-authz         {r['nexus_cores']:.2f} cores, "
        f"{r['nexus_cpu_us_per_check']:.1f} µs CPU per check"
    )
    print(f"  latency (wrk)       p50 {r['p50_us']:.0f} µs, p99 {r['p99_us']:.0f} µs")
    print(f"  non-2xx / errors    {r['non_2xx']} / {r['socket_errors']} of {r['responses']:,} responses")
    return 0


if __name__ == "__main__":
    sys.exit(main())
