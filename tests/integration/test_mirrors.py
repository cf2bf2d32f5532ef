"""Artifacts from HTTP mirrors, end to end: a real control plane, the real SmolLM2 GGUF, and real
nginx servers (tests/integration/nginx_mirror.py) serving the control plane's blob directory,
or a damaged copy of it, at the mirror URLs of a device's settings.

A good mirror serves the whole artifact (the control plane none of it); a mirror serving a
wrong byte is refused, named in the log and counted, and the install completes from the next
source; a mirror killed mid-transfer hands over at the byte it reached, so no byte is fetched
twice. The installed file is the signed artifact every time."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import pytest

from bench.delivery_rig import Device
from edgefleet.controlplane.app.server import RunningControlPlane
from edgefleet.controlplane.build.bundles import BundleOnDisk, build_bundle, sha256_file
from edgefleet.controlplane.store.blob_directory import DirectoryBlobs
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import operator_pb2_grpc
from tests.integration.conftest import EnrolledDevice, admin_token
from tests.integration.nginx_mirror import NginxMirror
from tests.integration.test_delta_transfer import publish

pytestmark = pytest.mark.integration

DEAD_MIRROR = "http://127.0.0.1:9/blobs"  # the discard port: nothing listens, the connect fails


def blob_root(tmp_path: Path) -> Path:
    """The blob directory of the ``controlplane`` fixture (its data dir is ``tmp_path/cp``)."""
    return tmp_path / "cp" / "blobs"


def damaged_copy(root: Path, sha256: str, to: Path) -> Path:
    """A copy of the blob directory whose copy of ``sha256`` has one byte flipped mid-file."""
    shutil.copytree(root, to)
    blob = DirectoryBlobs(to).path_for(sha256)
    blob.chmod(0o644)
    with blob.open("r+b") as f:
        f.seek(blob.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    return to


async def installed_device(
    op: operator_pb2_grpc.OperatorServiceStub,
    enrolled: EnrolledDevice,
    controlplane: RunningControlPlane,
    keys: KeyDir,
    bundle: BundleOnDisk,
    tmp_path: Path,
) -> Device:
    await publish(op, bundle.path, keys, admin_token(tmp_path), enrolled.id)
    device = Device(enrolled.id, enrolled.certificate, controlplane, keys, tmp_path / "device")
    device.store.mirrors.stall_timeout_s = 5.0
    return device


async def test_a_good_mirror_serves_the_whole_artifact_and_the_control_plane_none(
    op: operator_pb2_grpc.OperatorServiceStub,
    enrolled: EnrolledDevice,
    controlplane: RunningControlPlane,
    smollm2_bundle: BundleOnDisk,
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    device = await installed_device(op, enrolled, controlplane, keys, smollm2_bundle, tmp_path)
    mirror = NginxMirror(blob_root(tmp_path), tmp_path / "nginx-good").start()
    try:
        rate = 64 << 20
        device.store.mirrors.configure((DEAD_MIRROR, mirror.url), rate)  # a dead one first: skipped
        started = time.monotonic()
        got = await device.install("smollm2", 1)
        elapsed = time.monotonic() - started
    finally:
        mirror.stop()
    # max_download_rate holds: beyond the bucket's one-second burst, no faster than the rate.
    assert elapsed >= (got.info.length - rate) / rate
    assert got.info.chunks is not None
    assert got.fetched_bytes == 0  # not one artifact byte from the control plane
    assert device.store.counters.mirror_bytes == got.info.length
    assert device.store.counters.mirror_refusals == 0
    assert sha256_file(got.path) == got.info.sha256
    log = mirror.access_log.read_text()
    assert f"/blobs/sha256/{got.info.sha256[:2]}/{got.info.sha256}" in log and " 206 " in log


async def test_a_mirror_serving_a_wrong_chunk_is_refused_and_the_next_mirror_completes(
    op: operator_pb2_grpc.OperatorServiceStub,
    enrolled: EnrolledDevice,
    controlplane: RunningControlPlane,
    smollm2_bundle: BundleOnDisk,
    keys: KeyDir,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = await installed_device(op, enrolled, controlplane, keys, smollm2_bundle, tmp_path)
    sha256 = smollm2_bundle.release.artifacts[next(iter(smollm2_bundle.release.artifacts))].sha256
    bad = NginxMirror(damaged_copy(blob_root(tmp_path), sha256, tmp_path / "bad"), tmp_path / "nginx-bad")
    good = NginxMirror(blob_root(tmp_path), tmp_path / "nginx-good")
    bad.start()
    good.start()
    try:
        device.store.mirrors.configure((bad.url, good.url), 0)
        with caplog.at_level(logging.WARNING):
            got = await device.install("smollm2", 1)
    finally:
        bad.stop()
        good.stop()
    assert got.info.sha256 == sha256 and sha256_file(got.path) == sha256
    assert got.fetched_bytes == 0
    assert device.store.counters.mirror_refusals == 1
    refusals = [r.getMessage() for r in caplog.records if "refusing mirror" in r.getMessage()]
    assert len(refusals) == 1 and bad.url in refusals[0] and "do not hash" in refusals[0]
    # The damaged chunk (and what arrived with its last network read) came from the bad mirror,
    # then from the good one; nothing else was fetched twice.
    assert got.info.chunks is not None
    largest = max(c.length for c in got.info.chunks.chunks)
    assert got.info.length < device.store.counters.mirror_bytes <= got.info.length + largest + (1 << 20)


async def test_a_whole_file_from_a_mirror_that_fails_its_hash_is_fetched_again_from_the_control_plane(
    op: operator_pb2_grpc.OperatorServiceStub,
    enrolled: EnrolledDevice,
    controlplane: RunningControlPlane,
    smollm2_path: Path,
    keys: KeyDir,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = tmp_path / "whole.gguf"
    shutil.copyfile(smollm2_path, model)
    whole = build_bundle(
        model,
        name="whole",
        version=1,
        out=tmp_path / "whole",
        signers=keys.release_signers(),
        chunk_lists=False,
    )
    await publish(op, whole.path, keys, admin_token(tmp_path), enrolled.id)
    device = Device(enrolled.id, enrolled.certificate, controlplane, keys, tmp_path / "device")
    sha256 = sha256_file(model)
    bad = NginxMirror(
        damaged_copy(blob_root(tmp_path), sha256, tmp_path / "bad"), tmp_path / "nginx-bad"
    ).start()
    try:
        device.store.mirrors.configure((bad.url,), 0)
        with caplog.at_level(logging.WARNING):
            got = await device.install("whole", 1)
    finally:
        bad.stop()
    assert got.info.chunks is None
    assert sha256_file(got.path) == got.info.sha256 == sha256
    assert device.store.counters.mirror_refusals == 1
    assert device.store.counters.mirror_bytes == got.info.length  # all of it, refused at the end
    assert got.fetched_bytes == got.info.length  # then all of it again, from the control plane
    assert any(bad.url in r.getMessage() and "refusing mirror" in r.getMessage() for r in caplog.records)


async def test_a_mirror_killed_mid_transfer_hands_over_at_the_byte_it_reached(
    op: operator_pb2_grpc.OperatorServiceStub,
    enrolled: EnrolledDevice,
    controlplane: RunningControlPlane,
    smollm2_bundle: BundleOnDisk,
    keys: KeyDir,
    tmp_path: Path,
) -> None:
    device = await installed_device(op, enrolled, controlplane, keys, smollm2_bundle, tmp_path)
    slow = NginxMirror(blob_root(tmp_path), tmp_path / "nginx-slow", limit_rate="4m").start()
    counters = device.store.counters
    killed_at: list[int] = []

    def kill_after_8_mib(done: int, total: int) -> None:
        if not killed_at and counters.mirror_bytes >= 8 << 20:
            killed_at.append(counters.mirror_bytes)
            slow.kill()

    try:
        device.store.mirrors.configure((slow.url,), 0)
        got = await device.install("smollm2", 1, progress=kill_after_8_mib)
    finally:
        slow.stop()
    assert killed_at, "the download finished before the mirror was killed"
    assert sha256_file(got.path) == got.info.sha256
    assert counters.mirror_bytes >= killed_at[0]
    assert got.fetched_bytes > 0
    assert counters.mirror_bytes + got.fetched_bytes == got.info.length  # resumed at the byte reached
    assert counters.mirror_refusals == 0
