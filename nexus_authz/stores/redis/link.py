"""The link to Redis: one pipelined connection, per-call timeouts, a circuit breaker, health figures.

Every script call of a store goes through `RedisLink.call`, which queues it; the calls queued during one
event-loop iteration (and those queued while the previous pipeline was on the wire) leave together as
one pipeline on one dedicated connection, so N concurrent decisions cost one round trip, not N. One
pipeline is in flight at a time, which also keeps every call in submission order (the write-behind
reconciliation is sent ahead of the calls that follow it).

Failures are a defined behaviour, not a hang: a pipeline that does not complete within `timeout` is
abandoned (the connection is dropped, so no late reply can be mistaken for the next one) and its
callers get `StoreUnavailable` (transient); a caller also stops waiting after `timeout`, whatever is
ahead of it.
The breaker opens after `failures` consecutive failed pipelines: then calls fail at once without
touching the network, for `reset` seconds; then one pipeline is let through as a probe (half-open):
success closes the breaker, failure opens it again. Each change of state is logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from redis.exceptions import NoScriptError, RedisError, ResponseError

from nexus_authz.core.ports import StoreUnavailable
from nexus_authz.stores.redis.lua import SCRIPT, SCRIPT_SHA

__all__ = ["Breaker", "Health", "RedisLink"]

log = logging.getLogger("nexus_authz.redis")

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"


@dataclass(frozen=True, slots=True)
class Health:
    """For metrics, logs and readiness.

    `state`: ok (Redis answering), degraded (Redis away and deciding with local limits, or reconciling
    the write-behind queue), down (Redis away and failing closed: checks get 503).
    """

    state: str
    mode: str
    failure_mode: str
    breaker: str
    last_error: str | None
    last_error_at: float | None
    queue: int  # write-behind entries waiting for Redis
    queue_dropped: int  # entries dropped because the queue was full (never reach Redis)
    calls: int  # script calls sent
    pipelines: int  # round trips
    failures: int  # failed pipelines (timeouts, connection errors)
    timeouts: int  # callers that stopped waiting
    rejected: int  # calls refused by the open breaker without touching the network
    fallbacks: int  # decisions made locally because Redis was away (fail_open)
    unavailable: int  # decisions refused with StoreUnavailable (fail_closed)
    latency_ms: float  # moving average of the pipeline round trip
    latency_max_ms: float  # largest round trip since start

    @property
    def ready(self) -> bool:
        return self.state != "down"


class Breaker:
    """Closed / open / half-open. `clock` is monotonic seconds (injectable for tests)."""

    __slots__ = ("_clock", "_failures", "_opened_at", "_probing", "failures", "reset", "state")

    def __init__(self, failures: int, reset: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.reset = reset
        self._clock = clock
        self.state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    def allow(self) -> bool:
        """May a pipeline go out now? In half-open, only the one probe."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if self._clock() - self._opened_at < self.reset:
                return False
            self.state = HALF_OPEN
            self._probing = False
        if self._probing:
            return False
        self._probing = True
        return True

    def would_allow(self) -> bool:
        """`allow` without taking the probe: is Redis worth trying (for the local fast path)?"""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return self._clock() - self._opened_at >= self.reset
        return not self._probing

    def success(self) -> None:
        self.state = CLOSED
        self._failures = 0
        self._probing = False

    def failure(self) -> None:
        self._failures += 1
        self._probing = False
        if self.state == HALF_OPEN or self._failures >= self.failures:
            self.state = OPEN
            self._opened_at = self._clock()


# A queued item: (kind, keys, args, future). kind "M": one request (its segment of an M call: op, now,
# charged_at, windows, spec/value pairs), merged with the others of its pipeline into one script call;
# kind "C": a whole script call of its own (the write-behind's pulls).
_Item = tuple[
    str, Sequence[bytes], Sequence[bytes], "asyncio.Future[Any]", "Callable[[Any], None] | None", float
]  # kind, keys, args, future, on_reply, deadline (loop time)
_Calls = list[tuple[Sequence[bytes], Sequence[bytes]]]
MAX_PER_CALL: Final = 256  # requests per M call: bounds the time one script call holds Redis


def pack(parts: Sequence[bytes]) -> bytes:
    """One command in RESP (all arguments already bytes: cheaper than the generic encoder)."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


class RedisLink:
    """One store's connection to Redis. Not thread-safe: one event loop."""

    def __init__(
        self,
        client: Any,
        *,
        timeout: float,
        breaker: Breaker,
        cluster: bool = False,
        name: str = "redis",
        margin: bytes = b"5000",
        gauge_ttl: bytes = b"330000",
        on_state: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.timeout = timeout
        self.breaker = breaker
        self.cluster = cluster
        self.name = name
        self._m_header = (b"EVALSHA", SCRIPT_SHA.encode())
        self._m_args = (b"M", margin, gauge_ttl)
        self._on_state = on_state
        self._conn: Any = None
        self._queue: list[_Item] = []
        self._sending = False
        self._scheduled = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # hook: whole calls to put in front of the next pipeline (the write-behind flush) plus a token for
        # `after_send`, which gets their replies (None if the pipeline failed) and whether they may have
        # been applied all the same (the failure came after the request was written)
        self.before_send: Callable[[], tuple[_Calls, Any] | None] | None = None
        self.after_send: Callable[[Any, list[Any] | None, bool], None] | None = None
        self._wrote = False  # bytes of the current pipeline may have reached Redis
        # figures
        self.requests = 0
        self.calls = 0
        self.pipelines = 0
        self.failures = 0
        self.timeouts = 0
        self.rejected = 0
        self.latency = 0.0
        self.latency_max = 0.0
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> bool:
        """Load the script (so the first decision does not pay for it). False if Redis is not there yet:
        the store still starts, per its failure mode, and the breaker takes it from there."""
        try:
            await asyncio.wait_for(self._load_script(), max(self.timeout * 4, 0.5))
            return True
        except (TimeoutError, RedisError, OSError) as exc:
            self._failed(exc)
            return False

    async def _load_script(self) -> None:
        await self.client.script_load(SCRIPT)  # a cluster client sends it to every primary

    async def close(self) -> None:
        self._closed = True
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), self.timeout * 2)
            if not self._task.done():
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        _fail_all(self._queue, StoreUnavailable("store closed", transient=False))
        self._queue.clear()
        await self._drop_connection()
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()

    # -- calls -------------------------------------------------------------------------------------------
    def submit(
        self,
        kind: str,
        keys: Sequence[bytes],
        args: Sequence[bytes],
        on_reply: Callable[[Any], None] | None = None,
    ) -> asyncio.Future[Any]:
        """Queue a request ("M") or a whole call ("C"); the future resolves to its reply or raises
        StoreUnavailable. `on_reply` runs as the reply lands, before anything else is sent or decided
        (even if the caller stopped waiting): state pulled back must be applied before the next flush."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            fut.set_exception(StoreUnavailable("store closed", transient=False))
            return fut
        self._queue.append((kind, keys, args, fut, on_reply, loop.time() + self.timeout))
        self.kick()
        return fut

    async def request(self, keys: Sequence[bytes], segment: Sequence[bytes]) -> bytes:
        """One request, answered within `timeout` or StoreUnavailable.

        The deadline needs no timer per call: the send loop fails what waited in the queue past it, and
        bounds each pipeline by the deadline of the oldest call in it (so by every caller's own)."""
        return await self.submit("M", keys, segment)  # type: ignore[no-any-return]

    async def call(
        self, keys: Sequence[bytes], args: Sequence[bytes], on_reply: Callable[[Any], None] | None = None
    ) -> Any:
        """One whole script call (arguments after the SHA and key count), within `timeout`."""
        return await self.submit("C", keys, args, on_reply)

    async def wait_all(self, futures: Sequence[asyncio.Future[Any]]) -> list[Any]:
        """Wait for submitted futures (each has its deadline)."""
        if not futures:
            return []
        return list(await asyncio.gather(*futures))

    def kick(self) -> None:
        """Make sure a pipeline goes out after this loop iteration (if anything is waiting)."""
        if self._sending or self._scheduled or self._closed:
            return
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self._launch)

    def _launch(self) -> None:
        self._scheduled = False
        if self._sending or self._closed:
            return
        self._sending = True
        self._task = asyncio.get_running_loop().create_task(self._send_loop())

    def _build(self, batch: list[_Item]) -> tuple[_Calls, list[tuple[int, int]]]:
        """The script calls for a batch, and for each item (call index, position in that call's reply;
        -1: the whole reply). Requests are merged into M calls, each with a table of the distinct specs
        its requests use (a plan's few specs, not one copy per window)."""
        calls: _Calls = []
        where: list[tuple[int, int]] = []
        groups: list[_Group] = []
        for kind, keys, args, *_ in batch:
            if kind == "C":
                where.append((len(calls), -1))
                calls.append((keys, args))
            elif self.cluster:  # a call touches one hash slot: each request on its own
                group = _Group()
                group.add(keys, args)
                where.append((len(calls), 0))
                calls.append(group.call(self._m_args))
            else:
                if not groups or groups[-1].count == MAX_PER_CALL:
                    groups.append(_Group())
                where.append((-len(groups), groups[-1].count))
                groups[-1].add(keys, args)
        first_group = len(calls)
        for group in groups:
            calls.append(group.call(self._m_args))
        if groups:
            where = [(first_group - 1 - call, pos) if call < 0 else (call, pos) for call, pos in where]
        return calls, where

    async def _send_loop(self) -> None:
        try:
            while True:
                front = self.before_send() if self.before_send is not None else None
                if not self._queue and front is None:
                    return
                batch, self._queue = self._queue, []
                now = asyncio.get_running_loop().time()
                live: list[_Item] = []
                for item in batch:
                    fut = item[3]
                    if fut.done():  # the caller gave up meanwhile
                        continue
                    if item[5] <= now:  # waited its whole timeout behind earlier pipelines
                        self.timeouts += 1
                        fut.set_exception(StoreUnavailable(f"no answer within {self.timeout * 1000:.0f} ms"))
                        continue
                    live.append(item)
                batch = live
                if not batch and front is None:
                    continue
                if not self.breaker.allow():
                    self.rejected += len(batch)
                    _fail_all(batch, StoreUnavailable(f"circuit breaker {self.breaker.state}"))
                    if self.after_send is not None and front is not None:
                        self.after_send(front[1], None, False)
                    return
                calls, where = self._build(batch)
                nfront = len(front[0]) if front is not None else 0
                if front is not None:
                    calls = [*front[0], *calls]
                started = time.perf_counter()
                budget = (batch[0][5] - now) if batch else self.timeout  # the oldest caller's deadline
                self._wrote = False
                try:
                    replies = await asyncio.wait_for(self._pipeline(calls), budget)
                except Exception as exc:
                    if not isinstance(exc, TimeoutError | RedisError | OSError | StoreUnavailable):
                        # a bug, not Redis: say so loudly, but let the callers fall back like for an outage
                        log.exception("redis counter store: unexpected error", extra={"store": self.name})
                    await self._drop_connection()
                    self._failed(exc)
                    _fail_all(batch, StoreUnavailable(_describe(exc, self.timeout)))
                    if self.after_send is not None and front is not None:
                        self.after_send(front[1], None, self._wrote)
                    if not self._queue:
                        return  # the write-behind retries at its next flush, callers at their next call
                    continue  # calls queued meanwhile: the breaker decides whether they go out
                elapsed = time.perf_counter() - started
                self.latency = elapsed if not self.pipelines else self.latency * 0.95 + elapsed * 0.05
                self.latency_max = max(self.latency_max, elapsed)
                self.pipelines += 1
                self.calls += len(calls)
                self.requests += len(batch)
                was = self.breaker.state
                self.breaker.success()
                if was != CLOSED and self._on_state is not None:
                    self._on_state()
                if self.after_send is not None and front is not None:
                    self.after_send(front[1], replies[:nfront], True)
                for (_, _, _, fut, on_reply, _), (call, pos) in zip(batch, where, strict=True):
                    reply = replies[nfront + call]
                    if pos >= 0:
                        reply = reply[pos]
                    if on_reply is not None:
                        on_reply(reply)
                    if not fut.done():
                        fut.set_result(reply)
        finally:
            self._sending = False
            if self._queue and not self._closed:
                self.kick()

    async def _pipeline(self, calls: _Calls) -> list[Any]:
        """Send the calls as one pipeline; reload the script once if Redis lost it (restart, FLUSH)."""
        replies = await self._send(calls)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            await self._load_script()
            again = await self._send([calls[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, ResponseError):
                # NOAUTH, LOADING, READONLY, OOM, BUSY, MOVED...: Redis cannot serve us right now. (A bug
                # in the script would land here too: it shows as the health's last_error.)
                raise StoreUnavailable(f"redis error: {reply}")
        return replies

    async def _send(self, calls: _Calls) -> list[Any]:
        sha = self._m_header
        if self.cluster:
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                pipe.execute_command("EVALSHA", SCRIPT_SHA, len(keys), *keys, *args)
            self._wrote = True
            return list(await pipe.execute(raise_on_error=False))
        conn = self._conn
        if conn is None:
            conn = self._conn = await self.client.connection_pool.get_connection()
        packed = b"".join(pack((*sha, b"%d" % len(keys), *keys, *args)) for keys, args in calls)
        self._wrote = True
        await conn.send_packed_command(packed, check_health=False)
        replies: list[Any] = []
        for _ in calls:
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:  # the reply was read: the stream is still in step
                replies.append(exc)
        return replies

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(RedisError, OSError):
                await conn.disconnect(nowait=True)
            with contextlib.suppress(RedisError, OSError):
                await self.client.connection_pool.release(conn)

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.last_error = _describe(exc, self.timeout)
        self.last_error_at = time.time()
        was = self.breaker.state
        self.breaker.failure()
        if self.breaker.state != was and self._on_state is not None:
            self._on_state()


class _Group:
    """One M call being built."""

    __slots__ = ("args", "count", "keys", "specs")

    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self.args: list[bytes] = []
        self.specs: dict[bytes, bytes] = {}  # spec -> its index in the table, as text
        self.count = 0

    def add(self, keys: Sequence[bytes], segment: Sequence[bytes]) -> None:
        """A request: op, now, charged_at, windows, then (spec, value) per window."""
        self.keys.extend(keys)
        args = self.args
        args.extend(segment[:4])
        specs = self.specs
        for j in range(4, len(segment), 2):
            spec = segment[j]
            index = specs.get(spec)
            if index is None:
                index = specs[spec] = b"%d" % (len(specs) + 1)
            args.append(index)
            args.append(segment[j + 1])
        self.count += 1

    def call(self, head: Sequence[bytes]) -> tuple[Sequence[bytes], Sequence[bytes]]:
        return self.keys, [*head, b"%d" % self.count, b"%d" % len(self.specs), *self.specs, *self.args]


def _fail_all(batch: list[_Item], error: StoreUnavailable) -> None:
    for item in batch:
        fut = item[3]
        if not fut.done():
            fut.set_exception(error)  # every future not done has a waiter (give-ups are cancelled)


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timeout after {timeout * 1000:.0f} ms"
    text = str(exc) or type(exc).__name__
    return text[:300]
