"""An agent that knows several control-plane replicas keeps working when one of them dies.

Two real control planes share one PostgreSQL; the device's channel is built from both device
addresses, as ``fleet-agent run --controlplane a,b`` builds it, and gRPC's own pick_first policy
(service config) moves to the surviving replica.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgefleet.agent.device.channel import (
    ChannelTargetError,
    DeviceLink,
    channel_target,
    device_addresses,
    tls_server_name,
)
from edgefleet.agent.device.tls import csr_pem, new_key, store_certificate
from edgefleet.controlplane.app.server import RunningControlPlane, start_control_plane
from edgefleet.controlplane.app.settings import Settings
from edgefleet.controlplane.fleet.rbac import ADMIN_TOKEN_FILE
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc
from tests.conftest import free_port
from tests.integration.conftest import OperatorToken, public_channel


def test_a_list_of_ip_addresses_is_one_ipv4_or_ipv6_target() -> None:
    assert channel_target("10.0.0.1:7444, 10.0.0.2:7444") == "ipv4:10.0.0.1:7444,10.0.0.2:7444"
    assert channel_target("[::1]:7444,[fd00::2]:7444") == "ipv6:[::1]:7444,[fd00::2]:7444"
    assert channel_target("ctl.example.com:7443") == "ctl.example.com:7443"  # DNS: every record
    assert channel_target("dns:///ctl.example.com:7443") == "dns:///ctl.example.com:7443"


@pytest.mark.parametrize(
    "addresses",
    ["a.example:7443,b.example:7443", "10.0.0.1:7443,[::1]:7443", "10.0.0.1:7443,", "10.0.0.1,10.0.0.2"],
)
def test_a_list_gRPC_cannot_resolve_is_refused(addresses: str) -> None:
    with pytest.raises(ChannelTargetError):
        channel_target(addresses)


def test_the_certificate_name_checked_for_a_list() -> None:
    assert tls_server_name("10.0.0.1:7444") is None
    assert tls_server_name("127.0.0.1:7444,127.0.0.1:7445") == "127.0.0.1"
    assert tls_server_name("10.0.0.1:7444,10.0.0.2:7444", "ctl.example.com") == "ctl.example.com"
    with pytest.raises(ChannelTargetError):
        tls_server_name("10.0.0.1:7444,10.0.0.2:7444")


def test_device_endpoint_port_applies_to_every_control_plane_host() -> None:
    assert device_addresses("10.0.0.1:7443,10.0.0.2:7443", ":7444") == "10.0.0.1:7444,10.0.0.2:7444"
    assert device_addresses("dns:///ctl.example.com:7443", ":7444") == "dns:///ctl.example.com:7444"
    assert device_addresses("10.0.0.1:7443", "dev.example.com:7444") == "dev.example.com:7444"


class Replicas:
    """Two control planes on one database, each with its own data dir and fixed device port,
    so a stopped replica can start again where devices look for it."""

    def __init__(self, root: Path, db_url: str, mqtt_url: str, keys: KeyDir) -> None:
        self.settings = {
            name: Settings(
                data_dir=root / name,
                listen="127.0.0.1:0",
                device_listen=f"127.0.0.1:{free_port()}",
                db_url=db_url,
                mqtt_url=mqtt_url,
                keys_dir=keys.path,
            )
            for name in ("a", "b")
        }
        self.running: dict[str, RunningControlPlane] = {}

    async def start(self, name: str) -> RunningControlPlane:
        self.running[name] = await start_control_plane(self.settings[name], replica_id=name)
        return self.running[name]

    async def stop(self, name: str) -> None:
        await self.running.pop(name).stop(grace=0)

    @property
    def device_addresses(self) -> str:
        return ",".join(settings.device_listen for settings in self.settings.values())


@pytest.fixture
async def replicas(
    tmp_path: Path, postgres_database: str, mosquitto: str, keys: KeyDir
) -> AsyncIterator[Replicas]:
    both = Replicas(tmp_path, postgres_database, mosquitto, keys)
    # One after the other: the first initialises the shared database.
    await both.start("a")
    await both.start("b")
    yield both
    for name in list(both.running):
        await both.stop(name)


async def enroll(replicas: Replicas, work: Path) -> DeviceLink:
    first = replicas.running["a"]
    interceptors = [OperatorToken((work / "a" / ADMIN_TOKEN_FILE).read_text().strip())]
    async with public_channel(first, interceptors=interceptors) as channel:
        token = (
            await operator_pb2_grpc.OperatorServiceStub(channel).CreateToken(
                operator_pb2.CreateTokenRequest()
            )
        ).token
    async with public_channel(first) as channel:
        key = new_key()
        response = await device_pb2_grpc.DeviceServiceStub(channel).Enroll(
            device_pb2.EnrollRequest(bootstrap_token=token, hostname="t", csr=csr_pem(key, "t"))
        )
    certificate = store_certificate(work / "device.pem", key, response.certificate)
    return DeviceLink(replicas.device_addresses, first.ca_pem, certificate)


async def report(link: DeviceLink) -> device_pb2.StatusAck:
    return await link.stub.ReportStatus(
        device_pb2.StatusReport(state=common_pb2.DEVICE_STATE_IDLE), timeout=30
    )


async def test_device_calls_fail_over_to_the_surviving_replica(replicas: Replicas, tmp_path: Path) -> None:
    """Whichever replica the channel picked first, each in turn dies while the other lives:
    the device's calls keep succeeding."""
    link = await enroll(replicas, tmp_path)
    try:
        before = await report(link)
        await replicas.stop("a")
        without_a = [await report(link) for _ in range(3)]
        await replicas.start("a")
        await replicas.stop("b")
        without_b = [await report(link) for _ in range(3)]
    finally:
        await link.close()

    assert isinstance(before, device_pb2.StatusAck)
    assert all(isinstance(ack, device_pb2.StatusAck) for ack in [*without_a, *without_b])
