"""CLI commands that ask a running server through its policy API (protos/nexus/authz/v1/policy.proto).

    nexus-authz keys list [--tenant T]        nexus-authz limits KEY_ID
    nexus-authz keys show KEY_ID              nexus-authz check --key-id ID --model M
    nexus-authz usage --server ADDR ...       (without --server, `usage` reads the ledger file)

Where: `--server` (host:port or unix:/path), else NEXUS_API_ADDR, else the config's `listen.api` (when a
config file is given or found), else 127.0.0.1:9002. Who: `--token`, else NEXUS_ADMIN_TOKEN, else the
config's `api.admin_token` (prefer the environment: a command line is visible to other users).
Tables by default, `--json` for scripts (proto3 JSON with the proto's field names). Failures are one line
on stderr: exit 1 for a server that is down, a refused token or a missing key; 2 for bad arguments.
`check` exits 0 when the request would be allowed and 3 when it would be denied.

The CLI is registered by cli/commands.py (`add_commands`, `add_server_arguments`); grpc is imported only
when a command runs, so `nexus-authz --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

__all__ = [
    "DEFAULT_SERVER",
    "RemoteError",
    "add_commands",
    "add_server_arguments",
    "cmd_check",
    "cmd_keys_list",
    "cmd_keys_show",
    "cmd_limits",
    "cmd_usage",
]


if TYPE_CHECKING:
    from nexus_authz.settings import CliEnvironment


def _env() -> CliEnvironment:
    """NEXUS_CONFIG, NEXUS_API_ADDR, NEXUS_ADMIN_TOKEN, as settings.py reads them (imported late: the
    command line starts without loading the server's modules)."""
    from nexus_authz.settings import cli_environment

    return cli_environment()


DEFAULT_SERVER = "127.0.0.1:9002"
DEFAULT_TIMEOUT = 10.0


class RemoteError(Exception):
    """A failure to report as one line: `code` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# -- arguments -------------------------------------------------------------------------------------------
def add_server_arguments(p: argparse.ArgumentParser, *, json_flag: bool = True, usage: bool = False) -> None:
    """--server / --token / --timeout (and --json) for a command that talks to the policy API."""
    if usage:
        server_help = (
            "ask a running server's policy API (host:port or unix:/path) instead of reading the ledger file"
        )
    else:
        server_help = (
            f"the policy API (host:port or unix:/path; default: $NEXUS_API_ADDR, else the config's "
            f"listen.api, else {DEFAULT_SERVER})"
        )
    p.add_argument("--server", help=server_help)
    p.add_argument(
        "--token",
        help="admin token (default: $NEXUS_ADMIN_TOKEN, else the config's api.admin_token); prefer the "
        "environment variable: a command line is visible to other users",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds per call (default {DEFAULT_TIMEOUT:g})",
    )
    if json_flag:
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    keys_sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_config: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Register `keys list`, `keys show`, `limits` and `check`."""
    p = keys_sub.add_parser(
        "list",
        help="list the keys of a running server",
        description="List the keys in force on a running server (through its policy API): id, tenant, plan, "
        "state, expiry, models and limits. Never shows a key or its hash.",
    )
    add_config(p)
    add_server_arguments(p)
    p.add_argument("--tenant", help="only this tenant's keys")
    p.set_defaults(func=cmd_keys_list)

    p = keys_sub.add_parser(
        "show",
        help="show one key of a running server",
        description="Show one key in force on a running server: its metadata, plan, state, expiry and "
        "limits.",
    )
    add_config(p)
    add_server_arguments(p)
    p.add_argument("key_id", metavar="KEY_ID", help="the key's id")
    p.set_defaults(func=cmd_keys_show)

    p = sub.add_parser(
        "limits",
        help="a key's limit windows on a running server",
        description="Show each limit window of a key as it stands now on a running server: limit, used, "
        "remaining, what in-flight reservations hold, and when it resets.",
    )
    add_config(p)
    add_server_arguments(p)
    p.add_argument("key_id", metavar="KEY_ID", help="the key's id")
    p.set_defaults(func=cmd_limits)

    p = sub.add_parser(
        "check",
        help="dry-run a request against a running server",
        description="Ask a running server what it would decide for a request, without charging anything. "
        "Give the client key (--key, or --key - to read it from standard input) or decide as a key id "
        "(--key-id). Exit 0 if the request would be allowed, 3 if it would be denied.",
    )
    add_config(p)
    add_server_arguments(p)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--key", help="the client key as a client would send it ('-': read it from stdin)")
    who.add_argument("--key-id", help="decide as the key with this id (no client key needed)")
    p.add_argument("--model", help="model of the request (builds a chat body when --body is not given)")
    p.add_argument("--max-tokens", type=int, help="max_tokens of the built chat body")
    p.add_argument(
        "--path", default="/v1/chat/completions", help="request path (default /v1/chat/completions)"
    )
    p.add_argument("--method", default="POST", help="HTTP method (default POST)")
    p.add_argument("--body", help="request body: JSON text, or @FILE to read it from a file")
    p.add_argument(
        "--header", action="append", default=[], metavar="'NAME: VALUE'", help="an extra request header"
    )
    p.set_defaults(func=cmd_check)


# -- connection --------------------------------------------------------------------------------------------
@dataclass
class Target:
    server: str
    token: str
    timeout: float


def _config_settings(args: argparse.Namespace) -> Any:
    """The config's settings if a config file was given or is found, else None."""
    from nexus_authz.core.errors import ConfigError
    from nexus_authz.settings import load_settings

    path = getattr(args, "config", None) or _env().config
    if not path:
        path = "nexus.yaml" if os.path.exists("nexus.yaml") else None
    if path is None:
        return None
    try:
        return load_settings(path)
    except ConfigError as exc:
        raise RemoteError(f"{exc} (or give --server and --token)", 2) from None


def resolve_target(args: argparse.Namespace, *, server_from_config: bool = True) -> Target:
    settings = None
    server = args.server or _env().api_address
    if not server and server_from_config:
        settings = _config_settings(args)
        if settings is not None and settings.api:
            server = settings.api
    token = args.token or _env().admin_token
    if not token:
        if settings is None:
            settings = _config_settings(args)
        if settings is not None and settings.api_auth.admin_token_configured:
            from nexus_authz.core.errors import ConfigError
            from nexus_authz.settings import resolve_admin_token

            try:
                token = resolve_admin_token(settings)
            except ConfigError as exc:
                raise RemoteError(str(exc), 2) from None
    if not token:
        raise RemoteError("no admin token: set NEXUS_ADMIN_TOKEN (or pass --token)", 2)
    return Target(server=server or DEFAULT_SERVER, token=token, timeout=args.timeout)


def call(target: Target, method: str, request: Any) -> Any:
    """One unary call; gRPC failures become RemoteErrors with a one-line explanation."""
    import grpc

    from nexus_authz._gen.nexus.authz.v1 import policy_pb2_grpc

    with grpc.insecure_channel(target.server) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        try:
            return getattr(stub, method)(
                request, metadata=(("authorization", f"Bearer {target.token}"),), timeout=target.timeout
            )
        except grpc.RpcError as exc:
            raise _explain(exc, target) from None


def _explain(exc: Any, target: Target) -> RemoteError:
    import grpc

    code = exc.code()
    details = exc.details() or ""
    where = target.server
    if code == grpc.StatusCode.UNAVAILABLE:
        return RemoteError(
            f"cannot reach the policy API at {where} (is `nexus-authz serve` running there with an admin "
            "token set?)"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RemoteError(f"the policy API at {where} did not answer within {target.timeout:g}s")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return RemoteError(
            f"the policy API at {where} refused the admin token (check --token / NEXUS_ADMIN_TOKEN)"
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return RemoteError(f"{where} does not serve the policy API (is it nexus-authz's listen.api address?)")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return RemoteError(details, 2)
    return RemoteError(details or f"the policy API at {where} failed: {code.name}")


def _run(args: argparse.Namespace, body: Callable[[Target], int], *, server_from_config: bool = True) -> int:
    try:
        return body(resolve_target(args, server_from_config=server_from_config))
    except RemoteError as exc:
        print(f"nexus-authz: error: {exc.message}", file=sys.stderr)
        return exc.code


def _to_json(message: Any) -> str:
    from google.protobuf import json_format

    return json.dumps(
        json_format.MessageToDict(
            message,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
            unquote_int64_if_possible=True,
        ),
        indent=2,
    )


# -- formatting --------------------------------------------------------------------------------------------
def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[int] = ()) -> str:
    """Plain aligned columns; the columns in `right` are right-aligned (numbers)."""
    widths = [max(len(str(line[i])) for line in [header, *rows]) for i in range(len(header))]

    def fmt(line: Sequence[str]) -> str:
        cells = [
            str(c).rjust(widths[i]) if i in right else str(c).ljust(widths[i]) for i, c in enumerate(line)
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(header), *(fmt(r) for r in rows)])


def _when(ts: Any) -> str:
    seconds = ts.ToNanoseconds() / 1e9
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _span(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _state(value: int) -> str:
    from nexus_authz._gen.nexus.authz.v1 import policy_pb2 as pb

    return pb.KeyState.Name(value).removeprefix("KEY_STATE_").lower()


def _kind(value: int) -> str:
    from nexus_authz._gen.nexus.authz.v1 import policy_pb2 as pb

    return pb.LimitKind.Name(value).removeprefix("LIMIT_KIND_").lower()


def _amount(kind: int, n: int) -> str:
    from nexus_authz._gen.nexus.authz.v1 import policy_pb2 as pb

    if kind == pb.LIMIT_KIND_USD:
        return f"${n / 1_000_000:,.2f}"
    return f"{n:,}"


_PERIOD_NAMES = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day", 30 * 86400.0: "month"}


def _limit_text(limit: Any) -> str:
    per = ""
    if limit.HasField("period"):
        seconds = limit.period.ToNanoseconds() / 1e9
        per = f"/{_PERIOD_NAMES.get(seconds) or _span(seconds)}"
    text = f"{_amount(limit.kind, limit.limit)} {_kind(limit.kind)}{per}"
    if limit.model:
        text += f" @{limit.model}"
    if limit.shadow:
        text += " (shadow)"
    return text


# -- keys --------------------------------------------------------------------------------------------------
def all_keys(
    target: Target, method: str, request: Callable[[str], Any], unary: Callable[..., Any] | None = None
) -> list[Any]:
    """Every key of a paged list call (`request(page_token)` builds each page's request; `unary`: the
    call function of another service than PolicyService)."""
    keys: list[Any] = []
    token = ""
    while True:
        page = (unary or call)(target, method, request(token))
        keys.extend(page.keys)
        token = page.next_page_token
        if not token:
            return keys


def printed_alone(args: argparse.Namespace, keys: list[Any], none: str) -> bool:
    """`--json`, or no keys: printed here (True); else the caller prints its table."""
    if args.json:
        print(json.dumps({"keys": [json.loads(_to_json(k)) for k in keys]}, indent=2))
        return True
    if not keys:
        print(none + (f" for tenant {args.tenant!r}" if args.tenant else ""))
        return True
    return False


def cmd_keys_list(args: argparse.Namespace) -> int:
    from nexus_authz._gen.nexus.authz.v1 import policy_pb2 as pb

    def body(target: Target) -> int:
        keys = all_keys(
            target,
            "ListKeys",
            lambda t: pb.ListKeysRequest(tenant=args.tenant or "", page_size=1000, page_token=t),
        )
        if printed_alone(args, keys, "no keys"):
            return 0
        rows = [
            [
                k.id,
                k.tenant,
                k.plan or "-",
                _state(k.state),
                _when(k.expires_at) if k.HasField("expires_at") else "-",
                ",".join(k.models) or "*",
                str(len(k.limits)),
            ]
            for k in keys
        ]
        print(table(["ID", "TENANT", "PLAN", "STATE", "EXPIRES (UTC)", "MODELS", "LIMITS"], rows, right=(6,)))
        return 0

    return _run(args, body)


def cmd_keys_show(args: argparse.Namespace) -> int:
    from nexus_authz._gen.nexus.authz.v1 import policy_pb2 as pb

    def body(target: Target) -> int:
        answer = call(target, "GetKey", pb.GetKeyRequest(key_id=args.key_id))
        if args.json:
            print(_to_json(answer))
            return 0
        k = answer.key
        lines = [
            ("id", k.id),
            ("tenant", k.tenant),
            ("plan", k.plan or "-"),
            ("state", _state(k.state)),
            ("expires", _when(k.expires_at) if k.HasField("expires_at") else "never"),
            ("models", ", ".join(k.models) or "any"),
            ("paths", ", ".join(k.paths) or "any"),
            ("credential", k.credential or "-"),
        ]
        lines += [(f"metadata.{name}", value) for name, value in sorted(k.metadata.items())]
        width = max(len(name) for name, _ in lines)
        for name, value in lines:
            print(f"{name.ljust(width)}  {value}")
        print(f"{'limits'.ljust(width)}  " + ("; ".join(_limit_text(lim) for lim in k.limits) or "none"))
        return 0

    return _run(args, body)


# -- limits ------------------------------------------------------------------------------------------------
def cmd_limits(args: argparse.Namespace) -> int:
    from nexus_authz._gen.nexus.authz.v1 import policy_pb2 as pb

    def body(target: Target) -> int:
        answer = call(target, "GetLimitStatus", pb.GetLimitStatusRequest(key_id=args.key_id))
        if args.json:
            print(_to_json(answer))
            return 0
        if not answer.windows:
            print(f"key {answer.key_id} has no limits")
            return 0
        rows = []
        for w in answer.windows:
            name = w.name + (" (shadow)" if w.shadow else "")
            rows.append(
                [
                    name,
                    _kind(w.kind),
                    _amount(w.kind, w.limit),
                    _amount(w.kind, w.used),
                    _amount(w.kind, w.remaining),
                    _amount(w.kind, w.reserved),
                    _span(w.reset_after.ToNanoseconds() / 1e9),
                ]
            )
        header = ["WINDOW", "KIND", "LIMIT", "USED", "REMAINING", "RESERVED", "RESETS IN"]
        print(table(header, rows, right=(2, 3, 4, 5, 6)))
        print(f"reservations in flight: {answer.reservations_in_flight}")
        return 0

    return _run(args, body)


# -- check -------------------------------------------------------------------------------------------------
def _check_body(args: argparse.Namespace) -> bytes:
    if args.body is not None:
        if args.body.startswith("@"):
            try:
                with open(args.body[1:], "rb") as f:
                    return f.read()
            except OSError as exc:
                raise RemoteError(f"cannot read {args.body[1:]}: {exc.strerror}", 2) from None
        return args.body.encode()
    if args.model is None:
        return b""
    body: dict[str, object] = {"model": args.model, "messages": [{"role": "user", "content": "ping"}]}
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    return json.dumps(body).encode()


def cmd_check(args: argparse.Namespace) -> int:
    from nexus_authz._gen.nexus.authz.v1 import policy_pb2 as pb

    def body(target: Target) -> int:
        headers: dict[str, str] = {}
        for item in args.header:
            name, sep, value = item.partition(":")
            if not sep or not name.strip():
                raise RemoteError(f"--header {item!r}: expected 'NAME: VALUE'", 2)
            headers[name.strip().lower()] = value.strip()
        request = pb.CheckRequest(method=args.method, path=args.path, body=_check_body(args))
        if args.key is not None:
            key = sys.stdin.readline().strip() if args.key == "-" else args.key
            if not key:
                raise RemoteError("no client key given", 2)
            headers["authorization"] = f"Bearer {key}"
        else:
            request.key_id = args.key_id
        if headers.get("content-type") is None and request.body:
            headers["content-type"] = "application/json"
        request.headers.update(headers)
        answer = call(target, "Check", request)
        if args.json:
            print(_to_json(answer))
        else:
            verdict = "ALLOWED" if answer.allowed else "DENIED"
            line = f"{verdict} {answer.http_status} {answer.reason}"
            who = [f"key {answer.key_id}"] if answer.key_id else []
            who += [f"tenant {answer.tenant}"] if answer.tenant else []
            who += [f"model {answer.model}"] if answer.model else []
            if who:
                line += f" ({', '.join(who)})"
            if answer.message:
                line += f": {answer.message}"
            print(line)
            for h in answer.response_headers:
                print(f"  {h.name}: {h.value}")
            if answer.allowed and answer.credential:
                print(f"  upstream credential: {answer.credential}")
        return 0 if answer.allowed else 3

    return _run(args, body)


# -- usage -------------------------------------------------------------------------------------------------
def cmd_usage(args: argparse.Namespace, *, now: float | None = None) -> int:
    """`usage --server`: the same table / JSON as the ledger-file mode, from GetUsage."""
    from nexus_authz._gen.nexus.authz.v1 import policy_pb2 as pb
    from nexus_authz.cli import usage as cli_usage
    from nexus_authz.stores.ledger import UsageRow

    groups = {
        "key_id": pb.USAGE_GROUP_KEY,
        "tenant": pb.USAGE_GROUP_TENANT,
        "model": pb.USAGE_GROUP_MODEL,
        "minute": pb.USAGE_GROUP_MINUTE,
        "hour": pb.USAGE_GROUP_HOUR,
        "day": pb.USAGE_GROUP_DAY,
        "source": pb.USAGE_GROUP_SOURCE,
        "price_rule": pb.USAGE_GROUP_PRICE_RULE,
    }

    def body(target: Target) -> int:
        current = time.time() if now is None else now
        try:
            since = cli_usage.parse_time(args.since, current) if args.since else None
            until = cli_usage.parse_time(args.until, current) if args.until else None
        except ValueError as exc:
            raise RemoteError(str(exc), 2) from None
        request = pb.GetUsageRequest(
            key_id=args.key_id or "",
            tenant=args.tenant or "",
            model=args.model or "",
            group_by=[groups[g] for g in args.group_by],
        )
        if since is not None:
            request.start_time.FromNanoseconds(int(since * 1e9))
        if until is not None:
            request.end_time.FromNanoseconds(int(until * 1e9))
        answer = call(target, "GetUsage", request)
        rows = [
            UsageRow(
                key_id=r.key_id if r.HasField("key_id") else None,
                tenant=r.tenant if r.HasField("tenant") else None,
                model=r.model if r.HasField("model") else None,
                period=r.period_start.seconds if r.HasField("period_start") else None,
                requests=r.requests,
                prompt_tokens=r.prompt_tokens,
                cached_prompt_tokens=r.cached_prompt_tokens,
                completion_tokens=r.completion_tokens,
                reasoning_tokens=r.reasoning_tokens,
                cost_micro_usd=r.cost_micro_usd,
                first_minute=r.first_minute.seconds,
                last_minute=r.last_minute.seconds,
                source=r.source if r.HasField("source") else None,
                price_rule=r.price_rule if r.HasField("price_rule") else None,
            )
            for r in answer.rows
        ]
        print(
            cli_usage.rows_to_json(rows) if args.json else cli_usage.usage_table(rows, group_by=args.group_by)
        )
        return 0

    return _run(args, body, server_from_config=False)
