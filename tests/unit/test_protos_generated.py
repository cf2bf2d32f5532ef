"""The committed generated code must be exactly what protos/generate.py produces now."""

from __future__ import annotations

from pathlib import Path

from edgefleet.protos import generate


def test_generated_code_matches_sources(tmp_path: Path) -> None:
    fresh = generate.generate(tmp_path)
    assert fresh, "generator produced nothing"
    committed_dir = generate.REPO_ROOT / "protos" / "fleet" / "v1"
    for path in fresh:
        committed = committed_dir / path.name
        assert committed.exists(), (
            f"{path.name} is generated but not committed: run python -m edgefleet.protos.generate"
        )
        assert committed.read_bytes() == path.read_bytes(), (
            f"{path.name} is stale: run python -m edgefleet.protos.generate"
        )
    stale = {p.name for p in committed_dir.glob("*_pb2*.py*")} - {p.name for p in fresh}
    assert not stale, f"generated files without a source: {stale}"


def test_imports_work_as_package() -> None:
    from edgefleet.protos.fleet.v1 import device_pb2, device_pb2_grpc, operator_pb2_grpc

    assert device_pb2.DESCRIPTOR.package == "fleet.v1"
    assert hasattr(device_pb2_grpc, "DeviceServiceStub")
    assert hasattr(operator_pb2_grpc, "OperatorServiceServicer")
