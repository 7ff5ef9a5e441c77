"""The access-log stream on the check socket (adapters/als_h2.py), driven by a real gRPC client (grpc
core's own HTTP/2): the same batches give the same accounting as over the gRPC port (grpc.aio), the
socket still answers HTTP/1.1 checks, and the slot release and unknown methods answer as gRPC does."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from nexus_authz.adapters import http_authz
from nexus_authz.adapters.envoy_als import AccessLogService
from nexus_authz.adapters.h2_listener import H2Receiver
from nexus_authz.engine import Engine
from tests.adapters.conftest import ALICE
from tests.adapters.test_als import FIXTURES, Recorder, _stream, body_meta, entry_with, message

CHAT = (FIXTURES / "openai_chat.json").read_bytes()
SSE = (FIXTURES / "anthropic_stream.sse").read_bytes()


@asynccontextmanager
async def check_socket(service: AccessLogService, engine: Any, path: Path) -> AsyncIterator[H2Receiver]:
    """A check listener on a Unix socket that also takes the access log, as server.py opens it."""
    app = http_authz.HttpApp(engine, max_header_bytes=16384, max_body=1 << 20)
    receiver = H2Receiver(service, engine)
    app.h2 = receiver.factory(app.protocol)
    server = await http_authz.serve_unix(app, str(path), 0o600)
    try:
        yield receiver
    finally:
        receiver.close()
        server.close()


async def _stream_h2(service: AccessLogService, engine: Any, path: Path, batches: list[Any]) -> Any:
    async with check_socket(service, engine, path), grpc.aio.insecure_channel(f"unix:{path}") as channel:

        async def requests() -> Any:
            for batch in batches:
                yield batch

        return await als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(requests())


def batches() -> list[als_pb2.StreamAccessLogsMessage]:
    """Batches of every size: empty, one entry, many, one over several HTTP/2 frames (~300 KiB)."""
    big = CHAT + b" " * 300_000
    return [
        message(identifier=True),
        message(entry_with(body_meta(CHAT), content_type="application/json", request_id="r1")),
        message(
            *(
                entry_with(body_meta(SSE), content_type="text/event-stream", request_id=f"s{i}")
                for i in range(40)
            ),
            entry_with(body_meta(CHAT), content_type="application/json", key_id=None, request_id="x"),
        ),
        message(entry_with(body_meta(big), content_type="application/json", request_id="big")),
        message(),
    ]


def test_the_same_batches_account_alike_on_the_check_socket_and_the_grpc_port(
    engine: Engine, tmp_path: Path
) -> None:
    over_grpc = Recorder(engine)
    grpc_service = AccessLogService(over_grpc)  # type: ignore[arg-type]
    asyncio.run(_stream(grpc_service, batches()))
    over_h2 = Recorder(engine)
    h2_service = AccessLogService(over_h2)  # type: ignore[arg-type]
    response = asyncio.run(_stream_h2(h2_service, over_h2, tmp_path / "a.sock", batches()))
    assert response == als_pb2.StreamAccessLogsResponse()
    assert over_h2.calls == over_grpc.calls
    assert [args[0] for args, _ in over_h2.calls] == ["r1", *(f"s{i}" for i in range(40)), "big"]
    counts = (h2_service.messages, h2_service.entries, h2_service.ignored)
    assert counts == (grpc_service.messages, grpc_service.entries, grpc_service.ignored) == (5, 42, 1)


def _http_check(path: Path, key: str) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (key.encode(), len(body), body)
        )
        return sock.recv(65536)


def test_checks_over_http1_and_the_access_log_over_http2_share_the_socket(
    engine: Engine, tmp_path: Path
) -> None:
    path = tmp_path / "s.sock"

    async def scenario() -> tuple[bytes, int]:
        service = AccessLogService(engine)
        async with check_socket(service, engine, path):
            loop = asyncio.get_running_loop()
            async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
                queue: asyncio.Queue[Any] = asyncio.Queue()

                async def requests() -> Any:
                    while (item := await queue.get()) is not None:
                        yield item

                call = als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(requests())
                await queue.put(message(identifier=True))
                answer = await loop.run_in_executor(None, _http_check, path, ALICE.secret)
                await queue.put(message())
                await queue.put(None)
                await call
        return answer, service.messages

    answer, messages = asyncio.run(scenario())
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert messages == 2


def test_slot_release_and_unknown_methods_answer_as_grpc_does(engine: Engine, tmp_path: Path) -> None:
    released: list[str] = []

    class Releasing:
        book = engine.book

        def release(self, request_id: str) -> None:
            released.append(request_id)

    path = tmp_path / "r.sock"

    async def scenario() -> tuple[list[bytes], grpc.StatusCode, grpc.StatusCode]:
        service = AccessLogService(engine)
        async with (
            check_socket(service, Releasing(), path),
            grpc.aio.insecure_channel(f"unix:{path}") as channel,
        ):
            release = channel.unary_unary("/nexus.authz.v1.Slots/Release")
            answers = [await release(b"req-%d" % i) for i in range(3)]
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await channel.unary_unary("/nexus.authz.v1.Keys/Nothing")(b"")
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                # Release takes exactly one message: two are an error, and nothing is released
                await channel.stream_unary("/nexus.authz.v1.Slots/Release")(iter([b"a", b"b"]))
        return answers, unknown.value.code(), streamed.value.code()

    answers, unknown, streamed = asyncio.run(scenario())
    assert answers == [b""] * 3
    assert released == ["req-0", "req-1", "req-2"]
    assert unknown == grpc.StatusCode.UNIMPLEMENTED
    assert streamed == grpc.StatusCode.INTERNAL


def test_shutdown_closes_a_connection_that_never_said_which_protocol(engine: Engine, tmp_path: Path) -> None:
    """A connection with nothing (or only the start of "PRI") sent is closed by H2Receiver.close, so the
    listener's wait for its connections does not last the whole grace period."""
    path = tmp_path / "u.sock"

    async def scenario() -> tuple[int, bytes, bytes]:
        service = AccessLogService(engine)
        loop = asyncio.get_running_loop()
        async with check_socket(service, engine, path) as receiver:
            silent = socket.socket(socket.AF_UNIX)
            partial = socket.socket(socket.AF_UNIX)
            for sock in (silent, partial):
                sock.setblocking(False)
                await loop.sock_connect(sock, str(path))
            await loop.sock_sendall(partial, b"PR")
            for _ in range(100):
                if len(receiver.undecided) == 2:
                    break
                await asyncio.sleep(0.01)
            undecided = len(receiver.undecided)
            receiver.close()
            ends = [await asyncio.wait_for(loop.sock_recv(sock, 10), 2) for sock in (silent, partial)]
            silent.close()
            partial.close()
        return undecided, *ends

    undecided, silent_end, partial_end = asyncio.run(scenario())
    assert undecided == 2
    assert silent_end == partial_end == b""  # closed by the receiver, nothing answered
