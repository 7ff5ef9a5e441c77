"""Shared machinery of the fuzz tests: run counts, time bounds, a bug detector, an HTTP response checker.

A fuzzed input passes when the surface gives a *defined* decision: a status from the allowed set with an
OpenAI-style JSON error body (or the protocol's own answer type), no exception escaping, no hang, and no
internal error caught and logged by the adapter's last-resort handler (which is how a bug shows up in a
handler that must never fail: it answers 500/INTERNAL and logs the traceback).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings

from nexus_authz.adapters import http_authz
from nexus_authz.core.reservations import ReservationBook
from nexus_authz.decide import Decider
from nexus_authz.engine import Engine
from nexus_authz.stores.base import LocalCounters
from nexus_authz.stores.memory import MemoryCounterStore
from tests.helpers import KeySpec, write_config

FUZZ_LONG = float(os.environ.get("NEXUS_FUZZ_LONG", "0") or 0)
"""Multiplier of every test's example count (0 or unset: the CI budget)."""

# Statuses the fast path may answer: a decision (200/204 allow, 400/401/403/429) or a protocol limit
# (413 body, 414 URI, 431 headers). 500 means a bug was caught; 404/503 only come from admin routes.
HTTP_ALLOWED = frozenset({200, 204, 400, 401, 403, 413, 414, 429, 431})


def examples(n: int) -> int:
    """The example count for a test whose CI budget is `n`."""
    return max(1, int(n * FUZZ_LONG)) if FUZZ_LONG else n


def fuzz_settings(n: int, *, deadline: float | None = 5.0, **kwargs: Any) -> settings:
    """Hypothesis settings for a fuzz test: `n` examples in CI (see `examples`), each bounded in time.

    The deadline is generous (seconds, where an example takes milliseconds): it is a hang detector on a
    shared 2-core machine, not a benchmark; Hypothesis re-runs a slow example before it reports it.
    """
    return settings(
        max_examples=examples(n),
        deadline=timedelta(seconds=deadline) if deadline is not None else None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
        ],
        **kwargs,
    )


class HangError(Exception):
    """An example ran past its time bound (raised from SIGALRM in the main thread)."""


@contextlib.contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    """Raise HangError if the block runs longer than `seconds` (synchronous Python code, main thread).

    Catches a loop that never ends; a single C call (a regex) is interrupted only when it returns, which
    the Hypothesis deadline then reports.
    """

    def expired(signum: int, frame: object) -> None:
        raise HangError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class BugLog(logging.Handler):
    """Collects what the adapters' last-resort handlers log (tracebacks, errors) while it is installed."""

    records: list[logging.LogRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        logging.Handler.__init__(self, logging.ERROR)

    def __hash__(self) -> int:
        return id(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def describe(self) -> str:
        out = []
        for r in self.records:
            text = f"{r.levelname} {r.name}: {r.getMessage()}"
            if r.exc_info and r.exc_info[1] is not None:
                text += f" ({type(r.exc_info[1]).__name__}: {r.exc_info[1]})"
            out.append(text)
        return "; ".join(out)


@contextlib.contextmanager
def no_bugs_logged() -> Iterator[BugLog]:
    """Fail if anything under `nexus_authz` logs at ERROR or above (a caught bug) inside the block."""
    handler = BugLog()
    logger = logging.getLogger("nexus_authz")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
    assert not handler.records, f"a handler logged an error for this input: {handler.describe()}"


# -- the HTTP answer checker ------------------------------------------------------------------------------


@dataclass
class HttpAnswer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    head: bool = False  # the answer to a HEAD request: its content-length is the body it would have

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def parse_answers(data: bytes, *, heads: bool = False) -> list[HttpAnswer]:
    """Split what the server wrote into HTTP/1.1 responses, strictly: a malformed answer fails the test.

    `heads`: the requests included HEADs, whose answers carry a content-length but no body; such an
    answer is one followed at once by the next status line or by the end of what was written (a body,
    JSON here, never starts with a status line)."""
    out: list[HttpAnswer] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        assert end >= 0, f"an unterminated response head: {data[pos : pos + 300]!r}"
        lines = data[pos:end].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        assert version == b"HTTP/1.1", f"bad status line {lines[0]!r}"
        code, _, reason = rest.partition(b" ")
        assert code.isdigit() and len(code) == 3 and reason, f"bad status line {lines[0]!r}"
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b": ")
            assert sep and name and all(c in _TOKEN for c in name), f"bad header line {line!r}"
            assert not any(c < 0x20 and c != 0x09 or c == 0x7F for c in value), f"control byte in {line!r}"
            headers.append((name.decode("latin-1"), value.decode("latin-1")))
        lengths = [v for k, v in headers if k.lower() == "content-length"]
        assert len(lengths) == 1 and lengths[0].isdigit(), f"need exactly one content-length: {headers}"
        start = end + 4
        if heads and int(lengths[0]) and (start == len(data) or data.startswith(b"HTTP/1.1 ", start)):
            out.append(HttpAnswer(int(code), headers, b"", head=True))
            pos = start
            continue
        body = data[start : start + int(lengths[0])]
        assert len(body) == int(lengths[0]), "a response body shorter than its content-length"
        out.append(HttpAnswer(int(code), headers, body))
        pos = start + len(body)
    return out


def check_error_json(raw: bytes | str) -> dict[str, Any]:
    """An OpenAI-style error object: {"error": {"message", "type", "param", "code"}}."""
    doc = json.loads(raw)
    assert isinstance(doc, dict) and isinstance(doc.get("error"), dict), raw
    error: dict[str, Any] = doc["error"]
    assert isinstance(error.get("message"), str) and error["message"], raw
    assert isinstance(error.get("type"), str) and isinstance(error.get("code"), str), raw
    return error


def check_answer(answer: HttpAnswer) -> None:
    """One fast-path answer is a defined decision."""
    assert answer.status in HTTP_ALLOWED, f"status {answer.status}: {answer.body[:300]!r}"
    if answer.head:  # a HEAD answer: the status and headers of the decision, no body
        return
    if answer.status in (200, 204):
        assert answer.body == b""
        return
    if answer.body:
        assert answer.header("content-type") == "application/json"
        check_error_json(answer.body)
    else:  # nginx auth_request denial: the real answer travels in headers
        status = answer.header("x-nexus-status")
        error = answer.header("x-nexus-error")
        assert answer.status in (401, 403) and status is not None and error is not None, answer.headers
        assert int(status) in HTTP_ALLOWED
        check_error_json(error)


# -- driving the fast path's protocol without a socket -----------------------------------------------------

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY = 1 << 20


class FakeTransport:
    """What an asyncio transport gives a protocol, recorded."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.written_after_close = 0
        self.paused = False

    def write(self, data: bytes) -> None:
        if self.closed:
            self.written_after_close += len(data)
        self.data += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def feed(engine: Engine, chunks: list[bytes]) -> tuple[list[HttpAnswer], FakeTransport]:
    """One connection fed `chunks` read by read; its answers, parsed and checked for well-formedness."""
    app = http_authz.HttpApp(engine, max_header_bytes=MAX_HEADER_BYTES, max_body=MAX_BODY)
    protocol = app.protocol()
    transport = FakeTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    for chunk in chunks:
        protocol.data_received(chunk)
        if transport.paused:  # the peer reads its answers again
            protocol.resume_writing()
    protocol.connection_lost(None)
    assert transport.written_after_close == 0, "answered after closing the connection"
    heads = b"HEAD " in b"".join(chunks)  # not per chunk: a split can cut "HEAD " in two
    return parse_answers(bytes(transport.data), heads=heads), transport


# -- the engine every fuzz test decides with ---------------------------------------------------------------

OPEN = KeySpec("open", extra={"tenant": "acme"})
SCOPED = KeySpec(
    "scoped",
    extra={
        "models": ["gpt-4o*"],
        "paths": ["/v1/*"],
        "limits": [
            {"requests": 1000000, "per": "minute"},
            {"tokens": 1000000000, "per": "day"},
            {"usd": 1000000, "per": "month"},
        ],
    },
)
TIGHT = KeySpec("tight", extra={"limits": [{"requests": 2, "per": "minute"}, {"concurrent": 3}]})
MODELS_ONLY = KeySpec("models-only", extra={"models": ["gpt-4o*", "whisper-1"]})
REVOKED = KeySpec("revoked", extra={"disabled": True})
EXPIRED = KeySpec("expired", extra={"expires_at": "2001-01-01T00:00:00Z"})
KEYS = (OPEN, SCOPED, TIGHT, MODELS_ONLY, REVOKED, EXPIRED)
SECRETS = tuple(k.secret for k in KEYS)

CONFIG = """
ledger:
  backend: memory
auth_failures: {limit: 20, per: minute}
prices:
  "gpt-4o*": {input: 2.5, cached_input: 1.25, output: 10}
"""


def write_fuzz_config(directory: Path, extra: str = "") -> Path:
    return write_config(directory, *KEYS, extra=CONFIG + extra)


def reset(engine: Engine) -> None:
    """Forget every counter, failure count and reservation: the next example starts from scratch."""
    engine.counters = MemoryCounterStore()
    engine.failures = MemoryCounterStore()
    r = engine.settings.policy.reservations
    engine.book = ReservationBook(ttl=r.ttl, max_entries=r.max_pending)
    engine.decider = Decider(
        LocalCounters(engine.counters),
        book=engine.book,
        failures=engine.failures,
        clock=engine.clock,
        decisions=engine.decisions,
        latency=engine.check_latency,
    )
