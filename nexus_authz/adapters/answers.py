"""The answers both ext_authz transports send, ready-made: one bounded cache class (allow answers per key,
fixed denials per decision) for HTTP and gRPC, the HTTP answer bytes, and nginx auth_request's form of a
denial."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

from nexus_authz.core.model import Decision, KeyRecord, Reason
from nexus_authz.core.policy import denial

__all__ = [
    "ALLOW_CACHE",
    "CLOSING_TAIL",
    "DENY_CACHE",
    "TAIL",
    "AllowHead",
    "AnswerCache",
    "allow_block",
    "allow_head",
    "nginx_denial",
]

T = TypeVar("T")

ALLOW_CACHE = 4096  # keys whose allow answers are kept ready
TAIL = b"content-length: 0\r\n\r\n"  # the end of an answer without a body
CLOSING_TAIL = b"connection: close\r\n" + TAIL  # the same, closing the connection after it
DENY_CACHE = 256  # denials kept ready (the policy's fixed ones: one object per reason)


class AnswerCache(Generic[T]):
    """Serialized answers by key (a KeyRecord, a Decision), bounded to `limit` entries.

    With a `snapshot` given to `get`, the cache holds answers for that key snapshot only: a reload
    (a new snapshot object) empties it, so an answer never outlives the key record it was built from.
    Full, it is emptied whole: the hot keys come straight back, a cold one costs one answer to build
    (~1 µs); with 100,000 active keys an unbounded cache would cost ~370 B a client."""

    __slots__ = ("_entries", "_snapshot", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: dict[Hashable, T] = {}
        self._snapshot: object = None

    def get(self, key: Hashable, snapshot: object = None) -> T | None:
        if snapshot is not self._snapshot:
            self._entries = {}
            self._snapshot = snapshot
            return None
        return self._entries.get(key)

    def put(self, key: Hashable, answer: T) -> None:
        entries = self._entries
        if len(entries) >= self.limit:
            entries.clear()
        entries[key] = answer

    def __len__(self) -> int:
        return len(self._entries)


# -- HTTP answers -----------------------------------------------------------------------------------------
_REASONS = {
    200: b"OK",
    204: b"No Content",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Payload Too Large",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))


def header_block(headers: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> bytes:
    """`name: value\r\n` per header, in latin-1 (one encode of the whole block: the same bytes)."""
    return "".join([f"{k}: {v}\r\n" for k, v in headers]).encode("latin-1")


def allow_block(key: KeyRecord, *, nginx: bool) -> bytes:
    """The head of `key`'s allow answer: Envoy's (200, the headers to add and to remove) or nginx's
    auth_request (204, the headers to add: nginx reads them with auth_request_set)."""
    upstream = header_block(key.upstream_headers)
    if nginx:
        return status_line(204) + upstream
    remove = b"x-envoy-auth-headers-to-remove: %s\r\n" % ", ".join(key.remove_headers).encode()
    return status_line(200) + upstream + remove


AllowHead = tuple[bytes, bytes]  # a recipe's Envoy allow head: the bytes before the key id, those after


def allow_head(key: KeyRecord) -> AllowHead | None:
    """Envoy's allow head (`allow_block`) of a key made from a recipe, split around its key id: made from the
    recipe and the headers to remove (the key's upstream headers are the recipe's with its id first:
    core/model.py), so the same two parts for every key of the recipe with those headers to remove; the
    answer writer splices the key id's latin-1 bytes in (adapters/http_fast.py, native/_fast.pyx) and no
    key keeps bytes of its own (~170 B an active key). None for a key without a recipe."""
    recipe = key.recipe
    if recipe is None:
        return None
    rest = b"\r\n" + header_block(recipe.rest_headers)
    remove = b"x-envoy-auth-headers-to-remove: %s\r\n" % ", ".join(key.remove_headers).encode()
    return status_line(200) + recipe.header.encode("latin-1") + b": ", rest + remove


def simple_response(
    status: int, body: bytes, content_type: bytes = b"application/json", close: bool = False
) -> bytes:
    return b"".join(
        (
            status_line(status),
            b"content-type: " + content_type + b"\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n" if close else b"",
            b"\r\n",
            body,
        )
    )


def error_json(status: int, code: str, message: str) -> bytes:
    return b'{"error":{"message":"%s","type":"invalid_request_error","param":null,"code":"%s"}}' % (
        message.encode(),
        code.encode(),
    )


# nginx's auth_request passes on 2xx, 401 and 403 only; any other status from the subrequest becomes a
# bare 500. So a denial is answered as 401 (unknown/expired/revoked key) or 403 (everything else) with
# the real status in `x-nexus-status` and the JSON error in `x-nexus-error`; deploy/nginx/nginx.conf
# reads both with auth_request_set and its `error_page 401 403 = @nexus_denied` location answers the
# client with the original status, body, retry-after and rate-limit headers. The subrequest's own body
# is empty: nginx discards it anyway, and a non-empty body makes nginx close the keep-alive connection.
_NGINX_DENY_CACHE: dict[Reason, bytes] = {}
_HEADER_UNSAFE = bytes(range(32)) + b"\x7f"


def nginx_denial(decision: Decision, *, close: bool) -> bytes:
    """The auth_request answer for a denial: 401 or 403, the real status and body in x-nexus-* headers."""
    # Only the policy's fixed denials (one object per reason) are cached; the others carry a message or
    # headers of their own.
    cacheable = not close and not decision.response_headers and _fixed_denial(decision)
    if cacheable:
        cached = _NGINX_DENY_CACHE.get(decision.reason)
        if cached is not None:
            return cached
    # The body is compact ASCII JSON; dropping control bytes keeps a header value that cannot split.
    error = decision.body.translate(None, _HEADER_UNSAFE)
    out = b"".join(
        (
            status_line(401 if decision.status == 401 else 403),
            b"x-nexus-reason: %s\r\n" % decision.reason.value.encode(),
            b"x-nexus-status: %d\r\n" % decision.status,
            b"x-nexus-error: %s\r\n" % error,
            header_block(decision.response_headers) if decision.response_headers else b"",
            CLOSING_TAIL if close else TAIL,
        )
    )
    if cacheable:
        _NGINX_DENY_CACHE[decision.reason] = out
    return out


def _fixed_denial(decision: Decision) -> bool:
    try:
        return denial(decision.reason) is decision
    except KeyError:
        return False


def head_answer(out: bytes) -> bytes:
    """The answer to a HEAD request: its header block (with the would-be body's content-length)."""
    end = out.find(b"\r\n\r\n")
    return out if end < 0 else out[: end + 4]
