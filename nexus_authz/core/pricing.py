"""What tokens cost: the price table of the config, applied to estimates (at Check) and usage (at settle).

Prices are USD per million tokens, which is the same number as micro-USD per token, so a cost in integer
micro-dollars is `tokens * price`, rounded up (a budget is never undercharged by rounding).

A model no pattern matches is priced at the table's most expensive entry: a budget must not be bypassed
by naming a model the table forgot, and the operator sees it in `nexus_authz_unpriced_requests_total`.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from nexus_authz.core.config import Price

_CACHE_LIMIT = 4096  # distinct model names remembered (client-chosen strings: bounded)


@dataclass(frozen=True, slots=True)
class Priced:
    price: Price
    matched: bool  # False: no pattern matched, the most expensive entry was used


class PriceTable:
    __slots__ = ("_cache", "_entries", "_fallback", "unpriced")

    def __init__(self, entries: Sequence[tuple[str, Price]]) -> None:
        self._entries = tuple((re.compile(fnmatch.translate(p)), price) for p, price in entries)
        self._fallback = (
            max((price for _, price in entries), key=lambda p: (p.output, p.input, p.cached_input))
            if entries
            else Price(0.0, 0.0, 0.0)
        )
        self._cache: dict[str | None, Priced] = {}
        self.unpriced = 0

    def __bool__(self) -> bool:
        return bool(self._entries)

    def lookup(self, model: str | None) -> Priced:
        priced = self._cache.get(model)
        if priced is None:
            priced = Priced(self._fallback, False)
            if model is not None:
                for pattern, price in self._entries:
                    if pattern.match(model):
                        priced = Priced(price, True)
                        break
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[model] = priced
        return priced

    def cost(self, model: str | None, prompt: int, cached: int, completion: int) -> int:
        """Micro-USD for a usage record; `cached` is the part of `prompt` read from the provider's cache."""
        priced = self.lookup(model)
        if not priced.matched:
            self.unpriced += 1
        p = priced.price
        cached = min(max(cached, 0), prompt)
        return math.ceil((prompt - cached) * p.input + cached * p.cached_input + completion * p.output)
