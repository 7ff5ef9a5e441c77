"""Server settings: one frozen `Settings` from the config file and NEXUS_* environment variables.

This is the only module that reads the environment and secret files. The policy sections of the same
file are handed to `core.config.parse_policy`; everything else (where to listen, where the key file is,
logging, the ledger) is read here. Relative paths are relative to the config file's directory.

Environment variables override the file (handy in containers):
  NEXUS_CONFIG         path of the config file (when --config is not given)
  NEXUS_KEY_PEPPER     the key-hash pepper (the default source of `keys.pepper`)
  NEXUS_KEYS_FILE      keys.file
  NEXUS_HTTP_SOCKET    listen.http_socket ("" disables it)
  NEXUS_HTTP_TCP       listen.http_tcp    (host:port, "" disables it)
  NEXUS_GRPC_LISTEN    listen.grpc        (host:port or unix:/path, "" disables it)
  NEXUS_ADMIN_LISTEN   listen.admin       (host:port, "" disables it)
  NEXUS_API_LISTEN     listen.api         (the policy query API: host:port or unix:/path, "" disables it)
  NEXUS_ADMIN_TOKEN    the policy API's admin token (the default source of `api.admin_token`)
  NEXUS_LOG_LEVEL      logging.level
  NEXUS_TEST_CLOCK_FILE  FOR TESTS ONLY, never set by default: shift the server's clock by the seconds in
                       this file (nexus_authz/testclock.py; the e2e tests move a month boundary with it)
and, for the command line's client commands (`cli_environment`):
  NEXUS_API_ADDR       the policy API a client command talks to (when --server is not given)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from nexus_authz.core.config import PolicySet, SecretRef, credential_value, parse_policy, parse_secret_ref
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.model import Credential
from nexus_authz.core.rls import RlsSettings, parse_rls_settings
from nexus_authz.core.yamlsrc import Fields, load_yaml
from nexus_authz.stores.redis import RedisSettings, parse_redis_settings

DEFAULT_SOCKET = "/tmp/nexus-authz/authz.sock"
DEFAULT_PEPPER_ENV = "NEXUS_KEY_PEPPER"
DEFAULT_API_LISTEN = "127.0.0.1:9002"
DEFAULT_ADMIN_TOKEN_ENV = "NEXUS_ADMIN_TOKEN"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    """Where usage records go: SQLite (default), memory (tests, no persistence) or nowhere."""

    backend: str = "sqlite"
    path: str = "usage.sqlite3"
    flush_interval: float = 1.0
    batch_size: int = 1000
    max_pending: int = 100_000


@dataclass(frozen=True, slots=True)
class AccountingSettings:
    """Usage from responses (Envoy ext_proc): settle reservations, feed the ledger."""

    enabled: bool = True
    error_charge_tokens: int = 0  # tokens charged for an upstream error response (no usage record)
    exact_cutoff_count: bool = True  # count a cut-off stream's completion with tiktoken (in a thread)
    inject_include_usage: bool = False  # ask OpenAI streams for their usage chunk (needs a waiting ext_proc)


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """The policy query API (`api:`): the bearer admin token its callers must send.

    Without `api.admin_token` in the file the token comes from NEXUS_ADMIN_TOKEN, and when that is unset
    the API stays off (never open without a token); a token configured in the file must resolve.
    """

    admin_token: SecretRef = field(default=SecretRef(env=DEFAULT_ADMIN_TOKEN_ENV), repr=False)
    admin_token_configured: bool = False


@dataclass(frozen=True, slots=True)
class CounterSettings:
    """Where limit counters live: in this process (exact on one replica) or in Redis (shared)."""

    backend: str = "memory"
    redis: RedisSettings | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    config_path: str
    base_dir: str
    # listeners
    http_socket: str | None = DEFAULT_SOCKET
    http_socket_mode: int = 0o660
    http_tcp: HostPort | None = None
    grpc: str | None = "127.0.0.1:9001"
    admin: HostPort | None = HostPort("127.0.0.1", 9090)
    api: str | None = DEFAULT_API_LISTEN  # the policy query API (its own gRPC server)
    # limits on what a client may send to the fast path
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 1024 * 1024
    idle_timeout: float = 300.0
    # keys
    keys_file: str = "keys.yaml"
    pepper: SecretRef = field(default=SecretRef(env=DEFAULT_PEPPER_ENV), repr=False)
    reload_interval: float = 1.0
    # keys managed at runtime (issue 17): auto = redis in distributed mode, else sqlite; none: off
    runtime_keys: str = "auto"
    runtime_keys_path: str = "runtime-keys.sqlite3"
    # operations
    log_level: str = "info"
    log_format: str = "json"
    shutdown_grace: float = 10.0
    loop_cpu_time: bool = False  # metrics.loop_cpu_time: each loop callback's own CPU time too (latency.py)
    ledger: LedgerSettings = field(default_factory=LedgerSettings)
    counters: CounterSettings = field(default_factory=CounterSettings)
    accounting: AccountingSettings = field(default_factory=AccountingSettings)
    api_auth: ApiSettings = field(default_factory=ApiSettings)
    ratelimit: RlsSettings = field(default_factory=RlsSettings)  # Envoy RLS (issue 7)
    test_clock_file: str | None = None  # NEXUS_TEST_CLOCK_FILE: tests only (nexus_authz/testclock.py)
    policy: PolicySet = field(default_factory=PolicySet)


@dataclass(frozen=True, slots=True)
class CliEnvironment:
    """What the command line takes from the environment when its options do not say."""

    config: str | None  # NEXUS_CONFIG
    api_address: str | None  # NEXUS_API_ADDR
    admin_token: str | None  # NEXUS_ADMIN_TOKEN


def cli_environment(environ: Mapping[str, str] | None = None) -> CliEnvironment:
    """The command line's environment variables (empty counts as unset), read here like every other."""
    environ = os.environ if environ is None else environ
    return CliEnvironment(
        config=environ.get("NEXUS_CONFIG") or None,
        api_address=environ.get("NEXUS_API_ADDR") or None,
        admin_token=environ.get(DEFAULT_ADMIN_TOKEN_ENV) or None,
    )


def parse_host_port(text: str, *, what: str) -> HostPort:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"expected host:port, got {text!r}", field=what)
    host = host.strip("[]") or "127.0.0.1"
    return HostPort(host, int(port))


def load_settings(path: str, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the config file; every problem is a ConfigError naming file, line and field."""
    environ = os.environ if environ is None else environ
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", source=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file: {exc}", source=path) from None
    return parse_settings(text, path, environ)


def parse_settings(text: str, path: str, environ: Mapping[str, str]) -> Settings:
    root = Fields(load_yaml(text, path), path, "")
    base_dir = str(Path(path).resolve().parent)
    s = Settings(config_path=str(Path(path).resolve()), base_dir=base_dir)

    listen = root.mapping("listen")
    http_socket = listen.str("http_socket", DEFAULT_SOCKET) if listen.has("http_socket") else DEFAULT_SOCKET
    if listen.has("http_socket_mode"):
        mode_text = str(listen.raw("http_socket_mode"))
        try:
            socket_mode = int(mode_text, 8)
        except ValueError:
            listen.fail("http_socket_mode", f"expected an octal mode such as '0660', got {mode_text!r}")
    else:
        socket_mode = s.http_socket_mode
    http_tcp = _host_port(listen, "http_tcp", None)
    grpc = listen.str("grpc", s.grpc) if listen.has("grpc") else s.grpc
    if "grpc" in listen.names() and listen.raw("grpc", None) is None:
        grpc = None
    admin = _host_port(listen, "admin", s.admin)
    if "http_socket" in listen.names() and listen.raw("http_socket", None) is None:
        http_socket = None
    api_listen = listen.str("api", s.api) if listen.has("api") else s.api
    if "api" in listen.names() and listen.raw("api", None) is None:
        api_listen = None
    listen.done()

    limits = root.mapping("http")
    max_header_bytes = limits.int("max_header_bytes", s.max_header_bytes, minimum=1024)
    max_body_bytes = limits.int("max_body_bytes", s.max_body_bytes, minimum=0)
    idle_timeout = limits.duration("idle_timeout", s.idle_timeout, minimum=1.0)
    limits.done()

    keys = root.mapping("keys")
    keys_file = keys.str("file", s.keys_file)
    pepper = s.pepper
    if keys.has("pepper"):
        pepper_fields = keys.mapping("pepper")
        pepper = parse_secret_ref(pepper_fields, what="keys.pepper")
        pepper_fields.done()
    reload_interval = keys.duration("reload_interval", s.reload_interval, minimum=0.05)
    runtime_keys = keys.choice("runtime", ("auto", "sqlite", "redis", "none"), s.runtime_keys)
    runtime_keys_path = keys.str("runtime_path", s.runtime_keys_path)
    keys.done()

    logging_f = root.mapping("logging")
    log_level = logging_f.choice("level", LOG_LEVELS, s.log_level)
    log_format = logging_f.choice("format", ("json", "text"), s.log_format)
    logging_f.done()

    server = root.mapping("server")
    shutdown_grace = server.duration("shutdown_grace", s.shutdown_grace)
    server.done()

    metrics_f = root.mapping("metrics")
    loop_cpu_time = metrics_f.bool("loop_cpu_time", s.loop_cpu_time)
    metrics_f.done()

    cf = root.mapping("counters")
    backend = cf.choice("backend", ("memory", "redis"), "memory")
    redis_settings = parse_redis_settings(cf.mapping("redis")) if backend == "redis" else None
    if backend == "memory" and cf.has("redis"):
        cf.fail("redis", "set counters.backend: redis to use it")
    cf.done()
    counters = CounterSettings(backend=backend, redis=redis_settings)
    if runtime_keys == "redis" and backend != "redis":
        raise ConfigError(
            "runtime keys in Redis need counters.backend: redis (its connection is used)",
            source=path,
            field="keys.runtime",
        )

    lf = root.mapping("ledger")
    ld = LedgerSettings()
    ledger = LedgerSettings(
        backend=lf.choice("backend", ("sqlite", "memory", "none"), ld.backend),
        path=lf.str("path", ld.path),
        flush_interval=lf.duration("flush_interval", ld.flush_interval, minimum=0.01),
        batch_size=lf.int("batch_size", ld.batch_size, minimum=1),
        max_pending=lf.int("max_pending", ld.max_pending, minimum=1),
    )
    lf.done()

    af = root.mapping("accounting")
    ad = AccountingSettings()
    accounting = AccountingSettings(
        enabled=af.bool("enabled", ad.enabled),
        error_charge_tokens=af.int("error_charge_tokens", ad.error_charge_tokens, minimum=0),
        exact_cutoff_count=af.bool("exact_cutoff_count", ad.exact_cutoff_count),
        inject_include_usage=af.bool("inject_include_usage", ad.inject_include_usage),
    )
    af.done()

    apif = root.mapping("api")
    api_auth = ApiSettings()
    if apif.has("admin_token"):
        token_fields = apif.mapping("admin_token")
        api_auth = ApiSettings(
            admin_token=parse_secret_ref(token_fields, what="api.admin_token"), admin_token_configured=True
        )
        token_fields.done()
    apif.done()

    ratelimit = parse_rls_settings(root.mapping("ratelimit"))
    policy = parse_policy(root)
    if redis_settings is not None and redis_settings.cluster and policy.tenants:
        # A decision is one single-slot script call; a tenant's windows live in another slot than its keys'.
        root.fail("tenants", "tenant and group limits are not available with counters.redis.cluster: true")
    root.done()

    s = replace(
        s,
        http_socket=http_socket,
        http_socket_mode=socket_mode,
        http_tcp=http_tcp,
        grpc=grpc,
        admin=admin,
        max_header_bytes=max_header_bytes,
        max_body_bytes=max_body_bytes,
        idle_timeout=idle_timeout,
        keys_file=keys_file,
        pepper=pepper,
        reload_interval=reload_interval,
        runtime_keys=runtime_keys,
        runtime_keys_path=runtime_keys_path,
        log_level=log_level,
        log_format=log_format,
        shutdown_grace=shutdown_grace,
        loop_cpu_time=loop_cpu_time,
        ledger=ledger,
        counters=counters,
        accounting=accounting,
        ratelimit=ratelimit,
        api=api_listen,
        api_auth=api_auth,
        policy=policy,
    )
    return _apply_environment(s, environ)


def _host_port(f: Fields, name: str, default: HostPort | None) -> HostPort | None:
    if name in f.names() and f.raw(name, None) is None:
        return None
    if not f.has(name):
        return default
    text = f.str(name)
    try:
        return parse_host_port(text, what=f.path(name))
    except ConfigError as exc:
        f.fail(name, exc.detail)


def _apply_environment(s: Settings, environ: Mapping[str, str]) -> Settings:
    def opt(name: str) -> str | None:
        value = environ.get(name)
        return None if value is None else value.strip()

    changes: dict[str, object] = {}
    if (v := opt("NEXUS_HTTP_SOCKET")) is not None:
        changes["http_socket"] = v or None
    if (v := opt("NEXUS_HTTP_TCP")) is not None:
        changes["http_tcp"] = parse_host_port(v, what="NEXUS_HTTP_TCP") if v else None
    if (v := opt("NEXUS_GRPC_LISTEN")) is not None:
        changes["grpc"] = v or None
    if (v := opt("NEXUS_ADMIN_LISTEN")) is not None:
        changes["admin"] = parse_host_port(v, what="NEXUS_ADMIN_LISTEN") if v else None
    if (v := opt("NEXUS_API_LISTEN")) is not None:
        changes["api"] = v or None
    if v := opt("NEXUS_KEYS_FILE"):
        changes["keys_file"] = v
    if v := opt("NEXUS_LOG_LEVEL"):
        if v.lower() not in LOG_LEVELS:
            raise ConfigError(f"must be one of {', '.join(LOG_LEVELS)}; got {v!r}", field="NEXUS_LOG_LEVEL")
        changes["log_level"] = v.lower()
    if v := opt("NEXUS_TEST_CLOCK_FILE"):
        changes["test_clock_file"] = v
    return replace(s, **changes) if changes else s  # type: ignore[arg-type]


def resolve_path(s: Settings, path: str) -> str:
    return str(Path(s.base_dir, path)) if not os.path.isabs(path) else path


def resolve_credentials(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> dict[str, Credential]:
    """Every named provider credential with its value (ConfigError names the one that cannot resolve)."""
    return {
        name: credential_value(
            spec,
            resolve_secret(
                spec.secret, base_dir=settings.base_dir, what=f"credentials.{name}", environ=environ
            ),
        )
        for name, spec in settings.policy.credentials.items()
    }


def resolve_pepper(settings: Settings, environ: Mapping[str, str] | None = None) -> bytes:
    """The key-hash pepper (at least 16 characters), as bytes."""
    try:
        pepper = resolve_secret(
            settings.pepper, base_dir=settings.base_dir, what="keys.pepper", environ=environ
        )
    except ConfigError as exc:
        raise ConfigError(
            f"{exc.detail}; the key-hash pepper is required (generate one with `nexus-authz keys pepper`)",
            source=settings.config_path,
            field="keys.pepper",
        ) from None
    if len(pepper) < 16:
        raise ConfigError(
            "the key-hash pepper must be at least 16 characters",
            source=settings.config_path,
            field="keys.pepper",
        )
    return pepper.encode()


def redis_password(
    settings: RedisSettings, *, base_dir: str = ".", environ: Mapping[str, str] | None = None
) -> str | None:
    """Resolve `password_env` / `password_file` of a Redis store's settings (None: no password).
    Errors say where the password was looked for only."""
    environ = os.environ if environ is None else environ
    if settings.password_env is not None:
        value = environ.get(settings.password_env)
        if not value:
            raise ConfigError(
                f"environment variable {settings.password_env} is not set or empty",
                field="counters.redis.password_env",
            )
        return value
    if settings.password_file is not None:
        path = settings.password_file
        path = path if os.path.isabs(path) else os.path.join(base_dir, path)
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read {path}: {exc.strerror}", field="counters.redis.password_file"
            ) from None
        if not value:
            raise ConfigError(f"{path} is empty", field="counters.redis.password_file")
        return value
    return None


def resolve_secret(
    ref: SecretRef, *, base_dir: str, what: str, environ: Mapping[str, str] | None = None
) -> str:
    """The secret's value. Errors say where it was looked for, never what it is."""
    environ = os.environ if environ is None else environ
    if ref.value is not None:
        return ref.value
    if ref.env is not None:
        value = environ.get(ref.env)
        if not value:
            raise ConfigError(f"environment variable {ref.env} is not set or empty", field=what)
        return value
    assert ref.file is not None
    path = ref.file if os.path.isabs(ref.file) else os.path.join(base_dir, ref.file)
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror}", field=what) from None
    if not value:
        raise ConfigError(f"secret file {path} is empty", field=what)
    return value


MIN_TOKEN_LENGTH = 16
"""The shortest admin token the policy API accepts."""


def resolve_admin_token(settings: Settings, environ: Mapping[str, str] | None = None) -> str | None:
    """The admin token, or None when none is configured (the API then stays off).

    A token named in the config file (`api.admin_token`) must resolve, and every token must be at least
    MIN_TOKEN_LENGTH characters: ConfigError otherwise (the message never contains the value).
    """
    api = settings.api_auth
    try:
        token = resolve_secret(
            api.admin_token, base_dir=settings.base_dir, what="api.admin_token", environ=environ
        ).strip()
    except ConfigError:
        if api.admin_token_configured:
            raise
        return None
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(
            f"the admin token from {api.admin_token.describe()} must be at least {MIN_TOKEN_LENGTH} "
            "characters",
            source=settings.config_path,
            field="api.admin_token",
        )
    return token


# -- reloading the config file -------------------------------------------------------------------------------
#: Settings a running server cannot change without a restart (listeners are bound, stores opened, logging
#: set up), by attribute, with the config field that sets it. A reload keeps their running values.
RESTART_FIELDS: Mapping[str, str] = {
    "http_socket": "listen.http_socket",
    "http_socket_mode": "listen.http_socket_mode",
    "http_tcp": "listen.http_tcp",
    "grpc": "listen.grpc",
    "admin": "listen.admin",
    "api": "listen.api",
    "max_header_bytes": "http.max_header_bytes",
    "max_body_bytes": "http.max_body_bytes",
    "idle_timeout": "http.idle_timeout",
    "reload_interval": "keys.reload_interval",
    "runtime_keys": "keys.runtime",
    "runtime_keys_path": "keys.runtime_path",
    "log_level": "logging.level",
    "log_format": "logging.format",
    "shutdown_grace": "server.shutdown_grace",
    "loop_cpu_time": "metrics.loop_cpu_time",
    "ledger": "ledger",
    "counters": "counters",
    "accounting": "accounting",
    "api_auth": "api.admin_token",
    "ratelimit": "ratelimit",
}
#: The reloadable settings (every policy section, the key file and its pepper), by config field.
RELOADABLE_FIELDS: Mapping[str, str] = {
    "keys.file": "keys_file",
    "keys.pepper": "pepper",
    "credentials": "policy.credentials",
    "default_credential": "policy.default_credential",
    "plans": "policy.plans",
    "prices": "policy.prices",
    "unpriced": "policy.unpriced",
    "reservations.default_max_tokens": "policy.reservations.default_max_tokens",
    "shadow_mode": "policy.shadow_mode",
    "timezone": "policy.timezone",
    "auth_failures": "policy.auth_failures",
    "tenants": "policy.tenants",
    "rate_limit_headers": "policy.rate_limit_headers",
}


def _get(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _differences(name: str, old: object, new: object) -> list[str]:
    if old == new:
        return []
    names = getattr(old, "__dataclass_fields__", None)  # a section (ledger, counters...): which field
    if names is None or type(old) is not type(new) or "." in name:
        return [name]
    return [f for n in names for f in _differences(f"{name}.{n}", getattr(old, n), getattr(new, n))]


def reload_settings(running: Settings, new: Settings) -> tuple[Settings, tuple[str, ...], tuple[str, ...]]:
    """What a server running with `running` puts in force when its config file now says `new`.

    Returns (the settings to run with, the changed fields that need a restart and keep their running
    values, the changed fields that take effect). Policy sections, `keys.file` and `keys.pepper` reload;
    listeners, stores, logging and the other server settings need a restart (RESTART_FIELDS), as do
    `reservations.ttl` and `reservations.max_pending` (the reservation book is sized at start)."""
    restart: list[str] = []
    for attr, name in RESTART_FIELDS.items():
        restart += _differences(name, getattr(running, attr), getattr(new, attr))
    old_res, new_res = running.policy.reservations, new.policy.reservations
    for name in ("ttl", "max_pending"):
        if getattr(old_res, name) != getattr(new_res, name):
            restart.append(f"reservations.{name}")
    reservations = replace(new_res, ttl=old_res.ttl, max_pending=old_res.max_pending)
    merged = replace(
        running,
        keys_file=new.keys_file,
        pepper=new.pepper,
        policy=replace(new.policy, reservations=reservations),
    )
    changed = tuple(
        name for name, attr in RELOADABLE_FIELDS.items() if _get(running, attr) != _get(merged, attr)
    )
    return merged, tuple(restart), changed
