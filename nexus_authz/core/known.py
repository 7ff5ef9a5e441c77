"""Which keys authenticated from which client address recently: the brute-force throttle's allowance.

The throttle (`auth_failures`) refuses an address that sent too many unknown keys. Refusing every key from
it would let one guesser behind a shared egress (a NAT, a corporate proxy) lock out everyone behind the
same address (issue 13.11). Refusing only unknown keys would not stop guessing: a throttled guesser would
still learn which guess hits (200 instead of 429). So a throttled address keeps serving exactly the keys
that authenticated from it within KNOWN_KEY_TTL, before or during the throttling; every other key, valid or
not, gets the same 429 as before, and a guess is still answered with nothing but 429.
"""

from __future__ import annotations

from sys import intern

KNOWN_KEY_TTL = 24 * 3600.0  # seconds a key stays known to an address after its last success from it
MAX_KNOWN = 65536  # (address, key) pairs remembered, least recently used dropped first (~10 MB at most)
REFRESH_AFTER = 60.0  # seconds: a pair noted more recently than this is not refreshed (see `note`)


class _Pairs(dict[tuple[str, str], float]):
    """The pairs' dict, always tracked by the cyclic GC (a dict subclass is never untracked): a plain dict of
    untracked (address, key id) tuples and floats is untracked by each full collection and tracked again,
    in the youngest generation, by the next new pair, so the next young collections walked all of it
    (~70 µs per 1,000 pairs). Tracked for good, it ages and is frozen with the rest (gcupkeep)."""

    __slots__ = ()


class KnownKeys:
    """(client address, key id) -> last time the key authenticated from that address. Bounded (LRU)."""

    __slots__ = ("_seen", "max_entries", "ttl")

    def __init__(self, ttl: float = KNOWN_KEY_TTL, max_entries: int = MAX_KNOWN) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._seen: dict[tuple[str, str], float] = _Pairs()

    def note(self, address: str, key_id: str, now: float) -> None:
        """The key authenticated from the address at `now` (called on every successful auth).

        A pair already noted less than REFRESH_AFTER ago is left as it is (one dict look-up instead of
        a pop and an insert per request): its TTL and its place in the LRU order then count from that
        earlier note, so a key stays known for between KNOWN_KEY_TTL - REFRESH_AFTER and KNOWN_KEY_TTL
        after its last success, never longer.
        """
        seen = self._seen
        pair = (address, key_id)
        last = seen.get(pair)
        if last is not None and last <= now < last + REFRESH_AFTER:
            return
        if seen.pop(pair, None) is None:
            if len(seen) >= self.max_entries:
                del seen[next(iter(seen))]  # the least recently used pair
            # a new pair: one address string for all the keys seen from it (each request parses its own)
            pair = (intern(address), key_id)
        seen[pair] = now

    def known(self, address: str, key_id: str, now: float) -> bool:
        last = self._seen.get((address, key_id))
        return last is not None and now - last < self.ttl

    def __len__(self) -> int:
        return len(self._seen)
