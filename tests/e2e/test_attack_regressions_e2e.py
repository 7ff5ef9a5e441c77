"""Issue 13, "what held": the attacks that failed, kept as regression tests through the real Envoy with the
shipped configs (HTTP and gRPC ext_authz), a real `nexus-authz serve` and the mock upstream, which records
what it received.

1. duplicate / conflicting key headers never leak a client key upstream, and the request is charged to
   the key nexus-authz decided on (the one named upstream);
2. a client's own x-nexus-* identity headers and x-request-id never reach the upstream as sent;
3. path tricks are normalised or refused, never reaching a path a scoped key may not call;
4. small-body JSON tricks are refused;
5. concurrency and token limits admit exactly what fits under parallel load;
6. the policy API refuses a missing or wrong admin token on every method;
7. /metrics names no key id, tenant, secret or credential.
"""

from __future__ import annotations

import http.client as httplib
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote

import grpc
import pytest

from nexus_authz._gen.nexus.authz.v1 import policy_pb2 as pb
from nexus_authz._gen.nexus.authz.v1 import policy_pb2_grpc as pb_grpc
from nexus_authz.core import keys as keys_mod
from nexus_authz.demo import procs
from tests.e2e.stack import HttpResult, Stack, http
from tests.helpers import PEPPER, KeySpec, write_config

CREDENTIAL = "sk-upstream-test-credential"  # tests.helpers.write_config's default credential
ADMIN_TOKEN = "attack-regress-admin-token-0123456789"
EXTRA = f"""
api:
  admin_token: {{value: {ADMIN_TOKEN}}}
plans:
  alpha:
    limits:
      - {{requests: 1000, per: minute}}
  beta:
    limits:
      - {{requests: 500, per: minute}}
  usd:
    limits:
      - {{usd: 100, per: day}}
prices:
  "gpt-4o*": {{input: 2.5, output: 10}}
  "o3*": {{input: 10, output: 40}}
"""
# Distinctive ids and tenants, so a scrape of /metrics cannot contain them by coincidence.
ALPHA = KeySpec("kid-alpha-q7z", extra={"tenant": "tn-walrus-q7z", "plan": "alpha"})
BETA = KeySpec("kid-beta-q7z", extra={"tenant": "tn-narwhal-q7z", "plan": "beta"})
SCOPED = KeySpec("kid-scoped-q7z", extra={"tenant": "tn-walrus-q7z", "paths": ["/v1/chat/*"]})
RESTRICTED = KeySpec("kid-restricted-q7z", extra={"tenant": "tn-okapi-q7z", "models": ["gpt-4o*"]})
PRICED = KeySpec("kid-priced-q7z", extra={"tenant": "tn-okapi-q7z", "plan": "usd"})
CONC = KeySpec("kid-conc-q7z", extra={"tenant": "tn-tapir-q7z", "limits": [{"concurrent": 5}]})
TPM_LIMIT = 5500
TPM = KeySpec(
    "kid-tpm-q7z", extra={"tenant": "tn-tapir-q7z", "limits": [{"tokens": TPM_LIMIT, "per": "minute"}]}
)
PROBE = KeySpec(
    "kid-probe-q7z", extra={"tenant": "tn-tapir-q7z", "limits": [{"tokens": 10**7, "per": "minute"}]}
)
CLEN = KeySpec(
    "kid-clen-q7z", extra={"tenant": "tn-tapir-q7z", "limits": [{"tokens": 100000, "per": "minute"}]}
)
ALL = (ALPHA, BETA, SCOPED, RESTRICTED, PRICED, CONC, TPM, PROBE, CLEN)
LIMIT_OF = {ALPHA.id: "1000", BETA.id: "500"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}
CHAT_BYTES = json.dumps(CHAT).encode()


class ApiStack(Stack):
    """The stack with the policy API (listen.api) open on a free port."""

    api: str = ""

    def start_nexus(self) -> None:
        admin_port, api_port = procs.free_port(), procs.free_port()
        self.grpc_port = procs.free_port()
        self.config_path = write_config(
            self.workdir,
            *self.keys,
            extra=self.extra_config,
            socket=str(self.socket),
            grpc=f"127.0.0.1:{self.grpc_port}",
            admin=f"127.0.0.1:{admin_port}",
        )
        self.api = f"127.0.0.1:{api_port}"
        text = self.config_path.read_text().replace("listen:\n", f"listen:\n  api: {self.api}\n", 1)
        self.config_path.write_text(text)
        self.admin = f"http://127.0.0.1:{admin_port}"
        env = {**os.environ, "NEXUS_KEY_PEPPER": PEPPER}
        env.pop("NEXUS_ADMIN_TOKEN", None)
        env.pop("NEXUS_API_ADDR", None)
        log = open(self.workdir / "nexus.log", "ab")  # noqa: SIM115
        self.nexus = subprocess.Popen(
            [sys.executable, "-m", "nexus_authz.cli", "serve", "-c", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        procs.wait_http_ready(f"{self.admin}/readyz", timeout=20)


@pytest.fixture(params=["http", "grpc"], scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[ApiStack]:
    workdir = Path(tempfile.mkdtemp(prefix="nx-atk-"))
    s = ApiStack(workdir=workdir, mode=request.param, keys=ALL, extra_config=EXTRA)
    try:
        s.start()
        yield s
    finally:
        s.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def raw(
    stack: Stack,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes = b"",
    timeout: float = 20,
) -> HttpResult:
    """One request sent as given: repeated headers stay repeated, the path is not touched."""
    host, port = stack.gateway.removeprefix("http://").split(":")
    conn = httplib.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if body or method == "POST":
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body or None)
        resp = conn.getresponse()
        return HttpResult(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def upstream(stack: Stack) -> list[dict]:  # type: ignore[type-arg]
    assert stack.mock is not None
    return stack.mock.requests()


def clear(stack: Stack) -> None:
    assert stack.mock is not None
    stack.mock.clear()


SECRETS = [k.secret for k in ALL]


def assert_no_client_key_upstream(seen: dict) -> None:  # type: ignore[type-arg]
    flat = repr(seen)
    for secret in SECRETS:
        assert secret not in flat, f"a client key reached the upstream: {seen['headers']}"
    assert "nx-" not in repr(seen["headers"]), seen["headers"]


# -- 1. duplicate and conflicting key headers -------------------------------------------------------------

A, B = ALPHA.secret, BETA.secret
KEY_HEADER_CASES: dict[str, list[tuple[str, str]]] = {
    "two-authorization-a-b": [("authorization", f"Bearer {A}"), ("authorization", f"Bearer {B}")],
    "two-authorization-b-a": [("authorization", f"Bearer {B}"), ("authorization", f"Bearer {A}")],
    "two-authorization-same": [("authorization", f"Bearer {A}"), ("authorization", f"Bearer {A}")],
    "authorization-x-api-key-api-key": [
        ("authorization", f"Bearer {A}"),
        ("x-api-key", B),
        ("api-key", B + "-but-changed"),
    ],
    "x-api-key-and-api-key": [("x-api-key", B), ("api-key", A)],
    "valid-authorization-junk-x-api-key": [("authorization", f"Bearer {A}"), ("x-api-key", "nx-junk-0000")],
    "junk-authorization-valid-x-api-key": [("authorization", "Bearer nx-junk-0001"), ("x-api-key", A)],
    "basic-authorization-valid-x-api-key": [("authorization", "Basic dXNlcjpwYXNz"), ("x-api-key", B)],
    "valid-and-junk-authorization": [("authorization", f"Bearer {A}"), ("authorization", "Bearer nx-junk-2")],
    "comma-joined-authorization": [("authorization", f"Bearer {A}, Bearer {B}")],
    "comma-joined-x-api-key": [("x-api-key", f"{A}, {B}")],
    "comma-joined-x-api-key-no-space": [("x-api-key", f"{A},{B}")],
    "two-x-api-key": [("x-api-key", A), ("x-api-key", B)],
    "two-api-key": [("api-key", B), ("api-key", A)],
}


@pytest.mark.parametrize("case", list(KEY_HEADER_CASES))
def test_duplicate_key_headers_never_leak_a_key_nor_cross_keys(stack: Stack, case: str) -> None:
    clear(stack)
    headers = [("content-type", "application/json"), *KEY_HEADER_CASES[case]]
    resp = raw(stack, "POST", "/v1/chat/completions", headers, CHAT_BYTES)
    assert resp.status in (200, 400, 401), (resp.status, resp.body[:300])
    seen = upstream(stack)
    if resp.status != 200:
        assert seen == [], "a refused request reached the upstream"
        return
    (got,) = seen
    assert_no_client_key_upstream(got)
    h = got["headers"]
    assert h["authorization"] == f"Bearer {CREDENTIAL}"  # exactly the credential, one value
    assert "x-api-key" not in h and "api-key" not in h, h
    # The key named upstream is the key whose limits were applied: one decision, one key.
    key_id = h["x-nexus-key-id"]
    assert key_id in LIMIT_OF, h
    assert resp.headers["x-ratelimit-limit-requests"] == LIMIT_OF[key_id], (key_id, resp.headers)
    # And that key was one of the valid keys the client actually sent.
    sent = " ".join(v for _, v in KEY_HEADER_CASES[case])
    assert {ALPHA.id: A, BETA.id: B}[key_id] in sent


# -- 2. client identity headers and request id ------------------------------------------------------------

SPOOFED = {
    "x-nexus-key-id": BETA.id,
    "x-nexus-tenant": str(BETA.extra["tenant"]),
    "x-request-id": "client-chosen-request-id-q7z",
    # every other x-nexus-* header is nexus-authz's too: dropped by the shipped configs
    "x-nexus-release": "client-chosen-release-zz9",
    "x-nexus-content-length": "12345",
    "x-nexus-anything": "client-chosen-zz9",
}


def test_client_identity_headers_and_request_id_never_reach_the_upstream(stack: Stack) -> None:
    clear(stack)
    headers = [("content-type", "application/json"), ("authorization", f"Bearer {A}")]
    headers += list(SPOOFED.items())
    headers += [(name, value + "-again") for name, value in SPOOFED.items()]  # and repeated
    resp = raw(stack, "POST", "/v1/chat/completions", headers, CHAT_BYTES)
    assert resp.status == 200, resp.body[:300]
    assert resp.headers["x-ratelimit-limit-requests"] == "1000"  # alpha's limits, not beta's
    (got,) = upstream(stack)
    h = got["headers"]
    assert h["x-nexus-key-id"] == ALPHA.id and h["x-nexus-tenant"] == ALPHA.extra["tenant"], h
    assert "client-chosen" not in h.get("x-request-id", ""), h
    assert h.get("x-request-id"), "Envoy sets its own request id"
    assert BETA.id not in repr(h) and "tn-narwhal" not in repr(h), h
    assert "zz9" not in repr(h) and "12345" not in repr(h), h  # no client x-nexus-* reaches the upstream
    assert {name for name in h if name.startswith("x-nexus-")} == {"x-nexus-key-id", "x-nexus-tenant"}, h


@pytest.mark.parametrize(
    ("size", "declared", "admitted"),
    [(len(CHAT_BYTES), 10_000_000, True), (600_000, 100, False)],
    ids=["small-body-declared-huge", "cut-body-declared-tiny"],
)
def test_a_client_x_nexus_content_length_is_not_believed(
    stack: Stack, size: int, declared: int, admitted: bool
) -> None:
    """The shipped configs tell nexus the client's Content-Length in x-nexus-content-length (HTTP) or
    content-length (gRPC); a client's own x-nexus-content-length changes nothing. 100k tokens/minute:
    a 600 kB body (cut at 256 KiB; ~410k tokens reserved for its whole length) never fits, a small one
    does, whatever x-nexus-content-length the client sends."""
    clear(stack)
    body = CHAT_BYTES if size == len(CHAT_BYTES) else b'{"model":"gpt-4o","x":"' + b"a" * (size - 25) + b'"}'
    headers = [
        ("content-type", "application/json"),
        ("authorization", f"Bearer {CLEN.secret}"),
        ("x-nexus-content-length", str(declared)),
    ]
    resp = raw(stack, "POST", "/v1/chat/completions", headers, body)
    if admitted:
        assert resp.status == 200, resp.body[:300]
        assert len(upstream(stack)) == 1
    else:
        assert resp.status in (413, 429), (resp.status, resp.body[:300])
        assert upstream(stack) == []


def test_a_client_request_id_cannot_share_a_concurrency_slot(stack: Stack) -> None:
    """Two requests with the same client x-request-id each hold their own slot (the id nexus keys
    reservations on is Envoy's, never the client's), and both slots are freed."""
    clear(stack)
    headers = [
        ("content-type", "application/json"),
        ("authorization", f"Bearer {CONC.secret}"),
        ("x-request-id", "client-chosen-shared-id"),
        ("x-mock-delay-ms", "300"),
    ]
    with ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(lambda _: raw(stack, "POST", "/v1/chat/completions", headers, CHAT_BYTES), range(2))
        )
    assert [r.status for r in results] == [200, 200]
    ids = {r["headers"]["x-request-id"] for r in upstream(stack)}
    assert len(ids) == 2 and "client-chosen-shared-id" not in ids, ids


# -- 3. path tricks ---------------------------------------------------------------------------------------


def strictest_reading(path: str) -> str:
    """The path as the most liberal upstream could read it: percent-decoded (twice), `\\` as `/`,
    `;parameters` dropped from each segment, dot-segments and repeated slashes resolved."""
    p = unquote(unquote(path.split("?", 1)[0])).replace("\\", "/").replace("\x00", "")
    p = "/".join(seg.split(";", 1)[0] for seg in p.split("/"))
    return posixpath.normpath("/" + p.lstrip("/"))


PATH_TRICKS = [
    "/v1/chat/../messages",
    "/v1/chat/../../v1/messages",
    "/v1/chat/%2e%2e/messages",
    "/v1/chat/%2E%2E/messages",
    "/v1/chat/.%2e/messages",
    "/v1/chat/%252e%252e/messages",
    "/v1/chat/./../messages",
    "//v1/messages",
    "/v1//messages",
    "/v1/chat//../messages",
    "/v1/chat/..;/messages",
    "/v1/chat;/../messages",
    "/v1/chat/completions;/../../messages",
    "/v1/chat/..\\messages",
    "/v1/chat\\..\\..\\v1\\messages",
    "/v1/chat/%00/../messages",
    "/v1/chat/completions%00/../../messages",
    "/v1/chat/%2e%2e%2fmessages",
    "/v1/chat/%2e%2e%5cmessages",
]


@pytest.mark.parametrize("path", PATH_TRICKS)
def test_path_tricks_never_reach_a_path_outside_the_scope(stack: Stack, path: str) -> None:
    clear(stack)
    headers = [("content-type", "application/json"), ("authorization", f"Bearer {SCOPED.secret}")]
    resp = raw(stack, "POST", path, headers, CHAT_BYTES)
    seen = upstream(stack)
    if not seen:  # refused: by Envoy (400) or by nexus-authz (403)
        assert resp.status in (400, 403), (resp.status, resp.body[:200])
        return
    # Admitted (the upstream's own answer may be a 404): whatever reached the upstream must lie inside
    # /v1/chat/ however the upstream reads it.
    for got in seen:
        assert strictest_reading(got["path"]).startswith("/v1/chat/"), (path, got["path"], resp.status)
        assert_no_client_key_upstream(got)


@pytest.mark.parametrize(
    ("path", "normalised"),
    [
        ("/v1/chat/../chat/completions", "/v1/chat/completions"),
        ("/v1/chat/%2e%2e/chat/completions", "/v1/chat/completions"),
        ("//v1//chat///completions", "/v1/chat/completions"),
        ("/v1/./chat/completions", "/v1/chat/completions"),
    ],
)
def test_paths_within_scope_arrive_normalised(stack: Stack, path: str, normalised: str) -> None:
    clear(stack)
    headers = [("content-type", "application/json"), ("authorization", f"Bearer {SCOPED.secret}")]
    resp = raw(stack, "POST", path, headers, CHAT_BYTES)
    assert resp.status == 200, (resp.status, resp.body[:200])
    assert [r["path"] for r in upstream(stack)] == [normalised]


def test_a_scoped_key_is_refused_outside_its_scope(stack: Stack) -> None:
    # The control for the tricks above: the plain path is refused by nexus-authz itself.
    clear(stack)
    headers = [("content-type", "application/json"), ("authorization", f"Bearer {SCOPED.secret}")]
    resp = raw(stack, "POST", "/v1/messages", headers, CHAT_BYTES)
    assert resp.status == 403 and upstream(stack) == []


# -- 4. small-body JSON tricks ----------------------------------------------------------------------------

MSGS = b'"messages":[{"role":"user","content":"hi"}]'
JSON_TRICKS = {
    "duplicate-model": b'{"model":"gpt-4o",' + MSGS + b',"model":"o3-mini"}',
    "duplicate-model-reversed": b'{"model":"o3-mini",' + MSGS + b',"model":"gpt-4o"}',
    "escaped-duplicate": b'{"model":"gpt-4o",' + MSGS + b',"mod\\u0065l":"o3-mini"}',
    "escaped-first": b'{"mod\\u0065l":"o3-mini",' + MSGS + b',"model":"gpt-4o"}',
    "escaped-value-duplicate": b'{"model":"gpt-4o",' + MSGS + b',"model":"\\u006f3-mini"}',
    "nested-decoy-only": b'{"metadata":{"model":"gpt-4o"},' + MSGS + b"}",
    "bom": b'\xef\xbb\xbf{"model":"gpt-4o",' + MSGS + b"}",
    "utf16le": '{"model":"gpt-4o","messages":[]}'.encode("utf-16-le"),
    "utf16-bom": '{"model":"gpt-4o","messages":[]}'.encode("utf-16"),
    "utf16le-decoy": json.dumps(
        {"x": b'"model":"gpt-4o"'.decode("utf-16-le"), "model": "o3-mini", "messages": []}, ensure_ascii=False
    ).encode("utf-16-le"),
    "utf32": '{"model":"gpt-4o","messages":[]}'.encode("utf-32"),
}
JSON_CASES = [(key, trick) for key in (RESTRICTED, PRICED) for trick in JSON_TRICKS]
# A priced key with no top-level model is priced at no model; only the restricted key must refuse it.
JSON_CASES.remove((PRICED, "nested-decoy-only"))


@pytest.mark.parametrize(("key", "trick"), JSON_CASES, ids=[f"{k.id}-{t}" for k, t in JSON_CASES])
def test_small_body_json_tricks_are_refused(stack: Stack, key: KeySpec, trick: str) -> None:
    clear(stack)
    body = JSON_TRICKS[trick]
    assert len(body) < 16 * 1024
    headers = [("content-type", "application/json"), ("authorization", f"Bearer {key.secret}")]
    resp = raw(stack, "POST", "/v1/chat/completions", headers, body)
    assert resp.status in (400, 403), (resp.status, resp.body[:300])
    assert resp.json()["error"]["code"]
    assert upstream(stack) == []


def test_the_plain_small_body_is_admitted(stack: Stack) -> None:
    # The control: the same keys with an honest body.
    clear(stack)
    body = b'{"model":"gpt-4o",' + MSGS + b"}"
    for key in (RESTRICTED, PRICED):
        headers = [("content-type", "application/json"), ("authorization", f"Bearer {key.secret}")]
        assert raw(stack, "POST", "/v1/chat/completions", headers, body).status == 200
    assert len(upstream(stack)) == 2


# -- 5. limits under parallel load ------------------------------------------------------------------------


def _parallel(stack: Stack, key: KeySpec, n: int, body: bytes, hold_ms: int) -> list[HttpResult]:
    headers = {
        "content-type": "application/json",
        "authorization": f"Bearer {key.secret}",
        "x-mock-delay-ms": str(hold_ms),
    }
    with ThreadPoolExecutor(n) as pool:
        return list(
            pool.map(
                lambda _: http("POST", stack.gateway + "/v1/chat/completions", headers, body, 20), range(n)
            )
        )


def test_concurrency_admits_exactly_the_limit_in_parallel(stack: Stack) -> None:
    clear(stack)
    results = _parallel(stack, CONC, 20, CHAT_BYTES, hold_ms=2000)
    statuses = [r.status for r in results]
    assert statuses.count(200) == 5 and statuses.count(429) == 15, statuses
    assert len(upstream(stack)) == 5
    # The slots are free again once the held responses have ended.
    deadline = time.monotonic() + 5
    while True:
        again = [r.status for r in _parallel(stack, CONC, 5, CHAT_BYTES, hold_ms=0)]
        if again == [200] * 5 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert again == [200] * 5


def test_tokens_per_minute_admit_only_reservations_that_fit(stack: Stack) -> None:
    body = json.dumps({**CHAT, "max_tokens": 1000}).encode()
    # What one such request reserves, read from the headers of a key with room to spare.
    probe = http(
        "POST",
        stack.gateway + "/v1/chat/completions",
        {"content-type": "application/json", "authorization": f"Bearer {PROBE.secret}"},
        body,
    )
    assert probe.status == 200
    reserved = int(probe.headers["x-ratelimit-limit-tokens"]) - int(
        probe.headers["x-ratelimit-remaining-tokens"]
    )
    fits = TPM_LIMIT // reserved
    assert fits == 5, reserved  # the limit is sized for five
    clear(stack)
    results = _parallel(stack, TPM, 20, body, hold_ms=1500)
    statuses = [r.status for r in results]
    assert statuses.count(200) == fits and statuses.count(429) == 20 - fits, statuses
    assert len(upstream(stack)) == fits
    admitted = [r for r in results if r.status == 200]
    remaining = sorted(int(r.headers["x-ratelimit-remaining-tokens"]) for r in admitted)
    # the last admission left less than one more reservation, and never went below zero
    assert 0 <= remaining[0] < reserved, (remaining, reserved)
    assert len(set(remaining)) == fits  # each admission saw the others' reservations


# -- 6. the policy API ------------------------------------------------------------------------------------

API_CALLS: list[tuple[str, object]] = [
    ("GetKey", pb.GetKeyRequest(key_id=ALPHA.id)),
    ("ListKeys", pb.ListKeysRequest()),
    ("GetLimitStatus", pb.GetLimitStatusRequest(key_id=ALPHA.id)),
    ("GetUsage", pb.GetUsageRequest()),
    ("Check", pb.CheckRequest(key_id=ALPHA.id)),
]
BAD_METADATA: dict[str, tuple[tuple[str, str], ...] | None] = {
    "none": None,
    "empty-bearer": (("authorization", "Bearer "),),
    "wrong": (("authorization", "Bearer wrong-admin-token-0123456789abc"),),
    "token-plus-one": (("authorization", f"Bearer {ADMIN_TOKEN}x"),),
    "token-prefix": (("authorization", f"Bearer {ADMIN_TOKEN[:-1]}"),),
    "basic-scheme": (("authorization", f"Basic {ADMIN_TOKEN}"),),
    "no-scheme": (("authorization", ADMIN_TOKEN),),
    "x-api-key": (("x-api-key", ADMIN_TOKEN),),
    "virtual-key": (("authorization", f"Bearer {ALPHA.secret}"),),
    "provider-credential": (("authorization", f"Bearer {CREDENTIAL}"),),
}


def test_the_policy_api_refuses_missing_or_wrong_tokens_on_every_method(stack: ApiStack) -> None:
    with grpc.insecure_channel(stack.api) as channel:
        stub = pb_grpc.PolicyServiceStub(channel)
        for method, request in API_CALLS:
            call = getattr(stub, method)
            for name, metadata in BAD_METADATA.items():
                with pytest.raises(grpc.RpcError) as info:
                    call(request, metadata=metadata, timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method, name)
                assert ADMIN_TOKEN not in (info.value.details() or "")
            # the right token works (the refusals above are about the token)
            call(request, metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),), timeout=10)
    assert ADMIN_TOKEN not in stack.nexus_log()


# -- 7. /metrics ------------------------------------------------------------------------------------------


def test_metrics_name_no_key_tenant_secret_or_credential(stack: Stack) -> None:
    post = "/v1/chat/completions"
    for key in (ALPHA, BETA, SCOPED, RESTRICTED, PRICED, CONC, PROBE):
        headers = {"content-type": "application/json", "authorization": f"Bearer {key.secret}"}
        assert http("POST", stack.gateway + post, headers, CHAT_BYTES).status == 200
        denied = http("POST", stack.gateway + post, headers, json.dumps({**CHAT, "model": "o3"}).encode())
        assert denied.status in (200, 403)
    assert (
        http("POST", stack.gateway + "/v1/messages", {"x-api-key": SCOPED.secret}, CHAT_BYTES).status == 403
    )
    assert (
        http("POST", stack.gateway + post, {"x-api-key": "nx-unknown-q7z-0123456789"}, CHAT_BYTES).status
        == 401
    )
    time.sleep(0.5)  # the access-log batches (buffer_flush_interval 0.02 s) reach accounting
    text = http("GET", stack.admin + "/metrics").body.decode()
    # the scrape reflects the traffic (so the absence checks below are about a real page)
    allowed = sum(
        float(v)
        for v in re.findall(r'^nexus_authz_decisions_total\{[^}]*result="allow"[^}]*\} (\S+)$', text, re.M)
    )
    assert allowed >= 7, text[:2000]
    forbidden = [CREDENTIAL, PEPPER, ADMIN_TOKEN, "nx-", "q7z", "walrus", "narwhal", "okapi", "tapir"]
    for key in ALL:
        forbidden += [key.id, key.secret, keys_mod.format_hash(PEPPER.encode(), key.secret).split(":")[1]]
        forbidden.append(str(key.extra.get("tenant", "")))
    leaked = sorted({word for word in forbidden if word and word in text})
    assert leaked == [], leaked
