"""ShouldRateLimit (Envoy's RateLimitService, issue 7): latency and throughput with 1, 3 and 10 descriptors.

    .venv/bin/python benchmarks/bench_rls.py [--quick]

Three figures per descriptor count, each on its own line:
  core     the decision in-process, no gRPC: RateLimitRequest (parsed) -> plan -> memory store ->
           answer -> serialized RateLimitResponse (RateLimitService.decide), per call
  grpc     one call in flight: a grpc.aio client (this process) -> a grpc.aio server on uvloop in a
           subprocess, median and p99 round trip
  rps      32 calls in flight for a few seconds: requests/s, and the server's CPU per request (from
           /proc/<pid>/stat), which is what a sidecar pays
Every request is admitted (limits far above the load): the common path. Descriptors are key-only rules
(`k0`..`k9`, a minute GCRA window each) with 1000 distinct values, so the store holds real counters.
The client shares the machine's cores with the server: rps is a lower bound of what Envoy would get.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2  # noqa: E402
from envoy.service.ratelimit.v3 import rls_pb2  # noqa: E402

from nexus_authz.adapters.envoy_rls import RateLimitService, RlsConfigSource  # noqa: E402
from nexus_authz.decide import Decider  # noqa: E402
from nexus_authz.stores.base import LocalCounters  # noqa: E402
from nexus_authz.stores.memory import MemoryCounterStore  # noqa: E402

DESCRIPTOR_COUNTS = (1, 3, 10)
USERS = 1000
CONCURRENCY = 32
METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"


def write_config(directory: Path) -> None:
    rules = "".join(
        f"  - key: k{i}\n    rate_limit: {{unit: minute, requests_per_unit: 4000000000}}\n" for i in range(10)
    )
    (directory / "bench.yaml").write_text(f"domain: bench\ndescriptors:\n{rules}")


def requests(n: int) -> list[bytes]:
    """Serialized RateLimitRequests with n descriptors, one per user (cycled by the callers)."""
    out = []
    for user in range(USERS):
        descriptors = [
            ratelimit_pb2.RateLimitDescriptor(
                entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=f"k{i}", value=f"user-{user}")]
            )
            for i in range(n)
        ]
        out.append(rls_pb2.RateLimitRequest(domain="bench", descriptors=descriptors).SerializeToString())
    return out


def service(directory: Path) -> RateLimitService:
    source = RlsConfigSource(str(directory))
    source.load()
    return RateLimitService(source, Decider(LocalCounters(MemoryCounterStore())))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- in-process -------------------------------------------------------------------------------------------


def bench_core(directory: Path, n: int, seconds: float) -> tuple[float, float, float]:
    """-> (median µs, p99 µs, calls/s on one core) of parse + decide."""
    svc = service(directory)
    payloads = requests(n)
    parse = rls_pb2.RateLimitRequest.FromString
    samples: list[float] = []
    clock = time.perf_counter_ns
    deadline = time.perf_counter() + seconds
    i = 0
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        for _ in range(200):
            t0 = clock()
            svc.decide(parse(payloads[i % USERS]))
            samples.append((clock() - t0) / 1000.0)
            i += 1
    elapsed = time.perf_counter() - started
    return statistics.median(samples), pct(samples, 0.99), i / elapsed


# -- over gRPC ----------------------------------------------------------------------------------------------


async def serve(directory: Path, port_file: Path) -> None:
    import grpc

    svc = service(directory)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((svc.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))
    await server.wait_for_termination()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench_grpc(port: int, pid: int, n: int, seconds: float) -> tuple[float, float, float, float]:
    """-> (median µs, p99 µs with one call in flight, requests/s and server CPU µs/request at 32)."""
    import grpc

    payloads = requests(n)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(METHOD)  # bytes in, bytes out: the client does no protobuf work
        for i in range(200):  # warm up: connection, server-side caches
            await call(payloads[i % USERS])
        samples: list[float] = []
        deadline = time.perf_counter() + seconds / 2
        i = 0
        while time.perf_counter() < deadline:
            t0 = time.perf_counter_ns()
            await call(payloads[i % USERS])
            samples.append((time.perf_counter_ns() - t0) / 1000.0)
            i += 1

        done = 0
        stop = time.perf_counter() + seconds / 2

        async def worker(offset: int) -> None:
            nonlocal done
            j = offset
            while time.perf_counter() < stop:
                await call(payloads[j % USERS])
                j += CONCURRENCY
                done += 1

        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(CONCURRENCY)))
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    return statistics.median(samples), pct(samples, 0.99), done / elapsed, cpu / done * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 10 s in all)")
    parser.add_argument("--serve", nargs=2, metavar=("DIR", "PORT_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(serve(Path(args.serve[0]), Path(args.serve[1])))
        return
    core_seconds, grpc_seconds = (1.0, 2.0) if args.quick else (3.0, 8.0)
    with tempfile.TemporaryDirectory(prefix="bench-rls-") as tmp:
        directory = Path(tmp)
        write_config(directory)
        print(f"# ShouldRateLimit, python {sys.version.split()[0]}, {os.cpu_count()} cpus (shared)")
        for n in DESCRIPTOR_COUNTS:
            median, p99, rate = bench_core(directory, n, core_seconds)
            print(
                f"core  {n:2d} descriptors: median {median:7.1f} µs  p99 {p99:7.1f} µs  {rate:8.0f} calls/s"
            )
        port_file = directory / "port"
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(directory), str(port_file)])
        try:
            deadline = time.monotonic() + 20
            while not port_file.exists() or not port_file.read_text():
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the benchmark server did not start")
                time.sleep(0.05)
            port = int(port_file.read_text())
            for n in DESCRIPTOR_COUNTS:
                median, p99, rps, cpu = asyncio.run(bench_grpc(port, server.pid, n, grpc_seconds))
                print(
                    f"grpc  {n:2d} descriptors: median {median:7.1f} µs  p99 {p99:7.1f} µs   "
                    f"(1 in flight)\n"
                    f"rps   {n:2d} descriptors: {rps:8.0f} requests/s  server CPU {cpu:6.1f} µs/request   "
                    f"({CONCURRENCY} in flight)"
                )
        finally:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
