"""A real control plane and real devices for measuring delivery: what ``bench.delivery`` and the
delta-transfer integration test drive.

The operator side does what ``fleetctl bundle push`` and ``fleetctl deploy`` do (the image
targets extended and signed with the release keys, the bundle streamed over gRPC); the device
side does what the agent does to install a release: enroll with a CSR, verify both Uptane
repositories through python-tuf (``UptaneVerifier``), and download the chosen artifact with the
agent's own ``ArtifactStore`` over mutual TLS. What a download moved is read from the store's
own counters, so a figure here is what a device would report.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from edgefleet.agent.device.tls import DeviceCertificate, csr_pem, new_key, store_certificate
from edgefleet.agent.update.artifacts import ArtifactStore
from edgefleet.agent.update.uptane_client import GrpcMetadataFetcher, UptaneVerifier
from edgefleet.controlplane.app.server import RunningControlPlane, start_control_plane
from edgefleet.controlplane.app.settings import Settings
from edgefleet.controlplane.build.bundles import open_bundle
from edgefleet.controlplane.cli.client import extend_image_targets, push_requests
from edgefleet.controlplane.fleet.rbac import ADMIN_TOKEN_FILE
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.release import ArtifactInfo
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc


@dataclass
class Operator:
    """The operator's calls, authenticated with ``token`` on every call."""

    channel: grpc.aio.Channel
    token: str
    keys: KeyDir

    @property
    def stub(self) -> operator_pb2_grpc.OperatorServiceStub:
        return operator_pb2_grpc.OperatorServiceStub(self.channel)

    @property
    def auth(self) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.token}"),)

    async def push(self, bundle_dir: Path) -> common_pb2.BundleRef:
        """Extends and signs the image targets, then pushes the bundle (``fleetctl bundle push``)."""
        current = (
            await self.stub.GetImageTargets(operator_pb2.GetImageTargetsRequest(), metadata=self.auth)
        ).targets
        image_targets = extend_image_targets(
            current or None, open_bundle(bundle_dir), self.keys.release_signers()
        )

        async def requests() -> AsyncIterator[operator_pb2.PushBundleRequest]:
            for request in push_requests(bundle_dir, image_targets):
                yield request

        pushed: operator_pb2.PushBundleResponse = await self.stub.PushBundle(requests(), metadata=self.auth)
        return pushed.bundle

    async def deploy(self, bundle: common_pb2.BundleRef, device_id: str) -> None:
        await self.stub.Deploy(
            operator_pb2.DeployRequest(bundle=bundle, device_ids=[device_id]), metadata=self.auth
        )

    async def enrollment_token(self) -> str:
        created: operator_pb2.CreateTokenResponse = await self.stub.CreateToken(
            operator_pb2.CreateTokenRequest(), metadata=self.auth
        )
        return created.token


@dataclass(frozen=True, slots=True)
class Delivery:
    """One installed artifact and what its download moved."""

    info: ArtifactInfo
    path: Path
    fetched_bytes: int
    copied_bytes: int


@dataclass
class Device:
    """An enrolled device with its own state directory (trusted metadata, artifact store)."""

    device_id: str
    certificate: DeviceCertificate
    controlplane: RunningControlPlane
    keys: KeyDir
    work: Path
    store: ArtifactStore = field(init=False)

    def __post_init__(self) -> None:
        self.store = ArtifactStore(self.work / "artifacts", self.work / "downloads")

    def channel(self) -> grpc.aio.Channel:
        credentials = self.certificate.grpc_credentials(self.controlplane.ca_pem)
        return grpc.aio.secure_channel(f"127.0.0.1:{self.controlplane.device_port}", credentials)

    def _verified_artifact(self, bundle: str, version: int) -> ArtifactInfo:
        """Refreshes both repositories as the agent does and returns the release's artifact."""
        credentials = self.certificate.grpc_credentials(self.controlplane.ca_pem)
        with grpc.secure_channel(f"127.0.0.1:{self.controlplane.device_port}", credentials) as channel:
            stub = device_pb2_grpc.DeviceServiceStub(channel)
            verifier = UptaneVerifier(
                tuf_dir=self.work / "tuf",
                anchors=self.keys.trust_anchors(),
                fetcher=GrpcMetadataFetcher(lambda: stub),
                device_id=self.device_id,
            )
            assignment = verifier.refresh()
        release = next(r for r in assignment.releases if (r.name, r.version) == (bundle, version))
        return release.artifacts[release.manifest.variants[0].artifact]

    async def install(
        self,
        bundle: str,
        version: int,
        *,
        store: ArtifactStore | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Delivery:
        """Verifies the assignment and downloads ``bundle@version``'s artifact into ``store``
        (default: the device's own, which holds what it installed before); ``progress`` is
        called with the bytes written and the artifact's length as the download goes."""
        store = store or self.store
        info = await asyncio.to_thread(self._verified_artifact, bundle, version)
        fetched, copied = store.counters.fetched_bytes, store.counters.copied_bytes
        async with self.channel() as channel:
            path = await store.fetch(device_pb2_grpc.DeviceServiceStub(channel), info, progress=progress)
        return Delivery(
            info=info,
            path=path,
            fetched_bytes=store.counters.fetched_bytes - fetched,
            copied_bytes=store.counters.copied_bytes - copied,
        )


async def enroll(controlplane: RunningControlPlane, operator: Operator, keys: KeyDir, work: Path) -> Device:
    """A device enrolled the way the agent enrolls: its own key, a CSR, the certificate back."""
    key = new_key()
    credentials = grpc.ssl_channel_credentials(controlplane.ca_pem)
    async with grpc.aio.secure_channel(f"127.0.0.1:{controlplane.port}", credentials) as channel:
        response = await device_pb2_grpc.DeviceServiceStub(channel).Enroll(
            device_pb2.EnrollRequest(
                bootstrap_token=await operator.enrollment_token(), hostname="bench", csr=csr_pem(key, "bench")
            )
        )

    def keep() -> DeviceCertificate:
        work.mkdir(parents=True, exist_ok=True)
        return store_certificate(work / "device.pem", key, response.certificate)

    certificate = await asyncio.to_thread(keep)
    return Device(response.device_id, certificate, controlplane, keys, work)


def operator_for(controlplane: RunningControlPlane, data_dir: Path, keys: KeyDir) -> Operator:
    """The first operator (its token is in the control plane's data directory), over TLS."""
    credentials = grpc.ssl_channel_credentials(controlplane.ca_pem)
    channel = grpc.aio.secure_channel(f"127.0.0.1:{controlplane.port}", credentials)
    return Operator(channel, (data_dir / ADMIN_TOKEN_FILE).read_text().strip(), keys)


@asynccontextmanager
async def control_plane(
    work: Path, keys: KeyDir, mqtt_url: str
) -> AsyncIterator[tuple[RunningControlPlane, Operator]]:
    """A control plane in this process on loopback ports, SQLite, the given broker."""
    settings = Settings(
        data_dir=work / "cp",
        listen="127.0.0.1:0",
        device_listen="127.0.0.1:0",
        mqtt_url=mqtt_url,
        keys_dir=keys.path,
    )
    running = await start_control_plane(settings)
    operator = operator_for(running, settings.data_dir, keys)
    try:
        yield running, operator
    finally:
        await operator.channel.close()
        await running.stop(grace=0)
