"""The access log's HTTP/2 receiver (adapters/als_h2.py): hostile frame streams after a valid preface.

Each example builds a stream of frames — well-formed ones of every type with random flags, stream ids and
payloads, real header blocks for the access log, the slot release and unknown methods, gRPC messages
(whole, cut, compressed, over the size limit) and raw junk — cuts it at random points and feeds the pieces
to one connection read by read, with a small HIGH/LOW (the socket's pause and resume) and MAX_PARTIAL.
Nothing may raise out of `data_received`; what the receiver writes is well-formed frames, nothing after
it closed the connection, and when it closed it the last frame is its one GOAWAY; its header blocks
decode in the order written; nothing follows a stream's RST_STREAM, only RST_STREAM its END_STREAM; a
paused socket is resumed once the access log has read what was queued; once the connection is lost
every stream's task ends, nothing stays counted as queued and `H2Receiver.connections` is empty.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import hpack
import pytest
from envoy.service.auth.v3 import external_auth_pb2
from hypothesis import event, example, given
from hypothesis import strategies as st

from nexus_authz.adapters import als_h2, http_authz
from nexus_authz.adapters import h2_frames as h2
from nexus_authz.adapters.als_h2 import ALS_PATH, CHECK_PATH, PREFACE, RELEASE_PATH, H2Connection
from nexus_authz.adapters.envoy_als import MAX_MESSAGE_BYTES, AccessLogService
from nexus_authz.adapters.h2_listener import H2Receiver
from nexus_authz.engine import Engine
from tests.fuzz import _strategies as S
from tests.fuzz._support import (
    HTTP_ALLOWED,
    MAX_BODY,
    MAX_HEADER_BYTES,
    FakeTransport,
    fuzz_settings,
    parse_answers,
)

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

STREAMS = [0, 1, 2, 3, 5, 7, 0x7FFFFFFF]
IDENTIFIER = b"\x0a\x0d\x12\x0bnexus_usage"  # StreamAccessLogsMessage{identifier{log_name}}
# a CheckRequest: POST with a key nobody has and a JSON body (a 401, and a failure for the throttle)
_check = external_auth_pb2.CheckRequest()
_check.attributes.request.http.method = "POST"
_check.attributes.request.http.path = "/v1/chat/completions"
_check.attributes.request.http.headers["authorization"] = "Bearer nx-nobody-0123456789abcdef"
_check.attributes.request.http.raw_body = b'{"model":"gpt-4o"}'
CHECK = _check.SerializeToString()


def grpc_message(payload: bytes, flag: int = 0, length: int | None = None) -> bytes:
    return bytes([flag]) + (len(payload) if length is None else length).to_bytes(4, "big") + payload


def _request(sid: int, path: str, body: bytes) -> bytes:
    fields = [(":method", "POST"), (":path", path), ("content-type", "application/grpc")]
    block = hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(k, v) for k, v in fields])
    return h2.frame(h2.HEADERS, h2.END_HEADERS, sid, block) + h2.frame(
        h2.DATA, h2.END_STREAM, sid, grpc_message(body)
    )


@st.composite
def pieces(draw: st.DrawFn) -> bytes:
    """One piece of the stream: a frame (mostly well-formed) or junk."""
    choice = draw(st.integers(0, 11))
    sid = draw(st.sampled_from(STREAMS))
    flags = draw(
        st.sampled_from([0, h2.END_STREAM, h2.END_HEADERS, h2.END_HEADERS | h2.END_STREAM])
        | st.integers(0, 255)
    )
    if choice == 0:
        return draw(st.binary(max_size=40))
    if choice <= 3:  # a request's header block (encoded without indexing: the table stays in step)
        path = draw(st.sampled_from([ALS_PATH, RELEASE_PATH, CHECK_PATH, "/x.Y/Z", ""]))
        fields = [(":method", draw(st.sampled_from(["POST", "GET"]))), (":path", path)]
        if draw(st.integers(0, 4)):
            fields.append(("content-type", "application/grpc"))
        block = hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(k, v) for k, v in fields])
        cut = draw(st.integers(0, len(block)))
        if draw(st.booleans()):  # in two: HEADERS then CONTINUATION
            return h2.frame(
                h2.HEADERS, flags & ~h2.END_HEADERS & ~h2.PADDED & ~h2.PRIORITY_FLAG, sid, block[:cut]
            ) + h2.frame(h2.CONTINUATION, h2.END_HEADERS, sid, block[cut:])
        return h2.frame(h2.HEADERS, (flags | h2.END_HEADERS) & ~h2.PADDED & ~h2.PRIORITY_FLAG, sid, block)
    if choice <= 6:  # DATA: gRPC messages, whole or cut, good or bad
        kind = draw(st.integers(0, 5))
        if kind <= 2:
            data = grpc_message(IDENTIFIER if kind else draw(st.binary(max_size=30)))
        elif kind == 3:
            data = grpc_message(IDENTIFIER, flag=1)
        elif kind == 4:
            data = grpc_message(b"", length=MAX_MESSAGE_BYTES + draw(st.integers(1, 2)))
        else:
            data = grpc_message(draw(st.binary(max_size=20)), length=draw(st.integers(0, 100)))
        data = data[: draw(st.integers(0, len(data)))] if draw(st.integers(0, 3)) == 0 else data
        flags &= h2.END_STREAM | h2.PADDED
        if flags & h2.PADDED:
            pad = draw(st.integers(0, 5))
            data = bytes([pad]) + data + b"\x00" * draw(st.integers(max(0, pad - 1), pad))
        return h2.frame(h2.DATA, flags, sid, data)
    if choice >= 10:  # a whole request: an access-log batch or a slot release, half-closed
        path, body = draw(
            st.sampled_from(
                [(ALS_PATH, IDENTIFIER), (RELEASE_PATH, b"req-1"), (CHECK_PATH, CHECK), (CHECK_PATH, b"\xff")]
            )
        )
        return _request(draw(st.sampled_from([1, 3, 5, 7, 9, 11])), path, body)
    if choice == 7:  # flow control: small windows (responses wait), then window given
        if draw(st.booleans()):
            window = draw(st.sampled_from([0, 1, 5, 65535]))
            return h2.frame(h2.SETTINGS, 0, 0, struct.pack(">HI", 0x4, window))
        return h2.frame(h2.WINDOW_UPDATE, 0, sid, struct.pack(">I", draw(st.sampled_from([1, 5, 100]))))
    kind = draw(st.sampled_from(list(range(10)) + [0x0A, 0xFF]))
    payload = draw(
        st.sampled_from(
            [b"", b"\x00" * 4, b"\x00\x00\x00\x01", b"\x00" * 5, b"12345678", b"\x00\x04\x00\x00\xff\xff"]
        )
        | st.binary(max_size=16)
    )
    return h2.frame(kind, flags, sid, payload)


@st.composite
def streams(draw: st.DrawFn) -> list[bytes]:
    data = b"".join(draw(st.lists(pieces(), min_size=1, max_size=12)))
    return S.split_at(data, draw(st.lists(st.integers(0, 10**6), max_size=6)))


def written_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        assert len(data) - pos >= 9, f"a cut frame header: {data[pos:]!r}"
        length = int.from_bytes(data[pos : pos + 3], "big")
        kind, flags, sid = data[pos + 3], data[pos + 4], struct.unpack_from(">I", data, pos + 5)[0]
        assert len(data) - pos - 9 >= length, "a cut frame"
        out.append((kind, flags, sid, bytes(data[pos + 9 : pos + 9 + length])))
        pos += 9 + length
    return out


async def _run(engine: Engine, chunks: list[bytes]) -> tuple[FakeTransport, H2Connection, H2Receiver]:
    receiver = H2Receiver(AccessLogService(engine), engine)
    conn = H2Connection(receiver)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(PREFACE + h2.frame(h2.SETTINGS, 0, 0))
    for chunk in chunks:
        if transport.closed:
            break  # a closed transport reads nothing more
        for _ in range(200):  # a paused socket is read again once the queued messages are read
            if not transport.paused:
                break
            await asyncio.sleep(0)
        assert not transport.paused, "the socket stays paused"
        conn.data_received(chunk)
        await asyncio.sleep(0)  # the access-log tasks run between reads
    conn.connection_lost(None)
    for _ in range(200):
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if not tasks:
            break
        await asyncio.sleep(0)
    assert not tasks, tasks
    return transport, conn, receiver


@fuzz_settings(200)
@given(chunks=streams())
# two answers waiting for a stream window: their header blocks reach the peer in the order encoded
@example(
    chunks=[
        h2.frame(h2.SETTINGS, 0, 0, struct.pack(">HI", 0x4, 0))
        + _request(1, RELEASE_PATH, b"req-1")
        + _request(3, ALS_PATH, IDENTIFIER)
        + _request(5, CHECK_PATH, CHECK)
    ]
)
def test_any_frame_stream_after_the_preface(
    engine: Engine, chunks: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(als_h2, "HIGH", 64)
    monkeypatch.setattr(als_h2, "LOW", 32)
    monkeypatch.setattr(als_h2, "MAX_PARTIAL", 80)
    transport, conn, receiver = asyncio.run(_run(engine, chunks))
    assert transport.written_after_close == 0, "written after the close"
    frames = written_frames(bytes(transport.data))
    goaways = [f for f in frames if f[0] == h2.GOAWAY]
    assert len(goaways) <= 1
    if transport.closed:
        assert frames[-1][0] == h2.GOAWAY, frames[-3:]
        event(f"GOAWAY {int.from_bytes(goaways[0][3][4:], 'big')}")
    else:
        assert not goaways
        event("open")
    assert conn._queued == 0, "messages counted as queued after every stream ended"
    assert conn._partial == 0, "partial messages counted after every stream ended"
    assert not receiver.connections
    assert all(
        f[0] in (h2.SETTINGS, h2.WINDOW_UPDATE, h2.PING, h2.HEADERS, h2.DATA, h2.RST_STREAM, h2.GOAWAY)
        for f in frames
    )
    decoder = hpack.Decoder()  # the peer's: every header block decodes, in the order written
    ended: set[int] = set()  # END_STREAM sent (then at most RST_STREAM NO_ERROR, RFC 9113 §8.1)
    reset: set[int] = set()
    for kind, flags, sid, payload in frames:
        if kind == h2.HEADERS:
            decoder.decode(payload, raw=True)
        if kind in (h2.HEADERS, h2.DATA, h2.RST_STREAM):
            assert sid not in reset, f"a frame on stream {sid} after its RST_STREAM"
            if kind == h2.RST_STREAM:
                reset.add(sid)
            else:
                assert sid not in ended, f"a frame on stream {sid} after its END_STREAM"
                if flags & h2.END_STREAM:
                    ended.add(sid)


class SwitchingTransport(FakeTransport):
    """A FakeTransport whose protocol the Sniffer replaces (as asyncio's transports allow)."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol: Any = None

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


HTTP1 = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"


@fuzz_settings(100)
@given(http2=st.booleans(), points=st.lists(st.integers(0, 10**6), max_size=8))
def test_either_protocol_is_told_apart_however_its_first_bytes_are_split(
    engine: Engine, http2: bool, points: list[int]
) -> None:
    data = PREFACE + h2.frame(h2.PING, 0, 0, b"12345678") if http2 else HTTP1
    chunks = S.split_at(data, points)

    async def main() -> SwitchingTransport:
        app = http_authz.HttpApp(engine, max_header_bytes=MAX_HEADER_BYTES, max_body=MAX_BODY)
        receiver = H2Receiver(AccessLogService(engine), engine)
        transport = SwitchingTransport()
        transport.protocol = receiver.factory(app.protocol)()
        transport.protocol.connection_made(transport)
        for chunk in chunks:
            transport.protocol.data_received(chunk)
        transport.protocol.connection_lost(None)
        return transport

    transport = asyncio.run(main())
    out = bytes(transport.data)
    if http2:
        assert isinstance(transport.protocol, H2Connection)
        assert (h2.PING, h2.ACK, 0, b"12345678") in written_frames(out)
    else:
        assert not isinstance(transport.protocol, H2Connection)
        answers = parse_answers(out)
        assert len(answers) == 1 and answers[0].status in HTTP_ALLOWED, answers
