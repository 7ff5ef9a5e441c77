"""What the keyed hash of a presented key costs: the compiled lane's HMAC-SHA256 of a secret with the CPU's
SHA extensions, with its portable C compression, and hashlib's (keys.KeyHasher, the reference path).

    .venv/bin/python benchmarks/bench_hmac.py [--calls 200000]

Every check whose Authorization differs from the previous check's hashes its secret (with many keys, every
check): two SHA-256 blocks after the pepper's precomputed pads (native/_fast.pyx `_hmac`). Each figure is
the best of 5 timed loops, ns per call including Python's call overhead, hot caches. The
compiled figures need the build's extensions (`python setup.py build_ext --inplace`); the SHA extensions'
line only where the CPU has them (`grep -w sha_ni /proc/cpuinfo`).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from bench_clocks import calls_arg, cost_ns  # noqa: E402

from nexus_authz import native  # noqa: E402
from nexus_authz.core.keys import KeyHasher  # noqa: E402

SECRET = "nx-fixture-0123456789abcdef0123456789abcdef"  # benchmarks/fixtures' key: 43 bytes, one block


def main(argv: list[str] | None = None) -> int:
    calls = calls_arg(argv, __doc__)
    hasher = KeyHasher(b"bench-pepper-" * 3)
    print(f"native path: {native.LABEL}; a {len(SECRET)}-byte secret")
    took = cost_ns(lambda: hasher(SECRET), calls)
    print(f"keys.KeyHasher (hashlib, the reference path): {took:,.0f} ns")
    fast = native.fast
    if fast is None:
        print("the compiled lane is not loaded: no compiled figures")
        return 0
    secret = SECRET.encode()
    used = fast.sha_ni()
    try:
        for sha_ni, label in ((True, "the CPU's SHA extensions"), (False, "portable C")):
            if fast.sha_ni(sha_ni) != sha_ni:
                print(f"compiled HMAC, {label}: the CPU has no SHA extensions")
                continue
            assert fast.hmac_sha256(hasher, secret) == hasher(SECRET)
            took = cost_ns(lambda: fast.hmac_sha256(hasher, secret), calls)
            print(f"compiled HMAC, {label}: {took:,.0f} ns")
    finally:
        fast.sha_ni(used)
    return 0


if __name__ == "__main__":
    sys.exit(main())
