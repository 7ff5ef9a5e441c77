"""The policy's `rate_limit_headers`: which header families (OpenAI's x-ratelimit-*, IETF's ratelimit /
ratelimit-policy) answers carry. Parsed with clear errors; the default is both (today's answers); any
subset leaves the others out of every answer, allowed or refused, and `retry-after` on a denial stays;
a config reload changes it in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nexus_authz.core.errors import ConfigError
from nexus_authz.core.limits import WindowStatus, make_limit
from nexus_authz.core.model import Decision, Request
from nexus_authz.core.ratelimit_headers import BOTH, IETF, OPENAI, rate_limit_headers
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings, parse_settings
from tests.helpers import KeySpec, write_config

OPENAI_NAMES = {
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
}
IETF_NAMES = {"ratelimit", "ratelimit-policy"}
LIMITS = [{"requests": 2, "per": "minute"}, {"tokens": 10**6, "per": "day"}]
ALICE = KeySpec("alice", extra={"limits": LIMITS})


def _families(text: str) -> tuple[str, ...]:
    return parse_settings(text, "nexus.yaml", {}).policy.rate_limit_headers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{}\n", ("openai", "ietf")),
        ("rate_limit_headers: [openai, ietf]\n", ("openai", "ietf")),
        ("rate_limit_headers: [ietf, openai]\n", ("ietf", "openai")),
        ("rate_limit_headers: [openai]\n", ("openai",)),
        ("rate_limit_headers: [ietf]\n", ("ietf",)),
        ("rate_limit_headers: []\n", ()),
    ],
)
def test_the_field_takes_any_subset_and_defaults_to_both(text: str, expected: tuple[str, ...]) -> None:
    assert _families(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            "rate_limit_headers: [openai, draft]\n",
            "nexus.yaml:1: rate_limit_headers: unknown header family 'draft': "
            "expected a list of openai, ietf",
        ),
        ("rate_limit_headers: [openai, openai]\n", "rate_limit_headers: 'openai' is listed twice"),
        ("rate_limit_headers: openai\n", "rate_limit_headers: expected a list of openai, ietf"),
        ("rate_limit_headers: {openai: true}\n", "got a mapping"),
        ("rate_limit_headers: [[openai]]\n", "got a list in the list"),
        ("rate_limit_headers: true\n", "got a boolean"),
    ],
)
def test_bad_choices_are_config_errors_naming_file_line_field_and_what_is_allowed(
    text: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "nexus.yaml", {})
    assert fragment in str(info.value)
    assert "[] for none" in str(info.value)


def test_the_reference_leaves_out_exactly_the_families_not_chosen() -> None:
    rpm = make_limit("requests", 10, "minute")
    tpd = make_limit("tokens", 10**6, "day")
    statuses = (WindowStatus(rpm, 10, 0, 6.0, 6.0, False), WindowStatus(tpd, 10**6, 5, 1.0, 0.0, True))
    for denied in (False, True):
        both = rate_limit_headers(statuses, denied=denied)
        assert {n for n, _ in both} == OPENAI_NAMES | IETF_NAMES | ({"retry-after"} if denied else set())
        assert rate_limit_headers(statuses, denied=denied, families=BOTH) == both
        for families, kept in ((OPENAI, OPENAI_NAMES), (IETF, IETF_NAMES), (0, set())):
            expected = [h for h in both if h[0] in kept or h[0] == "retry-after"]
            assert rate_limit_headers(statuses, denied=denied, families=families) == expected


def _check(engine: Engine, secret: str, n: int) -> Decision:
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {"authorization": f"Bearer {secret}"}
    return engine.check(Request("POST", "/v1/chat/completions", headers, body, request_id=f"r{n}"))


def _names(decision: Decision) -> set[str]:
    return {name for name, _ in decision.response_headers} & (OPENAI_NAMES | IETF_NAMES | {"retry-after"})


@pytest.mark.parametrize(
    ("choice", "kept"),
    [
        (None, OPENAI_NAMES | IETF_NAMES),
        ("[openai, ietf]", OPENAI_NAMES | IETF_NAMES),
        ("[openai]", OPENAI_NAMES),
        ("[ietf]", IETF_NAMES),
        ("[]", set()),
    ],
)
def test_answers_carry_the_chosen_families_and_a_denial_its_retry_after(
    tmp_path: Path, choice: str | None, kept: set[str]
) -> None:
    extra = "ledger:\n  backend: memory\n" + (f"rate_limit_headers: {choice}\n" if choice else "")
    engine = Engine.from_settings(load_settings(str(write_config(tmp_path, ALICE, extra=extra))))
    first, second, refused = (_check(engine, ALICE.secret, i) for i in range(3))
    assert first.allowed and second.allowed and not refused.allowed
    assert _names(first) == kept and _names(second) == kept  # the fast path's answer too
    assert _names(refused) == kept | {"retry-after"}


def test_a_config_reload_changes_the_families_in_place(tmp_path: Path) -> None:
    config = write_config(tmp_path, ALICE, extra="ledger:\n  backend: memory\n")
    engine = Engine.from_settings(load_settings(str(config)))
    assert _names(_check(engine, ALICE.secret, 0)) == OPENAI_NAMES | IETF_NAMES
    config.write_text(config.read_text() + "rate_limit_headers: [openai]\n")
    assert engine.reload_config(force=True)
    assert _names(_check(engine, ALICE.secret, 1)) == OPENAI_NAMES
    assert _names(_check(engine, ALICE.secret, 2)) == {"retry-after"} | OPENAI_NAMES
    config.write_text(config.read_text().replace("[openai]", "[]"))
    assert engine.reload_config(force=True)
    assert _names(_check(engine, ALICE.secret, 3)) == {"retry-after"}
