"""The access-log message as the gRPC handler now receives it (serialized) and the compiled scan reads it
(adapters/als_fast.log_entries, native/_usage.pyx) against the reference path: protobuf entries through
AccessLogService.account_now with the scans off (what NEXUS_AUTHZ_PURE=1 runs). Over one broad set of
batches (JSON, SSE and Anthropic shapes, missing usage, errors, compressed and over-the-cap bodies, reset
streams with the Lua tap's `p` checkpoints, duplicates, unknown request ids, unadmitted entries, expired
reservations, a key whose prompt is estimated at accounting time, entries protobuf must merge) both
engines must end in the same state: accounted counters, token metrics, unpriced counts, the reservation
book, the limit windows (as the next Check reports them) and every ledger row with its source and price
rule."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import struct_pb2

from nexus_authz import native
from nexus_authz.adapters import als_fast
from nexus_authz.adapters.envoy_als import METADATA_NAMESPACE, AccessLogService
from nexus_authz.core.model import Request
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from tests.adapters.test_als import FIXTURES, body_meta, entry_with, message
from tests.helpers import KeySpec, write_config
from tests.helpers import protobuf_len_field as _len_field

CONFIG = """
ledger: {backend: LEDGER}
reservations: {ttl: 60s}
prices:
  "gpt-4o-mini*": {input: 0.15, output: 0.6}
  "gpt-4o*": {input: 2.5, cached_input: 1.25, output: 10}
"""
METERED = KeySpec(
    "metered",
    extra={
        "tenant": "acme",
        "limits": [{"tokens": 10_000_000, "per": "day"}, {"usd": 1000, "per": "day"}, {"concurrent": 1000}],
    },
)
OPEN = KeySpec("open")  # no limits: the Check estimates no prompt, accounting does (core.prompt_later)
CHAT = (FIXTURES / "openai_chat.json").read_bytes()
NO_USAGE = (FIXTURES / "openai_chat_stream_no_usage.sse").read_bytes()


class _Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _engine(tmp_path: Path, ledger: str = "memory") -> tuple[Engine, _Clock]:
    tmp_path.mkdir()
    clock = _Clock()
    backend = "memory" if ledger == "memory" else f"sqlite, path: {tmp_path / 'usage.sqlite3'}"
    path = write_config(tmp_path, METERED, OPEN, extra=CONFIG.replace("LEDGER", backend))
    return Engine.from_settings(load_settings(str(path)), clock=clock), clock


def _check(engine: Engine, key: KeySpec, request_id: str, model: str = "gpt-4o-mini") -> dict[str, str]:
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hello " * 40}], "max_tokens": 300}
    ).encode()
    decision = engine.check(
        Request(
            method="POST",
            path="/v1/chat/completions",
            headers={"authorization": f"Bearer {key.secret}", "content-type": "application/json"},
            body=body,
            request_id=request_id,
        )
    )
    assert decision.allowed, decision
    return dict(decision.response_headers)


def _pieces(data: bytes, order: tuple[int, ...] = (1, 2, 3)) -> dict[str, Any]:
    size = len(data) // 3 + 1
    return {f"p{i}": base64.b64encode(data[(i - 1) * size : i * size]).decode() for i in order}


def _responses() -> list[tuple[dict[str, Any] | None, str | None, str | None]]:
    """(Lua record, content type, content encoding) of every kind of response."""
    out: list[tuple[dict[str, Any] | None, str | None, str | None]] = []
    for path in sorted(FIXTURES.iterdir()):
        body = path.read_bytes()
        ctype = "text/event-stream" if path.suffix == ".sse" else "application/json"
        out.append((body_meta(body, "sse" if path.suffix == ".sse" else "body"), ctype, None))
    out += [
        (body_meta(CHAT.replace(b'"prompt_tokens": 19', b'"prompt_tokens": 19.0')), "application/json", None),
        (body_meta(gzip.compress(CHAT)), "application/json", "gzip"),
        ({"u": {"k": "over", "x": 5_000_000}}, "application/json", "gzip"),
        (body_meta(CHAT[-300:], "tail") | {"x": 1}, "application/json", None),
        (
            {"u": {"k": "tail", "b": base64.b64encode(CHAT[-300:]).decode(), "x": 4000}},
            "application/json",
            None,
        ),
        ({"u": {"k": "sse", "b": base64.b64encode(NO_USAGE[:900]).decode(), "x": 90_000}}, None, None),
        (_pieces(NO_USAGE[:1500]), "text/event-stream", None),  # a stream reset mid-way
        (_pieces(NO_USAGE[:1500], (2, 1, 3)), "text/event-stream", None),
        ({"p1": "not base64!", "p2": base64.b64encode(NO_USAGE[:400]).decode()}, "text/event-stream", None),
        ({"u": {"k": "body", "b": "eyJ1c2FnZSI6e319\n"}}, "application/json", None),  # non-canonical base64
        ({"u": {"k": "strange", "b": base64.b64encode(CHAT).decode()}}, "application/json", None),
        (None, "application/json", None),  # the client went away before the body
        (None, None, None),
        (body_meta(b"<html>bad gateway</html>"), "text/html", None),
        (body_meta(b""), "application/json", None),
    ]
    return out


def _batches() -> tuple[list[bytes], list[tuple[KeySpec, str]], set[str]]:
    """Serialized messages, the requests to admit first (key, request id), and the ids to expire."""
    admit: list[tuple[KeySpec, str]] = []
    entries: list[bytes] = []
    for i, (meta, ctype, encoding) in enumerate(_responses()):
        for key in (METERED, OPEN):
            rid = f"{key.id}-{i}"
            admit.append((key, rid))
            entries.append(
                entry_with(
                    meta, content_type=ctype, encoding=encoding, key_id="x", request_id=rid
                ).SerializeToString()
            )
    chat = entry_with(body_meta(CHAT), content_type="application/json", key_id="x", request_id="metered-0")
    entries += [
        chat.SerializeToString(),  # a duplicate of an entry accounted already
        entry_with(
            body_meta(CHAT), content_type="application/json", key_id="x", request_id="never"
        ).SerializeToString(),  # nexus admitted no such request
        entry_with(
            body_meta(CHAT), content_type="application/json", key_id=None, request_id="metered-late"
        ).SerializeToString(),  # no x-nexus-key-id: not admitted through nexus (and not accounted)
        entry_with(
            body_meta(CHAT), content_type="application/json", key_id="x", request_id="expired"
        ).SerializeToString(),  # its reservation expired: ledgered under its retired context
    ]
    admit += [(METERED, "metered-late"), (METERED, "expired")]
    # protobuf merges a repeated singular field: an entry whose common properties come in two parts,
    # the second holding the Lua record
    split = entry_with(None, content_type="application/json", key_id="x", request_id="metered-split")
    tail = accesslog_pb2.HTTPAccessLogEntry()
    tail.common_properties.CopyFrom(entry_with(body_meta(CHAT)).common_properties)
    entries.append(split.SerializeToString() + tail.SerializeToString())
    admit.append((METERED, "metered-split"))
    # and one whose Lua record comes in two parts of its map entry (protobuf merges the two Structs)
    half = entry_with(None, content_type="application/json", key_id="x", request_id="metered-merged")
    record = entry_with(body_meta(CHAT)).common_properties.metadata.filter_metadata[METADATA_NAMESPACE]
    other = struct_pb2.Struct()
    other.update({"x": 4000})
    map_entry = _len_field(1, METADATA_NAMESPACE.encode())
    map_entry += _len_field(2, record.SerializeToString()) + _len_field(2, other.SerializeToString())
    entries.append(half.SerializeToString() + _len_field(1, _len_field(17, _len_field(1, map_entry))))
    admit.append((METERED, "metered-merged"))
    entries.append(entries[3])  # a duplicate in the same batch
    identifier = als_pb2.StreamAccessLogsMessage()
    identifier.identifier.log_name = "nexus_usage"
    messages = []
    for start in range(0, len(entries), 7):
        body = b"".join(_len_field(1, e) for e in entries[start : start + 7])
        head = identifier.SerializeToString() if start == 0 else b""
        messages.append(head + _len_field(2, body))
    messages.append(messages[1])  # Envoy resending a batch
    return messages, admit, {"expired"}


class _Counting(AccessLogService):
    """The service, counting the entries protobuf reads (account_now: the reference per-entry path)."""

    __slots__ = ("by_protobuf",)

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.by_protobuf = 0

    def account_now(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> Any:
        self.by_protobuf += 1
        return super().account_now(entry)


class _Context:
    def __init__(self, messages: list[Any]) -> None:
        self._messages = iter(messages)

    async def read(self) -> Any:
        return next(self._messages, grpc.aio.EOF)


def _run(tmp_path: Path, *, compiled: bool, ledger: str = "memory") -> tuple[dict[str, Any], int]:
    engine, clock = _engine(tmp_path, ledger)
    messages, admit, expire = _batches()
    for key, rid in admit:  # late ones first: their reservations expire before their entries arrive
        if rid in expire:
            _check(engine, key, rid)
    clock.now += 61
    engine.maintain()
    for key, rid in admit:
        if rid not in expire:
            _check(engine, key, rid, model="gpt-4o" if rid.endswith("3") else "gpt-4o-mini")
    clock.now += 30
    service = _Counting(engine)
    if compiled:  # the handler's input: the serialized messages, read by the compiled scan
        feed: list[Any] = list(messages)
    else:  # the reference: protobuf entries, the pure per-entry path
        feed = [als_pb2.StreamAccessLogsMessage.FromString(m) for m in messages]
    asyncio.run(service.stream_access_logs(None, _Context(feed)))  # type: ignore[arg-type]
    clock.now += 1
    assert engine.ledger is not None
    if ledger == "sqlite":
        assert engine.ledger.flush_now()  # type: ignore[attr-defined]
    rows = engine.ledger.query(group_by=("key_id", "tenant", "model", "source", "price_rule", "minute"))
    state = {
        "accounted": dict(engine.accounted),
        "usage_tokens": dict(engine.usage_tokens),
        "unpriced": dict(engine.unpriced),
        "book": engine.book.stats(),
        "slot_releases": dict(engine.decider.slot_releases),
        "ledger_stats": (engine.ledger.stats().recorded_records, engine.ledger.stats().dropped_records),
        "service": (service.messages, service.entries, service.ignored),
        "ledger": sorted(rows, key=repr),
        "windows": _check(engine, METERED, "after"),  # what the limits hold now, as the Check says it
    }
    return state, service.by_protobuf


@pytest.mark.parametrize("ledger", ["memory", "sqlite"])
def test_the_compiled_message_scan_accounts_as_the_reference_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ledger: str
) -> None:
    if native.usage is None or native.account is None:
        pytest.skip("the compiled scans are not loaded (NEXUS_AUTHZ_PURE, or not built)")
    accounted: list[str] = []  # the request ids the Python Engine.account settled
    python_account = Engine.account

    def counting(self: Engine, request_id: str, *args: Any, **kwargs: Any) -> None:
        accounted.append(request_id)
        python_account(self, request_id, *args, **kwargs)

    monkeypatch.setattr(Engine, "account", counting)
    taken = native.account.taken[0]
    fast, unusual = _run(tmp_path / "compiled", compiled=True, ledger=ledger)
    taken = native.account.taken[0] - taken  # entries the compiled accounting step took
    by_python = list(accounted)
    accounted.clear()
    monkeypatch.setattr(als_fast, "SCAN", None)
    monkeypatch.setattr(als_fast, "ACCOUNT", None)
    reference, all_entries = _run(tmp_path / "reference", compiled=False, ledger=ledger)
    assert fast == reference
    # not vacuous: the common entries (a live reservation, a provider record the scan read) were settled
    # by the compiled step, Engine.account ran only for the others (duplicates, unknown and expired ids,
    # the usage concluded by the core)
    assert taken >= 10, taken
    assert len(by_python) + taken == len(accounted)
    assert "never" in by_python and "expired" in by_python
    # a JSON body's and an OpenAI stream's provider record (fixtures 1, 4 and 8) on both keys; metered-4
    # once more as the resent batch's duplicate
    assert not {"metered-1", "open-1", "metered-8", "open-8"} & set(by_python[: by_python.index("never")])
    assert by_python.count("metered-4") == 1
    # the scan read most entries itself; protobuf only the unusual ones (pieces, odd records, a merge)
    assert 0 < unusual < all_entries / 3, (unusual, all_entries)
    assert reference["accounted"]["duplicate"] >= 3 and reference["accounted"]["unadmitted"] == 1
    assert reference["service"][2] == 1  # the entry without x-nexus-key-id
    assert reference["accounted"]["unmatched"] == 1
    assert {row.source for row in reference["ledger"]} >= {"reported", "counted", "estimated", "none"}


def test_a_malformed_message_fails_the_stream_as_protobuf_did(tmp_path: Path) -> None:
    engine, _ = _engine(tmp_path / "e")
    good = message(entry_with(body_meta(CHAT), content_type="application/json", request_id="r"))
    raw = good.SerializeToString()
    service = AccessLogService(engine)
    with pytest.raises(Exception, match="(?i)pars|decod"):
        asyncio.run(service.stream_access_logs(None, _Context([raw[:-3]])))  # type: ignore[arg-type]
    assert engine.accounted["unadmitted"] == 0


class _Then:
    """A servicer context that hands out `messages`, then waits for a message that never comes."""

    def __init__(self, messages: list[Any]) -> None:
        self._messages = list(messages)
        self.reads = 0

    async def read(self) -> Any:
        self.reads += 1
        if self._messages:
            return self._messages.pop(0)
        await asyncio.Event().wait()


def _chats(*request_ids: str) -> bytes:
    return message(
        *(entry_with(body_meta(CHAT), content_type="application/json", request_id=r) for r in request_ids)
    ).SerializeToString()


class _StopsMidBatch(AccessLogService):
    """Ends its streams (as drain() does at its deadline) while accounting the first entry of a batch."""

    __slots__ = ()

    def account_now(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> Any:
        for stop in list(self._streams):
            if not stop.done():
                stop.set_result(None)
        return super().account_now(entry)


def test_a_stream_ended_mid_batch_finishes_the_batch_and_reads_no_more(tmp_path: Path) -> None:
    engine, _ = _engine(tmp_path / "e")
    # an unusual first entry (a cut-off stream's pieces: account_now reads it) ends the stream mid-batch
    first = entry_with(_pieces(NO_USAGE[:900]), content_type="text/event-stream", request_id="a")
    batch = message(first, *(entry_with(body_meta(CHAT), request_id=r) for r in "bcd")).SerializeToString()
    service = _StopsMidBatch(engine)
    context = _Then([batch, _chats("e")])
    asyncio.run(asyncio.wait_for(service.stream_access_logs(None, context), 5))  # type: ignore[arg-type]
    assert (service.messages, service.entries, context.reads) == (1, 4, 1)
    assert not service.open_streams


def test_drain_ends_a_stream_waiting_for_its_next_message(tmp_path: Path) -> None:
    engine, _ = _engine(tmp_path / "e")
    service = AccessLogService(engine)

    async def scenario() -> None:
        task = asyncio.ensure_future(service.stream_access_logs(None, _Then([_chats("a", "b")])))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        await service.drain(1.0)
        assert await asyncio.wait_for(task, 5) is not None  # ended normally, with its response

    asyncio.run(scenario())
    assert (service.messages, service.entries, service.open_streams) == (1, 2, 0)


def test_a_stream_cancelled_from_outside_stays_cancelled(tmp_path: Path) -> None:
    engine, _ = _engine(tmp_path / "e")
    service = AccessLogService(engine)

    async def scenario() -> None:
        task = asyncio.ensure_future(service.stream_access_logs(None, _Then([_chats("a")])))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        task.cancel()  # the server stopping: not the drain's stop
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled() and not service.open_streams

    asyncio.run(scenario())
