"""Where runtime keys live (issue 17): the `KeyStore` port and its two stores.

- `SQLiteKeyStore` (stores/keys/sqlite.py), the embedded default: one SQLite file beside the usage
  ledger (`keys.runtime_path`, default runtime-keys.sqlite3). Durable across restarts, already a
  dependency (the ledger), WAL so a reader never blocks the writer, and one process writes it.
- `RedisKeyStore` (stores/keys/redis.py), distributed mode: a Redis hash per key, a version counter, a
  sorted set of changed ids by version, and a pub/sub notification, so every replica sees a change
  within a second and a replica that missed messages catches up by version.

Every method is async and runs its I/O off the event loop (SQLite in a worker thread, Redis through
redis.asyncio). Versions are the store's: each change takes the next one, so "everything after version
N" is a question both stores answer.
"""

from __future__ import annotations

from typing import Protocol

from nexus_authz.core.runtime_keys import RuntimeKey

__all__ = ["KeyStore", "StoreConflict"]


class StoreConflict(Exception):
    """A write lost a race: the key exists already (create) or changed since it was read."""


class KeyStore(Protocol):
    kind: str  # "sqlite" or "redis": readiness and logs say which

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def changed_since(self, version: int, limit: int | None = None) -> tuple[int, list[RuntimeKey]]:
        """Every key changed after `version` (0: every key), oldest change first, or the first `limit`
        readable ones (a page: fewer only when no more follow; an unreadable record is logged and
        skipped), and the highest version among them (`version` when none changed): the mark to ask
        from next time."""
        ...

    async def get(self, key_id: str) -> RuntimeKey | None: ...

    async def get_many(self, key_ids: list[str]) -> list[RuntimeKey | None]:
        """The stored keys of `key_ids`, in that order (None where there is none): the admin API's list
        reads the records here, replicas do not keep them in memory."""
        ...

    async def put(self, key: RuntimeKey, *, expected: int | None) -> int:
        """Write `key` if the stored one is still at version `expected` (None: it must not exist yet);
        returns the key's new version. StoreConflict otherwise."""
        ...
