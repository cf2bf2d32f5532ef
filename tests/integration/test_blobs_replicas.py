"""Two control-plane replicas on one PostgreSQL, over real gRPC: a bundle pushed through A
downloads through B byte for byte, and resumes there from the exact byte (before blobs moved
into the database, B answered NOT_FOUND: the bytes were on A's disk)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from edgefleet.controlplane.app.server import start_control_plane
from edgefleet.controlplane.app.settings import Settings
from edgefleet.controlplane.build.bundles import BundleOnDisk
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import device_pb2, operator_pb2, operator_pb2_grpc
from tests.integration.conftest import OperatorToken, admin_token, enroll_device, public_channel
from tests.integration.test_controlplane_grpc import push

pytestmark = pytest.mark.integration


async def test_a_bundle_pushed_through_one_replica_downloads_through_another(
    postgres_database: str, keys: KeyDir, mosquitto: str, smollm2_bundle: BundleOnDisk, tmp_path: Path
) -> None:
    settings_a = Settings(
        data_dir=tmp_path / "a" / "cp",
        listen="127.0.0.1:0",
        device_listen="127.0.0.1:0",
        mqtt_url=mosquitto,
        keys_dir=keys.path,
        db_url=postgres_database,
    )
    settings_b = dataclasses.replace(settings_a, data_dir=tmp_path / "b" / "cp")
    a = await start_control_plane(settings_a, replica_id="a")
    try:
        b = await start_control_plane(settings_b, replica_id="b")
        try:
            token = admin_token(tmp_path / "a")  # the database's one admin, written by the first replica
            async with (
                public_channel(a, interceptors=[OperatorToken(token)]) as via_a,
                public_channel(b) as enroll_via_b,
            ):
                op = operator_pb2_grpc.OperatorServiceStub(via_a)
                pushed = await push(op, smollm2_bundle.path, keys.release_signers(), token)
                enrollment = (await op.CreateToken(operator_pb2.CreateTokenRequest())).token
                device = await enroll_device(b, enroll_via_b, enrollment, tmp_path)
                await op.Deploy(operator_pb2.DeployRequest(bundle=pushed.bundle, device_ids=[device.id]))

                info = next(iter(smollm2_bundle.release.artifacts.values()))
                assert info.length > 8 * settings_b.chunk_size_bytes  # many chunks, not one message
                digest, offset = hashlib.sha256(), 0
                async for chunk in device.stub.FetchArtifact(
                    device_pb2.FetchArtifactRequest(sha256=info.sha256)
                ):
                    assert (chunk.offset, chunk.total_length) == (offset, info.length)
                    assert len(chunk.data) <= settings_b.chunk_size_bytes
                    digest.update(chunk.data)
                    offset += len(chunk.data)
                assert (offset, digest.hexdigest()) == (info.length, info.sha256)

                # Resume through B from a byte in the middle of a chunk.
                resume_at = 3 * settings_b.chunk_size_bytes + 17
                with smollm2_bundle.artifact_path(info.path).open("rb") as source:
                    source.seek(resume_at)
                    async for chunk in device.stub.FetchArtifact(
                        device_pb2.FetchArtifactRequest(sha256=info.sha256, offset=resume_at)
                    ):
                        assert chunk.offset == source.tell()
                        assert chunk.data == source.read(len(chunk.data))
                    assert source.read(1) == b""
                await device.channel.close()
            # Neither replica keeps the bytes on its own disk: they are in the shared database.
            assert not (settings_a.data_dir / "blobs").exists()
            assert not (settings_b.data_dir / "blobs").exists()
        finally:
            await b.stop(grace=0)
    finally:
        await a.stop(grace=0)
