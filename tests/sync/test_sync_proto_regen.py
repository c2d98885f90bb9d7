"""The committed generated code matches what grpcio-tools generates from the .proto today."""

from __future__ import annotations

from pathlib import Path

import pytest

from sync_service.proto import regen


def test_committed_generated_code_is_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev dependency) regenerates the code")
    fresh = regen.generate(tmp_path)
    for name, content in fresh.items():
        committed = (regen.PACKAGE_DIR / name).read_bytes()
        assert committed == content, (
            f"sync_service/proto/{name} is stale: run `python -m sync_service.proto.regen` "
            "(with the grpcio-tools version pinned in pyproject) and commit the result"
        )


def test_generated_modules_import_from_the_package() -> None:
    from sync_service.proto import sync_pb2, sync_pb2_grpc

    assert sync_pb2.DESCRIPTOR.package == "comigs.sync.v1"
    assert hasattr(sync_pb2_grpc, "SyncServiceStub")
    assert sync_pb2.UploadHeader.__module__ == "sync_service.proto.sync_pb2"
