"""Envoy's Rate Limit Service v3 (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`) on grpc.aio.

Envoy's `ratelimit` HTTP filter sends one RateLimitRequest per HTTP request (a domain and the descriptors
its actions produced); this adapter maps it to plain data, lets the core (`nexus_authz.core.rls`) match
it against the envoyproxy/ratelimit-format config and plan the charge, charges the counter store through
the one decision driver (`nexus_authz.decide.Decider`: the same store as the rest of the product, the
in-process memory store or Redis; awaited only when the store must wait), and maps the core's answer
back to a RateLimitResponse with per-descriptor statuses, optional IETF `RateLimit`/`RateLimit-Policy`
headers (`response_headers_to_add`) and, on OVER_LIMIT, an OpenAI-style JSON body (`raw_body` +
`content-type`; Envoy sends it with its 429).

It also owns the config directory: `RlsConfigSource` reads every `*.yaml`/`*.yml` file (dotfiles
skipped, symlinks followed: a Kubernetes ConfigMap volume works), and `reload()` polls the files' stamps
through the same FileSource as the key file and nexus.yaml (nexus_authz.filesource). A change is parsed
whole; a broken file keeps the previous config in force and logs one error naming file, line and path
(once per change on disk, not once per poll).

Identity: Envoy's filter reads `x-nexus-key-id` (set by ext_authz; clients cannot forge it, the Envoy
configs strip it) as descriptor key `nexus_key_id`; entries `nexus_plan` / `nexus_tenant` in the same
descriptor are filled in from nexus's key snapshot (see core.rls), so plans are enforceable here too.

Failures: a store that cannot answer (`StoreUnavailable`) and bugs abort the RPC (UNAVAILABLE /
INTERNAL), so Envoy's `failure_mode_deny` decides,
exactly as for a transport failure. Bad input is never an exception: an unknown domain, an empty
descriptor list or an unknown override unit are answered OK without a limit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2

from nexus_authz.core import rls
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.limits import AcquireResult, WindowStatus
from nexus_authz.core.ports import StoreUnavailable
from nexus_authz.core.ratelimit_headers import IETF
from nexus_authz.filesource import FileSource, Stamp

if TYPE_CHECKING:
    from nexus_authz.decide import Decider

log = logging.getLogger("nexus_authz.ratelimit")

SERVICE = "envoy.service.ratelimit.v3.RateLimitService"
_OK = rls_pb2.RateLimitResponse.OK
_OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
_SUFFIXES = (".yaml", ".yml")
_MAX_RULE_STATS = 10_000  # distinct stats keys kept (detailed_metric can make one per value)


# -- the config directory -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RlsStatus:
    loaded: bool
    directory: str
    version: str
    files: int
    domains: int
    rules: int
    loaded_at: float
    last_error: str | None
    last_error_at: float | None


_Stamp = tuple[tuple[str, int, int, int], ...]


def _list_files(directory: str) -> list[str]:
    names = []
    with os.scandir(directory) as it:
        for entry in it:
            if entry.name.startswith(".") or not entry.name.endswith(_SUFFIXES):
                continue
            if entry.is_file():  # follows symlinks (ConfigMap volumes are symlinks into ..data/)
                names.append(entry.name)
    return sorted(names)


def directory_stamp(directory: str) -> _Stamp | None:
    """What identifies one version of the directory without reading it; None if it cannot be listed."""
    try:
        out = []
        for name in _list_files(directory):
            try:
                st = os.stat(os.path.join(directory, name))
            except OSError:
                continue
            out.append((name, st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)
    except OSError:
        return None


def read_config(directory: str, *, domains: Sequence[str] = (), merge_domains: bool = False) -> rls.RlsConfig:
    """Read and parse every config file of the directory; ConfigError names what is wrong."""
    try:
        names = _list_files(directory)
    except FileNotFoundError:
        raise ConfigError("ratelimit config directory not found", source=directory) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot list the ratelimit config directory: {exc.strerror}", source=directory
        ) from None
    files: list[tuple[str, str]] = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            files.append((path, Path(path).read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ConfigError("file disappeared while reading the directory", source=path) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the file: {exc}", source=path) from None
    return rls.parse_rls_config(files, domains=domains, merge_domains=merge_domains)


class RlsConfigSource:
    """The config in force (`config`, replaced whole by one reference swap) and its reloads: a
    FileSource over the directory (its stamp: every config file's stamp), like the key file's."""

    __slots__ = ("_domains", "_merge", "config", "directory", "file", "reloads")

    def __init__(
        self,
        directory: str,
        *,
        domains: Sequence[str] = (),
        merge_domains: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self._domains = tuple(domains)
        self._merge = merge_domains
        self.config: rls.RlsConfig | None = None
        self.file: FileSource[rls.RlsConfig] = FileSource(
            directory, self._read, clock=clock, stamp_of=directory_stamp
        )
        self.file.request_reload()  # nothing loaded yet
        # For metrics (read at scrape time): configs put in force after the first, and rejected ones.
        self.reloads: dict[str, int] = {"loaded": 0, "rejected": 0}

    def _read(self) -> rls.RlsConfig:
        return read_config(self.directory, domains=self._domains, merge_domains=self._merge)

    def load(self) -> rls.RlsConfig:
        """The first load (startup): raises ConfigError instead of keeping anything."""
        stamp = self.file.current_stamp()
        config = self._read()
        self.file.install(config, stamp)
        self._swap(config)
        return config

    def reload(self, *, force: bool = False) -> bool:
        """Load the directory if it changed. True if a new config is in force; a broken one is logged
        once and the previous config stays."""
        return self.file.poll(self.install, force=force)

    def install(self, result: rls.RlsConfig | ConfigError, stamp: Stamp) -> bool:
        """Put a loaded config in force, or keep the previous one and log why (once per change)."""
        config = self.file.install(result, stamp)
        if config is None:
            self.reloads["rejected"] += 1
            previous = self.config
            log.error(
                "ratelimit config rejected; the previous config stays in force",
                extra={
                    "error": str(result),
                    "ratelimit_version": previous.version if previous is not None else "",
                },
            )
            return False
        if self.config is not None and config.version == self.config.version:
            return False
        self._swap(config)
        self.reloads["loaded"] += 1
        return True

    def _swap(self, config: rls.RlsConfig) -> None:
        previous = self.config
        self.config = config
        log.info(
            "ratelimit config loaded",
            extra={
                "directory": self.directory,
                "files": len(config.sources),
                "domains": ",".join(sorted(config.domains)),
                "rules": len(config.rules),
                "ratelimit_version": config.version,
                "previous_version": previous.version if previous is not None else "",
            },
        )
        for warning in config.warnings:
            log.warning("ratelimit config: %s", warning)

    def status(self) -> RlsStatus:
        config = self.config
        source = self.file.status()
        return RlsStatus(
            loaded=config is not None,
            directory=self.directory,
            version=config.version if config is not None else "",
            files=len(config.sources) if config is not None else 0,
            domains=len(config.domains) if config is not None else 0,
            rules=len(config.rules) if config is not None else 0,
            loaded_at=source.loaded_at,
            last_error=source.last_error,
            last_error_at=source.last_error_at,
        )

    async def run(self, interval: float) -> None:
        """Poll forever (a task the server creates and cancels on drain); a changed directory is read
        and parsed in a worker thread, like the key file."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.file.poll_off_loop(self.install)
            except Exception:  # a bug must not stop reloads forever
                log.exception("ratelimit config reload failed")


# -- the service ---------------------------------------------------------------------------------------


def _descriptors(request: rls_pb2.RateLimitRequest) -> list[rls.RequestDescriptor]:
    make = rls.request_descriptor
    out = []
    for d in request.descriptors:
        entries = tuple([(e.key, e.value) for e in d.entries])
        hits = d.hits_addend.value if d.HasField("hits_addend") else None
        override = None
        if d.HasField("limit"):
            override = (d.limit.requests_per_unit, rls.UNIT_NAMES.get(d.limit.unit, ""))
        out.append(make(entries, hits, override))
    return out


def response_message(answer: rls.RlsAnswer, *, error_body: bool = True) -> rls_pb2.RateLimitResponse:
    response = rls_pb2.RateLimitResponse(overall_code=_OVER_LIMIT if answer.over_limit else _OK)
    statuses = response.statuses
    for st in answer.statuses:
        s = statuses.add()
        s.code = _OVER_LIMIT if st.over_limit else _OK
        rule = st.rule
        if rule is not None and rule.unit is not None:
            limit = s.current_limit
            limit.requests_per_unit = rule.requests_per_unit
            limit.unit = rls.UNIT_CODES[rule.unit]
            if rule.name:
                limit.name = rule.name
            s.duration_until_reset.seconds = st.reset_seconds
        s.limit_remaining = st.remaining
    headers = response.response_headers_to_add
    for name, value in answer.headers:
        headers.append(base_pb2.HeaderValue(key=name, value=value))
    if answer.over_limit and error_body and answer.body:
        response.raw_body = answer.body
        headers.append(base_pb2.HeaderValue(key="content-type", value="application/json"))
    return response


_EMPTY_OK = rls_pb2.RateLimitResponse(overall_code=_OK).SerializeToString()


# -- the wire encoding -----------------------------------------------------------------------------------
# RateLimitResponse written directly in protobuf's wire format: building the message field by field costs
# about as much as the whole decision (measured: benchmarks/bench_rls.py), and every part that belongs to
# a rule (its current_limit) is the same bytes for every request, so it is encoded once and cached.
# `response_message` builds the same response with the protobuf API; the tests check the two agree.
# Field numbers (envoy/service/ratelimit/v3/rls.proto, envoy/config/core/v3/base.proto):
#   RateLimitResponse: overall_code 1, statuses 2, response_headers_to_add 3, raw_body 5
#   DescriptorStatus: code 1, current_limit 2, limit_remaining 3, duration_until_reset 4
#   RateLimit: requests_per_unit 1, unit 2, name 3;  Duration: seconds 1;  HeaderValue: key 1, value 2
_VARINTS = tuple(bytes([n]) for n in range(128))


def _varint(n: int) -> bytes:
    if n < 128:
        return _VARINTS[n]
    out = bytearray()
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _VARINTS[tag] + _varint(len(payload)) + payload


def _limit_bytes(rule: rls.RateLimitRule) -> bytes:
    assert rule.unit is not None
    body = b""
    if rule.requests_per_unit:
        body += b"\x08" + _varint(rule.requests_per_unit)
    body += b"\x10" + _varint(rls.UNIT_CODES[rule.unit])
    if rule.name:
        body += _field(0x1A, rule.name.encode())
    return _field(0x12, body)  # DescriptorStatus.current_limit


_LIMITS: dict[rls.RateLimitRule, bytes] = {}
_CODE = {False: b"\x08\x01", True: b"\x08\x02"}


def _status_bytes(st: rls.DescriptorStatus) -> bytes:
    rule = st.rule
    body = _CODE[st.over_limit]
    if rule is not None and rule.unit is not None:
        limit = _LIMITS.get(rule)
        if limit is None:
            if len(_LIMITS) >= 65_536:  # reloads make new rules: keep the cache bounded
                _LIMITS.clear()
            limit = _LIMITS[rule] = _limit_bytes(rule)
        body += limit
        if st.remaining:
            body += b"\x18" + _varint(st.remaining)
        seconds = st.reset_seconds
        if seconds < 128:
            body += b"\x22\x02\x08" + _VARINTS[seconds]  # duration_until_reset {seconds}
        else:
            body += _field(0x22, b"\x08" + _varint(seconds))
    elif st.remaining:
        body += b"\x18" + _varint(st.remaining)
    return _field(0x12, body)  # RateLimitResponse.statuses


def encode_response(answer: rls.RlsAnswer, *, error_body: bool = True) -> bytes:
    """The serialized RateLimitResponse for an answer (the same message as `response_message`)."""
    parts = [b"\x08\x02" if answer.over_limit else b"\x08\x01"]
    parts.extend([_status_bytes(st) for st in answer.statuses])
    for name, value in answer.headers:
        parts.append(_field(0x1A, _field(0x0A, name.encode()) + _field(0x12, value.encode())))
    if answer.over_limit and error_body and answer.body:
        parts.append(_field(0x1A, _CONTENT_TYPE_JSON))
        parts.append(_field(0x2A, answer.body))
    return b"".join(parts)


_CONTENT_TYPE_JSON = _field(0x0A, b"content-type") + _field(0x12, b"application/json")


class RateLimitService:
    """The RateLimitService; `handler()` returns the grpc generic handler to register.

    `driver`: the decision driver over the counter store (the engine's `decider`: one store and one
    sweep serve both; counter ids start with "rls\\0" and cannot clash with the engine's).
    `identity`: key id -> (tenant, plan), see `engine_identity`.
    """

    __slots__ = (
        "clock",
        "driver",
        "counts",
        "error_body",
        "families",
        "identity",
        "response_headers",
        "rule_stats",
        "shadow_mode",
        "source",
    )

    def __init__(
        self,
        source: RlsConfigSource,
        driver: Decider,
        *,
        clock: Callable[[], float] = time.time,
        identity: rls.Identity | None = None,
        response_headers: bool = True,
        error_body: bool = True,
        shadow_mode: bool = False,
        families: Callable[[], int] | None = None,
    ) -> None:
        """`families`: the header families of the policy in force (`rate_limit_headers`, read at each
        answer: a config reload is seen at once); None: IETF's."""
        self.source = source
        self.families = families
        self.driver = driver
        self.clock = clock
        self.identity = identity
        self.response_headers = response_headers
        self.error_body = error_body
        self.shadow_mode = shadow_mode
        # Plain counters for metrics (read at scrape time): calls by result, and upstream's per-rule stats
        # [total_hits, over_limit, shadow_mode, within_limit] by stats key.
        self.counts: dict[str, int] = {
            "ok": 0,
            "over_limit": 0,
            "shadow_overridden": 0,
            "unknown_domain": 0,
            "store_unavailable": 0,
            "error": 0,
        }
        self.rule_stats: dict[str, list[int]] = {}

    @classmethod
    def from_settings(
        cls,
        settings: rls.RlsSettings,
        driver: Decider,
        *,
        clock: Callable[[], float] = time.time,
        identity: rls.Identity | None = None,
        families: Callable[[], int] | None = None,
    ) -> RateLimitService:
        """Build the service and load the config once; raises ConfigError (startup must fail loudly)."""
        if settings.config_dir is None:
            raise ConfigError("ratelimit.config_dir is not set", field="ratelimit.config_dir")
        source = RlsConfigSource(
            settings.config_dir, domains=settings.domains, merge_domains=settings.merge_domains, clock=clock
        )
        source.load()
        return cls(
            source,
            driver,
            clock=clock,
            identity=identity if settings.identity else None,
            response_headers=settings.response_headers,
            error_body=settings.error_body,
            shadow_mode=settings.shadow_mode,
            families=families,
        )

    # -- the decision ------------------------------------------------------------------------------------
    def plan(self, request: rls_pb2.RateLimitRequest) -> rls.RlsPlan | None:
        config = self.source.config
        if config is None or not request.descriptors:
            return None
        return config.plan(request.domain, _descriptors(request), request.hits_addend, self.identity)

    def conclude(self, plan: rls.RlsPlan, statuses: Sequence[WindowStatus], allowed: bool) -> bytes:
        """The serialized response for the store's statuses (see rls.answer)."""
        answer = rls.answer(
            plan,
            statuses,
            allowed,
            shadow_mode=self.shadow_mode,
            headers=self.response_headers,
            families=IETF if self.families is None else self.families(),
        )
        self._count(plan, answer)
        return encode_response(answer, error_body=self.error_body)

    def decide(self, request: rls_pb2.RateLimitRequest) -> bytes | Awaitable[bytes]:
        """The serialized response: at once when the store answers without waiting (the memory store),
        else an awaitable. Raises `StoreUnavailable` when the store cannot answer."""
        plan = self.plan(request)
        if plan is None:
            self.counts["ok"] += 1
            return _EMPTY_OK
        if not plan.specs and not plan.blocked:
            return self.conclude(plan, (), True)
        now = self.clock()
        if plan.blocked:  # nothing may be charged: read what each window holds now
            statuses = self.driver.read(plan.counter_ids, plan.specs, now)
            if statuses.__class__ is not tuple:
                return self._read_later(plan, statuses)  # type: ignore[arg-type]
            return self.conclude(plan, statuses, False)
        result = self.driver.charge(plan.counter_ids, plan.specs, plan.costs, now)
        if result.__class__ is not AcquireResult:
            return self._charge_later(plan, result)  # type: ignore[arg-type]
        return self.conclude(plan, result.statuses, result.allowed)

    async def _read_later(self, plan: rls.RlsPlan, pending: Awaitable[tuple[WindowStatus, ...]]) -> bytes:
        return self.conclude(plan, await pending, False)

    async def _charge_later(self, plan: rls.RlsPlan, pending: Awaitable[AcquireResult]) -> bytes:
        result = await pending
        return self.conclude(plan, result.statuses, result.allowed)

    def _count(self, plan: rls.RlsPlan, answer: rls.RlsAnswer) -> None:
        counts = self.counts
        if answer.over_limit:
            counts["over_limit"] += 1
        else:
            counts["ok"] += 1
            if answer.shadow_overridden:
                counts["shadow_overridden"] += 1
        if not plan.known_domain:
            counts["unknown_domain"] += 1
            return
        stats = self.rule_stats
        for dp, st in zip(plan.descriptors, answer.statuses, strict=True):
            if dp.rule is None:
                continue
            row = stats.get(dp.stat_key)
            if row is None:
                if len(stats) >= _MAX_RULE_STATS:
                    continue
                row = stats[dp.stat_key] = [0, 0, 0, 0]
            row[0] += dp.cost
            if st.over_limit:
                row[1] += 1
            elif st.shadow_violation:
                row[2] += 1
            else:
                row[3] += 1

    # -- grpc --------------------------------------------------------------------------------------------
    async def should_rate_limit(
        self, request: rls_pb2.RateLimitRequest, context: grpc.aio.ServicerContext
    ) -> bytes:
        try:
            out = self.decide(request)
            if out.__class__ is not bytes:  # waits for the counter store (Redis)
                out = await out  # type: ignore[misc]
            return out
        except StoreUnavailable as exc:
            self.counts["store_unavailable"] += 1
            log.warning("counter store unavailable for ShouldRateLimit", extra={"error": str(exc)})
            await context.abort(grpc.StatusCode.UNAVAILABLE, "counter store unavailable")
            raise  # unreachable: abort raises
        except Exception:
            self.counts["error"] += 1
            log.exception("internal error in ShouldRateLimit")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            raise

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "ShouldRateLimit": grpc.unary_unary_rpc_method_handler(
                    self.should_rate_limit,
                    request_deserializer=rls_pb2.RateLimitRequest.FromString,
                    response_serializer=_passthrough,
                )
            },
        )


def engine_header_families(engine: Any) -> Callable[[], int]:
    """The rate-limit header families of the engine's policy in force (`rate_limit_headers`)."""
    return lambda: int(engine.policy.header_families)


def engine_identity(engine: Any) -> rls.Identity:
    """key id -> (tenant, plan) from the engine's key snapshot in force (read at each call, so a key
    reload is seen at once)."""

    def identity(key_id: str) -> tuple[str, str | None] | None:
        record = engine.snapshot.by_id.get(key_id)
        return None if record is None else (record.tenant, record.plan)

    return identity


def _passthrough(data: bytes) -> bytes:
    return data
