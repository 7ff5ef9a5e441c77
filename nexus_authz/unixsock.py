"""Taking a Unix socket path without taking it from a live server, and giving back only our own.

Binding a Unix socket needs the path to be free, so a socket file left by a crashed run has to be
removed first; asyncio (and uvloop) remove *any* socket file at the path, including the one a running
`nexus-authz serve` is answering on: a second `serve` started by mistake would silently cut the first off
from its proxy. So the path is bound here, not by the event loop: a socket file at the path is removed
only when connecting to it is refused (nobody listens: a stale file); one that accepts is left alone and
the bind fails with `UnixSocketInUse`. On shutdown, the path is unlinked only while it is still the file
this process bound (same device and inode), never a newer server's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

__all__ = ["UnixSocketError", "UnixSocketInUse", "bind_unix", "identity", "unlink_if_ours"]

#: How long to wait for a live server to accept the probe connection (a full backlog blocks it).
PROBE_TIMEOUT = 1.0


class UnixSocketError(Exception):
    """The path cannot be taken; the message says why and what to do."""


class UnixSocketInUse(UnixSocketError):
    """A process accepts connections on the socket at the path."""


def bind_unix(path: str) -> socket.socket:
    """A stream socket bound to `path` (not yet listening), replacing only a stale socket file."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            _remove_if_stale(path)
            sock.bind(path)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_if_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return  # gone meanwhile: the retried bind takes it
    if not stat.S_ISSOCK(mode):
        raise UnixSocketError(
            f"{path} exists and is not a socket; not replacing it (remove it, or use another path)"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # nobody listens: left by a process that is gone
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except FileNotFoundError:
        return
    except TimeoutError:
        pass  # a listener whose backlog is full: alive
    finally:
        probe.close()
    raise UnixSocketInUse(
        f"another process is serving on {path} (a second `nexus-authz serve`?); it was left alone: "
        "stop that process first, or give this one another listen.http_socket"
    )


def identity(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at path, None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def unlink_if_ours(path: str, ours: tuple[int, int] | None) -> bool:
    """Unlink path only while it is still the socket file we bound; True when it was removed."""
    if ours is None or identity(path) != ours:
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True
