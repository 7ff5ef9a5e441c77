"""core/settled.py: the record of request ids accounted lately (the reservation book's duplicate check)
remembers at least the last `size` ids, holds fewer than `size + 2 * chunk`, and no single record frees
more than one chunk (the OrderedDict it replaces rebuilt its whole table now and then: milliseconds of
the event loop)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus_authz.core.reservations import ReservationBook
from nexus_authz.core.settled import ChunkedFifo, SettledIds


@given(
    size=st.integers(min_value=1, max_value=40),
    chunk=st.integers(min_value=1, max_value=16),
    ids=st.lists(st.integers(min_value=0, max_value=60), max_size=300),
)
def test_the_last_size_ids_are_remembered_and_the_record_stays_bounded(
    size: int, chunk: int, ids: list[int]
) -> None:
    record = SettledIds(size, chunk)
    step = min(chunk, size)
    recorded: list[str] = []
    for i in ids:
        before = len(record)
        record.add(f"r{i}")
        recorded.append(f"r{i}")
        assert before - len(record) <= step  # at most one chunk goes at a time
        assert len(record) < size + 2 * step  # size + step when step divides size
        assert all(r in record for r in recorded[-size:])
    assert "never" not in record


def test_old_ids_are_forgotten_a_chunk_at_a_time() -> None:
    record = SettledIds(8, 4)
    for i in range(16):
        record.add(f"r{i}")
    # chunks r0-3, r4-7, r8-11 full, r12-15 newest: r0-3 went when r12 opened a chunk
    assert [f"r{i}" in record for i in range(16)] == [False] * 4 + [True] * 12
    assert len(record) == 12
    record.add("r16")  # a new chunk: r4-7 go (r8-15 hold the 8)
    assert "r4" not in record and "r8" in record and len(record) == 9


def test_a_cleared_record_holds_nothing_and_records_again() -> None:
    record = ChunkedFifo(4, 2)
    for i in range(7):
        record.put(f"r{i}", i)
    record.clear()
    assert len(record) == 0 and list(record.items()) == [] and "r6" not in record
    record.put("a", 1)
    assert list(record.items()) == [("a", 1)] and len(record) == 1


def test_a_book_with_no_record_remembers_nothing() -> None:
    book = ReservationBook(ttl=60, max_entries=10, settled_max=0)
    book.track("a", object(), 0.0)
    assert book.settle("a", 1.0) is not None
    assert not book.was_settled("a") and book.stats()["settled_ids"] == 0


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        SettledIds(-1)
    with pytest.raises(ValueError):
        SettledIds(4, 0)


@given(
    size=st.integers(min_value=1, max_value=20),
    chunk=st.integers(min_value=1, max_value=8),
    ops=st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=30)), max_size=200),
)
def test_a_chunked_record_keeps_one_value_a_key_and_the_last_size_puts(
    size: int, chunk: int, ops: list[tuple[bool, int]]
) -> None:
    """ChunkedFifo (the book's retired contexts) against a dict of the keys put and not popped: a popped key
    is gone, a key put again has its last value, and every key among the last `size` puts is there."""
    record = ChunkedFifo(size, chunk)
    live: dict[str, int] = {}
    puts: list[str] = []
    for n, (put, i) in enumerate(ops):
        key = f"r{i}"
        if put:
            record.put(key, n)
            live[key] = n
            puts.append(key)
        else:
            recent_put = key in puts[-size:]
            got, expected = record.pop(key, "none"), live.pop(key, "none")
            # the value put last, or nothing: a key older than the last `size` puts may have gone
            assert got == expected or (got == "none" and not recent_put)
            assert key not in record
        assert len(record) == len(dict(record.items()))  # one entry a key
        for k, v in record.items():
            assert live.get(k) == v  # nothing stale, nothing popped
        recent = [k for k in puts[-size:] if k in live]
        assert all(k in record for k in recent)
