"""The common request's admission in one call: a known key, a readable JSON body, no refusal in sight.

`Policy.admit` is the reference: it handles every case (no key, throttled addresses, refusals, cut,
compressed or multipart bodies, clamping keys ...) and builds a `Request` and an `Admission` on the way.
Most requests are none of those: a valid key, the same model and path as the key's previous request. For
those, `FastAdmit.admit` does the same work with what a `Plan` caches per (key, model, path) (the windows,
their shape, what the costs need, the price; one plan for the keys of one recipe), in one function with no
intermediate objects, and returns exactly the costs and the prompt estimate `Policy.admit` would have
computed. For anything else it returns None before it has changed any state, and the caller decides
through the reference path instead (nothing is charged or counted twice). The decision driver
(`nexus_authz.decide.Decider.check_plain`) charges the windows and reserves; a refusal from the counters
goes on through the reference path too (`admission`).

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
from nexus_authz.core.model import KeyRecipe, KeyRecord
from nexus_authz.core.multipart import is_multipart
from nexus_authz.core.policy import Admission, Policy, _path_facts
from nexus_authz.core.ports import CounterStore
from nexus_authz.core.prompt_later import deferred_body
from nexus_authz.core.shapes import Shape, shape_of

__all__ = ["MAX_PLANS", "FastAdmit", "Plan"]

# (key or recipe, model, path) plans kept (~180 B each): 10,000 active keys of one model and no recipe fit
# (the keys of one recipe share their plans). Beyond it a random eighth goes (`FastAdmit._plan_for`):
# clearing all, or the oldest, would make a round-robin over a few more keys than this miss on every
# request; a random eviction keeps most.
MAX_PLANS: Final = 16384
_UNMETERED: Final = (1, 0, 0).__getitem__  # shapes.costs_of with no tokens and no USD


class Plan:
    """What an admitted request of one key, for one model, on one path needs, computed once. The keys made
    from one recipe (core/model.py's KeyRecipe) with the same limits, model and path lists share one plan:
    nothing in it is the key's own then (the request's key is passed on beside it).

    `source`: the key it was made for (of a shared plan, the first; `_fits` says which others it serves).
    `path`: the request path it was made for (with the key or recipe and `model`, what it is cached by).
    `counter_ids`: the windows' counter ids, or None for the key's own (`key.counter_ids`: a shared plan).
    `wire`: a transport's ready-made bytes for this plan's allowed answer (the HTTP listener keeps the
    key's allow header block here, or for a key made from a recipe the recipe's block split around the
    key id: adapters/http_fast.plan_wire); None until the transport sets it."""

    __slots__ = (
        "completes",
        "cost_index",
        "counter_ids",
        "metered",
        "model",
        "path",
        "price",
        "shape",
        "source",
        "specs",
        "usable",
        "wire",
    )

    def __init__(
        self,
        source: KeyRecord,
        model: str | None,
        path: str,
        counter_ids: tuple[str, ...] | None,
        specs: tuple[LimitSpec, ...],
        shape: Shape | None,
        completes: bool,
        price: Price | None,
        usable: bool = True,
    ) -> None:
        self.usable = usable  # False: requests of this plan take the reference path
        self.source = source
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
        # by owner (`_owner`: the key's recipe, whose keys share their plans, or the key): the owner's
        # first plan under the owner itself (the common case, one model and path: no tuple per owner), its
        # others under (owner, model, path)
        self._plans: dict[_Owner | tuple[_Owner, str | None, str], Plan] = {}

    def admit(
        self,
        headers: Mapping[str, str],
        path: str,
        body: bytes,
        client_address: str,
        now: float,
        failures: CounterStore | None,
    ) -> tuple[Plan, KeyRecord, tuple[int, ...], int, bytes | None, RequestFacts | None] | None:
        """For a POST of `body` (not cut by the proxy) to `path`: (plan, key, costs, prompt estimate, body
        kept for a later estimate, facts), or None when the reference path must decide (nothing changed)."""
        policy = self.policy
        # -- the key: `Authorization: Bearer <key>` as Envoy forwards it, else `x-api-key` (Anthropic's) or
        # `api-key` (Azure's) (keys.extract_key's reading) --
        value = headers.get("authorization")
        if value is None:
            value = headers.get("x-api-key")
            if value is None:
                value = headers.get("api-key")
                if value is None:
                    return None  # no key: the reference answers
            secret = value.strip()
        elif value.startswith("Bearer "):
            secret = value[7:].strip()
        else:
            return None  # other schemes or spellings: the reference reads them
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
        owner = _owner(key)
        plan = self._plans.get(owner)
        if (
            plan is None
            or plan.model != model
            or plan.path != path
            or (owner is not key and not _fits(plan.source, key))
        ):
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
        return plan, key, costs, prompt, kept, facts

    def plan_of(self, key: KeyRecord, model: str | None, path: str) -> Plan:
        """The kept plan of (key, model, path), or a new one (kept). Also the compiled lane's when its owner's
        first plan is not this one (native/_fast.pyx)."""
        owner = _owner(key)
        if owner is not key:
            plan = self._kept(owner, model, path)
            if plan is None:
                return self._plan_for(owner, key, model, path)
            if _fits(plan.source, key):
                return plan
            owner = key  # a record of the recipe with other limits or lists than its plan's: its own plan
        plan = self._kept(owner, model, path)
        return plan if plan is not None else self._plan_for(owner, key, model, path)

    def _kept(self, owner: _Owner, model: str | None, path: str) -> Plan | None:
        plans = self._plans
        first = plans.get(owner)
        if first is not None and first.model == model and first.path == path:
            return first
        plan = plans.get((owner, model, path))
        if plan is not None and first is None:  # the owner's own place is free (evicted): it moves there
            del plans[(owner, model, path)]
            plans[owner] = plan
        return plan

    def _plan_for(self, owner: _Owner, key: KeyRecord, model: str | None, path: str) -> Plan:
        """A new plan, kept: under its owner when it has none there, else under (owner, model, path) (a
        random eighth of the plans goes first when MAX_PLANS are kept)."""
        plan = self._plan(key, model, path, shared=owner is not key)
        plans = self._plans
        if len(plans) >= MAX_PLANS:
            for old in random.sample(list(plans), MAX_PLANS // 8):
                del plans[old]
        if owner in plans:
            plans[(owner, model, path)] = plan
        else:
            plans[owner] = plan
        return plan

    def _plan(self, key: KeyRecord, model: str | None, path: str, shared: bool = False) -> Plan:
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
        own_ids, specs = policy._windows(key, model)
        # shared: a key with a recipe and no model-scoped window, whose counter ids are all its own
        counter_ids = None if shared else own_ids
        if clamps(specs):  # a refusal may become a lowered cap, an admission a written one
            return Plan(key, model, path, (), (), None, False, None, usable=False)
        shape = shape_of(specs, policy.header_families)
        generating, _ = _path_facts(path)
        price = prices.lookup(model).price if prices else None
        return Plan(key, model, path, counter_ids, specs, shape, generating, price)

    def admission(
        self,
        plan: Plan,
        key: KeyRecord,
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
            key,
            plan.model,
            key.counter_ids if plan.counter_ids is None else plan.counter_ids,
            plan.specs,
            costs,
            request_id,
            prompt,
            anthropic,
            facts is not None and facts.max_tokens is None and facts.is_object,
            kept,
            plan.shape,
        )


_Owner = KeyRecord | KeyRecipe


def _owner(key: KeyRecord) -> _Owner:
    """Whose plans serve `key`: its recipe's, shared by the recipe's keys (their counter ids are all theirs,
    made from the recipe: no model-scoped window picks some), or its own."""
    recipe = key.recipe
    return recipe if recipe is not None and not key.model_scoped else key


def _fits(source: KeyRecord, key: KeyRecord) -> bool:
    """A plan made for `source` serves `key` of the same recipe: what makes a plan (the limits, the model and
    path lists) and its allow answer (the headers to remove) are the same objects (core/keyfile_fast.py's
    records of one shape, core/runtime_keys.py's of one profile)."""
    return (
        source.limits is key.limits
        and source.paths is key.paths
        and source.models is key.models
        and source.path_rule is key.path_rule
        and source.model_rule is key.model_rule
        and source.remove_headers is key.remove_headers
    )
