# Types of the compiled module (_http1.pyx).
from typing import Any

class RequestParser:
    pending_bytes: int
    def __init__(
        self,
        proto: Any,
        max_header_bytes: int,
        max_body: int,
        max_url: int,
        max_headers: int,
        keep: dict[bytes, str],
    ) -> None: ...
    def feed(self, data: bytes) -> bool: ...
    def take_replay(self) -> list[bytes]: ...
    def get_method(self) -> bytes | None: ...
    def should_keep_alive(self) -> bool: ...
