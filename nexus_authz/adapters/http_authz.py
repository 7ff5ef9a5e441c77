"""The fast path: Envoy HTTP ext_authz (`http_service`) and nginx `auth_request` on a lean asyncio Protocol.

No web framework: `httptools` parses, a Protocol per connection keeps the parser and a few fields, and
answers are assembled from cached byte strings (the allow header block of each key, the whole response of
each fixed denial). Measured on this machine, this costs ~40 µs of Python CPU per request behind Envoy
against ~140 µs for aiohttp and ~470 µs for grpc.aio (see the performance issue and benchmarks/).

Routes of the proxy listeners (the Unix socket, `listen.http_tcp`):
  /ext_authz/<original path>   Envoy http_service with `path_prefix: /ext_authz` (the default config)
  /v1/nginx/auth               nginx auth_request (original method/URI in X-Original-Method/-URI;
                               a denial is 401/403 with the real status and body in x-nexus-* headers)
  anything else                treated as an ext_authz check of that path (Envoy without a path prefix)
The admin listener (`admin` set) answers /healthz, /readyz and /metrics and 404 to everything else: it
never decides a check (an allowed check carries the provider credential), never reads a key, never feeds
the brute-force throttle, and never believes an x-forwarded-for (issue 13).

A response to HEAD carries the header block of the answer (content-length included) and no body bytes:
a body there would be read by the proxy as the start of the next answer on the keep-alive connection.

Limits: header block, header count, URL and body sizes are capped; a request over a cap gets 413/431/414
and the connection is closed. Malformed HTTP gets 400 and a close. Everything a client sends through the
proxy is a decision, never an exception.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from time import perf_counter

import httptools

from nexus_authz.adapters import answers
from nexus_authz.adapters.answers import ALLOW_CACHE, DENY_CACHE, AnswerCache, allow_block, nginx_denial
from nexus_authz.adapters.answers import error_json as _error_json
from nexus_authz.adapters.answers import head_answer as _head_answer
from nexus_authz.adapters.answers import header_block as _header_block
from nexus_authz.adapters.answers import simple_response as _simple_response
from nexus_authz.adapters.answers import status_line as _status_line
from nexus_authz.core.forwarded import cut_by_proxy
from nexus_authz.core.keys import KEY_HEADERS
from nexus_authz.core.model import Decision, KeyRecord, Reason, Request, new_request
from nexus_authz.engine import Engine
from nexus_authz.latency import LOOP_BUSY

log = logging.getLogger("nexus_authz.http")

EXT_AUTHZ_PREFIX = "/ext_authz"
# The Lua usage tap's early release of a concurrency slot (POST, header `x-nexus-release: 1`, the request
# id as the body); see envoy/nexus-usage.lua and ReservationBook.release.
RELEASE_PATH = "/_nexus/release"
_BUSY = LOOP_BUSY.http  # how long each read holds the event loop (framing, decision, answer)
_RELEASED = b"HTTP/1.1 204 No Content\r\n\r\n"
NGINX_PATH = "/v1/nginx/auth"
MAX_HEADERS = 128
# The request headers a decision can read (keys, body type, ids, addresses, what Envoy says of the body,
# nginx's original request line). Others are counted against the limits and otherwise ignored.
_KEEP: dict[bytes, str] = {
    name.encode(): name
    for name in (
        *KEY_HEADERS,
        "content-type",
        "content-encoding",
        "x-request-id",
        "x-forwarded-for",
        "x-real-ip",
        "x-envoy-auth-partial-body",
        "x-nexus-content-length",
        "x-original-uri",
        "x-original-method",
        "x-nexus-release",
        "x-nexus-rewrite",  # Envoy's ext_authz says its Lua filter applies clamps (core/clamp.py)
    )
}
MAX_URL = 16 * 1024
LINGER = 2.0  # seconds a connection closed after an answer still reads (and discards) what the peer sends

_INTERNAL_ERROR = _simple_response(500, _error_json(500, "internal_error", "Internal error."), close=True)
_PARSE_ERROR = _simple_response(
    400, _error_json(400, "malformed_http", "Malformed HTTP request."), close=True
)
_HEADERS_TOO_LARGE = _simple_response(
    431, _error_json(431, "headers_too_large", "Request headers too large."), close=True
)
_URL_TOO_LONG = _simple_response(414, _error_json(414, "uri_too_long", "Request URI too long."), close=True)
_BODY_TOO_LARGE = _simple_response(
    413, _error_json(413, "body_too_large", "Request body too large for the policy check."), close=True
)
_NOT_FOUND = _simple_response(404, _error_json(404, "not_found", "Not found."))


# The protocol class of the listeners: the compiled HTTP/1.1 framing when it built (adapters/http_native.py,
# nexus_authz/native/), else AuthzProtocol below; chosen at the first connection (tests may set it).
PROTOCOL: type[AuthzProtocol] | None = None


def _select_protocol() -> type[AuthzProtocol]:
    global PROTOCOL
    from nexus_authz.adapters.http_native import protocol_class

    PROTOCOL = protocol_class()
    return PROTOCOL


class HttpApp:
    """What every connection of one listener shares: the engine, limits, caches, and admin handlers."""

    __slots__ = (
        "_allow_cache",
        "_deny_cache",
        "_nginx_cache",
        "admin",
        "connections",
        "draining",
        "engine",
        "h2",
        "loop",
        "max_body",
        "max_header_bytes",
        "metrics_text",
        "readiness",
    )

    def __init__(
        self,
        engine: Engine,
        *,
        max_header_bytes: int,
        max_body: int,
        admin: bool = False,
        readiness: Callable[[], tuple[bool, str]] | None = None,
        metrics_text: Callable[[], bytes | Awaitable[bytes]] | None = None,
    ) -> None:
        self.engine = engine
        self.max_header_bytes = max_header_bytes
        self.max_body = max_body
        self.admin = admin
        self.readiness = readiness
        self.metrics_text = metrics_text
        self.connections: set[AuthzProtocol] = set()
        self.draining = False  # shutting down: every answer closes its connection
        self._allow_cache: AnswerCache[bytes] = AnswerCache(ALLOW_CACHE)  # Envoy's allow header blocks
        self._nginx_cache: AnswerCache[bytes] = AnswerCache(ALLOW_CACHE)  # nginx's, only once it asks
        self._deny_cache: AnswerCache[bytes] = AnswerCache(DENY_CACHE)
        self.loop: asyncio.AbstractEventLoop | None = None
        # when this listener takes HTTP/2 too: its connections' factory (h2_listener.H2Receiver.factory)
        self.h2: Callable[[], asyncio.Protocol] | None = None

    def protocol(self) -> AuthzProtocol:
        return (PROTOCOL or _select_protocol())(self)

    # -- response assembly ------------------------------------------------------------------------
    def allow_block(self, key: KeyRecord, *, nginx: bool = False) -> bytes:
        """`key`'s allow header block: Envoy's, or nginx's (built once nginx asks); cached per snapshot."""
        cache = self._nginx_cache if nginx else self._allow_cache
        block = cache.get(key, self.engine.snapshot)
        if block is None:
            block = allow_block(key, nginx=nginx)
            cache.put(key, block)  # bounded (answers.AnswerCache)
        return block

    def response(self, decision: Decision, *, nginx: bool, close: bool) -> bytes:
        extra = _header_block(decision.response_headers) if decision.response_headers else b""
        tail = answers.CLOSING_TAIL if close else answers.TAIL
        if decision.allowed and decision.key is not None:
            if nginx:
                return self.allow_block(decision.key, nginx=True) + extra + tail
            if decision.release:  # Envoy puts it in dynamic metadata for the Lua tap (not forwarded)
                extra += b"x-nexus-release: %s\r\n" % decision.release.encode("latin-1")
            if decision.clamp:  # the same: the Lua filter lowers the body's completion cap
                extra += b"x-nexus-clamp: %s\r\n" % decision.clamp.encode("latin-1")
            return self.allow_block(decision.key) + extra + tail
        if not extra and not close:
            cached = self._deny_cache.get(decision)
            if cached is None:
                cached = self._denial(decision, b"", close=False)
                self._deny_cache.put(decision, cached)
            return cached
        return self._denial(decision, extra, close=close)

    @staticmethod
    def _denial(decision: Decision, extra: bytes, *, close: bool) -> bytes:
        body = decision.body
        return b"".join(
            (
                _status_line(decision.status),
                b"content-type: application/json\r\n",
                b"x-nexus-reason: %s\r\n" % decision.reason.value.encode(),
                extra,
                b"connection: close\r\n" if close else b"",
                b"content-length: %d\r\n\r\n" % len(body),
                body,
            )
        )


class AuthzProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection (keep-alive, pipelining in order)."""

    __slots__ = (
        "_app",
        "_body",
        "_body_size",
        "_closing",
        "_head_bytes",
        "_header_bytes",
        "_header_count",
        "_outbox",
        "_headers",
        "_in_head",
        "_in_message",
        "_paused",
        "_parser",
        "_transport",
        "_url",
        "last_active",
    )

    def __init__(self, app: HttpApp) -> None:
        self._app = app
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._header_count = 0
        self._outbox: deque[tuple[bytes | asyncio.Future[bytes], bool]] | None = None
        self._in_message = False  # a request has begun and is not complete
        self._in_head = False  # a request has begun and its header block has not ended
        self._head_bytes = 0  # bytes received for that header block (-1: it began in the current read)
        self._body: list[bytes] = []
        self._body_size = 0
        self._closing = False
        self._paused = False
        self.last_active = 0.0

    # -- asyncio.Protocol -----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._app.connections.add(self)
        loop = self._app.loop
        self.last_active = loop.time() if loop is not None else 0.0

    def connection_lost(self, exc: Exception | None) -> None:
        self._app.connections.discard(self)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        started = perf_counter()
        cpu_clock, observe_cpu = LOOP_BUSY.cpu_timer("http")  # own CPU, if measured (metrics.loop_cpu_time)
        cpu_started = cpu_clock()
        self._feed(data)
        observe_cpu(cpu_clock() - cpu_started)
        _BUSY.observe(perf_counter() - started)

    def _feed(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request was answered; what follows is not HTTP/1.1 we speak, so hang up.
            self._closing = True
            if self._transport is not None:
                self._hang_up(self._transport)
        except httptools.HttpParserError:
            if not self._closing:
                self._fail(_PARSE_ERROR)
            return
        if self._in_head and not self._closing:
            # httptools buffers a header until it ends, so on_header's limits come too late for one header
            # (or a URL) that never ends: count the raw bytes of an unfinished head, read by read (the read
            # it began in is not counted: it may hold earlier pipelined requests).
            if self._head_bytes < 0:
                self._head_bytes = 0
            else:
                self._head_bytes += len(data)
                if self._head_bytes > self._app.max_header_bytes + MAX_URL + 1024:
                    self._fail(_HEADERS_TOO_LARGE)

    def pause_writing(self) -> None:
        # The peer is not reading its answers: stop reading its requests until it catches up.
        if self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None and self._paused:
            self._paused = False
            self._transport.resume_reading()

    # -- httptools callbacks --------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._header_bytes = 0
        self._header_count = 0
        self._in_message = True
        self._in_head = True
        self._head_bytes = -1
        self._body = []
        self._body_size = 0

    def on_headers_complete(self) -> None:
        self._in_head = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_URL:
            self._fail(_URL_TOO_LONG)

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called once per header from C: only the headers a decision reads are decoded and kept (Envoy
        # also sends its own x-envoy-* and the client's host and length, which nothing here needs).
        self._header_bytes += len(name) + len(value) + 4
        self._header_count += 1
        if self._header_bytes > self._app.max_header_bytes or self._header_count > MAX_HEADERS:
            self._fail(_HEADERS_TOO_LARGE)
            return
        key = _KEEP.get(name)  # Envoy sends lower-case names: one probe
        if key is None:
            key = _KEEP.get(name.lower())  # nginx keeps the client's case
            if key is None:
                return
        headers = self._headers
        text = value.decode("latin-1")
        previous = headers.get(key)
        headers[key] = text if previous is None else previous + ", " + text

    def on_body(self, body: bytes) -> None:
        if self._closing:  # refused already; httptools parses the rest of the read
            return
        self._body_size += len(body)
        if self._body_size > self._app.max_body:
            self._fail(_BODY_TOO_LARGE)
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        if self._closing:
            return
        transport = self._transport
        if transport is None:
            return
        app = self._app
        keep_alive = self._parser.should_keep_alive() and not app.draining
        url = self._url.decode("latin-1")
        try:
            out = self._route(url, not keep_alive)
        except Exception:  # a bug: answer 500 for this request, keep serving the others
            log.exception("internal error in the HTTP check")
            app.engine.count(Reason.UNAVAILABLE)
            out = _INTERNAL_ERROR
            keep_alive = False
        if self._parser.get_method() == b"HEAD":  # the answer's header block only, no body bytes
            out = _head_answer(out) if out.__class__ is bytes else _head_later(out)  # type: ignore[arg-type]
        if out.__class__ is not bytes or self._outbox:
            # The answer waits for the counter store (Redis), or an earlier one does: answers leave in
            # request order (HTTP/1.1 pipelining), from the outbox.
            self._queue(out, keep_alive)  # type: ignore[arg-type]
            return
        transport.write(out)
        if not keep_alive:
            self._closing = True
            self._hang_up(transport)
        loop = app.loop
        if loop is not None:
            self.last_active = loop.time()

    def _queue(self, out: bytes | Awaitable[bytes], keep_alive: bool) -> None:
        outbox = self._outbox
        if outbox is None:
            outbox = self._outbox = deque()
        if out.__class__ is not bytes:
            task = asyncio.ensure_future(out)  # type: ignore[arg-type]
            task.add_done_callback(self._flush_outbox)
            outbox.append((task, keep_alive))
        else:
            outbox.append((out, keep_alive))  # type: ignore[arg-type]
            self._flush_outbox()

    def _flush_outbox(self, _: object = None) -> None:
        outbox = self._outbox
        while outbox:
            out, keep_alive = outbox[0]
            if out.__class__ is not bytes:
                if not out.done():  # type: ignore[union-attr]
                    return
                try:
                    out = out.result()  # type: ignore[union-attr]
                except Exception:
                    log.exception("internal error in the HTTP check")
                    self._app.engine.count(Reason.UNAVAILABLE)
                    out, keep_alive = _INTERNAL_ERROR, False
            outbox.popleft()
            transport = self._transport
            if transport is None or self._closing:
                outbox.clear()
                return
            transport.write(out)  # type: ignore[arg-type]
            if not keep_alive:
                self._closing = True
                outbox.clear()
                self._hang_up(transport)
                return

    async def _answer_later(self, pending: Awaitable[Decision], *, nginx: bool, close: bool) -> bytes:
        decision = await pending
        if nginx and not decision.allowed:
            return nginx_denial(decision, close=close)
        return self._app.response(decision, nginx=nginx, close=close)

    # -- routing ------------------------------------------------------------------------------------
    def _route(self, url: str, close: bool) -> bytes | Awaitable[bytes]:
        app = self._app
        if app.admin:  # health and metrics only: never a check (issue 13.1)
            handler = _ADMIN_PATHS.get(url.partition("?")[0])
            return _NOT_FOUND if handler is None else handler(app)
        headers = self._headers
        body = b"".join(self._body) if self._body else b""
        if url == RELEASE_PATH and headers.get("x-nexus-release") == "1":
            return self._release(body)
        if url.startswith(EXT_AUTHZ_PREFIX):
            path = url[len(EXT_AUTHZ_PREFIX) :] or "/"
            if path[0] != "/":
                path = "/" + path
        elif url == NGINX_PATH or url.startswith(NGINX_PATH + "?"):
            return self._nginx(headers, close)
        else:
            path = url
        raw_method = self._parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("latin-1")
        truncated = cut_by_proxy(headers, body)
        request = new_request(
            method, path, headers, body, truncated, headers.get("x-request-id", ""), _client_address(headers)
        )
        decision = app.engine.check_fast(request)
        if decision.__class__ is not Decision:
            return self._answer_later(decision, nginx=False, close=close)  # type: ignore[arg-type]
        return app.response(decision, nginx=False, close=close)  # type: ignore[arg-type]

    def _release(self, body: bytes) -> bytes:
        # The Lua usage tap, as the response ends: free the request's concurrency slot. 204, never 200:
        # if a client ever reached this path through an ext_authz without a path prefix, Envoy would
        # take the answer as a denial, not as an admission.
        self._app.engine.release(body.decode("latin-1"))
        return _RELEASED

    def _nginx(self, headers: dict[str, str], close: bool) -> bytes | Awaitable[bytes]:
        # nginx's auth_request subrequest carries no body; the original URI and method come in headers.
        # nginx cannot rewrite a body: whatever says otherwise came from the client.
        headers.pop("x-nexus-rewrite", None)
        app = self._app
        request = Request(
            method=headers.get("x-original-method", "GET"),
            path=headers.get("x-original-uri", "/"),
            headers=headers,
            request_id=headers.get("x-request-id", ""),
            client_address=headers.get("x-real-ip", "") or _client_address(headers),
        )
        decision = app.engine.check_fast(request)
        if decision.__class__ is not Decision:
            return self._answer_later(decision, nginx=True, close=close)  # type: ignore[arg-type]
        if decision.allowed:  # type: ignore[union-attr]
            return app.response(decision, nginx=True, close=close)  # type: ignore[arg-type]
        return nginx_denial(decision, close=close)  # type: ignore[arg-type]

    def _fail(self, response: bytes) -> None:
        # Once only: httptools keeps calling back for the rest of the read (more headers over the limit...).
        if self._closing:
            return
        self._closing = True
        transport = self._transport
        if transport is not None:
            transport.write(response)
            self._hang_up(transport)

    def _hang_up(self, transport: asyncio.Transport) -> None:
        """Close after a last answer, lingering: stop writing now (the peer reads the answer, then EOF)
        and stop reading LINGER seconds later (what arrives meanwhile is discarded). Closing at once
        would make the kernel reset a connection the peer is still writing the rest of its request to,
        and the peer would lose the answer (413, 431, ...) already sent."""
        loop = self._app.loop
        if loop is None or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        loop.call_later(LINGER, transport.close)

    def close_if_idle(self, *, between_requests: bool = False) -> None:
        """Close the connection (idle sweep); with `between_requests`, only if no request is partly
        received or waiting for its answer (a shutdown answers those first)."""
        busy = self._in_message or bool(self._outbox)
        if self._transport is not None and not self._closing and not (between_requests and busy):
            self._closing = True
            self._transport.close()


async def _head_later(pending: Awaitable[bytes]) -> bytes:
    return _head_answer(await pending)


_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")}


def _client_address(headers: dict[str, str]) -> str:
    xff = headers.get("x-forwarded-for")
    if not xff:
        return ""
    return xff.rpartition(",")[2].strip()


def _healthz(app: HttpApp) -> bytes:
    return _simple_response(200, b'{"status":"ok"}')


def _readyz(app: HttpApp) -> bytes:
    ready, detail = app.readiness() if app.readiness is not None else (True, "ok")
    body = b'{"ready":%s,"detail":"%s"}' % (b"true" if ready else b"false", detail.encode("ascii", "replace"))
    return _simple_response(200 if ready else 503, body)


def _metrics(app: HttpApp) -> bytes | Awaitable[bytes]:
    text = app.metrics_text() if app.metrics_text is not None else None  # the server's: an awaitable
    if text is None or isinstance(text, bytes):  # (rendered in slices of the loop: metrics.render_sliced)
        return _NOT_FOUND if text is None else _simple_response(200, text, content_type=_TEXT_PLAIN)
    return _metrics_later(text)


async def _metrics_later(text: Awaitable[bytes]) -> bytes:
    return _simple_response(200, await text, content_type=_TEXT_PLAIN)


_TEXT_PLAIN = b"text/plain; version=0.0.4; charset=utf-8"
_ADMIN_PATHS: dict[str, Callable[[HttpApp], bytes | Awaitable[bytes]]] = {
    "/healthz": _healthz,
    "/readyz": _readyz,
    "/metrics": _metrics,
}


async def serve_unix(app: HttpApp, path: str, mode: int) -> asyncio.AbstractServer:
    """Listen on a Unix socket, replacing a stale socket file left by a previous run, never a live one
    (`unixsock.UnixSocketInUse`): the path is bound here, as the loop would unlink any socket file."""
    import os

    from nexus_authz.unixsock import bind_unix

    loop = asyncio.get_running_loop()
    app.loop = loop
    sock = bind_unix(path)
    try:
        server = await loop.create_unix_server(app.h2 or app.protocol, sock=sock, backlog=1024)
    except BaseException:
        sock.close()
        raise
    os.chmod(path, mode)
    return server


async def serve_tcp(app: HttpApp, host: str, port: int) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    app.loop = loop
    return await loop.create_server(app.h2 or app.protocol, host, port, backlog=1024, reuse_address=True)


async def drain(apps: list[HttpApp], *, idle: float, grace: float) -> None:
    """Shut the connections of these listeners down without cutting a request off.

    From now on every answer carries `connection: close` and ends its connection (so a request already
    sent on a keep-alive connection, even one still unread in the socket's buffer, is answered, and its
    peer stops reusing the connection). Connections with no request for `idle` seconds are closed then,
    between requests; a request still arriving at `grace` is cut off.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    for app in apps:
        app.draining = True
    await asyncio.sleep(min(idle, grace))
    while loop.time() < deadline:
        open_connections = [conn for app in apps for conn in app.connections]
        if not open_connections:
            return
        for conn in open_connections:
            conn.close_if_idle(between_requests=True)
        await asyncio.sleep(0.05)
    for app in apps:
        for conn in list(app.connections):
            conn.close_if_idle()


def close_idle(app: HttpApp, idle_timeout: float, now: float) -> int:
    """Close connections idle for longer than `idle_timeout`; returns how many were closed."""
    stale = [c for c in app.connections if now - c.last_active > idle_timeout]
    for conn in stale:
        conn.close_if_idle()
    return len(stale)
