"""The package's shape (issue 14, point 5): rooms with one job, arrows pointing inwards."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nexus_authz"
MAX_LINES = 600
# Modules other parts of issue 14 are splitting; remove each as it gets under MAX_LINES.
STILL_LONG: set[str] = set()  # every module is under the bound now; add one here only with a reason


def _modules(under: Path) -> list[Path]:
    return sorted(p for p in under.rglob("*.py") if "_gen" not in p.relative_to(PACKAGE).parts)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_module_is_over_600_lines() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in _modules(PACKAGE)
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert {k: v for k, v in long.items() if k not in STILL_LONG} == {}


def test_the_command_line_and_the_renderers_import_no_adapter() -> None:
    """The CLI asks a running server through the generated stubs, never through an adapter's code."""
    for path in _modules(PACKAGE / "cli") + _modules(PACKAGE / "render"):
        wrong = sorted(name for name in _imports(path) if name.startswith("nexus_authz.adapters"))
        assert wrong == [], f"{path.relative_to(PACKAGE)} imports {wrong}"


def test_the_config_renderers_and_the_ledger_need_nothing_from_the_running_server() -> None:
    for path in _modules(PACKAGE / "render") + _modules(PACKAGE / "stores" / "ledger"):
        wrong = sorted(
            name
            for name in _imports(path)
            if name.startswith(("nexus_authz.engine", "nexus_authz.server", "nexus_authz.adapters"))
        )
        assert wrong == [], f"{path.relative_to(PACKAGE)} imports {wrong}"


# settings.py reads the environment for everything else; the compiled-path switch is read at import,
# before any settings exist; the demo builds its child processes' environment.
ENVIRONMENT_READERS = {"settings.py", "native/__init__.py", "demo/runner.py"}


def test_only_settings_reads_the_environment() -> None:
    readers = set()
    for path in _modules(PACKAGE):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("environ", "getenv", "environb")
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
            ):
                readers.add(str(path.relative_to(PACKAGE)))
    assert readers == ENVIRONMENT_READERS
