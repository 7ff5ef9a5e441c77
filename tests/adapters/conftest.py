from __future__ import annotations

from pathlib import Path

import pytest

from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from tests.helpers import KeySpec, write_config
from tests.native_params import http_framing  # noqa: F401  (a fixture)

ALICE = KeySpec("alice", extra={"tenant": "acme", "models": ["gpt-4o*"]})
BOB = KeySpec("bob", extra={"disabled": True})
KEYS = (ALICE, BOB)


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    path = write_config(tmp_path, *KEYS)
    return Engine.from_settings(load_settings(str(path)))
