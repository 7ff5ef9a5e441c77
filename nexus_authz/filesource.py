"""A file the server reloads while it runs: stamp, load, keep the last good version, report status.

`FileSource` holds what is generic about a reloaded file or directory (the key file, the config file,
the rate limit service's config directory): the stamp of the version in force (a stat, checked every
poll; a directory's stamp is its files' stamps), a forced reload (SIGHUP), and the last error with its
time, for readiness and metrics (`SourceStatus`, one shape for every source). What a version *is* and
how it is put in force stays with the caller: `load` runs off the event loop (it may parse for seconds)
and returns the value or a ConfigError; the caller's `install` runs on the loop, calls
`FileSource.install` to record the outcome, then logs and swaps. `poll` / `poll_off_loop` are that
cycle, written once.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from nexus_authz.core.errors import ConfigError

T = TypeVar("T")

#: What identifies one version of a source without reading it (None: it cannot be read at all).
Stamp = Hashable


@dataclass(frozen=True, slots=True)
class FileStamp:
    """What identifies one version of a file without reading it (checked every reload interval)."""

    mtime_ns: int
    size: int
    inode: int


def file_stamp(path: str) -> FileStamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileStamp(st.st_mtime_ns, st.st_size, st.st_ino)


_RELOAD = FileStamp(-1, -1, -1)  # a stamp no file or directory has: the next poll reloads


@dataclass(frozen=True, slots=True)
class SourceStatus:
    path: str
    loaded_at: float
    last_error: str | None
    last_error_at: float | None


#: What the caller puts in force: gets a load's outcome and its stamp, returns True if something new
#: is in force (it calls `FileSource.install` to record the outcome).
Install = Callable[["T | ConfigError", Stamp], bool]


class FileSource(Generic[T]):
    """One reloaded file: `changed()` (a stat) -> `load()` (off the loop) -> `install()` (on the loop)."""

    __slots__ = ("_clock", "_load", "_stamp_of", "last_error", "last_error_at", "loaded_at", "path", "stamp")

    def __init__(
        self,
        path: str,
        load: Callable[[], T],
        *,
        stamp: Stamp = None,
        clock: Callable[[], float] = time.time,
        stamp_of: Callable[[str], Stamp] = file_stamp,
    ) -> None:
        self.path = path
        self._load = load
        self._clock = clock
        self._stamp_of = stamp_of
        self.stamp: Stamp = stamp if stamp is not None else stamp_of(path)
        self.loaded_at = clock()
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    def current_stamp(self) -> Stamp:
        """The stamp of what is on disk now (take it before a first load, then `install` with it)."""
        return self._stamp_of(self.path)

    def changed(self) -> Stamp | bool:
        """The file's new stamp if it changed since the last load (None: it is gone), else False."""
        stamp = self._stamp_of(self.path)
        return False if stamp == self.stamp else stamp

    def request_reload(self) -> None:
        """Make the next poll load the file even if it looks unchanged (SIGHUP)."""
        self.stamp = _RELOAD

    def load(self) -> T | ConfigError:
        """Read and parse the file; thread-safe as long as the loader is. Never raises a ConfigError."""
        try:
            return self._load()
        except ConfigError as exc:
            return exc

    def install(self, result: T | ConfigError, stamp: Stamp) -> T | None:
        """Record a load's outcome: the value to put in force, or None after an error (kept as the
        source's last error until a good version loads). The caller logs and swaps."""
        self.stamp = stamp
        if isinstance(result, ConfigError):
            self.last_error = str(result)
            self.last_error_at = self._clock()
            return None
        self.last_error = None
        self.last_error_at = None
        self.loaded_at = self._clock()
        return result

    def poll(self, install: Install[T], *, force: bool = False) -> bool:
        """Load the file if it changed (or always, with `force`) on the calling thread, and hand the
        outcome to `install`; its answer (a new version in force), or False when nothing changed."""
        stamp = self.changed()
        if stamp is False:
            if not force:
                return False
            stamp = self.stamp
        return install(self.load(), stamp)

    async def poll_off_loop(self, install: Install[T]) -> bool:
        """`poll` from the event loop: the load runs in a worker thread (the loop keeps answering with
        the version in force), `install` on the loop."""
        stamp = self.changed()
        if stamp is False:
            return False
        loaded = await asyncio.get_running_loop().run_in_executor(None, self.load)
        return install(loaded, stamp)

    def status(self) -> SourceStatus:
        return SourceStatus(self.path, self.loaded_at, self.last_error, self.last_error_at)
