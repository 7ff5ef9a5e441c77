# Types of the compiled module (_headers.pyx).
from collections.abc import Sequence

from nexus_authz.core.limits import WindowStatus
from nexus_authz.core.ratelimit_headers import HeaderPlan

def plan_headers(
    plan: HeaderPlan, statuses: Sequence[WindowStatus], denied: bool
) -> tuple[tuple[str, str], ...]: ...
def plan_header_block(plan: HeaderPlan, statuses: Sequence[WindowStatus]) -> bytes: ...
def figure_block_of(plan: HeaderPlan, statuses: tuple[WindowStatus, ...]) -> bytes | None: ...
