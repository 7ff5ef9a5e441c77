"""Faults against a real `nexus-authz serve` process (issue 10, section 3).

(a) The key file replaced by garbage, truncated or deleted while serving: the last good snapshot keeps
    answering, /readyz says 503 with the reason, `nexus_authz_key_file_error` is 1, one error is logged per
    change naming the file; a fixed file is picked up and everything recovers.
(b) SIGTERM under load (200 keep-alive connections over the Unix socket sending Checks back to back, and a
    token-accounting access-log stream): every request sent gets its whole answer (none is reset or left
    unanswered), the drain ends with the final ledger flush (everything accounted is in the file), exit 0.
(c) The ledger's disk full (the process's file-size limit lowered under it with prlimit: every write
    past it fails as on a full disk) or its database locked (another connection holding an exclusive
    lock) while serving: records stay buffered up to `ledger.max_pending` rows, the rest are dropped and
    counted in /metrics and the log (one warning per episode), never silently; when the fault clears the
    buffer lands in the file and the drop episode is reported.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import os
import re
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from envoy.service.accesslog.v3 import als_pb2

from nexus_authz.adapters.envoy_als import METADATA_NAMESPACE
from nexus_authz.demo import procs
from nexus_authz.stores.ledger import query_db
from tests.helpers import PEPPER, KeySpec, key_file, write_config

ALICE = KeySpec("alice", extra={"tenant": "acme"})
BOB = KeySpec("bob", extra={"tenant": "acme"})
CAROL = KeySpec("carol", extra={"tenant": "other"})


# -- a real server ------------------------------------------------------------------------------------------


@dataclass
class Served:
    """`nexus-authz serve` in a subprocess, its output collected from a pipe (never a file: test (c)
    limits the size of the files the process may write)."""

    workdir: Path
    process: subprocess.Popen[bytes]
    admin: str
    grpc: str
    output: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def socket(self) -> Path:
        return self.workdir / "authz.sock"

    def log(self) -> str:
        return "".join(self.output)

    def records(self) -> list[dict[str, object]]:
        out = []
        for line in list(self.output):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


def serve(workdir: Path, *keys: KeySpec, extra: str = "") -> Served:
    admin, grpc_port = procs.free_port(), procs.free_port()
    config = write_config(
        workdir,
        *keys,
        extra=extra,
        socket=str(workdir / "authz.sock"),
        grpc=f"127.0.0.1:{grpc_port}",
        admin=f"127.0.0.1:{admin}",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "nexus_authz.cli", "serve", "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "NEXUS_KEY_PEPPER": PEPPER},
    )
    served = Served(workdir, process, f"http://127.0.0.1:{admin}", f"127.0.0.1:{grpc_port}")

    def pump() -> None:
        assert process.stdout is not None
        for line in iter(process.stdout.readline, b""):
            served.output.append(line.decode(errors="replace"))

    served.reader = threading.Thread(target=pump, daemon=True)
    served.reader.start()
    deadline = time.monotonic() + 30
    while "nexus-authz serving" not in served.log():  # every listener open, signal handlers installed
        if process.poll() is not None or time.monotonic() > deadline:
            stop(served)
            raise AssertionError(f"nexus-authz did not start:\n{served.log()[-3000:]}")
        time.sleep(0.02)
    return served


def stop(served: Served, timeout: float = 20) -> int | None:
    code = procs.stop_process(served.process, timeout=timeout)
    if served.reader is not None:
        served.reader.join(timeout=5)
    if served.process.stdout is not None:
        served.process.stdout.close()
    return code


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nx-faults-"))  # short: Unix socket paths are limited
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def check(served: Served, secret: str, request_id: str | None = None) -> int:
    """One Check over the Unix socket, as Envoy sends it; the answer's status."""
    body = b'{"model":"gpt-4o","messages":[]}'
    head = (
        "POST /ext_authz/v1/chat/completions HTTP/1.1\r\nhost: nexus\r\n"
        + (f"x-request-id: {request_id}\r\n" if request_id else "")
        + f"authorization: Bearer {secret}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(served.socket))
        s.sendall(head.encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def metrics(served: Served) -> dict[str, float]:
    """The admin endpoint's samples, keyed `name{labels}` as written."""
    status, text = get(f"{served.admin}/metrics")
    assert status == 200
    out = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _logged_more(served: Served, text: str, before: int) -> bool:
    return served.log().count(text) > before


def ready(served: Served) -> tuple[int, dict[str, object]]:
    status, body = get(f"{served.admin}/readyz")
    return status, json.loads(body)


# -- (a) the key file ---------------------------------------------------------------------------------------


def _replace(path: Path, data: bytes, *, atomic: bool) -> None:
    """Write the key file as an operator (in place) or a deployment tool (rename) would."""
    if atomic:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    else:
        path.write_bytes(data)


GOOD = key_file(ALICE, BOB).encode()
BROKEN = {
    "garbage": b"\x00\xff\xfe garbage \x89PNG\r\n\x1a\n" + os.urandom(64),
    "not yaml": b"keys: [\n  - id: alice\n    hash: {{{\n",
    "truncated": GOOD[: len(GOOD) // 2 + 7],
    "empty": b"",
    "wrong shape": b"keys:\n  - id: alice\n    tenant: [x]\n",
}


def test_a_broken_key_file_keeps_the_last_good_snapshot(workdir: Path) -> None:
    served = serve(workdir, ALICE, BOB)
    keys = workdir / "keys.yaml"
    try:
        wait_for("ready", lambda: ready(served)[0] == 200)
        assert check(served, ALICE.secret) == 200 and check(served, CAROL.secret) == 401
        assert metrics(served)["nexus_authz_key_file_error"] == 0
        for i, (name, data) in enumerate([*BROKEN.items(), ("deleted", None)]):
            errors_before = served.log().count("key file rejected")
            if data is None:
                keys.unlink()
            else:
                _replace(keys, data, atomic=bool(i % 2))
            wait_for(f"readyz 503 after a {name} key file", lambda: ready(served)[0] == 503)
            status, body = ready(served)
            assert body == {"ready": False, "detail": "key file rejected; serving the previous snapshot"}
            assert metrics(served)["nexus_authz_key_file_error"] == 1
            assert metrics(served)["nexus_authz_keys"] == 2
            # the last good snapshot answers as before
            assert check(served, ALICE.secret) == 200 and check(served, BOB.secret) == 200
            assert check(served, CAROL.secret) == 401
            wait_for(
                "the error logged",
                functools.partial(_logged_more, served, "key file rejected", errors_before),
            )
            # back to the good file before the next fault: each fault starts from a good snapshot
            _replace(keys, GOOD, atomic=True)
            wait_for("readyz 200 again", lambda: ready(served)[0] == 200)
        time.sleep(0.3)  # several reload polls: a broken file is reported once per change, not per poll
        rejected = [
            r
            for r in served.records()
            if r.get("msg") == "key file rejected; the previous keys stay in force"
        ]
        assert len(rejected) == len(BROKEN) + 1
        assert all(str(keys) in str(r.get("error")) for r in rejected), rejected
        # a fixed file with other keys: the new snapshot replaces the old one
        _replace(keys, key_file(CAROL).encode(), atomic=False)
        wait_for("carol's key in force", lambda: check(served, CAROL.secret) == 200)
        assert check(served, ALICE.secret) == 401
        assert ready(served)[0] == 200 and metrics(served)["nexus_authz_key_file_error"] == 0
        assert metrics(served)["nexus_authz_keys"] == 1
        assert ALICE.secret not in served.log() and CAROL.secret not in served.log()
    finally:
        assert stop(served) == 0


# -- (b) SIGTERM under load ----------------------------------------------------------------------------------


def _request(secret: str, address: str) -> bytes:
    body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
    return (
        "POST /ext_authz/v1/chat/completions HTTP/1.1\r\nhost: nexus\r\n"
        f"authorization: Bearer {secret}\r\nx-forwarded-for: {address}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body


@dataclass
class LoadStats:
    answered: int = 0
    answered_after_sigterm: int = 0
    closing_answers: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    unanswered: int = 0  # a request sent, then EOF or a reset before any byte of its answer
    cut: int = 0  # part of an answer, then EOF or a reset
    refused: int = 0  # connections refused once the listener closed
    errors: list[str] = field(default_factory=list)


async def _connection(path: str, index: int, stats: LoadStats, sigterm: asyncio.Event) -> None:
    """Checks back to back on one keep-alive connection (reconnecting after a `connection: close`, as
    Envoy does) until the server stops accepting."""
    requests = [_request(ALICE.secret, f"10.1.{index // 250}.{index % 250}")] * 9 + [
        _request(CAROL.secret, f"10.2.{index // 250}.{index % 250}")
    ]
    n = 0
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        except (ConnectionRefusedError, FileNotFoundError):
            stats.refused += 1
            return
        try:
            while True:
                writer.write(requests[n % len(requests)])
                n += 1
                head = b""
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    length = next(
                        int(h.split(":")[1]) for h in lines if h.lower().startswith("content-length:")
                    )
                    await reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
                    partial = head or (exc.partial if isinstance(exc, asyncio.IncompleteReadError) else b"")
                    if partial:
                        stats.cut += 1
                    else:
                        stats.unanswered += 1
                    stats.errors.append(f"{type(exc).__name__} after SIGTERM={sigterm.is_set()}")
                    return
                status = int(lines[0].split(" ")[1])
                stats.statuses[status] = stats.statuses.get(status, 0) + 1
                stats.answered += 1
                if sigterm.is_set():
                    stats.answered_after_sigterm += 1
                if any(h.lower() == "connection: close" for h in lines):
                    stats.closing_answers += 1
                    break  # the server will close this one: open another
        finally:
            writer.close()


def _admit(served: Served, request_ids: range, prefix: str) -> None:
    """Checks that admit these request ids: only what nexus-authz admitted is accounted."""
    for i in request_ids:
        assert check(served, ALICE.secret, f"{prefix}{i}") == 200


def _access_log(n: int, start: int = 0) -> als_pb2.StreamAccessLogsMessage:
    """A batch of `n` access-log entries as Envoy's Lua usage tap and gRPC logger send them (request ids
    acct-<start>...)."""
    message = als_pb2.StreamAccessLogsMessage()
    for i in range(start, start + n):
        entry = message.http_logs.log_entry.add()
        entry.request.request_id = f"acct-{i}"
        entry.request.request_headers["x-nexus-key-id"] = "alice"
        entry.request.request_headers["x-nexus-tenant"] = "acme"
        entry.response.response_headers["content-type"] = "application/json"
        body = b'{"model":"gpt-4o","usage":{"prompt_tokens":3,"completion_tokens":4}}'
        entry.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].update(
            {"u": {"k": "body", "b": base64.b64encode(body).decode()}}
        )
    return message


TERM_CONFIG = """
ledger:
  path: usage.sqlite3
  flush_interval: 1h        # nothing is written before the final flush
  batch_size: 1000000
server: {shutdown_grace: 8s}
auth_failures: {limit: 0}
"""


def test_sigterm_under_load_answers_every_request_and_flushes(workdir: Path) -> None:
    served = serve(workdir, ALICE, BOB, extra=TERM_CONFIG)
    stats = LoadStats()
    batches, per_batch = 10, 50
    _admit(served, range(batches * per_batch), "acct-")

    async def main() -> None:
        sigterm = asyncio.Event()
        async with grpc.aio.insecure_channel(served.grpc) as channel:
            # token accounting, as Envoy streams it: the records land in the ledger's buffer only
            stream = channel.stream_unary(
                "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs",
                request_serializer=als_pb2.StreamAccessLogsMessage.SerializeToString,
                response_deserializer=als_pb2.StreamAccessLogsResponse.FromString,
            )
            queue: asyncio.Queue[als_pb2.StreamAccessLogsMessage | None] = asyncio.Queue()

            async def messages() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
                while (m := await queue.get()) is not None:
                    yield m

            call = stream(messages())
            for b in range(batches):
                queue.put_nowait(_access_log(per_batch, b * per_batch))
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(
                None,
                wait_for,
                "the access logs accounted",
                lambda: metrics(served).get("nexus_authz_ledger_records_total") == batches * per_batch,
            )
            tasks = [
                asyncio.create_task(_connection(str(served.socket), i, stats, sigterm)) for i in range(200)
            ]
            await asyncio.sleep(1.5)  # all 200 connections busy
            assert stats.answered > 200 and not stats.errors, stats
            served.process.send_signal(15)
            sigterm.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            # the drain ended the access-log stream (Envoy never ends it)
            await asyncio.wait_for(call, 30)

    try:
        asyncio.run(main())
        code = served.process.wait(timeout=30)
    finally:
        stop(served)
    print(
        f"SIGTERM under load: {stats.answered} answers ({stats.answered_after_sigterm} after SIGTERM, "
        f"{stats.closing_answers} with connection: close), {stats.unanswered} unanswered, {stats.cut} cut, "
        f"{stats.refused} connections refused after the listener closed, exit {code}"
    )
    assert stats.unanswered == 0 and stats.cut == 0, (stats.errors[:10], stats)
    assert code == 0, served.log()[-3000:]
    assert stats.answered_after_sigterm > 0  # requests in flight at SIGTERM were answered
    assert set(stats.statuses) <= {200, 401}
    assert stats.refused > 0  # and then the listener was closed
    rows = query_db(workdir / "usage.sqlite3", key_id="alice")
    assert sum(r.requests for r in rows) == batches * per_batch  # the final flush
    assert sum(r.prompt_tokens for r in rows) == 3 * batches * per_batch
    assert '"msg": "stopped"' in served.log()


# -- (c) the ledger's disk full or locked ------------------------------------------------------------------

LEDGER_CONFIG = """
ledger:
  path: usage.sqlite3
  flush_interval: 100ms
  max_pending: 40
"""


def _distinct_rows(n: int, start: int) -> als_pb2.StreamAccessLogsMessage:
    """`n` usage records that each make a row of their own (one model each)."""
    message = als_pb2.StreamAccessLogsMessage()
    for i in range(start, start + n):
        entry = message.http_logs.log_entry.add()
        entry.request.request_id = f"row-{i}"
        entry.request.request_headers["x-nexus-key-id"] = "alice"
        entry.response.response_headers["content-type"] = "application/json"
        body = b'{"model":"m-%d","usage":{"prompt_tokens":1,"completion_tokens":1}}' % i
        entry.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].update(
            {"u": {"k": "body", "b": base64.b64encode(body).decode()}}
        )
    return message


def _send_logs(served: Served, *messages: als_pb2.StreamAccessLogsMessage) -> None:
    with grpc.insecure_channel(served.grpc) as channel:
        call = channel.stream_unary(
            "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs",
            request_serializer=als_pb2.StreamAccessLogsMessage.SerializeToString,
            response_deserializer=als_pb2.StreamAccessLogsResponse.FromString,
        )
        call(iter(messages), timeout=30)


class Locked:
    """Another process's exclusive lock on the ledger: every write waits out busy_timeout and fails."""

    name = "locked"

    def __init__(self, served: Served) -> None:
        self.conn = sqlite3.connect(served.workdir / "usage.sqlite3", isolation_level=None, timeout=10)

    def __enter__(self) -> Locked:
        self.conn.execute("BEGIN EXCLUSIVE")
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


class DiskFull:
    """The server may no longer write past the first KiB of any file (RLIMIT_FSIZE set on the running
    process): SQLite's writes fail exactly as on a full disk. Needs root or the same user (prlimit)."""

    name = "disk full"

    def __init__(self, served: Served) -> None:
        self.pid = served.process.pid

    def __enter__(self) -> DiskFull:
        self.saved = resource.prlimit(self.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (1024, self.saved[1]))
        return self

    def __exit__(self, *exc: object) -> None:
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, self.saved)


@pytest.mark.parametrize("fault", [DiskFull, Locked], ids=["disk-full", "locked"])
def test_a_failing_ledger_buffers_then_drops_and_counts(
    workdir: Path, fault: type[DiskFull | Locked]
) -> None:
    served = serve(workdir, ALICE, extra=LEDGER_CONFIG)
    db = workdir / "usage.sqlite3"
    try:
        for ids in (range(5), range(100, 120), range(200, 250)):
            _admit(served, ids, "row-")
        _send_logs(served, _distinct_rows(5, 0))
        wait_for("the first rows written", lambda: sum(r.requests for r in query_db(db)) == 5)
        assert metrics(served)['nexus_authz_store_up{store="ledger"}'] == 1
        with fault(served):
            _send_logs(served, _distinct_rows(20, 100))
            wait_for("a failed flush", lambda: metrics(served)["nexus_authz_ledger_failed_flushes_total"] > 0)
            m = metrics(served)
            assert m['nexus_authz_store_up{store="ledger"}'] == 0
            assert m["nexus_authz_ledger_dropped_records_total"] == 0  # buffered, not dropped
            assert m["nexus_authz_ledger_pending_rows"] == 20
            _send_logs(served, _distinct_rows(50, 200))  # past max_pending (40 rows)
            wait_for(
                "the records received",
                lambda: (
                    metrics(served)["nexus_authz_ledger_records_total"]
                    + metrics(served)["nexus_authz_ledger_dropped_records_total"]
                    == 75
                ),
            )
            m = metrics(served)
            assert m["nexus_authz_ledger_pending_rows"] == 40
            assert m["nexus_authz_ledger_records_total"] == 45  # kept: 5 written, 40 buffered
            assert m["nexus_authz_ledger_dropped_records_total"] == 30  # the other 30: counted
            time.sleep(0.5)  # more retries fail meanwhile; still one warning for the episode
        wait_for("the buffer written", lambda: sum(r.requests for r in query_db(db)) == 45, timeout=40)
        m = metrics(served)
        assert m['nexus_authz_store_up{store="ledger"}'] == 1
        assert (
            m["nexus_authz_ledger_pending_rows"] == 0 and m["nexus_authz_ledger_dropped_records_total"] == 30
        )
        wait_for("the recovery logged", lambda: "usage ledger buffer drained" in served.log())
        logs = served.log()
        print(f"{fault.name}:", *(line.strip() for line in served.output if '"level": "warning"' in line))
        assert logs.count("usage ledger buffer full") == 1  # one warning per episode
        assert logs.count("usage ledger write failed (") == 1
        assert re.search(r"buffer drained; 30 usage records were dropped", logs), logs[-2000:]
        # the rows kept are those that came first: nothing later than the buffer's bound
        models = {r.model for r in query_db(db, group_by=("model",))}
        assert models == {f"m-{i}" for i in (*range(5), *range(100, 120), *range(200, 220))}
    finally:
        assert stop(served) == 0
