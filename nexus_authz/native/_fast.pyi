# Types of the compiled module (_fast.pyx).
from collections.abc import Callable
from logging import Logger
from typing import Any

def install(
    reference: Callable[[Any], None],
    internal_error: bytes,
    log: Logger,
    failure_store: type,
    prefix: str,
    allow_answer: Callable[..., bytes],
) -> Callable[[Any], None]: ...
def on_message_complete(self: Any) -> None: ...
def install_framing(
    reference_feed: Callable[[Any, bytes], None], busy: Any, protocol: type | None = None
) -> Callable[[Any, bytes], None]: ...
def data_received(self: Any, data: bytes) -> None: ...
def hmac_sha256(hasher: Any, secret: bytes) -> bytes: ...
def unresolved() -> list[str]: ...
