"""The device's key and certificate file: stored atomically, checked against the key, renewed
on schedule."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from edgefleet.agent.device.tls import (
    CertificateProblem,
    DeviceCertificate,
    broker_tls_context,
    csr_pem,
    load_certificate,
    new_key,
    store_certificate,
)
from edgefleet.controlplane.trust.ca import CertificateAuthority, init_ca


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return init_ca(tmp_path / "keys")


def test_the_csr_proves_the_key_and_the_ca_names_the_device(ca: CertificateAuthority, tmp_path: Path) -> None:
    key = new_key()
    request = x509.load_pem_x509_csr(csr_pem(key, "kiosk-7"))
    assert request.is_signature_valid
    issued = ca.sign_device_csr(csr_pem(key, "kiosk-7"), device_id="dev-abc")
    pair = store_certificate(tmp_path / "device.pem", key, issued.certificate_pem)
    assert pair.certificate.subject.rfc4514_string() == "CN=dev-abc"
    assert (tmp_path / "device.pem").stat().st_mode & 0o777 == 0o600
    loaded = load_certificate(tmp_path / "device.pem")
    assert loaded is not None and loaded.serial == issued.serial and loaded.key_pem == pair.key_pem


def test_renewal_is_due_at_two_thirds_of_the_remaining_life(ca: CertificateAuthority, tmp_path: Path) -> None:
    key = new_key()
    issued = ca.sign_device_csr(csr_pem(key, "x"), device_id="dev-abc", validity=timedelta(hours=3))
    pair = store_certificate(tmp_path / "device.pem", key, issued.certificate_pem)
    due_in = pair.renew_at - datetime.now(UTC)
    assert timedelta(hours=1, minutes=59) < due_in <= timedelta(hours=2)


def test_a_certificate_for_another_key_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    issued = ca.sign_device_csr(csr_pem(new_key(), "x"), device_id="dev-abc")
    with pytest.raises(CertificateProblem, match="another key"):
        store_certificate(tmp_path / "device.pem", new_key(), issued.certificate_pem)
    with pytest.raises(CertificateProblem, match="no valid certificate"):
        store_certificate(tmp_path / "device.pem", new_key(), b"garbage")
    assert not (tmp_path / "device.pem").exists()


def test_unusable_files_are_named(tmp_path: Path) -> None:
    assert load_certificate(tmp_path / "missing.pem") is None
    broken = tmp_path / "device.pem"
    broken.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(CertificateProblem, match="no key and certificate"):
        load_certificate(broken)
    broken.write_bytes(b"key\n-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(CertificateProblem, match="unreadable certificate"):
        load_certificate(broken)


def test_the_broker_context_presents_the_device_certificate(ca: CertificateAuthority, tmp_path: Path) -> None:
    key = new_key()
    issued = ca.sign_device_csr(csr_pem(key, "x"), device_id="dev-abc")
    pair = store_certificate(tmp_path / "device.pem", key, issued.certificate_pem)
    context = broker_tls_context(ca.certificate_pem, pair)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "edgefleet fleet CA"),),)]


async def test_renewal_closes_retired_channels_only_once_idle(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    from edgefleet.agent.device.channel import DeviceLink

    def pair(name: str) -> DeviceCertificate:
        key = new_key()
        issued = ca.sign_device_csr(csr_pem(key, "x"), device_id="dev-abc")
        return store_certificate(tmp_path / name, key, issued.certificate_pem)

    link = DeviceLink("127.0.0.1:9", ca.certificate_pem, pair("a.pem"))  # nothing listens there
    idle = link.channel
    await link.replace(pair("b.pem"))
    assert idle.get_state() == grpc.ChannelConnectivity.SHUTDOWN  # idle: closed at once
    busy = link.channel
    busy.get_state(try_to_connect=True)  # now connecting, as under a call
    await link.replace(pair("c.pem"))
    assert busy.get_state() != grpc.ChannelConnectivity.SHUTDOWN  # kept until it idles
    await link.close()
    assert busy.get_state() == grpc.ChannelConnectivity.SHUTDOWN


def test_the_enrollment_key_survives_a_restart(tmp_path: Path) -> None:
    from edgefleet.agent.device.tls import enrollment_key, key_pem

    path = tmp_path / "enroll.key"
    first = enrollment_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert key_pem(enrollment_key(path)) == key_pem(first)
    path.write_bytes(b"not a key")
    with pytest.raises(CertificateProblem, match="no usable key"):
        enrollment_key(path)
