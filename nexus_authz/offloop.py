"""A completion's count off the event loop, then its accounting on it: the one place accounting leaves
the loop (Engine.account_response's exact count of a long response without a usage record, and
AccessLogService.count_later's of the same stream read by the compiled access-log loop)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["count_then_account"]

_accounting_log = logging.getLogger("nexus_authz.accounting")
T = TypeVar("T")


def count_then_account(
    request_id: str, count: Callable[[], T], account: Callable[[T], None]
) -> Awaitable[None]:
    """`count` in a worker thread, then `account` of its result on the loop, to the end even when the
    caller stops waiting (an ext_proc stream torn down by a client that hung up): the awaitable is a
    shield. A failing count leaves the reservation charged; either failure is logged with the request id."""
    counted = asyncio.get_running_loop().run_in_executor(None, count)

    def done(future: asyncio.Future[T]) -> None:
        if future.cancelled():
            return
        if (error := future.exception()) is not None:  # the count failed: the reservation stays charged
            _accounting_log.error("accounting failed", exc_info=error, extra={"request_id": request_id})
            return
        try:  # a callback: nobody awaits what it raises, so it is logged here, as the transports do
            account(future.result())
        except Exception:
            _accounting_log.exception("accounting failed", extra={"request_id": request_id})

    counted.add_done_callback(done)
    return asyncio.shield(counted)  # type: ignore[arg-type]  # awaited for its end, not its value
