"""Clamping: a request that does not fit a budget is admitted with a smaller completion, if one fits.

Opt-in per limit (`clamp: true` or `clamp: {min_tokens: N}` on a tokens or usd limit). The counter
stores answer all or nothing, so clamping happens after a refusal (never on the admitted path): when
every enforced window that refused the request is a clamping one, the largest completion that fits all
of them is computed from their statuses (`remaining` is what still fits now), the reservation is
recomputed with it and the driver (`nexus_authz.decide`) acquires once more with the lowered costs,
which is again atomic and may again be refused (another request took the room meanwhile). A lowered
cap below the refusing limits' `min_tokens` is refused as before.

The cap must bind on the upstream, so the proxy rewrites the body: the admitted decision carries
`clamp`, a list of byte splices of the body exactly as nexus-authz read it, which the Lua filter of the
shipped Envoy configs applies (`envoy/nexus-clamp.lua`, request path) before the router:

    "<body length>;<offset>:<count>:<text>[;<offset>:<count>:<text>...]"

replace `count` bytes at `offset` (0-based) with `text` (the new number, or a whole member inserted
after the opening brace). The Lua filter refuses the request (503) if the body's length differs.
Which field binds: OpenAI chat (`…/chat/completions`) `max_tokens` and `max_completion_tokens`,
whichever the body sets (both when both); with neither, `max_completion_tokens` is added (the current
field, the only one reasoning models accept; `max_tokens` is deprecated there). Legacy completions and
Anthropic Messages `max_tokens`, the Responses API `max_output_tokens`. Only a body read whole and
strictly (UTF-8 JSON, each top-level key once and spelled plainly) is clamped, and only when the
proxy says it applies clamps (`x-nexus-rewrite: lua`, set by the Envoy configs themselves, never
taken from a client): nginx cannot rewrite bodies, so there a request that would need clamping is
refused, never admitted uncapped.

On a key with a clamping limit, an admitted request whose body sets no cap gets the cap its
reservation assumed (`reservations.default_max_tokens`) written the same way: its completion is then
bounded by what it reserved too.
"""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass
from typing import Final

from nexus_authz.core.body import _NUMBER, _scan, _strict_fields, request_facts
from nexus_authz.core.limits import AcquireResult, Kind, LimitSpec
from nexus_authz.core.model import Request
from nexus_authz.core.pricing import PriceTable

__all__ = ["CLAMP_METADATA", "REWRITE_HEADER", "Clamp", "cap_fields", "clamps", "default_cap", "lowered"]

CLAMP_METADATA: Final = "x-nexus-clamp"  # ext_authz dynamic metadata key the Lua filter reads
REWRITE_HEADER: Final = "x-nexus-rewrite"  # on the check request: "lua" when the proxy applies clamps
REWRITER: Final = "lua"

# path ending -> (the cap fields the API honours, the field added when the body has none)
_APIS: Final = (
    ("/chat/completions", ("max_tokens", "max_completion_tokens"), "max_completion_tokens"),
    ("/completions", ("max_tokens",), "max_tokens"),
    ("/responses", ("max_output_tokens",), "max_output_tokens"),
    ("/messages", ("max_tokens",), "max_tokens"),
)


@dataclass(frozen=True, slots=True)
class Clamp:
    """A lowered admission: the windows' costs with completion cap `cap` (per choice), and the splices
    that write it into the body ("" when the body already binds it)."""

    costs: tuple[int, ...]
    cap: int
    rewrite: str


_CLAMPS: dict[tuple[LimitSpec, ...], bool] = {}


def clamps(specs: tuple[LimitSpec, ...]) -> bool:
    """Whether some enforced window of these clamps (cached per specs tuple; bounded)."""
    known = _CLAMPS.get(specs)
    if known is None:
        known = any(s.clamp and not s.shadow for s in specs)
        if len(_CLAMPS) >= 4096:
            _CLAMPS.clear()
        _CLAMPS[specs] = known
    return known


def cap_fields(path: str) -> tuple[tuple[str, ...], str] | None:
    """The cap fields of the API at `path` and the one to add, or None for an API without one."""
    path = path.partition("?")[0].rstrip("/")
    for ending, fields, added in _APIS:
        if path.endswith(ending):
            return fields, added
    return None


def lowered(
    request: Request,
    result: AcquireResult,
    specs: tuple[LimitSpec, ...],
    costs: tuple[int, ...],
    model: str | None,
    prices: PriceTable,
    default_max_tokens: int,
) -> Clamp | None:
    """The clamped admission to try for a request `result` refused, or None (refuse as is)."""
    denied = [s for s in result.statuses if not s.allowed and not s.spec.shadow]
    if not denied or any(not s.spec.clamp for s in denied):
        return None  # a window that does not clamp (or a request count, a slot) refused it
    if request.headers.get(REWRITE_HEADER) != REWRITER or request.body_truncated or not request.body:
        return None
    if request.method != "POST":
        return None
    facts = request_facts(request.body, precise=False)
    if facts.problem is not None or not facts.is_object:
        return None
    n = facts.n if facts.n > 0 else 1
    prompt = facts.prompt_tokens
    current = facts.max_tokens or default_max_tokens
    price = prices.lookup(model).price if prices else None
    room = current * n  # the completion (all choices) every refusing window still allows
    for status in denied:
        spec = status.spec
        if spec.kind is Kind.TOKENS:
            room = min(room, status.remaining - prompt)
        elif price is not None:
            room = min(room, _usd_room(price.input, price.output, prompt, status.remaining))
        else:
            return None
    cap = room // n if room > 0 else 0
    if cap >= current or cap < max(s.spec.clamp for s in denied):
        return None
    rewrite = rewrite_for(request, cap)
    if rewrite is None:
        return None
    completion = cap * n
    usd = _usd(price.input, price.output, prompt, completion) if price is not None else 0
    new_costs = tuple(
        prompt + completion if spec.kind is Kind.TOKENS else usd if spec.kind is Kind.USD else cost
        for spec, cost in zip(specs, costs, strict=True)
    )
    return Clamp(new_costs, cap, rewrite)


def default_cap(request: Request, default_max_tokens: int) -> str | None:
    """The splices writing the reserved default cap into an uncapped body (None: it cannot be done)."""
    if request.headers.get(REWRITE_HEADER) != REWRITER or request.body_truncated:
        return None
    return rewrite_for(request, default_max_tokens) or None


def _usd(input_price: float, output_price: float, prompt: int, completion: int) -> int:
    """`PriceTable.cost` with nothing cached (what `Policy._costs` charges), without counting."""
    return math.ceil(prompt * input_price + completion * output_price)


def _usd_room(input_price: float, output_price: float, prompt: int, remaining: int) -> int:
    """The largest completion whose cost, with the prompt, fits `remaining` micro-dollars (-1: none)."""
    if _usd(input_price, output_price, prompt, 0) > remaining:
        return -1
    if output_price <= 0:
        return 1 << 62
    room = int((remaining - prompt * input_price) / output_price)
    while room > 0 and _usd(input_price, output_price, prompt, room) > remaining:
        room -= 1  # float rounding: step down to the exact answer
    while _usd(input_price, output_price, prompt, room + 1) <= remaining:
        room += 1
    return room


def rewrite_for(request: Request, cap: int) -> str | None:
    """The splices setting the API's cap fields of the body to at most `cap` ("" when they already are),
    or None when the body cannot be rewritten safely (an API without a cap field, a body that is not a
    plainly spelled JSON object, a cap field that is not a number)."""
    api = cap_fields(request.path)
    if api is None:
        return None
    fields, added = api
    body = request.body
    try:
        text = codecs.utf_8_decode(body, "strict", True)[0]
    except UnicodeDecodeError:
        return None
    parsed, problem = _strict_fields(text)
    found, _ = _scan(body)
    if parsed is None or problem is not None or isinstance(found, str):
        return None
    # Every cap field must have been read twice alike: by the parse (any spelling) and by the scan
    # (which gives the offsets, plain spelling only). A field spelled with escapes is not clamped.
    raw_parsed = {name for name in fields if name in parsed}
    raw_found = {name for name in fields if name.encode() in found}
    if raw_parsed != raw_found:
        return None
    splices: list[tuple[int, int, str]] = []
    for name in fields:
        pos = found.get(name.encode()) if name in raw_found else None
        if pos is None:
            continue
        value = parsed.get(name)
        if body.startswith(b"null", pos):
            end = pos + 4
        else:
            m = _NUMBER.match(body, pos)
            if m is None or isinstance(value, bool) or not isinstance(value, int | float):
                return None
            end = m.end()
            if value <= cap:
                continue
        splices.append((pos, end - pos, str(cap)))
    if not raw_found:
        start = len(body) - len(body.lstrip())
        inner = body[start + 1 :].lstrip()
        member = f'"{added}":{cap}' + ("" if inner[:1] == b"}" else ",")
        splices.append((start + 1, 0, member))
    if not splices:
        return ""
    return f"{len(body)};" + ";".join(f"{off}:{count}:{text}" for off, count, text in splices)


def apply(body: bytes, rewrite: str) -> bytes:
    """What the Lua filter does with `rewrite` (for tests and the benchmark): the spliced body."""
    length, _, rest = rewrite.partition(";")
    if int(length) != len(body):
        raise ValueError("the body is not the one the rewrite was computed for")
    out = bytearray(body)
    for part in reversed(rest.split(";")):
        off, count, text = part.split(":", 2)
        out[int(off) : int(off) + int(count)] = text.encode()
    return bytes(out)
