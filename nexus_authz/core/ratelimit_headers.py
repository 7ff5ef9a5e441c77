"""Rate-limit response headers from window statuses: OpenAI-compatible and IETF, plus retry-after.

Clients act on these, so they describe only *enforced* windows (a shadow limit is invisible to them):

* OpenAI: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, for each kind the most restrictive
  window (smallest remaining; ties go to the longer reset). Reset is a Go-style duration as OpenAI sends
  it ("20ms", "1s", "6m0s", "1h2m3.5s"), rounded up to the millisecond.
* IETF draft-ietf-httpapi-ratelimit-headers (-11): `ratelimit-policy` lists every enforced window as a
  structured-field string item with `q` (quota) and `w` (window, integer seconds), and `ratelimit` its
  current state with `r` (remaining) and `t` (seconds until the window is back to full). The quota unit
  `qu` is omitted for requests (the default), "concurrent-requests" for concurrency (no window), and
  "tokens" / "usd-micros" for token and budget windows: those units are not in the draft's registry yet,
  so a strict client may ignore those items rather than misread them as requests.
* `retry-after` on a denial only: integer seconds, rounded up, at least 1: the time until every refusing
  window has room for this request. A request that can never fit (larger than a window's capacity) gets
  none: no wait would help, and a client would only retry in vain.

The windows of every level are described (a key's own, its group's and its tenant's, see
core/hierarchy.py): the OpenAI headers show the tightest of them, `retry-after` waits for the binding one,
and the IETF items of a group's or tenant's window are named `group:<name>` / `tenant:<name>`.

Header names are lowercase (HTTP/2, Envoy). No enforced windows: no headers.

The policy's `rate_limit_headers` chooses the families an answer carries (`FAMILIES`: a bit each, `BOTH`
the default): a family left out is never built, and `retry-after` on a denial is always sent. The choice
is made once per windows' tuple, in the plan (`header_plan(specs, families)`): OpenAI's left out, no
window is tracked as the tightest; IETF's left out, no item is formatted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

from nexus_authz.core.limits import Kind, LimitSpec, WindowStatus

if TYPE_CHECKING:
    from nexus_authz.core.yamlsrc import Fields

__all__ = [
    "BOTH",
    "FAMILIES",
    "IETF",
    "OPENAI",
    "HeaderPlan",
    "build_header_block",
    "build_headers",
    "families_of",
    "header_plan",
    "openai_duration",
    "parse_families",
    "plan_header_block",
    "plan_headers",
    "rate_limit_headers",
    "sf_string",
]

OPENAI: Final = 1  # x-ratelimit-{limit,remaining,reset}-{requests,tokens}
IETF: Final = 2  # ratelimit-policy, ratelimit
BOTH: Final = OPENAI | IETF
FAMILIES: Final[dict[str, int]] = {"openai": OPENAI, "ietf": IETF}
"""The header families by their name in `rate_limit_headers`, in the order a choice lists them."""


def parse_families(f: Fields, name: str = "rate_limit_headers") -> tuple[str, ...]:
    """The policy's `rate_limit_headers`: a list of distinct family names (`[]`: none); absent, both."""
    from nexus_authz.core.yamlsrc import describe  # the config's reading only, not the answers'

    value = f.raw(name, None)
    if value is None:
        return tuple(FAMILIES)
    allowed = f"a list of {', '.join(FAMILIES)} ([] for none; retry-after on a denial is always sent)"
    if not isinstance(value, list):
        f.fail(name, f"expected {allowed}, got {describe(value)}")
    seen: list[str] = []
    for item in value:
        if not isinstance(item, str):
            f.fail(name, f"expected {allowed}, got {describe(item)} in the list")
        if item not in FAMILIES:
            f.fail(name, f"unknown header family {item!r}: expected {allowed}")
        if item in seen:
            f.fail(name, f"{item!r} is listed twice: expected {allowed}")
        seen.append(item)
    return tuple(seen)


def families_of(names: tuple[str, ...]) -> int:
    """The bits of a `parse_families` choice."""
    bits = 0
    for name in names:
        bits |= FAMILIES[name]
    return bits


_UNITS: Final[dict[Kind, str | None]] = {
    Kind.REQUESTS: None,
    Kind.TOKENS: "tokens",
    Kind.USD: "usd-micros",
    Kind.CONCURRENCY: "concurrent-requests",
}
_OPENAI: Final[dict[Kind, tuple[str, str, str]]] = {
    Kind.REQUESTS: (
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ),
    Kind.TOKENS: ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
}


def rate_limit_headers(
    statuses: Sequence[WindowStatus], *, denied: bool, families: int = BOTH
) -> list[tuple[str, str]]:
    """Headers for one answer (allocation-light: per-spec fragments are built once and cached), of the
    `families` chosen (`retry-after` whatever they are)."""
    policies: list[str] = []
    current: list[str] = []
    requests: WindowStatus | None = None
    tokens: WindowStatus | None = None
    refused = False
    wait = 0.0
    for s in statuses:
        spec = s.spec
        if spec.shadow:
            continue
        parts = _PARTS.get(spec)
        if parts is None:
            parts = _parts(spec)
        policies.append(parts[0])
        if parts[2]:
            current.append(f"{parts[1]}{s.remaining};t={_ceil_seconds(s.reset_after, 0)}")
        else:
            current.append(f"{parts[1]}{s.remaining}")
        kind = spec.kind
        if kind is _REQUESTS:
            if requests is None or _tighter(s, requests):
                requests = s
        elif kind is _TOKENS and (tokens is None or _tighter(s, tokens)):
            tokens = s
        if not s.allowed:
            refused = True
            if s.retry_after > wait:
                wait = s.retry_after
    if not policies:
        return []
    headers: list[tuple[str, str]] = []
    if families & OPENAI:
        _openai_headers(headers, requests, tokens)
    if families & IETF:
        headers.append(("ratelimit-policy", ", ".join(policies)))
        headers.append(("ratelimit", ", ".join(current)))
    if denied and refused and wait != _INF:
        headers.append(("retry-after", str(_ceil_seconds(wait, 1))))
    return headers


_REQUESTS, _TOKENS = Kind.REQUESTS, Kind.TOKENS
_INF: Final = math.inf
_PARTS: dict[LimitSpec, tuple[str, str, bool]] = {}
_MAX_CACHED: Final = 65_536  # distinct specs; a config reload makes new ones, so the cache is bounded


def _parts(spec: LimitSpec) -> tuple[str, str, bool]:
    """(RateLimit-Policy item, RateLimit item prefix up to "r=", has a window) for one spec."""
    # a tenant's or group's window is named with its level ("tenant:usd/month"): a key may have a
    # window of the same name of its own
    name = sf_string(spec.name if spec.level == "key" else f"{spec.level}:{spec.name}")
    unit = _UNITS[spec.kind]
    unit_param = f';qu="{unit}"' if unit else ""
    windowed = spec.kind is not Kind.CONCURRENCY
    window_param = f";w={int(spec.period)}" if windowed else ""
    parts = (f"{name};q={spec.limit}{unit_param}{window_param}", f"{name};r=", windowed)
    if len(_PARTS) >= _MAX_CACHED:
        _PARTS.clear()
    _PARTS[spec] = parts
    return parts


HeaderPlan = tuple[tuple[str, str] | None, tuple[tuple[int, str, bool, int], ...], int]
"""A tuple of windows' fixed fragments (`header_plan`): the ratelimit-policy header (None: no enforced
window), per enforced window (its index, its RateLimit item prefix, has a window, 1 requests / 2 tokens /
0 other or OpenAI's headers left out), and the families chosen (bits of `FAMILIES`)."""


def header_plan(specs: Sequence[LimitSpec], families: int = BOTH) -> HeaderPlan:
    """Everything of `rate_limit_headers` that depends on the windows and the families alone, for
    `plan_headers`."""
    policies = []
    items = []
    openai = families & OPENAI
    for i, spec in enumerate(specs):
        if spec.shadow:
            continue
        policy, prefix, windowed = _PARTS.get(spec) or _parts(spec)
        policies.append(policy)
        kind = 0 if not openai else 1 if spec.kind is _REQUESTS else 2 if spec.kind is _TOKENS else 0
        items.append((i, prefix, windowed, kind))
    return (("ratelimit-policy", ", ".join(policies)) if policies else None), tuple(items), families


def plan_headers(
    plan: HeaderPlan, statuses: Sequence[WindowStatus], denied: bool
) -> tuple[tuple[str, str], ...]:
    """`tuple(rate_limit_headers(statuses, denied=denied))` for statuses in the order of the windows `plan`
    was made of (a counter store's answer): the same headers, with the fixed parts made once."""
    policy, items, families = plan
    if policy is None or not (families or denied):
        return ()
    current: list[str] = []
    requests: WindowStatus | None = None
    tokens: WindowStatus | None = None
    refused = False
    wait = 0.0
    ietf = families & IETF
    for i, prefix, windowed, kind in items:
        s = statuses[i]
        if ietf:
            if windowed:
                current.append(f"{prefix}{s.remaining};t={_ceil_seconds(s.reset_after, 0)}")
            else:
                current.append(f"{prefix}{s.remaining}")
        if kind == 1:
            if requests is None or _tighter(s, requests):
                requests = s
        elif kind == 2 and (tokens is None or _tighter(s, tokens)):
            tokens = s
        if not s.allowed:
            refused = True
            if s.retry_after > wait:
                wait = s.retry_after
    headers: list[tuple[str, str]] = []
    _openai_headers(headers, requests, tokens)  # none when OpenAI's are left out: no kind 1 or 2
    if ietf:
        headers.append(policy)
        headers.append(("ratelimit", ", ".join(current)))
    if denied and refused and wait != _INF:
        headers.append(("retry-after", str(_ceil_seconds(wait, 1))))
    return tuple(headers)


# What the policy builds its answers' headers with: `plan_headers`, or its compiled equivalent when the
# extension loaded (nexus_authz/native/__init__.py installs nexus_authz.native._headers.plan_headers).
build_headers: Callable[[HeaderPlan, Sequence[WindowStatus], bool], tuple[tuple[str, str], ...]] = (
    plan_headers
)


def plan_header_block(plan: HeaderPlan, statuses: Sequence[WindowStatus]) -> bytes:
    """An admission's headers (`plan_headers(plan, statuses, False)`) as HTTP/1.1 header lines, each
    `name: value\r\n` in latin-1 (what adapters/answers.header_block makes of them)."""
    return b"".join(
        b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1"))
        for name, value in build_headers(plan, statuses, False)
    )


# `plan_header_block`, or its compiled equivalent (installed like `build_headers`): the HTTP listener's
# fast path (adapters/http_fast.py) writes an admission's headers with it.
build_header_block: Callable[[HeaderPlan, Sequence[WindowStatus]], bytes] = plan_header_block


def _tighter(a: WindowStatus, b: WindowStatus) -> bool:
    return a.remaining < b.remaining or (a.remaining == b.remaining and a.reset_after > b.reset_after)


def _ceil_seconds(seconds: float, minimum: int) -> int:
    # a nanosecond of float noise (2.0000000001) must not add a second
    value = math.ceil(seconds - 1e-9)
    return value if value > minimum else minimum


def openai_duration(seconds: float) -> str:
    """Go's time.Duration format at millisecond precision, rounded up: 0.02 -> "20ms", 360 -> "6m0s"."""
    if seconds <= 0:
        return "0s"
    ms = math.ceil(seconds * 1000.0 - 1e-6)  # 0.02 * 1000 is 20.000000000000004: still 20 ms
    if ms < 1000:
        return f"{ms}ms" if ms > 0 else "0s"
    if ms < 60_000:
        secs, millis = divmod(ms, 1000)
        return f"{secs}.{millis:03d}".rstrip("0") + "s" if millis else f"{secs}s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    text = f"{secs}.{millis:03d}".rstrip("0") + "s" if millis else f"{secs}s"
    return f"{hours}h{minutes}m{text}" if hours else f"{minutes}m{text}"


def sf_string(value: str) -> str:
    """An RFC 9651 sf-string: quotes and backslashes escaped, anything outside printable ASCII as '?'."""
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append("?")
    out.append('"')
    return "".join(out)


def _openai_headers(
    headers: list[tuple[str, str]], requests: WindowStatus | None, tokens: WindowStatus | None
) -> None:
    """OpenAI's x-ratelimit-* of the binding requests and tokens windows, appended to `headers`."""
    if requests is not None:
        headers.append(("x-ratelimit-limit-requests", str(requests.limit)))
        headers.append(("x-ratelimit-remaining-requests", str(requests.remaining)))
        headers.append(("x-ratelimit-reset-requests", openai_duration(requests.reset_after)))
    if tokens is not None:
        headers.append(("x-ratelimit-limit-tokens", str(tokens.limit)))
        headers.append(("x-ratelimit-remaining-tokens", str(tokens.remaining)))
        headers.append(("x-ratelimit-reset-tokens", openai_duration(tokens.reset_after)))
