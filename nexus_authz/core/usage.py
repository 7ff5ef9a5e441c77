"""Token usage from LLM responses: OpenAI (chat, completions, embeddings, Responses) and Anthropic.

The settle half of token accounting. A response is either one JSON document or a Server-Sent Events
stream; the usage record is in the document, in the last OpenAI chunk (`stream_options.include_usage`),
in `response.completed` (Responses) or split over `message_start` and the cumulative `message_delta`
(Anthropic). A stream cut off before its record is charged the prompt hint plus the completion counted
from the content deltas seen. A usage object counts only at its provider's place (a document's top level;
a chat chunk's top level; `response` of response.completed/incomplete/failed; `message` of
message_start; message_delta's top level): one anywhere else (e.g. the request's tools echoed in
response.created) is content, never a record.

`StreamUsage` is the one parser (`usage_from_body` feeds it a whole body; the formats: usage_records),
so buffered and streamed responses give identical results, whatever the chunking (short of the hard
limits below). It is built to cost little per response (issue 9): `feed` only appends bytes; complete
events are processed in windows of up to 128 KiB with a few C-level scans, never a json.loads per chunk:
only `"usage": {...}` objects are decoded, and content deltas are extracted only from windows that must
be discarded before the stream has shown its usage record, or at the end when it never did. Hard limits:
an event longer than 1 MiB and a JSON body longer than 8 MiB keep only their last 64 KiB (where usage
records sit), decompression stops at 64 MiB (zip bombs), content kept for counting stops at 4 MiB (the
rest is estimated from its length), and no input raises. Pure: the same parser can run behind ext_proc
or any cheaper transport.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Final

from nexus_authz.core.body import loads_bounded
from nexus_authz.core.tokens import estimate_tokens
from nexus_authz.core.usage_records import (
    _ANTHROPIC_FIELDS,
    _CANDIDATES,
    _CONTENT,
    _DATA_TYPE,
    _ERROR_MARKERS,
    _EVENT_NAME,
    _HEAD_BYTES,
    _KIND_MARKERS,
    _MODEL_FIELD,
    _MODEL_SCAN_BYTES,
    _RESPONSES_FINAL,
    _UNKNOWN,
    _USAGE_OBJECT,
    Usage,
    UsageSource,
    _anthropic_usage,
    _count,
    _document_text,
    _is_anthropic,
    _lenient,
    _openai_usage,
    _record_at,
    document_usage,
    record_usage,
)

__all__ = [
    "DEFAULT_WINDOW",
    "MAX_BODY_BYTES",
    "MAX_DECODED_BYTES",
    "MAX_EVENT_BYTES",
    "StreamUsage",
    "Usage",
    "document_usage",
    "UsageSource",
    "usage_from_body",
]

# -- limits -----------------------------------------------------------------------------------------
MAX_EVENT_BYTES: Final = 1 << 20  # an SSE event longer than this keeps only its last _EVENT_TAIL bytes
_EVENT_TAIL: Final = 64 << 10
MAX_BODY_BYTES: Final = 8 << 20  # a JSON body longer than this keeps only its tail
MAX_DECODED_BYTES: Final = 64 << 20  # decompressed bytes per response; then decoding stops
_DECODE_STEP: Final = 256 << 10  # decompress in steps so a bomb never materialises at once
_MAX_CONTENT_BYTES: Final = 4 << 20  # raw delta text kept for counting; beyond, only its length
DEFAULT_WINDOW: Final = 128 << 10
_MODEL_TAIL: Final = 240  # a "model" field is shorter than this: carried over between chunks

# --------------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------------

_SNIFF, _SSE, _JSON = 0, 1, 2
# A body is an event stream once a line starts with an SSE field (a comment-only stream counts: the
# upstream accepted the request and was cut off before its first event).
_SSE_FIELDS: Final = (b"data:", b"event:", b":", b"id:", b"retry:")
_SSE_LINES: Final = (b"\ndata:", b"\nevent:", b"\n:")


class StreamUsage:
    """Incremental usage extraction from a response body, fed chunks split at any byte.

    `feed` as Envoy delivers body chunks, `finish` at end of stream (or when the stream was cut off);
    `finish` is idempotent and later `feed`s are ignored. `content_type` ("text/event-stream" or a JSON
    type) only settles the rare body that does not announce itself; otherwise the first non-blank byte
    decides (`{` or `[`: a JSON document, anything else: SSE). `count_tokens` counts the completion of
    a stream without a usage record (default: the fast estimate; pass tokens.count_tokens for an exact
    count, in an executor for large texts). After finish, `saw_error`, `limited` (a hard limit cut
    something) and `undecodable` (an unsupported content-encoding: the result is only the prompt hint,
    and the adapter should charge the reservation instead) qualify the result.
    """

    __slots__ = (
        "_anthropic",
        "_anthropic_final",
        "_blind_bytes",
        "_buf",
        "_content",
        "_content_bytes",
        "_count_tokens",
        "_cut_head",
        "_decoded",
        "_decoder",
        "_deflate_head",
        "_final",
        "_kind",
        "_last_window",
        "_mode",
        "_next_drain",
        "_prompt_hint",
        "_result",
        "_saw_sse",
        "_total",
        "_trimmed",
        "_window",
        "_model_budget",
        "_model_tail",
        "limited",
        "model",
        "saw_error",
        "undecodable",
    )

    def __init__(
        self,
        *,
        content_encoding: str | None = None,
        prompt_tokens_hint: int = 0,
        count_tokens: Callable[[str], int] | None = None,
        content_type: str | None = None,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        self._buf = bytearray()
        self._window = max(64, int(window))
        self._next_drain = self._window
        self._prompt_hint = max(0, int(prompt_tokens_hint))
        self._count_tokens = count_tokens
        self._mode = _SNIFF
        ctype = (content_type or "").lower()
        if "event-stream" in ctype:
            self._mode = _SSE
        elif "json" in ctype:
            self._mode = _JSON
        self._kind = _UNKNOWN
        self._final: Usage | None = None
        self._anthropic: dict[str, int] = {}
        self._anthropic_final = False
        self._content: list[bytes] = []
        self._content_bytes = 0
        self._blind_bytes = 0  # bytes dropped unseen (trimmed events, content over the cap)
        self._last_window = b""
        self._saw_sse = False
        self._trimmed = False
        self._cut_head: bytes | None = None  # the first bytes of an event cut to its tail (its name)
        self._total = 0
        self._decoded = 0
        self._result: Usage | None = None
        self.saw_error = False
        self.limited = False
        self.undecodable = False
        # The model the upstream says it served: the first `"model": "..."` of the response (every
        # provider names it in its first event or near the top of its document).
        self.model: str | None = None
        self._model_budget = _MODEL_SCAN_BYTES
        self._model_tail = b""
        self._decoder: zlib._Decompress | None = None
        self._deflate_head: bytes | None = None
        encoding = (content_encoding or "").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(zlib.MAX_WBITS | 16)
        elif encoding == "deflate":
            self._deflate_head = b""  # zlib-wrapped or raw: decided by the first two bytes
        elif encoding not in ("", "identity"):
            self.undecodable = True

    # -- for the adapter ---------------------------------------------------------------------------------

    @property
    def has_usage_record(self) -> bool:
        """A usage record has been seen so far (finish() will not need to count anything)."""
        return self._final is not None or (self._anthropic_final and bool(self._anthropic))

    @property
    def bytes_seen(self) -> int:
        """Body bytes fed so far (decoded): an upper bound of the text an exact count at finish() reads."""
        return self._total

    def count_exactly(self, counter: Callable[[str], int], threshold: int) -> bool:
        """Count a completion without a usage record with `counter` (e.g. tiktoken) at finish(): True
        when that count may read `threshold` bytes or more (run finish() in a worker thread: an exact count
        of a long text takes milliseconds). A usage record (in the events held so far too): False."""
        if self._mode != _JSON and self._buf and self._result is None:
            self._drain(final=False)
        if self.has_usage_record:
            return False
        self._count_tokens = counter
        return self._total >= threshold

    @property
    def count_tokens(self) -> Callable[[str], int] | None:
        return self._count_tokens

    @count_tokens.setter
    def count_tokens(self, counter: Callable[[str], int] | None) -> None:
        self._count_tokens = counter

    # -- input --------------------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        """Take the next body chunk (any split point); never raises."""
        if self._result is not None or not chunk or self.undecodable:
            return
        try:
            if self._decoder is None and self._deflate_head is None:
                self._ingest(chunk)
            else:
                self._decode(bytes(chunk))
        except Exception:  # a parser bug must never fail a response: stop parsing, say so
            self.limited = True
            self.undecodable = True

    def _decode(self, chunk: bytes) -> None:
        if self._deflate_head is not None:
            head = self._deflate_head + chunk
            if len(head) < 2:
                self._deflate_head = head
                return
            zlib_wrapped = (head[0] & 0x0F) == 8 and ((head[0] << 8) | head[1]) % 31 == 0
            self._decoder = zlib.decompressobj(zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS)
            self._deflate_head = None
            chunk = head
        decoder = self._decoder
        if decoder is None:
            return
        data = chunk
        while data:
            budget = MAX_DECODED_BYTES - self._decoded
            if budget <= 0:
                self.limited = True
                self._decoder = None
                self.undecodable = True
                return
            try:
                out = decoder.decompress(data, min(_DECODE_STEP, budget))
            except zlib.error:
                self.limited = True
                self._decoder = None
                self.undecodable = True
                return
            self._decoded += len(out)
            if out:
                self._ingest(out)
            data = decoder.unconsumed_tail

    def _find_model(self, data: bytes) -> None:
        # Searched in the previous chunk's tail too, so a field split across chunks is still found.
        text = self._model_tail + data[: self._model_budget]
        match = _MODEL_FIELD.search(text)
        if match is not None:
            self.model = match.group(1).decode("utf-8", "replace")
            self._model_budget = 0
            self._model_tail = b""
        else:
            self._model_budget -= len(data)
            self._model_tail = text[-_MODEL_TAIL:]

    def _ingest(self, data: bytes) -> None:
        if self._model_budget > 0:
            self._find_model(data)
        self._total += len(data)
        self._buf += data
        if len(self._buf) >= self._next_drain:
            self._drain(final=False)

    # -- processing -----------------------------------------------------------------------------------

    def _sniff(self) -> None:
        """Decide JSON or SSE from the first non-blank byte; blank bytes before it are dropped."""
        body = self._buf.lstrip(b" \t\r\n\xef\xbb\xbf")  # whitespace and a UTF-8 BOM
        self._buf = body
        if body:
            self._mode = _JSON if body[0] in (0x7B, 0x5B) else _SSE  # "{" or "["

    def _drain(self, *, final: bool) -> None:
        if self._mode == _SNIFF:
            self._sniff()
            if self._mode == _SNIFF:  # blank so far (and dropped)
                self._next_drain = self._window
                return
        if self._mode == _JSON:
            self._trim_json()
            self._next_drain = len(self._buf) + self._window
            return
        buf = self._buf
        hold = b""
        if b"\r" in buf:
            if not final and buf.endswith(b"\r"):
                hold = b"\r"  # may be the first half of a CRLF split across chunks
                del buf[-1:]
            data = bytes(buf).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            data = bytes(buf)
        if final:
            cut = len(data)
        else:
            cut = data.rfind(b"\n\n") + 2
            if cut < 2:  # no complete event yet
                if len(data) > MAX_EVENT_BYTES:
                    if self._cut_head is None:
                        self._cut_head = head = data[:_HEAD_BYTES]
                        if head.lstrip(b"\n").startswith(_SSE_FIELDS):
                            self._saw_sse = True
                    self._blind_bytes += len(data) - _EVENT_TAIL
                    data = data[-_EVENT_TAIL:]
                    self.limited = True
                self._buf = bytearray(data + hold)
                self._next_drain = len(self._buf) + self._window
                return
        window = data[:cut]
        self._buf = bytearray(data[cut:] + hold)
        self._next_drain = len(self._buf) + self._window
        self._process(window, final=final)

    def _trim_json(self) -> None:
        if len(self._buf) > MAX_BODY_BYTES:  # keep the tail, where every provider puts its usage
            self._blind_bytes += len(self._buf) - _EVENT_TAIL
            del self._buf[:-_EVENT_TAIL]
            self._trimmed = True
            self.limited = True

    def _process(self, window: bytes, *, final: bool) -> None:
        # Every scan here costs ~0.5-1 µs per KB, so each runs only while its answer can matter.
        if not self._saw_sse and (window.startswith(_SSE_FIELDS) or any(f in window for f in _SSE_LINES)):
            self._saw_sse = True
        if self._kind == _UNKNOWN:
            head = window[:4096]  # the first event names the format
            for marker, kind in _KIND_MARKERS:
                if marker in head:
                    self._kind = kind
                    break
        self._take_usages(window)
        self._cut_head = None
        if self._final is not None or (self._anthropic_final and self._anthropic):
            return  # the record settles it: errors and content no longer matter
        if final:
            self._last_window = window  # finish() reads it only if still needed
        else:
            self._scan_unsettled(window)

    def _scan_unsettled(self, window: bytes) -> None:
        """Error events and content deltas of a window that must be read before the usage record."""
        if not self.saw_error and b"error" in window and any(m in window for m in _ERROR_MARKERS):
            self.saw_error = True
        self._extract_content(window)

    def _take_usages(self, window: bytes) -> None:
        """The usage records of a window's events: per event, the usage object where its provider puts
        it (see _EVENT_NAME); the last few candidates of each event are tried, from its end.

        Linear however many `"usage":{` an event holds (garbage, hostile): each event's end is searched
        for once, and at most _CANDIDATES objects per event are decoded.
        """
        keys: list[int] = []
        event_end = -1
        for match in _USAGE_OBJECT.finditer(window):
            key = match.start()
            if key >= event_end:
                if keys:
                    self._take_usage(window, keys, event_end)
                    keys = []
                event_end = window.find(b"\n\n", key)
                if event_end < 0:
                    event_end = len(window)
            if len(keys) == _CANDIDATES:
                del keys[0]
            keys.append(match.end() - 1)
        if keys:
            self._take_usage(window, keys, event_end)

    def _take_usage(self, window: bytes, braces: list[int], end: int) -> None:
        start = window.rfind(b"\n\n", 0, braces[0]) + 2
        if start < 2:  # the window's first event: its head may have been cut off (an event over the limit)
            start = 0
            head = self._cut_head if self._cut_head is not None else window[:_HEAD_BYTES]
        else:
            head = window[start : start + _HEAD_BYTES]
        # each regex only where its literal is (a search that starts with an alternation scans slowly)
        match = (_EVENT_NAME.search(head) if b"event:" in head else None) or (
            _DATA_TYPE.search(head) if b'"type"' in head else None
        )
        name = match.group(1) if match is not None else None
        if name is None or name == b"message_delta":
            depth = 1  # OpenAI chat/completions chunks (no type), Anthropic's message_delta
        elif name in _RESPONSES_FINAL or name == b"message_start":
            depth = 2  # data.response.usage, data.message.usage
        else:
            return  # no other event carries a usage record
        for brace in reversed(braces):
            record = _record_at(window[brace:end], depth)
            if record is None:
                continue
            if name is None or name in _RESPONSES_FINAL:
                usage = _openai_usage(record)
                if usage is not None:
                    self._final = usage
                    return
                if name is not None:
                    continue
            if not _is_anthropic(record):
                continue
            for field in _ANTHROPIC_FIELDS:
                if field in record:
                    self._anthropic[field] = _count(record[field])
            if name != b"message_start":
                self._anthropic_final = True  # message_delta: cumulative counts, the latest wins
            return

    def _extract_content(self, window: bytes) -> None:
        if self._content_bytes >= _MAX_CONTENT_BYTES:
            self._blind_bytes += len(window) // 4  # content is a fraction of the event bytes
            self.limited = True
            return
        found = _CONTENT[self._kind].findall(window)
        self._content += found
        self._content_bytes += sum(map(len, found))
        if self._content_bytes >= _MAX_CONTENT_BYTES:
            self.limited = True

    # -- result ---------------------------------------------------------------------------------------

    def finish(self) -> Usage:
        """The usage of the whole response; idempotent, never raises."""
        if self._result is None:
            try:
                self._result = self._finish()
            except Exception:  # defensive: a bug must not fail the response; charge the hint
                self.limited = True
                self._result = Usage(prompt_tokens=self._prompt_hint, source="estimated")
            self._buf = bytearray()
            self._content = []
            self._last_window = b""
        return self._result

    def _finish(self) -> Usage:
        if self._deflate_head:  # fewer than two bytes of a deflate body
            self.undecodable = True
        if self._decoder is not None:
            try:
                tail = self._decoder.flush()
            except zlib.error:
                tail = b""
                self.undecodable = True
            self._decoder = None
            if tail:
                self._ingest(tail[: max(0, MAX_DECODED_BYTES - self._decoded)])
        if self.undecodable and self._total == 0:
            return Usage(prompt_tokens=self._prompt_hint, source="estimated")
        if self._mode == _SNIFF:
            self._sniff()
            if self._mode == _SNIFF:  # nothing but blank bytes: a stream cut off before its first event
                return Usage(prompt_tokens=self._prompt_hint, source="estimated")
        if self._mode == _JSON:
            return self._finish_json()
        self._drain(final=True)
        if self._final is not None:
            return self._final
        if self._anthropic_final and self._anthropic:
            return _anthropic_usage(self._anthropic)
        completion = self._counted_completion()
        if self._anthropic:  # message_start seen: the prompt is exact, the completion is not
            partial = _anthropic_usage(self._anthropic, "estimated")
            return Usage(
                prompt_tokens=partial.prompt_tokens,
                cached_prompt_tokens=partial.cached_prompt_tokens,
                cache_write_tokens=partial.cache_write_tokens,
                completion_tokens=max(completion, partial.completion_tokens),
                source="estimated",
            )
        if self._total and not self._saw_sse:
            return Usage(source="none")  # not an event stream: an HTML error page, garbage
        if self.saw_error and completion == 0:
            return Usage(source="none")
        return Usage(prompt_tokens=self._prompt_hint, completion_tokens=completion, source="estimated")

    def _counted_completion(self) -> int:
        if self._last_window:
            self._scan_unsettled(self._last_window)
        total = round(self._blind_bytes / 4)
        if not self._content:
            return total
        joined = b'["' + b'","'.join(self._content) + b'"]'
        try:
            parts = _lenient.decode(joined.decode("utf-8", "replace"))
        except (ValueError, RecursionError):
            parts = []
            for literal in self._content:
                try:
                    parts.append(_lenient.decode('"' + literal.decode("utf-8", "replace") + '"'))
                except (ValueError, RecursionError):
                    total += round(len(literal) / 4)
        text = "".join(part for part in parts if isinstance(part, str))
        counter = self._count_tokens or estimate_tokens
        try:
            return total + max(0, int(counter(text)))
        except Exception:  # a caller-supplied counter failed: fall back to the estimate
            return total + estimate_tokens(text)

    def _finish_json(self) -> Usage:
        self._trim_json()
        body = bytes(self._buf)
        if not self._trimmed:
            obj = loads_bounded(body, MAX_BODY_BYTES)
            if obj is None:
                return Usage(source="none")  # malformed, truncated or too deep
            return self._usage_from_document(obj)
        # Too large to keep whole: the usage record sits at the end of every provider's document, a
        # member of the top-level object (what follows it closes exactly one object).
        matches = list(_USAGE_OBJECT.finditer(body))
        for match in reversed(matches[-_CANDIDATES:]):
            record = _record_at(body[match.end() - 1 :], 1)
            if record is None:
                continue
            usage = record_usage(record)
            if usage is not None:
                return usage
        completion = round(self._blind_bytes / 4) + estimate_tokens(body)
        return Usage(prompt_tokens=self._prompt_hint, completion_tokens=completion, source="estimated")

    def _usage_from_document(self, obj: object) -> Usage:
        if not isinstance(obj, dict):
            return Usage(source="none")
        if isinstance(obj.get("error"), dict) or obj.get("type") == "error":
            self.saw_error = True
            return Usage(source="none")
        record = obj.get("usage")
        if (
            not isinstance(record, dict)
            and isinstance(obj.get("response"), dict)
            and isinstance(obj.get("type"), str)
            and obj["type"].encode() in _RESPONSES_FINAL
        ):
            record = obj["response"].get("usage")  # a final Responses event posted as a document
        if isinstance(record, dict):
            usage = record_usage(record)
            if usage is not None:
                return usage
        if obj.get("status") == "failed":
            self.saw_error = True
            return Usage(source="none")
        text = _document_text(obj)
        if not text:
            return Usage(source="none")
        counter = self._count_tokens or estimate_tokens
        try:
            completion = max(0, int(counter(text)))
        except Exception:
            completion = estimate_tokens(text)
        return Usage(prompt_tokens=self._prompt_hint, completion_tokens=completion, source="estimated")


def usage_from_body(
    body: bytes,
    *,
    content_type: str | None,
    content_encoding: str | None,
    prompt_tokens_hint: int = 0,
    count_tokens: Callable[[str], int] | None = None,
) -> Usage:
    """The usage of a complete response body (JSON or SSE, gzip/deflate decoded); never raises.

    Identical to feeding the same bytes to StreamUsage in any split (short of the hard limits, which
    bound the stream's buffers but not a body already in memory). A malformed JSON document, or a body
    that is neither JSON nor an event stream, gives Usage(source="none").
    """
    if not isinstance(body, bytes | bytearray | memoryview):
        return Usage(source="none")
    parser = StreamUsage(
        content_encoding=content_encoding,
        prompt_tokens_hint=prompt_tokens_hint,
        count_tokens=count_tokens,
        content_type=content_type,
        # The whole body is here: read it as one final window, so content is extracted only if the
        # body turns out to have no usage record.
        window=len(body) + 1,
    )
    parser.feed(body)
    return parser.finish()
