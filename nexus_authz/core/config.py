"""Policy configuration: plans, prices, credentials, and the key file, parsed into immutable values.

This module owns the *meaning* of the policy sections of `nexus.yaml` and of the key file. It reads text,
never files or the environment: secret references (`value_env`, `value_file`) are resolved by the
composition root and handed back in as values. Every error names the file, the line and the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from nexus_authz.core import keys as keys_mod
from nexus_authz.core.calendar import DEFAULT_TIMEZONE, zone_problem
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.hierarchy import Tenant, level_limits, parse_tenants, resolve_group
from nexus_authz.core.keyfile_fast import build_flat
from nexus_authz.core.keyfile_plain import PlainEntries, load_plain
from nexus_authz.core.keys import KEY_HEADERS, KeySnapshot
from nexus_authz.core.limits import (
    Kind,
    LimitSpec,
)
from nexus_authz.core.limits_yaml import parse_limits
from nexus_authz.core.model import Credential, KeyRecord
from nexus_authz.core.price_policy import UnpricedPolicy, parse_unpriced
from nexus_authz.core.ratelimit_headers import FAMILIES, parse_families
from nexus_authz.core.yamlsrc import Fields, load_yaml

_KEY_ID = r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}"
_ID = re.compile(rf"^{_KEY_ID}$")
_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
_HEADER_VALUE = re.compile(r"^[\x20-\x7e\t]*$")
_RESERVED_HEADERS = frozenset({"host", ":authority", ":path", ":method", "content-length", "x-nexus-key-id"})


@dataclass(frozen=True, slots=True)
class SecretRef:
    """Where a secret comes from. Exactly one of env / file / value is set; `value` is discouraged."""

    env: str | None = None
    file: str | None = None
    value: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        if self.env:
            return f"environment variable {self.env}"
        if self.file:
            return f"file {self.file}"
        return "inline value"


@dataclass(frozen=True, slots=True)
class CredentialSpec:
    """An upstream credential by name: the header it goes in and where its secret comes from."""

    name: str
    header: str
    scheme: str
    secret: SecretRef


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    limits: tuple[LimitSpec, ...] = ()
    models: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens."""

    input: float
    cached_input: float
    output: float


@dataclass(frozen=True, slots=True)
class ReservationSettings:
    """Reserve-then-settle for token and USD windows (see core/reservations.py)."""

    default_max_tokens: int = 4096  # completion tokens reserved when a request sets no max_tokens
    ttl: float = 600.0  # an unsettled reservation expires (estimate kept, concurrency released)
    max_pending: int = 100_000


@dataclass(frozen=True, slots=True)
class AuthFailureSettings:
    """Brute-force protection: invalid keys per client address before the address is refused for a while."""

    limit: int = 30  # 0 disables
    per: str = "minute"


@dataclass(frozen=True, slots=True)
class PolicySet:
    """The policy sections of the config file."""

    credentials: Mapping[str, CredentialSpec] = field(default_factory=dict)
    default_credential: str | None = None
    plans: Mapping[str, Plan] = field(default_factory=dict)
    prices: tuple[tuple[str, Price], ...] = ()
    unpriced: UnpricedPolicy = field(default_factory=UnpricedPolicy)  # a model no price matches
    reservations: ReservationSettings = field(default_factory=ReservationSettings)
    shadow_mode: bool = False  # every limit computed and counted, none enforced
    auth_failures: AuthFailureSettings = field(default_factory=AuthFailureSettings)
    source: str = ""
    timezone: str = DEFAULT_TIMEZONE  # of calendar limits that name none (core/calendar.py)
    tenants: Mapping[str, Tenant] = field(default_factory=dict)  # the budget hierarchy (core/hierarchy)
    rate_limit_headers: tuple[str, ...] = tuple(FAMILIES)  # header families of answers (ratelimit_headers)


def parse_secret_ref(f: Fields, *, what: str) -> SecretRef:
    present = [name for name in ("value_env", "value_file", "value") if f.has(name)]
    if len(present) != 1:
        f.fail(None, f"{what} needs exactly one of value_env, value_file or value")
    name = present[0]
    text = f.str(name)
    if name == "value_env":
        return SecretRef(env=text)
    if name == "value_file":
        return SecretRef(file=text)
    return SecretRef(value=text)


def parse_credentials(f: Fields) -> dict[str, CredentialSpec]:
    out: dict[str, CredentialSpec] = {}
    for name in f.names():
        if not _ID.match(name):
            f.fail(name, "credential names are letters, digits and . _ : @ / -")
        c = f.mapping(name)
        header = c.str("header", "authorization").lower()
        if not _HEADER_NAME.match(header) or header in _RESERVED_HEADERS:
            c.fail("header", f"{header!r} cannot carry a credential")
        default_scheme = "Bearer" if header == "authorization" else ""
        scheme = str(c.raw("scheme", default_scheme) or "")
        secret = parse_secret_ref(c, what="a credential")
        c.done()
        out[name] = CredentialSpec(name=name, header=header, scheme=scheme, secret=secret)
    f.done()
    return out


def parse_prices(f: Fields) -> tuple[tuple[str, Price], ...]:
    """`prices: {"gpt-4o*": {input: 2.5, cached_input: 1.25, output: 10}}`, USD per million tokens.

    Order matters: the first glob that matches a model prices it, so put specific patterns first.
    """
    out: list[tuple[str, Price]] = []
    for pattern in f.names():
        p = f.mapping(pattern)
        input_price = p.number("input")
        price = Price(
            input=input_price,
            cached_input=p.number("cached_input", input_price),
            output=p.number("output"),
        )
        p.done()
        out.append((pattern, price))
    f.done()
    return tuple(out)


def _parse_limits(f: Fields, name: str, timezone: str) -> tuple[LimitSpec, ...]:
    if not f.has(name):
        f.raw(name, None)
        return ()
    return parse_limits(f.raw(name), source=f.where(name), field=f.path(name), timezone=timezone)


def _uses_usd(limits: tuple[LimitSpec, ...]) -> bool:
    return any(spec.kind is Kind.USD for spec in limits)


def parse_reservations(f: Fields) -> ReservationSettings:
    d = ReservationSettings()
    out = ReservationSettings(
        default_max_tokens=f.int("default_max_tokens", d.default_max_tokens, minimum=1),
        ttl=f.duration("ttl", d.ttl, minimum=1.0),
        max_pending=f.int("max_pending", d.max_pending, minimum=1),
    )
    f.done()
    return out


def parse_plans(f: Fields, timezone: str = DEFAULT_TIMEZONE) -> dict[str, Plan]:
    out: dict[str, Plan] = {}
    for name in f.names():
        if not _ID.match(name):
            f.fail(name, "plan names are letters, digits and . _ : @ / -")
        p = f.mapping(name)
        plan = Plan(name=name, limits=_parse_limits(p, "limits", timezone), models=p.str_list("models"))
        p.done()
        out[name] = plan
    f.done()
    return out


def parse_policy(root: Fields) -> PolicySet:
    """Reads the `credentials`, `default_credential`, `plans` and `prices` sections of the config."""
    credentials = parse_credentials(root.mapping("credentials"))
    default_credential = root.str("default_credential", None)
    if default_credential is not None and default_credential not in credentials:
        root.fail("default_credential", f"no credential named {default_credential!r} under credentials")
    timezone = root.str("timezone", DEFAULT_TIMEZONE)
    if problem := zone_problem(timezone):
        root.fail("timezone", problem)
    plans = parse_plans(root.mapping("plans"), timezone)
    prices = parse_prices(root.mapping("prices"))
    if not prices:
        for plan in plans.values():
            if _uses_usd(plan.limits):
                root.fail("prices", f"plan {plan.name!r} has a usd limit, which needs a prices table")
    shadow_mode = root.bool("shadow_mode", False)
    tenants = parse_tenants(
        root.mapping("tenants"), priced=bool(prices), shadow_mode=shadow_mode, timezone=timezone
    )
    return PolicySet(
        credentials=credentials,
        default_credential=default_credential,
        plans=plans,
        prices=prices,
        unpriced=parse_unpriced(root.mapping("unpriced")),
        reservations=parse_reservations(root.mapping("reservations")),
        shadow_mode=shadow_mode,
        auth_failures=parse_auth_failures(root.mapping("auth_failures")),
        source=root.source,
        timezone=timezone,
        tenants=tenants,
        rate_limit_headers=parse_families(root),
    )


def parse_auth_failures(f: Fields) -> AuthFailureSettings:
    d = AuthFailureSettings()
    out = AuthFailureSettings(
        limit=f.int("limit", d.limit, minimum=0),
        per=f.choice("per", ("second", "minute", "hour"), d.per),
    )
    f.done()
    return out


def key_limits(plan: Plan | None, own: tuple[LimitSpec, ...], *, shadow_mode: bool) -> tuple[LimitSpec, ...]:
    """A key's limits: its plan's, with the key's own added; an own limit replaces the plan's of that name."""
    own_names = {spec.name for spec in own}
    limits = tuple(s for s in (plan.limits if plan else ()) if s.name not in own_names) + own
    if shadow_mode:
        limits = tuple(s if s.shadow else dataclasses.replace(s, shadow=True) for s in limits)
    return limits


def credential_value(spec: CredentialSpec, secret: str) -> Credential:
    """The header value injected upstream, checked so a bad secret cannot split headers."""
    secret = secret.strip()
    if not secret or not _HEADER_VALUE.match(secret):
        raise ConfigError(
            f"credential {spec.name!r}: the secret from {spec.secret.describe()} is empty or contains "
            "characters not allowed in an HTTP header",
            field=f"credentials.{spec.name}",
        )
    value = f"{spec.scheme} {secret}" if spec.scheme else secret
    return Credential(name=spec.name, header=spec.header, value=value)


def parse_timestamp(value: object) -> float | None:
    """ISO 8601 (`2027-01-31`, `2027-01-31T12:00:00Z`, offsets allowed; naive means UTC) or epoch seconds."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def parse_key_file(
    text: str,
    source: str,
    *,
    policy: PolicySet,
    credentials: Mapping[str, Credential],
    pepper: bytes,
    loaded_at: float,
) -> KeySnapshot:
    """Parse and validate a whole key file into a snapshot; any error rejects the whole file.

    All-or-nothing on purpose: a half-loaded key file could silently revoke or un-limit keys, so the
    server keeps the last good snapshot instead and reports the error.
    """
    doc = load_plain(text, source)  # the common flat shape, streamed (core/keyfile_plain.py)
    if doc is None:
        doc = load_yaml(text, source)
    if doc is None:
        # What a reader sees between a writer's truncate and its write (or a file emptied by mistake):
        # read as "no keys" it would revoke every key at once. A file without keys says `keys: []`.
        raise ConfigError("the key file is empty (a file without keys says `keys: []`)", source=source)
    root = Fields(doc, source, "")
    records: list[tuple[bytes, KeyRecord]] = []
    ids: set[str] = set()
    digests: set[bytes] = set()
    # 100,000 keys mostly repeat a few tenants, plans, model lists and limit sets: keep one object of
    # each (a few hundred bytes per key saved; see benchmarks/bench_memory.py).
    shared: dict[object, object] = {}

    def share(value: _T) -> _T:
        return shared.setdefault(value, value)  # type: ignore[return-value]

    needs_facts_cache: dict[tuple[LimitSpec, ...], bool] = {}

    def needs_facts(limits: tuple[LimitSpec, ...]) -> bool:
        known = needs_facts_cache.get(limits)
        if known is None:
            known = any(s.kind in (Kind.TOKENS, Kind.USD) or s.model is not None for s in limits)
            needs_facts_cache[limits] = known
        return known

    def build(item: object, path: str) -> tuple[bytes, KeyRecord]:
        """One entry of the list (`path`: `keys[<i>]`), validated and made a record (and kept)."""
        f = Fields(item, source, path)
        key_id = f.str("id")
        if not _ID.match(key_id):
            f.fail("id", "key ids are 1-128 letters, digits and . _ : @ / -, starting with a letter or digit")
        if key_id in ids:
            f.fail("id", f"duplicate key id {key_id!r}")
        ids.add(key_id)
        hash_text = f.str("hash")
        key_digest = keys_mod.parse_hash(hash_text)
        if key_digest is None:
            f.fail(
                "hash", f"expected '{keys_mod.HASH_SCHEME}:' and 64 hex digits (see `nexus-authz keys hash`)"
            )
        if key_digest in digests:
            f.fail("hash", "the same key hash appears twice")
        digests.add(key_digest)
        tenant = share(f.str("tenant", "default"))
        if not tenant or len(tenant) > 256 or not _HEADER_VALUE.match(tenant):
            # Sent upstream as the x-nexus-tenant header: a line break would inject headers into the
            # answer to the proxy, a character outside Latin-1 would fail every allowed answer.
            f.fail("tenant", "tenants are 1-256 printable ASCII characters (sent as x-nexus-tenant)")
        group = share(resolve_group(f, policy.tenants, tenant))
        plan_name = f.str("plan", None)
        if plan_name is not None:
            plan_name = share(plan_name)
        plan: Plan | None = None
        if plan_name is not None:
            plan = policy.plans.get(plan_name)
            if plan is None:
                known = ", ".join(sorted(policy.plans)) or "none defined"
                f.fail("plan", f"no plan named {plan_name!r} (plans: {known})")
        expires_at = None
        if f.has("expires_at"):
            expires_at = parse_timestamp(f.raw("expires_at"))
            if expires_at is None:
                f.fail("expires_at", "expected an ISO 8601 timestamp such as 2027-01-31T00:00:00Z")
        disabled = f.bool("disabled", False)
        models = share(f.str_list("models") or (plan.models if plan else ()))
        paths = share(f.str_list("paths"))
        for p in paths:
            if not p.startswith("/"):
                f.fail("paths", f"path patterns start with '/': {p!r}")
        cred_name = f.str("credential", policy.default_credential)
        credential = None
        if cred_name is not None:
            credential = credentials.get(cred_name)
            if credential is None:
                f.fail("credential", f"no credential named {cred_name!r} under credentials in the config")
        metadata_raw = f.mapping("metadata")
        metadata = {k: metadata_raw.str(k) for k in metadata_raw.names()}
        own_limits = _parse_limits(f, "limits", policy.timezone)
        if _uses_usd(own_limits) and not policy.prices:
            f.fail("limits", "a usd limit needs a prices table in the config")
        f.done()
        own = share(key_limits(plan, own_limits, shadow_mode=policy.shadow_mode))
        limits, counter_ids = level_limits(policy.tenants, tenant, group, key_id, own)
        limits = share(limits)
        record = KeyRecord(
            key_id=key_id,
            tenant=tenant,
            plan=plan_name,
            expires_at=expires_at,
            disabled=disabled,
            models=models,
            paths=paths,
            credential=credential,
            metadata=metadata or _NO_METADATA,
            upstream_headers=tuple(share(h) for h in _upstream_headers(key_id, tenant, credential)),
            remove_headers=share(_remove_headers(credential)),
            limits=limits,
            counter_ids=counter_ids,
            needs_facts=needs_facts(limits),
            model_scoped=any(spec.model is not None for spec in limits),
            model_rule=keys_mod.compile_globs(models),
            path_rule=keys_mod.compile_globs(paths),
            group=group,
        )
        records.append((key_digest, record))
        return key_digest, record

    entries = doc.get("keys") if isinstance(doc, dict) else None
    if isinstance(entries, PlainEntries):  # the common flat shape: records made from one per shape
        first = build_flat(entries, build, ids=ids, digests=digests, records=records, key_id_pattern=_KEY_ID)
        root.raw("keys")
        for i, item in enumerate(entries, first):
            build(item, f"keys[{i}]")
    else:
        for _, item, path in root.items("keys"):
            build(item, path)
    root.done()
    version = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return keys_mod.build_snapshot(
        records, pepper=pepper, source=source, version=version, loaded_at=loaded_at
    )


_NO_METADATA: Mapping[str, str] = types.MappingProxyType({})
_T = TypeVar("_T")


def _upstream_headers(key_id: str, tenant: str, credential: Credential | None) -> tuple[tuple[str, str], ...]:
    headers = [("x-nexus-key-id", key_id), ("x-nexus-tenant", tenant)]
    if credential is not None:
        headers.append((credential.header, credential.value))
    return tuple(headers)


def _remove_headers(credential: Credential | None) -> tuple[str, ...]:
    """Every header a client key can arrive in, except the one the credential overwrites."""
    keep = credential.header if credential is not None else None
    return tuple(h for h in KEY_HEADERS if h != keep)
