"""Limits in the decision: 429s and their headers, reserve/settle, per-model windows, budgets, shadow."""

from __future__ import annotations

import json

from nexus_authz.core.config import PolicySet, parse_key_file, parse_policy
from nexus_authz.core.model import Decision, Reason, Request
from nexus_authz.core.policy import Policy
from nexus_authz.core.reservations import ReservationBook
from nexus_authz.core.yamlsrc import Fields, load_yaml
from nexus_authz.stores.base import apply_settlements
from nexus_authz.stores.memory import MemoryCounterStore
from tests.helpers import CRED, PEPPER, KeySpec, decide_local, dry_run_local, key_file, parse_world

POLICY_YAML = """
plans:
  small:
    limits:
      - {requests: 3, per: minute}
      - {tokens: 1000, per: minute}
  budget:
    limits:
      - {usd: 0.01, per: day}
  gpt4:
    limits:
      - {requests: 100, per: minute}
      - {requests: 1, per: minute, model: "gpt-4*"}
  conc:
    limits:
      - {concurrent: 2}
  shadowed:
    limits:
      - {requests: 1, per: minute, shadow: true}
prices:
  "gpt-4o*": {input: 2.5, output: 10}
reservations:
  default_max_tokens: 100
"""

SMALL = KeySpec("small", extra={"plan": "small"})
BUDGET = KeySpec("budget", extra={"plan": "budget"})
GPT4 = KeySpec("gpt4", extra={"plan": "gpt4"})
CONC = KeySpec("conc", extra={"plan": "conc"})
SHADOW = KeySpec("shadow", extra={"plan": "shadowed"})
T0 = 1_800_000_000.0


class World:
    def __init__(self, policy_yaml: str = POLICY_YAML) -> None:
        self.policy_set, self.snapshot = parse_world(policy_yaml, SMALL, BUDGET, GPT4, CONC, SHADOW)
        self.policy = Policy(self.policy_set)
        self.counters = MemoryCounterStore()
        self.book = ReservationBook(ttl=60.0, max_entries=1000)
        self.now = T0
        self.n = 0

    def check(
        self,
        key: KeySpec,
        body: object | None = None,
        request_id: str | None = None,
        method: str = "POST",
        path: str = "/v1/chat/completions",
    ) -> Decision:
        self.n += 1
        raw = json.dumps(body).encode() if body is not None else b""
        req = Request(
            method,
            path,
            {"authorization": f"Bearer {key.secret}", "content-type": "application/json"},
            raw,
            request_id=request_id or f"r{self.n}",
        )
        return decide_local(self.policy, self.snapshot, req, self.now, self.counters, self.book)

    def settle(self, request_id: str, tokens: int | None = None, usd: int | None = None) -> None:
        s = self.book.settle(request_id, self.now, tokens=tokens, usd_micros=usd)
        assert s is not None
        apply_settlements(self.counters, (s,), self.now)


def chat(max_tokens: int = 10, model: str = "gpt-4o-mini") -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}


def test_request_limit_429_with_headers_then_recovers() -> None:
    w = World()
    for i in range(3):
        d = w.check(SMALL, chat())
        assert d.allowed, d
        h = dict(d.response_headers)
        assert h["x-ratelimit-limit-requests"] == "3"
        assert h["x-ratelimit-remaining-requests"] == str(2 - i)
    d = w.check(SMALL, chat())
    assert not d.allowed and d.status == 429 and d.reason is Reason.RATE_LIMITED
    h = dict(d.response_headers)
    error = json.loads(d.body)["error"]
    assert error["type"] == "rate_limit_exceeded" and error["code"] == "rate_limit_exceeded"
    assert h["x-ratelimit-remaining-requests"] == "0"
    retry = int(h["retry-after"])
    assert 1 <= retry <= 20  # 3/minute: one request every 20 s
    assert "ratelimit" in h and "ratelimit-policy" in h
    w.now += retry
    assert w.check(SMALL, chat()).allowed


def test_denied_request_consumes_nothing() -> None:
    w = World()
    # 1000 tokens/minute; this request reserves ~2000 and can never fit: denied, no retry-after.
    d = w.check(SMALL, chat(max_tokens=2000))
    assert d.status == 429 and "retry-after" not in dict(d.response_headers)
    assert "can never fit" in json.loads(d.body)["error"]["message"]
    for _ in range(3):
        assert w.check(SMALL, chat()).allowed  # the denied one took no request slot


def test_token_reservation_and_settle_refund() -> None:
    w = World()
    d = w.check(SMALL, chat(max_tokens=600), request_id="a")
    assert d.allowed
    remaining = int(dict(d.response_headers)["x-ratelimit-remaining-tokens"])
    assert remaining < 400  # prompt estimate + 600 reserved
    assert w.check(SMALL, chat(max_tokens=600), request_id="b").status == 429
    w.settle("a", tokens=50)  # the real usage was small: the difference comes back
    d = w.check(SMALL, chat(max_tokens=600), request_id="c")
    assert d.allowed
    assert int(dict(d.response_headers)["x-ratelimit-remaining-tokens"]) < remaining


def test_default_max_tokens_reserved_when_absent() -> None:
    w = World()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    d = w.check(SMALL, body)
    used = 1000 - int(dict(d.response_headers)["x-ratelimit-remaining-tokens"])
    assert 100 <= used < 130  # default_max_tokens: 100, plus a small prompt


def test_non_generating_requests_reserve_no_completion() -> None:
    """Issue 18 item 5: GETs and embeddings-like endpoints reserve the prompt estimate at most."""
    w = World()
    for method, path, body in (
        ("GET", "/v1/models", None),
        ("GET", "/v1/responses/resp_1?x=1", None),
        ("POST", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}),
        ("POST", "/openai/deployments/e/embeddings/", {"model": "e", "input": "hi"}),
        ("POST", "/v1/messages/count_tokens", {"model": "claude", "messages": []}),
    ):
        w.now += 60  # the plan's 3 requests/minute
        d = w.check(SMALL, body, method=method, path=path)
        assert d.allowed, (path, d)
        used = 1000 - int(dict(d.response_headers)["x-ratelimit-remaining-tokens"])
        assert used < 30, (path, used)  # a prompt estimate of a few tokens, no default_max_tokens
    w.now += 60
    d = w.check(SMALL, {"model": "m", "prompt": "hi"}, path="/v1/completions")
    assert 1000 - int(dict(d.response_headers)["x-ratelimit-remaining-tokens"]) >= 100


def test_per_model_window() -> None:
    w = World()
    assert w.check(GPT4, chat(model="gpt-4o")).allowed
    d = w.check(GPT4, chat(model="gpt-4o-mini"))
    assert d.status == 429  # gpt-4* matches both: one shared per-key+glob counter
    assert w.check(GPT4, chat(model="o1")).allowed  # the glob does not match: only the key-level window


def test_usd_budget_is_insufficient_quota() -> None:
    w = World()
    # 0.01 USD = 10,000 micro-USD; gpt-4o output at 10 USD/M = 10 micro-USD per token
    assert w.check(BUDGET, chat(max_tokens=500, model="gpt-4o")).allowed  # ~5,000 reserved
    d = w.check(BUDGET, chat(max_tokens=600, model="gpt-4o"))
    assert d.status == 429 and d.reason is Reason.QUOTA_EXCEEDED
    assert json.loads(d.body)["error"]["type"] == "insufficient_quota"


def test_unpriced_model_is_charged_the_highest_price() -> None:
    w = World()
    assert w.check(BUDGET, chat(max_tokens=900, model="mystery")).allowed
    assert w.policy.prices.lookup("mystery").rule == "unpriced:highest"  # the default policy
    assert w.check(BUDGET, chat(max_tokens=200, model="mystery")).status == 429


def test_concurrency_released_at_settle() -> None:
    w = World()
    assert w.check(CONC, chat(), request_id="1").allowed
    assert w.check(CONC, chat(), request_id="2").allowed
    d = w.check(CONC, chat(), request_id="3")
    assert d.reason is Reason.CONCURRENCY_LIMITED and d.status == 429
    w.settle("1")
    assert w.check(CONC, chat(), request_id="4").allowed


def test_concurrency_released_when_the_reservation_expires() -> None:
    w = World()
    assert w.check(CONC, chat(), request_id="1").allowed
    assert w.check(CONC, chat(), request_id="2").allowed
    w.now += 61  # the book's ttl is 60 s
    apply_settlements(w.counters, w.book.expire(w.now), w.now)
    assert w.check(CONC, chat(), request_id="3").allowed


def test_shadow_limit_never_denies_and_sends_no_headers() -> None:
    w = World()
    for _ in range(5):
        d = w.check(SHADOW, chat())
        assert d.allowed and d.response_headers == ()


def test_global_shadow_mode() -> None:
    w = World(POLICY_YAML + "shadow_mode: true\n")
    for _ in range(10):
        assert w.check(SMALL, chat()).allowed


def test_key_without_limits_has_no_headers() -> None:
    w = World()
    plain = KeySpec("plain")
    w.snapshot = parse_key_file(
        key_file(plain),
        "keys.yaml",
        policy=w.policy_set,
        credentials=CRED,
        pepper=PEPPER.encode(),
        loaded_at=0,
    )
    assert w.check(plain, chat()).response_headers == ()


def test_key_limits_override_plan_limits_by_name() -> None:
    policy = parse_policy(Fields(load_yaml(POLICY_YAML, "nexus.yaml"), "nexus.yaml", ""))
    own = KeySpec("own", extra={"plan": "small", "limits": [{"requests": 10, "per": "minute"}]})
    snap = parse_key_file(
        key_file(own), "keys.yaml", policy=policy, credentials=CRED, pepper=PEPPER.encode(), loaded_at=0
    )
    limits = {s.name: s.limit for s in snap.by_id["own"].limits}
    assert limits == {"requests/minute": 10, "tokens/minute": 1000}


def test_usd_limits_need_prices() -> None:
    import pytest

    from nexus_authz.core.errors import ConfigError

    with pytest.raises(ConfigError, match="prices"):
        parse_policy(
            Fields(load_yaml("plans:\n  p:\n    limits: [{usd: 1, per: day}]\n", "n.yaml"), "n.yaml", "")
        )
    no_prices = PolicySet()
    key = KeySpec("k", extra={"limits": [{"usd": 1, "per": "day"}]})
    with pytest.raises(ConfigError, match="keys\\[0\\].limits: a usd limit needs a prices table"):
        parse_key_file(
            key_file(key), "keys.yaml", policy=no_prices, credentials=CRED, pepper=b"p" * 16, loaded_at=0
        )


def test_failed_keys_throttle_the_address() -> None:
    w = World(POLICY_YAML + "auth_failures: {limit: 3, per: minute}\n")
    failures = MemoryCounterStore()

    def attempt(key: str, address: str = "203.0.113.7") -> Decision:
        req = Request("GET", "/v1/models", {"authorization": f"Bearer {key}"}, client_address=address)
        return decide_local(w.policy, w.snapshot, req, w.now, w.counters, w.book, failures)

    for i in range(3):
        assert attempt(f"nx-guess-{i}-0000000000").reason is Reason.UNKNOWN_KEY
    throttled = attempt("nx-guess-3-0000000000")
    assert throttled.status == 429 and throttled.reason is Reason.AUTH_THROTTLED
    assert int(dict(throttled.response_headers)["retry-after"]) >= 1
    # Even a valid key is refused from that address for now: no oracle for a guesser.
    assert attempt(SMALL.secret).reason is Reason.AUTH_THROTTLED
    # Other addresses are unaffected, and valid requests never count as failures.
    assert attempt(SMALL.secret, "198.51.100.1").allowed
    w.now += 20  # 3/minute: one failure drains every 20 s
    assert attempt(SMALL.secret).allowed


def test_a_guesser_does_not_lock_out_keys_already_in_use_from_its_address() -> None:
    # Issue 13.11: one guesser behind a shared egress (NAT, proxy) locked every valid key behind the same
    # address out. Keys that authenticated from the address recently still get in while it is throttled;
    # every other key, valid or not, still gets 429, so a guess that hits is not revealed.
    from nexus_authz.core.known import KNOWN_KEY_TTL

    w = World(POLICY_YAML + "auth_failures: {limit: 3, per: minute}\n")
    failures = MemoryCounterStore()

    def attempt(key: str, address: str = "203.0.113.7") -> Decision:
        req = Request("GET", "/v1/models", {"authorization": f"Bearer {key}"}, client_address=address)
        return decide_local(w.policy, w.snapshot, req, w.now, w.counters, w.book, failures)

    def guess(n: int) -> None:
        for i in range(n):
            assert attempt(f"nx-guess-{w.n}-{i}-000000").reason in (Reason.UNKNOWN_KEY, Reason.AUTH_THROTTLED)
        w.n += 1

    assert attempt(SMALL.secret).allowed  # in use from the shared address before the guessing
    assert attempt(BUDGET.secret, "198.51.100.1").allowed  # in use, but from elsewhere
    guess(10)
    assert attempt("nx-guess-final-00000000").reason is Reason.AUTH_THROTTLED
    assert attempt(SMALL.secret).allowed  # not locked out
    assert attempt(BUDGET.secret).reason is Reason.AUTH_THROTTLED  # never seen from this address
    assert attempt(GPT4.secret).reason is Reason.AUTH_THROTTLED
    # A dry run (no failure store) neither consults nor teaches the allowance.
    headers = {"authorization": f"Bearer {GPT4.secret}"}
    dry = Request("GET", "/v1/models", headers, client_address="203.0.113.7")
    assert dry_run_local(w.policy, w.snapshot, dry, w.now).allowed
    assert attempt(GPT4.secret).reason is Reason.AUTH_THROTTLED
    # The allowance lapses when the key has not been used from the address for KNOWN_KEY_TTL.
    w.now += KNOWN_KEY_TTL + 1
    guess(10)
    assert attempt(SMALL.secret).reason is Reason.AUTH_THROTTLED


def test_known_keys_refresh_at_most_once_a_minute_and_stay_bounded() -> None:
    from nexus_authz.core.known import KNOWN_KEY_TTL, REFRESH_AFTER, KnownKeys

    known = KnownKeys(max_entries=2)
    known.note("a", "k", 1000.0)
    known.note("a", "k", 1000.0 + REFRESH_AFTER - 1)  # within the minute: not refreshed
    assert known.known("a", "k", 1000.0 + KNOWN_KEY_TTL - 1)
    assert not known.known("a", "k", 1000.0 + KNOWN_KEY_TTL)  # counts from the first note
    assert not known.known("a", "other", 1000.0) and not known.known("b", "k", 1000.0)
    known.note("a", "k", 1000.0 + REFRESH_AFTER)  # a minute later: refreshed
    assert known.known("a", "k", 1000.0 + REFRESH_AFTER + KNOWN_KEY_TTL - 1)
    assert not known.known("a", "k", 1000.0 + REFRESH_AFTER + KNOWN_KEY_TTL)
    known.note("a", "k", 500.0)  # a clock that went back is taken as it is
    assert not known.known("a", "k", 500.0 + KNOWN_KEY_TTL)
    # Bounded: the least recently refreshed pair goes first.
    known.note("b", "k", 2000.0)
    known.note("a", "k", 2000.0)  # refreshes a (noted at 500): b is now the oldest
    known.note("c", "k", 2001.0)
    assert len(known) == 2
    assert known.known("a", "k", 2001.0) and known.known("c", "k", 2001.0)
    assert not known.known("b", "k", 2001.0)


def test_known_keys_keep_one_address_string_per_address() -> None:
    """Each request parses its own address string: the pairs of one address share one (bench_memory's
    bookkeeping bytes per client)."""
    from nexus_authz.core.known import KnownKeys

    known = KnownKeys()
    for i in range(3):
        known.note("".join(["192.0.2.", "7"]), f"k{i}", 1000.0)  # a new equal string each time
    addresses = {id(address) for address, _ in known._seen}
    assert len(addresses) == 1 and known.known("192.0.2.7", "k2", 1000.0)


class _RecordingCounters(MemoryCounterStore):
    """The memory store, remembering the time each adjustment says its amount was charged at."""

    def __init__(self) -> None:
        super().__init__()
        self.charged_at: list[float | None] = []

    def adjust(self, counter_ids, specs, deltas, now, charged_at=None):  # type: ignore[no-untyped-def]
        if any(deltas):
            self.charged_at.append(charged_at)
        super().adjust(counter_ids, specs, deltas, now, charged_at)


def test_tracking_only_path_settles_expired_reservations_against_the_slot_charged() -> None:
    # issue 14: the tracking-only path (a key without limits, accounting on) applied the reservations it
    # expired without their charge time, so a sliding window would refund its newest slot.
    open_key = KeySpec("open")
    w = World()
    w.snapshot = parse_key_file(
        key_file(SMALL, BUDGET, GPT4, CONC, SHADOW, open_key),
        "keys.yaml",
        policy=w.policy_set,
        credentials=CRED,
        pepper=PEPPER.encode(),
        loaded_at=0.0,
    )
    w.policy = Policy(w.policy_set, track=True)
    w.counters = _RecordingCounters()
    assert w.check(CONC, chat(), request_id="early").allowed  # charged at T0
    w.now += 61  # past the book's ttl: the next admission expires it
    assert w.check(open_key, chat(), request_id="late").allowed  # nothing to reserve: tracking only
    assert w.counters.charged_at == [T0]
