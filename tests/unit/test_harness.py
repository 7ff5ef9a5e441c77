"""The benchmark harness's pure parts: statistics, response parsing, the schedule, /proc and tool parsing.

No load is generated here; one test drives a worker over a socketpair for five requests, to check what
it records, not how fast.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import harness  # type: ignore[import-not-found]  # noqa: E402
import loadgen  # type: ignore[import-not-found]  # noqa: E402

# --------------------------------------------------------------------------------------------------
# percentiles and summaries
# --------------------------------------------------------------------------------------------------


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [float(v) for v in range(1, 11)]
    assert harness.percentile(values, 0) == 1.0
    assert harness.percentile(values, 100) == 10.0
    assert harness.percentile(values, 50) == 5.5
    assert harness.percentile(values, 90) == pytest.approx(9.1)
    assert harness.percentile(reversed(values), 50) == 5.5  # input order does not matter
    assert harness.percentile([7.0], 99) == 7.0


def test_percentile_of_nothing_is_nan_and_p_is_checked() -> None:
    assert math.isnan(harness.percentile([], 50))
    with pytest.raises(ValueError):
        harness.percentile([1.0], 101)


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=200), st.floats(0, 100), st.floats(0, 100))
def test_percentile_is_monotone_and_bounded(values: list[float], p: float, q: float) -> None:
    lo, hi = sorted((p, q))
    a, b = harness.percentile(values, lo), harness.percentile(values, hi)
    assert min(values) <= a <= b <= max(values) or math.isclose(a, b)


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=200), st.floats(0, 100))
def test_percentile_matches_numpy_linear(values: list[float], p: float) -> None:
    np = pytest.importorskip("numpy")
    assert harness.percentile(values, p) == pytest.approx(float(np.percentile(values, p)), abs=1e-6)


def test_summarize_names_percentiles() -> None:
    s = harness.summarize([4.0, 1.0, 3.0, 2.0], percentiles=(50, 99.9))
    assert s == {"n": 4.0, "mean": 2.5, "min": 1.0, "p50": 2.5, "p99.9": pytest.approx(3.997), "max": 4.0}
    empty = harness.summarize([])
    assert empty["n"] == 0 and math.isnan(empty["p99"])


def test_print_table_is_markdown_with_numbers_right_aligned() -> None:
    rows = [{"name": "tcp", "p50": 171.26, "errors": 0}, {"name": "uds", "p50": 9.5, "errors": 12}]
    text = harness.print_table(rows, ["name", ("p50", "p50 µs"), "errors"], quiet=True)
    lines = text.splitlines()
    assert lines[0] == "| name | p50 µs | errors |"
    assert lines[1] == "|------|-------:|-------:|"
    assert lines[2] == "| tcp  |    171 |      0 |"
    assert lines[3] == "| uds  |   9.50 |     12 |"


def test_print_table_leaves_missing_cells_empty_and_shows_nan_as_dash() -> None:
    text = harness.print_table([{"a": 1}, {"b": math.nan}], quiet=True)
    assert text.splitlines()[2:] == ["| 1 |   |", "|   | - |"]


def test_plot_latency_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "lat.png"
    assert harness.plot_latency({"a": [float(v) for v in range(1, 2000)], "empty": []}, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# interleaving
# --------------------------------------------------------------------------------------------------


def test_interleave_runs_round_robin_and_takes_medians() -> None:
    calls: list[str] = []
    values = {"a": iter([3.0, 1.0, 2.0]), "b": iter([10, 30, 20])}

    def scenario(name: str):  # type: ignore[no-untyped-def]
        def run() -> dict[str, object]:
            calls.append(name)
            return {"v": next(values[name]), "label": f"{name}{len(calls)}", "maybe": math.nan}

        return run

    res = harness.interleave({"a": scenario("a"), "b": scenario("b")}, rounds=3, verbose=False)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert res.medians["a"]["v"] == 2.0 and res.medians["b"]["v"] == 20
    assert res.ranges["b"]["v"] == (10, 30)
    assert res.medians["a"]["label"] == "a5"  # non-numeric: the last round's value
    assert math.isnan(res.medians["a"]["maybe"])
    assert [r["scenario"] for r in res.rows()] == ["a", "b"]


def test_interleave_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError):
        harness.interleave([("a", dict), ("a", dict)], rounds=1, verbose=False)


# --------------------------------------------------------------------------------------------------
# the schedule: offsets, even spacing, request counts, variants
# --------------------------------------------------------------------------------------------------


def test_four_workers_at_1000_per_second_are_offset_by_one_millisecond() -> None:
    assert harness.worker_offsets_us(1000, 4) == [0.0, 1000.0, 2000.0, 3000.0]


@given(st.integers(1, 8), st.sampled_from([100.0, 333.0, 1000.0, 2500.0, 10_000.0]))
def test_workers_together_send_evenly_spaced(procs: int, rate: float) -> None:
    sends = sorted(
        loadgen.schedule_ns(loadgen.global_index(k, i, procs), rate, start_ns=10**12)
        for k in range(procs)
        for i in range(50)
    )
    gaps = {b - a for a, b in zip(sends, sends[1:], strict=False)}
    period = 1e9 / rate
    assert all(abs(g - period) <= 1 for g in gaps)  # integer ns rounding only
    per_worker = [
        loadgen.schedule_ns(loadgen.global_index(0, i + 1, procs), rate)
        - loadgen.schedule_ns(loadgen.global_index(0, i, procs), rate)
        for i in range(10)
    ]
    assert all(abs(g - procs * period) <= 1 for g in per_worker)


def test_request_counts_split_warmup_from_the_measured_window() -> None:
    assert loadgen.request_counts(1000, 5) == (0, 5000)
    assert loadgen.request_counts(1000, 5, warmup=0.5) == (500, 5500)


def test_variants_are_used_round_robin_across_workers() -> None:
    procs, n = 4, 10
    used = [loadgen.variant_for(loadgen.global_index(k, i, procs), n) for i in range(5) for k in range(procs)]
    assert used == [g % n for g in range(20)]


# --------------------------------------------------------------------------------------------------
# targets and requests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", loadgen.Target("127.0.0.1", 8080)),
        ("http://127.0.0.1:9000/v1/x", loadgen.Target("127.0.0.1", 9000)),
        (("localhost", 81), loadgen.Target("localhost", 81)),
        ("unix:/run/nexus.sock", loadgen.Target(unix_path="/run/nexus.sock")),
        ("/tmp/a.sock", loadgen.Target(unix_path="/tmp/a.sock")),
        ("[::1]:80", loadgen.Target("::1", 80)),
    ],
)
def test_parse_target(text: str | tuple[str, int], expected: loadgen.Target) -> None:
    assert loadgen.parse_target(text) == expected


def test_parse_target_rejects_a_bare_host() -> None:
    with pytest.raises(ValueError):
        loadgen.parse_target("localhost")


def test_build_request_precomputes_a_keep_alive_request() -> None:
    req = loadgen.build_request(
        "POST", "/v1/chat", headers={"authorization": "Bearer k"}, body=b'{"model":"m"}', host="h"
    )
    assert req == (
        b"POST /v1/chat HTTP/1.1\r\nhost: h\r\nauthorization: Bearer k\r\ncontent-length: 13\r\n\r\n"
        b'{"model":"m"}'
    )
    assert loadgen.build_request() == b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n"


# --------------------------------------------------------------------------------------------------
# minimal response parsing
# --------------------------------------------------------------------------------------------------

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
CHUNKED_TRAILERS = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nx-usage: 7\r\n\r\n"


@pytest.mark.parametrize("raw", [OK, CHUNKED, CHUNKED_TRAILERS])
def test_a_response_is_complete_only_with_its_last_byte(raw: bytes) -> None:
    for cut in range(len(raw)):
        assert loadgen.parse_response(raw[:cut]) is None, cut
    assert loadgen.parse_response(raw) == loadgen.ParsedResponse(200, len(raw), True)


def test_status_and_keep_alive_rules() -> None:
    close = b"HTTP/1.1 429 Too Many Requests\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    assert loadgen.parse_response(close) == loadgen.ParsedResponse(429, len(close), False)
    http10 = b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n"
    assert loadgen.parse_response(http10) == loadgen.ParsedResponse(200, len(http10), False)
    http10_ka = b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\ncontent-length: 0\r\n\r\n"
    assert loadgen.parse_response(http10_ka) == loadgen.ParsedResponse(200, len(http10_ka), True)
    no_body = b"HTTP/1.1 204 No Content\r\n\r\n"
    assert loadgen.parse_response(no_body) == loadgen.ParsedResponse(204, len(no_body), True)


def test_interim_responses_are_skipped() -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\n" + OK
    assert loadgen.parse_response(raw) == loadgen.ParsedResponse(200, len(raw), True)


def test_a_body_without_length_ends_when_the_peer_closes() -> None:
    raw = b"HTTP/1.1 200 OK\r\n\r\npartial body"
    assert loadgen.parse_response(raw) is None
    assert loadgen.parse_response(raw, eof=True) == loadgen.ParsedResponse(200, len(raw), False)


def test_back_to_back_responses_parse_from_an_offset() -> None:
    buf = OK + CHUNKED
    first = loadgen.parse_response(buf)
    assert first is not None and first.end == len(OK)
    assert loadgen.parse_response(buf, first.end) == loadgen.ParsedResponse(200, len(buf), True)


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_garbage_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(loadgen.ProtocolError):
        loadgen.parse_response(raw)


def test_close_inside_the_head_is_a_protocol_error() -> None:
    with pytest.raises(loadgen.ProtocolError):
        loadgen.parse_response(b"HTTP/1.1 200 OK\r\ncontent-le", eof=True)


@given(st.binary(max_size=300))
def test_parse_response_never_fails_unexpectedly(raw: bytes) -> None:
    try:
        res = loadgen.parse_response(raw, eof=True)
    except loadgen.ProtocolError:
        return
    assert res is None or 0 < res.end <= max(len(raw), res.end)


# --------------------------------------------------------------------------------------------------
# the worker loop over a socketpair (five requests, no load)
# --------------------------------------------------------------------------------------------------


def test_worker_records_latency_status_and_connection_close() -> None:
    client, server = socket.socketpair()
    answers = [OK, CHUNKED, b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"]
    seen: list[bytes] = []

    def serve() -> None:
        with server:
            for answer in answers:
                seen.append(server.recv(4096))
                server.sendall(answer)

    thread = threading.Thread(target=serve)
    thread.start()
    reqs = [loadgen.build_request("GET", f"/{i}") for i in range(2)]
    cfg = {
        "target": "unix:/nonexistent/nexus-test.sock",  # reconnects after the close fail
        "rate": 1000.0,
        "duration": 0.005,
        "timeout": 1.0,
        "requests": reqs,
        "spin_us": 0,
    }
    res = loadgen.run_worker(cfg, start_ns=time.monotonic_ns(), sock=client)
    thread.join(timeout=5)
    assert seen == [reqs[0], reqs[1], reqs[0]]
    assert res["statuses"] == {200: 2, 503: 1}
    assert res["completed"] == 3 and res["sent"] == 3
    assert res["errors"] == {"FileNotFoundError": 2}
    assert len(res["latencies_ns"]) == 3 * 8
    assert res["unsent"] == 0


# --------------------------------------------------------------------------------------------------
# /proc and tool output parsing
# --------------------------------------------------------------------------------------------------


def test_parse_proc_stat_survives_odd_command_names() -> None:
    fields = ["S", "1", "1", "1", "0", "-1", "4194560", "10", "0", "0", "0", "1234", "567"]
    fields += ["0", "0", "20", "0", "7", "0", "100"]
    text = "4242 (my (odd) proc) " + " ".join(fields) + "\n"
    assert harness.parse_proc_stat(text) == (1234, 567, 7)


def test_parse_proc_status_reads_memory_in_bytes() -> None:
    text = "Name:\tpython\nVmHWM:\t   2048 kB\nVmRSS:\t   1024 kB\nThreads:\t3\n"
    assert harness.parse_proc_status(text) == {"VmHWM": 2048 * 1024, "VmRSS": 1024 * 1024}


def test_proc_stats_samples_this_process() -> None:
    stats = harness.ProcStats(os.getpid())
    with stats:
        sum(range(1000))
    assert stats.delta is not None
    assert stats.delta.rss_after > 0 and stats.delta.threads >= 1
    assert stats.delta.cpu_s >= 0 and stats.delta.sched_cpu_s >= 0
    assert stats.delta.cpu_us_per_request(0) != stats.delta.cpu_us_per_request(0)  # nan
    with pytest.raises(RuntimeError):
        harness.ProcStats(os.getpid()).stop()


def test_proc_delta_per_request() -> None:
    d = harness.ProcDelta(
        wall_s=5, cpu_s=0.2, sched_cpu_s=0.21, rss_before=0, rss_after=0, hwm_after=0, threads=1
    )
    assert d.cpu_us_per_request(5000) == pytest.approx(40.0)
    assert d.sched_cpu_us_per_request(5000) == pytest.approx(42.0)
    assert d.cpu_fraction == pytest.approx(0.04)


WRK = """Running 3s test @ http://127.0.0.1:45213/
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   342.82us  727.18us   8.22ms   92.24%
    Req/Sec    46.46k    11.72k   68.13k    57.50%
  Latency Distribution
     50%  140.00us
     75%  237.00us
     90%  612.00us
     99%    3.76ms
  184704 requests in 2.00s, 11.63MB read
  Non-2xx or 3xx responses: 17
  Socket errors: connect 0, read 2, write 1, timeout 3
Requests/sec:  92278.13
Transfer/sec:      5.81MB
"""

H2LOAD = """finished in 1.00s, 25266.00 req/s, 1.08MB/s
requests: 25266 total, 25268 started, 25266 done, 25200 succeeded, 66 failed, 1 errored, 2 timeout
status codes: 25200 2xx, 0 3xx, 66 4xx, 0 5xx
traffic: 1.08MB (1136970) total, 370.14KB (379020) headers (space savings 0.00%), 0B (0) data
                     min         max         mean         sd        +/- sd
time for request:       15us      2.29ms        78us        32us    95.19%
time for connect:        9us        24us        17us        10us   100.00%
"""


def test_parse_wrk_output() -> None:
    r = harness.parse_wrk_output(WRK)
    assert (r.tool, r.rps, r.requests, r.errors, r.non_2xx) == ("wrk", 92278.13, 184704, 6, 17)
    assert r.p50_us == pytest.approx(140.0) and r.p99_us == pytest.approx(3760.0)


def test_parse_h2load_output() -> None:
    r = harness.parse_h2load_output(H2LOAD)
    assert (r.tool, r.rps, r.requests, r.errors, r.non_2xx) == ("h2load", 25266.0, 25266, 3, 66)
    assert r.p50_us == pytest.approx(78.0) and math.isnan(r.p99_us)


def test_worker_counts_a_silent_server_as_timeouts() -> None:
    client, server = socket.socketpair()
    loadgen._apply_kernel_timeouts(client, 0.05)
    cfg = {
        "target": "unix:/nonexistent/nexus-test.sock",
        "rate": 1000.0,
        "duration": 0.002,
        "requests": [b"x"],
    }
    with server:
        res = loadgen.run_worker({**cfg, "timeout": 0.05, "spin_us": 0}, time.monotonic_ns(), sock=client)
    assert res["errors"] == {"timeout": 1, "FileNotFoundError": 1}
    assert res["completed"] == 0 and res["sent"] == 1


@pytest.mark.parametrize(("procs", "worker", "unsent"), [(1, 0, 5), (2, 0, 3), (2, 1, 2)])
def test_requests_past_the_hard_deadline_are_counted_unsent(procs: int, worker: int, unsent: int) -> None:
    cfg = {
        "target": "unix:/nonexistent/nexus-test.sock",
        "rate": 1000.0,
        "duration": 0.005,
        "warmup": 0.002,  # requests 0 and 1 are warm-up and not counted
        "drain": 0.0,
        "procs": procs,
        "worker": worker,
        "requests": [b"x"],
    }
    res = loadgen.run_worker(cfg, time.monotonic_ns() - 10**10)  # the run "ended" 10 s ago
    assert res["unsent"] == unsent
    assert res["sent_total"] == 0 and res["errors"] == {}
