"""The ext_authz / auth_request protocol with its HTTP/1.1 framing compiled (nexus_authz/native/_http1).

`CompiledAuthzProtocol` is `http_authz.AuthzProtocol` with another `data_received`: the compiled parser
scans each read and hands every complete request straight to the shared `on_message_complete` (routing,
decision and answer are the httptools protocol's own code), with no Python call per header. A request it
does not take (anything outside the subset Envoy and nginx send, or over a limit) is replayed, from its
first byte and with the same read boundaries, through the httptools parser of the same protocol, which
answers it as it always has; the connection comes back to the compiled parser between requests. So both
protocols write the same bytes for any byte stream, however it is split (tests/adapters/test_http_native.py).
"""

from __future__ import annotations

from typing import Any

from nexus_authz import native
from nexus_authz.adapters import http_fast
from nexus_authz.adapters.http_authz import (
    _BUSY,
    _INTERNAL_ERROR,
    _KEEP,
    EXT_AUTHZ_PREFIX,
    MAX_HEADERS,
    MAX_URL,
    AuthzProtocol,
    HttpApp,
    log,
)
from nexus_authz.stores.memory import MemoryCounterStore


class CompiledAuthzProtocol(AuthzProtocol):
    __slots__ = ("_fast", "_slow")

    # The common ext_authz check decided in one compiled call (native/_fast.pyx; adapters/http_fast.py is
    # its pure twin); False: every request through AuthzProtocol's reference path (the differential tests
    # compare them).
    fast_path = True
    on_message_complete = (
        native.fast.install(
            AuthzProtocol.on_message_complete,
            _INTERNAL_ERROR,
            log,
            MemoryCounterStore,
            EXT_AUTHZ_PREFIX,
            http_fast.allow_answer,
            http_fast.plan_wire,
        )
        if native.fast is not None
        else http_fast.on_message_complete
    )

    _nginx = http_fast.nginx  # nginx's subrequest of a POST: Decider.check_plain first

    def __init__(self, app: HttpApp) -> None:
        super().__init__(app)
        self._slow = self._parser  # httptools: the requests the compiled parser does not take
        assert native.http1 is not None
        self._fast: Any = native.http1.RequestParser(
            self, app.max_header_bytes, app.max_body, MAX_URL, MAX_HEADERS, _KEEP
        )
        self._parser = self._fast  # what on_message_complete/_route read the method and keep-alive from

    def _feed(self, data: bytes) -> None:  # AuthzProtocol.data_received times each read around it
        # (native/_fast.pyx's data_received, installed below, is this and that in one compiled call)
        if self._closing:
            return
        fast: Any = self._fast  # the compiled parser (stubs: native/_http1.pyi)
        if self._parser is fast:
            if not fast.feed(data):
                return
            # not in the subset: the httptools path takes this request, read by read as it came
            self._parser = self._slow
            for chunk in fast.take_replay():
                AuthzProtocol._feed(self, chunk)
                if self._closing:
                    return
        else:
            AuthzProtocol._feed(self, data)
        if not self._in_message and not self._closing:
            self._parser = fast  # between requests: back to the compiled parser


if native.fast is not None:
    CompiledAuthzProtocol.data_received = native.fast.install_framing(  # type: ignore[method-assign]
        AuthzProtocol._feed, _BUSY, CompiledAuthzProtocol
    )


def protocol_class() -> type[AuthzProtocol]:
    """The protocol the listeners use: compiled framing when it built (and NEXUS_AUTHZ_PURE is unset)."""
    return CompiledAuthzProtocol if native.http1 is not None else AuthzProtocol
