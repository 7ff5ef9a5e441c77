"""The compiled lane's reservation entry and the book's table (nexus_authz/native/_reservation.pyx) against
the book's 7-tuple and OrderedDict (core/reservations.py): the entry reads as the tuple (items, unpacking,
==, hash, pickle); the table does what the OrderedDict does on random sequences of its operations; and a
book with both settles, releases, expires, evicts, retires and reports exactly as the pure book, on random
sequences of those operations (hypothesis)."""

from __future__ import annotations

import os
import pickle
import sys
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_authz import native
from nexus_authz.core import reservations
from nexus_authz.core.limits import make_limit
from nexus_authz.core.model import InFlight
from nexus_authz.core.reservations import ReservationBook
from nexus_authz.metrics import _tally


@pytest.fixture(scope="module")
def compiled() -> Any:
    if native.reservation is None:
        if os.environ.get(native.PURE_ENV, "") not in ("", "0"):
            pytest.skip("NEXUS_AUTHZ_PURE is set: the compiled reservation entry is not loaded")
        pytest.fail(
            f"the compiled reservation entry did not build or load ({native.WHY_PURE}): pip install -e ."
        )
    return native.reservation.Reservation


REQ = make_limit("requests", 60, "minute")
TOK = make_limit("tokens", 1000, "minute")
USD = make_limit("usd", 1_000_000, "day")
CONC = make_limit("concurrent", 2)
ALL = (REQ, TOK, USD, CONC)

times = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False)
contexts = st.none() | st.builds(
    InFlight,
    st.text(max_size=8),
    st.text(max_size=4),
    st.none() | st.text(max_size=8),
    st.integers(0, 10**6),
    st.none() | st.binary(max_size=16),
)


@st.composite
def entries(draw: st.DrawFn) -> tuple[Any, ...]:
    specs = tuple(draw(st.lists(st.sampled_from(ALL), max_size=4)))
    ids = tuple(f"k\x00{i}" for i in range(len(specs)))
    costs = tuple(draw(st.integers(0, 10**9)) for _ in specs)
    at = draw(times)
    return (ids, specs, costs, draw(st.integers(0, 15)), at, at + draw(times), draw(contexts))


@settings(max_examples=300, deadline=None)
@given(entry=entries())
def test_a_reservation_reads_as_its_tuple(compiled: Any, entry: tuple[Any, ...]) -> None:
    r = compiled(*entry)
    assert len(r) == 7 and tuple(r) == entry and list(r) == list(entry)
    assert [r[i] for i in range(-7, 7)] == [entry[i] for i in range(-7, 7)]
    assert r[1:5] == entry[1:5] and r[::-1] == entry[::-1]
    assert r[4].hex() == entry[4].hex() and r[5].hex() == entry[5].hex()  # the same floats, bit for bit
    assert type(r[6]) is type(entry[6]) and r.context == entry[6]
    assert r == entry and entry == r and (r != entry) is False and r == compiled(*entry)
    assert hash(r) == hash(entry) and repr(r) == f"Reservation{entry!r}"
    assert pickle.loads(pickle.dumps(r)) == entry
    other = entry[:3] + (entry[3] + 1,) + entry[4:]
    assert r != other and other != r and r != compiled(*other)
    with pytest.raises(IndexError):
        r[7]
    a, b, c, d, e, f, g = r
    assert (a, b, c, d, e, f, g) == entry
    del a, b, c, d, e, f, g
    for made in (r.context, r[6], tuple(r)[6]):  # each made once, owned by its reader alone
        assert made is None or sys.getrefcount(made) == 3  # `made`, the loop's tuple, the call's argument


def test_a_context_other_than_an_inflight_is_refused(compiled: Any) -> None:
    with pytest.raises(TypeError, match="InFlight or None"):
        compiled((), (), (), 0, 1.0, 2.0, "ctx")


ops = st.lists(
    st.tuples(
        st.sampled_from(["reserve"] * 4 + ["track", "settle", "release", "expire", "context", "retired"]),
        st.integers(0, 5),  # the request id
        st.lists(st.sampled_from(ALL), min_size=1, max_size=3),
        st.integers(0, 3),  # uncharged
        st.floats(0, 30),  # time step
        contexts,
    ),
    max_size=40,
)


def _run(calls: list[Any], wrap: Any, table: Any) -> list[Any]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reservations, "new_entries", table)
        book = ReservationBook(ttl=20.0, max_entries=4, expire_per_call=2, retired_max=3, settled_max=3)
    assert type(book._entries) is table
    now = 1_700_000_000.0
    trace: list[Any] = []

    def lane(rid: str) -> None:  # what the compiled lane records: the same entry as one object
        if wrap is not None and rid in book._entries:
            book._entries[rid] = wrap(*book._entries[rid])

    for op, n, specs, uncharged, step, context in calls:
        now += step
        rid = f"r{n}"
        if op == "reserve":
            costs = tuple(range(1, len(specs) + 1))
            trace.append(
                book.reserve(rid, [f"c{i}" for i in range(len(specs))], specs, costs, now, uncharged, context)
            )
            lane(rid)
        elif op == "track":
            trace.append(book.track(rid, context, now))
            lane(rid)
        elif op == "settle":
            trace.append(book.settle(rid, now, tokens=n * 7, usd_micros=n, at_least_reserved=n % 2 == 0))
        elif op == "release":
            trace.append(book.release(rid))
        elif op == "expire":
            trace.append(book.expire(now, n))
        elif op == "context":
            trace.append((book.context(rid), book.was_settled(rid), rid in book, len(book)))
        else:
            trace.append(book.retired(rid))
        tally: dict[str, int] = {}
        _tally(book.entries(), tally)
        trace.append((book.stats(), book.next_expiry(), list(book._entries.items()), tally))
        trace.append(list(book._retired.items()))
    return trace


@settings(max_examples=300, deadline=None)
@given(calls=ops)
def test_a_book_of_reservations_is_a_book_of_tuples(compiled: Any, calls: list[Any]) -> None:
    entries = native.reservation.Entries
    reference = _run(calls, None, OrderedDict)
    assert _run(calls, compiled, entries) == reference  # the lane's entries in the compiled table
    assert _run(calls, None, entries) == reference  # the pure path's tuples in it
    assert _run(calls, compiled, OrderedDict) == reference


def test_the_compiled_table_is_installed_when_the_modules_load(compiled: Any) -> None:
    assert reservations.new_entries is native.reservation.Entries
    assert type(ReservationBook(ttl=1.0, max_entries=1)._entries) is native.reservation.Entries


table_ops = st.lists(
    st.tuples(
        st.sampled_from(["set"] * 4 + ["set-same", "del", "pop", "pop-default", "popitem", "get", "in"]),
        st.integers(0, 6),
        st.booleans(),
        st.integers(0, 3),
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(calls=table_ops)
def test_the_table_does_what_the_ordered_dict_does(compiled: Any, calls: list[Any]) -> None:
    """Entries against OrderedDict: the same results, errors and order (keys, values, items, iteration) after
    every operation, with Reservation values (their own node) and others (a link), shared values too."""

    def run(table: Any) -> list[Any]:
        shared = [compiled((), (), (), i, float(i), float(i), None) for i in range(4)]
        trace: list[Any] = []
        for op, n, last, v in calls:
            key = f"r{n}"
            value: Any = shared[v] if last else (key, v)
            try:
                if op == "set":
                    table[key] = value
                    trace.append(None)
                elif op == "set-same":
                    if key in table:
                        table[key] = table[key]
                    trace.append(None)
                elif op == "del":
                    del table[key]
                    trace.append(None)
                elif op == "pop":
                    trace.append(table.pop(key))
                elif op == "pop-default":
                    trace.append(table.pop(key, "none"))
                elif op == "popitem":
                    trace.append(table.popitem(last=last))
                elif op == "get":
                    trace.append((table.get(key), table.get(key, "none")))
                else:
                    trace.append((key in table, len(table), bool(table)))
            except KeyError as exc:
                trace.append(("KeyError", type(exc)))
            values = table.values()
            trace.append((list(table), list(table.keys()), list(values), list(table.items()), len(values)))
            trace.append([v is shared[v[3]] for v in table.values() if type(v) is compiled])
        return trace

    assert run(native.reservation.Entries()) == run(OrderedDict())


def test_the_table_refuses_a_change_during_iteration(compiled: Any) -> None:
    table = native.reservation.Entries()
    for key in "abc":
        table[key] = compiled((), (), (), 0, 1.0, 2.0, None)
    for change in (lambda: table.pop("b"), lambda: table.__setitem__("d", 1)):
        view = iter(table.values())
        next(view)
        change()
        with pytest.raises(RuntimeError):
            next(view)
    assert list(table) == ["a", "c", "d"]
    table.clear()
    assert list(table.items()) == [] and len(table) == 0 and table.get("a") is None


def test_the_table_holds_nothing_once_gone(compiled: Any) -> None:
    """Whichever way an entry leaves (taken, the table cleared or dropped), the table keeps no reference to
    it or its request id, and a Reservation out of one table is its own node in the next."""
    values = [compiled((), (), (), i, 1.0, 2.0, None) for i in range(3)]
    keys = [f"request-{i}" for i in range(3)]
    before = [sys.getrefcount(x) for x in values + keys]
    for leave in ("take", "clear", "drop"):
        table = native.reservation.Entries()
        for key, value in zip(keys, values, strict=True):
            table[key] = value
            table[key] = (key,)  # a link in its place, then the Reservation again
            table[key] = value
        if leave == "take":
            table.popitem(last=False)
            table.pop(keys[1])
            del table[keys[2]]
        elif leave == "clear":
            table.clear()
        del table, key, value
        assert [sys.getrefcount(x) for x in values + keys] == before, leave
