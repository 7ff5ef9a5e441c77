"""`nexus-authz keys create|rotate|update|restore`, `keys revoke --runtime`, `keys list --runtime`.

Keys managed at runtime (issue 17), through a running server's KeyAdminService (the policy API's
listener and admin token, as `keys list`). The secret of `create` and `rotate` is printed once, on
its own line (or in --json); nothing else prints a secret. Without --runtime, `keys revoke` stays the
Redis revocation of a key-file key and `keys list` lists every key in force.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from typing import Any

from nexus_authz.cli import remote
from nexus_authz.cli.remote import Target, _explain, _run, _to_json, add_server_arguments, table

__all__ = ["add_commands"]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def _duration(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"expected a duration such as 90s, 15m, 24h or 7d, got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _timestamp(text: str) -> float:
    from nexus_authz.core.config import parse_timestamp

    value = parse_timestamp(text)
    if value is None:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time such as 2027-01-31T00:00:00Z, got {text!r}"
        )
    return value


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _limit(text: str) -> dict[str, object]:
    from nexus_authz.cli.commands import _limit_arg

    return _limit_arg(text)


def call(target: Target, method: str, request: Any) -> Any:
    import grpc

    from nexus_authz._gen.nexus.authz.v1 import keys_pb2_grpc

    with grpc.insecure_channel(target.server) as channel:
        stub = keys_pb2_grpc.KeyAdminServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            return getattr(stub, method)(
                request, metadata=(("authorization", f"Bearer {target.token}"),), timeout=target.timeout
            )
        except grpc.RpcError as exc:
            raise _explain(exc, target) from None


def _ts(seconds: float) -> Any:
    from google.protobuf import timestamp_pb2

    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _rotation(key: Any) -> str:
    from nexus_authz._gen.nexus.authz.v1 import keys_pb2 as pb

    state = pb.RotationState.Name(key.rotation).removeprefix("ROTATION_STATE_").lower()
    if state == "grace":
        return f"grace until {remote._when(key.grace_until)}"
    return "-" if state in ("none", "unspecified") else state


def _print_key(args: argparse.Namespace, answer: Any, *, secret: bool = False) -> int:
    if args.json:
        print(_to_json(answer))
        return 0
    key = answer.key
    state = "disabled" if key.disabled else "active"
    print(f"{key.id}: tenant {key.tenant}, {state}, rotation {_rotation(key)}, version {key.version}")
    if secret:
        print("secret (shown once; store it now, only its keyed hash is kept):", file=sys.stderr)
        print(answer.secret)
    return 0


# -- commands ---------------------------------------------------------------------------------------------
def cmd_create(args: argparse.Namespace) -> int:
    from nexus_authz._gen.nexus.authz.v1 import keys_pb2 as pb

    def body(target: Target) -> int:
        request = pb.CreateKeyRequest(
            id=args.id,
            tenant=args.tenant or "",
            group=args.group or "",
            plan=args.plan or "",
            models=args.models,
            paths=args.paths,
            limits_json=json.dumps(args.limits) if args.limits else "",
            disabled=args.disabled,
            metadata=dict(args.metadata),
            credential=args.credential or "",
        )
        if args.expires is not None:
            request.expires_at.CopyFrom(_ts(args.expires))
        return _print_key(args, call(target, "CreateKey", request), secret=True)

    return _run(args, body)


def cmd_rotate(args: argparse.Namespace) -> int:
    from google.protobuf import duration_pb2

    from nexus_authz._gen.nexus.authz.v1 import keys_pb2 as pb

    def body(target: Target) -> int:
        grace = duration_pb2.Duration()
        grace.FromNanoseconds(int(args.grace * 1e9))
        answer = call(target, "RotateKey", pb.RotateKeyRequest(id=args.id, grace=grace))
        return _print_key(args, answer, secret=True)

    return _run(args, body)


def cmd_update(args: argparse.Namespace) -> int:
    from nexus_authz._gen.nexus.authz.v1 import keys_pb2 as pb

    def body(target: Target) -> int:
        request = pb.UpdateKeyRequest(id=args.id)
        for name in ("tenant", "group", "plan", "credential"):
            value = getattr(args, name)
            if value is not None:
                setattr(request, name, value)
        if args.models or args.any_model:
            request.models.extend(args.models)
            request.set_models = True
        if args.paths or args.any_path:
            request.paths.extend(args.paths)
            request.set_paths = True
        if args.limits or args.no_limits:
            request.limits_json = json.dumps(args.limits or [])
        if args.metadata:
            request.metadata.update(dict(args.metadata))
            request.set_metadata = True
        if args.expires is not None:
            request.expires_at.CopyFrom(_ts(args.expires))
        request.clear_expiry = args.no_expiry
        if args.disabled is not None:
            request.disabled = args.disabled
        return _print_key(args, call(target, "UpdateKey", request))

    return _run(args, body)


def cmd_revoke_runtime(args: argparse.Namespace) -> int:
    from nexus_authz._gen.nexus.authz.v1 import keys_pb2 as pb

    args.json = getattr(args, "json", False)
    return _run(args, lambda t: _print_key(args, call(t, "RevokeKey", pb.RevokeKeyRequest(id=args.id))))


def cmd_restore(args: argparse.Namespace) -> int:
    from nexus_authz._gen.nexus.authz.v1 import keys_pb2 as pb

    return _run(args, lambda t: _print_key(args, call(t, "RestoreKey", pb.RestoreKeyRequest(id=args.id))))


def cmd_list_runtime(args: argparse.Namespace) -> int:
    from nexus_authz._gen.nexus.authz.v1 import keys_pb2 as pb

    def body(target: Target) -> int:
        keys = remote.all_keys(
            target,
            "ListRuntimeKeys",
            lambda t: pb.ListRuntimeKeysRequest(tenant=args.tenant or "", page_size=10_000, page_token=t),
            call,
        )
        if remote.printed_alone(args, keys, "no runtime keys"):
            return 0
        rows = [
            [
                k.id,
                k.tenant,
                k.plan or "-",
                "disabled" if k.disabled else "active",
                remote._when(k.expires_at) if k.HasField("expires_at") else "-",
                _rotation(k),
                str(k.version),
            ]
            for k in keys
        ]
        print(table(["ID", "TENANT", "PLAN", "STATE", "EXPIRES (UTC)", "ROTATION", "VERSION"], rows))
        return 0

    return _run(args, body)


# -- the parser ---------------------------------------------------------------------------------------------
def _either(flag: str, runtime: Callable[[argparse.Namespace], int], other: Any) -> Any:
    def func(args: argparse.Namespace) -> int:
        return runtime(args) if getattr(args, flag) else int(other(args))

    return func


def add_commands(
    keys_sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_config: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Register `keys create|rotate|update|restore` and the --runtime variants of `keys revoke|list`."""

    def scope(p: argparse.ArgumentParser, *, update: bool) -> None:
        p.add_argument("--tenant", help="the key's tenant (sent upstream as x-nexus-tenant)")
        p.add_argument("--group", help="the key's group (team/project) within its tenant")
        p.add_argument("--plan", help="a plan of the config" + ("; '' removes it" if update else ""))
        p.add_argument("--model", dest="models", action="append", default=[], help="allowed model glob")
        p.add_argument("--path", dest="paths", action="append", default=[], help="allowed path glob")
        p.add_argument(
            "--limit",
            dest="limits",
            type=_limit,
            action="append",
            default=[],
            help="KIND=N[/PER] (requests=60/minute) or a key-file limit mapping; repeatable",
        )
        p.add_argument("--expires", type=_timestamp, help="expiry, ISO 8601 (2027-01-31T00:00:00Z)")
        p.add_argument("--credential", help="a credential of the config (default: default_credential)")
        p.add_argument(
            "--metadata", type=_pair, action="append", default=[], metavar="NAME=VALUE", help="metadata"
        )

    p = keys_sub.add_parser(
        "create",
        help="create a runtime key on a running server (prints its secret once)",
        description="Create a key at runtime through the server's key admin API: every replica accepts it "
        "within a second. The secret is printed once, on the last line; only its keyed hash is stored.",
    )
    add_config(p)
    add_server_arguments(p)
    p.add_argument("id", help="the new key's id (unique across the key file and the runtime keys)")
    scope(p, update=False)
    p.add_argument("--disabled", action="store_true", help="create it disabled")
    p.set_defaults(func=cmd_create)

    p = keys_sub.add_parser(
        "rotate",
        help="give a runtime key a new secret (the old one works for --grace)",
        description="A new secret for a runtime key: same id, limits state and usage. The previous secret "
        "keeps working for --grace, then answers 401 expired_api_key.",
    )
    add_config(p)
    add_server_arguments(p)
    p.add_argument("id", help="the key's id")
    p.add_argument("--grace", type=_duration, default=0.0, help="how long the old secret works (e.g. 24h)")
    p.set_defaults(func=cmd_rotate)

    p = keys_sub.add_parser(
        "update",
        help="change a runtime key's scope, plan, limits, expiry or state",
        description="Change a runtime key; what is not given stays. --model/--path/--limit/--metadata "
        "replace the whole list.",
    )
    add_config(p)
    add_server_arguments(p)
    p.add_argument("id", help="the key's id")
    scope(p, update=True)
    p.add_argument("--any-model", action="store_true", help="allow every model (clears --model)")
    p.add_argument("--any-path", action="store_true", help="allow every path")
    p.add_argument("--no-limits", action="store_true", help="remove the key's own limits")
    p.add_argument("--no-expiry", action="store_true", help="remove the expiry")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--disable", dest="disabled", action="store_const", const=True, default=None)
    state.add_argument("--enable", dest="disabled", action="store_const", const=False)
    p.set_defaults(func=cmd_update)

    p = keys_sub.add_parser(
        "restore",
        help="undo the revocation of a runtime key",
        description="Re-enable a revoked runtime key on every replica (within a second).",
    )
    add_config(p)
    add_server_arguments(p)
    p.add_argument("id", help="the key's id")
    p.set_defaults(func=cmd_restore)

    revoke = keys_sub.choices["revoke"]
    revoke.add_argument(
        "--runtime",
        action="store_true",
        help="revoke a runtime key through the key admin API (undo with `keys restore`)",
    )
    add_server_arguments(revoke, json_flag=False)
    revoke.set_defaults(func=_either("runtime", cmd_revoke_runtime, revoke.get_default("func")))

    listing = keys_sub.choices["list"]
    listing.add_argument("--runtime", action="store_true", help="only the runtime keys, with rotation state")
    listing.set_defaults(func=_either("runtime", cmd_list_runtime, listing.get_default("func")))
