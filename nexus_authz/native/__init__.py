"""The compiled fast path, when it built, and which path runs.

The package's setuptools build compiles the Cython modules here (setup.py; `pip install -e .` builds them
in place). When the compiler or Cython was missing, or the build failed, the install still succeeded and
the pure-Python path runs: the same answers, more CPU. `NEXUS_AUTHZ_PURE=1` forces the pure path (tests
and comparisons). `PATH` says which one runs ("compiled" or "python"); start-up logs it once
(`announce`) and /metrics exports it as `nexus_authz_native_path{path="..."} 1`.

Compiled so far: `_http1`, the HTTP/1.1 framing of the ext_authz / auth_request listener
(adapters/http_native.py puts it in front of the httptools protocol of adapters/http_authz.py);
`_windows`, the memory counter store's acquire (stores/memory.py installs it as MemoryCounterStore.acquire).
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

log = logging.getLogger("nexus_authz.native")

PURE_ENV = "NEXUS_AUTHZ_PURE"


def _load(name: str = "_http1") -> tuple[ModuleType | None, str]:
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return None, f"{PURE_ENV} is set"
    try:
        module = importlib.import_module(f"nexus_authz.native.{name}")
    except ImportError as exc:
        return None, f"the extension is not built ({exc})"
    return module, ""


http1, WHY_PURE = _load()
windows, WHY_PURE_WINDOWS = _load("_windows")
PATH = "compiled" if http1 is not None else "python"


def announce() -> None:
    """The start-up log line saying which path runs."""
    if http1 is not None:
        parts = "HTTP/1.1 framing" + (", counter windows" if windows is not None else "")
        log.info(f"compiled fast path: {parts} in C", extra={"native_path": PATH})
    else:
        log.info("pure-Python fast path: " + WHY_PURE, extra={"native_path": PATH})
