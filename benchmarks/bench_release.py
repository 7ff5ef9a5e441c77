"""What the early release of a concurrency slot costs nexus-authz (issue 18 item 3), in CPU time.

Starts `nexus-authz serve` with one key with a `concurrent:` limit, then over one keep-alive Unix-socket
connection sends N x (ext_authz check) and N x (check + the Lua tap's `POST /_nexus/release`), the way
Envoy does. The server's CPU time (utime + stime from /proc/<pid>/stat, not wall time: the machine is
shared) per request, and the difference per release. Run:

    PYTHONPATH=$PWD python benchmarks/bench_release.py [N]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nexus_authz.demo import procs
from tests.helpers import PEPPER, KeySpec, write_config

# A slot limit high enough that the run without releases is admitted throughout too: both runs make
# the same admissions, and the difference is the release alone.
KEY = KeySpec("solo", extra={"limits": [{"concurrent": 1000000}]})


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_response(conn: socket.socket, buf: bytearray) -> None:
    while b"\r\n\r\n" not in buf:
        buf += conn.recv(65536)
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(rest) < length:
        rest += conn.recv(65536)
    buf[:] = rest[length:]


def run(conn: socket.socket, n: int, release: bool, pid: int) -> float:
    buf = bytearray()
    body = b'{"model":"gpt-4o-mini"}'
    start = cpu_seconds(pid)
    for i in range(n):
        rid = b"r-%d-%d" % (release, i)
        conn.sendall(
            b"POST /ext_authz/v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n"
            b"x-request-id: %s\r\ncontent-length: %d\r\nx-nexus-content-length: %d\r\n\r\n%s"
            % (KEY.secret.encode(), rid, len(body), len(body), body)
        )
        read_response(conn, buf)
        if release:
            conn.sendall(
                b"POST /_nexus/release HTTP/1.1\r\nhost: x\r\nx-nexus-release: 1\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(rid), rid)
            )
            read_response(conn, buf)
    return cpu_seconds(pid) - start


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("n", nargs="?", type=int, default=5000, help="requests per run (default 5000)")
    n = ap.parse_args().n
    if n < 1:
        ap.error("N must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="nx-rel-"))
    admin = procs.free_port()
    config = write_config(work, KEY, socket=str(work / "a.sock"), admin=f"127.0.0.1:{admin}")
    server = subprocess.Popen(
        [sys.executable, "-m", "nexus_authz.cli", "serve", "-c", str(config)],
        env={**os.environ, "NEXUS_KEY_PEPPER": PEPPER},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        procs.wait_http_ready(f"http://127.0.0.1:{admin}/readyz", timeout=20)
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(str(work / "a.sock"))
        run(conn, 500, True, server.pid)  # warm-up
        checks = run(conn, n, False, server.pid)
        time.sleep(0.1)
        both = run(conn, n, True, server.pid)
        print(f"requests per run: {n}")
        print(f"check only:       {checks / n * 1e6:7.1f} us CPU per request")
        print(f"check + release:  {both / n * 1e6:7.1f} us CPU per request")
        print(f"release:          {(both - checks) / n * 1e6:7.1f} us CPU per request (nexus-authz process)")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
