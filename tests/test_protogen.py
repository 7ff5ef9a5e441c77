"""The committed stubs in nexus_authz/_gen match protos/ (`python -m nexus_authz.tools.protogen`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) generates the stubs")

from nexus_authz.tools import protogen  # noqa: E402


def test_committed_stubs_are_fresh() -> None:
    problems = protogen.stale_files()
    assert not problems, "stale stubs; run `python -m nexus_authz.tools.protogen`:\n" + "\n".join(problems)


def test_a_changed_proto_makes_them_stale(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(protogen.PROTO_ROOT, protos)
    proto = protos / protogen.PROTOS[0]
    proto.write_text(
        proto.read_text().replace("  string key_id = 1;\n}", "  string key_id = 1;\n  bool x = 2;\n}", 1)
    )
    problems = protogen.stale_files(proto_root=protos)
    assert problems and all(p.startswith("stale: ") for p in problems)
    assert any("policy_pb2.py" in p for p in problems)
    # and a generated file that should not be there is reported too
    gen = tmp_path / "gen"
    protogen.generate(gen)
    (gen / "nexus" / "authz" / "v1" / "old_pb2.py").write_text("# left over\n")
    assert protogen.stale_files(gen) == [
        f"not generated from protos/ (remove it): {gen / 'nexus/authz/v1/old_pb2.py'}"
    ]


def test_generated_modules_import_from_the_package() -> None:
    from nexus_authz._gen.nexus.authz.v1 import policy_pb2, policy_pb2_grpc

    assert policy_pb2.DESCRIPTOR.name == "nexus/authz/v1/policy.proto"  # the name reflection serves
    assert policy_pb2_grpc.PolicyServiceStub.__module__ == "nexus_authz._gen.nexus.authz.v1.policy_pb2_grpc"
