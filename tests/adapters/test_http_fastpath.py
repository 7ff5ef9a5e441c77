"""The common ext_authz check's fast path (core/fastpath.py, Decider.check_plain, adapters/http_fast.py, and
its compiled lane native/_fast.pyx) against the reference path it stands in for: the same request sequences,
through each protocol with the fast path on and forced off, must write the same bytes and leave the same
state (decision counters, latency observations, counter windows, reservations and their contexts, the
brute-force throttle's counts and known keys, unpriced counts). The sequences mix admissions with every
kind of refusal, near-limit windows, concurrency slots released or not, model and path lists, clamping
keys, keys without limits, revocations (a new key snapshot), a small book (evictions, expiries) and
requests the fast path does not take.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus_authz import native
from nexus_authz.adapters import http_authz, http_fast
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from tests.fuzz._support import FakeTransport, fuzz_settings, no_bugs_logged
from tests.helpers import KeySpec, write_config

if native.http1 is not None:
    from nexus_authz.adapters.http_native import CompiledAuthzProtocol

NOW = 1_750_000_000.0
Framing = type[http_authz.AuthzProtocol]

PLANS = """
plans:
  std:
    limits:
      - {requests: 1000000, per: minute}
      - {tokens: 100000000, per: minute}
      - {tokens: 1000000000, per: day}
      - {usd: 1000000000, per: month}
      - {concurrent: 100000}
prices:
  "gpt-4o*": {input: 2.5, cached_input: 1.25, output: 10}
"""
ACCOUNTING_OFF = "accounting:\n  enabled: false\n"
REFUSE_UNPRICED = "unpriced:\n  policy: refuse\n"
# a book of 3 reservations that expire after 5 s: evictions, expiries and retired contexts on the way
SMALL_BOOK = "reservations:\n  ttl: 5s\n  max_pending: 3\n"

KEYS = [
    KeySpec("plain", extra={"plan": "std"}),
    KeySpec(
        "tight",
        extra={
            "limits": [
                {"requests": 5, "per": "minute"},
                {"tokens": 900, "per": "minute"},
                {"concurrent": 2},
                {"usd": 3000, "per": "day"},
            ]
        },
    ),
    KeySpec("models", extra={"plan": "std", "models": ["gpt-4o*"]}),
    KeySpec("paths", extra={"plan": "std", "paths": ["/v1/chat/*"]}),
    KeySpec("clamp", extra={"limits": [{"tokens": 3000, "per": "minute", "clamp": True}]}),
    KeySpec("free", extra={}),
    KeySpec("permodel", extra={"limits": [{"requests": 3, "per": "minute", "model": "gpt-4*"}]}),
    KeySpec("shadow", extra={"limits": [{"requests": 2, "per": "minute", "shadow": True}]}),
    KeySpec("offkey", extra={"plan": "std", "disabled": True}),
    KeySpec("oldkey", extra={"plan": "std", "expires_at": "2020-01-01T00:00:00Z"}),
]
# three keys of one shape, first in the file: the last two are made from its recipe (core/keyfile_fast.py)
# and share their plans (core/fastpath.py)
TEAM = [
    KeySpec(f"team{i}", extra={"plan": "std", "models": ["gpt-4o*"], "paths": ["/v1/chat/*"]})
    for i in range(3)
]
SECRETS = [k.secret for k in KEYS + TEAM] + ["nx-test-nobody-0123456789abcdefghij"]
PATHS = ["/v1/chat/completions", "/v1/embeddings", "/v1/messages", "/v1/responses?x=1", "/v1/chat/../x"]
MODELS = ["gpt-4o-mini", "gpt-4o", "gpt-3.5-turbo", "claude-3-haiku", None]


def _body(model: str | None, max_tokens: int | None, n: int, size: int) -> bytes:
    doc: dict[str, Any] = {}
    if model is not None:
        doc["model"] = model
    doc["messages"] = [{"role": "user", "content": "word " * size}]
    if max_tokens is not None:
        doc["max_tokens"] = max_tokens
    if n != 1:
        doc["n"] = n
    return json.dumps(doc, separators=(",", ":")).encode()


@st.composite
def requests(draw: st.DrawFn, rid: int) -> bytes:
    """One HTTP ext_authz check as Envoy sends it, mostly the common case, often something else."""
    secret = draw(st.sampled_from(SECRETS))
    path = draw(st.sampled_from(PATHS))
    body = _body(
        draw(st.sampled_from(MODELS)),
        draw(st.sampled_from([None, 16, 200, 5000])),
        draw(st.sampled_from([1, 1, 2])),
        draw(st.sampled_from([1, 40, 400])),
    )
    method, prefix = "POST", "/ext_authz"
    headers = {
        "authorization": f"Bearer {secret}",
        "content-type": "application/json",
        "x-forwarded-for": draw(st.sampled_from(["192.0.2.2", "198.51.100.7, 192.0.2.9"])),
        "x-envoy-auth-partial-body": "false",
        "x-request-id": f"rid-{draw(st.integers(0, 6)) if draw(st.booleans()) else rid}",
    }
    odd = draw(
        st.sampled_from(
            ["none"] * 12
            + [
                "x-api-key",
                "lower-bearer",
                "no-key",
                "no-request-id",
                "no-address",
                "gzip",
                "multipart",
                "truncated",
                "cut-unflagged",
                "no-declared-length",
                "duplicate-key",
                "empty-body",
                "not-json",
                "get",
                "head",
                "nginx",
                "no-prefix",
                "close",
            ]
        )
    )
    if odd == "x-api-key":
        del headers["authorization"]
        headers["x-api-key"] = secret
    elif odd == "lower-bearer":
        headers["authorization"] = f"bearer  {secret} "
    elif odd == "no-key":
        del headers["authorization"]
    elif odd == "no-request-id":
        del headers["x-request-id"]
    elif odd == "no-address":
        del headers["x-forwarded-for"]
    elif odd == "gzip":
        headers["content-encoding"] = "gzip"
    elif odd == "multipart":
        headers["content-type"] = "multipart/form-data; boundary=b"
        body = b'--b\r\ncontent-disposition: form-data; name="model"\r\n\r\ngpt-4o\r\n--b--\r\n'
    elif odd == "truncated":
        headers["x-envoy-auth-partial-body"] = "true"
        headers["x-nexus-content-length"] = str(len(body) + 1000)
    elif odd == "cut-unflagged":  # Envoy's "false" for a buffer of exactly max_request_bytes
        headers["x-nexus-content-length"] = str(len(body) + draw(st.sampled_from([1, 1000])))
        body = body[: len(body) - draw(st.sampled_from([0, 1, 5]))]
    elif odd == "no-declared-length":  # chunked or HTTP/2 without content-length
        headers["x-nexus-content-length"] = "-"
        body = body[: len(body) - draw(st.sampled_from([0, 0, 1]))]
    elif odd == "duplicate-key":
        body = b'{"model":"gpt-4o","model":"gpt-3.5-turbo","messages":[]}'
    elif odd == "empty-body":
        body = b""
    elif odd == "not-json":
        body = b"hello"
    elif odd == "get":
        method, body = "GET", b""
    elif odd == "head":
        method = "HEAD"
    elif odd == "nginx":
        prefix, path = "", "/v1/nginx/auth"
        headers["x-original-uri"] = "/v1/chat/completions"
        headers["x-original-method"] = "POST"
    elif odd == "no-prefix":
        prefix = ""
    elif odd == "close":
        headers["connection"] = "close"
    headers.setdefault("x-nexus-content-length", str(len(body)))  # the shipped configs' headers_to_add
    head = f"{method} {prefix}{path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode("latin-1") + b"\r\n" + body


# a step: a request, a clock advance, or something that changes state between requests
steps = st.one_of(
    st.tuples(st.just("request"), st.integers(0, 10**6)),
    st.tuples(st.just("tick"), st.sampled_from([0.001, 0.5, 7.0, 61.0])),
    st.tuples(st.just("release"), st.integers(0, 6)),
    st.tuples(st.just("settle"), st.integers(0, 6)),
    st.tuples(st.just("revoke"), st.sampled_from([k.id for k in KEYS[:4]])),
)


def state(engine: Engine) -> dict[str, Any]:
    """Everything a decision may change, in comparable form."""
    book = engine.book
    return {
        "decisions": dict(engine.decisions),
        "latency observations": sum(engine.check_latency.counts),
        "counters": list(engine.counters._states.items()),
        "failures": list(engine.failures._states.items()),
        "book": list(book._entries.items()),
        "book stats": book.stats(),
        "retired": list(book._retired.items()),
        "known keys": list(engine.policy._known._seen.items()),
        "unpriced": dict(engine.unpriced),
        "slot releases": dict(engine.decider.slot_releases),
    }


def _compiled_or_skip() -> None:
    if native.http1 is None or native.fast is None:
        if os.environ.get(native.PURE_ENV, "") not in ("", "0"):
            pytest.skip("NEXUS_AUTHZ_PURE is set: the compiled protocol is not loaded")
        pytest.fail(f"the compiled framing did not build or load ({native.WHY_PURE})")


@pytest.fixture(params=["compiled", "compiled-framing", "python"])
def framing(request: pytest.FixtureRequest) -> type[http_authz.AuthzProtocol]:
    """The protocol the fast path is tried in: the compiled one with the compiled lane (production:
    native/_fast.pyx), the compiled framing with the pure flat path (adapters/http_fast.py, what runs when
    the lane is not there), and the httptools one with the pure flat path (the fast path's pure pieces:
    body facts, rate-limit headers)."""
    if request.param == "python":

        class Pure(http_authz.AuthzProtocol):
            __slots__ = ()
            fast_path = True
            on_message_complete = http_fast.on_message_complete
            _nginx = http_fast.nginx

        return Pure
    _compiled_or_skip()
    if request.param == "compiled-framing":

        class PureFlat(CompiledAuthzProtocol):  # type: ignore[misc]
            __slots__ = ()
            on_message_complete = http_fast.on_message_complete

        return PureFlat
    assert CompiledAuthzProtocol.on_message_complete is native.fast.on_message_complete  # type: ignore[union-attr]
    return CompiledAuthzProtocol  # type: ignore[no-any-return]


def run(
    framing: type[http_authz.AuthzProtocol],
    config: Path,
    script: list[tuple[str, Any]],
    data: list[bytes],
    *,
    fast: bool,
) -> tuple[Any, ...]:
    """A fresh engine and one connection through the protocol under test, fast path `fast`, fed `script`."""
    clock = [NOW]
    engine = Engine.from_settings(load_settings(str(config)), clock=lambda: clock[0])
    engine.load_first_keys()
    app = http_authz.HttpApp(engine, max_header_bytes=64 * 1024, max_body=1 << 20)

    class Protocol(framing):  # type: ignore[misc, valid-type]
        __slots__ = ()
        fast_path = fast

    answers: list[bytes] = []

    async def drive() -> None:
        protocol = Protocol(app)
        transport = FakeTransport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        for step, arg in script:
            if step == "request":
                if transport.closed:
                    protocol = Protocol(app)
                    transport = FakeTransport()
                    protocol.connection_made(transport)  # type: ignore[arg-type]
                before = len(transport.data)
                protocol.data_received(data[arg])
                while protocol._outbox:  # an answer waits (a concurrency slot): let it come
                    await asyncio.sleep(0.005)
                answers.append(bytes(transport.data[before:]))
            elif step == "tick":
                clock[0] += arg
            elif step == "release":
                engine.release(f"rid-{arg}")
            elif step == "settle":
                engine.settle(f"rid-{arg}", tokens=50, usd_micros=40)
            elif step == "revoke":
                engine.revoke(frozenset({arg}))

    asyncio.run(drive())
    return answers, state(engine)


@pytest.fixture(scope="module", params=["accounting", "no-accounting", "refuse-unpriced", "small-book"])
def config(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    extra = (
        PLANS
        + {
            "accounting": "",
            "no-accounting": ACCOUNTING_OFF,
            "refuse-unpriced": REFUSE_UNPRICED,
            "small-book": SMALL_BOOK,
        }[request.param]
    )
    return write_config(tmp_path_factory.mktemp("fastpath"), *TEAM, *KEYS, extra=extra)


def same(
    framing: type[http_authz.AuthzProtocol],
    config: Path,
    script: list[tuple[str, Any]],
    data: list[bytes],
) -> None:
    with no_bugs_logged():
        reference = run(framing, config, script, data, fast=False)
        fast = run(framing, config, script, data, fast=True)
    assert fast[0] == reference[0], "different bytes written"
    assert fast[1] == reference[1], "different state"


@given(st.data())
@fuzz_settings(40, deadline=None)
def test_request_sequences_give_identical_bytes_and_state(
    config: Path, framing: type[http_authz.AuthzProtocol], data: st.DataObject
) -> None:
    script = data.draw(st.lists(steps, min_size=1, max_size=30))
    bodies = [data.draw(requests(i)) for i in range(sum(1 for s, _ in script if s == "request"))]
    numbered: list[tuple[str, Any]] = []
    i = 0
    for step, arg in script:
        if step == "request":
            numbered.append((step, i))
            i += 1
        else:
            numbered.append((step, arg))
    same(framing, config, numbered, bodies)


def _check(secret: str, rid: str, body: bytes, path: str = "/v1/chat/completions") -> bytes:
    head = (
        f"POST /ext_authz{path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {len(body)}\r\n"
        f"content-type: application/json\r\nx-forwarded-for: 192.0.2.2\r\n"
        f"authorization: Bearer {secret}\r\nx-request-id: {rid}\r\n"
        f"x-nexus-content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def test_a_tight_key_to_its_limits_and_back(config: Path, framing: Framing) -> None:
    """Admissions up to each window's limit, the refusals past it (429s with their headers, a concurrency
    slot waited for in vain), releases and settlements freeing room, the same ids reused."""
    tight = KEYS[1].secret
    data = [_check(tight, f"rid-{i % 7}", _body("gpt-4o-mini", 100, 1, 20)) for i in range(8)]
    data += [_check(tight, "rid-9", _body("gpt-4o", 5000, 2, 1))]
    script: list[tuple[str, Any]] = [("request", 0), ("request", 1), ("request", 2), ("release", 0)]
    script += [("request", 3), ("request", 8), ("settle", 1), ("tick", 7.0), ("request", 4)]
    script += [("release", 3), ("request", 5), ("tick", 61.0), ("request", 6), ("request", 7)]
    same(framing, config, script, data)


def test_the_common_request_takes_the_fast_path(
    config: Path, framing: type[http_authz.AuthzProtocol]
) -> None:
    """Not a vacuous comparison: an allowed check of a limited key is answered without the reference path
    (no Request is built), and the state it leaves is the reference's."""
    from nexus_authz.core import model

    data = [_check(KEYS[0].secret, f"rid-{i}", _body("gpt-4o-mini", 16, 1, 3)) for i in range(3)]
    built = []
    original = model.new_request

    def counting(*args: Any) -> Any:
        built.append(args)
        return original(*args)

    script: list[tuple[str, Any]] = [("request", 0), ("request", 1), ("tick", 0.5), ("request", 2)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(http_authz, "new_request", counting)
        fast = run(framing, config, script, data, fast=True)
        assert built == []
        reference = run(framing, config, script, data, fast=False)
        assert len(built) == 3
    assert fast == reference
    assert all(answer.startswith(b"HTTP/1.1 200 OK\r\n") for answer in fast[0])


def _keyed(key_header: str, rid: str, body: bytes, path: str = "/v1/messages") -> bytes:
    """A check whose key comes in `key_header` (a whole header line), as an Anthropic or Azure client sends
    it."""
    head = (
        f"POST /ext_authz{path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {len(body)}\r\n"
        f"content-type: application/json\r\nx-forwarded-for: 192.0.2.2\r\n{key_header}\r\n"
        f"anthropic-version: 2023-06-01\r\nx-request-id: {rid}\r\nx-nexus-content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def test_a_key_in_x_api_key_or_api_key_takes_the_fast_path(
    config: Path, framing: type[http_authz.AuthzProtocol]
) -> None:
    """keys.extract_key's other headers: with no Authorization, x-api-key (Anthropic's SDKs) and then
    api-key (Azure's), stripped, are read by the fast path too (no Request built), with the reference's
    answers and state; an Authorization of another scheme, or a Bearer with junk, leaves it to the
    reference, which reads the next header or refuses, as before."""
    from nexus_authz.core import model

    secret = KEYS[0].secret
    body = b'{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}'
    fast_ones = [
        f"x-api-key: {secret}",
        f"x-api-key:  {secret} \t",
        f"api-key: {secret}",
        f"x-api-key: {secret}\r\napi-key: nope",  # x-api-key first
        f"api-key: {secret}\r\nx-api-key: {secret}",
    ]
    others = [
        f"authorization: Basic dXNlcg==\r\nx-api-key: {secret}",  # another scheme: x-api-key is read
        f"authorization: Bearer nope\r\nx-api-key: {secret}",  # a Bearer wins, unknown: 401
        "x-api-key: not a key",
        "api-key: ",
        f"x-api-key: {secret}\u00e9",
    ]
    data = [_keyed(h, f"rid-{i}", body) for i, h in enumerate(fast_ones + others)]
    data[1] = _keyed(fast_ones[1], "rid-1", body, "/v1/chat/completions")
    built = []
    original = model.new_request

    def counting(*args: Any) -> Any:
        built.append(args)
        return original(*args)

    script: list[tuple[str, Any]] = [("request", i) for i in range(len(fast_ones))]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(http_authz, "new_request", counting)
        fast = run(framing, config, script, data, fast=True)
        assert built == []
    assert [a.split(b"\r\n", 1)[0] for a in fast[0]] == [b"HTTP/1.1 200 OK"] * len(fast_ones)
    script += [("request", i) for i in range(len(fast_ones), len(data))] + [("request", 0)]
    same(framing, config, script, data)


def test_the_compiled_lane_decides_without_the_pure_flat_path(config: Path) -> None:
    """Not a vacuous comparison either: the compiled protocol's common check goes through native/_fast.pyx,
    which neither builds a Request nor calls Decider.check_plain or FastAdmit.admit (a key with a
    concurrency window near its limit, released early, and a refusal, which takes the reference tail),
    and leaves the reference's state."""
    _compiled_or_skip()
    from nexus_authz.core.fastpath import FastAdmit
    from nexus_authz.decide import Decider

    tight = KEYS[1].secret
    data = [_check(KEYS[0].secret, f"rid-{i}", _body("gpt-4o-mini", 16, 1, 3)) for i in range(2)]
    data += [_check(tight, f"rid-{i}", _body("gpt-4o-mini", 100, 1, 20)) for i in range(2, 5)]
    calls: list[str] = []
    plain, admit = Decider.check_plain, FastAdmit.admit

    def counted_plain(*args: Any) -> Any:
        calls.append("check_plain")
        return plain(*args)

    def counted_admit(*args: Any) -> Any:
        calls.append("admit")
        return admit(*args)

    script: list[tuple[str, Any]] = [("request", i) for i in range(5)] + [("tick", 0.5), ("request", 0)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Decider, "check_plain", counted_plain)
        patch.setattr(FastAdmit, "admit", counted_admit)
        fast = run(CompiledAuthzProtocol, config, script, data, fast=True)
    assert calls == []
    reference = run(CompiledAuthzProtocol, config, script, data, fast=False)
    assert fast == reference
    answers = fast[0]
    assert [a.split(b"\r\n", 1)[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 4 + [
        b"HTTP/1.1 429 Too Many Requests"
    ] + [b"HTTP/1.1 200 OK"]
    # `concurrent: 2` is at least half full after each admission: both are marked for the early release
    assert b"x-nexus-release: rid-2\r\n" in answers[2] and b"x-nexus-release: rid-3\r\n" in answers[3]
    assert b"x-nexus-release" not in answers[0]  # `concurrent: 100000`: the access log frees it


def test_throttled_addresses_and_keys_refused_for_their_bodies(
    config: Path, framing: type[http_authz.AuthzProtocol]
) -> None:
    """The brute-force throttle: an address that sent too many unknown keys keeps serving the key that
    authenticated from it before (and no other); a key refused for its body too often is refused (429)
    before its body is read, then serves again once the window has room."""
    plain, models = KEYS[0].secret, KEYS[2].secret
    unknown = SECRETS[-1]
    good = _body("gpt-4o-mini", 16, 1, 3)
    data = [_check(plain, "rid-1", good), _check(unknown, "rid-2", good), _check(models, "rid-3", good)]
    data += [_check(models, "rid-4", _body("claude-3-haiku", 16, 1, 3)), _check(plain, "rid-5", good)]
    data += [_check(models, "rid-6", good)]
    script: list[tuple[str, Any]] = (
        [("request", 0)] + [("request", 1)] * 32 + [("request", 0), ("request", 2)]
    )
    script += [("tick", 61.0)] + [("request", 3)] * 32 + [("request", 5), ("request", 4), ("tick", 61.0)]
    script += [("request", 5), ("request", 4)]
    same(framing, config, script, data)


def test_a_revoked_key_and_other_keys_after_the_snapshot_changes(
    config: Path, framing: type[http_authz.AuthzProtocol]
) -> None:
    """A revocation swaps the key snapshot: what the fast path kept for the old one must not answer."""
    data = [_check(KEYS[0].secret, f"rid-{i}", _body("gpt-4o-mini", 16, 1, 3)) for i in range(2)]
    data += [_check(KEYS[3].secret, "rid-3", _body("gpt-4o", 16, 1, 3))]
    script: list[tuple[str, Any]] = [("request", 0), ("request", 2), ("revoke", "plain"), ("request", 1)]
    script += [("request", 2), ("revoke", "paths"), ("request", 2)]
    same(framing, config, script, data)


def test_the_keys_of_one_recipe_share_plans_and_keep_their_own_windows(
    config: Path, framing: type[http_authz.AuthzProtocol]
) -> None:
    """Keys made from one recipe share their plans (one per model and path) and their allow head: each is
    still charged, reserved and answered as its own key, by the reference path too, also after one of
    them is revoked (a new snapshot)."""
    snapshot = Engine.from_settings(load_settings(str(config)))
    snapshot.load_first_keys()
    teams = [snapshot.snapshot.by_id[f"team{i}"] for i in range(3)]
    assert teams[0].recipe is None and teams[1].recipe is teams[2].recipe is not None
    team = [k.secret for k in TEAM]
    data = []
    for i in range(12):  # the three keys in turn, two models, two paths (one the keys may not use)
        path = "/v1/chat/completions" if i % 4 != 3 else "/v1/embeddings"
        body = _body("gpt-4o-mini" if i % 2 else "gpt-4o", 16, 1, 3 + i)
        data.append(_check(team[i % 3], f"rid-{i}", body, path))
    script: list[tuple[str, Any]] = [("request", i) for i in range(12)]
    script += [("settle", 1), ("revoke", "team1"), ("request", 1), ("request", 2), ("request", 4)]
    same(framing, config, script, data)


def test_shared_plans_charge_each_keys_group_and_tenant_windows(
    tmp_path: Path, framing: type[http_authz.AuthzProtocol], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys of one recipe in one group: their shared plan charges each key's own windows and the group's
    and tenant's (the recipe's shared counter ids) up to the group's limit and after its minute."""
    from nexus_authz.core import fastpath

    tenants = "tenants:\n  acme:\n    limits:\n      - {requests: 7, per: minute}\n"
    tenants += "    groups:\n      research:\n        limits:\n          - {requests: 5, per: minute}\n"
    keys = [KeySpec(f"r{i}", extra={"tenant": "acme", "group": "research", "plan": "std"}) for i in range(4)]
    config = write_config(tmp_path, *keys, extra=PLANS + tenants)
    owners: list[str] = []
    plan_for = fastpath.FastAdmit._plan_for

    def spy(self: Any, owner: Any, key: Any, model: Any, path: str) -> Any:
        owners.append(type(owner).__name__)
        return plan_for(self, owner, key, model, path)

    monkeypatch.setattr(fastpath.FastAdmit, "_plan_for", spy)
    data = [_check(keys[i % 4].secret, f"rid-{i}", _body("gpt-4o-mini", 16, 1, 3)) for i in range(8)]
    script: list[tuple[str, Any]] = [("request", i) for i in range(8)] + [("tick", 61.0), ("request", 5)]
    same(framing, config, script, data)
    assert owners == ["KeyRecord", "KeyRecipe"]  # r0 (the shape's template) its own plan, r1-r3 one shared


@given(
    peppers=st.lists(st.binary(max_size=130), min_size=1, max_size=3),
    secrets=st.lists(
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=512), min_size=1, max_size=4
    ),
)
def test_the_compiled_hmac_is_the_key_hashers(peppers: list[bytes], secrets: list[str]) -> None:
    """The compiled lane's HMAC-SHA256 (its own SHA-256 from the hasher's pad, no hashlib) gives
    keys.KeyHasher's digest for any pepper (short, a whole block, longer: hashed first) and any secret the
    lane takes (printable ASCII up to MAX_KEY_LENGTH: one to nine blocks, each padding case), hashers in
    turn (its pad states are per hasher)."""
    _compiled_or_skip()
    from nexus_authz.core.keys import KeyHasher

    assert native.fast is not None
    hashers = [KeyHasher(p) for p in peppers]
    used = native.fast.sha_ni()
    try:  # both compressions: the CPU's SHA extensions where it has them (native/_sha_ni.h), the portable C
        for sha_ni in (used, False):
            native.fast.sha_ni(sha_ni)
            for secret in secrets:
                for hasher in hashers:
                    assert native.fast.hmac_sha256(hasher, secret.encode()) == hasher(secret)
    finally:
        native.fast.sha_ni(used)


def test_the_compiled_lane_reads_every_field_in_place() -> None:
    """native/_fast.pyx reads the objects of a decision (protocol, app, engine, decider, policy, snapshot,
    key, plan, counters' result, book, histograms) straight from their slots: a field renamed, moved to a
    property or a class attribute would silently take getattr again; this names it."""
    _compiled_or_skip()
    assert native.fast is not None
    assert native.fast.unresolved() == []


def _nginx_ask(secret: str, rid: str, uri: str, method: str = "POST", close: bool = False) -> bytes:
    """nginx's auth_request subrequest as deploy/nginx/nginx.conf sends it (no body)."""
    return (
        f"GET /v1/nginx/auth HTTP/1.1\r\nHost: nexus-authz\r\nAuthorization: Bearer {secret}\r\n"
        f"X-Original-Method: {method}\r\nX-Original-URI: {uri}\r\nX-Real-IP: 192.0.2.7\r\n"
        f"X-Request-ID: {rid}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
    ).encode()


def test_nginx_subrequests_get_the_reference_bytes_and_state(
    config: Path, framing: Framing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nginx's subrequests of POSTs take Decider.check_plain (http_fast.nginx): every key of the file,
    allowed, refused before and by the counters (a tight key to its limits), other methods, paths and
    unknown keys, a closing connection: the reference's bytes and state, and the common ones admitted
    there, not by the reference."""
    data = [
        _nginx_ask(secret, f"rid-{i % 7}", path, method, close=(i == 40))
        for i, (secret, path, method) in enumerate(
            (s, p, m) for s in SECRETS for p in PATHS[:4] for m in ("POST", "POST", "GET")
        )
    ]
    data += [_nginx_ask(KEYS[1].secret, f"rid-{i}", "/v1/chat/completions") for i in range(9)]
    script = [("request", i) for i in range(len(data))]
    script[20:20] = [("release", 3), ("tick", 61.0), ("settle", 2)]
    reference: list[int] = []
    real = http_authz.AuthzProtocol._nginx

    def counted(self: Any, headers: dict[str, str], close: bool) -> Any:
        reference.append(1)
        return real(self, headers, close)

    monkeypatch.setattr(http_authz.AuthzProtocol, "_nginx", counted)
    same(framing, config, script, data)
    # fast=False took the reference for all; fast=True for the requests check_plain did not admit only
    assert len(data) < len(reference) < 2 * len(data)
