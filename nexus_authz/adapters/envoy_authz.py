"""Envoy's gRPC ext_authz v3 (`envoy.service.auth.v3.Authorization/Check`) on grpc.aio.

Maps a CheckRequest to the core `Request` and the core `Decision` to a CheckResponse. Answers are
serialized once and cached (per key for allows, per reason for fixed denials); per-request parts such as
rate-limit headers are appended as a second serialized message, which protobuf merges on parse (repeated
fields concatenate), so the common answer costs no message building at all.

Denials use the gRPC-level status Envoy expects inside CheckResponse (UNAUTHENTICATED, PERMISSION_DENIED,
RESOURCE_EXHAUSTED ...) with a DeniedHttpResponse carrying the HTTP status, headers and JSON body. Transport
errors (the RPC itself failing) are left to Envoy's `failure_mode_allow`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Sequence
from typing import Final

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from nexus_authz.adapters.answers import ALLOW_CACHE, DENY_CACHE, AnswerCache
from nexus_authz.core import ratelimit_headers as _headers
from nexus_authz.core.forwarded import cut_by_proxy
from nexus_authz.core.model import Decision, KeyRecord, Reason, Request
from nexus_authz.engine import Engine

log = logging.getLogger("nexus_authz.grpc")

SERVICE = "envoy.service.auth.v3.Authorization"
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_GRPC_CODE = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    413: code_pb2.INVALID_ARGUMENT,  # a body the policy cannot read whole (cut at the proxy's buffer)
    429: code_pb2.RESOURCE_EXHAUSTED,
    503: code_pb2.UNAVAILABLE,
}


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value), append_action=_OVERWRITE
    )


def request_from_check(check: external_auth_pb2.CheckRequest) -> Request:
    """The core request for a CheckRequest. Never raises: missing parts become empty values."""
    http = check.attributes.request.http
    if http.headers:
        headers = dict(http.headers)
    else:
        # `encode_raw_headers: true` sends header_map with raw bytes instead of the string map.
        headers = {}
        for hv in http.header_map.headers:
            value = hv.raw_value.decode("latin-1") if hv.raw_value else hv.value
            key = hv.key.lower()
            headers[key] = value if key not in headers else headers[key] + ", " + value
    body = http.raw_body or (http.body.encode("utf-8", "surrogateescape") if http.body else b"")
    # The client's Content-Length, which a cut body no longer shows: the header itself (the shipped
    # config allows it through). Not `http.size`: that is what Envoy had buffered when it asked, which
    # varies from one request to the next; without the header a cut body's length is unknown.
    headers.pop("x-nexus-content-length", None)
    # The Lua filter applies clamps (core/clamp.py): the config says so in the vhost's context
    # extensions, never a client header.
    headers.pop("x-nexus-rewrite", None)
    rewriter = check.attributes.context_extensions.get("x-nexus-rewrite")
    if rewriter:
        headers["x-nexus-rewrite"] = rewriter
    declared = headers.get("content-length")
    if declared is not None:
        headers["x-nexus-content-length"] = declared
    truncated = cut_by_proxy(headers, body)
    address = check.attributes.source.address.socket_address.address
    return Request(
        method=http.method or "GET",
        path=http.path or "/",
        headers=headers,
        body=body,
        body_truncated=truncated,
        # x-request-id, not http.id (Envoy's stream id): ext_proc sees x-request-id, and the reservation
        # made here must be found there.
        request_id=headers.get("x-request-id") or http.id,
        client_address=address,
    )


def _metadata(key: KeyRecord) -> struct_pb2.Struct:
    """Dynamic metadata for later filters (e.g. Envoy's ratelimit filter keyed on the key id)."""
    md = struct_pb2.Struct()
    md.update({"key_id": key.key_id, "tenant": key.tenant, "plan": key.plan or ""})
    return md


def allow_response(key: KeyRecord) -> external_auth_pb2.CheckResponse:
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[_header(k, v) for k, v in key.upstream_headers],
            headers_to_remove=list(key.remove_headers),
        ),
        dynamic_metadata=_metadata(key),
    )


def deny_response(decision: Decision) -> external_auth_pb2.CheckResponse:
    headers = [_header("content-type", "application/json"), _header("x-nexus-reason", decision.reason.value)]
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=_GRPC_CODE.get(decision.status, code_pb2.PERMISSION_DENIED)),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=decision.status),
            headers=headers,
            body=decision.body.decode("utf-8", "replace"),
        ),
    )


def _release_metadata(request_id: str, name: str = "x-nexus-release") -> bytes:
    """A serialized CheckResponse holding only dynamic_metadata {name: request_id}; appended to the
    cached allow bytes, protobuf merges it into the allow's metadata (also `x-nexus-clamp`)."""
    md = struct_pb2.Struct()
    md.update({name: request_id})
    return external_auth_pb2.CheckResponse(dynamic_metadata=md).SerializeToString()


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (its tag byte, its length as a varint, the bytes)."""
    n = len(payload)
    if n < 0x80:
        return bytes((tag, n)) + payload
    length = bytearray()
    while n > 0x7F:
        length.append(n & 0x7F | 0x80)
        n >>= 7
    length.append(n)
    return bytes((tag,)) + bytes(length) + payload


_APPEND_ACTION: Final = b"\x18" + bytes((_OVERWRITE,))  # HeaderValueOption.append_action (field 3)


def _option(tag: int, name: str, value: str) -> bytes:
    """One HeaderValueOption field {header {key, value}, append_action OVERWRITE_IF_EXISTS_OR_ADD}."""
    kb, vb = name.encode(), value.encode()
    header = len(kb) + len(vb) + 4
    if header < 0x7C and kb and vb:  # every length one byte: one format
        return b"%c%c\x0a%c\x0a%c%s\x12%c%s%s" % (
            tag,
            header + 4,
            header,
            len(kb),
            kb,
            len(vb),
            vb,
            _APPEND_ACTION,
        )
    # an empty string is left out, as protobuf leaves out a field at its default
    fields = (_field(0x0A, kb) if kb else b"") + (_field(0x12, vb) if vb else b"")
    return _field(tag, _field(0x0A, fields) + _APPEND_ACTION)


# Each header's option as last written, by name, for allows and for denials: most of an answer's
# rate-limit headers (the limits, the policy, often the resets) repeat from one request to the next.
_LAST: Final[tuple[dict[str, tuple[str, bytes]], dict[str, tuple[str, bytes]]]] = ({}, {})


def extra_headers(headers: Sequence[tuple[str, str]], allowed: bool) -> bytes:
    """Serialized CheckResponse holding only a decision's per-request client headers: written here
    field by field (a few µs less per request than building the messages), byte for byte what
    protobuf serializes for them (tests/adapters/test_envoy_authz.py compares the two)."""
    # ok_response (3).response_headers_to_add (6), or denied_response (2).headers (2)
    tag = 0x32 if allowed else 0x12
    last = _LAST[allowed]
    if len(last) > 64:  # (our own header names: a handful)
        last.clear()
    options = []
    for name, value in headers:
        seen = last.get(name)
        if seen is not None and seen[0] == value:
            options.append(seen[1])
        else:
            option = _option(tag, name, value)
            last[name] = (value, option)
            options.append(option)
    return _field(0x1A if allowed else 0x12, b"".join(options))


def _extra_headers_message(pairs: Sequence[tuple[str, str]], allowed: bool) -> bytes:
    """What `extra_headers` writes, built as messages (its reference)."""
    headers = [_header(k, v) for k, v in pairs]
    if allowed:
        msg = external_auth_pb2.CheckResponse(
            ok_response=external_auth_pb2.OkHttpResponse(response_headers_to_add=headers)
        )
    else:
        msg = external_auth_pb2.CheckResponse(
            denied_response=external_auth_pb2.DeniedHttpResponse(headers=headers)
        )
    return msg.SerializeToString()


def _completed(
    base: bytes, release: str, clamp: str, headers: Sequence[tuple[str, str]], allowed: bool
) -> bytes:
    """A cached answer (`base`) with a decision's per-request parts appended, each a serialized
    CheckResponse that protobuf merges on parse."""
    if release:  # merged into dynamic_metadata: the Lua tap releases the slot at the end
        base += _release_metadata(release)
    if clamp:  # the Lua filter lowers the body's completion cap (core/clamp.py)
        base += _release_metadata(clamp, "x-nexus-clamp")
    if headers:
        return base + extra_headers(headers, allowed)
    return base


class AuthorizationService:
    """The Authorization service; `handler()` returns the grpc generic handler to register."""

    __slots__ = ("_allow_cache", "_deny_cache", "engine")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._allow_cache: AnswerCache[bytes] = AnswerCache(ALLOW_CACHE)  # bounded, as HTTP's
        self._deny_cache: AnswerCache[bytes] = AnswerCache(DENY_CACHE)

    def decide(self, check: external_auth_pb2.CheckRequest) -> tuple[Decision, bytes]:
        """The decision and the serialized CheckResponse for it."""
        decision = self.engine.check(request_from_check(check))
        return decision, self.serialize(decision)

    def _allow_base(self, key: KeyRecord) -> bytes:
        """`key`'s serialized allow (cached per snapshot)."""
        base = self._allow_cache.get(key, self.engine.snapshot)
        if base is None:
            base = allow_response(key).SerializeToString()
            self._allow_cache.put(key, base)
        return base

    def serialize(self, decision: Decision) -> bytes:
        if decision.allowed and decision.key is not None:
            base = self._allow_base(decision.key)
        else:
            base = self._deny_cache.get(decision)
            if base is None:
                base = deny_response(decision).SerializeToString()
                self._deny_cache.put(decision, base)
        return _completed(base, decision.release, decision.clamp, decision.response_headers, decision.allowed)

    def answer(self, message: bytes) -> bytes | Awaitable[bytes]:
        """The serialized CheckResponse for a serialized CheckRequest, or (when the decision waits for
        the counter store, Redis) an awaitable of it: the check listener's HTTP/2 (als_h2) serves Check
        with it, on the event loop. DecodeError for bytes that are no CheckRequest.

        The common request (a POST forwarded whole) is admitted by the decision driver's `check_plain`
        (core/fastpath.py), as the HTTP listener's is; anything else, and whatever check_plain hands
        back, by `Engine.check_fast` (the reference, which the gRPC port runs for every request: the
        tests compare the two byte for byte)."""
        request = request_from_check(external_auth_pb2.CheckRequest.FromString(message))
        engine = self.engine
        if request.method == "POST" and not request.body_truncated:
            out = engine.decider.check_plain(
                engine.policy,
                engine.snapshot,
                request.headers,
                request.path,
                request.body,
                request.request_id,
                request.client_address,
            )
            if out.__class__ is tuple:  # admitted: (plan, key, the windows' statuses, release)
                plan, key, statuses, release = out  # type: ignore[misc]
                headers = _headers.build_headers(plan.shape.headers, statuses, False) if statuses else ()
                return _completed(self._allow_base(key), release, "", headers, True)
            decision = engine.check_fast(request) if out is None else out
        else:
            decision = engine.check_fast(request)
        if decision.__class__ is Decision:
            return self.serialize(decision)  # type: ignore[arg-type]
        return self._serialized(decision)  # type: ignore[arg-type]

    async def _serialized(self, pending: Awaitable[Decision]) -> bytes:
        return self.serialize(await pending)

    async def check(self, check: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext) -> bytes:
        try:
            decision = self.engine.check_fast(request_from_check(check))
            if decision.__class__ is not Decision:  # waits for the counter store (Redis)
                decision = await decision  # type: ignore[misc]
            return self.serialize(decision)  # type: ignore[arg-type]
        except Exception:
            log.exception("internal error in gRPC Check")
            self.engine.count(Reason.UNAVAILABLE)
            # Let Envoy's failure_mode_allow decide, exactly as for a transport failure.
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            raise  # unreachable: abort raises

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self.check,
                    request_deserializer=external_auth_pb2.CheckRequest.FromString,
                    response_serializer=_passthrough,
                )
            },
        )


def _passthrough(data: bytes) -> bytes:
    return data


# -- early release of a concurrency slot (gRPC mode) -----------------------------------------------------
RELEASE_SERVICE = "nexus.authz.v1.Slots"


def release_handler(engine: Engine) -> grpc.GenericRpcHandler:
    """`/nexus.authz.v1.Slots/Release`: the Lua usage tap, as a response ends, frees the request's
    concurrency slot (the request id is the raw message; the answer is empty). In gRPC mode Envoy has
    no HTTP route to nexus-authz, so the tap frames this call itself over the access-log cluster."""

    async def release(request_id: bytes, context: grpc.aio.ServicerContext) -> bytes:
        engine.release(request_id.decode("latin-1"))
        return b""

    return grpc.method_handlers_generic_handler(
        RELEASE_SERVICE,
        {
            "Release": grpc.unary_unary_rpc_method_handler(
                release, request_deserializer=_passthrough, response_serializer=_passthrough
            )
        },
    )
