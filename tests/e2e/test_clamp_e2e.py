"""Clamping through the real Envoy (HTTP and gRPC ext_authz) with the OpenAI SDK: a request that does not
fit its token budget is admitted with the completion cap lowered to what fits, the Lua filter writes it
into the body (content-length right), the upstream honours it, and the settled spend stays within the
budget. Attacks: the metadata header sent by the client, a duplicate field, a body cut by Envoy."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.stack import Stack
from tests.helpers import KeySpec

BUDGET = 30
CAPPED = KeySpec("capped", extra={"limits": [{"tokens": BUDGET, "per": "day", "clamp": {"min_tokens": 2}}]})
UNCAPPED = KeySpec(
    "uncapped", extra={"limits": [{"tokens": BUDGET, "per": "day", "clamp": {"min_tokens": 2}}]}
)
ROOMY = KeySpec("roomy", extra={"limits": [{"tokens": 100000, "per": "day", "clamp": True}]})
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(params=["http", "grpc"], scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    workdir = Path(tempfile.mkdtemp(prefix="nx-clamp-"))
    s = Stack(workdir=workdir, mode=request.param, keys=(CAPPED, UNCAPPED, ROOMY))
    try:
        s.start()
        yield s
    finally:
        s.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _upstream(stack: Stack) -> list[dict[str, Any]]:
    assert stack.mock is not None
    return stack.mock.requests()


def _last_body(stack: Stack) -> tuple[dict[str, Any], dict[str, str]]:
    seen = _upstream(stack)[-1]
    assert int(seen["headers"]["content-length"]) == len(seen["body"].encode())
    assert not any(name.lower().startswith("x-nexus-clamp") for name in seen["headers"])
    return json.loads(seen["body"]), seen["headers"]


def test_the_upstream_receives_the_lowered_cap_and_spend_stays_within_the_budget(stack: Stack) -> None:
    client = openai.OpenAI(api_key=CAPPED.secret, base_url=stack.gateway + "/v1", max_retries=0)
    # ~22 tokens of prompt estimate + 100 completion do not fit 30: admitted with the cap that does
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=100)  # type: ignore[arg-type]
    body, _ = _last_body(stack)
    cap = body["max_tokens"]
    assert 2 <= cap < 100 and body["messages"] == HI
    assert completion.usage is not None and completion.usage.completion_tokens == cap  # it bound upstream
    spent = completion.usage.total_tokens
    refused = 0
    for _ in range(4):  # the rest of the budget, then 429s
        time.sleep(0.4)  # the access log settles the first request's usage (batched every 0.2 s)
        try:
            more = client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=100)  # type: ignore[arg-type]
        except openai.RateLimitError:
            refused += 1
            continue
        assert more.usage is not None and more.usage.completion_tokens <= _last_body(stack)[0]["max_tokens"]
        spent += more.usage.total_tokens
    assert refused >= 1 and spent <= BUDGET


def test_a_body_without_a_cap_gets_max_completion_tokens(stack: Stack) -> None:
    client = openai.OpenAI(api_key=UNCAPPED.secret, base_url=stack.gateway + "/v1", max_retries=0)
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=HI)  # type: ignore[arg-type]
    body, _ = _last_body(stack)
    assert "max_tokens" not in body and 2 <= body["max_completion_tokens"] < BUDGET
    assert (
        completion.usage is not None and completion.usage.completion_tokens == body["max_completion_tokens"]
    )
    # a roomy budget: the reserved default is written, so the completion is bounded by its reservation
    roomy = openai.OpenAI(api_key=ROOMY.secret, base_url=stack.gateway + "/v1", max_retries=0)
    roomy.responses.create(model="gpt-4o-mini", input="hi")
    body, _ = _last_body(stack)
    assert body["max_output_tokens"] == 4096


def test_a_tenant_cannot_steer_the_rewrite(stack: Stack) -> None:
    before = len(_upstream(stack))
    raw = json.dumps({"model": "gpt-4o-mini", "messages": HI, "max_tokens": 10}).encode()
    # the metadata and capability headers sent by the client are dropped before ext_authz
    resp = stack.post(
        "/v1/chat/completions",
        raw,
        key=ROOMY.secret,
        x_nexus_clamp=f"{len(raw)};0:1:[",
        x_nexus_rewrite="lua",
    )
    assert resp.status == 200, resp.body
    body, headers = _last_body(stack)
    assert body["max_tokens"] == 10 and not any(h.lower().startswith("x-nexus-rewrite") for h in headers)
    # the field twice: refused (which one the upstream would keep is not ours to guess), never forwarded
    twice = (
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"max_tokens":900}'
    )
    assert stack.post("/v1/chat/completions", twice, key=CAPPED.secret).status == 400
    # a body Envoy cuts (over ext_authz's 256 KiB): never clamped (its end is unseen), refused
    huge = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 300_000}], "max_tokens": 5}
    assert stack.post("/v1/chat/completions", huge, key=CAPPED.secret).status in (413, 429)
    assert len(_upstream(stack)) == before + 1
