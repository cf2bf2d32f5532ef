"""The device's TLS identity: a P-256 key made on the device (it never leaves it), the CSR sent
at enrollment and renewal, and the short-lived certificate the fleet CA returns.

Key and certificate are kept together in one owner-only PEM file replaced atomically, so a
kill during renewal leaves the old pair or the new one, never a key without its certificate.
A fresh key is made for every renewal: a key that leaked stops working when its certificate
expires, days later at most.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgefleet.agent.errors import AgentError
from edgefleet.protos.fleet.fsio import atomic_write_bytes

RENEW_AFTER_FRACTION = 2 / 3
"""Renew once this much of the time between receiving a certificate and its expiry has passed."""


class CertificateProblem(AgentError):
    """The device's certificate file is unusable, or the control plane returned a bad one."""


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def enrollment_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The key this device enrolls with, kept in ``path`` until enrollment is complete.

    A device killed (or cut off) after the control plane answered, but before it stored the
    answer, enrolls again with the same token and the same key, and the control plane
    recognises it instead of refusing a spent token.
    """
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        key = new_key()
        atomic_write_bytes(path, key_pem(key), mode=0o600)
        return key
    except ValueError as exc:
        raise CertificateProblem(f"{path} holds no usable key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateProblem(f"{path} holds no elliptic-curve key")
    return key


def csr_pem(key: ec.EllipticCurvePrivateKey, hostname: str) -> bytes:
    """A CSR proving possession of ``key``. The subject is informational: the CA names the
    certificate after the device id it assigns."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (hostname or "edgefleet-device")[:64])])
    request = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return request.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class DeviceCertificate:
    """A key and the certificate issued for it, as stored in ``path``."""

    path: Path
    key_pem: bytes
    certificate_pem: bytes
    received_at: datetime

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certificate_pem)

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    @property
    def renew_at(self) -> datetime:
        return self.received_at + (self.not_after - self.received_at) * RENEW_AFTER_FRACTION

    @property
    def serial(self) -> int:
        return self.certificate.serial_number

    def grpc_credentials(self, ca_pem: bytes) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=ca_pem, private_key=self.key_pem, certificate_chain=self.certificate_pem
        )

    def load_into(self, context: ssl.SSLContext) -> None:
        """(Re)loads this pair as the client certificate of ``context``; connections made after
        this present it, the open one keeps the certificate it was authenticated with."""
        context.load_cert_chain(self.path)


def broker_tls_context(ca_pem: bytes, certificate: DeviceCertificate) -> ssl.SSLContext:
    """TLS for the MQTT broker: verify it against ``ca_pem``, present the device certificate
    (the broker takes the device id from it: ``use_identity_as_username``)."""
    context = ssl.create_default_context(cadata=ca_pem.decode())
    certificate.load_into(context)
    return context


def store_certificate(
    path: Path, key: ec.EllipticCurvePrivateKey, certificate_pem: bytes
) -> DeviceCertificate:
    """Checks that the control plane's certificate is for ``key`` and persists the pair."""
    try:
        cert = x509.load_pem_x509_certificate(certificate_pem)
    except ValueError as exc:
        raise CertificateProblem(f"the control plane returned no valid certificate: {exc}") from exc
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(serialization.Encoding.PEM, public) != key.public_key().public_bytes(
        serialization.Encoding.PEM, public
    ):
        raise CertificateProblem("the control plane returned a certificate for another key")
    private = key_pem(key)
    atomic_write_bytes(path, private + certificate_pem, mode=0o600)
    return DeviceCertificate(path, private, certificate_pem, datetime.now(UTC))


def load_certificate(path: Path) -> DeviceCertificate | None:
    """The stored pair, or None before enrollment."""
    try:
        data = path.read_bytes()
        received_at = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CertificateProblem(f"cannot read {path}: {exc.strerror}") from exc
    begin = data.find(b"-----BEGIN CERTIFICATE-----")
    if begin <= 0:
        raise CertificateProblem(f"{path} holds no key and certificate pair")
    pair = DeviceCertificate(path, data[:begin], data[begin:], received_at)
    try:
        pair.certificate  # noqa: B018 - parse now, fail with the file's name
    except ValueError as exc:
        raise CertificateProblem(f"{path} holds an unreadable certificate: {exc}") from exc
    return pair
