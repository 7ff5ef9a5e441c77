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
import gc
import heapq
import logging
import time
from collections.abc import Callable, Iterator, Mapping
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
PENDING = 4096  # new ids kept apart from the sorted ones before a merge (see RuntimeKeys._pending)
MEMO = 10_000  # profiles whose checked parts are kept (keys with their own limits each make one)
PAGE = 2000  # keys read and put in force per step of a catch-up (a first load of 1,000,000 is 500 steps)

# What a replica keeps per runtime key besides its snapshot entries: `keys[id]` is
# (version, profile, key_hash) or, during/after a rotation, (version, profile, key_hash, previous_hash,
# grace_until). The hashes are the very bytes objects the snapshot's map is keyed by, and `profile`
# (tenant, group, plan, models, paths, limits, credential, metadata, expires_at, disabled) is one tuple
# shared by every key that has the same, so an entry costs a tuple and an int (~140 B with its dict
# slot), not the stored record: the admin API reads records from the store (`page`).
Entry = tuple[Any, ...]


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
        self.keys: dict[str, Entry] = {}  # key id -> Entry (above)
        self.synced = 0  # the store version up to which changes have been read
        self.loaded = False
        self.conflicts: set[str] = set()  # runtime ids a key file also has (not in force here)
        self.changes: dict[str, int] = dict.fromkeys(OPS, 0)
        self._clock = clock
        self._poll_interval = poll_interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._owned: tuple[object, object] = (None, None)  # the snapshot maps changed in place
        self._sorted: list[str] | None = None  # the ids in order, for paging (None: not sorted yet)
        # ids created since `_sorted` was made, in order: an insort into a 1,000,000-id list moves 8 MB per
        # create; this small list is merged into it once per PENDING ids (amortized O(1) a create)
        self._pending: list[str] = []
        self._shared: dict[object, object] = {}
        self._memo: tuple[object, object, dict[Any, Any]] = (None, None, {})  # per policy, credentials
        self._file: KeySnapshot | None = None  # the key-file snapshot last merged with the runtime keys
        self._unplaced: set[str] = set()  # runtime keys the config in force could not take (logged)

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self, *, first_load_timeout: float = 5.0) -> None:
        """Open the store and load every key (waiting up to `first_load_timeout`; if the store does not
        answer, the loop keeps trying and readiness says the runtime keys are not loaded yet)."""
        await self.store.start()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.sync(), first_load_timeout)
        if not self.loaded:  # the loop carries on from the last page read, at once
            self._wake.set()
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

    async def sync(self, page: int = PAGE) -> int:
        """Read every change after the last version read and put it in force, `page` keys at a time (a
        first load of a million keys neither holds them all at once nor stops the event loop for the
        whole load: each page is one step, and `synced` marks the progress, so a cancelled load resumes
        where it stopped); returns how many were put in force."""
        count = 0
        while True:
            top, changed = await self.store.changed_since(self.synced, page)
            fresh = [k for k in changed if k.version > self._known_version(k.key_id)]
            if fresh:
                self._apply(fresh)
                if len(fresh) >= 1000:  # a load: keep the cyclic GC from rescanning the keys (as a reload)
                    gc.freeze()
            self.synced = max(self.synced, top)
            count += len(fresh)
            if len(changed) < page:  # the last page (the stores fill a page but for the last one)
                break
        self.loaded = True
        return count

    def _known_version(self, key_id: str) -> int:
        entry = self.keys.get(key_id)
        return entry[0] if entry is not None else 0

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

    def _entry(self, key: RuntimeKey) -> Entry:
        """What is kept of the key in memory (Entry, above)."""
        raw = (
            key.tenant,
            key.group,
            key.plan,
            key.models,
            key.paths,
            key.limits,
            key.credential,
            key.metadata,
            key.expires_at,
            key.disabled,
        )
        profile = self._shared.get(raw)
        if profile is None:  # a new profile: its parts shared with the other profiles' too
            profile = self._share(tuple(self._share(v) for v in raw))
            self._shared[raw] = profile
        if key.previous_hash is None:
            return (key.version, profile, key.key_hash)
        return (key.version, profile, key.key_hash, key.previous_hash, key.grace_until)

    @staticmethod
    def _key(key_id: str, entry: Entry) -> RuntimeKey:
        """The key back from its entry: everything its snapshot entries need (not its times)."""
        tenant, group, plan, models, paths, limits, credential, metadata, expires_at, disabled = entry[1]
        rotated = len(entry) > 3
        return RuntimeKey(
            key_id=key_id,
            key_hash=entry[2],
            tenant=tenant,
            group=group,
            plan=plan,
            models=models,
            paths=paths,
            limits=limits,
            expires_at=expires_at,
            disabled=disabled,
            metadata=metadata,
            credential=credential,
            previous_hash=entry[3] if rotated else None,
            grace_until=entry[4] if rotated else None,
            version=entry[0],
        )

    def _pairs(
        self,
        key: RuntimeKey,
        policy: PolicySet,
        credentials: Mapping[str, Credential],
        memo: dict[Any, Any] | None = None,
    ) -> rk.Pairs:
        if memo is None:
            m_policy, m_credentials, memo = self._memo
            if m_policy is not policy or m_credentials is not credentials or len(memo) > MEMO:
                memo = {}
                self._memo = (policy, credentials, memo)
        return rk.key_records(key, policy=policy, credentials=credentials, share=self._share, memo=memo)

    def merge(
        self, file_snapshot: KeySnapshot, policy: PolicySet, credentials: Mapping[str, Credential]
    ) -> KeySnapshot:
        """A new key-file (or config) snapshot with the runtime keys in force; ConfigError if an id is in
        both or the config cannot take a runtime key (a plan or credential it names is gone)."""
        previous_file = self._file
        if not self.keys:
            self._file = file_snapshot
            return file_snapshot
        current = self.engine.snapshot
        same_policy = policy is self.engine.settings.policy and credentials is self.engine.credentials
        if (  # a key-file reload: swap the file's entries in the maps in force, the runtime ones stay
            same_policy
            and not self._unplaced
            and previous_file is not None
            and current.by_digest is self._owned[0]
            and current.by_id is self._owned[1]
            and rk.file_version(current.version) == previous_file.version
        ):
            merged = rk.swap_file(
                current, previous_file, file_snapshot, self.keys, runtime_version=self.synced
            )
        else:
            merged = self._merge_all(file_snapshot, current, policy, credentials, same_policy=same_policy)
        self.conflicts.clear()
        # fresh maps, only this snapshot's: the next runtime change changes them in place
        self._owned = (merged.by_digest, merged.by_id)
        self._file = file_snapshot
        return merged

    def _merge_all(
        self,
        file_snapshot: KeySnapshot,
        current: KeySnapshot,
        policy: PolicySet,
        credentials: Mapping[str, Credential],
        *,
        same_policy: bool,
    ) -> KeySnapshot:
        """Every runtime key into `file_snapshot` (a new config: each one resolved again)."""
        memo: dict[Any, Any] = {}
        runtime: dict[str, rk.Pairs] = {}
        for key_id, entry in self.keys.items():
            record = current.by_digest.get(entry[2]) if same_policy else None
            if record is not None and record.key_id == key_id:  # unchanged: reuse the records in force
                pairs: rk.Pairs = tuple(
                    (d, current.by_digest[d]) for d in entry[2:4] if d in current.by_digest
                )
            else:
                pairs = self._pairs(self._key(key_id, entry), policy, credentials, memo)
            runtime[key_id] = pairs
        return rk.merge(file_snapshot, runtime, runtime_version=self.synced)

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
                self._unplaced.add(key.key_id)
            else:
                self._unplaced.discard(key.key_id)
            batch.append((key.key_id, old[2:4] if old is not None else (), pairs))
            if old is None and self._sorted is not None:  # a new id: into the order
                bisect.insort(self._pending, key.key_id)
            self.keys[key.key_id] = self._entry(key)
        if not batch:
            return
        version = max(self.synced, max(k.version for k in changed))
        # The maps are changed in place when they are ours (made by an earlier change here, never shared
        # with the key file's snapshot or another holder): O(changed keys), not O(keys). Safe because the
        # hot path reads them on this same event loop thread, never across an await.
        owned = snapshot.by_digest is self._owned[0] and snapshot.by_id is self._owned[1]
        if self._file is None and rk.file_version(snapshot.version) == snapshot.version:
            self._file = snapshot  # the key file's snapshot, before any runtime key joined it
        new = rk.apply_changes(snapshot, batch, runtime_version=version, in_place=owned)
        self._owned = (new.by_digest, new.by_id)
        revoked = engine.revoked
        if revoked and any(key_id in revoked for key_id, _, _ in batch):
            new = with_revoked(new, revoked)
        engine.snapshot = new

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

    async def page(
        self, tenant: str = "", after: str = "", size: int = 1000
    ) -> tuple[list[RuntimeKey], bool]:
        """Up to `size` keys (of `tenant`) by id after `after`, and whether more follow, read from the
        store (the records are not kept in memory). The ids are sorted once, then kept in order as keys
        are created."""
        if self._sorted is None:
            self._sorted, self._pending = sorted(self.keys), []
        elif len(self._pending) >= PENDING:
            self._sorted, self._pending = list(heapq.merge(self._sorted, self._pending)), []
        keys = self.keys
        chosen: list[str] = []
        more = False
        for key_id in heapq.merge(_after(self._sorted, after), _after(self._pending, after)):
            if tenant and keys[key_id][1][0] != tenant:
                continue
            if len(chosen) == size:
                more = True
                break
            chosen.append(key_id)
        return [k for k in await self.store.get_many(chosen) if k is not None], more


def _after(ids: list[str], after: str) -> Iterator[str]:
    """The ids of the sorted list `ids` after `after` (all with ""), without copying the list."""
    for i in range(bisect.bisect_right(ids, after) if after else 0, len(ids)):
        yield ids[i]
