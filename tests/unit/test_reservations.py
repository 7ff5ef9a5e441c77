"""Reservation book: settle turns usage into per-window differences, expiry releases concurrency and keeps
estimates charged, the book stays bounded, and everything composes with a counter store."""

from __future__ import annotations

import pytest

from nexus_authz.core.limits import make_limit
from nexus_authz.core.reservations import ReservationBook, Settlement
from nexus_authz.stores.base import apply_settlements
from nexus_authz.stores.memory import MemoryCounterStore

NOW = 1_700_000_000.0
REQ = make_limit("requests", 60, "minute")
TOK = make_limit("tokens", 1000, "minute")
DAY = make_limit("tokens", 5000, "day")
USD = make_limit("usd", 1_000_000, "day")
CONC = make_limit("concurrent", 2)
SHADOW = make_limit("tokens", 100, "minute", shadow=True)
SPECS = (REQ, TOK, DAY, USD, CONC)
IDS = tuple(f"alice\x00{s.name}" for s in SPECS)


def book(**kw: float) -> ReservationBook:
    return ReservationBook(ttl=kw.get("ttl", 60.0), max_entries=int(kw.get("max_entries", 100)))


def test_settle_turns_usage_into_differences_and_releases_concurrency() -> None:
    b = book()
    assert b.reserve("r1", IDS, SPECS, (1, 700, 700, 30_000, 1), NOW) == ()
    s = b.settle("r1", NOW + 2, tokens=250, usd_micros=41_000)
    assert s == Settlement("r1", IDS, SPECS, (0, -450, -450, 11_000, -1), NOW)
    assert not s.expired
    assert b.settle("r1", NOW + 3, tokens=1) is None  # once only
    assert b.settle("unknown", NOW) is None
    assert b.stats()["settled"] == 1 and len(b) == 0


def test_settle_without_a_figure_keeps_that_estimate() -> None:
    b = book()
    b.reserve("r1", IDS, SPECS, (1, 700, 700, 30_000, 1), NOW)
    s = b.settle("r1", NOW, tokens=None, usd_micros=None)
    assert s is not None and s.deltas == (0, 0, 0, 0, -1)


def test_uncharged_windows_get_no_difference() -> None:
    specs = (TOK, SHADOW)
    b = book()
    b.reserve("r1", ("a", "b"), specs, (500, 500), NOW, uncharged=0b10)  # the shadow did not fit
    s = b.settle("r1", NOW, tokens=300)
    assert s is not None and s.deltas == (-200, 0)


def test_requests_only_needs_no_reservation() -> None:
    b = book()
    assert b.reserve("r1", ("a",), (REQ,), (1,), NOW) == ()
    assert len(b) == 0 and b.settle("r1", NOW) is None


def test_entries_is_the_public_read_of_what_is_in_flight_oldest_first() -> None:
    """Metrics and the policy API read the book through `entries()` (no private table)."""
    b = book()
    b.reserve("r1", ("a", "b"), (TOK, SHADOW), (500, 500), NOW, uncharged=0b10, context="first")
    b.reserve("r2", IDS, SPECS, (1, 700, 700, 30_000, 1), NOW + 1)
    view = b.entries()
    assert list(view) == [
        (("a", "b"), (TOK, SHADOW), (500, 500), 0b10, NOW, NOW + 60.0, "first"),
        (IDS, SPECS, (1, 700, 700, 30_000, 1), 0, NOW + 1, NOW + 61.0, None),
    ]
    b.settle("r1", NOW + 2, tokens=10)
    assert [entry[0] for entry in view] == [IDS]  # a live view of the book
    assert len(view) == len(b) == 1


def test_expiry_releases_concurrency_keeps_estimates_and_is_fifo() -> None:
    b = book(ttl=10)
    b.reserve("r1", IDS, SPECS, (1, 700, 700, 30_000, 1), NOW)
    b.reserve("r2", IDS, SPECS, (1, 100, 100, 1_000, 1), NOW + 5)
    assert b.next_expiry() == NOW + 10
    assert b.expire(NOW + 9.99) == []
    expired = b.expire(NOW + 10)
    assert [s.request_id for s in expired] == ["r1"]
    assert expired[0].deltas == (0, 0, 0, 0, -1) and expired[0].expired
    assert b.settle("r1", NOW + 11, tokens=5) is None  # late usage changes nothing
    # reserve() expires a few due ones on the way
    out = b.reserve("r3", IDS, SPECS, (1, 1, 1, 1, 1), NOW + 20)
    assert [s.request_id for s in out] == ["r2"]
    assert b.stats()["expired"] == 2 and len(b) == 1


def test_the_book_is_bounded_the_oldest_expires_early() -> None:
    b = book(max_entries=3)
    for i in range(3):
        assert b.reserve(f"r{i}", ("c",), (CONC,), (1,), NOW + i) == ()
    out = b.reserve("r3", ("c",), (CONC,), (1,), NOW + 3)
    assert [(s.request_id, s.deltas, s.expired) for s in out] == [("r0", (-1,), True)]
    assert len(b) == 3 and b.evicted == 1 and "r0" not in b and "r3" in b


def test_a_repeated_request_id_expires_the_earlier_reservation() -> None:
    b = book()
    b.reserve("dup", ("c",), (CONC,), (1,), NOW)
    out = b.reserve("dup", ("c",), (CONC,), (1,), NOW + 1)
    assert [(s.request_id, s.deltas) for s in out] == [("dup", (-1,))]
    assert len(b) == 1 and b.replaced == 1


def test_expiry_never_scans_beyond_the_first_live_entry() -> None:
    b = ReservationBook(ttl=10, max_entries=10_000, expire_per_call=2)
    for i in range(1000):
        b.reserve(f"r{i}", ("c",), (CONC,), (1,), NOW)
    # ten calls at a due time expire two each: bounded work per call
    released = 0
    for i in range(10):
        released += len(b.reserve(f"n{i}", ("c",), (CONC,), (1,), NOW + 11))
    assert released == 20 and len(b) == 990


def test_invalid_configuration() -> None:
    with pytest.raises(ValueError):
        ReservationBook(ttl=0, max_entries=10)
    with pytest.raises(ValueError):
        ReservationBook(ttl=1, max_entries=0)


# -- with a store: the whole reserve / settle cycle ------------------------------------------------------


def test_refund_gives_capacity_back_and_extra_charge_delays_the_next_request() -> None:
    store = MemoryCounterStore()
    b = book()
    specs, ids = (TOK,), ("alice\x00tok",)
    r = store.acquire(ids, specs, (800,), NOW)
    assert r.allowed and r.statuses[0].remaining == 200
    b.reserve("r1", ids, specs, (800,), NOW, r.uncharged)
    assert not store.acquire(ids, specs, (800,), NOW).allowed
    apply_settlements(store, [b.settle("r1", NOW, tokens=100)], NOW)  # type: ignore[list-item]
    assert store.peek(ids, specs, NOW)[0].remaining == 900
    r = store.acquire(ids, specs, (800,), NOW)
    assert r.allowed
    b.reserve("r2", ids, specs, (800,), NOW, r.uncharged)
    # the real usage was larger than the estimate: charged now, over the limit, never retroactively
    apply_settlements(store, [b.settle("r2", NOW + 1, tokens=1200)], NOW + 1)  # type: ignore[list-item]
    status = store.peek(ids, specs, NOW + 1, (1,))[0]
    assert not status.allowed and status.remaining == 0
    assert status.retry_after == pytest.approx(1300 * 0.06 - 60 - 1 + 0.06)  # 1300 charged at 60 ms/token
    assert store.acquire(ids, specs, (1,), NOW + 1 + status.retry_after).allowed


def test_concurrency_is_released_at_settle_and_at_expiry() -> None:
    store = MemoryCounterStore()
    b = book(ttl=30)
    specs, ids = (CONC,), ("alice\x00conc",)
    for rid in ("a", "b"):
        r = store.acquire(ids, specs, (1,), NOW)
        assert r.allowed
        assert b.reserve(rid, ids, specs, (1,), NOW, r.uncharged) == ()
    denied = store.acquire(ids, specs, (1,), NOW)
    assert not denied.allowed and denied.statuses[0].retry_after == 1.0
    apply_settlements(store, [b.settle("a", NOW + 1, tokens=10)], NOW + 1)  # type: ignore[list-item]
    assert store.acquire(ids, specs, (1,), NOW + 1).allowed  # c takes a's slot (and is never settled)
    b.reserve("c", ids, specs, (1,), NOW + 1)
    assert not store.acquire(ids, specs, (1,), NOW + 2).allowed
    apply_settlements(store, b.expire(NOW + 31), NOW + 31)  # b and c expire: both slots come back
    assert len(store) == 0
    assert store.peek(ids, specs, NOW + 31)[0].remaining == 2


def test_a_denied_request_is_never_reserved_so_nothing_is_released_twice() -> None:
    store = MemoryCounterStore()
    specs, ids = (CONC, TOK), ("c", "t")
    assert store.acquire(ids, specs, (1, 2000), NOW).uncharged == 0b11


def test_track_remembers_a_context_without_windows() -> None:
    from nexus_authz.core.reservations import ReservationBook

    book = ReservationBook(ttl=10.0, max_entries=2)
    assert book.track("a", ("ctx-a",), 0.0) == ()
    assert book.context("a") == ("ctx-a",)
    book.track("b", "ctx-b", 1.0)
    (evicted,) = book.track("c", "ctx-c", 2.0)  # full: the oldest goes, with nothing to give back
    assert evicted.request_id == "a" and evicted.deltas == () and evicted.expired
    settled = book.settle("b", 3.0, tokens=5)
    assert settled is not None and settled.context == "ctx-b" and settled.deltas == ()
    assert [s.request_id for s in book.expire(20.0)] == ["c"]


def test_release_frees_the_slot_once_and_keeps_the_estimate() -> None:
    """Issue 18 item 3: the proxy releases a concurrency slot as the response ends; the usage that
    arrives later settles the tokens and must not release the slot a second time."""
    from nexus_authz.core.limits import Kind, make_limit

    conc = make_limit(Kind.CONCURRENCY, 1, None, name="concurrent")
    tokens = make_limit(Kind.TOKENS, 1000, "minute", name="tokens")
    book = ReservationBook(ttl=60.0, max_entries=10)
    book.reserve("r1", ("c", "t"), (conc, tokens), (1, 500), 0.0)
    assert book.holds_slot((conc, tokens), 0) and not book.holds_slot((tokens,), 0)
    released = book.release("r1")
    assert released is not None and released.deltas == (-1, 0)
    assert book.release("r1") is None and book.release("unknown") is None
    settled = book.settle("r1", 1.0, tokens=100)
    assert settled is not None and settled.deltas == (0, -400)
