"""The HTTP fast path (Envoy http_service, nginx auth_request): hostile byte streams in random splits.

Each example builds a stream of requests (methods, targets, huge / duplicated / non-UTF-8 / missing headers,
truncated / nested / multi-MB bodies, chunked or mis-framed, pipelined, garbage in between), cuts it at
random points and feeds the pieces to one connection's protocol object. What comes back must be a sequence
of well-formed HTTP/1.1 answers, each a defined decision (`check_answer`), no more answers than requests,
nothing written after a close, no bug caught and logged, and the same decisions whatever the split.
A second test sends such streams through a real uvloop Unix-socket server.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop
from hypothesis import event, given
from hypothesis import strategies as st

from nexus_authz.adapters import http_authz
from nexus_authz.engine import Engine
from tests.fuzz import _strategies as S
from tests.fuzz._support import (
    MAX_BODY,
    MAX_HEADER_BYTES,
    SECRETS,
    FakeTransport,
    HttpAnswer,
    check_answer,
    feed,
    fuzz_settings,
    no_bugs_logged,
    parse_answers,
    reset,
    time_bound,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
    pytest.mark.usefixtures("http_framing"),  # both framings: httptools and the compiled one
]


# -- building hostile streams ---------------------------------------------------------------------------


@st.composite
def targets(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 15))
    if kind == 0:
        return b"/v1/nginx/auth" + draw(st.sampled_from([b"", b"?x=1", b"/x"]))
    if kind == 1:
        return draw(S.paths)
    if kind == 2:  # past the URL limit
        return b"/ext_authz/" + b"a" * draw(st.integers(16_000, 40_000))
    if kind == 3:
        return draw(st.sampled_from([b"*", b"http://h/ext_authz/v1/models", b"/ext_authz", b"/ext_authzx"]))
    return b"/ext_authz" + draw(S.paths)


@st.composite
def other_headers(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    if draw(st.booleans()):
        out.append((b"content-type", draw(S.content_types)))
    if draw(st.booleans()):
        out.append((b"x-forwarded-for", draw(S.addresses)))
    if draw(st.integers(0, 3)) == 0:
        out.append((b"x-real-ip", draw(S.addresses)))
    if draw(st.booleans()):
        out.append((b"x-request-id", draw(st.sampled_from([b"r-1", b"r-2", b"", b"\xff" * 3, b"r" * 5000]))))
    if draw(st.integers(0, 3)) == 0:
        out.append((b"x-envoy-auth-partial-body", draw(st.sampled_from([b"true", b"false", b"TRUE"]))))
    if draw(st.integers(0, 3)) == 0:  # the client's length as Envoy declares it: often not the body's
        declared = draw(st.sampled_from([b"0", b"12", b"-", b"", b" 7", b"9" * 20]))
        out.append((b"x-nexus-content-length", declared))
    if draw(st.integers(0, 3)) == 0:
        out.append((b"x-original-uri", draw(S.paths)))
        out.append((b"x-original-method", draw(st.sampled_from([b"POST", b"GET", b"", b"\xff"]))))
    if draw(st.integers(0, 5)) == 0:
        out.append((b"content-encoding", draw(st.sampled_from([b"gzip", b"br", b"identity"]))))
    if draw(st.integers(0, 12)) == 0:  # many headers, past the count limit or not
        out += [(b"x-h-%d" % i, b"v") for i in range(draw(st.integers(1, 200)))]
    if draw(st.integers(0, 15)) == 0:  # one header past the header-block limit
        out.append((b"x-huge", b"h" * draw(st.integers(30_000, 120_000))))
    if draw(st.integers(0, 4)) == 0:  # random names and values (invalid ones are the parser's to refuse)
        for _ in range(draw(st.integers(1, 3))):
            out.append((draw(st.binary(min_size=1, max_size=12)), draw(st.binary(max_size=40))))
    return out


_TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
_NAME_SAFE = bytes(c if c in _TOKEN else ord("x") for c in bytes(range(256)).lower())
_VALUE_SAFE = bytes(c if c >= 0x20 and c != 0x7F or c == 0x09 else ord("?") for c in range(256))
_URL_SAFE = bytes(c if 0x21 <= c < 0x7F else ord("_") for c in range(256))


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, int]:
    """One HTTP/1.1 request (or something close to one), and how many answers it may get (a body the
    framing does not cover is read as the start of another request)."""
    method = draw(
        st.sampled_from(
            [b"POST"] * 6 + [b"GET", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"BREW", b"post"]
        )
    )
    version = draw(st.sampled_from([b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x"]))
    headers = [(b"host", b"nexus"), *draw(S.key_headers()), *draw(other_headers())]
    body = draw(S.bodies()) if method != b"GET" or draw(st.booleans()) else b""
    framing = draw(st.sampled_from(["length"] * 12 + ["chunked"] * 4 + ["none", "wrong", "twice"]))
    if framing == "length":
        headers.append((b"content-length", b"%d" % len(body)))
    elif framing == "twice":
        headers += [(b"content-length", b"%d" % len(body)), (b"content-length", b"%d" % (len(body) + 1))]
    elif framing == "wrong":
        headers.append(
            (b"content-length", draw(st.sampled_from([b"-1", b"0x10", b"99999999999999999999", b"3"])))
        )
    elif framing == "chunked":
        headers.append((b"transfer-encoding", b"chunked"))
        sizes = draw(st.lists(st.integers(1, 70_000), max_size=4))
        pieces, pos = [], 0
        for size in sizes:
            piece = body[pos : pos + size]
            if piece:
                pieces.append(b"%x\r\n%s\r\n" % (len(piece), piece))
            pos += size
        if pos < len(body):
            pieces.append(b"%x\r\n%s\r\n" % (len(body) - pos, body[pos:]))
        body = b"".join(pieces) + b"0\r\n\r\n"
    if draw(st.integers(0, 7)) == 0:
        headers.append((b"connection", draw(st.sampled_from([b"close", b"keep-alive", b"upgrade"]))))
        if headers[-1][1] == b"upgrade":
            headers.append((b"upgrade", b"websocket"))
    target = draw(targets())
    sanitized = draw(st.integers(0, 7)) > 0
    if sanitized:  # mostly well-formed HTTP around the hostile parts, so they get parsed
        version = b"HTTP/1.1" if version.endswith(b"x") else version
        target = target.translate(_URL_SAFE)
        headers = [(k.translate(_NAME_SAFE), v.translate(_VALUE_SAFE)) for k, v in headers]
        headers = [(k, v) for k, v in headers if k]
    draw(st.randoms()).shuffle(headers[1:]) if draw(st.booleans()) else None
    head = method + b" " + target + b" " + version + b"\r\n"
    head += b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    answers = 2 if framing in ("none", "wrong") and body else 1
    if not sanitized:  # a raw line break in a header may end this request early and start another
        answers += head.count(b"\n")
    return head + b"\r\n" + body, answers


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, int]:
    """Pipelined messages with garbage here and there; returns (bytes, how many requests at most)."""
    parts: list[bytes] = []
    count = 0
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.integers(0, 9)) == 0:
            parts.append(draw(st.binary(min_size=1, max_size=64) | st.just(b"\r\n") | st.just(b"\x00" * 10)))
            count += 1
        message, answers = draw(messages())
        parts.append(message)
        count += answers
    if draw(st.integers(0, 5)) == 0:  # a stream cut off mid-request
        tail, answers = draw(messages())
        parts.append(tail[: draw(st.integers(0, len(tail)))])
        count += answers
    return b"".join(parts), count


def cuts(data: bytes, rng: random.Random, pieces: int) -> list[bytes]:
    points = sorted(rng.sample(range(1, len(data)), min(pieces, len(data) - 1))) if len(data) > 1 else []
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


_PROTOCOL_ERRORS = {"malformed_http", "headers_too_large", "uri_too_long", "body_too_large"}


def _verdicts(answers: list[HttpAnswer]) -> tuple[list[tuple[int, str | None]], list[int]]:
    """(decisions, protocol errors) of a connection's answers."""
    decisions, errors = [], []
    for a in answers:
        code = None
        if a.body and a.header("x-nexus-reason") is None:
            code = a.body.split(b'"code":"', 1)[-1].split(b'"', 1)[0].decode()
        if code in _PROTOCOL_ERRORS:
            errors.append(a.status)
        else:
            decisions.append((a.status, a.header("x-nexus-reason")))
    return decisions, errors


@fuzz_settings(400)
@given(stream=streams(), seed=st.integers(0, 2**32), pieces=st.integers(0, 40))
def test_any_byte_stream_in_any_split_gets_defined_answers(
    engine: Engine, stream: tuple[bytes, int], seed: int, pieces: int
) -> None:
    data, requests = stream
    chunks = cuts(data, random.Random(seed), pieces)
    with no_bugs_logged(), time_bound(20):
        reset(engine)
        whole, whole_transport = feed(engine, [data])
        reset(engine)
        split, split_transport = feed(engine, chunks)
    for answers, transport in ((whole, whole_transport), (split, split_transport)):
        assert len(answers) <= requests
        for answer in answers:
            check_answer(answer)
            event(f"status {answer.status} {answer.header('x-nexus-reason') or answer.body[-40:]!r}")
        closing = [i for i, a in enumerate(answers) if a.header("connection") == "close"]
        assert not closing or closing[0] == len(answers) - 1, "answers after a connection: close"
        if closing:
            assert transport.closed
    # The same decisions whatever the split; a protocol error ends both connections alike, except that
    # an over-long header block may be refused (431) as it arrives, before its end is seen.
    whole_decisions, whole_errors = _verdicts(whole)
    split_decisions, split_errors = _verdicts(split)
    assert split_decisions == whole_decisions
    if whole_errors != split_errors:
        assert 431 in whole_errors + split_errors, (whole_errors, split_errors)


@fuzz_settings(40)
@given(
    unit=st.sampled_from([b"a", b"\xff", b"x: y\r\n", b" ", b"\t"]),
    where=st.sampled_from(["value", "name", "url", "headers"]),
    chunk=st.sampled_from([1024, 65536, 256 * 1024]),
)
def test_an_endless_request_head_is_refused_early(
    engine: Engine, unit: bytes, where: str, chunk: int
) -> None:
    """A head that never ends (one header value, name or URL growing forever, or endless headers) is
    refused once it passes the limits, not buffered until memory runs out."""
    starts = {
        "value": b"POST /ext_authz/v1/models HTTP/1.1\r\nx-big: ",
        "name": b"POST /ext_authz/v1/models HTTP/1.1\r\nx-",
        "url": b"POST /ext_authz/",
        "headers": b"POST /ext_authz/v1/models HTTP/1.1\r\n",
    }
    if where == "name":
        unit = b"a"
    elif where == "url":
        unit = b"u"
    elif where == "headers":
        unit = b"x-a: b\r\n"
    app = http_authz.HttpApp(engine, max_header_bytes=MAX_HEADER_BYTES, max_body=MAX_BODY)
    protocol = app.protocol()
    transport = FakeTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(starts[where])
    block = (unit * (chunk // len(unit) + 1))[:chunk]
    sent = 0
    with no_bugs_logged(), time_bound(20):
        while not transport.closed and sent < 64 << 20:
            protocol.data_received(block)
            sent += len(block)
    assert transport.closed, "64 MiB of request head accepted without an answer"
    # refused within the limits plus what one read brings
    assert sent <= MAX_HEADER_BYTES + http_authz.MAX_URL + 2 * chunk
    (answer,) = parse_answers(bytes(transport.data))
    check_answer(answer)
    assert answer.status in (400, 414, 431)


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_multi_megabyte_body_is_refused_as_it_arrives(engine: Engine, framing: str) -> None:
    body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"' + b"x" * (8 << 20) + b'"}]}'
    head = f"POST /ext_authz/v1/chat/completions HTTP/1.1\r\nauthorization: Bearer {SECRETS[1]}\r\n"
    if framing == "length":
        data = head.encode() + b"content-length: %d\r\n\r\n" % len(body) + body
    else:
        data = head.encode() + b"transfer-encoding: chunked\r\n\r\n"
        data += b"".join(
            b"%x\r\n%s\r\n" % (len(p), p) for p in (body[i : i + 65536] for i in range(0, len(body), 65536))
        )
    with no_bugs_logged(), time_bound(20):
        answers, transport = feed(engine, [data[i : i + 256 * 1024] for i in range(0, len(data), 256 * 1024)])
    (answer,) = answers
    check_answer(answer)
    assert answer.status == 413 and transport.closed


# -- through a real server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(
    engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[asyncio.AbstractEventLoop, Path]]:
    loop = uvloop.new_event_loop()
    sock = tmp_path_factory.mktemp("sock") / "authz.sock"
    app = http_authz.HttpApp(engine, max_header_bytes=MAX_HEADER_BYTES, max_body=MAX_BODY)
    server = loop.run_until_complete(http_authz.serve_unix(app, str(sock), 0o600))
    try:
        yield loop, sock
    finally:
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()


async def _exchange(sock_path: Path, chunks: list[bytes]) -> bytes:
    """Send the pieces (yielding between them), half-close, read to EOF; keep what arrived even if the
    server hangs up while the rest is being sent (it answered and closed a refused request)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    received = bytearray()
    try:
        await loop.sock_connect(sock, str(sock_path))
        try:
            for chunk in chunks:
                await loop.sock_sendall(sock, chunk)
                await asyncio.sleep(0)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        while True:
            try:
                data = await loop.sock_recv(sock, 65536)
            except ConnectionResetError:
                raise AssertionError(f"connection reset after {len(received)} bytes") from None
            if not data:
                return bytes(received)
            received += data
    finally:
        sock.close()


@fuzz_settings(60)
@given(stream=streams(), seed=st.integers(0, 2**32), pieces=st.integers(0, 10))
def test_real_socket(
    served: tuple[asyncio.AbstractEventLoop, Path],
    engine: Engine,
    stream: tuple[bytes, int],
    seed: int,
    pieces: int,
) -> None:
    loop, sock = served
    data, requests = stream
    with no_bugs_logged():
        reset(engine)
        raw = loop.run_until_complete(
            asyncio.wait_for(_exchange(sock, cuts(data, random.Random(seed), pieces)), 20)
        )
    answers = parse_answers(raw, heads=b"HEAD " in data)
    assert len(answers) <= requests
    for answer in answers:
        check_answer(answer)
