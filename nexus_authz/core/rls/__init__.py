"""envoyproxy/ratelimit-compatible rate limiting: the config format, descriptor matching, and the answer.

Users of Envoy's `ratelimit` filter already describe their limits in envoyproxy/ratelimit's YAML (a
`domain`, nested `descriptors` with `key`, optional `value`, `rate_limit`). This module reads that format
unchanged and decides with the product's own limit maths (nexus_authz.core.limits) and counter stores,
so the same files work with better algorithms, per-key identity and the Redis store. It owns three pure
steps, with the store call (sync or awaited) left to the adapter in between:

1. `parse_rls_config(files)`: a directory's worth of YAML texts -> an immutable `RlsConfig`. Errors
   name file, line and path (`config/api.yaml:7: descriptors[0].rate_limit.unit: unknown unit ...`).
2. `RlsConfig.plan(domain, descriptors, hits_addend)`: which rule each request descriptor matches and
   what to charge (counter ids, specs, costs), after `replaces`, `unlimited` and `hits_addend`.
3. `answer(plan, statuses, allowed)`: per-descriptor statuses (current limit, remaining, time until
   reset), the overall code (OVER_LIMIT if any enforced descriptor is over), headers and a JSON body.

Matching follows envoyproxy/ratelimit: a request descriptor's entries walk the nested lists level by
level; at each level the most specific entry wins (exact key+value, then the first wildcard value in file
order, `*` anywhere and any number of times, each matching zero or more characters, then the key-only
entry, the "default value" for any value); a limit applies
only at the depth equal to the number of entries; there is no backtracking. Unknown domains and
descriptors that match nothing are OK with no limit. Counters are per domain, unit and the request's
actual entries (so a key-only or wildcard rule gives each distinct value its own counter, unless the
wildcard sets `share_threshold: true`: then all its matching values share one counter), as upstream.
`quota_mode` and `metadata` are refused by name; `value_to_metric` is accepted (upstream: statsd names).

Where we deliberately differ (better; docs/ratelimit-service.md): no clock-aligned fixed windows (units map
onto GCRA or a slotted sliding window, see UNITS); one request's descriptors are charged all or none and a
refused request charges nothing (upstream increments every matched counter, even when refused);
OVER_LIMIT statuses report the true remaining figure instead of 0; `requests_per_unit` must be written
(upstream silently reads a missing one as 0, which refuses everything).

Modules: `matching` (the parsed config, matching, the plan and the answer), `config` (parsing the YAML and
the `ratelimit:` settings). Import from the package: `from nexus_authz.core import rls`.
"""

from nexus_authz.core.rls.config import RlsSettings, parse_rls_config, parse_rls_settings
from nexus_authz.core.rls.matching import (
    IDENTITY_KEY,
    MAX_REQUESTS_PER_UNIT,
    PLAN_KEY,
    TENANT_KEY,
    UNIT_CODES,
    UNIT_NAMES,
    UNITS,
    UNLIMITED_REMAINING,
    DescriptorPlan,
    DescriptorStatus,
    Identity,
    Outcome,
    RateLimitRule,
    RequestDescriptor,
    RlsAnswer,
    RlsConfig,
    RlsPlan,
    UnitMapping,
    answer,
    request_descriptor,
)

__all__ = [
    "IDENTITY_KEY",
    "MAX_REQUESTS_PER_UNIT",
    "PLAN_KEY",
    "TENANT_KEY",
    "UNITS",
    "UNIT_CODES",
    "UNIT_NAMES",
    "UNLIMITED_REMAINING",
    "DescriptorPlan",
    "DescriptorStatus",
    "Identity",
    "Outcome",
    "RateLimitRule",
    "RequestDescriptor",
    "RlsAnswer",
    "RlsConfig",
    "RlsPlan",
    "RlsSettings",
    "UnitMapping",
    "answer",
    "parse_rls_config",
    "parse_rls_settings",
    "request_descriptor",
]
