"""The policy query API (`nexus.authz.v1.PolicyService`, protos/nexus/authz/v1/policy.proto) on grpc.aio.

It maps the engine's state to messages and nothing else: keys from the snapshot in force, window
figures from the counter store's `peek`, reservations from the reservation book, usage from the ledger
(`aquery`, off the event loop), and dry-run decisions from `Engine.dry_run`, which charges and counts
nothing; `Explain` (a key's limits at every level, which binds, a hypothetical request's dry run) is in
adapters/explain.py. It answers on its own listener (`listen.api`, built by the composition root:
app.start_api_server), apart from the Envoy-facing services, with its own grpc.health.v1 and reflection
so `grpcurl` works against it.

Every PolicyService call must carry `authorization: Bearer <admin token>`; the token is compared in
constant time (both sides hashed first, so not even its length leaks) and a missing or wrong one gets
UNAUTHENTICATED. Health and reflection need no token: they reveal no state. No answer or error carries a
client key, a key hash or a credential's value; error messages pass through the log scrubber as well.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import json
import logging
import secrets
import time
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from nexus_authz._gen.nexus.authz.v1 import policy_pb2 as pb
from nexus_authz._gen.nexus.authz.v1 import policy_pb2_grpc as pb_grpc
from nexus_authz.core import keys as keys_mod
from nexus_authz.core.keys import KEY_HEADERS, KeySnapshot
from nexus_authz.core.limits import Algorithm, Kind, LimitSpec
from nexus_authz.core.model import Decision, InFlight, KeyRecord, Request
from nexus_authz.engine import Engine
from nexus_authz.logs import scrub
from nexus_authz.metrics import ReservationEntry as _Entry
from nexus_authz.metrics import reservation_entries
from nexus_authz.settings import resolve_admin_token
from nexus_authz.stores.ledger import UsageRow

__all__ = [
    "SERVICE",
    "PolicyApi",
    "check_request",
    "resolve_admin_token",
]

log = logging.getLogger("nexus_authz.api")

SERVICE = pb.DESCRIPTOR.services_by_name["PolicyService"].full_name
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_USAGE_ROWS = 20_000  # ~2 MB of answer; more means the question should be narrower
DEFAULT_METHOD = "POST"
DEFAULT_PATH = "/v1/chat/completions"
_AUTH_LOG_INTERVAL = 10.0  # at most one warning per this many seconds about rejected tokens

_KIND = {
    Kind.REQUESTS: pb.LIMIT_KIND_REQUESTS,
    Kind.TOKENS: pb.LIMIT_KIND_TOKENS,
    Kind.USD: pb.LIMIT_KIND_USD,
    Kind.CONCURRENCY: pb.LIMIT_KIND_CONCURRENT,
}
_ALGORITHM = {
    Algorithm.GCRA: pb.LIMIT_ALGORITHM_GCRA,
    Algorithm.SLIDING: pb.LIMIT_ALGORITHM_SLIDING,
    Algorithm.GAUGE: pb.LIMIT_ALGORITHM_GAUGE,
    Algorithm.CALENDAR: pb.LIMIT_ALGORITHM_CALENDAR,
}
_GROUP = {
    pb.USAGE_GROUP_KEY: "key_id",
    pb.USAGE_GROUP_TENANT: "tenant",
    pb.USAGE_GROUP_MODEL: "model",
    pb.USAGE_GROUP_MINUTE: "minute",
    pb.USAGE_GROUP_HOUR: "hour",
    pb.USAGE_GROUP_DAY: "day",
    pb.USAGE_GROUP_SOURCE: "source",
    pb.USAGE_GROUP_PRICE_RULE: "price_rule",
}
_SETTLED_KINDS = frozenset({Kind.TOKENS, Kind.USD, Kind.CONCURRENCY})
_SCAN_INLINE = 2000  # reservations walked on the event loop; more are walked in a worker thread


class ApiError(Exception):
    """An expected failure of one call: answered with this status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# -- messages -----------------------------------------------------------------------------------------
def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(round(seconds * 1e9)))
    return ts


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(round(seconds * 1e9)))
    return d


def limit_message(spec: LimitSpec) -> pb.Limit:
    msg = pb.Limit(
        name=spec.name,
        kind=_KIND[spec.kind],
        limit=spec.limit,
        algorithm=_ALGORITHM[spec.algorithm],
        capacity=spec.capacity,
        slots=spec.slots,
        shadow=spec.shadow,
        model=spec.model or "",
        level=spec.level,
    )
    if spec.period:
        msg.period.CopyFrom(_duration(spec.period))
    return msg


def key_state(key: KeyRecord, now: float) -> pb.KeyState:
    if key.disabled:
        return pb.KEY_STATE_DISABLED
    if key.expires_at is not None and now >= key.expires_at:
        return pb.KEY_STATE_EXPIRED
    return pb.KEY_STATE_ACTIVE


def key_message(key: KeyRecord, now: float) -> pb.Key:
    """A key as the API shows it: never its hash, never its credential's value (only the name)."""
    msg = pb.Key(
        id=key.key_id,
        tenant=key.tenant,
        plan=key.plan or "",
        state=key_state(key, now),
        models=key.models,
        paths=key.paths,
        credential=key.credential.name if key.credential is not None else "",
        metadata=dict(key.metadata),
        limits=[limit_message(spec) for spec in key.limits],
    )
    if key.expires_at is not None:
        msg.expires_at.CopyFrom(_timestamp(key.expires_at))
    return msg


def snapshot_info(engine: Engine) -> pb.SnapshotInfo:
    status = engine.key_status()
    return pb.SnapshotInfo(
        version=status.version,
        loaded_at=_timestamp(status.loaded_at),
        keys=status.keys,
        file_error=status.last_error is not None,
    )


def usage_row_message(row: UsageRow) -> pb.UsageRow:
    msg = pb.UsageRow(
        requests=row.requests,
        prompt_tokens=row.prompt_tokens,
        cached_prompt_tokens=row.cached_prompt_tokens,
        completion_tokens=row.completion_tokens,
        reasoning_tokens=row.reasoning_tokens,
        cost_micro_usd=row.cost_micro_usd,
        first_minute=_timestamp(row.first_minute),
        last_minute=_timestamp(row.last_minute),
    )
    if row.key_id is not None:
        msg.key_id = row.key_id
    if row.tenant is not None:
        msg.tenant = row.tenant
    if row.model is not None:
        msg.model = row.model
    if row.period is not None:
        msg.period_start.CopyFrom(_timestamp(row.period))
    if row.source is not None:
        msg.source = row.source
    if row.price_rule is not None:
        msg.price_rule = row.price_rule
    return msg


def _usage_total(rows: list[UsageRow]) -> pb.UsageRow:
    total = pb.UsageRow()
    if not rows:
        return total
    for row in rows:
        total.requests += row.requests
        total.prompt_tokens += row.prompt_tokens
        total.cached_prompt_tokens += row.cached_prompt_tokens
        total.completion_tokens += row.completion_tokens
        total.reasoning_tokens += row.reasoning_tokens
        total.cost_micro_usd += row.cost_micro_usd
    total.first_minute.CopyFrom(_timestamp(min(r.first_minute for r in rows)))
    total.last_minute.CopyFrom(_timestamp(max(r.last_minute for r in rows)))
    return total


def check_request(msg: pb.CheckRequest, *, max_body: int) -> Request:
    """The core request for a CheckRequest (header names lower-cased, defaults filled in)."""
    if len(msg.body) > max_body:
        raise ApiError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"body of {len(msg.body)} bytes is larger than http.max_body_bytes ({max_body})",
        )
    headers: dict[str, str] = {}
    for name, value in msg.headers.items():
        lower = name.lower()
        headers[lower] = value if lower not in headers else headers[lower] + ", " + value
    return Request(
        method=msg.method or DEFAULT_METHOD,
        path=msg.path or DEFAULT_PATH,
        headers=headers,
        body=bytes(msg.body),
    )


def check_response(decision: Decision) -> pb.CheckResponse:
    key = decision.key
    credential = key.credential if key is not None else None
    upstream = []
    for name, value in decision.upstream_headers:
        if credential is not None and name == credential.header and value == credential.value:
            value = f"<credential {credential.name}>"
        upstream.append(pb.Header(name=name, value=value))
    return pb.CheckResponse(
        allowed=decision.allowed,
        http_status=decision.status,
        reason=decision.reason.value,
        message=decision.message,
        key_id=key.key_id if key is not None else "",
        tenant=key.tenant if key is not None else "",
        model=decision.model or "",
        response_headers=[pb.Header(name=n, value=v) for n, v in decision.response_headers],
        upstream_headers=upstream,
        removed_headers=list(decision.remove_headers) if decision.allowed else [],
        credential=credential.name if credential is not None and decision.allowed else "",
        error_body=decision.body.decode("utf-8", "replace"),
    )


def _as_key(record: KeyRecord, snapshot: KeySnapshot) -> tuple[KeySnapshot, str]:
    """A one-key snapshot holding `record` under a throwaway secret and pepper: a dry run "as this key"
    goes through exactly the same admission as a request that sent the real key."""
    secret = keys_mod.generate_secret()
    pepper = secrets.token_bytes(32)
    one = keys_mod.build_snapshot(
        [(keys_mod.digest(pepper, secret), record)],
        pepper=pepper,
        source=snapshot.source,
        version=snapshot.version,
        loaded_at=snapshot.loaded_at,
    )
    return one, secret


def _reserved(key: KeyRecord, entries: Iterable[_Entry]) -> tuple[dict[str, int], int]:
    """Per counter id, what this key's in-flight reservations hold; and how many there are."""
    mine = set(key.counter_ids)
    reserved: dict[str, int] = {}
    in_flight = 0
    for counter_ids, specs, costs, uncharged, _, _, context in entries:
        if isinstance(context, InFlight):
            if context.key_id != key.key_id:
                continue
        elif not counter_ids or counter_ids[0] not in mine:
            continue
        in_flight += 1
        for i, cid in enumerate(counter_ids):
            if cid in mine and specs[i].kind in _SETTLED_KINDS and not (uncharged >> i) & 1:
                reserved[cid] = reserved.get(cid, 0) + costs[i]
    return reserved, in_flight


# -- page tokens ----------------------------------------------------------------------------------------
def _page_token(tenant: str, after: str) -> str:
    raw = json.dumps({"t": tenant, "a": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _parse_page_token(token: str, tenant: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        after, token_tenant = data["a"], data["t"]
        if not isinstance(after, str) or not isinstance(token_tenant, str):
            raise ValueError
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "page_token is not one this API issued") from None
    if token_tenant != tenant:
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "page_token was issued for another tenant filter")
    return after


# -- the servicer -----------------------------------------------------------------------------------------
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Method = Callable[[Any, _Req, grpc.aio.ServicerContext], Awaitable[_Resp]]


def _rpc(method: _Method[_Req, _Resp]) -> _Method[_Req, _Resp]:
    """Admin-token check, typed errors -> status codes, bugs -> INTERNAL (logged), calls counted."""
    name = method.__name__

    @functools.wraps(method)
    async def call(self: PolicyApi, request: _Req, context: grpc.aio.ServicerContext) -> _Resp:
        if not self.authorized(context):
            self.count(name, grpc.StatusCode.UNAUTHENTICATED)
            self.note_rejected(context)
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid admin token: send metadata 'authorization: Bearer <token>'",
            )
        try:
            response = await method(self, request, context)
        except ApiError as exc:
            code, message = exc.code, exc.message
        except Exception:
            log.exception("internal error in the policy API", extra={"method": name})
            code, message = grpc.StatusCode.INTERNAL, "internal error (see the server's log)"
        else:
            self.count(name, grpc.StatusCode.OK)
            return response
        self.count(name, code)
        await context.abort(code, scrub(message))
        raise AssertionError("unreachable: abort raises")

    return call


class PolicyApi(pb_grpc.PolicyServiceServicer):
    """The PolicyService servicer. `calls` (method, code) -> count is read by the metrics collector."""

    def __init__(
        self,
        engine: Engine,
        admin_token: str,
        *,
        calls: MutableMapping[tuple[str, str], int] | None = None,
    ) -> None:
        if not admin_token:
            raise ValueError("the policy API needs an admin token")
        self.engine = engine
        self._token_digest = hashlib.sha256(admin_token.encode()).digest()
        self.calls: MutableMapping[tuple[str, str], int] = {} if calls is None else calls
        self._sorted: tuple[object, dict[str, list[str]]] = (None, {})
        self._rejected = 0
        self._rejected_logged_at = -_AUTH_LOG_INTERVAL

    # -- auth and bookkeeping ------------------------------------------------------------------------
    def authorized(self, context: grpc.aio.ServicerContext) -> bool:
        for item in context.invocation_metadata() or ():
            key, value = item[0], item[1]
            if key != "authorization" or not isinstance(value, str):
                continue
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() != "bearer":
                continue
            candidate = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
            if hmac.compare_digest(candidate, self._token_digest):
                return True
        return False

    def note_rejected(self, context: grpc.aio.ServicerContext) -> None:
        """One warning per interval, with how many calls were refused: probing must not flood the log."""
        self._rejected += 1
        now = time.monotonic()
        if now - self._rejected_logged_at >= _AUTH_LOG_INTERVAL:
            log.warning(
                "policy API call refused: missing or invalid admin token",
                extra={"peer": context.peer(), "refused_since_last_warning": self._rejected},
            )
            self._rejected = 0
            self._rejected_logged_at = now

    def count(self, method: str, code: grpc.StatusCode) -> None:
        key = (method, code.name)
        self.calls[key] = self.calls.get(key, 0) + 1

    def _key(self, key_id: str) -> KeyRecord:
        if not key_id:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "key_id is required")
        key = self.engine.snapshot.by_id.get(key_id)
        if key is None:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"no key with id {key_id!r} in the key snapshot")
        return key

    def _ids(self, snapshot: KeySnapshot, tenant: str) -> list[str]:
        """Key ids in order (of one tenant), computed once per snapshot and filter."""
        cached_snapshot, by_tenant = self._sorted
        if cached_snapshot is not snapshot:
            by_tenant = {}
            self._sorted = (snapshot, by_tenant)
        ids = by_tenant.get(tenant)
        if ids is None:
            if len(by_tenant) >= 64:
                by_tenant.clear()
            ids = sorted(k for k, rec in snapshot.by_id.items() if not tenant or rec.tenant == tenant)
            by_tenant[tenant] = ids
        return ids

    # -- methods ---------------------------------------------------------------------------------------
    @_rpc
    async def GetKey(self, request: pb.GetKeyRequest, context: grpc.aio.ServicerContext) -> pb.GetKeyResponse:
        key = self._key(request.key_id)
        return pb.GetKeyResponse(
            key=key_message(key, self.engine.clock()), snapshot=snapshot_info(self.engine)
        )

    @_rpc
    async def ListKeys(
        self, request: pb.ListKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListKeysResponse:
        if request.page_size < 0:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "page_size must not be negative")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        snapshot = self.engine.snapshot
        ids = self._ids(snapshot, request.tenant)
        start = (
            bisect_right(ids, _parse_page_token(request.page_token, request.tenant))
            if request.page_token
            else 0
        )
        page = ids[start : start + size]
        now = self.engine.clock()
        more = start + size < len(ids)
        return pb.ListKeysResponse(
            keys=[key_message(snapshot.by_id[k], now) for k in page],
            next_page_token=_page_token(request.tenant, page[-1]) if more and page else "",
            total_size=len(ids),
            snapshot=snapshot_info(self.engine),
        )

    @_rpc
    async def GetLimitStatus(
        self, request: pb.GetLimitStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetLimitStatusResponse:
        engine = self.engine
        key = self._key(request.key_id)
        now = engine.clock()
        statuses = await engine.peek(key.counter_ids, key.limits, now) if key.limits else ()
        if statuses is None:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "the counter store (Redis) is unavailable")
        # Entries are immutable tuples: copy the table here, walk it in a thread when it is large, so a
        # book full of unsettled reservations does not stall decisions on the loop.
        entries = list(reservation_entries(engine.book))
        if len(entries) > _SCAN_INLINE:
            reserved, in_flight = await asyncio.to_thread(_reserved, key, entries)
        else:
            reserved, in_flight = _reserved(key, entries)
        windows = []
        for cid, status in zip(key.counter_ids, statuses, strict=True):
            spec = status.spec
            capacity = spec.capacity
            remaining = max(0, min(status.remaining, capacity))
            window = pb.WindowStatus(
                name=spec.name if spec.level == "key" else f"{spec.level}:{spec.name}",
                kind=_KIND[spec.kind],
                limit=spec.limit,
                capacity=capacity,
                used=capacity - remaining,
                remaining=remaining,
                reset_after=_duration(status.reset_after),
                reset_at=_timestamp(now + status.reset_after),
                shadow=spec.shadow,
                model=spec.model or "",
                reserved=reserved.get(cid, 0),
                algorithm=_ALGORITHM[spec.algorithm],
            )
            if spec.period:
                window.period.CopyFrom(_duration(spec.period))
            windows.append(window)
        return pb.GetLimitStatusResponse(
            key_id=key.key_id, windows=windows, reservations_in_flight=in_flight, as_of=_timestamp(now)
        )

    @_rpc
    async def GetUsage(
        self, request: pb.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetUsageResponse:
        ledger = self.engine.ledger
        if ledger is None:
            raise ApiError(
                grpc.StatusCode.FAILED_PRECONDITION, "the usage ledger is disabled (ledger.backend)"
            )
        group_by = []
        for group in request.group_by:
            if group not in _GROUP:
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown group_by value {group}")
            group_by.append(_GROUP[group])
        since = request.start_time.ToNanoseconds() / 1e9 if request.HasField("start_time") else None
        until = request.end_time.ToNanoseconds() / 1e9 if request.HasField("end_time") else None
        if since is not None and until is not None and until < since:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "end_time is before start_time")
        try:
            rows = await ledger.aquery(
                key_id=request.key_id or None,
                tenant=request.tenant or None,
                model=request.model or None,
                since=since,
                until=until,
                group_by=tuple(group_by) or ("key_id", "model"),
            )
        except ValueError as exc:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except Exception as exc:  # the store itself failed (a locked or corrupt file...)
            log.warning("usage query failed", extra={"error": str(exc)})
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "the usage ledger could not be read") from None
        if len(rows) > MAX_USAGE_ROWS:
            raise ApiError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(rows)} rows (at most {MAX_USAGE_ROWS}): narrow the time range or group more coarsely",
            )
        stats = ledger.stats()
        return pb.GetUsageResponse(
            rows=[usage_row_message(r) for r in rows],
            total=_usage_total(rows),
            ledger_lag=_duration(stats.flush_lag),
            pending_rows=stats.pending_rows,
        )

    @_rpc
    async def Check(self, request: pb.CheckRequest, context: grpc.aio.ServicerContext) -> pb.CheckResponse:
        engine = self.engine
        req = check_request(request, max_body=engine.settings.max_body_bytes)
        if not request.key_id:
            return check_response(await engine.dry_run(req))
        if any(h in req.headers for h in KEY_HEADERS):
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "give either key_id or a client key in the headers, not both",
            )
        record = self._key(request.key_id)
        snapshot, secret = _as_key(record, engine.snapshot)
        as_key = Request(
            method=req.method,
            path=req.path,
            headers={**req.headers, "authorization": f"Bearer {secret}"},
            body=req.body,
        )
        return check_response(await engine.dry_run(as_key, snapshot))

    @_rpc
    async def Explain(
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExplainResponse:
        from nexus_authz.adapters.explain import explain  # it imports this module's helpers

        return await explain(self.engine, self._key(request.key_id), request)
