"""The compiled fast path, when it built, and which path runs.

The package's setuptools build compiles the Cython modules here (setup.py; `pip install -e .` builds them
in place). When the compiler or Cython was missing, or the build failed, the install still succeeded and
the pure-Python path runs: the same answers, more CPU. `NEXUS_AUTHZ_PURE=1` forces the pure path (tests
and comparisons). `PATH` says which one runs ("compiled" or "python"); start-up logs it once
(`announce`) and /metrics exports it as `nexus_authz_native_path{path="..."} 1`. The modules load together
or not at all (one missing means a broken build: the whole pure path runs, and PATH says so). `BUILD` says
how they were built ("PGO": profile-guided, setup.py's default with GCC; "plain"; "" when the build left no
record, `_build`), and `LABEL` both ("compiled (PGO)", "compiled", "python"), for the start-up line.

Compiled so far: `_http1`, the HTTP/1.1 framing of the ext_authz / auth_request listener
(adapters/http_native.py puts it in front of the httptools protocol of adapters/http_authz.py);
`_body`, the request body's facts (core.body.request_facts' equivalent, installed as `core.body.read_facts`,
which the policy calls; the composition root, engine.py, imports this package so every engine uses it);
`_windows`, the memory counter store's acquire and adjust (stores/memory.py installs them on
MemoryCounterStore);
`_usage`, the access-log scans (adapters/als_fast.py: a serialized message's entries, the Lua tap's
record, a JSON body's usage object, an OpenAI stream's usage chunk, a common record's counts);
`_headers`, the rate-limit headers of an answer (core.ratelimit_headers.plan_headers' equivalent, installed
as `core.ratelimit_headers.build_headers`, which the policy calls; and plan_header_block's, the same headers
as HTTP/1.1 lines, installed as `build_header_block`, which the HTTP listener's fast path calls);
`_reservation`, the compiled lane's reservation entry (core/reservations.py's 7-tuple as one object) and the
book's table (installed as `core.reservations.new_entries`: an OrderedDict's operations, no node per entry);
`_fast`, the common ext_authz check's flat path in one compiled call (core/fastpath.py's admission,
Decider.check_plain's charge and reservation, adapters/http_fast.py's answer), installed as the compiled
protocol's `on_message_complete` (adapters/http_native.py);
`_account`, the common access-log entry's accounting (Engine.account of a provider usage record:
settle, price, count, record) in one compiled call (adapters/envoy_als.py `_account_snippet`, and
`_usage`'s `account_run`: a scanned message's loop, the common entry from the scan to the ledger in C).
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

from nexus_authz.core import body as _core_body
from nexus_authz.core import ratelimit_headers as _core_headers
from nexus_authz.core import reservations as _core_reservations

log = logging.getLogger("nexus_authz.native")

PURE_ENV = "NEXUS_AUTHZ_PURE"
MODULES = ("_http1", "_body", "_windows", "_usage", "_headers", "_reservation", "_fast", "_account")


def _load() -> tuple[dict[str, ModuleType], str]:
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return {}, f"{PURE_ENV} is set"
    loaded = {}
    for name in MODULES:
        try:
            loaded[name] = importlib.import_module(f"nexus_authz.native.{name}")
        except ImportError as exc:
            return {}, f"the extension is not built ({exc})"
    return loaded, ""


_modules, WHY_PURE = _load()
http1: ModuleType | None = _modules.get("_http1")
body: ModuleType | None = _modules.get("_body")
windows: ModuleType | None = _modules.get("_windows")
usage: ModuleType | None = _modules.get("_usage")  # the access-log entry's scans (adapters/als_fast.py)
headers: ModuleType | None = _modules.get("_headers")  # the answers' rate-limit headers
reservation: ModuleType | None = _modules.get("_reservation")  # the compiled lane's reservation entry
fast: ModuleType | None = _modules.get("_fast")  # the common ext_authz check's flat path
account: ModuleType | None = _modules.get("_account")  # the common access-log entry's accounting
WHY_PURE_WINDOWS = WHY_PURE_USAGE = WHY_PURE  # the modules load together or not at all
PATH = "compiled" if _modules else "python"


def _build_kind() -> str:
    if not _modules:
        return ""
    try:
        return str(importlib.import_module("nexus_authz.native._build").KIND)
    except ImportError:  # a build from before the record: nothing to say
        return ""


BUILD = _build_kind()
LABEL = f"{PATH} ({BUILD})" if BUILD and BUILD != "plain" else PATH
if body is not None:
    _core_body.read_facts = body.request_facts
if reservation is not None:
    _core_reservations.new_entries = reservation.Entries
if headers is not None:
    _core_headers.build_headers = headers.plan_headers
    _core_headers.build_header_block = headers.plan_header_block


def announce() -> None:
    """The start-up log line saying which path runs."""
    if _modules:
        log.info(
            f"{LABEL} fast path: HTTP/1.1 framing, body facts, counter windows, access-log scans, "
            "rate-limit headers, the common check's flat path and the common entry's accounting in C",
            extra={"native_path": PATH},
        )
        if BUILD == "instrumented":
            log.warning(
                "the compiled modules are the profile-guided build's instrumented ones (slower; they write "
                ".gcda files at exit): rebuild them (`python setup.py build_ext --inplace`)",
                extra={"native_path": PATH},
            )
    else:
        log.info("pure-Python fast path: " + WHY_PURE, extra={"native_path": PATH})
