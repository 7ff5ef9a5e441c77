# Types of the compiled module (_windows.pyx).
from collections.abc import Callable, Sequence
from typing import Any

from nexus_authz.core.limits import AcquireResult, LimitSpec, WindowStatus

def install(
    py_acquire: Callable[..., AcquireResult],
    py_adjust: Callable[..., None],
    py_is_fresh: Callable[[object, float], bool],
    sweep_batch: int,
) -> tuple[Any, Any]: ...
def acquire(
    self: Any, counter_ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
) -> AcquireResult: ...
def fmod_of(x: float, y: float) -> float: ...
def slot_of(now: float, width: float) -> int: ...
def adjust(
    self: Any,
    counter_ids: Sequence[str],
    specs: Sequence[LimitSpec],
    deltas: Sequence[int],
    now: float,
    charged_at: float | None = None,
) -> None: ...
def figures_of(
    self: Any, counter_ids: Sequence[str], specs: Sequence[LimitSpec], costs: Sequence[int], now: float
) -> tuple[int, tuple[WindowStatus, ...]] | None: ...
