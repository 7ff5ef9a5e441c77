"""The core is pure (issue 14): nothing under nexus_authz/core imports the stores, the adapters, the event
loop, a transport or a database, or reads the environment, TYPE_CHECKING blocks and function bodies
included. The stores and adapters depend on the core's ports (`core.ports`), never the other way."""

from __future__ import annotations

import ast
from pathlib import Path

import nexus_authz.core

FORBIDDEN_MODULES = ("asyncio", "grpc", "redis", "sqlite3", "nexus_authz.stores", "nexus_authz.adapters")
FORBIDDEN_OS = ("environ", "environb", "getenv", "getenvb", "putenv", "unsetenv")


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN_MODULES)


def violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            out += [f"{where}: import {a.name}" for a in node.names if _forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against nexus_authz.core
                module = ".".join(["nexus_authz", "core"][: 3 - node.level] + ([module] if module else []))
            if _forbidden(module):
                out.append(f"{where}: from {module} import ...")
            elif module == "os":
                out += [f"{where}: from os import {a.name}" for a in node.names if a.name in FORBIDDEN_OS]
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in FORBIDDEN_OS
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        ):
            out.append(f"{where}: os.{node.attr}")
    return out


def test_the_core_imports_no_store_adapter_loop_transport_database_or_environment() -> None:
    root = Path(nexus_authz.core.__file__).parent
    modules = sorted(root.rglob("*.py"))
    assert len(modules) > 10 and any(p.name == "ports.py" for p in modules)
    found = [v for path in modules for v in violations(path)]
    assert found == []


def test_the_checker_catches_each_kind_of_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "import os\n"
        "if TYPE_CHECKING:\n"
        "    from nexus_authz.stores.base import CounterStore\n"
        "def f():\n"
        "    import asyncio, redis.asyncio\n"
        "    from grpc import aio\n"
        "    from ..adapters import http_authz\n"
        "    return os.environ.get('X'), os.path.join('a', 'b')\n"
    )
    found = violations(sample)
    assert [v.split(": ", 1)[1] for v in found] == [
        "from nexus_authz.stores.base import ...",
        "import asyncio",
        "import redis.asyncio",
        "from grpc import ...",
        "from nexus_authz.adapters import ...",
        "os.environ",
    ]
