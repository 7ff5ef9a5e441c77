"""What one HTTP ext_authz check costs when the caches are cold, as at real request rates.

    .venv/bin/python benchmarks/bench_cold.py [--n 2000] [--sizes 0,65536,1048576,4194304] [--keys 1]
        [--prompt-bytes N] [--typographic] [--image-bytes N]

In a hot in-process loop a check costs ~10-20 µs; through the real Envoy at 1,000 requests/s nexus-authz
spends several times that, because between two requests Envoy, the load generator and the kernel run on
the same two cores and evict what the check had in cache: each request pays for the distinct memory it
touches (code objects, frames, dicts, objects created and freed), not for its instructions. This measures
that directly: the same check as bench_breakdown's (a real Envoy's recorded bytes, bench_envoy's
ISSUE15_CONFIG, accounting on), timed request by request in thread CPU time, with SIZE bytes of other
memory copied between two requests (outside the timing; 0 = hot), and with the thread asleep for --sleep
ms between two requests (the machine's other work, or its idle states, take the caches meanwhile). Each
check's concurrency slot is released before the pause, so the state stays steady. Printed: the median µs
per check for each protocol the build has (the compiled lane, and the reference path: httptools framing +
the pure-Python decision) and each pause. `--keys N`: N keys round-robin, each seen once before the timed
checks and each check's usage settled (as bench_envoy's 10,000-key scenario; bench_footprint.py --keys
counts the same checks' cold lines), to set what a key's own state costs against one key's.
`--prompt-bytes N`: the recorded message's text grown to N bytes of English (what a longer prompt costs:
up to core/body.py PARSE_BELOW, 16 KiB, the compiled reading parses as the reference does; larger ones
where the reference's key scan reads the same). `--typographic`: that prose with a curly apostrophe (as
models write it): a body that is not ASCII, whose prompt is estimated from its text instead of its size.
`--image-bytes N`: an image of N bytes of base64 (a data: URI) in the message, as vision requests send it.
`--key-header NAME`: the key sent in that header (x-api-key, as Anthropic's SDKs send it; api-key, as Azure's)
instead of `authorization: Bearer`.
`--since S` (with `--keys`): each key's checks S seconds apart on the engine's clock (e.g. 61: past the
throttle's REFRESH_AFTER, as when each of many keys is seen less than once a minute).
`--models N`: the checks name N models in turn (the recorded gpt-4o-mini and N-1 others of its length,
all priced and allowed by the same rule), as a key sends when its application uses several models: each
(model, path) has its own plan.
`--nginx`: the check as nginx's `auth_request` subrequest asks it (deploy/nginx/nginx.conf: `GET
/v1/nginx/auth`, no body, the original method and URI and the key in headers), not Envoy's.
`--refused KIND`: every timed check refused, as an abusive or misconfigured client's are, one after the
other from one address (the steady state of a flood): `unknown-key` (a key of the recorded one's length
that is in no key file: 401, then, past the brute-force throttle's 30 a minute, 429 for the address),
`model` (a model the key may not use: 403, then, past the same allowance of refused bodies, 429 for the
key), `rate-limited` (the key's tenant over a limit of 1 request an hour: 429 from the counters).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import bench_breakdown as bb  # noqa: E402

from nexus_authz import native  # noqa: E402
from nexus_authz.adapters import http_authz  # noqa: E402
from nexus_authz.core import tokens  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=2000, help="checks per protocol and size")
    ap.add_argument("--sizes", default="0,65536,1048576,4194304", help="bytes copied between checks")
    ap.add_argument(
        "--sleep",
        type=float,
        default=1.0,
        help="also a column where the thread sleeps this many ms between checks",
    )
    ap.add_argument("--keys", type=int, default=1, help="keys round-robin (each seen once before)")
    ap.add_argument(
        "--prompt-bytes",
        type=int,
        default=0,
        help="the message's text grown to this many bytes (0: as recorded)",
    )
    ap.add_argument("--typographic", action="store_true", help="that text with curly apostrophes (not ASCII)")
    ap.add_argument("--image-bytes", type=int, default=0, help="an image of this many base64 bytes beside it")
    ap.add_argument(
        "--key-header", default="", help="the key in this header (x-api-key, api-key) instead of a Bearer"
    )
    ap.add_argument(
        "--since",
        type=float,
        default=0.0,
        help="with --keys: each key's checks this many seconds apart (the engine's clock moved on by it "
        "after each turn of the keys), as when each key is seen less often than that",
    )
    ap.add_argument("--models", type=int, default=1, help="models named in turn (each its own plan; 1-26)")
    ap.add_argument("--nginx", action="store_true", help="nginx's auth_request subrequest instead of Envoy's")
    ap.add_argument(
        "--refused",
        choices=("unknown-key", "model", "rate-limited"),
        help="every timed check refused, for this reason (see the module)",
    )
    args = ap.parse_args(argv)
    if args.n < 1 or args.keys < 1:
        ap.error("--n and --keys must be at least 1")
    if not 1 <= args.models <= 26:
        ap.error("--models must be 1 to 26")
    sizes = [int(s) for s in args.sizes.split(",")]
    tokens.warm_up()
    fx = bb.Fixtures()
    if args.prompt_bytes:
        fx.with_prompt(args.prompt_bytes, args.typographic)
    if args.image_bytes:
        fx.with_image(args.image_bytes)
    if args.key_header:
        fx.with_key_header(args.key_header)
    if args.nginx:  # the subrequest deploy/nginx/nginx.conf's /_nexus_auth sends, in its header order
        fx.check = (
            f"GET /v1/nginx/auth HTTP/1.1\r\nHost: nexus-authz\r\nAuthorization: Bearer {fx.secret}\r\n"
            f"X-Original-Method: POST\r\nX-Original-URI: /v1/chat/completions\r\nX-Real-IP: 127.0.0.1\r\n"
            f"X-Request-ID: {fx.request_id}\r\n\r\n"
        ).encode()
    secrets = bb.key_secrets(fx, args.keys)
    extra = ""
    if args.refused == "rate-limited":  # the keys' tenant (bench_envoy's plan: tenant "bench")
        extra = "tenants:\n  bench:\n    limits:\n      - {requests: 1, per: hour}\n"
    engine = bb.build_engine(Path(tempfile.mkdtemp(prefix="nexus-cold-")), fx, secrets, extra)
    if args.refused == "unknown-key":
        fx.check = fx.check.replace(fx.secret.encode(), fx.secret[:-4].encode() + b"zzzz", 1)
    elif args.refused == "model":
        assert b'"gpt-4o-mini"' in fx.check, "the recorded body has changed: update --refused model"
        fx.check = fx.check.replace(b'"gpt-4o-mini"', b'"llama-3-70b"', 1)  # the same length
    done = bb.after_check(engine, args.keys)
    ahead = [0.0]  # --since: how far the engine's clock is moved on
    if args.since:
        engine.decider.clock = lambda: time.time() + ahead[0]
    settings = engine.settings
    app = http_authz.HttpApp(
        engine, max_header_bytes=settings.max_header_bytes, max_body=settings.max_body_bytes
    )
    protocols: list[tuple[str, type[http_authz.AuthzProtocol]]] = []
    if native.http1 is not None:
        from nexus_authz.adapters.http_native import CompiledAuthzProtocol

        protocols.append(("compiled (the common check's lane)", CompiledAuthzProtocol))
    protocols.append(("reference (httptools + pure decision)", http_authz.AuthzProtocol))
    timer = time.thread_time_ns
    keys = f", {args.keys:,} keys round-robin" if args.keys > 1 else ""
    print(f"native path: {native.PATH}; {args.n} checks per cell{keys}; median thread CPU µs per check\n")
    answered: set[str] = set()  # --refused: the answers' status lines
    first = 0  # request ids: each check its own, across cells
    cells: list[tuple[int, float]] = [(size, 0.0) for size in sizes]
    if args.sleep:
        cells.append((0, args.sleep / 1000))
    heads = [
        "hot" if s == 0 and not z else f"{s // 1024} KiB copied" if s else f"{z * 1000:g} ms asleep"
        for s, z in cells
    ]
    print("| protocol | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(cells))
    for name, cls in protocols:
        row = []
        for size, pause in cells:
            src, dst = bytearray(size // 2), bytearray(size // 2)
            proto = cls(app)
            sink = Statuses()
            proto.connection_made(sink)  # type: ignore[arg-type]
            feed = proto.data_received
            warm = args.keys if args.keys > 1 else 0  # each key seen once, untimed
            checks = bb.models_in_turn(bb.keyed_checks(fx, secrets, first, warm + args.n), args.models)
            first += warm + args.n
            took = []
            for data, rid in checks[:warm]:
                feed(data)
                done(rid)
            gc.collect()
            for i, (data, rid) in enumerate(checks[warm:]):
                if args.since and i % args.keys == 0:
                    ahead[0] += args.since  # a turn of the keys: each one's last check that long ago
                t0 = timer()
                feed(data)
                took.append(timer() - t0)
                done(rid)
                if size:
                    dst[:] = src  # every cache line of both buffers, in C
                if pause:
                    time.sleep(pause)  # the CPU idles or runs others, as between two requests at 1,000/s
            row.append(statistics.median(took) / 1000)
            if args.refused or args.nginx:
                answered.update(sink.statuses)
        print(f"| {name} | " + " | ".join(f"{x:.1f}" for x in row) + " |")
    if args.refused or args.nginx:
        print(f"\nanswers (status, reason) of the checks: {', '.join(sorted(answered))}")
    return 0


class Statuses(bb.Sink):
    """The transport: keeps each answer's status and x-nexus-reason."""

    def __init__(self) -> None:
        self.statuses: set[str] = set()

    def write(self, data: bytes) -> None:
        head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        reason = next((h[16:].strip() for h in head if h.lower().startswith(b"x-nexus-reason:")), b"")
        self.statuses.add(f"{head[0][9:12].decode()} {reason.decode()}".strip())


if __name__ == "__main__":
    sys.exit(main())
