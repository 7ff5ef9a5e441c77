"""The compiled body reading (nexus_authz/native/_body.pyx) against the reference, core.body.request_facts:
the same RequestFacts (every field, is_object included) for generated JSON bodies and their corruptions:
duplicate keys at every depth, escaped keys (`\\u006dodel`), surrogates, invalid UTF-8, NUL, huge numbers,
max_tokens as a float, bool, negative or string, nested objects, whitespace everywhere, a BOM, extra data,
and every prefix, complete or cut. The compiled reader answers only what it fully validated and hands
everything else to the reference, so it can never be more lenient: these tests are the proof."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nexus_authz import native
from nexus_authz.core import body as core_body
from nexus_authz.core import tokens
from nexus_authz.core.body import PARSE_BELOW, RequestFacts
from tests.helpers import json_valid, plain

if native.body is None:
    if os.environ.get(native.PURE_ENV, "") not in ("", "0"):
        pytest.skip(
            "NEXUS_AUTHZ_PURE is set: the compiled body reading is not loaded", allow_module_level=True
        )
    pytest.fail(f"the compiled body reading did not build or load ({native.WHY_PURE}): pip install -e .")

compiled: Callable[..., RequestFacts] = native.body.request_facts
reference = core_body.request_facts

OPTIONS = [
    {},
    {"precise": False},
    {"estimate_prompt": False},
    {"truncated": True},
    {"precise": False, "truncated": True},
]


def facts_tuple(facts: RequestFacts) -> tuple[Any, ...]:
    return (*[getattr(facts, f) for f in RequestFacts.__slots__], type(facts))  # is_object included


def assert_same(body: bytes) -> None:
    for kw in OPTIONS:
        want = facts_tuple(reference(body, **kw))
        got = facts_tuple(compiled(body, **kw))
        assert got == want, (body[:200], kw)


# -- a JSON writer with the freedom Python's json.dumps does not take --------------------------------------

WS = [" ", "\t", "\n", "\r", "  ", "\r\n", "\f", "\v", "\xa0"]  # the last three are not JSON whitespace
KEYS = [
    "model", "max_tokens", "max_completion_tokens", "max_output_tokens", "stream", "stream_options",
    "include_usage", "n", "messages", "role", "content", "data", "url", "image_url", "Model", "model ", "",
]  # fmt: skip
NUMBERS = [
    "0", "-0", "8", "-8", "8.0", "8.5", "1e3", "1E+2", "-1e-2", "0.0", "128", "129", "1" * 18, "1" * 19,
    "9" * 40, "1" * 70, "9007199254740992.0", "1e400", "NaN", "Infinity", "-Infinity", "01", "1.", ".5",
    "-", "1e", "+1", "0x10", "2" * 4400,
]  # fmt: skip


class Style(random.Random):
    """The writer's choices for one body: how often it escapes a character, and whether it may write a
    character json refuses (raw control characters, whitespace json does not skip)."""

    def __init__(self, seed: int, clean: bool = False) -> None:
        super().__init__(seed)
        self.escape = self.choice([0.0, 0.0, 0.0, 0.02] if clean else [0.0, 0.05, 0.3])
        self.odd = self.random() < (0.05 if clean else 0.3)


def write_string(s: str, rnd: Style) -> str:
    """A JSON string literal of `s`, each character raw or escaped at random."""
    out = ['"']
    for ch in s:
        r = rnd.random()
        if ch in '"\\' or ord(ch) < 0x20:
            out.append(json.dumps(ch)[1:-1] if not rnd.odd or r < 0.9 else ch)  # raw: a control character
        elif r < rnd.escape:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else json.dumps(ch)[1:-1])
        elif r < rnd.escape * 1.2:
            out.append(f"\\u{ord(ch):04X}" if ord(ch) < 0x10000 else ch)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def write(value: Any, rnd: Style, depth: int = 0) -> str:
    def ws() -> str:
        if rnd.odd and rnd.random() < 0.02:
            return rnd.choice(WS)
        return rnd.choice(WS[:6]) if rnd.random() < 0.15 else ""

    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Pairs):
        items = [
            ws() + write_string(k, rnd) + ws() + ":" + ws() + write(v, rnd, depth + 1) + ws()
            for k, v in value
        ]
        return "{" + ws() + ",".join(items) + ("," if items and rnd.odd and rnd.random() < 0.05 else "") + "}"
    if isinstance(value, list):
        return "[" + ws() + ",".join(ws() + write(v, rnd, depth + 1) + ws() for v in value) + "]"
    if isinstance(value, str):
        return write_string(value, rnd)
    return json.dumps(value)


class Raw:
    """A value written as it is (a number spelling json may or may not accept)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:20]!r})"


class Pairs(list):  # type: ignore[type-arg]
    """An object as (key, value) pairs: duplicates allowed."""


text = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=12),  # surrogates included
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(NUMBERS).map(Raw),
    text,
    st.sampled_from(["gpt-4o", "o3-mini", "gpt-4o-mini\u00e9", "\u6771\u4eac", "\U0001f600", "\ud800"]),
)
keys = st.one_of(st.sampled_from(KEYS), text)


def objects(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Pairs]:
    return st.lists(st.tuples(keys, children), max_size=6).map(Pairs)


values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4), objects(c)), max_leaves=20)


# The usual request: valid JSON with well-behaved values, fact keys once, so that the compiled reader
# answers it itself (most generated bodies); corruptions and the adversarial strategies above do the rest.
clean_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=12),
    st.sampled_from(["gpt-4o", "o3-mini", "gpt-4o-mini\u00e9", "\u6771\u4eac", "\U0001f600"]),
)
clean_keys = st.text(
    st.characters(min_codepoint=0x20, exclude_characters='"\\', exclude_categories=("Cs",)), max_size=8
)
clean_values = st.recursive(
    clean_scalars,
    lambda c: st.one_of(
        st.lists(c, max_size=4), st.dictionaries(clean_keys, c, max_size=4).map(lambda d: Pairs(d.items()))
    ),
    max_leaves=12,
)
FACT_VALUES = st.one_of(
    st.integers(-10, 10**6),
    st.none(),
    st.booleans(),
    clean_scalars,
    st.sampled_from(
        [
            n
            for n in NUMBERS
            if n not in ("NaN", "Infinity", "-Infinity", "01", "1.", ".5", "-", "1e", "+1", "0x10")
            and len(n) < 100
        ]
    ).map(Raw),
    st.sampled_from(["gpt-4o", "8", ""]),
    st.lists(st.tuples(st.sampled_from(["include_usage", "x"]), clean_scalars), max_size=3).map(Pairs),
)


@st.composite
def request_bodies(draw: st.DrawFn, valid: bool = False) -> bytes:
    """Mostly a request object with fact keys (some twice), then written loosely and sometimes corrupted
    (`valid`: only the usual request, never corrupted)."""
    clean = valid or draw(st.integers(0, 9)) < 6
    if clean:
        top: Any = Pairs(draw(st.dictionaries(clean_keys, clean_values, max_size=4)).items())
        for name in draw(st.sets(st.sampled_from(KEYS[:8]), max_size=6)):
            top.insert(draw(st.integers(0, len(top))), (name, draw(FACT_VALUES)))
        if draw(st.integers(0, 5)) == 0 and len(top) > 0:  # a duplicate key
            top.insert(draw(st.integers(0, len(top))), draw(st.sampled_from(list(top))))
    elif draw(st.integers(0, 9)) == 0:
        top = draw(values)
    else:
        top = Pairs(draw(objects(values)))
        for name in draw(st.lists(st.sampled_from(KEYS[:8]), max_size=5)):
            top.insert(draw(st.integers(0, len(top))), (name, draw(values)))
        if draw(st.booleans()):
            options = Pairs(
                draw(st.lists(st.tuples(st.sampled_from(["include_usage", "x"]), values), max_size=3))
            )
            top.append(("stream_options", options))
    rnd = Style(draw(st.integers(0, 2**32)), clean)
    raw = write(top, rnd)
    if not valid and draw(st.integers(0, 3)) == 0 and not (clean and draw(st.booleans())):
        raw = rnd.choice(WS[:6]) + raw + rnd.choice(WS[:6] + ["x", "}", "{}", "\x00"])
    data = raw.encode("utf-8", "surrogatepass")  # a lone surrogate written raw: not UTF-8
    corruption = -1 if valid else draw(st.integers(0, 29 if clean else 11))
    if corruption == 0 and data:
        at = draw(st.integers(0, len(data)))
        data = (
            data[:at]
            + draw(st.sampled_from([b"\x00", b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82"]))
            + data[at:]
        )
    elif corruption == 1:
        data = b"\xef\xbb\xbf" + data
    elif corruption == 2 and data:
        data = data[: draw(st.integers(0, len(data)))]
    elif corruption == 3:
        data = data.decode("utf-8", "surrogatepass").encode("utf-16-le", "surrogatepass")
    return data


@settings(max_examples=600)
@given(request_bodies())
@example(b'{"model":"a","mod\\u0065l":"b"}')
@example(b'{"\\u006dodel":"b","model":"a"}')
@example(b'{"model":"a","x":{"model":"b","model":"c"}}')
@example(b'{"stream_options":{"include_usage":true,"include_usage":false},"stream":true}')
@example(b'{"stream_options":{"include_usag\\u0065":true},"stream":true}')
@example(b'{"model":"gpt-4o","max_tokens":8.0,"n":2.0}')
@example(b'{"max_tokens":true,"n":-3,"max_completion_tokens":"9","max_output_tokens":12345678901234567890}')
@example(b'{"model":"\\ud800x","max_tokens":1e400}')
@example(b'\xef\xbb\xbf{"model":"gpt-4o"}')
@example(b'{"model":"gpt-4o"}\x00')
@example(b' \r\n\t{ "model" : "gpt-4o" , "n" : 0 } \n')
@example(b'{"model":"gpt-4o","max_tokens":NaN}')
def test_compiled_reading_equals_the_reference(body: bytes) -> None:
    assert_same(body)


@settings(max_examples=300)
@given(request_bodies(valid=True))
def test_compiled_reading_equals_the_reference_on_usual_requests(body: bytes) -> None:
    assert_same(body)


CHAT = json.dumps(
    {
        "model": "gpt-4o",
        "max_tokens": 256,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": 'caf\u00e9 \u6771\u4eac \\ "q" \U0001f600 ' * 3}],
        "n": 2,
    },
    ensure_ascii=False,
).encode()


@pytest.mark.parametrize(
    "body",
    [CHAT, json.dumps(json.loads(CHAT), indent=2).encode(), json.dumps(json.loads(CHAT)).encode()],
    ids=["raw-utf8", "indented", "escaped"],
)
def test_every_prefix_complete_or_cut(body: bytes) -> None:
    for end in range(len(body) + 1):
        assert_same(body[:end])


def test_large_and_blob_bodies() -> None:
    blob = "data:image/png;base64," + "QUJD" * 200
    for pad in (0, PARSE_BELOW):
        body = json.dumps(
            {
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": [{"image_url": {"url": blob}}]}],
                "p": "x" * pad,
            }
        ).encode()
        assert_same(body)
        assert_same(body[:-1])


def handed_over(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The bodies the compiled reader hands to the reference from now on (in the test), recorded."""
    calls: list[bytes] = []

    def spy(body: bytes, **kw: Any) -> RequestFacts:
        calls.append(body)
        return reference(body, **kw)

    assert native.body is not None
    monkeypatch.setattr(native.body, "_python_request_facts", spy)
    return calls


def test_the_compiled_reader_answers_the_usual_body_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without this the differential tests could pass with a reader that always hands over.
    calls = handed_over(monkeypatch)
    facts = compiled(CHAT, precise=False)
    assert (facts.model, facts.max_tokens, facts.stream, facts.include_usage, facts.n) == (
        "gpt-4o",
        256,
        True,
        True,
        2,
    )
    assert calls == []
    assert compiled(b'{"model":"a","model":"b"}').problem == core_body.DUPLICATE_KEY
    assert compiled(b'\xef\xbb\xbf{"model":"a"}').problem is not None
    assert compiled(b'{"mod\\u0065l":"a"}').model == "a"  # decoded by the reference
    assert len(calls) == 3


def test_engines_use_the_compiled_reading() -> None:
    assert core_body.read_facts is compiled


def test_a_repeated_model_is_the_same_str_and_any_other_its_own() -> None:
    """The compiled reading hands the last (ASCII) model str over again when the body's bytes name the same
    model (no str decoded per request); any other model, shorter, longer or non-ASCII, is decoded."""

    def model_of(model: str) -> object:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
        facts = compiled(body, estimate_prompt=False, precise=False)
        assert facts.model == model == core_body.request_facts(body, estimate_prompt=False).model
        return facts.model

    first = model_of("gpt-4o-mini")
    assert model_of("gpt-4o-mini") is first
    for other in ("gpt-4o-minj", "gpt-4o-min", "gpt-4o-mini2", "", "gpt-4o-mini"):
        model_of(other)
    assert model_of("gpt-4o-mini") is model_of("gpt-4o-mini")
    accented = model_of("modèle")
    assert model_of("modèle") == accented  # non-ASCII: decoded each time, and never taken for the last
    assert model_of("gpt-4o-mini") == "gpt-4o-mini"


def test_the_facts_cache_gives_the_references_object_for_each_shape_in_any_order() -> None:
    """The compiled reading probes core.body's facts cache with the last key again when the fields repeat:
    each shape's RequestFacts is the one the reference's cache holds, through repeats, other shapes in
    between, and the cache emptied (as when full) under a remembered key."""

    def body(model: str | None, cap: int | None, n: int, stream: bool) -> bytes:
        doc: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "n": n}
        if model is not None:
            doc["model"] = model
        if cap is not None:
            doc["max_tokens"] = cap
        if stream:
            doc["stream"] = True
        return json.dumps(doc).encode()

    shapes = [
        ("gpt-4o", 16, 1, False),
        ("gpt-4o", 17, 1, False),
        (None, 16, 1, False),
        ("gpt-4o", None, 1, False),
    ]
    shapes += [("gpt-4o", 16, 2, False), ("gpt-4o", 16, 1, True), ("gpt-4o-mini", 16, 1, False)]
    rng = random.Random(15)
    order = [rng.choice(shapes) for _ in range(300)]
    order[100:104] = [shapes[0]] * 4
    for i, shape in enumerate(order):
        if i in (50, 101, 102):
            core_body._FACTS_CACHE.clear()
        data = body(*shape)
        got = compiled(data, estimate_prompt=False, precise=False)
        want = reference(data, estimate_prompt=False, precise=False)
        assert got == want and got is want, (i, shape)


def test_a_string_reads_as_the_reference_with_a_special_byte_at_every_position_of_a_word() -> None:
    """The string scan skips plain text 8 bytes at a time (native/_plain8.h): every byte value alone at
    each position of runs of plain bytes (7, 8, 9 and 16 among them), in a prompt's text (at two offsets
    of a word), the model's value and a key: the same facts as the reference, and the same refusals
    (handed to it)."""
    valid = invalid = 0
    for run in (*range(10), 15, 16, 17):
        for at in range(run + 1):
            for byte in range(256):
                text = plain(at, run) + bytes([byte]) + plain(run - at, at)
                for body in (
                    b'{"messages":[{"role":"user","content":"' + text + b'"}],"model":"gpt-4o-mini"}',
                    b'{"messages":[{"role":"user","content":"xyz' + text + b'"}],"max_tokens":5}',
                    b'{"model":"gpt-' + text + b'","max_tokens":5}',
                    b'{"' + text + b'":1,"model":"m"}',
                ):
                    assert_same(body)
                    if json_valid(body):
                        valid += 1
                    else:
                        invalid += 1
    assert valid > 10_000 and invalid > 10_000  # both answers are exercised


# -- bodies over PARSE_BELOW: the reference reads them by its key scan (core/body.py `_scan`), not a parse;
# the compiled reader answers only where the two readings agree (count_key), and must then agree

_FILL = b'"fill":"' + b"lorem ipsum " * (PARSE_BELOW // 12 + 1) + b'"'


def _list(item: bytes, count: int) -> bytes:
    return b"[" + b",".join([item] * count) + b"]"


# members that make a body large, each with what may change the scan's reading: nested fact and blob keys
# (up to and past the scan's limits: 64 fact keys, 512 keys of its names), escaped keys, strings as long
# as a blob under a blob key, escaped letters (the reference then parses), non-ASCII text
LARGE = [
    _FILL,
    b'"fill":"' + "caf\u00e9 \u6771\u4eac \U0001f600 ".encode() * (PARSE_BELOW // 16 + 1) + b'"',
    b'"input":' + _list(b'{"role":"user","content":"' + b"hello world " * 30 + b'"}', 50),
    # with CHAT's 5 top-level fact keys: 64 fact keys, then 65 (ambiguous)
    b'"tools":' + _list(b'{"model":1}', 59) + b"," + _FILL,
    b'"tools":' + _list(b'{"model":1}', 60) + b"," + _FILL,
    # with CHAT's: 512 keys of the scan's names, then 513 (ambiguous)
    b'"imgs":' + _list(b'{"url":1,"data":2}', 253) + b',"x":{"url":1},' + _FILL,
    b'"imgs":' + _list(b'{"url":1,"data":2}', 254) + b"," + _FILL,
    b'"img":{"url":"' + b"QUJD" * 64 + b'"},' + _FILL,  # 256 bytes of bare base64: a blob
    b'"img":{"url":"' + b"QUJD" * 63 + b'xyz"},' + _FILL,  # 255 bytes: not one
    b'"img":{"image_url":"data:image/png;base64,' + b"QUJD" * 200 + b'"},' + _FILL,
    b'"img":{"file_data":"' + b"x" * 300 + b'"},' + _FILL,  # as long as a blob (not base64)
    b'"esc":{"a\\u0041":1},' + _FILL,  # an escaped key below the top
    b'"esc":{"x\\"model":1},' + _FILL,  # the scan's regex matches at its escaped quote
    b'"fill":"\\u0041 an escaped letter' + b" padding" * (PARSE_BELOW // 8) + b'"',  # the reference parses
    b'"fill":"quote \\" and backslash \\\\' + b" padding" * (PARSE_BELOW // 8) + b'"',
    b'"deep":' + b"[" * 70 + b"]" * 70 + b"," + _FILL,  # deeper than the compiled reader goes
]


# blobs in a small body (the reference looks for them only with a marker: "base64," or "data"): a data:
# URI, Anthropic's source.data, OpenAI's input_audio.data and file_data, bare base64 under "url" (found
# only with a marker elsewhere), 255 and 256 bytes, the first KB out of the alphabet, two images, and an
# escaped key (the reference's scan then matches at an escaped quote: left to it)
_B64 = b"QUJD" * 100
BLOBS = [
    b'"content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,' + _B64 + b'"}}]',
    b'"source":{"type":"base64","media_type":"image/png","data":"' + _B64 + b'"}',
    b'"input_audio":{"data":"' + _B64 + b'","format":"wav"}',
    b'"file":{"file_data":"data:application/pdf;base64,' + _B64 + b'"}',
    b'"img":{"url":"' + _B64 + b'"},"data":1',
    b'"img":{"url":"' + _B64 + b'"}',  # no marker: no blob for the reference
    b'"img":{"url":"' + b"QUJD" * 63 + b'xyz"},"data":1',
    b'"img":{"url":"' + b"QUJD" * 64 + b'"},"data":1',
    b'"img":{"url":"data:x;base64,' + b"QUJD" * 100 + b'!"},"x":{"data":"' + b"x" * 2000 + b'"}',
    b'"a":{"url":"data:x;base64,' + _B64 + b'"},"b":{"url":"data:x;base64,' + _B64 + b'"}',
    b'"a":{"url":"data:x;base64,' + _B64 + b'"},"b":{"m\\u0041":1}',  # an escaped key: left to it
]


@pytest.mark.parametrize("member", BLOBS, ids=range(len(BLOBS)))
def test_a_request_with_blobs_reads_as_the_reference(member: bytes) -> None:
    for body in (_with(member, CHAT), _with(member, b'{"model":"m"}'), _with(member + b"," + _FILL, CHAT)):
        assert body is not None
        assert_same(body)


@settings(max_examples=200, deadline=None)
@given(request_bodies(), st.sampled_from(BLOBS), st.booleans())
def test_requests_with_blobs_read_as_the_reference(body: bytes, member: bytes, large: bool) -> None:
    with_blob = _with(member + (b"," + _FILL if large else b""), body)
    if with_blob is not None:
        assert_same(with_blob)


def _with(member: bytes, body: bytes) -> bytes | None:
    """`body` with `member` first in its top-level object (None: `body` is not an object)."""
    stripped = body.lstrip(b" \t\r\n")
    if not stripped.startswith(b"{"):
        return None
    rest = stripped[1:].lstrip(b" \t\r\n")
    return b"{" + member + (b"" if rest.startswith(b"}") else b",") + rest


@settings(max_examples=300, deadline=None)
@given(request_bodies(), st.sampled_from(LARGE))
def test_large_bodies_read_as_the_reference(body: bytes, member: bytes) -> None:
    large = _with(member, body)
    if large is not None:
        assert len(large) > PARSE_BELOW
        assert_same(large)


@pytest.mark.parametrize("member", LARGE, ids=range(len(LARGE)))
def test_a_large_request_reads_as_the_reference(member: bytes) -> None:
    body = _with(member, CHAT)
    assert body is not None
    assert_same(body)
    assert_same(body.replace(b'"stream":true', b'"stream":true,"stream":false'))  # a duplicate
    assert_same(body.replace(b'"n":2', b'"n":2.0'))  # a float the reference reads


def test_the_compiled_reader_answers_a_large_usual_body_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 60 KB chat history (and the other large bodies both readings agree on) is read in C."""
    calls = handed_over(monkeypatch)
    turns = [{"role": "user" if i % 2 else "assistant", "content": "hello world " * 50} for i in range(100)]
    history = json.dumps({"model": "gpt-4o", "max_tokens": 256, "stream": True, "messages": turns}).encode()
    assert history is not None and len(history) > 60_000
    facts = compiled(history, precise=False)
    assert (facts.model, facts.max_tokens, facts.stream, facts.n) == ("gpt-4o", 256, True, 1)
    assert facts.prompt_tokens == reference(history, precise=False).prompt_tokens
    for i in (0, 1, 2, 3, 5, 7, 8, 9, 10, 13, 14):  # LARGE's members the compiled reader reads itself
        compiled(_with(LARGE[i], CHAT) or b"", precise=False)
    for blob in BLOBS[:-1]:  # and the small bodies with blobs
        compiled(_with(blob, CHAT) or b"", precise=False)
    assert calls == []
    handed = (4, 6, 11, 12, 15)  # and the ones it leaves to the reference
    for i in handed:
        compiled(_with(LARGE[i], CHAT) or b"", precise=False)
    assert len(calls) == len(handed)


# -- the prompt estimate of a body without blobs (the compiled reading's, in C) ------------------------------

ESTIMATE_PIECES = [
    *(
        b"hello",
        b" ",
        b"world",
        b"123",
        b"!!",
        b"...",
        b"\n",
        b"\r\n",
        b"\t",
        b"\x00",
        b"{",
        b"}",
        b":",
        b",",
    ),
    *(b"\\n", b"\\t", b'\\"', b"\\\\", b"\\", b"u0041", b"\\u0041", b"\\u6771", b"\\ud83d\\ude00", b"\\u12g"),
    *(b'"role"', b'"role"role"', b"\x80", b"\xff", b"\xc0", b"\xed\xa0\x80"),
    *(
        s.encode()
        for s in ("caf\u00e9", "\u6771\u4eac", "\U0001f600", "\u2019", "\u041f\u0440\u0438", "\u0e01")
    ),
]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(ESTIMATE_PIECES), max_size=200), st.integers(0, 3), st.binary(max_size=64))
def test_the_prompt_estimate_is_the_references(pieces: list[bytes], repeat: int, noise: bytes) -> None:
    """tokens.prompt_estimate(body, []) to the token, below and above SAMPLE_ABOVE (its samples joined: an
    escape across two of them), escapes cut and corrected, every byte class."""
    assert native.body is not None
    body = (b"".join(pieces) + noise) * (1 + repeat * 40)
    assert native.body.prompt_estimate(body) == tokens.prompt_estimate(body, [])
