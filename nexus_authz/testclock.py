"""A clock for end-to-end tests only: the wall clock shifted by an offset read from a file.

Enabled by NEXUS_TEST_CLOCK_FILE (read in settings.py; never set by default, never set it in production):
the file holds a number of seconds added to `time.time()`, so a test can move a running server's clock
(for instance past the start of a calendar month) by rewriting the file. The file is read again whenever
it changes (a stat per call); a missing or unreadable file keeps the last offset.
"""

from __future__ import annotations

import os
import time

__all__ = ["FileClock"]


class FileClock:
    """time.time() plus the offset in `path` (seconds, a float)."""

    __slots__ = ("_offset", "_seen", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._offset = 0.0

    def __call__(self) -> float:
        try:
            st = os.stat(self.path)
        except OSError:
            return time.time() + self._offset
        seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        if seen != self._seen:
            try:
                with open(self.path, encoding="ascii") as f:
                    self._offset = float(f.read().strip() or 0.0)
                self._seen = seen
            except (OSError, ValueError):
                pass
        return time.time() + self._offset
