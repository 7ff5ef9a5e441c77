# Types of the compiled module (_account.pyx).
from typing import Any

taken: list[int]

def account_provider(engine: Any, request_id: str, usage: Any, response_model: str | None) -> bool: ...
def account_counts(
    engine: Any,
    request_id: str,
    prompt: int,
    cached: int,
    completion: int,
    reasoning: int,
    response_model: str | None,
) -> bool: ...
