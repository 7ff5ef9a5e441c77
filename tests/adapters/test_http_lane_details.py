"""Small pieces of the compiled lane (native/_fast.pyx) written in C for fewer cache lines per check: the
histograms' bisect on a C copy of their bounds, and the partial-body flag compared in place. Each must
answer as the Python it stands in for."""

from __future__ import annotations

import bisect
import math
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from nexus_authz import latency, native
from tests.adapters.test_http_fastpath import (
    KEYS,
    _body,
    _compiled_or_skip,
    same,
)

if native.http1 is not None:
    from nexus_authz.adapters.http_native import CompiledAuthzProtocol


def test_the_bisect_is_bisect_left_on_every_kind_of_bounds() -> None:
    _compiled_or_skip()
    bisect_bounds = native.fast.bisect_bounds  # type: ignore[union-attr]
    rng = random.Random(15)
    tuples: list[Any] = [latency.CHECK_BUCKETS, latency.BUSY_BUCKETS, (0.5,), ()]
    tuples += [tuple(sorted(rng.uniform(0, 10) for _ in range(rng.randrange(1, 33)))) for _ in range(6)]
    tuples += [tuple(float(i) for i in range(40))]  # longer than the C copy holds
    tuples += [(1, 2.5, 4), [0.1, 0.2, 0.3]]  # not all floats, not a tuple: read as objects
    for bounds in tuples * 2:  # each in turn: the two C copies replaced over and over
        probes = [*bounds, -1.0, 0.0, 1e-9, 1e9, math.inf, -math.inf, math.nan]
        probes += [rng.uniform(-1, 12) for _ in range(50)]
        for seconds in probes:
            assert bisect_bounds(bounds, seconds) == bisect.bisect_left(bounds, seconds), (bounds, seconds)


def _partial(secret: str, rid: str, value: str, declared: str | None = None, cut: int = 0) -> bytes:
    body = _body("gpt-4o-mini", 16, 1, 3)
    declared = str(len(body) + 500) if declared is None else declared
    body = body[: len(body) - cut]
    return (
        f"POST /ext_authz/v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {len(body)}\r\n"
        f"content-type: application/json\r\nauthorization: Bearer {secret}\r\nx-request-id: {rid}\r\n"
        f"x-envoy-auth-partial-body: {value}\r\nx-nexus-content-length: {declared}\r\n\r\n"
    ).encode() + body


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.adapters.test_http_fastpath import PLANS
    from tests.helpers import write_config

    return write_config(tmp_path_factory.mktemp("details"), *KEYS, extra=PLANS)


def test_only_a_partial_body_flag_of_true_leaves_the_lane(config: Path) -> None:
    """`x-envoy-auth-partial-body: true` (a truncated body) goes to the reference path; any other value,
    however close, is read as the reference reads it: the same bytes and state either way."""
    _compiled_or_skip()
    values = ["true", "false", "True", "TRUE", "tru", "truex", "", "trué", "tr\x7fe"]
    data = [_partial(KEYS[0].secret, f"rid-{i}", v) for i, v in enumerate(values)]
    script: list[tuple[str, Any]] = [("request", i) for i in range(len(values))]
    same(CompiledAuthzProtocol, config, script, data)


def test_a_body_shorter_than_declared_leaves_the_lane_whatever_the_flag(config: Path) -> None:
    """Envoy says x-envoy-auth-partial-body: false for a body cut at exactly max_request_bytes: the lane
    takes only a body as long as its declared length (core.forwarded.cut_by_proxy); the others, the flag's
    "false" included, get the reference path's answer, byte for byte."""
    _compiled_or_skip()
    full = len(_body("gpt-4o-mini", 16, 1, 3))
    cases = [
        ("false", str(full), 0),  # whole: the lane
        ("false", str(full), 1),  # cut by one byte: not one whole object and shorter than declared
        ("false", str(full + 1), 0),
        ("false", f" {full} ", 0),
        ("false", f"{full}x", 0),  # not a length: unknown, the body read whole or cut by its end
        ("false", "-", 0),
        ("false", "-", 2),
        ("false", "0" + str(full), 0),
        ("false", "9" * 16, 0),
        ("false", "\u00b2", 0),
        ("true", str(full), 0),
    ]
    data = [_partial(KEYS[0].secret, f"rid-{i}", v, d, c) for i, (v, d, c) in enumerate(cases)]
    script: list[tuple[str, Any]] = [("request", i) for i in range(len(cases))]
    same(CompiledAuthzProtocol, config, script, data)


def test_the_lane_looks_headers_up_by_the_dicts_own_key_objects() -> None:
    """The names the lane reads are http_authz._KEEP's str objects, which both parsers key the headers
    dict by: a look-up then finds its entry by identity."""
    _compiled_or_skip()
    from nexus_authz.adapters import http_authz

    names = native.fast.header_names()  # type: ignore[union-attr]
    kept = list(http_authz._KEEP.values())
    assert len(names) == 9
    for name in names:
        assert any(name is key for key in kept), name


def test_a_remembered_look_up_is_the_dicts_answer_after_every_change() -> None:
    """The lane's look-ups in the key snapshot's digests, the plans and the known keys answer from the last
    one while the dict and the key object are the same and the dict has not changed: every write, delete,
    clear or other dict or key is seen."""
    _compiled_or_skip()
    memo_get = native.fast.memo_get  # type: ignore[union-attr]
    for which in (0, 1, 2):
        key, twin = ("192.0.2.7", "k1"), ("192.0.2.7", "k1"[:1] + "1")
        d: dict[Any, Any] = {key: 1.5}
        assert memo_get(d, key, which) == 1.5 and memo_get(d, key, which) == 1.5
        d[key] = 2.5
        assert memo_get(d, key, which) == 2.5
        d[key] = None
        assert memo_get(d, key, which) is None
        del d[key]
        assert memo_get(d, key, which) is None
        d[twin] = 3.5  # an equal key, another object
        assert memo_get(d, key, which) == 3.5 and memo_get(d, twin, which) == 3.5
        other = dict(d)
        other[key] = 4.5
        assert memo_get(other, key, which) == 4.5 and memo_get(d, key, which) == 3.5
        d.clear()
        assert memo_get(d, key, which) is None
        d.update({key: 5.5})
        assert memo_get(d, key, which) == 5.5
        d.setdefault(("x", "y"), 0)
        d.pop(key)
        assert memo_get(d, key, which) is None
        d[key] = 6.5
        d[("x", "y")] = 1
        assert memo_get(d, key, which) == 6.5


def test_a_remembered_look_up_does_not_keep_its_dict_alive() -> None:
    """The memo compares its dict by address and version tag only: a key snapshot replaced by a reload is
    freed at once, not held until the next check (an idle sidecar may see none for hours), and a dict made
    afterwards, wherever it lands, is looked up."""
    _compiled_or_skip()
    memo_get = native.fast.memo_get  # type: ignore[union-attr]
    for which in (0, 1, 2):
        key = ("192.0.2.7", "k1")
        old: dict[Any, Any] = {key: 1.5}
        held = sys.getrefcount(old)
        assert memo_get(old, key, which) == 1.5 and memo_get(old, key, which) == 1.5
        assert sys.getrefcount(old) == held, "the memo holds the dict it looked up in"
        del old
        for value in (2.5, 3.5):  # new dicts (one may reuse the freed one's memory): never the old answer
            new: dict[Any, Any] = {key: value}
            assert memo_get(new, key, which) == value
            del new
