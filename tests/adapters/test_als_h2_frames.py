"""The access log's HTTP/2 receiver (adapters/als_h2.py) driven frame by frame from a raw socket: frames
built by hand (hpack for the header blocks) on a real check socket, each test asserting what the client
observes (frames, GOAWAY codes, the socket closing) and what was accounted."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import hpack
import pytest
import uvloop

from nexus_authz.adapters import als_h2, h2_listener
from nexus_authz.adapters import h2_frames as h2
from nexus_authz.adapters.als_h2 import ALS_PATH, PREFACE, RELEASE_PATH
from nexus_authz.adapters.envoy_als import MAX_MESSAGE_BYTES, AccessLogService
from nexus_authz.adapters.h2_listener import H2Receiver
from nexus_authz.engine import Engine
from tests.adapters.test_als import Recorder, body_meta, entry_with, message
from tests.adapters.test_als_h2 import CHAT, SSE, check_socket

Frame = tuple[int, int, int, bytes]  # kind, flags, stream id, payload
TIMEOUT = 10.0


CLIENTS: list[Client] = []  # closed when the scenario ends, even on a failure


def grpc_message(payload: bytes, compressed: bool = False) -> bytes:
    return bytes([compressed]) + len(payload).to_bytes(4, "big") + payload


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return h2.frame(kind, flags, stream, payload)


class Client:
    """A raw HTTP/2 client on the check socket: sends bytes, reads frames (decoding header blocks)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.seen: list[Frame] = []  # every frame read
        # every header block: stream, flags, fields
        self.blocks: list[tuple[int, int, dict[bytes, bytes]]] = []
        # response(): the frames (with their header fields) of other streams read meanwhile
        self._held: dict[int, deque[tuple[Frame, dict[bytes, bytes] | None]]] = {}
        CLIENTS.append(self)

    @classmethod
    async def open(cls, path: Path, *, handshake: bool = True) -> Client:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 22)
        client = cls(reader, writer)
        if handshake:
            await client.send(PREFACE + frame(h2.SETTINGS, 0, 0))
            kind, flags, _, _ = await client.frame()
            assert (kind, flags) == (h2.SETTINGS, 0)  # the server's SETTINGS first
        return client

    async def send(self, *data: bytes) -> None:
        for chunk in data:
            self.writer.write(chunk)
        await self.writer.drain()

    async def frame(self, timeout: float = TIMEOUT) -> Frame:
        head = await asyncio.wait_for(self.reader.readexactly(9), timeout)
        length = int.from_bytes(head[:3], "big")
        payload = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        got = head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload
        self.seen.append(got)
        if got[0] == h2.HEADERS:  # every block, in order, to keep the HPACK table in step
            self.blocks.append((got[2], got[1], dict(self.decoder.decode(payload, raw=True))))
        return got

    async def frames(self, until: Callable[[Frame], bool], timeout: float = TIMEOUT) -> list[Frame]:
        """Frames up to and including the first for which `until` is true (SETTINGS ACK/WINDOW_UPDATE too)."""
        out = []
        while True:
            got = await self.frame(timeout)
            out.append(got)
            if until(got):
                return out

    async def to_end(self, timeout: float = TIMEOUT) -> list[Frame]:
        """Every frame until the server closes the socket."""
        out = []
        while True:
            try:
                out.append(await self.frame(timeout))
            except asyncio.IncompleteReadError as exc:
                assert exc.partial == b"", exc.partial
                return out

    @staticmethod
    def static_block(path: str = ALS_PATH) -> bytes:
        """A header block that leaves the HPACK table as it was (no indexing)."""
        fields = [(":method", "POST"), (":path", path), ("content-type", "application/grpc")]
        return hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(k, v) for k, v in fields])

    def block(self, path: str = ALS_PATH, **extra: str) -> bytes:
        fields = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "nexus"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *extra.items(),
        ]
        return self.encoder.encode(fields)

    async def response(self, stream: int) -> tuple[list[dict[bytes, bytes]], bytes]:
        """The header blocks and DATA of `stream`'s response, up to its END_STREAM (others skipped)."""
        blocks, data = [], b""
        while True:
            (kind, flags, _, payload), fields = await self._stream_frame(stream)
            if fields is not None:
                blocks.append(fields)
            if kind == h2.DATA:
                data += payload
            if kind in (h2.HEADERS, h2.DATA) and flags & h2.END_STREAM:
                return blocks, data
            assert kind != h2.RST_STREAM or blocks, f"stream {stream} reset: {payload!r}"

    async def _stream_frame(self, stream: int) -> tuple[Frame, dict[bytes, bytes] | None]:
        """The next frame of `stream` with its header fields: one read earlier while waiting for another
        stream's (streams end in any order: each access-log stream is its own task), else the next read."""
        held = self._held.get(stream)
        if held:
            return held.popleft()
        while True:
            got = await self.frame()
            item = got, self.blocks[-1][2] if got[0] == h2.HEADERS else None
            if got[2] == stream:
                return item
            self._held.setdefault(got[2], deque()).append(item)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def goaway_code(frames: list[Frame]) -> int:
    goaways = [payload for kind, _, _, payload in frames if kind == h2.GOAWAY]
    assert len(goaways) == 1, frames
    assert frames[-1][0] == h2.GOAWAY, frames  # nothing after it: the socket closed
    return int.from_bytes(goaways[0][4:8], "big")


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    """Each test on asyncio's loop and on uvloop's (server.py's)."""
    LOOP[0] = request.param
    return LOOP[0]


LOOP = ["asyncio"]


def run(
    engine: Any,
    path: Path,
    scenario: Callable[[AccessLogService, H2Receiver], Awaitable[Any]],
    **service_options: Any,
) -> Any:
    """`scenario` on a check socket; fails on anything the loop's exception handler got (a task's
    exception never retrieved, a callback's error)."""
    errors: list[dict[str, Any]] = []

    async def main() -> Any:
        asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
        service = AccessLogService(engine, **service_options)
        try:
            async with check_socket(service, engine, path) as receiver:
                return await asyncio.wait_for(scenario(service, receiver), 60)
        finally:
            if CLIENTS:  # a failed scenario's: closed, so that the loop closes
                for client in CLIENTS:
                    client.writer.close()
                CLIENTS.clear()
                await asyncio.sleep(0.05)

    result = uvloop.run(main()) if LOOP[0] == "uvloop" else asyncio.run(main())
    assert not errors, errors
    return result


def receiver_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if "H2Connection" in getattr(t.get_coro(), "__qualname__", "")]


async def settled(service: AccessLogService, receiver: H2Receiver, *, connections: int = 0) -> None:
    """Wait until the access-log streams have ended and `connections` HTTP/2 connections are left."""
    for _ in range(500):
        if service.open_streams == 0 and len(receiver.connections) == connections and not receiver_tasks():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(
        f"streams {service.open_streams}, connections {len(receiver.connections)}, tasks {receiver_tasks()}"
    )


def batches() -> list[bytes]:
    """Serialized access-log messages: the identifier, one entry, a batch of several."""
    one = entry_with(body_meta(CHAT), content_type="application/json", request_id="r1")
    return [
        message(identifier=True).SerializeToString(),
        message(one).SerializeToString(),
        message(
            *(
                entry_with(body_meta(SSE), content_type="text/event-stream", request_id=f"s{i}")
                for i in range(3)
            ),
            entry_with(body_meta(CHAT), content_type="application/json", key_id=None, request_id="x"),
        ).SerializeToString(),
    ]


ACCOUNTED = ["r1", "s0", "s1", "s2"]


def request_ids(recorder: Recorder) -> list[str]:
    return [args[0] for args, _ in recorder.calls]


# -- 1. the preface and the protocol sniffing ------------------------------------------------------------


def test_preface_in_one_byte_reads_then_settings_are_exchanged(engine: Engine, tmp_path: Path) -> None:
    async def scenario(service: AccessLogService, receiver: H2Receiver) -> list[Frame]:
        client = await Client.open(tmp_path / "s.sock", handshake=False)
        for byte in PREFACE:
            await client.send(bytes([byte]))
            await asyncio.sleep(0.002)  # one read each
        await client.send(frame(h2.SETTINGS, 0, 0), frame(h2.PING, 0, 0, b"12345678"))
        frames = await client.frames(lambda f: f[0] == h2.PING)
        await client.close()
        return frames

    frames = run(engine, tmp_path / "s.sock", scenario)
    kinds = [(kind, flags) for kind, flags, _, _ in frames]
    assert kinds[0] == (h2.SETTINGS, 0)
    assert (h2.SETTINGS, h2.ACK) in kinds and kinds[-1] == (h2.PING, h2.ACK)


@pytest.mark.parametrize("first", [b"P", b"PR", b"PRI * HTTP/"])
def test_http1_request_starting_like_the_preface_is_answered_as_http1(
    engine: Engine, tmp_path: Path, first: bytes
) -> None:
    request = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"
    if not request.startswith(first):
        request = first + b"X /v1 HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"

    async def scenario(service: AccessLogService, receiver: H2Receiver) -> bytes:
        client = await Client.open(tmp_path / "s.sock", handshake=False)
        await client.send(first)
        await asyncio.sleep(0.05)
        await client.send(request[len(first) :])
        answer = await asyncio.wait_for(client.reader.readuntil(b"\r\n"), TIMEOUT)
        await client.close()
        return answer

    answer = run(engine, tmp_path / "s.sock", scenario)
    assert answer.startswith(b"HTTP/1.1 "), answer


def test_a_wrong_preface_after_the_request_line_is_a_goaway(engine: Engine, tmp_path: Path) -> None:
    async def scenario(service: AccessLogService, receiver: H2Receiver) -> list[Frame]:
        client = await Client.open(tmp_path / "s.sock", handshake=False)
        await client.send(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + frame(h2.SETTINGS, 0, 0))
        frames = await client.to_end()
        await client.close()
        await settled(service, receiver)
        return frames

    frames = run(engine, tmp_path / "s.sock", scenario)
    assert goaway_code(frames) == h2.PROTOCOL_ERROR


# -- 2. connection frames --------------------------------------------------------------------------------


def test_settings_acked_and_ping_echoed(engine: Engine, tmp_path: Path) -> None:
    async def scenario(service: AccessLogService, receiver: H2Receiver) -> list[Frame]:
        client = await Client.open(tmp_path / "s.sock")
        settings = struct.pack(">HI", 0x4, 1 << 20) + struct.pack(">HI", 0x1, 0)
        await client.send(frame(h2.SETTINGS, 0, 0, settings), frame(h2.PING, 0, 0, b"\x00\xffabcdef"))
        frames = await client.frames(lambda f: f[0] == h2.PING)
        await client.close()
        return frames

    frames = run(engine, tmp_path / "s.sock", scenario)
    assert (h2.SETTINGS, h2.ACK, 0, b"") in frames
    assert frames[-1] == (h2.PING, h2.ACK, 0, b"\x00\xffabcdef")


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (frame(h2.SETTINGS, 0, 0, b"\x00\x04\x00\x00\x00"), h2.FRAME_SIZE_ERROR),
        (frame(h2.SETTINGS, h2.ACK, 0, b"\x00\x04\x00\x00\x00\x01"), h2.FRAME_SIZE_ERROR),
        (frame(h2.WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00"), h2.PROTOCOL_ERROR),
        (frame(h2.PING, 0, 0, b"1234567"), h2.FRAME_SIZE_ERROR),
        (frame(h2.SETTINGS, 0, 1, b""), h2.PROTOCOL_ERROR),
        (
            frame(h2.HEADERS, h2.END_HEADERS, 2, hpack.Encoder().encode([(":method", "POST")])),
            h2.PROTOCOL_ERROR,
        ),
        (frame(h2.DATA, 0, 5, grpc_message(b"x")), h2.PROTOCOL_ERROR),
        (frame(h2.RST_STREAM, 0, 7, b"\x00\x00\x00\x08"), h2.PROTOCOL_ERROR),
        (
            (h2.MAX_FRAME + 1).to_bytes(3, "big") + bytes([h2.DATA, 0]) + b"\x00\x00\x00\x01",
            h2.FRAME_SIZE_ERROR,
        ),
        (frame(h2.PUSH_PROMISE, h2.END_HEADERS, 1, b"\x00\x00\x00\x02"), h2.PROTOCOL_ERROR),
        (frame(h2.HEADERS, h2.END_HEADERS, 1, b"\xfe"), h2.COMPRESSION_ERROR),  # no such table index
        (frame(h2.HEADERS, h2.END_HEADERS, 1, b"\x40\x85abc"), h2.COMPRESSION_ERROR),  # cut short
        (frame(h2.HEADERS, h2.END_HEADERS, 1, b"\x3f\xe1\x7f"), h2.COMPRESSION_ERROR),  # table over 4096
        (frame(h2.HEADERS, h2.END_HEADERS, 1, b"\xff" * 12), h2.COMPRESSION_ERROR),  # an endless integer
        (
            frame(h2.HEADERS, 0, 1, Client.static_block()) + frame(h2.PING, 0, 0, b"12345678"),
            h2.PROTOCOL_ERROR,
        ),
        (frame(h2.CONTINUATION, h2.END_HEADERS, 1, b""), h2.PROTOCOL_ERROR),
    ],
    ids=[
        "settings-length",
        "settings-ack-payload",
        "window-update-0",
        "ping-length",
        "settings-stream",
        "headers-even-stream",
        "data-idle-stream",
        "rst-idle-stream",
        "frame-over-max",
        "push-promise",
        "hpack-index",
        "hpack-truncated",
        "hpack-table-size",
        "hpack-integer",
        "header-block-interrupted",
        "continuation-alone",
    ],
)
def test_bad_connection_frames_end_with_goaway(engine: Engine, tmp_path: Path, bad: bytes, code: int) -> None:
    async def scenario(service: AccessLogService, receiver: H2Receiver) -> list[Frame]:
        client = await Client.open(tmp_path / "s.sock")
        await client.send(bad, frame(h2.PING, 0, 0, b"after..."))
        frames = await client.to_end()
        await client.close()
        await settled(service, receiver)
        return frames

    frames = run(engine, tmp_path / "s.sock", scenario)
    assert goaway_code(frames) == code
    assert (h2.PING, h2.ACK, 0, b"after...") not in frames  # nothing is read after the error


# -- 3. the messages of a stream, however framed, are accounted alike -------------------------------------


def _one_frame(client: Client, sid: int, body: bytes) -> list[bytes]:
    return [frame(h2.HEADERS, h2.END_HEADERS, sid, client.block()), frame(h2.DATA, h2.END_STREAM, sid, body)]


def _byte_by_byte(client: Client, sid: int, body: bytes) -> list[bytes]:
    out = [frame(h2.HEADERS, h2.END_HEADERS, sid, client.block())]
    out += [frame(h2.DATA, 0, sid, body[i : i + 1]) for i in range(len(body))]
    return [*out, frame(h2.DATA, h2.END_STREAM, sid)]


def _padded(client: Client, sid: int, body: bytes) -> list[bytes]:
    out = [frame(h2.HEADERS, h2.END_HEADERS, sid, client.block())]
    chunks = [body[i : i + 7] for i in range(0, len(body), 7)] + [b""]
    for i, chunk in enumerate(chunks):
        pad = (0, 1, 200, 255)[i % 4]
        flags = h2.PADDED | (h2.END_STREAM if i == len(chunks) - 1 else 0)
        out.append(frame(h2.DATA, flags, sid, bytes([pad]) + chunk + b"\x00" * pad))
    return out


def _continuation_and_priority(client: Client, sid: int, body: bytes) -> list[bytes]:
    block = client.block(**{"x-padding": "p" * 300})
    cut = len(block) // 3
    priority = struct.pack(">IB", 0x80000000 | 0, 15)  # exclusive on stream 0, weight 16
    headers = bytes([9]) + priority + block[:cut] + b"\x00" * 9  # PADDED and PRIORITY
    out = [
        frame(h2.HEADERS, h2.PADDED | h2.PRIORITY_FLAG, sid, headers),
        frame(h2.CONTINUATION, 0, sid, block[cut : 2 * cut]),
        frame(h2.CONTINUATION, h2.END_HEADERS, sid, block[2 * cut :]),
    ]
    for i in range(0, len(body), 500):
        out.append(frame(h2.PRIORITY, 0, sid, priority))
        out.append(frame(0xFA, 0xFF, sid, b"an extension frame"))  # unknown types are ignored
        out.append(frame(h2.PRIORITY, 0, sid + 2, priority))  # PRIORITY for an idle stream is allowed
        out.append(frame(h2.DATA, 0, sid, body[i : i + 500]))
    return [*out, frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, sid, client.encoder.encode([("x", "y")]))]


def _account(engine: Engine, path: Path, layout: Callable[[Client, int, bytes], list[bytes]]) -> Any:
    recorder = Recorder(engine)
    body = b"".join(map(grpc_message, batches()))

    async def scenario(service: AccessLogService, receiver: H2Receiver) -> Any:
        client = await Client.open(path)
        await client.send(*layout(client, 1, body))
        response = await client.response(1)
        await client.close()
        await settled(service, receiver)
        return response, (service.messages, service.entries, service.ignored)

    response, counts = run(recorder, path, scenario)
    return response, counts, recorder.calls


@pytest.mark.parametrize("layout", [_byte_by_byte, _padded, _continuation_and_priority])
def test_messages_split_padded_continued_are_accounted_as_in_one_frame(
    engine: Engine, tmp_path: Path, layout: Callable[[Client, int, bytes], list[bytes]]
) -> None:
    expected = _account(engine, tmp_path / "a.sock", _one_frame)
    (blocks, data), counts, calls = expected
    assert data == h2.EMPTY_MESSAGE and blocks[-1][b"grpc-status"] == b"0"
    assert counts == (3, 4, 1) and [args[0] for args, _ in calls] == ACCOUNTED
    assert _account(engine, tmp_path / "b.sock", layout) == expected


def test_a_message_split_at_every_position_across_two_frames(engine: Engine, tmp_path: Path) -> None:
    recorder = Recorder(engine)
    body = grpc_message(batches()[1])

    async def scenario(service: AccessLogService, receiver: H2Receiver) -> int:
        client = await Client.open(tmp_path / "s.sock")
        for n, cut in enumerate(range(len(body) + 1)):
            sid = 2 * n + 1
            await client.send(
                frame(h2.HEADERS, h2.END_HEADERS, sid, client.block()),
                frame(h2.DATA, 0, sid, body[:cut]),
                frame(h2.DATA, h2.END_STREAM, sid, body[cut:]),
            )
            blocks, data = await client.response(sid)
            assert data == h2.EMPTY_MESSAGE and blocks[-1][b"grpc-status"] == b"0", (cut, blocks)
        await client.close()
        await settled(service, receiver)
        return service.messages

    assert run(recorder, tmp_path / "s.sock", scenario) == len(body) + 1
    assert request_ids(recorder) == ["r1"] * (len(body) + 1)


# -- 4. flow control --------------------------------------------------------------------------------------


def named(size: int, i: int = 0) -> bytes:
    """An access-log message of about `size` bytes that accounts nothing (an identifier)."""
    msg = message(identifier=True)
    msg.identifier.log_name = f"{i:08d}" + "n" * size
    return msg.SerializeToString()


def increments(frames: list[Frame], stream: int) -> list[int]:
    return [
        int.from_bytes(p, "big") for kind, _, sid, p in frames if kind == h2.WINDOW_UPDATE and sid == stream
    ]


def test_windows_are_topped_up_so_a_flow_controlled_client_never_stalls(
    engine: Engine, tmp_path: Path
) -> None:
    body = b"".join(grpc_message(named(3 << 20, i)) for i in range(8))  # 24 MiB: over the 16 MiB windows

    async def scenario(service: AccessLogService, receiver: H2Receiver) -> tuple[list[int], list[int], int]:
        client = await Client.open(tmp_path / "s.sock")
        await client.send(frame(h2.HEADERS, h2.END_HEADERS, 1, client.block()))
        conn_window, stream_window, sent = 65535, h2.WINDOW, 0
        while sent < len(body):
            n = min(h2.MAX_FRAME, len(body) - sent, conn_window, stream_window)
            if n <= 0:  # a client that keeps to the windows: wait for WINDOW_UPDATE (a stall times out)
                kind, _, sid, payload = await client.frame()
                if kind == h2.WINDOW_UPDATE:
                    if sid == 0:
                        conn_window += int.from_bytes(payload, "big")
                    else:
                        stream_window += int.from_bytes(payload, "big")
                continue
            await client.send(frame(h2.DATA, 0, 1, body[sent : sent + n]))
            sent, conn_window, stream_window = sent + n, conn_window - n, stream_window - n
        await client.send(frame(h2.DATA, h2.END_STREAM, 1))
        blocks, _ = await client.response(1)
        assert blocks[-1][b"grpc-status"] == b"0"
        await client.close()
        await settled(service, receiver)
        return increments(client.seen, 0), increments(client.seen, 1), service.messages

    conn, stream, messages = run(engine, tmp_path / "s.sock", scenario)
    assert messages == 8
    assert conn[0] == h2.WINDOW - 65535  # the connection's window raised at once to WINDOW
    # then topped up at half: each increment is what was received since the last one
    for got in (conn[1:], stream):
        assert got and all(h2.WINDOW // 2 <= i < h2.WINDOW // 2 + h2.MAX_FRAME for i in got), got
        assert len(body) - h2.WINDOW // 2 <= sum(got) <= len(body)


class Spy:
    """A transport whose pause_reading and resume_reading calls are recorded."""

    def __init__(self, transport: Any, calls: list[str]) -> None:
        self.transport, self.calls = transport, calls

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)

    def pause_reading(self) -> None:
        self.calls.append("pause")
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.calls.append("resume")
        self.transport.resume_reading()


def test_a_slow_reader_pauses_the_socket_and_resumes_it_without_loss(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(als_h2, "HIGH", 64 << 10)
    monkeypatch.setattr(als_h2, "LOW", 16 << 10)
    count = 300
    body = b"".join(grpc_message(named(10_000, i)) for i in range(count))  # ~3 MB
    calls: list[str] = []

    async def scenario(service: AccessLogService, receiver: H2Receiver) -> int:
        client = await Client.open(tmp_path / "s.sock")
        (conn,) = receiver.connections
        conn._transport = Spy(conn._transport, calls)  # type: ignore[assignment]
        await client.send(frame(h2.HEADERS, h2.END_HEADERS, 1, client.block()))
        for i in range(0, len(body), 100_000):
            await client.send(frame(h2.DATA, 0, 1, body[i : i + 100_000]))
        await client.send(frame(h2.DATA, h2.END_STREAM, 1))
        blocks, _ = await client.response(1)
        assert blocks[-1][b"grpc-status"] == b"0"
        await client.close()
        await settled(service, receiver)
        return service.messages

    assert run(engine, tmp_path / "s.sock", scenario) == count
    assert calls.count("pause") >= 1 and calls.count("pause") == calls.count("resume")
    assert calls[0] == "pause" and calls[-1] == "resume"


# -- 5. stream errors and limits --------------------------------------------------------------------------


def test_a_compressed_message_ends_the_stream_with_unimplemented_after_accounting_those_before(
    engine: Engine, tmp_path: Path
) -> None:
    recorder = Recorder(engine)

    async def scenario(service: AccessLogService, receiver: H2Receiver) -> Any:
        client = await Client.open(tmp_path / "s.sock")
        whole = grpc_message(batches()[0]) + grpc_message(batches()[1])
        await client.send(
            frame(h2.HEADERS, h2.END_HEADERS, 1, client.block()),
            frame(h2.DATA, 0, 1, whole + grpc_message(batches()[1], compressed=True)),
        )
        frames = await client.frames(lambda f: f[0] == h2.RST_STREAM)
        await settled(service, receiver, connections=1)  # the stream's task has ended
        await client.close()
        await settled(service, receiver)
        return [fields for _, _, fields in client.blocks], frames, service.messages

    (headers,), frames, messages = run(recorder, tmp_path / "s.sock", scenario)
    assert headers[b"grpc-status"] == b"12"
    assert frames[-1] == (h2.RST_STREAM, 0, 1, b"\x00\x00\x00\x00")
    assert messages == 2 and request_ids(recorder) == ["r1"]


def test_a_message_over_the_size_limit_is_refused_without_buffering_it(
    engine: Engine, tmp_path: Path
) -> None:
    async def scenario(service: AccessLogService, receiver: H2Receiver) -> Any:
        client = await Client.open(tmp_path / "s.sock")
        (conn,) = receiver.connections
        head = b"\x00" + (MAX_MESSAGE_BYTES + 1).to_bytes(4, "big")
        await client.send(
            frame(h2.HEADERS, h2.END_HEADERS, 1, client.block()),
            frame(h2.DATA, 0, 1, head + b"x" * 1000),
        )
        await client.frames(lambda f: f[0] == h2.RST_STREAM)
        for _ in range(4):  # the rest of the message: dropped, not buffered
            await client.send(frame(h2.DATA, 0, 1, b"x" * (1 << 20)))
        await client.send(frame(h2.PING, 0, 0, b"12345678"))
        await client.frames(lambda f: f[0] == h2.PING)
        assert not conn._streams and conn._queued == 0 and len(conn._buffer) == 0
        # and the connection goes on: a new stream is accounted
        await client.send(
            frame(h2.HEADERS, h2.END_HEADERS, 3, client.block()),
            frame(h2.DATA, h2.END_STREAM, 3, grpc_message(batches()[0])),
        )
        blocks, _ = await client.response(3)
        assert blocks[-1][b"grpc-status"] == b"0"
        await client.close()
        await settled(service, receiver)
        return [fields for _, _, fields in client.blocks], service.messages

    blocks, messages = run(engine, tmp_path / "s.sock", scenario)
    assert blocks[0][b"grpc-status"] == b"8" and len(blocks) == 3  # then stream 3's response
    assert messages == 1


def test_a_connection_error_ends_the_streams_answered_later_without_writing_after_goaway(
    engine: Engine, tmp_path: Path
) -> None:
    async def scenario(service: AccessLogService, receiver: H2Receiver) -> list[Frame]:
        client = await Client.open(tmp_path / "s.sock")
        await client.send(
            frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, client.block()),  # answered by its task
            frame(h2.DATA, 0, 0, b""),  # DATA on stream 0: a connection error, in the same read
        )
        frames = await client.to_end()
        await client.close()
        await settled(service, receiver)
        return frames

    frames = run(engine, tmp_path / "s.sock", scenario)
    assert goaway_code(frames) == h2.PROTOCOL_ERROR


def test_nothing_is_written_after_the_goaway_even_with_answers_still_buffered(
    engine: Engine, tmp_path: Path
) -> None:
    async def scenario(service: AccessLogService, receiver: H2Receiver) -> list[Frame]:
        client = await Client.open(tmp_path / "s.sock")
        # PINGs not read: their ACKs fill the socket and the transport's buffer; then a stream its task
        # answers later, and in the same read a connection error (GOAWAY, close)
        await client.send(
            frame(h2.PING, 0, 0, b"12345678") * 30_000
            + frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, client.block())
            + frame(h2.DATA, 0, 0, b"")
        )
        frames = await client.to_end()
        await client.close()
        await settled(service, receiver)
        return frames

    frames = run(engine, tmp_path / "s.sock", scenario)
    assert goaway_code(frames) == h2.PROTOCOL_ERROR
    assert frames[-2] == (h2.PING, h2.ACK, 0, b"12345678")


def test_a_flood_of_empty_continuation_frames_is_cut_short(engine: Engine, tmp_path: Path) -> None:
    async def scenario(service: AccessLogService, receiver: H2Receiver) -> tuple[list[Frame], float]:
        client = await Client.open(tmp_path / "s.sock")
        loop = asyncio.get_running_loop()
        started = loop.time()
        block = client.block()
        await client.send(
            frame(h2.HEADERS, 0, 1, block[:2]) + frame(h2.CONTINUATION, 0, 1) * 20_000,
            frame(h2.CONTINUATION, h2.END_HEADERS, 1, block[2:]),
        )
        frames = await client.to_end()
        elapsed = loop.time() - started
        await client.close()
        await settled(service, receiver)
        return frames, elapsed

    frames, elapsed = run(engine, tmp_path / "s.sock", scenario)
    assert goaway_code(frames) == h2.ENHANCE_YOUR_CALM
    assert elapsed < 2.0  # not quadratic in the number of fragments


def test_a_second_release_message_is_refused_at_once(engine: Engine, tmp_path: Path) -> None:
    releasing = Releasing(engine)

    async def scenario(service: AccessLogService, receiver: H2Receiver) -> dict[bytes, bytes]:
        client = await Client.open(tmp_path / "s.sock")
        await client.send(
            frame(h2.HEADERS, h2.END_HEADERS, 1, client.block(RELEASE_PATH)),
            frame(h2.DATA, 0, 1, grpc_message(b"a") + grpc_message(b"b")),  # and more may follow
        )
        blocks, _ = await client.response(1)
        await client.close()
        return blocks[-1]

    assert run(releasing, tmp_path / "s.sock", scenario)[b"grpc-status"] == b"13"  # INTERNAL
    assert releasing.released == []


def test_a_peer_that_does_not_read_its_answers_is_not_read_either(engine: Engine, tmp_path: Path) -> None:
    pings = 300_000  # 5 MB of PING, as many ACKs

    async def scenario(service: AccessLogService, receiver: H2Receiver) -> tuple[int, int]:
        client = await Client.open(tmp_path / "s.sock")
        (conn,) = receiver.connections
        await client.frames(lambda f: f[:2] == (h2.SETTINGS, h2.ACK))  # what comes before the PINGs
        sending = asyncio.create_task(client.send(frame(h2.PING, 0, 0, b"12345678") * pings))
        buffered = 0  # the most the server holds for the peer
        for _ in range(100):
            await asyncio.sleep(0.01)
            if conn._transport is not None:
                buffered = max(buffered, conn._transport.get_write_buffer_size())
        acks = await asyncio.wait_for(client.reader.readexactly(17 * pings), TIMEOUT)
        await sending
        await client.close()
        await settled(service, receiver)
        return buffered, acks.count(frame(h2.PING, h2.ACK, 0, b"12345678"))

    buffered, acks = run(engine, tmp_path / "s.sock", scenario)
    assert buffered < 1 << 20, buffered
    assert acks == pings


@pytest.mark.parametrize(
    "fields",
    [
        [(":method", "POST"), (":path", "/x.Y/Z"), ("content-type", "application/grpc")],
        [(":method", "GET"), (":path", ALS_PATH)],
    ],
    ids=["unknown-method", "not-grpc"],
)
def test_a_whole_request_refused_gets_its_status_and_no_reset(
    engine: Engine, tmp_path: Path, fields: list[tuple[str, str]]
) -> None:
    async def scenario(service: AccessLogService, receiver: H2Receiver) -> list[Frame]:
        client = await Client.open(tmp_path / "s.sock")
        block = client.encoder.encode(fields)
        await client.send(
            frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 1, block), frame(h2.PING, 0, 0, b"12345678")
        )
        await client.frames(lambda f: f[0] == h2.PING)
        await client.close()
        return client.seen

    seen = run(engine, tmp_path / "s.sock", scenario)
    on_stream = [(kind, flags) for kind, flags, sid, _ in seen if sid == 1]
    assert on_stream == [(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM)]  # trailers-only, UNIMPLEMENTED


def test_partial_messages_are_bounded_per_connection(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(als_h2, "MAX_PARTIAL", 2 << 20)
    body = grpc_message(named(1_000_000))
    cut = 900_000

    async def scenario(service: AccessLogService, receiver: H2Receiver) -> tuple[list[int], list[bytes]]:
        client = await Client.open(tmp_path / "s.sock")
        (conn,) = receiver.connections
        for sid in (1, 3, 5):  # three messages begun, none ended: the third is over the bound
            await client.send(
                frame(h2.HEADERS, h2.END_HEADERS, sid, client.block()), frame(h2.DATA, 0, sid, body[:cut])
            )
        refused = await client.frames(lambda f: f[0] == h2.RST_STREAM)
        for sid in (3, 1):  # ended in the other order: their answers may come in either
            await client.send(frame(h2.DATA, h2.END_STREAM, sid, body[cut:]))
        statuses = [(await client.response(sid))[0][-1][b"grpc-status"] for sid in (1, 3)]
        assert conn._partial == 0
        await client.close()
        await settled(service, receiver)
        return [f[2] for f in refused if f[0] == h2.HEADERS], [*statuses, client.blocks[0][2][b"grpc-status"]]

    refused, statuses = run(engine, tmp_path / "s.sock", scenario)
    assert refused == [5]
    assert statuses == [b"0", b"0", b"8"]  # the first two accounted, the third RESOURCE_EXHAUSTED


def test_unknown_frame_types_are_ignored(engine: Engine, tmp_path: Path) -> None:
    async def scenario(service: AccessLogService, receiver: H2Receiver) -> list[Frame]:
        client = await Client.open(tmp_path / "s.sock")
        unknown = [
            frame(kind, 0xFF, sid, b"?" * kind) for kind in (0x0A, 0x0C, 0x10, 0xFF) for sid in (0, 1, 9)
        ]
        await client.send(*unknown, frame(h2.PING, 0, 0, b"still on"))
        frames = await client.frames(lambda f: f[0] == h2.PING)
        await client.close()
        return frames

    assert run(engine, tmp_path / "s.sock", scenario)[-1] == (h2.PING, h2.ACK, 0, b"still on")


class Releasing:
    """The engine as slot releases see it."""

    def __init__(self, engine: Engine) -> None:
        self.book = engine.book
        self.released: list[str] = []

    def release(self, request_id: str) -> None:
        self.released.append(request_id)


def test_streams_over_the_limit_are_refused_and_the_others_answered(engine: Engine, tmp_path: Path) -> None:
    releasing = Releasing(engine)

    async def scenario(service: AccessLogService, receiver: H2Receiver) -> list[Frame]:
        client = await Client.open(tmp_path / "s.sock")
        ids = [2 * i + 1 for i in range(h2.MAX_STREAMS + 1)]
        await client.send(
            *(frame(h2.HEADERS, h2.END_HEADERS, sid, client.block(RELEASE_PATH)) for sid in ids)
        )
        refused = await client.frames(lambda f: f[0] == h2.RST_STREAM)
        await client.send(
            *(frame(h2.DATA, h2.END_STREAM, sid, grpc_message(b"r%d" % sid)) for sid in ids[:-1])
        )
        for sid in ids[:-1]:
            blocks, data = await client.response(sid)
            assert data == h2.EMPTY_MESSAGE and blocks[-1][b"grpc-status"] == b"0"
        await client.close()
        return refused

    refused = run(releasing, tmp_path / "s.sock", scenario)
    assert refused[-1] == (h2.RST_STREAM, 0, 2 * h2.MAX_STREAMS + 1, h2.REFUSED_STREAM.to_bytes(4, "big"))
    assert releasing.released == [f"r{2 * i + 1}" for i in range(h2.MAX_STREAMS)]


def test_a_reset_mid_message_accounts_the_whole_messages_before_it(engine: Engine, tmp_path: Path) -> None:
    recorder = Recorder(engine)

    async def scenario(service: AccessLogService, receiver: H2Receiver) -> tuple[list[Frame], int]:
        client = await Client.open(tmp_path / "s.sock")
        whole = grpc_message(batches()[0]) + grpc_message(batches()[1])
        partial = grpc_message(batches()[2])[:-100]
        await client.send(
            frame(h2.HEADERS, h2.END_HEADERS, 1, client.block()),
            frame(h2.DATA, 0, 1, whole + partial),
            frame(h2.RST_STREAM, 0, 1, h2.CANCEL.to_bytes(4, "big")),
            frame(h2.DATA, 0, 1, b"late data on the reset stream"),
            frame(h2.PING, 0, 0, b"12345678"),
        )
        await client.frames(lambda f: f[0] == h2.PING)
        await settled(service, receiver, connections=1)
        await client.send(frame(h2.PING, 0, 0, b"87654321"))
        await client.frames(lambda f: f[0] == h2.PING)
        await client.close()
        await settled(service, receiver)
        return client.seen, service.messages

    seen, messages = run(recorder, tmp_path / "s.sock", scenario)
    assert messages == 2 and request_ids(recorder) == ["r1"]
    assert [f for f in seen if f[2] == 1 and f[0] != h2.WINDOW_UPDATE] == []  # nothing sent on a reset stream


def test_reset_slot_releases_do_not_hold_back_the_access_log(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(als_h2, "HIGH", 100)
    monkeypatch.setattr(als_h2, "LOW", 50)
    releasing = Releasing(engine)

    async def scenario(service: AccessLogService, receiver: H2Receiver) -> int:
        client = await Client.open(tmp_path / "s.sock")
        for sid in range(1, 20, 2):  # the Lua tap's release calls, cancelled (Envoy resets them on timeout)
            await client.send(
                frame(h2.HEADERS, h2.END_HEADERS, sid, client.block(RELEASE_PATH)),
                frame(h2.DATA, 0, sid, grpc_message(b"request-%036d" % sid)),
                frame(h2.RST_STREAM, 0, sid, h2.CANCEL.to_bytes(4, "big")),
                frame(h2.PING, 0, 0, b"%08d" % sid),
            )
            await client.frames(lambda f: f[0] == h2.PING, timeout=3)
        await client.send(
            frame(h2.HEADERS, h2.END_HEADERS, 21, client.block()),
            frame(h2.DATA, h2.END_STREAM, 21, grpc_message(batches()[0])),
        )
        blocks, _ = await client.response(21)
        assert blocks[-1][b"grpc-status"] == b"0"
        await client.close()
        await settled(service, receiver)
        return service.messages

    assert run(releasing, tmp_path / "s.sock", scenario) == 1
    assert releasing.released == []


def test_a_response_waits_for_its_window_and_a_reset_one_holds_back_no_other(
    engine: Engine, tmp_path: Path
) -> None:
    releasing = Releasing(engine)

    async def scenario(service: AccessLogService, receiver: H2Receiver) -> list[Frame]:
        client = await Client.open(tmp_path / "s.sock")
        await client.send(frame(h2.SETTINGS, 0, 0, struct.pack(">HI", 0x4, 0)))  # no stream window
        for sid in (1, 3):
            await client.send(
                frame(h2.HEADERS, h2.END_HEADERS, sid, client.block(RELEASE_PATH)),
                frame(h2.DATA, h2.END_STREAM, sid, grpc_message(b"req-%d" % sid)),
            )
        await client.send(frame(h2.PING, 0, 0, b"12345678"))
        await client.frames(lambda f: f[0] == h2.PING)
        # both answered up to their message, which waits for a window; stream 1 is then reset
        assert [(k, sid) for k, _, sid, _ in client.seen if k in (h2.HEADERS, h2.DATA)] == [
            (h2.HEADERS, 1),
            (h2.HEADERS, 3),
        ]
        await client.send(
            frame(h2.RST_STREAM, 0, 1, h2.CANCEL.to_bytes(4, "big")),
            frame(h2.WINDOW_UPDATE, 0, 3, struct.pack(">I", 5)),
        )
        blocks, data = await client.response(3)
        assert data == h2.EMPTY_MESSAGE and blocks[-1][b"grpc-status"] == b"0"
        await client.send(frame(h2.PING, 0, 0, b"87654321"))
        await client.frames(lambda f: f[0] == h2.PING)
        await client.close()
        return client.seen

    seen = run(releasing, tmp_path / "s.sock", scenario)
    assert releasing.released == ["req-1", "req-3"]
    assert [(k, sid) for k, _, sid, _ in seen if k in (h2.HEADERS, h2.DATA, h2.RST_STREAM)] == [
        (h2.HEADERS, 1),
        (h2.HEADERS, 3),
        (h2.DATA, 3),
        (h2.HEADERS, 3),
    ]


# -- 6. the client leaving mid-stream ---------------------------------------------------------------------


def test_the_client_dropping_the_connection_mid_stream_accounts_what_arrived_whole(
    engine: Engine, tmp_path: Path
) -> None:
    recorder = Recorder(engine)

    async def scenario(service: AccessLogService, receiver: H2Receiver) -> int:
        client = await Client.open(tmp_path / "s.sock")
        whole = grpc_message(batches()[0]) + grpc_message(batches()[1])
        await client.send(
            frame(h2.HEADERS, h2.END_HEADERS, 1, client.block()),
            frame(h2.DATA, 0, 1, whole + grpc_message(batches()[2])[:-1]),
            frame(h2.HEADERS, h2.END_HEADERS, 3, client.block(RELEASE_PATH)),
            frame(h2.DATA, 0, 3, grpc_message(b"never released")),
            frame(h2.HEADERS, 0, 5, client.block()[:3]),  # a header block cut off
        )
        await asyncio.sleep(0.05)
        await client.close()
        await settled(service, receiver)
        return service.messages

    assert run(recorder, tmp_path / "s.sock", scenario) == 2
    assert request_ids(recorder) == ["r1"]


# -- 7. shutdown ------------------------------------------------------------------------------------------


def test_close_after_the_drain_ends_the_stream_with_ok_then_goaway(engine: Engine, tmp_path: Path) -> None:
    async def scenario(service: AccessLogService, receiver: H2Receiver) -> list[Client]:
        client = await Client.open(tmp_path / "s.sock")
        idle = await Client.open(tmp_path / "s.sock")  # a connection without streams
        await client.send(
            frame(h2.HEADERS, h2.END_HEADERS, 1, client.block()),
            frame(h2.DATA, 0, 1, grpc_message(batches()[1])),
        )
        while service.messages < 1:
            await asyncio.sleep(0.01)
        await service.drain(5.0)
        receiver.close()  # as server.py's drain does, right after the access log's
        await client.to_end()
        await idle.to_end()
        await client.close()
        await idle.close()
        await settled(service, receiver)
        return [client, idle]

    clients = run(engine, tmp_path / "s.sock", scenario, quiet=0.05)
    shown = []
    for client in clients:
        blocks = iter(client.blocks)
        for kind, flags, sid, payload in client.seen:
            if kind == h2.HEADERS:
                shown.append(("HEADERS", flags & h2.END_STREAM, sid, next(blocks)[2]))
            elif kind in (h2.DATA, h2.GOAWAY, h2.RST_STREAM):
                shown.append(
                    ({h2.DATA: "DATA", h2.GOAWAY: "GOAWAY", h2.RST_STREAM: "RST"}[kind], flags, sid, payload)
                )
    assert shown == [
        ("HEADERS", 0, 1, {b":status": b"200", b"content-type": b"application/grpc"}),
        ("DATA", 0, 1, h2.EMPTY_MESSAGE),
        ("HEADERS", h2.END_STREAM, 1, {b"grpc-status": b"0"}),
        ("RST", 0, 1, struct.pack(">I", h2.NO_ERROR)),  # the client need send no more (RFC 9113 §8.1)
        ("GOAWAY", 0, 0, struct.pack(">II", 1, h2.NO_ERROR)),
        ("GOAWAY", 0, 0, struct.pack(">II", 0, h2.NO_ERROR)),  # the idle connection's
    ]


def test_close_refuses_new_streams_and_closes_a_stream_that_never_ends_after_the_grace(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(h2_listener, "CLOSE_GRACE", 0.2)
    releasing = Releasing(engine)

    async def scenario(service: AccessLogService, receiver: H2Receiver) -> list[Frame]:
        client = await Client.open(tmp_path / "s.sock")
        await client.send(frame(h2.HEADERS, h2.END_HEADERS, 1, client.block(RELEASE_PATH)))  # never ended
        await client.send(frame(h2.PING, 0, 0, b"12345678"))
        await client.frames(lambda f: f[0] == h2.PING)
        receiver.close()
        await client.send(frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 3, client.block(RELEASE_PATH)))
        refused = await client.frames(lambda f: f[0] == h2.RST_STREAM)
        frames = await client.to_end(timeout=5)
        await client.close()
        await settled(service, receiver)
        return [refused[-1], *frames]

    frames = run(releasing, tmp_path / "s.sock", scenario)
    assert frames[0] == (h2.RST_STREAM, 0, 3, h2.REFUSED_STREAM.to_bytes(4, "big"))
    assert goaway_code(frames[1:]) == h2.NO_ERROR
