"""Keys managed at runtime (issue 17): the record, its operations, and how it joins the key snapshot.

The key file stays the GitOps way in; runtime keys are created, rotated, re-scoped, revoked and restored
through the policy API and kept in a store (SQLite embedded, Redis distributed: nexus_authz/stores/keys).
Everything here is pure: a `RuntimeKey` is plain data, the operations return a new one (or raise
`RuntimeKeyError` with a message for the caller), and `key_records` / `merge` / `apply_changes` turn
records into the `KeyRecord`s of the one `KeySnapshot` the hot path reads.

- Only keyed hashes are kept (HMAC-SHA256 under the pepper, core/keys.py); the secret is returned once.
- Rotation keeps the key id: the new hash and, for the grace period, the previous hash both map to the
  same key id (same limit counters, same ledger key id). The previous hash maps to a record that expires
  at the end of the grace period, so after it the old secret answers 401 `expired_api_key`; it stays in
  the snapshot (answering that) until the next rotation replaces it.
- Sources combine: file keys are read-only to the API; an id in both the key file and the runtime store
  is a configuration error (`merge` raises ConfigError naming the ids; the key file or config reload is
  rejected and the last good snapshot stays in force), and the API refuses to create an id the file has.
- `apply_changes` updates a snapshot for a batch of changed runtime keys without rebuilding it: only the
  changed entries are built, into copies of the two maps (O(keys), a C-level copy) or, for a caller that
  owns the maps (runtime_keys.RuntimeKeys), into the maps themselves (O(changed keys)); either way the
  result is a new KeySnapshot object swapped in by one assignment, like a reload.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from nexus_authz.core import keys as keys_mod
from nexus_authz.core.config import (
    _HEADER_VALUE,
    _ID,
    _NO_METADATA,
    PolicySet,
    _remove_headers,
    _upstream_headers,
    _uses_usd,
    key_limits,
)
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.hierarchy import group_problem, level_limits
from nexus_authz.core.keys import KeySnapshot
from nexus_authz.core.limits import Kind, LimitSpec
from nexus_authz.core.limits_yaml import parse_limits
from nexus_authz.core.model import Credential, KeyRecipe, KeyRecord, deferred

__all__ = [
    "KeyChanges",
    "KeySpec",
    "RuntimeKey",
    "RuntimeKeyError",
    "apply_changes",
    "check_against",
    "create",
    "decode",
    "digests",
    "file_version",
    "encode",
    "key_records",
    "merge",
    "restore",
    "revoke",
    "rotate",
    "rotation_state",
    "swap_file",
    "update",
]

MAX_GRACE_SECONDS: Final = 30 * 86400.0
MAX_METADATA: Final = 64
RUNTIME_SOURCE: Final = "runtime"


class RuntimeKeyError(ValueError):
    """An operation refused: `kind` is invalid (bad input), not_found, exists or conflict."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


@dataclass(frozen=True, slots=True)
class RuntimeKey:
    """One runtime key as stored. `key_hash` / `previous_hash` are raw HMAC digests, never a secret.

    `limits` is the key's own `limits:` list as the key file writes it (JSON text), so a runtime key
    takes exactly the limits a file key can. `version` is the store's version of the last change.
    """

    key_id: str
    key_hash: bytes = field(repr=False)
    tenant: str = "default"
    group: str = ""
    plan: str | None = None
    models: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    limits: str = "[]"
    expires_at: float | None = None
    disabled: bool = False
    metadata: tuple[tuple[str, str], ...] = ()
    credential: str | None = None
    previous_hash: bytes | None = field(default=None, repr=False)
    grace_until: float | None = None
    version: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What `create` takes (everything but the hash and the times)."""

    key_id: str
    tenant: str = "default"
    group: str = ""
    plan: str | None = None
    models: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    limits: str = "[]"
    expires_at: float | None = None
    disabled: bool = False
    metadata: tuple[tuple[str, str], ...] = ()
    credential: str | None = None


@dataclass(frozen=True, slots=True)
class KeyChanges:
    """What `update` changes: None leaves a field as it is. `clear_expiry` removes the expiry; an empty
    `plan` ("") removes the plan, an empty tuple of models/paths means "any"."""

    tenant: str | None = None
    group: str | None = None
    plan: str | None = None
    models: tuple[str, ...] | None = None
    paths: tuple[str, ...] | None = None
    limits: str | None = None
    expires_at: float | None = None
    clear_expiry: bool = False
    disabled: bool | None = None
    metadata: tuple[tuple[str, str], ...] | None = None
    credential: str | None = None


# -- validation ---------------------------------------------------------------------------------------------
def _check_text(value: str, what: str, *, empty: bool = False) -> None:
    if (not value and not empty) or len(value) > 256 or not _HEADER_VALUE.match(value):
        raise RuntimeKeyError(f"{what}: 1-256 printable ASCII characters")


def _parsed_limits(text: str) -> tuple[LimitSpec, ...]:
    try:
        raw = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as exc:
        raise RuntimeKeyError(f"limits: not JSON ({exc.msg})") from None
    try:
        return parse_limits(raw, source="runtime key", field="limits")
    except ConfigError as exc:
        raise RuntimeKeyError(str(exc)) from None


def _validate(key: RuntimeKey) -> RuntimeKey:
    if not _ID.match(key.key_id):
        raise RuntimeKeyError(
            "key_id: 1-128 letters, digits and . _ : @ / -, starting with a letter or digit"
        )
    _check_text(key.tenant, "tenant")
    if key.group:
        _check_text(key.group, "group")
    if key.plan is not None:
        _check_text(key.plan, "plan")
    for p in key.paths:
        if not p.startswith("/"):
            raise RuntimeKeyError(f"paths: path patterns start with '/': {p!r}")
    for m in key.models:
        if not m or len(m) > 256:
            raise RuntimeKeyError("models: each pattern is 1-256 characters")
    if key.expires_at is not None and not math.isfinite(key.expires_at):
        raise RuntimeKeyError("expires_at: not a time")
    if len(key.metadata) > MAX_METADATA:
        raise RuntimeKeyError(f"metadata: at most {MAX_METADATA} entries")
    for k, v in key.metadata:
        if not k or len(k) > 128 or len(v) > 1024:
            raise RuntimeKeyError("metadata: names are 1-128 characters, values at most 1024")
    specs = _parsed_limits(key.limits)
    # keep the canonical JSON form, so two replicas store the same text
    return dataclasses.replace(key, limits=_canonical_limits(key.limits) if specs or key.limits else "[]")


def _canonical_limits(text: str) -> str:
    raw = json.loads(text) if text.strip() else []
    return json.dumps(raw, sort_keys=True, separators=(",", ":"))


def check_against(key: RuntimeKey, policy: PolicySet, credentials: Mapping[str, Credential]) -> None:
    """What only the config in force can say: the plan and the credential exist, usd limits are priced,
    the group is one of the tenant's (`tenants:` in nexus.yaml)."""
    if key.plan is not None and key.plan not in policy.plans:
        known = ", ".join(sorted(policy.plans)) or "none defined"
        raise RuntimeKeyError(f"plan: no plan named {key.plan!r} (plans: {known})")
    cred = key.credential if key.credential is not None else policy.default_credential
    if cred is not None and cred not in credentials:
        raise RuntimeKeyError(f"credential: no credential named {cred!r} under credentials in the config")
    if _uses_usd(_parsed_limits(key.limits)) and not policy.prices:
        raise RuntimeKeyError("limits: a usd limit needs a prices table in the config")
    if problem := group_problem(policy.tenants, key.tenant, key.group):  # the key file's check
        raise RuntimeKeyError(f"group: {problem}")


# -- operations -------------------------------------------------------------------------------------------
def create(spec: KeySpec, *, key_hash: bytes, now: float) -> RuntimeKey:
    key = RuntimeKey(
        key_id=spec.key_id,
        key_hash=key_hash,
        tenant=spec.tenant or "default",
        group=spec.group,
        plan=spec.plan or None,
        models=tuple(spec.models),
        paths=tuple(spec.paths),
        limits=spec.limits or "[]",
        expires_at=spec.expires_at,
        disabled=spec.disabled,
        metadata=tuple(sorted(spec.metadata)),
        credential=spec.credential or None,
        created_at=now,
        updated_at=now,
    )
    return _validate(key)


def rotate(key: RuntimeKey, *, new_hash: bytes, grace: float, now: float) -> RuntimeKey:
    """A new secret; the current one keeps working for `grace` seconds (0: it stops now)."""
    if not (0.0 <= grace <= MAX_GRACE_SECONDS) or not math.isfinite(grace):
        raise RuntimeKeyError(f"grace: 0 to {MAX_GRACE_SECONDS:g} seconds")
    return dataclasses.replace(
        key, key_hash=new_hash, previous_hash=key.key_hash, grace_until=now + grace, updated_at=now
    )


def update(key: RuntimeKey, changes: KeyChanges, *, now: float) -> RuntimeKey:
    values: dict[str, Any] = {}
    for name in ("tenant", "group", "models", "paths", "limits", "disabled"):
        value = getattr(changes, name)
        if value is not None:
            values[name] = tuple(value) if isinstance(value, list) else value
    if changes.plan is not None:
        values["plan"] = changes.plan or None
    if changes.credential is not None:
        values["credential"] = changes.credential or None
    if changes.metadata is not None:
        values["metadata"] = tuple(sorted(changes.metadata))
    if changes.clear_expiry:
        values["expires_at"] = None
    elif changes.expires_at is not None:
        values["expires_at"] = changes.expires_at
    if not values:
        raise RuntimeKeyError("nothing to update: give at least one field")
    return _validate(dataclasses.replace(key, **values, updated_at=now))


def revoke(key: RuntimeKey, *, now: float) -> RuntimeKey:
    """Disabled from now on (401 `disabled_key`), the previous secret too (its grace period ends)."""
    if key.disabled and key.previous_hash is None:
        return key
    return dataclasses.replace(key, disabled=True, previous_hash=None, grace_until=None, updated_at=now)


def restore(key: RuntimeKey, *, now: float) -> RuntimeKey:
    if not key.disabled:
        return key
    return dataclasses.replace(key, disabled=False, updated_at=now)


def rotation_state(key: RuntimeKey, now: float) -> str:
    """none | grace (the previous secret still works) | expired (it answers expired_api_key)."""
    if key.previous_hash is None or key.grace_until is None:
        return "none"
    return "grace" if now < key.grace_until else "expired"


# -- storage form -------------------------------------------------------------------------------------------
def encode(key: RuntimeKey) -> str:
    """The stored JSON of a key (without its version, which the store keeps beside it)."""
    return json.dumps(
        {
            "id": key.key_id,
            "hash": key.key_hash.hex(),
            "tenant": key.tenant,
            "group": key.group,
            "plan": key.plan,
            "models": list(key.models),
            "paths": list(key.paths),
            "limits": key.limits,
            "expires_at": key.expires_at,
            "disabled": key.disabled,
            "metadata": dict(key.metadata),
            "credential": key.credential,
            "previous_hash": key.previous_hash.hex() if key.previous_hash is not None else None,
            "grace_until": key.grace_until,
            "created_at": key.created_at,
            "updated_at": key.updated_at,
        },
        separators=(",", ":"),
    )


def decode(text: str | bytes, version: int) -> RuntimeKey:
    """A stored key; ValueError (with what is wrong) if the text is not one."""
    try:
        d = json.loads(text)
        get = d.get
        metadata = get("metadata")
        previous = get("previous_hash")
        return RuntimeKey(  # positional, in field order: a million of these at a replica's start
            str(d["id"]),
            bytes.fromhex(d["hash"]),
            str(d["tenant"]),
            str(get("group") or ""),
            get("plan"),
            tuple(get("models") or ()),
            tuple(get("paths") or ()),
            str(get("limits") or "[]"),
            get("expires_at"),
            bool(get("disabled")),
            tuple(sorted((str(k), str(v)) for k, v in metadata.items())) if metadata else (),
            get("credential"),
            bytes.fromhex(previous) if previous else None,
            get("grace_until"),
            int(version),
            float(get("created_at") or 0.0),
            float(get("updated_at") or 0.0),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a stored runtime key: {exc}") from None


# -- into the snapshot ---------------------------------------------------------------------------------------
Pairs = tuple[tuple[bytes, KeyRecord], ...]


def _profile_parts(
    key: RuntimeKey, policy: PolicySet, credentials: Mapping[str, Credential], share: Callable[[Any], Any]
) -> tuple[Any, ...]:
    """What a key's entries take from its profile (tenant, group, plan, lists, limits, credential) and
    the config, the same for every key of that profile: checked, parsed and compiled once."""
    try:
        check_against(key, policy, credentials)
        own = _parsed_limits(key.limits)
    except RuntimeKeyError as exc:
        raise ConfigError(exc.message, source=RUNTIME_SOURCE, field=f"keys[{key.key_id}]") from None
    plan = policy.plans.get(key.plan) if key.plan is not None else None
    cred_name = key.credential if key.credential is not None else policy.default_credential
    credential = credentials.get(cred_name) if cred_name is not None else None
    own_limits = share(key_limits(plan, own, shadow_mode=policy.shadow_mode))
    models = share(key.models or (plan.models if plan else ()))
    paths = share(key.paths)
    # every level's windows; the counter ids (the key's own are `<key id>\x00<name>`) and the upstream
    # headers (the first names the key) are made per key from the recipe, when first read
    limits, ids = level_limits(policy.tenants, key.tenant, key.group, key.key_id, own_limits)
    headers = _upstream_headers(key.key_id, key.tenant, credential)
    recipe = KeyRecipe(
        headers[0][0],
        tuple(share(h) for h in headers[1:]),
        tuple("\x00" + spec.name for spec in own_limits),
        ids[len(own_limits) :],
    )
    return (
        recipe,
        credential,
        models,
        paths,
        share(_remove_headers(credential)),
        keys_mod.compile_globs(models),
        keys_mod.compile_globs(paths),
        share(limits),
        any(s.kind in (Kind.TOKENS, Kind.USD) or s.model is not None for s in limits),
        any(spec.model is not None for spec in limits),
    )


def key_records(
    key: RuntimeKey,
    *,
    policy: PolicySet,
    credentials: Mapping[str, Credential],
    share: Callable[[Any], Any] = lambda v: v,
    memo: dict[Any, Any] | None = None,
) -> Pairs:
    """The snapshot entries of one runtime key: its current hash, and its previous hash during (and after:
    it then answers expired_api_key) a rotation's grace period. Its windows are those of every level
    (its own, its group's, its tenant's), as a file key's. ConfigError if the config in force cannot
    take it (a plan, credential or group it names is gone). `memo` (the caller's, for one `policy` and
    `credentials`) keeps what keys of one profile share, so a million keys of a few profiles cost a
    million level_limits calls and records, not a million limit parses and checks."""
    profile = (key.tenant, key.group, key.plan, key.models, key.paths, key.limits, key.credential)
    parts = memo.get(profile) if memo is not None else None
    if parts is None:
        parts = _profile_parts(key, policy, credentials, share)
        if memo is not None:
            memo[profile] = parts
    recipe, credential, models, paths, remove_headers, model_rule, path_rule, limits, facts, scoped = parts
    tenant, plan, group = share(key.tenant), share(key.plan), share(key.group)
    metadata = dict(key.metadata) if key.metadata else _NO_METADATA

    def record(expires_at: float | None) -> KeyRecord:
        return deferred(
            KeyRecord(
                key_id=key.key_id,
                tenant=tenant,
                plan=plan,
                expires_at=expires_at,
                disabled=key.disabled,
                models=models,
                paths=paths,
                credential=credential,
                metadata=metadata,
                upstream_headers=(),  # (both made from the recipe when first read)
                remove_headers=remove_headers,
                limits=limits,
                counter_ids=(),
                needs_facts=facts,
                model_scoped=scoped,
                model_rule=model_rule,
                path_rule=path_rule,
                group=group,
                recipe=recipe,
            )
        )

    pairs: list[tuple[bytes, KeyRecord]] = [(key.key_hash, record(key.expires_at))]
    if key.previous_hash is not None and key.grace_until is not None:
        until = key.grace_until if key.expires_at is None else min(key.grace_until, key.expires_at)
        pairs.append((key.previous_hash, record(until)))
    return tuple(pairs)


def _version(snapshot: KeySnapshot, runtime_version: int) -> str:
    base = snapshot.version.partition("+")[0]
    return f"{base}+rt{runtime_version}"


def file_version(version: str) -> str:
    """The key file's part of a merged snapshot's version."""
    return version.partition("+")[0]


def merge(file_snapshot: KeySnapshot, runtime: Mapping[str, Pairs], *, runtime_version: int) -> KeySnapshot:
    """The key file's snapshot with every runtime key added. ConfigError if an id is in both (or a
    runtime hash equals a file key's)."""
    _refuse_both(sorted(k for k in runtime if k in file_snapshot.by_id), file_snapshot)
    if not runtime:
        return file_snapshot
    by_digest = dict(file_snapshot.by_digest)
    by_id = dict(file_snapshot.by_id)
    for key_id, pairs in runtime.items():
        _add(by_digest, by_id, key_id, pairs, file_snapshot)
    return dataclasses.replace(
        file_snapshot, by_digest=by_digest, by_id=by_id, version=_version(file_snapshot, runtime_version)
    )


def _refuse_both(both: list[str], file_snapshot: KeySnapshot) -> None:
    if both:
        shown = ", ".join(repr(k) for k in both[:5]) + (f" and {len(both) - 5} more" if len(both) > 5 else "")
        raise ConfigError(
            f"key id {shown} is both in the key file and a runtime key (ids are unique across both: remove "
            "it from the key file, or revoke the runtime key and create it under another id)",
            source=file_snapshot.source,
        )


def swap_file(
    merged: KeySnapshot,
    old_file: KeySnapshot,
    new_file: KeySnapshot,
    runtime_ids: Container[str],
    *,
    runtime_version: int,
) -> KeySnapshot:
    """`merged` (`old_file`'s keys plus runtime keys whose records stay as they are) with `new_file`'s
    keys in place of `old_file`'s: what `merge` gives for a new key file under the same config, in
    O(file keys) plus two C-level map copies, not O(runtime keys) of Python work (a key-file reload
    beside 1,000,000 runtime keys). ConfigError as `merge` (an id in both, a hash in both)."""
    _refuse_both(sorted(k for k in new_file.by_id if k in runtime_ids), new_file)
    by_digest = dict(merged.by_digest)
    by_id = dict(merged.by_id)
    for digest in old_file.by_digest:
        by_digest.pop(digest, None)
    for key_id in old_file.by_id:
        by_id.pop(key_id, None)
    for digest, record in new_file.by_digest.items():
        other = by_digest.get(digest)
        if other is not None:
            raise ConfigError(
                f"runtime key {other.key_id!r} has the same hash as key {record.key_id!r}",
                source=new_file.source,
            )
        by_digest[digest] = record
    by_id.update(new_file.by_id)
    return dataclasses.replace(
        new_file, by_digest=by_digest, by_id=by_id, version=_version(new_file, runtime_version)
    )


def _add(
    by_digest: dict[bytes, KeyRecord],
    by_id: dict[str, KeyRecord],
    key_id: str,
    pairs: Pairs,
    snapshot: KeySnapshot,
) -> None:
    for digest, record in pairs:
        other = by_digest.get(digest)
        if other is not None and other.key_id != key_id:
            raise ConfigError(
                f"runtime key {key_id!r} has the same hash as key {other.key_id!r}", source=snapshot.source
            )
        by_digest[digest] = record
    by_id[key_id] = pairs[0][1]


def digests(key: RuntimeKey) -> tuple[bytes, ...]:
    """The hashes a runtime key has in the snapshot."""
    return (key.key_hash,) if key.previous_hash is None else (key.key_hash, key.previous_hash)


def apply_changes(
    snapshot: KeySnapshot,
    changes: Sequence[tuple[str, tuple[bytes, ...], Pairs | None]],
    *,
    runtime_version: int,
    in_place: bool = False,
) -> KeySnapshot:
    """`snapshot` with runtime keys changed: each change is (key id, the hashes it has in `snapshot`
    (empty for a new key), its new entries or None to drop it). A new KeySnapshot object; its two maps
    are copies (one copy per batch, whatever its size: O(keys)), or with `in_place` the snapshot's own
    maps, changed where they are (O(changed keys): for a caller that owns those maps and applies on the
    one thread that reads them). ConfigError if a new key would take a file key's id or hash, checked
    before anything changes."""
    changed = {key_id for key_id, _, _ in changes}
    for key_id, old, new in changes:
        if not old and key_id in snapshot.by_id:
            raise ConfigError(
                f"runtime key {key_id!r} has the id of a key in the key file", source=snapshot.source
            )
        for digest, _ in new or ():
            other = snapshot.by_digest.get(digest)
            if other is not None and other.key_id not in changed:
                raise ConfigError(
                    f"runtime key {key_id!r} has the same hash as key {other.key_id!r}",
                    source=snapshot.source,
                )
    by_digest = snapshot.by_digest if in_place else dict(snapshot.by_digest)
    by_id = snapshot.by_id if in_place else dict(snapshot.by_id)
    assert isinstance(by_digest, dict) and isinstance(by_id, dict)
    for key_id, old, new in changes:
        for digest in old:
            by_digest.pop(digest, None)
        if old:
            by_id.pop(key_id, None)
        if new is not None:
            for digest, record in new:
                by_digest[digest] = record
            by_id[key_id] = new[0][1]
    return dataclasses.replace(
        snapshot, by_digest=by_digest, by_id=by_id, version=_version(snapshot, runtime_version)
    )
