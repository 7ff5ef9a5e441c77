"""What the compiled lane allocates per allowed check (performance issue 15, target 7): counted with
benchmarks/bench_alloc.py's allocator hook on its in-process fast path (the benchmark's config: three
windows, accounting on, a reservation per request), a batch of distinct request ids after the caches are
warm. The 4 blocks left: the Reservation, the request id str and the body bytes (state the decision keeps
until its usage settles it) and the answer's bytes: docs/design.md's performance section has the
breakdown."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from nexus_authz import native

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_alloc  # type: ignore[import-not-found]  # noqa: E402

pytestmark = pytest.mark.skipif(
    native.fast is None and os.environ.get(native.PURE_ENV, "") not in ("", "0"),
    reason="NEXUS_AUTHZ_PURE is set: the compiled lane is not loaded",
)

BATCH = 2000
MAX_BLOCKS = 4.05  # 32.9 before the lane stopped making statuses, header strings, digests ... per request;
# 12.1 since the latency histograms count in an array("q") written in place; 10.1 since GCRA states are
# rewritten in place; 9.1 with the OK count in place (latency.ReasonCounts); 8.1 with the model str reused;
# 5.3 with the reservation as one object (native/_reservation.pyx); 5.003 with the sweep's walk list reused;
# 4.0025 with the book's table linked through its entries, no OrderedDict node (the .0025: the tables'
# dicts growing now and then; 4.0105 after the rest of tests/adapters in the same process)


def test_the_oldest_reservation_is_read_without_an_iterator() -> None:
    assert native.fast is not None
    assert native.fast._odict_layout()


def _world(tmp_path: Path) -> tuple[Any, Any, list[str], list[bytes]]:
    """bench_alloc's allocation counter (skips without a C compiler), its in-process fast path, BATCH
    distinct request ids and their ext_authz requests."""
    counter = bench_alloc.AllocCounter.load(tmp_path / "hook")
    if counter is None:
        pytest.skip("no C compiler for the allocation hook")
    fp = bench_alloc.build_fastpath(tmp_path / "engine")
    ids = [f"5f2d6f1e-1c7b-4a53-9d2e-{i:012d}" for i in range(BATCH)]
    return counter, fp, ids, [bench_alloc.ext_authz_request(fp.secrets[0], rid) for rid in ids]


def test_an_allowed_check_allocates_few_blocks(tmp_path: Path) -> None:
    if native.fast is None:
        pytest.fail(f"the compiled lane did not build or load ({native.WHY_PURE}): pip install -e .")
    counter, fp, ids, raws = _world(tmp_path)
    receive, account, sink = fp.proto.data_received, fp.engine.account, fp.sink

    def decide() -> None:
        for raw in raws:
            receive(raw)

    def settle() -> None:
        for rid in ids:
            account(rid, bench_alloc.USAGE)

    for _ in range(2):
        decide()
        assert sink.last.startswith(b"HTTP/1.1 200 OK\r\n")
        settle()
    gc.collect()
    counts = []
    for _ in range(3):  # every reservation settled before its id comes back, as in bench_alloc
        counts.append(counter.count(decide).allocs)
        assert sink.last.startswith(b"HTTP/1.1 200 OK\r\n")
        settle()
    per_decision = min(counts) / BATCH
    assert per_decision <= MAX_BLOCKS, f"{per_decision:.2f} blocks per allowed check"


def test_a_reservation_keeps_its_own_costs(tmp_path: Path) -> None:
    """The lane hands the last request's costs tuple on only while the costs are the same numbers: a request
    with another max_tokens is charged and reserved with its own (the reference path's costs)."""
    import json

    if native.fast is None:
        pytest.fail(f"the compiled lane did not build or load ({native.WHY_PURE}): pip install -e .")
    fp = bench_alloc.build_fastpath(tmp_path)
    base = json.loads(bench_alloc.be.BODY)
    entries = fp.engine.decider.book._entries
    costs = {}
    for rid, max_tokens in (("a", 16), ("b", 400), ("c", 16), ("d", 400)):
        body = json.dumps(base | {"max_tokens": max_tokens}, separators=(",", ":")).encode()
        raw = bench_alloc.ext_authz_request(fp.secrets[0], rid).replace(bench_alloc.be.BODY, body)
        raw = raw.replace(
            f"content-length: {len(bench_alloc.be.BODY)}".encode(), f"content-length: {len(body)}".encode()
        )
        fp.proto.data_received(raw)
        assert fp.sink.last.startswith(b"HTTP/1.1 200 OK\r\n")
        costs[rid] = entries[rid][2]
        assert type(entries[rid]) is native.reservation.Reservation  # one object, read as the 7-tuple
    assert costs["a"] == costs["c"] and costs["b"] == costs["d"] and costs["a"] != costs["b"]
    assert costs["b"][1] - costs["a"][1] == 400 - 16  # the tokens window's cost: prompt + max_tokens


def test_a_header_function_other_than_the_compiled_one_gets_the_statuses(tmp_path: Path) -> None:
    """With another build_header_block in place, the lane makes the statuses of its figures (what acquire
    would have returned) and answers with that function's lines."""
    from nexus_authz.core import ratelimit_headers
    from nexus_authz.core.limits import WindowStatus

    if native.fast is None:
        pytest.fail(f"the compiled lane did not build or load ({native.WHY_PURE}): pip install -e .")
    fp = bench_alloc.build_fastpath(tmp_path)
    seen: list[bytes] = []

    def pure(plan: Any, statuses: Any) -> bytes:
        assert type(statuses) is tuple and all(type(s) is WindowStatus for s in statuses)
        entry = fp.engine.decider.book._entries["rid-1"]  # reserved before the answer is made
        assert tuple(s.spec for s in statuses) == entry[1]
        assert all(s.allowed and s.limit == s.spec.limit and type(s.remaining) is int for s in statuses)
        block = ratelimit_headers.plan_header_block(plan, statuses)
        seen.append(block)
        return block

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ratelimit_headers, "build_header_block", pure)
        fp.proto.data_received(bench_alloc.ext_authz_request(fp.secrets[0], "rid-1"))
    assert len(seen) == 1 and seen[0] and seen[0] in fp.sink.last
    assert fp.sink.last.startswith(b"HTTP/1.1 200 OK\r\n")


def test_the_lane_sees_the_module_functions_replaced_between_checks(tmp_path: Path) -> None:
    """The lane remembers core.body.read_facts and ratelimit_headers.build_header_block while their
    modules do not change: one replaced after a check is the one the next check calls, and the compiled
    one again once it is put back."""
    from nexus_authz.core import body, ratelimit_headers

    if native.fast is None:
        pytest.fail(f"the compiled lane did not build or load ({native.WHY_PURE}): pip install -e .")
    fp = bench_alloc.build_fastpath(tmp_path)
    calls: list[str] = []
    read_facts, build = body.read_facts, ratelimit_headers.build_header_block

    def reader(*args: Any, **kw: Any) -> Any:
        calls.append("read_facts")
        return read_facts(*args, **kw)

    def block(plan: Any, statuses: Any) -> bytes:
        calls.append("build_header_block")
        return ratelimit_headers.plan_header_block(plan, statuses)

    for i, patched in enumerate([False, True, False, True, False]):
        with pytest.MonkeyPatch.context() as patch:
            if patched:
                patch.setattr(body, "read_facts", reader)
                patch.setattr(ratelimit_headers, "build_header_block", block)
            fp.proto.data_received(bench_alloc.ext_authz_request(fp.secrets[0], f"rid-{i}"))
        assert fp.sink.last.startswith(b"HTTP/1.1 200 OK\r\n")
        assert calls == ["read_facts", "build_header_block"] * ((i + 1) // 2), i
    assert body.read_facts is read_facts and ratelimit_headers.build_header_block is build


def test_the_lane_counts_an_admission_in_place(tmp_path: Path) -> None:
    """The OK count is incremented in the decisions' array (no int object): the same figure the
    reference path's `decisions[Reason.OK] += 1` reads, and what /metrics reports."""
    from nexus_authz.core.model import Reason
    from nexus_authz.latency import ReasonCounts

    if native.fast is None:
        pytest.fail(f"the compiled lane did not build or load ({native.WHY_PURE}): pip install -e .")
    fp = bench_alloc.build_fastpath(tmp_path)
    decisions = fp.engine.decisions
    assert type(decisions) is ReasonCounts and fp.engine.decider.decisions is decisions
    held = decisions.counts
    for i in range(3):
        fp.proto.data_received(bench_alloc.ext_authz_request(fp.secrets[0], f"rid-{i}"))
        assert fp.sink.last.startswith(b"HTTP/1.1 200 OK\r\n")
    assert decisions.counts is held and decisions[Reason.OK] == 3
    fp.proto.data_received(bench_alloc.ext_authz_request("nx-nobody-0123456789abcdef", "rid-x"))
    assert not fp.sink.last.startswith(b"HTTP/1.1 200 OK\r\n")
    assert dict(decisions) == dict.fromkeys(Reason, 0) | {Reason.OK: 3, Reason.UNKNOWN_KEY: 1}


MAX_SETTLEMENT_BLOCKS = 6.05  # 13 before the settlement's counts and cost were kept in C (12), its deltas
# went to the compiled adjust as C integers (10) and the ledger row became a LedgerRow of C sums (6). Left:
# engine.accounted's, book.settled's and the ledger's record counts, the two usage_tokens sums (ints
# past 256, each a new object), and the concurrency gauge's in-flight count (past 256 with a batch of
# 2,000 in flight)


def test_a_settlement_allocates_few_blocks(tmp_path: Path) -> None:
    """The access log's common entry settled through native/_account.pyx (bench_alloc's settle: the
    compiled step als_fast.ACCOUNT, the reservations the compiled lane made)."""
    from nexus_authz.adapters import als_fast

    if native.fast is None or als_fast.ACCOUNT is None:
        pytest.fail(f"the compiled lane did not build or load ({native.WHY_PURE}): pip install -e .")
    counter, fp, ids, raws = _world(tmp_path)
    receive, engine, compiled = fp.proto.data_received, fp.engine, als_fast.ACCOUNT
    assert native.account is not None
    taken = native.account.taken  # a C count: a Python int counted here would allocate past 256

    def decide() -> None:
        for raw in raws:
            receive(raw)

    def settle() -> None:
        for rid in ids:
            compiled(engine, rid, bench_alloc.USAGE, None)

    for _ in range(2):
        decide()
        settle()
    gc.collect()
    counts = []
    for _ in range(3):
        decide()
        before = taken[0]
        counts.append(counter.count(settle).allocs)
        assert taken[0] - before == BATCH  # every one settled by the compiled step
    per_settlement = min(counts) / BATCH
    assert per_settlement <= MAX_SETTLEMENT_BLOCKS, f"{per_settlement:.2f} blocks per settlement"
