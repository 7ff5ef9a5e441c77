"""Run a test module against both HTTP framings of the fast path: the httptools protocol (the pure-Python
reference) and the compiled one (nexus_authz/native/). Import `http_framing` into a conftest.py and mark the
module with `pytest.mark.usefixtures("http_framing")`. Likewise `body_reading`: the reference body reading
(core.body.request_facts) and the compiled one (nexus_authz/native/_body)."""

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


@pytest.fixture(params=["python", "compiled"])
def body_reading(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The body reading the policy calls (`core.body.read_facts`) for this test: the reference,
    core.body.request_facts, or the compiled one (nexus_authz/native/_body); a test module's own
    `request_facts` name is pointed at it too. Restored afterwards."""
    from nexus_authz.core import body

    if request.param == "compiled":
        if native.body is None:
            if os.environ.get(native.PURE_ENV, "") not in ("", "0"):
                pytest.skip("NEXUS_AUTHZ_PURE is set: the compiled body reading is not loaded")
            pytest.fail(
                f"the compiled body reading did not build or load ({native.WHY_PURE}): pip install -e ."
            )
        reader = native.body.request_facts
    else:
        reader = body.request_facts
    monkeypatch.setattr(body, "read_facts", reader)
    if getattr(request.module, "request_facts", None) is body.request_facts:
        monkeypatch.setattr(request.module, "request_facts", reader)
    yield request.param
