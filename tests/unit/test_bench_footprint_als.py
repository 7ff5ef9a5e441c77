"""benchmarks/bench_footprint_als.py's own tools on known inputs (no valgrind run): the messages it builds
(with the package's nexus_authz.tools.pgo_train.log_message, which the build's training uses too) are what
protobuf reads, and its reading of a callgrind output adds the parts and divides per entry."""

from __future__ import annotations

import sys
from pathlib import Path

from envoy.service.accesslog.v3 import als_pb2

from nexus_authz.tools import pgo_train

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_footprint_als as bf  # type: ignore[import-not-found]  # noqa: E402


def test_a_built_message_holds_the_entries_as_given() -> None:
    fixture = bf.REPO / "benchmarks" / "fixtures" / "envoy_als_message_batch.bin"
    recorded = als_pb2.StreamAccessLogsMessage.FromString(fixture.read_bytes())
    entries = [e.SerializeToString() for e in recorded.http_logs.log_entry] * 2  # over 16 KiB: 3-byte sizes
    parsed = als_pb2.StreamAccessLogsMessage.FromString(pgo_train.log_message(entries))
    assert list(parsed.http_logs.log_entry) == list(recorded.http_logs.log_entry) * 2
    assert [pgo_train._varint(n) for n in (0, 127, 128, 300)] == [b"\x00", b"\x7f", b"\x80\x01", b"\xac\x02"]


_PART = """# callgrind format
version: 1
positions: line
events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw
ob=(1) /lib/libpython3.11.so.1.0
fl=(1) x.c
fn=(1) lookup
3 100 0 0 0 0 0 4 6 2
fn=(2) caller
5 10 0 0 0 0 0 1 0 0
cob=(1)
cfn=(1)
calls=1 3
6 999 0 0 0 0 0 99 99 99
"""


def test_the_report_sums_the_parts_per_entry(tmp_path: Path) -> None:
    first, second = tmp_path / "out.1", tmp_path / "out"
    first.write_text(_PART)
    second.write_text(_PART.replace("3 100 0 0 0 0 0 4 6 2", "3 100 0 0 0 0 0 0 2 2"))
    text = bf.report([str(first), str(second)], entries=4, per=2, top=5)
    # self costs only (the call's inclusive line is the callee's): Ir 2*100 + 2*10 = 220 over 4 entries;
    # cold lines (4+6+2) + (0+2+2) + 2 * 1 = 18 over 4 entries
    assert text.splitlines()[0].startswith("per entry (4 entries, 2 a message")
    assert "55 instructions; cold lines 4.5 (0.3 KB): code 1.5, data read 2.0, data written 1.0" in text
    assert "| libpython | 4.50 | 1.50 | 2.00 | 1.00 | 55 |" in text
    assert "| lookup (libpython) | 4.00 |" in text
