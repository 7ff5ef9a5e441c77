"""Envoy's gRPC ext_authz Check on the check listener's HTTP/2 (adapters/als_h2.py), driven by a real gRPC
client (grpc core's HTTP/2, as Envoy's is another): every answer is byte for byte the gRPC port's
(grpc.aio) for the same sequence of requests, and what the engine counted is the same; malformed,
oversized and unary-breaking calls get gRPC statuses, never a dead connection."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import hpack
import pytest
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import code_pb2

from nexus_authz.adapters import h2_frames as h2
from nexus_authz.adapters.als_h2 import CHECK_PATH, RELEASE_PATH, H2Connection
from nexus_authz.adapters.envoy_als import AccessLogService
from nexus_authz.core.model import Reason
from nexus_authz.decide import Decider
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from tests.adapters.conftest import ALICE
from tests.adapters.test_als_h2 import check_socket
from tests.adapters.test_als_h2_frames import Client, frame, grpc_message
from tests.adapters.test_envoy_authz import check_request, grpc_port
from tests.adapters.test_http_fastpath import KEYS, NOW, PLANS
from tests.helpers import write_config

BODY = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'


def _engine(directory: Path) -> tuple[Engine, list[float]]:
    directory.mkdir()
    clock = [NOW]
    config = write_config(directory, *KEYS, extra=PLANS)
    return Engine.from_settings(load_settings(str(config)), clock=lambda: clock[0]), clock


def _requests() -> list[external_auth_pb2.CheckRequest]:
    """Allowed, refused for every reason the policy has, rate-limited in turn, odd encodings."""
    out = []
    for key in KEYS:
        for auth in ({"authorization": f"Bearer {key.secret}"}, {"x-api-key": key.secret}):
            for body, path in ((BODY, "/v1/chat/completions"), (b'{"model":"o1"}', "/v1/embeddings")):
                headers = {**auth, "x-request-id": f"r{len(out)}", "content-length": str(len(body))}
                out.append(check_request(headers, body, path))
    # 429s: a full concurrency limit (each waits for a slot first: the awaitable path), a request limit
    out += [check_request({"authorization": f"Bearer {KEYS[1].secret}"}, BODY) for _ in range(3)]
    permodel = next(k for k in KEYS if k.id == "permodel")
    out += [check_request({"authorization": f"Bearer {permodel.secret}"}, BODY) for _ in range(6)]
    out.append(external_auth_pb2.CheckRequest())  # empty: 401
    raw = check_request({}, BODY)
    hv = raw.attributes.request.http.header_map.headers.add()
    hv.key, hv.raw_value = "X-Api-Key", KEYS[0].secret.encode()
    out.append(raw)
    out.append(check_request({"authorization": "Bearer nx-nobody-0123456789abcdef"}, BODY))
    out.append(check_request({"authorization": f"Bearer {KEYS[0].secret}"}, b"\x00\xff not json"))
    return out


def _raw_check(channel: grpc.aio.Channel) -> Callable[[bytes], Awaitable[bytes]]:
    return channel.unary_unary(CHECK_PATH)  # type: ignore[return-value]  (bytes in, bytes out)


def test_check_on_the_check_socket_answers_as_the_grpc_port_byte_for_byte(tmp_path: Path) -> None:
    requests = [r.SerializeToString() for r in _requests()]

    async def over_h2() -> tuple[list[bytes], Engine]:
        engine, _ = _engine(tmp_path / "h2")
        path = tmp_path / "check.sock"
        async with (
            check_socket(AccessLogService(engine), engine, path),
            grpc.aio.insecure_channel(f"unix:{path}") as channel,
        ):
            call = _raw_check(channel)
            return [await call(r) for r in requests], engine

    async def over_grpc() -> tuple[list[bytes], Engine]:
        engine, _ = _engine(tmp_path / "grpc")
        async with grpc_port(engine) as channel:
            call = _raw_check(channel)
            return [await call(r) for r in requests], engine

    got, h2_engine = asyncio.run(over_h2())
    want, grpc_engine = asyncio.run(over_grpc())
    assert got == want
    answers = [external_auth_pb2.CheckResponse.FromString(b) for b in got]
    codes = [a.status.code for a in answers]
    # the sequence covers allows and each kind of refusal, rate limits included
    assert {
        code_pb2.OK,
        code_pb2.UNAUTHENTICATED,
        code_pb2.PERMISSION_DENIED,
        code_pb2.RESOURCE_EXHAUSTED,
    } <= set(codes), codes
    assert dict(h2_engine.decisions) == dict(grpc_engine.decisions)
    assert h2_engine.decisions[Reason.RATE_LIMITED] >= 5, dict(h2_engine.decisions)
    assert h2_engine.decisions[Reason.CONCURRENCY_LIMITED] >= 3, dict(h2_engine.decisions)


async def _one_call(path: Path, engine: Engine, send: Callable[[Client], Awaitable[None]]) -> Any:
    """A raw HTTP/2 client's call on the check socket: the header blocks and DATA of stream 1."""
    async with check_socket(AccessLogService(engine), engine, path):
        client = await Client.open(path)
        try:
            await send(client)
            return await client.response(1)
        finally:
            client.writer.close()


def _status(blocks: list[dict[bytes, bytes]]) -> tuple[bytes, bytes]:
    last = blocks[-1]
    return last.get(b"grpc-status", b""), last.get(b"grpc-message", b"")


@pytest.mark.parametrize(
    ("what", "payload", "status", "message"),
    [
        ("no CheckRequest", grpc_message(b"\xff\xff\xff"), b"13", b"the message is no CheckRequest"),
        ("two messages", grpc_message(b"") * 2, b"13", b"a unary call takes one message"),
        ("no message", b"", b"13", b"a unary call takes one message"),
        ("cut message", grpc_message(b"\x0a\x00")[:-1], b"13", b"a unary call takes one message"),
        ("compressed", b"\x01" + grpc_message(b"")[1:], b"12", b"compressed messages are not accepted"),
    ],
)
def test_a_malformed_check_is_a_grpc_error_and_the_connection_goes_on(
    engine: Engine, tmp_path: Path, what: str, payload: bytes, status: bytes, message: bytes
) -> None:
    async def send(client: Client) -> None:
        await client.send(
            frame(h2.HEADERS, h2.END_HEADERS, 1, client.block(CHECK_PATH)),
            frame(h2.DATA, h2.END_STREAM, 1, payload),
        )

    blocks, data = asyncio.run(_one_call(tmp_path / "s.sock", engine, send))
    assert data == b"" and _status(blocks) == (status, message), what


def test_a_check_over_its_limit_is_refused_without_buffering_it(engine: Engine, tmp_path: Path) -> None:
    async def run() -> Any:
        path = tmp_path / "s.sock"
        async with check_socket(AccessLogService(engine), engine, path) as receiver:
            receiver.check_limit = 1000
            client = await Client.open(path)
            big = check_request({"x-api-key": ALICE.secret}, b"x" * 1000).SerializeToString()
            await client.send(
                frame(h2.HEADERS, h2.END_HEADERS, 1, client.block(CHECK_PATH)),
                frame(h2.DATA, 0, 1, grpc_message(big)[:64]),
            )
            blocks, data = await client.response(1)
            # a check under the limit on the same connection is answered
            small = check_request({"x-api-key": ALICE.secret}, b"{}").SerializeToString()
            await client.send(
                frame(h2.HEADERS, h2.END_HEADERS, 3, client.block(CHECK_PATH)),
                frame(h2.DATA, h2.END_STREAM, 3, grpc_message(small)),
            )
            after = await client.response(3)
            client.writer.close()
            return blocks, data, after

    blocks, data, (after_blocks, after_data) = asyncio.run(run())
    assert data == b"" and _status(blocks) == (b"8", b"message over the size limit")
    assert _status(after_blocks) == (b"0", b"")
    answer = external_auth_pb2.CheckResponse.FromString(after_data[5:])
    assert answer.status.code != code_pb2.OK or answer.ok_response.headers  # a decision, not an error
    assert int.from_bytes(after_data[1:5], "big") == len(after_data) - 5


def test_a_failing_decision_is_internal_and_counted(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Engine, request: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(Engine, "check_fast", broken)
    monkeypatch.setattr(Decider, "check_plain", broken)
    before = engine.decisions[Reason.UNAVAILABLE]
    message = grpc_message(check_request({"x-api-key": ALICE.secret}).SerializeToString())

    async def send(client: Client) -> None:
        await client.send(
            frame(h2.HEADERS, h2.END_HEADERS, 1, client.block(CHECK_PATH)),
            frame(h2.DATA, h2.END_STREAM, 1, message),
        )

    blocks, data = asyncio.run(_one_call(tmp_path / "s.sock", engine, send))
    assert data == b"" and _status(blocks) == (b"13", b"internal error")
    assert engine.decisions[Reason.UNAVAILABLE] == before + 1


def test_a_decision_that_waits_is_answered_when_it_is_made_and_a_reset_one_is_not(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A counter store that answers later (Redis): the answer comes when it does, on its own stream; a
    stream reset meanwhile gets nothing, and the other streams go on."""
    real = Engine.check_fast
    gates: list[asyncio.Future[None]] = []

    def later(self: Engine, request: Any) -> Any:
        gate = asyncio.get_running_loop().create_future()
        gates.append(gate)

        async def wait() -> Any:
            await gate
            return real(self, request)

        return wait()

    monkeypatch.setattr(Engine, "check_fast", later)
    monkeypatch.setattr(Decider, "check_plain", lambda *args: None)  # to check_fast
    message = grpc_message(check_request({"x-api-key": ALICE.secret}, BODY).SerializeToString())

    async def run() -> Any:
        path = tmp_path / "s.sock"
        async with check_socket(AccessLogService(engine), engine, path):
            client = await Client.open(path)
            for sid in (1, 3):
                await client.send(
                    frame(h2.HEADERS, h2.END_HEADERS, sid, client.block(CHECK_PATH)),
                    frame(h2.DATA, h2.END_STREAM, sid, message),
                )
            while len(gates) < 2:
                await asyncio.sleep(0.01)
            await client.send(h2.rst_stream(1, h2.CANCEL))
            await asyncio.sleep(0.05)
            for gate in gates:
                gate.set_result(None)
            blocks, data = await client.response(3)
            await asyncio.sleep(0.05)
            streams = {f[2] for f in client.seen if f[0] in (h2.HEADERS, h2.DATA)}
            client.writer.close()
            return blocks, data, streams

    blocks, data, streams = asyncio.run(run())
    assert _status(blocks) == (b"0", b"")
    assert external_auth_pb2.CheckResponse.FromString(data[5:]).status.code == code_pb2.OK
    assert streams == {3}  # nothing was sent on the reset stream


def test_the_response_blocks_leave_the_clients_table_as_it_was(engine: Engine, tmp_path: Path) -> None:
    """The prepared header blocks (h2_frames.RESPONSE_BLOCK, OK_TRAILERS_BLOCK) decode to the fields gRPC
    needs and add nothing to the HPACK table; after a table size change the connection's encoder writes
    them (announcing the change first), and a client decoding every block stays in step."""
    decoder = hpack.Decoder()
    assert decoder.decode(h2.RESPONSE_BLOCK, raw=True) == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
    ]
    assert decoder.decode(h2.OK_TRAILERS_BLOCK, raw=True) == [(b"grpc-status", b"0")]
    assert decoder.header_table.dynamic_entries == type(decoder.header_table.dynamic_entries)()
    message = grpc_message(check_request({"x-api-key": ALICE.secret}, BODY).SerializeToString())

    async def send(client: Client) -> None:
        settings = frame(h2.SETTINGS, 0, 0, (0x1).to_bytes(2, "big") + (256).to_bytes(4, "big"))
        await client.send(
            settings,
            frame(h2.HEADERS, h2.END_HEADERS, 1, client.block(CHECK_PATH)),
            frame(h2.DATA, h2.END_STREAM, 1, message),
        )

    blocks, data = asyncio.run(_one_call(tmp_path / "s.sock", engine, send))
    assert blocks[0][b":status"] == b"200" and _status(blocks) == (b"0", b"")
    assert external_auth_pb2.CheckResponse.FromString(data[5:]).status.code == code_pb2.OK


def test_a_header_block_seen_before_is_read_again_once_the_table_has_changed(
    engine: Engine, tmp_path: Path
) -> None:
    """Table-neutral blocks are decoded once per connection (h2_frames.table_neutral): the same bytes after
    a block that changed the HPACK table name other fields, and are decoded again."""
    message = grpc_message(check_request({"x-api-key": ALICE.secret}, BODY).SerializeToString())
    release = grpc_message(b"no-such-request")

    async def run() -> list[tuple[list[dict[bytes, bytes]], bytes]]:
        path = tmp_path / "s.sock"
        async with check_socket(AccessLogService(engine), engine, path):
            client = await Client.open(path)
            first = client.block(CHECK_PATH)  # indexes its fields
            again = client.block(CHECK_PATH)  # indexed only: remembered by the server
            assert h2.table_neutral(again) and not h2.table_neutral(first)
            out = []
            for sid, block, data in (
                (1, first, message),
                (3, again, message),
                (5, client.block(RELEASE_PATH), release),  # a new :path entry shifts the indexes
                (7, again, release),  # the same bytes: now the release's :path (index 62)
            ):
                await client.send(
                    frame(h2.HEADERS, h2.END_HEADERS, sid, block), frame(h2.DATA, h2.END_STREAM, sid, data)
                )
                out.append(await client.response(sid))
            client.writer.close()
            return out

    answers = asyncio.run(run())
    for blocks, data in answers[:2]:
        assert _status(blocks) == (b"0", b"")
        assert external_auth_pb2.CheckResponse.FromString(data[5:]).status.code == code_pb2.OK
    for blocks, data in answers[2:]:
        assert _status(blocks) == (b"0", b"") and data == h2.EMPTY_MESSAGE  # answered as a release


def _count_general(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Stream ids of the Checks the general path answered (H2Connection._check), the lane not."""
    general: list[int] = []
    real = H2Connection._check

    def spy(self: H2Connection, stream: Any, message: bytes) -> None:
        general.append(stream.id)
        real(self, stream, message)

    monkeypatch.setattr(H2Connection, "_check", spy)
    return general


def test_envoys_checks_take_the_lane_and_get_the_general_paths_answers(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a connection's first two Checks (the block indexed, then kept), each HEADERS + DATA pair is
    answered as it is read (h2_checks._lane); the bytes are the general path's, and what cannot take the
    lane (a message over two frames, a window too small, a decision that waits) takes the general path."""
    general = _count_general(monkeypatch)
    message = grpc_message(check_request({"x-api-key": ALICE.secret}, BODY).SerializeToString())

    async def run() -> tuple[list[bytes], list[list[dict[bytes, bytes]]]]:
        path = tmp_path / "s.sock"
        async with check_socket(AccessLogService(engine), engine, path):
            client = await Client.open(path)
            datas, blocks = [], []

            async def check(sid: int, *frames: bytes) -> None:
                await client.send(frame(h2.HEADERS, h2.END_HEADERS, sid, client.block(CHECK_PATH)), *frames)
                got_blocks, data = await client.response(sid)
                datas.append(data)
                blocks.append(got_blocks)

            for sid in (1, 3, 5, 7):  # general, general, lane, lane
                await check(sid, frame(h2.DATA, h2.END_STREAM, sid, message))
            await check(9, frame(h2.DATA, 0, 9, message[:10]), frame(h2.DATA, h2.END_STREAM, 9, message[10:]))
            # a stream window smaller than the answer: the lane leaves it to the general path's wait
            await client.send(frame(h2.SETTINGS, 0, 0, (0x4).to_bytes(2, "big") + (8).to_bytes(4, "big")))
            await client.send(
                frame(h2.HEADERS, h2.END_HEADERS, 11, client.block(CHECK_PATH)),
                frame(h2.DATA, h2.END_STREAM, 11, message),
            )
            await asyncio.sleep(0.05)
            await client.send(h2.window_update(11, 1 << 20))
            got_blocks, data = await client.response(11)
            datas.append(data)
            blocks.append(got_blocks)
            client.writer.close()
            return datas, blocks

    datas, blocks = asyncio.run(run())
    assert general == [1, 3, 9]  # 11 took the lane's way in and the general path's answer (its window)
    assert len(set(datas)) == 1 and datas[0][5:]  # one answer, byte for byte, whichever way
    assert external_auth_pb2.CheckResponse.FromString(datas[0][5:]).status.code == code_pb2.OK
    assert all(b[0][b":status"] == b"200" and _status(b) == (b"0", b"") for b in blocks)


def test_a_check_the_lane_takes_that_waits_is_answered_when_decided(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    general = _count_general(monkeypatch)
    message = grpc_message(check_request({"x-api-key": ALICE.secret}, BODY).SerializeToString())
    gate: list[asyncio.Future[None]] = []
    real = Engine.check_fast

    def later(self: Engine, request: Any) -> Any:
        async def wait() -> Any:
            gate.append(asyncio.get_running_loop().create_future())
            await gate[-1]
            return real(self, request)

        return wait()

    async def run() -> list[Any]:
        path = tmp_path / "s.sock"
        async with check_socket(AccessLogService(engine), engine, path):
            client = await Client.open(path)
            out = []
            for sid in (1, 3, 5):
                if sid == 5:  # the lane's Check now waits for the counter store
                    monkeypatch.setattr(Engine, "check_fast", later)
                    monkeypatch.setattr(Decider, "check_plain", lambda *args: None)
                await client.send(
                    frame(h2.HEADERS, h2.END_HEADERS, sid, client.block(CHECK_PATH)),
                    frame(h2.DATA, h2.END_STREAM, sid, message),
                )
                if sid == 5:
                    while not gate:
                        await asyncio.sleep(0.01)
                    gate[0].set_result(None)
                out.append(await client.response(sid))
            client.writer.close()
            return out

    answers = asyncio.run(run())
    assert general == [1, 3]
    assert answers[2][1] == answers[0][1] and _status(answers[2][0]) == (b"0", b"")
