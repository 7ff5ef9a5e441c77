"""The window algorithms on plain numbers: GCRA, the slotted sliding window, the concurrency gauge.

What they guarantee is in `core/limits.py`'s docstring (the specs live there); the counter stores keep
the state and call these functions, and `stores/redis/lua.py` mirrors them in Lua.
"""

from __future__ import annotations

import math
from array import array
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from nexus_authz.core.limits import LimitSpec

CONCURRENCY_RETRY_AFTER: Final = 1.0  # when a slot frees is unknowable; a hint for the client
_INF: Final = math.inf
_RELATIVE_NOISE: Final = 1e-9  # GCRA admission tolerates this fraction of the burst as rounding noise


# -- GCRA ----------------------------------------------------------------------------------------------
# State: the theoretical arrival time, held exactly as tat = since + debt: `debt` (seconds of emission
# still owed) as of time `since`. One epoch-sized float would round every charge to ulp(now) (2.4e-7 s
# today); within a burst those errors add up and flip decisions that sit exactly on the boundary (a burst
# of 3 at 5/s admitted 2). As a pair, every operation is on small numbers (now - since is exact).
# A window is fresh when its debt has drained (debt <= now - since): it then behaves exactly like a
# window never used, so it can be dropped (exact eviction). The memory store packs the pair in a complex.


def gcra_take(
    debt: float, since: float, now: float, spec: LimitSpec, cost: int
) -> tuple[bool, float, int, float, float]:
    """-> (allowed, new_debt, remaining, reset_after, retry_after); pure.

    Admit iff debt(now) + cost*T <= tau, where debt(now) = max(debt - (now - since), 0). When allowed the
    new state is (new_debt, now) and the figures are after the charge; when refused, `new_debt` is the
    current debt (storing it with `now` changes nothing) and the figures describe the window as it is.
    """
    interval = spec.interval
    if debt > 0:
        elapsed = now - since
        if elapsed > 0:  # a clock that stepped back drains nothing
            debt = debt - elapsed if debt > elapsed else 0.0
    new_debt = debt + cost * interval
    admit = spec.max_debt
    # The figures never exceed the bucket: admit carries a rounding allowance of 1e-9 of the burst, a
    # few thousand units at a limit of 10**12, which must not show as capacity above the limit.
    if new_debt <= admit:
        remaining = int((admit - new_debt) / interval)
        if remaining > spec.burst - cost:
            remaining = spec.burst - cost if spec.burst > cost else 0
        return True, new_debt, remaining, new_debt, 0.0
    free = admit - debt
    remaining = int(free / interval) if free > 0 else 0
    if remaining > spec.burst:
        remaining = spec.burst
    # retry_after later the debt has drained by exactly that much: the same request then fits
    retry_after = new_debt - spec.tolerance if cost <= spec.burst else _INF
    return False, debt, remaining, debt, retry_after


def gcra_adjust(debt: float, since: float, now: float, spec: LimitSpec, delta: int) -> float:
    """Apply a settle difference now -> the new debt as of `now`. An extra charge may overdraw (the next
    request waits); a refund never goes below fresh (capacity comes back capped at the burst)."""
    if debt > 0:
        elapsed = now - since
        if elapsed > 0:
            debt = debt - elapsed if debt > elapsed else 0.0
    debt += delta * spec.interval
    return debt if debt > 0 else 0.0


def gcra_is_fresh(debt: float, since: float, now: float) -> bool:
    return debt <= now - since


# -- slotted sliding window --------------------------------------------------------------------------
# State: array('d', [fresh_at, last_slot, total, c_0 .. c_{N-1}]). Slot s covers [s*w, (s+1)*w) and is
# kept at index 3 + s % N; `last_slot` is the newest slot written, `total` the sum of the N stored
# counts, and `fresh_at` = (last_slot + N) * w, the time by which every count has left the window.
# Reads never modify the array; `sliding_charge` / `sliding_refund` first roll it to the current slot.
# The one-slot form, array('d', [fresh_at, last_slot, total, total, -N]) (5 doubles instead of N + 3: 104
# bytes instead of 280 for 24 slots), is the same state when every count is in slot `last_slot`, as after
# a client's first requests: `sliding_charge(..., compact=True)` starts a window of N > 2 slots in it and
# widens it in place to the full form when a second slot is charged; every function here reads both
# forms. -N (no count is negative) tells it from a full array of 2 slots and says which N it is for.

_FRESH, _LAST, _TOTAL, _BASE = 0, 1, 2, 3
_ONE_SLOT: Final = _BASE + 2  # the one-slot form's length


def slot_of(now: float, width: float) -> int:
    """The largest s with s*width <= now (boundaries are float products, as everywhere here)."""
    slot = now // width  # a float holding an integer: float products, no int conversions
    if slot * width > now:
        return int(slot) - 1
    if (slot + 1.0) * width <= now:
        return int(slot) + 1
    return int(slot)


def sliding_new(spec: LimitSpec) -> array[float]:
    return array("d", bytes(8 * (spec.slots + _BASE)))


def _widen(state: array[float], n: int) -> None:
    """The one-slot form -> the full form, in place (the same state)."""
    count = state[_BASE]
    last = int(state[_LAST])
    state[_BASE] = state[_BASE + 1] = 0.0
    state.frombytes(bytes(8 * (n - 2)))  # n - 2 more slots, zero
    state[_BASE + last % n] = count


def _full(state: array[float], n: int) -> array[float]:
    """`state` in the full form: itself, or a widened copy (for reads that look at the slots)."""
    if len(state) == n + _BASE:
        return state
    copy = array("d", state)
    _widen(copy, n)
    return copy


def sliding_used(state: array[float] | None, now: float, spec: LimitSpec) -> float:
    """What the window ending at the current slot holds; pure."""
    if state is None or state[_TOTAL] <= 0:
        return 0.0
    n = spec.slots
    state = _full(state, n)
    cur = slot_of(now, spec.slot_width)
    last = int(state[_LAST])
    return _used(state, cur if cur > last else last, last, n)


def _used(state: array[float], top: int, last: int, n: int) -> float:
    gap = top - last
    if gap == 0:
        return state[_TOTAL]
    if gap >= n:
        return 0.0
    used = state[_TOTAL]
    for s in range(last - n + 1, top - n + 1):  # the stored slots that have left the window since
        used -= state[_BASE + s % n]
    return used


def sliding_take(
    state: array[float] | None, now: float, spec: LimitSpec, cost: int
) -> tuple[bool, array[float] | None, int, float, float]:
    """-> (allowed, state, remaining, reset_after, retry_after), the shape of `gcra_take`; pure.

    Admit iff the N slots ending at the current slot hold at most limit - cost. `state` is returned
    unchanged: the caller commits an admitted request with `sliding_charge(state, ...)`.
    """
    n = spec.slots
    width = spec.slot_width
    limit = spec.limit
    cur = slot_of(now, width)
    if state is None or state[_TOTAL] <= 0:  # all counts zero: the same as a window never used
        if cost <= limit:
            return True, state, limit - cost, ((cur + n) * width - now) if cost else 0.0, 0.0
        return False, state, limit, 0.0, _INF
    last = int(state[_LAST])
    if cur == last:  # the common case: still in the newest slot written
        top = cur
        used = state[_TOTAL]
        if cost and used + cost <= limit:
            return True, state, int(limit - used - cost), (top + n) * width - now, 0.0
    full = _full(state, n)  # what follows reads the slots
    if cur != last:
        top = cur if cur > last else last  # a clock that stepped back keeps counting the newer slots
        used = _used(full, top, last, n)
    if used + cost <= limit:
        reset_after = ((top + n) * width - now) if cost else _reset_after(full, top, last, n, width, now)
        return True, state, int(limit - used - cost), reset_after, 0.0
    remaining = int(limit - used) if used < limit else 0
    reset_after = _reset_after(full, top, last, n, width, now)
    if cost > limit:
        return False, state, remaining, reset_after, _INF
    excess = used + cost - limit
    freed = 0.0
    for s in range(top - n + 1, last + 1):  # oldest first: slot s leaves at (s + n) * w
        freed += full[_BASE + s % n]
        if freed >= excess:
            return False, state, remaining, reset_after, (s + n) * width - now
    return False, state, remaining, reset_after, _INF  # unreachable while cost <= limit


def _reset_after(state: array[float], top: int, last: int, n: int, width: float, now: float) -> float:
    """Until the newest non-empty slot in the window has left it."""
    for s in range(last, top - n, -1):
        if state[_BASE + s % n] > 0:
            return (s + n) * width - now
    return 0.0


def _roll(state: array[float], cur: int, n: int) -> int:
    last = int(state[_LAST])
    if cur <= last:
        return last
    if cur - last >= n:
        for i in range(_BASE, _BASE + n):
            state[i] = 0.0
        state[_TOTAL] = 0.0
    else:
        total = state[_TOTAL]
        for s in range(last + 1, cur + 1):
            i = _BASE + s % n
            total -= state[i]
            state[i] = 0.0
        state[_TOTAL] = total
    state[_LAST] = cur
    return cur


def sliding_charge(
    state: array[float] | None, now: float, spec: LimitSpec, amount: int, compact: bool = False
) -> array[float]:
    """Add `amount` (>= 0) to the current slot; modifies `state` in place (or makes one) and returns it.
    `compact`: a new window starts in the one-slot form (see above)."""
    n = spec.slots
    width = spec.slot_width
    cur = slot_of(now, width)
    if state is None:
        if compact and n > 2:
            state = array("d", bytes(8 * _ONE_SLOT))
            state[_BASE + 1] = -n
        else:
            state = sliding_new(spec)
        state[_LAST] = top = cur
    elif state[_TOTAL] <= 0:  # empty: re-anchor at now, exactly as a new window would be
        state[_LAST] = top = cur
    elif cur == state[_LAST]:  # the common case: still in the newest slot written
        top = cur
    else:
        if len(state) != n + _BASE:  # the one-slot form: a second slot is charged
            if cur - int(state[_LAST]) >= n:  # unless the first has left the window
                state[_BASE] = state[_TOTAL] = 0.0
                state[_LAST] = cur
            else:
                _widen(state, n)
        top = _roll(state, cur, n)
    if len(state) != n + _BASE:
        state[_BASE] += amount
        state[_TOTAL] += amount
        state[_FRESH] = (top + n) * width
        return state
    state[_BASE + top % n] += amount
    state[_TOTAL] += amount
    state[_FRESH] = (top + n) * width
    return state


def sliding_refund(
    state: array[float], now: float, spec: LimitSpec, amount: int, charged_at: float | None = None
) -> None:
    """Give back up to `amount` (> 0) in place.

    With `charged_at` (when the reservation was charged) this is exact: it comes out of that slot, if the
    slot is still in the window (otherwise the charge has already left it and there is nothing to give
    back). Without it, it comes out of the newest slots first, exact when the charge is in the current
    slot, and never more than the window holds.
    """
    if state[_TOTAL] <= 0:
        return
    n = spec.slots
    width = spec.slot_width
    if len(state) != n + _BASE:
        _refund_one_slot(state, now, n, width, amount, charged_at)
        return
    top = _roll(state, slot_of(now, width), n)
    left = float(amount)
    if charged_at is not None:
        s = slot_of(charged_at, width)
        if top - n < s <= top:
            i = _BASE + s % n
            take = left if left < state[i] else state[i]
            state[i] -= take
            state[_TOTAL] -= take
        return
    for s in range(top, top - n, -1):
        i = _BASE + s % n
        take = left if left < state[i] else state[i]
        if take > 0:
            state[i] -= take
            state[_TOTAL] -= take
            left -= take
            if left <= 0:
                return


def _refund_one_slot(
    state: array[float], now: float, n: int, width: float, amount: int, charged_at: float | None
) -> None:
    """`sliding_refund` on the one-slot form, which it keeps: the only count is slot `last_slot`'s."""
    cur = slot_of(now, width)
    last = int(state[_LAST])
    if cur - last >= n:  # the count has left the window: rolled to empty, as the full form would be
        state[_BASE] = state[_TOTAL] = 0.0
        state[_LAST] = cur
        return
    if charged_at is not None and slot_of(charged_at, width) != last:
        return  # that slot holds nothing (or has left the window)
    count = state[_BASE]
    take = amount if amount < count else count
    state[_BASE] = count - take
    state[_TOTAL] -= take


def sliding_is_fresh(state: array[float], now: float) -> bool:
    """Every count has left the window, or nothing is counted: either way, the same as a window never
    used (an empty window is re-anchored at the current slot by its next charge), so it can be dropped."""
    return now >= state[_FRESH] or state[_TOTAL] <= 0.0


# -- concurrency ------------------------------------------------------------------------------------------


def gauge_take(in_flight: int, spec: LimitSpec, cost: int) -> tuple[bool, int, int, float, float]:
    """-> (allowed, new_in_flight, remaining, reset_after, retry_after), the shape of `gcra_take`."""
    new = in_flight + cost
    limit = spec.limit
    if new <= limit:
        return True, new, limit - new, 0.0, 0.0
    retry_after = CONCURRENCY_RETRY_AFTER if cost <= limit else _INF
    return False, in_flight, limit - in_flight if in_flight < limit else 0, 0.0, retry_after


def gauge_adjust(in_flight: int, delta: int) -> int:
    new = in_flight + delta
    return new if new > 0 else 0
