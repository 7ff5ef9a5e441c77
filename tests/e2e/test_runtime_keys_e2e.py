"""Keys managed at runtime (issue 17), end to end: two nexus-authz replicas on one real redis-server,
each behind its own real Envoy, managed through the real KeyAdminService; clients are the OpenAI SDK
and plain HTTP through Envoy."""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2

from nexus_authz._gen.nexus.authz.v1 import keys_pb2 as pb
from nexus_authz._gen.nexus.authz.v1 import keys_pb2_grpc
from nexus_authz.demo import procs
from nexus_authz.stores.ledger import query_db
from tests.e2e.stack import Stack
from tests.helpers import KeySpec
from tests.stores.conftest import REDIS_SERVER, RedisServer

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (.ci/setup installs it)"
)

TOKEN = "e2e-runtime-keys-admin-token-0123"
FILE_KEY = KeySpec("file-key")
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    directory = Path(tempfile.mkdtemp(prefix="nx-redis-"))
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


class Admin:
    """The KeyAdminService of one replica."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = keys_pb2_grpc.KeyAdminServiceStub(self.channel)  # type: ignore[no-untyped-call]

    def __call__(self, method: str, request: object) -> pb.CreateKeyResponse:
        md = (("authorization", f"Bearer {TOKEN}"),)
        return getattr(self.stub, method)(request, metadata=md, timeout=10)  # type: ignore[no-any-return]


@pytest.fixture
def replicas(redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[Stack, Admin]]]:
    root = Path(tempfile.mkdtemp(prefix="nx-rt-"))
    extra = (
        "counters:\n  backend: redis\n  redis:\n"
        f"    url: {redis.url}\n    mode: exact\n    key_prefix: 'e2e-rt:'\n    timeout: 1s\n"
        "ledger:\n  path: usage.sqlite3\n  flush_interval: 100ms\n"
    )
    out: list[tuple[Stack, Admin]] = []
    monkeypatch.setenv("NEXUS_ADMIN_TOKEN", TOKEN)
    try:
        for name in ("a", "b"):
            api = f"127.0.0.1:{procs.free_port()}"
            monkeypatch.setenv("NEXUS_API_LISTEN", api)
            (root / name).mkdir()
            stack = Stack(workdir=root / name, keys=(FILE_KEY,), extra_config=extra)
            out.append((stack, Admin(api)))
            stack.start()
        yield out
    finally:
        for stack, admin in out:
            admin.channel.close()
            stack.stop()
        shutil.rmtree(root, ignore_errors=True)


def until(predicate: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while not predicate():
        elapsed = time.monotonic() - started
        if elapsed > timeout:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(0.005)
    return time.monotonic() - started


ADMITTED = [0]  # requests answered 200 (each reached the upstream and is in a ledger)


def status(stack: Stack, secret: str) -> int:
    code = stack.post("/v1/chat/completions", CHAT, key=secret).status
    ADMITTED[0] += code == 200
    return code


def test_two_replicas_create_rotate_revoke_restore(replicas: list[tuple[Stack, Admin]]) -> None:
    (a, admin_a), (b, admin_b) = replicas

    def sdk_b(secret: str) -> str:
        """One chat completion through B's Envoy with the OpenAI SDK; its reply's text."""
        with openai.OpenAI(api_key=secret, base_url=b.gateway + "/v1", max_retries=0) as client:
            reply = client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
            return str(reply.choices[0].message.content)

    seen: list[float] = []
    ADMITTED[0] = 0

    # created on A, accepted by B (through Envoy) within a second
    limits = '[{"tokens": 1000000, "per": "day"}]'
    created = admin_a("CreateKey", pb.CreateKeyRequest(id="rt-e2e", tenant="acme", limits_json=limits))
    old = created.secret
    seen.append(until(lambda: status(b, old) == 200, 1.0))
    assert sdk_b(old)
    ADMITTED[0] += 1

    # rotated on A with a short grace: B takes the new secret, the old one works until the grace ends
    grace = duration_pb2.Duration(seconds=2)
    rotated = admin_a("RotateKey", pb.RotateKeyRequest(id="rt-e2e", grace=grace))
    new = rotated.secret
    assert rotated.key.rotation == pb.ROTATION_STATE_GRACE
    seen.append(until(lambda: status(b, new) == 200, 1.0))
    assert status(b, old) == 200 and status(a, old) == 200 and status(a, new) == 200
    until(lambda: status(b, old) == 401, 3.0)
    with pytest.raises(openai.AuthenticationError) as expired:
        sdk_b(old)
    assert expired.value.code == "expired_api_key"
    assert status(a, old) == 401 and status(a, new) == 200

    # revoked on B, refused by A within a second; restored on A, accepted by B again within a second
    admin_b("RevokeKey", pb.RevokeKeyRequest(id="rt-e2e"))
    seen.append(until(lambda: status(a, new) == 401, 1.0))
    with pytest.raises(openai.AuthenticationError) as revoked:
        sdk_b(new)
    assert revoked.value.status_code == 401
    admin_a("RestoreKey", pb.RestoreKeyRequest(id="rt-e2e"))
    seen.append(until(lambda: status(b, new) == 200, 1.0))

    # re-scoped on A: B refuses another model within a second
    admin_a("UpdateKey", pb.UpdateKeyRequest(id="rt-e2e", models=["claude-*"], set_models=True))
    seen.append(until(lambda: status(b, new) == 403, 1.0))

    # file keys are read-only to the API
    with pytest.raises(grpc.RpcError) as refused:
        admin_a("RevokeKey", pb.RevokeKeyRequest(id="file-key"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as unauthenticated:
        admin_a.stub.ListRuntimeKeys(pb.ListRuntimeKeysRequest(), timeout=5)
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    listed = admin_b("ListRuntimeKeys", pb.ListRuntimeKeysRequest())
    assert [k.id for k in listed.keys] == ["rt-e2e"] and listed.keys[0].models == ["claude-*"]

    # usage of both secrets, on both replicas, is the one key id's in the ledgers
    def ledger_requests() -> int:
        total = 0
        for stack in (a, b):
            rows = query_db(stack.workdir / "usage.sqlite3", group_by=("key_id",))
            assert {r.key_id for r in rows} <= {"rt-e2e"}
            total += sum(r.requests for r in rows)
        return total

    until(lambda: ledger_requests() >= ADMITTED[0], 10.0)
    assert ledger_requests() == ADMITTED[0]
    for stack, _ in replicas:
        log = stack.nexus_log()
        assert old not in log and new not in log
    print(
        f"propagation to the other replica through Envoy: median {statistics.median(seen) * 1000:.0f} ms, "
        f"max {max(seen) * 1000:.0f} ms"
    )
