"""The prompt estimate of a request whose Check did not need one, made at accounting time (issue 16
item 7): the same figure a key with token limits records, for a bounded memory cost."""

from __future__ import annotations

import json

from nexus_authz.core.accounting import charge
from nexus_authz.core.body import request_facts
from nexus_authz.core.config import Price
from nexus_authz.core.model import InFlight, Request
from nexus_authz.core.pricing import PriceTable
from nexus_authz.core.prompt_later import KEEP_BODY_BYTES, deferred, prompt_tokens
from nexus_authz.core.usage import Usage

BODY = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello " * 20}]}).encode()


def _request(body: bytes, **headers: str) -> Request:
    return Request(method="POST", path="/v1/chat/completions", headers=headers, body=body)


def test_a_small_body_is_kept_and_estimated_only_when_asked() -> None:
    prompt, kept = deferred(_request(BODY), False, 0)
    assert (prompt, kept) == (0, BODY)  # nothing computed at Check
    expected = request_facts(BODY, precise=False).prompt_tokens
    assert prompt_tokens(InFlight("k", "", None, 0, kept)) == expected > 0
    assert deferred(_request(BODY), True, 17) == (17, None)  # estimated at Check already


def test_what_is_kept_is_bounded() -> None:
    big = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * KEEP_BODY_BYTES}]})
    prompt, kept = deferred(_request(big.encode()), False, 0)
    assert kept is None and prompt == request_facts(big.encode(), precise=False).prompt_tokens
    assert deferred(
        _request(b"--b\r\n", **{"content-type": "multipart/form-data; boundary=b"}), False, 0
    ) == (
        0,
        None,
    )
    cut = Request(method="POST", path="/v1/chat/completions", headers={}, body=BODY[:20], body_truncated=True)
    assert deferred(cut, False, 0) == (0, None)


def test_an_estimated_usage_is_charged_the_kept_prompt_and_a_reported_one_is_not() -> None:
    context = InFlight("k", "acme", "gpt-4o", 0, BODY)
    prices = PriceTable([("gpt-4o*", Price(2.0, 1.0, 10.0))])
    expected = request_facts(BODY, precise=False).prompt_tokens
    kw = {"keep_estimate": False, "response_model": None, "prices": prices, "error_charge_tokens": 0}
    estimated = charge(context, Usage(completion_tokens=19, source="estimated"), **kw)  # type: ignore[arg-type]
    assert (estimated.prompt_tokens, estimated.completion_tokens) == (expected, 19)
    assert estimated.cost_micro_usd == expected * 2 + 190
    reported = charge(context, Usage(prompt_tokens=0, completion_tokens=19), **kw)  # type: ignore[arg-type]
    assert reported.prompt_tokens == 0  # the provider's own record is never overridden
