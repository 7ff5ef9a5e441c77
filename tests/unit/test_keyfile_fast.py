"""The key file's fast record builder (core/keyfile_fast.py) against the general path it shortcuts: every
KeyRecord field, the snapshot's order, and every error (message, file:line, field) must be the same."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexus_authz.core import config as config_mod
from nexus_authz.core.config import PolicySet, parse_key_file, parse_policy
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.keys import KeySnapshot
from nexus_authz.core.model import Credential, KeyRecord
from nexus_authz.core.yamlsrc import Fields, load_yaml

POLICY_YAML = """
credentials:
  openai: {header: authorization, value: sk-up}
  anthropic: {header: x-api-key, value: sk-ant}
default_credential: openai
plans:
  pro:
    limits:
      - {requests: 100, per: minute}
      - {tokens: 100000, per: day, model: "gpt-4o*"}
    models: ["gpt-4o*"]
  free:
    limits: [{requests: 5, per: minute}]
tenants:
  acme:
    limits: [{requests: 1000, per: minute}]
    groups:
      research: {limits: [{tokens: 5000, per: hour}]}
      ops: {}
  default: {groups: {research: {}, ops: {limits: [{requests: 7, per: second}]}}}
  beta: {groups: {research: {}, ops: {}}}
  "t e": {groups: {research: {}, ops: {}}}
prices:
  "gpt-4o*": {input: 2.5, output: 10}
"""
CREDENTIALS = {
    "openai": Credential(name="openai", header="authorization", value="Bearer sk-up"),
    "anthropic": Credential(name="anthropic", header="x-api-key", value="sk-ant"),
}


def _policy() -> PolicySet:
    return parse_policy(Fields(load_yaml(POLICY_YAML, "nexus.yaml"), "nexus.yaml", ""))


POLICY = _policy()


def _load(text: str) -> KeySnapshot:
    return parse_key_file(
        text, "keys.yaml", policy=POLICY, credentials=CREDENTIALS, pepper=b"pepper", loaded_at=0.0
    )


@contextmanager
def _general() -> Iterator[None]:
    """The general path only: the fast builder takes no entry."""
    with mock.patch.object(config_mod, "build_flat", lambda entries, build, **kw: 0):
        yield


def _outcome(text: str) -> Any:
    """The snapshot (every record's every field, in the snapshot's orders) or the error. A record's
    `recipe` is how it makes its upstream headers and counter ids, not what they are: left out."""
    try:
        snap = _load(text)
    except ConfigError as exc:
        return ("error", str(exc), exc.source, exc.field)
    records = [
        (key_digest, tuple(getattr(r, f.name) for f in dataclasses.fields(r) if f.name != "recipe"))
        for key_digest, r in snap.by_digest.items()
    ]
    return records, list(snap.by_id), snap.version


def _hash(i: int) -> str:
    return "hmac-sha256:" + hashlib.sha256(str(i).encode()).hexdigest()


BAD_IDS = ["yes", "No", "null", "bad id", '"a b"', "9x", "a*b", "x" * 129, "[a]", "key-1", "key-2", "key-3"]
BAD_HASHES = ["hmac-sha256:abc", '"hmac-sha256:' + "a " * 32 + '"', "sha1:" + "a" * 64, _hash(1001)]
# (valid values, invalid values) of the other fields; an error ends a file's check, so they stay rare
OPTIONAL = {
    "tenant": (["acme", "beta", '"t e"', "'acme'"], ["yes", '"a\\tb"']),
    "group": (["research", "ops"], ["nope"]),
    "plan": (["pro", "free", '"pro"'], ["nope"]),
    "models": (['["gpt-4o*"]', "[o1, 'gpt-4*']", "[]", '["*"]', "\n      - o1\n      - o3"], []),
    "paths": (['["/v1/chat/*"]', "[]"], ["[v1]"]),
    "credential": (["openai", "anthropic"], ["nope"]),
}
RARE = {  # not the plain shape (the general path from there on), or not a field at all
    "disabled": ["true", "false"],
    "expires_at": ['"2027-01-31"', "2027-01-31", '"never"'],
    "limits": ["[{requests: 1, per: minute}]", "[{usd: 1, per: day}]"],
    "metadata": ["{team: ml}", "\n      team: ml"],
    "zzz": ["unknown"],
}


def _value(rnd: random.Random, valid: list[str], invalid: list[str], rate: float = 0.01) -> str:
    return rnd.choice(invalid) if invalid and rnd.random() < rate else rnd.choice(valid)


def _entry(rnd: random.Random) -> list[tuple[str, str]]:
    """One entry's fields: (name, value as written), `{id}`/`{hash}` where the key file puts each key's."""
    fields: list[tuple[str, str]] = []
    if rnd.random() > 0.01:
        fields.append(("id", rnd.choice(["{id}", '"{id}"', "'{id}'"])))
    if rnd.random() > 0.01:
        fields.append(("hash", rnd.choice(["{hash}", '"{hash}"', "'{hash}'"])))
    for name, (valid, invalid) in OPTIONAL.items():
        if rnd.random() < 0.5:
            fields.append((name, _value(rnd, valid, invalid)))
    for name, values in RARE.items():
        if rnd.random() < 0.01:
            fields.append((name, rnd.choice(values)))
    if rnd.random() < 0.2:
        rnd.shuffle(fields)
    return fields or [("id", "{id}")]


def _render(fields: list[tuple[str, str]], key_id: str, key_hash: str, comment: bool, inner: str) -> str:
    lines = [f"{name}: {value}" for name, value in fields]
    if inner:  # a comment line within the entry, after what its shape's text would be
        lines += ["# a comment", inner]
    text = "  - " + "\n    ".join(lines) + "\n"
    if key_id[:1] in "\"'" or key_hash[:1] in "\"'":  # a quoted value drawn: in place of the whole
        text = text.replace('"{id}"', "{id}").replace("'{id}'", "{id}")
        text = text.replace('"{hash}"', "{hash}").replace("'{hash}'", "{hash}")
    text = text.replace("{id}", key_id).replace("{hash}", key_hash)
    return text + ("  # a comment\n" if comment else "")


@st.composite
def key_files(draw: st.DrawFn) -> str:
    """Entries of a few shapes repeated, each key's id and hash new or (rarely) bad, repeated, quoted;
    the odd entry of any shape; comment lines; something after the list."""
    rnd = random.Random(draw(st.integers(0, 2**64)))  # not st.randoms(): its draws favour the extremes
    shapes = [_entry(rnd) for _ in range(rnd.randint(1, 3))]
    out = ["keys:\n"]
    for i in range(draw(st.integers(0, 60))):
        fields = _entry(rnd) if rnd.random() < 0.1 else rnd.choice(shapes)
        key_id = _value(rnd, [f"key-{i}"] * 8 + [f'"{i}abc"', f"'q-{i}'", f"a.b@c/d:e{i}"], BAD_IDS, 0.03)
        good_hashes = [_hash(1000 + i)] * 3 + ["hmac-sha256:" + _hash(1000 + i)[12:].upper()]
        key_hash = _value(rnd, good_hashes, BAD_HASHES, 0.02)
        inner = rnd.choice(["zzz: unknown", "tenant: acme", "models: [a]"]) if rnd.random() < 0.02 else ""
        out.append(_render(fields, key_id, key_hash, rnd.random() < 0.02, inner))
    if rnd.random() < 0.02:
        out.append("other: 1\n")
    return "".join(out)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key_files())
def test_fast_builder_gives_the_general_paths_snapshot_or_error(text: str) -> None:
    fast = _outcome(text)
    with _general():
        general = _outcome(text)
    assert fast == general


def _uniform(n: int, extra: str = "    tenant: acme\n    group: research\n    plan: pro\n") -> str:
    return "keys:\n" + "".join(f"  - id: key-{i}\n    hash: {_hash(i)}\n{extra}" for i in range(n))


def test_one_general_build_per_shape() -> None:
    """1,000 keys of one shape: the general path runs for the first only, the rest share its work."""
    calls = []
    real = config_mod.level_limits

    def counting(*args: Any) -> Any:
        calls.append(args[3])
        return real(*args)

    with mock.patch.object(config_mod, "level_limits", counting):
        snap = _load(_uniform(1000))
    assert calls == ["key-0"]
    key = snap.by_id["key-999"]
    assert key.counter_ids == (
        "key-999\x00requests/minute",
        "key-999\x00tokens/day@gpt-4o*",
        "\x02g\x01acme\x01research\x00tokens/hour",
        "\x02t\x01acme\x00requests/minute",
    )
    assert dict(key.upstream_headers)["x-nexus-key-id"] == "key-999"
    assert key.limits is snap.by_id["key-0"].limits
    fast = _outcome(_uniform(1000))
    with _general():
        assert _outcome(_uniform(1000)) == fast


def test_an_error_deep_in_a_fast_file_names_its_line() -> None:
    text = _uniform(600)
    dup = text.replace("id: key-500\n", "id: key-7\n")
    err = _outcome(dup)
    assert err[0] == "error" and "duplicate key id 'key-7'" in err[1]
    assert err[2] == f"keys.yaml:{2 + 500 * 5}" and err[3] == "keys[500].id"
    with _general():
        assert _outcome(dup) == err
    bad_plan = text.replace(
        f"{_hash(300)}\n    tenant: acme\n    group: research\n    plan: pro",
        f"{_hash(300)}\n    tenant: acme\n    group: research\n    plan: gold",
    )
    err = _outcome(bad_plan)
    assert err[0] == "error" and "no plan named 'gold'" in err[1] and err[3] == "keys[300].plan"
    with _general():
        assert _outcome(bad_plan) == err


def test_keys_of_a_tenant_share_its_counter_id_strings() -> None:
    """A group's or tenant's window has one counter id: every key of it holds that one string, whichever
    path built the key (~80 B a key and level window otherwise, benchmarks/bench_memory.py)."""
    text = _uniform(3) + "  - id: other\n    hash: " + _hash(99) + "\n    tenant: acme\n    group: research\n"
    for general in (True, False):
        with _general() if general else nullcontext():
            snap = _load(text)
        a, b, c = (snap.by_id[k] for k in ("key-0", "key-2", "other"))
        assert a.counter_ids[-2:] == c.counter_ids[-2:]
        assert all(
            x is y is z
            for x, y, z in zip(a.counter_ids[-2:], b.counter_ids[-2:], c.counter_ids[-2:], strict=True)
        )


def test_a_key_never_used_holds_no_counter_ids_or_headers_of_its_own() -> None:
    """A fast-path key's upstream headers and counter ids (~400 B a key at 100,000 keys,
    benchmarks/bench_memory.py) are made when read, from its shape's shared recipe: the same values as
    the general path's; the counter ids (read by every check) are then kept."""
    snap = _load(_uniform(50))
    key = snap.by_id["key-42"]
    for name in ("counter_ids", "upstream_headers"):  # the slots themselves: not filled yet
        with pytest.raises(AttributeError):
            getattr(KeyRecord, name).__get__(key)
    assert key.recipe is snap.by_id["key-7"].recipe
    with _general():
        general = _load(_uniform(50)).by_id["key-42"]
    assert key.counter_ids == general.counter_ids and key.upstream_headers == general.upstream_headers
    assert KeyRecord.counter_ids.__get__(key) is key.counter_ids  # kept: later reads are plain slot reads
    with pytest.raises(AttributeError):  # not kept: read only to build an allow answer (cached)
        KeyRecord.upstream_headers.__get__(key)
    revoked = dataclasses.replace(key, disabled=True)  # keys.with_revoked: the same parts
    assert revoked.counter_ids == general.counter_ids and revoked.disabled
