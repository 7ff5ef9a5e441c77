"""multipart/form-data request bodies, read by their structure: the `model` form field and nothing else.

A part is the model field only when its Content-Disposition `name` is exactly `model` (never
`filename="model"`); anything two parsers could read differently is a problem the caller refuses
(issue 13, item 2e). Pure: bytes in, (model, problem) out.
"""

from __future__ import annotations

import re
from typing import Final

from nexus_authz.core.errors import NOT_UTF8

__all__ = ["is_multipart", "multipart_model"]

_MAX_PARTS: Final = 256
_MAX_PART_HEAD: Final = 4096
_BOUNDARY_PARAM: Final = re.compile(r';\s*boundary\s*=\s*(?:"([^"]{1,70})"|([^";\s]{1,70}))', re.IGNORECASE)


def is_multipart(content_type: str) -> bool:
    """multipart/form-data, in any letter case (media types are case-insensitive)."""
    if len(content_type) < 19:  # shorter than the name itself (lower() never shortens: application/json)
        return False
    return content_type.partition(";")[0].strip().lower() == "multipart/form-data"


def _disposition_name(value: bytes) -> bytes | str | None:
    """The `name` parameter of a form-data Content-Disposition (a problem string if it is ambiguous)."""
    kind, _, rest = value.partition(b";")
    if kind.strip().lower() != b"form-data":
        return None
    name: bytes | None = None
    for param in rest.split(b";"):
        key, eq, raw = param.partition(b"=")
        key = key.strip().lower()
        if key == b"name*":  # RFC 2231/5987 spelling: parsers disagree on it
            return "A multipart part names itself with name*=; use name=."
        if key != b"name" or not eq:
            continue
        if name is not None:
            return "A multipart part has two names."
        raw = raw.strip()
        if raw[:1] == b'"':
            if len(raw) < 2 or raw[-1:] != b'"' or b"\\" in raw:
                return "A multipart part name is not a plain quoted string."
            raw = raw[1:-1]
        name = raw
    return name


def multipart_model(
    body: bytes, content_type: str, *, truncated: bool = False
) -> tuple[str | None, str | None]:
    """The `model` form field of a multipart/form-data body, parsed by its structure: (model, problem).

    Parts are delimited by the boundary of the content type; a part is the model field when its
    Content-Disposition's `name` parameter is exactly `model` (not `filename="model"`). Two model parts,
    a part name the parsers could read differently, a model that is not UTF-8, or more than _MAX_PARTS
    parts are problems (the request is refused). A cut body gives what precedes the cut: a model part
    could still follow, so the caller must not take that as proved.
    """
    m = _BOUNDARY_PARAM.search(content_type)
    if m is None:
        return None, "A multipart/form-data body needs a boundary parameter."
    delimiter = b"--" + (m.group(1) or m.group(2)).encode("latin-1")
    if body.startswith(delimiter):
        pos = 0
    else:
        pos = body.find(b"\r\n" + delimiter)
        if pos < 0:
            return None, None if truncated else "The multipart body has no parts."
        pos += 2
    model: str | None = None
    for _ in range(_MAX_PARTS + 1):
        pos += len(delimiter)
        if body.startswith(b"--", pos):  # the close delimiter
            return model, None
        eol = body.find(b"\r\n", pos, pos + 256)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            return model, None if truncated else "Malformed multipart delimiter."
        # The part's headers end at an empty line (at once for a part without headers).
        head_end = body.find(b"\r\n\r\n", eol, eol + _MAX_PART_HEAD)
        following = body.find(b"\r\n" + delimiter, eol + 2)
        if head_end < 0 or 0 <= following < head_end:
            if truncated and following < 0:
                return model, None
            return None, "Malformed multipart part headers."
        name: bytes | str | None = None
        for line in body[eol + 2 : head_end].split(b"\r\n"):
            header, colon, value = line.partition(b":")
            if colon and header.strip().lower() == b"content-disposition":
                if name is not None:
                    return None, "A multipart part has two Content-Disposition headers."
                name = _disposition_name(value) or b""
        if isinstance(name, str):
            return None, name
        if name == b"model":
            if model is not None:
                return None, "The multipart body has two model fields; send one."
            if following < 0:  # the value runs into the cut (or the body ends without a close)
                return None, None if truncated else "The multipart body is not terminated."
            try:
                model = body[head_end + 4 : following].decode("utf-8")
            except UnicodeDecodeError:
                return None, NOT_UTF8
        if following < 0:
            return model, None if truncated else "The multipart body is not terminated."
        pos = following + 2
    return None, "The multipart body has too many parts to be checked."
