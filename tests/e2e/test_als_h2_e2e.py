"""The access log over HTTP/2 on the check socket (adapters/als_h2.py) with the real Envoy: a batch far
over HTTP/2's default 64 KiB windows and 16 KiB frames (a compressed response the Lua tap keeps whole,
~0.7 MB of base64 in one entry) arrives whole and is accounted exactly, and the stream goes on serving
the entries after it."""

from __future__ import annotations

import base64
import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.stack import Stack
from tests.e2e.test_conformance_e2e import CONFIG, ledger_row  # a ledger, a metered plan
from tests.helpers import KeySpec

BIG, SMALL = KeySpec("big", extra={"plan": "metered"}), KeySpec("small", extra={"plan": "metered"})
REQUEST = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a long answer"}]}
USAGE = {"prompt_tokens": 11, "completion_tokens": 123_456, "total_tokens": 123_467}


def big_completion() -> bytes:
    """A chat completion whose text does not compress (random base64): ~0.55 MB gzip-encoded, under the
    Lua tap's 1 MiB cap for a compressed body, which it keeps whole for nexus-authz to decode."""
    text = base64.b64encode(os.urandom(540_000)).decode()
    body = {
        "id": "chatcmpl-big",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": USAGE,
    }
    return json.dumps(body).encode()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    workdir = Path(tempfile.mkdtemp(prefix="nx-h2-"))
    fixtures = workdir / "fixtures"
    fixtures.mkdir()
    (fixtures / "big.json").write_bytes(big_completion())
    s = Stack(
        workdir=workdir, keys=(BIG, SMALL), extra_config=CONFIG, mock_options={"fixtures_dir": str(fixtures)}
    )
    try:
        s.start()
        yield s
    finally:
        s.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_batch_over_the_default_windows_arrives_whole_and_the_stream_goes_on(stack: Stack) -> None:
    assert stack.als_on_socket and stack.mode == "http"  # Envoy's nexus_als is the check socket
    compressed = len(gzip.compress((stack.workdir / "fixtures" / "big.json").read_bytes()))
    assert 300_000 < compressed < 1 << 20  # kept whole by the Lua tap, far over 64 KiB
    resp = stack.post(
        "/v1/chat/completions",
        REQUEST,
        key=BIG.secret,
        x_mock_fixture="big.json",
        x_mock_content_encoding="gzip",
        x_mock_chunk_bytes="65536",
    )
    assert resp.status == 200
    row = ledger_row(stack, "big")
    assert (row.prompt_tokens, row.completion_tokens) == (11, 123_456)  # decoded from the whole body
    small = stack.post("/v1/chat/completions", REQUEST, key=SMALL.secret)
    assert small.status == 200
    assert ledger_row(stack, "small").completion_tokens == small.json()["usage"]["completion_tokens"]
