"""Issue 15: the early-release mark (`Decision.release`, `x-nexus-release`) only when a slot matters.

An admitted request holding a `concurrent:` slot is marked for the proxy's release call only when a
concurrency window it holds (key, group or tenant level) is at least half full after the admission
(`remaining <= limit // 2`, core/shapes.py `near_limit`); otherwise the access log frees the slot.
"""

from __future__ import annotations

import json

from nexus_authz.core.limits import Kind, make_limit, new_status
from nexus_authz.core.model import Decision, Request
from nexus_authz.core.policy import Policy
from nexus_authz.core.reservations import ReservationBook
from nexus_authz.core.shapes import near_limit, shape_of
from nexus_authz.stores.memory import MemoryCounterStore
from tests.helpers import KeySpec, decide_local, parse_world

POLICY_YAML = """
tenants:
  acme:
    limits:
      - {concurrent: 4}
  roomy:
    limits:
      - {concurrent: 1000}
"""
HUNDRED = KeySpec("hundred", extra={"limits": [{"concurrent": 100}]})
ONE = KeySpec("one", extra={"limits": [{"concurrent": 1}]})
RATE = KeySpec("rate", extra={"limits": [{"requests": 1000, "per": "minute"}]})
# key window roomy (100 of 1000 used at most), tenant window tight (4)
TENANT = KeySpec("tenant", extra={"tenant": "acme", "limits": [{"concurrent": 1000}]})
ROOMY = KeySpec("roomy", extra={"tenant": "roomy", "limits": [{"requests": 1000, "per": "minute"}]})
T0 = 1_800_000_000.0


class World:
    def __init__(self) -> None:
        policy_set, self.snapshot = parse_world(POLICY_YAML, HUNDRED, ONE, RATE, TENANT, ROOMY)
        self.policy = Policy(policy_set)
        self.counters = MemoryCounterStore()
        self.book = ReservationBook(ttl=60.0, max_entries=10_000)
        self.n = 0

    def check(self, key: KeySpec) -> Decision:
        self.n += 1
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
        req = Request(
            "POST",
            "/v1/chat/completions",
            {"authorization": f"Bearer {key.secret}", "content-type": "application/json"},
            json.dumps(body).encode(),
            request_id=f"r{self.n}",
        )
        decision = decide_local(self.policy, self.snapshot, req, T0, self.counters, self.book)
        assert decision.allowed, decision
        return decision


def test_a_roomy_key_is_marked_only_from_half_its_limit() -> None:
    w = World()
    marks = [w.check(HUNDRED).release for _ in range(60)]
    # admission n (1-based) leaves 100 - n slots: marked once 100 - n <= 50
    assert marks[:49] == [""] * 49
    assert marks[49:] == [f"r{n}" for n in range(50, 61)]


def test_a_released_slot_brings_the_key_back_below_half_and_unmarked() -> None:
    w = World()
    for _ in range(50):
        w.check(HUNDRED)
    assert w.check(HUNDRED).release == "r51"
    for n in range(1, 52):
        settlement = w.book.release(f"r{n}")
        assert settlement is not None
        w.counters.adjust(settlement.counter_ids, settlement.specs, settlement.deltas, T0, T0)
    assert w.check(HUNDRED).release == ""


def test_concurrent_one_is_always_marked() -> None:
    w = World()
    for n in range(1, 6):
        assert w.check(ONE).release == f"r{n}"
        settlement = w.book.release(f"r{n}")
        assert settlement is not None
        w.counters.adjust(settlement.counter_ids, settlement.specs, settlement.deltas, T0, T0)


def test_a_tenant_concurrency_window_counts_too() -> None:
    w = World()
    # the key's own window (1000) stays far from half; the tenant's (4) is half full at the 2nd admission
    assert [w.check(TENANT).release for _ in range(3)] == ["", "r2", "r3"]
    # a tenant window far from its limit marks nothing
    assert [w.check(ROOMY).release for _ in range(3)] == ["", "", ""]


def test_a_key_without_a_concurrency_window_is_never_marked() -> None:
    w = World()
    assert {w.check(RATE).release for _ in range(5)} == {""}


def test_near_limit_reads_only_the_charged_slot_windows() -> None:
    conc = make_limit(Kind.CONCURRENCY, 10, None, name="concurrent")
    rate = make_limit(Kind.REQUESTS, 10, "minute", name="requests")
    specs = (rate, conc)
    shape = shape_of(specs)
    full_rate = new_status(rate, 0, 6.0, 0.0, True)  # a rate window at its limit is not a slot
    assert not near_limit(shape, (full_rate, new_status(conc, 6, 0.0, 0.0, True)), 0)
    assert near_limit(shape, (full_rate, new_status(conc, 5, 0.0, 0.0, True)), 0)
    # an uncharged (shadow, would have refused) slot window holds no slot: nothing to release
    assert not near_limit(shape, (full_rate, new_status(conc, 0, 0.0, 0.0, False)), 0b10)
