"""Key extraction, keyed hashing, snapshot lookup and globs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus_authz.core import keys


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"authorization": "Bearer nx-abc"}, "nx-abc"),
        ({"authorization": "bearer   nx-abc  "}, "nx-abc"),
        ({"authorization": "BEARER nx-abc"}, "nx-abc"),
        ({"x-api-key": "nx-abc"}, "nx-abc"),
        ({"api-key": " nx-abc "}, "nx-abc"),
        ({"authorization": "Bearer nx-first", "x-api-key": "nx-second"}, "nx-first"),
        ({"x-api-key": "nx-x", "api-key": "nx-a"}, "nx-x"),
        ({}, None),
        ({"authorization": "Basic dXNlcjpwYXNz"}, None),
        ({"authorization": "Bearer"}, None),
        ({"authorization": "Bearer "}, None),
        ({"x-api-key": ""}, None),
        ({"x-api-key": "has space"}, None),
        ({"x-api-key": "caf\u00e9"}, None),
        ({"x-api-key": "\x00\x01"}, None),
        ({"x-api-key": "a" * (keys.MAX_KEY_LENGTH + 1)}, None),
    ],
)
def test_extract_key(headers: dict[str, str], expected: str | None) -> None:
    assert keys.extract_key(headers) == expected


@given(st.dictionaries(st.sampled_from(["authorization", "x-api-key", "api-key", "other"]), st.text()))
def test_extract_key_never_raises(headers: dict[str, str]) -> None:
    key = keys.extract_key(headers)
    assert key is None or (0 < len(key) <= keys.MAX_KEY_LENGTH and key.isascii() and " " not in key)


def test_hash_is_keyed_by_the_pepper() -> None:
    a = keys.format_hash(b"pepper-one-0123456789", "nx-secret")
    b = keys.format_hash(b"pepper-two-0123456789", "nx-secret")
    assert a != b
    assert a.startswith("hmac-sha256:") and len(a) == len("hmac-sha256:") + 64
    assert keys.parse_hash(a) == keys.digest(b"pepper-one-0123456789", "nx-secret")


@pytest.mark.parametrize(
    "text", ["", "sha256:" + "0" * 64, "hmac-sha256:" + "0" * 63, "hmac-sha256:" + "g" * 64, "hmac-sha256"]
)
def test_parse_hash_rejects(text: str) -> None:
    assert keys.parse_hash(text) is None


def test_generated_secrets_are_unique_and_plausible() -> None:
    seen = {keys.generate_secret() for _ in range(200)}
    assert len(seen) == 200
    for secret in seen:
        assert secret.startswith("nx-") and len(secret) == 46
        assert keys.extract_key({"authorization": f"Bearer {secret}"}) == secret


def test_generate_secret_uses_injected_randomness() -> None:
    assert keys.generate_secret(lambda n: b"\x00" * n) == "nx-" + "A" * 43


@pytest.mark.parametrize(
    ("patterns", "model", "allowed"),
    [
        (("gpt-4o*",), "gpt-4o-mini", True),
        (("gpt-4o*",), "gpt-4", False),
        (("gpt-4o", "claude-*"), "claude-3-haiku", True),
        (("gpt-4o",), "gpt-4o-mini", False),
        (("gpt-?",), "gpt-4", True),
        (("*",), "anything", True),
        (("gpt-4o*",), "GPT-4O", False),
    ],
)
def test_globs(patterns: tuple[str, ...], model: str, allowed: bool) -> None:
    rule = keys.compile_globs(patterns)
    assert (rule is None or rule.fullmatch(model) is not None) is allowed


@given(st.binary(max_size=200), st.text(max_size=100))
def test_key_hasher_is_hmac_sha256(pepper: bytes, secret: str) -> None:
    import hmac

    expected = hmac.digest(pepper, secret.encode("utf-8", "surrogateescape"), "sha256")
    assert keys.KeyHasher(pepper)(secret) == expected == keys.digest(pepper, secret)
