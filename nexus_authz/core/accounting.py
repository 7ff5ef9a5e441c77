"""How a response's usage is concluded: one pure path for every accounting transport.

The adapters that see responses (Envoy's access log service, ext_proc; anything later) only translate
their wire into a `ResponseEnd` (how the response ended, what was seen of it) and feed the body to the
usage parser (core.usage). From there everything is decided here:

- `conclude_usage`: the usage to account and whether the reserved estimate stays charged: a response
  that was cut off or only partly seen keeps the larger of its estimate and what was counted unless
  the provider's own record was read; an unreadable one (an unsupported encoding, a body over a
  transport's cap) keeps its estimate; bytes a transport dropped unseen extrapolate a counted
  completion.
- `charge`: what that usage charges, under the identity nexus-authz admitted the request with (its
  reservation book's record, never an identity a log entry carries): the tokens and cost to settle
  the reservation with, and the row for the ledger.
- `needs_exact_count`: whether the completion must be counted exactly (the caller runs that count off
  its event loop: one place, `Engine.account_response`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nexus_authz.core.model import InFlight
from nexus_authz.core.pricing import PriceTable
from nexus_authz.core.prompt_later import prompt_tokens
from nexus_authz.core.tokens import EXECUTOR_THRESHOLD_CHARS, count_tokens, encoding_loaded
from nexus_authz.core.usage import StreamUsage, Usage

__all__ = [
    "Charge",
    "ChargeFields",
    "ResponseEnd",
    "charge",
    "charge_fields",
    "count_tokens_used",
    "conclude_usage",
    "ledger_source",
    "needs_exact_count",
]


@dataclass(frozen=True, slots=True)
class ResponseEnd:
    """What the wire said about a response's end.

    `complete`: the response ended normally and its body was seen whole (or its usage record was);
    False when it was cut off (the client went away, the upstream failed) or only part of it reached
    nexus-authz (a transport kept only its tail). `readable`: False when nothing of the body could be
    read at all (compressed beyond a transport's cap): the estimate stays. `skipped`: body bytes the
    transport dropped unseen; a completion counted from the rest is extrapolated over them.
    """

    complete: bool
    readable: bool = True
    skipped: int = 0


def needs_exact_count(
    parser: StreamUsage,
    *,
    exact: bool,
    counter: Callable[[str], int],
    threshold: int = EXECUTOR_THRESHOLD_CHARS,
) -> bool:
    """With `exact` (accounting.exact_cutoff_count), a response without a usage record has its
    completion counted with `counter` at finish(); True when that count is long enough to run off the
    event loop, or is tiktoken's first (it loads the encoding: ~0.25 s, ~40 MB, not paid by processes
    that never count exactly)."""
    if not exact:
        return False
    if counter is count_tokens and not encoding_loaded():
        threshold = 0
    return parser.count_exactly(counter, threshold)


def conclude_usage(
    end: ResponseEnd, parser: StreamUsage | None, usage: Usage | None, prompt_tokens_hint: int
) -> tuple[Usage, bool]:
    """(usage, keep_estimate) for the parser's result (`usage`: its finish()).

    keep_estimate: the usage is incomplete or could not be read (an undecodable encoding, a body a
    transport could not keep, a response that did not end normally without a usage record): the
    reserved estimate stays charged (SECURITY.md: a client that drops its connection keeps its
    estimate charged).
    """
    if parser is None or usage is None or not end.readable:
        return Usage(prompt_tokens=prompt_tokens_hint, source="estimated"), True
    keep_estimate = parser.undecodable or (not end.complete and usage.source != "provider")
    if end.skipped and usage.source == "estimated" and parser.bytes_seen:
        extra = round(usage.completion_tokens * end.skipped / parser.bytes_seen)
        usage = Usage(
            prompt_tokens=usage.prompt_tokens,
            cached_prompt_tokens=usage.cached_prompt_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            completion_tokens=usage.completion_tokens + extra,
            reasoning_tokens=usage.reasoning_tokens,
            source="estimated",
        )
    return usage, keep_estimate


@dataclass(frozen=True, slots=True)
class Charge:
    """What one response's usage charges, under the identity it was admitted with."""

    key_id: str
    tenant: str
    model: str  # the ledger's label: the admitted model, else the response's, else "unknown"
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost_micro_usd: int
    at_least_reserved: bool  # settle with the larger of the reservation and this usage
    source: str = "reported"  # where the usage came from (ledger_source)
    price_rule: str = ""  # the price glob that priced it, "unpriced:<policy>", or "" (no price table)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


ChargeFields = tuple[str, str, str, int, int, int, int, int, bool, str, str]
"""`Charge`'s fields in order, as a plain tuple (`charge_fields`: the accounting hot path)."""


def charge(
    context: InFlight,
    usage: Usage,
    *,
    keep_estimate: bool,
    response_model: str | None,
    prices: PriceTable | None,
    error_charge_tokens: int,
    unread: bool = False,
) -> Charge:
    """The charge of `usage` for the request admitted as `context`. An error response (source "none")
    is charged `error_charge_tokens` (accounting.error_charge_tokens: 0 by default, the provider bills
    nothing). `unread`: nothing of the response could be read (the usage is the Check's estimate)."""
    return Charge(
        *charge_fields(context, usage, keep_estimate, response_model, prices, error_charge_tokens, unread)
    )


def charge_fields(
    context: InFlight,
    usage: Usage,
    keep_estimate: bool,
    response_model: str | None,
    prices: PriceTable | None,
    error_charge_tokens: int,
    unread: bool,
) -> ChargeFields:
    """`charge`, as the tuple of `Charge`'s fields (no object built: the engine's per-response path)."""
    model = context.model or response_model
    source = usage.source
    if source == "none":
        prompt, cached, completion = error_charge_tokens, 0, 0
        ledger = "none"
    else:
        prompt, cached, completion = usage.prompt_tokens, usage.cached_prompt_tokens, usage.completion_tokens
        if source == "provider":
            ledger = "reported"
        else:
            ledger = "estimated" if unread else "counted"
            if source == "estimated" and not prompt and context.body is not None:
                prompt = prompt_tokens(context)  # the Check did not estimate it (no token limit needed it)
    cost, rule = prices.charge(model, prompt, cached, completion) if prices else (0, "")
    return (
        context.key_id,
        context.tenant or "",
        model or "unknown",
        prompt,
        cached,
        completion,
        usage.reasoning_tokens,
        cost,
        keep_estimate,
        ledger,
        rule,
    )


def ledger_source(usage: Usage, *, unread: bool) -> str:
    """Where a ledger row's usage came from: `reported` (the provider's usage record), `counted` (the
    completion counted from the response's content, the prompt estimated), `estimated` (nothing of the
    response was readable: the Check's estimate), `none` (an error response without usage)."""
    if usage.source == "provider":
        return "reported"
    if usage.source == "none":
        return "none"
    return "estimated" if unread else "counted"


_TOKEN_KEYS: dict[str, tuple[tuple[str, str], tuple[str, str], tuple[str, str]]] = {}
_TOKEN_KEYS_MAX = 4096


def count_tokens_used(
    counts: dict[tuple[str, str], int], model: str, prompt: int, cached: int, completion: int
) -> None:
    """Add a response's tokens to the (model, kind) counters for metrics (kinds prompt, cached_prompt,
    completion; a zero adds nothing). The keys of a model are built once (a bounded cache)."""
    keys = _TOKEN_KEYS.get(model)
    if keys is None:
        if len(_TOKEN_KEYS) >= _TOKEN_KEYS_MAX:
            _TOKEN_KEYS.clear()
        keys = _TOKEN_KEYS[model] = ((model, "prompt"), (model, "cached_prompt"), (model, "completion"))
    if prompt:
        counts[keys[0]] = counts.get(keys[0], 0) + prompt
    if cached:
        counts[keys[1]] = counts.get(keys[1], 0) + cached
    if completion:
        counts[keys[2]] = counts.get(keys[2], 0) + completion
