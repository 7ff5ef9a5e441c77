"""The decision: who is calling, may they call this, and what the answer looks like.

Pure: the key snapshot, the time and the counters' answer come in, a `Decision` comes out.
`Policy.admit` says who is calling and what each window must be charged; `Policy.conclude` turns the
counter store's answer into the decision and says which reservations to give back. The one driver that
does the store's I/O in between, for every transport (HTTP ext_authz, gRPC ext_authz, nginx
auth_request, the rate limit service, the policy API's dry run), is `nexus_authz.decide.Decider`.
Denials are built from cached parts (the JSON body of each reason is rendered once), so the common
answers allocate almost nothing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

from nexus_authz.core import body as body_facts
from nexus_authz.core import ratelimit_headers as _headers
from nexus_authz.core.body import RequestFacts, is_multipart, multipart_model
from nexus_authz.core.config import PolicySet
from nexus_authz.core.denials import DENIALS as _DENIALS
from nexus_authz.core.denials import ERRORS as _ERRORS
from nexus_authz.core.denials import (
    anthropic_shaped,
    error_body,
    error_status,
    is_anthropic_path,
)
from nexus_authz.core.forwarded import DECLARED, declared_length
from nexus_authz.core.hierarchy import owner_of
from nexus_authz.core.keys import KeySnapshot, extract_key
from nexus_authz.core.known import KnownKeys
from nexus_authz.core.limits import AcquireResult, Kind, LimitSpec, applicable, make_limit
from nexus_authz.core.model import Decision, InFlight, KeyRecord, Reason, Request, new_allow
from nexus_authz.core.ports import Adjust, CounterStore
from nexus_authz.core.price_policy import unpriced_message
from nexus_authz.core.pricing import PriceTable
from nexus_authz.core.prompt_later import deferred
from nexus_authz.core.reservations import ReservationBook, settle_with
from nexus_authz.core.shapes import Shape, costs_of, near_limit, shape_of


class Admission(NamedTuple):
    """A request that passed authentication and the key's rules, with what its limits must be charged.

    The half-way point between `Policy.admit` and `Policy.conclude`: a local counter store answers at
    once, a remote one (Redis) is awaited in between, and both finish with the same `conclude`.
    A NamedTuple: immutable and built in C (one per admitted request).
    """

    key: KeyRecord
    model: str | None
    counter_ids: tuple[str, ...]
    specs: tuple[LimitSpec, ...]
    costs: tuple[int, ...]
    request_id: str
    prompt_tokens: int = 0
    anthropic: bool = False  # an Anthropic API path: denials get Anthropic's error body
    uncapped: bool = False  # a generating request whose body sets no completion cap (core/clamp.py)
    body: bytes | None = None  # tracked, no estimate at Check: kept to estimate it later (prompt_later)
    shape: Shape | None = None  # what the windows' tuple implies, made once per tuple (core/shapes.py)


class Policy:
    """The rules: who may call, which model and path, and what their limits are charged.

    Holds only configuration (prices, reservation defaults), small bounded caches and the brute-force
    throttle's bounded allowance (`KnownKeys`); the key snapshot,
    the counters and the reservation book come in per call, so one Policy serves every transport.
    """

    __slots__ = (
        "_auth_spec",
        "_default_max_tokens",
        "_denial_spec",
        "_known",
        "_selection",
        "header_families",
        "prices",
        "track",
    )

    def __init__(
        self,
        policy: PolicySet | None = None,
        *,
        track: bool = False,
        unpriced_counts: dict[tuple[str, str], int] | None = None,
    ) -> None:
        """`track`: remember every admitted request (key, model, prompt estimate) in the reservation book
        until its usage is accounted, not only those whose windows need settling. `unpriced_counts`: where
        the price table counts unpriced requests (the engine's, so they survive a reload)."""
        policy = policy or PolicySet()
        self.track = track
        self.prices = PriceTable(policy.prices, policy.unpriced, unpriced_counts)
        throttle = policy.auth_failures
        self._auth_spec = (
            make_limit(Kind.REQUESTS, throttle.limit, throttle.per, name="auth-failures")
            if throttle.limit
            else None
        )
        # Requests refused for their body (400/403/413) count per key with the same allowance: beyond
        # it the key's requests with a body are refused (429) before the body is read.
        self._denial_spec = (
            make_limit(Kind.REQUESTS, throttle.limit, throttle.per, name="rejected-bodies")
            if throttle.limit
            else None
        )
        self._known = KnownKeys()  # keys a throttled address still serves (issue 13.11)
        self._default_max_tokens = policy.reservations.default_max_tokens
        # the rate-limit header families answers carry (`rate_limit_headers`): in every shape's header plan
        self.header_families = _headers.families_of(policy.rate_limit_headers)
        # (key, model) -> the key's windows that apply to that model: per-model globs are matched once.
        self._selection: dict[
            tuple[KeyRecord, str | None], tuple[tuple[str, ...], tuple[LimitSpec, ...]]
        ] = {}

    @property
    def default_max_tokens(self) -> int:
        """The completion reserved for a request that sets no cap (`reservations.default_max_tokens`)."""
        return self._default_max_tokens

    # -- step 1: who, and what it costs ---------------------------------------------------------------
    def admit(
        self, request: Request, snapshot: KeySnapshot, now: float, failures: CounterStore | None = None
    ) -> Decision | Admission:
        admission = self._admit(request, snapshot, now, failures)
        if isinstance(admission, Decision) and not admission.allowed and is_anthropic_path(request.path):
            return anthropic_shaped(admission)
        return admission

    def _admit(
        self, request: Request, snapshot: KeySnapshot, now: float, failures: CounterStore | None = None
    ) -> Decision | Admission:
        secret = extract_key(request.headers)
        if secret is None:
            return _DENIALS[Reason.MISSING_KEY]
        failure_id = None
        throttled = None
        if failures is not None and self._auth_spec is not None and request.client_address:
            failure_id = "\x01auth\x00" + request.client_address
            if failures and failure_id in failures:  # this address failed before: is it refused now?
                (status,) = failures.peek((failure_id,), (self._auth_spec,), now, (1,))
                if not status.allowed:
                    throttled = _throttled(status.retry_after)
        key = snapshot.lookup(secret)
        if throttled is not None and (
            key is None or not self._known.known(request.client_address, key.key_id, now)
        ):
            # Only keys that authenticated from this address before get through: any other key, valid
            # or not, gets this same answer, so a guess that hits is not revealed.
            return throttled
        if key is None:
            if failure_id is not None and failures is not None:
                failures.acquire((failure_id,), (self._auth_spec,), (1,), now)  # type: ignore[arg-type]
            return _DENIALS[Reason.UNKNOWN_KEY]
        if key.disabled:
            return _DENIALS[Reason.DISABLED_KEY]
        if key.expires_at is not None and now >= key.expires_at:
            return _DENIALS[Reason.EXPIRED_KEY]
        if failure_id is not None:
            self._known.note(request.client_address, key.key_id, now)
        if key.paths and not snapshot.path_allowed(key, request.path.partition("?")[0]):
            return _DENIALS[Reason.PATH_NOT_ALLOWED]
        model: str | None = None
        facts: RequestFacts | None = None
        if request.body and (key.models or key.needs_facts):
            denial_id = None
            if failures is not None and self._denial_spec is not None:
                denial_id = "\x01denied\x00" + key.key_id
                if failures and denial_id in failures:  # this key was refused before: is it throttled?
                    (status,) = failures.peek((denial_id,), (self._denial_spec,), now, (1,))
                    if not status.allowed:
                        return _too_many_refusals(status.retry_after)
            read = self._read_body(request, key)
            if read.__class__ is tuple:
                model, facts = read
                if model is not None and key.models and not snapshot.model_allowed(key, model):
                    read = _DENIALS[Reason.MODEL_NOT_ALLOWED]
                elif model is not None and self.prices.refuse and self.prices.refuses(model):
                    read = _deny(Reason.MODEL_NOT_ALLOWED, unpriced_message(model))
            if read.__class__ is not tuple:
                if denial_id is not None and failures is not None:
                    failures.acquire((denial_id,), (self._denial_spec,), (1,), now)  # type: ignore[arg-type]
                return read  # type: ignore[return-value]
        prompt = facts.prompt_tokens if facts else 0
        kept = None
        if self.track:
            prompt, kept = deferred(request, key.needs_facts, prompt)
        if not key.limits:
            if not self.track:
                return _allow(key, model)
            return Admission(key, model, (), (), (), request.request_id, prompt, body=kept)
        counter_ids, specs = self._windows(key, model)
        shape = shape_of(specs, self.header_families)
        generating, anthropic = _path_facts(request.path)
        return Admission(
            key,
            model,
            counter_ids,
            specs,
            self._costs(specs, model, facts, generating and request.method == "POST", shape),
            request.request_id,
            prompt,
            anthropic,
            facts is not None and facts.max_tokens is None and facts.is_object,
            kept,
            shape,
        )

    def _read_body(
        self, request: Request, key: KeyRecord
    ) -> Decision | tuple[str | None, RequestFacts | None]:
        """The model and facts of the body (the strict reading), or the refusal.

        The model decided on must be the one the upstream will use: a body that could say otherwise
        (a duplicate top-level key, not UTF-8, compressed, or cut by the proxy before its end, where a
        later duplicate could follow) is refused wherever the model matters (an allow-list, USD prices,
        per-model windows). A cut body on a key whose windows do not depend on the model is admitted
        with a reservation for the whole body (its declared length) and the default completion.
        """
        headers = request.headers
        body = request.body
        truncated = request.body_truncated
        encoding = headers.get("content-encoding", "")
        if encoding and encoding.strip().lower() != "identity":
            return _deny(
                Reason.BAD_REQUEST,
                "Requests of this API key are checked by their body, which must not be compressed "
                "(content-encoding).",
            )
        if truncated and (key.models or key.model_scoped or _priced(key)):
            return _too_large(len(body))
        content_type = headers.get("content-type", "")
        facts: RequestFacts | None = None
        if is_multipart(content_type):
            model, problem = multipart_model(body, content_type, truncated=truncated)
            understood = model is not None
        else:
            facts = body_facts.read_facts(  # the compiled reading when it loaded (nexus_authz/native/)
                body, estimate_prompt=key.needs_facts, precise=False, truncated=truncated
            )
            model, problem, understood = facts.model, facts.problem, facts.is_object
        if problem is not None:
            return _deny(Reason.BAD_REQUEST, problem)
        if truncated:
            # Nothing after the cut is proved: not the model (a duplicate may follow; the usage is then
            # priced at the model the upstream reports), not max_tokens or n, not the prompt's size.
            declared = declared_length(headers.get(DECLARED))  # the client's Content-Length (-1: unknown)
            if declared <= len(body):
                return _too_large(len(body))
            if facts is not None:
                prompt = facts.prompt_tokens + math.ceil((declared - len(body)) * UNSEEN_TOKENS_PER_BYTE)
                cap = max(facts.max_tokens or 0, self._default_max_tokens)
                facts = dataclasses.replace(facts, model=None, max_tokens=cap, prompt_tokens=prompt)
            return None, facts
        if model is None and key.models:
            if understood:
                # A restricted key must name an allowed model at the top level of the body.
                return _deny(Reason.MODEL_NOT_ALLOWED, "The model could not be read from the request.")
            return _DENIALS[Reason.BAD_REQUEST]
        return model, facts

    def _windows(self, key: KeyRecord, model: str | None) -> tuple[tuple[str, ...], tuple[LimitSpec, ...]]:
        if not key.model_scoped:  # every window applies to every request: nothing to select or cache
            return key.counter_ids, key.limits
        selection = self._selection.get((key, model))
        if selection is None:
            picked = applicable(key.limits, model)
            selection = (tuple(key.counter_ids[i] for i in picked), tuple(key.limits[i] for i in picked))
            if len(self._selection) >= _SELECTION_CACHE:
                self._selection.clear()  # model names are client-chosen: keep the cache bounded
            self._selection[(key, model)] = selection
        return selection

    def _costs(
        self,
        specs: tuple[LimitSpec, ...],
        model: str | None,
        facts: RequestFacts | None,
        completes: bool = True,
        shape: Shape | None = None,
    ) -> tuple[int, ...]:
        """What each window is charged now: 1 request, the token estimate, its price, 1 slot.

        `completes` False (see `generates`): the prompt estimate only, no completion reserved.
        `shape`: `shape_of(specs)`, when the caller has it."""
        if shape is None:
            shape = shape_of(specs, self.header_families)
        tokens = usd = 0
        if shape.metered:
            if facts is not None:
                prompt = facts.prompt_tokens
                n = facts.n if facts.n > 0 else 1
                max_tokens = facts.max_tokens or None
            else:
                prompt, n, max_tokens = 0, 1, None
            completion = (max_tokens or self._default_max_tokens) * n if completes else 0
            tokens = prompt + completion
            usd = self.prices.cost(model, prompt, 0, completion) if self.prices else 0
        return costs_of(shape, tokens, usd)

    # -- step 2: the counters' answer -> the decision ---------------------------------------------------
    def conclude(
        self,
        admission: Admission,
        result: AcquireResult,
        now: float,
        adjust: Adjust | None = None,
        book: ReservationBook | None = None,
    ) -> Decision:
        """The decision for the counters' answer; an admitted request's reservation goes in `book`, and
        the reservations it displaced (expired meanwhile, evicted) are given back through `adjust` (the
        store's non-blocking adjust). Without `book`, nothing is reserved (a dry run)."""
        shape = admission.shape or shape_of(admission.specs, self.header_families)
        headers = _headers.build_headers(shape.headers, result.statuses, not result.allowed)
        if not result.allowed:
            limited = _limited(result, headers, admission.key)
            return anthropic_shaped(limited) if admission.anthropic else limited
        uncharged = result.uncharged
        self._reserve(admission, uncharged, now, adjust, book, shape.settle_mask & ~uncharged != 0)
        if book is not None and admission.request_id and marks_release(shape, result):
            return new_allow(admission.key, admission.model, headers, admission.request_id)
        return _allow(admission.key, admission.model, headers)

    def _reserve(
        self,
        admission: Admission,
        uncharged: int,
        now: float,
        adjust: Adjust | None,
        book: ReservationBook | None,
        settles: bool | None = None,
    ) -> None:
        """Remember what the request reserved (and, when tracking, who it was) until it is settled
        (`settles`: whether a window must be settled, when the caller knows)."""
        if book is None or not admission.request_id:
            return
        key = admission.key
        context = (
            InFlight(key.key_id, key.tenant, admission.model, admission.prompt_tokens, admission.body)
            if self.track
            else None
        )
        displaced = book.reserve(
            admission.request_id,
            admission.counter_ids,
            admission.specs,
            admission.costs,
            now,
            uncharged,
            context=context,
            settles=settles,
        )
        if displaced and adjust is not None:  # reservations that expired meanwhile or were displaced
            settle_with(adjust, displaced, now)


def marks_release(shape: Shape, result: AcquireResult) -> bool:
    """Whether an admitted request (with a request id, reserved in a book) is marked for its slot's early
    release by the proxy (`Decision.release`): it holds a slot near its window's limit, which the proxy
    frees as the response ends (shapes.near_limit). The one place of that rule (Decider.check_plain
    uses it too)."""
    return shape.slot_mask != 0 and near_limit(shape, result.statuses, result.uncharged)


# A cut body's unseen bytes are reserved at this many tokens a byte: twice the usual density of text
# and JSON (~0.25), more than any script but the densest (accented Latin-1 runs, emoji); base64 images
# are over-reserved (the settle gives it back).
UNSEEN_TOKENS_PER_BYTE = 0.5


def _priced(key: KeyRecord) -> bool:
    return any(spec.kind is Kind.USD for spec in key.limits)


def _too_large(forwarded: int) -> Decision:
    """413 for a body cut by the proxy where the whole body must be read (or its size is unknown)."""
    message = (
        f"The request body is larger than the {forwarded} bytes the gateway's policy check reads; "
        "requests of this API key (restricted to models, priced, or with token limits and no "
        "Content-Length) must fit in that size."
    )
    return _deny(Reason.BODY_TOO_LARGE, message)


_REFUSALS_MESSAGE = "Too many requests of this API key were refused for their body; retry later."
_REFUSALS_BODY = error_body(Reason.RATE_LIMITED, _REFUSALS_MESSAGE)


def _too_many_refusals(retry_after: float) -> Decision:
    """429: this key's requests were refused for their body too often; refused now before reading it."""
    seconds = max(1, math.ceil(retry_after)) if retry_after != math.inf else 60
    return Decision(
        allowed=False,
        status=error_status(Reason.RATE_LIMITED),
        reason=Reason.RATE_LIMITED,
        response_headers=(("retry-after", str(seconds)),),
        body=_REFUSALS_BODY,
        message=_REFUSALS_MESSAGE,
    )


_SELECTION_CACHE = 65536

# POST endpoints that consume prompt tokens at most and generate none (OpenAI's embeddings and
# moderations, Anthropic's count_tokens, file uploads): matched on the path's end, so prefixed and
# Azure-style deployment paths (/openai/deployments/x/embeddings) match too.
_NON_GENERATING = ("/embeddings", "/moderations", "/count_tokens", "/files", "/uploads")


def generates(request: Request) -> bool:
    """Whether the request can generate completion tokens, so a token window must reserve
    max_tokens (or default_max_tokens) for it. GETs (/v1/models, retrieving a response or a file),
    DELETEs and the endpoints above generate nothing: reserving 4,096 tokens for each would hold a
    token budget for nothing until it settles."""
    if request.method != "POST":
        return False
    path = request.path.partition("?")[0].rstrip("/")
    return not path.endswith(_NON_GENERATING)


_PATHS: dict[str, tuple[bool, bool]] = {}
_PATHS_CACHED, _PATH_CACHED_LENGTH = 4096, 256  # client-chosen: a bounded cache of short paths


def _path_facts(path: str) -> tuple[bool, bool]:
    """(a POST to it can generate (`generates`), an Anthropic API path (`is_anthropic_path`)), cached."""
    facts = _PATHS.get(path)
    if facts is None:
        bare = path.partition("?")[0].rstrip("/")
        facts = (not bare.endswith(_NON_GENERATING), is_anthropic_path(path))
        if len(path) <= _PATH_CACHED_LENGTH:
            if len(_PATHS) >= _PATHS_CACHED:
                _PATHS.clear()
            _PATHS[path] = facts
    return facts


def unavailable(retry_after: float) -> Decision:
    """503: the counter store cannot decide and the failure policy is fail_closed. Over Envoy's HTTP
    ext_authz any 5xx is an error, which the shipped configs answer with their own JSON 503 (fail closed)."""
    base = _DENIALS[Reason.UNAVAILABLE]
    return Decision(
        allowed=False,
        status=base.status,
        reason=base.reason,
        response_headers=(("retry-after", str(max(1, math.ceil(retry_after)))),),
        body=base.body,
        message=base.message,
    )


def _throttled(retry_after: float) -> Decision:
    """Too many invalid keys from this address: refused before any key is looked up, so a guesser learns
    nothing until the window has room again."""
    seconds = max(1, math.ceil(retry_after)) if retry_after != math.inf else 60
    base = _DENIALS[Reason.AUTH_THROTTLED]
    return Decision(
        allowed=False,
        status=base.status,
        reason=base.reason,
        response_headers=(("retry-after", str(seconds)),),
        body=base.body,
        message=base.message,
    )


def _limited(result: AcquireResult, headers: tuple[tuple[str, str], ...], key: KeyRecord) -> Decision:
    """The 429 for a refused request, named after the binding window: of the refusing ones, the one
    that refuses longest (largest retry_after; the first on a tie), at whatever level it is."""
    first = None
    for status in result.denied_by:
        if first is None or status.retry_after > first.retry_after:
            first = status
    kind = first.spec.kind if first is not None else Kind.REQUESTS
    if kind is Kind.USD:
        reason = Reason.QUOTA_EXCEEDED
    elif kind is Kind.CONCURRENCY:
        reason = Reason.CONCURRENCY_LIMITED
    else:
        reason = Reason.RATE_LIMITED
    owner = "" if first is None or first.spec.level == "key" else owner_of(key, first.spec.level) + ": "
    if first is not None and reason is Reason.QUOTA_EXCEEDED and first.retry_after != math.inf:
        body, message = _quota_denial(first.spec, owner or "this API key: ")
    else:
        if first is not None and first.retry_after == math.inf:
            message = (
                f"This request can never fit the limit {owner}{first.spec.name!r} ({first.spec.capacity}); "
                "lower max_tokens or the prompt size."
            )
        elif first is not None:
            message = (
                f"Rate limit reached for {owner}{first.spec.name!r}: limit {first.limit}, "
                f"remaining {first.remaining}."
            )
        else:
            message = _ERRORS[reason][3]
        body = error_body(reason, message)
    return Decision(
        allowed=False,
        status=error_status(reason),
        reason=reason,
        response_headers=headers,
        body=body,
        message=message,
    )


_QUOTA_DENIALS: dict[tuple[LimitSpec, str], tuple[bytes, str]] = {}


def _quota_denial(spec: LimitSpec, owner: str) -> tuple[bytes, str]:
    """An exhausted budget's body and message: the same for every refusal of that window (cached)."""
    cached = _QUOTA_DENIALS.get((spec, owner))
    if cached is None:
        message = f"You exceeded your current quota (budget) for {owner}{spec.name}."
        cached = (error_body(Reason.QUOTA_EXCEEDED, message), message)
        if len(_QUOTA_DENIALS) >= _SELECTION_CACHE:
            _QUOTA_DENIALS.clear()  # one entry per (window, tenant or group): bounded anyway by reloads
        _QUOTA_DENIALS[(spec, owner)] = cached
    return cached


def _allow(key: KeyRecord, model: str | None, headers: tuple[tuple[str, str], ...] = ()) -> Decision:
    return new_allow(key, model, headers)


def _deny(reason: Reason, message: str) -> Decision:
    status = error_status(reason)
    return Decision(
        allowed=False, status=status, reason=reason, body=error_body(reason, message), message=message
    )


def denial(reason: Reason) -> Decision:
    """The cached denial for `reason` (used by adapters for transport-level failures)."""
    return _DENIALS[reason]
