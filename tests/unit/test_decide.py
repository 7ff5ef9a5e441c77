"""The one decision driver (nexus_authz.decide): one path for every counter store."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from nexus_authz.core.limits import AcquireResult, LimitSpec, WindowStatus
from nexus_authz.core.model import Decision, Reason, Request
from nexus_authz.core.ports import AsyncCounterStore, CounterStore, StoreUnavailable
from nexus_authz.decide import Decider
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from nexus_authz.stores.base import LocalCounters
from nexus_authz.stores.memory import MemoryCounterStore
from tests.helpers import KeySpec, write_config

LIMITED = KeySpec("limited", extra={"limits": [{"requests": 2, "per": "minute"}]})
SCOPED = KeySpec("scoped", extra={"limits": [{"requests": 5, "per": "minute", "model": "gpt-4*"}]})


def engine_for(tmp_path: Path, extra: str = "") -> Engine:
    return Engine.from_settings(load_settings(str(write_config(tmp_path, LIMITED, SCOPED, extra=extra))))


def chat(key: KeySpec, model: str = "gpt-4o", request_id: str = "") -> Request:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {"authorization": f"Bearer {key.secret}", "content-type": "application/json"}
    return Request("POST", "/v1/chat/completions", headers, body, request_id=request_id)


class WaitingStore(LocalCounters):
    """The memory store behind the async port, made to wait like Redis's exact mode (or fail closed)."""

    def __init__(self, down: bool = False) -> None:
        super().__init__(MemoryCounterStore())
        self.acquire_nowait = lambda *args: None  # type: ignore[assignment,misc]
        self.peek_nowait = lambda *args: None  # type: ignore[assignment,misc]
        self.down = down

    async def acquire(
        self, counter_ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
    ) -> AcquireResult:
        await asyncio.sleep(0)
        if self.down:
            raise StoreUnavailable("redis unavailable: test", retry_after=2.5)
        return self.store.acquire(counter_ids, specs, costs, now)

    async def peek(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        now: float,
        costs: Sequence[int] | None = None,
    ) -> tuple[WindowStatus, ...]:
        if self.down:
            raise StoreUnavailable("redis unavailable: test")
        return self.store.peek(counter_ids, specs, now, costs)


def test_the_ports_are_what_the_stores_implement() -> None:
    assert isinstance(MemoryCounterStore(), CounterStore)
    assert isinstance(LocalCounters(MemoryCounterStore()), AsyncCounterStore)


def test_a_local_store_answers_with_the_decision_itself(tmp_path: Path) -> None:
    engine = engine_for(tmp_path)
    answers = [engine.check_fast(chat(LIMITED)) for _ in range(3)]
    assert all(a.__class__ is Decision for a in answers)  # no coroutine was made
    assert [a.reason for a in answers] == [Reason.OK, Reason.OK, Reason.RATE_LIMITED]  # type: ignore[union-attr]
    assert engine.decisions[Reason.OK] == 2 and engine.decisions[Reason.RATE_LIMITED] == 1


def test_a_store_that_must_wait_is_awaited_and_a_store_that_cannot_answer_is_a_503(tmp_path: Path) -> None:
    engine = engine_for(tmp_path)
    waiting = WaitingStore()
    engine.decider.store = waiting
    pending = engine.check_fast(chat(LIMITED))
    assert pending.__class__ is not Decision
    assert asyncio.run(pending).allowed  # type: ignore[arg-type]
    refused = engine.check_fast(chat(KeySpec("nobody")))  # refused before any limit: no wait
    assert refused.__class__ is Decision and refused.reason is Reason.UNKNOWN_KEY  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="use Engine.check_fast"):
        engine.check(chat(LIMITED))
    waiting.down = True
    down = asyncio.run(engine.check_fast(chat(LIMITED)))  # type: ignore[arg-type]
    assert down.status == 503 and down.reason is Reason.UNAVAILABLE
    assert dict(down.response_headers)["retry-after"] == "3"
    assert engine.decisions[Reason.UNAVAILABLE] == 1
    assert asyncio.run(engine.dry_run(chat(LIMITED))).status == 503  # the dry run cannot peek either


def test_the_rate_limit_service_charges_through_the_same_driver() -> None:
    driver = Decider(LocalCounters(MemoryCounterStore()))
    from nexus_authz.core.limits import Kind, make_limit

    spec = make_limit(Kind.REQUESTS, 1, "minute", name="one")
    first = driver.charge(("rls\x00a",), (spec,), (1,), 1000.0)
    assert isinstance(first, AcquireResult) and first.allowed
    second = driver.charge(("rls\x00a",), (spec,), (1,), 1000.0)
    assert isinstance(second, AcquireResult) and not second.allowed
    statuses = driver.read(("rls\x00a",), (spec,), 1000.0)
    assert isinstance(statuses, tuple) and statuses[0].remaining == 0


def test_a_request_no_window_applies_to_is_not_tracked_with_accounting_off(tmp_path: Path) -> None:
    # issue 14 drift: Policy.authorize (the memory store's path) remembered such a request in the
    # reservation book even with accounting off, where the Redis path did not: an entry nothing reads,
    # which can push real reservations out of a full book early (their concurrency slots released).
    engine = engine_for(tmp_path, "accounting: {enabled: false}\n")
    assert engine.check(chat(SCOPED, model="o1-mini", request_id="r1")).allowed
    assert len(engine.book) == 0
    assert engine.check(chat(SCOPED, model="gpt-4o", request_id="r2")).allowed  # a window applies
    (tmp_path / "on").mkdir()
    tracked = engine_for(tmp_path / "on")
    assert tracked.check(chat(SCOPED, model="o1-mini", request_id="r1")).allowed
    assert len(tracked.book) == 1  # accounting on: remembered, to account its usage
