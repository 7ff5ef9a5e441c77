"""The compiled lane's read of the decision clock (native/_fast.pyx `_now`): with the production clock
(time.time, Decider's default) it reads CLOCK_REALTIME itself and makes the float time.time() makes;
any other clock (the tests' fake ones) is called as before."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest

from nexus_authz import native
from nexus_authz.adapters import http_authz
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from tests.adapters.test_http_fastpath import KEYS, PLANS, _body, _check, _compiled_or_skip
from tests.fuzz._support import FakeTransport, no_bugs_logged
from tests.helpers import write_config


def _cpython_seconds(ns: int) -> float:
    """_PyTime_AsSecondsDouble (Python/pytime.c), which time.time() applies to its nanoseconds."""
    if ns % 10**9 == 0:
        return float(ns // 10**9)
    return float(ns) / 1e9


def test_the_nanoseconds_become_time_times_float() -> None:
    _compiled_or_skip()
    wall_seconds = native.fast.wall_seconds  # type: ignore[union-attr]
    rng = random.Random(15)
    whole = [s * 10**9 for s in (0, 1, 1_750_000_000, 1_765_000_003, 4_000_000_000)]
    samples = whole + [rng.randrange(1_600_000_000 * 10**9, 2_000_000_000 * 10**9) for _ in range(20_000)]
    samples += [time.time_ns() for _ in range(100)]
    for ns in samples:
        assert wall_seconds(ns) == _cpython_seconds(ns), ns


def test_time_time_is_read_in_c_and_any_other_clock_is_called() -> None:
    _compiled_or_skip()
    wall_now = native.fast.wall_now  # type: ignore[union-attr]
    before = time.time()
    now = wall_now(time.time)
    after = time.time()
    assert type(now) is float and before <= now <= after
    calls: list[int] = []

    def fake() -> float:
        calls.append(1)
        return 7.25

    assert wall_now(fake) == 7.25 and calls == [1]
    with pytest.raises(ZeroDivisionError):
        wall_now(lambda: 1 / 0)


def test_an_engine_on_the_real_clock_charges_at_the_time_of_the_check(tmp_path: Path) -> None:
    """Through the compiled protocol, with Engine's default clock: the reservation and the known-keys note
    carry the check's time (not a stale or zero one)."""
    _compiled_or_skip()
    from nexus_authz.adapters.http_native import CompiledAuthzProtocol

    config = write_config(tmp_path, *KEYS, extra=PLANS)
    engine = Engine.from_settings(load_settings(str(config)))
    assert engine.decider.clock is time.time
    engine.load_first_keys()
    app = http_authz.HttpApp(engine, max_header_bytes=64 * 1024, max_body=1 << 20)

    async def drive() -> tuple[bytes, float, float]:
        protocol = CompiledAuthzProtocol(app)
        transport = FakeTransport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        before = time.time()
        protocol.data_received(_check(KEYS[0].secret, "rid-clock", _body("gpt-4o-mini", 16, 1, 3)))
        after = time.time()
        return bytes(transport.data), before, after

    with no_bugs_logged():
        answer, before, after = asyncio.run(drive())
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    entry = engine.book._entries["rid-clock"]
    charged_at = entry.charged_at if hasattr(entry, "charged_at") else entry[4]
    assert before <= charged_at <= after
    seen = list(engine.policy._known._seen.values())
    assert len(seen) == 1 and before <= seen[0] <= after
