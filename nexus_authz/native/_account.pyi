# Types of the compiled module (_account.pyx).
from typing import Any

taken: list[int]

def account_provider(engine: Any, request_id: str, usage: Any, response_model: str | None) -> bool: ...
