"""The frames of HTTP/2 (RFC 9113) that the access log's receiver (als_h2) reads and writes, and one
gRPC request stream's message framing: constants, frame bytes, padding, the connection error."""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from typing import Any, Final, Protocol

import grpc

from nexus_authz.adapters.envoy_als import MAX_MESSAGE_BYTES

__all__ = [
    "BLOCK_CACHE",
    "EMPTY_MESSAGE",
    "GrpcStream",
    "H2Error",
    "OK_TRAILERS_BLOCK",
    "RESPONSE_BLOCK",
    "frame",
    "grpc_message",
    "table_neutral",
    "rst_stream",
    "settings_frame",
    "unpad",
    "window_update",
]

# frame types and flags (RFC 9113 §6)
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE = range(9)
CONTINUATION: Final = 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# error codes (§7)
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR = 0x0, 0x1, 0x3, 0x5, 0x6
REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x7, 0x8, 0x9, 0xB

#: The largest frame accepted (SETTINGS_MAX_FRAME_SIZE): a batch in a few frames rather than 16 KiB ones.
MAX_FRAME: Final = 1 << 20
#: Flow-control windows granted (per stream and for the connection), topped up at half.
WINDOW: Final = 1 << 24
MAX_STREAMS: Final = 100
#: The largest header list accepted (decoded), as a grpc server's default.
MAX_HEADER_LIST: Final = 16 << 10
MAX_WINDOW: Final = (1 << 31) - 1

EMPTY_MESSAGE: Final = b"\x00\x00\x00\x00\x00"  # a gRPC message of 0 bytes (the empty response)

# A response's header blocks, HPACK-encoded once: each field a representation that leaves the dynamic
# tables as they were (the static table's `:status: 200`; literals without indexing), so the same bytes
# are right whatever the connection's encoder sent before, unless a table size change must be announced
# first (the connection then encodes them with its encoder).
RESPONSE_BLOCK: Final = b"\x88" + b"\x0f\x10\x10application/grpc"  # :status 200, content-type (index 31)
OK_TRAILERS_BLOCK: Final = b"\x00\x0bgrpc-status\x010"  # grpc-status: 0, a new name


#: Header blocks remembered per connection with what they decode to (see `table_neutral`), at most.
BLOCK_CACHE: Final = 64


def _skip_integer(block: bytes, i: int, mask: int) -> tuple[int, int]:
    """The HPACK integer (RFC 7541 §5.1) at `i` with a prefix of `mask`'s bits: (its value, where the
    next field starts)."""
    value = block[i] & mask
    i += 1
    if value == mask:
        shift = 0
        while True:
            b = block[i]
            i += 1
            value += (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
    return value, i


def table_neutral(block: bytes) -> bool:
    """True when decoding an HPACK block leaves the dynamic table as it was: it holds only indexed fields
    (§6.1) and literals without indexing or never indexed (§6.2.2, §6.2.3), no literal with incremental
    indexing and no table size update. The same bytes then decode to the same fields until a block that
    is not table-neutral has been decoded. Envoy's gRPC client sends such blocks for every call after its
    first on a connection (its fields indexed then, `:path` a literal without indexing): the receiver
    decodes them once. Call it on a block that decoded (a malformed one is not neutral)."""
    i, n = 0, len(block)
    try:
        while i < n:
            b = block[i]
            if b & 0x80:  # indexed
                i = _skip_integer(block, i, 0x7F)[1]
            elif b & 0xE0 == 0:  # 0000xxxx or 0001xxxx: a literal that is not indexed
                index, i = _skip_integer(block, i, 0x0F)
                if index == 0:  # a literal name first
                    length, i = _skip_integer(block, i, 0x7F)
                    i += length
                length, i = _skip_integer(block, i, 0x7F)
                i += length
            else:  # indexed incrementally (01xxxxxx), or a size update (001xxxxx)
                return False
    except IndexError:
        return False
    return i == n


def grpc_message(payload: bytes) -> bytes:
    """One uncompressed gRPC message (its 5-byte prefix and the payload)."""
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def settings_frame() -> bytes:
    """Our SETTINGS: MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE."""
    return frame(SETTINGS, 0, 0, struct.pack(">HIHIHI", 0x3, MAX_STREAMS, 0x4, WINDOW, 0x5, MAX_FRAME))


def window_update(stream: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream, struct.pack(">I", increment))


def rst_stream(stream: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream, struct.pack(">I", code))


class H2Error(Exception):
    """A connection error (§5.4.1): GOAWAY with `code`, then the connection closes."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


class _Connection(Protocol):
    def queued(self, n: int) -> None: ...
    def consumed(self, n: int) -> None: ...


class GrpcStream:
    """One request stream: its gRPC message framing and where its messages go."""

    __slots__ = (
        "buffer",
        "conn",
        "ended",
        "id",
        "kind",
        "limit",
        "messages",
        "queued",
        "reset",
        "send_window",
        "task",
        "unacked",
        "waiter",
    )

    def __init__(
        self, conn: _Connection, stream_id: int, kind: str, send_window: int, limit: int = MAX_MESSAGE_BYTES
    ) -> None:
        self.conn = conn
        self.id = stream_id
        # "als", "release", "check", or "refused" (answered already: its data is dropped)
        self.kind = kind
        self.limit = limit  # the largest message taken
        self.buffer = bytearray()  # gRPC framing: the bytes of the message being received
        self.messages: deque[bytes] = deque()
        self.queued = 0  # bytes of `messages`
        self.ended = False  # the client half-closed (END_STREAM) or reset the stream
        self.reset = False  # reset by the client, or the connection is gone: nothing more is sent on it
        self.unacked = 0  # DATA bytes received since the stream's last WINDOW_UPDATE
        self.waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.send_window = send_window

    # the context `AccessLogService.stream_access_logs` reads from, as grpc.aio's
    async def read(self) -> Any:
        while not self.messages:
            if self.ended:
                return grpc.aio.EOF
            loop = asyncio.get_running_loop()
            self.waiter = loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        message = self.messages.popleft()
        self.queued -= len(message)
        self.conn.consumed(len(message))
        return message

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def feed(self, data: bytes | memoryview) -> str | None:
        """Add DATA bytes; complete messages are queued. Returns why the stream must end, if it must."""
        buffer = self.buffer
        buffer += data
        while len(buffer) >= 5:
            if buffer[0] != 0:
                return "compressed"
            length = int.from_bytes(buffer[1:5], "big")
            if length > self.limit:
                return "too_large"
            if len(buffer) < 5 + length:
                break
            message = bytes(buffer[5 : 5 + length])
            del buffer[: 5 + length]
            self.messages.append(message)
            self.queued += length
            self.conn.queued(length)
        self.wake()
        return None


def unpad(payload: bytes) -> memoryview:
    if not payload:
        raise H2Error(PROTOCOL_ERROR, "padded frame without its pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise H2Error(PROTOCOL_ERROR, "padding longer than the frame")
    return memoryview(payload)[1 : len(payload) - pad]
