"""The prompt estimate of an admitted request whose Check did not need one (issue 16 item 7).

A key with token or USD windows has its request's prompt estimated at Check (its reservation needs it);
any other key's Check does not read the body for it, so it costs nothing extra. But when that request's
response carries no usage record (a stream without `include_usage`, a response cut off), the ledger
still needs a prompt count: the same estimate a limited key's request gets, not 0.

So when accounting is on, the Check keeps what the estimate needs with the request's reservation-book
record (`InFlight.body`, a reference to the body it already holds, no copy) and the estimate is made at
accounting time, only for a response whose usage is estimated. Bounded: a body over KEEP_BODY_BYTES is
estimated at Check instead (rare, and the estimate of a large body is a small part of its cost), so the
book holds at most KEEP_BODY_BYTES per request in flight.
"""

from __future__ import annotations

from typing import Final

from nexus_authz.core.body import request_facts
from nexus_authz.core.model import InFlight, Request
from nexus_authz.core.multipart import is_multipart

__all__ = ["KEEP_BODY_BYTES", "deferred", "deferred_body", "prompt_tokens"]

KEEP_BODY_BYTES: Final = 8 << 10  # 100,000 requests in flight (the book's bound) hold at most ~800 MB


def deferred(request: Request, needs_facts: bool, estimated: int) -> tuple[int, bytes | None]:
    """(the prompt estimate to record now, the body to estimate it from later) for a tracked request.

    `needs_facts`: the Check estimated the prompt already (`estimated`): nothing to keep. A multipart
    upload or a body the proxy cut keeps nothing either (a limited key's Check estimates no prompt for
    the first; the second's prompt is not all there)."""
    body = request.body
    if needs_facts or not body or request.body_truncated:
        return estimated, None
    return deferred_body(body, request.headers.get("content-type", ""), estimated)


def deferred_body(body: bytes, content_type: str, estimated: int) -> tuple[int, bytes | None]:
    """`deferred` for a whole non-empty body whose prompt the Check did not estimate."""
    if is_multipart(content_type):
        return estimated, None
    if len(body) <= KEEP_BODY_BYTES:
        return 0, body
    return request_facts(body, precise=False).prompt_tokens, None


def prompt_tokens(context: InFlight) -> int:
    """The prompt estimate of the admitted request (its Check's, or made now from its kept body): the
    same figure for every key."""
    if context.prompt_tokens or context.body is None:
        return context.prompt_tokens
    return request_facts(context.body, precise=False).prompt_tokens
