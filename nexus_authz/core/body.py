"""Request bodies on the hot path: the few facts a decision needs, and the include_usage rewrite.

A Check needs the model, the token cap, the streaming flags and a prompt estimate of an LLM request.
Bodies up to PARSE_BELOW (16 KiB) are simply json-parsed (~1.5 µs per KB). Larger ones are not: one
regex pass finds every candidate key, a key counts when it is unescaped, followed by a colon, and a
bracket count over the shorter side of the body proves it sits at depth 1, and its scalar value is read
in place; only when that is ambiguous (a duplicate key, too many candidates, an unexpected value) is the
body parsed, and only up to MAX_PARSE_BYTES. Nesting depth is bounded by the interpreter's recursion
limit, which json raises as RecursionError and we treat as malformed. Nothing here raises.

Also the shared bounded-JSON helper the response side (usage.py) uses.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from nexus_authz.core.errors import NOT_UTF8

# multipart/form-data bodies are read by their structure in their own module; re-exported here
from nexus_authz.core.multipart import is_multipart, multipart_model
from nexus_authz.core.tokens import SAMPLE_ABOVE, prompt_estimate

__all__ = [
    "MAX_PARSE_BYTES",
    "is_multipart",
    "multipart_model",
    "PARSE_BELOW",
    "SAMPLE_ABOVE",
    "RequestFacts",
    "inject_include_usage",
    "loads_bounded",
    "read_facts",
    "request_facts",
]

# The reservation's quick estimate for an ASCII body (see request_facts): the middle of what
# benchmarks/corpus measures per byte of a chat request body (English 0.19-0.21, code 0.21-0.25, JSON
# 0.24-0.27 tokens per byte).
QUICK_TOKENS_PER_BYTE: Final = 0.25

# Bodies up to this size may be json-parsed when the fast path is ambiguous (~10 ms at the limit);
# larger ones keep whatever the fast path found.
MAX_PARSE_BYTES: Final = 2 << 20

# A JSON string literal (the quotes included); the unrolled form is linear and never backtracks.
_JSON_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_COLON: Final = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*")
_NUMBER: Final = re.compile(rb"-?(?:0|[1-9][0-9]{0,17})(?:\.[0-9]+)?(?:[eE][+-]?[0-9]{1,3})?")


def loads_bounded(data: bytes | str, max_bytes: int = MAX_PARSE_BYTES) -> object | None:
    """json.loads that returns None instead of raising (malformed, too large, too deep, not UTF-8)."""
    if len(data) > max_bytes:
        return None
    try:
        if isinstance(data, bytes | bytearray):
            data = bytes(data).decode("utf-8")
        value: object = json.loads(data)
    except (ValueError, RecursionError, UnicodeDecodeError, TypeError):
        return None
    return value


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What a Check needs from an LLM request body (OpenAI chat/completions/Responses, Anthropic).

    `max_tokens` is the largest of max_tokens / max_completion_tokens / max_output_tokens present (None
    when the client set none: the caller applies its default). `n` is the number of choices requested
    (OpenAI `n`), which multiplies the completion a reservation must cover. `prompt_tokens` is
    `estimate_tokens` over the body (sampled above SAMPLE_ABOVE bytes) with JSON escapes decoded, the
    JSON syntax of the request and its messages subtracted, and each base64 blob (image, audio, file)
    charged IMAGE_TOKENS instead of its bytes. Against the exact chat-prompt count it is within a few
    percent on prose and JSON, +5-15 % on code, -5-10 % on CJK (benchmarks/bench_tokenizer.py).
    """

    model: str | None = None
    max_tokens: int | None = None
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    prompt_tokens: int = 0
    # Set when the body must be refused rather than read (the strict reading, see `request_facts`): a
    # duplicate top-level key, an encoding other than UTF-8, or a body too ambiguous to check cheaply.
    problem: str | None = None
    is_object: bool = field(default=False, compare=False)  # the body is (or, cut, begins as) a JSON object


def _escaped(body: bytes, quote: int) -> bool:
    """True when the quote at `quote` is preceded by an odd run of backslashes (inside a string)."""
    n = 0
    i = quote - 1
    while i >= 0 and body[i] == 0x5C:
        n += 1
        i -= 1
    return n % 2 == 1


_ESCAPE: Final = re.compile(rb"\\.", re.DOTALL)
_PLAIN_STRING: Final = re.compile(rb'"[^"]*"')


def _net_depth(segment: bytes) -> int:
    """Openers minus closers outside string literals; `segment` must start outside a string.

    Escapes go first, so that every remaining quote delimits a string: both passes are then linear
    even on adversarial input (a string regex that handles escapes itself backtracks quadratically
    over a long run of escaped quotes that never closes).
    """
    if b'"' in segment:
        if b"\\" in segment:
            segment = _ESCAPE.sub(b"", segment)
        segment = _PLAIN_STRING.sub(b"", segment)
    opened = segment.count(b"{") + segment.count(b"[")
    return opened - segment.count(b"}") - segment.count(b"]")


# One pass finds every candidate: the scalar keys a decision needs and the keys whose string value may
# be a base64 blob (data: URIs, Anthropic `source.data`, OpenAI `input_audio.data`). The leading quote
# gives the regex engine a literal to search for, so the scan runs at memchr-like speed.
_KEY: Final = re.compile(
    rb'"(model|max_tokens|max_completion_tokens|max_output_tokens|stream|stream_options|n'
    rb'|data|url|image_url|file_data)"[ \t\r\n]*:[ \t\r\n]*'
)
_BLOB_KEYS: Final = frozenset((b"data", b"url", b"image_url", b"file_data"))
# The scan's work is bounded: at most _MAX_MATCHES regex matches of any key are looked at, and at most
# _MAX_CANDIDATES of them may be fact keys (unescaped); a body beyond either is refused as ambiguous
# (no real request nests that many). Depths are counted incrementally, each byte once.
_MAX_CANDIDATES: Final = 64
_MAX_MATCHES: Final = 512
_B64_RUN: Final = re.compile(rb"[A-Za-z0-9+/=\\]*")
_BLOB_MIN: Final = 256


def _blob_at(body: bytes, pos: int) -> tuple[int, int] | None:
    """The span of a base64 string value starting at `pos` (a data: URI's payload or bare base64).

    The end is the closing quote (found at memchr speed); only the first KB is checked to be base64,
    so a megabyte image costs microseconds.
    """
    if body[pos : pos + 1] != b'"':
        return None
    start = pos + 1
    if body.startswith(b"data:", start):
        marker = body.find(b";base64,", start, start + 256)
        if marker < 0:
            return None
        start = marker + 8
    end = body.find(b'"', start)
    if end - start < _BLOB_MIN or _B64_RUN.fullmatch(body, start, min(end, start + 1024)) is None:
        return None
    return pos, end


DUPLICATE_KEY: Final = "The request body has a duplicate top-level key; send each key once."
AMBIGUOUS: Final = "The request body has too many nested request keys to be checked."


def _scan(body: bytes, complete: bool = True) -> tuple[dict[bytes, int] | str, list[tuple[int, int]]]:
    """Value offsets of the top-level fact keys (or why they cannot be trusted) and the blob spans.

    A key counts when its opening quote is unescaped: in valid JSON that quote starts a string, and a
    string followed by a colon is a key. Depths are counted incrementally between candidates, from the
    front for those in the first half and, in a `complete` body (not cut by the proxy), from the back
    for the others: each byte is read at most once, and usually only the few around the keys. A fact
    key twice at depth 1 is a duplicate: the answer is the problem, not a guess.
    """
    blobs: list[tuple[int, int]] = []
    candidates: list[tuple[bytes, int, int]] = []
    matches = 0
    for m in _KEY.finditer(body):
        matches += 1
        if matches > _MAX_MATCHES:
            return AMBIGUOUS, blobs
        name = m.group(1)
        if name in _BLOB_KEYS:
            span = _blob_at(body, m.end())
            if span is not None:
                blobs.append(span)
            continue
        pos = m.start()
        if _escaped(body, pos):
            continue
        if len(candidates) == _MAX_CANDIDATES:
            return AMBIGUOUS, blobs
        candidates.append((name, pos, m.end()))
    half = len(body) // 2 if complete else len(body)
    depths: list[int] = []
    prev = depth = 0  # the depth at body[prev], which is outside any string
    for _, pos, _ in candidates:
        if pos > half:
            break
        depth += _net_depth(body[prev:pos])
        prev = pos
        depths.append(depth)
    tail: list[int] = []
    prev, depth = len(body), 0
    for _, pos, _ in reversed(candidates[len(depths) :]):
        depth -= _net_depth(body[pos:prev])
        prev = pos
        tail.append(depth)
    depths.extend(reversed(tail))
    found: dict[bytes, int] = {}
    for (name, _, end), at in zip(candidates, depths, strict=True):
        if at != 1:
            continue
        if name in found:
            return DUPLICATE_KEY, blobs
        found[name] = end
    return found, blobs


class _Unparsed:
    pass


_UNPARSED: Final = _Unparsed()


def _scalar(body: bytes, pos: int) -> object:
    """The JSON value starting at `pos` when it is a scalar or a small object, else _UNPARSED."""
    if pos >= len(body):
        return _UNPARSED
    first = body[pos]
    try:
        if first == 0x22:  # '"'
            m = _JSON_STRING.match(body, pos)
            if m is None or m.end() - pos > 4096:
                return _UNPARSED
            literal = m.group()
            if b"\\" not in literal:
                return literal[1:-1].decode("utf-8")
            return json.loads(literal.decode("utf-8"))
        if body.startswith(b"true", pos):
            return True
        if body.startswith(b"false", pos):
            return False
        if body.startswith(b"null", pos):
            return None
        if first == 0x2D or 0x30 <= first <= 0x39:
            m = _NUMBER.match(body, pos)
            if m is None:
                return _UNPARSED
            return json.loads(m.group())
        if first == 0x7B:  # '{': a small object (stream_options), decoded on its own
            window = body[pos : pos + 4096].decode("utf-8", "replace")
            return json.JSONDecoder().raw_decode(window)[0]
    except (ValueError, RecursionError):
        return _UNPARSED
    return _UNPARSED


def _fields(body: bytes, found: dict[bytes, int] | None) -> dict[str, object] | None:
    """Decoded values of the top-level keys found, or None when the fast path cannot vouch for them."""
    if found is None:
        return None
    out: dict[str, object] = {}
    for name, pos in found.items():
        value = _scalar(body, pos)
        if value is _UNPARSED:
            return None
        out[name.decode()] = value
    return out


_FACT_KEYS: Final = (
    "model",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "stream",
    "stream_options",
    "n",
)


_CAP_KEYS: Final = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, float) and value.is_integer() and 0 <= value < 2**53:
        return int(value)
    return None


# Below this size json.loads (~3 µs + 1.4 µs per KB) beats the scan; above it the scan reads only the
# keys and the parse is skipped unless the scan is unsure.
PARSE_BELOW: Final = 16 << 10


class _Members(list):  # type: ignore[type-arg]
    """A JSON object as the parser saw it: its (key, value) pairs in order, duplicates kept."""

    __slots__ = ()


# object_pairs_hook is a type: the C parser calls it without a Python frame (~25% over a plain parse).
_STRICT: Final = json.JSONDecoder(object_pairs_hook=_Members)
_FACT_KEY_SET: Final = frozenset(_FACT_KEYS)
_LETTER_ESCAPE_RE: Final = re.compile(rb"\\u00[4-7][0-9a-fA-F]")


_SCAN_ONCE: Final = _STRICT.scan_once  # type: ignore[attr-defined]
_WHITESPACE: Final = re.compile(r"[ \t\n\r]*")  # json.decoder.WHITESPACE: what decode() skips


def _strict_fields(text: str) -> tuple[dict[str, object] | None, str | None]:
    """The fact keys of a whole JSON text parsed strictly: (None, None) when it is not a JSON object,
    (None, problem) when a top-level key appears twice (however it is spelled: `mod\\u0065l`)."""
    try:
        if text[:1] == "{":  # the usual body: what _STRICT.decode does, without its leading-space pass
            top, end = _SCAN_ONCE(text, 0)
            if end != len(text) and _WHITESPACE.match(text, end).end() != len(text):  # type: ignore[union-attr]
                return None, None  # extra data after the object
        else:
            top = _STRICT.decode(text)
    except (ValueError, RecursionError, StopIteration):
        return None, None
    if top.__class__ is not _Members:
        return None, None
    if len(dict(top)) != len(top):
        return None, DUPLICATE_KEY
    fields: dict[str, object] = {}
    for k, v in top:
        if k in _FACT_KEY_SET:
            fields[k] = dict(v) if isinstance(v, _Members) else v
    return fields, None


# What _facts_fields read: (fields, blobs, problem, is_object). fields: the top-level fact keys present
# (None: none could be read). A plain tuple: built on every check, where a NamedTuple costs ~0.2 µs more.
_Read = tuple[dict[str, object] | None, list[tuple[int, int]], str | None, bool]


def _blob_spans(body: bytes) -> list[tuple[int, int]]:
    """The base64 blobs of a body (none without a blob marker, or in a body shorter than one blob)."""
    if len(body) <= _BLOB_MIN or (b"base64," not in body and b'"data"' not in body):
        return []
    return _scan(body)[1]


def _facts_fields(body: bytes, truncated: bool, want_blobs: bool = True) -> _Read:
    """The strict reading: the body is UTF-8 JSON whose top-level keys appear once, or it is refused.

    `want_blobs` False: the blobs only feed the prompt estimate; without one, a small body is not
    searched for them (two marker searches, ~1 µs per KB).

    UTF-16/32 (which Python's json.loads(bytes) would decode) always holds a NUL byte in a JSON text;
    invalid UTF-8 and a byte-order mark are refused too. A body cut by the proxy is read up to the cut.
    """
    text: str | None = None
    if not body.isascii():
        if body.startswith(b"\xef\xbb\xbf"):
            return (None, [], NOT_UTF8, False)
        try:  # a cut body may end inside a character: final=False leaves that one undecoded
            text = codecs.utf_8_decode(body, "strict", not truncated)[0]
        except UnicodeDecodeError:
            return (None, [], NOT_UTF8, False)
    # A NUL byte (UTF-16/32) is looked for only where the strict parse has not already excluded it: a
    # JSON text that parses holds no raw control character.
    if body[:1] != b"{" and body.lstrip()[:1] != b"{":
        if b"\x00" in body:
            return (None, [], NOT_UTF8, False)
        return (None, _blob_spans(body) if want_blobs else [], None, False)
    if not truncated and len(body) <= PARSE_BELOW:
        fields, problem = _strict_fields(text if text is not None else body.decode("ascii"))
        if fields is None and problem is None and b"\x00" in body:
            return (None, [], NOT_UTF8, False)
        blobs = _blob_spans(body) if want_blobs else []
        return (fields, blobs, problem, fields is not None or problem is not None)
    if b"\x00" in body:
        return (None, [], NOT_UTF8, False)
    found, blobs = _scan(body, complete=not truncated)
    if isinstance(found, str):
        return (None, blobs, found, True)
    # A key spelled with escapes (`"mod\\u0065l"`) is invisible to the scan: only a parse can see it.
    escaped_key = b"\\" in body and _LETTER_ESCAPE_RE.search(body) is not None
    fields = None if escaped_key else _fields(body, found)
    if fields is None and not truncated:
        if len(body) > MAX_PARSE_BYTES:
            return (None, blobs, AMBIGUOUS, True)
        fields, problem = _strict_fields(text if text is not None else body.decode("ascii"))
        return (fields, blobs, problem, fields is not None or problem is not None)
    if fields is None:  # cut: only what the scan could read (the caller treats it as unproven)
        fields = {}
        for name, pos in found.items():
            value = _scalar(body, pos)
            if value is not _UNPARSED:
                fields[name.decode()] = value
    return (fields, blobs, None, True)


def request_facts(
    body: bytes, *, estimate_prompt: bool = True, precise: bool = True, truncated: bool = False
) -> RequestFacts:
    """Model, token cap, streaming flags, choice count and a prompt estimate; never raises.

    The strict reading (one for every size): the body must be UTF-8 JSON (a NUL byte, invalid UTF-8 or a
    byte-order mark sets `problem`), and a top-level key appearing twice, however spelled, sets
    `problem` instead of guessing which one the upstream's parser keeps. Bodies up to PARSE_BELOW are
    parsed (a few µs); larger ones are scanned for the keys (one regex pass, ~0.4 µs per KB, at most
    _MAX_MATCHES matches) and parsed only when the scan is unsure or a key is spelled with escapes.
    `truncated`: the body is a prefix (the proxy cut it); the facts are then what the prefix shows, which
    proves nothing about what follows the cut (the caller decides what to do with that). The estimate is
    sampled above SAMPLE_ABOVE bytes; pass estimate_prompt=False when no token limit needs it. An empty,
    non-JSON or non-object body gives RequestFacts() with only the prompt estimate set.

    `precise=False` (the Check's reservation) estimates an ASCII body at QUICK_TOKENS_PER_BYTE: a
    byte count instead of ~10 µs per KB of byte-class passes, within about ±30% of the exact count on
    English, code and JSON (benchmarks/corpus: 0.17-0.30 tokens per body byte), which the settle
    corrects; non-ASCII bodies (CJK, escapes of it) keep the precise estimate.
    """
    if body.__class__ is not bytes:  # copy only what is not already bytes (a subclass, a view)
        if not isinstance(body, bytes | bytearray | memoryview):
            return RequestFacts()
        body = bytes(body)
    fields, blobs, problem, is_object = (
        _facts_fields(body, truncated, estimate_prompt) if body else (None, [], None, False)
    )
    if not estimate_prompt or not body:
        prompt = 0
    elif not precise and not blobs and body.isascii():
        prompt = math.ceil(len(body) * QUICK_TOKENS_PER_BYTE)
    else:
        prompt = prompt_estimate(body, blobs)
    if fields is None:
        return RequestFacts(prompt_tokens=prompt, problem=problem, is_object=is_object)
    get = fields.get
    model = get("model")
    if model.__class__ is not str:
        model = model if isinstance(model, str) else None
    cap: int | None = None
    for name in _CAP_KEYS:  # the largest cap present
        value = get(name)
        if value is not None:
            value = _int_or_none(value)
            if value is not None and (cap is None or value > cap):
                cap = value
    options = get("stream_options")
    n = get("n")
    if n is not None:
        n = _int_or_none(n)
        n = n if n is not None and 1 <= n <= 128 else 1
    else:
        n = 1
    stream = get("stream") is True
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return _object_facts(model, cap, stream, include_usage, n, prompt)


# What the policy calls: request_facts above (the reference), or its compiled equivalent (nexus_authz/native/
# _body.pyx: the same RequestFacts for every input), which nexus_authz.native installs here when it loads;
# the core imports nothing from native/.
read_facts: Callable[..., RequestFacts] = request_facts


# The facts of a readable JSON object, by value: most requests repeat a few shapes (model, cap, flags),
# and a frozen dataclass costs ~1 µs to build, a dict look-up ~0.1 µs. Instances are immutable, so sharing
# one is safe. Bounded (cleared when full); a long model name (client-chosen) is not cached.
_FACTS_CACHE: dict[tuple[str | None, int | None, bool, bool, int, int], RequestFacts] = {}
_FACTS_CACHE_MAX: Final = 4096
_CACHED_MODEL_LEN: Final = 256


def _object_facts(
    model: str | None, cap: int | None, stream: bool, include_usage: bool, n: int, prompt: int
) -> RequestFacts:
    key = (model, cap, stream, include_usage, n, prompt)
    facts = _FACTS_CACHE.get(key)
    if facts is None:
        facts = RequestFacts(model, cap, stream, include_usage, n, prompt, None, True)
        if (model is None or len(model) <= _CACHED_MODEL_LEN) and (cap is None or cap < 2**32):
            if len(_FACTS_CACHE) >= _FACTS_CACHE_MAX:
                _FACTS_CACHE.clear()
            _FACTS_CACHE[key] = facts
    return facts


def _has_top_level(body: bytes, key: bytes) -> bool | None:
    """Whether `key` (quoted) is a top-level key: True, False, or None when unsure."""
    pos = body.find(key)
    seen = 0
    while pos >= 0:
        colon = _COLON.match(body, pos + len(key))
        if colon is not None and not _escaped(body, pos):
            seen += 1
            if seen > _MAX_CANDIDATES:
                return None
            depth = _net_depth(body[:pos]) if pos <= len(body) // 2 else -_net_depth(body[pos:])
            if depth == 1:
                return True
        pos = body.find(key, pos + len(key))
    return False


_INCLUDE_USAGE: Final = b'"stream_options":{"include_usage":true},'


def inject_include_usage(body: bytes) -> bytes | None:
    """The body with stream_options.include_usage set to true, or None when there is nothing to change.

    Applies to OpenAI streaming chat-completions and legacy completions requests (`"stream": true` and
    a top-level `messages` or `prompt`) whose stream_options lacks include_usage: true (absent or false:
    the gateway needs the usage record either way). Call it only on OpenAI-compatible routes: Anthropic
    requests also carry `messages` and reject unknown fields. When stream_options is absent (the usual
    case) the member is spliced in after the opening brace, leaving every other byte as the client sent
    it; otherwise the body is parsed and re-serialised. The upstream then sends one extra chunk with
    `"choices": []` before [DONE]: clients that index choices[0] on every chunk break on it unless the
    response side removes it. The caller must update Content-Length.
    """
    if not isinstance(body, bytes | bytearray | memoryview):
        return None
    body = bytes(body)
    start = len(body) - len(body.lstrip())
    if body[start : start + 1] != b"{":
        return None
    if len(body) > PARSE_BELOW:
        found = _scan(body)[0]
        fields = _fields(body, found if isinstance(found, dict) else None)
        if fields is not None:
            if fields.get("stream") is not True:
                return None
            has_messages = _has_top_level(body, b'"messages"')
            has_prompt = _has_top_level(body, b'"prompt"')
            if has_messages is False and has_prompt is False:
                return None
            if has_messages or has_prompt:
                options = fields.get("stream_options")
                if "stream_options" not in fields:
                    return body[: start + 1] + _INCLUDE_USAGE + body[start + 1 :]
                if isinstance(options, dict) and options.get("include_usage") is True:
                    return None
    obj = loads_bounded(body)
    if not isinstance(obj, dict) or obj.get("stream") is not True:
        return None
    if "messages" not in obj and "prompt" not in obj:
        return None
    options = obj.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return None
    if "stream_options" not in obj:
        return body[: start + 1] + _INCLUDE_USAGE + body[start + 1 :]
    obj["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
