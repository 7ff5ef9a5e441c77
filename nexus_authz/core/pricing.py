"""What tokens cost: the price table of the config, applied to estimates (at Check) and usage (at settle).

Prices are USD per million tokens, which is the same number as micro-USD per token, so a cost in integer
micro-dollars is `tokens * price`, rounded up (a budget is never undercharged by rounding).

A model no pattern matches follows the config's `unpriced.policy` (issue 16 item 6), never a silent
guess: `highest` (the default) prices it at the table's most expensive entry (a budget is not bypassed by
naming a model the table forgot), `default` at `unpriced.price`, `zero` records no cost, and `refuse`
refuses it at Check wherever the Check reads the model (usage whose model shows only in the response is
priced at the highest entry). Every ledger row names the rule that priced it (`Priced.rule`: the glob,
or `unpriced:<policy>`), and every unpriced request is counted in `counts` by (policy, outcome), the
figures of `nexus_authz_unpriced_requests_total`.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from nexus_authz.core.config import Price
from nexus_authz.core.price_policy import HIGHEST, REFUSE, ZERO, UnpricedPolicy

__all__ = ["PriceTable", "Priced"]

_CACHE_LIMIT = 4096  # distinct model names remembered (client-chosen strings: bounded)
_NO_PRICE = Price(0.0, 0.0, 0.0)


@dataclass(frozen=True, slots=True)
class Priced:
    price: Price
    matched: bool  # False: no pattern matched; `price` is what the unpriced policy charges
    rule: str  # the glob that matched, or "unpriced:<policy>" ("unpriced:highest" under refuse)
    outcome: str = ""  # unpriced: how it was charged ("highest", "default", "zero")


class PriceTable:
    __slots__ = ("_cache", "_entries", "_unmatched", "counts", "policy", "refuse")

    def __init__(
        self,
        entries: Sequence[tuple[str, Price]],
        unpriced: UnpricedPolicy | None = None,
        counts: dict[tuple[str, str], int] | None = None,
    ) -> None:
        self._entries = tuple(
            (pattern, re.compile(fnmatch.translate(pattern)), price) for pattern, price in entries
        )
        self.policy = unpriced or UnpricedPolicy()
        self.refuse = self.policy.policy == REFUSE and bool(entries)
        charged = HIGHEST if self.policy.policy == REFUSE else self.policy.policy
        if charged == HIGHEST:
            price = (
                max((price for _, price in entries), key=lambda p: (p.output, p.input, p.cached_input))
                if entries
                else _NO_PRICE
            )
        elif charged == ZERO:
            price = _NO_PRICE
        else:
            price = Price(*self.policy.price)
        self._unmatched = Priced(price, False, f"unpriced:{charged}", charged)
        self._cache: dict[str | None, Priced] = {}
        # (policy, outcome) -> unpriced requests: the caller's dict, so the figures survive a reload
        self.counts: dict[tuple[str, str], int] = counts if counts is not None else {}

    def __bool__(self) -> bool:
        return bool(self._entries)

    def lookup(self, model: str | None) -> Priced:
        priced = self._cache.get(model)
        if priced is None:
            priced = self._unmatched
            if model is not None:
                for pattern, regex, price in self._entries:
                    if regex.match(model):
                        priced = Priced(price, True, pattern)
                        break
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[model] = priced
        return priced

    def refuses(self, model: str) -> bool:
        """Whether a request naming `model` is refused at Check (policy refuse, no glob matches it);
        counted as refused."""
        if not self.refuse or self.lookup(model).matched:
            return False
        self._count("refused")
        return True

    def _count(self, outcome: str) -> None:
        key = (self.policy.policy, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1

    def cost(self, model: str | None, prompt: int, cached: int, completion: int) -> int:
        """Micro-USD for a usage record (or an estimate); `cached` is the part of `prompt` read from the
        provider's cache. Counts nothing (the Check's reservation uses it too)."""
        return _cost(self.lookup(model).price, prompt, cached, completion)

    def charge(self, model: str | None, prompt: int, cached: int, completion: int) -> tuple[int, str]:
        """(micro-USD, the rule that priced it) for one request's usage, once per request: an unpriced
        model is counted by its outcome."""
        priced = self._cache.get(model) or self.lookup(model)  # the cache first: once per response
        if not priced.matched:
            self._count(priced.outcome)
        return _cost(priced.price, prompt, cached, completion), priced.rule


def _cost(p: Price, prompt: int, cached: int, completion: int) -> int:
    cached = min(max(cached, 0), prompt)
    return math.ceil((prompt - cached) * p.input + cached * p.cached_input + completion * p.output)
