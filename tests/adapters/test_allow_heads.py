"""Performance issue 15 (memory per active client): a plan kept each active key's allow head, ~170 B of
bytes per key that differ only in the key id. The keys made from one recipe (one shape of the key file)
now share one head split around the key id, and the answer writer (http_fast.allow_answer, the compiled
lane's _join) splices the id in: the answers stay byte for byte the reference path's."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from nexus_authz import native
from nexus_authz.adapters import http_authz, http_fast
from nexus_authz.adapters.answers import allow_block, allow_head
from nexus_authz.core.model import deferred

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_alloc  # type: ignore[import-not-found]  # noqa: E402


def _spliced(wire: bytes | tuple[bytes, bytes], key_id: str) -> bytes:
    return wire if isinstance(wire, bytes) else wire[0] + key_id.encode("latin-1") + wire[1]


class _Pure(http_authz.AuthzProtocol):
    """The pure flat path (adapters/http_fast.py) in the httptools protocol."""

    __slots__ = ()
    fast_path = True
    on_message_complete = http_fast.on_message_complete


@pytest.mark.parametrize("lane", ["compiled", "pure"])
def test_the_keys_of_one_recipe_share_one_allow_head(tmp_path: Path, lane: str) -> None:
    fp = bench_alloc.build_fastpath(tmp_path, 6)
    proto = fp.proto
    if lane == "pure":
        proto = _Pure(fp.app)
        proto.connection_made(fp.sink)
    elif native.fast is None:
        pytest.skip("the compiled lane is not loaded")
    snapshot = fp.engine.snapshot
    for i, secret in enumerate(fp.secrets):
        proto.data_received(bench_alloc.ext_authz_request(secret, None))
        key = snapshot.by_id[f"bench-{i}"]
        block = allow_block(key, nginx=False)
        assert fp.sink.last.startswith(block)  # the reference path's head, the key's own id in it
        assert fp.sink.last[len(block) :].startswith(b"x-ratelimit-limit-requests: ")
    plans = fp.engine.decider._fast._plans
    assert len(plans) == 6
    # the first key of the file is the shape's template (no recipe): its own bytes
    first = [p.wire for p in plans.values() if p.key.key_id == "bench-0"]
    assert first == [allow_block(snapshot.by_id["bench-0"], nginx=False)]
    heads = {id(p.wire): p.wire for p in plans.values() if p.key.key_id != "bench-0"}
    assert len(heads) == 1  # one head for the five keys of the recipe, not five blocks
    (head,) = heads.values()
    assert isinstance(head, tuple)
    assert head[0].endswith(b"x-nexus-key-id: ") and head[1].startswith(b"\r\nx-nexus-tenant: bench\r\n")


def test_a_head_is_the_block_of_every_key_it_stands_for(tmp_path: Path) -> None:
    fp = bench_alloc.build_fastpath(tmp_path, 3)
    app, snapshot = fp.app, fp.engine.snapshot
    keys = [snapshot.by_id[f"bench-{i}"] for i in range(3)]
    assert allow_head(keys[0]) is None  # no recipe
    for key in keys:
        assert _spliced(http_fast.plan_wire(app, key), key.key_id) == allow_block(key, nginx=False)
    # a record of the recipe with other headers to remove gets a head of its own, not the recipe's
    other = dataclasses.replace(keys[1], remove_headers=("x-other",))
    wire = http_fast.plan_wire(app, other)
    assert _spliced(wire, other.key_id) == allow_block(other, nginx=False)
    assert b"x-envoy-auth-headers-to-remove: x-other\r\n" in _spliced(wire, other.key_id)
    # and a key id of latin-1 letters is spliced as its latin-1 bytes, as allow_block encodes it
    odd = deferred(dataclasses.replace(keys[2], key_id="bench-\xe9"))  # its headers from the recipe
    assert _spliced(http_fast.plan_wire(app, odd), odd.key_id) == allow_block(odd, nginx=False)


@pytest.mark.parametrize("lane", ["compiled", "pure"])
def test_a_keys_first_plan_is_found_under_the_key_its_others_under_tuples(tmp_path: Path, lane: str) -> None:
    # the same issue: a plan per (key, model, path) was kept under that tuple (64 B per active key)
    fp = bench_alloc.build_fastpath(tmp_path, 2)
    proto = fp.proto
    if lane == "pure":
        proto = _Pure(fp.app)
        proto.connection_made(fp.sink)
    elif native.fast is None:
        pytest.skip("the compiled lane is not loaded")
    key = fp.engine.snapshot.by_id["bench-1"]
    chat = bench_alloc.ext_authz_request(fp.secrets[1], None)
    other = chat.replace(b"/ext_authz/v1/chat/completions", b"/ext_authz/v1/completions")
    for _ in range(3):
        for raw in (chat, other):
            proto.data_received(raw)
            assert fp.sink.last.startswith(b"HTTP/1.1 200 OK\r\nx-nexus-key-id: bench-1\r\n")
    plans = fp.engine.decider._fast._plans
    assert list(plans) == [key, (key, "gpt-4o-mini", "/v1/completions")]  # two plans, made once each
    assert plans[key].path == "/v1/chat/completions" and plans[key].key is key
