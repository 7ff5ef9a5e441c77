"""The compiled parser's hand-over (native/_http1.pyx `_hand_over`): it calls the compiled handler's C body
directly when the protocol's class attribute on_message_complete is that handler, and looks the attribute
up as `proto.on_message_complete()` does whenever the class changed or is another one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nexus_authz import native
from nexus_authz.adapters import http_authz
from nexus_authz.core.model import Reason
from nexus_authz.engine import Engine
from nexus_authz.settings import load_settings
from tests.adapters.test_http_fastpath import KEYS, NOW, PLANS, _body, _check, _compiled_or_skip
from tests.fuzz._support import FakeTransport, no_bugs_logged
from tests.helpers import write_config


def _app(tmp_path: Path) -> http_authz.HttpApp:
    config = write_config(tmp_path, *KEYS, extra=PLANS)
    engine = Engine.from_settings(load_settings(str(config)), clock=lambda: NOW)
    engine.load_first_keys()
    return http_authz.HttpApp(engine, max_header_bytes=64 * 1024, max_body=1 << 20)


def _connect(cls: Any, app: http_authz.HttpApp) -> tuple[Any, FakeTransport]:
    protocol = cls(app)
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport


def _request(rid: str) -> bytes:
    return _check(KEYS[0].secret, rid, _body("gpt-4o-mini", 16, 1, 3))


def test_the_compiled_handler_is_called_directly_and_a_rebound_one_is_looked_up(tmp_path: Path) -> None:
    _compiled_or_skip()
    from nexus_authz.adapters.http_native import CompiledAuthzProtocol

    http1 = native.http1
    assert http1 is not None
    app = _app(tmp_path)

    class Protocol(CompiledAuthzProtocol):  # type: ignore[misc]
        __slots__ = ()

    with no_bugs_logged():
        protocol, transport = _connect(Protocol, app)
        protocol.data_received(_request("rid-1"))
        assert transport.data.startswith(b"HTTP/1.1 200 OK\r\n")
        assert http1.handed_over_directly(protocol)
        # the class rebinds its handler: the next request goes to the new one, not the remembered C body
        seen: list[bytes] = []
        original = Protocol.on_message_complete

        def recording(self: Any) -> None:
            seen.append(self._url)
            original(self)

        Protocol.on_message_complete = recording  # type: ignore[method-assign]
        assert not http1.handed_over_directly(protocol)
        before = len(transport.data)
        protocol.data_received(_request("rid-2"))
        assert seen == [b"/ext_authz/v1/chat/completions"]
        assert transport.data[before:].startswith(b"HTTP/1.1 200 OK\r\n")
        assert not http1.handed_over_directly(protocol)
        # and back: remembered again after one look-up
        Protocol.on_message_complete = original  # type: ignore[method-assign]
        protocol.data_received(_request("rid-3"))
        assert http1.handed_over_directly(protocol) and len(seen) == 1
        assert app.engine.decisions[Reason.OK] == 3


def test_a_protocol_with_an_instance_dict_is_looked_up_each_time(tmp_path: Path) -> None:
    """An instance attribute could shadow the class's handler: such a class is never called directly."""
    _compiled_or_skip()
    from nexus_authz.adapters.http_native import CompiledAuthzProtocol

    http1 = native.http1
    assert http1 is not None
    app = _app(tmp_path)

    class WithDict(CompiledAuthzProtocol):  # type: ignore[misc]
        pass

    with no_bugs_logged():
        protocol, transport = _connect(WithDict, app)
        protocol.data_received(_request("rid-1"))
        assert not http1.handed_over_directly(protocol)
        calls: list[int] = []
        protocol.on_message_complete = lambda: calls.append(1)
        protocol.data_received(_request("rid-2"))
        assert calls == [1]
        assert transport.data.count(b"HTTP/1.1 200 OK\r\n") == 1
