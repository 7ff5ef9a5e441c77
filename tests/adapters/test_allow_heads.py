"""Performance issue 15 (memory per active client): a plan kept each active key's allow head, ~170 B of
bytes per key that differ only in the key id. The keys made from one recipe (one shape of the key file)
now share one head split around the key id, and the answer writer (http_fast.allow_answer, the compiled
lane's _join) splices the id in: the answers stay byte for byte the reference path's."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

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
    # the first key of the file is the shape's template (no recipe): a plan and bytes of its own; the
    # other five share the recipe's plan and its head
    first = snapshot.by_id["bench-0"]
    recipe = snapshot.by_id["bench-1"].recipe
    assert list(plans) == [first, recipe]
    assert plans[first].wire == allow_block(first, nginx=False)
    head = plans[recipe].wire
    assert isinstance(head, tuple)
    assert head[0].endswith(b"x-nexus-key-id: ") and head[1].startswith(b"\r\nx-nexus-tenant: bench\r\n")
    assert plans[recipe].counter_ids is None  # each key charged under its own ids (its tokens/day window:
    ids = [key.counter_ids[2] for key in snapshot.by_id.values()]  # the GCRA ones may be fresh again)
    assert len(set(ids)) == 6 and all(cid in fp.engine.counters for cid in ids)


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


def _proto(fp: Any, lane: str) -> Any:
    if lane == "pure":
        proto = _Pure(fp.app)
        proto.connection_made(fp.sink)
        return proto
    if native.fast is None:
        pytest.skip("the compiled lane is not loaded")
    return fp.proto


@pytest.mark.parametrize("lane", ["compiled", "pure"])
def test_an_owners_first_plan_is_found_under_the_owner_its_others_under_tuples(
    tmp_path: Path, lane: str
) -> None:
    # the same issue: a plan per (key, model, path) was kept under that tuple (64 B per active key)
    fp = bench_alloc.build_fastpath(tmp_path, 3)
    proto = _proto(fp, lane)
    first, second, third = (fp.engine.snapshot.by_id[f"bench-{i}"] for i in range(3))
    requests = []
    for secret in fp.secrets:
        chat = bench_alloc.ext_authz_request(secret, None)
        requests += [chat, chat.replace(b"/ext_authz/v1/chat/completions", b"/ext_authz/v1/completions")]
    for _ in range(3):
        for i, raw in enumerate(requests):
            proto.data_received(raw)
            assert fp.sink.last.startswith(b"HTTP/1.1 200 OK\r\nx-nexus-key-id: bench-%d\r\n" % (i // 2))
    plans = fp.engine.decider._fast._plans
    recipe = second.recipe
    assert recipe is third.recipe is not None and first.recipe is None
    other = "/v1/completions"
    # made once each: the template key's own two, the recipe's two (shared by bench-1 and bench-2)
    assert list(plans) == [first, (first, "gpt-4o-mini", other), recipe, (recipe, "gpt-4o-mini", other)]
    assert plans[first].path == "/v1/chat/completions" and plans[first].source is first
    assert plans[first].counter_ids == first.counter_ids
    assert plans[recipe].source is second and plans[recipe].counter_ids is None  # the key's own


@pytest.mark.parametrize("lane", ["compiled", "pure"])
def test_a_record_its_recipes_plan_does_not_fit_gets_its_own(tmp_path: Path, lane: str) -> None:
    """A shared plan serves the keys of its recipe with the same limits and lists (core/fastpath._fits):
    not the case for records the key file makes, but a record made otherwise gets a plan of its own."""
    fp = bench_alloc.build_fastpath(tmp_path, 3)
    proto = _proto(fp, lane)
    second, third = fp.engine.snapshot.by_id["bench-1"], fp.engine.snapshot.by_id["bench-2"]
    proto.data_received(bench_alloc.ext_authz_request(fp.secrets[1], None))
    plans = fp.engine.decider._fast._plans
    shared = plans[second.recipe]
    # the recipe's plan as if made for a record with limits of its own (equal, not the same object)
    shared.source = dataclasses.replace(second, limits=tuple(list(second.limits)))
    for secret, key in ((fp.secrets[2], third), (fp.secrets[1], second)):
        proto.data_received(bench_alloc.ext_authz_request(secret, None))
        assert fp.sink.last.startswith(b"HTTP/1.1 200 OK\r\nx-nexus-key-id: %s\r\n" % key.key_id.encode())
        assert plans[key] is not shared and plans[key].source is key
        assert plans[key].counter_ids == key.counter_ids  # its own plan: its ids in it
    assert plans[second.recipe] is shared and len(plans) == 3
    # each key's requests were charged under its own ids
    counters = fp.engine.counters
    assert second.counter_ids[2] in counters and third.counter_ids[2] in counters  # (tokens/day)
