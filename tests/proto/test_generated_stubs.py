"""The committed gRPC stubs are exactly what the .proto files generate."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")

ROOT = Path(__file__).resolve().parents[2]


def test_regenerating_stubs_changes_nothing(tmp_path):
    from proto.generate import PROTOS, generate

    generate(tmp_path)
    for proto_file in PROTOS:
        stem = proto_file[:-len(".proto")]
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            fresh = (tmp_path / (stem + suffix)).read_text()
            committed = (ROOT / (stem + suffix)).read_text()
            assert fresh == committed, f"{stem + suffix} is stale: run `make proto`"
