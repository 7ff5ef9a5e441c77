"""Shared builders for tests: configs and key files written the way an operator would write them."""

from __future__ import annotations

import asyncio
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from nexus_authz.core import keys as keys_mod
from nexus_authz.core.config import PolicySet, parse_key_file, parse_policy
from nexus_authz.core.keys import KeySnapshot
from nexus_authz.core.model import Credential, Decision, Request
from nexus_authz.core.policy import Policy
from nexus_authz.core.ports import CounterStore
from nexus_authz.core.reservations import ReservationBook
from nexus_authz.core.yamlsrc import Fields, load_yaml
from nexus_authz.decide import Decider
from nexus_authz.stores.base import LocalCounters
from nexus_authz.stores.memory import MemoryCounterStore

PEPPER = "test-pepper-0123456789abcdef"
CRED = {"openai": Credential(name="openai", header="authorization", value="Bearer sk-up")}


@dataclass
class KeySpec:
    id: str
    secret: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.secret:
            self.secret = f"nx-test-{self.id}-0123456789abcdefghij"


def key_entry(spec: KeySpec, pepper: str = PEPPER) -> str:
    lines = [f"  - id: {spec.id}", f'    hash: "{keys_mod.format_hash(pepper.encode(), spec.secret)}"']
    for name, value in spec.extra.items():
        lines.append(f"    {name}: {_yaml(value)}")
    return "\n".join(lines)


def key_file(*specs: KeySpec, pepper: str = PEPPER) -> str:
    return "keys:\n" + "\n".join(key_entry(s, pepper) for s in specs) + "\n"


def parse_world(policy_yaml: str, *specs: KeySpec) -> tuple[PolicySet, KeySnapshot]:
    """A nexus.yaml's policy and a key file of `specs` parsed as the server would (the test pepper, one
    upstream credential `openai`): what the in-process decision tests decide on."""
    policy_set = parse_policy(Fields(load_yaml(policy_yaml, "nexus.yaml"), "nexus.yaml", ""))
    snapshot = parse_key_file(
        key_file(*specs),
        "keys.yaml",
        policy=policy_set,
        credentials=CRED,
        pepper=PEPPER.encode(),
        loaded_at=0.0,
    )
    return policy_set, snapshot


def _yaml(value: object) -> str:
    import json

    return json.dumps(value)


def write_config(
    directory: Path,
    *specs: KeySpec,
    extra: str = "",
    socket: str | None = None,
    grpc: str | None = None,
    admin: str | None = None,
    pepper: str = PEPPER,
) -> Path:
    """A nexus.yaml + keys.yaml pair in `directory`; returns the config path."""
    (directory / "keys.yaml").write_text(key_file(*specs, pepper=pepper))
    listen = [
        f"  http_socket: {socket or directory / 'authz.sock'}",
        f"  grpc: {grpc}" if grpc else "  grpc: null",
        f"  admin: {admin}" if admin else "  admin: null",
    ]
    text = (
        "listen:\n" + "\n".join(listen) + "\n"
        "keys:\n  file: keys.yaml\n  pepper:\n    value: " + pepper + "\n  reload_interval: 50ms\n"
        "credentials:\n  openai:\n    value: sk-upstream-test-credential\n"
        "default_credential: openai\n" + textwrap.dedent(extra)
    )
    path = directory / "nexus.yaml"
    path.write_text(text)
    return path


def decide_local(
    policy: Policy,
    snapshot: KeySnapshot,
    request: Request,
    now: float,
    counters: CounterStore | None = None,
    book: ReservationBook | None = None,
    failures: CounterStore | None = None,
) -> Decision:
    """One decision through the decision driver with a local (memory) counter store, at `now` (a
    concurrency refusal is final at once: no wait for a release)."""
    store = LocalCounters(counters if counters is not None else MemoryCounterStore())
    decision = Decider(store, book=book, failures=failures, clock=lambda: now).check(
        policy, snapshot, request, wait=False
    )
    assert isinstance(decision, Decision), "a local store answers without waiting"
    return decision


def dry_run_local(policy: Policy, snapshot: KeySnapshot, request: Request, now: float) -> Decision:
    """The driver's dry run (charges, reserves and counts nothing) against an empty memory store."""
    driver = Decider(LocalCounters(MemoryCounterStore()), clock=lambda: now)
    return asyncio.run(driver.dry_run(policy, snapshot, request))


def protobuf_varint(n: int) -> bytes:
    """A protobuf varint, by hand (tests that write what protobuf's own serializer never does)."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def protobuf_len_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (tag, length, payload), by hand."""
    return protobuf_varint((number << 3) | 2) + protobuf_varint(len(payload)) + payload


# -- JSON string text at the edges of the compiled scans' word-at-a-time paths (native/_plain8.h) --------

# plain string text (no ']' or '}': a string's text can never close what holds it)
PLAIN_TEXT = b"ab~ /x0Z!#[:,\x7f"


def plain(n: int, shift: int = 0) -> bytes:
    """`n` bytes of plain string text, starting `shift` bytes into PLAIN_TEXT."""
    return bytes(PLAIN_TEXT[(shift + k) % len(PLAIN_TEXT)] for k in range(n))


def json_valid(body: bytes) -> bool:
    """What the compiled readers must accept: json.loads (strict) of the strict UTF-8 decode."""
    try:
        json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return True
