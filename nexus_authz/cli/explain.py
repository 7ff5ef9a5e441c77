"""`nexus-authz explain KEY_ID [--model M] [--tokens N | --prompt-tokens P --completion-tokens C]`.

Asks a running server's policy API (`Explain`, protos/nexus/authz/v1/policy.proto) why a key's next
request would pass or not: every limit of the key at every level (key, group, tenant) with used,
remaining, what in-flight reservations hold and when it resets; which limit binds now; and the dry run of
a hypothetical request of that many tokens (nothing is charged). A table by default, `--json` for
scripts. Exit 0 when the hypothetical request would be allowed, 3 when it would be refused (as `check`),
1 or 2 on failures (see cli/remote.py, whose connection and formatting helpers this uses).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from nexus_authz.cli.remote import (
    RemoteError,
    Target,
    _amount,
    _kind,
    _run,
    _span,
    _to_json,
    add_server_arguments,
    call,
    table,
)

__all__ = ["add_command", "cmd_explain"]


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_config: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Register `explain`."""
    p = sub.add_parser(
        "explain",
        help="why a key's next request would pass or not (limits per level, the binding one, a dry run)",
        description="Show every limit of a key on a running server at every level (key, group, tenant): "
        "used, remaining, what in-flight reservations hold and when it resets; which limit binds now; and "
        "whether a hypothetical request of --tokens (or --prompt-tokens/--completion-tokens; default: no "
        "prompt and the default completion) would be refused, by which limit and for how long. Charges "
        "nothing. Exit 0 if that request would be allowed, 3 if it would be refused.",
    )
    add_config(p)
    add_server_arguments(p)
    p.add_argument("key_id", metavar="KEY_ID", help="the key's id")
    p.add_argument("--model", help="the request's model (selects per-model limits and prices)")
    p.add_argument("--tokens", type=int, help="the hypothetical request's tokens, prompt and completion")
    p.add_argument("--prompt-tokens", type=int, help="its prompt tokens (instead of --tokens)")
    p.add_argument("--completion-tokens", type=int, help="its completion tokens (instead of --tokens)")
    p.set_defaults(func=cmd_explain)


def _money(n: int) -> str:
    return f"${n / 1_000_000:,.2f}" if n >= 1_000_000 else f"${n / 1_000_000:.6f}".rstrip("0").rstrip(".")


def _fits(lim: Any) -> str:
    if not lim.applies or not lim.HasField("headroom"):
        return "-"
    h = lim.headroom
    return f"{h:,.0f}" if h == int(h) or h >= 100 else f"{h:.2f}"


def _note(lim: Any) -> str:
    if not lim.applies:
        return "not for this model"
    notes = []
    if lim.binding:
        notes.append("BINDS")
    if lim.never_fits:
        notes.append("never fits")
    elif lim.would_refuse:
        notes.append(f"refuses, fits in {_span(lim.retry_after.ToNanoseconds() / 1e9)}")
    if lim.shadow:
        notes.append("shadow")
    return ", ".join(notes) or "ok"


def _print(answer: Any) -> None:
    from nexus_authz._gen.nexus.authz.v1 import policy_pb2 as pb

    who = [f"tenant {answer.tenant}"] + ([f"group {answer.group}"] if answer.group else [])
    print(f"key {answer.key_id} ({', '.join(who)}), model {answer.model or '(none)'}")
    tokens = (
        f"{answer.prompt_tokens:,} prompt + {answer.completion_tokens:,} completion tokens"
        if answer.prompt_tokens or answer.completion_tokens
        else f"{answer.total_tokens:,} tokens"
    )
    print(f"hypothetical request: {tokens}, {_money(answer.cost_micro_usd)}")
    rows = []
    for level in answer.levels:
        for lim in level.limits:
            usd = lim.kind == pb.LIMIT_KIND_USD
            rows.append(
                [
                    level.level,
                    lim.name,
                    _kind(lim.kind),
                    _amount(lim.kind, lim.limit),
                    _amount(lim.kind, lim.used),
                    _amount(lim.kind, lim.remaining),
                    _amount(lim.kind, lim.reserved),
                    _span(lim.reset_after.ToNanoseconds() / 1e9),
                    (_money(lim.cost) if usd else f"{lim.cost:,}") if lim.applies else "-",
                    _fits(lim),
                    _note(lim),
                ]
            )
    if rows:
        header = ["LEVEL", "WINDOW", "KIND", "LIMIT", "USED", "REMAINING", "RESERVED", "RESETS IN"]
        print(table([*header, "COST", "FITS", "NOTE"], rows, right=(3, 4, 5, 6, 7, 8, 9)))
    else:
        print("no limits")
    print(f"binding: {answer.binding} ({answer.binding_level})" if answer.binding else "binding: none")
    d = answer.decision
    line = f"dry run: {'ALLOWED' if d.allowed else 'DENIED'} {d.http_status} {d.reason}"
    if d.message:
        line += f": {d.message}"
    retry = {h.name: h.value for h in d.response_headers}.get("retry-after")
    if retry:
        line += f" (retry-after {retry}s)"
    print(line)
    print(f"reservations in flight: {answer.reservations_in_flight}")


def cmd_explain(args: argparse.Namespace) -> int:
    from nexus_authz._gen.nexus.authz.v1 import policy_pb2 as pb

    def body(target: Target) -> int:
        request = pb.ExplainRequest(key_id=args.key_id, model=args.model or "")
        parts = (args.prompt_tokens, args.completion_tokens)
        if args.tokens is not None and any(p is not None for p in parts):
            raise RemoteError("give --tokens, or --prompt-tokens and/or --completion-tokens, not both", 2)
        for flag, name, value in (
            ("--tokens", "total_tokens", args.tokens),
            ("--prompt-tokens", "prompt_tokens", args.prompt_tokens),
            ("--completion-tokens", "completion_tokens", args.completion_tokens),
        ):
            if value is not None:
                if value < 0:
                    raise RemoteError(f"{flag} must not be negative", 2)
                setattr(request, name, value)
        answer = call(target, "Explain", request)
        if args.json:
            print(_to_json(answer))
        else:
            _print(answer)
        return 0 if answer.decision.allowed else 3

    return _run(args, body)
