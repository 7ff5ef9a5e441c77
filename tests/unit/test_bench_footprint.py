"""benchmarks/bench_footprint.py's reading of callgrind's output, and its answer without valgrind.

The measurement itself runs under valgrind (1-2 minutes): not here. The file below is in callgrind's
format as valgrind 3.x writes it with --cache-sim=yes (name compression, relative positions, a call's
inclusive cost after `calls=`, trailing zero events left out), small enough to count by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_footprint as bf  # type: ignore[import-not-found]  # noqa: E402

CALLGRIND = """\
# callgrind format
version: 1
creator: callgrind-3.22.0
positions: line
events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw
summary: 1000 0 0 0 0 0 0 0 0

ob=(1) /x/nexus_authz/native/_fast.cpython-311-x86_64-linux-gnu.so
fl=(1) /x/_fast.c
fn=(1) __pyx_f_check
10 100 10 5 4 2 1 4 2 1
+2 50 0 0 2 0 0 2
cob=(2) /usr/lib/libpython3.11.so.1.0
cfl=(2) Objects/dictobject.c
cfn=(2) PyDict_GetItem
calls=3 40
* 900 90 9 9 9 9 9 9 9
fi=(3) /x/_fast.pyx
-1 10 0 0 1

ob=(2)
fl=(2)
fn=(2)
40 300 30 3 3 3 0 3 3
ob=(1)
fl=(1)
fn=(1)
20 20 0 0 0 0 0 1
"""


@pytest.fixture
def out(tmp_path: Path) -> str:
    path = tmp_path / "callgrind.out"
    path.write_text(CALLGRIND)
    return str(path)


def test_self_costs_per_function(out: str) -> None:
    events, costs = bf.parse(out)
    assert events == ["Ir", "Dr", "Dw", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw"]
    fast = ("/x/nexus_authz/native/_fast.cpython-311-x86_64-linux-gnu.so", "__pyx_f_check")
    dicts = ("/usr/lib/libpython3.11.so.1.0", "PyDict_GetItem")
    assert set(costs) == {fast, dicts}
    # the call's inclusive line (900 ...) is the callee's, not counted; the inlined line (fi=) is
    # the caller's; ob=(1) / fn=(1) after the other function name it again by its id
    assert costs[fast] == [180, 10, 5, 7, 2, 1, 7, 2, 1]
    assert costs[dicts] == [300, 30, 3, 3, 3, 0, 3, 3, 0]


def test_report_per_check(out: str) -> None:
    text = bf.report([out], n=2, top=5)
    first = text.splitlines()[0]
    # 480 instructions / 2; cold lines: code (7 + 3) / 2, data read (2 + 3) / 2, written 1 / 2
    assert "240 instructions" in first
    assert "cold lines 8 (0 KB): code 5, data read 2, data written 0" in first
    assert "| _fast | 5.0 | 3.5 | 1.0 | 0.5 | 90 |" in text
    assert "| libpython | 3.0 | 1.5 | 1.5 | 0.0 | 150 |" in text
    assert "| __pyx_f_check (_fast) | 5.0 |" in text


def test_not_a_callgrind_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.out"
    path.write_text("hello\n")
    assert bf.main(["--file", str(path)]) == 2
    assert "not a callgrind output file" in capsys.readouterr().err


def test_without_valgrind(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bf.shutil, "which", lambda name: None)
    assert bf.main([]) == 2
    err = capsys.readouterr().err
    assert "valgrind is not installed" in err
    assert "Traceback" not in err


def test_parts_add_up(out: str) -> None:
    # a dump in the middle of a run (callgrind_control -d) leaves two parts: their costs add up
    two = bf.report([out, out], n=4, top=5).splitlines()
    one = bf.report([out], n=2, top=5).splitlines()
    assert two[0].replace("(4 checks", "(2 checks") == one[0]
    assert two[1:] == one[1:]


def test_the_warm_up_parts_are_dropped(tmp_path: Path) -> None:
    """The parts dumped before gc.freeze() (the warm-up: callgrind's --dump-before=gc_freeze, the last
    one the child's own) are not measured; a part dumped later from elsewhere and the final file are,
    in their order (.10 after .9)."""
    out = tmp_path / "callgrind.out"
    triggers = {
        1: "--dump-before=gc_freeze",
        2: "Client Request",
        3: "--dump-before=gc_freeze",
        9: "Client Request",
        10: "Client Request",
    }
    for i, trigger in triggers.items():
        (tmp_path / f"callgrind.out.{i}").write_text(f"# callgrind format\ndesc: Trigger: {trigger}\n")
    out.write_text("# callgrind format\ndesc: Trigger: Program termination\n")
    assert bf.measured_parts(str(out)) == [
        str(tmp_path / "callgrind.out.9"),
        str(tmp_path / "callgrind.out.10"),
        str(out),
    ]
    (tmp_path / "callgrind.out.11").write_text("# callgrind format\ndesc: Trigger: --dump-before=gc_freeze\n")
    assert bf.measured_parts(str(out)) == [str(out)]
