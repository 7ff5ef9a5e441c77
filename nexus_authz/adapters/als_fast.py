"""The access-log entry's common case through the compiled scans (nexus_authz/native/_usage.pyx), when
they built: the Lua tap's record read from the serialized metadata in one pass instead of a walk of
protobuf Struct objects, and a whole JSON body's usage object found by a validating scan instead of a
json.loads of the document. An accelerator of the pure path's rules, never a second source of truth:
a record's counts are read in C only when they are plain integers and the Usage is built by the core's
formulas (core/usage_records.usage_from_counts; else document_usage decodes it), and every input the
scans are not sure of (a cut-off stream's pieces, a malformed or unusual document, an error document, no
usage record, SSE, a compressed body ...) goes the pure way (adapters/envoy_als.py snippet_of and
core/usage.py StreamUsage), which gives the same result for every input
(tests/adapters/test_als_fast.py, a differential test over generated entries and bodies).
`NEXUS_AUTHZ_PURE=1` (native/) or `SCAN = None` (tests) runs only the pure path.
"""

from __future__ import annotations

from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2

from nexus_authz import native
from nexus_authz.core.usage import MAX_BODY_BYTES
from nexus_authz.core.usage_records import Usage, document_model, document_usage, usage_from_counts

__all__ = ["ACCOUNT", "RUN", "SCAN", "body_usage", "log_entries", "snippet_fields", "sse_usage"]

SCAN: Any = native.usage  # the compiled module (native/_usage.pyx), or None: the pure path only
# The common entry's accounting (native/_account.pyx `account_provider`: Engine.account of a provider
# usage record in one compiled call; False when Engine.account must run), or None: Engine.account only
ACCOUNT: Any = native.account.account_provider if native.account is not None else None
# A scanned message's loop (native/_usage.pyx `account_run`: the common entry read, settled and recorded
# with no Python frame, every other entry handed to envoy_als `_account_scanned`), or None: that per-entry
# code for every entry
RUN: Any = SCAN.account_run if SCAN is not None and ACCOUNT is not None else None


def log_entries(message: bytes, later: bool = False) -> list[tuple[Any, ...] | None] | None:
    """The HTTP entries of a serialized StreamAccessLogsMessage as the compiled scan reads them (see
    native/_usage.pyx `log_entries`: per entry None when nexus-authz did not admit it, else (request_id,
    content_type, content_encoding, kind, data, skipped, start, end), kind None when protobuf must read
    message[start:end]); None when protobuf must read the message (or the scans did not build).
    `later` (for RUN only): a record's data is where its base64 is in the message, RUN decodes it."""
    scan = SCAN
    if scan is None:
        return None
    result: list[tuple[Any, ...] | None] | None = scan.log_entries(message, later)
    return result


def snippet_fields(entry: accesslog_pb2.HTTPAccessLogEntry) -> tuple[str, bytes, int] | None:
    """(kind, data, skipped) of the entry's `nexus.usage` record, as envoy_als.snippet_of reads it; None
    when snippet_of must read it (or the scans did not build)."""
    scan = SCAN
    if scan is None:
        return None
    result: tuple[str, bytes, int] | None = scan.usage_snippet(
        entry.common_properties.metadata.SerializeToString()
    )
    return result


def body_usage(
    data: bytes, content_type: str | None, content_encoding: str | None
) -> tuple[Usage, str | None] | None:
    """(usage, model) of a whole response body ("body" snippet) that is a JSON document with a usage
    record, as StreamUsage reads it; None when StreamUsage must read it."""
    scan = SCAN
    if (
        scan is None
        or len(data) > MAX_BODY_BYTES
        or (content_encoding and content_encoding.strip().lower() not in ("", "identity"))
        or (content_type and "event-stream" in content_type.lower())
    ):
        return None
    span = scan.usage_span(data)
    if span is None:
        return None
    counts = scan.usage_counts(data, span[0], span[1])  # the common record's plain counts, in C
    if counts is None:
        return document_usage(data, span[0], span[1])
    return usage_from_counts(counts), document_model(data)


def sse_usage(data: bytes) -> tuple[Usage, str | None] | None:
    """(usage, model) of a Lua tap "sse" snippet whose usage is OpenAI's usage chunk (one unnamed event
    holding the one record, see native/_usage.pyx `sse_usage_span`), as StreamUsage reads the snippet;
    None when StreamUsage must read it."""
    scan = SCAN
    if scan is None:
        return None
    span = scan.sse_usage_span(data)
    if span is None:
        return None
    counts = scan.usage_counts(data, span[0], span[1])
    if counts is None or counts[0] != "openai":
        return None  # an Anthropic-shaped record in an unnamed event: StreamUsage's own rules
    return usage_from_counts(counts), document_model(data)
