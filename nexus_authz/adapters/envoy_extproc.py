"""Envoy's ext_proc v3 (`envoy.service.ext_proc.v3.ExternalProcessor/Process`): usage from responses.

One bidirectional stream per HTTP request. From the request headers we take the request id (Envoy's
`x-request-id`, the same id the Check saw, so it finds the reservation and the identity nexus-authz
admitted the request with: no x-nexus-* header is trusted). From the response headers the status,
content type and encoding; then every body chunk goes to the core's incremental usage parser, and at
the end of the stream (or when the stream is cut off) the usage is accounted through
`engine.account_response` (the core concludes it: core.accounting): the reservation settled with the
real numbers, the ledger fed. This adapter only says whether the response ended or was cut off.

The shipped Envoy configs use `observability_mode: true`: Envoy sends and moves on, never waiting for us,
so accounting adds no latency and cannot break a response. In that mode we send nothing back. With a
waiting ext_proc (observability off) we answer each message with an empty "continue" response, and can
rewrite OpenAI streaming requests to ask for the usage chunk (`accounting.inject_include_usage`, needs
`request_body_mode: BUFFERED`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from nexus_authz.core.accounting import ResponseEnd
from nexus_authz.core.body import inject_include_usage
from nexus_authz.core.usage import StreamUsage
from nexus_authz.engine import Engine

log = logging.getLogger("nexus_authz.extproc")

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"

_CONTINUE_REQUEST_HEADERS = ep.ProcessingResponse(request_headers=ep.HeadersResponse())
_CONTINUE_RESPONSE_HEADERS = ep.ProcessingResponse(response_headers=ep.HeadersResponse())
_CONTINUE_REQUEST_BODY = ep.ProcessingResponse(request_body=ep.BodyResponse())
_CONTINUE_RESPONSE_BODY = ep.ProcessingResponse(response_body=ep.BodyResponse())
_CONTINUE_REQUEST_TRAILERS = ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
_CONTINUE_RESPONSE_TRAILERS = ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
_CONTINUE = {
    "request_headers": _CONTINUE_REQUEST_HEADERS,
    "response_headers": _CONTINUE_RESPONSE_HEADERS,
    "request_body": _CONTINUE_REQUEST_BODY,
    "response_body": _CONTINUE_RESPONSE_BODY,
    "request_trailers": _CONTINUE_REQUEST_TRAILERS,
    "response_trailers": _CONTINUE_RESPONSE_TRAILERS,
}
_COMPLETE = ResponseEnd(complete=True)
_CUT_OFF = ResponseEnd(complete=False)
_WANTED = frozenset({"x-request-id", ":status", "content-type", "content-encoding"})


def _headers(message: ep.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for hv in message.headers.headers:
        key = hv.key.lower()
        if key in _WANTED:
            out[key] = hv.raw_value.decode("latin-1") if hv.raw_value else hv.value
    return out


class Exchange:
    """The state of one request/response pair while its stream is open."""

    __slots__ = ("done", "parser", "request_id", "status")

    def __init__(self) -> None:
        self.request_id = ""
        self.status = 0
        self.parser: StreamUsage | None = None
        self.done = False


class ExternalProcessorService:
    __slots__ = ("_inject", "engine", "streams")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inject = engine.settings.accounting.inject_include_usage
        self.streams = 0

    async def process(
        self, requests: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ep.ProcessingResponse]:
        exchange = Exchange()
        self.streams += 1
        try:
            async for message in requests:
                kind = message.WhichOneof("request")
                reply = self._on_message(exchange, kind, message)
                if exchange.done is True and exchange.parser is not None:
                    await self._finish(exchange)
                if not message.observability_mode and kind is not None:
                    yield reply if reply is not None else _CONTINUE[kind]
                if exchange.done:
                    # Nothing after the response's end concerns us: end the RPC now. Envoy would keep an
                    # observability stream open for deferred_close_timeout (5 s), holding a stream and
                    # delaying a graceful shutdown by as much.
                    break
        finally:
            # The stream ended without end_of_stream: the client went away or the upstream cut off
            # (before the response started, too: no parser yet). Without a usage record, the
            # reservation's estimate stays charged (SECURITY.md).
            if not exchange.done and (exchange.parser is not None or exchange.request_id):
                exchange.done = True
                if exchange.parser is None:
                    exchange.parser = StreamUsage(
                        prompt_tokens_hint=self.engine.prompt_hint(exchange.request_id)
                    )
                await self._finish(exchange, cut=True)

    def _on_message(
        self, ex: Exchange, kind: str | None, message: ep.ProcessingRequest
    ) -> ep.ProcessingResponse | None:
        if kind == "response_body":
            body = message.response_body
            parser = ex.parser
            if parser is not None and not ex.done:
                if body.body:
                    parser.feed(body.body)
                if body.end_of_stream:
                    ex.done = True
            return None
        if kind == "request_headers":
            headers = _headers(message.request_headers)
            ex.request_id = headers.get("x-request-id", "")
            return None
        if kind == "response_headers":
            headers = _headers(message.response_headers)
            try:
                ex.status = int(headers.get(":status", "0"))
            except ValueError:
                ex.status = 0
            ex.parser = StreamUsage(
                content_encoding=headers.get("content-encoding"),
                content_type=headers.get("content-type"),
                prompt_tokens_hint=self.engine.prompt_hint(ex.request_id),
            )
            if message.response_headers.end_of_stream:  # no body at all (e.g. a 204, a HEAD)
                ex.done = True
            return None
        if kind == "request_body" and self._inject:
            return self._rewrite_request(message.request_body)
        return None

    def _rewrite_request(self, body: ep.HttpBody) -> ep.ProcessingResponse | None:
        new = inject_include_usage(body.body)
        if new is None:
            return None
        mutation = ep.CommonResponse(
            body_mutation=ep.BodyMutation(body=new),
            header_mutation=ep.HeaderMutation(
                set_headers=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key="content-length", raw_value=str(len(new)).encode()),
                        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
                    )
                ]
            ),
        )
        return ep.ProcessingResponse(request_body=ep.BodyResponse(response=mutation))

    async def _finish(self, ex: Exchange, *, cut: bool = False) -> None:
        parser = ex.parser
        if parser is None:
            return
        ex.parser = None
        try:
            hint = self.engine.prompt_hint(ex.request_id)
            pending = self.engine.account_response(
                ex.request_id, parser, _CUT_OFF if cut else _COMPLETE, hint
            )
            if pending is not None:  # a long text to count exactly: off the event loop
                await pending
        except Exception:  # accounting must never take the stream (or the server) down
            log.exception("accounting failed", extra={"request_id": ex.request_id})

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Process": grpc.stream_stream_rpc_method_handler(
                    self.process,
                    request_deserializer=ep.ProcessingRequest.FromString,
                    response_serializer=ep.ProcessingResponse.SerializeToString,
                )
            },
        )
