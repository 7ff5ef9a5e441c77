"""Keys managed at runtime (issue 17): the pure operations, the SQLite store, and the engine's snapshot."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from nexus_authz.core import runtime_keys as rk
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.model import Reason, Request
from nexus_authz.core.runtime_keys import KeyChanges, KeySpec, RuntimeKeyError
from nexus_authz.core.usage_records import Usage
from nexus_authz.engine import Engine
from nexus_authz.runtime_keys import RuntimeKeys
from nexus_authz.settings import load_settings
from nexus_authz.stores.keys.sqlite import SQLiteKeyStore
from nexus_authz.stores.ledger import MemoryLedger
from tests.helpers import KeySpec as FileKey
from tests.helpers import key_file, write_config

FILE_KEY = FileKey("filekey")
H1, H2 = b"\x01" * 32, b"\x02" * 32


# -- the pure operations ----------------------------------------------------------------------------------
def test_create_validates_with_clear_messages() -> None:
    with pytest.raises(RuntimeKeyError, match="key_id: 1-128"):
        rk.create(KeySpec(key_id="-bad"), key_hash=H1, now=0)
    with pytest.raises(RuntimeKeyError, match="paths: path patterns start with '/'"):
        rk.create(KeySpec(key_id="k", paths=("v1/*",)), key_hash=H1, now=0)
    with pytest.raises(RuntimeKeyError, match="limits: not JSON"):
        rk.create(KeySpec(key_id="k", limits="[{"), key_hash=H1, now=0)
    with pytest.raises(RuntimeKeyError, match=r"limits\[0\].per"):
        rk.create(KeySpec(key_id="k", limits='[{"requests": 5, "per": "fortnight"}]'), key_hash=H1, now=0)
    with pytest.raises(RuntimeKeyError, match="tenant"):
        rk.create(KeySpec(key_id="k", tenant="a\nb"), key_hash=H1, now=0)


def test_rotate_revoke_restore_and_the_stored_form() -> None:
    key = rk.create(KeySpec(key_id="k", limits='[{"per":"minute","requests":5}]'), key_hash=H1, now=10)
    assert key.limits == '[{"per":"minute","requests":5}]'
    rotated = rk.rotate(key, new_hash=H2, grace=60, now=100)
    assert (rotated.key_hash, rotated.previous_hash, rotated.grace_until) == (H2, H1, 160)
    assert rk.rotation_state(rotated, 159) == "grace" and rk.rotation_state(rotated, 160) == "expired"
    with pytest.raises(RuntimeKeyError, match="grace"):
        rk.rotate(key, new_hash=H2, grace=-1, now=100)
    revoked = rk.revoke(rotated, now=200)
    assert revoked.disabled and revoked.previous_hash is None  # revoking ends the grace period too
    assert rk.revoke(revoked, now=300) is revoked  # already so: nothing to write
    assert not rk.restore(revoked, now=400).disabled
    updated = rk.update(key, KeyChanges(models=("gpt-4o*",), plan="", clear_expiry=True), now=5)
    assert updated.models == ("gpt-4o*",) and updated.plan is None
    with pytest.raises(RuntimeKeyError, match="nothing to update"):
        rk.update(key, KeyChanges(), now=5)
    back = rk.decode(rk.encode(rotated), 7)
    assert back == rk.dataclasses.replace(rotated, version=7)
    assert "secret" not in rk.encode(rotated) and H1.hex() in rk.encode(rotated)


# -- against a real engine and the SQLite store --------------------------------------------------------------
@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def chat(secret: str) -> Request:
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
    return Request(
        "POST", "/v1/chat/completions", {"authorization": f"Bearer {secret}"}, body, request_id=secret[-8:]
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def start(tmp_path: Path, loop: asyncio.AbstractEventLoop, clock: Clock) -> tuple[Engine, RuntimeKeys]:
    config = tmp_path / "nexus.yaml"
    if not config.exists():
        write_config(tmp_path, FILE_KEY, extra="ledger:\n  backend: memory\n")
    engine = Engine.from_settings(load_settings(str(config)), clock=clock)
    runtime = RuntimeKeys(engine, SQLiteKeyStore(str(tmp_path / "runtime-keys.sqlite3")), clock=clock)
    engine.runtime = runtime
    loop.run_until_complete(runtime.store.start())
    loop.run_until_complete(runtime.sync())
    return engine, runtime


def test_create_rotate_revoke_restore_in_force(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    clock = Clock()
    engine, runtime = start(tmp_path, loop, clock)
    run = loop.run_until_complete
    assert not (tmp_path / "runtime-keys.sqlite3").exists()  # nothing written yet, nothing created
    key, secret = run(
        runtime.create(KeySpec(key_id="rt1", tenant="acme", limits='[{"requests": 3, "per": "minute"}]'))
    )
    assert secret.startswith("nx-") and key.version == 1
    ok = engine.check(chat(secret))
    assert ok.allowed and ok.key is not None and ok.key.key_id == "rt1"
    assert dict(ok.upstream_headers)["x-nexus-tenant"] == "acme"
    assert runtime.changes["create"] == 1

    _, new_secret = run(runtime.rotate("rt1", grace=30))
    # both secrets are the one key: they share its limit (3 a minute: 1 used above)
    assert engine.check(chat(secret)).allowed and engine.check(chat(new_secret)).allowed
    third = engine.check(chat(secret))
    assert not third.allowed and third.reason == Reason.RATE_LIMITED
    clock.now += 61  # past the grace period (and the minute)
    old = engine.check(chat(secret))
    assert old.status == 401 and old.reason == Reason.EXPIRED_KEY and b"expired_api_key" in old.body
    assert engine.check(chat(new_secret)).allowed

    run(runtime.update("rt1", KeyChanges(models=("claude-*",))))
    assert engine.check(chat(new_secret)).reason == Reason.MODEL_NOT_ALLOWED
    run(runtime.update("rt1", KeyChanges(models=())))
    run(runtime.revoke("rt1"))
    assert engine.check(chat(new_secret)).reason == Reason.DISABLED_KEY
    run(runtime.restore("rt1"))
    assert engine.check(chat(new_secret)).allowed
    assert runtime.changes == {"create": 1, "rotate": 1, "update": 2, "revoke": 1, "restore": 1}

    # file keys are read-only to the API, and their ids cannot be taken
    with pytest.raises(RuntimeKeyError, match="in the key file"):
        run(runtime.create(KeySpec(key_id="filekey")))
    with pytest.raises(RuntimeKeyError, match="read-only"):
        run(runtime.revoke("filekey"))
    with pytest.raises(RuntimeKeyError, match="no runtime key") as missing:
        run(runtime.revoke("nope"))
    assert missing.value.kind == "not_found"
    with pytest.raises(RuntimeKeyError, match="exists already"):
        run(runtime.create(KeySpec(key_id="rt1")))
    with pytest.raises(RuntimeKeyError, match="no plan named 'gold'"):
        run(runtime.create(KeySpec(key_id="rt2", plan="gold")))
    run(runtime.store.close())

    # a restart loads them from the file (the embedded store is durable)
    engine2, runtime2 = start(tmp_path, loop, clock)
    assert set(runtime2.keys) == {"rt1"}
    assert engine2.check(chat(new_secret)).allowed
    assert engine2.check(chat(secret)).reason == Reason.UNKNOWN_KEY  # the revocation ended its grace
    assert engine2.check(chat(FILE_KEY.secret)).allowed
    run(runtime2.store.close())


def test_a_change_updates_the_snapshot_without_rebuilding_it(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    engine, runtime = start(tmp_path, loop, Clock())
    before = engine.snapshot
    loop.run_until_complete(runtime.create(KeySpec(key_id="rt1")))
    after = engine.snapshot
    assert after is not before and len(after) == len(before) + 1  # a new snapshot, swapped
    file_record = before.by_id["filekey"]
    assert after.by_id["filekey"] is file_record  # the other entries are shared, not rebuilt
    assert before.by_id.keys() == {"filekey"}  # the key file's snapshot was not changed: its maps copied
    # from then on the maps are this replica's own: a change is applied where they are, O(changed keys)
    _, secret = loop.run_until_complete(runtime.create(KeySpec(key_id="rt2")))
    third = engine.snapshot
    assert third is not after and third.by_digest is after.by_digest and third.by_id is after.by_id
    assert third.version != after.version and len(third) == 3
    assert engine.check(chat(secret)).allowed
    # a key-file reload puts the file's entries into new maps, this replica's own from the start: the
    # next change is applied where they are; the key file's own snapshot is never changed
    (tmp_path / "keys.yaml").write_text(key_file(FILE_KEY, FileKey("other")))
    assert engine.reload_keys(force=True)
    reloaded = engine.snapshot
    file_snapshot = runtime._file
    assert file_snapshot is not None and file_snapshot.by_id.keys() == {"filekey", "other"}
    assert len(reloaded) == 4 and reloaded.by_id is not file_snapshot.by_id
    assert engine.check(chat(secret)).allowed
    loop.run_until_complete(runtime.revoke("rt2"))
    assert engine.snapshot.by_digest is reloaded.by_digest
    assert file_snapshot.by_id.keys() == {"filekey", "other"} and len(file_snapshot.by_digest) == 2
    assert engine.check(chat(secret)).reason == Reason.DISABLED_KEY
    loop.run_until_complete(runtime.store.close())


def test_file_and_runtime_ids_conflict_clearly(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    engine, runtime = start(tmp_path, loop, Clock())
    _, secret = loop.run_until_complete(runtime.create(KeySpec(key_id="rt1")))
    # the key file gains the runtime key's id: that file is rejected, the snapshot in force stays
    (tmp_path / "keys.yaml").write_text(key_file(FILE_KEY, FileKey("rt1")))
    assert not engine.reload_keys(force=True)
    status = engine.key_status()
    assert status.last_error is not None
    assert "'rt1' is both in the key file and a runtime key" in status.last_error
    assert engine.check(chat(secret)).allowed
    # fixed: the file loads again, the runtime key stays
    (tmp_path / "keys.yaml").write_text(key_file(FILE_KEY, FileKey("other")))
    assert engine.reload_keys(force=True)
    assert engine.key_status().last_error is None and engine.check(chat(secret)).allowed
    assert engine.check(chat(FileKey("other").secret)).allowed
    loop.run_until_complete(runtime.store.close())


def test_a_config_that_drops_a_runtime_keys_plan_is_rejected(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    plans = "plans:\n  gold:\n    limits:\n      - {requests: 100, per: minute}\n"
    write_config(tmp_path, FILE_KEY, extra="ledger:\n  backend: memory\n" + plans)
    engine, runtime = start(tmp_path, loop, Clock())
    _, secret = loop.run_until_complete(runtime.create(KeySpec(key_id="rt1", plan="gold")))
    text = (tmp_path / "nexus.yaml").read_text()
    (tmp_path / "nexus.yaml").write_text(text.replace(plans, ""))
    assert not engine.reload_config(force=True)
    error = engine.sources()[1][2].last_error
    assert error is not None and "no plan named 'gold'" in error and "rt1" in error
    assert engine.check(chat(secret)).allowed
    loop.run_until_complete(runtime.store.close())


def test_in_flight_reservations_settle_on_the_key_after_revoke_or_rotate(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    """A request admitted before a revocation or rotation keeps its reservation: its usage settles on
    the same counters and is recorded under the same key id."""
    clock = Clock()
    engine, runtime = start(tmp_path, loop, clock)
    limits = '[{"tokens": 10000, "per": "hour"}]'
    _, secret = loop.run_until_complete(runtime.create(KeySpec(key_id="rt1", limits=limits)))
    first = engine.check(chat(secret))
    assert first.allowed and len(engine.book) == 1
    loop.run_until_complete(runtime.rotate("rt1", grace=0))
    loop.run_until_complete(runtime.revoke("rt1"))
    assert engine.check(chat(secret)).status == 401
    engine.account(chat(secret).request_id, Usage(prompt_tokens=7, completion_tokens=5, source="provider"))
    assert len(engine.book) == 0  # settled although the key is revoked
    assert isinstance(engine.ledger, MemoryLedger)
    rows = engine.ledger.query(group_by=("key_id",))
    assert [(r.key_id, r.prompt_tokens, r.completion_tokens) for r in rows] == [("rt1", 7, 5)]
    loop.run_until_complete(runtime.store.close())


def test_merge_refuses_an_id_in_both() -> None:
    from nexus_authz.core.keys import EMPTY_SNAPSHOT

    snap = rk.dataclasses.replace(EMPTY_SNAPSHOT, by_id={"a": object()}, source="keys.yaml")  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="'a' is both in the key file and a runtime key"):
        rk.merge(snap, {"a": ()}, runtime_version=1)


def test_listing_pages_by_id(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> None:
    _, runtime = start(tmp_path, loop, Clock())
    for i in (3, 1, 2, 5, 4):
        loop.run_until_complete(runtime.create(KeySpec(key_id=f"k{i}", tenant="odd" if i % 2 else "even")))
    first, more = loop.run_until_complete(runtime.page(size=2))
    assert [k.key_id for k in first] == ["k1", "k2"] and more
    rest, more = loop.run_until_complete(runtime.page(after="k2", size=10))
    assert [k.key_id for k in rest] == ["k3", "k4", "k5"] and not more
    odd, more = loop.run_until_complete(runtime.page(tenant="odd", after="k1", size=1))
    assert [k.key_id for k in odd] == ["k3"] and more
    loop.run_until_complete(runtime.create(KeySpec(key_id="k0")))
    first, _ = loop.run_until_complete(runtime.page(size=1))
    assert first[0].key_id == "k0"  # a new key is in the order at once
    loop.run_until_complete(runtime.store.close())


# -- at scale: what a replica keeps per key, paged loads (issue 17, 1,000,000 keys) --------------------------
def test_a_replica_keeps_an_entry_per_key_and_lists_from_the_store(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    clock = Clock()
    engine, runtime = start(tmp_path, loop, clock)
    run = loop.run_until_complete
    run(runtime.create(KeySpec(key_id="a", tenant="acme", models=("gpt-4o*",))))
    clock.now += 5
    run(runtime.create(KeySpec(key_id="b", tenant="acme", models=("gpt-4o*",))))
    a, b = runtime.keys["a"], runtime.keys["b"]
    # not the stored record: its version, the profile both keys share, and the very hash object the
    # snapshot's map is keyed by
    assert type(a) is tuple and len(a) == 3 and a[1] is b[1]
    assert next(d for d, r in engine.snapshot.by_digest.items() if r.key_id == "a") is a[2]
    # the list reads the records from the store: their times and versions are the stored ones
    listed, more = run(runtime.page())
    assert [(k.key_id, k.created_at, k.version) for k in listed] == [("a", 1e6, 1), ("b", 1e6 + 5, 2)]
    assert not more and listed[0].models == ("gpt-4o*",)
    run(runtime.store.close())


def test_a_config_reload_rebuilds_runtime_keys_from_their_entries(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    """A new config re-resolves every runtime key from what the replica keeps of it (no stored record in
    memory): plan, metadata, expiry and a rotation's previous secret all survive."""
    clock = Clock()
    plans = "plans:\n  gold:\n    limits:\n      - {requests: 100, per: minute}\n"
    write_config(tmp_path, FILE_KEY, extra="ledger:\n  backend: memory\n" + plans)
    engine, runtime = start(tmp_path, loop, clock)
    run = loop.run_until_complete
    spec = KeySpec(key_id="rt1", plan="gold", metadata=(("team", "x"),), expires_at=clock.now + 3600)
    _, old = run(runtime.create(spec))
    _, new = run(runtime.rotate("rt1", grace=30))
    text = (tmp_path / "nexus.yaml").read_text()
    (tmp_path / "nexus.yaml").write_text(text.replace("requests: 100", "requests: 1"))
    assert engine.reload_config(force=True)
    record = engine.snapshot.by_id["rt1"]
    assert [s.limit for s in record.limits] == [1] and record.plan == "gold"
    assert dict(record.metadata) == {"team": "x"} and record.expires_at == clock.now + 3600
    assert engine.check(chat(old)).allowed  # the previous secret, still in its grace period
    assert engine.check(chat(new)).reason == Reason.RATE_LIMITED  # one key: one window of 1 a minute
    clock.now += 31
    assert engine.check(chat(old)).reason == Reason.EXPIRED_KEY
    run(runtime.store.close())


def test_a_load_reads_pages_and_resumes_where_it_stopped(
    tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    import sqlite3

    run = loop.run_until_complete
    _, runtime = start(tmp_path, loop, Clock())
    secrets = [run(runtime.create(KeySpec(key_id=f"k{i}")))[1] for i in range(5)]
    run(runtime.store.close())

    engine = Engine.from_settings(load_settings(str(tmp_path / "nexus.yaml")))
    store = SQLiteKeyStore(str(tmp_path / "runtime-keys.sqlite3"))
    calls: list[tuple[int, int | None]] = []
    real = store.changed_since

    async def changed_since(version: int, limit: int | None = None) -> tuple[int, list[rk.RuntimeKey]]:
        calls.append((version, limit))
        if len(calls) == 2:
            raise sqlite3.OperationalError("disk I/O error")
        return await real(version, limit)

    store.changed_since = changed_since  # type: ignore[method-assign]
    second = RuntimeKeys(engine, store)
    engine.runtime = second
    run(store.start())
    with pytest.raises(sqlite3.OperationalError):
        run(second.sync(page=2))
    # the first page is in force and marked; the load is not done (readiness says loading)
    assert set(second.keys) == {"k0", "k1"} and second.synced == 2 and not second.loaded
    assert second.state()[0] == "loading"
    assert run(second.sync(page=2)) == 3 and second.loaded
    assert calls[2:] == [(2, 2), (4, 2)]  # resumed at the version read, page by page
    assert all(engine.check(chat(s)).allowed for s in secrets)
    run(store.close())


def test_a_key_file_reload_swaps_the_file_keys_without_re_merging_the_runtime_keys(
    tmp_path: Path, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beside 1,000,000 runtime keys a key-file reload must not walk them all on the event loop: the
    file's entries are swapped in the maps in force (O(file keys)); the runtime records stay as they are."""
    engine, runtime = start(tmp_path, loop, Clock())
    run = loop.run_until_complete
    _, secret = run(runtime.create(KeySpec(key_id="rt1")))
    record = engine.snapshot.by_id["rt1"]

    def no_full_merge(*args: object, **kwargs: object) -> None:
        raise AssertionError("every runtime key merged again")

    monkeypatch.setattr(rk, "merge", no_full_merge)
    other = FileKey("otherkey")
    (tmp_path / "keys.yaml").write_text(key_file(other))  # filekey dropped, otherkey added
    assert engine.reload_keys(force=True)
    snap = engine.snapshot
    assert engine.check(chat(other.secret)).allowed and engine.check(chat(secret)).allowed
    assert engine.check(chat(FILE_KEY.secret)).reason == Reason.UNKNOWN_KEY
    assert snap.by_id["rt1"] is record and set(snap.by_id) == {"otherkey", "rt1"} and len(snap) == 2
    # a key file that takes a runtime key's id is refused, the keys in force stay
    (tmp_path / "keys.yaml").write_text(key_file(other, FileKey("rt1")))
    assert not engine.reload_keys(force=True)
    assert engine.snapshot is snap and "rt1" in str(engine.sources()[0][2].last_error)
    # the next runtime change goes into the reloaded snapshot's maps where they are
    _, secret2 = run(runtime.create(KeySpec(key_id="rt2")))
    assert engine.snapshot.by_digest is snap.by_digest and engine.check(chat(secret2)).allowed
    assert engine.check(chat(other.secret)).allowed
    # and the next good key file (after the refused one) swaps against the file in force
    third = FileKey("thirdkey")
    (tmp_path / "keys.yaml").write_text(key_file(third))
    assert engine.reload_keys(force=True)
    assert set(engine.snapshot.by_id) == {"thirdkey", "rt1", "rt2"} and len(engine.snapshot) == 3
    assert engine.check(chat(other.secret)).reason == Reason.UNKNOWN_KEY
    assert all(engine.check(chat(s)).allowed for s in (third.secret, secret, secret2))
    run(runtime.store.close())


def test_ids_created_after_a_listing_join_its_order_without_a_resort(
    tmp_path: Path, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nexus_authz.runtime_keys as runtime_mod

    monkeypatch.setattr(runtime_mod, "PENDING", 2)
    _, runtime = start(tmp_path, loop, Clock())
    run = loop.run_until_complete
    for i in (10, 30):
        run(runtime.create(KeySpec(key_id=f"k{i}")))
    assert [k.key_id for k in run(runtime.page())[0]] == ["k10", "k30"]
    ids = ["k10", "k30"]
    for i in (20, 40, 5, 25):  # kept apart, merged in once two are pending
        run(runtime.create(KeySpec(key_id=f"k{i}")))
        ids.append(f"k{i}")
        listed, more = run(runtime.page(size=100))
        assert [k.key_id for k in listed] == sorted(ids) and not more
        assert len(runtime._pending) < 2  # merged into the sorted ids once 2 were pending
    page, more = run(runtime.page(after="k20", size=2))
    assert [k.key_id for k in page] == ["k25", "k30"] and more
    run(runtime.store.close())
