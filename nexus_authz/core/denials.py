"""The fixed answers of a refusal: OpenAI's error shapes (so SDKs raise the matching exception and show
the message) and Anthropic's for its API paths, rendered once and shared (split from core/policy.py)."""

from __future__ import annotations

import dataclasses
import json
from json.encoder import encode_basestring_ascii as _json_string

from nexus_authz.core.model import Decision, Reason

__all__ = [
    "DENIALS",
    "ERRORS",
    "FIXED",
    "anthropic_error_body",
    "anthropic_shaped",
    "error_body",
    "error_status",
    "is_anthropic_path",
]

# OpenAI's error shapes, so SDKs raise the matching exception (AuthenticationError, PermissionDeniedError,
# RateLimitError, BadRequestError) and show the message.
ERRORS: dict[Reason, tuple[int, str, str, str]] = {
    Reason.MISSING_KEY: (
        401,
        "invalid_request_error",
        "missing_api_key",
        "You didn't provide an API key. Send it as 'Authorization: Bearer KEY' or in an 'x-api-key' header.",
    ),
    Reason.UNKNOWN_KEY: (401, "invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    Reason.EXPIRED_KEY: (401, "invalid_request_error", "expired_api_key", "This API key has expired."),
    Reason.DISABLED_KEY: (401, "invalid_request_error", "revoked_api_key", "This API key has been revoked."),
    Reason.MODEL_NOT_ALLOWED: (
        403,
        "permission_error",
        "model_not_allowed",
        "This API key is not allowed to use the requested model.",
    ),
    Reason.PATH_NOT_ALLOWED: (
        403,
        "permission_error",
        "path_not_allowed",
        "This API key is not allowed to call this endpoint.",
    ),
    Reason.BAD_REQUEST: (
        400,
        "invalid_request_error",
        "invalid_request_body",
        "The request body must be JSON with a 'model' field.",
    ),
    Reason.BODY_TOO_LARGE: (
        413,
        "invalid_request_error",
        "request_too_large",
        "The request body is larger than the policy check can read for this API key.",
    ),
    Reason.RATE_LIMITED: (429, "rate_limit_exceeded", "rate_limit_exceeded", "Rate limit reached."),
    Reason.CONCURRENCY_LIMITED: (
        429,
        "rate_limit_exceeded",
        "concurrency_limit_exceeded",
        "Too many requests in flight for this API key.",
    ),
    Reason.QUOTA_EXCEEDED: (
        429,
        "insufficient_quota",
        "insufficient_quota",
        "You exceeded your current quota (budget) for this API key.",
    ),
    Reason.AUTH_THROTTLED: (
        429,
        "rate_limit_exceeded",
        "too_many_failed_auth_attempts",
        "Too many requests with invalid API keys from this address.",
    ),
    Reason.UNAVAILABLE: (503, "server_error", "policy_unavailable", "The policy service is unavailable."),
}


def error_body(reason: Reason, message: str | None = None) -> bytes:
    """OpenAI's error document: `json.dumps` of {"error": {"message", "type", "param": null, "code"}}
    with separators (",", ":"), byte for byte (tests/unit/test_policy.py compares them), written with
    json's own string encoder (a rate-limit refusal's message names the remaining count: one per
    refusal, so it is not cached)."""
    status, etype, code, default_message = ERRORS[reason]
    m, t, c = _json_string(message or default_message), _json_string(etype), _json_string(code)
    return f'{{"error":{{"message":{m},"type":{t},"param":null,"code":{c}}}}}'.encode()


def error_status(reason: Reason) -> int:
    return ERRORS[reason][0]


# Anthropic's error shape for denials on Anthropic API paths (/v1/messages...): its SDK maps the status,
# but clients reading the body expect {"type": "error", "error": {"type", "message"}} with these types.
_ANTHROPIC_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
}


def is_anthropic_path(path: str) -> bool:
    """Anthropic's Messages API (and its count_tokens / batches) and the legacy Text Completions."""
    path = path.partition("?")[0]
    return path.startswith("/v1/messages") or path == "/v1/complete"


def anthropic_error_body(status: int, message: str) -> bytes:
    etype = _ANTHROPIC_TYPES.get(status, "api_error")
    return json.dumps(
        {"type": "error", "error": {"type": etype, "message": message}}, separators=(",", ":")
    ).encode()


_ANTHROPICDENIALS: dict[Decision, Decision] = {}


def anthropic_shaped(decision: Decision) -> Decision:
    """The same denial with Anthropic's body (cached for the fixed denials)."""
    if decision.allowed:
        return decision
    shaped = _ANTHROPICDENIALS.get(decision)
    if shaped is None:
        shaped = dataclasses.replace(decision, body=anthropic_error_body(decision.status, decision.message))
        if decision in FIXED:
            _ANTHROPICDENIALS[decision] = shaped
    return shaped


DENIALS: dict[Reason, Decision] = {
    reason: Decision(allowed=False, status=status, reason=reason, body=error_body(reason), message=msg)
    for reason, (status, _, _, msg) in ERRORS.items()
}
FIXED = frozenset(DENIALS.values())
