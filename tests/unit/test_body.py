"""Request-side facts and the include_usage rewrite: the scan path for large bodies agrees with a real
JSON parse, decoys do not fool it, and bad input yields a defined result."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_authz.core import body as body_mod
from nexus_authz.core.body import (
    PARSE_BELOW,
    RequestFacts,
    inject_include_usage,
    loads_bounded,
    request_facts,
)
from nexus_authz.core.tokens import IMAGE_TOKENS, estimate_tokens

pytestmark = pytest.mark.usefixtures("body_reading")  # both body readings: tests/native_params.py

PAD = "All work and no play makes Jack a dull boy. " * ((PARSE_BELOW // 44) + 10)  # forces the scan path


def dumps(obj: object, *, spaced: bool = False) -> bytes:
    return json.dumps(obj, separators=(", ", ": ") if spaced else (",", ":"), ensure_ascii=False).encode()


def facts_without_estimate(body: bytes) -> RequestFacts:
    return request_facts(body, estimate_prompt=False)


@pytest.mark.parametrize("pad", ["", PAD], ids=["parsed", "scanned"])
def test_openai_chat_request(pad: str) -> None:
    body = dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi " + pad}],
            "max_completion_tokens": 256,
            "stream": True,
            "stream_options": {"include_usage": True},
            "n": 2,
        }
    )
    assert facts_without_estimate(body) == RequestFacts(
        model="gpt-4o-mini", max_tokens=256, stream=True, include_usage=True, n=2
    )


@pytest.mark.parametrize("pad", ["", PAD], ids=["parsed", "scanned"])
def test_anthropic_and_responses_requests(pad: str) -> None:
    anthropic = dumps(
        {
            "max_tokens": 1024,
            "messages": [{"role": "user", "content": pad or "x"}],
            "model": "claude-sonnet-4-5",
        },
        spaced=True,
    )
    assert facts_without_estimate(anthropic) == RequestFacts(model="claude-sonnet-4-5", max_tokens=1024)
    responses = dumps(
        {"model": "o4-mini", "input": pad or "Tell me a story", "max_output_tokens": 900, "stream": True}
    )
    assert facts_without_estimate(responses) == RequestFacts(model="o4-mini", max_tokens=900, stream=True)


@pytest.mark.parametrize("pad", ["", PAD], ids=["parsed", "scanned"])
def test_decoys_in_content_and_tool_schemas_are_ignored(pad: str) -> None:
    body = dumps(
        {
            "messages": [
                {"role": "user", "content": 'Reply with {"model": "gpt-3.5", "stream": false} please ' + pad},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"function": {"arguments": '{"n": 9}'}}],
                },
            ],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "pick",
                        "parameters": {
                            "type": "object",
                            "properties": {
                                "model": {"type": "string"},
                                "stream": {"type": "boolean"},
                                "n": {},
                            },
                        },
                    },
                }
            ],
            "model": "gpt-4o",
            "stream": True,
            "max_tokens": 10,
        }
    )
    assert facts_without_estimate(body) == RequestFacts(model="gpt-4o", max_tokens=10, stream=True)


def test_scan_path_with_nested_decoys_only() -> None:
    # `model` exists only nested (in an Anthropic tool_use input): the top-level answer is "absent".
    body = dumps(
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "input": {"model": "x", "stream": True}}],
                }
            ],
            "system": PAD,
        }
    )
    assert facts_without_estimate(body) == RequestFacts()


def test_duplicate_top_level_key_is_a_problem_not_a_guess() -> None:
    for pad in ("", PAD):
        body = b'{"model":"cheap","messages":[{"role":"user","content":"' + pad.encode() + b'"}],"model":"x"}'
        facts = facts_without_estimate(body)
        assert facts.model is None and facts.problem == body_mod.DUPLICATE_KEY


def test_caps_take_the_largest_and_ignore_nonsense() -> None:
    body = dumps({"model": "m", "max_tokens": 100, "max_completion_tokens": 300})
    assert facts_without_estimate(body).max_tokens == 300
    for value in (-1, "100", True, None, 1.5, [1]):
        assert facts_without_estimate(dumps({"max_tokens": value})).max_tokens is None
    assert facts_without_estimate(dumps({"max_tokens": 64.0})).max_tokens == 64
    assert facts_without_estimate(dumps({"n": 0})).n == 1
    assert facts_without_estimate(dumps({"n": 10_000})).n == 1
    assert facts_without_estimate(dumps({"model": 5, "stream": "yes"})) == RequestFacts()


def test_escaped_model_name_is_decoded() -> None:
    body = dumps({"model": 'we\\ird "name" ü', "messages": [], "system": PAD})
    assert facts_without_estimate(body).model == 'we\\ird "name" ü'


@st.composite
def request_bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.text(max_size=20))
    decoy_keys = st.sampled_from(
        ["model", "stream", "max_tokens", "n", "stream_options", "include_usage", "x"]
    )
    nested = st.recursive(
        scalars,
        lambda inner: st.dictionaries(decoy_keys, inner, max_size=3) | st.lists(inner, max_size=3),
        max_leaves=8,
    )
    obj: dict[str, Any] = {}
    for key in draw(
        st.permutations(["model", "stream", "max_tokens", "stream_options", "n", "messages", "pad"])
    ):
        if not draw(st.booleans()):
            continue
        if key == "messages":
            obj[key] = [{"role": "user", "content": draw(st.text(max_size=30)), "extra": draw(nested)}]
        elif key == "pad":
            obj[key] = PAD if draw(st.booleans()) else "short"
        elif key == "stream_options":
            obj[key] = draw(st.dictionaries(decoy_keys, scalars, max_size=2) | scalars)
        else:
            obj[key] = draw(st.one_of(scalars, nested))
    return dumps(obj, spaced=draw(st.booleans())), obj


@settings(max_examples=300, deadline=None)
@given(request_bodies())
def test_facts_agree_with_a_json_parse(case: tuple[bytes, dict[str, Any]]) -> None:
    body, obj = case
    facts = facts_without_estimate(body)
    model = obj.get("model")
    assert facts.model == (model if isinstance(model, str) else None)
    assert facts.stream is (obj.get("stream") is True)
    options = obj.get("stream_options")
    assert facts.include_usage is (isinstance(options, dict) and options.get("include_usage") is True)
    cap = obj.get("max_tokens")
    assert facts.max_tokens == (cap if type(cap) is int and cap >= 0 else None)
    n = obj.get("n")
    assert facts.n == (n if type(n) is int and 1 <= n <= 128 else 1)


def test_prompt_estimate_charges_blobs_not_their_bytes() -> None:
    text = "What is in this picture? Describe it in detail."
    image = "data:image/png;base64," + "iVBORw0KGgoAAAANSUhEUgAA" * 20_000
    body = dumps(
        {
            "model": "gpt-4o",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": text},
                        {"type": "image_url", "image_url": {"url": image}},
                    ],
                }
            ],
        }
    )
    without = dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}
    )
    prompt = request_facts(body).prompt_tokens
    assert IMAGE_TOKENS < prompt < IMAGE_TOKENS + 2 * request_facts(without).prompt_tokens
    anthropic = dumps(
        {
            "model": "claude",
            "max_tokens": 5,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/" * 5000},
                        },
                        {"type": "text", "text": text},
                    ],
                }
            ],
        }
    )
    assert IMAGE_TOKENS < request_facts(anthropic).prompt_tokens < IMAGE_TOKENS + 100


def test_prompt_estimate_of_large_bodies_is_sampled_but_close() -> None:
    body = dumps({"model": "m", "messages": [{"role": "user", "content": PAD * 4}]})
    assert len(body) > body_mod.SAMPLE_ABOVE
    full = estimate_tokens(body)
    assert abs(request_facts(body).prompt_tokens - full) / full < 0.05
    assert request_facts(body, estimate_prompt=False).prompt_tokens == 0


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"garbage",
        b"\xff\xfe\x00",
        b"[1,2,3]",
        b'{"model": ',
        b'{"model": "x"',
        b"{" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b'{"model":"\xff\xfe"}',
        b'{"model":"x","messages":[' + b"{" * 50_000 + b"]}",
    ],
)
def test_malformed_bodies_give_defined_facts(body: bytes) -> None:
    facts = request_facts(body)
    assert facts.prompt_tokens == estimate_tokens(body) or facts.prompt_tokens > 0
    assert facts.max_tokens is None and facts.stream is False
    assert inject_include_usage(body) is None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_never_raise(body: bytes) -> None:
    assert isinstance(request_facts(body), RequestFacts)
    inject_include_usage(body)
    loads_bounded(body)


def test_non_bytes_input() -> None:
    assert request_facts("text") == RequestFacts()  # type: ignore[arg-type]
    assert inject_include_usage("text") is None  # type: ignore[arg-type]
    assert loads_bounded(b"1" * 10, max_bytes=5) is None


# --- include_usage injection ------------------------------------------------------------------------


@pytest.mark.parametrize("pad", ["", PAD], ids=["parsed", "scanned"])
@pytest.mark.parametrize("spaced", [False, True])
def test_inject_splices_when_absent(pad: str, spaced: bool) -> None:
    request = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi" + pad}], "stream": True}
    body = b"  \n" + dumps(request, spaced=spaced)
    injected = inject_include_usage(body)
    assert injected is not None
    assert injected.endswith(body.lstrip()[1:])  # every byte after the brace is untouched
    assert json.loads(injected) == {**request, "stream_options": {"include_usage": True}}
    assert inject_include_usage(injected) is None
    assert request_facts(injected, estimate_prompt=False).include_usage


@pytest.mark.parametrize("pad", ["", PAD], ids=["parsed", "scanned"])
def test_inject_sets_false_or_missing_flag_and_keeps_other_options(pad: str) -> None:
    for options in ({"include_usage": False}, {}, {"include_obfuscation": False}, None):
        request = {"model": "m", "prompt": "p" + pad, "stream": True, "stream_options": options}
        injected = inject_include_usage(dumps(request))
        assert injected is not None
        expected = {**(options or {}), "include_usage": True}
        assert json.loads(injected)["stream_options"] == expected
        assert json.loads(injected)["prompt"] == request["prompt"]


@pytest.mark.parametrize("pad", ["", PAD], ids=["parsed", "scanned"])
def test_inject_leaves_other_requests_alone(pad: str) -> None:
    cases = [
        {"model": "m", "messages": [{"role": "user", "content": pad}]},  # not streaming
        {"model": "m", "messages": [], "stream": False, "x": pad},
        {"model": "m", "input": "hi" + pad, "stream": True},  # Responses API: usage always arrives
        {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}, "x": pad},
        {"model": "m", "tools": [{"messages": [], "stream": True}], "x": pad},  # only nested
    ]
    for request in cases:
        assert inject_include_usage(dumps(request)) is None, request


def test_unterminated_escaped_quotes_do_not_backtrack() -> None:
    # A key between two runs of escaped quotes that never close: a string regex that handles escapes
    # itself would rescan the run from every quote (quadratic); escapes are removed first instead.
    run = b'\\"' * 100_000
    body = b'{"x":"' + run + b'"model":"m","y":"' + run + b'"}'
    assert len(body) > PARSE_BELOW
    facts = request_facts(body)
    assert facts.max_tokens is None and facts.stream is False
    assert inject_include_usage(body) is None
