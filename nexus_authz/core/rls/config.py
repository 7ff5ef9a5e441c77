"""envoyproxy/ratelimit compatibility, the parsing: a directory's worth of envoyproxy/ratelimit YAML texts
-> an immutable `RlsConfig` (`parse_rls_config`), and the `ratelimit:` section of nexus.yaml
(`RlsSettings`, `parse_rls_settings`). Errors name file, line and path."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Final

from nexus_authz.core.errors import ConfigError
from nexus_authz.core.rls.matching import (
    _UNIT_LIST,
    MAX_REQUESTS_PER_UNIT,
    UNITS,
    RateLimitRule,
    RlsConfig,
    _Level,
    _make_rule,
    _Node,
)
from nexus_authz.core.yamlsrc import Fields, load_yaml

# -- parsing ----------------------------------------------------------------------------------------------


class _LevelBuilder:
    __slots__ = ("any_value", "exact", "origin", "wildcards")

    def __init__(self) -> None:
        self.exact: dict[tuple[str, str], _NodeBuilder] = {}
        self.wildcards: dict[str, list[tuple[tuple[str, ...], _NodeBuilder]]] = {}
        self.any_value: dict[str, _NodeBuilder] = {}
        self.origin: dict[tuple[str, str], str] = {}  # (key, value) -> where it was written

    def freeze(self) -> _Level:
        return _Level(
            exact={k: n.freeze() for k, n in self.exact.items()},
            wildcards={k: tuple((p, n.freeze()) for p, n in ws) for k, ws in self.wildcards.items()},
            any_value={k: n.freeze() for k, n in self.any_value.items()},
        )


class _NodeBuilder:
    __slots__ = ("children", "key", "rule", "share", "value")

    def __init__(self, key: str, value: str, rule: RateLimitRule | None, share: bool = False) -> None:
        self.key = key
        self.value = value
        self.rule = rule
        self.share = share
        self.children: _LevelBuilder | None = None

    def freeze(self) -> _Node:
        children = self.children.freeze() if self.children is not None else None
        return _Node(self.key, self.value, self.rule, children, self.share)


def parse_rls_config(
    files: Iterable[tuple[str, str]],
    *,
    domains: Collection[str] = (),
    merge_domains: bool = False,
) -> RlsConfig:
    """Parse (source name, YAML text) pairs, in the order given, into one config.

    `domains`: when not empty, only these domains are kept (every file is still validated).
    `merge_domains`: several files may add to one domain (upstream's MERGE_DOMAIN_CONFIG); otherwise a
    domain defined twice is an error naming both files. Raises ConfigError naming file, line and path.
    """
    files = list(files)
    roots: dict[str, _LevelBuilder] = {}
    domain_source: dict[str, str] = {}
    rules: list[RateLimitRule] = []
    sources: list[str] = []
    digest = hashlib.sha256()
    for source, text in files:
        sources.append(source)
        digest.update(f"{len(source)}:{source}{len(text)}:".encode())
        digest.update(text.encode("utf-8", "surrogateescape"))
        data = load_yaml(text, source)
        if data is None:
            raise ConfigError("the file is empty; expected `domain:` and `descriptors:`", source=source)
        root = Fields(data, source, "")
        domain = root.str("domain")
        if domain in roots:
            if not merge_domains:
                root.fail(
                    "domain",
                    f"duplicate domain {domain!r} (also in {domain_source[domain]}); "
                    "give each file its own domain or enable ratelimit.merge_domains",
                )
            level = roots[domain]
        else:
            level = roots[domain] = _LevelBuilder()
            domain_source[domain] = source
        _load_descriptors(root, "descriptors", level, domain, domain, rules)
        root.done()
    keep = set(domains)
    names = {r.name for r in rules if r.name is not None}
    warnings = tuple(
        f"{r.source}: rate_limit.replaces: no rate_limit is named {target!r}; nothing is replaced"
        for r in rules
        for target in sorted(r.replaces)
        if target not in names
    )
    return RlsConfig(
        domains={d: b.freeze() for d, b in roots.items() if not keep or d in keep},
        rules=tuple(r for r in rules if not keep or r.domain in keep),
        sources=tuple(sources),
        version=digest.hexdigest()[:16],
        warnings=warnings,
    )


def _load_descriptors(
    parent: Fields,
    name: str,
    level: _LevelBuilder,
    domain: str,
    parent_path: str,
    rules: list[RateLimitRule],
) -> None:
    for _i, item, where in parent.items(name):
        f = Fields(item, parent.source, where)
        key = f.str("key")
        value = _value(f)
        final = f"{key}_{value}" if value else key
        path = f"{parent_path}.{final}"
        origin_key = (key, value)
        if origin_key in level.origin:
            f.fail(
                "value" if value else "key",
                f"duplicate descriptor {final!r} (also {level.origin[origin_key]})",
            )
        level.origin[origin_key] = f"{f.where()}: {where}"
        for unsupported, why in _UNSUPPORTED.items():
            if unsupported in f.names():
                f.fail(unsupported, why)
        shadow = f.bool("shadow_mode", False)
        detailed = f.bool("detailed_metric", False)
        f.bool("value_to_metric", False)  # upstream: only its statsd names; nexus labels rules by path
        share = f.bool("share_threshold", False)
        if share and "*" not in value:
            f.fail(
                "share_threshold",
                "share_threshold can only be used with a wildcard value (containing '*'), "
                f"got {value!r}, as upstream",
            )
        rule: RateLimitRule | None = None
        if f.has("rate_limit"):
            rule = _rule(f.mapping("rate_limit"), f, domain, path, value, shadow, detailed)
            rules.append(rule)
        elif "rate_limit" in f.names():
            f.raw("rate_limit", None)  # `rate_limit:` left empty: no limit, as upstream
        node = _NodeBuilder(key, value, rule, share)
        if f.has("descriptors"):
            node.children = _LevelBuilder()
            _load_descriptors(f, "descriptors", node.children, domain, path, rules)
        else:
            f.raw("descriptors", None)
        f.done()
        if not value:
            level.any_value[key] = node
        elif "*" in value:
            level.wildcards.setdefault(key, []).append((tuple(value.split("*")), node))
        else:
            level.exact[(key, value)] = node


# Fields of current envoyproxy/ratelimit that nexus-authz refuses by name rather than ignore silently.
_UNSUPPORTED: Final = {
    "quota_mode": "quota_mode is not supported by nexus-authz (upstream: an over-limit quota rule answers "
    "OK and only counts); use shadow_mode for count-only rules, or nexus.yaml limits for quotas",
    "metadata": "metadata is not supported by nexus-authz (upstream returns it in the descriptor's "
    "status); remove it",
}


def _value(f: Fields) -> str:
    raw = f.raw("value", None)
    if raw is None:
        return ""
    if isinstance(raw, bool):  # YAML reads `value: true` as a boolean; upstream (Go) as the string
        return "true" if raw else "false"
    if isinstance(raw, str | int | float):
        return str(raw)
    f.fail("value", "expected a string")


def _rule(
    f: Fields, descriptor: Fields, domain: str, path: str, value: str, shadow: bool, detailed: bool
) -> RateLimitRule:
    unlimited = f.bool("unlimited", False)
    unit_raw = f.raw("unit", None)
    unit: str | None = None
    if unit_raw is not None:
        if not isinstance(unit_raw, str) or unit_raw.strip().lower() not in UNITS:
            f.fail("unit", f"unknown unit {unit_raw!r} (expected {_UNIT_LIST})")
        unit = unit_raw.strip().lower()
    if unlimited:
        if unit is not None:
            f.fail("unit", "must not be set when unlimited is true (an unlimited rule has no unit)")
        rpu = f.int("requests_per_unit", 0)  # accepted and ignored, as upstream
    else:
        if unit is None:
            f.fail("unit", f"is required ({_UNIT_LIST}), or set unlimited: true")
        if not f.has("requests_per_unit"):
            f.fail(
                "requests_per_unit",
                "is required (0 refuses every request; upstream reads a missing value as 0)",
            )
        rpu = f.int("requests_per_unit", minimum=0)
        if rpu > MAX_REQUESTS_PER_UNIT:
            f.fail("requests_per_unit", f"must be at most {MAX_REQUESTS_PER_UNIT} (uint32), got {rpu}")
    name: str | None = f.str("name", None)
    replaces: set[str] = set()
    for _j, item, where in f.items("replaces"):
        r = Fields(item, f.source, where)
        target = r.str("name", None)
        if target is None:
            r.fail("name", "is required: the name of the rate_limit this one replaces")
        if target == name:
            r.fail("name", f"a rate_limit cannot replace itself ({target!r})")
        r.done()
        replaces.add(target)
    f.done()
    return _make_rule(
        domain=domain,
        path=path,
        value=value,
        name=name,
        unit=unit,
        requests_per_unit=rpu,
        unlimited=unlimited,
        shadow=shadow,
        replaces=frozenset(replaces),
        detailed_metric=detailed,
        source=descriptor.where("rate_limit"),
    )


# -- settings -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RlsSettings:
    """The `ratelimit:` section of nexus.yaml. `config_dir` None: the service is not offered."""

    config_dir: str | None = None
    reload_interval: float = 1.0
    response_headers: bool = True
    error_body: bool = True
    domains: tuple[str, ...] = ()
    merge_domains: bool = False
    shadow_mode: bool = False
    identity: bool = True

    @property
    def enabled(self) -> bool:
        return self.config_dir is not None


def parse_rls_settings(f: Fields) -> RlsSettings:
    """Read the `ratelimit:` mapping (pass `root.mapping("ratelimit")`); calls `f.done()`.

    ```yaml
    ratelimit:
      config_dir: ratelimit/        # envoyproxy/ratelimit YAML files (*.yaml, *.yml), hot-reloaded
      enabled: true                 # false keeps the section but does not offer the service
      reload_interval: 1s
      response_headers: true        # RateLimit / RateLimit-Policy (+ retry-after on a 429)
      error_body: true              # OpenAI-style JSON body on a 429 (raw_body)
      domains: [nexus]              # only these domains (default: every domain in the directory)
      merge_domains: false          # several files may add to one domain
      shadow_mode: false            # compute and count everything, never answer OVER_LIMIT
      identity: true                # fill nexus_plan / nexus_tenant entries from nexus_key_id
    ```
    A relative `config_dir` is relative to the config file's directory.
    """
    d = RlsSettings()
    if not f.names():  # no `ratelimit:` section (or an empty one): the service is off
        return d
    enabled = f.bool("enabled", True)
    config_dir: str | None = f.str("config_dir", None)
    if config_dir is None and enabled:
        f.fail("config_dir", "is required (the directory of envoyproxy/ratelimit YAML files)")
    if config_dir is not None and not os.path.isabs(config_dir):
        config_dir = os.path.join(os.path.dirname(f.source), config_dir)
    settings = RlsSettings(
        config_dir=config_dir if enabled else None,
        reload_interval=f.duration("reload_interval", d.reload_interval, minimum=0.05),
        response_headers=f.bool("response_headers", d.response_headers),
        error_body=f.bool("error_body", d.error_body),
        domains=f.str_list("domains"),
        merge_domains=f.bool("merge_domains", d.merge_domains),
        shadow_mode=f.bool("shadow_mode", d.shadow_mode),
        identity=f.bool("identity", d.identity),
    )
    f.done()
    return settings
