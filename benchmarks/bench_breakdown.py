"""Where a request's CPU goes inside nexus-authz, piece by piece, from the bytes the real Envoy sends.

    .venv/bin/python benchmarks/bench_breakdown.py [--batches 7] [--n 2000] [--json PATH]

In-process, no sockets: the inputs are recordings of a real Envoy 1.40 run with the shipped envoy.yaml
(benchmarks/fixtures/, made by capture_fixtures.py): one HTTP ext_authz check request exactly as Envoy
wrote it, and StreamAccessLogsMessages of its gRPC access log (one with 1 entry, one batch). The engine is
configured as the performance issue's benchmark (bench_envoy.ISSUE15_CONFIG: requests/min, tokens/min,
tokens/day, USD/month, concurrency, a price; accounting on; the SQLite ledger, its writer not started so
records aggregate in memory as between two flushes).

Each iteration uses its own x-request-id (the check's bytes and the access-log entry are rewritten before
the clock starts) and every reservation is settled by its entry, so the state stays steady. Each piece is
timed on its own, in batches of --n; the figure is the median over --batches batches of the mean µs per
request, in CPU time of this thread (time.thread_time_ns: time preempted by the machine's other work is
not counted; for the nested pieces, timed call by call, the cost of reading the clock is subtracted).
Pieces that nest are marked (⊂): they are part of the line above them, shown to say where its time goes.

What this cannot show (see profile_envoy.py for it, through the real Envoy): the event loop's wake-ups and
the two system calls per request (~30 µs of the empty handler's floor), grpc.aio's per-message handling of
the access-log stream, and the ledger writer's thread. The "ALS message" rows feed stream_access_logs the
serialized messages (as its gRPC handler receives them) from a stub of grpc's servicer context.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import bench_envoy as be  # noqa: E402
import grpc  # noqa: E402
from envoy.service.accesslog.v3 import als_pb2  # noqa: E402

from nexus_authz import native  # noqa: E402
from nexus_authz.adapters import als_fast, envoy_als, http_authz  # noqa: E402
from nexus_authz.core import body as body_mod  # noqa: E402
from nexus_authz.core import tokens  # noqa: E402
from nexus_authz.core.accounting import conclude_usage  # noqa: E402
from nexus_authz.core.model import new_request  # noqa: E402
from nexus_authz.engine import Engine  # noqa: E402
from nexus_authz.settings import load_settings  # noqa: E402

FIXTURES = REPO / "benchmarks" / "fixtures"
# English prose, for prompts of any length (Fixtures.with_prompt)
PROSE = b"The quick brown fox jumps over the lazy dog while the model reads a long context. "
# an OpenAI rate-limit refusal, as its API sends it with a 429
PROVIDER_ERROR = (
    b'{"error":{"message":"Rate limit reached for gpt-4o-mini in organization org-bench on requests per '
    b'min (RPM): Limit 500, Used 500, Requested 1. Please try again in 120ms.","type":"requests",'
    b'"param":null,"code":"rate_limit_exceeded"}}'
)


class Sink:
    """The transport a protocol writes to: keeps nothing."""

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return False


class Fixtures:
    def __init__(self) -> None:
        meta = json.loads((FIXTURES / "fixtures.json").read_text())
        self.secret: str = meta["secret"]
        self.check = (FIXTURES / "envoy_ext_authz_check.http").read_bytes()
        self.als_first = (FIXTURES / "envoy_als_message_1.bin").read_bytes()
        self.als_batch = (FIXTURES / "envoy_als_message_batch.bin").read_bytes()
        head = self.check.split(b"\r\n\r\n", 1)[0]
        line = next(x for x in head.split(b"\r\n") if x.lower().startswith(b"x-request-id:"))
        self.request_id = line.split(b":", 1)[1].strip().decode()
        self.meta = meta

    def with_prompt(self, size: int, typographic: bool = False) -> None:
        """The recorded check with its message's text grown to `size` bytes of English (the headers'
        content-length and x-nexus-content-length follow): what a longer prompt costs a check.
        `typographic`: its prose with a curly apostrophe (UTF-8, as models write it), so the body is not
        ASCII."""
        prose = PROSE.replace(b"the model", "the model\u2019s".encode()) if typographic else PROSE
        text = (prose * (size // len(prose) + 1))[:size]
        self._with_message(b'"' + text + b'"')

    def with_image(self, size: int) -> None:
        """The recorded check with an image of `size` bytes of base64 (a data: URI) beside its message's
        text, as OpenAI's vision requests carry it: its prompt is the text's estimate plus the image's."""
        image = b"data:image/png;base64," + (b"iVBORw0KGgo" * (size // 11 + 1))[:size]
        part = b'[{"type":"text","text":"Say hello."},{"type":"image_url","image_url":{"url":"'
        self._with_message(part + image + b'"}}]')

    def with_key_header(self, name: str) -> None:
        """The recorded check with its key in header `name` (x-api-key: Anthropic's SDKs; api-key: Azure's)
        instead of `authorization: Bearer`."""
        old = b"authorization: Bearer " + self.secret.encode()
        assert old in self.check, "the recorded check has changed: update Fixtures.with_key_header"
        self.check = self.check.replace(old, name.encode() + b": " + self.secret.encode(), 1)

    def _with_message(self, content: bytes) -> None:
        """The recorded check with its message's content (the JSON value) replaced by `content`, the
        headers' content-length and x-nexus-content-length following."""
        head, body = self.check.split(b"\r\n\r\n", 1)
        new = body.replace(b'"Say hello."', content, 1)
        assert new != body, "the recorded body has changed: update Fixtures._with_message"
        lines = head.split(b"\r\n")
        for j, line in enumerate(lines):
            name = line.split(b":", 1)[0].lower()
            if name in (b"content-length", b"x-nexus-content-length"):
                lines[j] = name + b": %d" % len(new)
        self.check = b"\r\n".join(lines) + b"\r\n\r\n" + new

    def with_request_id(self, i: int) -> tuple[bytes, str]:
        rid = f"{i:08x}-0000-4000-8000-000000000000"
        assert len(rid) == len(self.request_id)
        return self.check.replace(self.request_id.encode(), rid.encode(), 1), rid


def build_engine(workdir: Path, fx: Fixtures, secrets: list[str] | None = None, extra: str = "") -> Engine:
    """The engine of bench_envoy's ISSUE15_CONFIG (+ `extra` config lines) with one key per secret
    (default: the fixtures' own key alone)."""
    (workdir / "keys.yaml").write_text(be.key_file(secrets or [fx.secret], be.LIMITS_KEY_FIELDS))
    path = workdir / "nexus.yaml"
    path.write_text(be.nexus_config(str(workdir / "authz.sock"), extra=be.ISSUE15_CONFIG + extra))
    return Engine.from_settings(load_settings(str(path)))


def key_secrets(fx: Fixtures, keys: int) -> list[str]:
    """`keys` secrets, the fixtures' own first, the others of its length (a recorded check's bytes keep
    their size when one replaces it)."""
    secrets = [fx.secret] + [f"nx-fixture-{i:032x}" for i in range(1, keys)]
    assert all(len(x) == len(fx.secret) for x in secrets)
    return secrets


def keyed_checks(fx: Fixtures, secrets: list[str], first: int, n: int) -> list[tuple[bytes, str]]:
    """`n` recorded checks with request ids from `first` on, the secrets round-robin."""
    checks = [fx.with_request_id(i) for i in range(first, first + n)]
    if len(secrets) == 1:
        return checks
    old = fx.secret.encode()
    return [(d.replace(old, secrets[i % len(secrets)].encode(), 1), rid) for i, (d, rid) in enumerate(checks)]


def models_in_turn(checks: list[tuple[bytes, str]], n: int) -> list[tuple[bytes, str]]:
    """The checks naming `n` models in turn (bench_cold / bench_footprint --models): the recorded
    "gpt-4o-mini", then "gpt-4o-minA", "gpt-4o-minB" ... (the same length, so the content lengths stand;
    ISSUE15_CONFIG's "gpt-4o*" prices and allows them all), as a key whose application uses several
    models sends: each (model, path) has its own plan."""
    names = [b'"gpt-4o-mini"'] + [b'"gpt-4o-min%c"' % (65 + i) for i in range(n - 1)]
    return [(d.replace(names[0], names[i % n], 1), rid) for i, (d, rid) in enumerate(checks)]


def after_check(engine: Engine, keys: int) -> Callable[[str], object]:
    """What follows each check of bench_cold / bench_footprint: with more than one key its usage settles
    (the reservation leaves the book, as the access log does); with one, as before --keys, its slot is
    released and the reservation left to expire."""
    if keys == 1:
        return engine.release
    import bench_alloc

    return lambda rid: engine.account(rid, bench_alloc.USAGE)


def tapped(
    entry: Any, kind: str | None, data: bytes = b"", *, content_type: str = "", status: int = 0
) -> Any:
    """A copy of an HTTPAccessLogEntry with the Lua tap's record of `kind` holding `data` (`kind` None:
    no record at all), and the response's content type and status when given."""
    out = type(entry)()
    out.CopyFrom(entry)
    namespaces = out.common_properties.metadata.filter_metadata
    if kind is None:
        del namespaces[envoy_als.METADATA_NAMESPACE]
    else:
        record = namespaces[envoy_als.METADATA_NAMESPACE].fields["u"].struct_value.fields
        record["k"].string_value = kind
        record["b"].string_value = base64.b64encode(data).decode()
    if content_type:
        out.response.response_headers["content-type"] = content_type
    if status:
        out.response.response_code.value = status
    return out


def gzipped(entry: Any) -> Any:
    """A copy of an HTTPAccessLogEntry with its Lua tap's body gzip-compressed and the response's
    Content-Encoding gzip: what a provider sends a client that accepts gzip (the OpenAI SDKs do)."""
    record = entry.common_properties.metadata.filter_metadata[envoy_als.METADATA_NAMESPACE].fields["u"]
    data = base64.b64decode(record.struct_value.fields["b"].string_value)
    out = tapped(entry, record.struct_value.fields["k"].string_value, gzip.compress(data, mtime=0))
    out.response.response_headers["content-encoding"] = "gzip"
    return out


class Quiet(http_authz.AuthzProtocol):
    """The httptools protocol with routing cut off: what parsing alone costs (its callbacks included)."""

    __slots__ = ()

    def on_message_complete(self) -> None:
        self._in_message = False


class Nothing:
    """What the compiled parser hands a request to, when only the parse is timed."""

    _closing = False
    _in_message = False
    _url = b""
    _headers: dict[str, str] = {}
    _body: list[bytes] = []

    def on_message_complete(self) -> None:
        pass


def _pair_cost(timer: Callable[[], int], n: int = 2000) -> float:
    """ns between two consecutive timer reads (the overhead of timing one call)."""
    t0 = timer()
    for _ in range(n):
        timer()
    return (timer() - t0) / n


def batches(n_batches: int, run: Callable[[], float]) -> float:
    """Median over batches of `run()` (each returns µs per request)."""
    return statistics.median(run() for _ in range(n_batches))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--batches", type=int, default=7)
    ap.add_argument("--n", type=int, default=2000, help="requests per batch")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    n, nb = args.n, args.batches
    # the tokenizer loads with its first count (in a worker thread, on a server); here, before the timing
    tokens.warm_up()
    fx = Fixtures()
    tmp = Path(tempfile.mkdtemp(prefix="nexus-breakdown-"))
    engine = build_engine(tmp, fx)
    settings = engine.settings
    app = http_authz.HttpApp(
        engine, max_header_bytes=settings.max_header_bytes, max_body=settings.max_body_bytes
    )
    als = envoy_als.AccessLogService(engine)
    template = als_pb2.StreamAccessLogsMessage.FromString(fx.als_first).http_logs.log_entry[0]
    batch_msg = als_pb2.StreamAccessLogsMessage.FromString(fx.als_batch)
    batch_entries = len(batch_msg.http_logs.log_entry)

    # per-iteration inputs, built before any clock starts
    checks: list[bytes] = []
    entries = []
    rids: list[str] = []
    for i in range(n):
        data, rid = fx.with_request_id(i)
        checks.append(data)
        rids.append(rid)
        entry = type(template)()
        entry.CopyFrom(template)
        entry.request.request_id = rid
        entries.append(entry)

    # the parsed request (what the protocol hands the engine), from the real bytes
    parsed = Quiet(app)
    parsed.connection_made(Sink())  # type: ignore[arg-type]
    parsed.data_received(fx.check)
    headers, url, body = dict(parsed._headers), parsed._url.decode(), b"".join(parsed._body)
    path = url[len(http_authz.EXT_AUTHZ_PREFIX) :]

    def settle_all() -> None:
        for entry in entries:
            als.account_now(entry)

    results: dict[str, float] = {}
    # CPU time of this thread: on a shared machine, time spent preempted is not counted
    timer = time.thread_time_ns
    pair = min(_pair_cost(timer) for _ in range(5))  # what one timer call costs, for timed nested calls

    # -- HTTP: framing -------------------------------------------------------------------------------------
    def framing_httptools() -> float:
        proto = Quiet(app)
        proto.connection_made(Sink())  # type: ignore[arg-type]
        feed = proto.data_received
        t0 = timer()
        for data in checks:
            feed(data)
        return (timer() - t0) / n / 1000

    results["http framing: httptools + per-header callbacks"] = batches(nb, framing_httptools)
    if native.http1 is not None:

        def framing_compiled() -> float:
            parser = native.http1.RequestParser(
                Nothing(),
                app.max_header_bytes,
                app.max_body,
                http_authz.MAX_URL,
                http_authz.MAX_HEADERS,
                http_authz._KEEP,
            )
            feed = parser.feed
            t0 = timer()
            for data in checks:
                feed(data)
            return (timer() - t0) / n / 1000

        results["http framing: compiled (nexus_authz.native._http1)"] = batches(nb, framing_compiled)

    # -- HTTP: Request, key, body facts ----------------------------------------------------------------------
    def request_building() -> float:
        t0 = timer()
        for rid in rids:
            new_request("POST", path, headers, body, False, rid, "192.0.2.2")
        return (timer() - t0) / n / 1000

    results["Request building (new_request)"] = batches(nb, request_building)
    snapshot = engine.snapshot

    def key_lookup() -> float:
        lookup, secret = snapshot.lookup, fx.secret
        t0 = timer()
        for _ in range(n):
            lookup(secret)
        return (timer() - t0) / n / 1000

    results["key hash + lookup (KeySnapshot.lookup)"] = batches(nb, key_lookup)

    def body_facts(facts: Callable[..., Any] = body_mod.request_facts) -> float:
        t0 = timer()
        for _ in range(n):
            facts(body, precise=False)  # as the Check reads it
        return (timer() - t0) / n / 1000

    results["body facts (core.body.request_facts, the reference)"] = batches(nb, body_facts)
    if native.body is not None:
        compiled_facts = native.body.request_facts
        results["body facts: compiled (nexus_authz.native._body)"] = batches(
            nb, lambda: body_facts(compiled_facts)
        )

    # -- HTTP: the decision and the answer (each settled afterwards, untimed) -----------------------------
    requests = [new_request("POST", path, headers, body, False, rid, "192.0.2.2") for rid in rids]
    decisions: list[Any] = []

    def decision() -> float:
        decisions.clear()
        check = engine.check_fast
        t0 = timer()
        for request in requests:
            decisions.append(check(request))
        took = (timer() - t0) / n / 1000
        settle_all()
        return took

    results["decision (Engine.check_fast: key, facts, windows, reservation)"] = batches(nb, decision)
    assert all(d.allowed for d in decisions), decisions[0]

    def answer() -> float:
        response = app.response
        t0 = timer()
        for d in decisions:
            response(d, nginx=False, close=False)
        return (timer() - t0) / n / 1000

    results["answer building (HttpApp.response)"] = batches(nb, answer)

    # -- HTTP: the whole data_received, per protocol -------------------------------------------------------
    gc_time = [0]
    gc_started = [0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_started[0] = timer()
        else:
            gc_time[0] += timer() - gc_started[0]

    def whole(cls: type) -> Callable[[], float]:
        def run() -> float:
            proto = cls(app)
            proto.connection_made(Sink())  # type: ignore[arg-type]
            feed = proto.data_received
            gc.callbacks.append(on_gc)
            gc_time[0] = 0
            t0 = timer()
            for data in checks:
                feed(data)
            took = (timer() - t0) / n / 1000
            gc.callbacks.remove(on_gc)
            results.setdefault(f"gc during {cls.__name__} (⊂ its whole HTTP check below)", 0.0)
            results[f"gc during {cls.__name__} (⊂ its whole HTTP check below)"] = max(
                results[f"gc during {cls.__name__} (⊂ its whole HTTP check below)"], gc_time[0] / n / 1000
            )
            settle_all()
            return took

        return run

    # the two protocols batch by batch, alternately (the machine's state drifts; neither goes first always)
    protocols: list[tuple[str, type]] = [("httptools protocol", http_authz.AuthzProtocol)]
    if native.http1 is not None:
        from nexus_authz.adapters.http_native import CompiledAuthzProtocol

        protocols.append(("compiled framing", CompiledAuthzProtocol))
    runs: dict[str, list[float]] = {name: [] for name, _ in protocols}
    for i in range(nb):
        for name, cls in protocols[i % 2 :] + protocols[: i % 2]:
            runs[name].append(whole(cls)())
    for name, _ in protocols:
        results[f"whole HTTP check, {name} (data_received)"] = statistics.median(runs[name])

    # -- access log: per entry ---------------------------------------------------------------------------
    def als_parse() -> float:
        parse = als_pb2.StreamAccessLogsMessage.FromString
        raw = fx.als_batch
        reps = max(1, n // batch_entries)
        t0 = timer()
        for _ in range(reps):
            parse(raw)
        return (timer() - t0) / (reps * batch_entries) / 1000

    results[f"ALS protobuf parse, per entry (batch of {batch_entries})"] = batches(nb, als_parse)

    account_time = [0]

    class TimedEngine:
        """The engine, with Engine.account timed (the service calls it directly, or account_response,
        which calls it: both run here against this wrapper)."""

        account_response = Engine.account_response
        _account_parsed = Engine._account_parsed

        def __getattr__(self, name: str) -> Any:
            return getattr(engine, name)

        def account(self, *a: Any, **kw: Any) -> None:
            t0 = timer()
            engine.account(*a, **kw)
            account_time[0] += timer() - t0 - pair

    def als_entry() -> float:
        check = engine.check_fast
        for request in requests:  # reservations to settle, untimed
            check(request)
        als.engine = TimedEngine()  # type: ignore[assignment]
        account_time[0] = 0
        account_now = als.account_now
        t0 = timer()
        for entry in entries:
            account_now(entry)
        took = (timer() - t0) / n / 1000
        als.engine = engine
        account_runs.append(account_time[0] / n / 1000)
        return took

    account_runs: list[float] = []

    results["ALS entry: AccessLogService.account_now (usage from the body + Engine.account)"] = batches(
        nb, als_entry
    )
    results["  ⊂ Engine.account (settle the windows, the ledger's aggregate)"] = statistics.median(
        account_runs
    )

    # the same entry with an SSE snippet (a stream's usage chunk, as the Lua tap keeps it)
    chunk = (REPO / "tests" / "fixtures" / "usage" / "openai_chat_stream_usage.sse").read_bytes()
    event = [e for e in chunk.split(b"\n\n") if b'"usage":{' in e][-1] + b"\n\n"
    sse_entries = [tapped(entry, "sse", event, content_type="text/event-stream") for entry in entries]

    def als_sse_entry() -> float:
        check = engine.check_fast
        for request in requests:
            check(request)
        account_now = als.account_now
        t0 = timer()
        for entry in sse_entries:
            account_now(entry)
        return (timer() - t0) / n / 1000

    results["ALS entry, SSE stream with a usage chunk (account_now)"] = batches(nb, als_sse_entry)

    # the entry's pieces, outside Engine.account
    def entry_pieces() -> float:
        snippet_of, parser_for, end_of = envoy_als.snippet_of, envoy_als.parser_for, envoy_als.end_of
        t_snip = t_parse = t_finish = 0
        for entry in entries:
            t0 = timer()
            headers = entry.request.request_headers
            response_headers = entry.response.response_headers
            snippet = snippet_of(entry)
            t1 = timer()
            parser = parser_for(
                snippet,
                content_type=response_headers.get("content-type"),
                content_encoding=response_headers.get("content-encoding"),
                prompt_tokens_hint=0,
            )
            t2 = timer()
            usage = parser.finish() if parser is not None else None
            conclude_usage(end_of(snippet), parser, usage, 0)
            t3 = timer()
            t_snip += t1 - t0 - pair
            t_parse += t2 - t1 - pair
            t_finish += t3 - t2 - pair
            del headers
        piece_runs["  ⊂ protobuf field access + the Lua tap's snippet (snippet_of: metadata, base64)"].append(
            t_snip / n / 1000
        )
        piece_runs["  ⊂ usage parser fed the body (parser_for: StreamUsage.feed, JSON)"].append(
            t_parse / n / 1000
        )
        piece_runs["  ⊂ usage parser finish + conclude"].append(t_finish / n / 1000)
        return (t_snip + t_parse + t_finish) / n / 1000

    piece_runs: dict[str, list[float]] = {
        k: []
        for k in (
            "  ⊂ protobuf field access + the Lua tap's snippet (snippet_of: metadata, base64)",
            "  ⊂ usage parser fed the body (parser_for: StreamUsage.feed, JSON)",
            "  ⊂ usage parser finish + conclude",
        )
    }
    batches(nb, entry_pieces)
    for name, runs in piece_runs.items():
        results[name] = statistics.median(runs)

    # whole messages of 20 entries (Envoy's buffer_flush_interval of 20 ms at ~1,000 req/s), serialized as
    # the gRPC handler receives them, through stream_access_logs: the compiled scan of the message, the
    # per-entry loop, the loop-busy slices and metrics; and the fixed cost of a message (an empty one)
    class Reader:
        """grpc.aio's servicer context as stream_access_logs uses it: read() until EOF."""

        def __init__(self, messages: list[bytes]) -> None:
            self._messages = iter(messages)

        async def read(self) -> Any:
            return next(self._messages, grpc.aio.EOF)

    def serialized(batch: list[Any], size: int = 20) -> list[bytes]:
        out = []
        for i in range(0, len(batch), size):
            msg = als_pb2.StreamAccessLogsMessage()
            msg.http_logs.log_entry.extend(batch[i : i + size])
            out.append(msg.SerializeToString())
        return out

    loop = asyncio.new_event_loop()

    def als_messages(raw: list[bytes], per: int) -> Callable[[], float]:
        def run() -> float:
            check = engine.check_fast
            for request in requests:
                check(request)
            t0 = timer()
            loop.run_until_complete(als.stream_access_logs(None, Reader(raw)))  # type: ignore[arg-type]
            return (timer() - t0) / per / 1000

        return run

    results["ALS message of 20 JSON entries (stream_access_logs, serialized), per entry"] = batches(
        nb, als_messages(serialized(entries), n)
    )
    results["ALS message of 20 SSE entries (stream_access_logs, serialized), per entry"] = batches(
        nb, als_messages(serialized(sse_entries), n)
    )
    results["ALS message of 20 JSON entries, gzip-compressed bodies, per entry"] = batches(
        nb, als_messages(serialized([gzipped(entry) for entry in entries]), n)
    )
    # the entries the compiled loop hands back to Python: a provider's error (a 429 with its JSON error
    # body, no usage record: what every response costs during a provider incident, or for a tenant whose
    # requests the provider refuses), and a response without the Lua tap's record (a client gone before
    # the response ended; a proxy without the tap)
    error_entries = [tapped(entry, "body", PROVIDER_ERROR, status=429) for entry in entries]
    bare_entries = [tapped(entry, None) for entry in entries]
    # a stream without a usage chunk (no stream_options.include_usage): the tap keeps it whole, as "body"
    no_usage = (REPO / "tests" / "fixtures" / "usage" / "openai_chat_stream_no_usage.sse").read_bytes()
    uncounted_entries = [tapped(entry, "body", no_usage) for entry in sse_entries]
    results["ALS message of 20 provider-error entries (429, no usage record), per entry"] = batches(
        nb, als_messages(serialized(error_entries), n)
    )
    results["ALS message of 20 entries without the Lua tap's record, per entry"] = batches(
        nb, als_messages(serialized(bare_entries), n)
    )
    results["ALS message of 20 streams without a usage chunk (completion counted), per entry"] = batches(
        nb, als_messages(serialized(uncounted_entries), n)
    )
    # an Anthropic stream: the Lua tap keeps its message_start and message_delta events
    events = (REPO / "tests" / "fixtures" / "usage" / "anthropic_stream.sse").read_bytes().split(b"\n\n")
    anthropic = b"".join(event + b"\n\n" for event in events if b'"usage"' in event)
    anthropic_entries = [tapped(entry, "sse", anthropic) for entry in sse_entries]
    results["ALS message of 20 Anthropic streams (message_start, message_delta), per entry"] = batches(
        nb, als_messages(serialized(anthropic_entries), n)
    )
    # a Responses stream: the tap keeps its response.completed event (data.response.usage)
    events = (
        (REPO / "tests" / "fixtures" / "usage" / "openai_responses_stream.sse").read_bytes().split(b"\n\n")
    )
    completed = b"".join(event + b"\n\n" for event in events if b'"usage":{' in event)
    responses_entries = [tapped(entry, "sse", completed) for entry in sse_entries]
    results["ALS message of 20 Responses streams (response.completed), per entry"] = batches(
        nb, als_messages(serialized(responses_entries), n)
    )
    # a long stream without a usage chunk (400 one-token deltas, 57 KB): from 8 KiB its count runs in a
    # worker thread, so the process's CPU is the figure (the loop thread's share beside it)
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06"}
    delta = json.dumps(chunk | {"choices": [{"index": 0, "delta": {"content": "word "}}]}).encode()
    long_stream = b"data: " + delta + b"\n\n"
    long_stream = long_stream * 400 + b"data: [DONE]\n\n"
    long_entries = [tapped(entry, "body", long_stream) for entry in sse_entries]
    long_raw = serialized(long_entries)
    long_loop: list[float] = []

    def long_messages() -> float:
        for request in requests:
            engine.check_fast(request)
        t0, l0 = time.process_time_ns(), timer()
        loop.run_until_complete(als.stream_access_logs(None, Reader(long_raw)))  # type: ignore[arg-type]
        t1, l1 = time.process_time_ns(), timer()
        long_loop.append((l1 - l0) / n / 1000)
        return (t1 - t0) / n / 1000

    results[
        "ALS message of 20 long streams without a usage chunk (57 KB, counted in a thread), process CPU"
    ] = batches(nb, long_messages)
    results["  of which the event loop's thread"] = statistics.median(long_loop)
    if als_fast.RUN is not None:  # the same messages with the compiled loop off: Python per entry
        run, als_fast.RUN = als_fast.RUN, None
        results["  the same JSON message, each entry through _account_scanned (als_fast.RUN off)"] = batches(
            nb, als_messages(serialized(entries), n)
        )
        results["  the same SSE message, each entry through _account_scanned (als_fast.RUN off)"] = batches(
            nb, als_messages(serialized(sse_entries), n)
        )
        als_fast.RUN = run
    empty = als_pb2.StreamAccessLogsMessage()
    empty.http_logs.SetInParent()
    results["ALS per-message fixed cost: an empty message (stream_access_logs), per message"] = batches(
        nb, als_messages([empty.SerializeToString()] * n, n)
    )
    loop.close()

    stamp = time.strftime("%Y-%m-%d %H:%M")
    scans = "compiled" if native.usage is not None else "python"
    print(f"# nexus-authz per-request CPU, in-process, from Envoy's recorded bytes ({stamp})\n")
    print(
        f"- fast path: {native.PATH}, access-log scans: {scans}; Python {sys.version.split()[0]}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"- fixtures: {fx.meta['envoy'].split()[-1]} ({fx.meta['envoy_config']}); check {len(fx.check)} B; "
        f"{args.batches} batches × {n} requests, medians\n"
    )
    print("| piece | µs/request |\n|---|---|")
    for name, us in results.items():
        print(f"| {name} | {us:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"path": native.PATH, "us_per_request": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
