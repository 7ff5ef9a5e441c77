"""The Lua tap's slot release (`POST /_nexus/release`, `x-nexus-release: 1`) on the compiled lane
(native/_fast.pyx `_release`) against the reference path it stands in for (AuthzProtocol._route,
`_release`, Engine.release): the same byte streams, through the compiled protocol with its lane on and
forced off and through the httptools protocol (the pure path), must write the same bytes and leave the
same book, counters and counts: a known id, an unknown one, one released twice, a request without a slot,
pipelined with its check in one read, split across reads, on the admin listener, on a closing connection,
a request waiting for the slot, and a store the lane does not take.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from nexus_authz import native
from nexus_authz.adapters import http_authz
from nexus_authz.core.reservations import ReservationBook
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from nexus_authz.stores.base import LocalCounters
from nexus_authz.stores.memory import MemoryCounterStore
from tests.adapters.test_http_fastpath import KEYS, NOW, PLANS, _body, _check, _compiled_or_skip, state
from tests.fuzz._support import FakeTransport, no_bugs_logged
from tests.helpers import write_config

if native.http1 is not None:
    from nexus_authz.adapters.http_native import CompiledAuthzProtocol

PLAIN, TIGHT, FREE, PERMODEL = KEYS[0].secret, KEYS[1].secret, KEYS[5].secret, KEYS[6].secret
RELEASED = b"HTTP/1.1 204 No Content\r\n\r\n"


def release(rid: str, *, method: str = "POST", flag: str = "1", close: bool = False) -> bytes:
    head = f"{method} /_nexus/release HTTP/1.1\r\nhost: 127.0.0.1\r\nx-nexus-release: {flag}\r\n"
    if close:
        head += "connection: close\r\n"
    return (head + f"content-length: {len(rid)}\r\n\r\n{rid}").encode("latin-1")


def check(secret: str, rid: str) -> bytes:
    return _check(secret, rid, _body("gpt-4o-mini", 100, 1, 20))


@pytest.fixture(scope="module", params=["accounting", "no-accounting"])
def config(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    extra = PLANS + ("" if request.param == "accounting" else "accounting:\n  enabled: false\n")
    return write_config(tmp_path_factory.mktemp("release"), *KEYS, extra=extra)


class Counted(FakeTransport):
    """FakeTransport, its writes counted."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class Subclassed(MemoryCounterStore):
    """A memory store of another class: the compiled release does not take it (as a Redis store)."""

    __slots__ = ()


def run(
    lane: str,
    config: Path,
    script: list[tuple[Any, ...]],
    *,
    admin: bool = False,
    other_store: bool = False,
    writes: list[int] | None = None,
) -> tuple[list[bytes], dict[str, Any]]:
    """A fresh engine, connections through `lane` ("compiled": the compiled protocol with its lane;
        "reference": the same protocol, lane off; "pure": the httptools protocol), fed `script`: ("feed",
        connection, bytes) records what the connection wrote meanwhile; ("wait",) lets queued answers come and
        records each connection's; ("tick", seconds); ("yield",). `writes`: each feed's count of transport
    writes, appended."""
    clock = [NOW]
    engine = Engine.from_settings(load_settings(str(config)), clock=lambda: clock[0])
    engine.load_first_keys()
    if other_store:
        local = engine.decider.store
        assert type(local) is LocalCounters and type(local.store) is MemoryCounterStore
        local.store.__class__ = Subclassed
    app = http_authz.HttpApp(engine, max_header_bytes=64 * 1024, max_body=1 << 20, admin=admin)
    if lane == "pure":
        base: type[http_authz.AuthzProtocol] = http_authz.AuthzProtocol
    else:
        _compiled_or_skip()
        base = CompiledAuthzProtocol

    class Protocol(base):  # type: ignore[misc, valid-type]
        __slots__ = ()
        fast_path = lane == "compiled"

    answers: list[bytes] = []

    async def drive() -> None:
        conns: dict[int, tuple[Protocol, Counted, list[int]]] = {}
        for step in script:
            if step[0] == "feed":
                _, c, data = step
                if c not in conns:
                    conns[c] = (Protocol(app), Counted(), [0])
                    conns[c][0].connection_made(conns[c][1])  # type: ignore[arg-type]
                protocol, transport, seen = conns[c]
                before = transport.writes
                protocol.data_received(data)
                if writes is not None:
                    writes.append(transport.writes - before)
                answers.append(bytes(transport.data[seen[0] :]))
                seen[0] = len(transport.data)
            elif step[0] == "wait":
                for _ in range(100):
                    if not any(p._outbox for p, _, _ in conns.values()):
                        break
                    await asyncio.sleep(0.005)
                for _, transport, seen in conns.values():
                    answers.append(bytes(transport.data[seen[0] :]))
                    seen[0] = len(transport.data)
            elif step[0] == "tick":
                clock[0] += step[1]
            elif step[0] == "yield":  # the queued answers' tasks start
                await asyncio.sleep(0.001)

    with no_bugs_logged():
        asyncio.run(drive())
    return answers, state(engine)


def same(config: Path, script: list[tuple[Any, ...]], **kw: Any) -> list[bytes]:
    """The answers, the same through the three (NEXUS_AUTHZ_PURE set: the pure path's alone)."""
    pure = run("pure", config, script, **kw)
    if os.environ.get(native.PURE_ENV, "") not in ("", "0"):
        return pure[0]
    compiled = run("compiled", config, script, **kw)
    assert compiled == run("reference", config, script, **kw)
    assert compiled == pure
    return compiled[0]


def test_known_unknown_twice_and_without_a_slot(config: Path) -> None:
    """A slot released (the window has room again), the same id again and an unknown id (nothing freed),
    requests that hold no slot (no concurrency window; a key without limits), after a settlement."""
    script: list[tuple[Any, ...]] = [("feed", 0, check(TIGHT, "rid-1")), ("feed", 0, check(TIGHT, "rid-2"))]
    script += [("feed", 0, release("rid-1")), ("feed", 0, release("rid-1")), ("feed", 0, release("nobody"))]
    script += [("feed", 0, check(TIGHT, "rid-3")), ("feed", 0, check(PERMODEL, "rid-4"))]
    script += [("feed", 0, release("rid-4")), ("feed", 0, check(FREE, "rid-5"))]
    script += [("feed", 0, release("rid-5")), ("tick", 0.5), ("feed", 0, release("rid-3"))]
    script += [("feed", 0, release("")), ("feed", 0, release("é"))]
    answers = same(config, script)
    assert answers[2:5] == [RELEASED] * 3
    assert answers[5].startswith(b"HTTP/1.1 200 OK\r\n")  # rid-1's slot was free again: 2 of 2 held
    assert answers[7] == answers[9] == answers[10] == answers[11] == answers[12] == RELEASED


def test_pipelined_with_its_check_and_split_across_reads(config: Path) -> None:
    """As Envoy's Lua tap and wrk send it: the check and its release in one read, several pairs in one
    read, a release cut at every few bytes, and a check and a release sharing a read's boundary."""
    pair = check(TIGHT, "rid-1") + release("rid-1")
    script: list[tuple[Any, ...]] = [("feed", 0, pair)]
    script += [("feed", 0, pair + check(TIGHT, "rid-2") + release("rid-2"))]
    split = release("rid-3")
    script += [("feed", 0, check(TIGHT, "rid-3") + split[:7])]
    script += [("feed", 0, split[i : i + 5]) for i in range(7, len(split), 5)]
    both = check(PLAIN, "rid-4") + release("rid-4") + check(TIGHT, "rid-5")
    script += [("feed", 0, both[:-30]), ("feed", 0, both[-30:] + release("rid-5")[:20])]
    script += [("feed", 0, release("rid-5")[20:])]
    answers = same(config, script)
    assert answers[0].endswith(RELEASED) and answers[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert answers[1].count(RELEASED) == 2 and answers[1].count(b"HTTP/1.1 200 OK\r\n") == 2
    assert answers[-1] == RELEASED


def test_not_taken_by_the_lane(config: Path) -> None:
    """What the lane leaves to the reference path, answered as before: a flag that is not "1" (a check of
    that path, with no key), a release
    behind a queued answer (a check waiting for its slot on the same connection), a GET and a HEAD (the
    reference releases on any method), a closing connection, the admin listener (404)."""
    script: list[tuple[Any, ...]] = [("feed", 0, check(TIGHT, "rid-1")), ("feed", 0, check(TIGHT, "rid-2"))]
    script += [("feed", 0, release("rid-1", flag="0")), ("feed", 0, release("rid-1", flag="yes"))]
    script += [("feed", 0, check(TIGHT, "rid-3") + release("rid-1")), ("wait",)]
    script += [("feed", 1, release("rid-2", method="GET")), ("feed", 1, release("rid-3", method="HEAD"))]
    script += [("feed", 1, release("rid-3", close=True)), ("feed", 1, release("rid-3"))]
    answers = same(config, script)
    assert answers[2].startswith(b"HTTP/1.1 401") and answers[3].startswith(b"HTTP/1.1 401")  # a check
    assert answers[4] == b"" and answers[5].endswith(RELEASED)  # in request order, after the check's
    assert answers[6] == answers[7] == answers[8] == RELEASED and answers[9] == b""  # closed
    admin = same(config, [("feed", 0, check(TIGHT, "rid-1")), ("feed", 0, release("rid-1"))], admin=True)
    assert all(a.startswith(b"HTTP/1.1 404") for a in admin)


def test_a_waiting_request_gets_the_slot(config: Path) -> None:
    """A check refused for its concurrency slot waits (decide.SLOT_WAIT); the release on another connection
    frees a slot and wakes it: admitted (Decider.slot_freed from the compiled release)."""
    script: list[tuple[Any, ...]] = [("feed", 0, check(TIGHT, "rid-1")), ("feed", 0, check(TIGHT, "rid-2"))]
    script += [("feed", 1, check(TIGHT, "rid-3")), ("yield",), ("feed", 2, release("rid-1")), ("wait",)]
    answers = same(config, script)
    assert answers[2] == b"" and answers[3] == RELEASED
    assert answers[5].startswith(b"HTTP/1.1 200 OK\r\n")  # connection 1's check, admitted after the wait


def test_a_store_the_lane_does_not_take(config: Path) -> None:
    """A store of another class than the memory store (a Redis store, here a subclass): the reference path
    releases (Engine.release is called), with the same bytes and state."""
    script: list[tuple[Any, ...]] = [("feed", 0, check(TIGHT, "rid-1") + release("rid-1"))]
    calls: list[str] = []
    reference = Engine.release

    def counted(self: Engine, request_id: str) -> bool:
        calls.append(request_id)
        return reference(self, request_id)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Engine, "release", counted)
        answers = same(config, script, other_store=True)
    assert calls == ["rid-1"] * (1 if os.environ.get(native.PURE_ENV, "") not in ("", "0") else 3)
    assert answers[0].endswith(RELEASED)


def test_the_compiled_lane_releases_without_the_reference(config: Path) -> None:
    """Not a vacuous comparison: on the compiled protocol the release goes through native/_fast.pyx, which
    calls neither Engine.release nor ReservationBook.release (nor AuthzProtocol._route), yet frees the slot
    (counted as the proxy's, the window has room) as the reference path does."""
    _compiled_or_skip()
    calls: list[str] = []
    engine_release, book_release = Engine.release, ReservationBook.release
    route = http_authz.AuthzProtocol._route

    def counted(name: str, method: Any) -> Any:
        def wrapper(*args: Any) -> Any:
            calls.append(name)
            return method(*args)

        return wrapper

    script: list[tuple[Any, ...]] = [("feed", 0, check(TIGHT, "rid-1") + release("rid-1"))]
    script += [("feed", 0, check(TIGHT, "rid-2")), ("feed", 0, release("rid-2") + release("nobody"))]
    script += [("feed", 0, release("rid-2"))]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Engine, "release", counted("engine", engine_release))
        patch.setattr(ReservationBook, "release", counted("book", book_release))
        patch.setattr(http_authz.AuthzProtocol, "_route", counted("route", route))
        compiled = run("compiled", config, script)
        assert calls == []
        reference = run("reference", config, script)
        assert calls.count("engine") == 4 and calls.count("route") == 6
    assert compiled == reference
    assert compiled[1]["slot releases"]["proxy"] == 2


def test_one_write_per_read_in_request_order(config: Path) -> None:
    """The compiled lane's answers to one read leave in one write at its end (a check and its release: one
    send, not two), and before anything the reference path writes in that read: the same bytes in the
    same order as the reference path's one write per answer."""
    _compiled_or_skip()
    mixed = check(TIGHT, "rid-1") + release("rid-1") + release("rid-1", method="HEAD") + check(PLAIN, "rid-2")
    mixed += release("rid-2") + check(PLAIN, "rid-3") + release("rid-3", flag="0") + check(PLAIN, "rid-4")
    script: list[tuple[Any, ...]] = [
        ("feed", 0, check(PLAIN, "rid-0") + release("rid-0")),
        ("feed", 0, mixed),
    ]
    script += [
        ("feed", 0, check(PLAIN, "rid-5")[:50]),
        ("feed", 0, check(PLAIN, "rid-5")[50:] + release("rid-5")),
    ]
    lane: list[int] = []
    reference: list[int] = []
    compiled = run("compiled", config, script, writes=lane)
    assert compiled == run("reference", config, script, writes=reference)
    assert reference == [2, 8, 0, 2]
    # held: the pair; check + release, then the HEAD release (reference), then the rest with the 401
    # (reference) in between; the cut check's read writes nothing, then the pair
    assert lane == [1, 5, 0, 1]
    answers = compiled[0]
    assert answers[1].count(b"HTTP/1.1 200 OK\r\n") == 4 and answers[1].count(RELEASED) == 3


@pytest.mark.parametrize("broken", ["check", "release"])
def test_a_bug_on_the_lane_answers_500_after_what_the_read_answered_before(
    config: Path, broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception inside the compiled lane (here the counter store's acquire or adjust raising) is
    logged, counted as unavailable and answered 500, the connection closed after it; the answers the
    same read produced before it (held for the read's one write) leave first, in request order."""
    _compiled_or_skip()
    engine = Engine.from_settings(load_settings(str(config)), clock=lambda: NOW)
    engine.load_first_keys()
    app = http_authz.HttpApp(engine, max_header_bytes=64 * 1024, max_body=1 << 20)
    protocol = CompiledAuthzProtocol(app)
    transport = FakeTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(check(TIGHT, "rid-0"))  # a reservation for the release below
    first = bytes(transport.data)
    assert first.startswith(b"HTTP/1.1 200")
    del transport.data[:]
    store = engine.decider.store

    def raising(*args: Any) -> Any:
        raise RuntimeError("a bug")

    if broken == "check":  # the first check of the read is answered, the second one's acquire raises
        data = check(TIGHT, "rid-1") + check(TIGHT, "rid-2")
        acquire, calls = store.acquire_nowait, [0]

        def once_then_raise(*args: Any) -> Any:
            calls[0] += 1
            return acquire(*args) if calls[0] == 1 else raising(*args)

        store.acquire_nowait = once_then_raise
    else:
        data = check(TIGHT, "rid-1") + release("rid-0")
        store.adjust_soon = raising
    unavailable = engine.decider.decisions[http_authz.Reason.UNAVAILABLE]
    with caplog.at_level("ERROR"):
        protocol.data_received(data)
    out = bytes(transport.data)
    assert out.startswith(b"HTTP/1.1 200"), out[:80]
    assert out.index(b"HTTP/1.1 500") > out.index(b"HTTP/1.1 200")
    assert out.count(b"HTTP/1.1 ") == 2 and transport.closed
    assert "internal error in the HTTP check" in caplog.text
    assert engine.decider.decisions[http_authz.Reason.UNAVAILABLE] == unavailable + 1
