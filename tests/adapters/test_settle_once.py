"""Settlement is idempotent per request id (issue 16 item 4): a repeated access-log entry (Envoy's gRPC
access log service resending a batch) or a repeated ext_proc stream never charges twice: neither the
limit windows nor the ledger. The reservation book remembers the ids it settled (bounded) and the
repeat is counted as a duplicate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from nexus_authz.adapters.envoy_als import AccessLogService
from nexus_authz.adapters.envoy_extproc import ExternalProcessorService
from nexus_authz.core.reservations import ReservationBook
from nexus_authz.engine import Engine
from nexus_authz.metrics import EngineCollector
from nexus_authz.settings import load_settings
from tests.adapters.conftest import ALICE
from tests.adapters.test_als import (
    CONFIG,
    FIXTURES,
    METERED,
    _metered_check,
    body_meta,
    entry_with,
    message,
    stream,
)
from tests.helpers import write_config

CHAT = (FIXTURES / "openai_chat.json").read_bytes()  # 19 prompt + 10 completion tokens


class _Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def metered(tmp_path: Path) -> tuple[Engine, _Clock]:
    extra = CONFIG + "ledger: {backend: memory}\nreservations: {ttl: 60s}\n"
    clock = _Clock()
    path = write_config(tmp_path, ALICE, METERED, extra=extra)
    return Engine.from_settings(load_settings(str(path)), clock=clock), clock


def _ledger(engine: Engine) -> tuple[int, int]:
    assert engine.ledger is not None
    rows = engine.ledger.query(group_by=("key_id",))
    return (sum(r.requests for r in rows), sum(r.prompt_tokens + r.completion_tokens for r in rows))


@pytest.mark.parametrize("expired", [False, True], ids=["settled", "expired-then-late"])
@pytest.mark.parametrize("same_batch", [False, True], ids=["resent", "same-batch"])
def test_a_repeated_access_log_entry_charges_once(
    metered: tuple[Engine, _Clock], expired: bool, same_batch: bool
) -> None:
    engine, clock = metered
    left = _metered_check(engine, "dup-1")
    reserved = 1_000_000 - left
    if expired:  # the usage arrives after the reservation expired: ledger only, the estimate stays
        clock.now += 61
        engine.maintain()
    entry = entry_with(body_meta(CHAT), content_type="application/json", key_id="metered", request_id="dup-1")
    service = AccessLogService(engine)
    if same_batch:
        stream(service, message(entry, entry))
    else:
        stream(service, message(entry))
        stream(service, message(entry))  # Envoy resends the batch on a new stream
    assert _ledger(engine) == (1, 29)
    charged = reserved if expired else 29
    assert _metered_check(engine, "dup-2") == 1_000_000 - charged - reserved  # dup-1 charged once
    assert engine.accounted["duplicate"] == 1
    assert engine.accounted["unadmitted"] == 0
    assert engine.accounted["unmatched"] == (1 if expired else 0)


def _extproc_stream(request_id: str, body: bytes) -> list[ep.ProcessingRequest]:
    req = ep.HttpHeaders()
    req.headers.headers.add(key="x-request-id", value=request_id)
    resp = ep.HttpHeaders()
    resp.headers.headers.add(key=":status", value="200")
    resp.headers.headers.add(key="content-type", value="application/json")
    return [
        ep.ProcessingRequest(request_headers=req, observability_mode=True),
        ep.ProcessingRequest(response_headers=resp, observability_mode=True),
        ep.ProcessingRequest(
            response_body=ep.HttpBody(body=body, end_of_stream=True), observability_mode=True
        ),
    ]


async def _drive(service: ExternalProcessorService, messages: list[ep.ProcessingRequest]) -> None:
    async def requests() -> AsyncIterator[ep.ProcessingRequest]:
        for m in messages:
            yield m

    async for _ in service.process(requests(), None):
        pass


def test_a_repeated_extproc_stream_charges_once(metered: tuple[Engine, _Clock]) -> None:
    engine, _ = metered
    left = _metered_check(engine, "ep-1")
    reserved = 1_000_000 - left
    service = ExternalProcessorService(engine)
    for _ in range(2):
        asyncio.run(_drive(service, _extproc_stream("ep-1", CHAT)))
    assert _ledger(engine) == (1, 29)
    assert _metered_check(engine, "ep-2") == 1_000_000 - 29 - reserved
    assert engine.accounted["duplicate"] == 1


def test_the_settled_ids_record_is_bounded_and_exported(metered: tuple[Engine, _Clock]) -> None:
    book = ReservationBook(ttl=60, max_entries=10, settled_max=3)
    for i in range(7):
        book.track(f"r{i}", object(), 0.0)
        assert book.settle(f"r{i}", 1.0) is not None
    # at least the last 3 (core/settled.py: chunks of 3 here, the oldest dropped whole)
    assert [book.was_settled(f"r{i}") for i in range(7)] == [False] * 3 + [True] * 4
    assert book.stats()["settled_ids"] == 4
    assert book.settle("r6", 2.0) is None  # a second settle finds nothing to charge

    engine, _ = metered
    _metered_check(engine, "m-1")
    entry = entry_with(body_meta(CHAT), content_type="application/json", key_id="metered", request_id="m-1")
    stream(AccessLogService(engine), message(entry, entry))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for m in EngineCollector(engine).collect()
        for s in m.samples
    }
    assert samples[("nexus_authz_reservation_ids", (("record", "settled"),))] == 1
    assert samples[("nexus_authz_reservation_ids", (("record", "retired"),))] == 0
    assert samples[("nexus_authz_reservations_in_flight", ())] == 0
    assert samples[("nexus_authz_accounted_duplicate_total", ())] == 1
