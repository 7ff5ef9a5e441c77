"""Runtime keys take part in the budget hierarchy exactly as file keys do (issues 16 and 17): a runtime
key of a tenant is charged the tenant's windows (the same counters as the file keys of that tenant),
and its group's; its `group` is checked against the config's tenants; a config reload re-resolves them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from nexus_authz.core import runtime_keys as rk
from nexus_authz.core.config import parse_policy
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.hierarchy import group_counter_id, tenant_counter_id
from nexus_authz.core.model import Decision, KeyRecord, Reason, Request
from nexus_authz.core.runtime_keys import KeyChanges, KeySpec, RuntimeKeyError
from nexus_authz.core.yamlsrc import Fields, load_yaml
from nexus_authz.engine import Engine
from nexus_authz.runtime_keys import RuntimeKeys
from nexus_authz.settings import load_settings
from nexus_authz.stores.keys.sqlite import SQLiteKeyStore
from tests.helpers import KeySpec as FileKey
from tests.helpers import write_config

TENANTS = """
tenants:
  acme:
    limits:
      - {requests: 4, per: minute}
    groups:
      research:
        limits:
          - {requests: 2, per: minute}
      ops: {}
"""
FILE_ACME = FileKey("file-acme", extra={"tenant": "acme"})
FILE_RESEARCH = FileKey("file-research", extra={"tenant": "acme", "group": "research"})
FILE_OTHER = FileKey("file-other", extra={"tenant": "initech"})


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


class World:
    def __init__(self, tmp: Path, loop: asyncio.AbstractEventLoop, tenants: str = TENANTS) -> None:
        self.tmp, self.loop, self.n, self.closed = tmp, loop, 0, False
        self.config = write_config(
            tmp, FILE_ACME, FILE_RESEARCH, FILE_OTHER, extra="ledger:\n  backend: memory\n" + tenants
        )
        self.engine = Engine.from_settings(load_settings(str(self.config)), clock=lambda: 1_000_000.0)
        self.runtime = RuntimeKeys(self.engine, SQLiteKeyStore(str(tmp / "rt.sqlite3")))
        self.engine.runtime = self.runtime
        loop.run_until_complete(self.runtime.store.start())
        loop.run_until_complete(self.runtime.sync())

    def create(self, **spec: object) -> str:
        _, secret = self.loop.run_until_complete(self.runtime.create(KeySpec(**spec)))  # type: ignore[arg-type]
        return secret

    def check(self, secret: str) -> Decision:
        self.n += 1
        body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()
        headers = {"authorization": f"Bearer {secret}"}
        return self.engine.check(
            Request("POST", "/v1/chat/completions", headers, body, request_id=f"r{self.n}")
        )

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.run_until_complete(self.runtime.store.close())


@pytest.fixture
def world(tmp_path: Path, loop: asyncio.AbstractEventLoop) -> Iterator[World]:
    w = World(tmp_path, loop)
    yield w
    w.close()


def refused_by(decision: Decision) -> str:
    assert decision.status == 429 and decision.reason is Reason.RATE_LIMITED, decision
    return str(json.loads(decision.body)["error"]["message"])


def test_a_runtime_key_gets_its_groups_and_tenants_windows_with_the_shared_counter_ids(world: World) -> None:
    world.create(key_id="rt1", tenant="acme", group="research", limits='[{"requests": 9, "per": "hour"}]')
    record = world.engine.snapshot.by_id["rt1"]
    assert [(s.level, s.name) for s in record.limits] == [
        ("key", "requests/hour"),
        ("group", "requests/minute"),
        ("tenant", "requests/minute"),
    ]
    assert record.counter_ids == (
        "rt1\x00requests/hour",
        group_counter_id("acme", "research", "requests/minute"),
        tenant_counter_id("acme", "requests/minute"),
    )
    # the very windows and ids a file key of that tenant and group has
    file_record = world.engine.snapshot.by_id["file-research"]
    assert record.limits[1:] == file_record.limits and record.counter_ids[1:] == file_record.counter_ids


def test_runtime_keys_of_one_profile_make_their_headers_and_counter_ids_when_first_read(world: World) -> None:
    """Per key, only what differs (~400 B a key never used otherwise): the two keys share a recipe, and
    each one's upstream headers and counter ids are made from it (and kept) when first read."""
    hourly = '[{"requests": 9, "per": "hour"}]'
    for key_id in ("rt1", "rt2"):
        world.create(key_id=key_id, tenant="acme", group="research", limits=hourly)
    one, two = (world.engine.snapshot.by_id[k] for k in ("rt1", "rt2"))
    assert one.recipe is two.recipe is not None
    for name in ("counter_ids", "upstream_headers"):
        with pytest.raises(AttributeError):  # the slot itself: not filled yet
            getattr(KeyRecord, name).__get__(two)
    assert two.counter_ids == (
        "rt2\x00requests/hour",
        group_counter_id("acme", "research", "requests/minute"),
        tenant_counter_id("acme", "requests/minute"),
    )
    assert two.upstream_headers[:2] == (("x-nexus-key-id", "rt2"), ("x-nexus-tenant", "acme"))
    assert KeyRecord.counter_ids.__get__(two) is two.counter_ids  # kept
    assert world.check(world.create(key_id="rt3", tenant="acme")).allowed


def test_a_runtime_key_and_a_file_key_of_one_tenant_share_its_budget(world: World) -> None:
    secret = world.create(key_id="rt1", tenant="acme")
    assert world.check(secret).allowed and world.check(secret).allowed
    assert world.check(FILE_ACME.secret).allowed and world.check(FILE_ACME.secret).allowed
    # the tenant's 4 a minute are spent, by both: each key is refused, naming the tenant
    assert "for tenant acme: 'requests/minute'" in refused_by(world.check(FILE_ACME.secret))
    assert "for tenant acme: 'requests/minute'" in refused_by(world.check(secret))
    assert world.check(FILE_OTHER.secret).allowed  # another tenant: not its budget


def test_a_runtime_key_spending_the_tenant_budget_refuses_a_file_key(world: World) -> None:
    secret = world.create(key_id="rt1", tenant="acme", group="ops")
    for _ in range(4):
        assert world.check(secret).allowed
    assert "for tenant acme" in refused_by(world.check(FILE_ACME.secret))


def test_a_runtime_key_shares_its_groups_window_with_the_groups_file_keys(world: World) -> None:
    in_group = world.create(key_id="rt1", tenant="acme", group="research")
    no_group = world.create(key_id="rt2", tenant="acme")
    assert world.check(in_group).allowed and world.check(FILE_RESEARCH.secret).allowed
    assert "for group research of tenant acme" in refused_by(world.check(FILE_RESEARCH.secret))
    assert "for group research of tenant acme" in refused_by(world.check(in_group))
    assert world.check(no_group).allowed  # not in the group: only the tenant's window (3 of 4 now)


def test_an_update_moving_a_key_into_a_group_charges_that_group(world: World) -> None:
    secret = world.create(key_id="rt1", tenant="acme")
    assert world.check(FILE_RESEARCH.secret).allowed and world.check(FILE_RESEARCH.secret).allowed
    assert world.check(secret).allowed  # not in research yet
    world.loop.run_until_complete(world.runtime.update("rt1", KeyChanges(group="research")))
    assert "for group research of tenant acme" in refused_by(world.check(secret))
    world.loop.run_until_complete(world.runtime.update("rt1", KeyChanges(group="")))
    assert world.check(secret).allowed


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"tenant": "acme", "group": "sales"},
            "group: tenant 'acme' has no group 'sales' (groups: ops, research)",
        ),
        (
            {"tenant": "initech", "group": "research"},
            "group: the key's tenant 'initech' is not defined under `tenants:` in the config, so it has no "
            "group 'research'",
        ),
        ({"group": "research"}, "group: the key's tenant 'default' is not defined"),
    ],
)
def test_create_refuses_a_group_its_tenant_does_not_have(
    world: World, spec: dict[str, str], message: str
) -> None:
    with pytest.raises(RuntimeKeyError) as info:
        world.create(key_id="rt1", **spec)
    assert info.value.kind == "invalid" and message in info.value.message
    assert "rt1" not in world.engine.snapshot.by_id and not world.runtime.keys  # nothing written


def test_update_refuses_a_group_or_tenant_that_breaks_the_pair(world: World) -> None:
    world.create(key_id="rt1", tenant="acme", group="research")
    run = world.loop.run_until_complete
    with pytest.raises(RuntimeKeyError, match="tenant 'acme' has no group 'sales'"):
        run(world.runtime.update("rt1", KeyChanges(group="sales")))
    with pytest.raises(RuntimeKeyError, match="the key's tenant 'initech' is not defined"):
        run(world.runtime.update("rt1", KeyChanges(tenant="initech")))  # keeps group research
    assert run(world.runtime.update("rt1", KeyChanges(tenant="initech", group=""))).tenant == "initech"


def test_check_against_is_the_key_files_check() -> None:
    policy = parse_policy(Fields(load_yaml(TENANTS, "nexus.yaml"), "nexus.yaml", ""))
    key = rk.create(KeySpec(key_id="k", tenant="acme", group="nope"), key_hash=b"\x01" * 32, now=0)
    with pytest.raises(RuntimeKeyError, match=r"^group: tenant 'acme' has no group 'nope'"):
        rk.check_against(key, policy, {})
    with pytest.raises(ConfigError, match=r"^runtime: keys\[k\]: group: tenant 'acme' has no group 'nope'"):
        rk.key_records(key, policy=policy, credentials={})


def test_a_reload_that_changes_the_tenants_re_resolves_the_runtime_keys(world: World) -> None:
    secret = world.create(key_id="rt1", tenant="acme")
    assert tenant_counter_id("acme", "requests/minute") in world.engine.snapshot.by_id["rt1"].counter_ids
    # the tenant's budget becomes 1 an hour: the runtime key (built before the reload) is charged it too
    hourly = "{requests: 1, per: hour}"
    world.config.write_text(world.config.read_text().replace("{requests: 4, per: minute}", hourly))
    assert world.engine.reload_config(force=True)
    assert world.engine.snapshot.by_id["rt1"].counter_ids == (tenant_counter_id("acme", "requests/hour"),)
    assert world.check(secret).allowed
    assert "for tenant acme: 'requests/hour'" in refused_by(world.check(FILE_ACME.secret))
    assert "for tenant acme: 'requests/hour'" in refused_by(world.check(secret))
    # and a reload that drops the tenant's limits frees it
    world.config.write_text(world.config.read_text().replace(f"    limits:\n      - {hourly}\n", ""))
    assert world.engine.reload_config(force=True)
    assert world.engine.snapshot.by_id["rt1"].counter_ids == ()
    assert world.check(secret).allowed


def test_a_reload_dropping_a_runtime_keys_group_is_rejected_and_the_last_config_stays(world: World) -> None:
    secret = world.create(key_id="rt1", tenant="acme", group="ops")
    good = world.config.read_text()
    world.config.write_text(good.replace("      ops: {}\n", ""))
    assert not world.engine.reload_config(force=True)
    error = world.engine.sources()[1][2].last_error
    assert error is not None and "keys[rt1]" in error and "tenant 'acme' has no group 'ops'" in error
    assert world.engine.snapshot.by_id["rt1"].group == "ops" and world.check(secret).allowed
    # the way out: move the key out of the group first, then the reload goes through
    world.loop.run_until_complete(world.runtime.update("rt1", KeyChanges(group="")))
    assert world.engine.reload_config(force=True)
    assert world.engine.sources()[1][2].last_error is None
    assert world.check(secret).allowed


def test_a_restart_loads_the_group_from_the_store_with_its_windows(
    world: World, tmp_path: Path, loop: asyncio.AbstractEventLoop
) -> None:
    world.create(key_id="rt1", tenant="acme", group="research")
    expected = world.engine.snapshot.by_id["rt1"].counter_ids
    world.close()
    again = World(tmp_path, loop)  # the same config and SQLite file, a new engine
    try:
        record = again.engine.snapshot.by_id["rt1"]
        assert record.group == "research" and record.counter_ids == expected
        assert group_counter_id("acme", "research", "requests/minute") in expected
    finally:
        again.close()
