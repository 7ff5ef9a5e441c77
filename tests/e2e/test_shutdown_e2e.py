"""SIGTERM loses nothing: every response's usage is in the ledger after a graceful stop."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from nexus_authz.stores.ledger import query_db
from tests.e2e.stack import Stack
from tests.helpers import KeySpec

# A flush interval far longer than the test: whatever is in the ledger got there by the final flush.
CONFIG = """
ledger:
  path: usage.sqlite3
  flush_interval: 1h
  batch_size: 100000
"""
KEY = KeySpec("drain")
N = 40


def test_sigterm_flushes_every_record() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="nx-term-"))
    stack = Stack(workdir=workdir, keys=(KEY,), extra_config=CONFIG)
    try:
        stack.start()
        expected_prompt = expected_completion = 0
        for i in range(N):
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"request {i}"}]}
            if i % 2:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            resp = stack.post("/v1/chat/completions", body, key=KEY.secret)
            assert resp.status == 200
            if not i % 2:
                usage = resp.json()["usage"]
                expected_prompt += usage["prompt_tokens"]
                expected_completion += usage["completion_tokens"]
        assert stack.stop_nexus() == 0  # SIGTERM: drain, final flush, exit 0
        rows = query_db(workdir / "usage.sqlite3", key_id="drain")
        assert sum(r.requests for r in rows) == N
        # the non-streaming half alone is known here; the streams add the rest
        assert sum(r.prompt_tokens for r in rows) > expected_prompt
        assert sum(r.completion_tokens for r in rows) > expected_completion
        assert '"msg": "stopped"' in stack.nexus_log()
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
