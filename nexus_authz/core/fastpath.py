"""The common request's admission in one call: a known key, a readable JSON body, no refusal in sight.

`Policy.admit` is the reference: it handles every case (no key, throttled addresses, refusals, cut,
compressed or multipart bodies, clamping keys ...) and builds a `Request` and an `Admission` on the way.
Most requests are none of those: a valid key, the same model and path as the key's previous request. For
those, `FastAdmit.admit` does the same work with what a `Plan` caches per (key, model, path) (the windows,
their shape, what the costs need, the price), in one function with no intermediate objects, and returns
exactly the costs and the prompt estimate `Policy.admit` would have computed. For anything else it returns
None before it has changed any state, and the caller decides through the reference path instead (nothing
is charged or counted twice). The decision driver (`nexus_authz.decide.Decider.check_plain`) charges the
windows and reserves; a refusal from the counters goes on through the reference path too (`admission`).

Pure like the rest of the core; the plans are bounded (model names and paths are client-chosen) and are
dropped when the policy or the key snapshot changes.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from math import ceil
from typing import Final

from nexus_authz.core import body as body_facts
from nexus_authz.core.body import RequestFacts
from nexus_authz.core.clamp import clamps
from nexus_authz.core.config import Price
from nexus_authz.core.keys import MAX_KEY_LENGTH, KeySnapshot
from nexus_authz.core.limits import LimitSpec
from nexus_authz.core.model import KeyRecord
from nexus_authz.core.multipart import is_multipart
from nexus_authz.core.policy import Admission, Policy, _path_facts
from nexus_authz.core.ports import CounterStore
from nexus_authz.core.prompt_later import deferred_body
from nexus_authz.core.shapes import Shape, shape_of

__all__ = ["MAX_PLANS", "FastAdmit", "Plan"]

# (key, model, path) plans kept (~180 B each): 10,000 active keys of one model fit. Beyond it a random
# eighth goes (`FastAdmit._plan_for`): clearing all, or the oldest, would make a round-robin over a few
# more keys than this miss on every request; a random eviction keeps most.
MAX_PLANS: Final = 16384
_UNMETERED: Final = (1, 0, 0).__getitem__  # shapes.costs_of with no tokens and no USD


class Plan:
    """What an admitted request of one key, for one model, on one path needs, computed once.

    `path`: the request path it was made for (with `key` and `model`, what it is cached by).
    `wire`: a transport's ready-made bytes for this plan's allowed answer (the HTTP listener keeps the
    key's allow header block here, or for a key made from a recipe the recipe's block split around the
    key id: adapters/http_fast.plan_wire); None until the transport sets it."""

    __slots__ = (
        "completes",
        "cost_index",
        "counter_ids",
        "key",
        "metered",
        "model",
        "path",
        "price",
        "shape",
        "specs",
        "usable",
        "wire",
    )

    def __init__(
        self,
        key: KeyRecord,
        model: str | None,
        path: str,
        counter_ids: tuple[str, ...],
        specs: tuple[LimitSpec, ...],
        shape: Shape | None,
        completes: bool,
        price: Price | None,
        usable: bool = True,
    ) -> None:
        self.usable = usable  # False: requests of this plan take the reference path
        self.key = key
        self.model = model
        self.path = path
        self.counter_ids = counter_ids
        self.specs = specs
        self.shape = shape
        self.metered = shape is not None and shape.metered
        self.cost_index = shape.cost_index if shape is not None else ()
        self.completes = completes
        self.price = price
        self.wire: bytes | tuple[bytes, bytes] | None = None


class FastAdmit:
    """`Policy.admit` for the common request, for one Policy and one key snapshot (see the module)."""

    __slots__ = ("_plans", "policy", "snapshot")

    def __init__(self, policy: Policy, snapshot: KeySnapshot) -> None:
        self.policy = policy
        self.snapshot = snapshot
        # a key's first plan under the key itself (the common case, one model and path per key: no tuple
        # per key), its others under (key, model, path)
        self._plans: dict[KeyRecord | tuple[KeyRecord, str | None, str], Plan] = {}

    def admit(
        self,
        headers: Mapping[str, str],
        path: str,
        body: bytes,
        client_address: str,
        now: float,
        failures: CounterStore | None,
    ) -> tuple[Plan, tuple[int, ...], int, bytes | None, RequestFacts | None] | None:
        """For a POST of `body` (not cut by the proxy) to `path`: (plan, costs, prompt estimate, body kept
        for a later estimate, facts), or None when the reference path must decide (nothing changed)."""
        policy = self.policy
        # -- the key: `Authorization: Bearer <key>` as Envoy forwards it (keys.extract_key's reading) --
        value = headers.get("authorization")
        if value is None or not value.startswith("Bearer "):
            return None  # other headers or spellings: the reference reads them
        secret = value[7:].strip()
        # keys._plausible: 1-512 of \x21-\x7e (the secret is stripped: no newline for `$` to pass)
        if not secret or len(secret) > MAX_KEY_LENGTH or " " in secret:
            return None
        if not (secret.isascii() and secret.isprintable()):
            return None
        # the brute-force throttle (Policy._admit): an address or a key it counts takes the reference path
        counted = failures is not None and policy._auth_spec is not None
        if counted and failures:
            if client_address and "\x01auth\x00" + client_address in failures:
                return None
        else:
            counted = False  # nothing counted: no key's refusals either
        snapshot = self.snapshot
        hasher = snapshot.hasher  # KeySnapshot.lookup, inlined (keys.KeyHasher)
        inner = hasher._inner.copy()
        inner.update(secret.encode("utf-8", "surrogateescape"))
        outer = hasher._outer.copy()
        outer.update(inner.digest())
        key = snapshot.by_digest.get(outer.digest())
        if key is None or key.disabled or (key.expires_at is not None and now >= key.expires_at):
            return None
        # -- the body's facts (Policy._read_body's reading, for a JSON body) ------------------------------
        facts = None
        model = None
        content_type = headers.get("content-type", "")
        if body and (key.models or key.needs_facts):
            if "content-encoding" in headers or (len(content_type) >= 19 and is_multipart(content_type)):
                return None
            if counted and "\x01denied\x00" + key.key_id in failures:  # type: ignore[operator]
                return None
            facts = body_facts.read_facts(
                body, estimate_prompt=key.needs_facts, precise=False, truncated=False
            )
            if facts.problem is not None:
                return None
            model = facts.model
            if model is None and key.models:
                return None
        plan = self._plans.get(key)
        if plan is None or plan.model != model or plan.path != path:
            plan = self.plan_of(key, model, path)
        if not plan.usable:
            return None
        if client_address and failures is not None and policy._auth_spec is not None:
            policy._known.note(client_address, key.key_id, now)
        # -- the prompt estimate and the charges (Policy._admit / _costs) --------------------------------
        prompt = facts.prompt_tokens if facts is not None else 0
        kept = None
        if policy.track and not key.needs_facts and body:
            prompt, kept = deferred_body(body, content_type, prompt)
        if plan.metered:
            if facts is not None:
                estimate = facts.prompt_tokens
                n = facts.n if facts.n > 0 else 1
                max_tokens = facts.max_tokens or None
            else:
                estimate, n, max_tokens = 0, 1, None
            completion = (max_tokens or policy._default_max_tokens) * n if plan.completes else 0
            price = plan.price
            usd = (
                ceil((estimate - 0) * price.input + 0 * price.cached_input + completion * price.output)
                if price is not None
                else 0
            )  # pricing._cost with nothing cached
            costs = tuple(map((1, estimate + completion, usd).__getitem__, plan.cost_index))
        else:
            costs = tuple(map(_UNMETERED, plan.cost_index))
        return plan, costs, prompt, kept, facts

    def plan_of(self, key: KeyRecord, model: str | None, path: str) -> Plan:
        """The kept plan of (key, model, path), or a new one (kept). Also the compiled lane's when the key's
        first plan is not this one (native/_fast.pyx)."""
        plans = self._plans
        first = plans.get(key)
        if first is not None and first.model == model and first.path == path:
            return first
        plan = plans.get((key, model, path))
        if plan is None:
            return self._plan_for(key, model, path)
        if first is None:  # the key's own place is free (evicted): the plan moves there
            del plans[(key, model, path)]
            plans[key] = plan
        return plan

    def _plan_for(self, key: KeyRecord, model: str | None, path: str) -> Plan:
        """A new plan, kept: under the key when it has none there, else under (key, model, path) (a random
        eighth of the plans goes first when MAX_PLANS are kept)."""
        plan = self._plan(key, model, path)
        plans = self._plans
        if len(plans) >= MAX_PLANS:
            for old in random.sample(list(plans), MAX_PLANS // 8):
                del plans[old]
        if key in plans:
            plans[(key, model, path)] = plan
        else:
            plans[key] = plan
        return plan

    def _plan(self, key: KeyRecord, model: str | None, path: str) -> Plan:
        policy = self.policy
        snapshot = self.snapshot
        if key.paths and not snapshot.path_allowed(key, path.partition("?")[0]):
            return Plan(key, model, path, (), (), None, False, None, usable=False)
        prices = policy.prices
        if model is not None:
            if key.models and not snapshot.model_allowed(key, model):
                return Plan(key, model, path, (), (), None, False, None, usable=False)
            if prices.refuse and not prices.lookup(model).matched:  # Policy: prices.refuses(model)
                return Plan(key, model, path, (), (), None, False, None, usable=False)
        if not key.limits:
            return Plan(key, model, path, (), (), None, False, None)
        counter_ids, specs = policy._windows(key, model)
        if clamps(specs):  # a refusal may become a lowered cap, an admission a written one
            return Plan(key, model, path, (), (), None, False, None, usable=False)
        shape = shape_of(specs)
        generating, _ = _path_facts(path)
        price = prices.lookup(model).price if prices else None
        return Plan(key, model, path, counter_ids, specs, shape, generating, price)

    def admission(
        self,
        plan: Plan,
        costs: tuple[int, ...],
        request_id: str,
        prompt: int,
        kept: bytes | None,
        facts: RequestFacts | None,
        path: str,
    ) -> Admission:
        """The `Admission` `Policy.admit` would have made (for the reference path after a refusal or a
        store that must be awaited)."""
        _, anthropic = _path_facts(path)
        return Admission(
            plan.key,
            plan.model,
            plan.counter_ids,
            plan.specs,
            costs,
            request_id,
            prompt,
            anthropic,
            facts is not None and facts.max_tokens is None and facts.is_object,
            kept,
            plan.shape,
        )
