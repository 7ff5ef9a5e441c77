"""The cyclic garbage collector's full passes kept short: long-lived survivors frozen from the upkeep tick.

A key load freezes the snapshot (`gc.freeze()` in engine.py and runtime_keys.py). What each client's first
request leaves afterwards stays in the collector's generations: its fast-path `Plan` and the plan cache's
(key, model, path) tuple (both read by the compiled lane by slot offset: they stay what they are), its
limit windows' state arrays, ... about three tracked objects per active client. Every full collection
walks all of them again, inside whichever callback triggered it: 3-8 ms with 10,000 active clients
(benchmarks/bench_gc.py), proportionally more with more.

`settle`, run from the engine's upkeep (`Engine.collector_upkeep`: the server's collector task, every
SETTLE_EVERY seconds, and the maintenance second), moves them out of the way once enough accumulated: a
full collection over what is not frozen (cheap: only what came since the last freeze; every garbage cycle
among it is collected first), then `gc.freeze()` (the survivors go to the permanent generation, which no
collection walks). The collector's own passes then walk only what is new.

How often: that full collection holds the event loop for as long as it walks, so it is kept small by
looking often with a low threshold. With 1,000 new clients a second (10,000 keys round-robin at 1,000
requests/s, each seen for the first time), one look a second (the maintenance loop's cadence)
froze ~1,000 objects at a time in 100-200 µs of CPU (`benchmarks/bench_gc.py --requests 30000 --look
1000`, in process; more under load, with cold caches), four a second at 250 in ~40-50 µs (`--look 250`).
A look that finds less costs one `gc.get_objects()` list (~10 µs per 1,000 objects).

What freezing keeps alive: a frozen object is freed as soon as its last reference goes (plans evicted,
snapshots replaced, counters swept: none of them is in a reference cycle), but a frozen object that later
becomes part of an unreachable cycle is never collected. Only objects alive at a freeze are frozen, and a
freeze happens only while long-lived objects accumulate (SETTLE_AT since the last), not in a steady state.
"""

from __future__ import annotations

import gc
from typing import Final

__all__ = ["SETTLE_AT", "SETTLE_EVERY", "settle"]

SETTLE_AT: Final = 250  # objects in the generations worth freezing (a full pass over them: ~25-80 µs)
SETTLE_EVERY: Final = 0.25  # seconds between two looks (Engine.collector_upkeep)


def settle(threshold: int = SETTLE_AT) -> bool:
    """Collect and freeze what the collector's generations hold if that is `threshold` objects or more (a
    list of them: ~10 µs per 1,000). True if it did. Not while the collector is disabled: a key file
    parse off the loop turns it off while it builds millions of objects, frozen when installed."""
    if not gc.isenabled() or len(gc.get_objects()) < threshold:
        return False
    gc.collect()  # only the unfrozen objects: no garbage cycle among them is frozen
    gc.freeze()
    return True
