"""A fast, streaming reader for the plain shape of a key file, with YAML's exact result or none.

A 1,000,000-key file through PyYAML (even libyaml's composer) takes ~40 s and ~5 KB of memory per key at
its peak: the whole node graph, then the whole document, exist before the first key is validated. Most
key files are one long list of flat entries:

    keys:
      - id: team-a-1
        hash: hmac-sha256:<64 hex>
        tenant: team-a
        models: ["gpt-4o*", claude-3-5-sonnet]
        plan: pro

`load_plain` reads that shape line by line and hands the entries over one at a time (a lazy `LineList`),
each a `LineDict` equal to what `yamlsrc.load_yaml` builds for it (values, line numbers), so the key-file
parser's validation and its `file:line` errors are unchanged and at most one entry's objects exist at a
time. It only takes what it can read exactly: values that are letter-led plain scalars (no YAML type but
str can match them: no number, boolean, null, timestamp), quoted strings without escapes, and lists of
those (flow `[a, "b"]` or block `- a`); blank and comment lines. The first entry it cannot read that way
hands the rest of the file to `load_yaml` (which then also reports any syntax error with its line), from
that entry on; a file that does not start this way is not taken at all (`None`).
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable, Iterator
from typing import Any

from nexus_authz.core.errors import ConfigError
from nexus_authz.core.yamlsrc import LineDict, LineList, load_yaml

__all__ = ["PlainEntries", "entry_patterns", "load_plain", "whole_entry"]

# Scalars YAML reads as exactly this string. Plain: starts with a letter, no space, no flow indicator or
# comment sign, no trailing ':' (a key); the words YAML 1.1 reads as booleans or null are excluded.
_PLAIN = r"[A-Za-z][A-Za-z0-9_.@/*?+=%$^~!&|<>()-]*(?::[A-Za-z0-9_.@/*?+=%$^~!&|<>()-]+)*"
_DQ = r'"[\x20\x21\x23-\x5b\x5d-\x7e]*"'  # no escapes, no control characters
_SQ = r"'[\x20-\x26\x28-\x7e]*'"
_SCALAR = rf"(?:{_PLAIN}|{_DQ}|{_SQ})"
_FLOW_ITEM = r"(?:[A-Za-z][A-Za-z0-9_.@/*?+=%$^~!&|<>()-]*|" + _DQ + "|" + _SQ + ")"
_FLOW = rf"\[ *(?:{_FLOW_ITEM}(?: *, *{_FLOW_ITEM})*)? *\]"
_FIELD = re.compile(rf"([a-z_]+): ({_SCALAR}|{_FLOW})?\Z")
_ITEM = re.compile(rf"- ({_SCALAR})\Z")
_FLOW_ITEMS = re.compile(_FLOW_ITEM)
_NOT_STR = frozenset({"yes", "no", "true", "false", "on", "off", "null"})
_ENTRY_START = re.compile(r"( *)- [a-z_]+:")


def _scalar(text: str) -> str | None:
    """The string a matched scalar stands for; None when YAML would read it as something else."""
    first = text[0]
    if first == '"' or first == "'":
        return text[1:-1]
    return None if text.lower() in _NOT_STR else text


def _lines(text: str, pos: int, line_no: int) -> Iterator[tuple[int, str]]:
    """(1-based number, text) of each line from offset `pos` (line `line_no` + 1) on, blank and comment
    lines left out (YAML ignores them in a block collection). One line at a time: no list of lines."""
    end_of_text = len(text)
    find = text.find
    while pos < end_of_text:
        end = find("\n", pos)
        if end < 0:
            end = end_of_text
        line = text[pos:end]
        pos = end + 1
        line_no += 1
        stripped = line.lstrip(" ")
        if stripped and stripped[0] != "#":
            yield line_no, line


def entry_patterns(indent: int) -> tuple[Callable[..., re.Match[str] | None], Callable[[str], list[Any]]]:
    """(match one whole entry at a position, its other fields' (name, raw) pairs) for entries whose
    `- ` stands at column `indent`: each field on its own line, nothing between them."""
    prefix = " " * indent + "- "
    inner = " " * (indent + 2)
    whole = re.compile(
        rf"{prefix}([a-z_]+): ({_SCALAR}|{_FLOW})\n((?:{inner}[a-z_]+: (?:{_SCALAR}|{_FLOW})\n)*)"
    ).match
    fields = re.compile(rf"{inner}([a-z_]+): ({_SCALAR}|{_FLOW})\n").findall
    return whole, fields


def whole_entry(match: re.Match[str], fields: Callable[[str], list[Any]], line_no: int) -> LineDict | None:
    """The entry `entry_patterns`' whole match stands for (its first line is `line_no`), as YAML reads
    it; None when some value is not exactly a string or a list of strings, or a field repeats."""
    entry = LineDict()
    entry.line = line_no
    for name, raw in ((match.group(1), match.group(2)), *fields(match.group(3))):
        if name in entry:
            return None
        if raw[0] == "[":
            flow = LineList()
            flow.line = line_no
            for item_match in _FLOW_ITEMS.finditer(raw, 1):
                scalar = _scalar(item_match.group(0))
                if scalar is None:
                    return None
                flow.append(scalar)
                flow.lines.append(line_no)
            entry[name] = flow
        else:
            scalar = _scalar(raw)
            if scalar is None:
                return None
            entry[name] = scalar
        entry.lines[name] = line_no
        line_no += 1
    return entry


class _Entries(LineList):
    """The `keys:` list, read lazily: entries are built as they are iterated, one at a time."""

    __slots__ = ("_done", "_indent", "_pos", "_root", "_source", "_start_line", "_text")

    def __init__(self, text: str, source: str, pos: int, line_no: int, indent: int, root: LineDict):
        super().__init__()
        self._text = text
        self._source = source
        self._pos = pos  # offset of the first entry's line
        self._start_line = line_no  # its number
        self._indent = indent
        self._root: LineDict | None = root
        self._done = 0  # entries taken before `_pos` (by `resume`)
        self.line = line_no

    @property
    def start(self) -> tuple[str, int, int, int]:
        """(the text, the offset and line number of the first entry not taken yet, the entries' indent)."""
        return self._text, self._pos, self._start_line, self._indent

    def resume(self, pos: int, line_no: int, done: int) -> None:
        """Iterate from offset `pos` (line `line_no`) on: the `done` entries before it were taken
        otherwise (core/keyfile_fast.py); a fallback to YAML then starts at entry `done`."""
        self._pos = pos
        self._start_line = line_no
        self._done = done

    def release(self) -> None:
        """Drop the text and the way back to the root (a cycle): the list will not be iterated."""
        self._root = None
        self._text = ""

    def __iter__(self) -> Iterator[Any]:
        # The cyclic GC paused while the entries are read and turned into records, as `load_yaml` does
        # while it parses (1,000,000 keys: millions of new objects, each burst a collection scanning them).
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            yield from self._read()
        finally:  # the root holds this list: drop the way back (and the text), or the pair is a cycle
            self._root = None
            self._text = ""
            if was_enabled:
                gc.enable()

    def _read(self) -> Iterator[Any]:
        """Entries written one field a line with nothing between them, matched whole (the shape a
        generated file has); from the first other entry on, line by line (`_by_line`)."""
        text = self._text
        prefix = " " * self._indent + "- "
        whole, fields = entry_patterns(self._indent)
        pos = self._pos
        line_no = self._start_line
        end_of_text = len(text)
        done = self._done
        while pos < end_of_text:
            match = whole(text, pos)
            if match is None:
                break
            end = match.end()
            if end < end_of_text and not text.startswith(prefix, end):
                break  # a blank or comment line, a deeper line...: maybe more of this entry
            entry = whole_entry(match, fields, line_no)
            if entry is None:
                break
            yield entry
            done += 1
            pos = end
            line_no += len(entry)
        yield from self._by_line(pos, line_no, done)

    def _by_line(self, pos: int, first_line: int, done: int) -> Iterator[Any]:
        """The entries from offset `pos` (line `first_line`) on, `done` handed over already."""
        prefix = " " * self._indent + "- "
        inner = " " * (self._indent + 2)
        n_prefix = len(prefix)
        n_inner = len(inner)
        field_match = _FIELD.match
        entry: LineDict | None = None
        items: LineList | None = None  # an open block list (the value of `items_name`)
        items_name = ""
        items_indent = 0
        for line_no, line in _lines(self._text, pos, first_line - 1):
            if items is not None:
                stripped = line.lstrip(" ")
                indent = len(line) - len(stripped)
                first_item = not items and indent in (n_inner, n_inner + 2)
                if stripped[:2] == "- " and (indent == items_indent or first_item):
                    item = _ITEM.match(stripped)
                    value = _scalar(item.group(1)) if item is not None else None
                    if value is None:
                        break
                    if not items:
                        items.line = line_no
                        items_indent = indent
                    items.append(value)
                    items.lines.append(line_no)
                    continue
                assert entry is not None
                entry[items_name] = items if items else None
                items = None
            if line.startswith(prefix):
                if entry is not None:
                    yield entry
                    done += 1
                entry = LineDict()
                entry.line = line_no
                text = line[n_prefix:]
            elif entry is not None and line.startswith(inner) and line[n_inner] not in " -":
                text = line[n_inner:]
            else:
                break  # the list has ended, or a line that is not the plain shape
            match = field_match(text)
            if match is None:
                break
            name, raw = match.group(1), match.group(2)
            if name in entry:
                break  # a duplicate key: YAML's error
            entry.lines[name] = line_no
            if raw is None:  # a block list follows, or nothing (null)
                items = LineList()
                items_name = name
                items_indent = -1
                continue
            if raw[0] == "[":
                flow = LineList()
                flow.line = line_no
                for item_match in _FLOW_ITEMS.finditer(raw, 1):
                    scalar = _scalar(item_match.group(0))
                    if scalar is None:
                        break
                    flow.append(scalar)
                    flow.lines.append(line_no)
                else:
                    entry[name] = flow
                    continue
                break
            scalar = _scalar(raw)
            if scalar is None:
                break
            entry[name] = scalar
        else:
            if entry is not None:
                if items is not None:
                    entry[items_name] = items if items else None
                yield entry
            return
        yield from self._rest(done)

    def _rest(self, index: int) -> Iterator[Any]:
        """From entry `index` on, YAML's reading of the whole file (and the root's other fields)."""
        doc = load_yaml(self._text, self._source)
        root = self._root
        assert root is not None, "the key list is read once"
        if not isinstance(doc, LineDict) or not isinstance(doc.get("keys"), list):  # pragma: no cover
            raise ConfigError("the key file is not a mapping with a `keys` list", source=self._source)
        for name, value in doc.items():
            if name != "keys":
                root[name] = value
                root.lines[name] = doc.lines[name]
        yield from doc["keys"][index:]


def load_plain(text: str, source: str) -> LineDict | None:
    """The key file's document with its `keys:` list read lazily (see the module doc); None when the file
    does not start with `keys:` and a first entry in the plain shape (then read it with `load_yaml`)."""
    lines = _lines(text, 0, 0)
    first = next(lines, None)
    if first is None or first[1] != "keys:":
        return None
    second = next(lines, None)
    start = _ENTRY_START.match(second[1]) if second is not None else None
    if second is None or start is None:
        return None
    line_no = second[0]
    pos = 0
    for _ in range(line_no - 1):  # the offset of the entry's line
        pos = text.index("\n", pos) + 1
    root = LineDict()
    root.line = first[0]
    root["keys"] = _Entries(text, source, pos, line_no, len(start.group(1)), root)
    root.lines["keys"] = first[0]
    return root


PlainEntries = _Entries  # the type of a plain document's `keys` (core/keyfile_fast.py takes it)
