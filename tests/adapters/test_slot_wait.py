"""A request refused only for a concurrency slot waits up to SLOT_WAIT for one to be released.

The proxy's Lua tap releases a slot without waiting for the answer (so the response is not delayed), and
a client that sends its next request the moment it has the previous response can reach nexus-authz just
before that release: the wait turns that race into an admission. Only refusals wait.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from nexus_authz import decide
from nexus_authz.core.model import Decision, Reason, Request, new_request
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from tests.helpers import KeySpec, write_config

CONC = KeySpec("conc", extra={"limits": [{"concurrent": 1}]})


def _engine(tmp_path: Path) -> Engine:
    return Engine.from_settings(load_settings(str(write_config(tmp_path, CONC))))


def _request(request_id: str) -> Request:
    return new_request(
        "POST",
        "/v1/chat/completions",
        {"authorization": f"Bearer {CONC.secret}", "content-type": "application/json"},
        b'{"model":"gpt-4o","messages":[]}',
        False,
        request_id,
        "",
    )


async def _decide(engine: Engine, request_id: str) -> Decision:
    result = engine.check_fast(_request(request_id))
    return result if result.__class__ is Decision else await result  # type: ignore[misc, return-value]


def test_a_release_during_the_wait_admits_the_waiting_request(tmp_path: Path) -> None:
    asyncio.run(_release_during_the_wait(_engine(tmp_path)))


async def _release_during_the_wait(engine: Engine) -> None:
    assert (await _decide(engine, "r1")).allowed
    waiting = asyncio.ensure_future(_decide(engine, "r2"))
    await asyncio.sleep(decide.SLOT_WAIT / 4)
    assert not waiting.done()  # refused for its slot: it waits
    assert engine.release("r1")
    decision = await asyncio.wait_for(waiting, 1.0)
    assert decision.allowed and decision.release == "r2"
    assert engine.decider.decisions[Reason.CONCURRENCY_LIMITED] == 0


def test_without_a_release_the_refusal_comes_after_the_wait(tmp_path: Path) -> None:
    asyncio.run(_no_release(_engine(tmp_path)))


async def _no_release(engine: Engine) -> None:
    assert (await _decide(engine, "r1")).allowed
    started = time.perf_counter()
    decision = await _decide(engine, "r2")
    waited = time.perf_counter() - started
    assert decision.reason is Reason.CONCURRENCY_LIMITED and decision.status == 429
    assert decide.SLOT_WAIT * 0.9 <= waited < 1.0
    assert engine.decider.decisions[Reason.CONCURRENCY_LIMITED] == 1
    assert engine.release("r1")
    assert (await _decide(engine, "r3")).allowed


def test_the_synchronous_check_never_waits(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    assert engine.check(_request("r1")).allowed
    assert engine.check(_request("r2")).reason is Reason.CONCURRENCY_LIMITED
