"""µs per check + slot release pair, in process: what bench_direct.py's wrk sends, minus the socket.

Each read is the check Envoy's HTTP ext_authz sends (issue 15's configuration, bench_envoy.ISSUE15_CONFIG:
requests, tokens, USD and concurrency windows, accounting on) pipelined with the Lua tap's
``POST /_nexus/release`` of its request id, fed to the listener's protocol's ``data_received`` as one read
(the compiled protocol when it built; ``NEXUS_AUTHZ_PURE=1``: the httptools one). Hot: warm-up rounds
first, then the median of timed rounds of distinct request ids (every slot released, no reservation
settled: the book is cleared between rounds, so it never evicts). ``--split`` feeds the check and the
release as two reads; ``--check-only`` leaves the release out.

    .venv/bin/python benchmarks/bench_pair.py [--rounds 7] [--n 20000] [--split] [--check-only]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import bench_alloc as ba  # noqa: E402
import bench_envoy as be  # noqa: E402

from nexus_authz import native  # noqa: E402


def release_request(request_id: str) -> bytes:
    rid = request_id.encode()
    return (
        b"POST /_nexus/release HTTP/1.1\r\nhost: 127.0.0.1\r\nx-nexus-release: 1\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(rid), rid)
    )


def measure(rounds: int, n: int, *, split: bool, release: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="nexus-pair-") as tmp:
        fp = ba.build_fastpath(Path(tmp), config_extra=be.ISSUE15_CONFIG)
        proto, sink, engine = fp.proto, fp.sink, fp.engine
        secret = fp.secrets[0]
        timings: list[float] = []
        for r in range(rounds + 2):  # two warm-up rounds
            reads: list[bytes] = []
            for i in range(n):
                rid = f"r{r}-{i}"
                check = ba.ext_authz_request(secret, rid)
                if not release:
                    reads.append(check)
                elif split:
                    reads += (check, release_request(rid))
                else:
                    reads.append(check + release_request(rid))
            feed = proto.data_received
            started = time.perf_counter()
            for data in reads:
                feed(data)
            elapsed = time.perf_counter() - started
            last = sink.last  # the last write (a read's answers may leave in one)
            assert last.endswith(b"\r\n\r\n") and (b"HTTP/1.1 204" in last if release else b"200 OK" in last)
            if not release:  # free the slots untimed (the concurrency window would fill)
                for i in range(n):
                    engine.release(f"r{r}-{i}")
            engine.book._entries.clear()
            if r >= 2:
                timings.append(elapsed / n * 1e6)
        return {"us_per_pair": statistics.median(timings), "min": min(timings)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--split", action="store_true", help="the check and the release as two reads")
    ap.add_argument("--check-only", action="store_true", help="no release")
    args = ap.parse_args(argv)
    r = measure(args.rounds, args.n, split=args.split, release=not args.check_only)
    what = "check only" if args.check_only else "check + release" + (" (two reads)" if args.split else "")
    print(f"{native.PATH} path, {what}: {r['us_per_pair']:.2f} µs per pair (median), min {r['min']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
