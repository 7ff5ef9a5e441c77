"""The `nexus-authz` command.

Exit codes: 0 success, 1 runtime failure (e.g. a port in use), 2 invalid configuration or usage.
Errors are one clear line on stderr, never a traceback (a traceback means a bug).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from nexus_authz.core import keys as keys_mod
from nexus_authz.core.errors import ConfigError

if TYPE_CHECKING:
    from nexus_authz.core.model import Credential
    from nexus_authz.settings import Settings


def _env_config() -> str | None:
    """NEXUS_CONFIG, as settings.py reads it (imported late: the command line starts light)."""
    from nexus_authz.settings import cli_environment

    return cli_environment().config


DEFAULT_CONFIG = "nexus.yaml"


def _config_path(args: argparse.Namespace) -> str:
    return args.config or _env_config() or DEFAULT_CONFIG


def _fail(message: str, code: int = 2) -> int:
    print(f"nexus-authz: error: {message}", file=sys.stderr)
    return code


# -- serve -------------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from nexus_authz import server
    from nexus_authz.engine import Engine
    from nexus_authz.logs import setup_logging
    from nexus_authz.settings import load_settings

    try:
        settings = load_settings(_config_path(args))
        # The engine runs with the file's settings: a reload compares the file with them, and must not
        # report --log-level as a change of logging.level.
        engine_settings = settings
        if args.log_level:
            from dataclasses import replace

            settings = replace(settings, log_level=args.log_level)
        setup_logging(settings.log_level, settings.log_format)
        engine = Engine.from_settings(engine_settings)
        validated = server.validate(settings, engine)  # what check-config runs too
    except ConfigError as exc:
        return _fail(str(exc))
    try:
        return server.run(settings, engine, validated)
    except server.StartupError as exc:
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return 0


# -- check-config ------------------------------------------------------------------------------------
def cmd_check_config(args: argparse.Namespace) -> int:
    from nexus_authz.core.price_policy import unpriced_warnings
    from nexus_authz.engine import Engine
    from nexus_authz.server import validate
    from nexus_authz.settings import load_settings

    path = _config_path(args)
    try:
        # exactly serve's start-up validation, without opening any socket
        settings = load_settings(path)
        engine = Engine.from_settings(settings)
        validate(settings, engine)
    except ConfigError as exc:
        return _fail(str(exc))
    snap = engine.snapshot
    now = time.time()
    expired = sum(1 for k in snap.by_id.values() if k.expires_at is not None and k.expires_at <= now)
    disabled = sum(1 for k in snap.by_id.values() if k.disabled)
    print(f"ok: {path}")
    print(f"  key file: {snap.source} ({len(snap)} keys, {disabled} disabled, {expired} expired)")
    print(f"  plans: {', '.join(sorted(settings.policy.plans)) or 'none'}")
    print(f"  credentials: {', '.join(sorted(settings.policy.credentials)) or 'none'}")
    prices, unpriced = [glob for glob, _ in settings.policy.prices], settings.policy.unpriced.policy
    for line in unpriced_warnings(((k.key_id, k.models) for k in snap.by_id.values()), prices, unpriced):
        print(f"  warning: {line}")
    return 0


# -- keys ----------------------------------------------------------------------------------------------
def _settings_for_cli(args: argparse.Namespace) -> Settings | None:
    """The config's settings if a config is given or present, else None."""
    from nexus_authz.settings import load_settings

    path = _config_path(args)
    if args.config or _env_config() or os.path.exists(path):
        return load_settings(path)
    return None


def _pepper_for_cli(args: argparse.Namespace) -> bytes:
    """The pepper from the config's `keys.pepper` if a config is given or present, else NEXUS_KEY_PEPPER."""
    from nexus_authz.settings import Settings, resolve_pepper

    settings = _settings_for_cli(args)
    if settings is None:
        settings = Settings(config_path="(no config file)", base_dir=os.getcwd())
    return resolve_pepper(settings)


_LIMIT_SHORTHAND = re.compile(r"^(requests|tokens|usd|concurrent)=(\d+(?:\.\d+)?)(?:/(\w+))?$")


def _limit_arg(text: str) -> dict[str, object]:
    """--limit: `KIND=N[/PER]` (requests=60/minute, usd=5/month, concurrent=4) or a key-file limit
    mapping such as '{requests: 10, per: minute, model: "gpt-4*"}'. Checked later, as the key file is."""
    import yaml

    text = text.strip()
    m = _LIMIT_SHORTHAND.match(text)
    if m:
        kind, amount, per = m.groups()
        limit: dict[str, object] = {kind: float(amount) if "." in amount else int(amount)}
        if per:
            limit["per"] = per
        return limit
    try:
        value = yaml.safe_load(text) if text.startswith("{") else None
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected KIND=N[/PER] (e.g. requests=60/minute) or a mapping such as "
            f"'{{tokens: 100000, per: day}}', got {text!r}"
        )
    return value


def _key_entry(args: argparse.Namespace, key_hash: str) -> list[str]:
    """The key-file entry for `keys generate` (JSON values are valid YAML and need no escaping rules)."""
    entry = [f"  - id: {args.id}", f'    hash: "{key_hash}"']
    if args.tenant:
        entry.append(f"    tenant: {args.tenant}")
    if args.plan:
        entry.append(f"    plan: {args.plan}")
    if args.models:
        entry.append("    models: [" + ", ".join(json.dumps(m) for m in args.models) + "]")
    if args.paths:
        entry.append("    paths: [" + ", ".join(json.dumps(p) for p in args.paths) + "]")
    if args.credential:
        entry.append(f"    credential: {args.credential}")
    if args.limits:
        entry.append("    limits:")
        entry.extend(f"      - {json.dumps(limit)}" for limit in args.limits)
    if args.expires:
        entry.append(f'    expires_at: "{args.expires}"')
    return entry


def _check_entry(
    args: argparse.Namespace, entry: list[str], settings: Settings | None, pepper: bytes
) -> list[str]:
    """Parse the entry as the server parses a key file (ConfigError if it would refuse it), against the
    config's plans, credentials and prices when there is a config; without one, returns what could not
    be checked (the plan and credential it names, usd limits needing prices)."""
    from nexus_authz.core.config import Plan, PolicySet, Price, parse_key_file

    unchecked: list[str] = []
    if settings is not None:
        policy = settings.policy
        credentials = _any_credentials(settings)
    else:  # assume what the entry names exists, and say so
        unchecked += [f"plan {args.plan!r}"] if args.plan else []
        unchecked += [f"credential {args.credential!r}"] if args.credential else []
        if any("usd" in limit for limit in args.limits or ()):
            unchecked.append("usd limits (they need a prices table)")
        policy = PolicySet(
            plans={args.plan: Plan(args.plan)} if args.plan else {}, prices=(("*", Price(1, 1, 1)),)
        )
        credentials = {args.credential: _placeholder(args.credential)} if args.credential else {}
    parse_key_file(
        "keys:\n" + "\n".join(entry) + "\n",
        "(the generated entry)",
        policy=policy,
        credentials=credentials,
        pepper=pepper,
        loaded_at=time.time(),
    )
    return unchecked


def cmd_keys_generate(args: argparse.Namespace) -> int:
    try:
        settings = _settings_for_cli(args)
        pepper = _pepper_for_cli(args)
    except ConfigError as exc:
        return _fail(str(exc))
    secret = keys_mod.generate_secret()
    entry = _key_entry(args, keys_mod.format_hash(pepper, secret))
    try:
        unchecked = _check_entry(args, entry, settings, pepper)
    except ConfigError as exc:
        return _fail(f"the key would be refused: {exc}")
    if unchecked:
        print(
            f"nexus-authz: warning: no config file (-c, $NEXUS_CONFIG or ./{DEFAULT_CONFIG}), so "
            f"{', '.join(unchecked)} could not be checked; `nexus-authz check-config` will",
            file=sys.stderr,
        )
    print(f"secret: {secret}")
    print("# Give the secret to the client now: it is not stored anywhere and cannot be shown again.")
    print("# Add this entry under `keys:` in the key file (it holds only a keyed hash of the secret):")
    print("\n".join(entry))
    return 0


def cmd_keys_hash(args: argparse.Namespace) -> int:
    try:
        pepper = _pepper_for_cli(args)
    except ConfigError as exc:
        return _fail(str(exc))
    secret = getpass.getpass("key: ") if sys.stdin.isatty() else sys.stdin.readline().strip()
    if not secret:
        return _fail("no key given on standard input")
    print(keys_mod.format_hash(pepper, secret))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke a key on every replica at once, through Redis (distributed mode)."""
    import asyncio

    from nexus_authz.settings import load_settings, redis_password
    from nexus_authz.stores.redis import make_client
    from nexus_authz.stores.redis.revocations import RevocationChannel

    try:
        settings = load_settings(_config_path(args))
    except ConfigError as exc:
        return _fail(str(exc))
    rs = settings.counters.redis
    if settings.counters.backend != "redis" or rs is None:
        return _fail(
            "keys revoke needs counters.backend: redis (distributed mode); without Redis, set "
            "`disabled: true` on the key in the key file: every server reloads it within keys.reload_interval"
        )
    # A typo must not look like a success: check the id against the config's key file when it can be read
    # (refused, exit 2, unless --force: e.g. a key only other replicas' key files hold); when it cannot,
    # say so and publish anyway (revoking is urgent; the key file is not needed for it).
    from nexus_authz.engine import read_key_snapshot
    from nexus_authz.settings import resolve_path, resolve_pepper

    key_file = resolve_path(settings, settings.keys_file)
    try:
        pepper = resolve_pepper(settings)
        known = read_key_snapshot(
            settings, pepper=pepper, credentials=_any_credentials(settings), now=time.time()
        )
    except ConfigError as exc:
        print(
            f"nexus-authz: warning: cannot check the key id against the key file ({exc}); publishing anyway",
            file=sys.stderr,
        )
    else:
        if args.id not in known.by_id and not args.force:
            return _fail(
                f"no key with id {args.id!r} in the key file {key_file}; nothing revoked (check the id, or "
                "pass --force to publish the revocation anyway; a runtime key: `keys revoke --runtime`)"
            )

    async def publish() -> int:
        client = make_client(
            rs, password=redis_password(rs, base_dir=settings.base_dir), base_dir=settings.base_dir
        )
        try:
            return await RevocationChannel(client, key_prefix=rs.key_prefix).publish(args.id)
        finally:
            await client.aclose()

    try:
        heard = asyncio.run(publish())
    except ConfigError as exc:
        return _fail(str(exc))
    except Exception as exc:  # redis errors: unreachable, auth, ...
        return _fail(f"cannot reach Redis at {rs.url}: {exc}", 1)
    print(f"revoked {args.id}: {heard} server(s) notified now; the others read it when they (re)connect")
    print("Also set `disabled: true` on it in the key file, so it stays revoked if Redis is ever reset.")
    return 0


def _placeholder(name: str) -> Credential:
    from nexus_authz.core.model import Credential

    return Credential(name, "authorization", "unchecked")


def _any_credentials(settings: Settings) -> dict[str, Credential]:
    """Placeholders for the config's credentials: checking a key file needs their names, not their secrets
    (which may live only where the server runs)."""
    return {name: _placeholder(name) for name in settings.policy.credentials}


def cmd_keys_pepper(args: argparse.Namespace) -> int:
    print(keys_mod.generate_pepper())
    return 0


# -- usage -------------------------------------------------------------------------------------------
def cmd_usage(args: argparse.Namespace) -> int:
    from nexus_authz.cli import usage as cli_usage
    from nexus_authz.settings import load_settings, resolve_path

    if args.server:  # ask a running server's policy API instead of reading the file
        from nexus_authz.cli import remote as cli_remote

        return cli_remote.cmd_usage(args)
    if not args.db:
        try:
            settings = load_settings(_config_path(args))
        except ConfigError as exc:
            return _fail(f"{exc} (or give the ledger file with --db)")
        if settings.ledger.backend != "sqlite":
            return _fail(f"the config's ledger backend is {settings.ledger.backend!r}: no file to read")
        args.db = resolve_path(settings, settings.ledger.path)
    return cli_usage.cmd_usage(args)


# -- envoy-config ------------------------------------------------------------------------------------
def _envoy_template(mode: str) -> str:
    """The shipped config of this mode: envoy/ of the checkout this package runs from, or /app/envoy."""
    from pathlib import Path

    from nexus_authz.render.envoy import ENVOY_DIR, TEMPLATES

    for base in (ENVOY_DIR, Path("/app/envoy")):
        if (base / TEMPLATES[mode]).is_file():
            return str(base / TEMPLATES[mode])
    raise FileNotFoundError(f"envoy/{TEMPLATES[mode]} not found; give the config to start from with --from")


def cmd_envoy_config(args: argparse.Namespace) -> int:
    """Print a ready Envoy config: the shipped one with the upstream, listener and nexus-authz's
    addresses filled in (from nexus.yaml unless given), the Lua usage tap inlined."""
    from pathlib import Path

    from nexus_authz.render import envoy as envoy_config
    from nexus_authz.settings import Settings, load_settings

    path = _config_path(args)
    try:
        if args.config or _env_config() or os.path.exists(path):
            settings = load_settings(path)
        else:  # no config: nexus-authz's defaults
            settings = Settings(config_path="(no config file)", base_dir=os.getcwd())
    except ConfigError as exc:
        return _fail(str(exc))
    authz = args.authz or settings.http_socket or (str(settings.http_tcp) if settings.http_tcp else None)
    grpc_address = args.grpc or authz or settings.grpc
    if grpc_address is None and args.mode == "grpc":
        return _fail("no check listener and no gRPC listener (listen.grpc) is on; give --authz or --grpc")
    if args.mode == "http" and authz is None:
        return _fail("no HTTP fast path (listen.http_socket and listen.http_tcp are off); give --authz")
    listen_host, listen_port = None, None
    if args.listen:
        host, sep, port = args.listen.rpartition(":")
        if not sep or not port.isdigit():
            return _fail(f"--listen: expected host:port, got {args.listen!r}", 2)
        listen_host, listen_port = host.strip("[]") or "0.0.0.0", int(port)
    try:
        template = args.template or _envoy_template(args.mode)
        options: dict[str, object] = {"als": authz if args.mode == "http" else grpc_address}
        if args.mode == "http":
            options["authz_socket"] = authz
        else:
            options["authz_grpc"] = grpc_address
        text = envoy_config.render(
            Path(template),
            listen_host=listen_host,
            listen_port=listen_port,
            admin_port=args.admin_port,
            upstream=args.upstream,
            ca_file=args.ca_file or envoy_config.SYSTEM_CA_FILE,
            **options,  # type: ignore[arg-type]
        )
    except (envoy_config.EnvoyConfigError, OSError) as exc:
        return _fail(str(exc))
    upstream = args.upstream or "as shipped"
    sources = f"mode={args.mode}, upstream={upstream}, authz={authz}, grpc={grpc_address}"
    sys.stdout.write(f"# Rendered by `nexus-authz envoy-config` from {template}: {sources}.\n{text}")
    return 0


# -- demo --------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from nexus_authz.demo.runner import run_demo

    return run_demo(port=args.port, smoke=args.smoke, envoy_config=args.envoy_config)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nexus-authz")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nexus-authz",
        description=textwrap.dedent(
            """\
            nexus-authz: the policy engine of the Nexus LLM gateway. It runs next to Envoy (or nginx) and
            decides for every request who is calling (virtual API keys), how much they may use (request and
            token limits) and what it cost (usage from the provider's response)."""
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nexus-authz {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-c",
            "--config",
            help=f"config file (default: $NEXUS_CONFIG, else ./{DEFAULT_CONFIG})",
        )

    p = sub.add_parser(
        "serve",
        help="run the service",
        description="Serve the HTTP fast path (Unix socket), the admin endpoints and the gRPC services "
        "until SIGTERM/SIGINT, then drain and exit 0. SIGHUP reloads the config file (policy sections, "
        "key file, pepper; other changes are logged and need a restart) and the key file.",
    )
    add_config(p)
    p.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="override logging.level"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "check-config",
        help="validate the config and key files",
        description="Load the config file, the key file and every secret they reference, as `serve` would, "
        "and report the first problem with its file, line and field. Exit 0 when all is well, 2 if not.",
    )
    add_config(p)
    p.set_defaults(func=cmd_check_config)

    keys = sub.add_parser(
        "keys",
        help="create keys and hashes; list a server's keys",
        description="Create keys and key hashes; list and show the keys of a running server.",
    )
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND")
    p = keys_sub.add_parser(
        "generate",
        help="create a new client key",
        description="Print a new client key (once) and the key-file entry holding only its keyed hash. "
        "The pepper comes from the config's keys.pepper, or NEXUS_KEY_PEPPER without a config. The entry "
        "is checked as the server checks a key file (plan, credential, limits, paths) and refused with "
        "exit 2 if it would be refused; without a config, names it cannot check are warned about.",
    )
    add_config(p)
    p.add_argument("--id", required=True, help="the key's id (shown in logs, metrics and the ledger)")
    p.add_argument("--tenant", help="tenant the key belongs to")
    p.add_argument("--plan", help="plan name from the config")
    p.add_argument("--models", nargs="*", help="allowed model globs, e.g. 'gpt-4o*'")
    p.add_argument("--paths", nargs="*", help="allowed path globs, e.g. '/v1/chat/*' (default: any path)")
    p.add_argument(
        "--credential", help="upstream credential name from the config (default: default_credential)"
    )
    p.add_argument(
        "--limit",
        dest="limits",
        action="append",
        type=_limit_arg,
        metavar="LIMIT",
        help="a limit of the key's own (repeatable), added to its plan's: KIND=N[/PER] such as "
        "requests=60/minute, tokens=100000/day, usd=5/month, concurrent=4, or a key-file mapping such as "
        "'{requests: 10, per: minute, model: \"gpt-4*\"}'",
    )
    p.add_argument("--expires", help="expiry, ISO 8601 (e.g. 2027-01-31T00:00:00Z)")
    p.set_defaults(func=cmd_keys_generate)
    p = keys_sub.add_parser(
        "hash", help="hash an existing key", description="Read a key on standard input and print its hash."
    )
    add_config(p)
    p.set_defaults(func=cmd_keys_hash)
    p = keys_sub.add_parser(
        "revoke",
        help="revoke a key on every replica now (Redis)",
        description="Publish a revocation through Redis (counters.backend: redis): every nexus-authz "
        "sharing that Redis answers 401 for the key within a second, until restarted without it in the "
        "revocation set. An id that is not in the config's key file is refused (exit 2) unless --force; "
        "when the key file cannot be read, a warning says so and the revocation is published.",
    )
    add_config(p)
    p.add_argument("id", help="the key id to revoke")
    p.add_argument(
        "--force",
        action="store_true",
        help="publish even when the id is not in the config's key file (exit 2 without it)",
    )
    p.set_defaults(func=cmd_keys_revoke)
    p = keys_sub.add_parser(
        "pepper", help="create a new pepper", description="Print a new random pepper for keys.pepper."
    )
    p.set_defaults(func=cmd_keys_pepper)
    keys.set_defaults(func=lambda a: (keys.print_help(), 2)[1])
    from nexus_authz.cli import explain as cli_explain
    from nexus_authz.cli import remote as cli_remote

    cli_remote.add_commands(sub, keys_sub, add_config)  # keys list|show, limits, check (policy API)
    cli_explain.add_command(sub, add_config)  # explain (policy API)
    from nexus_authz.cli import keys_admin

    keys_admin.add_commands(keys_sub, add_config)  # keys create|rotate|update|restore (issue 17)

    p = sub.add_parser(
        "usage",
        help="token usage and cost from the ledger",
        description="Read the usage ledger (SQLite; safe while the server runs) and print requests, tokens "
        "and cost per key and model, e.g. `nexus-authz usage --key team-a --since 24h`.",
    )
    add_config(p)
    from nexus_authz.cli import usage as cli_usage

    cli_usage.add_arguments(p)
    cli_remote.add_server_arguments(p, json_flag=False, usage=True)
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser(
        "envoy-config",
        help="print a ready Envoy config for your upstream and nexus-authz",
        description="Print the shipped Envoy config (envoy/envoy.yaml, or envoy/envoy-grpc.yaml with "
        "--mode grpc) with nexus-authz's check listener taken from the config file (listen.http_socket or "
        "http_tcp) unless given, the upstream and the listener filled in, and the Lua usage tap "
        "inlined, so Envoy runs it from any directory: `nexus-authz envoy-config -c nexus.yaml --upstream "
        "https://api.openai.com > envoy.yaml && envoy -c envoy.yaml`.",
    )
    add_config(p)
    p.add_argument(
        "--mode", choices=("http", "grpc"), default="http", help="ext_authz over HTTP (default) or gRPC"
    )
    p.add_argument(
        "--upstream",
        help="the LLM provider: https://api.openai.com (TLS with SNI, validated against the system CAs), "
        "http://host:port or host:port (default: the shipped 127.0.0.1:8000)",
    )
    p.add_argument("--listen", help="Envoy's listener, host:port (default 127.0.0.1:10000)")
    p.add_argument("--admin-port", type=int, help="Envoy's admin port on 127.0.0.1 (default 9901)")
    p.add_argument("--authz", help="nexus-authz's check listener: socket path or host:port (default: config)")
    p.add_argument("--grpc", help="--mode grpc: to nexus-authz's gRPC port (grpc.aio) instead, host:port")
    p.add_argument("--ca-file", help="CA bundle for an https upstream (default: the system's)")
    p.add_argument("--from", dest="template", help="the Envoy config to start from (default: shipped one)")
    p.set_defaults(func=cmd_envoy_config)

    p = sub.add_parser(
        "demo",
        help="run Envoy + nexus-authz + a mock OpenAI upstream",
        description="Start a mock OpenAI-compatible upstream, nexus-authz with a generated demo key, and "
        "Envoy in front of both; print the demo key, the gateway URL and a curl command; stop all of it on "
        "Ctrl-C.",
    )
    p.add_argument("--port", type=int, default=10000, help="gateway port (default 10000; 0 picks a free one)")
    p.add_argument("--envoy-config", help="Envoy config to use (default: envoy/envoy.yaml of this checkout)")
    p.add_argument("--smoke", action="store_true", help="send a few requests through the gateway and exit")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
