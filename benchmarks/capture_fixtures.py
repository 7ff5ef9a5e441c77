"""Record what the real Envoy sends nexus-authz, as fixtures for bench_breakdown.py and the tests.

    .venv/bin/python benchmarks/capture_fixtures.py      # ~10 s; rewrites benchmarks/fixtures/

Starts the mock upstream, a recorder in nexus-authz's place (an HTTP/1.1 server on the ext_authz Unix
socket that allows every request, and a gRPC server taking the access-log stream as raw bytes) and Envoy
with the shipped envoy/envoy.yaml (bench_envoy's http-uds-issue15 scenario: ext_authz with the body, the
Lua usage tap, the gRPC access log). Then sends the benchmark's chat request with FIXTURE_SECRET a few
times, one at a time, and a burst, and writes:

- envoy_ext_authz_check.http: one ext_authz check request, byte for byte as Envoy wrote it;
- envoy_als_message_1.bin: the first StreamAccessLogsMessage of the stream (identifier + one entry);
- envoy_als_message_batch.bin: a later message carrying the burst's entries (as many as Envoy batched);
- fixtures.json: the key secret, the request, the Envoy version, and how many entries each message has.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import bench_envoy as be  # noqa: E402
import grpc  # noqa: E402

from nexus_authz.demo import procs  # noqa: E402

FIXTURES = REPO / "benchmarks" / "fixtures"
FIXTURE_SECRET = "nx-fixture-0123456789abcdef0123456789abcdef"
ALS_METHOD = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"


class Recorder:
    def __init__(self) -> None:
        self.http_reads: list[bytes] = []
        self.als_messages: list[bytes] = []
        self.lock = threading.Lock()


async def serve(recorder: Recorder, socket_path: str, grpc_port: int, stop: asyncio.Event) -> None:
    import httptools

    class Check(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            with recorder.lock:
                recorder.http_reads.append(data)
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            # allowed, with the identity headers nexus-authz would add (the access log filters on them)
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nx-nexus-key-id: k_fixture\r\nx-nexus-tenant: bench\r\n"
                b"content-length: 0\r\n\r\n"
            )

    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(Check, socket_path)

    async def stream(requests, context):  # type: ignore[no-untyped-def]
        async for raw in requests:
            with recorder.lock:
                recorder.als_messages.append(raw)
        return b""

    handler = grpc.method_handlers_generic_handler(
        "envoy.service.accesslog.v3.AccessLogService",
        {"StreamAccessLogs": grpc.stream_unary_rpc_method_handler(stream)},  # raw bytes in and out
    )
    gserver = grpc.aio.server()
    gserver.add_generic_rpc_handlers((handler,))
    gserver.add_insecure_port(f"127.0.0.1:{grpc_port}")
    await gserver.start()
    await stop.wait()
    await gserver.stop(0)
    server.close()


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="nexus-capture-"))
    socket_path = str(tmp / "authz.sock")
    grpc_port = procs.free_port()
    recorder = Recorder()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(
        target=lambda: loop.run_until_complete(serve(recorder, socket_path, grpc_port, stop)), daemon=True
    )
    processes: list[subprocess.Popen[bytes]] = []
    try:
        thread.start()
        procs.wait_unix_socket(socket_path, timeout=10)
        mock, upstream_port = be.start_mock(tmp)
        processes.append(mock)
        scenario = be.SCENARIOS["http-uds-issue15"]
        info = be.StackInfo(upstream_port, socket_path, grpc_port)
        port, admin_port = procs.free_port(), procs.free_port()
        text = be.render_envoy(scenario, info, port, admin_port)
        envoy = procs.start_envoy(
            text, admin_port=admin_port, workdir=tmp, log_path=tmp / "envoy.log", concurrency=1
        )
        processes.append(envoy)
        procs.wait_envoy_ready(admin_port, timeout=30, process=envoy, log_path=tmp / "envoy.log")
        request = be.chat_request(FIXTURE_SECRET)
        head, _, body = request.partition(b"\r\n\r\n")

        def send() -> int:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
            conn.request("POST", be.PATH, body=body, headers=headers)
            status = conn.getresponse().status
            conn.close()
            return status

        statuses = []
        for _ in range(3):  # one at a time: one entry per access-log message (flushed every 0.2 s)
            statuses.append(send())
            time.sleep(0.6)
        first_batch = len(recorder.als_messages)
        for _ in range(30):  # a burst: Envoy batches its entries
            statuses.append(send())
        deadline = time.monotonic() + 5
        while len(recorder.als_messages) <= first_batch and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        if set(statuses) != {200} or not recorder.http_reads or len(recorder.als_messages) <= first_batch:
            print(
                f"capture failed: statuses {statuses}, {len(recorder.als_messages)} ALS messages",
                file=sys.stderr,
            )
            print((tmp / "envoy.log").read_text()[-3000:], file=sys.stderr)
            return 1
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=5)
        for process in reversed(processes):
            procs.stop_process(process, timeout=10)
    from envoy.service.accesslog.v3 import als_pb2

    def entries(raw: bytes) -> int:
        return len(als_pb2.StreamAccessLogsMessage.FromString(raw).http_logs.log_entry)

    check = recorder.http_reads[0]
    batch = max(recorder.als_messages[first_batch:], key=entries)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    (FIXTURES / "envoy_ext_authz_check.http").write_bytes(check)
    (FIXTURES / "envoy_als_message_1.bin").write_bytes(recorder.als_messages[0])
    (FIXTURES / "envoy_als_message_batch.bin").write_bytes(batch)
    envoy_version = subprocess.run(
        [procs.find_envoy(), "--version"], capture_output=True, text=True
    ).stdout.strip()
    meta = {
        "secret": FIXTURE_SECRET,
        "request": request.decode(),
        "envoy": envoy_version,
        "envoy_config": "envoy/envoy.yaml (bench_envoy scenario http-uds-issue15)",
        "check_bytes": len(check),
        "als_message_1_entries": entries(recorder.als_messages[0]),
        "als_message_batch_entries": entries(batch),
        "captured": time.strftime("%Y-%m-%d"),
    }
    (FIXTURES / "fixtures.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
