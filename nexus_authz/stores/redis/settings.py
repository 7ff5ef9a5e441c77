"""`counters.redis`: the settings of the Redis counter store, their validation, and the client.

The password is given by reference only (`password_env` / `password_file`) and resolved by
`redis_password`; a url never carries one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from nexus_authz.core.yamlsrc import Fields

__all__ = [
    "FAILURE_MODES",
    "MODES",
    "RedisSettings",
    "TlsFiles",
    "make_client",
    "parse_redis_settings",
]

MODES: Final = ("exact", "batched")
FAILURE_MODES: Final = ("fail_open", "fail_closed")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """The `counters.redis` section of nexus.yaml. Durations in seconds. Secrets by reference only."""

    url: str = "redis://127.0.0.1:6379/0"
    password_env: str | None = None
    password_file: str | None = None
    tls: TlsFiles = field(default_factory=TlsFiles)
    key_prefix: str = "nexus:"
    cluster: bool = False
    mode: str = "exact"
    timeout: float = 0.05
    flush_interval: float = 0.1
    max_queue: int = 100_000
    failure_mode: str = "fail_open"
    breaker_failures: int = 5
    breaker_reset: float = 2.0

    @property
    def fail_open(self) -> bool:
        return self.failure_mode == "fail_open"

    @property
    def staleness(self) -> float:
        """How old a batched replica's view of a counter may be before it pulls it again."""
        return 2 * self.flush_interval + self.timeout


def parse_redis_settings(f: Fields) -> RedisSettings:
    """Read and validate `counters.redis`; errors name the file, line and field."""
    d = RedisSettings()
    url = f.str("url", d.url)
    _check_url(f, url)
    password_env = f.str("password_env", None)
    password_file = f.str("password_file", None)
    if password_env is not None and password_file is not None:
        f.fail("password_file", "give either password_env or password_file, not both")
    if f.has("password"):
        f.fail("password", "passwords are never inline: use password_env or password_file")
    tls = TlsFiles()
    if f.has("tls"):
        t = f.mapping("tls")
        tls = TlsFiles(
            ca_file=t.str("ca_file", None),
            cert_file=t.str("cert_file", None),
            key_file=t.str("key_file", None),
        )
        t.done()
        if (tls.cert_file is None) != (tls.key_file is None):
            t.fail("key_file" if tls.key_file is None else "cert_file", "cert_file and key_file go together")
        if not url.startswith("rediss://"):
            f.fail("tls", "TLS options need a rediss:// url")
    key_prefix = str(f.raw("key_prefix", d.key_prefix))
    if "{" in key_prefix or "}" in key_prefix or len(key_prefix) > 64:
        f.fail("key_prefix", "at most 64 characters, without { or } (they are Redis Cluster hash tags)")
    cluster = f.bool("cluster", d.cluster)
    if cluster and url.startswith("unix:"):
        f.fail("cluster", "a Redis Cluster is reached over TCP (redis:// or rediss://)")
    if cluster and urlsplit(url).path.strip("/") not in ("", "0"):
        f.fail("url", "a Redis Cluster has only database 0")
    mode = f.choice("mode", MODES, d.mode)
    timeout = f.duration("timeout", d.timeout, minimum=0.001)
    if timeout > 10:
        f.fail("timeout", "at most 10s: the timeout bounds every check that waits for Redis")
    flush_interval = f.duration("flush_interval", d.flush_interval, minimum=0.001)
    max_queue = f.int("max_queue", d.max_queue, minimum=1)
    failure_mode = f.choice("failure_mode", FAILURE_MODES, d.failure_mode)
    failures, reset = d.breaker_failures, d.breaker_reset
    if f.has("breaker"):
        b = f.mapping("breaker")
        failures = b.int("failures", failures, minimum=1)
        reset = b.duration("reset", reset, minimum=0.01)
        b.done()
    f.done()
    return RedisSettings(
        url=url,
        password_env=password_env,
        password_file=password_file,
        tls=tls,
        key_prefix=key_prefix,
        cluster=cluster,
        mode=mode,
        timeout=timeout,
        flush_interval=flush_interval,
        max_queue=max_queue,
        failure_mode=failure_mode,
        breaker_failures=failures,
        breaker_reset=reset,
    )


def _check_url(f: Fields, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        f.fail("url", f"expected redis://, rediss:// or unix://, got {url!r}")
    if parts.password is not None:
        f.fail("url", "the url must not carry a password: use password_env or password_file")
    if parts.scheme == "unix":
        if not parts.path:
            f.fail("url", "a unix:// url needs a socket path")
        return
    if not parts.hostname:
        f.fail("url", f"the url needs a host, got {url!r}")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        f.fail("url", f"invalid port in {url!r}")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        f.fail("url", f"the path is a database number, got {db!r}")


def _resolve(base_dir: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base_dir, path)


def make_client(settings: RedisSettings, *, password: str | None = None, base_dir: str = ".") -> Any:
    """A redis-py asyncio client (RedisCluster when `cluster`), with no retries of its own: the store's
    timeout and breaker decide what a failure means."""
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    kwargs: dict[str, Any] = {
        "socket_timeout": max(settings.timeout * 4, 0.5),
        "socket_connect_timeout": settings.timeout * 4,
        "retry": Retry(NoBackoff(), 0),
        "password": password,
    }
    tls = settings.tls
    if settings.url.startswith("rediss://"):
        if tls.ca_file:
            kwargs["ssl_ca_certs"] = _resolve(base_dir, tls.ca_file)
        if tls.cert_file:
            kwargs["ssl_certfile"] = _resolve(base_dir, tls.cert_file)
        if tls.key_file:
            kwargs["ssl_keyfile"] = _resolve(base_dir, tls.key_file)
    if settings.cluster:
        return RedisCluster.from_url(settings.url, **kwargs)
    return Redis.from_url(settings.url, **kwargs)
