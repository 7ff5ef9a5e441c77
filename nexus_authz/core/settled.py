"""Bounded FIFO records of the reservation book: the request ids accounted lately (its duplicate check,
`was_settled`) and the contexts of reservations retired unsettled (`retired`).

A FIFO record of a bounded number of ids, in chunks: an id goes into the newest chunk (a dict of at most
`chunk` ids); when it is full a new one starts, and the oldest chunk goes whole once the older chunks alone
hold `size` ids. So it remembers at least the last `size` ids and fewer than `size + 2 * chunk` (`size +
chunk` when `chunk` divides `size`, as the defaults do), and no single
operation rebuilds or frees more than one chunk's table. An OrderedDict of 65,536 ids (what this replaces)
rebuilt its whole table every ~100,000 ids recorded, 5-10 ms inside whichever access-log slice recorded
that id (about every 100 s at 1,000 requests/s; more often while it filled), and a plain dict or set with
a deque does the same. Membership walks the chunks (up to size / chunk + 1 dict look-ups): it is asked
only of a report that finds no reservation.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Final

__all__ = ["CHUNK", "ChunkedFifo", "SettledIds"]

# entries per chunk, freed at once when the chunk goes: 4,096 took 110-235 µs, every 4,096 settlements
# (benchmarks/bench_stalls.py); 512 do not show above the machine's noise
CHUNK: Final = 512


class ChunkedFifo:
    """A FIFO record of the last `size` keys put (at least; fewer than `size + 2 * chunk`) and their values,
    oldest chunk first. A key put again leaves its older place (as an OrderedDict keeps one entry a key)."""

    __slots__ = ("_chunks", "_len", "chunk", "newest", "size")

    def __init__(self, size: int, chunk: int = CHUNK) -> None:
        if size < 0 or chunk <= 0:
            raise ValueError("size must be >= 0 and chunk > 0")
        self.size = size
        self.chunk = min(chunk, size) if size else chunk
        self.newest: dict[str, object] = {}  # the chunk keys go into (the compiled settlement writes here)
        self._chunks: deque[dict[str, object]] = deque([self.newest])
        self._len = 0  # entries in the older chunks

    def __len__(self) -> int:
        return self._len + len(self.newest)

    def __contains__(self, key: object) -> bool:
        return any(key in chunk for chunk in reversed(self._chunks))

    def items(self) -> Iterator[tuple[str, object]]:
        """(key, value), oldest first."""
        for chunk in self._chunks:
            yield from chunk.items()

    def clear(self) -> None:
        """Forget everything."""
        self.newest = {}
        self._chunks = deque([self.newest])
        self._len = 0

    def put(self, key: str, value: object) -> None:
        if key in self:
            self.pop(key)
        self._append(key, value)

    def _append(self, key: str, value: object) -> None:
        """`key` into the newest chunk (a new one when it is full), wherever else it may be."""
        if len(self.newest) >= self.chunk:
            self.roll()
        self.newest[key] = value

    def pop(self, key: str, default: object = None) -> object:
        """The value of `key`, forgotten; `default` when it is not here."""
        for chunk in reversed(self._chunks):
            if key in chunk:
                if chunk is not self.newest:
                    self._len -= 1
                return chunk.pop(key)
        return default

    def roll(self) -> None:
        """Start a new chunk (the newest is full); drop the oldest once the older ones alone hold `size`."""
        chunks = self._chunks
        self._len += len(self.newest)
        self.newest = {}
        chunks.append(self.newest)
        if self._len - len(chunks[0]) >= self.size:
            self._len -= len(chunks.popleft())


class SettledIds(ChunkedFifo):
    """The request ids accounted lately (at least the last `size`; fewer than `size + 2 * chunk`)."""

    __slots__ = ()

    def add(self, request_id: str) -> None:
        """Record `request_id` (already there: recorded again in the newest chunk, as the OrderedDict moved
        it to the end; an older copy may stay until its chunk goes, which membership does not mind)."""
        self._append(request_id, None)
