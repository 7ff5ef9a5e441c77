# Types of the compiled module (_fast.pyx).
from collections.abc import Callable
from logging import Logger
from typing import Any

def install(
    reference: Callable[[Any], None], internal_error: bytes, log: Logger, failure_store: type, prefix: str
) -> Callable[[Any], None]: ...
def on_message_complete(self: Any) -> None: ...
