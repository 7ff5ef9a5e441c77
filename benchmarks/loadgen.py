"""One load-generating worker: a single keep-alive HTTP/1.1 connection driven on a fixed schedule.

The harness (benchmarks/harness.py) starts several of these as separate processes so that load
generation does not share a GIL with itself, and offsets them in time so that, together, arrivals are
evenly spaced. Request ``g`` of the whole run is scheduled at ``start + g / rate``; worker ``k`` of
``procs`` sends the requests with ``g % procs == k`` (4 procs at 1,000/s: each 250/s, offset by 1 ms).

The worker is open loop: a send time is fixed in advance, not "after the last response", and latency is
measured from the *scheduled* send time. One connection carries one request at a time (no pipelining), so
when a response is late the next request waits on the connection and that wait is counted as latency,
which is what a client would see (no coordinated omission). Responses are parsed minimally: the status
line, then ``content-length``, ``transfer-encoding: chunked`` or read-until-close.

Also runnable as a script for a quick look: ``python benchmarks/loadgen.py 127.0.0.1:8080 --rate 500``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import pickle
import resource
import socket
import struct
import sys
import time
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

__all__ = [
    "ParsedResponse",
    "ProtocolError",
    "Target",
    "build_request",
    "DEFAULT_SPIN_US",
    "connect",
    "global_index",
    "parse_response",
    "parse_target",
    "request_counts",
    "run_worker",
    "schedule_ns",
    "variant_for",
]

_NS = 1_000_000_000
# Sleep until this long before a send time, then spin. Measured on the 2-core Firecracker VM: a wake-up
# from sleep is ~50 µs late even with 1 ns timer slack, and that lateness would count as latency; with
# 60 µs of spin the send lag is ~2 µs at p50 and the load processes' CPU per request does not grow.
DEFAULT_SPIN_US = 60.0


# --------------------------------------------------------------------------------------------------
# targets and requests
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """Where the load goes: TCP ``host:port`` or a Unix socket path (load stays on this machine)."""

    host: str = "127.0.0.1"
    port: int = 0
    unix_path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.unix_path is not None

    def __str__(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path is not None else f"{self.host}:{self.port}"


def parse_target(target: str | tuple[str, int] | Target) -> Target:
    """Accept ``host:port``, ``http://host:port[/...]``, ``(host, port)``, ``unix:/path`` or ``/path``."""
    if isinstance(target, Target):
        return target
    if isinstance(target, tuple):
        return Target(host=target[0], port=int(target[1]))
    text = target.strip()
    if text.startswith("unix:"):
        return Target(unix_path=text[5:])
    if text.startswith("/") or text.startswith("./"):
        return Target(unix_path=text)
    for scheme in ("http://", "tcp://"):
        if text.startswith(scheme):
            text = text[len(scheme) :].split("/", 1)[0]
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"target {target!r}: expected host:port, unix:/path or /path")
    return Target(host=host.strip("[]") or "127.0.0.1", port=int(port_text))


def build_request(
    method: str = "GET",
    path: str = "/",
    *,
    host: str = "localhost",
    headers: Mapping[str, str] | Sequence[tuple[str, str]] = (),
    body: bytes = b"",
) -> bytes:
    """Serialise one HTTP/1.1 keep-alive request once, so the send loop only calls ``sendall``."""
    items = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    names = {k.lower() for k, _ in items}
    lines = (
        [f"{method} {path} HTTP/1.1", f"host: {host}"]
        if "host" not in names
        else [f"{method} {path} HTTP/1.1"]
    )
    lines += [f"{k}: {v}" for k, v in items]
    needs_length = body or method in ("POST", "PUT", "PATCH")
    if needs_length and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --------------------------------------------------------------------------------------------------
# minimal response parsing
# --------------------------------------------------------------------------------------------------


class ProtocolError(Exception):
    """The peer sent something that is not an HTTP/1.x response."""


@dataclass(frozen=True, slots=True)
class ParsedResponse:
    status: int
    end: int  # offset just past this response in the buffer
    keep_alive: bool


_NO_BODY = frozenset({204, 304})


def parse_response(buf: bytes | bytearray, start: int = 0, *, eof: bool = False) -> ParsedResponse | None:
    """Return the first complete response in ``buf[start:]``, or None if more bytes are needed.

    Only what the load loop needs: the status, where the response ends, and whether the connection
    stays open. Interim 1xx responses are skipped. ``eof`` says the peer closed, which completes a
    response delimited by the connection close.
    """
    while True:
        head_end = buf.find(b"\r\n\r\n", start)
        if head_end < 0:
            if eof and len(buf) > start:
                raise ProtocolError("connection closed inside the response head")
            return None
        head = bytes(buf[start:head_end])
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {lines[0][:80]!r}")
        status = int(parts[1])
        http10 = parts[0] == b"HTTP/1.0"
        length = -1
        chunked = False
        conn = b""
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    raise ProtocolError(f"bad content-length {value[:40]!r}") from None
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                conn = value.strip().lower()
        body_start = head_end + 4
        if 100 <= status < 200 and status != 101:
            start = body_start
            continue
        keep_alive = (b"keep-alive" in conn) if http10 else (b"close" not in conn)
        if status in _NO_BODY or status == 101:
            return ParsedResponse(status, body_start, keep_alive)
        if chunked:
            end = _chunked_end(buf, body_start)
            return None if end < 0 else ParsedResponse(status, end, keep_alive)
        if length >= 0:
            end = body_start + length
            return ParsedResponse(status, end, keep_alive) if len(buf) >= end else None
        # no length, not chunked: the body runs until the peer closes
        return ParsedResponse(status, len(buf), False) if eof else None


def _chunked_end(buf: bytes | bytearray, pos: int) -> int:
    """Offset past the last chunk and trailers, or -1 if incomplete."""
    n = len(buf)
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return -1
        size_text = bytes(buf[pos:line_end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ProtocolError(f"bad chunk size {size_text[:20]!r}") from None
        pos = line_end + 2
        if size == 0:
            if n >= pos + 2 and buf[pos : pos + 2] == b"\r\n":
                return pos + 2
            trailer_end = buf.find(b"\r\n\r\n", pos)
            return -1 if trailer_end < 0 else trailer_end + 4
        pos += size + 2
        if n < pos:
            return -1


# --------------------------------------------------------------------------------------------------
# the schedule (pure, so it can be tested without load)
# --------------------------------------------------------------------------------------------------


def global_index(worker: int, i: int, procs: int) -> int:
    """The run-wide number of the ``i``-th request of ``worker``."""
    return i * procs + worker


def schedule_ns(g: int, rate: float, start_ns: int = 0) -> int:
    """Scheduled send time of run-wide request ``g``: evenly spaced at ``rate`` per second."""
    return start_ns + int(g * (_NS / rate))


def request_counts(rate: float, duration: float, warmup: float = 0.0) -> tuple[int, int]:
    """(requests in the warm-up, requests in the whole run) for the whole run, all workers together."""
    return round(warmup * rate), round((warmup + duration) * rate)


def variant_for(g: int, variants: int) -> int:
    """Round-robin over request variants by run-wide index, so every variant is used evenly."""
    return g % variants


# --------------------------------------------------------------------------------------------------
# the worker
# --------------------------------------------------------------------------------------------------


def _set_timer_slack_ns(ns: int) -> None:
    """Linux rounds sleeps up by the timer slack (50 µs by default); 1 ns makes wake-ups punctual."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(29, ctypes.c_ulong(ns), 0, 0, 0)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


def connect(target: Target, timeout: float) -> socket.socket:
    """A blocking socket whose send/recv time out in the kernel (SO_RCVTIMEO/SO_SNDTIMEO).

    Python's own socket timeout polls before every recv: one more system call per request, which on
    this VM costs ~10 µs of the load generator's CPU. A kernel timeout raises BlockingIOError instead.
    """
    if target.unix_path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(target.unix_path)
        except OSError:
            sock.close()
            raise
    else:
        sock = socket.create_connection((target.host, target.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _apply_kernel_timeouts(sock, timeout)
    return sock


def _apply_kernel_timeouts(sock: socket.socket, timeout: float) -> None:
    sock.settimeout(None)
    tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _err_name(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | BlockingIOError):
        return "timeout"
    return type(exc).__name__


def run_worker(cfg: Mapping[str, Any], start_ns: int, sock: socket.socket | None = None) -> dict[str, Any]:
    """Drive one connection from ``start_ns`` (CLOCK_MONOTONIC, shared by all processes) and report.

    ``cfg`` keys: target (str), rate (float, whole run; 0 = closed loop), procs, worker, duration,
    warmup, timeout, drain, requests (list of bytes), spin_us. Returns plain data (picklable without
    this module): latencies and send lags in ns as ``array('q')`` bytes, status and error counts, CPU.
    """
    target = parse_target(cfg["target"])
    rate = float(cfg.get("rate") or 0.0)
    procs = int(cfg.get("procs", 1))
    worker = int(cfg.get("worker", 0))
    duration = float(cfg["duration"])
    warmup = float(cfg.get("warmup", 0.0))
    timeout = float(cfg.get("timeout", 2.0))
    drain = float(cfg.get("drain", 2.0))
    requests: list[bytes] = list(cfg["requests"])
    spin_ns = int(float(cfg.get("spin_us", DEFAULT_SPIN_US)) * 1000)
    nvar = len(requests)
    closed = rate <= 0

    lat = array("q")
    lag = array("q")
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    sent = completed = unsent = reconnects = 0
    sent_total = 0
    first_done = last_done = 0
    buf = bytearray()
    mono = time.monotonic_ns
    sleep = time.sleep

    window_ns = start_ns + int(warmup * _NS)
    end_ns = start_ns + int((warmup + duration) * _NS)
    hard_end_ns = end_ns + int(drain * _NS)
    if closed:
        n_warm, n_total = 0, 1 << 62
        period = 0.0
    else:
        n_warm, n_total = request_counts(rate, duration, warmup)
        period = _NS / rate

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    g = worker
    while True:
        if closed:
            now = mono()
            if now >= end_ns:
                break
            sched = now
            measured = now >= window_ns
        else:
            if g >= n_total:
                break
            sched = start_ns + int(g * period)
            now = mono()
            if now > hard_end_ns:
                first = g + max(0, -(-(n_warm - g) // procs)) * procs  # first one in the measured window
                unsent += len(range(first, n_total, procs))
                break
            wait = sched - now - spin_ns
            if wait > 0:
                sleep(wait / _NS)
            if spin_ns:
                while mono() < sched:
                    pass
            measured = g >= n_warm
        req = requests[g % nvar]
        g += procs
        try:
            if sock is None:
                sock = connect(target, timeout)
                reconnects += 1
            t_send = mono()
            sock.sendall(req)
            sent_total += 1
            if measured:
                sent += 1
            del buf[:]
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    resp = parse_response(buf, eof=True)
                    if resp is None:
                        raise ConnectionResetError("closed before a response")
                    break
                buf += chunk
                resp = parse_response(buf)
                if resp is not None:
                    break
            t_done = mono()
            if not resp.keep_alive:
                sock.close()
                sock = None
        except (OSError, ProtocolError) as exc:
            if sock is not None:
                sock.close()
                sock = None
            if measured:
                name = _err_name(exc)
                errors[name] = errors.get(name, 0) + 1
            if closed:
                sleep(0.01)
            continue
        if measured:
            completed += 1
            lat.append(t_done - sched if not closed else t_done - t_send)
            lag.append(t_send - sched)
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
            if not first_done:
                first_done = t_done
            last_done = t_done
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    if sock is not None:
        sock.close()
    return {
        "worker": worker,
        "latencies_ns": lat.tobytes(),
        "send_lag_ns": lag.tobytes(),
        "statuses": statuses,
        "errors": errors,
        "sent": sent,
        "sent_total": sent_total,
        "completed": completed,
        "unsent": unsent,
        "reconnects": reconnects,
        "cpu_user_s": ru1.ru_utime - ru0.ru_utime,
        "cpu_sys_s": ru1.ru_stime - ru0.ru_stime,
        "window_start_ns": window_ns,
        "first_done_ns": first_done,
        "last_done_ns": last_done,
    }


# --------------------------------------------------------------------------------------------------
# the harness protocol: config in, "R" when connected, start time in, result out
# --------------------------------------------------------------------------------------------------


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = stream.read(n - len(data))
        if not part:
            raise EOFError("harness closed the pipe")
        data += part
    return data


def _worker_main() -> int:
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    (size,) = struct.unpack("!Q", _read_exact(stdin, 8))
    cfg = pickle.loads(_read_exact(stdin, size))
    _set_timer_slack_ns(1)
    sock: socket.socket | None
    try:
        sock = connect(parse_target(cfg["target"]), float(cfg.get("timeout", 2.0)))
    except OSError:
        sock = None  # counted as an error on the first scheduled request
    stdout.write(b"R")
    stdout.flush()
    (start_ns,) = struct.unpack("!q", _read_exact(stdin, 8))
    gc.collect()
    gc.freeze()
    gc.disable()
    result = run_worker(cfg, start_ns, sock)
    payload = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    stdout.write(struct.pack("!Q", len(payload)) + payload)
    stdout.flush()
    return 0


def _cli(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Open-loop HTTP/1.1 load at a fixed rate (see benchmarks/harness.py)"
    )
    ap.add_argument("target", help="host:port, unix:/path or /path")
    ap.add_argument(
        "--rate", type=float, default=1000.0, help="requests/s for the whole run (0 = closed loop)"
    )
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=0.0)
    ap.add_argument("--procs", type=int, default=4, help="worker processes, one connection each")
    ap.add_argument("--method", default="GET")
    ap.add_argument("--path", default="/")
    ap.add_argument("-H", "--header", action="append", default=[], help="'name: value'")
    ap.add_argument("--body", default="")
    args = ap.parse_args(argv)
    headers = [(name.strip(), value.strip()) for name, _, value in (h.partition(":") for h in args.header)]
    request = build_request(args.method, args.path, headers=headers, body=args.body.encode())
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import harness  # the orchestration lives there; imported late as it imports this module

    res = harness.run_open_loop(
        args.target,
        rate=args.rate,
        duration=args.duration,
        warmup=args.warmup,
        procs=args.procs,
        request_bytes=request,
    )
    harness.print_table([res.metrics()], list(res.metrics()))
    return 0 if not res.errors else 1


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(_worker_main())
    sys.exit(_cli())
