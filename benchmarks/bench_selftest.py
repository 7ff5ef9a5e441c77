"""Self-check of the benchmark harness: is the load generator accurate enough to trust its figures?

Starts a trivial asyncio + httptools server (uvloop when installed) in its own process, listening on
127.0.0.1 and on a Unix socket, then measures it the way the real benchmarks measure nexus-authz:
- open loop at 1,000 requests/s for 5 s over TCP and over the Unix socket (interleaved, medians):
  achieved rate (should be within 1% of the target), p50/p99, the generator's own send lag, the server's
  CPU µs per request from /proc, and the load processes' CPU µs per request (the harness's overhead);
- a latency check: a handler that sleeps 2 ms must never show less than 2 ms, and p50 just over it;
- a coordinated-omission check: one request stalls the server's event loop for 100 ms; the ~100 requests
  scheduled during the stall must all show their waiting time (a closed-loop tool would show ~4);
- closed-loop max requests/s with wrk (TCP) and h2load --h1 (Unix socket).

    .venv/bin/python benchmarks/bench_selftest.py [--rounds 1] [--rate 1000] [--duration 5] [--plot PATH]

Also ``--serve`` to run only the server (prints its port, pid and socket path).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

# --------------------------------------------------------------------------------------------------
# the trivial server
# --------------------------------------------------------------------------------------------------

_OK = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"


def _serve(port: int, unix_path: str) -> None:
    import httptools

    try:
        import uvloop

        uvloop.install()
        loop_name = "uvloop"
    except ImportError:
        loop_name = "asyncio"

    class Proto(asyncio.Protocol):
        __slots__ = ("transport", "parser", "url")

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            self.parser = httptools.HttpRequestParser(self)
            self.url = b""

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.transport.close()

        def on_url(self, url: bytes) -> None:
            self.url = url

        def on_message_complete(self) -> None:
            url = self.url
            if url == b"/":
                self.transport.write(_OK)
            elif url.startswith(b"/sleep/"):
                time.sleep(int(url[7:]) / 1000)  # a known service time (one connection, no queueing)
                self.transport.write(_OK)
            elif url.startswith(b"/stall/"):
                time.sleep(int(url[7:]) / 1000)  # blocks the whole event loop on purpose
                self.transport.write(_OK)
            else:
                self.transport.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            if not self.parser.should_keep_alive():
                self.transport.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        tcp = await loop.create_server(Proto, "127.0.0.1", port, backlog=1024)
        if os.path.exists(unix_path):
            os.unlink(unix_path)
        uds = await loop.create_unix_server(Proto, unix_path, backlog=1024)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        bound = tcp.sockets[0].getsockname()[1]
        print(f"serving {loop_name} port={bound} unix={unix_path} pid={os.getpid()}", flush=True)
        await stop.wait()
        tcp.close()
        uds.close()
        if os.path.exists(unix_path):
            os.unlink(unix_path)

    asyncio.run(main())


def start_server(unix_path: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--unix", unix_path], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("serving"):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    port = int(line.split("port=")[1].split()[0])
    return proc, port


# --------------------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--serve", action="store_true", help="only run the trivial server")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--unix", default="")
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds of TCP,UDS (medians)")
    ap.add_argument("--no-checks", action="store_true", help="skip the delay / stall / max-rps checks")
    ap.add_argument("--plot", default=os.path.join(tempfile.gettempdir(), "nexus-bench-selftest.png"))
    args = ap.parse_args()

    if args.serve:
        _serve(
            args.port, args.unix or os.path.join(tempfile.gettempdir(), f"nexus-selftest-{os.getpid()}.sock")
        )
        return 0
    tmp = tempfile.mkdtemp(prefix="nexus-selftest-")
    unix_path = args.unix or os.path.join(tmp, "srv.sock")

    server, port = start_server(unix_path)
    failures: list[str] = []
    try:
        tcp = ("127.0.0.1", port)
        last: dict[str, harness.LoadResult] = {}

        def scenario(name: str, target: Any) -> Any:
            def run() -> dict[str, Any]:
                res = harness.run_open_loop(
                    target,
                    rate=args.rate,
                    duration=args.duration,
                    procs=args.procs,
                    warmup=0.5,
                    measure_pids={"server": server.pid},
                )
                last[name] = res
                return res.metrics()

            return run

        t0 = time.monotonic()
        inter = harness.interleave(
            {"tcp": scenario("tcp", tcp), "uds": scenario("uds", unix_path)}, rounds=args.rounds
        )
        print(
            f"\n## open loop: {args.rate:g} req/s for {args.duration:g} s, {args.procs} load processes, "
            f"medians of {args.rounds} round(s) ({time.monotonic() - t0:.0f} s)\n"
        )
        harness.print_table(
            inter.rows(),
            [
                "scenario",
                ("achieved_rps", "achieved req/s"),
                ("p50_us", "p50 µs"),
                ("p90_us", "p90 µs"),
                ("p99_us", "p99 µs"),
                ("max_us", "max µs"),
                ("send_lag_p99_us", "send lag p99 µs"),
                ("server_cpu_us_per_req", "server CPU µs/req (stat)"),
                ("server_sched_cpu_us_per_req", "server CPU µs/req (schedstat)"),
                ("loadgen_cpu_us_per_req", "load gen CPU µs/req"),
                "errors",
            ],
            formats={"achieved_rps": lambda v: f"{v:.1f}"},
        )
        for name, med in inter.medians.items():
            err = abs(med["achieved_rps"] - args.rate) / args.rate
            if err > 0.01:
                failures.append(f"{name}: achieved {med['achieved_rps']:.1f} req/s, {err:.1%} off the target")
            if med["errors"]:
                failures.append(f"{name}: {med['errors']} errors")
        lg = max(m["loadgen_cpu_us_per_req"] for m in inter.medians.values())
        sys_share = sum(r.loadgen_sys_s for r in last.values()) / sum(r.loadgen_cpu_s for r in last.values())
        print(
            f"\nload generation eats {lg * args.rate / 1e4:.1f}% of one core at {args.rate:g} req/s "
            f"({lg:.1f} µs/request across {args.procs} processes, {sys_share:.0%} of it in the kernel)"
        )
        if harness.plot_latency({f"{n} {args.rate:g}/s": r.latencies_us for n, r in last.items()}, args.plot):
            print(f"latency plot: {args.plot}")

        if not args.no_checks:
            checks(tcp, unix_path, failures)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if os.path.exists(unix_path):
            os.unlink(unix_path)
        os.rmdir(tmp)

    print("\n" + ("SELFTEST OK" if not failures else "SELFTEST FAILED:\n  " + "\n  ".join(failures)))
    return 1 if failures else 0


def checks(tcp: tuple[str, int], unix_path: str, failures: list[str]) -> None:
    # 1. measured latency matches a known service time
    res = harness.run_open_loop(
        tcp, rate=100, duration=2, procs=1, request_bytes=harness.build_request("GET", "/sleep/2")
    )
    low, p50 = res.latencies_us[0], res.percentile(50)
    print(
        f"\n## delay check: handler sleeps 2 ms -> min {low:.0f} µs, p50 {p50:.0f} µs, "
        f"p99 {res.percentile(99):.0f} µs (never below 2,000; above it by the round trip and the "
        "server's own sleep overshoot)"
    )
    if low < 2000 or p50 > 3000:
        failures.append(f"delay check: min {low:.0f} µs, p50 {p50:.0f} µs; expected min >= 2000, p50 < 3000")

    # 2. coordinated omission: one 100 ms stall in 2 s at 1,000/s
    rate, stall_ms, n = 1000, 100, 2000
    ok = harness.build_request("GET", "/")
    stall = harness.build_request("GET", f"/stall/{stall_ms}")
    variants = [stall if i == n // 2 else ok for i in range(n)]
    res = harness.run_open_loop(tcp, rate=rate, duration=n / rate, procs=4, request_bytes=variants)
    slow = sum(1 for v in res.latencies_us if v > 10_000)
    expected = (stall_ms - 10) * rate // 1000
    print(
        f"## stall check: one {stall_ms} ms event-loop stall at {rate}/s -> {slow} requests over 10 ms "
        f"(expected ≈ {expected} when latency counts from the scheduled time; a closed-loop client "
        f"would record ≈ 4), max {res.latencies_us[-1] / 1000:.1f} ms"
    )
    if not 0.8 * expected <= slow <= 1.2 * expected:
        failures.append(f"stall check: {slow} requests over 10 ms, expected ≈ {expected}")

    # 3. closed-loop max throughput (load tool and server share the 2 cores)
    rows = []
    for name, target in (("tcp (wrk, 16 conns)", tcp), ("uds (h2load --h1, 16 conns)", unix_path)):
        try:
            m = harness.run_max_rps(target, duration=3, connections=16)
        except (OSError, subprocess.SubprocessError) as exc:
            failures.append(f"max rps {name}: {exc}")
            continue
        rows.append({"scenario": name, "tool": m.tool, **m.metrics()})
    print("\n## closed-loop max throughput (3 s)\n")
    harness.print_table(
        rows,
        [
            "scenario",
            "tool",
            ("max_rps", "req/s"),
            ("max_rps_p50_us", "p50 µs (h2load: mean)"),
            ("max_rps_p99_us", "p99 µs"),
            ("max_rps_errors", "errors"),
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
