"""What the allowed decision needs of a tuple of windows, computed once per tuple instead of per request.

A key's windows (its `limits`, or the per-model selection `Policy` caches) are one tuple of `LimitSpec`s
shared by every request of that key; everything below depends on that tuple alone:

* `cost_index`: for window i, where its charge comes from in `(1, tokens, usd)` (a request and a
  concurrency slot cost 1), so a request's costs are one C-level `map` over it;
* `metered`: whether any window is charged tokens or USD (the estimate is computed only then);
* `settle_mask` / `slot_mask`: bit i set when window i must be settled (tokens, USD, concurrency) / holds a
  concurrency slot, for the reservation book (core/reservations.py);
* `headers`: the rate-limit headers' per-window fragments (core/ratelimit_headers.py `header_plan`), of
  the header families the policy chose (`rate_limit_headers`, bits of ratelimit_headers.FAMILIES).

`near_limit(shape, statuses, uncharged)`: whether an admitted request's slot is worth an early release
(the mark `Policy.conclude` sets, see there).

`shape_of(specs, families)` is cached by the tuple's identity; the cache keeps the tuple itself, so an id is
never reused while its entry lives, and it is cleared when it reaches `MAX_SHAPES` (a config reload makes
new tuples). A cached shape of other header families is made again (`families` None: any shape will do,
for a caller that does not build headers; a new one then has both families).
"""

from __future__ import annotations

from typing import Final, NamedTuple

from nexus_authz.core.limits import Kind, LimitSpec, WindowStatus
from nexus_authz.core.ratelimit_headers import BOTH, HeaderPlan, header_plan

__all__ = ["MAX_SHAPES", "Shape", "costs_of", "near_limit", "shape_of"]

MAX_SHAPES: Final = 65_536


class Shape(NamedTuple):
    specs: tuple[LimitSpec, ...]
    cost_index: tuple[int, ...]
    metered: bool
    settle_mask: int
    slot_mask: int
    slot_indices: tuple[int, ...]
    headers: HeaderPlan


_SHAPES: dict[int, Shape] = {}
_SOURCE: Final = {Kind.TOKENS: 1, Kind.USD: 2}


def shape_of(specs: tuple[LimitSpec, ...], families: int | None = None) -> Shape:
    shape = _SHAPES.get(id(specs))
    if shape is not None and shape.specs is specs and (families is None or shape.headers[2] == families):
        return shape
    cost_index = tuple(_SOURCE.get(spec.kind, 0) for spec in specs)
    settle = slots = 0
    for i, spec in enumerate(specs):
        if spec.kind is not Kind.REQUESTS:
            settle |= 1 << i
        if spec.kind is Kind.CONCURRENCY:
            slots |= 1 << i
    indices = tuple(i for i in range(len(specs)) if (slots >> i) & 1)
    plan = header_plan(specs, BOTH if families is None else families)
    shape = Shape(specs, cost_index, any(cost_index), settle, slots, indices, plan)
    if len(_SHAPES) >= MAX_SHAPES:
        _SHAPES.clear()
    _SHAPES[id(specs)] = shape
    return shape


def costs_of(shape: Shape, tokens: int, usd: int) -> tuple[int, ...]:
    """Each window's charge: 1 request or slot, the token estimate, its price."""
    return tuple(map((1, tokens, usd).__getitem__, shape.cost_index))


def near_limit(shape: Shape, statuses: tuple[WindowStatus, ...], uncharged: int) -> bool:
    """Whether the request holds a slot of a concurrency window (any level: key, group, tenant) that is
    at least half full after this admission: `remaining <= limit // 2` (a `concurrent: 1` or `2` window
    always is). Only then is a slot worth the proxy's early release call (Policy.conclude); below half
    the limit, the access log frees it within one flush and half the limit would have to be taken in
    that time for it to matter (and even then the refused request waits for the flush: decide.SLOT_WAIT).
    No allocation; the caller checks `shape.slot_mask` first."""
    for i in shape.slot_indices:
        if not (uncharged >> i) & 1:
            status = statuses[i]
            if status.remaining <= status.limit >> 1:
                return True
    return False
