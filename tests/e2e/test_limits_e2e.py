"""Limits through the real Envoy: 429s with headers an OpenAI SDK acts on, and exactness under concurrency."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import openai
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.adapters.test_envoy_authz import check_request
from tests.e2e.stack import Stack, http
from tests.helpers import KeySpec

LIMITS = """
plans:
  five:
    limits:
      - {requests: 5, per: minute}
      - {tokens: 100000, per: minute}
  burst:
    limits:
      - {requests: 20, per: hour}
"""
FIVE = KeySpec("five", extra={"plan": "five"})
SDK = KeySpec("sdk", extra={"plan": "five"})
BURST = KeySpec("burst", extra={"plan": "burst"})
TOKENS = KeySpec("tokens", extra={"limits": [{"tokens": 100000, "per": "day"}]})
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20}


@pytest.fixture(params=["http", "grpc"], scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    workdir = Path(tempfile.mkdtemp(prefix="nx-lim-"))
    s = Stack(workdir=workdir, mode=request.param, keys=(FIVE, SDK, BURST, TOKENS), extra_config=LIMITS)
    try:
        s.start()
        yield s
    finally:
        s.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_the_sixth_request_gets_429_with_headers(stack: Stack) -> None:
    for i in range(5):
        resp = stack.post("/v1/chat/completions", CHAT, key=FIVE.secret)
        assert resp.status == 200, resp.body
        assert resp.headers["x-ratelimit-limit-requests"] == "5"
        assert resp.headers["x-ratelimit-remaining-requests"] == str(4 - i)
        assert "x-ratelimit-remaining-tokens" in resp.headers and "ratelimit-policy" in resp.headers
        assert "ratelimit" in resp.headers  # the default: both families
    resp = stack.post("/v1/chat/completions", CHAT, key=FIVE.secret)
    assert resp.status == 429
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert error["type"] == "rate_limit_exceeded" and error["code"] == "rate_limit_exceeded"
    assert 1 <= int(resp.headers["retry-after"]) <= 12
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"
    assert "ratelimit" in resp.headers


def test_openai_sdk_raises_rate_limit_error(stack: Stack) -> None:
    client = openai.OpenAI(api_key=SDK.secret, base_url=stack.gateway + "/v1", max_retries=0)
    for _ in range(5):
        completion = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}], max_tokens=20
        )
        assert completion.usage is not None and completion.usage.total_tokens > 0
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}], max_tokens=20
        )
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"]
    client.close()


async def _concurrent_http(stack: Stack, n: int) -> list[int]:
    body = b'{"model":"gpt-4o-mini"}'
    request = (
        b"POST /ext_authz/v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-api-key: %s\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\nx-nexus-content-length: %d\r\n\r\n%s"
        % (BURST.secret.encode(), len(body), len(body), body)
    )

    async def one() -> int:
        reader, writer = await asyncio.open_unix_connection(str(stack.socket))
        writer.write(request)
        await writer.drain()
        status_line = await reader.readline()
        writer.close()
        return int(status_line.split()[1])

    return list(await asyncio.gather(*(one() for _ in range(n))))


async def _concurrent_grpc(stack: Stack, n: int) -> list[int]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        req = check_request({"x-api-key": BURST.secret}, b'{"model":"gpt-4o-mini"}')
        responses = await asyncio.gather(*(stub.Check(req) for _ in range(n)))
    return [200 if r.HasField("ok_response") else r.denied_response.status.code for r in responses]


def test_concurrent_checks_admit_exactly_the_limit(stack: Stack) -> None:
    # 100 checks at once against one key with 20/hour, straight to nexus-authz over this transport.
    run = _concurrent_http if stack.mode == "http" else _concurrent_grpc
    statuses = asyncio.run(run(stack, 100))
    assert statuses.count(200) == 20
    assert statuses.count(429) == 80


def test_requests_that_generate_nothing_reserve_no_completion_tokens(stack: Stack) -> None:
    """Issue 18 item 5: GET /v1/models generates nothing: it must not hold default_max_tokens."""
    remaining = []
    for _ in range(3):
        resp = stack.get("/v1/models", key=TOKENS.secret)
        assert resp.status == 200, resp.body
        remaining.append(int(resp.headers["x-ratelimit-remaining-tokens"]))
    assert remaining == [100000] * 3, remaining


# -- issue 18 item 3: a one-at-a-time client never gets a concurrency 429 -----------------------------

ONE_AT_A_TIME = KeySpec("one-at-a-time", extra={"limits": [{"concurrent": 1}]})
FIFTY = KeySpec("fifty", extra={"limits": [{"concurrent": 50}]})


@pytest.fixture(params=["http", "grpc"], scope="module")
def solo_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    workdir = Path(tempfile.mkdtemp(prefix="nx-solo-"))
    s = Stack(workdir=workdir, mode=request.param, keys=(ONE_AT_A_TIME, FIFTY))
    try:
        s.start()
        yield s
    finally:
        s.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_concurrent_one_admits_back_to_back_requests(solo_stack: Stack, stream: bool) -> None:
    """`concurrent: 1` and a client that waits for each response before sending the next: every request
    is admitted. The slot must be free by the time the client has the whole response, not when the
    batched access log arrives (up to buffer_flush_interval later)."""
    body = {**CHAT, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    statuses = []
    for _ in range(20):
        resp = solo_stack.post("/v1/chat/completions", body, key=ONE_AT_A_TIME.secret)
        statuses.append(resp.status)
    assert statuses == [200] * 20, statuses


def _metrics(stack: Stack) -> tuple[dict[str, float], float]:
    """nexus_authz_slot_releases_total by `via`, and nexus_authz_reservations_in_flight."""
    text = http("GET", stack.admin + "/metrics").body.decode()
    releases: dict[str, float] = {}
    in_flight = -1.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "nexus_authz_slot_releases_total":
                releases[sample.labels["via"]] = sample.value
            elif sample.name == "nexus_authz_reservations_in_flight":
                in_flight = sample.value
    return releases, in_flight


def _settled(stack: Stack) -> dict[str, float]:
    """The slot releases once every admitted request is settled (the access log has arrived)."""
    deadline = time.monotonic() + 10
    while True:
        releases, in_flight = _metrics(stack)
        if in_flight == 0:
            return releases
        assert time.monotonic() < deadline, (releases, in_flight)
        time.sleep(0.05)


def test_a_key_far_from_its_concurrency_limit_costs_no_release_call(solo_stack: Stack) -> None:
    """Issue 15: `concurrent: 50` and 3 clients sending back-to-back requests. No request is refused,
    and the access log (flushed every 0.02 s) frees the slots: the first 24 admissions cannot be marked
    for the Lua tap's release call (fewer than 25 of the 50 slots can be taken after them), so the
    release endpoint is not called for them; later ones are marked only if the access log lags behind
    by 25 requests (a loaded machine)."""
    clients = 3
    before = _settled(solo_stack)

    def run(per_client: int) -> list[int]:
        def client(_: int) -> list[int]:
            return [
                solo_stack.post("/v1/chat/completions", CHAT, key=FIFTY.secret).status
                for _ in range(per_client)
            ]

        with ThreadPoolExecutor(clients) as pool:
            return [status for statuses in pool.map(client, range(clients)) for status in statuses]

    early = run(8)
    assert early == [200] * 24, early
    after_early = _settled(solo_stack)
    assert after_early["proxy"] == before["proxy"], (before, after_early)
    assert after_early["access_log"] - before["access_log"] == 24, (before, after_early)
    rest = run(52)
    assert rest == [200] * 156, rest
    after = _settled(solo_stack)
    freed = after["proxy"] + after["access_log"] - after_early["proxy"] - after_early["access_log"]
    assert freed == 156, (after_early, after)


# -- the policy's rate_limit_headers: only the chosen header families reach the client ------------------

OPENAI_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)
IETF_HEADERS = ("ratelimit", "ratelimit-policy")


@pytest.fixture(
    params=[("http", "[openai]"), ("grpc", "[openai]"), ("http", "[]"), ("grpc", "[]")],
    ids=lambda p: f"{p[0]}-{p[1]}",
    scope="module",
)
def chosen_stack(request: pytest.FixtureRequest) -> Iterator[tuple[Stack, str]]:
    mode, choice = request.param
    workdir = Path(tempfile.mkdtemp(prefix="nx-hdr-"))
    s = Stack(
        workdir=workdir, mode=mode, keys=(FIVE,), extra_config=LIMITS + f"rate_limit_headers: {choice}\n"
    )
    try:
        s.start()
        yield s, choice
    finally:
        s.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_only_the_chosen_header_families_reach_the_client(chosen_stack: tuple[Stack, str]) -> None:
    stack, choice = chosen_stack
    openai_sent = choice == "[openai]"
    for i in range(5):
        resp = stack.post("/v1/chat/completions", CHAT, key=FIVE.secret)
        assert resp.status == 200, resp.body
        assert all((name in resp.headers) == openai_sent for name in OPENAI_HEADERS), resp.headers
        assert not any(name in resp.headers for name in IETF_HEADERS), resp.headers
        if openai_sent:
            assert resp.headers["x-ratelimit-remaining-requests"] == str(4 - i)
    resp = stack.post("/v1/chat/completions", CHAT, key=FIVE.secret)
    assert resp.status == 429
    assert 1 <= int(resp.headers["retry-after"]) <= 12  # always sent on a denial
    assert all((name in resp.headers) == openai_sent for name in OPENAI_HEADERS), resp.headers
    assert not any(name in resp.headers for name in IETF_HEADERS), resp.headers
