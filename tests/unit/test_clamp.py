"""Clamping (core/clamp.py): a budget a request does not fit admits it with a lowered completion cap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nexus_authz.core.clamp import apply, rewrite_for
from nexus_authz.core.config import parse_limits
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.model import Decision, Reason, Request
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from tests.helpers import KeySpec, write_config

LIMIT = 1000
TOKENS = KeySpec("tok", extra={"limits": [{"tokens": LIMIT, "per": "day", "clamp": {"min_tokens": 16}}]})
PLAIN = KeySpec("plain", extra={"limits": [{"tokens": LIMIT, "per": "day"}]})
USD = KeySpec("usd", extra={"limits": [{"usd": 0.01, "per": "day", "clamp": True}]})
PRICES = """
prices:
  "gpt-4o*": {input: 2.5, output: 10}
"""


def engine_for(tmp_path: Path) -> Engine:
    path = write_config(tmp_path, TOKENS, PLAIN, USD, extra=PRICES)
    engine = Engine.from_settings(load_settings(str(path)), clock=lambda: 1_000_000.0)
    return engine


def request(
    key: KeySpec,
    body: dict[str, object] | bytes,
    path: str = "/v1/chat/completions",
    *,
    rid: str = "",
    rewriter: str | None = "lua",
) -> Request:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"authorization": f"Bearer {key.secret}", "content-type": "application/json"}
    if rewriter is not None:
        headers["x-nexus-rewrite"] = rewriter
    return Request("POST", path, headers, raw, request_id=rid)


def chat(cap: int | None = 800, **extra: object) -> dict[str, object]:
    body: dict[str, object] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi there"}]}
    if cap is not None:
        body["max_tokens"] = cap
    body.update(extra)
    return body


def decide(engine: Engine, req: Request) -> Decision:
    decision = engine.check_fast(req)
    assert isinstance(decision, Decision)
    return decision


def sent_cap(req: Request, decision: Decision, field: str = "max_tokens") -> object:
    """The cap the upstream receives: the body after the proxy applied the decision's splices."""
    body = apply(req.body, decision.clamp) if decision.clamp else req.body
    return json.loads(body).get(field)


# -- configuration -------------------------------------------------------------------------------------


def test_clamp_is_configured_per_tokens_or_usd_limit() -> None:
    specs = parse_limits(
        [{"tokens": 10, "per": "day", "clamp": True}, {"usd": 1, "per": "day", "clamp": {"min_tokens": 4}}],
        source="n.yaml:3",
        field="limits",
    )
    assert [s.clamp for s in specs] == [16, 4]
    for bad, message in (
        ({"requests": 1, "per": "minute", "clamp": True}, "tokens and usd limits only"),
        ({"concurrent": 1, "clamp": True}, "tokens and usd limits only"),
        ({"tokens": 1, "per": "day", "clamp": {"min": 1}}, "unknown field 'min'"),
        ({"tokens": 1, "per": "day", "clamp": {"min_tokens": 0}}, "positive integer"),
        ({"tokens": 1, "per": "day", "clamp": "yes"}, "expected true, false"),
    ):
        with pytest.raises(ConfigError, match=message) as info:
            parse_limits([bad], source="n.yaml:3", field="limits")
        assert "limits[0].clamp" in str(info.value)


# -- the body rewrite ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/v1/chat/completions", {"model": "m", "max_tokens": 900}, {"max_tokens": 50}),
        ("/v1/chat/completions", {"model": "m", "max_completion_tokens": 900}, {"max_completion_tokens": 50}),
        (
            "/v1/chat/completions",
            {"model": "m", "max_tokens": 900, "max_completion_tokens": 30},
            {"max_tokens": 50, "max_completion_tokens": 30},
        ),
        ("/v1/chat/completions", {"model": "m"}, {"max_completion_tokens": 50}),
        ("/v1/chat/completions", {"model": "m", "max_tokens": None}, {"max_tokens": 50}),
        (
            "/openai/deployments/x/chat/completions?api-version=1",
            {"model": "m"},
            {"max_completion_tokens": 50},
        ),
        ("/v1/completions", {"model": "m", "max_tokens": 900.0}, {"max_tokens": 50}),
        ("/v1/responses", {"model": "m", "max_output_tokens": 900}, {"max_output_tokens": 50}),
        ("/v1/responses", {"model": "m", "input": "x"}, {"max_output_tokens": 50}),
        ("/v1/messages", {"model": "m", "max_tokens": 900, "messages": []}, {"max_tokens": 50}),
    ],
)
def test_the_rewrite_lowers_the_field_the_api_honours(
    path: str, body: dict[str, object], expected: dict[str, object]
) -> None:
    raw = json.dumps(body, indent=1).encode()  # whitespace around colons: offsets, not a re-serialisation
    rewrite = rewrite_for(Request("POST", path, {}, raw), 50)
    assert rewrite
    out = json.loads(apply(raw, rewrite))
    assert out == {**body, **expected}


def test_a_large_body_is_rewritten_in_place() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 40000}], "max_tokens": 4000}
    raw = json.dumps(body).encode()
    out = apply(raw, rewrite_for(Request("POST", "/v1/chat/completions", {}, raw), 7) or "")
    assert json.loads(out) == {**body, "max_tokens": 7}
    assert out.replace(b'"max_tokens": 7', b'"max_tokens": 4000') == raw  # every other byte as sent


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/v1/chat/completions", b'{"model":"m","max_tokens":900,"max_tokens":5}'),  # duplicate key
        ("/v1/chat/completions", b'{"model":"m","max_tok\\u0065ns":900}'),  # spelled with an escape
        ("/v1/chat/completions", b'{"model":"m","max_tokens":"900"}'),  # not a number
        ("/v1/chat/completions", b'[{"model":"m"}]'),  # not an object
        ("/v1/embeddings", b'{"model":"m","input":"x"}'),  # an API without a completion cap
        ("/v1/chat/completions", b'{"model":"m","max_tokens":900} {}'),  # trailing data
    ],
)
def test_a_body_that_cannot_be_rewritten_safely_is_not(path: str, raw: bytes) -> None:
    assert rewrite_for(Request("POST", path, {}, raw), 50) is None


def test_apply_refuses_a_body_of_another_length() -> None:
    raw = b'{"model":"m","max_tokens":900}'
    rewrite = rewrite_for(Request("POST", "/v1/chat/completions", {}, raw), 5)
    assert rewrite is not None
    with pytest.raises(ValueError):
        apply(raw + b" ", rewrite)


# -- the decision --------------------------------------------------------------------------------------


def test_a_request_that_does_not_fit_is_admitted_with_the_cap_that_does(tmp_path: Path) -> None:
    engine = engine_for(tmp_path)
    first = request(TOKENS, chat(800), rid="r1")
    assert decide(engine, first).allowed
    second = request(TOKENS, chat(800), rid="r2")
    decision = decide(engine, second)
    assert decision.allowed and decision.reason is Reason.OK
    prompt = engine.prompt_hint("r2")
    cap = sent_cap(second, decision)
    assert isinstance(cap, int) and 16 <= cap < 800
    # the reservation is the clamped one: exactly what remained, so nothing more fits
    assert (prompt + 800) + (prompt + cap) == LIMIT
    third = decide(engine, request(TOKENS, chat(800), rid="r3"))
    assert not third.allowed and third.status == 429


def test_below_the_minimum_it_is_refused(tmp_path: Path) -> None:
    engine = engine_for(tmp_path)
    probe = request(TOKENS, chat(10), rid="p")
    assert decide(engine, probe).allowed
    prompt = engine.prompt_hint("p")
    # leave room for the prompt and 15 completion tokens: one short of min_tokens
    filler = LIMIT - (prompt + 10) - (prompt + 15) - prompt
    assert decide(engine, request(TOKENS, chat(filler), rid="f")).allowed
    refused = decide(engine, request(TOKENS, chat(800), rid="x"))
    assert not refused.allowed and not refused.clamp


def test_without_a_rewriting_proxy_or_on_a_limit_without_clamp_it_is_refused(tmp_path: Path) -> None:
    engine = engine_for(tmp_path)
    assert decide(engine, request(TOKENS, chat(800), rid="a")).allowed
    # nginx (or an Envoy config without the Lua filter): the cap could not bind, so no admission
    assert not decide(engine, request(TOKENS, chat(800), rid="b", rewriter=None)).allowed
    assert not decide(engine, request(TOKENS, chat(800), rid="c", rewriter="client-says-so")).allowed
    assert decide(engine, request(PLAIN, chat(800), rid="d")).allowed
    assert not decide(engine, request(PLAIN, chat(800), rid="e")).allowed  # no clamp on that limit


def test_a_usd_budget_clamps_at_the_models_completion_price(tmp_path: Path) -> None:
    engine = engine_for(tmp_path)  # $0.01 = 10,000 micro-USD; gpt-4o: 2.5 in, 10 out per token
    req = request(USD, chat(4000), rid="u1")  # 4,000 output tokens would cost 40,000 micro-USD
    decision = decide(engine, req)
    assert decision.allowed
    prompt = engine.prompt_hint("u1")
    cap = sent_cap(req, decision)
    assert isinstance(cap, int)
    spent = -(-(prompt * 25 + cap * 100) // 10)  # ceil(prompt*2.5 + cap*10)
    assert spent <= 10_000 < -(-(prompt * 25 + (cap + 1) * 100) // 10)  # the largest cap that fits
    assert not decide(engine, request(USD, chat(4000), rid="u2")).allowed


def test_an_uncapped_request_on_a_clamping_key_gets_its_reserved_default(tmp_path: Path) -> None:
    engine = engine_for(tmp_path)
    req = request(TOKENS, chat(None), rid="d1")
    decision = decide(engine, req)  # the default (4096) does not fit 1000: clamped
    assert decision.allowed
    assert isinstance(sent_cap(req, decision, "max_completion_tokens"), int)
    # a budget that fits the default: admitted with the default written, so that it binds too
    path = write_config(tmp_path, TOKENS, extra="reservations:\n  default_max_tokens: 100\n")
    engine = Engine.from_settings(load_settings(str(path)), clock=lambda: 1_000_000.0)
    small = request(TOKENS, {"model": "gpt-4o", "input": "hi"}, path="/v1/responses", rid="d2")
    decision = decide(engine, small)
    assert decision.allowed and sent_cap(small, decision, "max_output_tokens") == 100
    # a capped request that fits is untouched (no rewrite, no cost)
    assert decide(engine, request(TOKENS, chat(50), rid="d3")).clamp == ""
    # a proxy that cannot rewrite (nginx): admitted as before, the default not written
    assert decide(engine, request(TOKENS, chat(None), rid="d4", rewriter=None)).clamp == ""


def test_settled_spend_never_exceeds_the_budget_with_clamping(tmp_path: Path) -> None:
    """The overshoot bound of a tokens limit with clamping (memory store, exact): 0 when the usage is
    at most the reservation's prompt estimate plus the cap the upstream received."""
    engine = engine_for(tmp_path)
    spent = 0
    admitted = clamped = 0
    for i in range(40):
        req = request(TOKENS, chat(280), rid=f"s{i}")
        decision = decide(engine, req)
        if not decision.allowed:
            continue
        admitted += 1
        clamped += bool(decision.clamp)
        cap = sent_cap(req, decision)
        assert isinstance(cap, int)
        usage = engine.prompt_hint(f"s{i}") + cap  # the upstream used all it was allowed
        assert engine.settle(f"s{i}", tokens=usage, usd_micros=None)
        spent += usage
    assert admitted == 4 and clamped == 1 and spent <= LIMIT
    assert LIMIT - spent < 16 + 2 * engine.prompt_hint("s0")  # and the budget was used up to the minimum


def test_without_clamping_an_uncapped_completion_overshoots_by_what_it_exceeds(tmp_path: Path) -> None:
    """The bound without clamping: a request that sets no cap reserves default_max_tokens, and the
    upstream may generate more; the excess (and a prompt underestimate) is charged at settle."""
    path = write_config(tmp_path, KeySpec("big", extra={"limits": [{"tokens": 5000, "per": "day"}]}))
    engine = Engine.from_settings(load_settings(str(path)), clock=lambda: 1_000_000.0)
    big = KeySpec("big")
    req = request(big, chat(None), rid="o1")
    decision = decide(engine, req)
    assert decision.allowed and decision.clamp == ""  # no clamping: the body goes as sent
    reserved = engine.prompt_hint("o1") + engine.policy.default_max_tokens
    assert engine.settle("o1", tokens=reserved + 700, usd_micros=None)  # 700 more than reserved
    statuses = engine.decider.store.peek_nowait(
        decision.key.counter_ids,
        decision.key.limits,
        1_000_000.0,  # type: ignore[union-attr]
    )
    assert statuses is not None and statuses[0].remaining == 5000 - reserved - 700
