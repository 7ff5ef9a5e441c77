"""The compiled access-log scans' word-at-a-time fast paths (native/_usage.pyx) at their edges, against the
reference they accelerate: the JSON string validator (`_string`, which skips plain text 8 bytes at a time)
against json.loads of the strict UTF-8 decode, and the record's base64 decoder (`_b64into`) against
binascii. Every special byte at every position of a word, runs of 7/8/9 plain bytes, the end of the input
at every position after a string, invalid base64 in every position of a quad, every padding form."""

from __future__ import annotations

import base64
import binascii
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus_authz import native
from nexus_authz.adapters import als_fast
from nexus_authz.core.usage import StreamUsage

# _compiled: test_als_fast's autouse fixture (skip under NEXUS_AUTHZ_PURE, fail if the scans did not build)
from tests.adapters.test_als_fast import _compiled, entry_with  # noqa: F401
from tests.fuzz._support import fuzz_settings
from tests.helpers import PLAIN_TEXT, json_valid, plain
from tests.helpers import protobuf_len_field as _field
from tests.helpers import protobuf_varint as _varint

# every kind of string byte other than plain text (tests.helpers.PLAIN_TEXT)
SPECIALS = [
    b'"',
    b"\\",
    b"\\n",
    b'\\"',
    b"\\\\",
    b"\\/",
    b"\\u00e9",
    b"\\uD83D",
    b"\\u12G4",
    b"\\u12",
    b"\\x",
    b"\x00",
    b"\x09",
    b"\x0a",
    b"\x1f",
    b"\x20",
    b"\x7f",
    b"\x80",
    b"\xa2",
    b"\xbf",
    b"\xc1\xbf",
    b"\xc2",
    b"\xc2\xa2",
    b"\xc2\xa9",
    b"\xc2\xc2",
    b"\xdf\xbf",
    b"\xe0\x9f\xbf",
    b"\xe0\xa0\x80",
    b"\xe2\x82",
    b"\xe2\x82\xac",
    b"\xed\x9f\xbf",
    b"\xed\xa0\x80",
    b"\xef\xbf\xbf",
    b"\xf0\x8f\xbf\xbf",
    b"\xf0\x90\x80\x80",
    b"\xf0\x9f\x98\x80",
    b"\xf4\x8f\xbf\xbf",
    b"\xf4\x90\x80\x80",
    b"\xf5\x80\x80\x80",
    b"\xff",
]


def _value_doc(text: bytes, before: int, after: int) -> bytes:
    """A document whose usage record is `{}` at 9..11, then the string `text` in an array (its text
    cannot close the array: no ']'), `before` spaces before it, `after` spaces at the very end."""
    return b'{"usage":{},"s":[' + b" " * before + b'"' + text + b'"]}' + b" " * after


def _check_value(text: bytes, before: int, after: int) -> None:
    doc = _value_doc(text, before, after)
    expected = (9, 11) if json_valid(doc) else None
    assert native.usage is not None
    assert native.usage.usage_span(doc) == expected, doc


def test_a_string_validates_as_json_loads_with_a_special_byte_at_every_position() -> None:
    """Runs of plain text of 0..17 bytes (7, 8, 9 and 16 among them) with one special byte or sequence at
    each position, the string starting at each offset of a word and the input ending at each distance
    after it: the scan's answer is json.loads'."""
    valid = invalid = 0
    for run in range(18):
        for at in range(run + 1):
            for special in SPECIALS:
                text = plain(at, run) + special + plain(run - at, at)
                for before in (0, 1, 3, 7):
                    for after in (0, 1, 5, 8, 9):
                        _check_value(text, before, after)
                valid += json_valid(_value_doc(text, 0, 0))
                invalid += not json_valid(_value_doc(text, 0, 0))
        for before in range(8):  # plain runs alone
            for after in range(10):
                _check_value(plain(run), before, after)
    assert valid > 1000 and invalid > 1000  # both answers are exercised


def test_every_byte_at_every_position_of_a_word_validates_as_json_loads() -> None:
    """Each of the 256 byte values alone at each position of a 9-byte run, the run at each offset."""
    for byte in range(256):
        for at in range(9):
            text = plain(at) + bytes([byte]) + plain(8 - at, at)
            for before in range(8):
                _check_value(text, before, 0)


def test_a_key_validates_as_json_loads_with_a_special_byte_at_every_position() -> None:
    """The same bytes in a top-level key (read by the same validator; a key with an escape: None)."""
    assert native.usage is not None
    for run in range(18):
        for at in range(run + 1):
            for special in SPECIALS:
                text = plain(at, run) + special + plain(run - at, at)
                for after in (0, 7, 8):
                    doc = b'{"usage":{},"' + text + b'":1}' + b"\n" * after
                    expected = (9, 11) if json_valid(doc) and b"\\" not in text else None
                    assert native.usage.usage_span(doc) == expected, doc


def test_a_string_cut_anywhere_is_refused_and_never_read_past_its_end() -> None:
    """A record's span ending inside a key (usage_counts reads only body[start:end]): never an answer,
    whatever the bytes after the end (a closing quote one byte on, a whole word on)."""
    assert native.usage is not None
    for name in (b"prompt_tokens", b"completion_tokens", b"x", b"abcdefg", b"abcdefgh", b"abcdefghi"):
        record = b'{"' + name + b'":1,"prompt_tokens":5,"completion_tokens":3}'
        assert native.usage.usage_counts(record, 0, len(record)) == ("openai", 5, 3, 0, 0, 0)
        for end in range(2, 2 + len(name) + 1):  # the end inside the first key, or at its closing quote
            assert native.usage.usage_counts(record, 0, end) is None
            assert native.usage.usage_span(record[:end]) is None


strings = st.lists(
    st.sampled_from([*SPECIALS, *[bytes([b]) for b in PLAIN_TEXT], plain(8), plain(7, 3)]), max_size=12
)


@fuzz_settings(1500, deadline=None)
@given(parts=strings, before=st.integers(0, 8), after=st.integers(0, 9))
def test_any_mix_of_special_and_plain_bytes_validates_as_json_loads(
    parts: list[bytes], before: int, after: int
) -> None:
    _check_value(b"".join(parts), before, after)


# -- what a whole body is: a usage record, an error, neither -----------------------------------------------

MEMBERS = [
    b'"error": {"message": "Rate limit reached", "code": 429}',
    b'"error": {}',
    b'"error": "overloaded"',
    b'"error": null',
    b'"error": [{"m": 1}]',
    b'"type": "error"',
    b'"type": "message"',
    b'"type": "\\u0065rror"',
    b'"type": ["error"]',
    b'"\\u0065rror": {"m": 1}',
    b'"usage": {"prompt_tokens": 5, "completion_tokens": 3}',
    b'"usage": null',
    b'"model": "gpt-4o-mini"',
    b'"status": "failed"',
    b'"id": "x"',
]


def pure_kind(body: bytes) -> str | None:
    """What core/usage.StreamUsage reads of a whole JSON body: "error" (Usage(source="none") of an error
    document: its "error" an object or its "type" "error"), "failed" (the same for another reason, a
    Responses "status": "failed"), "usage" (a provider record), else None."""
    parser = StreamUsage(content_type="application/json")
    parser.feed(body)
    usage = parser.finish()
    if usage.source == "provider":
        return "usage"
    if usage.source == "none" and parser.saw_error:
        document = json.loads(body)
        error = isinstance(document.get("error"), dict) or document.get("type") == "error"
        return "error" if error else "failed"
    return None


@fuzz_settings(1500, deadline=None)
@given(
    members=st.lists(st.sampled_from(MEMBERS), min_size=1, max_size=5),
    before=st.sampled_from([b"", b" ", b"\n\t"]),
    after=st.sampled_from([b"", b"  ", b"\n", b" x", b"}"]),
)
def test_an_error_document_is_found_as_the_pure_parser_finds_it(
    members: list[bytes], before: bytes, after: bytes
) -> None:
    """native/_usage.pyx `_document` (the compiled loop settles an error document as Usage(source="none"))
    against StreamUsage on the same body: repeated keys (json.loads keeps the last), an error next to a
    usage record, an "error" that is not an object, a "type" or a key with escapes (the pure path decides),
    extra data after the document. Every "error" it finds is the pure parser's; without escapes, it finds
    each one the pure parser finds, and every usage record usage_span finds."""
    body = before + b"{" + b", ".join(members) + b"}" + after
    assert native.usage is not None
    found = native.usage.document_kind(body)
    pure = pure_kind(body)
    if found is not None:
        assert found == pure, body
    if b"\\" not in body and pure in ("error", "usage"):
        assert found == pure, body
    assert (found == "usage") == (native.usage.usage_span(body) is not None), body


# -- base64 -------------------------------------------------------------------------------------------------

CANONICAL = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")
NOT_BASE64 = ["=", "!", "-", "_", " ", "\n", ".", "\x00", "\x7f", "\u00e9"]  # \u00e9: two bytes in UTF-8


def scanned(text: str) -> bytes | None:
    """What the compiled scan decodes of a Lua "body" record whose base64 is `text`: its data, or None
    (not canonical base64: snippet_of's lenient decoder reads it)."""
    entry = entry_with({"u": {"k": "body", "b": text}}, other=False)
    assert native.usage is not None
    fields = native.usage.usage_snippet(entry.common_properties.metadata.SerializeToString())
    if fields is None:
        return None
    assert fields[0] == "body" and fields[2] == 0
    data: bytes = fields[1]
    return data


def reference(text: str) -> bytes | None:
    """The canonical form's data (binascii's), or None."""
    raw = text.encode()
    return binascii.a2b_base64(raw) if CANONICAL.match(raw) else None


def test_base64_decodes_as_binascii_with_a_bad_character_at_every_position() -> None:
    """Records of 1..10 quads (the decoder's words and its tail), each character replaced in turn by one
    outside the alphabet: refused wherever it is; untouched, decoded as binascii decodes it."""
    refused = 0
    for size in range(31):
        text = base64.b64encode(bytes((7 * k + size) % 256 for k in range(size))).decode()
        assert scanned(text) == reference(text) == base64.b64decode(text)
        for at in range(len(text)):
            for bad in NOT_BASE64:
                width = len(bad.encode())
                if at + width > len(text):
                    continue
                mutated = text[:at] + bad + text[at + width :]
                assert scanned(mutated) == reference(mutated), mutated
                refused += reference(mutated) is None
    assert refused > 3000


@pytest.mark.parametrize(
    "text",
    [
        "",
        "=",
        "==",
        "===",
        "====",
        "A",
        "AA",
        "AAA",
        "AA=",
        "AA==",
        "AAA=",
        "AAAA",
        "A===",
        "AA=A",
        "A=AA",
        "=AAA",
        "AB=C",
        "AA==AA==",
        "AAA=AAAA",
        "AAAAAA==",
        "AAAAAAA=",
        "AAAAAAAA",
        "AAAAA===",
        "AAAAAAAAA",
        "Zm9vYg==",
        "Zm9vYh==",
        "Zm9vYmE=",
        "Zm9vYmF=",
        "Zm9vYmFy",
        "////",
        "++++",
        "////////+++/",
        "/w==",
        "//8=",
        "AAAAAAAAAAA=",
        "AAAAAAAAAA==",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    ],
)
def test_base64_padding_forms_decode_as_binascii(text: str) -> None:
    """Every padding form, with nonzero unused bits too (binascii ignores them, and so does the scan)."""
    assert scanned(text) == reference(text)


base64_alphabet = st.sampled_from([*"ABZaz09+/=", *NOT_BASE64])


@fuzz_settings(1500, deadline=None)
@given(
    data=st.binary(max_size=40), edits=st.lists(st.tuples(st.integers(0, 60), base64_alphabet), max_size=3)
)
def test_mutated_base64_decodes_as_binascii(data: bytes, edits: list[tuple[int, str]]) -> None:
    text = base64.b64encode(data).decode()
    for at, char in edits:
        if at < len(text):
            text = text[:at] + char + text[at + 1 :]
    assert scanned(text) == reference(text)


# -- protobuf varints ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 126, 127, 128, 129, 255, 256, 16_383, 16_384, 16_385])
def test_varints_of_one_two_and_three_bytes_read_as_protobuf_reads_them(size: int) -> None:
    """Lengths on both sides of each varint size (the scan reads a one-byte varint on its own path), in
    every field the scan reads: the request id, a header's value, the metadata's record."""
    from envoy.service.accesslog.v3 import als_pb2

    message = als_pb2.StreamAccessLogsMessage()
    data = bytes((k * 7) % 256 for k in range(size * 3 // 4))
    for k in range(3):
        entry = entry_with(
            {"u": {"k": "body", "b": base64.b64encode(data).decode(), "x": float(size)}}, k == 1
        )
        entry.request.request_id = "r" * size if k != 2 else "r"
        entry.request.request_headers["x-nexus-key-id"] = "k" * (size or 1)
        entry.request.request_headers["x-pad"] = "p" * size
        entry.response.response_headers["content-type"] = "t" * size
        message.http_logs.log_entry.append(entry)
    raw = message.SerializeToString()
    assert native.usage is not None
    items = native.usage.log_entries(raw)
    assert items is not None and len(items) == 3
    for item, entry in zip(items, message.http_logs.log_entry, strict=True):
        parsed = type(entry)()
        parsed.ParseFromString(raw[item[6] : item[7]])
        assert parsed == entry
        assert item[:6] == (
            entry.request.request_id,
            entry.response.response_headers["content-type"],
            None,
            "body",
            data,
            size,
        )


# -- numbers and strings read without a call (_member) ----------------------------------------------------

NUMBERS = [b"0", b"7", b"10", b"01", b"00", b"0.", b"0.5", b"0e", b"0e1", b"0E+1", b"1e5", b"1E-5", b"12."]
NUMBERS += [
    b"12.50",
    b"-0",
    b"-1",
    b"-",
    b"1.e1",
    b"123456789012",
    b"1234567890123",
    b"0x1",
    b"1a",
    b"9" * 20,
]
NUMBERS += [b"5 ", b"0\n", b"3e", b"3e+", b'"7"', b'"\\u0037"', b"[7]", b"{}", b"true", b"nul"]


@pytest.mark.parametrize("number", NUMBERS)
def test_a_number_in_every_place_reads_as_json_loads_and_the_core_read_it(number: bytes) -> None:
    """A number token (or a string, a literal) as a count, a details count, another member, an array's
    item, a top-level member: the document is refused exactly when json.loads refuses it, and a record the
    scan reads gives the core parser's usage and model."""
    from tests.adapters.test_als_fast import pure

    assert native.usage is not None
    record = b'{"prompt_tokens":%s,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":%s,"x":%s}}'
    bodies = [
        b'{"usage":' + record % (number, b"1", b"1") + b"}",
        b'{"usage":' + record % (b"9", number, b"1") + b"}",
        b'{"usage":' + record % (b"9", b"1", number) + b"}",
        b'{"usage":{"prompt_tokens":4,"total_tokens":' + number + b'},"n":' + number + b"}",
        b'{"n":[' + number + b"," + number + b'],"usage":{"input_tokens":' + number + b"}}",
    ]
    for body in bodies:
        span = native.usage.usage_span(body)
        assert (span is not None) == json_valid(body), body
        fast = als_fast.body_usage(body, "application/json", None)
        assert fast is None or fast == pure(body, "application/json", None), body
        if number in (b"0", b"7", b"10", b"5 "):
            assert fast is not None, body  # the common record: read by the scan
        if span is not None:
            record_text = body[span[0] : span[1]]
            assert native.usage.usage_counts(body, *span) == native.usage.usage_counts(
                record_text, 0, len(record_text)
            )


# -- map entries (_map_entry's usual shape, _map_values' walk for several names) ---------------------------


def _map_entries(name: bytes, value: bytes) -> list[bytes]:
    """A map<string, string> entry for name: value as protobuf writes it, and as it may also be written."""
    key, val = _field(1, name), _field(2, value)
    return [
        key + val,
        val + key,
        key + val + _field(2, b"second"),
        _field(1, b"other") + key + val,
        key,
        val,
        key + val + b"\x18\x05",
        key + val + _field(3, b"zz"),
        key + _field(2, value + b"x" * 130),
        _field(1, name + b"x" * 130) + val,
        b"\x0a\x80" + b"\x01" * 3,  # a key's length past the entry: malformed
    ]


@pytest.mark.parametrize("layout", range(11))
@pytest.mark.parametrize("header", [b"x-nexus-key-id", b"content-type", b"content-encoding"])
def test_map_entries_of_every_layout_read_as_protobuf_reads_them(layout: int, header: bytes) -> None:
    """Header map entries in the usual layout and in layouts protobuf reads but never writes (value first,
    repeated key or value, unknown fields, two-byte lengths, a cut entry), for the key id and both response
    headers read in one walk: the scan admits and reads the entry as protobuf parses it, or leaves the
    message to protobuf (an entry with another field, which protobuf keeps out of the map)."""
    from envoy.data.accesslog.v3 import accesslog_pb2
    from google.protobuf.message import DecodeError

    entry_map = _map_entries(header, b"application/json")[layout]
    request = _field(9, b"rid") + _field(13, _field(1, b"x-nexus-key-id") + _field(2, b"k"))
    response = _field(4, _field(1, b"content-encoding") + _field(2, b"identity"))
    if header == b"x-nexus-key-id":
        request = _field(9, b"rid") + _field(13, entry_map)
    else:
        response = _field(4, entry_map) + _field(4, _field(1, b"x-other") + _field(2, b"v"))
    entry = _field(3, request) + _field(4, response)
    raw = _field(2, _field(1, entry))
    assert native.usage is not None
    items = native.usage.log_entries(raw)
    try:
        parsed = accesslog_pb2.HTTPAccessLogEntry.FromString(entry)
    except DecodeError:
        assert items is None
        return
    if layout in (6, 7):  # an entry holding another field: protobuf keeps it out of the map, and decides
        assert items is None
        return
    assert items is not None and len(items) == 1
    item = items[0]
    headers = parsed.response.response_headers
    if not parsed.request.request_headers.get("x-nexus-key-id"):
        assert item is None
    else:
        assert item is not None and item[0] == parsed.request.request_id
        assert item[1] == headers.get("content-type", None)
        assert item[2] == headers.get("content-encoding", None)


@pytest.mark.parametrize("place", ["namespace", "u", "k", "b"])
def test_a_record_s_map_entry_holding_another_field_reads_as_snippet_of_reads_it(place: str) -> None:
    """The Lua record's Struct entries with an unknown field (protobuf keeps such an entry out of the map):
    the scan leaves the record to snippet_of, or reads what it reads."""
    from envoy.data.accesslog.v3 import accesslog_pb2
    from google.protobuf import struct_pb2

    from nexus_authz.adapters.envoy_als import snippet_of

    def entry(key: bytes, value: bytes, odd: bool) -> bytes:
        return _field(1, _field(1, key) + _field(2, value) + (b"\x18\x05" if odd else b""))

    def text(value: str) -> bytes:
        return struct_pb2.Value(string_value=value).SerializeToString()

    def build(odd: str | None) -> bytes:
        data = text(base64.b64encode(b"{}").decode())
        record = entry(b"k", text("body"), odd == "k") + entry(b"b", data, odd == "b")
        return entry(b"nexus.usage", entry(b"u", _field(5, record), odd == "u"), odd == "namespace")

    metadata = build(place)
    parsed = accesslog_pb2.HTTPAccessLogEntry.FromString(_field(1, _field(17, metadata)))
    reference = snippet_of(parsed)
    assert native.usage is not None
    fields = native.usage.usage_snippet(metadata)
    assert fields is None or fields == (reference.kind, reference.data, reference.skipped)
    assert native.usage.usage_snippet(build(None)) == ("body", b"{}", 0)


@pytest.mark.parametrize("number", [1000, 2047, 2048, 262_143, 262_144, 2**29 - 1])
def test_fields_with_tags_of_every_size_are_skipped_as_protobuf_skips_them(number: int) -> None:
    """Unknown fields of two- to five-byte tags (a varint and a string) before and after each message field
    the scan looks for: the entry reads as without them."""
    from envoy.service.accesslog.v3 import als_pb2

    def odd(k: int) -> bytes:
        return _varint((number << 3) | 0) + _varint(k) + _field(number, b"z" * k)

    entry = entry_with({"u": {"k": "body", "b": base64.b64encode(b'{"a":1}').decode()}}, other=True)
    entry.request.request_id = "rid"
    entry.request.request_headers["x-nexus-key-id"] = "k"
    entry.response.response_headers["content-type"] = "application/json"
    plain_entry = entry.SerializeToString()
    common, request, response = (
        entry.common_properties.SerializeToString(),
        entry.request.SerializeToString(),
        entry.response.SerializeToString(),
    )
    oddly = (
        odd(1)
        + _field(1, odd(2) + common + odd(3))
        + odd(4)
        + _field(3, request + odd(5))
        + _field(4, odd(6) + response)
        + odd(7)
    )
    message = als_pb2.StreamAccessLogsMessage()
    message.http_logs.log_entry.append(entry)
    reference = native.usage.log_entries(message.SerializeToString()) if native.usage else None
    raw = _field(2, _field(1, oddly))
    assert native.usage is not None and reference is not None
    items = native.usage.log_entries(raw)
    assert type(entry).FromString(oddly).request.request_id == "rid"  # protobuf reads it, unknown fields kept
    assert items is not None and items[0][:6] == reference[0][:6] == (
        "rid",
        "application/json",
        None,
        "body",
        b'{"a":1}',
        0,
    )
    assert len(plain_entry) < len(oddly)
