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
from functools import partial
from pathlib import Path
from typing import Any

from nexus_authz import native  # noqa: F401 - loading it installs the compiled body reading (native/)
from nexus_authz.core import accounting
from nexus_authz.core.config import parse_key_file
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.keys import EMPTY_SNAPSHOT, KeySnapshot, with_revoked
from nexus_authz.core.limits import LimitSpec, WindowStatus
from nexus_authz.core.model import Credential, Decision, InFlight, Reason, Request
from nexus_authz.core.policy import Policy
from nexus_authz.core.reservations import ReservationBook, Settlement
from nexus_authz.core.runtime_keys import file_version
from nexus_authz.core.tokens import count_tokens
from nexus_authz.core.usage import StreamUsage, Usage
from nexus_authz.decide import Decider
from nexus_authz.filesource import FileSource, SourceStatus, Stamp, file_stamp
from nexus_authz.gcupkeep import SETTLE_EVERY, settle
from nexus_authz.latency import LatencyHistogram, ReasonCounts
from nexus_authz.offloop import count_then_account
from nexus_authz.settings import (
    Settings,
    load_settings,
    reload_settings,
    resolve_credentials,
    resolve_path,
    resolve_pepper,
)
from nexus_authz.stores.base import LocalCounters
from nexus_authz.stores.ledger import Ledger
from nexus_authz.stores.memory import MemoryCounterStore
from nexus_authz.stores.redis import RedisStore

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


@dataclass(frozen=True, slots=True)
class ConfigUpdate:
    """A changed config file, loaded and checked off the loop, ready to put in force in one step."""

    settings: Settings  # what to run with: the new reloadable fields, the running value of the rest
    restart: tuple[str, ...]  # changed fields that need a restart (not applied)
    changed: tuple[str, ...]  # changed fields that take effect
    pepper: bytes
    credentials: Mapping[str, Credential]
    snapshot: KeySnapshot  # the key file read against the new policy
    key_stamp: Stamp


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
    """Decides requests against the current snapshot and counts what it decided.

    It receives what it uses, built once by the composition root (`nexus_authz.app.build_engine`): the
    counter store (and, in distributed mode, the same store as `remote`), the ledger, the secrets the
    key file is read with, the clock. It reloads the key file and the config file itself (file sources
    of its own: what they load is its policy)."""

    __slots__ = (
        "_credentials",
        "accounted",
        "config",
        "book",
        "check_latency",
        "counters",
        "decider",
        "keys",
        "ledger",
        "usage_tokens",
        "_pepper",
        "_clock",
        "unpriced",
        "decisions",
        "failures",
        "remote",
        "revoked",
        "runtime",
        "policy",
        "settings",
        "snapshot",
        "_settle_at",
    )

    def __init__(
        self,
        settings: Settings,
        *,
        pepper: bytes,
        credentials: Mapping[str, Credential],
        counters: Any = None,
        remote: RedisStore | None = None,
        ledger: Ledger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.unpriced: dict[tuple[str, str], int] = {}  # (policy, outcome) -> requests no price matched
        self.policy = Policy(
            settings.policy, track=settings.accounting.enabled, unpriced_counts=self.unpriced
        )
        self._clock = clock
        # The limit counters: in this process, or in Redis shared by every replica (distributed mode:
        # `remote` is that store, and `counters` too).
        self.remote = remote
        self.counters: Any = counters if counters is not None else remote or MemoryCounterStore()
        self.failures = MemoryCounterStore()  # invalid keys per client address: always local
        self.revoked: frozenset[str] = frozenset()  # key ids revoked through Redis, over the key file
        # Keys managed at runtime (runtime_keys.RuntimeKeys, set by the server): merged into every snapshot.
        self.runtime: Any = None
        reservations = settings.policy.reservations
        self.book = ReservationBook(ttl=reservations.ttl, max_entries=reservations.max_pending)
        self._settle_at = 0.0  # when `maintain` next looks at the collector's generations (gcupkeep)
        self.ledger = ledger
        # Accounting counters for metrics: responses by source, tokens by (model, kind).
        self.accounted: dict[str, int] = {
            "provider": 0,
            "estimated": 0,
            "none": 0,
            "unmatched": 0,  # accounted after its reservation expired (ledger only, nothing to settle)
            "unadmitted": 0,  # dropped: nexus-authz admitted no request with that id
            "duplicate": 0,  # dropped: that request id's usage was accounted already (a repeated report)
        }
        self.usage_tokens: dict[tuple[str, str], int] = {}
        self.snapshot: KeySnapshot = EMPTY_SNAPSHOT
        self.decisions = ReasonCounts()  # by reason, counted in place by the compiled lane
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
        self._pepper = pepper
        self._credentials = credentials
        # The key file, reloaded when its stamp changes (nothing loaded until `load_first_keys`)
        self.keys: FileSource[KeySnapshot] = FileSource(
            resolve_path(settings, settings.keys_file), self._read_keys, clock=clock
        )
        self.keys.request_reload()
        # nexus.yaml, reloaded like the key file (SIGHUP, or a changed stamp at the next poll)
        self.config: FileSource[ConfigUpdate] | None = (
            FileSource(settings.config_path, self._load_config, clock=clock)
            if os.path.isfile(settings.config_path)
            else None
        )

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Callable[[], float] = time.time) -> Engine:
        """Build an engine with its stores and first snapshot (the composition root's
        `build_engine`); raises ConfigError if anything is wrong (startup)."""
        from nexus_authz.app import build_engine  # the root imports this module

        return build_engine(settings, clock=clock)

    def load_first_keys(self) -> None:
        """The first load of the key file (startup): raises ConfigError instead of keeping anything."""
        stamp = self.keys.current_stamp()
        snapshot = self._read_keys()
        self.keys.install(snapshot, stamp)
        self.snapshot = self._in_force(snapshot)
        gc.freeze()  # the snapshot lives until the next reload: keep the cyclic GC off its objects

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    @property
    def credentials(self) -> Mapping[str, Credential]:
        return self._credentials

    def _in_force(
        self, snapshot: KeySnapshot, settings: Settings | None = None, credentials: Any = None
    ) -> KeySnapshot:
        """A key-file snapshot with the runtime keys merged in (ConfigError if they conflict) and the
        Redis revocations applied: what the hot path reads."""
        if self.runtime is not None:
            snapshot = self.runtime.merge(
                snapshot, (settings or self.settings).policy, credentials or self._credentials
            )
        return with_revoked(snapshot, self.revoked) if self.revoked else snapshot

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
        decision = self.decider.check(self.policy, self.snapshot, request, wait=False)
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
        self.decider.slot_releases["proxy"] += 1
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

    def account_response(
        self, request_id: str, parser: StreamUsage | None, end: accounting.ResponseEnd, prompt_hint: int
    ) -> Awaitable[None] | None:
        """A response as an accounting transport saw it (`parser`: its body fed to the usage parser;
        None when nothing of it was readable), concluded by the core (core.accounting) and accounted.

        Synchronous when it can be (nearly always: no coroutine per response); returns an awaitable
        only when a response without a usage record must have its completion counted exactly
        (accounting.exact_cutoff_count) and its text is long enough to count in a worker thread
        (offloop.count_then_account)."""
        if parser is not None and accounting.needs_exact_count(
            parser, exact=self.settings.accounting.exact_cutoff_count, counter=count_tokens
        ):
            return count_then_account(
                request_id,
                parser.finish,
                partial(self._account_parsed, request_id, parser, end=end, prompt_hint=prompt_hint),
            )
        self._account_parsed(
            request_id, parser, parser.finish() if parser is not None else None, end, prompt_hint
        )
        return None

    def _account_parsed(
        self,
        request_id: str,
        parser: StreamUsage | None,
        usage: Usage | None,
        end: accounting.ResponseEnd,
        prompt_hint: int,
    ) -> None:
        concluded, keep_estimate = accounting.conclude_usage(end, parser, usage, prompt_hint)
        read = parser is not None and usage is not None and end.readable
        model = parser.model if read and parser is not None else None
        unread = not read or (parser is not None and parser.undecodable)
        self.account(request_id, concluded, response_model=model, keep_estimate=keep_estimate, unread=unread)

    def account(
        self,
        request_id: str,
        usage: Usage,
        *,
        response_model: str | None = None,
        keep_estimate: bool = False,
        unread: bool = False,
    ) -> None:
        """A response's usage: settle its reservation and record it in the ledger.

        `keep_estimate`: the usage is incomplete or could not be read (core.accounting.conclude_usage):
        the limits keep the larger of the reserved estimate and `usage`; the ledger records `usage`.
        What it charges is core.accounting.charge's answer.

        Only requests nexus-authz admitted are accounted, under the key, tenant and model it admitted
        them with (its reservation book, or its record of reservations that expired unsettled), never an
        identity the proxy's log entry carries: a request the proxy refused before stripping the client's
        x-nexus-* headers would otherwise land in the ledger under any key. Others are counted
        (`accounted["unadmitted"]`) and dropped, and so is a repeated report of a request already
        accounted (`accounted["duplicate"]`: settlement is idempotent per request id).
        """
        book = self.book
        context = book.context(request_id) if request_id else None
        live = context.__class__ is InFlight
        if not live:
            context = book.retired(request_id) if request_id else None
            if not isinstance(context, InFlight):
                self.accounted["duplicate" if book.was_settled(request_id) else "unadmitted"] += 1
                return
            self.accounted["unmatched"] += 1
        assert isinstance(context, InFlight)
        self.accounted[usage.source] += 1
        fields = accounting.charge_fields(
            context,
            usage,
            keep_estimate,
            response_model,
            self.policy.prices,
            self.settings.accounting.error_charge_tokens,
            unread,
        )
        key_id, tenant, model, prompt, cached, completion, reasoning, cost, at_least, source, rule = fields
        now = self._clock()
        if live:
            parts = book.settle_parts(request_id, prompt + completion, cost, at_least)
            if parts is not None and parts[1]:
                self.decider.adjust(parts[0], parts[1], parts[2], now, parts[3])
        if prompt or cached or completion:
            accounting.count_tokens_used(self.usage_tokens, model, prompt, cached, completion)
        if self.ledger is not None:
            self.ledger.record_usage(
                key_id, tenant, model, now, prompt, cached, completion, reasoning, cost, source, rule
            )

    def maintain(self, sweep: int = 10_000, expire: int | None = None) -> bool:
        """Periodic upkeep off the hot path: expire reservations (every one due, or up to `expire`), drop
        drained counters (the next `sweep` ids of each store). True: more may be due (server.py does it in
        steps, a slice of the event loop at a time)."""
        now = self.clock()
        self.collector_upkeep(now)
        expired = self.book.expire(now, expire)
        if expired:
            self._apply(expired, now)
        self.counters.sweep(now, sweep)
        self.failures.sweep(now, sweep)
        return expire is not None and len(expired) >= expire

    def collector_upkeep(self, now: float | None = None) -> bool:
        """gcupkeep.settle, at most once per SETTLE_EVERY s (the collector task, `maintain`). True: froze."""
        now = self.clock() if now is None else now
        if now < self._settle_at:
            return False
        self._settle_at = now + SETTLE_EVERY
        return settle()

    def count(self, reason: Reason) -> None:
        self.decisions[reason] += 1

    # -- key reloads ------------------------------------------------------------------------------------
    def _read_keys(self) -> KeySnapshot:
        """Read and parse the key file against the policy in force (the key source's loader). Thread-safe
        and side-effect free: the server runs it off the event loop (a 100,000-key file takes seconds to
        parse) and installs the result on the loop. Raises ConfigError."""
        return read_key_snapshot(
            self.settings, pepper=self._pepper, credentials=self._credentials, now=self.clock()
        )

    def install_keys(self, result: KeySnapshot | ConfigError, stamp: Stamp) -> bool:
        """Put a loaded snapshot in force (one reference swap), or keep the last good one and log why.

        A broken, truncated or deleted file logs one error per change of the file (not one per poll),
        naming the file and the field. Returns True if a new snapshot is in force.
        """
        merged = None
        if not isinstance(result, ConfigError) and file_version(result.version) != file_version(
            self.snapshot.version
        ):
            try:
                merged = self._in_force(result)
            except ConfigError as exc:
                result = exc
        loaded = self.keys.install(result, stamp)
        if loaded is None:
            log.error(
                "key file rejected; the previous keys stay in force",
                extra={
                    "error": str(result),
                    "keys_version": self.snapshot.version,
                    "keys": len(self.snapshot),
                },
            )
            return False
        if merged is None:
            return False
        previous = self.snapshot
        self.snapshot = merged
        # The snapshot lives until the next reload: keep the cyclic GC from rescanning its objects.
        gc.freeze()
        log.info(
            "key file loaded",
            extra={"keys": len(loaded), "keys_version": loaded.version, "previous_version": previous.version},
        )
        return True

    def request_reload(self) -> None:
        """Make the next poll reload the config file and the key file even if they look unchanged
        (SIGHUP)."""
        self.keys.request_reload()
        if self.config is not None:
            self.config.request_reload()

    def reload_keys(self, *, force: bool = False) -> bool:
        """Load the key file if it changed (or always, with `force`), on the calling thread."""
        return self.keys.poll(self.install_keys, force=force)

    async def reload_off_loop(self) -> None:
        """One poll of the reloaded files from the event loop (the server's reload loop): nexus.yaml
        first (a new config reads the key file itself, against its policy), then the key file; each
        loads in a worker thread while the loop keeps answering with the versions in force."""
        try:
            if self.config is not None:
                await self.config.poll_off_loop(self.install_config)
        except Exception:  # a bug must not stop reloads forever
            config_log.exception("config reload failed")
        try:
            await self.keys.poll_off_loop(self.install_keys)
        except Exception:  # a bug must not stop reloads forever
            log.exception("key reload failed")

    def sources(self) -> tuple[tuple[str, str, SourceStatus], ...]:
        """The reloaded files' statuses, for readiness: (what, what stays in force on an error, status)."""
        out = [("key file", "snapshot", self.keys.status())]
        if self.config is not None:
            out.append(("config file", "config", self.config.status()))
        return tuple(out)

    def key_status(self) -> KeyStatus:
        snap = self.snapshot
        source = self.keys.status()
        return KeyStatus(
            loaded=snap is not EMPTY_SNAPSHOT,
            source=snap.source,
            version=snap.version,
            keys=len(snap),
            loaded_at=snap.loaded_at,
            last_error=source.last_error,
            last_error_at=source.last_error_at,
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

    def install_config(self, result: ConfigUpdate | ConfigError, stamp: Stamp) -> bool:
        """Put a reloaded config in force (a new Policy, credentials and key snapshot; the limit counters,
        reservations and stores stay, so a limit that did not change keeps its state), or keep the last
        good config and log why. Each changed field that needs a restart is logged by name, once per
        reload, and keeps its running value. Returns True if the new config is in force."""
        assert self.config is not None
        path = self.config.path
        merged = None
        if not isinstance(result, ConfigError):
            try:
                merged = self._in_force(result.snapshot, result.settings, result.credentials)
            except ConfigError as exc:
                result = exc
        update = self.config.install(result, stamp)
        if update is None or merged is None:
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
        self.policy = Policy(
            update.settings.policy, track=update.settings.accounting.enabled, unpriced_counts=self.unpriced
        )
        self._pepper = update.pepper
        self._credentials = update.credentials
        snapshot = update.snapshot
        self.keys = FileSource(
            resolve_path(update.settings, update.settings.keys_file),
            self._read_keys,
            stamp=update.key_stamp,
            clock=self.clock,
        )
        self.keys.install(snapshot, update.key_stamp)
        self.snapshot = merged
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
        return self.config is not None and self.config.poll(self.install_config, force=force)
