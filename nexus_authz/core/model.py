"""Plain data the decision core takes and returns.

Everything here is frozen and slotted: adapters build a `CheckRequest`-like `Request`, the core returns a
`Decision`, and neither side can mutate what the other holds. Records that carry secrets (the upstream
credential) keep them out of `repr()` so a stray log line cannot leak them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

from nexus_authz.core.limits import LimitSpec


class Reason(StrEnum):
    """Why a decision came out the way it did: the label of the decisions metric and the error code."""

    OK = "ok"
    MISSING_KEY = "missing_key"
    UNKNOWN_KEY = "unknown_key"
    EXPIRED_KEY = "expired_key"
    DISABLED_KEY = "disabled_key"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    PATH_NOT_ALLOWED = "path_not_allowed"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXCEEDED = "quota_exceeded"
    CONCURRENCY_LIMITED = "concurrency_limited"
    AUTH_THROTTLED = "auth_throttled"
    BAD_REQUEST = "bad_request"
    BODY_TOO_LARGE = "body_too_large"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class Request:
    """One request to decide on, already translated from its wire protocol.

    `headers` has lower-case names. `body` is what the proxy forwarded (possibly empty, possibly cut at the
    proxy's buffer limit, in which case `body_truncated` is true). `path` is the client's original path.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes = b""
    body_truncated: bool = False
    request_id: str = ""
    client_address: str = ""


@dataclass(frozen=True, slots=True)
class Credential:
    """The upstream provider credential injected in place of the client's key.

    `header` is the header the provider expects (`authorization` for OpenAI, `x-api-key` for Anthropic);
    `value` is the full header value, e.g. `Bearer sk-...`. Never printed.
    """

    name: str
    header: str
    value: str = field(repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class KeyRecord:
    """One virtual API key of the key snapshot, with everything the hot path needs precomputed.

    Identity semantics (eq=False): adapters cache wire bytes per record, and a new snapshot means new
    records, so an identity hash is both correct and O(1).
    """

    key_id: str
    tenant: str
    plan: str | None
    expires_at: float | None
    disabled: bool
    models: tuple[str, ...]
    paths: tuple[str, ...]
    credential: Credential | None
    metadata: Mapping[str, str]
    # What an allowed request adds to / removes from the upstream request (credential included).
    upstream_headers: tuple[tuple[str, str], ...] = field(repr=False)
    remove_headers: tuple[str, ...]
    # Every limit of the key (plan and own), and the counter id of each, built once per snapshot.
    limits: tuple[LimitSpec, ...] = ()
    counter_ids: tuple[str, ...] = ()
    # The Check must read the body: token or USD windows need an estimate, per-model windows the model.
    needs_facts: bool = False
    model_scoped: bool = False  # some window applies to some models only (limits with `model:`)
    # `models` and `paths` compiled (shared between keys with the same lists); None: anything goes.
    model_rule: re.Pattern[str] | None = field(default=None, repr=False)
    path_rule: re.Pattern[str] | None = field(default=None, repr=False)
    group: str = ""  # the key's group (team/project) within its tenant; "" when it has none
    # How `upstream_headers` and `counter_ids` derive from the key id, shared by the keys of one shape of
    # the key file (core/keyfile_fast.py) or one runtime-key profile (core/runtime_keys.py): set, those
    # two are left unset until read, so a key never used holds neither (~415 B a key); None: both given.
    recipe: KeyRecipe | None = field(default=None, repr=False)

    if not TYPE_CHECKING:  # (mypy would otherwise accept any attribute name on a record)

        def __getattr__(self, name: str) -> object:
            """Called only for an unset slot: the per-key parts a recipe derives. The counter ids, read by
            every check, are built on first read and kept (later reads are plain slot reads); the upstream
            headers, read only when an adapter builds the key's allow answer (which it caches), are
            built on each read and not kept (~120 B an active key)."""
            if name == "counter_ids" or name == "upstream_headers":
                recipe = KeyRecord.recipe.__get__(self)
                if recipe is not None:
                    value = recipe.build(name, KeyRecord.key_id.__get__(self))
                    if name == "counter_ids":
                        KeyRecord.counter_ids.__set__(self, value)
                    return value
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


@dataclass(frozen=True, slots=True, eq=False)
class KeyRecipe:
    """The per-key parts of the records of one key-file shape (or runtime-key profile), as functions of
    the key id: upstream headers `((header, key_id), *rest_headers)` and counter ids `(key_id + s for s
    in own_suffixes) + rest_ids` (core/hierarchy.py's `<key id>\\x00<name>` for its own windows, then
    the shared ones)."""

    header: str
    rest_headers: tuple[tuple[str, str], ...] = field(repr=False)
    own_suffixes: tuple[str, ...]
    rest_ids: tuple[str, ...]

    def build(self, name: str, key_id: str) -> tuple[object, ...]:
        if name == "upstream_headers":
            return ((self.header, key_id), *self.rest_headers)
        return tuple([key_id + s for s in self.own_suffixes]) + self.rest_ids


_DEFERRED = tuple(getattr(KeyRecord, name) for name in ("upstream_headers", "counter_ids"))  # the slots


def deferred(record: KeyRecord) -> KeyRecord:
    """`record`, just made with a recipe, with its upstream headers and counter ids unset again: made from
    the recipe when first read (see KeyRecord). For records built by the dataclass constructor."""
    if record.recipe is None:
        raise ValueError("a record without a recipe cannot make its upstream headers and counter ids")
    for slot in _DEFERRED:
        slot.__delete__(record)
    return record


@dataclass(frozen=True, slots=True, eq=False)
class Decision:
    """The answer for one request.

    `upstream_headers` are set (overwriting) on the request sent upstream and `remove_headers` removed
    from it; `response_headers` go to the client (rate-limit headers on every answer, `retry-after` on a
    429); a denial carries its JSON `body`.
    """

    allowed: bool
    status: int
    reason: Reason
    key: KeyRecord | None = None
    model: str | None = None
    upstream_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    remove_headers: tuple[str, ...] = ()
    response_headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    message: str = ""
    # An admitted request holding a concurrency slot of a window at least half full (core/shapes.py
    # `near_limit`): its request id, for the proxy to release the slot when the response ends
    # (envoy/nexus-usage.lua); "" otherwise (the access log frees the slot).
    release: str = ""
    # An admitted request whose completion cap the proxy must lower (core/clamp.py): the body splices
    # for the Lua filter (x-nexus-clamp in ext_authz's dynamic metadata); "" otherwise.
    clamp: str = ""

    if not TYPE_CHECKING:

        def __getattr__(self, name: str) -> object:
            """Called only for an unset slot: `new_allow` leaves `upstream_headers` to its key's, read when
            asked for (a key made from a recipe builds them on each read: see KeyRecord)."""
            if name == "upstream_headers":
                key = Decision.key.__get__(self)
                if key is not None:
                    return key.upstream_headers
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


class InFlight(NamedTuple):
    """What an admitted request's usage is accounted against when its response arrives.

    A NamedTuple: built once per admitted request when accounting is on, so it must be cheap.
    `model` is the model the request named, if the Check read it (else the response's model is used);
    `prompt_tokens` the Check's estimate, charged for a stream cut off before it said anything.
    """

    key_id: str
    tenant: str
    model: str | None
    prompt_tokens: int
    body: bytes | None = None  # kept for a prompt estimate made at accounting time (core.prompt_later)


# -- hot-path constructors -----------------------------------------------------------------------------
# A frozen dataclass's generated __init__ sets each field through object.__setattr__ (about 0.15 µs a
# field); setting the slots through their descriptors builds the identical frozen object in a fraction of
# that. Used for the two objects every request creates; everything else uses the normal constructors.
_new = object.__new__
_REQUEST_SLOTS = tuple(
    getattr(Request, name).__set__
    for name in ("method", "path", "headers", "body", "body_truncated", "request_id", "client_address")
)
_DECISION_SLOTS = tuple(
    getattr(Decision, name).__set__
    for name in (
        "allowed",
        "status",
        "reason",
        "key",
        "model",
        "upstream_headers",
        "remove_headers",
        "response_headers",
        "body",
        "message",
        "release",
        "clamp",
    )
)


def new_request(
    method: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    body_truncated: bool,
    request_id: str,
    client_address: str,
) -> Request:
    """`Request(...)` with every field given, built faster (see above)."""
    request: Request = _new(Request)
    s0, s1, s2, s3, s4, s5, s6 = _REQUEST_SLOTS
    s0(request, method)
    s1(request, path)
    s2(request, headers)
    s3(request, body)
    s4(request, body_truncated)
    s5(request, request_id)
    s6(request, client_address)
    return request


def new_allow(
    key: KeyRecord, model: str | None, response_headers: tuple[tuple[str, str], ...], release: str = ""
) -> Decision:
    """The Decision admitting a request for `key`, built faster (see above)."""
    decision: Decision = _new(Decision)
    s0, s1, s2, s3, s4, _, s6, s7, s8, s9, s10, s11 = _DECISION_SLOTS  # upstream_headers: see Decision
    s0(decision, True)
    s1(decision, 200)
    s2(decision, Reason.OK)
    s3(decision, key)
    s4(decision, model)
    s6(decision, key.remove_headers)
    s7(decision, response_headers)
    s8(decision, b"")
    s9(decision, "")
    s10(decision, release)
    s11(decision, "")
    return decision


_KEY_RECORD_SLOTS = tuple(getattr(KeyRecord, name).__set__ for name in KeyRecord.__dataclass_fields__)
if tuple(KeyRecord.__dataclass_fields__) != (  # record_like sets them in this order
    "key_id",
    "tenant",
    "plan",
    "expires_at",
    "disabled",
    "models",
    "paths",
    "credential",
    "metadata",
    "upstream_headers",
    "remove_headers",
    "limits",
    "counter_ids",
    "needs_facts",
    "model_scoped",
    "model_rule",
    "path_rule",
    "group",
    "recipe",
):  # pragma: no cover - a new field must be added to record_like
    raise AssertionError("KeyRecord's fields changed: update model.record_like")


def record_like(template: KeyRecord, key_id: str, recipe: KeyRecipe) -> KeyRecord:
    """`dataclasses.replace(template, key_id=...)` with the key id's upstream headers and counter ids
    left to `recipe` (built on first read, see KeyRecord), made faster (see above; a 1,000,000-key file
    makes one per key, core/keyfile_fast.py)."""
    r: KeyRecord = _new(KeyRecord)
    s0, s1, s2, s3, s4, s5, s6, s7, s8, _, s10, s11, _, s13, s14, s15, s16, s17, s18 = _KEY_RECORD_SLOTS
    s0(r, key_id)
    s1(r, template.tenant)
    s2(r, template.plan)
    s3(r, template.expires_at)
    s4(r, template.disabled)
    s5(r, template.models)
    s6(r, template.paths)
    s7(r, template.credential)
    s8(r, template.metadata)
    s10(r, template.remove_headers)
    s11(r, template.limits)
    s13(r, template.needs_facts)
    s14(r, template.model_scoped)
    s15(r, template.model_rule)
    s16(r, template.path_rule)
    s17(r, template.group)
    s18(r, recipe)
    return r
