from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: Unix socket paths must stay under 108 bytes."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="nx-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
