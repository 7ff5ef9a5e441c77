"""The policy API's Explain over an in-process grpc.aio server: limits per level, the binding limit, the
dry run of a hypothetical token count, and that nothing is charged.

The budget hierarchy fills group and tenant limits into each key's `limits` / `counter_ids`; here those
are built directly (a LimitSpec with `level` set and a counter id shared by the keys of the tenant/group),
so the real counters are shared and charged by real decisions."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from pathlib import Path

import grpc
import pytest

from nexus_authz._gen.nexus.authz.v1 import policy_pb2 as pb
from nexus_authz.adapters.explain import binding_index
from nexus_authz.core import keys as keys_mod
from nexus_authz.core.limits import LimitSpec, make_limit, new_status
from nexus_authz.core.model import Decision
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from tests.adapters.test_policy_api import NOW, Api, Clock, client_request, run, serving
from tests.adapters.test_transports_x_stores import LIMITED as X_LIMITED
from tests.adapters.test_transports_x_stores import STORES, body, make_engine, redis  # noqa: F401
from tests.helpers import PEPPER, KeySpec, write_config

CONFIG = """
plans:
  team:
    limits:
      - {requests: 100, per: minute}
      - {tokens: 100000, per: day}
      - {usd: 5, per: day}
      - {tokens: 50, per: minute, model: "o3*"}
      - {requests: 1, per: minute, shadow: true}
prices:
  "gpt-4o*": {input: 2.5, output: 10}
  "o3*": {input: 10, output: 40}
reservations:
  default_max_tokens: 200
ledger:
  backend: memory
"""
ALICE = KeySpec("alice", extra={"tenant": "acme", "plan": "team", "models": ["gpt-4o*", "o3*"]})
BOB = KeySpec("bob", extra={"tenant": "acme", "plan": "team"})
SOLO = KeySpec("solo", extra={"tenant": "solo"})
GROUP_REQUESTS = dataclasses.replace(
    make_limit("requests", 3, "minute", name="group-requests"), level="group"
)
TENANT_TOKENS = dataclasses.replace(make_limit("tokens", 2000, "day", name="tenant-tokens"), level="tenant")


def _shared(spec: LimitSpec, owner: str) -> str:
    return f"\x02{spec.level}\x00{owner}\x00{spec.name}"


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    """alice and bob: group ml of tenant acme, sharing a group and a tenant limit (real shared counters)."""
    path = write_config(tmp_path, ALICE, BOB, SOLO, extra=CONFIG)
    engine = Engine.from_settings(load_settings(str(path)), clock=Clock(NOW))
    snapshot = engine.snapshot
    records = []
    for spec in (ALICE, BOB, SOLO):
        record = snapshot.by_id[spec.id]
        if record.tenant == "acme":
            record = dataclasses.replace(
                record,
                group="ml",
                limits=(*record.limits, GROUP_REQUESTS, TENANT_TOKENS),
                counter_ids=(
                    *record.counter_ids,
                    _shared(GROUP_REQUESTS, "acme/ml"),
                    _shared(TENANT_TOKENS, "acme"),
                ),
            )
        records.append((keys_mod.digest(PEPPER.encode(), spec.secret), record))
    engine.snapshot = keys_mod.build_snapshot(
        records,
        pepper=PEPPER.encode(),
        source=snapshot.source,
        version=snapshot.version,
        loaded_at=snapshot.loaded_at,
    )
    return engine


def chat(model: str, max_tokens: int) -> bytes:
    return json.dumps({"model": model, "max_tokens": max_tokens, "messages": []}).encode()


def _state(engine: Engine) -> tuple[object, ...]:
    """Everything Explain must not change: every counter of both keys, decisions, the book."""
    now = engine.clock()
    figures = []
    for key_id in ("alice", "bob"):
        key = engine.snapshot.by_id[key_id]
        statuses = engine.counters.peek(key.counter_ids, key.limits, now)
        figures.append(tuple((s.remaining, s.reset_after) for s in statuses))
    return (tuple(figures), dict(engine.decisions), engine.book.stats(), len(engine.counters))


def _limits(answer: pb.ExplainResponse) -> dict[str, pb.LimitExplanation]:
    return {lim.name: lim for level in answer.levels for lim in level.limits}


def test_explain_after_real_spending(engine: Engine) -> None:
    """Spend part of the tenant's budget through real decisions (two keys), then explain."""
    for key, request_id, used in ((ALICE, "a1", 500), (BOB, "b1", 400)):
        assert engine.check(client_request(key, chat("gpt-4o", 300), request_id=request_id)).allowed
        assert engine.settle(request_id, tokens=used, usd_micros=1000)
    assert engine.check(client_request(BOB, chat("gpt-4o", 100), request_id="b2")).allowed  # in flight
    held = engine.book.entries()
    (bob_reservation,) = [costs for ids, _, costs, *_ in held if ids[0].startswith("bob")]
    bob_tokens = bob_reservation[1]  # the plan's tokens/day window comes second
    assert bob_tokens > 100

    async def body(api: Api) -> None:
        before = _state(engine)
        answer = await api.call("Explain", pb.ExplainRequest(key_id="alice", model="gpt-4o"))
        assert (answer.key_id, answer.tenant, answer.group, answer.model) == ("alice", "acme", "ml", "gpt-4o")
        assert [level.level for level in answer.levels] == ["key", "group", "tenant"]
        assert [lim.name for lim in answer.levels[1].limits] == ["group-requests"]
        limits = _limits(answer)
        tenant = limits["tenant-tokens"]
        assert tenant.level == "tenant" and tenant.kind == pb.LIMIT_KIND_TOKENS
        assert (tenant.limit, tenant.used, tenant.remaining) == (2000, 900 + bob_tokens, 1100 - bob_tokens)
        assert tenant.reserved == bob_tokens  # bob's request in flight holds the shared budget
        assert tenant.reset_after.ToNanoseconds() > 0
        group = limits["group-requests"]
        assert (group.used, group.remaining, group.reserved) == (3, 0, 0)
        own = limits["tokens/day"]
        assert (own.used, own.remaining, own.reserved) == (500, 99500, 0)  # alice's own: bob's not in it
        assert answer.reservations_in_flight == 0  # alice has none; bob has one
        # the typical request: no prompt, the default completion (200); the group has no request left
        assert (answer.prompt_tokens, answer.completion_tokens, answer.total_tokens) == (0, 200, 200)
        assert answer.cost_micro_usd == 2000  # 200 completion tokens at $10 per million
        assert answer.binding == "group-requests" and answer.binding_level == "group"
        assert group.binding and group.would_refuse and group.retry_after.ToNanoseconds() > 0
        assert [lim.name for lim in limits.values() if lim.binding] == ["group-requests"]
        assert not answer.decision.allowed and answer.decision.http_status == 429
        assert "group-requests" in answer.decision.message
        retry = {h.name: h.value for h in answer.decision.response_headers}["retry-after"]
        assert int(retry) == -(-group.retry_after.ToNanoseconds() // 1_000_000_000)
        assert _state(engine) == before

    run(engine, body)
    engine.clock.now += 60  # type: ignore[attr-defined]  # the group's minute drains, the day does not

    async def later(api: Api) -> None:
        before = _state(engine)
        answer = await api.call("Explain", pb.ExplainRequest(key_id="alice", model="gpt-4o"))
        limits = _limits(answer)
        remaining = limits["tenant-tokens"].remaining
        assert remaining == 1100 - bob_tokens and limits["group-requests"].remaining == 3
        # 200 tokens: the group has 3 requests left, the tenant remaining/200 > 3: the group binds
        assert answer.decision.allowed and answer.binding == "group-requests"
        assert limits["group-requests"].headroom == 3.0
        assert limits["tenant-tokens"].headroom == pytest.approx(remaining / 200)
        # a hypothetical request bigger than what the tenant has left: the tenant's limit refuses it
        big = pb.ExplainRequest(
            key_id="alice", model="gpt-4o", prompt_tokens=remaining - 10, completion_tokens=11
        )
        answer = await api.call("Explain", big)
        tenant = _limits(answer)["tenant-tokens"]
        assert answer.total_tokens == remaining + 1 and tenant.cost == remaining + 1
        assert tenant.would_refuse and not tenant.never_fits and tenant.retry_after.ToNanoseconds() > 0
        assert answer.binding == "tenant-tokens" and answer.binding_level == "tenant"
        assert not answer.decision.allowed and answer.decision.http_status == 429
        assert "tenant-tokens" in answer.decision.message
        assert answer.cost_micro_usd == math.ceil((remaining - 10) * 2.5 + 11 * 10)  # gpt-4o's prices
        assert not _limits(answer)["requests/minute"].would_refuse
        # exactly what remains fits
        fits = await api.call(
            "Explain", pb.ExplainRequest(key_id="alice", model="gpt-4o", total_tokens=remaining)
        )
        assert fits.decision.allowed and fits.binding == "tenant-tokens"
        assert _limits(fits)["tenant-tokens"].headroom == 1.0
        # more than the tenant's capacity: never fits
        never = await api.call("Explain", pb.ExplainRequest(key_id="bob", total_tokens=2001))
        assert _limits(never)["tenant-tokens"].never_fits and never.binding == "tenant-tokens"
        assert not _limits(never)["tenant-tokens"].HasField("retry_after")
        assert _state(engine) == before  # nothing charged, reserved or counted

    run(engine, later)
    # and the real request agrees with the dry run: the same one is refused by the tenant's limit
    decision = engine.check(client_request(BOB, chat("gpt-4o", 2000), request_id="b3"))
    assert not decision.allowed and "tenant-tokens" in decision.message


def test_models_shadows_and_prices(engine: Engine) -> None:
    async def body(api: Api) -> None:
        # no model: the per-model window is listed but does not apply; a shadow limit never binds
        answer = await api.call("Explain", pb.ExplainRequest(key_id="alice"))
        limits = _limits(answer)
        assert not limits["tokens/minute@o3*"].applies and limits["tokens/minute@o3*"].cost == 0
        shadow = limits["requests/minute:shadow"]
        assert shadow.applies and shadow.shadow and not shadow.binding
        # o3: the per-model window applies; 60 tokens > its 50: it never fits and binds
        answer = await api.call(
            "Explain",
            pb.ExplainRequest(key_id="alice", model="o3-mini", prompt_tokens=20, completion_tokens=40),
        )
        o3 = _limits(answer)["tokens/minute@o3*"]
        assert o3.applies and o3.cost == 60 and o3.would_refuse and o3.never_fits
        assert answer.binding == "tokens/minute@o3*" and answer.decision.http_status == 429
        # priced at o3's prices: 20 * $10 + 40 * $40 per million
        assert answer.cost_micro_usd == 20 * 10 + 40 * 40 == _limits(answer)["usd/day"].cost
        # a total alone: priced at the dearer rate
        total = await api.call("Explain", pb.ExplainRequest(key_id="alice", model="o3", total_tokens=40))
        assert total.cost_micro_usd == 40 * 40 and total.total_tokens == 40
        # a model the key may not use: the key's own rule refuses, the limits are still explained
        denied = await api.call("Explain", pb.ExplainRequest(key_id="alice", model="claude-3"))
        assert denied.decision.reason == "model_not_allowed" and denied.decision.http_status == 403
        assert _limits(denied)["tokens/day"].applies
        # a key without limits: nothing binds, the request is allowed
        solo = await api.call("Explain", pb.ExplainRequest(key_id="solo", total_tokens=10**9))
        assert not solo.levels and not solo.binding and solo.decision.allowed

    run(engine, body)


def test_bad_questions(engine: Engine) -> None:
    async def body(api: Api) -> None:
        cases = [
            (pb.ExplainRequest(), grpc.StatusCode.INVALID_ARGUMENT, "key_id is required"),
            (pb.ExplainRequest(key_id="nobody"), grpc.StatusCode.NOT_FOUND, "no key with id"),
            (
                pb.ExplainRequest(key_id="alice", total_tokens=5, prompt_tokens=1),
                grpc.StatusCode.INVALID_ARGUMENT,
                "total_tokens alone",
            ),
            (
                pb.ExplainRequest(key_id="alice", prompt_tokens=-1),
                grpc.StatusCode.INVALID_ARGUMENT,
                "prompt_tokens",
            ),
            (
                pb.ExplainRequest(key_id="alice", completion_tokens=10**16),
                grpc.StatusCode.INVALID_ARGUMENT,
                "completion_tokens",
            ),
        ]
        for request, code, text in cases:
            err = await api.error("Explain", request)
            assert err.code() == code and text in (err.details() or ""), (request, err.details())
        err = await api.error("Explain", pb.ExplainRequest(key_id="alice"), token=None)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED

    run(engine, body)


def test_binding_ranks() -> None:
    """The definition, on plain numbers: a refusal outranks any headroom; the longest retry-after among
    refusals; else the least headroom; ties: the longer reset, then key before group before tenant."""
    key = make_limit("requests", 10, "minute", name="k")
    group = dataclasses.replace(make_limit("requests", 10, "minute", name="g"), level="group")
    tenant = dataclasses.replace(make_limit("tokens", 1000, "day", name="t"), level="tenant")
    shadow = make_limit("requests", 1, "minute", name="s", shadow=True)
    specs = (key, group, tenant, shadow)

    def verdict(spec: LimitSpec, allowed: bool, retry: float = 0.0) -> object:
        return new_status(spec, 0, 0.0, retry, allowed)

    ok = [verdict(s, True) for s in specs]
    # headroom: k 5/1, g 2/1, t 300/100 = 3: the group binds
    assert binding_index(specs, [5, 2, 300, 0], [1, 1, 1, 1], [1, 1, 100, 1], ok) == 1  # type: ignore[arg-type]
    # a tie at 2: the longer reset wins, then the level order
    assert binding_index(specs, [5, 2, 200, 0], [1, 1, 9, 1], [1, 1, 100, 1], ok) == 2  # type: ignore[arg-type]
    assert binding_index(specs, [2, 2, 200, 0], [1, 1, 1, 1], [1, 1, 100, 1], ok) == 0  # type: ignore[arg-type]
    # refusals: the longest retry-after, whatever the headroom of the others; a refusing shadow is ignored
    refused = [
        verdict(key, False, 3.0),
        verdict(group, True),
        verdict(tenant, False, 7.0),
        verdict(shadow, False, 60),
    ]
    assert binding_index(specs, [0, 1, 5, 0], [1, 1, 1, 1], [1, 1, 100, 1], refused) == 2  # type: ignore[arg-type]
    # a limit that does not apply (None) or costs nothing never binds; nothing left: None
    assert binding_index(specs, [0, 1, 5, 0], [1, 1, 1, 1], [1, 1, 0, 1], [None, None, ok[2], ok[3]]) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("store", STORES)
def test_explain_on_every_store(store: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The same answers from the memory store and Redis (exact and batched): its peek is awaited."""
    redis_server = request.getfixturevalue("redis") if store != "memory" else None
    engine = make_engine(tmp_path / store, store, redis_server)
    question = pb.ExplainRequest(key_id="limited", model="gpt-4o")

    async def check(request_id: str) -> bool:
        decision = engine.check_fast(client_request(X_LIMITED, body("gpt-4o"), request_id=request_id))
        return (decision if isinstance(decision, Decision) else await decision).allowed

    async def main() -> None:
        if engine.remote is not None:
            await engine.remote.start()
        try:
            async with serving(engine) as api:
                assert await check("e1")
                answer = await api.call("Explain", question)
                (window,) = answer.levels[0].limits
                assert (window.used, window.remaining, window.binding, window.headroom) == (1, 1, True, 1.0)
                assert answer.decision.allowed and answer.binding == "requests/minute"
                again = await api.call("Explain", question)  # the explain before charged nothing
                assert again.levels[0].limits[0].used == 1
                assert await check("e2")
                answer = await api.call("Explain", question)
                (window,) = answer.levels[0].limits
                assert (window.used, window.remaining, window.would_refuse) == (2, 0, True)
                assert answer.decision.http_status == 429 and window.retry_after.ToNanoseconds() > 0
        finally:
            if engine.remote is not None:
                await engine.remote.close()

    asyncio.run(main())
