"""A file the server reloads while it runs: stamp, load, keep the last good version, report status.

`FileSource` holds what is generic about a reloaded file (the key file, the config file; later the rate
limit config directory): the stamp of the version in force (a stat, checked every poll), a forced reload
(SIGHUP), and the last error with its time, for readiness and metrics. What a version *is* and how it is
put in force stays with the caller: `load` runs off the event loop (it may parse for seconds) and returns
the value or a ConfigError; `install` runs on the loop and records the outcome.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from nexus_authz.core.errors import ConfigError

T = TypeVar("T")


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


_RELOAD = FileStamp(-1, -1, -1)  # a stamp no file has: the next poll reloads


@dataclass(frozen=True, slots=True)
class SourceStatus:
    path: str
    loaded_at: float
    last_error: str | None
    last_error_at: float | None


class FileSource(Generic[T]):
    """One reloaded file: `changed()` (a stat) -> `load()` (off the loop) -> `install()` (on the loop)."""

    __slots__ = ("_clock", "_load", "last_error", "last_error_at", "loaded_at", "path", "stamp")

    def __init__(
        self,
        path: str,
        load: Callable[[], T],
        *,
        stamp: FileStamp | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._load = load
        self._clock = clock
        self.stamp = stamp if stamp is not None else file_stamp(path)
        self.loaded_at = clock()
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    def changed(self) -> FileStamp | None | bool:
        """The file's new stamp if it changed since the last load (None: it is gone), else False."""
        stamp = file_stamp(self.path)
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

    def install(self, result: T | ConfigError, stamp: FileStamp | None) -> T | None:
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

    def status(self) -> SourceStatus:
        return SourceStatus(self.path, self.loaded_at, self.last_error, self.last_error_at)
