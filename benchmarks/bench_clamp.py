"""What clamping's body rewrite costs per request (issue 16 item 3), in Envoy CPU time.

Starts the real stack (mock upstream, nexus-authz, Envoy with envoy/envoy.yaml) twice: once with the
shipped clamp filter, once with its `envoy_on_request` (envoy/nexus-clamp.lua) removed. Over one keep-alive
connection it sends N chat requests of a key with a clamping limit and a roomy budget:

  capped    the body sets max_tokens: nothing to rewrite (the filter's one metadata look-up)
  rewrite   the body sets no cap: nexus-authz writes the reserved default (x-nexus-clamp), the Lua
            filter buffers, splices the body and sets content-length (the path of a clamped request)

and prints Envoy's and nexus-authz's CPU time per request (utime + stime from /proc, not wall time:
the machine is shared), and the differences. Not a load test: a few seconds. Run:

    PYTHONPATH=$PWD python benchmarks/bench_clamp.py [N]
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tests.e2e.stack import ENVOY_HTTP, Stack
from tests.helpers import KeySpec

KEY = KeySpec("bench", extra={"limits": [{"tokens": 10**12, "per": "day", "clamp": True}]})
MESSAGES = [{"role": "user", "content": "Say hello in one short sentence, please." * 4}]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(stack: Stack, n: int, body: bytes) -> tuple[float, float]:
    """(Envoy, nexus-authz) CPU seconds per request over n requests."""
    assert stack.envoy is not None and stack.nexus is not None
    host, port = stack.gateway.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port))
    headers = {"authorization": f"Bearer {KEY.secret}", "content-type": "application/json"}
    for _ in range(50):  # warm-up
        conn.request("POST", "/v1/chat/completions", body, headers)
        conn.getresponse().read()
    envoy0, nexus0 = cpu_seconds(stack.envoy.pid), cpu_seconds(stack.nexus.pid)
    for _ in range(n):
        conn.request("POST", "/v1/chat/completions", body, headers)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
    envoy, nexus = cpu_seconds(stack.envoy.pid) - envoy0, cpu_seconds(stack.nexus.pid) - nexus0
    conn.close()
    return envoy / n, nexus / n


def without_request_side(workdir: Path) -> Path:
    """envoy.yaml next to a nexus-clamp.lua without envoy_on_request (the baseline: nothing rewrites)."""
    shutil.copy(ENVOY_HTTP.parent / "nexus-usage.lua", workdir / "nexus-usage.lua")
    lua = (ENVOY_HTTP.parent / "nexus-clamp.lua").read_text()
    (workdir / "nexus-clamp.lua").write_text(
        lua.replace("function envoy_on_request(", "local function _unused(")
    )
    shutil.copy(ENVOY_HTTP, workdir / "envoy.yaml")
    return workdir / "envoy.yaml"


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    capped = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 50}).encode()
    uncapped = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode()
    results: dict[str, tuple[float, float]] = {}
    for variant in ("baseline", "shipped"):
        workdir = Path(tempfile.mkdtemp(prefix="nx-bench-clamp-"))
        template = without_request_side(workdir) if variant == "baseline" else None
        stack = Stack(workdir=workdir, keys=(KEY,), envoy_template=template, mock_options={"record_limit": 0})
        try:
            stack.start()
            results[f"{variant} capped"] = run(stack, n, capped)
            if variant == "shipped":
                results["shipped rewrite"] = run(stack, n, uncapped)
        finally:
            stack.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"{n} requests per row; CPU time per request (Envoy, nexus-authz), in microseconds")
    for name, (envoy, nexus) in results.items():
        print(f"  {name:16s} envoy {envoy * 1e6:7.1f}   nexus-authz {nexus * 1e6:7.1f}")
    base = results["baseline capped"]
    hook = results["shipped capped"]
    rewrite = results["shipped rewrite"]
    print(f"request-side hook on a request it leaves alone: envoy {(hook[0] - base[0]) * 1e6:+.1f} us")
    print(
        f"rewrite (buffer + splice + content-length): envoy {(rewrite[0] - hook[0]) * 1e6:+.1f} us, "
        f"nexus-authz {(rewrite[1] - hook[1]) * 1e6:+.1f} us"
    )


if __name__ == "__main__":
    main()
