"""Rendering of the Envoy configs in ``envoy/`` for a concrete set of addresses.

The YAML files in ``envoy/`` are the documented, validated source of truth; the demo, the tests and the
benchmarks need the same configs on other ports and socket paths. ``render()`` edits the parsed document
structurally, finding the listener, clusters and filters by name, so a comment or a reordering in the YAML
can never make a substitution silently miss, and a renamed listener or cluster fails loudly instead.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from nexus_authz.core.keys import KEY_HEADERS

__all__ = [
    "ADMIN",
    "ALS_CLUSTER",
    "AUTHZ_CLUSTER",
    "AUTHZ_GRPC_CLUSTER",
    "EnvoyConfigError",
    "ENVOY_DIR",
    "EXT_AUTHZ_FILTER",
    "LISTENER",
    "LUA_FILTER",
    "UPSTREAM_CLUSTER",
    "Address",
    "load",
    "render",
]

#: Names the configs in ``envoy/`` use; render() finds things by these.
LISTENER = "ingress"
AUTHZ_CLUSTER = "nexus_authz"
AUTHZ_GRPC_CLUSTER = "nexus_authz_grpc"
EXTPROC_CLUSTER = "nexus_extproc"
ALS_CLUSTER = "nexus_als"  # token accounting's gRPC access-log stream (Lua usage tap + ALS)
UPSTREAM_CLUSTER = "llm_upstream"
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
LUA_FILTER = "envoy.filters.http.lua"
#: Where the shipped configs and the Lua sources they name live (a source checkout's ``envoy/``).
ENVOY_DIR = Path(__file__).resolve().parents[2] / "envoy"
ADMIN = "admin"
#: The system's CA bundle (Debian/Ubuntu, and what the image has): an https upstream is validated against it.
SYSTEM_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"
#: The shipped config of each ext_authz mode.
TEMPLATES = {"http": "envoy.yaml", "grpc": "envoy-grpc.yaml"}
_HCM_FILTER = "envoy.filters.network.http_connection_manager"
_LUA_TYPE = "/envoy.extensions.filters.http.lua.v3.Lua"
_WITH_MATCHER = "/envoy.extensions.common.matching.v3.ExtensionWithMatcher"

#: An address: ``"/path/to.sock"`` or ``"unix:/path"`` (a Unix socket), ``"host:port"``,
#: ``"http://host[:port]"``/``"https://host[:port]"``, ``("host", port)`` or a bare port (127.0.0.1).
Address = str | tuple[str, int] | int


class EnvoyConfigError(ValueError):
    """The config lacks something render() was asked to change, or an argument is malformed."""


def load(path_or_text: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a config given as a path or as YAML text.

    A ``Path`` is always read; a ``str`` containing a newline is YAML text, any other ``str`` a path.
    """
    if isinstance(path_or_text, os.PathLike) or "\n" not in path_or_text:
        text = Path(path_or_text).read_text(encoding="utf-8")
    else:
        text = path_or_text
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict):
        raise EnvoyConfigError("Envoy config is not a YAML mapping")
    return doc


def render(
    path_or_text: str | os.PathLike[str],
    *,
    listen_port: int | None = None,
    listen_host: str | None = None,
    admin_port: int | None = None,
    upstream: Address | None = None,
    authz_socket: Address | None = None,
    authz_grpc: Address | None = None,
    extproc: Address | None = None,
    als: Address | None = None,
    clusters: Mapping[str, Address] | None = None,
    failure_mode_allow: bool | None = None,
    authz_timeout: float | None = None,
    ca_file: str = SYSTEM_CA_FILE,
    credential_headers: tuple[str, ...] = (),
) -> str:
    """Return the config as YAML text with the named addresses and settings changed.

    ``listen_port``/``listen_host`` edit listener ``ingress``; ``admin_port`` the admin address;
    ``upstream`` cluster ``llm_upstream`` (an ``https://`` URL also adds TLS with SNI and a DNS cluster
    type for a host name); ``authz_socket`` cluster ``nexus_authz`` (a socket path or host:port);
    ``authz_grpc`` cluster ``nexus_authz_grpc``; ``extproc`` cluster ``nexus_extproc`` and ``als``
    cluster ``nexus_als`` (token accounting over ext_proc, or over the Lua usage tap and the gRPC access
    log: nexus-authz's gRPC address); ``clusters`` any other cluster by name (later filters:
    ext_proc, ratelimit). An ``https://`` address is validated against ``ca_file`` (the system's CA
    bundle by default), with SNI and the certificate's name taken from the host. ``failure_mode_allow``
    and ``authz_timeout`` (seconds) edit every ext_authz
    filter of the listener. Anything asked for that the config lacks raises EnvoyConfigError naming it.

    Every HTTP-service ext_authz filter of the listener lets nexus-authz set every header a client key
    can arrive in (``authorization``, ``x-api-key``, ``api-key``) and the ``credential_headers`` given
    (the ``credentials.X.header`` of nexus-authz's config) on the upstream request: Envoy silently drops
    a header its ``allowed_upstream_headers`` does not name, and the client's own key would then go
    upstream in place of the credential (issue 13.5). The gRPC ext_authz applies nexus's headers as sent.

    Lua filters whose source is a relative ``filename`` (``envoy.yaml`` names ``nexus-usage.lua``, which
    Envoy would resolve against its working directory) get the file's text inlined, read next to the
    config file (next to ``envoy/`` when the config is given as text), so the rendered config runs from
    anywhere.
    """
    doc = load(path_or_text)
    is_path = isinstance(path_or_text, os.PathLike) or "\n" not in path_or_text
    _inline_lua_sources(doc, Path(path_or_text).resolve().parent if is_path else ENVOY_DIR)
    if listen_port is not None or listen_host is not None:
        sock = _socket_address(_listener(doc, LISTENER).get("address"), f"listener {LISTENER!r}")
        if listen_host is not None:
            sock["address"] = listen_host
        if listen_port is not None:
            sock["port_value"] = _port(listen_port)
    if admin_port is not None:
        admin = doc.get("admin")
        if not isinstance(admin, dict):
            raise EnvoyConfigError("Envoy config has no 'admin' section")
        _socket_address(admin.get("address"), "admin")["port_value"] = _port(admin_port)
    edits: dict[str, Address] = {}
    if upstream is not None:
        edits[UPSTREAM_CLUSTER] = upstream
    if authz_socket is not None:
        edits[AUTHZ_CLUSTER] = authz_socket
    if authz_grpc is not None:
        edits[AUTHZ_GRPC_CLUSTER] = authz_grpc
    if extproc is not None:
        edits[EXTPROC_CLUSTER] = extproc
    if als is not None:
        edits[ALS_CLUSTER] = als
    edits.update(clusters or {})
    for name, address in edits.items():
        _set_cluster_address(_cluster(doc, name), name, address, ca_file)
    for cfg in _http_filters(doc, EXT_AUTHZ_FILTER):
        _allow_upstream_headers(cfg, (*KEY_HEADERS, *credential_headers))
    if failure_mode_allow is not None or authz_timeout is not None:
        filters = list(_http_filters(doc, EXT_AUTHZ_FILTER))
        if not filters:
            raise EnvoyConfigError(f"listener {LISTENER!r} has no {EXT_AUTHZ_FILTER} filter")
        for cfg in filters:
            if failure_mode_allow is not None:
                cfg["failure_mode_allow"] = failure_mode_allow
            if authz_timeout is not None:
                _set_authz_timeout(cfg, authz_timeout)
    text: str = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    return text


# --- finding things by name ---------------------------------------------------------------------------


def _named(items: object, name: str, what: str) -> dict[str, Any]:
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict) and item.get("name") == name:
                return item
    raise EnvoyConfigError(f"Envoy config has no {what} named {name!r}")


def _listener(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return _named(doc.get("static_resources", {}).get("listeners"), name, "listener")


def _cluster(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return _named(doc.get("static_resources", {}).get("clusters"), name, "cluster")


def _ingress_http_filters(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Yield each HTTP filter entry (name, typed_config) of listener ``ingress``'s connection managers."""
    for chain in _listener(doc, LISTENER).get("filter_chains") or []:
        for net_filter in chain.get("filters") or []:
            if net_filter.get("name") != _HCM_FILTER:
                continue
            yield from net_filter.get("typed_config", {}).get("http_filters") or []


def _http_filters(doc: dict[str, Any], filter_name: str) -> Iterator[dict[str, Any]]:
    """Yield the typed_config of each HTTP filter called filter_name in listener ``ingress``."""
    for http_filter in _ingress_http_filters(doc):
        typed_config = http_filter.get("typed_config")
        if http_filter.get("name") == filter_name and isinstance(typed_config, dict):
            yield typed_config


def _socket_address(address: object, what: str) -> dict[str, Any]:
    sock = address.get("socket_address") if isinstance(address, dict) else None
    if isinstance(sock, dict):
        return sock
    raise EnvoyConfigError(f"{what} has no socket_address to change")


# --- edits ----------------------------------------------------------------------------------------------


def _port(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise EnvoyConfigError(f"invalid port {value!r}")
    return value


def _parse_address(address: Address) -> tuple[dict[str, Any], str | None]:
    """Return (Envoy address, TLS server name or None)."""
    if isinstance(address, int):
        return {"socket_address": {"address": "127.0.0.1", "port_value": _port(address)}}, None
    if isinstance(address, tuple):
        host, port = address
        return {"socket_address": {"address": host, "port_value": _port(port)}}, None
    if address.startswith("unix:"):
        address = address[len("unix:") :]
        if not address:
            raise EnvoyConfigError("empty Unix socket path")
        return {"pipe": {"path": address}}, None
    if address.startswith("/"):
        return {"pipe": {"path": address}}, None
    if "://" in address:
        url = urlsplit(address)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise EnvoyConfigError(f"invalid upstream URL {address!r}")
        tls = url.scheme == "https"
        port = url.port or (443 if tls else 80)
        sock = {"socket_address": {"address": url.hostname, "port_value": port}}
        return sock, (url.hostname if tls else None)
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise EnvoyConfigError(f"invalid address {address!r}: expected host:port, a URL or a socket path")
    return {"socket_address": {"address": host.strip("[]"), "port_value": _port(int(port_text))}}, None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _set_cluster_address(
    cluster: dict[str, Any], name: str, address: Address, ca_file: str = SYSTEM_CA_FILE
) -> None:
    envoy_address, sni = _parse_address(address)
    cluster["load_assignment"] = {
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": envoy_address}}]}],
    }
    host = envoy_address.get("socket_address", {}).get("address")
    if host is None or _is_ip(host):
        cluster["type"] = "STATIC"
        cluster.pop("dns_lookup_family", None)
    else:
        # One logical host behind DNS (the pattern Envoy recommends for large web APIs).
        cluster["type"] = "LOGICAL_DNS"
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if sni is not None:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": sni,
                "common_tls_context": {"validation_context": {"trusted_ca": {"filename": ca_file}}},
            },
        }
        # SNI from the request's (rewritten) host, and the certificate checked against that name.
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "upstream_http_protocol_options": {"auto_sni": True, "auto_san_validation": True},
                "explicit_http_config": {"http_protocol_options": {}},
            }
        }
    elif isinstance(address, str) and address.startswith("http://"):
        # Only an explicit scheme decides TLS; other address forms keep what the config says.
        cluster.pop("transport_socket", None)


def _lua_configs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every Lua filter's typed_config in listener ``ingress``: the filter named LUA_FILTER, and a Lua
    filter wrapped in an ExtensionWithMatcher (envoy.yaml's ``nexus-clamp``, run only when it applies)."""
    for http_filter in _ingress_http_filters(doc):
        cfg = http_filter.get("typed_config")
        if not isinstance(cfg, dict):
            continue
        if cfg.get("@type", "").endswith(_WITH_MATCHER):
            inner = cfg.get("extension_config")
            cfg = inner.get("typed_config") if isinstance(inner, dict) else None
            if not isinstance(cfg, dict):
                continue
        if cfg.get("@type", "").endswith(_LUA_TYPE) or http_filter.get("name") == LUA_FILTER:
            yield cfg


def _inline_lua_sources(doc: dict[str, Any], base: Path) -> None:
    for cfg in _lua_configs(doc):
        sources = [cfg.get("default_source_code")]
        named = cfg.get("source_codes")
        if isinstance(named, dict):
            sources.extend(named.values())
        for source in sources:
            if not isinstance(source, dict) or not isinstance(source.get("filename"), str):
                continue
            name = source["filename"]
            if Path(name).is_absolute():
                continue
            try:
                text = (base / name).read_text(encoding="utf-8")
            except OSError as exc:
                raise EnvoyConfigError(
                    f"Lua source {name!r} not found next to the config ({base}): {exc}"
                ) from None
            source.pop("filename")
            source["inline_string"] = text


def _allow_upstream_headers(cfg: dict[str, Any], names: tuple[str, ...]) -> None:
    service = cfg.get("http_service")
    if not isinstance(service, dict):
        return
    response = service.setdefault("authorization_response", {})
    allowed = response.setdefault("allowed_upstream_headers", {})
    patterns = allowed.setdefault("patterns", [])
    if not isinstance(patterns, list):
        raise EnvoyConfigError(f"{EXT_AUTHZ_FILTER}: allowed_upstream_headers.patterns is not a list")
    present = {p.get("exact", "").lower() for p in patterns if isinstance(p, dict)}
    for name in names:
        name = name.lower()
        if name not in present:
            patterns.append({"exact": name})
            present.add(name)


def _set_authz_timeout(cfg: dict[str, Any], seconds: float) -> None:
    if seconds <= 0:
        raise EnvoyConfigError(f"invalid ext_authz timeout {seconds!r}")
    text = f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    if isinstance(cfg.get("http_service"), dict):
        cfg["http_service"].setdefault("server_uri", {})["timeout"] = text
    elif isinstance(cfg.get("grpc_service"), dict):
        cfg["grpc_service"]["timeout"] = text
    else:
        raise EnvoyConfigError(f"{EXT_AUTHZ_FILTER} filter has neither http_service nor grpc_service")
