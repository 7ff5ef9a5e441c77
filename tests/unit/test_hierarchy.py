"""The budget hierarchy: tenant and group limits beside a key's own (core/hierarchy.py).

Parsing (nexus.yaml `tenants:`, the key file's `group:`, their errors with file:line: field) and the
decision: shared windows, every level charged, the strictest binds, a refusal charges nothing, and the
429 names the level and the limit."""

from __future__ import annotations

import json

import pytest

from nexus_authz.core.config import parse_key_file, parse_policy
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.hierarchy import group_counter_id, tenant_counter_id
from nexus_authz.core.model import Credential, Decision, Reason, Request
from nexus_authz.core.policy import Policy
from nexus_authz.core.reservations import ReservationBook
from nexus_authz.core.yamlsrc import Fields, load_yaml
from nexus_authz.stores.base import apply_settlements
from nexus_authz.stores.memory import MemoryCounterStore
from tests.helpers import PEPPER, KeySpec, decide_local, key_file

POLICY_YAML = """
plans:
  roomy:
    limits:
      - {requests: 1000, per: minute}
prices:
  "gpt-4o*": {input: 2.5, output: 10}
reservations:
  default_max_tokens: 100
tenants:
  acme:
    limits:
      - {usd: 0.01, per: month}
      - {requests: 5, per: minute, model: "gpt-4*"}
    groups:
      research:
        limits:
          - {requests: 3, per: minute}
      ops: {}
  globex:
    limits:
      - {concurrent: 1}
"""

CRED = {"openai": Credential(name="openai", header="authorization", value="Bearer sk-up")}
A1 = KeySpec("a1", extra={"tenant": "acme", "plan": "roomy"})
A2 = KeySpec("a2", extra={"tenant": "acme"})
R1 = KeySpec("r1", extra={"tenant": "acme", "group": "research"})
R2 = KeySpec(
    "r2", extra={"tenant": "acme", "group": "research", "limits": [{"requests": 1, "per": "minute"}]}
)
O1 = KeySpec("o1", extra={"tenant": "acme", "group": "ops"})
G1 = KeySpec("g1", extra={"tenant": "globex"})
PLAIN = KeySpec("plain", extra={"plan": "roomy"})
T0 = 1_800_000_000.0


def policy_of(text: str) -> object:
    return parse_policy(Fields(load_yaml(text, "nexus.yaml"), "nexus.yaml", ""))


class World:
    def __init__(self) -> None:
        self.policy_set = parse_policy(Fields(load_yaml(POLICY_YAML, "nexus.yaml"), "nexus.yaml", ""))
        self.snapshot = parse_key_file(
            key_file(A1, A2, R1, R2, O1, G1, PLAIN),
            "keys.yaml",
            policy=self.policy_set,
            credentials=CRED,
            pepper=PEPPER.encode(),
            loaded_at=0.0,
        )
        self.policy = Policy(self.policy_set)
        self.counters = MemoryCounterStore()
        self.book = ReservationBook(ttl=60.0, max_entries=1000)
        self.now = T0
        self.n = 0

    def check(self, key: KeySpec, model: str = "gpt-4o", max_tokens: int = 10, rid: str = "") -> Decision:
        self.n += 1
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
        req = Request(
            "POST",
            "/v1/chat/completions",
            {"authorization": f"Bearer {key.secret}", "content-type": "application/json"},
            json.dumps(body).encode(),
            request_id=rid or f"r{self.n}",
        )
        return decide_local(self.policy, self.snapshot, req, self.now, self.counters, self.book)

    def used(self, counter_id: str) -> int:
        record = self.snapshot.by_id["a1"]
        spec = next(s for s, c in zip(record.limits, record.counter_ids, strict=True) if c == counter_id)
        (status,) = self.counters.peek((counter_id,), (spec,), self.now, (0,))
        return spec.capacity - status.remaining


# -- parsing ---------------------------------------------------------------------------------------------


def test_a_key_gets_its_own_then_its_groups_then_its_tenants_windows() -> None:
    w = World()
    r2 = w.snapshot.by_id["r2"]
    assert [(s.level, s.name) for s in r2.limits] == [
        ("key", "requests/minute"),
        ("group", "requests/minute"),
        ("tenant", "usd/month"),
        ("tenant", "requests/minute@gpt-4*"),
    ]
    assert r2.counter_ids == (
        "r2\x00requests/minute",
        group_counter_id("acme", "research", "requests/minute"),
        tenant_counter_id("acme", "usd/month"),
        tenant_counter_id("acme", "requests/minute@gpt-4*"),
    )
    assert r2.group == "research" and r2.needs_facts and r2.model_scoped
    # every key of the tenant names the same tenant counters; a key of no configured tenant is untouched
    assert w.snapshot.by_id["a2"].counter_ids == r2.counter_ids[2:]
    plain = w.snapshot.by_id["plain"]
    assert [s.level for s in plain.limits] == ["key"] and plain.counter_ids == ("plain\x00requests/minute",)


def test_a_tenant_named_like_a_key_never_shares_its_counters() -> None:
    ids = set(World().snapshot.by_id["a1"].counter_ids)
    assert tenant_counter_id("a1", "requests/minute") not in ids
    assert all(not cid.startswith("a1\x00") for cid in ids if "\x02" in cid)


@pytest.mark.parametrize(
    ("yaml_text", "where", "message"),
    [
        (
            "tenants:\n  acme:\n    limits:\n      - {usd: 5, per: fortnight}\n",
            "nexus.yaml:4: tenants.acme.limits[0].per",
            "unknown unit 'fortnight'",
        ),
        (
            "tenants:\n  acme:\n    groups:\n      research:\n        limits:\n"
            "          - {requests: 0, per: minute}\n",
            "nexus.yaml:6: tenants.acme.groups.research.limits[0].requests",
            "must be between 1",
        ),
        (
            "tenants:\n  acme:\n    limits:\n      - {usd: 5, per: month}\n",
            "nexus.yaml:3: tenants.acme.limits",
            "needs a prices table",
        ),
        ("tenants:\n  acme:\n    budget: 5\n", "nexus.yaml:3: tenants.acme.budget", "unknown"),
        (
            "tenants:\n  acme:\n    groups:\n      'bad group': {}\n",
            "nexus.yaml:4: tenants.acme.groups.bad group",
            "group names are",
        ),
    ],
)
def test_tenants_section_errors_name_file_line_and_field(yaml_text: str, where: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        policy_of(yaml_text)
    assert str(info.value).startswith(where + ": "), str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            KeySpec("k", extra={"tenant": "acme", "group": "sales"}),
            "tenant 'acme' has no group 'sales' (groups: ops, research)",
        ),
        (
            KeySpec("k", extra={"tenant": "initech", "group": "research"}),
            "the key's tenant 'initech' is not defined under `tenants:`",
        ),
        (KeySpec("k", extra={"group": "research"}), "the key's tenant 'default' is not defined"),
    ],
)
def test_a_keys_group_must_be_one_of_its_tenants(key: KeySpec, message: str) -> None:
    policy = parse_policy(Fields(load_yaml(POLICY_YAML, "nexus.yaml"), "nexus.yaml", ""))
    text = key_file(key)
    line = 1 + text.splitlines().index('    group: "' + str(key.extra["group"]) + '"')
    with pytest.raises(ConfigError) as info:
        parse_key_file(text, "keys.yaml", policy=policy, credentials=CRED, pepper=b"p", loaded_at=0)
    assert str(info.value).startswith(f"keys.yaml:{line}: keys[0].group: "), str(info.value)
    assert message in str(info.value)


# -- the decision ------------------------------------------------------------------------------------------


def test_two_keys_of_a_tenant_share_its_budget_and_the_429_names_the_tenant() -> None:
    w = World()
    # 0.01 USD = 10,000 micro-USD; gpt-4o output at 10 USD/M: 600 tokens reserve ~6,000
    assert w.check(A1, max_tokens=600).allowed
    d = w.check(A2, max_tokens=600)  # another key, same tenant: the tenant's month is spent
    assert d.status == 429 and d.reason is Reason.QUOTA_EXCEEDED
    error = json.loads(d.body)["error"]
    assert error["type"] == "insufficient_quota" and error["code"] == "insufficient_quota"
    assert error["message"] == "You exceeded your current quota (budget) for tenant acme: usd/month."
    h = dict(d.response_headers)
    assert '"tenant:usd/month";q=10000;qu="usd-micros"' in h["ratelimit-policy"]
    assert int(h["retry-after"]) >= 1
    assert d.body is w.check(A1, max_tokens=600).body  # the fixed body is built once
    assert w.check(PLAIN, max_tokens=600).allowed  # no tenant configured: no tenant budget


def test_the_group_window_is_shared_by_the_groups_keys_only() -> None:
    w = World()
    for key in (R1, R1, R2):
        assert w.check(key, model="o1").allowed
    d = w.check(R1, model="o1")
    assert d.status == 429 and d.reason is Reason.RATE_LIMITED
    assert "for group research of tenant acme: 'requests/minute'" in json.loads(d.body)["error"]["message"]
    assert dict(d.response_headers)["x-ratelimit-remaining-requests"] == "0"  # the binding window's
    assert w.check(O1, model="o1").allowed and w.check(A1, model="o1").allowed  # other group, no group


def test_the_strictest_limit_binds_and_a_refusal_charges_no_level() -> None:
    w = World()
    assert w.check(R2, model="o1").allowed  # r2's own requests/minute is 1
    group_id = group_counter_id("acme", "research", "requests/minute")
    budget_id = tenant_counter_id("acme", "usd/month")
    before = (w.used(budget_id), w.counters.peek((group_id,), (w.snapshot.by_id["r1"].limits[0],), w.now)[0])
    d = w.check(R2, model="o1", max_tokens=50)
    assert d.status == 429 and "for 'requests/minute'" in json.loads(d.body)["error"]["message"]  # the key's
    after = (w.used(budget_id), w.counters.peek((group_id,), (w.snapshot.by_id["r1"].limits[0],), w.now)[0])
    assert before[0] == after[0] and before[1].remaining == after[1].remaining == 2


def test_the_binding_window_is_the_one_that_refuses_longest() -> None:
    w = World()
    # r2: its own 1/minute; the tenant budget: ~9,000 of 10,000 micro-USD
    assert w.check(R2, model="gpt-4o", max_tokens=900).allowed
    d = w.check(R2, model="gpt-4o", max_tokens=900)  # refused by the key's minute and the tenant's month
    assert d.reason is Reason.QUOTA_EXCEEDED  # the month binds: no retry within the minute would help
    assert "tenant acme: usd/month" in json.loads(d.body)["error"]["message"]
    assert int(dict(d.response_headers)["retry-after"]) > 60


def test_settlement_charges_the_real_usage_to_the_tenant_window() -> None:
    w = World()
    assert w.check(A1, max_tokens=900, rid="big").allowed  # ~9,000 reserved in the tenant's month
    assert not w.check(A2, max_tokens=200).allowed
    settled = w.book.settle("big", w.now, tokens=20, usd_micros=200)
    assert settled is not None
    apply_settlements(w.counters, (settled,), w.now)
    assert w.used(tenant_counter_id("acme", "usd/month")) == 200
    assert w.check(A2, max_tokens=200).allowed  # the refund is the tenant's, for every key


def test_a_per_model_tenant_window_counts_that_models_requests_of_every_key() -> None:
    w = World()
    for key in (A1, A2, R1, A1, O1):
        assert w.check(key, model="gpt-4o-mini", max_tokens=1).allowed
    d = w.check(A2, model="gpt-4-turbo", max_tokens=1)
    assert d.status == 429
    assert "tenant acme: 'requests/minute@gpt-4*'" in json.loads(d.body)["error"]["message"]
    assert w.check(A2, model="o1", max_tokens=1).allowed  # the glob does not match: not that window


def test_tenant_concurrency_is_shared_and_released_at_settle() -> None:
    w = World()
    g2 = KeySpec("g1")  # same secret derivation: the same key
    assert w.check(G1, model="o1", rid="one").allowed
    d = w.check(g2, model="o1")
    assert d.reason is Reason.CONCURRENCY_LIMITED and "tenant globex" in d.message
    settled = w.book.settle("one", w.now, tokens=1, usd_micros=0)
    assert settled is not None
    apply_settlements(w.counters, (settled,), w.now)
    assert w.check(G1, model="o1").allowed
