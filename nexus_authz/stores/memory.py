"""MemoryCounterStore: the embedded default counter store, exact on one replica.

State is one dict from counter id to the algorithm's plain state: for GCRA a complex number
(the smallest Python object holding two doubles: debt + since*1j, 32 bytes), for a sliding window an
array of doubles (one slot's worth until a second slot is charged), for a calendar period an array of
three ([end, start, used]), for concurrency an int. See benchmarks/bench_limits.py and bench_memory.py
for bytes per client.

Eviction is exact and never scans: a window whose state is equivalent to a fresh one (GCRA debt drained,
a sliding window with nothing left in it, nothing in flight) behaves exactly like an absent one, so it
can be dropped with no effect on any decision. Every call owes a look at the next `sweep_per_call`
counter ids of a walk over them all; the looks are taken a batch at a time, when SWEEP_BATCH ids are owed
(the sweep's code and the walk's lists are then touched once per batch, not on every check: ~35 of the
~2,000 cache lines a cold check touches); `sweep(now, n)` does the same for a periodic timer, `sweep(now)`
drops every fresh window at once. The walk is two lists of the ids, each id in exactly one of them once:
the one being walked and the next one, to which each id the walk keeps and each new id is added; when a
walk ends, the next one starts (no copy, no scan). So only the sweep deletes an id (it is then in neither
list): a write that leaves a window fresh stores None in its place (read as fresh, as an absent state is).

A window is dropped when it was fresh at two looks in a row with no write between them: a look that finds
it fresh (or None) stores False (_IDLE: read as fresh too) and keeps its id; the next look drops an _IDLE
window; a write in between replaces the mark. So an idle window goes within about two to three walks,
and the windows of a key active more often than a walk never leave: dropping them at the first fresh look
(a per-minute window of a generous limit is fresh within microseconds, a concurrency window after each
release) had the key's next request insert its id again, and the deleted slots that piled up in the dict
made it rebuild whole every minute or so at 10,000 active keys (`bench_stalls.py --keys 10000`: 2.9-3.4 ms
a rebuild). A plain dict and the walk cost ~45 B less a window than the OrderedDict of an LRU order (its
links and index) did, and a write no longer moves its window.

Time must not go backwards across calls for eviction to stay exact (a window dropped as drained cannot
come back if the clock steps back); the decisions themselves tolerate it (nothing drains backwards).
Not thread-safe by design: the server calls it from one event loop, so each call is atomic.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any

from nexus_authz import native
from nexus_authz.core.calendar import calendar_charge, calendar_refund, calendar_take
from nexus_authz.core.limits import (
    AcquireResult,
    Algorithm,
    LimitSpec,
    WindowStatus,
    gauge_adjust,
    gauge_take,
    gcra_adjust,
    gcra_take,
    new_result,
    new_status,
    sliding_charge,
    sliding_is_fresh,
    sliding_refund,
    sliding_take,
)

__all__ = ["SWEEP_BATCH", "MemoryCounterStore"]

SWEEP_BATCH = 16  # the per-call sweep's ids are looked at when this many are owed (see the docstring)

_GCRA = Algorithm.GCRA
_SLIDING = Algorithm.SLIDING
_CALENDAR = Algorithm.CALENDAR
_State = complex | int | array | None  # type: ignore[type-arg]
_Outcome = tuple[bool, Any, int, float, float]  # (allowed, new state, remaining, reset, retry)
_GONE: Any = object()
_IDLE: Any = False  # a window the walk found fresh at its last look (see the module): read as fresh


def _sliding_state(state: object, spec: LimitSpec) -> array[float] | None:
    """The stored array if it belongs to this spec's shape (or is the one-slot form, which fits any: see
    core/windows.py); anything else counts as fresh."""
    if state.__class__ is array and (
        len(state) == spec.slots + 3 or (len(state) == 5 and state[4] == -spec.slots)
    ):
        return state
    return None


def _calendar_state(state: object) -> array[float] | None:
    """The stored array if it is a calendar window's ([end, start, used]); anything else counts as fresh."""
    if state.__class__ is array and len(state) == 3:
        return state
    return None


def _take(state: object, spec: LimitSpec, cost: int, now: float) -> _Outcome:
    algorithm = spec.algorithm
    if algorithm is _GCRA:
        if state.__class__ is complex:
            return gcra_take(state.real, state.imag, now, spec, cost)
        return gcra_take(0.0, now, now, spec, cost)
    if algorithm is _SLIDING:
        return sliding_take(_sliding_state(state, spec), now, spec, cost)
    if algorithm is _CALENDAR:
        return calendar_take(_calendar_state(state), now, spec, cost)
    return gauge_take(state if state.__class__ is int else 0, spec, cost)


def _is_fresh(state: object, now: float) -> bool:
    if state.__class__ is complex:
        return state.real <= now - state.imag
    if state.__class__ is array:
        return sliding_is_fresh(state, now)
    return not state


class MemoryCounterStore:
    """The in-process CounterStore. `sweep_per_call`: ids the walk looks at per acquire (0: sweep() only)."""

    __slots__ = ("_cursor", "_evicted", "_held", "_next", "_owed", "_states", "_sweep_per_call", "_walk")
    # New sliding windows start in the one-slot form (core/windows.py: 104 bytes instead of 280 for 24
    # slots, widened when a second slot is charged). Off where states are exported as the full arrays.
    _compact = True

    def __init__(self, *, sweep_per_call: int = 1) -> None:
        self._states: dict[str, _State] = {}
        self._sweep_per_call = sweep_per_call
        self._evicted = 0
        self._walk: list[Any] = []  # the ids the sweep walks (None: looked at already), and where it is
        self._cursor = 0
        self._next: list[Any] = []  # the next walk's ids: those kept by this one, and new ones
        self._held = 0  # windows held as None (fresh) until the walk drops them
        self._owed = 0  # ids the calls since the last batch owe the walk (< SWEEP_BATCH)

    def __len__(self) -> int:
        """Counters with state (not the fresh ones held as None or _IDLE until the walk drops them)."""
        return len(self._states) - self._held

    def __contains__(self, counter_id: object) -> bool:
        """A counter with state (not fresh): cheaper than a peek when most ids have none."""
        state = self._states.get(counter_id)  # type: ignore[call-overload]
        return state is not None and state is not _IDLE

    def _put(self, cid: str, state: _State) -> None:
        """Store a window's state; a new id joins the next walk."""
        states = self._states
        old = states.get(cid, _GONE)
        states[cid] = state
        if old is _GONE:
            self._next.append(cid)
        elif old is None or old is _IDLE:
            self._held -= 1

    def _drop(self, cid: str) -> None:
        """A write left the window fresh: held as None until the walk drops it (an absent one stays so;
        an _IDLE one is written to, so it is held as None again: one more look before it goes)."""
        states = self._states
        old = states.get(cid)
        if old is _IDLE:
            states[cid] = None
        elif old is not None:
            states[cid] = None
            self._held += 1

    def stats(self) -> dict[str, int]:
        return {"counters": len(self), "evicted": self._evicted}

    # -- the hot path --------------------------------------------------------------------------------

    def acquire(
        self, counter_ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
    ) -> AcquireResult:
        states = self._states
        get = states.get
        outcomes: list[_Outcome] = []
        allowed = True
        for i, spec in enumerate(specs):  # decide every window first; nothing is written yet
            state = get(counter_ids[i])
            algorithm = spec.algorithm
            if algorithm is _GCRA:
                if state.__class__ is complex:
                    out: _Outcome = gcra_take(state.real, state.imag, now, spec, costs[i])
                else:
                    out = gcra_take(0.0, now, now, spec, costs[i])
            elif algorithm is _SLIDING:
                out = sliding_take(_sliding_state(state, spec), now, spec, costs[i])
            elif algorithm is _CALENDAR:
                out = calendar_take(_calendar_state(state), now, spec, costs[i])
            else:
                out = gauge_take(state if state.__class__ is int else 0, spec, costs[i])
            if not out[0] and not spec.shadow:
                allowed = False
            outcomes.append(out)
        if allowed:  # commit every enforced window, and each shadow one that fits
            put = self._put
            statuses: list[WindowStatus] = []
            uncharged = 0
            for i, spec in enumerate(specs):
                fits, new_state, remaining, reset_after, retry_after = outcomes[i]
                if fits:
                    cid = counter_ids[i]
                    algorithm = spec.algorithm
                    if algorithm is _GCRA:
                        if new_state:  # debt left: keep it, anchored now
                            put(cid, complex(new_state, now))
                        else:  # fresh (a zero cost on an idle window): nothing worth keeping
                            self._drop(cid)
                    elif algorithm is _SLIDING:
                        cost = costs[i]
                        if cost:
                            put(cid, sliding_charge(new_state, now, spec, cost, self._compact))
                    elif algorithm is _CALENDAR:
                        cost = costs[i]
                        if cost:
                            put(cid, calendar_charge(new_state, now, spec, cost))
                    elif new_state:
                        put(cid, new_state)
                    else:
                        self._drop(cid)
                else:  # a shadow window that would have refused: charged only as if it were enforced
                    uncharged |= 1 << i
                statuses.append(new_status(spec, remaining, reset_after, retry_after, fits))
            result = new_result(True, tuple(statuses), uncharged)
        else:
            denied = self._denied_statuses(counter_ids, specs, outcomes, now)
            result = new_result(False, denied, (1 << len(specs)) - 1)
        if self._sweep_per_call:
            owed = self._owed + self._sweep_per_call
            if owed < SWEEP_BATCH:
                self._owed = owed
            else:  # a batch due: looked at all at once
                self._owed = 0
                self._sweep(now, owed)
        return result

    def _denied_statuses(
        self, counter_ids: Sequence[str], specs: Sequence[LimitSpec], outcomes: list[_Outcome], now: float
    ) -> tuple[WindowStatus, ...]:
        """Nothing is charged, so windows that would have fitted report their figures as they are."""
        get = self._states.get
        statuses: list[WindowStatus] = []
        for i, spec in enumerate(specs):
            out = outcomes[i]
            if out[0]:
                out = _take(get(counter_ids[i]), spec, 0, now)
                statuses.append(new_status(spec, out[2], out[3], out[4], True))
            else:
                statuses.append(new_status(spec, out[2], out[3], out[4], False))
        return tuple(statuses)

    # -- settle, dry run -------------------------------------------------------------------------------

    def adjust(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        deltas: Sequence[int],
        now: float,
        charged_at: float | None = None,
    ) -> None:
        states = self._states
        put = self._put
        for i, spec in enumerate(specs):
            delta = deltas[i]
            if not delta:
                continue
            cid = counter_ids[i]
            state = states.get(cid)
            algorithm = spec.algorithm
            if algorithm is _GCRA:
                if state.__class__ is complex:
                    debt = gcra_adjust(state.real, state.imag, now, spec, delta)
                else:
                    debt = gcra_adjust(0.0, now, now, spec, delta)
                if debt:
                    put(cid, complex(debt, now))
                else:
                    self._drop(cid)
            elif algorithm is _SLIDING:
                window = _sliding_state(state, spec)
                if delta > 0:
                    put(cid, sliding_charge(window, now, spec, delta, self._compact))
                elif window is not None:
                    sliding_refund(window, now, spec, -delta, charged_at)
                    if sliding_is_fresh(window, now):
                        self._drop(cid)
            elif algorithm is _CALENDAR:
                period = _calendar_state(state)
                if delta > 0:
                    put(cid, calendar_charge(period, now, spec, delta))
                elif period is not None:
                    calendar_refund(period, now, spec, -delta, charged_at)
                    if sliding_is_fresh(period, now):  # [end, start, used]: fresh as a sliding window is
                        self._drop(cid)
            else:
                in_flight = gauge_adjust(state if state.__class__ is int else 0, delta)
                if in_flight:
                    put(cid, in_flight)
                else:
                    self._drop(cid)

    def peek(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        now: float,
        costs: Sequence[int] | None = None,
    ) -> tuple[WindowStatus, ...]:
        get = self._states.get
        outcomes = [
            _take(get(counter_ids[i]), spec, costs[i] if costs is not None else 0, now)
            for i, spec in enumerate(specs)
        ]
        if all(out[0] or spec.shadow for out, spec in zip(outcomes, specs, strict=True)):
            return tuple(
                new_status(spec, o[2], o[3], o[4], o[0]) for o, spec in zip(outcomes, specs, strict=True)
            )
        return self._denied_statuses(counter_ids, specs, outcomes, now)

    # -- eviction ------------------------------------------------------------------------------------------

    def _sweep(self, now: float, budget: int) -> int:
        """Look at the next `budget` ids of the walk (at most len(states)): drop the windows fresh at the
        last look too (_IDLE), mark the fresh ones _IDLE."""
        states = self._states
        if budget > len(states):
            budget = len(states)
        evicted = 0
        walk = self._walk
        i = self._cursor
        keep = self._next.append
        while budget > 0:
            if i >= len(walk):  # this walk ended: the next one starts
                walk = self._walk = self._next
                self._next = []
                keep = self._next.append
                i = 0
                if not walk:
                    break
            cid = walk[i]
            walk[i] = None
            i += 1
            budget -= 1
            state = states.get(cid, _GONE)
            if state is _IDLE:  # fresh at the last look, no write since: dropped
                del states[cid]
                self._held -= 1
                evicted += 1
            elif state is None:  # left fresh by a write since the last look
                states[cid] = _IDLE
                keep(cid)
            elif state is not _GONE:  # (_GONE: only a store changed behind its back)
                if _is_fresh(state, now):
                    states[cid] = _IDLE
                    self._held += 1
                keep(cid)
        self._cursor = i
        self._evicted += evicted
        return evicted

    def sweep(self, now: float, max_items: int | None = None) -> int:
        """Look at the next `max_items` ids of the walk as the per-call sweep does, or (default) drop every
        fresh window at once. Returns the windows dropped."""
        if max_items is not None:
            return self._sweep(now, max_items)
        states = self._states
        evicted = 0
        for cid, state in list(states.items()):
            if _is_fresh(state, now):  # (None and _IDLE are too)
                del states[cid]
                evicted += 1
        self._walk = list(states)  # every id, once
        self._next = []
        self._cursor = 0
        self._held = 0
        self._evicted += evicted
        return evicted

    def clear(self) -> None:
        """Forget every window (as if each were fresh)."""
        self._states.clear()
        self._walk = []
        self._next = []
        self._cursor = 0
        self._held = 0


# The compiled acquire and adjust (nexus_authz/native/_windows.pyx) when they built, unless
# NEXUS_AUTHZ_PURE=1: the same state, decisions and objects; they hand any spec they do not know to the
# pure-Python methods below, the reference.
acquire_python = MemoryCounterStore.acquire
adjust_python = MemoryCounterStore.adjust
if native.windows is not None:
    MemoryCounterStore.acquire, MemoryCounterStore.adjust = native.windows.install(  # type: ignore[method-assign]
        acquire_python, adjust_python, _is_fresh, SWEEP_BATCH
    )
