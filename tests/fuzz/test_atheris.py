"""The coverage-guided targets (tests/fuzz/atheris_targets.py), each for a bounded number of inputs from a
seed corpus, in a subprocess (libFuzzer owns the process). Skipped when atheris is not installed.

NEXUS_FUZZ_ATHERIS sets the runs per target (default 3000, ~2 s each here); NEXUS_FUZZ_LONG multiplies it.
A failing input is written to the test's temporary directory (crash-*) and the target's output is shown.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz._support import examples

atheris = pytest.importorskip("atheris")

REPO = Path(__file__).resolve().parents[2]
RUNS = int(os.environ.get("NEXUS_FUZZ_ATHERIS", "3000") or 3000)
TARGETS = ("http", "http-native", "check", "rls", "extproc", "als", "usage", "body", "body-native")


@pytest.mark.parametrize("target", TARGETS)
def test_atheris_target(target: str, tmp_path: Path) -> None:
    if target in ("http-native", "body-native"):
        from nexus_authz import native

        if native.http1 is None and os.environ.get(native.PURE_ENV, "") not in ("", "0"):
            pytest.skip("NEXUS_AUTHZ_PURE is set: the compiled path is not loaded")
    from tests.fuzz.atheris_targets import seeds

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(seeds(target)):
        (corpus / f"seed-{i}").write_bytes(seed)
    runs = examples(RUNS)
    command = [
        sys.executable,
        "-W",
        "ignore",
        "-m",
        "tests.fuzz.atheris_targets",
        target,
        f"-runs={runs}",
        f"-max_total_time={max(60, runs // 50)}",
        "-timeout=10",  # one input taking longer is a hang
        "-rss_limit_mb=3072",
        "-max_len=65536",
        f"-artifact_prefix={tmp_path}/",
        str(corpus),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "NEXUS_ATHERIS_DIR": str(tmp_path / "work")}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=600, check=False)
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, f"atheris target {target} failed:\n{output[-6000:]}"
    assert f"Done {runs} runs" in output or "Done" in output, output[-2000:]
