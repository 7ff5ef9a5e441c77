"""Decision core alone, in-process: µs per decision (median and p99 over batches), no I/O.

Run: .venv/bin/python benchmarks/bench_core.py [--seconds 5]
Prints one line per scenario: the full Engine.check (policy + counters, what every adapter calls) for an
allowed request with a model rule, an unknown key, and the allowed request parsed from raw HTTP bytes by
the fast-path protocol (httptools + response assembly, no socket).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nexus_authz.core.model import Request  # noqa: E402
from nexus_authz.engine import Engine  # noqa: E402
from nexus_authz.settings import load_settings  # noqa: E402
from tests.helpers import KeySpec, write_config  # noqa: E402

BATCH = 1000


def build_engine(directory: Path, n_keys: int) -> tuple[Engine, list[KeySpec]]:
    specs = [KeySpec(f"k{i}", extra={"tenant": "t", "models": ["gpt-4o*"]}) for i in range(n_keys)]
    path = write_config(directory, *specs)
    return Engine.from_settings(load_settings(str(path))), specs


def measure(fn, seconds: float) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    """Median and p99 of µs per call, from batches of BATCH calls."""
    per_call: list[float] = []
    deadline = time.perf_counter() + seconds
    for _ in range(BATCH):  # warm up caches
        fn()
    while time.perf_counter() < deadline:
        t0 = time.perf_counter_ns()
        for _ in range(BATCH):
            fn()
        per_call.append((time.perf_counter_ns() - t0) / BATCH / 1000)
    per_call.sort()
    return statistics.median(per_call), per_call[int(len(per_call) * 0.99)], len(per_call) * BATCH


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="per scenario")
    parser.add_argument("--keys", type=int, default=1000, help="keys in the snapshot")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine, specs = build_engine(Path(tmp), args.keys)
        body = json.dumps(
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi " * 50}]}
        ).encode()
        allowed = Request(
            "POST",
            "/v1/chat/completions",
            {"authorization": f"Bearer {specs[7].secret}", "content-type": "application/json"},
            body,
        )
        unknown = Request(
            "POST", "/v1/chat/completions", {"authorization": "Bearer nx-nobody-000000000000000"}, body
        )
        assert engine.check(allowed).allowed and not engine.check(unknown).allowed

        from nexus_authz.adapters.http_authz import AuthzProtocol, HttpApp

        class Sink:
            def write(self, data: bytes) -> None:
                self.last = data

            def close(self) -> None:
                pass

        app = HttpApp(engine, max_header_bytes=65536, max_body=1 << 20)
        proto = AuthzProtocol(app)
        sink = Sink()
        proto.connection_made(sink)  # type: ignore[arg-type]
        raw = (
            b"POST /ext_authz/v1/chat/completions HTTP/1.1\r\nhost: nexus\r\n"
            b"authorization: Bearer " + specs[7].secret.encode() + b"\r\ncontent-type: application/json\r\n"
            b"x-request-id: 5f2d6f1e-1c7b-4a53-9d2e-0d6f3f0f1a2b\r\ncontent-length: %d\r\n"
            b"x-nexus-content-length: %d\r\n\r\n" % (len(body), len(body))  # as the shipped configs add it
        ) + body
        proto.data_received(raw)
        assert sink.last.startswith(b"HTTP/1.1 200"), sink.last

        print(f"# bench_core: {args.keys} keys, python {sys.version.split()[0]}, pid {os.getpid()}")
        for name, fn in (
            ("engine.check allowed (model rule)", lambda: engine.check(allowed)),
            ("engine.check unknown key", lambda: engine.check(unknown)),
            ("fast path: parse + decide + answer", lambda: proto.data_received(raw)),
        ):
            med, p99, n = measure(fn, args.seconds)
            print(f"{name:40s} median {med:6.2f} µs  p99 {p99:6.2f} µs  ({n} calls)")


if __name__ == "__main__":
    main()
