"""Runtime keys in force: the store, the keys loaded from it, and their place in the engine's snapshot.

`RuntimeKeys` is the glue between a `KeyStore` (stores/keys) and the `Engine` (issue 17):
- at start it loads every key of the store (`changed_since(0)`) and merges them into the snapshot;
- the admin operations (the policy API's KeyAdminService) validate with core/runtime_keys.py, write the
  store (an optimistic version check: two admins cannot overwrite each other's change unseen), and
  put the change in force here at once;
- other replicas' changes arrive as a notification (Redis pub/sub) or at the periodic catch-up; either
  way it reads what changed after the last version it read, so nothing is missed;
- the engine asks `merge` for every new key-file or config snapshot (an id in both is a config error).

Everything runs on the event loop except the store's I/O, which the stores run off it. A change is put
in force with `core.runtime_keys.apply_changes`: only the changed entries are built; the first change
after a key-file or config snapshot copies its maps (the file's snapshot is never changed), later ones
change those copies where they are (O(changed keys), not O(keys)); then one reference swap to a new
KeySnapshot object. Each change is one log line and one count
(`nexus_authz_key_changes_total{op}`), never a secret or a hash.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from nexus_authz.core import keys as keys_mod
from nexus_authz.core import runtime_keys as rk
from nexus_authz.core.config import PolicySet
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.keys import EMPTY_SNAPSHOT, KeySnapshot, with_revoked
from nexus_authz.core.model import Credential
from nexus_authz.core.runtime_keys import KeyChanges, KeySpec, RuntimeKey, RuntimeKeyError
from nexus_authz.stores.keys import KeyStore, StoreConflict

if TYPE_CHECKING:
    from nexus_authz.engine import Engine

__all__ = ["OPS", "RuntimeKeys"]

log = logging.getLogger("nexus_authz.keys")

OPS = ("create", "rotate", "update", "revoke", "restore")


class RuntimeKeys:
    def __init__(
        self,
        engine: Engine,
        store: KeyStore,
        *,
        poll_interval: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.store = store
        self.keys: dict[str, RuntimeKey] = {}
        self.synced = 0  # the store version up to which changes have been read
        self.loaded = False
        self.conflicts: set[str] = set()  # runtime ids a key file also has (not in force here)
        self.changes: dict[str, int] = dict.fromkeys(OPS, 0)
        self.applied_at: dict[str, float] = {}  # key id -> when its last change was put in force here
        self._clock = clock
        self._poll_interval = poll_interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._owned: tuple[object, object] = (None, None)  # the snapshot maps changed in place
        self._sorted: list[str] | None = None  # the ids in order, for paging (None: to sort again)
        self._shared: dict[object, object] = {}

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self, *, first_load_timeout: float = 5.0) -> None:
        """Open the store and load every key (waiting up to `first_load_timeout`; if the store does not
        answer, the loop keeps trying and readiness says the runtime keys are not loaded yet)."""
        await self.store.start()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.sync(), first_load_timeout)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="runtime-keys")

    async def close(self) -> None:
        # The flag too, not only the cancellation: 3.11's wait_for can swallow a cancellation that
        # arrives as the event it waits for is set, and the loop would then run on.
        self._closing = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.store.close()

    def notify(self) -> None:
        """Something changed in the store (a notification, a reconnect): catch up soon."""
        self._wake.set()

    async def _loop(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_interval)
            self._wake.clear()
            if self._closing:
                return
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is down: keep the keys in force, retry
                log.debug("runtime keys catch-up failed", extra={"error": str(exc)[:300]})
                await asyncio.sleep(min(1.0, self._poll_interval))
                self._wake.set()

    async def sync(self) -> int:
        """Read every change after the last version read and put it in force; returns how many."""
        top, changed = await self.store.changed_since(self.synced)
        fresh = [k for k in changed if k.version > self._known_version(k.key_id)]
        if fresh:
            self._apply(fresh)
        self.synced = max(self.synced, top)
        self.loaded = True
        return len(fresh)

    def _known_version(self, key_id: str) -> int:
        key = self.keys.get(key_id)
        return key.version if key is not None else 0

    # -- readiness ---------------------------------------------------------------------------------------
    def state(self) -> tuple[str, str]:
        """("ok" | "loading" | "degraded", detail) for readiness."""
        if not self.loaded:
            return "loading", f"runtime keys not loaded yet (the {self.store.kind} key store does not answer)"
        connected = getattr(self.store, "connected", None)
        if connected is not None and not connected.is_set():
            return "degraded", (
                f"degraded: runtime key store ({self.store.kind}) unreachable, serving the last runtime keys "
                f"loaded ({len(self.keys)} keys, version {self.synced})"
            )
        if self.conflicts:
            return "degraded", f"degraded: {len(self.conflicts)} runtime key id(s) also in the key file"
        return "ok", "ok"

    # -- the snapshot ------------------------------------------------------------------------------------
    def _share(self, value: Any) -> Any:
        if len(self._shared) > 100_000:
            self._shared.clear()
        return self._shared.setdefault(value, value)

    def _compact(self, key: RuntimeKey) -> RuntimeKey:
        """The key as kept in memory, its repeated values (tenant, plan, lists, limits) shared."""
        share = self._share
        return dataclasses.replace(
            key,
            tenant=share(key.tenant),
            group=share(key.group),
            plan=share(key.plan),
            models=share(key.models),
            paths=share(key.paths),
            limits=share(key.limits),
            metadata=share(key.metadata),
            credential=share(key.credential),
        )

    def _pairs(self, key: RuntimeKey, policy: PolicySet, credentials: Mapping[str, Credential]) -> rk.Pairs:
        return rk.key_records(key, policy=policy, credentials=credentials, share=self._share)

    def merge(
        self, file_snapshot: KeySnapshot, policy: PolicySet, credentials: Mapping[str, Credential]
    ) -> KeySnapshot:
        """A new key-file (or config) snapshot with the runtime keys in force; ConfigError if an id is in
        both or the config cannot take a runtime key (a plan or credential it names is gone)."""
        if not self.keys:
            return file_snapshot
        current = self.engine.snapshot
        same_policy = policy is self.engine.settings.policy and credentials is self.engine.credentials
        runtime: dict[str, rk.Pairs] = {}
        for key_id, key in self.keys.items():
            record = current.by_digest.get(key.key_hash) if same_policy else None
            if record is not None and record.key_id == key_id:  # unchanged: reuse the records in force
                pairs: rk.Pairs = tuple(
                    (d, current.by_digest[d]) for d in rk.digests(key) if d in current.by_digest
                )
            else:
                pairs = self._pairs(key, policy, credentials)
            runtime[key_id] = pairs
        merged = rk.merge(file_snapshot, runtime, runtime_version=self.synced)
        self.conflicts.clear()
        return merged

    def _apply(self, changed: list[RuntimeKey]) -> None:
        engine = self.engine
        snapshot = engine.snapshot
        policy, credentials = engine.settings.policy, engine.credentials
        batch: list[tuple[str, tuple[bytes, ...], rk.Pairs | None]] = []
        for key in changed:
            old = self.keys.get(key.key_id)
            if old is None and key.key_id in snapshot.by_id:
                if key.key_id not in self.conflicts:
                    self.conflicts.add(key.key_id)
                    log.error(
                        "runtime key not put in force: its id is in the key file",
                        extra={"key_id": key.key_id},
                    )
                continue
            try:
                pairs: rk.Pairs | None = self._pairs(key, policy, credentials)
            except ConfigError as exc:
                log.error("runtime key not put in force", extra={"key_id": key.key_id, "error": str(exc)})
                pairs = None
            batch.append((key.key_id, rk.digests(old) if old is not None else (), pairs))
            if key.key_id not in self.keys:
                self._sorted = None
            self.keys[key.key_id] = self._compact(key)
        if not batch:
            return
        version = max(self.synced, max(k.version for k in changed))
        # The maps are changed in place when they are ours (made by an earlier change here, never shared
        # with the key file's snapshot or another holder): O(changed keys), not O(keys). Safe because the
        # hot path reads them on this same event loop thread, never across an await.
        owned = snapshot.by_digest is self._owned[0] and snapshot.by_id is self._owned[1]
        new = rk.apply_changes(snapshot, batch, runtime_version=version, in_place=owned)
        self._owned = (new.by_digest, new.by_id)
        revoked = engine.revoked
        if revoked and any(key_id in revoked for key_id, _, _ in batch):
            new = with_revoked(new, revoked)
        engine.snapshot = new
        now = self._clock()
        for key_id, _, _ in batch:
            self.applied_at[key_id] = now

    # -- the admin operations ------------------------------------------------------------------------------
    def _check(self, key: RuntimeKey) -> None:
        rk.check_against(key, self.engine.settings.policy, self.engine.credentials)

    def _new_secret(self) -> tuple[str, bytes]:
        pepper = self.engine.snapshot.pepper
        if self.engine.snapshot is EMPTY_SNAPSHOT:
            raise RuntimeKeyError("no key snapshot loaded yet", "conflict")
        secret = keys_mod.generate_secret()
        return secret, keys_mod.digest(pepper, secret)

    def _done(self, op: str, key: RuntimeKey, **extra: object) -> RuntimeKey:
        self.changes[op] += 1
        log.info(
            f"runtime key {op}",
            extra={"op": op, "key_id": key.key_id, "tenant": key.tenant, "version": key.version, **extra},
        )
        return key

    async def create(self, spec: KeySpec) -> tuple[RuntimeKey, str]:
        """A new key and its secret (returned here once; only its keyed hash is stored)."""
        if spec.key_id in self.engine.snapshot.by_id and spec.key_id not in self.keys:
            raise RuntimeKeyError(
                f"key id {spec.key_id!r} is in the key file: file keys are read-only to the API", "exists"
            )
        secret, digest = self._new_secret()
        key = rk.create(spec, key_hash=digest, now=self._clock())
        self._check(key)
        try:
            version = await self.store.put(key, expected=None)
        except StoreConflict as exc:
            raise RuntimeKeyError(str(exc), "exists") from None
        key = dataclasses.replace(key, version=version)
        self._apply([key])
        return self._done("create", key), secret

    async def _modify(self, op: str, key_id: str, change: Callable[[RuntimeKey], RuntimeKey]) -> RuntimeKey:
        current = await self.store.get(key_id)
        if current is None:
            if key_id in self.engine.snapshot.by_id:
                raise RuntimeKeyError(
                    f"key {key_id!r} is in the key file: file keys are read-only to the API (edit the file)",
                    "conflict",
                )
            raise RuntimeKeyError(f"no runtime key with id {key_id!r}", "not_found")
        new = change(current)
        if new is current:  # already so (revoke of a revoked key...): nothing to write
            return current
        self._check(new)
        try:
            version = await self.store.put(new, expected=current.version)
        except StoreConflict as exc:
            raise RuntimeKeyError(f"{exc}; read it again and retry", "conflict") from None
        new = dataclasses.replace(new, version=version)
        self._apply([new])
        return new

    async def rotate(self, key_id: str, *, grace: float) -> tuple[RuntimeKey, str]:
        secret, digest = self._new_secret()
        now = self._clock()
        key = await self._modify(
            "rotate", key_id, lambda k: rk.rotate(k, new_hash=digest, grace=grace, now=now)
        )
        return self._done("rotate", key, grace_seconds=grace), secret

    async def update(self, key_id: str, changes: KeyChanges) -> RuntimeKey:
        now = self._clock()
        key = await self._modify("update", key_id, lambda k: rk.update(k, changes, now=now))
        return self._done("update", key)

    async def revoke(self, key_id: str) -> RuntimeKey:
        now = self._clock()
        return self._done("revoke", await self._modify("revoke", key_id, lambda k: rk.revoke(k, now=now)))

    async def restore(self, key_id: str) -> RuntimeKey:
        now = self._clock()
        return self._done("restore", await self._modify("restore", key_id, lambda k: rk.restore(k, now=now)))

    def page(self, tenant: str = "", after: str = "", size: int = 1000) -> tuple[list[RuntimeKey], bool]:
        """Up to `size` keys (of `tenant`) by id after `after`, and whether more follow. The ids are
        sorted once per change of the keys, not per page."""
        if self._sorted is None:
            self._sorted = sorted(self.keys)
        ids = self._sorted
        out: list[RuntimeKey] = []
        for i in range(bisect.bisect_right(ids, after) if after else 0, len(ids)):
            key = self.keys[ids[i]]
            if tenant and key.tenant != tenant:
                continue
            if len(out) == size:
                return out, True
            out.append(key)
        return out, False
