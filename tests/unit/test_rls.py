"""envoyproxy/ratelimit-format config and ShouldRateLimit semantics, in the pure core (no event loop).

Parsing: every fixture under tests/fixtures/rls/valid parses; every one under .../invalid fails with the
message its first line (`# expect: ...`) gives, naming file, line and path. Semantics: the upstream README's
examples (nested lists, most specific match, wildcards, default values, replaces, unlimited, shadow mode),
hits_addend, and this product's own rules (all or nothing, nothing charged when refused), against the
memory counter store with a fake clock.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_authz.core import rls
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.limits import Algorithm, WindowStatus
from nexus_authz.core.ratelimit_headers import BOTH, OPENAI
from nexus_authz.core.rls import Outcome, RequestDescriptor, RlsAnswer, RlsConfig, parse_rls_config
from nexus_authz.core.yamlsrc import Fields, load_yaml
from nexus_authz.stores.memory import MemoryCounterStore

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rls"
VALID = sorted((FIXTURES / "valid").glob("*.yaml"))
INVALID = sorted((FIXTURES / "invalid").glob("*.yaml"))
T0 = 1_700_000_000.0


def config(*texts: str, **kwargs: object) -> RlsConfig:
    return parse_rls_config([(f"config/f{i}.yaml", t) for i, t in enumerate(texts)], **kwargs)  # type: ignore[arg-type]


def fixture_config() -> RlsConfig:
    return parse_rls_config([(f"config/{p.name}", p.read_text()) for p in VALID])


def d(*entries: str, hits: int | None = None, override: tuple[int, str] | None = None) -> RequestDescriptor:
    """d("k=v", "k2=v2") -> a request descriptor."""
    pairs = tuple((e.split("=", 1)[0], e.split("=", 1)[1]) for e in entries)
    return RequestDescriptor(pairs, hits, override)


class Limiter:
    """The adapter's sequence (plan, store, answer) around one memory store and a fake clock."""

    def __init__(self, cfg: RlsConfig, *, shadow_mode: bool = False) -> None:
        self.cfg = cfg
        self.store = MemoryCounterStore()
        self.now = T0
        self.shadow_mode = shadow_mode

    def __call__(
        self,
        domain: str,
        *descriptors: RequestDescriptor,
        hits: int = 0,
        identity: rls.Identity | None = None,
    ) -> RlsAnswer:
        plan = self.cfg.plan(domain, descriptors, hits, identity)
        statuses: tuple[WindowStatus, ...]
        if plan.blocked:
            statuses, allowed = self.store.peek(plan.counter_ids, plan.specs, self.now), False
        elif plan.specs:
            result = self.store.acquire(plan.counter_ids, plan.specs, plan.costs, self.now)
            statuses, allowed = result.statuses, result.allowed
        else:
            statuses, allowed = (), True
        return rls.answer(plan, statuses, allowed, shadow_mode=self.shadow_mode)

    def admitted(self, domain: str, *descriptors: RequestDescriptor, n: int) -> int:
        return sum(not self(domain, *descriptors).over_limit for _ in range(n))


# -- parsing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_fixture_parses(path: Path) -> None:
    cfg = parse_rls_config([(f"config/{path.name}", path.read_text())])
    assert len(cfg.domains) == 1 and len(cfg) > 0
    assert cfg.sources == (f"config/{path.name}",)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_fixture_is_rejected_naming_file_line_and_path(path: Path) -> None:
    text = path.read_text()
    first = text.splitlines()[0]
    assert first.startswith("# expect: ")
    source = f"config/{path.name}"
    expected = first.removeprefix("# expect: ").replace("{file}", source)
    valid = ("config/ok.yaml", (FIXTURES / "valid" / "nexus.yaml").read_text())
    with pytest.raises(ConfigError) as info:
        parse_rls_config([valid, (source, text)])  # the good file before it changes nothing
    assert str(info.value).startswith(expected), str(info.value)


def test_the_error_message_of_the_brief() -> None:
    text = (FIXTURES / "invalid" / "unknown_unit.yaml").read_text()
    with pytest.raises(ConfigError) as info:
        parse_rls_config([("config/api.yaml", text)])
    assert str(info.value) == (
        "config/api.yaml:10: descriptors[0].descriptors[1].rate_limit.unit: unknown unit 'fortnight' "
        "(expected second, minute, hour, day, week, month or year)"
    )
    assert info.value.source == "config/api.yaml:10"
    assert info.value.field == "descriptors[0].descriptors[1].rate_limit.unit"


def test_duplicate_domain_names_both_files_unless_merged() -> None:
    a = "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: 1}\n"
    b = "domain: d\ndescriptors:\n  - key: b\n    rate_limit: {unit: second, requests_per_unit: 2}\n"
    with pytest.raises(
        ConfigError, match=r"config/f1.yaml:1: domain: duplicate domain 'd' \(also in config/f0"
    ):
        config(a, b)
    merged = config(a, b, merge_domains=True)
    assert merged.lookup("d", [("a", "x")]) is not None and merged.lookup("d", [("b", "x")]) is not None
    with pytest.raises(ConfigError, match="duplicate descriptor 'a'"):
        config(a, a, merge_domains=True)


def test_domain_filter_keeps_only_the_listed_domains_but_validates_all() -> None:
    a = "domain: keep\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: 1}\n"
    b = "domain: drop\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: 1}\n"
    cfg = config(a, b, domains=["keep"])
    assert set(cfg.domains) == {"keep"} and len(cfg) == 1
    with pytest.raises(ConfigError, match="unknown unit"):
        config(a, b.replace("second", "sec"), domains=["keep"])


def test_units_map_onto_gcra_and_sliding_windows() -> None:
    cfg = fixture_config()

    def spec(entries: list[tuple[str, str]]):  # type: ignore[no-untyped-def]
        rule = cfg.lookup("features", entries)
        assert rule is not None and rule.spec is not None
        return rule.spec

    minute = spec([("path", "/v1/chat/completions")])
    assert (minute.algorithm, minute.period, minute.burst, minute.limit) == (Algorithm.GCRA, 60.0, 3, 3)
    assert spec([("azure", "x")]).period == 60.0  # "MINUTE": any case, as upstream
    assert spec([("tenant", "t")]).algorithm is Algorithm.GCRA  # hour
    text = "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: day, requests_per_unit: 9}\n"
    day = parse_rls_config([("d.yaml", text)]).rules[0].spec
    assert day is not None and (day.algorithm, day.period, day.slots) == (Algorithm.SLIDING, 86400.0, 24)
    week, month, year = (spec([("unit", u)]) for u in ("week", "month", "year"))
    assert (week.algorithm, week.period, week.slots, week.limit) == (Algorithm.SLIDING, 7 * 86400.0, 28, 7)
    assert (month.period, month.slots) == (30 * 86400.0, 30)
    assert (year.period, year.slots, year.limit) == (365 * 86400.0, 73, 365)


def test_warns_about_replaces_naming_no_rule() -> None:
    text = (
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unit: second\n"
        "      requests_per_unit: 1\n      replaces: [{name: nobody}]\n"
    )
    (warning,) = config(text).warnings
    assert warning.startswith("config/f0.yaml:4: rate_limit.replaces: no rate_limit is named 'nobody'")


def test_version_changes_with_the_content_only() -> None:
    a = fixture_config()
    assert a.version == fixture_config().version
    text = (FIXTURES / "valid" / "nexus.yaml").read_text()
    assert config(text).version != config(text.replace("600", "601")).version


def test_settings_section() -> None:
    text = (
        "ratelimit:\n  config_dir: rls\n  reload_interval: 250ms\n  response_headers: false\n"
        "  domains: [nexus]\n  shadow_mode: true\n"
    )
    f = Fields(load_yaml(text, "/etc/nexus/nexus.yaml"), "/etc/nexus/nexus.yaml", "").mapping("ratelimit")
    s = rls.parse_rls_settings(f)
    assert s.config_dir == "/etc/nexus/rls" and s.enabled
    assert (s.reload_interval, s.response_headers, s.domains, s.shadow_mode) == (
        0.25,
        False,
        ("nexus",),
        True,
    )
    assert not rls.parse_rls_settings(Fields(None, "n.yaml", "ratelimit")).enabled
    off = Fields(load_yaml("ratelimit: {enabled: false}\n", "n.yaml"), "n.yaml", "").mapping("ratelimit")
    assert not rls.parse_rls_settings(off).enabled
    bad = Fields(load_yaml("ratelimit: {reload_interval: 1s}\n", "n.yaml"), "n.yaml", "").mapping("ratelimit")
    with pytest.raises(ConfigError, match=r"n.yaml:1: ratelimit.config_dir: is required"):
        rls.parse_rls_settings(bad)
    typo = Fields(load_yaml("ratelimit: {config_dir: x, domain: [a]}\n", "n.yaml"), "n.yaml", "")
    with pytest.raises(ConfigError, match="ratelimit.domain: unknown field"):
        rls.parse_rls_settings(typo.mapping("ratelimit"))


# -- matching ----------------------------------------------------------------------------------------------


def test_nested_descriptors_and_default_values() -> None:
    """README example 2: (message_type=marketing, to_number=X) 5/day per number; (to_number=X) 100/day."""
    limiter = Limiter(fixture_config())
    marketing = d("message_type=marketing", "to_number=2061111111")
    assert limiter.admitted("messaging", marketing, n=7) == 5
    # Another number has its own counter: the key-only entry is a default for any value.
    assert limiter.admitted("messaging", d("message_type=marketing", "to_number=2062222222"), n=7) == 5
    # The top-level rule is a different counter, untouched by the nested one.
    answer = limiter("messaging", d("to_number=2061111111"))
    assert not answer.over_limit and answer.statuses[0].remaining == 99
    assert answer.statuses[0].rule is not None and answer.statuses[0].rule.requests_per_unit == 100


def test_depth_must_match_and_the_most_specific_entry_wins() -> None:
    cfg = fixture_config()
    # README example 4: a descriptor with more entries than the config's depth matches nothing.
    assert cfg.lookup("messaging", [("to_number", "1"), ("extra", "x")]) is None
    # ... and one that stops above the limit's depth too.
    assert cfg.lookup("messaging", [("message_type", "marketing")]) is None
    # README example 3: key+value before key only.
    generic = cfg.lookup("messaging", [("remote_address", "50.0.0.1")])
    blocked = cfg.lookup("messaging", [("remote_address", "50.0.0.5")])
    assert generic is not None and generic.requests_per_unit == 10 and not generic.blocks
    assert blocked is not None and blocked.blocks
    # Unknown keys, values of a key with only specific entries, unknown domains: no limit.
    assert cfg.lookup("messaging", [("message_type", "transactional"), ("to_number", "1")]) is None
    assert cfg.lookup("nowhere", [("to_number", "1")]) is None


def test_requests_per_unit_zero_refuses_without_counting_anything() -> None:
    limiter = Limiter(fixture_config())
    ok = d("remote_address=50.0.0.1")
    answer = limiter("messaging", d("remote_address=50.0.0.5"), ok)
    assert answer.over_limit
    blocked, other = answer.statuses
    assert blocked.over_limit and blocked.remaining == 0 and blocked.reset_seconds == 1
    assert not other.over_limit and other.remaining == 10  # peeked, not charged
    assert len(limiter.store) == 0
    assert b"messaging.remote_address_50.0.0.5" in answer.body
    # hits_addend 0 asks without hitting: not over.
    assert not limiter("messaging", d("remote_address=50.0.0.5", hits=0)).over_limit


def test_wildcards_match_by_prefix_in_file_order_each_value_its_own_counter() -> None:
    cfg = fixture_config()
    chat = cfg.lookup("features", [("path", "/v1/chat/completions")])
    other = cfg.lookup("features", [("path", "/v1/embeddings")])
    exact = cfg.lookup("features", [("path", "/v1/models")])
    assert chat is not None and chat.name == "chat" and chat.requests_per_unit == 3
    assert other is not None and other.requests_per_unit == 5  # the first wildcard did not match
    assert exact is not None and exact.requests_per_unit == 100  # exact beats any wildcard
    assert cfg.lookup("features", [("path", "/v2/x")]) is None
    assert cfg.lookup("features", [("pathx", "/v1/chat")]) is None  # the key must be equal, not a prefix
    limiter = Limiter(cfg)
    assert limiter.admitted("features", d("path=/v1/chat/completions"), n=5) == 3
    assert limiter.admitted("features", d("path=/v1/chat/other"), n=5) == 3  # upstream: per value


def test_replaces_drops_the_named_rule_when_both_match() -> None:
    """README example 7."""
    limiter = Limiter(fixture_config())
    one = d("key_1=value_1", "user=bkthomps")
    two = d("key_2=value_2", "user=bkthomps")
    answer = limiter("features", one, two)
    replaced, replacing = answer.statuses
    assert replaced.rule is None and replaced.remaining == 0 and not replaced.over_limit
    assert replacing.rule is not None and replacing.rule.requests_per_unit == 10
    assert replacing.remaining == 9
    # Together: 10 a second, and the replaced 5/s counter is never touched.
    assert limiter.admitted("features", one, two, n=12) == 9
    assert limiter("features", one).statuses[0].remaining == 4  # alone: its own limit, one used now
    plan = limiter.cfg.plan("features", [one, two])
    assert [p.outcome for p in plan.descriptors] == [Outcome.REPLACED, Outcome.LIMITED]


def test_unlimited_is_ok_with_max_remaining_and_counts_nothing() -> None:
    """README example 5."""
    limiter = Limiter(fixture_config())
    for _ in range(3):
        answer = limiter("features", d("ldap=anything"), hits=1000)
        (status,) = answer.statuses
        assert not answer.over_limit and status.remaining == rls.UNLIMITED_REMAINING and status.rule is None
    assert len(limiter.store) == 0 and answer.headers == ()


def test_shadow_mode_rule_never_refuses_but_is_counted_as_if_enforced() -> None:
    """README example 6: user-a is in shadow mode, user-b is limited."""
    limiter = Limiter(fixture_config())
    a = d("service=auth", "user=user-a")
    b = d("service=auth", "user=user-b")
    answers = [limiter("features", a) for _ in range(4)]
    assert not any(x.over_limit for x in answers)
    assert [x.statuses[0].shadow_violation for x in answers] == [False, False, True, True]
    assert [x.statuses[0].remaining for x in answers] == [1, 0, 0, 0]
    assert all(not x.statuses[0].over_limit for x in answers)
    assert limiter.admitted("features", b, n=4) == 2
    # A shadow window is invisible to clients: no headers for it.
    assert answers[0].headers == ()


def test_global_shadow_mode_answers_ok_but_reports_and_charges_as_if_enforced() -> None:
    limiter = Limiter(fixture_config(), shadow_mode=True)
    b = d("service=auth", "user=user-b")
    answers = [limiter("features", b) for _ in range(3)]
    assert not any(x.over_limit for x in answers)
    assert [x.shadow_overridden for x in answers] == [False, False, True]
    assert answers[2].statuses[0].over_limit  # the status says what enforcement would do
    assert answers[2].body == b"" and "retry-after" not in dict(answers[2].headers)


def test_detailed_metric_puts_the_value_in_the_stats_key() -> None:
    cfg = fixture_config()
    plan = cfg.plan("features", [d("tenant=acme"), d("azure=x")])
    assert [p.stat_key for p in plan.descriptors] == ["features.tenant_acme", "features.azure"]
    exact = config(
        "domain: e\ndescriptors:\n  - key: k\n    value: v\n    detailed_metric: true\n"
        "    rate_limit: {unit: second, requests_per_unit: 1}\n"
    )
    assert exact.plan("e", [d("k=v")]).descriptors[0].stat_key == "e.k_v"  # listed: not twice


def test_unknown_domain_empty_descriptors_and_no_match_are_ok_without_limits() -> None:
    limiter = Limiter(fixture_config())
    for answer in (
        limiter("nowhere", d("a=b")),
        limiter("features", d("nothing=here"), d("placeholder=x"), d("empty=x")),
        limiter("features"),
    ):
        assert not answer.over_limit and answer.headers == () and answer.body == b""
        assert all(s.rule is None and s.remaining == 0 and not s.over_limit for s in answer.statuses)
    assert not limiter.cfg.plan("nowhere", [d("a=b")]).known_domain


# -- hits_addend, overrides, all or nothing ---------------------------------------------------------------


def test_hits_addend_request_level_and_per_descriptor() -> None:
    limiter = Limiter(fixture_config())
    b = d("service=auth", "user=user-b")  # 2 a second
    answer = limiter("features", b, hits=2)
    assert not answer.over_limit and answer.statuses[0].remaining == 0
    limiter.now += 1.0  # refilled
    # The descriptor's own hits_addend wins over the request's; 0 checks without charging.
    assert not limiter("features", d("service=auth", "user=user-b", hits=0), hits=5).over_limit
    assert limiter("features", d("service=auth", "user=user-b", hits=1), hits=5).statuses[0].remaining == 1
    # More than the window can ever hold: refused, with no retry-after (no wait helps), nothing charged.
    refused = limiter("features", b, hits=3)
    assert refused.over_limit and "retry-after" not in dict(refused.headers)
    assert refused.statuses[0].remaining == 1


def test_a_refused_request_charges_none_of_its_descriptors() -> None:
    limiter = Limiter(fixture_config())
    tight = d("service=auth", "user=user-b")  # 2/s
    loose = d("azure=x")  # 100/min
    assert limiter.admitted("features", tight, loose, n=5) == 2
    assert limiter("features", loose).statuses[0].remaining == 97  # 2 admitted + this one


def test_two_descriptors_on_one_counter_are_charged_together() -> None:
    limiter = Limiter(fixture_config())
    plan = limiter.cfg.plan("features", [d("azure=x"), d("azure=x", hits=4)])
    assert plan.counter_ids[0:1] == plan.counter_ids and plan.costs == (5,)
    answer = limiter("features", d("azure=x"), d("azure=x", hits=4))
    assert [s.remaining for s in answer.statuses] == [95, 95]


def test_a_request_limit_override_is_its_own_counter() -> None:
    limiter = Limiter(fixture_config())
    o = d("azure=x", override=(2, "second"))
    assert limiter.admitted("features", o, n=3) == 2
    assert limiter("features", d("azure=x")).statuses[0].remaining == 99  # the configured rule: untouched
    # An override for an unknown domain or with an unknown unit imposes nothing.
    assert not limiter("nowhere", o).over_limit
    assert limiter("features", d("azure=x", override=(1, ""))).statuses[0].rule is None


def test_identity_fills_plan_and_tenant_from_the_key_id() -> None:
    cfg = fixture_config()
    keys = {"k-free": ("acme", "free"), "k-ent": ("acme", "enterprise"), "k-none": ("acme", None)}
    limiter = Limiter(cfg)

    def plan_rule(key_id: str) -> rls.RateLimitRule | None:
        p = cfg.plan("nexus", [d("nexus_plan=-", f"nexus_key_id={key_id}")], identity=keys.get)
        return p.descriptors[0].rule

    free, ent = plan_rule("k-free"), plan_rule("k-ent")
    assert free is not None and (free.unit, free.requests_per_unit) == ("day", 1000)
    assert ent is not None and ent.unlimited
    assert plan_rule("k-none") is None and plan_rule("k-unknown") is None
    # Without identity the value is taken as sent (nothing is looked up).
    assert cfg.plan("nexus", [d("nexus_plan=free", "nexus_key_id=k-ent")]).descriptors[0].rule is free
    # Whatever value Envoy sent for a derived entry, nexus's own answer replaces it.
    tenants = config(
        "domain: t\ndescriptors:\n  - key: nexus_tenant\n    value: acme\n    descriptors:\n"
        "      - key: nexus_key_id\n        rate_limit: {unit: second, requests_per_unit: 1}\n"
    )
    spoofed = [d("nexus_tenant=other", "nexus_key_id=k-free")]
    assert tenants.plan("t", spoofed, identity=keys.get).descriptors[0].rule is tenants.rules[0]
    assert tenants.plan("t", [d("nexus_tenant=acme", "nexus_key_id=k-x")], identity=keys.get).specs == ()
    answer = limiter(
        "nexus", d("nexus_key_id=k-free"), d("nexus_plan=-", "nexus_key_id=k-free"), identity=keys.get
    )
    assert [s.remaining for s in answer.statuses] == [599, 999]


# -- the answer ------------------------------------------------------------------------------------------


def test_answer_headers_and_body() -> None:
    limiter = Limiter(fixture_config())
    b = d("service=auth", "user=user-b")
    first = limiter("features", b)
    headers = dict(first.headers)
    assert set(headers) == {"ratelimit-policy", "ratelimit"}
    assert headers["ratelimit-policy"] == '"features.service.user_user-b";q=2;w=1'
    assert headers["ratelimit"] == '"features.service.user_user-b";r=1;t=1'
    limiter("features", b)
    over = limiter("features", b)
    assert over.over_limit and over.statuses[0].over_limit and over.statuses[0].reset_seconds == 1
    assert dict(over.headers)["retry-after"] == "1"
    error = json.loads(over.body)["error"]
    assert error["type"] == "rate_limit_exceeded" and error["code"] == "rate_limit_exceeded"
    assert "features.service.user_user-b" in error["message"] and "retry after 1 seconds" in error["message"]
    plan = limiter.cfg.plan("features", [b])
    quiet = rls.answer(
        plan, limiter.store.peek(plan.counter_ids, plan.specs, limiter.now), True, headers=False
    )
    assert quiet.headers == ()


def test_gcra_mapping_admits_at_most_rpu_plus_rate_times_t() -> None:
    """3 a minute with burst 3: a burst of 3, then one every 20 s, never more (no fixed-window doubling)."""
    limiter = Limiter(fixture_config())
    chat = d("path=/v1/chat/completions")
    admitted = []
    for step in range(0, 121):  # a request every second for two minutes
        limiter.now = T0 + step
        if not limiter("features", chat).over_limit:
            admitted.append(step)
    assert admitted == [0, 1, 2, 20, 40, 60, 80, 100, 120]
    for i, t in enumerate(admitted):  # the guarantee, over every interval [t, u] between admissions
        for j in range(i, len(admitted)):
            assert j - i + 1 <= 3 + (admitted[j] - t) / 20.0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["user-b", "user-a", "x"]),
            st.integers(0, 3),
            st.booleans(),
            st.floats(0, 0.7),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_a_refused_request_changes_no_counter(steps: list[tuple[str, int, bool, float]]) -> None:
    limiter = Limiter(fixture_config())
    for user, hits, with_azure, dt in steps:
        limiter.now += dt
        descriptors = [d("service=auth", f"user={user}", hits=hits)]
        if with_azure:
            descriptors.append(d("azure=z"))
        plan = limiter.cfg.plan("features", descriptors)
        before = limiter.store.peek(plan.counter_ids, plan.specs, limiter.now) if plan.specs else ()
        answer = limiter("features", *descriptors)
        if answer.over_limit:
            after = limiter.store.peek(plan.counter_ids, plan.specs, limiter.now)
            assert [s.remaining for s in after] == [s.remaining for s in before]
        for status in answer.statuses:
            assert 0 <= status.remaining <= rls.UNLIMITED_REMAINING


# -- issue 18 item 13: current envoyproxy/ratelimit configs ---------------------------------------------

UPSTREAM_NOW = """
domain: api
descriptors:
  - key: path
    value: /api/*/action
    rate_limit: {unit: minute, requests_per_unit: 2}
  - key: path
    value: /v*/x/*/y*
    rate_limit: {unit: minute, requests_per_unit: 4}
  - key: files
    value: files/*
    share_threshold: true
    rate_limit: {unit: hour, requests_per_unit: 3}
  - key: route
    value: api/*
    share_threshold: true
    descriptors:
      - key: method
        rate_limit: {unit: hour, requests_per_unit: 2}
"""


def test_a_wildcard_anywhere_in_the_value_as_upstream() -> None:
    """Upstream: each `*` matches zero or more characters, anywhere in the value, several allowed."""
    cfg = config(UPSTREAM_NOW)
    rule = cfg.lookup("api", [("path", "/api/123/action")])
    assert rule is not None and rule.requests_per_unit == 2
    assert cfg.lookup("api", [("path", "/api//action")]) is not None  # zero characters
    assert cfg.lookup("api", [("path", "/api/123/other")]) is None
    assert cfg.lookup("api", [("path", "/api/*/action/more")]) is None  # the suffix is anchored
    multi = cfg.lookup("api", [("path", "/v1/x/abc/y")])
    assert multi is not None and multi.requests_per_unit == 4
    assert cfg.lookup("api", [("path", "/v1/x/abc/z")]) is None
    limiter = Limiter(cfg)
    assert limiter.admitted("api", d("path=/api/1/action"), n=4) == 2
    assert limiter.admitted("api", d("path=/api/2/action"), n=4) == 2  # each value its own counter


def test_share_threshold_shares_one_counter_among_matching_values() -> None:
    limiter = Limiter(config(UPSTREAM_NOW))
    assert limiter.admitted("api", d("files=files/a.pdf"), n=2) == 2
    assert limiter.admitted("api", d("files=files/b.csv"), n=2) == 1  # 3 an hour, shared
    # ...also when the limit is deeper than the shared wildcard (upstream tracks it by entry index).
    assert limiter.admitted("api", d("route=api/a", "method=GET"), n=1) == 1
    assert limiter.admitted("api", d("route=api/b", "method=GET"), n=2) == 1
    assert limiter.admitted("api", d("route=api/b", "method=POST"), n=2) == 2  # another method value


def test_share_threshold_without_a_wildcard_is_refused_as_upstream() -> None:
    with pytest.raises(ConfigError, match="share_threshold can only be used with a wildcard value"):
        config("domain: x\ndescriptors:\n  - key: k\n    value: v\n    share_threshold: true\n")


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("quota_mode: true", "quota_mode is not supported"),
        ("metadata: {a: b}", "metadata is not supported"),
    ],
)
def test_upstream_fields_nexus_does_not_implement_are_refused_by_name(field: str, message: str) -> None:
    rule = "rate_limit: {unit: second, requests_per_unit: 1}"
    text = f"domain: x\ndescriptors:\n  - key: k\n    {field}\n    {rule}\n"
    with pytest.raises(ConfigError, match=message):
        config(text)


def test_the_policys_header_families_leave_the_ietf_headers_out_but_not_retry_after() -> None:
    """The policy's `rate_limit_headers` without `ietf`: the service's answers carry no RateLimit /
    RateLimit-Policy (with `ratelimit.response_headers: true`), and a 429 still its retry-after."""
    limiter = Limiter(fixture_config())
    b = d("service=auth", "user=user-b")
    plan = limiter.cfg.plan("features", [b])
    for families in (OPENAI, 0):
        statuses = limiter.store.peek(plan.counter_ids, plan.specs, limiter.now)
        assert rls.answer(plan, statuses, True, families=families).headers == ()
    assert {n for n, _ in rls.answer(plan, statuses, True, families=BOTH).headers} == {
        "ratelimit",
        "ratelimit-policy",
    }
    limiter("features", b)
    limiter("features", b)
    over = limiter.store.acquire(plan.counter_ids, plan.specs, (1,), limiter.now)
    assert not over.allowed
    answer = rls.answer(plan, over.statuses, False, families=OPENAI)
    assert answer.over_limit and answer.headers == (("retry-after", "1"),)
    assert "retry after 1 seconds" in json.loads(answer.body)["error"]["message"]
