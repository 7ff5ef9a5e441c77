"""Rendering of ``deploy/nginx/nginx.conf`` for a concrete set of addresses and paths.

The file in ``deploy/nginx/`` is the documented, tested example; the end-to-end tests (and anyone with
another layout) need it on other ports, socket paths and writable directories. Like ``render.envoy``,
``render()`` changes directives found by name, never by a blind text replace: the ``server`` of the
upstream blocks ``nexus_authz`` and ``llm_upstream``, the one ``listen`` directive, and the main-level
``worker_processes``/``pid``/``error_log``, the ``access_log`` and the ``*_temp_path`` directives. Each
must occur exactly once (commented-out lines do not count), so a renamed block or a second ``listen``
fails loudly instead of being silently missed.

From the command line: ``python -m nexus_authz.render.nginx deploy/nginx/nginx.conf --listen 8080
--authz /tmp/nexus-authz/authz.sock --upstream 127.0.0.1:8000 --runtime-dir /tmp/nginx-nexus`` prints it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "AUTHZ_UPSTREAM",
    "LLM_UPSTREAM",
    "TEMP_PATHS",
    "NginxConfigError",
    "main",
    "render",
]

#: Names the config in ``deploy/nginx/`` uses; render() finds things by these.
AUTHZ_UPSTREAM = "nexus_authz"
LLM_UPSTREAM = "llm_upstream"
TEMP_PATHS = (
    "client_body_temp_path",
    "proxy_temp_path",
    "fastcgi_temp_path",
    "uwsgi_temp_path",
    "scgi_temp_path",
)

_SAFE_VALUE = re.compile(r"[^\s;{}'\"\\#$]+")


class NginxConfigError(ValueError):
    """The config lacks something render() was asked to change, or an argument is malformed."""


@dataclass(frozen=True, slots=True)
class _Edit:
    pattern: re.Pattern[str]
    what: str
    value: str


def render(
    path_or_text: str | os.PathLike[str],
    *,
    listen: str | int | None = None,
    authz: str | None = None,
    upstream: str | None = None,
    runtime_dir: str | os.PathLike[str] | None = None,
    worker_processes: int | None = None,
    access_log: str | None = None,
) -> str:
    """Return the config text with the named directives changed.

    ``listen``: the server's listen address (``"127.0.0.1:8080"``, or a port for 127.0.0.1).
    ``authz``: nexus-authz's fast path, a Unix socket path (``/run/nexus-authz/authz.sock`` or
    ``unix:/...``) or ``host:port``. ``upstream``: the LLM provider, ``host:port``.
    ``runtime_dir``: a writable directory for the pid file and the temp paths (they go to
    ``<runtime_dir>/nginx.pid`` and ``<runtime_dir>/<kind>_temp``): what an unprivileged or test nginx needs.
    ``access_log``: a path, or ``"off"``. A ``Path`` is read; a ``str`` with a newline is the config text.
    """
    if isinstance(path_or_text, os.PathLike) or "\n" not in path_or_text:
        text = Path(path_or_text).read_text(encoding="utf-8")
    else:
        text = path_or_text
    edits: list[_Edit] = []
    if listen is not None:
        edits.append(_Edit(_directive("listen"), "the listen directive", _listen_value(listen)))
    if authz is not None:
        edits.append(_upstream_edit(AUTHZ_UPSTREAM, _server_value(authz, allow_unix=True)))
    if upstream is not None:
        edits.append(_upstream_edit(LLM_UPSTREAM, _server_value(upstream, allow_unix=False)))
    if worker_processes is not None:
        if isinstance(worker_processes, bool) or worker_processes < 1:
            raise NginxConfigError(f"invalid worker_processes {worker_processes!r}")
        edits.append(_Edit(_directive("worker_processes"), "worker_processes", str(worker_processes)))
    if runtime_dir is not None:
        base = Path(runtime_dir)
        edits.append(_Edit(_directive("pid"), "the pid directive", _path(base / "nginx.pid")))
        for name in TEMP_PATHS:
            edits.append(_Edit(_directive(name), name, _path(base / name.removesuffix("_path"))))
    if access_log is not None:
        edits.append(_Edit(_directive("access_log"), "access_log", _path(access_log)))
    for edit in edits:
        text = _apply(text, edit)
    return text


def _directive(name: str) -> re.Pattern[str]:
    # The directive at the start of a line (after indentation), its arguments up to the semicolon.
    return re.compile(rf"^(?P<head>[ \t]*{re.escape(name)}[ \t]+)(?P<value>[^;#\n]+)(?P<tail>;)", re.M)


def _upstream_edit(block: str, value: str) -> _Edit:
    # `server ...;` inside `upstream <block> { ... }` (upstream blocks hold no nested braces).
    pattern = re.compile(
        rf"(?P<head>^[ \t]*upstream[ \t]+{re.escape(block)}[ \t]*\{{[^{{}}]*?^[ \t]*server[ \t]+)"
        r"(?P<value>[^;#\n]+)(?P<tail>;)",
        re.M | re.S,
    )
    return _Edit(pattern, f"a server in upstream {block!r}", value)


def _apply(text: str, edit: _Edit) -> str:
    matches = list(edit.pattern.finditer(text))
    if len(matches) != 1:
        found = "no" if not matches else f"{len(matches)}"
        raise NginxConfigError(f"nginx config has {found} {edit.what} (expected exactly one)")
    m = matches[0]
    return text[: m.start("value")] + edit.value + text[m.end("value") :]


def _check(value: str, what: str) -> str:
    if not _SAFE_VALUE.fullmatch(value):
        raise NginxConfigError(f"invalid {what} {value!r}: no spaces, quotes, ';', '{{', '}}', '#' or '$'")
    return value


def _path(value: str | os.PathLike[str]) -> str:
    return _check(os.fspath(value), "path")


def _listen_value(listen: str | int) -> str:
    if isinstance(listen, int) and not isinstance(listen, bool):
        if not 0 < listen < 65536:
            raise NginxConfigError(f"invalid port {listen!r}")
        return f"127.0.0.1:{listen}"
    if isinstance(listen, str):
        return _check(listen, "listen address")
    raise NginxConfigError(f"invalid listen address {listen!r}")


def _server_value(address: str, *, allow_unix: bool) -> str:
    if address.startswith("unix:"):
        address = address[len("unix:") :]
    if address.startswith("/"):
        if not allow_unix:
            raise NginxConfigError(f"invalid upstream address {address!r}: expected host:port")
        return "unix:" + _path(address)
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise NginxConfigError(f"invalid address {address!r}: expected host:port or a socket path")
    return _check(address, "address")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nexus_authz.render.nginx", description="Print an nginx config with addresses changed."
    )
    parser.add_argument("config", help="the config to start from, e.g. deploy/nginx/nginx.conf")
    parser.add_argument("--listen", help="listen address (host:port, or a port on 127.0.0.1)")
    parser.add_argument("--authz", help="nexus-authz's fast path: a Unix socket path or host:port")
    parser.add_argument("--upstream", help="the LLM upstream, host:port")
    parser.add_argument("--runtime-dir", help="writable directory for the pid file and temp paths")
    parser.add_argument("--worker-processes", type=int)
    parser.add_argument("--access-log", help="a path, or 'off'")
    args = parser.parse_args(argv)
    listen_arg: str | None = args.listen
    listen: str | int | None = int(listen_arg) if listen_arg and listen_arg.isdigit() else listen_arg
    try:
        text = render(
            Path(args.config),
            listen=listen,
            authz=args.authz,
            upstream=args.upstream,
            runtime_dir=args.runtime_dir,
            worker_processes=args.worker_processes,
            access_log=args.access_log,
        )
    except (NginxConfigError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
