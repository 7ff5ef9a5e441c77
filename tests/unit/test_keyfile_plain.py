"""The streaming reader of plain key files (core/keyfile_plain.py) must read exactly what YAML reads:
the same values and line numbers for every entry, and YAML's own reading (and errors) for anything else."""

from __future__ import annotations

from typing import Any

import pytest

from nexus_authz.core.errors import ConfigError
from nexus_authz.core.keyfile_plain import load_plain
from nexus_authz.core.yamlsrc import load_yaml

H = "hmac-sha256:" + "ab" * 32


def _norm(x: Any) -> Any:
    if isinstance(x, dict):
        return ("map", x.line, dict(x.lines), {k: _norm(v) for k, v in x.items()})
    if isinstance(x, list):
        return ("list", x.line, list(x.lines), [_norm(v) for v in x])
    return x


def _read(load: Any, text: str) -> Any:
    try:
        doc = load(text, "keys.yaml")
        if doc is None:
            return None
        entries = list(doc["keys"])  # first: a fallback may add the root's other fields
        out = _norm(doc)
        return (*out[:3], {**out[3], "keys": [_norm(e) for e in entries]})
    except ConfigError as exc:
        return ("error", str(exc))


PLAIN = [
    f"keys:\n  - id: a\n    hash: {H}\n",
    "keys:\n"
    + "".join(f'  - id: k{i}\n    hash: {H}\n    tenant: "t"\n    models: ["m*"]\n' for i in range(5)),
    f"keys:\n- id: a\n  hash: {H}\n- id: b\n  hash: {H}\n  plan: pro",
    f"# generated\n\nkeys:\n  # first\n  - id: a-1.x@y/z\n    hash: \"{H}\"\n\n    tenant: 't e'\n"
    "    models: [\"gpt-4o*\", claude-3, 'x']\n    plan: pro\n  - id: b\n    models: []\n",
    f"keys:\n  - id: a\n    models:\n    - gpt-4o\n    - o1\n    hash: {H}\n  - id: b\n    paths:\n"
    "      - /v1/chat/*\n    plan:\n  - id: c\n    tenant:\n",
]

FALLBACK = [  # not the plain shape somewhere: YAML's reading from there on
    "keys:\n  - id: a\n    disabled: true\n",
    "keys:\n  - id: a\n  - id: 123\n  - id: b\n",
    "keys:\n  - id: a\n  - id: b\n    expires_at: 2027-01-31\n",
    "keys:\n  - id: a\n  - id: no\n",
    "keys:\n  - id: a\n  - id: null\n  - id: ~\n",
    "keys:\n  - id: a\n    metadata:\n      team: x\n  - id: b\n",
    "keys:\n  - id: a\n  - id: b\n    limits: [{requests: 5, per: minute}]\n",
    "keys:\n  - id: a\nother: 1\n",
    "keys:\n  - id: a\n    id: b\n",  # duplicate key: YAML's error
    "keys:\n  - id: a\n  - id: b c\n    hash: x # c\n",
    "keys:\n  - id: a\n  - id: 'it''s'\n",
    'keys:\n  - id: a\n  - id: "a\\tb"\n',
    "keys:\n  - id: a\n  - id: [a, b: c]\n",
    "keys:\n  - id: a\n  - id: &x a\n    tenant: *x\n",
    "keys:\n  - id: a\n  - id: b\n   tenant: c\n",  # bad indentation: YAML's syntax error
    "keys:\n  - id: a\n  - {id: b}\n",
    "keys:\n  - id: a\n  - id: b\n    models:\n    - a\n      - b\n",
    "keys:\n  - id: a\n  - id: b\n    models:\n    - 1.5\n",
    "keys:\n  - id: a\r\n  - id: b\r\n",
    "keys:\n  - id: a\n  - id: b\n    tenant: x:\n",
    # after entries read whole (one field a line, nothing between): each way out of that path
    "keys:\n  - id: a\n    tenant: t\n  # c\n    hash: h\n  - id: b\n    hash: h\n",
    "keys:\n  - id: a\n    tenant: t\n    tenant: u\n  - id: b\n",
    "keys:\n  - id: a\n    tenant: t\n  - id: b\n    tenant: yes\n  - id: c\n",
    "keys:\n  - id: a\n    models: [a, b]\n  - id: b\n    models: [a, Off]\n  - id: c\n",
    "keys:\n  - id: a\n    tenant: t\n      x: y\n  - id: b\n",
    "keys:\n  - id: a\n    tenant: t\n\n  - id: b\n    tenant: t\n",
    "keys:\n  - id: a\n    tenant: t\n  - id: b\n    models:\n    - x\n  - id: c\n    tenant: t\n",
]

NOT_TAKEN = [
    "keys: []\n",
    "",
    "# x\n",
    "plans: {}\nkeys:\n  - id: a\n",
    "keys:\n  - {id: a}\n",
    "---\nkeys:\n- id: a",
]


@pytest.mark.parametrize("text", PLAIN + FALLBACK)
def test_reads_what_yaml_reads(text: str) -> None:
    assert _read(load_plain, text) == _read(load_yaml, text)


@pytest.mark.parametrize("text", NOT_TAKEN)
def test_other_shapes_are_left_to_yaml(text: str) -> None:
    assert load_plain(text, "keys.yaml") is None


def test_a_syntax_error_after_plain_entries_is_yamls() -> None:
    text = "keys:\n  - id: a\n  - id: b\n    tenant: [x\n"
    doc = load_plain(text, "keys.yaml")
    assert doc is not None
    with pytest.raises(ConfigError, match=r"keys\.yaml:\d+: invalid YAML"):
        list(doc["keys"])
