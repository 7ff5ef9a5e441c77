"""The profile-guided build of the native modules (setup.py, nexus_authz/tools/pgo_train.py): no
instrumented module is ever left to load, the modules say how they were built, and the training drives the
compiled paths (or says why it cannot, which makes the build fall back to a plain one).

That a PGO-built module answers as the pure path does is the differential tests' job (tests/test_native*.py,
tests/adapters/test_http_native.py, tests/fuzz) when the suite runs on that build (.ci/setup makes it)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nexus_authz import native

REPO = Path(__file__).resolve().parents[1]
NATIVE = REPO / "nexus_authz" / "native"
TRAIN = [sys.executable, "-m", "nexus_authz.tools.pgo_train"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXUS_AUTHZ_", "GCOV_"))}
    env.update({"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", **extra})
    return env


def _built() -> list[Path]:
    return sorted(NATIVE.glob("*.so"))


def test_no_built_module_is_instrumented() -> None:
    """An instrumented module (-fprofile-generate) runs slower and writes .gcda files at exit: the build
    replaces or deletes every one it makes."""
    if not _built():
        pytest.skip("no native module is built here (pure-Python install)")
    for path in _built():
        data = path.read_bytes()
        assert b"__gcov_" not in data, f"{path.name} is instrumented (it links libgcov's __gcov_ functions)"


def test_native_says_how_it_was_built(caplog: pytest.LogCaptureFixture) -> None:
    if native.PATH == "python":
        assert (native.BUILD, native.LABEL) == ("", "python")
    else:
        assert native.BUILD in ("PGO", "plain", "")  # "": a build from before the record
        pgo = native.BUILD == "PGO"
        assert native.LABEL == "compiled (PGO)" if pgo else native.LABEL == "compiled"
        from nexus_authz.native import _build  # type: ignore[attr-defined]

        assert _build.KIND == native.BUILD
        flag = 1 if pgo else 0
        assert flag == _build.PGO
    with caplog.at_level(logging.INFO, logger="nexus_authz.native"):
        native.announce()
    (record,) = [r for r in caplog.records if r.name == "nexus_authz.native"]
    head = f"{native.LABEL} fast path" if native.PATH == "compiled" else "pure-Python fast path"
    assert record.getMessage().startswith(head)


def test_an_instrumented_build_is_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if native.PATH == "python":
        pytest.skip("no compiled module loaded")
    monkeypatch.setattr(native, "BUILD", "instrumented")
    with caplog.at_level(logging.INFO, logger="nexus_authz.native"):
        native.announce()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "instrumented" in warnings[0] and "setup.py build_ext" in warnings[0]


def test_the_training_drives_the_compiled_paths(tmp_path: Path) -> None:
    if not _built():
        pytest.skip("no native module is built here (pure-Python install)")
    done = subprocess.run(
        [*TRAIN, "--rounds", "1"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    # 1,000 checks of which 4 in 50 are refused (but the rate-limited key's first two), each admitted one
    # accounted from its access-log entry
    assert done.stdout.startswith("trained on 1000 checks (922 admitted) and 922 access-log entries"), (
        done.stdout
    )
    assert list(tmp_path.iterdir()) == []  # nothing written outside its own temporary directory


def test_the_training_refuses_what_is_not_the_instrumented_build(tmp_path: Path) -> None:
    """What makes the build fall back to a plain one: the training exits 1, saying why."""
    done = subprocess.run(
        [*TRAIN], cwd=tmp_path, env=_env(NEXUS_AUTHZ_PURE="1"), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert done.stderr.startswith("pgo_train: the compiled path is not loaded (NEXUS_AUTHZ_PURE is set)")
    check = subprocess.run([*TRAIN, "--check"], cwd=tmp_path, env=_env(), capture_output=True, timeout=120)
    assert check.returncode == 0, check.stderr
    if _built():
        done = subprocess.run(
            [*TRAIN, "--expect", str(NATIVE)], cwd=tmp_path, env=_env(), capture_output=True, text=True
        )
        assert done.returncode == 1
        assert "not the instrumented build" in done.stderr


@pytest.mark.skipif(os.environ.get(native.PURE_ENV, "") not in ("", "0"), reason="runs once: the plain run")
def test_a_failed_training_leaves_a_plain_build(tmp_path: Path) -> None:
    """The whole build, in a copy of the sources, with a training that cannot finish (a timeout): the
    instrumented modules are rebuilt plainly, one WARNING says why, and no .gcda is left. ~1-2 minutes."""
    if shutil.which("gcc") is None:
        pytest.skip("no GCC: no profile-guided build")
    pytest.importorskip("Cython")
    shutil.copy(REPO / "setup.py", tmp_path)
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    shutil.copy(REPO / "README.md", tmp_path)
    shutil.copytree(
        REPO / "nexus_authz",
        tmp_path / "nexus_authz",
        ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.html"),  # the .c: no cythonizing again
    )
    done = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace", "-q"],
        cwd=tmp_path,
        env=_env(PYTHONPATH=str(tmp_path), NEXUS_AUTHZ_PGO_TIMEOUT="0.01"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert warnings == [
        "WARNING: nexus-authz: profile-guided build skipped (the training took over 0.01 s); a plain build"
    ]
    built = sorted((tmp_path / "nexus_authz" / "native").glob("*.so"))
    assert len(built) == len(list(NATIVE.glob("*.pyx")))  # every module: none removed
    for path in built:
        assert b"__gcov_" not in path.read_bytes(), path.name
    assert list(tmp_path.glob("build/**/*.gcda")) == []
    said = subprocess.run(
        [sys.executable, "-c", "from nexus_authz import native; print(native.LABEL, native.BUILD)"],
        cwd=tmp_path,
        env=_env(PYTHONPATH=str(tmp_path)),
        capture_output=True,
        text=True,
        check=True,
    )
    assert said.stdout.split() == ["compiled", "plain"]
