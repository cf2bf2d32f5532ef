"""Device identity over real TLS sockets: the certificate is the identity, and revocation bites
on the next call."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from sqlmodel import Session

from edgefleet.agent.device.tls import csr_pem, new_key, store_certificate
from edgefleet.controlplane.app.server import RunningControlPlane, start_control_plane
from edgefleet.controlplane.app.settings import Settings
from edgefleet.controlplane.fleet.rbac import secret_sha256
from edgefleet.controlplane.store import access
from edgefleet.controlplane.trust.ca import init_ca, load_ca
from edgefleet.controlplane.trust.keys import KeyDir
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2, device_pb2_grpc, operator_pb2, operator_pb2_grpc
from tests.integration.conftest import EnrolledDevice, device_channel, enroll_device, public_channel

pytestmark = pytest.mark.integration


async def status_code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value.code()


async def test_device_calls_on_the_public_port_are_refused(
    enrolled: EnrolledDevice, channel: grpc.aio.Channel
) -> None:
    """The enrollment port never asks for a client certificate, so no device call passes there."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await device_pb2_grpc.DeviceServiceStub(channel).ReportStatus(device_pb2.StatusReport())
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "client certificate" in (refused.value.details() or "")


async def test_the_device_port_needs_a_certificate_from_the_fleet_ca(
    controlplane: RunningControlPlane, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{controlplane.device_port}"
    no_certificate = grpc.ssl_channel_credentials(controlplane.ca_pem)
    stranger_ca = init_ca(tmp_path / "stranger")
    key = new_key()
    foreign = stranger_ca.sign_device_csr(csr_pem(key, "x"), device_id="dev-000000000000")
    foreign_pair = store_certificate(tmp_path / "foreign.pem", key, foreign.certificate_pem)
    for credentials in (no_certificate, foreign_pair.grpc_credentials(controlplane.ca_pem)):
        async with grpc.aio.secure_channel(target, credentials) as ch:
            call = device_pb2_grpc.DeviceServiceStub(ch).ReportStatus(device_pb2.StatusReport(), timeout=5)
            assert await status_code(call) == grpc.StatusCode.UNAVAILABLE  # the handshake fails


async def test_a_fleet_certificate_not_issued_to_a_device_is_refused(
    controlplane: RunningControlPlane, keys: KeyDir, tmp_path: Path
) -> None:
    """Signed by the right CA, but never recorded as a device's: e.g. a server certificate."""
    ca = load_ca(keys.path)
    assert ca is not None
    key = new_key()
    issued = ca.sign_device_csr(csr_pem(key, "x"), device_id="dev-notenrolled")
    pair = store_certificate(tmp_path / "unrecorded.pem", key, issued.certificate_pem)
    async with device_channel(controlplane, pair) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await device_pb2_grpc.DeviceServiceStub(ch).ReportStatus(device_pb2.StatusReport())
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not issued to a device" in (refused.value.details() or "")


async def test_the_device_id_comes_from_the_certificate(
    enrolled: EnrolledDevice, op: operator_pb2_grpc.OperatorServiceStub
) -> None:
    selection = common_pb2.VariantSelection(reason="gguf-q8_0 on cpu: best quality that fits")
    report = device_pb2.StatusReport(api_url="http://10.0.0.9:8080", selection=selection)
    await enrolled.stub.ReportStatus(report)
    listed = (await op.ListDevices(operator_pb2.ListDevicesRequest())).devices
    row = next(d for d in listed if d.device_id == enrolled.id)
    assert (row.api_url, row.selection_reason) == ("http://10.0.0.9:8080", selection.reason)


async def test_renewal_issues_a_certificate_for_a_new_key(
    controlplane: RunningControlPlane,
    enrolled: EnrolledDevice,
    op: operator_pb2_grpc.OperatorServiceStub,
    tmp_path: Path,
) -> None:
    key = new_key()
    response = await enrolled.stub.RenewCertificate(device_pb2.RenewCertificateRequest(csr=csr_pem(key, "t")))
    renewed = store_certificate(tmp_path / "renewed.pem", key, response.certificate)
    assert renewed.serial != enrolled.certificate.serial
    assert renewed.certificate.subject == enrolled.certificate.certificate.subject
    async with device_channel(controlplane, renewed) as ch:
        await device_pb2_grpc.DeviceServiceStub(ch).ReportStatus(device_pb2.StatusReport())
    actions = [(e.action, e.target) for e in (await op.ListAudit(operator_pb2.ListAuditRequest())).entries]
    assert ("device.renew", enrolled.id) in actions

    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await enrolled.stub.RenewCertificate(device_pb2.RenewCertificateRequest(csr=b"not a csr"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_revoked_device_is_cut_off_at_once(
    controlplane: RunningControlPlane, op: operator_pb2_grpc.OperatorServiceStub, enrolled: EnrolledDevice
) -> None:
    dev = enrolled.stub
    await dev.ReportStatus(device_pb2.StatusReport())
    stream = dev.WatchDesiredState(device_pb2.WatchDesiredStateRequest())

    assert (await op.RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id=enrolled.id))).revoked
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(stream.read(), timeout=10)
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await status_code(dev.ReportStatus(device_pb2.StatusReport())) == grpc.StatusCode.UNAUTHENTICATED
    renew = dev.RenewCertificate(device_pb2.RenewCertificateRequest(csr=csr_pem(new_key(), "t")))
    assert await status_code(renew) == grpc.StatusCode.UNAUTHENTICATED

    listed = (await op.ListDevices(operator_pb2.ListDevicesRequest())).devices
    assert next(d for d in listed if d.device_id == enrolled.id).revoked
    actions = [e.action for e in (await op.ListAudit(operator_pb2.ListAuditRequest())).entries]
    assert "device.revoke" in actions
    # The broker's CRL now lists the certificate, signed by the fleet CA.
    crl = x509.load_pem_x509_crl(controlplane.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(enrolled.certificate.serial) is not None
    assert crl.is_signature_valid(x509.load_pem_x509_certificate(controlplane.ca_pem).public_key())  # type: ignore[arg-type]


async def test_devices_are_never_told_the_control_planes_broker_password(
    tmp_path: Path, keys: KeyDir, mosquitto: str
) -> None:
    settings = Settings(
        data_dir=tmp_path / "cp",
        listen="127.0.0.1:0",
        device_listen="127.0.0.1:0",
        mqtt_url=mosquitto.replace("mqtt://", "mqtt://edgefleet-controlplane:s3cret@"),
        keys_dir=keys.path,
    )
    running = await start_control_plane(settings)
    try:
        with Session(running.engine) as s, s.begin():
            access.create_token(
                s, token_sha256=secret_sha256("t"), uses=1, ttl=timedelta(minutes=1), labels={}
            )
        async with public_channel(running) as ch:
            device = await enroll_device(running, ch, "t", tmp_path)
            await device.channel.close()
    finally:
        await running.stop(grace=0)
    assert device.response.mqtt_url == mosquitto


async def test_revocations_in_quick_succession_all_reach_the_crl(
    controlplane: RunningControlPlane,
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
    tmp_path: Path,
) -> None:
    token = (await op.CreateToken(operator_pb2.CreateTokenRequest(uses=3))).token
    devices = [await enroll_device(controlplane, channel, token, tmp_path) for _ in range(3)]
    await asyncio.gather(
        *(op.RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id=d.id)) for d in devices)
    )
    crl = x509.load_pem_x509_crl(controlplane.crl_path.read_bytes())
    assert {entry.serial_number for entry in crl} == {d.certificate.serial for d in devices}
    for device in devices:
        await device.channel.close()


async def test_a_crl_that_cannot_be_written_does_not_fail_the_revocation(
    controlplane: RunningControlPlane, op: operator_pb2_grpc.OperatorServiceStub, enrolled: EnrolledDevice
) -> None:
    controlplane.crl_path.unlink()
    controlplane.crl_path.mkdir()  # a directory where the file goes: the write fails
    try:
        assert (await op.RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id=enrolled.id))).revoked
        assert controlplane.revocations.crl_is_stale()  # upkeep will write it again
    finally:
        controlplane.crl_path.rmdir()
    await controlplane.revocations.publish_crl()
    crl = x509.load_pem_x509_crl(controlplane.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(enrolled.certificate.serial) is not None
    assert not controlplane.revocations.crl_is_stale()


async def test_a_device_that_lost_the_enrollment_answer_enrolls_again_with_the_same_key(
    controlplane: RunningControlPlane,
    op: operator_pb2_grpc.OperatorServiceStub,
    channel: grpc.aio.Channel,
) -> None:
    """Killed (or cut off) after the control plane answered: the same token and key get the
    same device back, with a fresh certificate; a different key cannot reuse the token."""
    token = (await op.CreateToken(operator_pb2.CreateTokenRequest())).token
    dev = device_pb2_grpc.DeviceServiceStub(channel)
    key = new_key()
    request = device_pb2.EnrollRequest(bootstrap_token=token, hostname="t", csr=csr_pem(key, "t"))
    first = await dev.Enroll(request)
    again = await dev.Enroll(request)
    assert again.device_id == first.device_id and again.certificate != first.certificate

    with pytest.raises(grpc.aio.AioRpcError) as other_key:
        await dev.Enroll(device_pb2.EnrollRequest(bootstrap_token=token, csr=csr_pem(new_key(), "t")))
    assert "already been used" in (other_key.value.details() or "")

    await op.RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id=first.device_id))
    with pytest.raises(grpc.aio.AioRpcError) as revoked:
        await dev.Enroll(request)  # a revoked device does not come back this way
    assert revoked.value.code() == grpc.StatusCode.PERMISSION_DENIED
    listed = (await op.ListDevices(operator_pb2.ListDevicesRequest())).devices
    assert [d.device_id for d in listed] == [first.device_id]
