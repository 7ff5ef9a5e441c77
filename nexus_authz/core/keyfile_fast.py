"""Records for the common flat key file without parsing each key: one general build per *shape*.

A generated key file of 1,000,000 keys repeats a few shapes: the same fields, in the same order, with the
same values except `id` and `hash`:

    - id: team-a-17
      hash: hmac-sha256:<64 hex>
      tenant: team-a
      models: ["gpt-4o*"]
      plan: pro

Reading each entry into a `LineDict` (core/keyfile_plain.py) and validating it field by field
(core/config.py `parse_key_file`) costs ~25 µs a key. Here the first entry of each shape goes through that
general path unchanged (its validation, its errors, its record), and becomes the shape's *template*: a
regex that matches the shape's exact text with only the id and hash free, and the template record. Every
later entry the regex matches is checked for what can differ (the id: its form, no duplicate; the hash:
its form, no duplicate) and gets the template's record with its own key id, counter ids and upstream
headers: everything else the general path derives only from the fields that matched verbatim.

Anything else stops this path at that entry, and the general path takes the rest from there, so a
problem is reported exactly as before (same `file:line: field:` error): an entry of a new shape the
reader cannot take whole, a bad or repeated id or hash, more shapes than `MAX_SHAPES`.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable
from typing import Any

from nexus_authz.core import keys as keys_mod
from nexus_authz.core.keyfile_plain import _NOT_STR, _PLAIN, PlainEntries, entry_patterns, whole_entry
from nexus_authz.core.model import KeyRecipe, KeyRecord, record_like

__all__ = ["MAX_SHAPES", "build_flat"]

MAX_SHAPES = 256  # distinct shapes kept as templates; entries of further shapes go the general path
_KEY_ID_HEADER = "x-nexus-key-id"
_HEX64 = "[0-9a-fA-F]{64}"
_NOTS = "|".join(sorted(_NOT_STR))


def _value_pattern(name: str, quote: str, id_pattern: str) -> str:
    """The regex (one group: the value) of an `id` or `hash` value written plain (`quote` "") or in
    quotes, taking exactly the values the general path accepts: a key id it reads as a string that
    `id_pattern` matches; a hash `parse_hash` reads, as 64 hex digits. Anything else goes the general
    path, which says what is wrong."""
    if name == "hash":
        return f"{quote}{re.escape(keys_mod.HASH_SCHEME)}:({_HEX64}){quote}\\n"
    if quote:
        return f"{quote}({id_pattern}){quote}\\n"
    # plain: a plain scalar (else YAML reads it otherwise), not a word YAML reads as a boolean or null
    return f"(?!(?i:{_NOTS})\\n)(?=(?:{id_pattern})\\n)({_PLAIN})\\n"


class _Shape:
    """One shape's regex (groups: the id and the hex digits of the hash) and what its keys share."""

    __slots__ = (
        "hash_group",
        "id_group",
        "lines",
        "match",
        "recipe",
        "template",
    )

    def __init__(self, entry_text: str, indent: int, key: _Key, template: KeyRecord, id_pattern: str) -> None:
        prefix = " " * indent + "- "
        inner = " " * (indent + 2)
        parts = []
        self.id_group = self.hash_group = 0
        for i, ((name, raw), line) in enumerate(zip(key, entry_text.split("\n"), strict=True)):
            if name == "id" or name == "hash":
                if name == "id":
                    self.id_group = 1 if not self.hash_group else 2
                else:
                    self.hash_group = 1 if not self.id_group else 2
                lead = re.escape((prefix if i == 0 else inner) + name + ": ")
                parts.append(lead + _value_pattern(name, raw, id_pattern))
            else:
                parts.append(re.escape(line + "\n"))
        self.match = re.compile("".join(parts)).match
        self.lines = len(key)
        key_id = template.key_id
        own = key_id + "\x00"
        n_own = 0
        for cid in template.counter_ids:
            if not cid.startswith(own):
                break
            n_own += 1
        self.recipe = KeyRecipe(
            _KEY_ID_HEADER,
            template.upstream_headers[1:],
            tuple(cid[len(key_id) :] for cid in template.counter_ids[:n_own]),
            template.counter_ids[n_own:],
        )
        self.template = template

    def record(self, key_id: str) -> KeyRecord:
        """The template's record for another key id (its upstream headers and counter ids are made from
        the shape's recipe when first read)."""
        return record_like(self.template, key_id, self.recipe)


_Key = tuple[tuple[str, str], ...]  # a shape: (name, raw value) of each field; (name, quote) for id, hash


def _key(pairs: list[tuple[str, str]]) -> _Key:
    return tuple(
        (name, raw[0] if raw[0] in "\"'" else "") if name == "id" or name == "hash" else (name, raw)
        for name, raw in pairs
    )


def _shape_of(entry_text: str, indent: int, key: _Key, template: KeyRecord, id_pattern: str) -> _Shape | None:
    """The template for entries like this one, or None when its record is not derivable for another
    key id (a record the general path made some other way)."""
    names = [name for name, _ in key]
    if names.count("id") != 1 or names.count("hash") != 1:
        return None
    if template.upstream_headers[:1] != ((_KEY_ID_HEADER, template.key_id),):
        return None
    own = template.key_id + "\x00"
    if any(template.key_id in cid for cid in template.counter_ids if not cid.startswith(own)):
        return None  # a level's counter id naming the key: not derivable by swapping the own ids' prefix
    return _Shape(entry_text, indent, key, template, id_pattern)


def build_flat(
    entries: PlainEntries,
    build: Callable[[Any, str], tuple[bytes, KeyRecord]],
    *,
    ids: set[str],
    digests: set[bytes],
    records: list[tuple[bytes, KeyRecord]],
    key_id_pattern: str,
) -> int:
    """Take the entries from the start of `entries` while they are in the flat shape (see the module
    doc), adding to `records` (and `ids`, `digests`) exactly what `build` (the general path: validates
    an entry, keeps its record, raises its ConfigError) would. `key_id_pattern` is the regex a key id
    matches whole. Returns how many entries were taken; `entries` then iterates the rest (it is released
    when nothing is left)."""
    text, pos, line_no, indent = entries.start
    prefix = " " * indent + "- "
    whole, fields = entry_patterns(indent)
    end_of_text = len(text)
    shapes: dict[_Key, _Shape | None] = {}
    shape: _Shape | None = None
    fromhex = bytes.fromhex
    append = records.append
    add_id = ids.add
    add_digest = digests.add
    startswith = text.startswith
    done = 0
    was_enabled = gc.isenabled()
    gc.disable()  # millions of new objects: no collections scanning them meanwhile (as keyfile_plain)
    try:
        while pos < end_of_text:
            if shape is not None:
                match = shape.match(text, pos)
                if match is not None:
                    end = match.end()
                    if end == end_of_text or startswith(prefix, end):
                        key_id = match.group(shape.id_group)
                        if key_id not in ids:
                            key_digest = fromhex(match.group(shape.hash_group))
                            if key_digest not in digests:
                                add_id(key_id)
                                add_digest(key_digest)
                                append((key_digest, shape.record(key_id)))
                                done += 1
                                pos = end
                                line_no += shape.lines
                                continue
            # Not the last shape's: the entry read whole as keyfile_plain does (or the general path
            # from here on), then another known shape's, or built by the general path.
            match = whole(text, pos)
            if match is None:
                break
            end = match.end()
            if end < end_of_text and not startswith(prefix, end):
                break  # maybe more of this entry (keyfile_plain reads it line by line)
            key = _key([(match.group(1), match.group(2)), *fields(match.group(3))])
            known = shapes.get(key)
            if known is not None and known is not shape:
                shape = known
                continue
            entry = whole_entry(match, fields, line_no)
            if entry is None:
                break
            _, template = build(entry, f"keys[{done}]")  # the general path; its errors stand
            done += 1
            pos = end
            line_no += len(entry)
            if key not in shapes and len(shapes) < MAX_SHAPES:
                shapes[key] = made = _shape_of(
                    text[match.start() : end - 1], indent, key, template, key_id_pattern
                )
                if made is not None:
                    shape = made
    except BaseException:
        entries.release()
        raise
    finally:
        if was_enabled:
            gc.enable()
    if pos >= end_of_text:
        entries.release()
    else:
        entries.resume(pos, line_no, done)
    return done
