"""A caller's CSR the fleet CA cannot use is refused with the CA's typed CertificateError, never
with whatever cryptography raised: an unknown curve, an unknown key type, a broken signature,
bytes that are no CSR at all."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from edgefleet.controlplane.trust.ca import CertificateError, csr_key_sha256, init_ca, new_private_key

P256 = bytes.fromhex("06082a8648ce3d030107")  # DER of the OID 1.2.840.10045.3.1.7 (prime256v1)
EC_PUBLIC_KEY = bytes.fromhex("06072a8648ce3d0201")  # DER of id-ecPublicKey
ECDSA_SHA256 = bytes.fromhex("06082a8648ce3d040302")  # DER of ecdsa-with-SHA256


def csr_der() -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")]))
        .sign(new_private_key(), hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def pem(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"-----END CERTIFICATE REQUEST-----\n"


def with_oid(old: bytes, new: bytes) -> bytes:
    der = csr_der()
    assert der.count(old) == 1
    return pem(der.replace(old, new))


UNUSABLE = {
    # Same length, another arc: OIDs cryptography has no implementation for.
    "unknown curve": with_oid(P256, bytes.fromhex("06082a8648ce3d030109")),
    "unknown key type": with_oid(EC_PUBLIC_KEY, bytes.fromhex("06072a8648ce3d0209")),
    "unknown signature algorithm": with_oid(ECDSA_SHA256, bytes.fromhex("06082a8648ce3d040309")),
    "not a CSR": b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    "not PEM": b"\xff\x00 nothing",
}


@pytest.mark.parametrize("csr", UNUSABLE.values(), ids=UNUSABLE.keys())
def test_an_unusable_csr_is_a_certificate_error(csr: bytes, tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    with pytest.raises(CertificateError):
        csr_key_sha256(csr)
    with pytest.raises(CertificateError):
        ca.sign_device_csr(csr, device_id="dev-1")


def test_a_usable_csr_still_gets_its_key_hash_and_certificate(tmp_path: Path) -> None:
    csr = pem(csr_der())
    assert len(csr_key_sha256(csr)) == 64
    issued = init_ca(tmp_path).sign_device_csr(csr, device_id="dev-1")
    assert x509.load_pem_x509_certificate(issued.certificate_pem).serial_number == issued.serial
