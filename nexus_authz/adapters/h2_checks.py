"""gRPC ext_authz's Check on the check socket's HTTP/2: what als_h2.H2Connection does with a
`/envoy.service.auth.v3.Authorization/Check` stream, kept apart from the connection's framing.

A Check is unary: its message is answered by `AuthorizationService.answer` once the stream's DATA ends it
(or, when the decision waits for the counter store, Redis, once that has answered), with HEADERS, the
message and the OK trailers in one write (als_h2's `_respond`). Envoy sends each Check as one HEADERS
frame, whose block after a connection's first call is the same table-neutral bytes, then one DATA frame
with the whole message and END_STREAM: `_lane` answers that pair as it is read, with no stream object,
when the answer fits the flow-control windows at once; anything else (a message over several frames, a
window too small, an answer that waits, an error) takes the general path, the same answer either way
(tests/adapters/test_check_h2.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import grpc
import hpack
from google.protobuf.message import DecodeError

from nexus_authz.adapters import h2_frames as h2
from nexus_authz.adapters.h2_frames import GrpcStream
from nexus_authz.core.model import Reason

if TYPE_CHECKING:
    from nexus_authz.adapters.h2_listener import H2Receiver

log = logging.getLogger("nexus_authz.als")

__all__ = ["CheckCalls"]


class CheckCalls:
    """H2Connection's Check calls (a base class of it: the connection's state is its own)."""

    __slots__ = ()

    if TYPE_CHECKING:  # the connection's, as H2Connection sets them
        _receiver: H2Receiver
        _streams: dict[int, GrpcStream]
        _last_stream: int
        _recv_unacked: int
        _send_window: int
        _peer_window: int
        _continuation: tuple[int, int, list[bytes]] | None
        _goaway_sent: bool
        _pending: object
        _encoder: hpack.Encoder
        _write: Callable[[bytes], None]
        _message_and_trailers: Callable[[int, bytes], bytes]
        _respond: Callable[[GrpcStream, bytes], None]
        _trailers_only: Callable[[GrpcStream, grpc.StatusCode, str], None]

    def _lane(self, buffer: bytearray, pos: int, end: int, stream_id: int) -> int:
        """A Check whose HEADERS (a block kept in `_check_blocks`) was just read: when the next frame is
        its DATA, one whole message ending the stream, as Envoy sends a Check, it is answered here with
        no stream kept (when the answer fits the windows at once). Returns where the next frame starts,
        or 0 with nothing changed: the general path takes both frames."""
        if end - pos < 9 or buffer[pos + 3] != h2.DATA or buffer[pos + 4] != h2.END_STREAM:
            return 0
        length = buffer[pos] << 16 | buffer[pos + 1] << 8 | buffer[pos + 2]
        if (
            end - pos < 9 + length
            or length < 5
            or length > h2.MAX_FRAME
            or buffer[pos + 9]  # compressed
            or int.from_bytes(buffer[pos + 5 : pos + 9], "big") & 0x7FFFFFFF != stream_id
            or int.from_bytes(buffer[pos + 10 : pos + 14], "big") != length - 5  # one whole message
            or length - 5 > self._receiver.check_limit
            or stream_id <= self._last_stream
            or not stream_id & 1
            or self._continuation is not None
            or self._goaway_sent
            or self._receiver.closing
            or len(self._streams) >= h2.MAX_STREAMS
        ):
            return 0
        self._last_stream = stream_id  # type: ignore[misc]  # the connection's slots
        self._recv_unacked += length  # type: ignore[misc]
        message = bytes(buffer[pos + 14 : pos + 9 + length])
        try:
            answer = self._receiver.checks.answer(message)
        except Exception as exc:
            self._answered(self._check_stream(stream_id), exc)
            return pos + 9 + length
        if isinstance(answer, bytes) and not self._pending and not self._encoder.table_size_changes:
            body = h2.grpc_message(answer)
            n = len(body)
            if n <= self._send_window and n <= self._peer_window:
                self._send_window -= n  # type: ignore[misc]  # the connection's slots
                headers = h2.frame(h2.HEADERS, h2.END_HEADERS, stream_id, h2.RESPONSE_BLOCK)
                self._write(headers + self._message_and_trailers(stream_id, body))
                return pos + 9 + length
        self._answered(self._check_stream(stream_id), answer)
        return pos + 9 + length

    def _check_stream(self, stream_id: int) -> GrpcStream:
        """The stream of a Check the lane took whole, for the general path's answer."""
        stream = GrpcStream(self, stream_id, "check", self._peer_window, self._receiver.check_limit)  # type: ignore[arg-type]
        stream.ended = True
        self._streams[stream_id] = stream
        return stream

    def _check(self, stream: GrpcStream, message: bytes) -> None:
        """Envoy's gRPC ext_authz Check (envoy_authz), answered at once, or when the counter store has."""
        try:
            answer = self._receiver.checks.answer(message)
        except Exception as exc:
            self._answered(stream, exc)
            return
        self._answered(stream, answer)

    def _answered(self, stream: GrpcStream, answer: bytes | Awaitable[bytes] | Exception) -> None:
        if isinstance(answer, DecodeError):
            self._trailers_only(stream, grpc.StatusCode.INTERNAL, "the message is no CheckRequest")
        elif isinstance(answer, Exception):
            self._check_failed(stream, answer)
        elif isinstance(answer, bytes):
            self._respond(stream, h2.grpc_message(answer))
        else:
            stream.task = asyncio.get_running_loop().create_task(self._check_later(stream, answer))

    async def _check_later(self, stream: GrpcStream, answer: Awaitable[bytes]) -> None:
        try:
            message = await answer
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            stream.task = None
            self._check_failed(stream, exc)
            return
        stream.task = None
        self._respond(stream, h2.grpc_message(message))

    def _check_failed(self, stream: GrpcStream, exc: Exception) -> None:
        """As on the gRPC port: logged, counted, INTERNAL (Envoy's failure_mode_allow then decides)."""
        log.error("internal error in gRPC Check", exc_info=exc)
        self._receiver.engine.count(Reason.UNAVAILABLE)
        self._trailers_only(stream, grpc.StatusCode.INTERNAL, "internal error")
