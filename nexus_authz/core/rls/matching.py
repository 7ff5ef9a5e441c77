"""envoyproxy/ratelimit compatibility, the pure steps after parsing: the parsed config (`RlsConfig`, its
rules and descriptor tree), descriptor matching (`RlsConfig.plan`) and the answer (`answer`). The package
docstring (core/rls/__init__.py) says how matching works and where it deliberately differs upstream."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

from nexus_authz.core.denials import error_body
from nexus_authz.core.limits import Algorithm, Kind, LimitSpec, WindowStatus
from nexus_authz.core.model import Reason
from nexus_authz.core.ratelimit_headers import IETF, rate_limit_headers

__all__ = [
    "IDENTITY_KEY",
    "PLAN_KEY",
    "TENANT_KEY",
    "UNITS",
    "UNIT_CODES",
    "UNLIMITED_REMAINING",
    "DescriptorPlan",
    "DescriptorStatus",
    "Outcome",
    "RateLimitRule",
    "RequestDescriptor",
    "RlsAnswer",
    "RlsConfig",
    "RlsPlan",
    "answer",
    "request_descriptor",
]


@dataclass(frozen=True, slots=True)
class UnitMapping:
    """How one envoyproxy/ratelimit unit maps onto the product's algorithms."""

    period: float
    algorithm: Algorithm
    slots: int  # sliding windows only


# GCRA with burst = requests_per_unit for short units: at most rpu + (rpu/period)*t in any interval t
# (upstream's fixed window allows 2*rpu within an instant at a window boundary). Slotted sliding windows
# for day and longer, so a daily/monthly quota cannot be spent twice within one period: at most rpu in
# any `slots` consecutive slots. Day and month are what make_limit gives; week and year are beyond its
# units for requests, so the specs are built directly with the same guarantee.
UNITS: Final[dict[str, UnitMapping]] = {
    "second": UnitMapping(1.0, Algorithm.GCRA, 0),
    "minute": UnitMapping(60.0, Algorithm.GCRA, 0),
    "hour": UnitMapping(3600.0, Algorithm.GCRA, 0),
    "day": UnitMapping(86400.0, Algorithm.SLIDING, 24),  # hourly slots
    "week": UnitMapping(7 * 86400.0, Algorithm.SLIDING, 28),  # 6-hour slots
    "month": UnitMapping(30 * 86400.0, Algorithm.SLIDING, 30),  # daily slots (upstream: 30 days too)
    "year": UnitMapping(365 * 86400.0, Algorithm.SLIDING, 73),  # 5-day slots (upstream: 365 days)
}
#: envoy.service.ratelimit.v3.RateLimitResponse.RateLimit.Unit numbers (kept here so core needs no protobuf).
UNIT_CODES: Final[dict[str, int]] = {
    "second": 1,
    "minute": 2,
    "hour": 3,
    "day": 4,
    "month": 5,
    "year": 6,
    "week": 7,
}
UNIT_NAMES: Final[dict[int, str]] = {code: name for name, code in UNIT_CODES.items()}
_UNIT_LIST: Final = "second, minute, hour, day, week, month or year"
MAX_REQUESTS_PER_UNIT: Final = 2**32 - 1  # uint32 in the protocol
UNLIMITED_REMAINING: Final = 2**32 - 1  # what upstream reports for an unlimited descriptor
COST_CAP: Final = 2**53  # hits beyond any capacity are refused anyway; keep the maths in exact doubles

#: Entry keys tied to the API key's identity. Envoy's ratelimit filter reads `x-nexus-key-id` (set by
#: ext_authz, never by clients: the Envoy configs strip it) as `nexus_key_id`. An entry `nexus_plan` or
#: `nexus_tenant` in the same descriptor gets its value from nexus's key snapshot (Envoy sends any
#: placeholder, e.g. a generic_key), so plans can be enforced by Envoy's filter too.
IDENTITY_KEY: Final = "nexus_key_id"
PLAN_KEY: Final = "nexus_plan"
TENANT_KEY: Final = "nexus_tenant"
_IDENTITY_DERIVED: Final = frozenset({PLAN_KEY, TENANT_KEY})
Identity = Callable[[str], tuple[str, str | None] | None]  # key id -> (tenant, plan), None if unknown


# -- the config -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    """One `rate_limit` block (or a request's own limit override), shared by every request matching it.

    `spec` is None for an unlimited rule and for `requests_per_unit: 0` (refuses every hit, never
    counts). `path` is upstream's stats key (`domain.key_value.subkey`), `source` where it was written.
    """

    domain: str
    path: str
    value: str  # the descriptor's configured value: "" for a key-only entry, "prefix*" for a wildcard
    name: str | None
    unit: str | None
    requests_per_unit: int
    unlimited: bool
    shadow: bool
    replaces: frozenset[str]
    detailed_metric: bool
    spec: LimitSpec | None
    source: str
    id_prefix: str = field(repr=False)  # counter ids: domain and unit, the request's entries follow

    @property
    def blocks(self) -> bool:
        return not self.unlimited and self.spec is None


@dataclass(frozen=True, slots=True)
class _Node:
    key: str
    value: str
    rule: RateLimitRule | None
    children: _Level | None
    share: bool = False  # share_threshold: every value matching this wildcard counts in one counter


@dataclass(frozen=True, slots=True)
class _Level:
    """One descriptor list: exact (key, value) entries, wildcards per key (the value split at each `*`,
    in file order), key-only entries."""

    exact: Mapping[tuple[str, str], _Node]
    wildcards: Mapping[str, tuple[tuple[tuple[str, ...], _Node], ...]]
    any_value: Mapping[str, _Node]


@dataclass(frozen=True, slots=True)
class RlsConfig:
    """Every domain of one version of the config directory. Never mutated; replaced whole on reload."""

    domains: Mapping[str, _Level]
    rules: tuple[RateLimitRule, ...]
    sources: tuple[str, ...]
    version: str
    warnings: tuple[str, ...] = ()
    _overrides: dict[tuple[str, int, str], RateLimitRule] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __len__(self) -> int:
        return len(self.rules)

    def lookup(self, domain: str, entries: Sequence[tuple[str, str]]) -> RateLimitRule | None:
        """The rule a descriptor's entries select (None: no limit), as upstream's GetLimit."""
        level = self.domains.get(domain)
        if level is None or not entries:
            return None
        return _walk(level, entries)[0]

    def plan(
        self,
        domain: str,
        descriptors: Sequence[RequestDescriptor],
        hits_addend: int = 0,
        identity: Identity | None = None,
    ) -> RlsPlan:
        """What one ShouldRateLimit must charge. `hits_addend` is the request's (0 means 1); a descriptor's
        own `hits_addend` wins when set, even 0 (check only, charge nothing)."""
        root = self.domains.get(domain)
        if root is None:
            return RlsPlan(domain, False, (_NO_MATCH,) * len(descriptors), (), (), (), False)
        default_cost = hits_addend if hits_addend > 0 else 1
        matched: list[tuple[RateLimitRule | None, tuple[tuple[str, str], ...], int]] = []
        replacing: set[str] = set()
        for d in descriptors:
            entries = d.entries
            if identity is not None and len(entries) > 1:
                entries = _with_identity(entries, identity)
            cost = default_cost if d.hits_addend is None else d.hits_addend
            if cost > COST_CAP:
                cost = COST_CAP
            if d.override is not None:
                rule: RateLimitRule | None = self._override(domain, d.override[0], d.override[1])
            else:
                rule, shared = _walk(root, entries) if entries else (None, None)
                if shared is not None:  # share_threshold: the wildcard stands for the matched values
                    entries = tuple(
                        (k, shared[i]) if i in shared else (k, v) for i, (k, v) in enumerate(entries)
                    )
            if rule is not None and rule.replaces:
                replacing |= rule.replaces
            matched.append((rule, entries, cost))
        plans: list[DescriptorPlan] = []
        windows: dict[str, int] = {}
        ids: list[str] = []
        specs: list[LimitSpec] = []
        costs: list[int] = []
        blocked = False
        for rule, entries, cost in matched:
            if rule is None:
                plans.append(_NO_MATCH)
                continue
            stat_key = rule.path
            if rule.detailed_metric and entries and entries[-1][1] != rule.value:
                stat_key += "_" + entries[-1][1]  # a value the config does not list: in the key too
            if rule.name is not None and rule.name in replacing:
                plans.append(_plan(Outcome.REPLACED, rule, -1, cost, stat_key))
            elif rule.unlimited:
                plans.append(_plan(Outcome.UNLIMITED, rule, -1, cost, stat_key))
            elif rule.spec is None:
                if cost > 0 and not rule.shadow:
                    blocked = True
                plans.append(_plan(Outcome.BLOCKED, rule, -1, cost, stat_key))
            else:
                cid = rule.id_prefix + _encode_entries(entries)
                index = windows.get(cid)
                if index is None:
                    index = windows[cid] = len(ids)
                    ids.append(cid)
                    specs.append(rule.spec)
                    costs.append(cost)
                else:  # two descriptors, one counter (same rule, same values): charge it once, in full
                    costs[index] = min(costs[index] + cost, COST_CAP)
                plans.append(_plan(Outcome.LIMITED, rule, index, cost, stat_key))
        return RlsPlan(domain, True, tuple(plans), tuple(ids), tuple(specs), tuple(costs), blocked)

    def _override(self, domain: str, requests_per_unit: int, unit: str) -> RateLimitRule | None:
        """A limit the request carries itself (Envoy's `limit` override): no shadow, no name."""
        if unit not in UNITS:
            return None
        cache_key = (domain, requests_per_unit, unit)
        rule = self._overrides.get(cache_key)
        if rule is None:
            path = f"{domain}.override"
            rule = _make_rule(
                domain=domain,
                path=path,
                value="",
                name=None,
                unit=unit,
                requests_per_unit=min(requests_per_unit, MAX_REQUESTS_PER_UNIT),
                unlimited=False,
                shadow=False,
                replaces=frozenset(),
                detailed_metric=False,
                source="request",
                override=True,
            )
            if len(self._overrides) >= 4096:
                self._overrides.clear()
            self._overrides[cache_key] = rule
        return rule


_NOT_FOUND: Final = (None, None)


def _walk(
    level: _Level, entries: Sequence[tuple[str, str]]
) -> tuple[RateLimitRule | None, dict[int, str] | None]:
    """The rule the entries select, and for share_threshold wildcards matched on the way, entry index ->
    the configured pattern (the counter's value for that entry), else None."""
    last = len(entries) - 1
    current: _Level | None = level
    shared: dict[int, str] | None = None
    for i, (key, value) in enumerate(entries):
        if current is None:
            return _NOT_FOUND
        node = current.exact.get((key, value))
        if node is None:
            wildcards = current.wildcards.get(key)
            if wildcards is not None:
                for parts, candidate in wildcards:
                    if _glob_match(parts, value):
                        node = candidate
                        if candidate.share:
                            if shared is None:
                                shared = {}
                            shared[i] = candidate.value
                        break
            if node is None:
                node = current.any_value.get(key)
                if node is None:
                    return _NOT_FOUND
        if i == last:
            return node.rule, shared
        current = node.children
    return _NOT_FOUND


def _glob_match(parts: tuple[str, ...], value: str) -> bool:
    """`value` against a pattern split at its `*`s (each matches zero or more characters), as upstream's
    wildcardMatch: the first part is a prefix, the last a suffix, the middle ones found in order."""
    first, last = parts[0], parts[-1]
    if not value.startswith(first) or not value.endswith(last):
        return False
    if len(value) < sum(map(len, parts)):
        return False
    if len(parts) == 2:
        return True
    rest = value[len(first) : len(value) - len(last)]
    pos = 0
    for part in parts[1:-1]:
        found = rest.find(part, pos)
        if found < 0:
            return False
        pos = found + len(part)
    return True


def _with_identity(entries: tuple[tuple[str, str], ...], identity: Identity) -> tuple[tuple[str, str], ...]:
    key_id: str | None = None
    derived = False
    for key, value in entries:
        if key == IDENTITY_KEY:
            key_id = value
        elif key in _IDENTITY_DERIVED:
            derived = True
    if key_id is None or not derived:
        return entries
    facts = identity(key_id)
    tenant, plan = facts if facts is not None else ("", None)
    return tuple(
        (key, plan or "") if key == PLAN_KEY else (key, tenant) if key == TENANT_KEY else (key, value)
        for key, value in entries
    )


def _encode_entries(entries: Sequence[tuple[str, str]]) -> str:
    # Length-prefixed, so no key or value (whatever bytes it holds) can make two descriptors collide.
    if len(entries) == 1:
        ((k, v),) = entries
        return f"{len(k)}:{k}{len(v)}:{v}"
    return "".join([f"{len(k)}:{k}{len(v)}:{v}" for k, v in entries])


# -- the plan and the answer ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestDescriptor:
    """One descriptor of a RateLimitRequest, as plain data: entries, its own hits_addend (None when
    unset) and Envoy's per-descriptor limit override as (requests_per_unit, unit name)."""

    entries: tuple[tuple[str, str], ...]
    hits_addend: int | None = None
    override: tuple[int, str] | None = None


class Outcome(IntEnum):
    NO_MATCH = 0  # no rule (or the domain is unknown): OK, no limit
    LIMITED = 1  # a counted window
    UNLIMITED = 2  # `unlimited: true`: OK, remaining = 2^32 - 1, nothing counted
    REPLACED = 3  # another matched rule `replaces` this one's name: not evaluated, nothing counted
    BLOCKED = 4  # `requests_per_unit: 0`: over limit for any hit, nothing counted


@dataclass(frozen=True, slots=True)
class DescriptorPlan:
    outcome: Outcome
    rule: RateLimitRule | None
    window: int  # index into the plan's windows (LIMITED only), else -1
    cost: int
    stat_key: str  # upstream's stats key (with the value for `detailed_metric`)


_NO_MATCH: Final = DescriptorPlan(Outcome.NO_MATCH, None, -1, 0, "")


@dataclass(frozen=True, slots=True)
class RlsPlan:
    """What to ask the store: `store.acquire(counter_ids, specs, costs, now)`; if `blocked` (an enforced
    `requests_per_unit: 0` rule was hit), nothing may be charged: `store.peek(counter_ids, specs, now)`."""

    domain: str
    known_domain: bool
    descriptors: tuple[DescriptorPlan, ...]
    counter_ids: tuple[str, ...]
    specs: tuple[LimitSpec, ...]
    costs: tuple[int, ...]
    blocked: bool


@dataclass(frozen=True, slots=True)
class DescriptorStatus:
    """One entry of RateLimitResponse.statuses. `rule` gives current_limit (absent when None);
    `reset_seconds` is duration_until_reset, rounded up to whole seconds."""

    over_limit: bool
    rule: RateLimitRule | None
    remaining: int
    reset_seconds: int
    shadow_violation: bool = False  # a shadow rule that would have refused


_OK_NO_LIMIT: Final = DescriptorStatus(False, None, 0, 0)
_OK_UNLIMITED: Final = DescriptorStatus(False, None, UNLIMITED_REMAINING, 0)

# Hot-path constructors: the same frozen objects as calling the classes, at about half the cost (a frozen
# dataclass's __init__ goes through object.__setattr__ per field; see limits.new_status).
_new = object.__new__
_RD = tuple(getattr(RequestDescriptor, n).__set__ for n in ("entries", "hits_addend", "override"))
_DP = tuple(getattr(DescriptorPlan, n).__set__ for n in ("outcome", "rule", "window", "cost", "stat_key"))
_DS = tuple(
    getattr(DescriptorStatus, n).__set__
    for n in ("over_limit", "rule", "remaining", "reset_seconds", "shadow_violation")
)


def request_descriptor(
    entries: tuple[tuple[str, str], ...], hits_addend: int | None, override: tuple[int, str] | None
) -> RequestDescriptor:
    d: RequestDescriptor = _new(RequestDescriptor)
    _RD[0](d, entries)
    _RD[1](d, hits_addend)
    _RD[2](d, override)
    return d


def _plan(
    outcome: Outcome, rule: RateLimitRule | None, window: int, cost: int, stat_key: str
) -> DescriptorPlan:
    p: DescriptorPlan = _new(DescriptorPlan)
    _DP[0](p, outcome)
    _DP[1](p, rule)
    _DP[2](p, window)
    _DP[3](p, cost)
    _DP[4](p, stat_key)
    return p


def _status(
    over_limit: bool, rule: RateLimitRule | None, remaining: int, reset_seconds: int, shadow: bool
) -> DescriptorStatus:
    st: DescriptorStatus = _new(DescriptorStatus)
    _DS[0](st, over_limit)
    _DS[1](st, rule)
    _DS[2](st, remaining)
    _DS[3](st, reset_seconds)
    _DS[4](st, shadow)
    return st


@dataclass(frozen=True, slots=True)
class RlsAnswer:
    over_limit: bool  # overall_code OVER_LIMIT (never true in global shadow mode)
    statuses: tuple[DescriptorStatus, ...]
    headers: tuple[tuple[str, str], ...]  # response_headers_to_add
    body: bytes  # an OpenAI-style error for a 429 (b"" when allowed)
    shadow_overridden: bool = False  # global shadow mode turned an OVER_LIMIT into OK


_HEADER_NAMES: Final = frozenset({"ratelimit", "ratelimit-policy", "retry-after"})


def answer(
    plan: RlsPlan,
    statuses: Sequence[WindowStatus],
    allowed: bool,
    *,
    shadow_mode: bool = False,
    headers: bool = True,
    families: int = IETF,
) -> RlsAnswer:
    """Build the response from the store's statuses (one per plan window, in order).

    `allowed` is the store's verdict (AcquireResult.allowed). For a blocked plan pass the statuses of
    `peek` without costs: each window then reports what fits now, and is over when its cost does not.
    `headers`: IETF `RateLimit`/`RateLimit-Policy` of the enforced windows, and `retry-after` on a 429.
    `families`: the policy's `rate_limit_headers`; without IETF's, `headers` gives `retry-after` alone.
    """
    out: list[DescriptorStatus] = []
    over = False
    refusing: list[str] = []
    for dp in plan.descriptors:
        outcome = dp.outcome
        if outcome is Outcome.LIMITED:
            rule = dp.rule
            assert rule is not None
            ws = statuses[dp.window]
            refused = plan.costs[dp.window] > ws.remaining if plan.blocked else not ws.allowed
            is_over = refused and not rule.shadow
            if is_over:
                over = True
                refusing.append(ws.spec.name)
            out.append(
                _status(
                    is_over,
                    rule,
                    _uint32(ws.remaining),
                    _ceil_seconds(ws.reset_after),
                    refused and rule.shadow,
                )
            )
        elif outcome is Outcome.NO_MATCH or outcome is Outcome.REPLACED:
            out.append(_OK_NO_LIMIT)
        elif outcome is Outcome.UNLIMITED:
            out.append(_OK_UNLIMITED)
        else:  # BLOCKED
            rule = dp.rule
            assert rule is not None and rule.unit is not None
            refused = dp.cost > 0
            is_over = refused and not rule.shadow
            if is_over:
                over = True
                refusing.append(rule.name or rule.path)
            period = _ceil_seconds(UNITS[rule.unit].period)
            out.append(_status(is_over, rule, 0, period, refused and rule.shadow))
    denied = over and not shadow_mode
    hs: list[tuple[str, str]] = []
    if headers and statuses:
        hs = rate_limit_headers(statuses, denied=denied, families=families & IETF)
        hs = [h for h in hs if h[0] in _HEADER_NAMES]
    body = b""
    if denied:
        retry = next((v for k, v in hs if k == "retry-after"), None)
        if retry is None and not plan.blocked:
            retry = _retry_after(statuses)
        names = ", ".join(dict.fromkeys(refusing))
        message = f"Rate limit reached for {names}."
        if retry is not None:
            message += f" Please retry after {retry} seconds."
        body = error_body(Reason.RATE_LIMITED, message)
    return RlsAnswer(denied, tuple(out), tuple(hs), body, over and shadow_mode)


def _retry_after(statuses: Sequence[WindowStatus]) -> str | None:
    wait = 0.0
    for s in statuses:
        if not s.allowed and not s.spec.shadow:
            wait = max(wait, s.retry_after)
    return None if wait == math.inf else str(max(1, math.ceil(wait - 1e-9)))


def _uint32(value: int) -> int:
    return 0 if value < 0 else value if value < UNLIMITED_REMAINING else UNLIMITED_REMAINING


def _ceil_seconds(seconds: float) -> int:
    if not seconds > 0 or seconds == math.inf:
        return 0
    return max(0, math.ceil(seconds - 1e-9))


# -- building a rule (the parser's and a request's override) -------------------------------------------
_NAME_OK: Final = frozenset(chr(c) for c in range(0x21, 0x7F)) - {'"', "\\"}


def _spec_name(text: str) -> str:
    """A LimitSpec name (the RateLimit header's policy name): printable ASCII, no quotes, <= 128."""
    name = "".join(c if c in _NAME_OK else "_" for c in text)[:128]
    return name or "rls"


def _make_rule(
    *,
    domain: str,
    path: str,
    value: str,
    name: str | None,
    unit: str | None,
    requests_per_unit: int,
    unlimited: bool,
    shadow: bool,
    replaces: frozenset[str],
    detailed_metric: bool,
    source: str,
    override: bool = False,
) -> RateLimitRule:
    spec: LimitSpec | None = None
    if not unlimited and unit is not None and requests_per_unit > 0:
        mapping = UNITS[unit]
        spec = LimitSpec(
            kind=Kind.REQUESTS,
            limit=requests_per_unit,
            period=mapping.period,
            burst=requests_per_unit,
            algorithm=mapping.algorithm,
            slots=mapping.slots,
            shadow=shadow,
            model=None,
            name=_spec_name(name or path),
        )
    marker = f"o{requests_per_unit}" if override else ""
    prefix = f"rls\x00{len(domain)}:{domain}{unit or ''}{marker}\x00"
    return RateLimitRule(
        domain=domain,
        path=path,
        value=value,
        name=name,
        unit=unit,
        requests_per_unit=requests_per_unit,
        unlimited=unlimited,
        shadow=shadow,
        replaces=replaces,
        detailed_metric=detailed_metric,
        spec=spec,
        source=source,
        id_prefix=prefix,
    )
