"""Config and key-file parsing: what is accepted, and that every error names file, line and field."""

from __future__ import annotations

import pytest

from nexus_authz.core.config import PolicySet, parse_key_file, parse_policy, parse_timestamp
from nexus_authz.core.errors import ConfigError
from nexus_authz.core.model import Credential
from nexus_authz.core.yamlsrc import Fields, load_yaml, parse_duration
from nexus_authz.settings import parse_settings
from tests.helpers import PEPPER, KeySpec, key_file

CRED = {"openai": Credential(name="openai", header="authorization", value="Bearer sk-up")}
ANTHROPIC = Credential(name="anthropic", header="x-api-key", value="sk-ant")


def load(text: str, policy: PolicySet | None = None, credentials: dict[str, Credential] | None = None):  # type: ignore[no-untyped-def]
    return parse_key_file(
        text,
        "keys.yaml",
        policy=policy or PolicySet(),
        credentials=CRED if credentials is None else credentials,
        pepper=PEPPER.encode(),
        loaded_at=0.0,
    )


def test_key_file_round_trip() -> None:
    text = key_file(
        KeySpec("alice", extra={"tenant": "acme", "models": ["gpt-4o*"], "credential": "openai"}),
        KeySpec(
            "bob", extra={"disabled": True, "expires_at": "2030-01-01T00:00:00Z", "metadata": {"team": "ml"}}
        ),
    )
    snap = load(text)
    assert len(snap) == 2
    alice = snap.lookup("nx-test-alice-0123456789abcdefghij")
    assert alice is not None and alice.key_id == "alice" and alice.tenant == "acme"
    assert alice.models == ("gpt-4o*",)
    assert ("authorization", "Bearer sk-up") in alice.upstream_headers
    assert ("x-nexus-key-id", "alice") in alice.upstream_headers
    assert alice.remove_headers == ("x-api-key", "api-key")
    bob = snap.by_id["bob"]
    assert bob.disabled and bob.expires_at == parse_timestamp("2030-01-01T00:00:00Z")
    assert bob.credential is None and bob.remove_headers == ("authorization", "x-api-key", "api-key")
    assert bob.metadata == {"team": "ml"}
    assert snap.lookup("nx-wrong") is None


def test_credential_in_x_api_key_removes_authorization() -> None:
    text = key_file(KeySpec("a", extra={"credential": "anthropic"}))
    snap = load(text, credentials={"anthropic": ANTHROPIC})
    record = snap.by_id["a"]
    assert ("x-api-key", "sk-ant") in record.upstream_headers
    assert record.remove_headers == ("authorization", "api-key")


def test_secrets_not_in_repr() -> None:
    snap = load(key_file(KeySpec("a", extra={"credential": "openai"})))
    assert "sk-up" not in repr(snap.by_id["a"])
    assert "sk-up" not in repr(CRED["openai"])


def test_version_changes_with_content() -> None:
    a = load(key_file(KeySpec("a")))
    b = load(key_file(KeySpec("a"), KeySpec("b")))
    assert a.version != b.version and a.version == load(key_file(KeySpec("a"))).version


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("keys: [\n", "keys.yaml:2: invalid YAML"),
        ("keys:\n  - id: a\n", "keys.yaml:2: keys[0].hash: is required"),
        ("keys:\n  - id: a\n    hash: nope\n", "keys.yaml:3: keys[0].hash: expected 'hmac-sha256:'"),
        ("keys:\n  - id: 'bad id!'\n", "keys[0].id: key ids are"),
        ("keys: {}\n", "keys: expected a list"),
        ("nope: 1\n", "nope: unknown field"),
        ("keys:\n  - id: a\n    id: b\n", "keys.yaml:3: duplicate key 'id'"),
        ("keys:\n  - 42\n", "keys[0]: expected a mapping"),
    ],
)
def test_key_file_errors_name_line_and_field(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(text)
    assert fragment in str(info.value)


def _entry_error(extra: dict[str, object], credentials: dict[str, Credential] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(key_file(KeySpec("a", extra=extra)), credentials=credentials)
    return str(info.value)


def test_key_field_errors() -> None:
    assert "keys[0].expires_at: expected an ISO 8601" in _entry_error({"expires_at": "tomorrow"})
    assert "keys[0].plan: no plan named 'gold'" in _entry_error({"plan": "gold"})
    assert "keys[0].credential: no credential named 'x'" in _entry_error({"credential": "x"})
    assert "keys[0].disabled: expected true or false" in _entry_error({"disabled": "yes"})
    assert "keys[0].paths: path patterns start with '/'" in _entry_error({"paths": ["v1/*"]})
    assert "keys[0].colour: unknown field" in _entry_error({"colour": "blue"})
    assert "keys[0].models: item 0" in _entry_error({"models": [None]})


def test_duplicates_rejected() -> None:
    with pytest.raises(ConfigError, match="duplicate key id 'a'"):
        load(key_file(KeySpec("a"), KeySpec("a", secret="nx-other-0123456789abcdef")))
    with pytest.raises(ConfigError, match="same key hash appears twice"):
        load(
            key_file(
                KeySpec("a", secret="nx-same-0123456789abcdef"),
                KeySpec("b", secret="nx-same-0123456789abcdef"),
            )
        )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2027-01-31", 1801353600.0),
        ("2027-01-31T00:00:00Z", 1801353600.0),
        ("2027-01-31T01:00:00+01:00", 1801353600.0),
        (1801353600, 1801353600.0),
        ("soon", None),
        (True, None),
        (None, None),
    ],
)
def test_parse_timestamp(value: object, expected: float | None) -> None:
    assert parse_timestamp(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("500ms", 0.5),
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        (3, 3.0),
        ("x", None),
        (-1, None),
    ],
)
def test_parse_duration(value: object, expected: float | None) -> None:
    assert parse_duration(value) == expected


def test_policy_sections() -> None:
    doc = load_yaml(
        "credentials:\n  anthropic:\n    header: x-api-key\n    value_env: ANTHROPIC_KEY\n"
        "default_credential: anthropic\nplans:\n  free:\n    models: ['gpt-4o-mini']\n"
        "prices:\n  'gpt-4o*': {input: 2.5, output: 10}\n",
        "nexus.yaml",
    )
    policy = parse_policy(Fields(doc, "nexus.yaml", ""))
    cred = policy.credentials["anthropic"]
    assert cred.header == "x-api-key" and cred.scheme == "" and cred.secret.env == "ANTHROPIC_KEY"
    assert policy.plans["free"].models == ("gpt-4o-mini",)
    assert policy.prices[0][1].cached_input == 2.5


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            "credentials:\n  openai:\n    header: authorization\n",
            "credentials.openai: a credential needs exactly one",
        ),
        (
            "credentials:\n  openai:\n    header: host\n    value: x\n",
            "credentials.openai.header: 'host' cannot",
        ),
        ("default_credential: nope\n", "default_credential: no credential named 'nope'"),
        ("listen:\n  admin: nowhere\n", "listen.admin: expected host:port"),
        ("keys:\n  reload_interval: soon\n", "nexus.yaml:2: keys.reload_interval: expected a duration"),
        ("logging:\n  level: loud\n", "logging.level: must be one of"),
        ("listen:\n  http_socket_mode: rw\n", "listen.http_socket_mode: expected an octal mode"),
        ("lisen: {}\n", "nexus.yaml:1: lisen: unknown field"),
    ],
)
def test_settings_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "nexus.yaml", {})
    assert fragment in str(info.value)


def test_settings_defaults_and_environment() -> None:
    s = parse_settings("{}\n", "/etc/nexus/nexus.yaml", {})
    assert s.http_socket == "/tmp/nexus-authz/authz.sock" and s.grpc == "127.0.0.1:9001"
    assert s.base_dir == "/etc/nexus" and s.pepper.env == "NEXUS_KEY_PEPPER"
    s = parse_settings(
        "listen:\n  grpc: null\n",
        "nexus.yaml",
        {
            "NEXUS_HTTP_SOCKET": "/run/x.sock",
            "NEXUS_ADMIN_LISTEN": "0.0.0.0:9999",
            "NEXUS_LOG_LEVEL": "DEBUG",
        },
    )
    assert s.grpc is None and s.http_socket == "/run/x.sock"
    assert s.admin is not None and s.admin.port == 9999 and s.log_level == "debug"
    with pytest.raises(ConfigError, match="NEXUS_LOG_LEVEL"):
        parse_settings("{}\n", "nexus.yaml", {"NEXUS_LOG_LEVEL": "chatty"})
