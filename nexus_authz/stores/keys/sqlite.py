"""Runtime keys in one SQLite file (the embedded default; see stores/keys/__init__.py for why SQLite).

One table, `runtime_keys(id, version, data)`: `data` is the key's JSON (core.runtime_keys.encode:
hashes only, never a secret) and `version` the store version of its last change (the highest version
is the store's). Every call runs in one private worker thread (sqlite3's `check_same_thread` kept: a
mistake raises rather than races); writes are one transaction each (`BEGIN IMMEDIATE`), so a version
check and its write cannot interleave with another writer of the same file. The file is created at the
first write, not at start: a server that never creates a runtime key leaves nothing behind (and runs
from a read-only directory).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from nexus_authz.core.runtime_keys import RuntimeKey, decode, encode
from nexus_authz.stores.keys import StoreConflict

__all__ = ["SQLiteKeyStore"]

log = logging.getLogger("nexus_authz.keys")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runtime_keys (
    id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runtime_keys_version ON runtime_keys (version);
"""
_T = TypeVar("_T")


class SQLiteKeyStore:
    kind = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runtime-keys")

    async def _run(self, fn: object, *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)  # type: ignore[arg-type]

    def _open(self, create: bool) -> sqlite3.Connection | None:
        if self._db is None:
            if not create and not os.path.exists(self.path):
                return None
            db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    async def start(self) -> None:
        await self._run(self._open, False)

    async def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(shut)
        self._executor.shutdown(wait=True)

    def _changed_since(self, version: int, limit: int | None) -> tuple[int, list[RuntimeKey]]:
        db = self._open(False)
        if db is None:
            return version, []
        top = version
        keys: list[RuntimeKey] = []
        while True:  # a page is `limit` readable keys, or the last one (a skipped record is not a page end)
            want = -1 if limit is None else limit - len(keys)
            rows = db.execute(
                "SELECT version, data FROM runtime_keys WHERE version > ? ORDER BY version LIMIT ?",
                (top, want),
            ).fetchall()
            for v, data in rows:
                try:
                    keys.append(decode(data, v))
                except ValueError as exc:  # one bad record must not stop every other key
                    log.error("runtime key record unreadable; skipped", extra={"error": str(exc)})
            top = int(rows[-1][0]) if rows else top
            if want < 0 or len(rows) < want or len(keys) == limit:
                return top, keys

    async def changed_since(self, version: int, limit: int | None = None) -> tuple[int, list[RuntimeKey]]:
        """The keys changed after `version`, oldest change first: all, or the first `limit` (a page)."""
        return await self._run(self._changed_since, version, limit)

    def _get(self, key_id: str) -> RuntimeKey | None:
        db = self._open(False)
        if db is None:
            return None
        row = db.execute("SELECT version, data FROM runtime_keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else decode(row[1], row[0])

    async def get(self, key_id: str) -> RuntimeKey | None:
        return await self._run(self._get, key_id)

    def _get_many(self, key_ids: list[str]) -> list[RuntimeKey | None]:
        db = self._open(False)
        found: dict[str, RuntimeKey] = {}
        for start in range(0, len(key_ids) if db is not None else 0, 500):
            chunk = key_ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            assert db is not None
            for key_id, v, data in db.execute(
                f"SELECT id, version, data FROM runtime_keys WHERE id IN ({marks})", chunk
            ):
                found[key_id] = decode(data, v)
        return [found.get(key_id) for key_id in key_ids]

    async def get_many(self, key_ids: list[str]) -> list[RuntimeKey | None]:
        """The stored keys of `key_ids` (None where there is none)."""
        return await self._run(self._get_many, key_ids)

    def _put(self, key: RuntimeKey, expected: int | None) -> int:
        db = self._open(True)
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT version FROM runtime_keys WHERE id = ?", (key.key_id,)).fetchone()
            current = None if row is None else int(row[0])
            if current != expected:
                raise StoreConflict(
                    f"key {key.key_id!r} exists already"
                    if expected is None
                    else f"key {key.key_id!r} changed meanwhile (version {current}, expected {expected})"
                )
            (top,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM runtime_keys").fetchone()
            version = int(top) + 1
            db.execute(
                "INSERT INTO runtime_keys (id, version, data) VALUES (?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET version = excluded.version, data = excluded.data",
                (key.key_id, version, encode(key)),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return version

    async def put(self, key: RuntimeKey, *, expected: int | None) -> int:
        return await self._run(self._put, key, expected)

    def _put_many(self, keys: list[RuntimeKey]) -> int:
        """New keys in one transaction (benchmarks, imports); StoreConflict if any exists."""
        db = self._open(True)
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            (top,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM runtime_keys").fetchone()
            version = int(top)
            rows = []
            for key in keys:
                version += 1
                rows.append((key.key_id, version, encode(key)))
            db.executemany("INSERT INTO runtime_keys (id, version, data) VALUES (?, ?, ?)", rows)
            db.execute("COMMIT")
        except sqlite3.IntegrityError:
            db.execute("ROLLBACK")
            raise StoreConflict("a key of the batch exists already") from None
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return version

    async def put_many(self, keys: list[RuntimeKey]) -> int:
        return await self._run(self._put_many, keys)
