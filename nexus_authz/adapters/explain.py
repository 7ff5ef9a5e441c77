"""The policy API's `Explain` (protos/nexus/authz/v1/policy.proto): why a key's next request would pass.

For a key (and optionally a model) it lists every limit of the key, grouped by level (`LimitSpec.level`:
"key", "group", "tenant"), with the window's figures from the counter store's `peek` (so any window kind
reports its own remaining and reset), what in-flight reservations hold of it, and a hypothetical request
run against the applying limits the way a dry-run Check runs (`Policy.admit` as the key, `peek` with the
request's costs, `Policy.conclude` without a reservation book): nothing is charged, reserved or counted.

The hypothetical request: `total_tokens`, or `prompt_tokens` and/or `completion_tokens`, or (none given)
no prompt and the default completion (`reservations.default_max_tokens`). It charges 1 to request and
concurrency limits, its tokens to token limits and its price (from the price table, without counting it
as an unpriced request) to USD limits; a bare total is priced at the dearer of the input and output price.

Which limit binds (docs/api.md, "Explain"): among the enforced limits that apply, the one refusing the
hypothetical request with the longest retry_after when any refuses it (the one its Retry-After waits
for), else the one with the least headroom (remaining / cost: how many such requests still fit); ties go
to the longer reset_after, then to the level order key, group, tenant, then to the key's order.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterable, Sequence

import grpc

from nexus_authz._gen.nexus.authz.v1 import policy_pb2 as pb
from nexus_authz.adapters.policy_api import (
    _ALGORITHM,
    _KIND,
    _SCAN_INLINE,
    _SETTLED_KINDS,
    ApiError,
    _as_key,
    _duration,
    _timestamp,
    check_response,
)
from nexus_authz.core.limits import MAX_LIMIT, Kind, LimitSpec, WindowStatus, applicable, new_result
from nexus_authz.core.model import Decision, InFlight, KeyRecord, Request
from nexus_authz.core.policy import Admission
from nexus_authz.engine import Engine
from nexus_authz.metrics import ReservationEntry, reservation_entries

__all__ = ["LEVELS", "binding_index", "explain"]

LEVELS = ("key", "group", "tenant")
_LEVEL_ORDER = {level: i for i, level in enumerate(LEVELS)}


def _tokens(request: pb.ExplainRequest, default_completion: int) -> tuple[int, int, int | None]:
    """(prompt, completion, total when only a total was given) of the hypothetical request."""
    given = {
        name: getattr(request, name)
        for name in ("prompt_tokens", "completion_tokens", "total_tokens")
        if request.HasField(name)
    }
    for name, value in given.items():
        if not 0 <= value <= MAX_LIMIT:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"{name} must be in 0..{MAX_LIMIT}, got {value}")
    if "total_tokens" in given:
        if len(given) > 1:
            raise ApiError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "give total_tokens alone, or prompt_tokens and/or completion_tokens, not both",
            )
        return 0, 0, given["total_tokens"]
    if not given:
        return 0, default_completion, None
    return given.get("prompt_tokens", 0), given.get("completion_tokens", 0), None


def _price(engine: Engine, model: str | None, prompt: int, completion: int, total: int | None) -> int:
    """Micro-USD of the hypothetical request, as Check prices a reservation (the table's fallback for a
    model no price matches), without counting it in the unpriced-requests metric."""
    prices = engine.policy.prices
    if not prices:
        return 0
    price = prices.lookup(model).price
    if total is not None:
        return math.ceil(total * max(price.input, price.output))
    return math.ceil(prompt * price.input + completion * price.output)


def _cost(spec: LimitSpec, tokens: int, usd: int) -> int:
    if spec.kind is Kind.TOKENS:
        return tokens
    if spec.kind is Kind.USD:
        return usd
    return 1


def _held(key: KeyRecord, entries: Iterable[ReservationEntry]) -> tuple[dict[str, int], int]:
    """Per counter id of the key, what in-flight reservations hold of it (any key's: a group or tenant
    counter is shared); and how many of this key's requests are in flight."""
    mine = set(key.counter_ids)
    held: dict[str, int] = {}
    in_flight = 0
    for counter_ids, specs, costs, uncharged, _, _, context in entries:
        if isinstance(context, InFlight):
            own = context.key_id == key.key_id
        else:
            # without tracking, a request is this key's when it charged one of the key's own counters
            own = any(c in mine and s.level == "key" for c, s in zip(counter_ids, specs, strict=False))
        in_flight += own
        for i, cid in enumerate(counter_ids):
            if cid in mine and specs[i].kind in _SETTLED_KINDS and not (uncharged >> i) & 1:
                held[cid] = held.get(cid, 0) + costs[i]
    return held, in_flight


def binding_index(
    specs: Sequence[LimitSpec],
    remaining: Sequence[int],
    reset_after: Sequence[float],
    costs: Sequence[int],
    verdicts: Sequence[WindowStatus | None],
) -> int | None:
    """Index of the binding limit (see the module's docstring), None when no enforced limit applies or
    none bounds the request. `verdicts[i]` is None for a limit that does not apply."""
    best: tuple[float, ...] | None = None
    chosen = None
    for i, spec in enumerate(specs):
        verdict = verdicts[i]
        if verdict is None or spec.shadow:
            continue
        tie = (-reset_after[i], _LEVEL_ORDER.get(spec.level, len(LEVELS)), i)
        if not verdict.allowed:
            rank = (0.0, -verdict.retry_after, *tie)
        elif costs[i] > 0:
            rank = (1.0, remaining[i] / costs[i], *tie)
        else:
            continue
        if best is None or rank < best:
            best, chosen = rank, i
    return chosen


async def explain(engine: Engine, key: KeyRecord, request: pb.ExplainRequest) -> pb.ExplainResponse:
    model = request.model or None
    prompt, completion, total = _tokens(request, engine.settings.policy.reservations.default_max_tokens)
    tokens = total if total is not None else prompt + completion
    usd = _price(engine, model, prompt, completion, total)
    now = engine.clock()

    # The limits that apply: those the admission selects (the policy's own choice), else (a request
    # refused before its limits) those whose model glob matches.
    admission = _admit(engine, key, model, now)
    if isinstance(admission, Admission) and admission.specs:
        ids, specs = admission.counter_ids, admission.specs
    else:
        picked = applicable(key.limits, model)
        ids = tuple(key.counter_ids[i] for i in picked)
        specs = tuple(key.limits[i] for i in picked)
    costs = tuple(_cost(spec, tokens, usd) for spec in specs)
    statuses = await engine.peek(key.counter_ids, key.limits, now) if key.limits else ()
    verdicts = await engine.peek(ids, specs, now, costs) if specs else ()
    if statuses is None or verdicts is None:
        raise ApiError(grpc.StatusCode.UNAVAILABLE, "the counter store (Redis) is unavailable")
    if isinstance(admission, Admission):
        allowed = all(v.allowed or v.spec.shadow for v in verdicts)
        result = new_result(allowed, tuple(verdicts), 0 if allowed else -1)
        # no book: nothing is reserved
        decision = engine.policy.conclude(admission._replace(costs=costs), result, now)
    else:
        decision = admission
    by_id = {cid: (verdict, cost) for cid, verdict, cost in zip(ids, verdicts, costs, strict=True)}

    entries = list(reservation_entries(engine.book))
    if len(entries) > _SCAN_INLINE:
        held, in_flight = await asyncio.to_thread(_held, key, entries)
    else:
        held, in_flight = _held(key, entries)

    remaining = [max(0, min(s.remaining, s.spec.capacity)) for s in statuses]
    applying = [by_id.get(cid) for cid in key.counter_ids]
    bind = binding_index(
        key.limits,
        remaining,
        [s.reset_after for s in statuses],
        [a[1] if a is not None else 0 for a in applying],
        [a[0] if a is not None else None for a in applying],
    )
    levels: dict[str, list[pb.LimitExplanation]] = {}
    for i, (cid, status) in enumerate(zip(key.counter_ids, statuses, strict=True)):
        spec = status.spec
        item = pb.LimitExplanation(
            name=spec.name,
            level=spec.level,
            kind=_KIND[spec.kind],
            limit=spec.limit,
            capacity=spec.capacity,
            used=spec.capacity - remaining[i],
            remaining=remaining[i],
            reset_after=_duration(status.reset_after),
            reset_at=_timestamp(now + status.reset_after),
            reserved=held.get(cid, 0),
            shadow=spec.shadow,
            model=spec.model or "",
            algorithm=_ALGORITHM[spec.algorithm],
            binding=i == bind,
        )
        if spec.period:
            item.period.CopyFrom(_duration(spec.period))
        if applying[i] is not None:
            verdict, cost = applying[i]  # type: ignore[misc]
            item.applies = True
            item.cost = cost
            if cost > 0:
                item.headroom = remaining[i] / cost
            item.would_refuse = not verdict.allowed
            if not verdict.allowed:
                if math.isinf(verdict.retry_after):
                    item.never_fits = True
                else:
                    item.retry_after.CopyFrom(_duration(verdict.retry_after))
        levels.setdefault(spec.level, []).append(item)

    order = sorted(levels, key=lambda level: (_LEVEL_ORDER.get(level, len(LEVELS)), level))
    binding = key.limits[bind] if bind is not None else None
    return pb.ExplainResponse(
        key_id=key.key_id,
        tenant=key.tenant,
        group=key.group,
        model=model or "",
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=tokens,
        cost_micro_usd=usd,
        levels=[pb.LevelExplanation(level=level, limits=levels[level]) for level in order],
        binding=binding.name if binding is not None else "",
        binding_level=binding.level if binding is not None else "",
        decision=check_response(decision),
        reservations_in_flight=in_flight,
        as_of=_timestamp(now),
    )


def _admit(engine: Engine, key: KeyRecord, model: str | None, now: float) -> Admission | Decision:
    """A request for `model` as the key, through the same admission as Check (disabled, expired, model or
    path not allowed are refused here); no failure counting."""
    snapshot, secret = _as_key(key, engine.snapshot)
    headers = {"authorization": f"Bearer {secret}"}
    body = b""
    if model is not None:
        body = json.dumps({"model": model, "messages": []}).encode()
        headers["content-type"] = "application/json"
    return engine.policy.admit(Request("POST", "/v1/chat/completions", headers, body), snapshot, now)
