"""Clamping through the decision driver on the real counter stores (memory, Redis exact, Redis batched):
the overshoot bounds of docs/limits.md ("Overshoot, bounded")."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from nexus_authz.core.clamp import apply
from nexus_authz.core.model import Decision, Request
from nexus_authz.decide import Decider
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from nexus_authz.stores.base import LocalCounters
from nexus_authz.stores.memory import MemoryCounterStore
from tests.helpers import KeySpec, write_config
from tests.stores.conftest import RedisServer, open_store, redis_settings, unique_prefix

LIMIT = 3000
NOW = 1_000_000.0
KEY = KeySpec("clamped", extra={"limits": [{"tokens": LIMIT, "per": "day", "clamp": {"min_tokens": 1}}]})


def _engine(tmp_path: Path) -> Engine:
    return Engine.from_settings(load_settings(str(write_config(tmp_path, KEY))), clock=lambda: NOW)


def _request(i: int) -> Request:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 170}
    headers = {"authorization": f"Bearer {KEY.secret}", "x-nexus-rewrite": "lua"}
    return Request("POST", "/v1/chat/completions", headers, json.dumps(body).encode(), request_id=f"r{i}")


async def _offer(decider: Decider, engine: Engine, n: int, start: int = 0) -> int:
    """n concurrent checks; each admitted one settles with all the tokens it was allowed (the prompt
    estimate plus the cap the upstream received). Returns the tokens settled."""

    async def one(i: int) -> int:
        req = _request(i)
        decision = decider.check(engine.policy, engine.snapshot, req)
        if decision.__class__ is not Decision:
            decision = await decision  # type: ignore[misc]
        assert isinstance(decision, Decision)
        if not decision.allowed:
            return 0
        body = apply(req.body, decision.clamp) if decision.clamp else req.body
        return _prompt(engine, req) + int(json.loads(body)["max_tokens"])

    return sum(await asyncio.gather(*(one(start + i) for i in range(n))))


def _prompt(engine: Engine, request: Request) -> int:
    admission = engine.policy.admit(request, engine.snapshot, NOW)
    return admission.prompt_tokens  # type: ignore[union-attr]


def test_memory_and_exact_redis_never_reserve_past_the_budget(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Exact stores (memory, Redis exact): 50 concurrent requests of ~190 tokens on a 3,000-token budget:
    the tokens the admitted requests may use (prompt estimate + the cap the upstream receives) add up to
    at most the budget, and clamping fills it (the last one admitted with what remained)."""
    engine = _engine(tmp_path)

    async def main() -> list[int]:
        memory = Decider(LocalCounters(MemoryCounterStore()), clock=lambda: NOW)
        exact = open_store(redis_settings(redis_server, mode="exact"))
        await exact.start()
        try:
            return [
                await _offer(memory, engine, 50),
                await _offer(Decider(exact, clock=lambda: NOW), engine, 50),
            ]
        finally:
            await exact.close()

    for used in asyncio.run(main()):
        assert LIMIT - 5 <= used <= LIMIT  # overshoot 0; the remainder is under one prompt


def test_batched_replicas_overshoot_at_most_the_other_replicas_share(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Batched (two replicas that have not flushed): each clamps against its own view, so together they
    may reserve up to N x the budget (the documented (N-1) x min(L, ...) term), never more; one replica
    alone is exact."""
    engine = _engine(tmp_path)

    async def main() -> tuple[int, int]:
        prefix = unique_prefix("clamp")
        settings = redis_settings(redis_server, mode="batched", key_prefix=prefix, flush_interval=60.0)
        a, b = open_store(settings), open_store(settings)
        for store in (a, b):
            await store._link.start()  # type: ignore[union-attr]  # no ticker: nothing flushes
        try:
            one = await _offer(Decider(a, clock=lambda: NOW), engine, 50)
            both = one + await _offer(Decider(b, clock=lambda: NOW), engine, 50, start=100)
            return one, both
        finally:
            await a.close()
            await b.close()

    one, both = asyncio.run(main())
    assert LIMIT - 5 <= one <= LIMIT
    assert both <= 2 * LIMIT and both > LIMIT  # the bound is reached: replicas do not see each other
