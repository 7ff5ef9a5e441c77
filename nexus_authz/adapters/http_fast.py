"""The common ext_authz check in one call per layer: a kept-alive `POST /ext_authz/...` with its whole body.

`on_message_complete` replaces `AuthzProtocol.on_message_complete` in the compiled protocol
(adapters/http_native.py): for such a request it asks the decision driver's `check_plain` (core/fastpath.py
admits the common request with no Request, Admission or Decision object) and writes the allow answer from
the plan's cached header block; anything else (nginx, HEAD, the admin listener, a cut body, a closing or
draining connection, answers still queued, a request the fast admission does not take) goes through
`AuthzProtocol.on_message_complete` as before. A refusal by the counters or an awaited store comes back
as a Decision or an awaitable and is answered by the same code as on the reference path, so both paths
write the same bytes (tests/adapters/test_http_fastpath.py). `nginx` does the same for nginx's
`auth_request` subrequest of a POST (the compiled protocol's `_nginx`).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from nexus_authz.adapters.answers import (
    ALLOW_CACHE,
    CLOSING_TAIL,
    TAIL,
    AllowHead,
    AnswerCache,
    allow_head,
    nginx_denial,
)
from nexus_authz.adapters.http_authz import (
    _INTERNAL_ERROR,
    EXT_AUTHZ_PREFIX,
    AuthzProtocol,
    HttpApp,
    _client_address,
    log,
)
from nexus_authz.core import ratelimit_headers
from nexus_authz.core.fastpath import Plan
from nexus_authz.core.forwarded import whole_by_its_length
from nexus_authz.core.limits import WindowStatus
from nexus_authz.core.model import Decision, KeyRecipe, KeyRecord, Reason

_PREFIX = EXT_AUTHZ_PREFIX.encode() + b"/"
_SKIP = len(EXT_AUTHZ_PREFIX)
# The allow heads of the recipes (answers.allow_head) with the headers to remove they were made with, for
# the key snapshot they were made in
_HEADS: AnswerCache[tuple[AllowHead, tuple[str, ...]]] = AnswerCache(ALLOW_CACHE)


def plan_wire(app: HttpApp, key: KeyRecord) -> bytes | AllowHead:
    """What a plan of `key` keeps of its allow answer (`Plan.wire`): for a key made from a recipe, the
    recipe's head split around the key id (answers.allow_head), one for all its keys with the same headers
    to remove (a plan shared by keys of the recipe serves only those: core/fastpath.py); else the key's
    block (`HttpApp.allow_block`). Also the compiled lane's (native/_fast.pyx)."""
    recipe: KeyRecipe | None = key.recipe
    if recipe is None:
        return app.allow_block(key)
    kept = _HEADS.get(recipe, app.engine.snapshot)
    if kept is not None and kept[1] == key.remove_headers:
        return kept[0]
    head = allow_head(key)
    assert head is not None  # (a recipe)
    _HEADS.put(recipe, (head, key.remove_headers))
    return head


def allow_answer(
    app: HttpApp, plan: Plan, key: KeyRecord, statuses: tuple[WindowStatus, ...], release: str
) -> bytes:
    """`HttpApp.response` of an admission by `Decider.check_plain`: the key's block (the plan's wire, with
    the key id spliced into a recipe's head), the rate-limit headers, the release (for the Lua tap, in
    Envoy's dynamic metadata), the tail. Also the compiled lane's answer when it hands a request to
    check_plain (native/_fast.pyx)."""
    wire = plan.wire
    if wire is None:
        wire = plan.wire = plan_wire(app, key)
    if isinstance(wire, tuple):  # a recipe's head: the key id spliced in
        wire = b"%s%s%s" % (wire[0], key.key_id.encode("latin-1"), wire[1])
    if statuses:
        shape: Any = plan.shape  # set: the plan has windows
        block = ratelimit_headers.build_header_block(shape.headers, statuses)
    else:
        block = b""
    if release:
        return b"%s%sx-nexus-release: %s\r\n%s" % (wire, block, release.encode("latin-1"), TAIL)
    return wire + block + TAIL


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
        body = b"".join(self._body) if self._body else b""
        if whole_by_its_length(headers, body):  # (http_authz decides the others: core.forwarded)
            engine = app.engine
            xff = headers.get("x-forwarded-for")
            try:
                out = engine.decider.check_plain(
                    engine.policy,
                    engine.snapshot,
                    headers,
                    self._url[_SKIP:].decode("latin-1"),
                    body,
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


def nginx(self: AuthzProtocol, headers: dict[str, str], close: bool) -> bytes | Awaitable[bytes]:
    """`AuthzProtocol._nginx` for the common subrequest: nginx asking about a POST (X-Original-Method),
    admitted by the decision driver's `check_plain` with the original URI and no body (nginx sends none),
    as Envoy's common check is, and answered with nginx's allow block and the rate-limit headers. Anything
    else, and whatever check_plain hands back, is answered as `_nginx` answers it (the same bytes:
    tests/adapters/test_http_fastpath.py)."""
    if not self.fast_path or headers.get("x-original-method") != "POST":  # type: ignore[attr-defined]
        return AuthzProtocol._nginx(self, headers, close)
    headers.pop("x-nexus-rewrite", None)  # (as _nginx: nginx cannot rewrite a body)
    app = self._app
    engine = app.engine
    out = engine.decider.check_plain(
        engine.policy,
        engine.snapshot,
        headers,
        headers.get("x-original-uri", "/"),
        b"",
        headers.get("x-request-id", ""),
        headers.get("x-real-ip", "") or _client_address(headers),
    )
    if out is None:  # not the common request: nothing was charged or counted
        return AuthzProtocol._nginx(self, headers, close)
    if out.__class__ is tuple:
        plan, key, statuses, _ = out  # type: ignore[misc]  (nginx has no early slot release)
        block = ratelimit_headers.build_header_block(plan.shape.headers, statuses) if statuses else b""
        return app.allow_block(key, nginx=True) + block + (CLOSING_TAIL if close else TAIL)
    if out.__class__ is Decision:
        if out.allowed:  # type: ignore[union-attr]
            return app.response(out, nginx=True, close=close)  # type: ignore[arg-type]
        return nginx_denial(out, close=close)  # type: ignore[arg-type]
    return self._answer_later(out, nginx=True, close=close)  # type: ignore[arg-type]
