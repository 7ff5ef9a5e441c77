"""A calendar month through the real Envoy, on a server whose clock the test moves (NEXUS_TEST_CLOCK_FILE,
a test-only hook): a monthly budget spent out refuses with 429 insufficient_quota and reset headers that
point at the 1st of next month, 00:00 in the configured zone; once the clock passes that instant, requests
are admitted again."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import openai
import pytest

from tests.e2e.stack import Stack
from tests.helpers import KeySpec

CONFIG = """
timezone: Europe/Berlin
plans:
  monthly:
    limits:
      - {usd: 0.002, per: month, calendar: true}
      - {tokens: 1000000, per: month, calendar: true}
prices:
  "gpt-4o*": {input: 2.5, output: 10}
"""
KEY = KeySpec("monthly", extra={"plan": "monthly"})
BERLIN = ZoneInfo("Europe/Berlin")
MARCH_1 = datetime(2024, 3, 1, tzinfo=BERLIN).timestamp()  # 2024-02-29 23:00 UTC


def go_duration(text: str) -> float:
    """OpenAI's reset format ("59m58.5s", "1h0m0s") in seconds."""
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:([\d.]+)s)?(?:(\d+)ms)?", text)
    assert m is not None, text
    h, mins, s, ms = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mins * 60 + s + ms / 1000


def set_clock(path: Path, fake_now: float) -> None:
    """Move the server's clock so that it reads `fake_now` now (written whole: rename)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(repr(fake_now - time.time()))
    tmp.replace(path)


@pytest.fixture
def stack() -> object:
    workdir = Path(tempfile.mkdtemp(prefix="nx-cal-"))
    clock = workdir / "clock"
    set_clock(clock, MARCH_1 - 3600)  # 2024-02-29 23:00 in Berlin: the last hour of February
    os.environ["NEXUS_TEST_CLOCK_FILE"] = str(clock)  # read by the server process start_nexus spawns
    s = Stack(workdir=workdir, mode="http", keys=(KEY,), extra_config=CONFIG)
    try:
        s.start()
        del os.environ["NEXUS_TEST_CLOCK_FILE"]
        yield s, clock
    finally:
        os.environ.pop("NEXUS_TEST_CLOCK_FILE", None)
        s.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_monthly_calendar_budget_refuses_until_the_month_begins(stack: tuple[Stack, Path]) -> None:
    s, clock = stack
    client = openai.OpenAI(api_key=KEY.secret, base_url=s.gateway + "/v1", max_retries=0)
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 40}
    refused = None
    for _ in range(60):  # each request reserves ~$0.0004 and settles what the mock upstream reports
        resp = s.post("/v1/chat/completions", chat, key=KEY.secret)
        if resp.status == 429:
            # Refused while earlier requests' reservations were still unsettled? The access log settles
            # them within its flush (20 ms) and gives back what they reserved beyond their usage: spent
            # is a refusal that stands once every admitted request is settled.
            time.sleep(0.3)
            resp = s.post("/v1/chat/completions", chat, key=KEY.secret)
            if resp.status == 429:
                refused = resp
                break
        assert resp.status == 200, resp.body
    assert refused is not None, "the monthly budget never ran out"
    error = refused.json()["error"]
    assert error["type"] == "insufficient_quota" and error["code"] == "insufficient_quota"
    # every reset header points at 2024-03-01 00:00 Berlin, an hour after the fake clock's start
    to_march = MARCH_1 - (time.time() + float(clock.read_text()))  # as the server's clock reads now
    slack = 3
    assert abs(int(refused.headers["retry-after"]) - to_march) <= slack
    budget = re.search(r'"usd/calendar-month";r=\d+;t=(\d+)', refused.headers["ratelimit"])
    assert budget is not None and abs(int(budget.group(1)) - to_march) <= slack
    assert abs(go_duration(refused.headers["x-ratelimit-reset-tokens"]) - to_march) <= slack
    assert "w=2592000" in refused.headers["ratelimit-policy"]
    # the OpenAI SDK sees the same refusal
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(**chat)  # type: ignore[call-overload]
    assert info.value.status_code == 429 and "insufficient_quota" in str(info.value.body)

    set_clock(clock, MARCH_1 + 1)  # the server's clock passes the start of March in Berlin
    completion = client.chat.completions.create(**chat)  # type: ignore[call-overload]
    assert completion.usage is not None and completion.usage.total_tokens > 0
    resp = s.post("/v1/chat/completions", chat, key=KEY.secret)
    assert resp.status == 200, resp.body
    # March runs until April 1st, 00:00 in Berlin (a 31-day month with the switch to summer time)
    april_1 = datetime(2024, 4, 1, tzinfo=BERLIN).timestamp()
    assert abs(go_duration(resp.headers["x-ratelimit-reset-tokens"]) - (april_1 - MARCH_1)) <= 30
    client.close()
