"""The running policy: the current key snapshot, the policy, the clock and the decision counters.

Every adapter holds one `Engine` and calls `check_fast()` (or `dry_run()`), which hand the request to
the one decision driver (`nexus_authz.decide.Decider`) with the policy and snapshot in force. The
snapshot is replaced whole by `reload_keys()` (one reference assignment, so a concurrent reader sees the
old or the new snapshot, never a mix); a file that fails to parse leaves the last good snapshot in force
and is reported through `key_status`.
Decision counts are plain ints in a dict; the metrics collector reads them at scrape time, so the hot
path never touches a Prometheus label.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nexus_authz.core.config import credential_value, parse_key_file
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.keys import EMPTY_SNAPSHOT, KeySnapshot, with_revoked
from nexus_authz.core.limits import LimitSpec, WindowStatus
from nexus_authz.core.model import Credential, Decision, InFlight, Reason, Request
from nexus_authz.core.policy import Policy
from nexus_authz.core.reservations import ReservationBook, Settlement
from nexus_authz.core.usage import Usage
from nexus_authz.decide import Decider
from nexus_authz.filesource import FileSource, FileStamp, SourceStatus, file_stamp
from nexus_authz.latency import LatencyHistogram
from nexus_authz.settings import Settings, load_settings, reload_settings, resolve_path, resolve_secret
from nexus_authz.stores.base import LocalCounters
from nexus_authz.stores.ledger import Ledger, MemoryLedger, SQLiteLedger, UsageRecord
from nexus_authz.stores.memory import MemoryCounterStore
from nexus_authz.stores.redis import RedisStore, open_redis_store

log = logging.getLogger("nexus_authz.keys")
config_log = logging.getLogger("nexus_authz.config")


@dataclass(frozen=True, slots=True)
class KeyStatus:
    loaded: bool
    source: str
    version: str
    keys: int
    loaded_at: float
    last_error: str | None
    last_error_at: float | None


_RELOAD = object()  # a stamp no file has: the next poll reloads


@dataclass(frozen=True, slots=True)
class ConfigUpdate:
    """A changed config file, loaded and checked off the loop, ready to put in force in one step."""

    settings: Settings  # what to run with: the new reloadable fields, the running value of the rest
    restart: tuple[str, ...]  # changed fields that need a restart (not applied)
    changed: tuple[str, ...]  # changed fields that take effect
    pepper: bytes
    credentials: Mapping[str, Credential]
    snapshot: KeySnapshot  # the key file read against the new policy
    key_stamp: FileStamp | None


def make_ledger(settings: Settings, clock: Callable[[], float]) -> Ledger | None:
    ls = settings.ledger
    if ls.backend == "none":
        return None
    if ls.backend == "memory":
        return MemoryLedger(clock=clock)
    return SQLiteLedger(
        resolve_path(settings, ls.path),
        flush_interval=ls.flush_interval,
        batch_size=ls.batch_size,
        max_pending=ls.max_pending,
        clock=clock,
    )


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
        "accounted",
        "config",
        "book",
        "check_latency",
        "counters",
        "decider",
        "ledger",
        "usage_tokens",
        "_key_path",
        "_last_error",
        "_last_error_at",
        "_pepper",
        "_stamp",
        "_clock",
        "decisions",
        "failures",
        "remote",
        "revoked",
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
        self.policy = Policy(settings.policy, track=settings.accounting.enabled)
        self._clock = clock
        # The limit counters: in this process, or in Redis shared by every replica (distributed mode).
        self.remote: RedisStore | None = None
        self.counters: Any = MemoryCounterStore()
        if settings.counters.backend == "redis" and settings.counters.redis is not None:
            self.remote = open_redis_store(
                settings.counters.redis,
                base_dir=settings.base_dir,
                gauge_ttl=settings.policy.reservations.ttl + 30,
                name="counters",
            )
            self.counters = self.remote
        self.failures = MemoryCounterStore()  # invalid keys per client address: always local
        self.revoked: frozenset[str] = frozenset()  # key ids revoked through Redis, over the key file
        reservations = settings.policy.reservations
        self.book = ReservationBook(ttl=reservations.ttl, max_entries=reservations.max_pending)
        self.ledger: Ledger | None = make_ledger(settings, clock)
        self.decisions: dict[Reason, int] = dict.fromkeys(Reason, 0)
        self.check_latency = LatencyHistogram()  # seconds per check(), read by the metrics collector
        # The one decision driver, against the store behind the async port (the memory store wrapped).
        self.decider = Decider(
            self.remote if self.remote is not None else LocalCounters(self.counters),
            book=self.book,
            failures=self.failures,
            clock=clock,
            decisions=self.decisions,
            latency=self.check_latency,
        )
        # Accounting counters for metrics: responses by source, tokens by (model, kind).
        self.accounted: dict[str, int] = {
            "provider": 0,
            "estimated": 0,
            "none": 0,
            "unmatched": 0,  # accounted after its reservation expired (ledger only, nothing to settle)
            "unadmitted": 0,  # dropped: nexus-authz admitted no request with that id
        }
        self.usage_tokens: dict[tuple[str, str], int] = {}
        self.snapshot: KeySnapshot = EMPTY_SNAPSHOT
        self._pepper = pepper
        self._credentials = credentials
        self._key_path = resolve_path(settings, settings.keys_file)
        self._stamp: FileStamp | None = None
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        # nexus.yaml, reloaded like the key file (SIGHUP, or a changed stamp at the next poll)
        self.config: FileSource[ConfigUpdate] | None = (
            FileSource(settings.config_path, self._load_config, clock=clock)
            if os.path.isfile(settings.config_path)
            else None
        )

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
        gc.freeze()  # the snapshot lives until the next reload: keep the cyclic GC off its objects
        return engine

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        """A new clock (tests) is the decision driver's too."""
        self._clock = clock
        self.decider.clock = clock

    # -- the hot path -------------------------------------------------------------------------------
    def check_fast(self, request: Request) -> Decision | Awaitable[Decision]:
        """The decision, at once when it can be made without waiting (the memory store; Redis's batched
        mode; a request refused before any limit), else an awaitable (see `Decider.check`).

        Adapters call this and await only when they get an awaitable, so the common case costs no
        coroutine."""
        return self.decider.check(self.policy, self.snapshot, request)

    def check(self, request: Request) -> Decision:
        """`check_fast` for callers that cannot await (tests, benchmarks): the counter store must answer
        without waiting (the memory store)."""
        decision = self.decider.check(self.policy, self.snapshot, request)
        if decision.__class__ is not Decision:
            if isinstance(decision, Coroutine):
                decision.close()
            raise RuntimeError("this counter store must be awaited: use Engine.check_fast")
        return decision

    def _apply(self, settlements: Iterable[Settlement], now: float) -> None:
        self.decider.apply(settlements, now)

    async def peek(
        self,
        counter_ids: Sequence[str],
        specs: Sequence[LimitSpec],
        now: float,
        costs: Sequence[int] | None = None,
    ) -> tuple[WindowStatus, ...] | None:
        """Window statuses without charging anything; None when the (remote) store cannot answer."""
        return await self.decider.peek(counter_ids, specs, now, costs)

    async def dry_run(self, request: Request, snapshot: KeySnapshot | None = None) -> Decision:
        """The decision `check` would make (against `snapshot`, default the one in force), charging and
        reserving nothing."""
        return await self.decider.dry_run(self.policy, snapshot or self.snapshot, request)

    def settle(
        self, request_id: str, *, tokens: int | None, usd_micros: int | None, at_least_reserved: bool = False
    ) -> bool:
        """Replace a request's reserved estimate with its real usage (`at_least_reserved`: with the larger
        of the two); False if nothing was reserved."""
        now = self.clock()
        settlement = self.book.settle(
            request_id, now, tokens=tokens, usd_micros=usd_micros, at_least_reserved=at_least_reserved
        )
        if settlement is None:
            return False
        self._apply((settlement,), now)
        return True

    def release(self, request_id: str) -> bool:
        """Free a request's concurrency slot now: its response has ended (the proxy says so before
        the client has the last bytes); the usage settles the rest later. False if it held none."""
        settlement = self.book.release(request_id)
        if settlement is None:
            return False
        self._apply((settlement,), self.clock())
        return True

    def revoke(self, key_ids: frozenset[str]) -> None:
        """Revocations published through Redis (every replica within a second): those keys answer 401
        from now on, whatever the key file says, until un-revoked. One snapshot swap."""
        self.revoked = self.revoked | key_ids
        self.snapshot = with_revoked(self.snapshot, self.revoked)
        if key_ids:
            log.info("keys revoked", extra={"revoked": len(key_ids)})

    def prompt_hint(self, request_id: str) -> int:
        context = self.book.context(request_id)
        return context.prompt_tokens if isinstance(context, InFlight) else 0

    def account(
        self,
        request_id: str,
        usage: Usage,
        *,
        response_model: str | None = None,
        keep_estimate: bool = False,
    ) -> None:
        """A response's usage: settle its reservation and record it in the ledger.

        `keep_estimate`: the usage is incomplete (the response was cut off before its usage record, by
        the client or the upstream) or could not be read (an unsupported content-encoding): the limits
        keep the larger of the reserved estimate and `usage` (SECURITY.md: a client that drops its
        connection keeps its estimate charged); the ledger records `usage`. An error response (source
        "none") is charged `accounting.error_charge_tokens` (0 by default: the provider bills nothing).

        Only requests nexus-authz admitted are accounted, under the key, tenant and model it admitted
        them with (its reservation book, or its record of reservations that expired unsettled), never an
        identity the proxy's log entry carries: a request the proxy refused before stripping the client's
        x-nexus-* headers would otherwise land in the ledger under any key. Others are counted
        (`accounted["unadmitted"]`) and dropped.
        """
        context = self.book.context(request_id) if request_id else None
        live = isinstance(context, InFlight)
        if not live:
            context = self.book.retired(request_id) if request_id else None
            if not isinstance(context, InFlight):
                self.accounted["unadmitted"] += 1
                return
            self.accounted["unmatched"] += 1
        assert isinstance(context, InFlight)
        key_id, tenant, model = context.key_id, context.tenant, context.model or response_model
        self.accounted[usage.source] += 1
        prices = self.policy.prices
        if usage.source == "none":
            prompt, cached, completion = self.settings.accounting.error_charge_tokens, 0, 0
        else:
            prompt, cached, completion = (
                usage.prompt_tokens,
                usage.cached_prompt_tokens,
                usage.completion_tokens,
            )
        tokens = prompt + completion
        cost = prices.cost(model, prompt, cached, completion) if prices else 0
        if live:
            if keep_estimate:
                self.settle(request_id, tokens=tokens, usd_micros=cost, at_least_reserved=True)
            else:
                self.settle(request_id, tokens=tokens, usd_micros=cost)
        model_label = model or "unknown"
        counts = self.usage_tokens
        for kind, n in (("prompt", prompt), ("cached_prompt", cached), ("completion", completion)):
            if n:
                counts[(model_label, kind)] = counts.get((model_label, kind), 0) + n
        if self.ledger is not None:
            self.ledger.record(
                UsageRecord(
                    key_id=key_id,
                    tenant=tenant or "",
                    model=model_label,
                    ts=self.clock(),
                    prompt_tokens=prompt,
                    cached_prompt_tokens=cached,
                    completion_tokens=completion,
                    reasoning_tokens=usage.reasoning_tokens,
                    cost_micro_usd=cost,
                )
            )

    def maintain(self) -> None:
        """Periodic upkeep off the hot path: expire reservations, drop drained counters."""
        now = self.clock()
        expired = self.book.expire(now)
        if expired:
            self._apply(expired, now)
        self.counters.sweep(now, 10_000)
        self.failures.sweep(now, 10_000)

    def count(self, reason: Reason) -> None:
        self.decisions[reason] += 1

    # -- key reloads ------------------------------------------------------------------------------------
    def keys_changed(self) -> FileStamp | None | bool:
        """The key file's new stamp if it changed since the last load (a stat, cheap), else False."""
        stamp = file_stamp(self._key_path)
        return False if stamp == self._stamp else stamp

    def load_keys(self) -> KeySnapshot | ConfigError:
        """Read and parse the key file. Thread-safe and side-effect free: the server runs it off the
        event loop (a 100,000-key file takes seconds to parse) and installs the result on the loop."""
        try:
            return read_key_snapshot(
                self.settings, pepper=self._pepper, credentials=self._credentials, now=self.clock()
            )
        except ConfigError as exc:
            return exc

    def install_keys(self, result: KeySnapshot | ConfigError, stamp: FileStamp | None) -> bool:
        """Put a loaded snapshot in force (one reference swap), or keep the last good one and log why.

        A broken, truncated or deleted file logs one error per change of the file (not one per poll),
        naming the file and the field. Returns True if a new snapshot is in force.
        """
        self._stamp = stamp
        if isinstance(result, ConfigError):
            self._last_error = str(result)
            self._last_error_at = self.clock()
            log.error(
                "key file rejected; the previous keys stay in force",
                extra={
                    "error": str(result),
                    "keys_version": self.snapshot.version,
                    "keys": len(self.snapshot),
                },
            )
            return False
        self._last_error = None
        self._last_error_at = None
        if result.version == self.snapshot.version:
            return False
        previous = self.snapshot
        self.snapshot = with_revoked(result, self.revoked) if self.revoked else result
        # The snapshot lives until the next reload: keep the cyclic GC from rescanning its objects.
        gc.freeze()
        log.info(
            "key file loaded",
            extra={"keys": len(result), "keys_version": result.version, "previous_version": previous.version},
        )
        return True

    def request_reload(self) -> None:
        """Make the next poll reload the config file and the key file even if they look unchanged
        (SIGHUP)."""
        self._stamp = _RELOAD  # type: ignore[assignment]
        if self.config is not None:
            self.config.request_reload()

    def reload_keys(self, *, force: bool = False) -> bool:
        """Load the key file if it changed (or always, with `force`), on the calling thread."""
        stamp = self.keys_changed()
        if stamp is False:
            if not force:
                return False
            stamp = self._stamp
        return self.install_keys(self.load_keys(), stamp)  # type: ignore[arg-type]

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

    # -- config file reloads ------------------------------------------------------------------------------
    def _load_config(self) -> ConfigUpdate:
        """Read nexus.yaml and everything a new policy needs (secrets, the key file read against it).
        Side-effect free and run off the loop; any problem is a ConfigError and nothing changes."""
        assert self.config is not None
        settings, restart, changed = reload_settings(self.settings, load_settings(self.config.path))
        pepper = resolve_pepper(settings)
        credentials = resolve_credentials(settings)
        key_stamp = file_stamp(resolve_path(settings, settings.keys_file))
        snapshot = read_key_snapshot(settings, pepper=pepper, credentials=credentials, now=self.clock())
        return ConfigUpdate(settings, restart, changed, pepper, credentials, snapshot, key_stamp)

    def install_config(self, result: ConfigUpdate | ConfigError, stamp: FileStamp | None) -> bool:
        """Put a reloaded config in force (a new Policy, credentials and key snapshot; the limit counters,
        reservations and stores stay, so a limit that did not change keeps its state), or keep the last
        good config and log why. Each changed field that needs a restart is logged by name, once per
        reload, and keeps its running value. Returns True if the new config is in force."""
        assert self.config is not None
        path = self.config.path
        update = self.config.install(result, stamp)
        if update is None:
            config_log.error(
                "config file rejected; the previous config stays in force",
                extra={"config": path, "error": str(result)},
            )
            return False
        for name in update.restart:
            config_log.warning(
                f"config field {name} changed but needs a restart; the running value stays",
                extra={"config": path, "field": name},
            )
        self.settings = update.settings
        self.policy = Policy(update.settings.policy, track=update.settings.accounting.enabled)
        self._pepper = update.pepper
        self._credentials = update.credentials
        self._key_path = resolve_path(update.settings, update.settings.keys_file)
        self._stamp = update.key_stamp
        self._last_error = None
        self._last_error_at = None
        snapshot = update.snapshot
        self.snapshot = with_revoked(snapshot, self.revoked) if self.revoked else snapshot
        gc.freeze()
        config_log.info(
            "config file reloaded",
            extra={
                "config": path,
                "changed": ", ".join(update.changed),
                "not_applied": ", ".join(update.restart),
                "keys": len(snapshot),
                "keys_version": snapshot.version,
            },
        )
        return True

    def reload_config(self, *, force: bool = False) -> bool:
        """Load nexus.yaml if it changed (or always, with `force`), on the calling thread."""
        if self.config is None:
            return False
        stamp = self.config.changed()
        if stamp is False:
            if not force:
                return False
            stamp = self.config.stamp
        return self.install_config(self.config.load(), stamp)  # type: ignore[arg-type]

    def config_status(self) -> SourceStatus | None:
        return None if self.config is None else self.config.status()
