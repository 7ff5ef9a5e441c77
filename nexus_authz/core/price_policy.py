"""The `unpriced:` section: what a model no `prices` glob matches costs (issue 16 item 6).

```yaml
unpriced:
  policy: highest        # highest | default | zero | refuse
  price: {input: 5, cached_input: 2.5, output: 15}   # policy: default only
```

`highest` (the default) charges the table's most expensive entry, `default` charges `price`, `zero`
records no cost, `refuse` refuses the request at Check (403 `model_not_priced`) wherever the Check reads
the model; core.pricing applies it. `uncovered` is check-config's question: which of a key's model globs
no price covers.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from nexus_authz.core.yamlsrc import Fields

__all__ = [
    "POLICIES",
    "UnpricedPolicy",
    "parse_unpriced",
    "uncovered",
    "unpriced_message",
    "unpriced_warnings",
]

HIGHEST: Final = "highest"
DEFAULT: Final = "default"
ZERO: Final = "zero"
REFUSE: Final = "refuse"
POLICIES: Final = (HIGHEST, DEFAULT, ZERO, REFUSE)


@dataclass(frozen=True, slots=True)
class UnpricedPolicy:
    policy: str = HIGHEST
    price: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (input, cached_input, output): policy default


def parse_unpriced(f: Fields) -> UnpricedPolicy:
    policy = f.str("policy", HIGHEST)
    if policy not in POLICIES:
        f.fail("policy", f"must be one of {', '.join(POLICIES)}, not {policy!r}")
    price = UnpricedPolicy().price
    if f.has("price"):
        if policy != DEFAULT:
            f.fail("price", "a price for unpriced models is used with policy: default only")
        p = f.mapping("price")
        input_price = p.number("input")
        price = (input_price, p.number("cached_input", input_price), p.number("output"))
        p.done()
    elif policy == DEFAULT:
        f.fail("price", "policy: default needs a price: {input: ..., output: ...} (USD per million tokens)")
    f.done()
    return UnpricedPolicy(policy, price)


def unpriced_message(model: str) -> str:
    shown = model if len(model) <= 100 else model[:100] + "..."
    return (
        f"The model {shown!r} has no price in this gateway's price table, and requests for unpriced "
        "models are refused."
    )


def uncovered(models: Sequence[str], price_globs: Sequence[str]) -> list[str]:
    """The model globs of `models` (a key's allow-list; empty: any model) that no price glob surely covers.

    A glob is covered when a price glob matches it as a literal (a catch-all `*`, `gpt-4o*` covering
    `gpt-4o-mini` or `gpt-4o*`). Conservative: a glob covered only by a union of price globs is reported."""
    regexes = [re.compile(fnmatch.translate(g)) for g in price_globs]
    wanted = list(models) or ["*"]
    return [m for m in wanted if not any(r.match(m) for r in regexes)]


def unpriced_warnings(
    keys: Iterable[tuple[str, Sequence[str]]], price_globs: Sequence[str], policy: str, *, shown: int = 10
) -> list[str]:
    """check-config's warnings: the keys (id, model globs) that may reach a model no price covers, one
    line per distinct set of uncovered globs (at most `shown` lines, then a count). Nothing without a
    price table (costs are not tracked then)."""
    if not price_globs:
        return []
    groups: dict[tuple[str, ...], list[str]] = {}
    for key_id, models in keys:
        missing = tuple(uncovered(models, price_globs))
        if missing:
            groups.setdefault(missing, []).append(key_id)
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
    out: list[str] = []
    for n, (missing, ids) in enumerate(ordered):
        if n == shown:
            rest = sum(len(i) for _, i in ordered[shown:])
            out.append(f"... and {rest} more keys with models no price covers")
            break
        names = ", ".join(sorted(ids)[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        what = "any model" if missing == ("*",) else "models " + ", ".join(missing)
        out.append(
            f"key {names} may use {what}, which no price covers: such requests are "
            f"{'refused' if policy == REFUSE else 'charged per unpriced.policy: ' + policy}"
        )
    return out
