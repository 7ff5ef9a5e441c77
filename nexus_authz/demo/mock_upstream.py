"""A mock OpenAI/Anthropic-compatible LLM upstream for the demo, the end-to-end tests and the benchmarks.

It is the baseline of the latency benchmarks (Envoy -> mock with and without nexus-authz), so it is
built like the fast path itself: an asyncio Protocol on uvloop with httptools parsing, keep-alive, no
framework, and a synchronous reply when no delay is asked for.

Endpoints:
  POST /v1/chat/completions  OpenAI chat completion; with "stream": true, SSE: a role chunk, one chunk
                             per content token, a finish chunk, then (when stream_options.include_usage
                             is true or the mock runs with always_usage) a usage chunk with
                             "choices": [], then ``data: [DONE]``.
  POST /v1/messages          Anthropic message; SSE: message_start (input usage), content_block_start,
                             ping, content_block_delta per token, content_block_stop, message_delta
                             (cumulative usage), message_stop.
  POST /v1/responses         OpenAI Responses; SSE ends with response.completed (response.incomplete
                             when max_output_tokens cut the reply, as the real API does).
  GET  /v1/models            a fixed model list.
  GET  /healthz              "ok" (readiness probe; not recorded).
  GET/DELETE /__mock__/requests   the recorded requests (JSON list, newest last) / clear them.

Usage is deterministic so tests can predict it exactly (see prompt_tokens() and completion_tokens()):
prompt tokens = max(1, ceil(len(compact JSON of the prompt) / 4)) where the prompt is ``messages``
(chat), ``messages`` or ``[system, messages]`` (Anthropic) and ``input`` or ``[instructions, input]``
(Responses); completion tokens = the number of tokens of the fixed REPLY_TOKENS it emits, capped by
``max_completion_tokens``/``max_tokens``/``max_output_tokens``.

Per-request test knobs (request headers): ``x-mock-delay-ms`` (before the response),
``x-mock-chunk-delay-ms`` (between SSE events), ``x-mock-status`` (answer this error status with an
API-shaped error body), ``x-mock-cut-after`` (close the connection after N SSE events, mid-stream).

Fixture replay (token-accounting conformance through a real proxy), when the mock runs with a fixtures
directory (``MockOptions.fixtures_dir``, ``--fixtures-dir``): ``x-mock-fixture: NAME`` answers any POST
with that file of the directory as the body (``.sse``: text/event-stream, otherwise application/json;
status 200 or ``x-mock-status``), sent in HTTP chunks of ``x-mock-chunk-bytes`` bytes (default: one
chunk), ``x-mock-content-encoding: gzip|deflate`` compressing it first (the chunks then split the
compressed bytes); ``x-mock-chunk-delay-ms`` and ``x-mock-cut-after`` (N chunks) apply to those chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import signal
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, cast

import httptools
import uvloop

from nexus_authz.demo.mock_replies import (
    _API_OF_PATH,
    _JSON,
    _SSE,
    MODELS,
    REPLY_TEXT,
    REPLY_TOKENS,
    MockOptions,
    _chat,
    _ClientError,
    _compact,
    _error_body,
    _messages,
    _models,
    _Reply,
    _responses,
    completion_tokens,
    prompt_tokens,
)

__all__ = [
    "MODELS",
    "REPLY_TEXT",
    "REPLY_TOKENS",
    "MockOptions",
    "MockUpstream",
    "MockUpstreamThread",
    "completion_tokens",
    "main",
    "prompt_tokens",
    "serve",
    "start",
    "start_in_thread",
]

_MAX_RECORDED_BODY = 16 * 1024


# --- recording --------------------------------------------------------------------------------------------


class _Recorder:
    """A bounded ring of what the upstream saw; read from other threads, hence the lock."""

    __slots__ = ("_lock", "_ring")

    def __init__(self, limit: int) -> None:
        self._ring: deque[dict[str, Any]] = deque(maxlen=max(0, limit))
        self._lock = threading.Lock()

    def add(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._ring.append(entry)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._ring)

    def clear(self) -> None:
        with self._lock:
            self._ring.clear()


# --- the server -------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _State:
    options: MockOptions
    recorder: _Recorder
    counter: int = 0
    connections: set[_Connection] = field(default_factory=set)


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: parse with httptools, answer requests strictly in order."""

    __slots__ = (
        "_body",
        "_busy",
        "_headers",
        "_parser",
        "_queue",
        "_state",
        "_task",
        "_transport",
        "_url",
    )

    def __init__(self, state: _State) -> None:
        self._state = state
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._body = bytearray()
        self._queue: deque[tuple[str, str, list[tuple[str, str]], bytes, bool]] = deque()
        self._busy = False
        self._task: asyncio.Task[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self._state.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._state.connections.discard(self)
        self._transport = None
        if self._task is not None:
            self._task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._write_and_close(400, b"upgrade not supported")
        except httptools.HttpParserError:
            too_large = len(self._body) >= self._state.options.max_body_bytes
            self._write_and_close(413 if too_large else 400, b"body too large" if too_large else b"malformed")

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = bytearray()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        room = self._state.options.max_body_bytes - len(self._body)
        if len(body) > room:
            self._body += body[:room]  # now full: data_received answers 413
            raise httptools.HttpParserError("body too large")
        self._body += body

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode("latin-1")
        item = (method, self._url.decode("latin-1"), self._headers, bytes(self._body))
        self._queue.append((*item, bool(self._parser.should_keep_alive())))
        if not self._busy:
            self._drain()

    # answering
    def _drain(self) -> None:
        while self._queue and self._transport is not None:
            method, url, headers, body, keep_alive = self._queue.popleft()
            reply = _handle(self._state, method, url, headers, body)
            if reply.delay or reply.chunk_delay or reply.cut_after is not None:
                self._busy = True
                self._task = asyncio.get_running_loop().create_task(self._send_slowly(reply, keep_alive))
                return
            self._transport.write(_serialize(reply, keep_alive))
            if not keep_alive:
                self._transport.close()
                return

    async def _send_slowly(self, reply: _Reply, keep_alive: bool) -> None:
        try:
            if reply.delay:
                await asyncio.sleep(reply.delay)
            transport = self._transport
            if transport is None:
                return
            if reply.events is None:
                transport.write(_serialize(reply, keep_alive))
            else:
                transport.write(_head(reply.status, reply.content_type, None, keep_alive, reply.encoding))
                for sent, event in enumerate(reply.events):
                    if reply.cut_after is not None and sent >= reply.cut_after:
                        transport.abort()
                        return
                    if sent and reply.chunk_delay:
                        await asyncio.sleep(reply.chunk_delay)
                        if self._transport is None:
                            return
                    transport.write(b"%x\r\n%b\r\n" % (len(event), event))
                transport.write(b"0\r\n\r\n")
            if not keep_alive:
                transport.close()
                return
        finally:
            self._busy = False
            self._task = None
        self._drain()

    def _write_and_close(self, status: int, message: bytes) -> None:
        if self._transport is not None:
            self._transport.write(_serialize(_Reply(status, "text/plain", message), False))
            self._transport.close()


def _head(
    status: int, content_type: str, length: int | None, keep_alive: bool, encoding: str | None = None
) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    framing = f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
    extra = "" if keep_alive else "connection: close\r\n"
    sse = "cache-control: no-cache\r\n" if length is None else ""
    if encoding:
        extra += f"content-encoding: {encoding}\r\n"
    return (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: {content_type}\r\n{framing}\r\n{sse}{extra}\r\n"
    ).encode("latin-1")


def _serialize(reply: _Reply, keep_alive: bool) -> bytes:
    if reply.events is None:
        return (
            _head(reply.status, reply.content_type, len(reply.body), keep_alive, reply.encoding) + reply.body
        )
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(event), event) for event in reply.events)
    head = _head(reply.status, reply.content_type, None, keep_alive, reply.encoding)
    return head + chunks + b"0\r\n\r\n"


def _header_number(headers: dict[str, str], name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _handle(state: _State, method: str, url: str, header_list: list[tuple[str, str]], body: bytes) -> _Reply:
    path = url.split("?", 1)[0]
    if path == "/healthz":
        return _Reply(200, "text/plain", b"ok")
    if path == "/__mock__/requests":
        if method == "DELETE":
            state.recorder.clear()
            return _Reply(200, _JSON, b"[]")
        return _Reply(200, _JSON, _compact(state.recorder.snapshot()).encode())

    headers: dict[str, str] = {}
    for name, value in header_list:
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if state.options.record_limit:
        state.recorder.add(
            {
                "method": method,
                "path": url,
                "headers": headers,
                "body": body[:_MAX_RECORDED_BODY].decode("utf-8", "replace"),
                "time": time.time(),
            }
        )
    state.counter += 1
    reply = _route(state, method, path, headers, body)
    if headers.keys() & _KNOBS:
        delay = _header_number(headers, "x-mock-delay-ms")
        chunk_delay = _header_number(headers, "x-mock-chunk-delay-ms")
        cut_after = _header_number(headers, "x-mock-cut-after")
        if delay is not None:
            reply.delay = delay / 1000
        if chunk_delay is not None:
            reply.chunk_delay = chunk_delay / 1000
        if cut_after is not None and reply.events is not None:
            reply.cut_after = int(cut_after)
    return reply


_KNOBS = frozenset({"x-mock-delay-ms", "x-mock-chunk-delay-ms", "x-mock-cut-after"})


def _fixture(directory: str, headers: dict[str, str]) -> _Reply:
    """Replay a recorded response body from `directory`, chunked and optionally compressed."""
    name = headers["x-mock-fixture"].strip()
    path = Path(directory) / name
    if "/" in name or "\\" in name or name.startswith(".") or not path.is_file():
        return _Reply(404, _JSON, _error_body("chat", 404, f"unknown fixture {name!r}"))
    body = path.read_bytes()
    encoding = headers.get("x-mock-content-encoding", "").strip().lower() or None
    if encoding in ("gzip", "x-gzip"):
        body = gzip.compress(body)
    elif encoding == "deflate":
        body = zlib.compress(body)
    elif encoding is not None:
        return _Reply(400, _JSON, _error_body("chat", 400, f"unsupported encoding {encoding!r}"))
    forced = _header_number(headers, "x-mock-status")
    status = int(forced) if forced is not None and 200 <= forced < 600 else 200
    size = _header_number(headers, "x-mock-chunk-bytes")
    step = max(1, int(size)) if size is not None else max(1, len(body))
    chunks = [body[i : i + step] for i in range(0, len(body), step)] or [b""]
    content_type = _SSE if name.endswith(".sse") else _JSON
    return _Reply(status, content_type, events=[c for c in chunks if c], encoding=encoding)


def _route(state: _State, method: str, path: str, headers: dict[str, str], body: bytes) -> _Reply:
    opts = state.options
    delay, chunk_delay = opts.delay_ms / 1000, opts.chunk_delay_ms / 1000
    if path == "/v1/models":
        if method != "GET":
            return _Reply(405, _JSON, _error_body("chat", 405, f"{method} not allowed on {path}"))
        reply = _models()
        reply.delay = delay
        return reply
    if "x-mock-fixture" in headers and opts.fixtures_dir and method == "POST":
        return _fixture(opts.fixtures_dir, headers)
    api = _API_OF_PATH.get(path)
    if api is None:
        return _Reply(404, _JSON, _error_body("chat", 404, f"unknown path {path}"))
    if method != "POST":
        return _Reply(405, _JSON, _error_body(api, 405, f"{method} not allowed on {path}"))
    forced = _header_number(headers, "x-mock-status")
    if forced is not None and 400 <= forced < 600:
        status = int(forced)
        return _Reply(status, _JSON, _error_body(api, status, f"mock error {status}"), delay=delay)
    try:
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise _ClientError("request body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise _ClientError("request body must be a JSON object")
        if api == "chat":
            reply = _chat(payload, state.counter, opts)
        elif api == "messages":
            reply = _messages(payload, state.counter)
        else:
            reply = _responses(payload, state.counter)
    except _ClientError as exc:
        return _Reply(exc.status, _JSON, _error_body(api, exc.status, str(exc), exc.param), delay=delay)
    reply.delay = delay
    reply.chunk_delay = chunk_delay
    return reply


# --- running it -------------------------------------------------------------------------------------------


class MockUpstream:
    """A started mock on the current event loop; the port is known even when 0 was asked for."""

    def __init__(self, server: asyncio.Server, state: _State) -> None:
        self._server = server
        self._state = state
        sockname = server.sockets[0].getsockname()
        self.host: str = sockname[0]
        self.port: int = int(sockname[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def requests(self) -> list[dict[str, Any]]:
        return self._state.recorder.snapshot()

    def clear(self) -> None:
        self._state.recorder.clear()

    async def close(self) -> None:
        self._server.close()
        for conn in list(self._state.connections):
            conn.close()
        await self._server.wait_closed()


async def start(host: str = "127.0.0.1", port: int = 0, options: MockOptions | None = None) -> MockUpstream:
    """Start listening on the running loop and return at once."""
    state = _State(options or MockOptions(), _Recorder((options or MockOptions()).record_limit))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Connection(state), host, port, reuse_address=True, backlog=1024
    )
    return MockUpstream(server, state)


async def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    options: MockOptions | None = None,
    *,
    on_ready: Callable[[MockUpstream], None] | None = None,
) -> None:
    """Serve until cancelled."""
    mock = await start(host, port, options)
    if on_ready is not None:
        on_ready(mock)
    try:
        await asyncio.Future()
    finally:
        await mock.close()


class MockUpstreamThread:
    """A mock running on its own uvloop in a daemon thread, for tests and the demo."""

    def __init__(self, host: str, port: int, options: MockOptions) -> None:
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mock: MockUpstream | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(host, port, options), name="mock-upstream", daemon=True
        )
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        if self._mock is None:
            raise RuntimeError("mock upstream did not start within 10 s")
        self.host: str = self._mock.host
        self.port: int = self._mock.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def requests(self) -> list[dict[str, Any]]:
        assert self._mock is not None
        return self._mock.requests()

    def clear(self) -> None:
        assert self._mock is not None
        self._mock.clear()

    def _run(self, host: str, port: int, options: MockOptions) -> None:
        loop = uvloop.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main(host, port, options))
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self, host: str, port: int, options: MockOptions) -> None:
        self._stop = asyncio.Event()
        self._mock = await start(host, port, options)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self._mock.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self, timeout: float = 5.0) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> MockUpstreamThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_in_thread(host: str = "127.0.0.1", port: int = 0, **options: Any) -> MockUpstreamThread:
    """Start a mock in a background thread; options are MockOptions fields. Use as a context manager."""
    return MockUpstreamThread(host, port, MockOptions(**options))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m nexus_authz.demo.mock_upstream", description="Mock OpenAI/Anthropic upstream."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--always-usage",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="send the usage chunk in chat streams even without stream_options.include_usage",
    )
    parser.add_argument("--delay-ms", type=float, default=0.0, help="delay before each response")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between SSE events")
    parser.add_argument("--record-limit", type=int, default=1000, help="requests kept for /__mock__/requests")
    parser.add_argument(
        "--fixtures-dir", default=None, help="directory of response bodies x-mock-fixture replays"
    )
    args = parser.parse_args(argv)
    options = MockOptions(
        always_usage=args.always_usage,
        delay_ms=args.delay_ms,
        chunk_delay_ms=args.chunk_delay_ms,
        record_limit=args.record_limit,
        fixtures_dir=args.fixtures_dir,
    )

    async def run() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)

        def ready(mock: MockUpstream) -> None:
            print(f"mock upstream listening on {mock.url}", flush=True)

        with contextlib.suppress(asyncio.CancelledError):
            await serve(args.host, args.port, options, on_ready=ready)

    uvloop.run(run())


if __name__ == "__main__":
    main()
