"""The compiled fast path, when it built, and which path runs.

The package's setuptools build compiles the Cython modules here (setup.py; `pip install -e .` builds them
in place). When the compiler or Cython was missing, or the build failed, the install still succeeded and
the pure-Python path runs: the same answers, more CPU. `NEXUS_AUTHZ_PURE=1` forces the pure path (tests
and comparisons). `PATH` says which one runs ("compiled" or "python"); start-up logs it once
(`announce`) and /metrics exports it as `nexus_authz_native_path{path="..."} 1`.

Compiled so far: `_http1`, the HTTP/1.1 framing of the ext_authz / auth_request listener
(adapters/http_native.py puts it in front of the httptools protocol of adapters/http_authz.py); `_usage`,
the access-log entry's scans (adapters/als_fast.py: the Lua tap's record and a JSON body's usage object).
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
        module = importlib.import_module("nexus_authz.native." + name)
    except ImportError as exc:
        return None, f"the extension is not built ({exc})"
    return module, ""


http1, WHY_PURE = _load()
usage, WHY_PURE_USAGE = _load("_usage")  # the access-log entry's scans (adapters/als_fast.py)
PATH = "compiled" if http1 is not None else "python"


def announce() -> None:
    """The start-up log line saying which path runs."""
    scans = "access-log scans in C" if usage is not None else "access-log scans in Python: " + WHY_PURE_USAGE
    extra = {"native_path": PATH, "native_usage": "compiled" if usage is not None else "python"}
    if http1 is not None:
        log.info("compiled fast path: HTTP/1.1 framing in C; " + scans, extra=extra)
    else:
        log.info("pure-Python fast path: " + WHY_PURE + "; " + scans, extra=extra)
