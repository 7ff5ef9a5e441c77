"""Through-Envoy benchmark: latency nexus-authz adds to a real Envoy, and its CPU per request.

The method is the one in the performance issue: every scenario is a real Envoy 1.40 in front of the mock
upstream (``nexus_authz.demo.mock_upstream``, its own process), loaded open loop at a fixed rate with
evenly spaced arrivals (benchmarks/harness.py), interleaved A,B,C,A,B,C,... with medians across rounds,
CPU read from /proc over the measured window only. Built-in scenarios:

  envoy     Envoy alone: envoy/envoy.yaml with the filters that call nexus-authz removed (structurally,
            here): ext_authz, and token accounting (the Lua usage tap and the gRPC access log, or ext_proc)
  http-uds  Envoy + nexus-authz, HTTP ext_authz over the Unix socket (envoy/envoy.yaml as it is: the
            default, token accounting by the Lua usage tap + gRPC access log)
  grpc      Envoy + nexus-authz, gRPC ext_authz (envoy/envoy-grpc.yaml as it is: Check and the access log
            on the check socket's HTTP/2; ``grpc-issue15-port``: on the gRPC port, grpc.aio)

A template's accounting clusters (``nexus_als``, ``nexus_extproc``) are pointed at the scenario's
nexus-authz. More scenarios on request (``--scenarios``), to see where the fast path's CPU goes:

  http-uds-noacct  http-uds without token accounting (no Lua/access log, ``accounting.enabled: false``)
  http-uds-extproc http-uds with accounting over ext_proc instead (envoy/envoy-extproc.yaml)
  http-uds-stream, http-uds-stream-extproc, envoy-stream
                   the same with a streamed reply (SSE with the usage chunk, ~20 events)
  http-uds-nogrpc  as http-uds-noacct, and nexus-authz's gRPC server disabled (``listen.grpc: null``)
  bare-uds         as http-uds-noacct, with an empty asyncio + uvloop + httptools handler instead of
                   nexus-authz (answers 200 to everything: the floor for HTTP ext_authz from Python)
  http-uds-limits, grpc-limits, http-uds-limits-noacct, http-uds-limits-10k
                   with limits on (``LIMITS_CONFIG``: requests and tokens per minute, tokens per day),
                   the configuration benchmarks/run_all.py reports against the targets

Every request is the same ``POST /v1/chat/completions`` with a small JSON body naming a model and a valid
key; ``--keys N`` spreads the requests round-robin over N distinct keys. http-uds and grpc talk to one
nexus-authz process (both transports run on its one event loop anyway, as in production); each scenario
has its own Envoy, all started once before the first round.

Envoy runs with ``--concurrency 1`` by default: the machine has 2 cores shared by Envoy, nexus-authz, the
mock upstream and the load processes; at 1,000 requests/s one Envoy worker uses a fraction of a core, and
a second worker would only compete for the same 2 cores and split connections over two sets of upstream
pools (more connections to nexus-authz, fewer requests per connection). ``--envoy-concurrency 2`` to compare.

Adding a scenario is a few lines: a ``Scenario`` names the Envoy template, the ext_authz transport, a
``NexusSpec`` (YAML appended to nexus.yaml, per-key fields, a key count; scenarios with equal specs share
one nexus-authz process), an optional structural edit of the Envoy config and an optional request builder::

    SCENARIOS["10k-keys"] = Scenario("10k-keys", ENVOY_HTTP, "http", NexusSpec(keys=10_000))
    SCENARIOS["limits"] = Scenario("limits", ENVOY_HTTP, "http", NexusSpec(config_extra="limits: ..."))
    SCENARIOS["tokens"] = Scenario("tokens", ENVOY_HTTP, "http", NexusSpec(...), envoy_edit=add_ext_proc)

Run (default: 3 rounds x 3 scenarios x (2 s warm-up + 10 s) at 1,000 requests/s, ~2 minutes):

    .venv/bin/python benchmarks/bench_envoy.py [--rounds 3] [--rate 1000] [--duration 10] [--keys 1]
        [--scenarios envoy,http-uds,grpc] [--envoy-concurrency 1] [--max-rps] [--plot PATH] [--json PATH]

Prints the date, machine and command, a markdown table of medians (added latency is the median over
rounds of each round's difference to that round's ``envoy`` run), a per-round table, writes a PNG
latency plot and a JSON file with every round's raw figures and latencies.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import math
import os
import platform
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import harness  # noqa: E402

from nexus_authz.core import keys as keys_mod  # noqa: E402
from nexus_authz.demo import procs  # noqa: E402
from nexus_authz.render import envoy as envoy_config  # noqa: E402

ENVOY_HTTP = REPO / "envoy" / "envoy.yaml"
ENVOY_GRPC = REPO / "envoy" / "envoy-grpc.yaml"
ENVOY_EXTPROC = REPO / "envoy" / "envoy-extproc.yaml"  # accounting over ext_proc instead of Lua + ALS
RESULTS = REPO / "benchmarks" / "results"
PATH = "/v1/chat/completions"
BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16},
    separators=(",", ":"),
).encode()
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
EXTPROC_CLUSTER = "nexus_extproc"  # token accounting's gRPC cluster, in templates that have it
LUA_FILTER = "envoy.filters.http.lua"  # the usage tap of the default accounting path
ALS_LOGGER = "envoy.access_loggers.http_grpc"  # ... and its access log (an HCM access_log entry)
ALS_CLUSTER = "nexus_als"
# the Lua clamp filter (envoy.yaml's nexus-clamp, skipped by its matcher unless nexus clamped the request)
CLAMP_FILTER = "nexus-clamp"
# everything token accounting adds to a template, on either path (and the clamp filter: it was part of the
# Lua tap until the tap's request side moved to its own filter, and stays out of the same scenarios)
ACCOUNTING = (EXT_PROC_FILTER, LUA_FILTER, ALS_LOGGER, CLAMP_FILTER)
STREAM_BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
    },
    separators=(",", ":"),
).encode()
# the same stream as an OpenAI SDK asks for it by default (no stream_options.include_usage): no usage
# chunk, so nexus-authz counts the completion from the content deltas the Lua tap kept
PLAIN_STREAM_BODY = json.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
        "stream": True,
    },
    separators=(",", ":"),
).encode()
PEPPER = "bench-pepper-" + "0123456789abcdef" * 2
DEFAULT_KEY_FIELDS: Mapping[str, object] = {"tenant": "bench", "models": ["gpt-4o*"]}
BENCH_PLAN = "bench"


def limits_config(requests_per_minute: int, tokens_per_minute: int, tokens_per_day: int) -> str:
    """nexus.yaml lines for the benchmark's plan: the limits an LLM API usually has (OpenAI's RPM, TPM and
    TPD): two GCRA windows (requests and tokens per minute) and a sliding window of 24 hourly slots
    (tokens per day), every key on it. Tokens are reserved at Check and settled from the response."""
    return (
        f"plans:\n  {BENCH_PLAN}:\n    limits:\n"
        f"      - {{requests: {requests_per_minute}, per: minute}}\n"
        f"      - {{tokens: {tokens_per_minute}, per: minute}}\n"
        f"      - {{tokens: {tokens_per_day}, per: day}}\n"
    )


# "Every feature of the default config on" (the performance issue's targets): limits + token accounting.
# The limits are far above what one key sends in a run (1,000 req/s for minutes, plus wrk's maximum), so
# nothing is refused; the windows are still checked, charged, reserved and settled on every request.
LIMITS_CONFIG = limits_config(10**9, 10**12, 10**14)
LIMITS_KEY_FIELDS: Mapping[str, object] = {**DEFAULT_KEY_FIELDS, "plan": BENCH_PLAN}
# The performance issue's configuration (issue 15): the limits above plus a USD budget, a concurrency
# limit and a price for the model, so every kind of window is checked, charged and settled.
ISSUE15_CONFIG = (
    LIMITS_CONFIG
    + "      - {usd: 1000000000, per: month}\n"
    + "      - {concurrent: 100000}\n"
    + 'prices:\n  "gpt-4o*": {input: 2.5, cached_input: 1.25, output: 10}\n'
)
NO_ACCOUNTING = "accounting:\n  enabled: false\n"
# Issue 16's budget hierarchy on top: the benchmark's tenant with a USD budget and a requests limit of its
# own, and a group with a tokens limit, every key in the group (so each request charges 5 + 2 + 1 windows).
HIERARCHY_CONFIG = ISSUE15_CONFIG + (
    "tenants:\n  bench:\n    limits:\n"
    "      - {usd: 1000000000, per: month}\n      - {requests: 1000000000, per: minute}\n"
    "    groups:\n      research:\n        limits:\n          - {tokens: 1000000000000, per: day}\n"
)
HIERARCHY_KEY_FIELDS: Mapping[str, object] = {**LIMITS_KEY_FIELDS, "group": "research"}

__all__ = [
    "ENVOY_GRPC",
    "ENVOY_HTTP",
    "LIMITS_CONFIG",
    "LIMITS_KEY_FIELDS",
    "SCENARIOS",
    "EnvoyRun",
    "NexusSpec",
    "Scenario",
    "StackInfo",
    "chat_request",
    "key_file",
    "limits_config",
    "machine_info",
    "busy_cores",
    "machine_cpu",
    "main",
    "nexus_config",
    "parse_args",
    "remove_http_filters",
    "run",
    "run_scenarios",
    "start_nexus",
    "wait_quiet",
]


# --------------------------------------------------------------------------------------------------
# scenarios
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NexusSpec:
    """How one nexus-authz process is configured; scenarios with equal specs share the process."""

    config_extra: str = ""  # YAML appended to nexus.yaml (limits, token accounting, ledger ...)
    key_fields: Mapping[str, object] = field(default_factory=lambda: dict(DEFAULT_KEY_FIELDS))
    keys: int | None = None  # distinct keys in the key file and in the load; None: --keys
    grpc: bool = True  # the gRPC server (ext_authz, health, reflection) on the same event loop
    # "nexus", or "bare": instead of nexus-authz, an empty asyncio Protocol on uvloop + httptools that
    # answers every request 200 (the performance issue's floor for HTTP ext_authz from Python)
    server: str = "nexus"
    # environment variables of the process (e.g. NEXUS_AUTHZ_PURE=1; BARE_NATIVE=1 makes the bare
    # server parse with the compiled framing of nexus_authz/native/ instead of httptools; BARE_ANSWER=FILE
    # makes it answer that file's bytes, a whole HTTP/1.1 response, instead of an empty 200)
    env: tuple[tuple[str, str], ...] = ()
    # metrics.loop_cpu_time: each loop callback's own CPU (target 6's figure); off, the process runs as
    # deployed (the probe's system calls are not in its CPU per request)
    loop_cpu: bool = True

    def __post_init__(self) -> None:
        if self.server not in ("nexus", "bare"):
            raise ValueError(f"NexusSpec.server must be nexus or bare, not {self.server!r}")

    def group(self, default_keys: int) -> str:
        return json.dumps(
            [
                self.config_extra,
                dict(self.key_fields),
                self.keys or default_keys,
                self.grpc,
                self.server,
                list(self.env),
                self.loop_cpu,
            ],
            sort_keys=True,
            default=str,
        )


@dataclass(frozen=True, slots=True)
class StackInfo:
    """Addresses of the processes a scenario's Envoy config may need to point at."""

    upstream_port: int
    nexus_socket: str | None = None
    nexus_grpc_port: int | None = None


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    template: Path  # an Envoy config from envoy/
    ext_authz: str  # "none" (filter removed), "http" (http_service over the Unix socket) or "grpc"
    nexus: NexusSpec | None = None  # None: no nexus-authz process
    # HTTP filters taken out of the template (when present); ext_authz "none" always drops ext_authz
    remove_filters: tuple[str, ...] = ()
    envoy_edit: Callable[[dict[str, Any], StackInfo], None] | None = None  # edits the parsed config
    request: Callable[[str], bytes] | None = None  # key secret -> request bytes; default chat_request
    # the access log to nexus-authz's gRPC port (grpc.aio) rather than to the check socket (als_h2)
    als_on_grpc: bool = False
    # gRPC ext_authz (and the access log) to the gRPC port (grpc.aio) rather than to the check socket's
    # HTTP/2 (als_h2), where envoy-grpc.yaml sends them
    grpc_on_port: bool = False

    def __post_init__(self) -> None:
        if self.ext_authz not in ("none", "http", "grpc"):
            raise ValueError(f"scenario {self.name}: ext_authz must be none, http or grpc")
        if self.ext_authz != "none" and self.nexus is None:
            raise ValueError(f"scenario {self.name}: ext_authz {self.ext_authz} needs a NexusSpec")


def _request(secret: str, body: bytes, key_header: str = "") -> bytes:
    """A POST of `body` to the chat completions path with the key as a Bearer token (or in `key_header`)."""
    key = {key_header: secret} if key_header else {"authorization": f"Bearer {secret}"}
    return harness.build_request(
        "POST",
        PATH,
        host="127.0.0.1",
        headers={**key, "content-type": "application/json"},
        body=body,
    )


def chat_request(secret: str) -> bytes:
    """The benchmark's request: a small OpenAI chat completion with the key as a Bearer token."""
    return _request(secret, BODY)


def x_api_key_request(secret: str) -> bytes:
    """The benchmark's request with the key in x-api-key, as Anthropic's SDKs send it."""
    return _request(secret, BODY, "x-api-key")


def stream_request(secret: str) -> bytes:
    """The streamed variant: SSE with the usage chunk (the mock answers ~20 events in one write)."""
    return _request(secret, STREAM_BODY)


def plain_stream_request(secret: str) -> bytes:
    """The streamed variant without include_usage: no usage chunk (the completion is counted)."""
    return _request(secret, PLAIN_STREAM_BODY)


SCENARIOS: dict[str, Scenario] = {
    # Envoy alone: every filter that talks to nexus-authz removed (ext_authz; ext_proc when the template
    # has token accounting), so the difference to it is everything nexus-authz costs a request.
    "envoy": Scenario("envoy", ENVOY_HTTP, "none", remove_filters=ACCOUNTING),
    "http-uds": Scenario("http-uds", ENVOY_HTTP, "http", NexusSpec()),
    "grpc": Scenario("grpc", ENVOY_GRPC, "grpc", NexusSpec()),
    # not run by default: where the HTTP fast path's CPU goes
    "http-uds-noacct": Scenario(
        "http-uds-noacct",
        ENVOY_HTTP,
        "http",
        NexusSpec(config_extra="accounting:\n  enabled: false\n"),
        remove_filters=ACCOUNTING,
    ),
    "http-uds-nogrpc": Scenario(
        "http-uds-nogrpc",
        ENVOY_HTTP,
        "http",
        NexusSpec(grpc=False, config_extra="accounting:\n  enabled: false\n"),
        remove_filters=ACCOUNTING,
    ),
    "bare-uds": Scenario("bare-uds", ENVOY_HTTP, "http", NexusSpec(server="bare"), remove_filters=ACCOUNTING),
    # token accounting, issue 9 section 2: http-uds is the default path (Lua usage tap + gRPC access log);
    # the same request with accounting over ext_proc (envoy-extproc.yaml), and both for a streamed reply
    "http-uds-extproc": Scenario("http-uds-extproc", ENVOY_EXTPROC, "http", NexusSpec()),
    "http-uds-stream": Scenario("http-uds-stream", ENVOY_HTTP, "http", NexusSpec(), request=stream_request),
    "http-uds-stream-extproc": Scenario(
        "http-uds-stream-extproc", ENVOY_EXTPROC, "http", NexusSpec(), request=stream_request
    ),
    "envoy-stream": Scenario(
        "envoy-stream", ENVOY_HTTP, "none", remove_filters=ACCOUNTING, request=stream_request
    ),
    # streams without include_usage (the OpenAI SDKs' default), on the issue's plan
    "http-uds-issue15-stream-plain": Scenario(
        "http-uds-issue15-stream-plain",
        ENVOY_HTTP,
        "http",
        NexusSpec(ISSUE15_CONFIG, LIMITS_KEY_FIELDS),
        request=plain_stream_request,
    ),
    "envoy-stream-plain": Scenario(
        "envoy-stream-plain", ENVOY_HTTP, "none", remove_filters=ACCOUNTING, request=plain_stream_request
    ),
    # the default config with limits on (LIMITS_CONFIG; run_all.py's scenarios): both transports share one
    # nexus-authz, as in production; without accounting; and 10,000 keys round-robin
    "http-uds-limits": Scenario(
        "http-uds-limits", ENVOY_HTTP, "http", NexusSpec(LIMITS_CONFIG, LIMITS_KEY_FIELDS)
    ),
    "grpc-limits": Scenario("grpc-limits", ENVOY_GRPC, "grpc", NexusSpec(LIMITS_CONFIG, LIMITS_KEY_FIELDS)),
    "http-uds-limits-noacct": Scenario(
        "http-uds-limits-noacct",
        ENVOY_HTTP,
        "http",
        NexusSpec(LIMITS_CONFIG + NO_ACCOUNTING, LIMITS_KEY_FIELDS),
        remove_filters=ACCOUNTING,
    ),
    "http-uds-limits-10k": Scenario(
        "http-uds-limits-10k", ENVOY_HTTP, "http", NexusSpec(LIMITS_CONFIG, LIMITS_KEY_FIELDS, keys=10_000)
    ),
    # the floor with the compiled framing (nexus_authz/native/_http1) instead of httptools
    "bare-uds-native": Scenario(
        "bare-uds-native",
        ENVOY_HTTP,
        "http",
        NexusSpec(server="bare", env=(("BARE_NATIVE", "1"),)),
        remove_filters=ACCOUNTING,
    ),
    # issue 15's configuration (ISSUE15_CONFIG), with and without accounting; -pure: NEXUS_AUTHZ_PURE=1
    "http-uds-issue15-pure": Scenario(
        "http-uds-issue15-pure",
        ENVOY_HTTP,
        "http",
        NexusSpec(ISSUE15_CONFIG, LIMITS_KEY_FIELDS, env=(("NEXUS_AUTHZ_PURE", "1"),)),
    ),
    "http-uds-issue15": Scenario(
        "http-uds-issue15", ENVOY_HTTP, "http", NexusSpec(ISSUE15_CONFIG, LIMITS_KEY_FIELDS)
    ),
    # the same with the access log on the gRPC port (grpc.aio, as before the check socket took it)
    "http-uds-issue15-alsgrpc": Scenario(
        "http-uds-issue15-alsgrpc",
        ENVOY_HTTP,
        "http",
        NexusSpec(ISSUE15_CONFIG, LIMITS_KEY_FIELDS),
        als_on_grpc=True,
    ),
    # the same as deployed: without the benchmark's per-callback CPU probe (metrics.loop_cpu_time)
    "http-uds-issue15-noprobe": Scenario(
        "http-uds-issue15-noprobe",
        ENVOY_HTTP,
        "http",
        NexusSpec(ISSUE15_CONFIG, LIMITS_KEY_FIELDS, loop_cpu=False),
    ),
    # the same with the key in x-api-key (Anthropic's SDKs; the compiled lane reads it since 95b7385)
    "http-uds-issue15-xapikey": Scenario(
        "http-uds-issue15-xapikey",
        ENVOY_HTTP,
        "http",
        NexusSpec(ISSUE15_CONFIG, LIMITS_KEY_FIELDS, loop_cpu=False),
        request=x_api_key_request,
    ),
    "http-uds-issue15-noacct": Scenario(
        "http-uds-issue15-noacct",
        ENVOY_HTTP,
        "http",
        NexusSpec(ISSUE15_CONFIG + NO_ACCOUNTING, LIMITS_KEY_FIELDS),
        remove_filters=ACCOUNTING,
    ),
    # run_all.py's scenarios besides those: the same on gRPC ext_authz (the same nexus-authz), with 10,000
    # keys round-robin, and without the Lua usage tap (the access log kept) so that what Envoy spends on
    # the tap and on the access log show apart (slots of the concurrency limit are then released by the
    # access log only: 100,000 of them outlast a run)
    "grpc-issue15": Scenario(
        "grpc-issue15", ENVOY_GRPC, "grpc", NexusSpec(ISSUE15_CONFIG, LIMITS_KEY_FIELDS)
    ),
    # the same with gRPC ext_authz on the gRPC port (grpc.aio), as envoy-grpc.yaml did before session 16
    "grpc-issue15-port": Scenario(
        "grpc-issue15-port",
        ENVOY_GRPC,
        "grpc",
        NexusSpec(ISSUE15_CONFIG, LIMITS_KEY_FIELDS),
        grpc_on_port=True,
    ),
    "http-uds-issue15-10k": Scenario(
        "http-uds-issue15-10k", ENVOY_HTTP, "http", NexusSpec(ISSUE15_CONFIG, LIMITS_KEY_FIELDS, keys=10_000)
    ),
    "http-uds-issue15-10k-noprobe": Scenario(
        "http-uds-issue15-10k-noprobe",
        ENVOY_HTTP,
        "http",
        NexusSpec(ISSUE15_CONFIG, LIMITS_KEY_FIELDS, keys=10_000, loop_cpu=False),
    ),
    # issue 16: the same with tenant and group windows (HIERARCHY_CONFIG): what the hierarchy costs
    "http-uds-issue15-hierarchy": Scenario(
        "http-uds-issue15-hierarchy", ENVOY_HTTP, "http", NexusSpec(HIERARCHY_CONFIG, HIERARCHY_KEY_FIELDS)
    ),
    "http-uds-issue15-nolua": Scenario(
        "http-uds-issue15-nolua",
        ENVOY_HTTP,
        "http",
        NexusSpec(ISSUE15_CONFIG, LIMITS_KEY_FIELDS),
        remove_filters=(LUA_FILTER, CLAMP_FILTER),
    ),
}
DEFAULT_SCENARIOS = ("envoy", "http-uds", "grpc")
BASELINE = "envoy"


def remove_http_filters(doc: dict[str, Any], names: Sequence[str]) -> set[str]:
    """Drop the named HTTP filters (and access loggers) of listener ``ingress``; return the names that
    were there."""
    removed: set[str] = set()
    for listener in doc.get("static_resources", {}).get("listeners") or []:
        if listener.get("name") != envoy_config.LISTENER:
            continue
        for chain in listener.get("filter_chains") or []:
            for net_filter in chain.get("filters") or []:
                hcm = net_filter.get("typed_config") or {}
                filters = hcm.get("http_filters")
                if not isinstance(filters, list):
                    continue
                removed.update(f.get("name") for f in filters if f.get("name") in names)
                hcm["http_filters"] = [f for f in filters if f.get("name") not in names]
                logs = hcm.get("access_log")
                if isinstance(logs, list):
                    removed.update(x.get("name") for x in logs if x.get("name") in names)
                    hcm["access_log"] = [x for x in logs if x.get("name") not in names]
                    if not hcm["access_log"]:
                        del hcm["access_log"]
    return removed


def _has_cluster(doc: dict[str, Any], name: str) -> bool:
    clusters = doc.get("static_resources", {}).get("clusters") or []
    return any(isinstance(c, dict) and c.get("name") == name for c in clusters)


# --------------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------------


@dataclass
class NexusProc:
    spec: NexusSpec
    workdir: Path
    process: subprocess.Popen[bytes]
    socket: str
    grpc_port: int
    secrets: list[str]
    admin_port: int = 0  # /metrics, /readyz (0: the bare server has none)


@dataclass
class EnvoyProc:
    scenario: Scenario
    process: subprocess.Popen[bytes]
    port: int
    nexus: NexusProc | None
    requests: list[bytes]
    filters: list[str]  # the HTTP filter chain Envoy runs, for the record


def key_file(secrets_: Sequence[str], fields: Mapping[str, object], pepper: str = PEPPER) -> str:
    """The key file's YAML text for these secrets (ids ``bench-<i>``), written directly: 100,000 keys take
    ~0.3 s (KeyHasher's precomputed pads; a YAML library would take seconds)."""
    hasher = keys_mod.KeyHasher(pepper.encode())
    extra = "".join(f"    {k}: {json.dumps(v)}\n" for k, v in fields.items())
    scheme = keys_mod.HASH_SCHEME
    return "keys:\n" + "".join(
        f"  - id: bench-{i}\n    hash: {scheme}:{hasher(secret).hex()}\n{extra}"
        for i, secret in enumerate(secrets_)
    )


def nexus_config(socket_path: str, *, grpc: str = "null", admin: str = "null", extra: str = "") -> str:
    """nexus.yaml for a benchmark: the key file ``keys.yaml`` next to it, the bench pepper, one upstream
    credential, and ``extra`` (limits, accounting, ledger ...) appended."""
    return (
        f"listen:\n  http_socket: {socket_path}\n"
        f"  grpc: {grpc}\n  admin: {admin}\n"
        f"keys:\n  file: keys.yaml\n  pepper:\n    value: {PEPPER}\n"
        "credentials:\n  openai:\n    value: sk-upstream-bench-credential\n"
        "default_credential: openai\n" + extra
    )


# Each event-loop callback's own CPU time next to its wall time (nexus_authz_loop_busy_cpu_seconds): tells
# the callbacks over 200 µs that were our work from those where the thread waited for a core. Costs two
# CLOCK_THREAD_CPUTIME_ID system calls per callback (~1 µs, in "nexus-authz CPU per request").
LOOP_CPU_CONFIG = "metrics:\n  loop_cpu_time: true\n"


def start_nexus(spec: NexusSpec, workdir: Path, n_keys: int) -> NexusProc:
    workdir.mkdir(parents=True)
    token = secrets.token_hex(8)
    key_secrets = [f"nx-bench-{token}-{i:07d}" for i in range(n_keys)]
    socket_path = str(workdir / "authz.sock")
    env = {**os.environ, **dict(spec.env)}
    if spec.server == "bare":
        with open(workdir / "bare.log", "ab") as log:
            bare = subprocess.Popen(
                [sys.executable, __file__, "--serve-bare", socket_path],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        procs.wait_unix_socket(socket_path, timeout=20)
        return NexusProc(spec, workdir, bare, socket_path, 0, key_secrets)
    (workdir / "keys.yaml").write_text(key_file(key_secrets, spec.key_fields))
    grpc_port, admin_port = procs.free_port(), procs.free_port()
    grpc = f"127.0.0.1:{grpc_port}" if spec.grpc else "null"
    extra = spec.config_extra + (LOOP_CPU_CONFIG if spec.loop_cpu else "")
    config = nexus_config(socket_path, grpc=grpc, admin=f"127.0.0.1:{admin_port}", extra=extra)
    (workdir / "nexus.yaml").write_text(config)
    with open(workdir / "nexus.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "nexus_authz.cli", "serve", "-c", str(workdir / "nexus.yaml")],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
    try:
        procs.wait_http_ready(f"http://127.0.0.1:{admin_port}/readyz", timeout=60, process=process)
        procs.wait_unix_socket(socket_path, timeout=10)
    except procs.ProcessError as exc:
        procs.stop_process(process)
        tail = (workdir / "nexus.log").read_text(errors="replace")[-2000:]
        raise procs.ProcessError(f"nexus-authz did not start: {exc}\n{tail}") from None
    return NexusProc(
        spec, workdir, process, socket_path, grpc_port if spec.grpc else 0, key_secrets, admin_port
    )


_BARE_OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


def serve_bare(socket_path: str) -> None:
    """The reference: HTTP/1.1 keep-alive on a Unix socket, every request answered 200, no decision."""
    import asyncio
    import signal

    import httptools
    import uvloop

    class Bare(asyncio.Protocol):
        __slots__ = ("parser", "transport")

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.transport.close()

        def on_message_complete(self) -> None:
            self.transport.write(_BARE_OK)

    class BareNative(asyncio.Protocol):
        """The same with the compiled framing (nexus_authz/native/_http1): no Python call per header."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            from nexus_authz.native import _http1

            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            self._closing = self._in_message = False
            self.parser = _http1.RequestParser(self, 65536, 1 << 20, 16 * 1024, 128, {})

        def data_received(self, data: bytes) -> None:
            if self.parser.feed(data):  # outside the subset the compiled parser takes: hang up
                self.transport.close()

        def on_message_complete(self) -> None:
            self.transport.write(_BARE_OK)

    protocol = BareNative if os.environ.get("BARE_NATIVE") == "1" else Bare
    answer = os.environ.get("BARE_ANSWER")  # a file of the exact answer bytes to send instead
    if answer:
        global _BARE_OK
        with open(answer, "rb") as f:
            _BARE_OK = f.read()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        server = await loop.create_unix_server(protocol, socket_path, backlog=1024)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await stop.wait()
        server.close()

    uvloop.run(run())


def start_mock(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = procs.free_port()
    with open(workdir / "upstream.log", "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nexus_authz.demo.mock_upstream",
                "--port",
                str(port),
                "--record-limit",
                "0",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    procs.wait_http_ready(f"http://127.0.0.1:{port}/healthz", timeout=20, process=process)
    return process, port


def render_envoy(scenario: Scenario, info: StackInfo, listen_port: int, admin_port: int) -> str:
    addresses: dict[str, Any] = {"upstream": f"127.0.0.1:{info.upstream_port}"}
    if scenario.ext_authz == "http":
        addresses["authz_socket"] = info.nexus_socket
    elif scenario.ext_authz == "grpc":
        addresses["authz_grpc"] = (
            f"127.0.0.1:{info.nexus_grpc_port}" if scenario.grpc_on_port else info.nexus_socket
        )
    drop = set(scenario.remove_filters)
    if scenario.ext_authz == "none":
        drop.add(envoy_config.EXT_AUTHZ_FILTER)
    if _has_cluster(envoy_config.load(scenario.template), EXTPROC_CLUSTER):
        if info.nexus_grpc_port:
            addresses["clusters"] = {EXTPROC_CLUSTER: f"127.0.0.1:{info.nexus_grpc_port}"}
        else:  # nothing would answer: a failing ext_proc stream per request is not the product's cost
            drop.add(EXT_PROC_FILTER)
    if _has_cluster(envoy_config.load(scenario.template), ALS_CLUSTER):
        if (scenario.ext_authz == "http" and not scenario.als_on_grpc) or (
            scenario.ext_authz == "grpc" and not scenario.grpc_on_port
        ):  # as the shipped configs: the check socket
            addresses.setdefault("clusters", {})[ALS_CLUSTER] = info.nexus_socket
        elif info.nexus_grpc_port:
            addresses.setdefault("clusters", {})[ALS_CLUSTER] = f"127.0.0.1:{info.nexus_grpc_port}"
        else:
            drop.update((LUA_FILTER, ALS_LOGGER))
    text = envoy_config.render(scenario.template, listen_port=listen_port, admin_port=admin_port, **addresses)
    doc = yaml.safe_load(text)
    removed = remove_http_filters(doc, sorted(drop))
    if scenario.ext_authz == "none" and envoy_config.EXT_AUTHZ_FILTER not in removed:
        raise envoy_config.EnvoyConfigError(f"{scenario.template} has no ext_authz filter to remove")
    if scenario.envoy_edit is not None:
        scenario.envoy_edit(doc, info)
    out: str = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    return out


def start_scenario_envoy(
    scenario: Scenario,
    nexus: NexusProc | None,
    upstream_port: int,
    workdir: Path,
    concurrency: int,
    key_secrets: Sequence[str],
) -> EnvoyProc:
    info = StackInfo(
        upstream_port,
        nexus.socket if nexus else None,
        nexus.grpc_port if nexus else None,
    )
    port, admin_port = procs.free_port(), procs.free_port()
    text = render_envoy(scenario, info, port, admin_port)
    log_path = workdir / "envoy.log"
    process = procs.start_envoy(
        text, admin_port=admin_port, workdir=workdir, log_path=log_path, concurrency=concurrency
    )
    procs.wait_envoy_ready(admin_port, timeout=30, process=process, log_path=log_path)
    build = scenario.request or chat_request
    requests = [build(s) for s in key_secrets]
    return EnvoyProc(scenario, process, port, nexus, requests, http_filter_names(yaml.safe_load(text)))


def http_filter_names(doc: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for listener in doc.get("static_resources", {}).get("listeners") or []:
        if listener.get("name") == envoy_config.LISTENER:
            for chain in listener.get("filter_chains") or []:
                for net_filter in chain.get("filters") or []:
                    for f in (net_filter.get("typed_config") or {}).get("http_filters") or []:
                        names.append(str(f.get("name", "?")).removeprefix("envoy.filters.http."))
    return names


def _send(port: int, request: bytes) -> int:
    """One request over a fresh connection; the status code."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        buf = b""
        while True:
            chunk = sock.recv(65536)
            buf += chunk
            resp = harness.parse_response(buf, eof=not chunk)
            if resp is not None:
                return resp.status
            if not chunk:
                raise http.client.HTTPException("connection closed before a response")


def preflight(env: EnvoyProc) -> None:
    """Fail before measuring anything if a scenario is not what it claims to be."""
    ok = _send(env.port, env.requests[0])
    bad = _send(env.port, chat_request("nx-bench-not-a-key-0000000000"))
    no_decision = env.scenario.ext_authz == "none" or (env.nexus and env.nexus.spec.server == "bare")
    expect_bad = 200 if no_decision else 401
    if ok != 200 or bad != expect_bad:
        raise RuntimeError(
            f"preflight {env.scenario.name}: valid key -> {ok} (want 200), "
            f"unknown key -> {bad} (want {expect_bad})"
        )
    for request in env.requests[:200]:  # touch a few keys and open Envoy's pools
        _send(env.port, request)


# --------------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    envoy_version = ""
    try:
        out = subprocess.run(
            [procs.find_envoy(), "--version"], capture_output=True, text=True, timeout=20, check=False
        ).stdout
        envoy_version = out.split("version:", 1)[1].strip() if "version:" in out else out.strip()
    except (OSError, procs.EnvoyNotFoundError, subprocess.SubprocessError):
        pass
    return {
        "tree": tree_state(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "model_name": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "envoy": envoy_version,
        "loadavg_start": os.getloadavg(),
        "command": shlex.join(sys.orig_argv),
    }


def tree_state() -> str:
    """The commit measured and whether the working tree differs from it (read-only git commands)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = len([line for line in status.splitlines() if line.strip()])
    return f"{head or 'unknown'}" + (f" + uncommitted changes in {changed} tracked files" if changed else "")


def machine_cpu() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Cores busy on average between two ``machine_cpu`` samples, whoever used them (the machine is
    shared: compared with the stack's own CPU, this shows how much other work ran during a round)."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total * (os.cpu_count() or 1) if total > 0 else math.nan


def wait_quiet(
    pids: Sequence[int], *, cores: float = 0.05, window: float = 0.25, timeout: float = 15.0
) -> float:
    """Wait until the processes together use under ``cores`` over a ``window``; seconds waited (bounded
    by ``timeout``). Processes that have exited are ignored."""
    alive = [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
    if not alive:
        return 0.0
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        stats = harness.ProcStats(alive)
        stats.start()
        time.sleep(window)
        try:
            d = stats.stop()
        except FileNotFoundError:
            return time.monotonic() - t0
        if d.sched_cpu_s / d.wall_s < cores:
            break
    return time.monotonic() - t0


LOOP_BUSY_LIMIT_S = 0.0002  # the performance issue: no callback holds the loop longer than 200 µs


LOOP_WALL, LOOP_CPU = "nexus_authz_loop_busy_seconds", "nexus_authz_loop_busy_cpu_seconds"


def loop_busy(nexus: NexusProc | None) -> dict[str, dict[str, dict[float, float]]] | None:
    """nexus-authz's loop histograms from its /metrics (None: no admin port, e.g. the empty handler):
    `loop_busy_families` of the scrape."""
    if nexus is None or not nexus.admin_port:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{nexus.admin_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    return loop_busy_families(text)


def loop_busy_families(text: str) -> dict[str, dict[str, dict[float, float]]]:
    """The wall-time histogram (LOOP_WALL) and, when the server measures it (metrics.loop_cpu_time), the
    own-CPU-time one (LOOP_CPU) of a /metrics text: per family, per source, cumulative count per bucket
    bound."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, dict[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in (LOOP_WALL, LOOP_CPU):
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                per_source = out.setdefault(family.name, {}).setdefault(sample.labels["source"], {})
                per_source[float(sample.labels["le"])] = sample.value
            elif sample.name.endswith("_sum"):  # seconds in all, kept as family "<name>_sum", bound 0
                out.setdefault(sample.name, {})[sample.labels["source"]] = {0.0: sample.value}
    return out


def loop_busy_figures(
    before: dict[str, dict[float, float]], after: dict[str, dict[float, float]], prefix: str = "loop"
) -> dict[str, Any]:
    """Over one measured window: callbacks observed, how many held the loop over 200 µs, and the bucket
    bound of the longest (µs; inf when over the top bucket), all sources together and per source; keys
    `{prefix}_callbacks`, `{prefix}_over_200us`, `{prefix}_longest_le_us`, `{prefix}_by_source`."""
    total = over = 0.0
    longest = 0.0
    per_source: dict[str, dict[str, float]] = {}
    for source, buckets in after.items():
        base = before.get(source, {})
        bounds = sorted(buckets)
        delta = {b: buckets[b] - base.get(b, 0.0) for b in bounds}
        n = delta[bounds[-1]] if bounds else 0.0
        within = max((delta[b] for b in bounds if b <= LOOP_BUSY_LIMIT_S), default=0.0)
        top = 0.0
        previous = 0.0
        for b in bounds:  # cumulative: the first bound that holds every observation is the longest's
            if delta[b] > previous:
                top = b
            previous = delta[b]
        per_source[source] = {"callbacks": n, "over_200us": n - within, "longest_le_us": top * 1e6}
        total += n
        over += n - within
        longest = max(longest, top)
    return {
        f"{prefix}_callbacks": total,
        f"{prefix}_over_200us": over,
        f"{prefix}_longest_le_us": longest * 1e6,
        f"{prefix}_by_source": per_source,
    }


def loop_round_figures(
    before: dict[str, dict[str, dict[float, float]]], after: dict[str, dict[str, dict[float, float]]]
) -> dict[str, Any]:
    """One round's figures: wall time (`loop_*`) and, when measured, own CPU time (`loop_cpu_*`)."""
    out = loop_busy_figures(before.get(LOOP_WALL, {}), after.get(LOOP_WALL, {}))
    if after.get(LOOP_CPU):
        out.update(loop_busy_figures(before.get(LOOP_CPU, {}), after[LOOP_CPU], prefix="loop_cpu"))
        # the callbacks' own CPU in all, per source (seconds over the window): where the work goes
        sums0, sums1 = before.get(LOOP_CPU + "_sum", {}), after.get(LOOP_CPU + "_sum", {})
        out["loop_cpu_s_by_source"] = {
            source: v.get(0.0, 0.0) - sums0.get(source, {}).get(0.0, 0.0) for source, v in sums1.items()
        }
    return out


def pool_loop_rounds(rounds: Sequence[Mapping[str, Any]], prefix: str = "loop") -> dict[str, Any]:
    """The rounds' figures together, not a median (one stall is a stall): callbacks and those over
    200 µs summed, the longest the longest, in all and per source ({} when no round has them)."""
    rounds = [r for r in rounds if f"{prefix}_callbacks" in r]
    if not rounds:
        return {}
    per_source: dict[str, dict[str, float]] = {}
    for r in rounds:
        for source, f in r.get(f"{prefix}_by_source", {}).items():
            p = per_source.setdefault(source, {"callbacks": 0.0, "over_200us": 0.0, "longest_le_us": 0.0})
            p["callbacks"] += f["callbacks"]
            p["over_200us"] += f["over_200us"]
            p["longest_le_us"] = max(p["longest_le_us"], f["longest_le_us"])
    return {
        f"{prefix}_callbacks": sum(r[f"{prefix}_callbacks"] for r in rounds),
        f"{prefix}_over_200us": sum(r[f"{prefix}_over_200us"] for r in rounds),
        f"{prefix}_longest_le_us": max(r[f"{prefix}_longest_le_us"] for r in rounds),
        f"{prefix}_by_source": per_source,
    }


def loop_cpu_per_request(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The loop callbacks' own CPU per answered request, per source, over every round (µs; {} when not
    measured): `loop_cpu_us_per_req_by_source`. What is not in a callback (the kernel's wake-up, uvloop
    between callbacks, grpc's own threads) is the rest of "nexus CPU µs/req"."""
    rounds = [r for r in rounds if "loop_cpu_s_by_source" in r]
    answered = sum(r.get("ok", 0) for r in rounds)
    if not rounds or not answered:
        return {}
    per: dict[str, float] = {}
    for r in rounds:
        for source, s in r["loop_cpu_s_by_source"].items():
            per[source] = per.get(source, 0.0) + s
    return {"loop_cpu_us_per_req_by_source": {k: 1e6 * v / answered for k, v in sorted(per.items())}}


def _round_metrics(res: harness.LoadResult, has_nexus: bool) -> dict[str, Any]:
    m: dict[str, Any] = dict(res.metrics())
    if not has_nexus and "nexus_cpu_us_per_req" in m:
        # nexus-authz is idle in this scenario: report its background CPU share instead
        d = res.cpu["nexus"]
        m["nexus_idle_cpu_pct"] = 100 * d.cpu_fraction
        for k in ("nexus_cpu_us_per_req", "nexus_sched_cpu_us_per_req", "nexus_rss_mb"):
            m.pop(k)
    m["ok"] = res.ok
    m["statuses"] = {str(k): v for k, v in res.statuses.items()}
    m["error_kinds"] = dict(res.errors)
    return m


@dataclass
class EnvoyRun:
    """What one interleaved run measured: what ``run`` prints and writes, and what run_all.py reports."""

    info: dict[str, Any]
    inter: harness.InterleaveResult
    raw: dict[str, list[harness.LoadResult]]
    max_rps: dict[str, dict[str, Any]]
    rows: list[dict[str, Any]]
    filters: dict[str, list[str]]  # the HTTP filter chain each scenario's Envoy ran
    elapsed: float  # seconds of the interleaved rounds


def run_scenarios(
    scenarios: Sequence[Scenario],
    args: argparse.Namespace,
    info: Mapping[str, Any],
    *,
    out: TextIO | None = None,
    max_rps_for: Sequence[str] | None = None,
) -> EnvoyRun:
    """Start the stack (mock upstream, one nexus-authz per distinct NexusSpec, one Envoy per scenario),
    check each scenario answers as it claims, run the interleaved rounds (and, with ``args.max_rps``, the
    closed-loop maximum of the scenarios in ``max_rps_for``, default all), stop everything.

    ``args`` is what ``parse_args`` returns. The stack's description goes to ``out`` (stdout by default),
    progress to stderr."""
    out = out or sys.stdout
    tmp = Path(tempfile.mkdtemp(prefix="nexus-bench-envoy-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        mock, upstream_port = start_mock(tmp)
        processes.append(mock)
        nexus_by_group: dict[str, NexusProc] = {}
        envoys: dict[str, EnvoyProc] = {}
        for sc in scenarios:
            nexus = None
            if sc.nexus is not None:
                group = sc.nexus.group(args.keys)
                if group not in nexus_by_group:
                    n_keys = sc.nexus.keys or args.keys
                    t0 = time.monotonic()
                    nexus_by_group[group] = start_nexus(
                        sc.nexus, tmp / f"nexus-{len(nexus_by_group)}", n_keys
                    )
                    processes.append(nexus_by_group[group].process)
                    print(
                        f"nexus-authz #{len(nexus_by_group) - 1} ({n_keys} keys) ready in "
                        f"{time.monotonic() - t0:.1f} s",
                        file=sys.stderr,
                    )
                nexus = nexus_by_group[group]
            key_secrets = nexus.secrets if nexus else [f"nx-bench-none-{i:07d}" for i in range(args.keys)]
            env = start_scenario_envoy(
                sc, nexus, upstream_port, tmp / f"envoy-{sc.name}", args.envoy_concurrency, key_secrets
            )
            processes.append(env.process)
            envoys[sc.name] = env
        # A baseline with no nexus still watches one (idle) nexus-authz: its background CPU is a figure too.
        any_nexus = next((n for n in nexus_by_group.values() if n.spec.server == "nexus"), None)
        for env in envoys.values():
            preflight(env)
            print(
                f"- `{env.scenario.name}`: {env.scenario.template.relative_to(REPO)}, HTTP filters: "
                f"{', '.join(env.filters)}"
                + (f"; nexus-authz #{list(nexus_by_group.values()).index(env.nexus)}" if env.nexus else ""),
                file=out,
            )
        print(file=out, flush=True)

        raw: dict[str, list[harness.LoadResult]] = {sc.name: [] for sc in scenarios}

        stack_pids = [p.pid for p in processes]

        def scenario_fn(env: EnvoyProc) -> Callable[[], Mapping[str, Any]]:
            def fn() -> Mapping[str, Any]:
                # a scenario that fell behind (the gRPC path near its limit) must not leave its backlog
                # to the next one: wait until the whole stack is idle
                waited = wait_quiet(stack_pids)
                measure: dict[str, int] = {"envoy": env.process.pid, "upstream": mock.pid}
                watched = env.nexus or any_nexus
                if watched is not None:
                    measure["nexus"] = watched.process.pid
                busy0 = machine_cpu()
                loop0 = loop_busy(watched)
                res = harness.run_open_loop(
                    ("127.0.0.1", env.port),
                    rate=args.rate,
                    duration=args.duration,
                    warmup=args.warmup,
                    procs=args.procs,
                    request_bytes=env.requests,
                    measure_pids=measure,
                )
                busy1 = machine_cpu()
                loop1 = loop_busy(watched)
                raw[env.scenario.name].append(res)
                m = _round_metrics(res, env.nexus is not None)
                if env.nexus is not None and loop0 is not None and loop1 is not None:
                    m.update(loop_round_figures(loop0, loop1))
                m["settle_wait_s"] = waited
                m["machine_busy_cores"] = busy_cores(busy0, busy1)
                return m

            return fn

        t0 = time.monotonic()
        inter = harness.interleave([(n, scenario_fn(e)) for n, e in envoys.items()], rounds=args.rounds)
        elapsed = time.monotonic() - t0

        max_rps: dict[str, dict[str, Any]] = {}
        if args.max_rps:
            for name, env in envoys.items():
                if max_rps_for is None or name in max_rps_for:
                    print(f"[max rps] {name}", file=sys.stderr, flush=True)
                    max_rps[name] = measure_max_rps(env, args)

        filters = {name: env.filters for name, env in envoys.items()}
        return EnvoyRun(dict(info), inter, raw, max_rps, summary_rows(inter, max_rps), filters, elapsed)
    finally:
        for process in reversed(processes):
            procs.stop_process(process, timeout=10)
        if args.keep:
            print(f"- work directory kept: {tmp}", file=out)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    scenarios = [SCENARIOS[n] for n in names]
    info = machine_info()
    per_run = args.warmup + args.duration
    estimate = args.rounds * len(scenarios) * (per_run + 1.5) + 10
    if args.max_rps:
        estimate += len(scenarios) * (args.max_rps_duration + 2)
    print(f"# nexus-authz through Envoy: {info['date']}\n")
    print(f"- machine: {info['nproc']} CPUs, {info['model_name']}, Linux {info['kernel']}")
    print(f"- Envoy {info['envoy']}, --concurrency {args.envoy_concurrency}; Python {info['python']}")
    print(f"- command: `{info['command']}`; tree: {info['tree']}")
    print(
        f"- load: {args.rate:g} req/s open loop from {args.procs} single-connection processes, "
        f"{args.warmup:g} s warm-up + {args.duration:g} s measured, {args.rounds} interleaved round(s); "
        f"{args.keys} distinct key(s) round-robin; POST {PATH} ({len(BODY)} B JSON body)"
    )
    print(f"- load average at start: {' '.join(f'{x:.2f}' for x in info['loadavg_start'])}")
    print(f"- expected duration: ~{estimate:.0f} s", flush=True)

    res = run_scenarios(scenarios, args, info)
    inter, raw, max_rps, rows = res.inter, res.raw, res.max_rps, res.rows
    print(
        f"## {args.rate:g} req/s through Envoy, medians of {args.rounds} interleaved round(s) "
        f"({res.elapsed:.0f} s)\n"
    )
    print_summary(rows, bool(max_rps))
    print("\nper round (same figures before taking medians):\n")
    print_rounds(inter)
    lg = [r.loadgen_cpu_us_per_request for rs in raw.values() for r in rs]
    idle = [m["nexus_idle_cpu_pct"] for m in inter.runs.get(BASELINE, []) if "nexus_idle_cpu_pct" in m]
    print(
        f"\n- added latency = scenario minus `{BASELINE}` in the same round, median over rounds; "
        "CPU µs/request = utime+stime from /proc/PID/stat over the measured window / requests sent"
    )
    print(f"- load generator CPU: {statistics.median(lg):.0f} µs/request (all its processes)")
    if idle:
        print(f"- nexus-authz idle CPU during `{BASELINE}` rounds: {statistics.median(idle):.2f}% of a core")
    print(f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    plot_path = Path(args.plot)
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    if harness.plot_latency(
        latency_series(raw),
        plot_path,
        title=f"through Envoy at {args.rate:g} req/s, {args.rounds} rounds pooled ({info['date'][:10]})",
    ):
        print(f"- latency plot: {plot_path}")
    json_path = Path(args.json or RESULTS / f"envoy-{dt.datetime.now():%Y%m%d-%H%M%S}.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(json_path, info, args, inter, raw, max_rps, rows, res.filters)
    print(f"- raw results: {json_path}")
    failures = [r["scenario"] for r in rows if r.get("errors") or r.get("non_2xx")]
    if failures:
        print(f"\nWARNING: errors or non-2xx answers in {', '.join(failures)} (see the JSON)")
    return 0


def latency_series(raw: Mapping[str, Sequence[harness.LoadResult]]) -> dict[str, list[float]]:
    """Every round's latencies pooled per scenario, labelled with the median p50, for ``plot_latency``."""
    return {
        f"{name} (p50 {statistics.median(r.percentile(50) for r in rs) / 1000:.2f} ms)": sorted(
            v for r in rs for v in r.latencies_us
        )
        for name, rs in raw.items()
        if rs
    }


def measure_max_rps(env: EnvoyProc, args: argparse.Namespace) -> dict[str, Any]:
    """Closed loop (wrk) through this scenario's Envoy, with the key of the first request variant."""
    secret = (env.nexus.secrets[0]) if env.nexus else "nx-bench-none-0000000"
    pids = {"envoy": env.process.pid, **({"nexus": env.nexus.process.pid} if env.nexus else {})}
    stats = {name: harness.ProcStats(pid) for name, pid in pids.items()}
    for s in stats.values():
        s.start()
    res = harness.run_max_rps(
        ("127.0.0.1", env.port),
        args.max_rps_duration,
        args.max_rps_connections,
        method="POST",
        path=PATH,
        headers={"authorization": f"Bearer {secret}", "content-type": "application/json"},
        body=BODY,
    )
    out: dict[str, Any] = {**res.metrics(), "tool": res.tool}
    for name, s in stats.items():
        d = s.stop()
        out[f"max_rps_{name}_cores"] = d.cpu_fraction
    return out


def summary_rows(
    inter: harness.InterleaveResult, max_rps: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    rows = []
    base = inter.runs.get(BASELINE, [])
    for name in inter.order:
        med = inter.medians[name]
        row: dict[str, Any] = {"scenario": name, **med}
        for p in ("p50", "p99"):
            diffs = [
                r[f"{p}_us"] - b[f"{p}_us"]
                for r, b in zip(inter.runs[name], base, strict=False)
                if name != BASELINE
            ]
            row[f"added_{p}_us"] = statistics.median(diffs) if diffs else math.nan
        # one bad round must not hide behind a median: errors are counted over all rounds
        for k in ("errors", "non_2xx"):
            row[k] = sum(r.get(k, 0) for r in inter.runs[name])
        # the loop's longest callback: over every round, not a median (one stall is a stall)
        # (wall time, and own CPU time when measured)
        row.update(pool_loop_rounds(inter.runs[name]))
        row.update(pool_loop_rounds(inter.runs[name], "loop_cpu"))
        row.update(loop_cpu_per_request(inter.runs[name]))
        row.update(max_rps.get(name, {}))
        rows.append(row)
    return rows


def _ms(v: Any) -> str:
    return "-" if not isinstance(v, int | float) or math.isnan(v) else f"{v / 1000:.3f}"


def _added(v: Any) -> str:
    return "-" if not isinstance(v, int | float) or math.isnan(v) else f"{v / 1000:+.3f}"


def print_summary(rows: Sequence[Mapping[str, Any]], with_max: bool) -> None:
    columns: list[str | tuple[str, str]] = [
        "scenario",
        ("achieved_rps", "req/s"),
        ("p50_us", "p50 ms"),
        ("p99_us", "p99 ms"),
        ("p99.9_us", "p99.9 ms"),
        ("added_p50_us", "added p50 ms"),
        ("added_p99_us", "added p99 ms"),
        ("nexus_cpu_us_per_req", "nexus CPU µs/req"),
        ("envoy_cpu_us_per_req", "Envoy CPU µs/req"),
        ("upstream_cpu_us_per_req", "mock CPU µs/req"),
        ("nexus_rss_mb", "nexus RSS MB"),
        ("errors", "errors (all rounds)"),
        ("non_2xx", "non-2xx (all rounds)"),
    ]
    if with_max:
        columns += [("max_rps", "max req/s"), ("max_rps_nexus_cores", "nexus cores at max")]
    formats = {
        "achieved_rps": lambda v: f"{v:.1f}",
        "p50_us": _ms,
        "p99_us": _ms,
        "p99.9_us": _ms,
        "added_p50_us": _added,
        "added_p99_us": _added,
        "nexus_cpu_us_per_req": lambda v: f"{v:.0f}" if isinstance(v, float) and not math.isnan(v) else "-",
        "envoy_cpu_us_per_req": lambda v: f"{v:.0f}",
        "upstream_cpu_us_per_req": lambda v: f"{v:.0f}",
        "nexus_rss_mb": lambda v: f"{v:.1f}" if isinstance(v, float) and not math.isnan(v) else "-",
        "errors": lambda v: f"{v:g}",
        "non_2xx": lambda v: f"{v:g}",
        "max_rps": lambda v: f"{v:,.0f}" if isinstance(v, float) and not math.isnan(v) else "-",
        "max_rps_nexus_cores": lambda v: f"{v:.2f}" if isinstance(v, float) else "-",
    }
    harness.print_table(rows, columns, formats=formats)
    for r in rows:
        by_source = r.get("loop_cpu_us_per_req_by_source")
        if by_source:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in by_source.items())
            print(f"- `{r['scenario']}`: loop callbacks' own CPU, µs per request: {parts}")


def print_rounds(inter: harness.InterleaveResult) -> None:
    rows = []
    for r in range(max(len(v) for v in inter.runs.values())):
        for name in inter.order:
            if r < len(inter.runs[name]):
                m = inter.runs[name][r]
                rows.append({"round": r + 1, "scenario": name, **m})
    harness.print_table(
        rows,
        [
            "round",
            "scenario",
            ("achieved_rps", "req/s"),
            ("p50_us", "p50 ms"),
            ("p99_us", "p99 ms"),
            ("p99.9_us", "p99.9 ms"),
            ("max_us", "max ms"),
            ("nexus_cpu_us_per_req", "nexus CPU µs/req"),
            ("nexus_sched_cpu_us_per_req", "nexus CPU µs/req (schedstat)"),
            ("envoy_cpu_us_per_req", "Envoy CPU µs/req"),
            ("send_lag_p99_us", "send lag p99 µs"),
            ("errors", "errors"),
            ("non_2xx", "non-2xx"),
        ],
        formats={
            "achieved_rps": lambda v: f"{v:.1f}",
            "p50_us": _ms,
            "p99_us": _ms,
            "p99.9_us": _ms,
            "max_us": _ms,
        },
    )


def write_json(
    path: Path,
    info: Mapping[str, Any],
    args: argparse.Namespace,
    inter: harness.InterleaveResult,
    raw: Mapping[str, Sequence[harness.LoadResult]],
    max_rps: Mapping[str, Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    filters: Mapping[str, list[str]],
) -> None:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    def describe(sc: Scenario) -> dict[str, Any]:
        spec = sc.nexus
        return {
            "template": str(sc.template.relative_to(REPO)),
            "ext_authz": sc.ext_authz,
            "http_filters": filters.get(sc.name, []),
            "nexus": None
            if spec is None
            else {
                "config_extra": spec.config_extra,
                "key_fields": dict(spec.key_fields),
                "keys": spec.keys or args.keys,
                "grpc": spec.grpc,
                "server": spec.server,
                "env": dict(spec.env),
                "loop_cpu_time": spec.loop_cpu,
            },
        }

    doc = {
        "machine": info,
        "settings": dict(vars(args)),
        "scenarios": {n: describe(SCENARIOS[n]) for n in inter.order},
        "summary": rows,
        "rounds": inter.runs,
        "max_rps": max_rps,
        "latencies_us": {n: [[round(v, 1) for v in r.latencies_us] for r in rs] for n, rs in raw.items()},
    }
    path.write_text(json.dumps(clean(doc), indent=1))


def parser() -> argparse.ArgumentParser:
    """The command line (run_all.py builds its settings with ``parse_args`` too)."""
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma list of {', '.join(SCENARIOS)} (default {','.join(DEFAULT_SCENARIOS)})",
    )
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians across them)")
    ap.add_argument("--rate", type=float, default=1000.0, help="requests/s, open loop")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per scenario and round")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the measured window")
    ap.add_argument("--procs", type=int, default=4, help="load processes (one connection each)")
    ap.add_argument("--keys", type=int, default=1, help="distinct keys, used round-robin")
    ap.add_argument("--envoy-concurrency", type=int, default=1, choices=(1, 2), help="Envoy worker threads")
    ap.add_argument(
        "--max-rps", action="store_true", help="also closed-loop max requests/s (wrk) per scenario"
    )
    ap.add_argument("--max-rps-duration", type=float, default=5.0)
    ap.add_argument("--max-rps-connections", type=int, default=16)
    ap.add_argument("--plot", default=str(RESULTS / "envoy-latency.png"), help="PNG latency plot")
    ap.add_argument("--json", default="", help="raw results (default benchmarks/results/envoy-<time>.json)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    ap.add_argument("--serve-bare", metavar="SOCKET", help=argparse.SUPPRESS)  # the bare-uds server
    return ap


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = parser()
    args = ap.parse_args(argv)
    if not args.serve_bare and (
        args.rounds < 1 or args.duration <= 0 or args.rate <= 0 or args.keys < 1 or args.procs < 1
    ):
        ap.error("need --rounds >= 1, --duration > 0, --rate > 0, --keys >= 1, --procs >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
