"""The budget hierarchy: limits on a tenant (shared by all its keys) and on a group within a tenant (a
team or project, shared by the keys that name it), beside each key's own.

Configured in `nexus.yaml`:

    tenants:
      acme:
        limits: [{usd: 500, per: month}]
        groups:
          research:
            limits: [{tokens: 2000000, per: day, model: "gpt-4o*"}]

A key file entry names its `tenant` and optionally its `group`. At snapshot build a key's windows become
its own (plan and key limits, level "key") + its group's (level "group") + its tenant's (level
"tenant"), in that order, each with its counter id: the key's are `<key id>\\x00<name>`, a group's
`\\x02g\\x01<tenant>\\x01<group>\\x00<name>` and a tenant's `\\x02t\\x01<tenant>\\x00<name>`, the same
for every key of that tenant or group, and never equal to a key's (key ids start with a letter or
digit). Nothing else changes: the decision charges every applicable window of every level at once (all
or nothing, in the memory store and in one Redis script), reservations are settled against the same
counter ids, and a reload that keeps a window's id and shape keeps its state.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from nexus_authz.core.limits import Kind, LimitSpec
from nexus_authz.core.limits_yaml import parse_limits
from nexus_authz.core.model import KeyRecord
from nexus_authz.core.yamlsrc import Fields

__all__ = [
    "LEVELS",
    "Group",
    "Tenant",
    "group_counter_id",
    "group_problem",
    "level_limits",
    "owner_of",
    "parse_tenants",
    "resolve_group",
    "tenant_counter_id",
]

LEVELS: Final = ("key", "group", "tenant")
_TENANT = re.compile(r"^[\x20-\x7e]{1,256}$")  # as a key file's `tenant:` (sent as x-nexus-tenant)
_GROUP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    limits: tuple[LimitSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class Tenant:
    """A tenant's own limits and its groups (each with limits of its own)."""

    name: str
    limits: tuple[LimitSpec, ...] = ()
    groups: Mapping[str, Group] = field(default_factory=dict)


# Cached: every key of a tenant (or group) holds the same counter id string object, not an equal copy
# each (~80 B a key and a level's window at 100,000 keys; the id is the same either way).
@functools.lru_cache(maxsize=4096)
def tenant_counter_id(tenant: str, name: str) -> str:
    return f"\x02t\x01{tenant}\x00{name}"


@functools.lru_cache(maxsize=4096)
def group_counter_id(tenant: str, group: str, name: str) -> str:
    return f"\x02g\x01{tenant}\x01{group}\x00{name}"


def parse_tenants(f: Fields, *, priced: bool, shadow_mode: bool, timezone: str = "UTC") -> dict[str, Tenant]:
    """The `tenants:` section: `{<tenant>: {limits: [...], groups: {<group>: {limits: [...]}}}}`."""

    def limits(fields: Fields, level: str) -> tuple[LimitSpec, ...]:
        if not fields.has("limits"):
            fields.raw("limits", None)
            return ()
        raw, where, path = fields.raw("limits"), fields.where("limits"), fields.path("limits")
        specs = parse_limits(raw, source=where, field=path, timezone=timezone)
        if not priced and any(s.kind is Kind.USD for s in specs):
            fields.fail("limits", "a usd limit needs a prices table in the config")
        return tuple(dataclasses.replace(s, level=level, shadow=s.shadow or shadow_mode) for s in specs)

    out: dict[str, Tenant] = {}
    for name in f.names():
        if not isinstance(name, str) or not _TENANT.match(name):
            f.fail(str(name), "tenants are 1-256 printable ASCII characters, as a key's `tenant:`")
        t = f.mapping(name)
        tenant_limits = limits(t, "tenant")
        g = t.mapping("groups")
        groups: dict[str, Group] = {}
        for group_name in g.names():
            if not isinstance(group_name, str) or not _GROUP.match(group_name):
                g.fail(str(group_name), "group names are 1-128 letters, digits and . _ : @ / -")
            gf = g.mapping(group_name)
            groups[group_name] = Group(group_name, limits(gf, "group"))
            gf.done()
        g.done()
        t.done()
        out[name] = Tenant(name, tenant_limits, groups)
    f.done()
    return out


def group_problem(tenants: Mapping[str, Tenant], tenant: str, group: str) -> str | None:
    """Why a key of `tenant` cannot name `group` (None: it can, or it names none). The one check of a
    key's group, for the key file's `group:` and for runtime keys (core/runtime_keys.py)."""
    if not group:
        return None
    known = tenants.get(tenant)
    if known is None:
        return (
            f"the key's tenant {tenant!r} is not defined under `tenants:` in the config, so it has no "
            f"group {group!r}"
        )
    if group not in known.groups:
        names = ", ".join(sorted(known.groups)) or "none defined"
        return f"tenant {tenant!r} has no group {group!r} (groups: {names})"
    return None


def resolve_group(f: Fields, tenants: Mapping[str, Tenant], tenant: str) -> str:
    """A key file entry's `group:` ("" when absent), checked against its tenant's groups."""
    group = str(f.str("group", ""))
    if problem := group_problem(tenants, tenant, group):
        f.fail("group", problem)
    return group


def level_limits(
    tenants: Mapping[str, Tenant],
    tenant: str,
    group: str,
    key_id: str,
    key_limits: tuple[LimitSpec, ...],
) -> tuple[tuple[LimitSpec, ...], tuple[str, ...]]:
    """A key's windows at every level, with their counter ids: its own (`<key id>\\x00<name>`), then its
    group's, then its tenant's. The one place a key's windows are made, for file keys (core/config.py)
    and runtime keys (core/runtime_keys.py) alike, so both kinds of key of a tenant share its counters.
    `group` must have passed `group_problem`."""
    ids = [f"{key_id}\x00{spec.name}" for spec in key_limits]
    known = tenants.get(tenant)
    if known is None:
        return key_limits, tuple(ids)
    specs = list(key_limits)
    if group:
        for spec in known.groups[group].limits:
            specs.append(spec)
            ids.append(group_counter_id(tenant, group, spec.name))
    for spec in known.limits:
        specs.append(spec)
        ids.append(tenant_counter_id(tenant, spec.name))
    if len(specs) == len(key_limits):
        return key_limits, tuple(ids)
    return tuple(specs), tuple(ids)


def owner_of(key: KeyRecord, level: str) -> str:
    """Whose window a 429 names: "tenant acme", "group research of tenant acme", "this API key"."""
    if level == "tenant":
        return f"tenant {key.tenant}"
    if level == "group":
        return f"group {key.group} of tenant {key.tenant}"
    return "this API key"
