"""gRPC ext_authz's Check on the check socket (adapters/als_h2.py), in process: what one Check costs from
Envoy's frames in to the answer's bytes out, and where that goes.

    .venv/bin/python benchmarks/bench_grpc_check.py [--batches 5] [--n 2000] [--json PATH]

The engine is the performance issue's benchmark configuration (bench_envoy.ISSUE15_CONFIG: requests/min,
tokens/min, tokens/day, USD/month, concurrency, a price; accounting on). Each Check is what Envoy 1.40
sends with envoy/envoy-grpc.yaml for the benchmark's request: the HPACK header blocks are Envoy's own,
recorded (its first call's, which indexes its fields, then the block of every later call on the
connection: indexed fields and `:path` as a literal without indexing), the CheckRequest has the fields
Envoy fills (addresses, the allowed headers with a fresh x-request-id each, the raw body, the route's
context extension). One HTTP/2 connection (als_h2.H2Connection on a transport that only collects the
bytes written) takes them one HEADERS + DATA read at a time, as Envoy's writes arrive.

Rows, each the median over --batches batches of the mean µs of this thread's CPU per Check:
  socket Check       the connection's data_received: frames, HPACK, the decision, the answer's frames
  ⊂ answer           AuthorizationService.answer alone (parse, Decider.check_plain, serialize)
  port's decision    what the gRPC port runs for the same message besides grpc.aio's own cost:
                     Engine.check_fast (the reference decision) and serialize
Through the real Envoy (the wake-ups, the system calls, Envoy's side) see bench_envoy.py's
grpc-issue15 (this path) and grpc-issue15-port (grpc.aio) scenarios.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import bench_envoy as be  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2  # noqa: E402

from nexus_authz.adapters import h2_frames as h2  # noqa: E402
from nexus_authz.adapters.als_h2 import PREFACE, H2Connection  # noqa: E402
from nexus_authz.adapters.envoy_als import AccessLogService  # noqa: E402
from nexus_authz.adapters.envoy_authz import AuthorizationService, request_from_check  # noqa: E402
from nexus_authz.adapters.h2_listener import H2Receiver  # noqa: E402
from nexus_authz.core.model import Reason  # noqa: E402
from nexus_authz.engine import Engine  # noqa: E402
from nexus_authz.settings import load_settings  # noqa: E402

# Envoy 1.40's header blocks for envoy-grpc.yaml's Check (recorded on the check socket): the first call's
# (literals indexed incrementally) and every later call's (table-neutral).
FIRST_BLOCK = bytes.fromhex(
    "83049f60b5773fa5d05b3b98855c76a675fbb2bc36a673d86f63498f5317a7293aff418ca8be6d4443b533fb8a6b2b27"
    "8640027465864d833505b11f40899acac8b24d494f6a7f836c00a75f8b1d75d0620d263d4c4d6564408cf2b16aee7f4b"
    "1aa496ca8747834d9697408bf2b4a7b3c0ec90b22d29ec870be25c0b89717f4096f2b16aee7f4b17cd65224b22d676592"
    "6a4a7b52b528f826c00"
)
LATER_BLOCK = bytes.fromhex(
    "83049f60b5773fa5d05b3b98855c76a675fbb2bc36a673d86f63498f5317a7293affc486c3c2c1c0bfbe"
)
SECRET = "nx-bench-0123456789abcdef-0000000"


class Sink:
    """The transport: keeps nothing but the byte count (the answers are not read)."""

    written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def check_message(i: int) -> bytes:
    """The benchmark's request as Envoy's CheckRequest, with x-request-id number `i`."""
    req = external_auth_pb2.CheckRequest()
    a = req.attributes
    a.source.address.socket_address.address = "127.0.0.1"
    a.source.address.socket_address.port_value = 34946
    a.destination.address.socket_address.address = "127.0.0.1"
    a.destination.address.socket_address.port_value = 10000
    a.request.time.seconds = 1796692550
    http = a.request.http
    http.id = "4393162898852768715"
    http.method = "POST"
    http.headers.update(
        {
            "x-request-id": f"{i:08x}-648f-4dfc-ad51-9b1dda0e2608",
            "x-forwarded-for": "192.0.2.2",
            "x-envoy-auth-partial-body": "false",
            "content-type": "application/json",
            "content-length": str(len(be.BODY)),
            "authorization": f"Bearer {SECRET}",
        }
    )
    http.path, http.host, http.scheme, http.protocol = be.PATH, "127.0.0.1", "http", "HTTP/1.1"
    http.size = len(be.BODY)
    http.raw_body = be.BODY
    a.context_extensions["x-nexus-rewrite"] = "lua"
    return req.SerializeToString()


def build_engine(workdir: Path) -> Engine:
    (workdir / "keys.yaml").write_text(be.key_file([SECRET], be.LIMITS_KEY_FIELDS))
    path = workdir / "nexus.yaml"
    path.write_text(be.nexus_config(str(workdir / "authz.sock"), extra=be.ISSUE15_CONFIG))
    return Engine.from_settings(load_settings(str(path)))


def timed(run: Callable[[], None], n: int) -> float:
    start = time.thread_time_ns()
    run()
    return (time.thread_time_ns() - start) / n / 1000


async def measure(batches: int, n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="nx-grpc-check-") as tmp:
        engine = build_engine(Path(tmp))
        receiver = H2Receiver(AccessLogService(engine), engine)
        service: AuthorizationService = receiver.checks
        conn = H2Connection(receiver)
        sink = Sink()
        conn.connection_made(sink)  # type: ignore[arg-type]
        # Envoy's opening: the preface, its SETTINGS (a large stream window) and a connection window
        conn.data_received(
            PREFACE
            + h2.frame(h2.SETTINGS, 0, 0, struct.pack(">HI", 4, 1 << 28))
            + h2.window_update(0, 1 << 28)
        )
        next_id = [0]
        sid = [1]

        def reads(count: int) -> list[bytes]:
            out = []
            for _ in range(count):
                i, s = next_id[0], sid[0]
                block = FIRST_BLOCK if s == 1 else LATER_BLOCK
                out.append(
                    h2.frame(h2.HEADERS, h2.END_HEADERS, s, block)
                    + h2.frame(h2.DATA, h2.END_STREAM, s, h2.grpc_message(check_message(i)))
                )
                next_id[0], sid[0] = i + 1, s + 2
            return out

        def messages(count: int) -> list[bytes]:
            first = next_id[0]
            next_id[0] += count
            return [check_message(i) for i in range(first, first + count)]

        def socket_check() -> float:
            data = reads(n)
            window = h2.window_update(0, sink.written + 1)  # what the answers took of the window
            sink.written = 0
            conn.data_received(window)
            return timed(lambda: [conn.data_received(d) for d in data] and None, n)

        def answer() -> float:
            data = messages(n)
            return timed(lambda: [service.answer(m) for m in data] and None, n)

        def port_decision() -> float:
            data = messages(n)
            FromString = external_auth_pb2.CheckRequest.FromString
            return timed(
                lambda: (
                    [service.serialize(engine.check(request_from_check(FromString(m)))) for m in data]
                    and None
                ),
                n,
            )

        rows = {"socket Check": socket_check, "⊂ answer": answer, "port's decision": port_decision}
        for run in rows.values():  # warm-up: plans, caches, the first block
            run()
        assert not conn._streams, "a Check was not answered"
        results: dict[str, list[float]] = {name: [] for name in rows}
        gc.collect()
        for _ in range(batches):
            for name, run in rows.items():
                results[name].append(run())
        decided = dict(engine.decisions)
        assert decided.pop(Reason.OK) == 3 * n * (batches + 1) and not any(decided.values()), decided
        return {name: statistics.median(values) for name, values in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=5, help="batches per row (the median is printed)")
    parser.add_argument("--n", type=int, default=2000, help="Checks per batch")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.n < 1:
        parser.error("--batches and --n must be at least 1")
    figures = asyncio.run(measure(args.batches, args.n))
    print(f"## gRPC Check in process, µs of thread CPU per Check (median of {args.batches} x {args.n})\n")
    print("| piece | µs |\n|---|---:|")
    for name, value in figures.items():
        print(f"| {name} | {value:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
