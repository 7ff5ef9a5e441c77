"""Which fast path runs (nexus_authz/native/): the compiled extension when it built, the pure-Python path
when it did not or when NEXUS_AUTHZ_PURE=1; a start-up log line and a metric say which."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nexus_authz import metrics, native
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from tests.helpers import KeySpec, write_config

CODE = "from nexus_authz import native; print(native.PATH)"


def _path_in_subprocess(pure: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    if pure is not None:
        env[native.PURE_ENV] = pure
    done = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_pure_forces_the_python_path() -> None:
    assert _path_in_subprocess("1") == "python"
    expected = (
        "compiled" if native.http1 is not None or native.WHY_PURE.startswith(native.PURE_ENV) else "python"
    )
    assert _path_in_subprocess(None) == expected
    assert _path_in_subprocess("0") == expected


def test_startup_log_line_says_which_path(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="nexus_authz.native"):
        native.announce()
    (record,) = [r for r in caplog.records if r.name == "nexus_authz.native"]
    assert record.native_path == native.PATH  # type: ignore[attr-defined]
    assert ("compiled" in record.getMessage()) == (native.PATH == "compiled")


def test_metrics_say_which_path_runs(tmp_path: Path) -> None:
    engine = Engine.from_settings(load_settings(str(write_config(tmp_path, KeySpec("a")))))
    text = metrics.render(metrics.make_registry(engine)).decode()
    assert f'nexus_authz_native_path{{path="{native.PATH}"}} 1.0' in text
    assert text.count("nexus_authz_native_path{") == 1
