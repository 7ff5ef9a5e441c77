"""Where nexus-authz's CPU goes behind the real Envoy: bench_envoy's scenarios, with py-spy on nexus-authz.

    .venv/bin/python benchmarks/profile_envoy.py --scenarios http-uds-issue15 --procs 10 --duration 15

Runs bench_envoy.py's open loop unchanged; during each scenario's measured window it records the
nexus-authz process with ``py-spy record --native --format raw`` (collapsed stacks: one line per distinct
stack, ``frame;frame;... count``) and reads every thread's CPU time from /proc/PID/task. It prints, per
scenario: CPU µs/request per thread (the main thread runs the event loop; grpc's and the ledger's threads
are the others), and the main thread's samples by piece of the path (``PIECES``: first matching rule, on
the whole stack, wins) as a share of samples and as µs/request (share × the main thread's CPU/request).
Raw stacks are kept in ``--out`` for other cuts (``--top`` prints the hottest leaf frames too).

py-spy samples only threads it sees running (no ``--idle``), so the shares are of CPU, not of wall time.
The machine is shared: CPU time and proportions are what to compare, not latency.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import bench_envoy as be  # noqa: E402
import harness  # noqa: E402

# (piece, regex on one frame). A sample goes to the piece of its innermost frame that matches a rule
# (walking from the leaf towards the root; first rule that matches a frame wins), so a hash inside the
# decision counts as the hash, the decision's own Python as the decision.
PIECES: tuple[tuple[str, str], ...] = (
    ("gc", r"gc_collect|collect_generation|gcmodule\.c|deduce_unreachable|visit_"),
    ("syscalls: read/write/sendmsg", r"^(write|read|writev|sendmsg|recvmsg|__libc_write|__libc_read) \("),
    (
        "http: framing (httptools + its callbacks)",
        r"llhttp|httptools|AuthzProtocol\.(on_header|on_url|on_body|on_message_begin|on_headers_complete|data_received)",
    ),
    ("http: framing (compiled)", r"_http1|RequestParser|CompiledAuthzProtocol"),
    ("http: Request building", r"new_request|core/model\.py"),
    ("http: key hash + lookup", r"core/keys\.py|_hashopenssl|libcrypto|hmac\.py|_blake2"),
    ("http: body facts (JSON)", r"core/body\.py"),
    ("http: rate-limit headers", r"ratelimit_headers\.py"),
    ("http: limit windows + reservations", r"core/limits\.py|stores/memory\.py|core/reservations\.py"),
    ("http: decision (policy, engine)", r"core/policy\.py|Engine\.check|engine\.py"),
    ("http: answer building", r"HttpApp\.(response|allow_block|_denial)|_header_block|nginx_denial"),
    ("http: routing / on_message_complete", r"http_authz\.py"),
    ("als: protobuf", r"_message\.abi3|upb_|google/protobuf"),
    ("als: usage extraction (JSON)", r"core/usage\.py"),
    ("als: stream + entry handling", r"envoy_als\.py"),
    ("grpc.aio (cygrpc, asyncio glue)", r"cygrpc|grpc/aio|grpc/_"),
    ("ledger", r"ledger\.py|sqlite"),
    ("metrics / logging", r"prometheus|metrics\.py|logging/|latency\.py"),
    ("asyncio (tasks, futures, handles)", r"asyncio/|_asynciomodule|task_step|Task\.|Future\."),
    ("event loop (uvloop/libuv)", r"uvloop|loop\.c:|uv_|uv__|UVStream|UVHandle|Loop__"),
)
IDLE = re.compile(r"^(epoll_pwait|epoll_wait|poll|__poll|futex|pthread_cond_|sem_|do_futex)")


def classify(stack: str) -> str:
    frames = stack.split(";")
    if IDLE.search(frames[-1]):
        return "idle (waiting)"
    for frame in reversed(frames):
        for name, rx in _COMPILED:
            if rx.search(frame):
                return name
    return "other (interpreter, unattributed native)"


_COMPILED = [(n, re.compile(r)) for n, r in PIECES]


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (threads of the same name summed) of a process."""
    out: dict[str, float] = collections.defaultdict(float)
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        name = "main" if tid == str(pid) else re.sub(r"[\d_-]+$", "", comm) or comm
        out[name] += (int(fields[11]) + int(fields[12])) / tick
        out[name + " (system)"] += int(fields[12]) / tick
    return dict(out)


def read_raw(path: Path) -> list[tuple[str, int]]:
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            rows.append((stack, int(count)))
    return rows


def report(name: str, raw: Path | None, cpu: Mapping[str, float], requests: int, top: int) -> dict[str, Any]:
    rows = read_raw(raw) if raw is not None else []
    # py-spy names the thread in the first frame: "process 123:"python ..."" then "thread (0x...)"
    main_rows = [(s, c) for s, c in rows if "MainThread" in s.split(";", 1)[0]] or rows
    total = sum(c for _, c in main_rows) or 1
    pieces: dict[str, int] = collections.Counter()
    leaves: dict[str, int] = collections.Counter()
    for stack, count in main_rows:
        pieces[classify(stack)] += count
        if classify(stack) != "idle (waiting)":
            leaves[stack.rsplit(";", 1)[-1]] += count
    main_us = cpu.get("main", 0.0) * 1e6 / max(requests, 1)
    busy = total - pieces.get("idle (waiting)", 0) or 1
    print(f"\n### {name}: {requests} requests in the window; py-spy samples of the main thread: {total}\n")
    print("| thread | CPU µs/request |\n|---|---|")
    for thread, sec in sorted(cpu.items(), key=lambda kv: -kv[1]):
        if not thread.endswith(" (system)"):
            sys_us = cpu.get(thread + " (system)", 0.0) * 1e6 / max(requests, 1)
            print(f"| {thread} | {sec * 1e6 / max(requests, 1):.1f} (kernel {sys_us:.1f}) |")
    total_cpu = sum(v for k, v in cpu.items() if not k.endswith(" (system)"))
    print(f"| **all** | **{total_cpu * 1e6 / max(requests, 1):.1f}** |")
    if not rows:
        return {"cpu_s": dict(cpu), "requests": requests}
    print(
        f"\nmain thread: {main_us:.1f} µs/request; idle samples (in epoll/futex): "
        f"{100 * pieces.get('idle (waiting)', 0) / total:.0f}%, left out of the shares below\n"
    )
    print("| piece (main thread) | share of busy samples | ≈ CPU µs/request |\n|---|---|---|")
    for piece, count in sorted(pieces.items(), key=lambda kv: -kv[1]):
        if piece != "idle (waiting)":
            print(f"| {piece} | {100 * count / busy:.1f}% | {main_us * count / busy:.1f} |")
    if top:
        print(f"\ntop {top} leaf frames (main thread):\n")
        for leaf, count in leaves.most_common(top):
            print(f"- {100 * count / total:5.1f}%  {leaf[:150]}")
    return {"pieces": dict(pieces), "samples": total, "cpu_s": dict(cpu), "requests": requests}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--scenarios", default="http-uds-issue15")
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--procs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--spy-rate", type=int, default=500)
    ap.add_argument("--no-native", action="store_true", help="py-spy without --native")
    ap.add_argument(
        "--no-spy",
        action="store_true",
        help="thread CPU only (py-spy --native stops the process 500 times a second: its threads' CPU, "
        "and the latency, are not the undisturbed figures)",
    )
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "profile"))
    args = ap.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    recorded: list[tuple[str, Path, dict[str, float], int]] = []
    original = harness.run_open_loop
    counter = collections.Counter()

    def run_open_loop(*a: Any, **kw: Any) -> harness.LoadResult:
        pids = kw.get("measure_pids") or {}
        target = str(a[0] if a else kw.get("target"))
        scenario = next((n for n, p in ports.items() if str(p) in target), target)
        nexus = pids.get("nexus")
        if nexus is None or scenario == "envoy":
            return original(*a, **kw)
        counter[scenario] += 1
        raw = out / f"{stamp}-{scenario}-{counter[scenario]}.txt"
        cpu0: dict[str, float] = {}
        spy: list[subprocess.Popen[bytes]] = []

        def start() -> None:
            cpu0.update(thread_cpu(nexus))
            if args.no_spy:
                return
            cmd = [
                py_spy,
                "record",
                "-p",
                str(nexus),
                "-r",
                str(args.spy_rate),
                "-d",
                str(int(args.duration)),
            ]
            cmd += ["--format", "raw", "-o", str(raw), "--threads"]
            # --native pauses the process for each sample (py-spy cannot unwind C stacks otherwise): the
            # process's own CPU time is barely affected, its latency is
            cmd.append("--nonblocking" if args.no_native else "--native")
            spy.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        timer = threading.Timer(kw.get("warmup", 0.0), start)
        timer.start()
        res = original(*a, **kw)
        timer.cancel()
        cpu1 = thread_cpu(nexus)
        for p in spy:
            p.wait(timeout=30)
        cpu = {k: cpu1.get(k, 0.0) - cpu0.get(k, 0.0) for k in cpu1}
        recorded.append((scenario, raw, cpu, res.sent))
        return res

    harness.run_open_loop = run_open_loop  # type: ignore[assignment]
    ports: dict[str, int] = {}
    original_preflight = be.preflight

    def preflight(env: Any) -> None:
        ports[env.scenario.name] = env.port
        original_preflight(env)

    be.preflight = preflight  # type: ignore[assignment]
    bargs = be.parse_args(
        [
            "--scenarios",
            args.scenarios,
            "--rounds",
            str(args.rounds),
            "--rate",
            str(args.rate),
            "--duration",
            str(args.duration),
            "--warmup",
            str(args.warmup),
            "--procs",
            str(args.procs),
        ]
    )
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    res = be.run_scenarios([be.SCENARIOS[n] for n in names], bargs, be.machine_info())
    print("\n## nexus-authz through Envoy (bench_envoy), figures per round\n")
    for row in res.rows:
        keep = ("scenario", "added_p50_us", "added_p99_us", "nexus_cpu_us_per_req", "envoy_cpu_us_per_req")
        print({k: row.get(k) for k in keep if k in row} or row)
    for scenario, raw, cpu, requests in recorded:
        if args.no_spy:
            report(scenario, None, cpu, requests, 0)
        elif raw.exists():
            report(scenario, raw, cpu, requests, args.top)
        else:
            print(f"\n### {scenario}: py-spy wrote nothing ({raw})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
