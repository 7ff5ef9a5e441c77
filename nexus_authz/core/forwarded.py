"""What the proxy forwarded of a request body: whole, or cut at its buffer limit.

A cut body proves nothing after the cut (a duplicate key, the real size): the policy reads it as cut
(core/policy.py). This module says which bodies are cut; every adapter asks it, so that the gRPC, the
HTTP reference and the fast lanes (adapters/http_fast.py, native/_fast.pyx) agree.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Final

from nexus_authz.core.body import MAX_PARSE_BYTES

__all__ = ["DECLARED", "PARTIAL", "cut_by_proxy", "declared_length", "whole_by_its_length"]

PARTIAL: Final = "x-envoy-auth-partial-body"  # Envoy's: "true" when it buffered more than it sent
DECLARED: Final = "x-nexus-content-length"  # the client's Content-Length (the shipped configs add it)
_DECODER: Final = json.JSONDecoder()
_WHITESPACE: Final = re.compile(r"[ \t\n\r]*")  # JSON's whitespace


def declared_length(raw: str | None) -> int:
    """A Content-Length as the proxy declares it (`x-nexus-content-length`): its value, or -1 (unknown:
    absent, Envoy's "-" for a request without one, or not a plain decimal)."""
    if not raw:
        return -1
    raw = raw.strip(" \t")
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 15 else -1


def cut_by_proxy(headers: Mapping[str, str], body: bytes) -> bool:
    """Whether the body the proxy forwarded is a prefix of the client's (the reading then proves nothing
    after the cut), by the check's headers: Envoy's `x-envoy-auth-partial-body` and the client's
    Content-Length as the proxy declares it (`x-nexus-content-length`).

    Envoy's flag alone is not enough. Its check starts when the buffer already holds max_request_bytes, and
    the flag says whether more than that was buffered: "false" when exactly max_request_bytes were, while
    the rest of the body is still to come. The client chooses its chunk sizes (HTTP/1.1 chunked, HTTP/2
    DATA frames), so it can make that happen at will. So a non-empty body is also cut when it is shorter
    than the declared length, and, with no declared length (chunked, HTTP/2 without content-length), when
    it begins as a JSON object that does not end, whole, where the body ends. An empty body is the proxy's
    not forwarding one (no with_request_body, nginx), never a cut.
    """
    if headers.get(PARTIAL) == "true":
        return True
    if not body:
        return False
    length = declared_length(headers.get(DECLARED))
    if length >= 0:
        return length > len(body)
    return not _whole_object_or_other(body)


def whole_by_its_length(headers: Mapping[str, str], body: bytes) -> bool:
    """The fast lanes' test (adapters/http_fast.py; native/_fast.pyx `_complete` in C): Envoy does not say
    the body was cut, and it is empty or exactly as long as its declared length. Such a body is whole
    (`cut_by_proxy` is False); the others go to the reference path, where `cut_by_proxy` decides."""
    if headers.get(PARTIAL) == "true":
        return False
    return not body or declared_length(headers.get(DECLARED)) == len(body)


def _whole_object_or_other(body: bytes) -> bool:
    """False for a body that begins as a JSON object and is not one whole object (or is too large to
    prove it); True otherwise: a whole object, or not JSON at all (the strict reading refuses what it
    must: invalid UTF-8, a multipart body without its terminator)."""
    if body.lstrip(b" \t\r\n")[:1] != b"{":
        return True
    if len(body) > MAX_PARSE_BYTES:
        return False
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return True  # refused by the strict reading as NOT_UTF8, cut or not
    start = _WHITESPACE.match(text).end()  # type: ignore[union-attr]
    try:
        end = _DECODER.raw_decode(text, start)[1]
    except (ValueError, RecursionError, StopIteration):
        return False
    return _WHITESPACE.match(text, end).end() == len(text)  # type: ignore[union-attr]
