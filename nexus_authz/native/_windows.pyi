# Types of the compiled module (_windows.pyx).
from collections.abc import Callable, Sequence
from typing import Any

from nexus_authz.core.limits import AcquireResult, LimitSpec

def install(py_acquire: Callable[..., AcquireResult], py_is_fresh: Callable[[object, float], bool]) -> Any: ...
def acquire(
    self: Any, counter_ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
) -> AcquireResult: ...
def slot_of(now: float, width: float) -> int: ...
