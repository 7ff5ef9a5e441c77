"""Issue 13, items 2, 3 and 7: one strict reading of request bodies, reservations for the whole body,
and bounded, counted work for refused bodies. Each case is a trick from the issue (or a close variant):
the answer is a refusal, never a decision on a model other than the one the upstream would use."""

from __future__ import annotations

import json

import pytest

from nexus_authz.core import body as body_mod
from nexus_authz.core.forwarded import cut_by_proxy
from nexus_authz.core.model import Decision, Reason, Request
from nexus_authz.core.policy import UNSEEN_TOKENS_PER_BYTE, Policy
from nexus_authz.core.reservations import ReservationBook
from nexus_authz.stores.memory import MemoryCounterStore
from tests.helpers import KeySpec, decide_local, parse_world

pytestmark = pytest.mark.usefixtures("body_reading")  # both body readings: tests/native_params.py

POLICY_YAML = """
plans:
  usd:
    limits:
      - {usd: 1, per: day}
  tokens:
    limits:
      - {tokens: 400000, per: day}
  requests:
    limits:
      - {requests: 1000, per: minute}
prices:
  "gpt-4o*": {input: 2.5, output: 10}
  "o3*": {input: 10, output: 40}
reservations:
  default_max_tokens: 1000
auth_failures:
  limit: 5
  per: minute
"""
RESTRICTED = KeySpec("restricted", extra={"models": ["gpt-4o*"]})
PRICED = KeySpec("priced", extra={"plan": "usd"})
TOKENS = KeySpec("tokens", extra={"plan": "tokens"})
RATE_ONLY = KeySpec("rate", extra={"plan": "requests"})
T0 = 1_800_000_000.0
PAD = "All work and no play makes Jack a dull boy. " * 500  # ~22 KB: the scan path


class World:
    def __init__(self) -> None:
        policy_set, self.snapshot = parse_world(POLICY_YAML, RESTRICTED, PRICED, TOKENS, RATE_ONLY)
        self.policy = Policy(policy_set)
        self.counters = MemoryCounterStore()
        self.failures = MemoryCounterStore()
        self.book = ReservationBook(ttl=60.0, max_entries=1000)
        self.n = 0

    def check(
        self,
        key: KeySpec,
        body: bytes,
        *,
        content_type: str = "application/json",
        truncated: bool = False,
        **headers: str,
    ) -> Decision:
        self.n += 1
        h = {"authorization": f"Bearer {key.secret}", "content-type": content_type}
        h.update({k.replace("_", "-"): v for k, v in headers.items()})
        req = Request("POST", "/v1/chat/completions", h, body, truncated, f"r{self.n}", "192.0.2.7")
        return decide_local(self.policy, self.snapshot, req, T0, self.counters, self.book, self.failures)


def escaped_duplicate(pad: str) -> bytes:
    # Issue 13, 2a: the JSON parser upstream reads the last, escaped spelling of "model".
    return (
        b'{"model":"gpt-4o","messages":[{"role":"user","content":"'
        + pad.encode()
        + b'"}],"mod\\u0065l":"o3-mini"}'
    )


def plain_duplicate(pad: str) -> bytes:
    return b'{"model":"gpt-4o","messages":[{"role":"user","content":"' + pad.encode() + b'"}],"model":"o3"}'


def utf16_trick() -> bytes:
    # Issue 13, 2d: UTF-16LE whose bytes spell `"model":"gpt-4o"` inside a string; json.loads(bytes)
    # upstream decodes UTF-16 and sees o3-mini.
    decoy = b'"model":"gpt-4o"'
    chars = decoy.decode("utf-16-le")  # 16 bytes: 8 UTF-16 code units
    return json.dumps({"x": chars, "model": "o3-mini", "pad": "y" * 20000}, ensure_ascii=False).encode(
        "utf-16-le"
    )


@pytest.mark.parametrize("pad", ["short", PAD], ids=["parsed", "scanned"])
@pytest.mark.parametrize("key", [RESTRICTED, PRICED, TOKENS], ids=lambda k: k.id)
@pytest.mark.parametrize("make", [escaped_duplicate, plain_duplicate], ids=["escaped", "plain"])
def test_duplicate_top_level_model_is_refused(pad: str, key: KeySpec, make) -> None:  # type: ignore[no-untyped-def]
    body = make(pad)
    assert json.loads(body)["model"] != "gpt-4o"  # what the upstream would use
    d = World().check(key, body)
    assert d.status == 400 and d.reason is Reason.BAD_REQUEST
    assert "duplicate" in json.loads(d.body)["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        utf16_trick(),
        b"\xff\xfe" + '{"model":"o3"}'.encode("utf-16-le"),
        b"\xfe\xff" + '{"model":"o3"}'.encode("utf-16-be"),
        '{"model":"o3"}'.encode("utf-32"),
        '{"model":"o3"}'.encode("utf-32-le"),
        b'\xef\xbb\xbf{"model":"gpt-4o"}',
        b'{"model":"gpt-4o","x":"\xc3\x28"}',
        b'{"model":"gpt-4o","x":"' + PAD.encode() + b'\xe9"}',
    ],
    ids=[
        "utf16-trick",
        "utf16le-bom",
        "utf16be-bom",
        "utf32",
        "utf32le",
        "utf8-bom",
        "bad-utf8",
        "bad-utf8-big",
    ],
)
@pytest.mark.parametrize("key", [RESTRICTED, PRICED], ids=lambda k: k.id)
def test_json_that_is_not_utf8_is_refused(body: bytes, key: KeySpec) -> None:
    d = World().check(key, body)
    assert d.status == 400 and d.reason is Reason.BAD_REQUEST, d


@pytest.mark.parametrize("key", [RESTRICTED, PRICED], ids=lambda k: k.id)
@pytest.mark.parametrize(
    "prefix",
    [
        # 2b: the model at the front, a duplicate may follow the cut.
        b'{"model":"gpt-4o","messages":[{"role":"user","content":"',
        # 2c: a nested decoy early, the real top-level model after the cut.
        b'{"metadata":{"model":"gpt-4o"},"messages":[{"role":"user","content":"',
    ],
    ids=["duplicate-after-cut", "nested-decoy"],
)
def test_cut_body_is_refused_where_the_model_matters(key: KeySpec, prefix: bytes) -> None:
    body = prefix + b"x" * (262144 - len(prefix))
    d = World().check(key, body, truncated=True, x_nexus_content_length="2000000")
    assert d.status == 413 and d.reason is Reason.BODY_TOO_LARGE
    error = json.loads(d.body)["error"]
    assert error["code"] == "request_too_large" and "262144 bytes" in error["message"]


def test_compressed_body_is_refused_where_the_body_is_read() -> None:
    import gzip

    body = gzip.compress(b'{"model":"o3"}')
    world = World()
    for key in (RESTRICTED, PRICED, TOKENS):
        d = world.check(key, body, content_encoding="gzip")
        assert d.status == 400 and "content-encoding" in json.loads(d.body)["error"]["message"]
    assert world.check(RATE_ONLY, body, content_encoding="gzip").allowed  # the body is not read


# -- multipart (2e) ---------------------------------------------------------------------------------


def multipart(*parts: tuple[str, bytes], boundary: str = "XyZ") -> bytes:
    out = b""
    for disposition, value in parts:
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_multipart_filename_model_is_not_the_model_field() -> None:
    # The old regex took the first `name="model"`, which `filename="model"` also contains.
    body = multipart(
        ('form-data; name="file"; filename="model"', b"gpt-4o"),
        ('form-data; name="model"', b"whisper-1"),
    )
    d = World().check(RESTRICTED, body, content_type="multipart/form-data; boundary=XyZ")
    assert d.status == 403 and d.reason is Reason.MODEL_NOT_ALLOWED
    assert body_mod.multipart_model(body, "multipart/form-data; boundary=XyZ") == ("whisper-1", None)


def test_multipart_media_type_is_case_insensitive() -> None:
    body = multipart(('form-data; name="model"', b"whisper-1"), boundary="b1")
    d = World().check(RESTRICTED, body, content_type='Multipart/Form-Data; Boundary="b1"')
    assert d.status == 403 and d.reason is Reason.MODEL_NOT_ALLOWED
    ok = multipart(('form-data; name="model"', b"gpt-4o-transcribe"), boundary="b1")
    assert World().check(RESTRICTED, ok, content_type="MULTIPART/FORM-DATA; boundary=b1").allowed


@pytest.mark.parametrize(
    "body",
    [
        multipart(('form-data; name="model"', b"gpt-4o"), ('form-data; name="model"', b"o3")),
        multipart(('form-data; name="model"', b"gpt-4o"), ("form-data; name*=utf-8''model", b"o3")),
        multipart(('form-data; name="model"; name="x"', b"gpt-4o")),
        multipart(('form-data; name="model"', b"gpt-4o\xff")),
    ],
    ids=["duplicate", "rfc2231-name", "two-names", "not-utf8"],
)
def test_ambiguous_multipart_is_refused(body: bytes) -> None:
    d = World().check(RESTRICTED, body, content_type="multipart/form-data; boundary=XyZ")
    assert d.status == 400 and d.reason is Reason.BAD_REQUEST


def test_cut_multipart_is_refused_for_a_restricted_key() -> None:
    body = multipart(('form-data; name="model"', b"gpt-4o"), ('form-data; name="file"', b"\x00" * 300_000))
    d = World().check(
        RESTRICTED, body[:262144], content_type="multipart/form-data; boundary=XyZ", truncated=True
    )
    assert d.status == 413


# -- item 3: reservations for the whole body ----------------------------------------------------------


def big_chat(size: int, **extra: object) -> bytes:
    head = json.dumps({"model": "gpt-4o", **extra, "messages": [{"role": "user", "content": ""}]})
    head = head[: -len('"}]}')]
    return head.encode() + b"a" * (size - len(head) - 4) + b'"}]}'


def test_cut_body_reserves_its_declared_length_on_a_token_key() -> None:
    world = World()
    forwarded = big_chat(2_000_000)[:262144]
    # Issue 13, 3: a 2 MB body cut at 256 KiB was estimated from the 256 KiB only; it can never fit
    # a 400k tokens/day key (2 MB x 0.5 tokens a byte), which the README says is a 429.
    d = world.check(TOKENS, forwarded, truncated=True, x_nexus_content_length="2000000")
    assert d.status == 429 and "can never fit" in json.loads(d.body)["error"]["message"]
    # A 600 KB body fits once (~300k tokens), not twice.
    forwarded = big_chat(600_000)[:262144]
    first = world.check(TOKENS, forwarded, truncated=True, x_nexus_content_length="600000")
    second = world.check(TOKENS, forwarded, truncated=True, x_nexus_content_length="600000")
    assert first.allowed and second.status == 429
    (entry,) = world.book.entries()
    assert entry[2][0] >= (600_000 - 262144) * UNSEEN_TOKENS_PER_BYTE + 1000


def test_cut_body_without_a_declared_length_is_refused_on_a_token_key() -> None:
    forwarded = big_chat(600_000)[:262144]
    for declared in ({}, {"x_nexus_content_length": "100"}, {"x_nexus_content_length": "junk"}):
        d = World().check(TOKENS, forwarded, truncated=True, **declared)
        assert d.status == 413, declared


def test_max_tokens_from_a_cut_body_is_not_trusted_below_the_default() -> None:
    # `max_tokens: 1` before the cut could be followed by `max_tokens: 100000` after it.
    world = World()
    forwarded = big_chat(300_000, max_tokens=1)[:262144]
    assert world.check(TOKENS, forwarded, truncated=True, x_nexus_content_length="300000").allowed
    (entry,) = world.book.entries()
    prompt = 262144 // 4 + (300_000 - 262144) // 2
    assert entry[2][0] >= prompt + 1000  # the default completion (1000), not 1


# -- item 7: bounded work, counted refusals -----------------------------------------------------------


def test_pathological_body_is_decided_with_bounded_work(monkeypatch: pytest.MonkeyPatch) -> None:
    # ~200 KB of nested "model" keys (issue 13, 7): the scan stops at its match cap and refuses the body
    # as ambiguous, without parsing it.
    body = b'{"model":"gpt-4o","messages":[' + b",".join([b'{"model":"x"}'] * 15_000) + b"]}"
    assert len(body) > 200_000
    matches = 0
    real = body_mod._KEY

    class CountingKey:
        def finditer(self, data: bytes):  # type: ignore[no-untyped-def]
            nonlocal matches
            for m in real.finditer(data):
                matches += 1
                yield m

    parsed: list[int] = []
    real_decode = body_mod._STRICT.decode
    monkeypatch.setattr(body_mod, "_KEY", CountingKey())
    monkeypatch.setattr(
        body_mod,
        "_STRICT",
        type("S", (), {"decode": lambda self, t: parsed.append(len(t)) or real_decode(t)})(),
    )
    d = World().check(RESTRICTED, body)
    assert d.status == 400 and "too many nested" in json.loads(d.body)["error"]["message"]
    assert matches <= body_mod._MAX_CANDIDATES + 1
    assert parsed == []


def test_repeated_refusals_from_one_key_are_throttled() -> None:
    world = World()
    bad = b'{"model":"o3","messages":[]}'
    statuses = [world.check(RESTRICTED, bad).status for _ in range(7)]
    assert statuses == [403] * 5 + [429] * 2
    throttled = world.check(RESTRICTED, b'{"model":"gpt-4o"}')
    assert throttled.status == 429 and dict(throttled.response_headers)["retry-after"]
    # Other keys (and the address) are not affected.
    assert world.check(PRICED, b'{"model":"gpt-4o","messages":[]}').allowed


WHOLE = b'{"model":"gpt-4o","messages":[{"role":"user","content":"' + b"a" * 300 + b'"}]}'


@pytest.mark.parametrize(
    ("partial", "declared", "body", "cut"),
    [
        ("true", str(len(WHOLE)), WHOLE, True),  # Envoy's flag
        ("false", str(len(WHOLE)), WHOLE, False),
        (None, str(len(WHOLE)), WHOLE, False),
        # Envoy says "false" for a buffer of exactly max_request_bytes: the declared length tells
        ("false", str(len(WHOLE) + 1), WHOLE, True),
        ("false", "2000000", WHOLE[:100], True),
        ("false", f" {len(WHOLE)}\t", WHOLE, False),
        # no declared length (chunked, HTTP/2): a JSON object must end, whole, where the body ends
        ("false", None, WHOLE, False),
        ("false", "-", WHOLE, False),  # Envoy's %REQ()% of an absent header
        ("false", "", b"  \r\n" + WHOLE + b"\n ", False),
        ("false", None, WHOLE[:-1], True),
        ("false", None, WHOLE[:-2], True),  # ends in a nested object's `}`: still not whole
        ("false", None, WHOLE[:60], True),
        ("false", None, WHOLE + b"{}", True),  # more after the object
        ("false", "-", b'{"model":"gpt-4o","x":[1,2', True),
        ("false", "12a", WHOLE[:-1], True),  # not a plain decimal: unknown
        ("false", "\u00b2", WHOLE[:-1], True),  # a digit to str.isdigit, not to int()
        ("false", "9" * 16, WHOLE, False),  # too long to be a length: unknown, and the object is whole
        # not a JSON object: the strict reading decides (multipart's terminator, NOT_UTF8)
        ("false", None, b"plain text, cut or not", False),
        ("false", None, b'{"model":"\xff', False),
        ("false", None, b"", False),
        ("false", "500", b"", False),  # no body forwarded (no with_request_body, nginx): never a cut
    ],
)
def test_a_body_is_cut_when_shorter_than_declared_or_not_whole(
    partial: str | None, declared: str | None, body: bytes, cut: bool
) -> None:
    headers = {"x-envoy-auth-partial-body": partial, "x-nexus-content-length": declared}
    assert cut_by_proxy({k: v for k, v in headers.items() if v is not None}, body) is cut


def test_a_body_cut_without_the_flag_is_decided_as_cut() -> None:
    """What CI saw through the real Envoy: a 2 MB body cut at exactly 262,144 bytes came with
    x-envoy-auth-partial-body: false; read as whole it was ~65k tokens, admitted on a 400k-a-day key."""
    forwarded = big_chat(2_000_000)[:262144]
    assert World().check(TOKENS, forwarded, x_nexus_content_length="2000000").allowed  # read as whole
    declared = {"x-envoy-auth-partial-body": "false", "x-nexus-content-length": "2000000"}
    truncated = cut_by_proxy(declared, forwarded)
    d = World().check(TOKENS, forwarded, truncated=truncated, x_nexus_content_length="2000000")
    assert d.status == 429 and "can never fit" in json.loads(d.body)["error"]["message"]
    # and with no declared length (chunked): not one whole object, so cut, and refused (413)
    d = World().check(TOKENS, forwarded, truncated=cut_by_proxy({"x-nexus-content-length": "-"}, forwarded))
    assert d.status == 413
