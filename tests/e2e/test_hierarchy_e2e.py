"""The budget hierarchy through the real Envoy with the OpenAI SDK: a tenant budget shared by two keys,
spent by one, refuses both with 429 `insufficient_quota` naming the tenant (memory counters, and Redis
exact mode: every level charged in one script); a runtime key (created through the KeyAdminService)
shares it with the file keys of its tenant."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest

from nexus_authz._gen.nexus.authz.v1 import keys_pb2 as pb
from nexus_authz._gen.nexus.authz.v1 import keys_pb2_grpc
from nexus_authz.demo import procs
from tests.e2e.stack import Stack
from tests.helpers import KeySpec
from tests.stores.conftest import REDIS_SERVER, RedisServer

# 100 USD per million tokens: 100 micro-USD a token; the tenant's month is 0.01 USD = 10,000 micro-USD,
# and one request reserves (its prompt + 20 completion tokens) x 100, about 3,000.
TENANTS = """
prices:
  "gpt-4o-mini*": {input: 100, output: 100}
tenants:
  acme:
    limits:
      - {usd: 0.01, per: month}
    groups:
      research:
        limits:
          - {requests: 1000, per: minute}
"""
SPENDER = KeySpec("spender", extra={"tenant": "acme", "group": "research"})
SIBLING = KeySpec("sibling", extra={"tenant": "acme"})
OUTSIDER = KeySpec("outsider", extra={"tenant": "initech"})
MESSAGE = "You exceeded your current quota (budget) for tenant acme: usd/month."


@pytest.fixture(params=["memory", "redis-exact"], scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    workdir = Path(tempfile.mkdtemp(prefix="nx-hier-"))
    redis: RedisServer | None = None
    extra = TENANTS
    if request.param == "redis-exact":
        if REDIS_SERVER is None:
            pytest.skip("redis-server is not installed (.ci/setup installs it)")
        redis = RedisServer(workdir / "redis")
        redis.start()
        extra += f"counters:\n  backend: redis\n  redis:\n    url: {redis.url}\n    mode: exact\n"
    s = Stack(workdir=workdir, keys=(SPENDER, SIBLING, OUTSIDER), extra_config=extra)
    try:
        s.start()
        yield s
    finally:
        s.stop()
        if redis is not None:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def ask(client: openai.OpenAI) -> object:
    return client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}], max_tokens=20
    )


def test_a_tenant_budget_spent_by_one_key_refuses_both(stack: Stack) -> None:
    spender = openai.OpenAI(api_key=SPENDER.secret, base_url=stack.gateway + "/v1", max_retries=0)
    sibling = openai.OpenAI(api_key=SIBLING.secret, base_url=stack.gateway + "/v1", max_retries=0)
    outsider = openai.OpenAI(api_key=OUTSIDER.secret, base_url=stack.gateway + "/v1", max_retries=0)
    try:
        spent = 0
        with pytest.raises(openai.RateLimitError) as info:
            for _ in range(10):  # each spends its real usage once settled; the budget lasts a few
                ask(spender)
                spent += 1
                time.sleep(0.3)  # the access log settles the usage (batched, up to 0.2 s)
        assert spent >= 2  # the budget admitted real requests before it ran out
        error = info.value
        assert error.status_code == 429 and error.code == "insufficient_quota"
        assert error.type == "insufficient_quota" and error.message.endswith(MESSAGE)
        assert error.body == {
            "message": MESSAGE,
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
        headers = error.response.headers
        assert '"tenant:usd/month";q=10000;qu="usd-micros"' in headers["ratelimit-policy"]
        assert int(headers["retry-after"]) >= 1

        # the sibling key never sent a request: the tenant's budget refuses it all the same
        with pytest.raises(openai.RateLimitError) as info:
            ask(sibling)
        assert info.value.code == "insufficient_quota" and info.value.message.endswith(MESSAGE)
        assert '"tenant:usd/month";r=' in info.value.response.headers["ratelimit"]

        completion = ask(outsider)  # another tenant: its own (unlimited) budget
        assert completion.usage is not None  # type: ignore[attr-defined]
    finally:
        for client in (spender, sibling, outsider):
            client.close()


# -- runtime keys (issue 17) take part in the hierarchy: created through the real KeyAdminService -------
ADMIN_TOKEN = "e2e-hierarchy-admin-token-0123456789"


@pytest.fixture(params=["memory", "redis-exact"])
def runtime_stack(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Stack, str]]:
    """A stack with the policy API on (runtime keys: SQLite with memory counters, Redis with Redis)."""
    workdir = Path(tempfile.mkdtemp(prefix="nx-hier-rt-"))
    redis: RedisServer | None = None
    extra = TENANTS
    if request.param == "redis-exact":
        if REDIS_SERVER is None:
            pytest.skip("redis-server is not installed (.ci/setup installs it)")
        redis = RedisServer(workdir / "redis")
        redis.start()
        extra += f"counters:\n  backend: redis\n  redis:\n    url: {redis.url}\n    mode: exact\n"
    api = f"127.0.0.1:{procs.free_port()}"
    monkeypatch.setenv("NEXUS_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("NEXUS_API_LISTEN", api)
    s = Stack(workdir=workdir, keys=(SIBLING, OUTSIDER), extra_config=extra)
    try:
        s.start()
        yield s, api
    finally:
        s.stop()
        if redis is not None:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_runtime_key_spends_the_tenant_budget_its_file_keys_share(runtime_stack: tuple[Stack, str]) -> None:
    stack, api = runtime_stack
    md = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    with grpc.insecure_channel(api) as channel:
        admin = keys_pb2_grpc.KeyAdminServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as bad:
            admin.CreateKey(
                pb.CreateKeyRequest(id="rt", tenant="acme", group="sales"), metadata=md, timeout=10
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "group: tenant 'acme' has no group 'sales' (groups: research)" in str(bad.value.details())
        created = admin.CreateKey(
            pb.CreateKeyRequest(id="rt", tenant="acme", group="research"), metadata=md, timeout=10
        )
    spender = openai.OpenAI(api_key=created.secret, base_url=stack.gateway + "/v1", max_retries=0)
    sibling = openai.OpenAI(api_key=SIBLING.secret, base_url=stack.gateway + "/v1", max_retries=0)
    outsider = openai.OpenAI(api_key=OUTSIDER.secret, base_url=stack.gateway + "/v1", max_retries=0)
    try:
        spent = 0
        with pytest.raises(openai.RateLimitError) as info:
            for _ in range(10):
                ask(spender)
                spent += 1
                time.sleep(0.3)  # the access log settles the usage (batched, up to 0.2 s)
        assert spent >= 2
        assert info.value.code == "insufficient_quota" and info.value.message.endswith(MESSAGE)
        # the file key of the tenant never sent a request: the runtime key spent their shared budget
        with pytest.raises(openai.RateLimitError) as info:
            ask(sibling)
        assert info.value.code == "insufficient_quota" and info.value.message.endswith(MESSAGE)
        assert ask(outsider).usage is not None  # type: ignore[attr-defined]
    finally:
        for client in (spender, sibling, outsider):
            client.close()
