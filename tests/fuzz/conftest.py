from __future__ import annotations

import pytest

from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from tests.fuzz._support import write_fuzz_config
from tests.native_params import http_framing  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """One engine per module (built once: Hypothesis runs hundreds of examples against it)."""
    return Engine.from_settings(load_settings(str(write_fuzz_config(tmp_path_factory.mktemp("fuzz")))))
