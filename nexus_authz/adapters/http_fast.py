"""The common ext_authz check in one call per layer: a kept-alive `POST /ext_authz/...` with its whole body.

`on_message_complete` replaces `AuthzProtocol.on_message_complete` in the compiled protocol
(adapters/http_native.py): for such a request it asks the decision driver's `check_plain` (core/fastpath.py
admits the common request with no Request, Admission or Decision object) and writes the allow answer from
the plan's cached header block; anything else (nginx, HEAD, the admin listener, a cut body, a closing or
draining connection, answers still queued, a request the fast admission does not take) goes through
`AuthzProtocol.on_message_complete` as before. A refusal by the counters or an awaited store comes back
as a Decision or an awaitable and is answered by the same code as on the reference path, so both paths
write the same bytes (tests/adapters/test_http_fastpath.py).
"""

from __future__ import annotations

from typing import Any

from nexus_authz.adapters.http_authz import (
    _INTERNAL_ERROR,
    EXT_AUTHZ_PREFIX,
    AuthzProtocol,
    HttpApp,
    log,
)
from nexus_authz.core import ratelimit_headers
from nexus_authz.core.fastpath import Plan
from nexus_authz.core.limits import WindowStatus
from nexus_authz.core.model import Decision, Reason

_PREFIX = EXT_AUTHZ_PREFIX.encode() + b"/"
_SKIP = len(EXT_AUTHZ_PREFIX)
_TAIL = b"content-length: 0\r\n\r\n"


def allow_answer(app: HttpApp, plan: Plan, statuses: tuple[WindowStatus, ...], release: str) -> bytes:
    """`HttpApp.response` of an admission by `Decider.check_plain`: the key's block (cached on the plan),
    the rate-limit headers, the release (for the Lua tap, in Envoy's dynamic metadata), the tail. Also the
    compiled lane's answer when it hands a request to check_plain (native/_fast.pyx)."""
    wire = plan.wire
    if wire is None:
        wire = plan.wire = app.allow_block(plan.key)
    if statuses:
        shape: Any = plan.shape  # set: the plan has windows
        block = ratelimit_headers.build_header_block(shape.headers, statuses)
    else:
        block = b""
    if release:
        return b"%s%sx-nexus-release: %s\r\n%s" % (wire, block, release.encode("latin-1"), _TAIL)
    return wire + block + _TAIL


def on_message_complete(self: AuthzProtocol) -> None:
    """`AuthzProtocol.on_message_complete`, the common request first (see the module)."""
    app = self._app
    parser = self._parser
    if (
        self.fast_path  # type: ignore[attr-defined]
        and not self._closing
        and self._url.startswith(_PREFIX)
        and parser.get_method() == b"POST"
        and parser.should_keep_alive()
        and not app.draining
        and not app.admin
        and not self._outbox
        and self._transport is not None
    ):
        headers = self._headers
        if headers.get("x-envoy-auth-partial-body") != "true":
            engine = app.engine
            xff = headers.get("x-forwarded-for")
            try:
                out = engine.decider.check_plain(
                    engine.policy,
                    engine.snapshot,
                    headers,
                    self._url[_SKIP:].decode("latin-1"),
                    b"".join(self._body) if self._body else b"",
                    headers.get("x-request-id", ""),
                    xff.rpartition(",")[2].strip() if xff else "",  # http_authz._client_address
                )
                if out is None:  # not the common request: the reference path below
                    pass
                elif out.__class__ is tuple:
                    data = allow_answer(app, *out)
                elif out.__class__ is Decision:
                    data = app.response(out, nginx=False, close=False)
                else:  # the counter store is awaited: the answer leaves from the outbox
                    self._in_message = False
                    self._queue(self._answer_later(out, nginx=False, close=False), True)  # type: ignore[arg-type]
                    return
            except Exception:  # a bug: answer 500 for this request, keep serving the others
                log.exception("internal error in the HTTP check")
                engine.count(Reason.UNAVAILABLE)
                self._in_message = False
                self._closing = True
                self._transport.write(_INTERNAL_ERROR)
                self._hang_up(self._transport)
                return
            if out is not None:  # else not the common request: nothing was charged or counted
                self._in_message = False
                self._transport.write(data)
                loop = app.loop
                if loop is not None:
                    self.last_active = loop.time()
                return
    AuthzProtocol.on_message_complete(self)
