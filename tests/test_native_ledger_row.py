"""native/_account.pyx LedgerRow, the compiled path's ledger row (stores/ledger/aggregate.make_row): it
reads and writes as the list row of the pure path does, whatever is written into it (ints on either side
of the C range it keeps, non-ints a caller passed by mistake), and the compiled settlement's C sums agree
with a list's."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_authz import native
from nexus_authz.stores.ledger import aggregate

pytestmark = pytest.mark.skipif(native.account is None, reason="the compiled extension is not loaded")

VALUES = st.one_of(
    st.integers(-5, 300),
    st.sampled_from([2**53 - 1, 2**53, 2**62 - 1, 2**62, -(2**62) + 1, -(2**62), 2**63, 2**70, -(2**64)]),
    st.integers(),
    st.sampled_from(["x", 1.5, None, True]),
)
INDEX = st.integers(-9, 9)
OPS = st.one_of(
    st.tuples(st.just("set"), INDEX, VALUES),
    st.tuples(st.just("add"), INDEX, st.one_of(st.integers(0, 2**53 - 1), st.sampled_from([2**62, 2**53]))),
    st.tuples(st.just("get"), INDEX, st.none()),
    st.tuples(st.just("slice"), st.integers(-9, 9), st.integers(-9, 9)),
)


def _apply(row: Any, op: tuple[Any, ...]) -> Any:
    kind, a, b = op
    try:
        if kind == "set":
            row[a] = b
        elif kind == "add":
            row[a] += b
        elif kind == "get":
            return ("ok", row[a])
        else:
            return ("ok", row[a:b])
    except Exception as exc:  # the same exception class as the list's
        return ("raised", type(exc))
    return ("ok", None)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=7, max_size=7), st.lists(OPS, max_size=25))
def test_a_ledger_row_reads_and_writes_as_a_list(start: list[int], ops: list[tuple[Any, ...]]) -> None:
    assert native.account is not None
    row, reference = native.account.LedgerRow(*start), list(start)
    for op in ops:
        assert _apply(row, op) == _apply(reference, op), op
        assert row == reference and reference == row
        assert (row != reference) is False
        assert list(row) == reference and len(row) == 7 and repr(row) == repr(reference)
        assert [*row[: aggregate.N_SUMS]] == reference[: aggregate.N_SUMS]
    assert pickle.loads(pickle.dumps(row)) == reference
    assert row != [*reference, 0] and row != tuple(reference)


def test_a_ledger_row_keeps_seven_values() -> None:
    assert native.account is not None
    with pytest.raises(TypeError):
        native.account.LedgerRow(1, 2, 3)
    row = native.account.LedgerRow(1, 2, 3, 4, 5, 6, 7)
    with pytest.raises(ValueError):
        row[1:3] = [9]
    assert row == [1, 2, 3, 4, 5, 6, 7]
    row[1:3] = [8, 9]
    assert row == [1, 8, 9, 4, 5, 6, 7]
    with pytest.raises(TypeError):
        hash(row)


def test_the_compiled_path_makes_ledger_rows_and_the_pure_path_lists() -> None:
    table: aggregate.Table = {}
    key = ("k", "", "m", 0, "reported", "")
    assert aggregate.add_usage(table, key, 1, 0, 2, 0, 3, True)
    assert aggregate.add_usage(table, key, 2**62, 0, 2, 0, 3, True)  # past the C range: the list's sum
    assert table[key] == [2, 1 + 2**62, 0, 4, 0, 6, 2]
    assert isinstance(table[key], native.account.LedgerRow if native.account is not None else list)
