"""YAML with line numbers, and a strict field reader on top of it.

Configuration errors must point at the file, the line and the field (`nexus.yaml:14: plans.free.limits[1].per:
unknown unit 'fortnight'`), so mappings loaded here remember the line of each key, duplicate keys are
errors (PyYAML would silently keep the last one), and `Fields` rejects unknown fields instead of ignoring a
typo that would leave a limit unenforced.
"""

from __future__ import annotations

import builtins
import gc
import math
import re
from collections.abc import Iterator
from typing import Any, NoReturn

import yaml

from nexus_authz.core.errors import ConfigError


class LineDict(dict[str, Any]):
    """A mapping that knows the line (1-based) of each of its keys and of itself."""

    __slots__ = ("line", "lines")

    def __init__(self) -> None:
        super().__init__()
        self.line = 0
        self.lines: dict[str, int] = {}


class LineList(list[Any]):
    """A sequence that knows the line of each item."""

    __slots__ = ("line", "lines")

    def __init__(self) -> None:
        super().__init__()
        self.line = 0
        self.lines: list[int] = []


# libyaml's C parser and composer when available (about 10x faster on a 100,000-key file); the
# constructors below are ours either way, so both behave the same.
_Base: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_Base):  # type: ignore[misc]
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    result = LineDict()
    result.line = node.start_mark.line + 1
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            key = str(key)
        if key in result:
            raise _DuplicateKey(key, key_node.start_mark.line + 1)
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    result = LineList()
    result.line = node.start_mark.line + 1
    for item in node.value:
        result.append(loader.construct_object(item, deep=True))
        result.lines.append(item.start_mark.line + 1)
    return result


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int) -> None:
        super().__init__(key)
        self.key = key
        self.line = line


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
# Timestamps stay strings: the key file's `expires_at` is parsed by our own rules, with our errors.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML text; every syntax problem becomes a ConfigError naming `source` and the line.

    The cyclic garbage collector is paused meanwhile: a 100,000-key file creates millions of objects,
    each allocation burst triggering collections that rescan all of them (measured: 21 s with, 5 s
    without, for 100,000 keys). Nothing built here forms cycles.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _load(text, source)
    finally:
        if was_enabled:
            gc.enable()


def _load(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader
    except _DuplicateKey as exc:
        raise ConfigError(f"duplicate key {exc.key!r}", source=f"{source}:{exc.line}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError(f"invalid YAML: {exc.problem or exc}", source=where) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", source=source) from None
    except RecursionError:
        raise ConfigError("invalid YAML: nested too deeply", source=source) from None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float | None:
    """`1.5`, `"500ms"`, `"10s"`, `"5m"`, `"1h"`, `"7d"` -> seconds; None if not a duration."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) and value >= 0 else None
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return None


_MISSING: Any = object()


class Fields:
    """Reads the fields of one YAML mapping, each with a type, and reports what was left unread.

    `path` is the dotted field path of the mapping (`plans.free`), used in every error.
    """

    __slots__ = ("_data", "_path", "_seen", "source")

    def __init__(self, data: object, source: builtins.str, path: builtins.str) -> None:
        self.source = source
        self._path = path
        if data is None:
            data = LineDict()
        if not isinstance(data, dict):
            raise ConfigError(f"expected a mapping, got {describe(data)}", source=source, field=path or None)
        self._data: dict[str, Any] = data
        self._seen: set[str] = set()

    # -- locating -----------------------------------------------------------------------------------
    def where(self, name: builtins.str | None = None) -> builtins.str:
        lines = getattr(self._data, "lines", {})
        line = lines.get(name) if name is not None else None
        if line is None:  # a missing field: point at the mapping that lacks it
            line = getattr(self._data, "line", 0)
        return f"{self.source}:{line}" if line else self.source

    def path(self, name: builtins.str) -> builtins.str:
        return f"{self._path}.{name}" if self._path else name

    def fail(self, name: builtins.str | None, message: builtins.str) -> NoReturn:
        field = self.path(name) if name is not None else (self._path or None)
        raise ConfigError(message, source=self.where(name), field=field)

    # -- access ---------------------------------------------------------------------------------------
    def has(self, name: builtins.str) -> bool:
        return name in self._data and self._data[name] is not None

    def raw(self, name: builtins.str, default: Any = _MISSING) -> Any:
        self._seen.add(name)
        if name not in self._data or self._data[name] is None:
            if default is _MISSING:
                self.fail(name, "is required")
            return default
        return self._data[name]

    def str(self, name: builtins.str, default: Any = _MISSING) -> Any:
        value = self.raw(name, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.fail(name, f"expected a string, got {describe(value)}")
        text = str(value).strip()
        if not text:
            self.fail(name, "must not be empty")
        return text

    def bool(self, name: builtins.str, default: bool = False) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            self.fail(name, f"expected true or false, got {describe(value)}")
        return value

    def int(self, name: builtins.str, default: Any = _MISSING, *, minimum: builtins.int = 0) -> Any:
        value = self.raw(name, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, f"expected an integer, got {describe(value)}")
        if value < minimum:
            self.fail(name, f"must be at least {minimum}, got {value}")
        return value

    def number(self, name: builtins.str, default: Any = _MISSING, *, minimum: float = 0.0) -> Any:
        value = self.raw(name, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self.fail(name, f"expected a number, got {describe(value)}")
        if value < minimum:
            self.fail(name, f"must be at least {minimum}, got {value}")
        return float(value)

    def duration(self, name: builtins.str, default: Any = _MISSING, *, minimum: float = 0.0) -> Any:
        value = self.raw(name, default)
        if value is default and default is not _MISSING:
            return value
        seconds = parse_duration(value)
        if seconds is None:
            self.fail(name, f'expected a duration such as "500ms", "10s", "5m" or "1h", got {value!r}')
        if seconds < minimum:
            self.fail(name, f"must be at least {minimum}s, got {value!r}")
        return seconds

    def choice(self, name: builtins.str, choices: tuple[builtins.str, ...], default: Any = _MISSING) -> Any:
        value = self.str(name, default)
        if value is default and default is not _MISSING:
            return value
        if value not in choices:
            self.fail(name, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def str_list(
        self, name: builtins.str, default: tuple[builtins.str, ...] = ()
    ) -> tuple[builtins.str, ...]:
        value = self.raw(name, None)
        if value is None:
            return default
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            self.fail(name, f"expected a list of strings, got {describe(value)}")
        out: list[builtins.str] = []
        for i, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, str | int | float) or not str(item).strip():
                self.fail(name, f"item {i} must be a non-empty string, got {describe(item)}")
            out.append(str(item).strip())
        return tuple(out)

    def mapping(self, name: builtins.str) -> Fields:
        return Fields(self.raw(name, None), self.source, self.path(name))

    def items(self, name: builtins.str) -> Iterator[tuple[builtins.int, object, builtins.str]]:
        """Yields (index, item, field path) of a list field; a missing field is an empty list."""
        value = self.raw(name, None)
        if value is None:
            return
        if not isinstance(value, list):
            self.fail(name, f"expected a list, got {describe(value)}")
        for i, item in enumerate(value):
            yield i, item, f"{self.path(name)}[{i}]"

    def names(self) -> list[builtins.str]:
        return list(self._data)

    def done(self) -> None:
        """Every field must have been read: an unknown field is most likely a typo, so it is an error."""
        for name in self._data:
            if name not in self._seen:
                self.fail(name, "unknown field")


def describe(value: object) -> str:
    """A value as an error message names it: "the string 'x'", "a mapping", "the number 3"..."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}" if len(value) < 60 else "a long string"
    return type(value).__name__
