"""The compiled HTTP/1.1 framing (nexus_authz/native/_http1, adapters/http_native.py) against the httptools
protocol it stands in for: the same byte streams, split anywhere, must give byte-identical output, the
same close, and the same decision counters. Plus: which path runs, and that the compiled one really
takes what Envoy sends (not everything through the fallback).
"""

from __future__ import annotations

import os
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from nexus_authz import native
from nexus_authz.adapters import http_authz
from nexus_authz.core.fastpath import FastAdmit
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from tests.fuzz._support import (
    CONFIG,
    SECRETS,
    FakeTransport,
    fuzz_settings,
    no_bugs_logged,
    reset,
    write_fuzz_config,
)
from tests.fuzz.test_fuzz_http import cuts, streams
from tests.helpers import KeySpec, write_config

pytestmark = pytest.mark.skipif(
    native.http1 is None and os.environ.get(native.PURE_ENV, "") not in ("", "0"),
    reason="NEXUS_AUTHZ_PURE is set: the compiled framing is not loaded",
)
if native.http1 is not None:
    from nexus_authz.adapters.http_native import CompiledAuthzProtocol

FIXTURES = Path(__file__).resolve().parents[2] / "benchmarks" / "fixtures"
NOW = 1_750_000_000.0


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = write_fuzz_config(tmp_path_factory.mktemp("native"))
    return Engine.from_settings(load_settings(str(path)), clock=lambda: NOW)


def recording(cls: type) -> type:
    """`cls` noting what each request hands the shared code (URL, kept headers, body, method, keep-alive)."""

    class Recording(cls):  # type: ignore[misc, valid-type]
        __slots__ = ("seen",)

        def on_message_complete(self) -> None:
            if not self._closing:
                self.seen.append(
                    (
                        self._url,
                        dict(self._headers),
                        b"".join(self._body),
                        self._parser.get_method(),
                        self._parser.should_keep_alive(),
                    )
                )
            super().on_message_complete()

    return Recording


def run(
    engine: Engine,
    cls: type,
    chunks: list[bytes],
    *,
    max_header_bytes: int,
    max_body: int,
    admin: bool = False,
) -> tuple[bytes, bool, Counter[object], list[object], int]:
    """One connection of `cls` fed `chunks`: (bytes written, closed, decisions counted, requests handed
    over, fallbacks)."""
    reset(engine)
    before = Counter(engine.decisions)
    app = http_authz.HttpApp(engine, max_header_bytes=max_header_bytes, max_body=max_body, admin=admin)
    protocol = recording(cls)(app)
    protocol.seen = []
    transport = FakeTransport()
    protocol.connection_made(transport)
    fallbacks = 0
    for chunk in chunks:
        slow = getattr(protocol, "_slow", None)
        protocol.data_received(chunk)
        if slow is not None and protocol._parser is slow:
            fallbacks += 1
        if transport.paused:
            protocol.resume_writing()
    protocol.connection_lost(None)
    assert transport.written_after_close == 0
    decisions = Counter(engine.decisions)
    decisions.subtract(before)
    return bytes(transport.data), transport.closed, +decisions, protocol.seen, fallbacks


def same_output(
    engine: Engine,
    chunks: list[bytes],
    *,
    max_header_bytes: int = 64 * 1024,
    max_body: int = 1 << 20,
    admin: bool = False,
) -> int:
    limits = {"max_header_bytes": max_header_bytes, "max_body": max_body, "admin": admin}
    with no_bugs_logged():
        pure = run(engine, http_authz.AuthzProtocol, chunks, **limits)
        compiled = run(engine, CompiledAuthzProtocol, chunks, **limits)
    assert compiled[3] == pure[3], "different requests handed to the shared code"
    assert compiled[0] == pure[0], "different bytes written"
    assert compiled[1:3] == pure[1:3], "different close or decision counters"
    return compiled[4]


# -- streams close to the subset's edges ----------------------------------------------------------------

NAMES = [
    b"authorization",
    b"Authorization",
    b"x-api-key",
    b"X-Api-Key",
    b"api-key",
    b"content-type",
    b"Content-Type",
    b"x-request-id",
    b"x-forwarded-for",
    b"x-real-ip",
    b"x-envoy-auth-partial-body",
    b"x-original-uri",
    b"x-original-method",
    b"content-encoding",
    b"host",
    b":authority",
    b"x-envoy-expected-rq-timeout-ms",
    b"x-b3-traceid",
    b"connection",
    b"Connection",
    b"upgrade",
    b"transfer-encoding",
    b"proxy-connection",
    b"content-length",
    b"Content-Length",
    b"x-\xff",
    b"x y",
    b"",
]
CLEAN_NAMES = [
    b"x-api-key",
    b"X-Request-Id",
    b"x-request-id",
    b"x-forwarded-for",
    b"X-Forwarded-For",
    b"content-type",
    b"x-envoy-auth-partial-body",
    b"x-envoy-internal",
    b"host",
    b"x-real-ip",
    b"x-original-uri",
    b"x-original-method",
    b"Connection",
    b"x-envoy-expected-rq-timeout-ms",
]
CLEAN_VALUES = [
    b"application/json",
    b"192.0.2.2, 10.0.0.1",
    b"r-1",
    b"true",
    b"false",
    b"POST",
    b"/v1/chat/completions",
    b"keep-alive",
    b"close",
    b"",
    b"a b\tc",
    b"caf\xe9",
    b"500",
]
VALUE_BYTES = st.sampled_from(
    [
        b"a",
        b"Z",
        b"0",
        b" ",
        b"\t",
        b",",
        b"\x80",
        b"\xff",
        b"\x00",
        b"\x7f",
        b"\r",
        b"\n",
        b"/",
        b'"',
        b"close",
        b"keep-alive",
        b"Bearer ",
        b"application/json",
    ]
)


@st.composite
def near_subset_request(draw: st.DrawFn) -> bytes:
    method = draw(
        st.sampled_from(
            [b"POST"] * 12 + [b"GET", b"PUT", b"HEAD", b"PATCH", b"DELETE", b"OPTIONS", b"BREW", b"get"]
        )
    )
    path = b"/ext_authz" + draw(st.sampled_from([b"/v1/chat/completions", b"/v1/models", b"", b"x"]))
    if draw(st.integers(0, 3)) == 0:
        path += bytes(draw(st.lists(st.integers(0x21, 0x7E), max_size=8)))
    if draw(st.integers(0, 6)) == 0:
        path = draw(
            st.sampled_from([b"/v1/nginx/auth", b"/v1/nginx/auth?x=1", b"*", b"http://h/x", b"/healthz"])
        )
    if draw(st.integers(0, 9)) == 0:
        path = b"/ext_authz/" + b"a" * draw(st.sampled_from([16 * 1024 - 11, 16 * 1024 - 10, 16 * 1024 - 9]))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 20 + [b"HTTP/1.0", b"HTTP/1.2", b"http/1.1"]))
    body = draw(st.sampled_from([b"", b'{"model":"gpt-4o","max_tokens":8,"messages":[]}', b"x" * 70, b"{"]))
    headers: list[bytes] = []
    secret = draw(st.sampled_from(SECRETS + ("nope",)))
    headers.append(
        draw(st.sampled_from([b"authorization: Bearer ", b"x-api-key: ", b"Authorization:Bearer "]))
        + secret.encode()
    )
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 11)):  # mostly what Envoy sends
            name = draw(st.sampled_from(CLEAN_NAMES))
            value = draw(st.sampled_from(CLEAN_VALUES))
            headers.append(name + draw(st.sampled_from([b": ", b":", b":  "])) + value)
            continue
        name = draw(st.sampled_from(NAMES))
        lead = draw(st.sampled_from([b" ", b"", b"  ", b"\t", b" \t"]))
        value = b"".join(draw(st.lists(VALUE_BYTES, max_size=6)))
        headers.append(name + b":" + lead + value)
    framing = draw(st.sampled_from(["length"] * 16 + ["none", "twice", "wrong", "padded"]))
    if framing == "length" or (framing == "none" and not body):
        headers.append(b"content-length: %d" % len(body))
    elif framing == "twice":
        headers += [b"content-length: %d" % len(body)] * 2
    elif framing == "wrong":
        headers.append(
            b"content-length: " + draw(st.sampled_from([b"-1", b"1x", b"", b"0012", b"99999999999999999"]))
        )
    elif framing == "padded":
        headers.append(b"content-length: 0%d " % len(body))
    draw(st.randoms()).shuffle(headers)
    eol = draw(st.sampled_from([b"\r\n"] * 24 + [b"\n", b"\r"]))
    head = method + b" " + path + b" " + version + b"\r\n" + b"".join(h + eol for h in headers) + b"\r\n"
    return head + body


@st.composite
def near_subset_stream(draw: st.DrawFn) -> bytes:
    data = b"".join(draw(st.lists(near_subset_request(), min_size=1, max_size=3)))
    for _ in range(draw(st.integers(0, 2)) if draw(st.integers(0, 2)) == 0 else 0):  # a few byte mutations
        i = draw(st.integers(0, len(data)))
        op = draw(st.integers(0, 2))
        byte = bytes([draw(st.integers(0, 255))])
        data = data[:i] + byte + data[i + (op > 0) :] if op < 2 else data[:i] + data[i + 1 :]
    return data


@fuzz_settings(300)
@given(
    data=near_subset_stream(),
    seed=st.integers(0, 2**32),
    pieces=st.integers(0, 12),
    admin=st.integers(0, 5).map(lambda n: n == 0),  # now and then the admin listener's routes
)
def test_streams_near_the_subset_give_identical_bytes(
    engine: Engine, data: bytes, seed: int, pieces: int, admin: bool
) -> None:
    fallbacks = same_output(engine, cuts(data, random.Random(seed), pieces), admin=admin)
    event("fell back" if fallbacks else "compiled only")


@fuzz_settings(100)
@given(
    data=near_subset_stream(),
    seed=st.integers(0, 2**32),
    pieces=st.integers(0, 12),
    max_header_bytes=st.integers(40, 400),
    max_body=st.integers(0, 80),
)
def test_tight_limits_give_identical_bytes(
    engine: Engine, data: bytes, seed: int, pieces: int, max_header_bytes: int, max_body: int
) -> None:
    same_output(
        engine, cuts(data, random.Random(seed), pieces), max_header_bytes=max_header_bytes, max_body=max_body
    )


@fuzz_settings(150)
@given(stream=streams(), seed=st.integers(0, 2**32), pieces=st.integers(0, 40))
def test_hostile_streams_give_identical_bytes(
    engine: Engine, stream: tuple[bytes, int], seed: int, pieces: int
) -> None:
    same_output(engine, cuts(stream[0], random.Random(seed), pieces))


def test_url_and_head_limits_at_the_edge(engine: Engine) -> None:
    auth = b"authorization: Bearer " + SECRETS[0].encode() + b"\r\n"
    for url_len in (http_authz.MAX_URL - 1, http_authz.MAX_URL, http_authz.MAX_URL + 1):
        url = b"/ext_authz/" + b"a" * (url_len - len(b"/ext_authz/"))
        data = b"GET " + url + b" HTTP/1.1\r\n" + auth + b"\r\n"
        for size in (1, 7, 4096, len(data)):
            same_output(engine, [data[i : i + size] for i in range(0, len(data), size)])
    for n in (127, 128, 129):  # MAX_HEADERS
        data = b"GET /ext_authz/v1/models HTTP/1.1\r\n" + auth + b"x-a: b\r\n" * (n - 1) + b"\r\n"
        same_output(engine, [data])
        same_output(engine, [data[:500], data[500:]])


def test_a_pipelined_request_cut_in_its_body(engine: Engine) -> None:
    """The second request of a read, its body cut off: the rest completes it (and nothing more)."""
    first = b"GET /ext_authz/v1/models HTTP/1.1\r\nx-api-key: " + SECRETS[0].encode() + b"\r\n\r\n"
    body = b'{"model":"gpt-4o","messages":[]}'
    second = (
        b"POST /ext_authz/v1/chat/completions HTTP/1.1\r\nx-api-key: %s\r\ncontent-length: %d\r\n\r\n%s"
        % (SECRETS[0].encode(), len(body), body)
    )
    body_starts = len(first) + second.index(b"\r\n\r\n") + 4
    for data, requests in ((first + second, 2), (first + second + b"GET /x HTTP/1.1\r\n\r\n", 3)):
        for cut in range(len(first) + 1, len(first) + len(second)):
            fallbacks = same_output(engine, [data[:cut], data[cut:]])
            if cut > body_starts:  # cut in the body: the compiled parser waits for the rest
                assert fallbacks == 0
            _, _, decisions, _, _ = run(
                engine,
                CompiledAuthzProtocol,
                [data[:cut], data[cut:]],
                max_header_bytes=65536,
                max_body=1 << 20,
            )
            assert sum(decisions.values()) == requests


@pytest.mark.parametrize(
    "header",
    [
        b"content-length: 76x",
        b"Content-Length: 1\r\ncontent-length: 2",
        b"transfer-encoding: chunked",
        b"connection: upgrade",
        b"content-length: 99999999999999999999",
        b"x-api-key: \x01",
    ],
)
def test_every_cut_of_a_head_ending_early(engine: Engine, header: bytes) -> None:
    """Heads cut off anywhere (the stream ends there): llhttp refuses some as they arrive (a non-digit in
    content-length), and the compiled path must answer exactly the same, with every split."""
    head = b"POST /ext_authz/v1/chat/completions HTTP/1.1\r\nx-api-key: " + SECRETS[0].encode() + b"\r\n"
    data = head + header
    for end in range(len(head) - 2, len(data) + 1):
        same_output(engine, [data[:end]])
        same_output(engine, [data[: end - 3], data[end - 3 : end]])


# -- Envoy's own bytes go through the compiled parser ----------------------------------------------------


def envoy_check() -> bytes:
    return (FIXTURES / "envoy_ext_authz_check.http").read_bytes()


def test_envoy_check_request_is_taken_by_the_compiled_parser(engine: Engine) -> None:
    data = envoy_check()
    assert same_output(engine, [data * 3]) == 0
    assert same_output(engine, [data[:37], data[37:] + data]) == 0
    pure, _, decisions, _, _ = run(
        engine, http_authz.AuthzProtocol, [data], max_header_bytes=65536, max_body=1 << 20
    )
    assert pure.startswith(b"HTTP/1.1 ") and sum(decisions.values()) == 1


def test_after_a_replayed_request_the_compiled_parser_takes_the_next(engine: Engine) -> None:
    """A request outside the compiled parser's subset (chunked) goes to httptools; once it is answered, the
    connection's next request (Envoy's check, in the same read or the next) is the compiled parser's again."""
    check = envoy_check()
    chunked = (
        b"POST /ext_authz/v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
        b"x-api-key: " + SECRETS[0].encode() + b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    )
    for reads in ([chunked, check], [chunked + check]):
        app = http_authz.HttpApp(engine, max_header_bytes=65536, max_body=1 << 20)
        protocol = CompiledAuthzProtocol(app)
        transport = FakeTransport()
        protocol.connection_made(transport)
        parsers = []
        for data in reads:
            protocol.data_received(data)
            parsers.append(protocol._parser is protocol._fast)
        assert parsers == [True] * len(reads)
        assert bytes(transport.data).count(b"HTTP/1.1 ") == 2 and not transport.closed
        same_output(engine, reads)  # and the httptools protocol's bytes


# -- what a connection's repeated requests share ---------------------------------------------------------


def _check_request(secret: str, path: str, request_id: str) -> bytes:
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
    return (
        f"POST /ext_authz{path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {secret}\r\n"
        f"content-type: application/json\r\nx-forwarded-for: 192.0.2.7\r\nx-request-id: {request_id}\r\n"
        f"content-length: {len(body)}\r\nx-nexus-content-length: {len(body)}\r\n\r\n"
    ).encode() + body


def test_repeated_values_are_handed_over_again_and_changed_ones_anew(engine: Engine) -> None:
    """The compiled parser hands a header value or target that repeats the connection's last one over as
    the same object (no new str or bytes per request), and one that differs, even in its last byte only,
    as what it is now: the decisions are the httptools protocol's (another key: refused; another path)."""
    assert native.http1 is not None
    secret = SECRETS[0]
    other = secret[:-1] + ("x" if secret[-1] != "x" else "y")  # the same length, the last byte changed
    reads = [
        _check_request(secret, "/v1/chat/completions", "r1"),
        _check_request(secret, "/v1/chat/completions", "r2"),
        _check_request(other, "/v1/chat/completions", "r3"),
        _check_request(secret, "/v1/chat/completions", "r4"),
        _check_request(secret, "/v1/completions", "r5"),
    ]
    _, _, decisions, seen, fallbacks = run(
        engine, CompiledAuthzProtocol, [b"".join(reads)], max_header_bytes=65536, max_body=1 << 20
    )
    assert fallbacks == 0 and len(seen) == 5
    urls = [s[0] for s in seen]
    auth = [s[1]["authorization"] for s in seen]  # type: ignore[index]
    assert urls[1] is urls[0] and urls[4] == b"/ext_authz/v1/completions"
    assert auth[1] is auth[0] and auth[2] == f"Bearer {other}" and auth[3] == f"Bearer {secret}"
    assert [s[1]["x-request-id"] for s in seen] == ["r1", "r2", "r3", "r4", "r5"]  # type: ignore[index]
    assert same_output(engine, reads) == 0
    assert same_output(engine, [b"".join(reads)]) == 0
    assert sum(decisions.values()) == 5


def _headed(request_id: str, lines: list[str]) -> bytes:
    body = b'{"model":"gpt-4o-mini","messages":[]}'
    head = "".join(f"{line}\r\n" for line in lines)
    return (
        f"POST /ext_authz/v1/chat/completions HTTP/1.1\r\nhost: x\r\n{head}x-request-id: {request_id}\r\n"
        f"content-length: {len(body)}\r\nx-nexus-content-length: {len(body)}\r\n\r\n"
    ).encode() + body


def test_the_kept_headers_dict_in_place_or_anew_as_httptools_builds_it(engine: Engine) -> None:
    """The compiled parser refills the dict the protocol holds from the last request when its keys come
    again in the same order and nothing else holds it; the protocol sees the keys, their order and the
    values httptools' protocol gives (repeated headers joined), request after request."""
    assert native.http1 is not None
    auth, kind, xff = (
        f"authorization: Bearer {SECRETS[0]}",
        "content-type: application/json",
        "x-forwarded-for: 192.0.2.7",
    )
    requests = [
        ("r1", [auth, kind, xff], False),
        ("r2", [auth, kind, xff], False),  # the same keys in the same order: in place
        ("r3", [kind, auth, xff], False),  # another order: a new dict
        ("r4", [kind, auth], False),  # one fewer
        ("r5", [kind, auth, xff, "X-Forwarded-For: 10.0.0.1", "Content-Encoding: br"], False),  # joined
        ("r6", [kind, auth, xff, "x-forwarded-for: 10.0.0.2", "content-encoding: br"], True),  # held
        ("r7", [kind, auth, xff, "x-forwarded-for: 10.0.0.3", "content-encoding: br"], False),
        ("r8", [kind, auth, xff, "x-forwarded-for: 10.0.0.3", "content-encoding: br"], False),
    ]
    reads = [_headed(rid, lines) for rid, lines, _ in requests]
    keep = {rid: hold for rid, _, hold in requests}

    def seen_by(cls: type) -> list[tuple[int, list[tuple[str, str]]]]:
        held: list[object] = []

        class Recording(cls):  # type: ignore[misc, valid-type]
            __slots__ = ("seen",)

            def on_message_complete(self) -> None:
                headers = self._headers
                self.seen.append((id(headers), list(headers.items())))
                if keep[headers["x-request-id"]]:
                    held.append(headers)  # someone else holds it now: it must not change
                del headers
                super().on_message_complete()

        reset(engine)
        app = http_authz.HttpApp(engine, max_header_bytes=65536, max_body=1 << 20)
        protocol = Recording(app)
        protocol.seen = []
        protocol.connection_made(FakeTransport())
        with no_bugs_logged():
            for read in reads:
                protocol.data_received(read)
        assert [list(h.items()) for h in held] == [protocol.seen[5][1]]  # r6's, as it was handed over
        return protocol.seen  # type: ignore[no-any-return]

    compiled = seen_by(CompiledAuthzProtocol)
    reference = seen_by(http_authz.AuthzProtocol)
    assert [items for _, items in compiled] == [items for _, items in reference]
    assert compiled[4][1][2] == ("x-forwarded-for", "192.0.2.7, 10.0.0.1")
    ids = [i for i, _ in compiled]
    assert ids[1] == ids[0] and ids[7] == ids[6]  # refilled in place
    assert ids[2] != ids[1] and ids[3] != ids[2] and ids[4] != ids[3] and ids[6] != ids[5]


def test_fast_path_changed_on_the_class_is_read_again(tmp_path: Path) -> None:
    """The lane remembers the protocol class's `fast_path` with the class's version tag: setting it on the
    class (or on a base) afterwards takes effect at the next request, as a getattr would."""
    assert native.http1 is not None
    # its own engine: no failure counted by another test makes the lane hand the request over
    engine = Engine.from_settings(load_settings(str(write_fuzz_config(tmp_path))), clock=lambda: NOW)
    reference = http_authz.AuthzProtocol.on_message_complete.__code__

    class Protocol(CompiledAuthzProtocol):  # type: ignore[misc, valid-type]
        __slots__ = ()
        fast_path = True

    app = http_authz.HttpApp(engine, max_header_bytes=65536, max_body=1 << 20)
    protocol = Protocol(app)
    transport = FakeTransport()
    protocol.connection_made(transport)
    paths = []
    for i, change in enumerate([None, None, False, None, True, "base"]):
        if change == "base":  # a base's change invalidates the class's tag too
            del Protocol.fast_path  # inherited from now on
            CompiledAuthzProtocol.fast_path = False  # type: ignore[misc]
        elif change is not None:
            Protocol.fast_path = change  # type: ignore[misc]
        codes: list[object] = []

        def note(frame: object, event: str, _arg: object, codes: list[object] = codes) -> None:
            if event == "call":
                codes.append(frame.f_code)  # type: ignore[attr-defined]

        sys.setprofile(note)
        try:
            protocol.data_received(_check_request(SECRETS[0], "/v1/chat/completions", f"fp{i}"))
        finally:
            sys.setprofile(None)
            if change == "base":
                CompiledAuthzProtocol.fast_path = True  # type: ignore[misc]
        engine.release(f"fp{i}")
        paths.append("reference" if reference in codes else "lane")
    assert paths == ["lane", "lane", "reference", "reference", "lane", "reference"]
    assert bytes(transport.data).count(b"HTTP/1.1 200") == 6


@pytest.fixture(scope="module", params=["[openai]", "[ietf]", "[]"])
def chosen_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The policy's `rate_limit_headers` set to one subset of the header families."""
    path = write_fuzz_config(tmp_path_factory.mktemp("families"), f"rate_limit_headers: {request.param}\n")
    return Engine.from_settings(load_settings(str(path)), clock=lambda: NOW)


@fuzz_settings(100)
@given(data=near_subset_stream(), seed=st.integers(0, 2**32), pieces=st.integers(0, 12))
def test_each_choice_of_header_families_gives_identical_bytes(
    chosen_engine: Engine, data: bytes, seed: int, pieces: int
) -> None:
    same_output(chosen_engine, cuts(data, random.Random(seed), pieces))


def test_the_compiled_lane_writes_only_the_chosen_header_families(chosen_engine: Engine) -> None:
    families = chosen_engine.settings.policy.rate_limit_headers
    body = b'{"model":"gpt-4o","max_tokens":8,"messages":[]}'
    check = (
        b"POST /ext_authz/v1/chat/completions HTTP/1.1\r\nauthorization: Bearer %s\r\n"
        b"content-length: %d\r\nx-nexus-content-length: %d\r\n\r\n%s"
        % (SECRETS[1].encode(), len(body), len(body), body)
    )
    written, _, _, _, fallbacks = run(  # twice: the second one on the key's plan made by the first
        chosen_engine, CompiledAuthzProtocol, [check, check], max_header_bytes=65536, max_body=1 << 20
    )
    answers = written.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == 2 and fallbacks == 0, written
    for answer in answers:
        assert answer.startswith(b"200 "), answer
        assert (b"\r\nx-ratelimit-remaining-requests: " in answer) == ("openai" in families), answer
        assert (b"\r\nratelimit-policy: " in answer) == ("ietf" in families), answer
        assert (b"\r\nratelimit: " in answer) == ("ietf" in families), answer


# -- a key whose application uses several models and paths ------------------------------------------------
# Three keys of one shape of the key file share its plans (the shape's recipe owns them; the first key, the
# shape's template, owns its own); a plan is per (model, path). The compiled lane keeps an owner's first
# plan under the owner and reads its others from FastAdmit's second place, (owner, model, path), itself: the
# same answers as the reference path, and no call to plan_of once a plan is made.
_SHAPE_KEYS = tuple(
    KeySpec(f"team-{i}", extra={"tenant": "acme", "models": ["gpt-4o*"], "plan": "team"}) for i in range(3)
)
_SHAPE_CONFIG = CONFIG + (
    "plans:\n  team:\n    limits:\n"
    "      - {requests: 1000, per: minute}\n      - {tokens: 100000, per: minute}\n"
)


@pytest.fixture(scope="module")
def shape_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = write_config(tmp_path_factory.mktemp("shape"), *_SHAPE_KEYS, extra=_SHAPE_CONFIG)
    engine = Engine.from_settings(load_settings(str(path)), clock=lambda: NOW)
    recipes = [engine.snapshot.by_id[k.id].recipe for k in _SHAPE_KEYS]
    assert recipes[0] is None and recipes[1] is not None and recipes[2] is recipes[1]
    return engine


def _model_checks(rounds: int) -> list[bytes]:
    """`rounds` rounds of six (model, path) pairs, each round from the next key in turn."""
    checks = []
    for i in range(rounds):
        for model in (b"gpt-4o-mini", b"gpt-4o", b"gpt-4o-mini-2024-07-18"):
            for path in (b"/v1/chat/completions", b"/v1/responses"):
                body = b'{"model":"%s","max_tokens":%d,"messages":[]}' % (model, 8 + i)
                checks.append(
                    b"POST /ext_authz%s HTTP/1.1\r\nauthorization: Bearer %s\r\ncontent-length: %d\r\n"
                    b"x-nexus-content-length: %d\r\n\r\n%s"
                    % (path, _SHAPE_KEYS[i % 3].secret.encode(), len(body), len(body), body)
                )
    return checks


def test_a_keys_other_models_and_paths_give_identical_bytes(shape_engine: Engine) -> None:
    checks = _model_checks(6)
    assert same_output(shape_engine, [b"".join(checks)]) == 0
    assert same_output(shape_engine, checks) == 0
    written = run(shape_engine, CompiledAuthzProtocol, checks, max_header_bytes=65536, max_body=1 << 20)[0]
    assert written.count(b"HTTP/1.1 200 OK\r\n") == len(checks), written[:300]


def test_the_compiled_lane_reads_a_keys_other_plans_itself(
    shape_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[tuple[object, str]] = []
    plan_of = FastAdmit.plan_of

    def counted(self: FastAdmit, key: Any, model: Any, path: str) -> Any:
        made.append((model, path))
        return plan_of(self, key, model, path)

    monkeypatch.setattr(FastAdmit, "plan_of", counted)
    run(shape_engine, CompiledAuthzProtocol, _model_checks(6), max_header_bytes=65536, max_body=1 << 20)
    # six plans for the template key (its own) and six for the recipe (its other two keys share them):
    # each made by the first check that names its pair, then read where it is kept
    assert len(made) == 12 and len(set(made)) == 6, made
