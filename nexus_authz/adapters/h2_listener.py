"""The check listeners' connections before and beside HTTP/1.1: each connection's first bytes say which
protocol it speaks (`Sniffer`), and what every HTTP/2 connection (als_h2.H2Connection) shares
(`H2Receiver`): the access-log service, the Authorization service, the engine, the open connections."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Final

from nexus_authz.adapters import h2_frames as h2
from nexus_authz.adapters.als_h2 import PREFACE, H2Connection
from nexus_authz.adapters.envoy_als import MAX_MESSAGE_BYTES, AccessLogService
from nexus_authz.adapters.envoy_authz import AuthorizationService
from nexus_authz.engine import Engine

__all__ = ["CLOSE_GRACE", "H2Receiver", "Sniffer"]

#: On shutdown, how long a connection's open streams may take to end before it is closed anyway.
CLOSE_GRACE: Final = 5.0


class H2Receiver:
    """What every HTTP/2 connection of the check listeners shares: the access-log service, the engine
    (for slot releases), the Authorization service and the open connections (ended on shutdown, after
    the access log's drain). `max_check_bytes`: the largest CheckRequest taken (as the gRPC port's)."""

    __slots__ = ("als", "check_limit", "checks", "closing", "connections", "engine", "undecided")

    def __init__(
        self,
        als: AccessLogService,
        engine: Engine,
        checks: AuthorizationService | None = None,
        *,
        max_check_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.als = als
        self.engine = engine
        self.checks = checks if checks is not None else AuthorizationService(engine)
        self.check_limit = max_check_bytes
        self.connections: set[H2Connection] = set()
        self.undecided: set[Sniffer] = set()  # connections that have not yet said which protocol
        self.closing = False

    def factory(self, make_http: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """The protocol factory of a check listener whose HTTP/1.1 protocol `make_http` makes: each
        connection starts as a `Sniffer` (see there)."""
        return lambda: Sniffer(make_http, self)

    def close(self) -> None:
        """Shut down (call after `AccessLogService.drain`, which stopped the access-log streams): each
        connection ends its open streams (new ones are refused), then says GOAWAY and closes; after
        CLOSE_GRACE seconds it closes anyway."""
        self.closing = True
        for sniffer in list(self.undecided):  # nothing asked yet: nothing to answer
            sniffer.close()
        for conn in list(self.connections):
            if conn._streams:
                loop = asyncio.get_running_loop()
                loop.call_later(CLOSE_GRACE, functools.partial(conn.goaway, h2.NO_ERROR, close=True))
            else:
                conn.goaway(h2.NO_ERROR, close=True)


class Sniffer(asyncio.Protocol):
    """A check listener's connection until its first bytes say which protocol it speaks: HTTP/2's
    preface goes to `H2Connection` (the access log), anything else to the HTTP/1.1 protocol
    (`make_http`). One object per connection, before its first request; nothing per request."""

    __slots__ = ("_buffer", "_make_http", "_receiver", "_transport")

    def __init__(self, make_http: Callable[[], asyncio.Protocol], receiver: H2Receiver) -> None:
        self._make_http = make_http
        self._receiver = receiver
        self._transport: asyncio.Transport | None = None
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._receiver.undecided.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._receiver.undecided.discard(self)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        data = self._buffer + data if self._buffer else data
        if len(data) < len(PREFACE) and PREFACE.startswith(data):
            self._buffer = data  # not yet enough to tell
            return
        self._buffer = b""
        self._receiver.undecided.discard(self)
        # HTTP/2's request line is no HTTP/1.1 request: a wrong rest of the preface is answered with GOAWAY
        h2c = data.startswith(PREFACE[:16])
        protocol = H2Connection(self._receiver) if h2c else self._make_http()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(data)

    def eof_received(self) -> bool:
        return False
