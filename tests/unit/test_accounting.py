"""core.accounting: how a response's usage is concluded, whichever transport saw it."""

from __future__ import annotations

from typing import Any

from nexus_authz.core.accounting import ResponseEnd, charge, conclude_usage, needs_exact_count
from nexus_authz.core.model import InFlight
from nexus_authz.core.pricing import PriceTable
from nexus_authz.core.usage import StreamUsage, Usage

RECORD = (
    b'data: {"model":"m","choices":[{"delta":{"content":"hi"}}],'
    b'"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\n'
)
NO_RECORD = b'data: {"model":"m","choices":[{"delta":{"content":"' + b"word " * 400 + b'"}}]}\n\n'


def parsed(body: bytes, **kw: object) -> tuple[StreamUsage, Usage]:
    parser = StreamUsage(content_type="text/event-stream", prompt_tokens_hint=5, **kw)  # type: ignore[arg-type]
    parser.feed(body)
    return parser, parser.finish()


def test_a_complete_response_settles_to_its_usage() -> None:
    parser, usage = parsed(RECORD)
    assert conclude_usage(ResponseEnd(complete=True), parser, usage, 5) == (usage, False)


def test_a_cut_off_response_keeps_its_estimate_unless_the_provider_said() -> None:
    parser, usage = parsed(NO_RECORD)
    concluded, keep = conclude_usage(ResponseEnd(complete=False), parser, usage, 5)
    assert keep and concluded.source == "estimated" and concluded.prompt_tokens == 5
    parser, usage = parsed(RECORD)
    assert conclude_usage(ResponseEnd(complete=False), parser, usage, 5) == (usage, False)


def test_an_unreadable_response_is_the_prompt_hint_and_keeps_its_estimate() -> None:
    assert conclude_usage(ResponseEnd(complete=True, readable=False), None, None, 9) == (
        Usage(prompt_tokens=9, source="estimated"),
        True,
    )
    parser = StreamUsage(content_encoding="br", prompt_tokens_hint=9)
    parser.feed(b"\x00\x01")
    usage, keep = conclude_usage(ResponseEnd(complete=True), parser, parser.finish(), 9)
    assert keep and usage.prompt_tokens == 9


def test_bytes_dropped_unseen_extrapolate_a_counted_completion() -> None:
    parser, usage = parsed(NO_RECORD)
    concluded, _ = conclude_usage(ResponseEnd(complete=True, skipped=parser.bytes_seen), parser, usage, 5)
    assert concluded.completion_tokens == 2 * usage.completion_tokens
    parser, usage = parsed(RECORD)  # a provider record is never extrapolated
    assert conclude_usage(ResponseEnd(complete=True, skipped=10_000), parser, usage, 5)[0] == usage


def test_an_exact_count_is_asked_only_without_a_record_and_only_when_configured() -> None:
    def counter(text: str) -> int:
        return len(text.split())

    parser = StreamUsage(content_type="text/event-stream")
    parser.feed(NO_RECORD)
    assert not needs_exact_count(parser, exact=False, counter=counter, threshold=1)
    assert needs_exact_count(parser, exact=True, counter=counter, threshold=1)
    assert parser.finish().completion_tokens == 400  # counted with `counter`
    parser = StreamUsage(content_type="text/event-stream", window=64)  # the record is read as it arrives
    parser.feed(RECORD)
    assert not needs_exact_count(parser, exact=True, counter=counter, threshold=1)


def test_tiktokens_first_count_runs_off_the_loop_since_it_loads_the_encoding(monkeypatch: Any) -> None:
    """The server no longer loads the encoding at start (~40 MB of RSS a process that never counts
    exactly would carry): the first exact count loads it, so it goes to the worker thread, however short."""
    from nexus_authz.core import tokens

    monkeypatch.setattr(tokens, "_encoding", None)
    parser = StreamUsage(content_type="text/event-stream")
    parser.feed(NO_RECORD)  # far below the worker threshold
    assert needs_exact_count(parser, exact=True, counter=tokens.count_tokens)
    assert parser.finish().completion_tokens > 0 and tokens.encoding_loaded()
    parser = StreamUsage(content_type="text/event-stream")
    parser.feed(NO_RECORD)
    assert not needs_exact_count(parser, exact=True, counter=tokens.count_tokens)  # loaded: on the loop


def test_the_charge_is_under_the_admitted_identity_and_an_error_costs_the_configured_minimum() -> None:
    context = InFlight("key-1", "acme", None, 5)
    usage = Usage(prompt_tokens=10, cached_prompt_tokens=4, completion_tokens=6, reasoning_tokens=2)
    c = charge(
        context,
        usage,
        keep_estimate=True,
        response_model="gpt-x",
        prices=PriceTable([]),
        error_charge_tokens=3,
    )
    assert (c.key_id, c.tenant, c.model, c.tokens, c.reasoning_tokens, c.at_least_reserved) == (
        "key-1",
        "acme",
        "gpt-x",
        16,
        2,
        True,
    )
    error = charge(
        InFlight("key-1", "", "m", 5),
        Usage(prompt_tokens=99, source="none"),
        keep_estimate=False,
        response_model=None,
        prices=None,
        error_charge_tokens=3,
    )
    assert (error.tenant, error.model, error.tokens, error.cost_micro_usd) == ("", "m", 3, 0)
