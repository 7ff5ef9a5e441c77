"""The per-client state made after a key load leaves the cyclic GC's generations at the upkeep tick
(nexus_authz/gcupkeep.py), and freezing it keeps memory flat over reloads and plan evictions.

Through the real HTTP ext_authz protocol (compiled, or pure with NEXUS_AUTHZ_PURE=1). Behaviour, not
timings: where the objects are (gc.get_objects by generation, gc.get_freeze_count), and memory in use.
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
import weakref
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from nexus_authz import engine as engine_module
from nexus_authz import gcupkeep, native
from nexus_authz import server as server_module
from nexus_authz.adapters.http_authz import HttpApp
from nexus_authz.core import fastpath
from nexus_authz.core.known import KnownKeys
from nexus_authz.core.usage import Usage
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from tests.fuzz._support import FakeTransport
from tests.helpers import KeySpec, key_file, write_config

LIMITS = {"limits": [{"requests": 1000, "per": "minute"}, {"tokens": 100000, "per": "day"}]}
EXTRA = "auth_failures:\n  limit: 20\n  per: minute\n"
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":16}'


@pytest.fixture(autouse=True)
def _unfrozen() -> Iterator[None]:
    """What a test froze goes back to the collector afterwards (the rest of the run is not frozen)."""
    yield
    gc.unfreeze()


def _specs(n: int, tag: str = "") -> list[KeySpec]:
    return [KeySpec(f"gc{tag}{i}", extra=LIMITS) for i in range(n)]


def _request(secret: str, request_id: str = "") -> bytes:
    head = (
        "POST /ext_authz/v1/chat/completions HTTP/1.1\r\nhost: authz\r\n"
        + (f"x-request-id: {request_id}\r\n" if request_id else "")
        + f"authorization: Bearer {secret}\r\ncontent-type: application/json\r\n"
        f"x-forwarded-for: 192.0.2.2\r\ncontent-length: {len(BODY)}\r\n"
        f"x-nexus-content-length: {len(BODY)}\r\n\r\n"
    )
    return head.encode() + BODY


class Stack:
    def __init__(self, directory: Path, specs: list[KeySpec]) -> None:
        self.directory = directory
        settings = load_settings(str(write_config(directory, *specs, extra=EXTRA)))
        self.now = 1_790_000_000.0
        self.engine = Engine.from_settings(settings, clock=lambda: self.now)
        self.app = HttpApp(self.engine, max_header_bytes=65536, max_body=1 << 20)
        self.connect()

    def connect(self) -> None:
        """A new connection from the proxy (the previous one, if any, closed)."""
        if hasattr(self, "proto"):
            self.proto.connection_lost(None)
        self.proto = self.app.protocol()
        self.transport = FakeTransport()
        self.proto.connection_made(self.transport)  # type: ignore[arg-type]

    def ask(self, specs: list[KeySpec], tag: str = "") -> None:
        """One request per key (with `tag`, an x-request-id each: a reservation until `settle`)."""
        for spec in specs:
            self.transport.data.clear()
            self.proto.data_received(_request(spec.secret, f"{tag}{spec.id}" if tag else ""))
            assert bytes(self.transport.data).startswith(b"HTTP/1.1 200"), bytes(self.transport.data)[:200]

    def settle(self, specs: list[KeySpec], tag: str) -> None:
        for spec in specs:
            self.engine.account(f"{tag}{spec.id}", Usage(prompt_tokens=5, completion_tokens=7))

    def tick(self) -> None:
        """The upkeep a second later (server.py's maintenance loop)."""
        self.now += gcupkeep.SETTLE_EVERY
        self.engine.maintain()

    def reload(self, specs: list[KeySpec]) -> None:
        (self.directory / "keys.yaml").write_text(key_file(*specs))
        assert self.engine.reload_keys(force=True)


def _in_generations(objects: list[object]) -> int:
    """How many of `objects` are in the collector's generations (not frozen, not untracked)."""
    ids = {id(o) for g in (0, 1, 2) for o in gc.get_objects(g)}
    return sum(1 for o in objects if id(o) in ids)


def test_the_tick_moves_each_clients_state_out_of_the_generations(tmp_path: Path) -> None:
    specs = _specs(1000)  # ~1.5-4 tracked objects each: over SETTLE_AT
    stack = Stack(tmp_path, specs)
    stack.ask(specs[:1])
    stack.tick()  # the first request's one-off state settled
    frozen = gc.get_freeze_count()
    before = {id(o) for o in gc.get_objects()}
    stack.ask(specs)
    # made after the load's freeze: the clients' state (plans and their cache keys on the compiled lane,
    # window states, ...) is in the generations, walked again by each full collection
    state = [o for o in gc.get_objects() if id(o) not in before]
    assert len(state) >= len(specs)
    fast = stack.engine.decider._fast
    plans = list(fast._plans.values()) if fast is not None else []
    if native.fast is not None:
        assert len(plans) == len(specs)
    assert _in_generations(plans) == len(plans)
    stack.tick()
    assert _in_generations(state) == 0
    assert all(gc.is_tracked(o) for o in plans)  # frozen, not gone
    assert gc.get_freeze_count() >= frozen + len(specs)  # (tuples of strings are untracked instead)
    # known clients now: more requests leave nothing new for the collector to walk
    before = {id(o) for o in gc.get_objects()}
    stack.ask(specs)
    assert len([o for o in gc.get_objects() if id(o) not in before]) < len(specs) // 10


def test_settle_waits_until_enough_accumulated() -> None:
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    few = [[i] for i in range(10)]
    gc.collect(1)
    assert not gcupkeep.settle()
    assert gc.get_freeze_count() == frozen
    assert _in_generations(few) == len(few)
    many = [[i] for i in range(gcupkeep.SETTLE_AT)]
    gc.collect(1)  # survivors of the young collections: the older generations hold them
    gc.disable()  # a key file parse off the loop: no walk over what it builds
    try:
        assert not gcupkeep.settle()
    finally:
        gc.enable()
    assert _in_generations(many) == len(many)
    assert gcupkeep.settle()
    assert _in_generations(few + many) == 0
    assert gc.get_freeze_count() >= frozen + gcupkeep.SETTLE_AT


def test_settle_collects_garbage_cycles_before_it_freezes() -> None:
    class Node:
        def __init__(self) -> None:
            self.other: Node | None = None

    gc.collect()
    gc.freeze()
    cycles = []
    for _ in range(gcupkeep.SETTLE_AT):
        a, b = Node(), Node()
        a.other, b.other = b, a
        cycles.append(a)
    refs = [weakref.ref(n) for n in cycles]
    gc.collect(1)  # in the oldest generation, alive
    del cycles, a, b  # now unreachable: only a full collection frees them
    assert all(r() is not None for r in refs)
    assert gcupkeep.settle()
    assert all(r() is None for r in refs)  # freed, not frozen


def test_known_pairs_stay_out_of_the_young_generation() -> None:
    known = KnownKeys()
    known.note("192.0.2.1", "k1", 1.0)
    gc.collect()  # a full collection untracks a plain dict of untracked tuples and floats
    assert gc.is_tracked(known._seen)
    gc.freeze()
    known.note("192.0.2.1", "k2", 2.0)  # a new (tracked) pair: a plain dict would be tracked again, young
    assert not any(o is known._seen for o in gc.get_objects(0))
    assert known.known("192.0.2.1", "k2", 3.0) and known.known("192.0.2.1", "k1", 3.0)


def _rounds(directory: Path, rounds: int = 6) -> tuple[list[int], list[int]]:
    """Each round: a new key file (other keys: the old snapshot, plans and their frozen state go), a new
    connection, every key asked once with a request id (more keys than plans kept: evictions), the tick
    while the reservations are in flight (they are frozen), their usage accounted, the tick. Returns the
    frozen objects and the memory in use after each round."""
    directory.mkdir()
    stack = Stack(directory, _specs(300, "init-"))
    frozen: list[int] = []
    traced: list[int] = []
    tracemalloc.start()
    try:
        for round_ in range(rounds):
            specs = _specs(300, f"r{round_ % 2}-")  # two alternating key sets: every reload changes them
            stack.reload(specs)
            stack.connect()
            stack.ask(specs, f"round{round_}-")
            stack.tick()
            stack.settle(specs, f"round{round_}-")
            stack.tick()
            gc.collect()
            frozen.append(gc.get_freeze_count())
            traced.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
        gc.unfreeze()
    return frozen, traced


def test_memory_flat_over_reloads_and_plan_evictions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frozen objects are freed by their references going: freezing keeps nothing alive. The same rounds
    with and without the tick's freezing: the frozen objects do not grow with the rounds, and the memory
    in use grows no more than without it (the in-memory ledger, never flushed here, grows in both)."""
    monkeypatch.setattr(fastpath, "MAX_PLANS", 256)
    frozen, traced = _rounds(tmp_path / "on")
    assert max(frozen[2:]) - min(frozen[2:]) < 300, frozen  # less than one object per key and round
    monkeypatch.setattr(engine_module, "settle", lambda: False)
    _, unfrozen_traced = _rounds(tmp_path / "off")
    growth, reference = traced[-1] - traced[2], unfrozen_traced[-1] - unfrozen_traced[2]
    assert growth < reference + 32 * 1024, (traced, unfrozen_traced)


def test_the_collector_looks_at_most_once_per_settle_every(tmp_path: Path) -> None:
    stack = Stack(tmp_path, _specs(1))
    stack.tick()  # what the load and the first look left
    engine = stack.engine
    first = [[i] for i in range(gcupkeep.SETTLE_AT)]
    gc.collect(1)
    assert not engine.collector_upkeep()  # the tick looked at this instant: not before SETTLE_EVERY
    assert _in_generations(first) == len(first)
    stack.now += gcupkeep.SETTLE_EVERY
    assert engine.collector_upkeep()
    assert _in_generations(first) == 0
    second = [[i] for i in range(gcupkeep.SETTLE_AT)]
    gc.collect(1)
    stack.now += gcupkeep.SETTLE_EVERY / 2
    assert not engine.collector_upkeep()
    assert _in_generations(second) == len(second)
    stack.now += gcupkeep.SETTLE_EVERY / 2
    assert engine.collector_upkeep()
    assert _in_generations(second) == 0


def test_the_server_looks_more_often_than_its_maintenance_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's collector task calls the engine's look every SETTLE_EVERY (here 10 ms), on its own:
    the maintenance loop's first pass is a second after the start."""
    monkeypatch.setattr(server_module, "SETTLE_EVERY", 0.01)
    engine = Engine.from_settings(load_settings(str(write_config(tmp_path, *_specs(1), extra=EXTRA))))
    settings = replace(engine.settings, http_socket=None, http_tcp=None, grpc=None, api=None, admin=None)
    looks: list[float] = []
    monkeypatch.setattr(Engine, "collector_upkeep", lambda self: looks.append(time.monotonic()) or False)
    maintained: list[float] = []
    monkeypatch.setattr(Engine, "maintain", lambda *a, **k: maintained.append(time.monotonic()) or False)

    async def main() -> None:
        server = server_module.Server(settings, engine)
        await server.start()
        try:
            await asyncio.sleep(0.3)
        finally:
            await server.drain()

    asyncio.run(main())
    assert len(looks) >= 3
    assert not maintained
