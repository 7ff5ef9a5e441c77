"""Coverage-guided fuzz targets (atheris, libFuzzer for Python) over the same surfaces as the Hypothesis
tests: `python -m tests.fuzz.atheris_targets TARGET [libFuzzer flags]`, e.g. `-runs=100000` or
`-max_total_time=600 corpus_dir/`. tests/fuzz/test_atheris.py runs each target for a bounded number of
inputs in CI. An input fails the target when the surface raises, answers something undefined (the same
checks as the Hypothesis tests) or logs a caught bug.

Targets: http (fast-path byte streams, split where the input says), http-native (the same streams through
the httptools protocol and the compiled framing of nexus_authz/native/: byte-identical output), check
(CheckRequest bytes), rls
(RateLimitRequest bytes), extproc (a ProcessingRequest stream), als (an HTTPAccessLogEntry), usage (a
response body, streamed), body (a request body), body-native (a request body read by the reference and by
the compiled reader of nexus_authz/native/_body: identical RequestFacts; the C code itself is not
coverage-instrumented, the mutations come from the Python side's coverage and the seeds).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["nexus_authz"]):
    from envoy.data.accesslog.v3 import accesslog_pb2
    from envoy.service.auth.v3 import external_auth_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
    from envoy.service.ratelimit.v3 import rls_pb2
    from google.protobuf.message import DecodeError

    from nexus_authz.adapters import http_authz  # noqa: F401  (instrumented before _support imports it)
    from nexus_authz.adapters.envoy_als import METADATA_NAMESPACE, snippet_of, usage_of
    from nexus_authz.adapters.envoy_authz import AuthorizationService
    from nexus_authz.adapters.envoy_extproc import ExternalProcessorService
    from nexus_authz.adapters.envoy_rls import RateLimitService, RlsConfigSource, engine_identity
    from nexus_authz.core.body import inject_include_usage, multipart_model, request_facts
    from nexus_authz.core.usage import StreamUsage
    from nexus_authz.decide import Decider
    from nexus_authz.engine import Engine
    from nexus_authz.settings import load_settings
    from nexus_authz.stores.base import LocalCounters
    from nexus_authz.stores.memory import MemoryCounterStore

from tests.fuzz._support import BugLog, check_answer, check_error_json, feed, reset, write_fuzz_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
_bugs = BugLog()
logging.getLogger("nexus_authz").addHandler(_bugs)


def _engine(**kwargs: Any) -> Engine:
    # libFuzzer ends the process without Python's cleanup: the caller may name a directory it removes
    directory = Path(os.environ.get("NEXUS_ATHERIS_DIR") or tempfile.mkdtemp(prefix="nx-atheris-"))
    directory.mkdir(parents=True, exist_ok=True)
    return Engine.from_settings(load_settings(str(write_fuzz_config(directory))), **kwargs)


def _no_bugs() -> None:
    if _bugs.records:
        message = _bugs.describe()
        _bugs.records.clear()
        raise AssertionError(f"a handler logged an error: {message}")


def _chunks(data: bytes) -> list[bytes]:
    """The input after its first byte, cut where that byte says (the split is part of what is fuzzed)."""
    if not data:
        return []
    rng = random.Random(data[0])
    rest = data[1:]
    points = sorted(rng.randrange(len(rest) + 1) for _ in range(data[0] % 8))
    return [rest[a:b] for a, b in zip([0, *points], [*points, len(rest)], strict=True) if rest[a:b]]


def http_target() -> Callable[[bytes], None]:
    engine = _engine()

    def one(data: bytes) -> None:
        reset(engine)
        answers, _ = feed(engine, _chunks(data))
        for answer in answers:
            check_answer(answer)
        _no_bugs()

    return one


def http_native_target() -> Callable[[bytes], None]:
    from nexus_authz import native

    if native.http1 is None:
        sys.exit(f"http-native: the compiled framing is not loaded ({native.WHY_PURE})")
    from nexus_authz.adapters.http_native import CompiledAuthzProtocol

    engine = _engine(clock=lambda: 1_750_000_000.0)  # a fixed clock: both runs answer alike

    def one(data: bytes) -> None:
        chunks = _chunks(data)
        outputs = []
        for cls in (http_authz.AuthzProtocol, CompiledAuthzProtocol):
            reset(engine)
            http_authz.PROTOCOL = cls
            answers, transport = feed(engine, chunks)
            for answer in answers:
                check_answer(answer)
            outputs.append((bytes(transport.data), transport.closed))
        if outputs[0] != outputs[1]:
            raise AssertionError(f"the framings differ: {outputs[0]!r} != {outputs[1]!r}")
        _no_bugs()

    return one


def check_target() -> Callable[[bytes], None]:
    service = AuthorizationService(_engine())

    def one(data: bytes) -> None:
        try:
            request = external_auth_pb2.CheckRequest.FromString(data)
        except DecodeError:
            return
        reset(service.engine)
        decision, answer = service.decide(request)
        response = external_auth_pb2.CheckResponse.FromString(answer)
        if decision.allowed:
            assert response.status.code == 0
        else:
            assert response.denied_response.status.code == decision.status
            check_error_json(response.denied_response.body)
        _no_bugs()

    return one


def rls_target() -> Callable[[bytes], None]:
    engine = _engine()
    source = RlsConfigSource(str(FIXTURES / "rls" / "valid"))
    source.load()
    service = RateLimitService(
        source, Decider(LocalCounters(MemoryCounterStore())), identity=engine_identity(engine)
    )

    def one(data: bytes) -> None:
        try:
            request = rls_pb2.RateLimitRequest.FromString(data)
        except DecodeError:
            return
        response = rls_pb2.RateLimitResponse.FromString(service.decide(request))
        if response.raw_body:
            check_error_json(response.raw_body)
        _no_bugs()

    return one


def extproc_target() -> Callable[[bytes], None]:
    service = ExternalProcessorService(_engine())

    async def drive(messages: list[ep.ProcessingRequest]) -> None:
        async def requests() -> AsyncIterator[ep.ProcessingRequest]:
            for m in messages:
                yield m

        async for _ in service.process(requests(), None):
            pass

    def one(data: bytes) -> None:
        messages = []
        for chunk in _chunks(data):
            try:
                messages.append(ep.ProcessingRequest.FromString(chunk))
            except DecodeError:
                messages.append(ep.ProcessingRequest(response_body=ep.HttpBody(body=chunk)))
        asyncio.run(drive(messages))
        _no_bugs()

    return one


def als_target() -> Callable[[bytes], None]:
    def one(data: bytes) -> None:
        try:
            entry = accesslog_pb2.HTTPAccessLogEntry.FromString(data)
        except DecodeError:
            return
        headers = entry.response.response_headers
        usage, _, _ = usage_of(
            snippet_of(entry),
            content_type=headers.get("content-type"),
            content_encoding=headers.get("content-encoding"),
        )
        assert min(usage.prompt_tokens, usage.completion_tokens) >= 0

    return one


def usage_target() -> Callable[[bytes], None]:
    def one(data: bytes) -> None:
        if len(data) < 2:
            return
        ctype = (None, "text/event-stream", "application/json")[data[0] % 3]
        encoding = (None, "gzip", "deflate")[data[0] // 3 % 3]
        parser = StreamUsage(content_type=ctype, content_encoding=encoding, window=64 + data[0] * 16)
        for chunk in _chunks(data[1:]):
            parser.feed(chunk)
        usage = parser.finish()
        assert min(usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens) >= 0

    return one


def body_target() -> Callable[[bytes], None]:
    def one(data: bytes) -> None:
        facts = request_facts(data)
        assert facts.prompt_tokens >= 0
        request_facts(data, truncated=True)
        multipart_model(data, "multipart/form-data; boundary=b")
        multipart_model(data, "multipart/form-data; boundary=b", truncated=True)
        inject_include_usage(data)

    return one


def body_native_target() -> Callable[[bytes], None]:
    from nexus_authz import native

    if native.body is None:
        sys.exit(f"the compiled body reading is not loaded ({native.WHY_PURE})")
    compiled = native.body.request_facts

    def same(data: bytes, **kw: bool) -> None:
        want, got = request_facts(data, **kw), compiled(data, **kw)
        assert (want, want.is_object) == (got, got.is_object), (data[:200], kw, want, got)

    def one(data: bytes) -> None:
        same(data)
        same(data, precise=False)
        same(data, estimate_prompt=False)
        same(data, truncated=True)

    return one


def seeds(target: str) -> list[bytes]:
    """A starting corpus for `target`: well-formed inputs the fuzzer mutates (protobuf targets find
    little from random bytes alone, which rarely decode)."""
    from tests.fuzz._support import SECRETS

    chat = b'{"model":"gpt-4o","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
    bodies = [p.read_bytes() for p in sorted((FIXTURES / "usage").iterdir())]
    if target in ("http", "http-native"):
        return [
            b"\x03POST /ext_authz/v1/chat/completions HTTP/1.1\r\nauthorization: Bearer %s\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\nx-nexus-content-length: %d\r\n\r\n%s"
            % (s.encode(), len(chat), len(chat), chat)
            for s in SECRETS
        ] + [
            b"\x00GET /v1/nginx/auth HTTP/1.1\r\nx-api-key: %s\r\nx-original-uri: /v1/models\r\n\r\n"
            % SECRETS[0].encode()
        ]
    if target == "check":
        out = []
        for secret in SECRETS:
            request = external_auth_pb2.CheckRequest()
            http = request.attributes.request.http
            http.method, http.path, http.raw_body = "POST", "/v1/chat/completions", chat
            http.headers["authorization"] = f"Bearer {secret}"
            http.headers["x-request-id"] = "r-1"
            out.append(request.SerializeToString())
        return out
    if target == "rls":
        request = rls_pb2.RateLimitRequest(domain="nexus")
        d = request.descriptors.add()
        d.entries.add(key="nexus_plan", value="free")
        d.entries.add(key="nexus_key_id", value="open")
        request.descriptors.add().entries.add(key="nexus_key_id", value="scoped")
        features = rls_pb2.RateLimitRequest(domain="features")
        features.descriptors.add().entries.add(key="path", value="/v1/chat/completions")
        return [request.SerializeToString(), features.SerializeToString()]
    if target == "extproc":
        headers = ep.ProcessingRequest()
        headers.response_headers.headers.headers.add(key="content-type", value="text/event-stream")
        out = []
        for body in bodies:
            message = ep.ProcessingRequest(response_body=ep.HttpBody(body=body[:4000], end_of_stream=True))
            out.append(b"\x00" + headers.SerializeToString() + message.SerializeToString())
        return out
    if target == "als":
        out = []
        for body in bodies:
            entry = accesslog_pb2.HTTPAccessLogEntry()
            entry.request.request_headers["x-nexus-key-id"] = "open"
            entry.response.response_headers["content-type"] = "text/event-stream"
            entry.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].update(
                {"u": {"k": "sse", "b": base64.b64encode(body[:4000]).decode(), "x": 0}}
            )
            out.append(entry.SerializeToString())
        return out
    if target == "usage":
        return [b"\x00\x00" + body for body in bodies] + [b"\x01\x03" + body for body in bodies]
    out = [chat, b'{"model":"gpt-4o","stream":true,"messages":[],"pad":"' + b"x" * 17000 + b'"}']
    if target == "body-native":
        out += [
            b' {"model" : "o3", "n":2, "stream":true, "stream_options":{"include_usage":true},'
            b' "max_tokens":-0}\n',
            b'{"model":"a","mod\\u0065l":"b","max_completion_tokens":8.0,"x":[1e5,{"model":null}]}',
            '{"model":"caf\u00e9 \u6771","messages":[{"role":"user","content":"\\ud800 \\"x\\""}]}'.encode(),
        ]
    return out


TARGETS: dict[str, Callable[[], Callable[[bytes], None]]] = {
    "http": http_target,
    "http-native": http_native_target,
    "check": check_target,
    "rls": rls_target,
    "extproc": extproc_target,
    "als": als_target,
    "usage": usage_target,
    "body": body_target,
    "body-native": body_native_target,
}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.atheris_targets {{{','.join(TARGETS)}}} [libFuzzer flags]")
    one = TARGETS[argv[1]]()
    atheris.Setup([argv[0], *argv[2:]], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
