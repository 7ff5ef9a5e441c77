"""The running policy: the current key snapshot, the policy, the clock and the decision counters.

Every adapter holds one `Engine` and calls `check()`. The snapshot is replaced whole by `reload_keys()`
(one reference assignment, so a concurrent reader sees the old or the new snapshot, never a mix); a file
that fails to parse leaves the last good snapshot in force and is reported through `key_status`.
Decision counts are plain ints in a dict; the metrics collector reads them at scrape time, so the hot
path never touches a Prometheus label.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from nexus_authz.core.config import credential_value, parse_key_file
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.keys import EMPTY_SNAPSHOT, KeySnapshot
from nexus_authz.core.limits import new_result
from nexus_authz.core.model import Credential, Decision, Reason, Request
from nexus_authz.core.policy import Policy
from nexus_authz.core.reservations import ReservationBook
from nexus_authz.settings import Settings, resolve_path, resolve_secret
from nexus_authz.stores.base import apply_settlements
from nexus_authz.stores.memory import MemoryCounterStore

log = logging.getLogger("nexus_authz.keys")


@dataclass(frozen=True, slots=True)
class FileStamp:
    """What identifies one version of the key file without reading it (checked every reload interval)."""

    mtime_ns: int
    size: int
    inode: int


@dataclass(frozen=True, slots=True)
class KeyStatus:
    loaded: bool
    source: str
    version: str
    keys: int
    loaded_at: float
    last_error: str | None
    last_error_at: float | None


def file_stamp(path: str) -> FileStamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileStamp(st.st_mtime_ns, st.st_size, st.st_ino)


def resolve_credentials(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> dict[str, Credential]:
    return {
        name: credential_value(
            spec,
            resolve_secret(
                spec.secret, base_dir=settings.base_dir, what=f"credentials.{name}", environ=environ
            ),
        )
        for name, spec in settings.policy.credentials.items()
    }


def resolve_pepper(settings: Settings, environ: Mapping[str, str] | None = None) -> bytes:
    try:
        pepper = resolve_secret(
            settings.pepper, base_dir=settings.base_dir, what="keys.pepper", environ=environ
        )
    except ConfigError as exc:
        raise ConfigError(
            f"{exc.detail}; the key-hash pepper is required (generate one with `nexus-authz keys pepper`)",
            source=settings.config_path,
            field="keys.pepper",
        ) from None
    if len(pepper) < 16:
        raise ConfigError(
            "the key-hash pepper must be at least 16 characters",
            source=settings.config_path,
            field="keys.pepper",
        )
    return pepper.encode()


def read_key_snapshot(
    settings: Settings, *, pepper: bytes, credentials: Mapping[str, Credential], now: float
) -> KeySnapshot:
    path = resolve_path(settings, settings.keys_file)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("key file not found", source=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read key file: {exc}", source=path) from None
    return parse_key_file(
        text, path, policy=settings.policy, credentials=credentials, pepper=pepper, loaded_at=now
    )


class Engine:
    """Decides requests against the current snapshot and counts what it decided."""

    __slots__ = (
        "_credentials",
        "book",
        "counters",
        "_key_path",
        "_last_error",
        "_last_error_at",
        "_pepper",
        "_stamp",
        "clock",
        "decisions",
        "policy",
        "settings",
        "snapshot",
    )

    def __init__(
        self,
        settings: Settings,
        *,
        pepper: bytes,
        credentials: Mapping[str, Credential],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.policy = Policy(settings.policy)
        self.clock = clock
        self.counters = MemoryCounterStore()
        reservations = settings.policy.reservations
        self.book = ReservationBook(ttl=reservations.ttl, max_entries=reservations.max_pending)
        self.snapshot: KeySnapshot = EMPTY_SNAPSHOT
        self.decisions: dict[Reason, int] = dict.fromkeys(Reason, 0)
        self._pepper = pepper
        self._credentials = credentials
        self._key_path = resolve_path(settings, settings.keys_file)
        self._stamp: FileStamp | None = None
        self._last_error: str | None = None
        self._last_error_at: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Callable[[], float] = time.time) -> Engine:
        """Build an engine with its first snapshot; raises ConfigError if anything is wrong (startup)."""
        engine = cls(
            settings, pepper=resolve_pepper(settings), credentials=resolve_credentials(settings), clock=clock
        )
        stamp = file_stamp(engine._key_path)
        engine.snapshot = read_key_snapshot(
            settings, pepper=engine._pepper, credentials=engine._credentials, now=clock()
        )
        engine._stamp = stamp
        return engine

    # -- the hot path -------------------------------------------------------------------------------
    def check(self, request: Request) -> Decision:
        decision = self.policy.authorize(request, self.snapshot, self.clock(), self.counters, self.book)
        self.decisions[decision.reason] += 1
        return decision

    def dry_run(self, request: Request) -> Decision:
        """The decision `check` would make, without charging or reserving anything."""
        now = self.clock()
        admission = self.policy.admit(request, self.snapshot, now)
        if isinstance(admission, Decision):
            return admission
        statuses = self.counters.peek(admission.counter_ids, admission.specs, now, admission.costs)
        allowed = all(s.allowed or s.spec.shadow for s in statuses)
        return self.policy.conclude(admission, new_result(allowed, statuses, 0 if allowed else -1), now)

    def settle(self, request_id: str, *, tokens: int | None, usd_micros: int | None) -> bool:
        """Replace a request's reserved estimate with its real usage; False if nothing was reserved."""
        now = self.clock()
        settlement = self.book.settle(request_id, now, tokens=tokens, usd_micros=usd_micros)
        if settlement is None:
            return False
        apply_settlements(self.counters, (settlement,), now)
        return True

    def maintain(self) -> None:
        """Periodic upkeep off the hot path: expire reservations, drop drained counters."""
        now = self.clock()
        expired = self.book.expire(now)
        if expired:
            apply_settlements(self.counters, expired, now)
        self.counters.sweep(now, 10_000)

    def count(self, reason: Reason) -> None:
        self.decisions[reason] += 1

    # -- key reloads ------------------------------------------------------------------------------------
    def reload_keys(self, *, force: bool = False) -> bool:
        """Load the key file if it changed. Returns True if a new snapshot is in force.

        A broken, truncated or deleted file keeps the last good snapshot and logs one error per change of
        the file (not one per poll), naming the file and the field.
        """
        stamp = file_stamp(self._key_path)
        if not force and stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            snapshot = read_key_snapshot(
                self.settings, pepper=self._pepper, credentials=self._credentials, now=self.clock()
            )
        except ConfigError as exc:
            self._last_error = str(exc)
            self._last_error_at = self.clock()
            log.error(
                "key file rejected; the previous keys stay in force",
                extra={"error": str(exc), "keys_version": self.snapshot.version, "keys": len(self.snapshot)},
            )
            return False
        if snapshot.version == self.snapshot.version:
            return False
        previous = self.snapshot
        self.snapshot = snapshot
        self._last_error = None
        self._last_error_at = None
        log.info(
            "key file loaded",
            extra={
                "keys": len(snapshot),
                "keys_version": snapshot.version,
                "previous_version": previous.version,
            },
        )
        return True

    def key_status(self) -> KeyStatus:
        snap = self.snapshot
        return KeyStatus(
            loaded=snap is not EMPTY_SNAPSHOT,
            source=snap.source,
            version=snap.version,
            keys=len(snap),
            loaded_at=snap.loaded_at,
            last_error=self._last_error,
            last_error_at=self._last_error_at,
        )
