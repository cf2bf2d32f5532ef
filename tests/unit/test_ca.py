"""The fleet CA: server certificates, device certificates from CSRs, refusals."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.controlplane.trust.ca import CertificateError, init_ca, load_ca, new_private_key
from edgefleet.controlplane.trust.keys import init_keys
from edgefleet.protos.fleet.uptane import TrustAnchors


def csr_for(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, name: str = "dev-evil") -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def test_device_certificate_names_the_device_the_authority_chose(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    device_key = new_private_key()
    issued = ca.sign_device_csr(csr_for(device_key, "dev-someone-else"), device_id="dev-123")
    cert = x509.load_pem_x509_certificate(issued.certificate_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-123"
    assert cert.issuer == ca.certificate.subject
    assert cert.public_key().public_numbers() == device_key.public_key().public_numbers()  # type: ignore[union-attr]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(ca.certificate)


def test_server_certificate_covers_the_names_asked_for(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    _, cert_pem = ca.issue_server(["127.0.0.1", "localhost", "cp.example"])
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", "cp.example"}
    cert.verify_directly_issued_by(ca.certificate)


def test_bad_requests_are_refused(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    with pytest.raises(CertificateError, match="not a PEM"):
        ca.sign_device_csr(b"garbage", device_id="dev-1")
    with pytest.raises(CertificateError, match="elliptic-curve"):
        ca.sign_device_csr(csr_for(ed25519.Ed25519PrivateKey.generate()), device_id="dev-1")


def test_ca_is_created_once_encrypted_and_shipped_in_the_trust_file(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "k", passphrase=b"pw")
    with pytest.raises(CertificateError, match="already exists"):
        init_ca(tmp_path / "k")
    assert b"ENCRYPTED" in (tmp_path / "k" / "tls" / "ca.key.pem").read_bytes()
    with pytest.raises(CertificateError, match="passphrase"):
        load_ca(tmp_path / "k", passphrase=b"wrong")
    loaded = load_ca(tmp_path / "k", passphrase=b"pw")
    assert loaded is not None
    anchors = TrustAnchors.from_bytes(keys.trust_path.read_bytes())
    assert anchors.tls_ca == loaded.certificate_pem
    assert load_ca(tmp_path / "none") is None


def test_only_device_ids_get_client_certificates(tmp_path: Path) -> None:
    """A CSR can never buy the broker's control-plane identity or any other non-device name."""
    ca = init_ca(tmp_path)
    for name in ("edgefleet-controlplane", "dev-", "dev-A/B", "", "DEV-1"):
        with pytest.raises(CertificateError, match="not a device id"):
            ca.sign_device_csr(csr_for(ec.generate_private_key(ec.SECP256R1())), device_id=name)
