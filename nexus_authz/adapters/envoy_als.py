"""Envoy's gRPC access log service (`envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs`):
token accounting from batched access-log entries, the cheap path of issue 9.

The default Envoy configs put a Lua filter (envoy/nexus-usage.lua) on the response path that keeps only
the bytes a response's usage needs (the SSE events carrying a usage record, or the body when there is
none) in the dynamic metadata namespace `nexus.usage`, and a gRPC access logger that sends, per request,
the request id, the identity ext_authz set (x-nexus-key-id, x-nexus-tenant), the response's status,
content type and encoding, and that metadata. Envoy keeps one long-lived stream open and batches many
entries per message, so a request costs nexus-authz one protobuf entry instead of the ext_proc path's
four or more gRPC messages.

Each entry becomes the call the ext_proc adapter makes at the end of a response: the bytes go through
the core's usage parser (StreamUsage, the single source of truth of the usage semantics), this adapter
says how the response ended (`end_of`: the wire's facts, nothing more), and `engine.account_response`
concludes the usage in the core (core.accounting: keep the estimate or not, extrapolation, the exact
count off the loop), settles the reservation and feeds the ledger. Entries without x-nexus-key-id
(requests nexus-authz did not admit) are ignored early; the header only filters: the identity an entry is
accounted under comes from nexus-authz's own admission record, found by request id (Envoy logs requests
it refused before its header_mutation filter ran with the client's own x-nexus-* headers, so they are
never trusted). What the Lua filter sends (see its header):

  u.k = "sse"   selected SSE events (or a long stream's head and tail): parsed as an event stream
  u.k = "body"  the whole body as received: parsed with the response's content type and encoding
  u.k = "tail"  the end of a long non-SSE body: its last usage record, else the reserved estimate stays
  u.k = "over"  a compressed body over the Lua cap: unreadable, the reserved estimate stays
  u.x           bytes dropped unseen over the cap: the completion counted from what was kept is
                extrapolated over them
  p1, p2, ...   no `u`: the stream was cut off; the chunks seen so far, in order

The gRPC handler takes the message serialized: the compiled scan (als_fast.log_entries) reads each
entry's request id, identity filter, content type and encoding and the Lua record in one pass, and the
common records (a JSON body's usage object, an OpenAI stream's usage chunk) in C, and one C loop over
the message's entries (als_fast.RUN) settles and records those with a live reservation, handing every
other entry to `_account_scanned`; protobuf, snippet_of and StreamUsage read everything else, and all of
it without the scans (tests/adapters/test_als_batch.py: the same counters, ledger rows and metrics either
way).
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Final

import grpc
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from nexus_authz.adapters import als_fast
from nexus_authz.core.accounting import ResponseEnd, conclude_usage
from nexus_authz.core.tokens import estimate_tokens
from nexus_authz.core.usage import StreamUsage, Usage
from nexus_authz.engine import Engine
from nexus_authz.latency import LOOP_BUSY, Slice
from nexus_authz.offloop import count_then_account

log = logging.getLogger("nexus_authz.als")

__all__ = [
    "METADATA_NAMESPACE",
    "MAX_MESSAGE_BYTES",
    "SERVICE",
    "AccessLogService",
    "Snippet",
    "end_of",
    "parser_for",
    "snippet_of",
    "usage_of",
]

SERVICE: Final = "envoy.service.accesslog.v3.AccessLogService"
METADATA_NAMESPACE: Final = "nexus.usage"
#: The largest StreamAccessLogsMessage nexus-authz must accept: Envoy flushes once its buffer exceeds
#: buffer_size_bytes, so a message is that buffer plus one entry, and an entry carries up to the Lua
#: filter's 1 MiB cap in base64 (1.33 MiB) plus its headers.
MAX_MESSAGE_BYTES: Final = 4 << 20
_EVENT_STREAM: Final = "text/event-stream"
_EMPTY_RESPONSE: Final = als_pb2.StreamAccessLogsResponse()
# Seconds of accounting between two yields to the event loop: a slice ends with the first entry that
# brings it past this (an entry takes ~10-25 µs), so a batch never holds the loop much over 100 µs.
_SLICE: Final = 0.0001
_BUSY = LOOP_BUSY.access_log  # how long each slice of a batch holds the event loop


@dataclass(frozen=True, slots=True)
class Snippet:
    """What the Lua filter kept of one response, decoded: how to parse it, and the bytes."""

    kind: str  # "sse", "body", "tail", "over", "partial" (cut off), "none" (no body / no Lua)
    data: bytes = b""
    skipped: int = 0  # body bytes dropped unseen over the Lua cap


def _b64(value: Any) -> bytes:
    try:
        return binascii.a2b_base64(value.string_value)
    except (binascii.Error, ValueError):
        return b""


def _byte_count(value: Any) -> int:
    """A byte count from a metadata number: the Lua filter sends a non-negative integer; anything else
    (a string, NaN, an infinity, a negative or absurd value) reads as 0 rather than raising."""
    n = value.number_value
    return int(n) if 0 < n < 2**53 else 0


def _piece_index(name: str) -> int:
    return int(name[1:]) if name[1:].isdigit() else -1


def _request_id(item: Any) -> str | None:
    """The request id of a batch's item (a protobuf entry, or a scanned tuple), for a log line."""
    if isinstance(item, tuple):
        return item[0]  # type: ignore[no-any-return]
    return item.request.request_id if item is not None else None  # type: ignore[no-any-return]


def snippet_of(entry: accesslog_pb2.HTTPAccessLogEntry) -> Snippet:
    """Decode the `nexus.usage` metadata of an access-log entry; never raises on what Envoy sends."""
    filter_metadata = entry.common_properties.metadata.filter_metadata
    if METADATA_NAMESPACE not in filter_metadata:
        return Snippet("none")
    fields = filter_metadata[METADATA_NAMESPACE].fields
    if "u" in fields:
        record = fields["u"].struct_value.fields
        kind = record["k"].string_value if "k" in record else ""
        data = _b64(record["b"]) if "b" in record else b""
        skipped = _byte_count(record["x"]) if "x" in record else 0
        if kind not in ("sse", "body", "tail", "over"):
            return Snippet("none")
        return Snippet(kind, data, max(0, skipped))
    pieces = sorted(
        (index, value)
        for name, value in fields.items()
        if name.startswith("p") and (index := _piece_index(name)) > 0 and value.HasField("string_value")
    )
    skipped = _byte_count(fields["x"]) if "x" in fields else 0
    if not pieces:
        return Snippet("none", b"", max(0, skipped))
    return Snippet("partial", b"".join(_b64(value) for _, value in pieces), max(0, skipped))


def parser_for(
    snippet: Snippet, *, content_type: str | None, content_encoding: str | None, prompt_tokens_hint: int
) -> StreamUsage | None:
    """The core parser, fed with what the Lua filter kept; None when nothing is readable ("over")."""
    if snippet.kind == "over":
        return None
    if snippet.kind in ("sse", "tail"):  # selected events, or a body's end: decoded text by then
        content_type, content_encoding = _EVENT_STREAM, None
    parser = StreamUsage(
        content_type=content_type, content_encoding=content_encoding, prompt_tokens_hint=prompt_tokens_hint
    )
    if snippet.data:
        parser.feed(snippet.data)
    return parser


def end_of(snippet: Snippet) -> ResponseEnd:
    """How the response ended, as the Lua tap's record says: whole ("sse": its events, "body": all of
    it), only partly seen ("tail": a long body's end), cut off ("partial": its checkpoints; "none": the
    client went away before or during the response), or unreadable ("over": compressed over the cap).
    Bytes dropped over the cap are `skipped`."""
    return ResponseEnd(
        complete=snippet.kind in ("sse", "body"), readable=snippet.kind != "over", skipped=snippet.skipped
    )


def usage_of(
    snippet: Snippet,
    *,
    content_type: str | None,
    content_encoding: str | None,
    prompt_tokens_hint: int = 0,
    count_tokens: Callable[[str], int] | None = None,
) -> tuple[Usage, str | None, bool]:
    """Synchronously what the service accounts for a snippet: (usage, model, keep_estimate)."""
    parser = parser_for(
        snippet,
        content_type=content_type,
        content_encoding=content_encoding,
        prompt_tokens_hint=prompt_tokens_hint,
    )
    if parser is None:
        usage, keep_estimate = conclude_usage(end_of(snippet), None, None, prompt_tokens_hint)
        return usage, None, keep_estimate
    parser.count_tokens = count_tokens
    usage, keep_estimate = conclude_usage(end_of(snippet), parser, parser.finish(), prompt_tokens_hint)
    return usage, parser.model, keep_estimate


class AccessLogService:
    """Accounts every admitted request's response from Envoy's access-log stream."""

    __slots__ = ("_closed", "_last_batch", "_quiet", "_streams", "engine", "entries", "ignored", "messages")

    def __init__(self, engine: Engine, *, quiet: float = 0.5) -> None:
        self.engine = engine
        self._quiet = quiet
        # open streams: a future that ends the stream -> loop time of its last message (inf: busy)
        self._streams: dict[asyncio.Future[None], float] = {}
        self._last_batch = 0.0  # loop time the last batch was accounted
        self._closed = 0.0  # loop time the last stream ended (Envoy gone, or reconnecting)
        self.messages = 0
        self.entries = 0  # accounted
        self.ignored = 0  # not admitted by nexus-authz (no x-nexus-key-id), or not HTTP

    async def stream_access_logs(
        self, requests: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: grpc.aio.ServicerContext
    ) -> als_pb2.StreamAccessLogsResponse:
        loop = asyncio.get_running_loop()
        stop: asyncio.Future[None] = loop.create_future()
        streams = self._streams
        streams[stop] = loop.time()
        # drain() ends the stream between two batches (Envoy never ends it): while this waits for the next
        # message, `stop` cancels the wait; during a batch it is only seen once the batch is done. One
        # callback for the stream's life rather than a task and an asyncio.wait per message.
        task = asyncio.current_task()
        reading = [False]

        def stopped(_: object) -> None:
            if reading[0] and task is not None:
                task.cancel()

        stop.add_done_callback(stopped)
        read = context.read
        try:
            while not stop.done():
                reading[0] = True
                try:
                    message = await read()
                except asyncio.CancelledError:
                    # ours (the stop callback) unless the stream was cancelled from outside too (the
                    # server stops): that one is not ours to swallow
                    if not stop.done() or task is None or task.uncancel() > 0:
                        raise
                    break
                finally:
                    reading[0] = False
                if message is grpc.aio.EOF:
                    break
                streams[stop] = math.inf  # busy: drain() must not end it mid-batch
                self.messages += 1
                if message.__class__ is bytes:  # as the handler receives it (no protobuf deserializer)
                    # the scan is the first slice's work (~1-2.5 µs an entry, ~115 µs for a 50-entry
                    # message with cold caches): timed with it, and a slice of its own when it fills one
                    timer = Slice("access_log", _BUSY.observe)
                    run = als_fast.RUN if als_fast.ACCOUNT is not None else None
                    # the compiled scan of the whole message (the compiled loop decodes each record)
                    scanned = als_fast.log_entries(message, run is not None)
                    if timer.elapsed() >= _SLICE:  # a long message's scan is a slice of its own
                        timer.end()
                        await asyncio.sleep(0)
                        timer.start()
                    if scanned is not None:
                        if run is not None:  # the compiled loop: the common entries accounted in C
                            await self._account_run(scanned, message, run, timer)
                        else:
                            await self._account_batch(scanned, self._account_scanned, message, timer)
                        streams[stop] = self._last_batch = loop.time()
                        continue
                    # protobuf reads what the scan does not (a malformed message raises here, where
                    # grpc's deserializer raised it before)
                    message = als_pb2.StreamAccessLogsMessage.FromString(message)
                else:
                    timer = None
                await self._account_batch(message.http_logs.log_entry, self._account_entry, b"", timer)
                streams[stop] = self._last_batch = loop.time()
        finally:
            streams.pop(stop, None)
            self._closed = loop.time()
        return _EMPTY_RESPONSE

    async def _account_batch(
        self,
        items: Any,
        account_one: Callable[[Any, bytes], Awaitable[None] | None],
        raw: bytes,
        timer: Slice | None = None,
    ) -> None:
        """The entries of one message (protobuf entries, or the compiled scan's tuples of `raw`), in
        slices of about _SLICE seconds of the event loop: each slice between two yields is one
        observation of LOOP_BUSY.access_log (`timer`: the first slice, already started)."""
        if timer is None:
            timer = Slice("access_log", _BUSY.observe)  # wall and (when measured) own CPU per slice
        for item in items:
            try:
                pending = account_one(item, raw)
                if pending is not None:  # a long text to count exactly: off the event loop
                    timer.end()
                    await pending
                    timer.start()
            except Exception:  # one bad entry must not lose the rest of the batch
                log.exception("accounting failed", extra={"request_id": _request_id(item)})
            if timer.elapsed() >= _SLICE:
                # a batch holds up to ~50 entries (~10-25 µs each): let queued Checks run meanwhile
                timer.end()
                await asyncio.sleep(0)
                timer.start()
        timer.end()

    async def _account_run(
        self, items: list[tuple[Any, ...] | None], raw: bytes, run: Any, timer: Slice | None = None
    ) -> None:
        """`_account_batch` of the compiled scan's entries of `raw` through the compiled loop
        (als_fast.RUN, native/_usage.pyx `account_run`): it accounts the common entries itself and hands
        every other one to `_account_scanned`, and comes back here with an awaitable to await or at the end
        of a slice, so the slices and their LOOP_BUSY observations are `_account_batch`'s (`timer`: the
        first slice, started before the scan)."""
        if timer is None:
            timer = Slice("access_log", _BUSY.observe)  # wall and (when measured) own CPU per slice
        failed = self._failed
        i, n = 0, len(items)
        while i < n:
            i, pending, sliced = run(
                items, i, raw, self, self._account_scanned, failed, perf_counter, timer.started, _SLICE
            )
            if pending is not None:  # a long text to count exactly: off the event loop
                try:
                    timer.end()
                    await pending
                    timer.start()
                except Exception:
                    failed(items[i - 1])
                sliced = timer.elapsed() >= _SLICE
            if sliced:
                timer.end()
                await asyncio.sleep(0)
                timer.start()
        timer.end()

    @staticmethod
    def _failed(item: Any) -> None:
        """Log the exception an entry's accounting raised (called while it is being handled)."""
        log.exception("accounting failed", extra={"request_id": _request_id(item)})

    async def account(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> None:
        """One access-log entry: the usage of its response, settled and recorded."""
        pending = self.account_now(entry)
        if pending is not None:
            await pending

    def _account_entry(self, entry: accesslog_pb2.HTTPAccessLogEntry, raw: bytes) -> Awaitable[None] | None:
        return self.account_now(entry)

    def _account_scanned(self, item: tuple[Any, ...] | None, raw: bytes) -> Awaitable[None] | None:
        """`account_now` of an entry of `raw` as the compiled scan read it (als_fast.log_entries)."""
        if item is None:  # not admitted by nexus-authz
            self.ignored += 1
            return None
        request_id, content_type, content_encoding, kind, data, skipped, start, end = item
        if kind is None:  # unusual: protobuf and snippet_of read it
            return self.account_now(accesslog_pb2.HTTPAccessLogEntry.FromString(raw[start:end]))
        return self._account_snippet(request_id, content_type, content_encoding, kind, data, skipped)

    def account_now(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> Awaitable[None] | None:
        """`account`, synchronously when it can be (nearly always: no coroutine per entry); returns an
        awaitable only when the response has no usage record and its text is long enough to be counted
        exactly in a worker thread."""
        request = entry.request
        if not request.request_headers.get("x-nexus-key-id"):  # a filter only: never the identity
            self.ignored += 1
            return None
        response_headers = entry.response.response_headers
        fields = als_fast.snippet_fields(entry)  # the compiled scans (als_fast) when they built
        if fields is None:
            snippet = snippet_of(entry)
            fields = (snippet.kind, snippet.data, snippet.skipped)
        return self._account_snippet(
            request.request_id,
            response_headers.get("content-type"),
            response_headers.get("content-encoding"),
            *fields,
        )

    def _account_snippet(
        self,
        request_id: str,
        content_type: str | None,
        content_encoding: str | None,
        kind: str,
        data: bytes,
        skipped: int,
    ) -> Awaitable[None] | None:
        """An admitted entry's accounting from the Lua tap's record (kind, data, skipped: a Snippet)."""
        if kind == "body":  # a whole body: its usage record, if it has one
            found = als_fast.body_usage(data, content_type, content_encoding) if not skipped else None
        else:  # a stream's usage events (whole ones: whatever was skipped, the record stands)
            found = als_fast.sse_usage(data) if kind == "sse" else None
        if found is not None:
            self.entries += 1
            # what account_response concludes for a whole response with a provider's usage record
            account = als_fast.ACCOUNT  # compiled (native/_account.pyx) for the common entry
            if account is None or not account(self.engine, request_id, found[0], found[1]):
                self.engine.account(
                    request_id, found[0], response_model=found[1], keep_estimate=False, unread=False
                )
            return None
        snippet = Snippet(kind, data, skipped)
        hint = self.engine.prompt_hint(request_id)
        parser = parser_for(
            snippet, content_type=content_type, content_encoding=content_encoding, prompt_tokens_hint=hint
        )
        self.entries += 1
        return self.engine.account_response(request_id, parser, end_of(snippet), hint)

    def count_later(
        self,
        request_id: str,
        text: str | None,
        counter: Callable[[str], int],
        prompt_hint: int,
        model: str | None,
    ) -> Awaitable[None]:
        """A whole stream's completion text the compiled scan read (native/_usage.pyx `_counted`: a stream
        without a usage record whose count Engine.account_response runs in a worker thread), counted there
        and accounted as account_response accounts it (offloop.count_then_account): StreamUsage's
        `Usage(prompt_tokens=hint, completion_tokens=<the count>, source="estimated")`, the estimate when
        the counter fails, nothing counted without content (`text` None); read, complete."""

        def count() -> int:
            if text is None:
                return 0
            try:
                return max(0, int(counter(text)))
            except Exception:  # StreamUsage._counted_completion: a failing counter's text is estimated
                return estimate_tokens(text)

        def account(completion: int) -> None:
            usage = Usage(prompt_tokens=max(0, prompt_hint), completion_tokens=completion, source="estimated")
            self.engine.account(request_id, usage, response_model=model, keep_estimate=False, unread=False)

        return count_then_account(request_id, count, account)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    async def drain(self, timeout: float) -> None:
        """Wait until Envoy has sent what nexus-authz still expects, or `timeout`; then end the streams.

        Call it before the gRPC server stops accepting calls: Envoy opens its access-log stream lazily
        (at its first flush) and reopens it after an error, and never ends it, so a graceful stop would
        otherwise either refuse the last batches or wait the whole grace period. Done when every admitted
        request has been accounted (the reservation book holds none: their responses, however long,
        have finished and arrived; not waited for when no access-log stream was ever seen, e.g. behind
        nginx, nor once no stream has been open for `quiet` seconds: Envoy has gone, with it whatever it
        had not sent, and those reservations stay charged) and nothing arrived for `quiet` seconds since
        the later of the last batch and the start of the drain (longer than Envoy's
        buffer_flush_interval, so a batch buffered at SIGTERM arrives).
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + timeout
        while True:
            now = loop.time()
            busy = any(last == math.inf for last in self._streams.values())
            # Envoy still connected, or gone less than `quiet` ago (a broken stream is reopened at its
            # next flush): what it still owes may arrive
            expected = bool(self._streams) or now - max(started, self._closed) < self._quiet
            pending = expected and self.messages > 0 and len(self.engine.book) > 0
            quiet = now - max(started, self._last_batch) >= self._quiet
            if now >= deadline or (quiet and not busy and not pending):
                break
            await asyncio.sleep(0.05)
        for stop in list(self._streams):
            self._streams.pop(stop, None)
            if not stop.done():
                stop.set_result(None)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "StreamAccessLogs": grpc.stream_unary_rpc_method_handler(
                    self.stream_access_logs,
                    # the serialized message: the compiled scan reads it (protobuf when it cannot)
                    request_deserializer=None,
                    response_serializer=als_pb2.StreamAccessLogsResponse.SerializeToString,
                )
            },
        )
