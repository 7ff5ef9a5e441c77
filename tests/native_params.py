"""Run a test module against both HTTP framings of the fast path: the httptools protocol (the pure-Python
reference) and the compiled one (nexus_authz/native/). Import `http_framing` into a conftest.py and mark the
module with `pytest.mark.usefixtures("http_framing")`."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from nexus_authz import native
from nexus_authz.adapters import http_authz


@pytest.fixture(params=["python", "compiled"])
def http_framing(request: pytest.FixtureRequest) -> Iterator[str]:
    """The listeners' protocol class for this test (`http_authz.PROTOCOL`), restored afterwards."""
    if request.param == "compiled":
        if native.http1 is None:
            if os.environ.get(native.PURE_ENV, "") not in ("", "0"):
                pytest.skip("NEXUS_AUTHZ_PURE is set: the compiled framing is not loaded")
            pytest.fail(f"the compiled framing did not build or load ({native.WHY_PURE}): pip install -e .")
        from nexus_authz.adapters.http_native import CompiledAuthzProtocol

        cls: type[http_authz.AuthzProtocol] = CompiledAuthzProtocol
    else:
        cls = http_authz.AuthzProtocol
    previous = http_authz.PROTOCOL
    http_authz.PROTOCOL = cls
    try:
        yield request.param
    finally:
        http_authz.PROTOCOL = previous
