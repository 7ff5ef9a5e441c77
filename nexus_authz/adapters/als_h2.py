"""Envoy's gRPC calls on the check listener (the access log, gRPC ext_authz): just enough HTTP/2 for
them, on the event loop.

Envoy sends token accounting's access log as one long-lived gRPC stream
(`envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs`, envoy_als). Served by grpc.aio, each
batch also costs gRPC's own threads and their hand-off to the event loop: ~200 µs of CPU per message
(~10 µs per request at 1,000 requests/s with Envoy's 20 ms flush). Here the same stream arrives on the
HTTP listener that answers checks (the Unix socket, or `listen.http_tcp`): a connection that opens with
HTTP/2's preface (`PRI * HTTP/2.0`, which no HTTP/1.1 request starts with) is handed to `H2Connection`,
which speaks the part of HTTP/2 (RFC 9113, cleartext with prior knowledge) an HTTP/2 client such as
Envoy's gRPC client needs: SETTINGS, PING, WINDOW_UPDATE (large windows, topped up as data arrives; the
socket is paused while too much waits to be accounted), HEADERS/CONTINUATION decoded with `hpack`,
RST_STREAM and GOAWAY. Three methods are served:

- `StreamAccessLogs`: each gRPC message goes, serialized, to `AccessLogService.stream_access_logs`, the
  same loop (compiled scan, slices, drain) as on the gRPC port;
- `/nexus.authz.v1.Slots/Release`: the Lua usage tap's early slot release in gRPC mode (a raw request id);
- `/envoy.service.auth.v3.Authorization/Check` (envoy-grpc.yaml): gRPC ext_authz, answered by
  `AuthorizationService.answer` when the request's DATA ends it (or when the counter store has answered),
  HEADERS, the message and the trailers in one write. On the gRPC port grpc.aio's threads cost ~2x the
  CPU per Check (benchmarks/README.md).

Anything else is answered with gRPC status UNIMPLEMENTED. A protocol error ends the connection with
GOAWAY. The frames are parsed in Python: an access-log message carries a batch of entries (~20 at 1,000
requests/s), a Check is two frames; a header block that leaves the HPACK table as it was (Envoy's, after
a connection's first call) is decoded once per connection (`h2_frames.table_neutral`).

The gRPC port stays: Envoy configs that send the access log or Check there (older configs, a standard
gRPC server) are served there as before.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import grpc
import hpack

from nexus_authz.adapters import h2_frames as h2
from nexus_authz.adapters.envoy_als import MAX_MESSAGE_BYTES, SERVICE
from nexus_authz.adapters.envoy_authz import SERVICE as AUTHZ_SERVICE
from nexus_authz.adapters.h2_checks import CheckCalls
from nexus_authz.adapters.h2_frames import GrpcStream

if TYPE_CHECKING:
    from nexus_authz.adapters.h2_listener import H2Receiver

log = logging.getLogger("nexus_authz.als")

__all__ = ["PREFACE", "ALS_PATH", "CHECK_PATH", "RELEASE_PATH", "H2Connection"]

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ALS_PATH: Final = f"/{SERVICE}/StreamAccessLogs"
RELEASE_PATH: Final = "/nexus.authz.v1.Slots/Release"
CHECK_PATH: Final = f"/{AUTHZ_SERVICE}/Check"
_KINDS: Final = {ALS_PATH.encode(): "als", RELEASE_PATH.encode(): "release", CHECK_PATH.encode(): "check"}
#: Bytes received and not yet accounted above which the socket stops being read (until below LOW).
HIGH: Final = 16 << 20
LOW: Final = 4 << 20
#: The bytes of messages begun and not yet whole, all streams of a connection together, at most (Envoy
#: sends one access-log stream per connection; without a bound, 100 streams could hold 400 MiB).
MAX_PARTIAL: Final = 4 * MAX_MESSAGE_BYTES


class H2Connection(CheckCalls, asyncio.Protocol):
    """One HTTP/2 connection from Envoy's gRPC client (see the module)."""

    __slots__ = (
        "_blocks",
        "_buffer",
        "_check_blocks",
        "_continuation",
        "_decoder",
        "_encoder",
        "_goaway_sent",
        "_last_stream",
        "_partial",
        "_paused",
        "_peer_window",
        "_pending",
        "_queued",
        "_receiver",
        "_recv_unacked",
        "_send_window",
        "_started",
        "_streams",
        "_transport",
        "_write_paused",
    )

    def __init__(self, receiver: H2Receiver) -> None:
        self._receiver = receiver
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._started = False  # the preface has been read
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = h2.MAX_HEADER_LIST
        self._encoder = hpack.Encoder()
        self._blocks: dict[bytes, Any] = {}  # table-neutral blocks, decoded (hpack's header list)
        self._check_blocks: set[bytes] = set()  # those of them that open a Check (see _lane)
        self._streams: dict[int, GrpcStream] = {}
        self._last_stream = 0
        # a header block being received: (stream id, flags of its HEADERS, fragments)
        self._continuation: tuple[int, int, list[bytes]] | None = None
        self._recv_unacked = 0  # connection-level bytes received since the last WINDOW_UPDATE
        self._send_window = 65535  # what the peer lets us send (connection level)
        self._peer_window = 65535  # the peer's SETTINGS_INITIAL_WINDOW_SIZE for our sends per stream
        self._pending: deque[tuple[GrpcStream, bytes]] = deque()  # response messages waiting for window
        self._queued = 0  # message bytes received and not yet read by their stream
        self._partial = 0  # bytes of the streams' messages not yet whole (their `buffer`)
        self._paused = False  # reading paused: too much waits to be accounted
        self._write_paused = False  # reading paused: the peer does not read
        self._goaway_sent = False

    # -- asyncio.Protocol -----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._receiver.connections.add(self)
        # our settings, and the connection's window raised from 65,535 to WINDOW
        self._write(h2.settings_frame() + h2.window_update(0, h2.WINDOW - 65535))
        if self._receiver.closing:
            self.goaway(h2.NO_ERROR, close=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._receiver.connections.discard(self)
        self._transport = None
        for stream in list(self._streams.values()):
            self._end_stream(stream)

    def eof_received(self) -> bool:
        return False  # the peer is done: close

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        buffer = self._buffer
        buffer += data
        try:
            pos = 0
            if not self._started:
                if len(buffer) < len(PREFACE):
                    return
                if not buffer.startswith(PREFACE):
                    raise h2.H2Error(h2.PROTOCOL_ERROR, "not the HTTP/2 preface")
                self._started = True
                pos = len(PREFACE)
            end = len(buffer)
            while end - pos >= 9 and self._transport is not None:
                length = buffer[pos] << 16 | buffer[pos + 1] << 8 | buffer[pos + 2]
                if length > h2.MAX_FRAME:
                    raise h2.H2Error(h2.FRAME_SIZE_ERROR, "frame over SETTINGS_MAX_FRAME_SIZE")
                if end - pos < 9 + length:
                    break
                kind, flags = buffer[pos + 3], buffer[pos + 4]
                stream_id = int.from_bytes(buffer[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                payload = bytes(buffer[pos + 9 : pos + 9 + length])
                pos += 9 + length
                if flags == h2.END_HEADERS and kind == h2.HEADERS and payload in self._check_blocks:
                    taken = self._lane(buffer, pos, end, stream_id)
                    if taken:
                        pos = taken
                        continue
                self._frame(kind, flags, stream_id, payload)
            del buffer[:pos]
            if self._recv_unacked >= h2.WINDOW // 2 and self._transport is not None:
                self._write(h2.window_update(0, self._recv_unacked))
                self._recv_unacked = 0
        except h2.H2Error as exc:
            log.warning("access-log connection closed: HTTP/2 protocol error", extra={"reason": str(exc)})
            self.goaway(exc.code, close=True)

    def pause_writing(self) -> None:  # the peer does not read its answers (PING ACKs...): nor do we
        self._write_paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._transport is not None and not self._paused:
            self._transport.resume_reading()

    # -- frames -----------------------------------------------------------------------------------------
    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuation is not None and kind != h2.CONTINUATION:
            raise h2.H2Error(h2.PROTOCOL_ERROR, "a header block interrupted")
        if kind == h2.DATA:
            self._data(flags, stream_id, payload)
        elif kind == h2.HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == h2.CONTINUATION:
            cont = self._continuation
            if cont is None or cont[0] != stream_id:
                raise h2.H2Error(h2.PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
            cont[2].append(payload)
            # a few fragments at most (a flood of empty ones would cost quadratic time here)
            if len(cont[2]) > 32 or sum(map(len, cont[2])) > h2.MAX_HEADER_LIST * 4:
                raise h2.H2Error(h2.ENHANCE_YOUR_CALM, "header block too large")
            if flags & h2.END_HEADERS:
                self._continuation = None
                self._header_block(stream_id, cont[1], b"".join(cont[2]))
        elif kind == h2.SETTINGS:
            self._settings(flags, stream_id, payload)
        elif kind == h2.PING:
            if stream_id != 0 or len(payload) != 8:
                raise h2.H2Error(h2.PROTOCOL_ERROR if stream_id else h2.FRAME_SIZE_ERROR, "bad PING")
            if not flags & h2.ACK:
                self._write(h2.frame(h2.PING, h2.ACK, 0, payload))
        elif kind == h2.WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == h2.RST_STREAM:
            if stream_id == 0 or len(payload) != 4:
                raise h2.H2Error(h2.PROTOCOL_ERROR, "bad RST_STREAM")
            self._check_known(stream_id)
            stream = self._streams.get(stream_id)
            if stream is not None:
                self._end_stream(stream)
        elif kind == h2.GOAWAY:
            if stream_id != 0:
                raise h2.H2Error(h2.PROTOCOL_ERROR, "GOAWAY on a stream")
            if not self._streams:  # the peer is leaving: close once its streams are done
                self.goaway(h2.NO_ERROR, close=True)
        elif kind == h2.PRIORITY:
            if stream_id == 0 or len(payload) != 5:
                raise h2.H2Error(h2.PROTOCOL_ERROR, "bad PRIORITY")
        elif kind == h2.PUSH_PROMISE:
            raise h2.H2Error(h2.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # other (extension) frame types are ignored (§5.5)

    def _check_known(self, stream_id: int) -> None:
        if stream_id > self._last_stream:  # a stream in the idle state (§5.1)
            raise h2.H2Error(h2.PROTOCOL_ERROR, "a frame on an idle stream")

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise h2.H2Error(h2.PROTOCOL_ERROR, "DATA on stream 0")
        self._check_known(stream_id)
        # flow control counts the whole payload, padding included (§6.9.1)
        self._recv_unacked += len(payload)
        data: bytes | memoryview = payload
        if flags & h2.PADDED:
            data = h2.unpad(payload)
        stream = self._streams.get(stream_id)
        if stream is None or stream.ended:
            return  # a stream already closed or reset: its remaining data is dropped
        if stream.kind != "refused":
            partial = len(stream.buffer)
            why = stream.feed(data)
            self._partial += len(stream.buffer) - partial
            if why is None and self._partial > MAX_PARTIAL:
                why = "too_large"
            if why is not None:
                self._refuse(stream, why)
                return
            if stream.kind != "als" and len(stream.messages) > 1:  # held until END_STREAM: not more
                self._trailers_only(stream, grpc.StatusCode.INTERNAL, "a unary call takes one message")
                return
        if flags & h2.END_STREAM:
            self._half_closed(stream)
            return
        # the stream's window, topped up as its data arrives (the socket is paused on HIGH instead)
        stream.unacked += len(payload)
        if stream.unacked >= h2.WINDOW // 2:
            self._write(h2.window_update(stream.id, stream.unacked))
            stream.unacked = 0

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise h2.H2Error(h2.PROTOCOL_ERROR, "HEADERS on a stream a client cannot open")
        block = payload
        if flags & h2.PADDED:
            block = bytes(h2.unpad(block))
        if flags & h2.PRIORITY_FLAG:
            if len(block) < 5:
                raise h2.H2Error(h2.PROTOCOL_ERROR, "HEADERS too short for its priority")
            block = block[5:]
        if flags & h2.END_HEADERS:
            self._header_block(stream_id, flags, block)
        else:
            self._continuation = (stream_id, flags, [block])

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        blocks = self._blocks
        headers = blocks.get(block)
        if headers is None:
            try:  # every block is decoded, whatever its stream, to keep the HPACK table in step
                headers = self._decoder.decode(block, raw=True)
            except hpack.HPACKError as exc:
                raise h2.H2Error(h2.COMPRESSION_ERROR, f"HPACK: {exc}") from None
            if not h2.table_neutral(block):
                blocks.clear()  # the table may have changed: the blocks kept may mean other fields now
                self._check_blocks.clear()
            elif len(blocks) < h2.BLOCK_CACHE:
                blocks[block] = headers
        stream = self._streams.get(stream_id)
        if stream is not None:  # trailers from the client: they end its half
            if not flags & h2.END_STREAM:
                raise h2.H2Error(h2.PROTOCOL_ERROR, "a second header block without END_STREAM")
            self._half_closed(stream)
            return
        if stream_id <= self._last_stream:
            return  # a stream already closed (answered or reset): nothing more to do for it
        self._last_stream = stream_id
        if self._goaway_sent:
            return  # over GOAWAY's last stream id: the client retries it elsewhere
        if self._receiver.closing or len(self._streams) >= h2.MAX_STREAMS:
            # shutting down, or too many open: the client retries it elsewhere or later
            self._write(h2.rst_stream(stream_id, h2.REFUSED_STREAM))
            return
        fields = dict(headers)
        raw_path = fields.get(b":path", b"")
        kind = _KINDS.get(raw_path, "refused")
        limit = self._receiver.check_limit if kind == "check" else MAX_MESSAGE_BYTES
        stream = GrpcStream(self, stream_id, kind, self._peer_window, limit)
        if fields.get(b":method") != b"POST" or not fields.get(b"content-type", b"").startswith(
            b"application/grpc"
        ):
            kind = stream.kind = "refused"
            stream.ended = bool(flags & h2.END_STREAM)  # a whole request: no RST_STREAM after the answer
            self._streams[stream_id] = stream
            self._trailers_only(stream, grpc.StatusCode.UNIMPLEMENTED, "not a gRPC call")
        elif kind == "refused":
            stream.ended = bool(flags & h2.END_STREAM)
            self._streams[stream_id] = stream
            path = raw_path.decode("latin-1")
            self._trailers_only(stream, grpc.StatusCode.UNIMPLEMENTED, f"unknown method {path}")
        else:
            self._streams[stream_id] = stream
            if kind == "als":
                stream.task = asyncio.get_running_loop().create_task(self._serve_als(stream))
            elif block in blocks:  # a valid Check's table-neutral block: the next ones take the lane
                self._check_blocks.add(block)
        if flags & h2.END_STREAM and stream_id in self._streams:
            self._half_closed(stream)

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise h2.H2Error(h2.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & h2.ACK:
            if payload:
                raise h2.H2Error(h2.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise h2.H2Error(h2.FRAME_SIZE_ERROR, "SETTINGS of a wrong length")
        for offset in range(0, len(payload), 6):
            ident, value = struct.unpack_from(">HI", payload, offset)
            if ident == 0x1:  # HEADER_TABLE_SIZE: the encoder of our responses follows it
                self._encoder.header_table_size = min(value, 4096)
            elif ident == 0x2 and value > 1:
                raise h2.H2Error(h2.PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH over 1")
            elif ident == 0x4:
                if value > h2.MAX_WINDOW:
                    raise h2.H2Error(h2.FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too large")
                delta = value - self._peer_window
                self._peer_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
            elif ident == 0x5 and not 1 << 14 <= value < 1 << 24:
                raise h2.H2Error(h2.PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
        self._write(h2.frame(h2.SETTINGS, h2.ACK, 0))
        self._flush_pending()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise h2.H2Error(h2.FRAME_SIZE_ERROR, "WINDOW_UPDATE of a wrong length")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise h2.H2Error(h2.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > h2.MAX_WINDOW:
                raise h2.H2Error(h2.FLOW_CONTROL_ERROR, "connection window over 2^31-1")
        else:
            self._check_known(stream_id)
            stream = self._streams.get(stream_id)
            if stream is not None:
                stream.send_window += increment
        self._flush_pending()

    # -- streams ----------------------------------------------------------------------------------------
    def _half_closed(self, stream: GrpcStream) -> None:
        """The client has sent all of the stream."""
        stream.ended = True
        stream.wake()
        if stream.kind == "release" or stream.kind == "check":
            message = stream.messages.popleft() if stream.messages else None
            if message is not None:
                stream.queued -= len(message)
                self.consumed(len(message))
            if message is None or stream.buffer or stream.messages:
                self._trailers_only(stream, grpc.StatusCode.INTERNAL, "a unary call takes one message")
                return
            if stream.kind == "check":
                self._check(stream, message)
                return
            try:
                self._receiver.engine.release(message.decode("latin-1"))
            except Exception:
                log.exception("slot release failed")
                self._trailers_only(stream, grpc.StatusCode.INTERNAL, "release failed")
                return
            self._respond(stream, h2.EMPTY_MESSAGE)
        elif stream.kind == "refused":
            self._streams.pop(stream.id, None)

    def _end_stream(self, stream: GrpcStream) -> None:
        """The stream is reset or the connection lost: what it received so far is still accounted."""
        stream.ended = stream.reset = True
        stream.wake()
        if stream.task is None:
            self._forget(stream)

    def _forget(self, stream: GrpcStream) -> None:
        """The stream is done: its unread messages (none left for its task) no longer hold the socket
        back; on shutdown, the connection closes after its last stream."""
        self._streams.pop(stream.id, None)
        self._partial -= len(stream.buffer)
        stream.buffer.clear()
        if stream.task is None:
            self.consumed(stream.queued)
            stream.messages.clear()
            stream.queued = 0
        if (self._goaway_sent or self._receiver.closing) and not self._streams:
            self.goaway(h2.NO_ERROR, close=True)

    async def _serve_als(self, stream: GrpcStream) -> None:
        try:
            await self._receiver.als.stream_access_logs(None, stream)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("access-log stream failed")
            stream.task = None
            self._trailers_only(stream, grpc.StatusCode.INTERNAL, "access-log stream failed")
            return
        finally:
            stream.task = None
        # drained (shutdown) or the client half-closed: the empty response and status OK
        self._respond(stream, h2.EMPTY_MESSAGE)

    def _respond(self, stream: GrpcStream, message: bytes) -> None:
        """HEADERS, the message (when the window allows) and the OK trailers; then the stream is done."""
        if self._transport is None or stream.reset:
            self._forget(stream)
            return
        n = len(message)
        if self._encoder.table_size_changes:  # announced at the start of the next block: encoded
            block = self._encoder.encode([(b":status", b"200"), (b"content-type", b"application/grpc")])
        else:
            block = h2.RESPONSE_BLOCK
        headers = h2.frame(h2.HEADERS, h2.END_HEADERS, stream.id, block)
        if not self._pending and n <= self._send_window and n <= stream.send_window:  # all in one write
            self._send_window -= n
            stream.send_window -= n
            self._write(headers + self._message_and_trailers(stream.id, message))
            self._closed(stream)
            return
        self._write(headers)
        self._pending.append((stream, message))
        self._flush_pending()

    def _message_and_trailers(self, stream_id: int, message: bytes) -> bytes:
        if self._encoder.table_size_changes:
            trailers = self._encoder.encode([(b"grpc-status", b"0")])
        else:
            trailers = h2.OK_TRAILERS_BLOCK
        return h2.frame(h2.DATA, 0, stream_id, message) + h2.frame(
            h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, stream_id, trailers
        )

    def _flush_pending(self) -> None:
        """Send each response message its windows allow, then its trailers (encoded only then: HPACK
        blocks must reach the peer in the order they are encoded); a reset stream's is dropped, and one
        waiting for its stream's WINDOW_UPDATE holds back no other."""
        waiting: deque[tuple[GrpcStream, bytes]] = deque()
        while self._pending:
            stream, message = self._pending.popleft()
            n = len(message)
            if stream.reset:
                continue
            if n > self._send_window or n > stream.send_window:
                waiting.append((stream, message))  # until the peer's WINDOW_UPDATE
                continue
            self._send_window -= n
            stream.send_window -= n
            self._write(self._message_and_trailers(stream.id, message))
            self._closed(stream)
        self._pending = waiting

    def _trailers_only(self, stream: GrpcStream, code: grpc.StatusCode, message: str) -> None:
        if self._transport is None or stream.reset:
            self._forget(stream)
            return
        block = self._encoder.encode(
            [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", str(code.value[0]).encode()),
                (b"grpc-message", message.encode("ascii", "replace")),
            ]
        )
        self._write(h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, stream.id, block))
        self._closed(stream)

    def _closed(self, stream: GrpcStream) -> None:
        """Our half is closed: the stream is done (the client's half too, or it is told to stop). Its
        task, if it still runs (a refused message), accounts the whole messages before and ends."""
        if not stream.ended:
            self._write(h2.rst_stream(stream.id, h2.NO_ERROR))
        stream.ended = stream.reset = True  # nothing more is sent on it
        stream.wake()
        stream.kind = "refused"
        self._forget(stream)

    def _refuse(self, stream: GrpcStream, why: str) -> None:
        if why == "compressed":
            self._trailers_only(stream, grpc.StatusCode.UNIMPLEMENTED, "compressed messages are not accepted")
        else:
            self._trailers_only(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, "message over the size limit")

    # -- flow and shutdown ------------------------------------------------------------------------------
    def queued(self, n: int) -> None:
        self._queued += n
        if self._queued > HIGH and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def consumed(self, n: int) -> None:
        self._queued -= n
        if self._paused and self._queued < LOW and self._transport is not None:
            self._paused = False
            if not self._write_paused:
                self._transport.resume_reading()

    def goaway(self, code: int, *, close: bool) -> None:
        if self._transport is None:
            return
        if not self._goaway_sent:
            self._goaway_sent = True
            self._write(h2.frame(h2.GOAWAY, 0, 0, struct.pack(">II", self._last_stream, code)))
        if close or not self._streams:
            self._close()

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None  # nothing more is read or written (connection_lost ends the streams)

    def _write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)
