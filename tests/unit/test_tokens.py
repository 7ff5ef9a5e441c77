"""Token counting: exact counts of known strings, the chat prompt formula, the estimate's error and
robustness, and that the exact encoding loads without any network access."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_authz.core import tokens
from nexus_authz.core.tokens import count_chat_prompt, count_tokens, estimate_tokens


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("hello world", 2),
        ("tiktoken is great!", 6),
        ("<|endoftext|>", 7),  # special-token text counts as plain text, never raises
        ("東京", 3),
    ],
)
def test_count_tokens_known_strings(text: str, expected: int) -> None:
    assert count_tokens(text) == expected


def test_count_tokens_handles_lone_surrogates_and_non_str() -> None:
    assert count_tokens("a\ud800b") > 0
    assert count_tokens(b"bytes are not text") == 0  # type: ignore[arg-type]


def test_long_runs_are_counted_in_slices_close_to_exact() -> None:
    # 1,024 'a's are exactly 128 tokens; slicing a long run at 1,024 characters keeps that exact.
    assert count_tokens("a" * 1024) == 128
    assert count_tokens("a" * 10_240) == 1280
    mixed = "word " * 1000 + "x" * 9000 + " tail"
    assert (
        abs(count_tokens(mixed) - (count_tokens("word " * 1000) + count_tokens("x" * 9000 + " tail"))) <= 10
    )


def test_count_chat_prompt_matches_the_openai_cookbook_example() -> None:
    # OpenAI's "How to count tokens with tiktoken": 129 prompt tokens for gpt-3.5-turbo-0613 / gpt-4-0613.
    messages = [
        {
            "role": "system",
            "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
            "into plain English.",
        },
        {
            "role": "system",
            "name": "example_user",
            "content": "New synergies will help drive top-line growth.",
        },
        {
            "role": "system",
            "name": "example_assistant",
            "content": "Things working well together will increase revenue.",
        },
        {
            "role": "system",
            "name": "example_user",
            "content": "Let's circle back when we have more bandwidth to touch base on opportunities for "
            "increased leverage.",
        },
        {
            "role": "system",
            "name": "example_assistant",
            "content": "Let's talk later when we're less busy about how to do better.",
        },
        {
            "role": "user",
            "content": "This late pivot means we don't have time to boil the ocean for the client "
            "deliverable.",
        },
    ]
    assert count_chat_prompt(messages) == 129


def test_count_chat_prompt_multimodal_and_tool_calls() -> None:
    text_only = count_chat_prompt([{"role": "user", "content": "Describe this."}])
    with_image = count_chat_prompt(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe this."},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                ],
            }
        ]
    )
    assert with_image == text_only + tokens.IMAGE_TOKENS
    calls = count_chat_prompt(
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
                ],
            }
        ]
    )
    assert calls == 3 + count_tokens("assistant") + count_tokens("f") + count_tokens('{"a": 1}') + 3
    assert count_chat_prompt([]) == 3
    assert count_chat_prompt(["not a message", {"role": "user"}]) == 3 + 3 + 1  # type: ignore[list-item]


SAMPLES = {
    "english": (
        "The quick brown fox jumps over the lazy dog. Rate limits protect the upstream from bursts, "
        "while token budgets protect the invoice: both must hold under concurrency.\n"
    )
    * 8,
    "code": (
        "def settle(reservation: Reservation, usage: Usage) -> int:\n"
        "    delta = usage.total_tokens - reservation.tokens\n"
        "    if delta > 0:\n        return bucket.take(delta)\n    return bucket.give(-delta)\n"
    )
    * 6,
    "cjk": "东京是日本的首都，也是世界上人口最多的城市之一。今日はいい天気ですね。서울은 한국의 수도입니다。"
    * 6,
    "json": '{"model":"gpt-4o","messages":[{"role":"user","content":"Hello, how are you?"}],"stream":true}\n'
    * 8,
}


@pytest.mark.parametrize("category", sorted(SAMPLES))
def test_estimate_is_close_to_exact(category: str) -> None:
    text = SAMPLES[category]
    exact = count_tokens(text)
    estimate = estimate_tokens(text)
    assert abs(estimate - exact) / exact < 0.25, (estimate, exact)
    assert estimate_tokens(text.encode()) == estimate  # bytes and str agree


def test_estimate_edge_cases() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens(b"") == 0
    assert estimate_tokens("a") == 1
    assert estimate_tokens(bytearray(b"hello world")) == estimate_tokens("hello world")  # type: ignore[arg-type]
    assert estimate_tokens(None) == 0  # type: ignore[arg-type]
    assert estimate_tokens("\ud800") >= 1


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(), st.binary()))
def test_estimate_never_raises_and_is_non_negative(value: str | bytes) -> None:
    result = estimate_tokens(value)
    assert result >= 0
    assert (result == 0) == (len(value) == 0)


def test_encoding_loads_offline_without_fetching(tmp_path: Path) -> None:
    """A fresh process with an empty TIKTOKEN_CACHE_DIR, no sockets and no `requests` still counts."""
    cache = tmp_path / "cache"
    cache.mkdir()
    script = textwrap.dedent(
        """
        import socket, sys
        def refuse(*args, **kwargs):
            raise OSError("network access attempted")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        sys.modules["requests"] = None  # any download path imports requests first
        from nexus_authz.core import tokens
        assert tokens._encoding is None  # lazy: nothing loaded at import
        print(tokens.count_tokens("hello world"), tokens.count_tokens("hello world"))
        assert tokens._get_encoding() is tokens._get_encoding()
        """
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache)}
    env.pop("DATA_GYM_CACHE_DIR", None)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "2"]
    # tiktoken may keep a copy of the bundled file in its cache, but nothing else appears there.
    assert len(list(cache.iterdir())) <= 1


def test_runs_just_below_the_slicing_threshold_stay_linear() -> None:
    # 4,095-character runs: a non-anchored `\S{4096,}` search would rescan each run from every offset.
    text = ("x" * 4095 + " ") * 40
    assert count_tokens(text) == len(tokens._get_encoding().encode_ordinary(text))  # not sliced: exact
