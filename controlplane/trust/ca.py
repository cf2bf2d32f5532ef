"""The fleet's TLS certificate authority: server certificates for the control plane and short-
lived client certificates for devices, issued from CSRs whose private keys never leave them.

The CA lives in the key directory (``tls/``); its certificate is part of the device trust file
so agents can verify the control plane before they have a certificate of their own.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.protos.fleet.fsio import atomic_write_bytes

CA_DIR = "tls"
CA_KEY = "ca.key.pem"
CA_CERT = "ca.pem"
CA_VALIDITY = timedelta(days=3650)
SERVER_VALIDITY = timedelta(days=90)
DEVICE_VALIDITY = timedelta(days=7)
CLOCK_SKEW = timedelta(minutes=5)
DEVICE_ID = re.compile(r"dev-[0-9a-z-]{1,60}")
"""What the control plane names devices (``dev-`` + hex). Certificates for anything else, such
as the broker user ``edgefleet-controlplane``, are never issued to a CSR."""


class CertificateError(Exception):
    """A CSR or certificate the authority refuses; the message says why."""


_CSR_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion)
"""What cryptography raises for a CSR it cannot parse or whose key or signature algorithm it
does not know (an unknown curve, say): a caller's bytes, so a refusal, never an internal error."""


def _parse_csr(csr_pem: bytes) -> tuple[x509.CertificateSigningRequest, CertificatePublicKeyTypes]:
    """The CSR and its public key, or CertificateError. cryptography parses lazily: the key
    and the signature algorithm are only decoded when asked for, so both are asked for here,
    inside the same refusal, and a signature that does not verify is refused too."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        public_key = csr.public_key()
        signed = csr.is_signature_valid
    except _CSR_ERRORS as exc:
        raise CertificateError(f"not a PEM certificate signing request it can use: {exc}") from exc
    if not signed:
        raise CertificateError("the CSR's signature does not match its public key")
    return csr, public_key


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    certificate_pem: bytes
    serial: int
    not_after: datetime


def _encryption(passphrase: bytes | None) -> serialization.KeySerializationEncryption:
    return serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, _encryption(passphrase)
    )


@dataclass(frozen=True, slots=True)
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def _builder(
        self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey, validity: timedelta
    ) -> tuple[x509.CertificateBuilder, int, datetime]:
        now = datetime.now(UTC)
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        return builder, serial, now + validity

    def issue_server(
        self, hostnames: Sequence[str], *, validity: timedelta = SERVER_VALIDITY
    ) -> tuple[bytes, bytes]:
        """A fresh key and certificate for the control plane's listener; returns (key PEM, cert PEM)."""
        key = new_private_key()
        names: list[x509.GeneralName] = []
        for host in dict.fromkeys(hostnames):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet-controlplane")])
        builder, _, _ = self._builder(subject, key.public_key(), validity)
        cert = (
            builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return private_key_pem(key), cert.public_bytes(serialization.Encoding.PEM)

    def sign_device_csr(
        self, csr_pem: bytes, *, device_id: str, validity: timedelta = DEVICE_VALIDITY
    ) -> IssuedCertificate:
        """A client certificate for ``device_id`` from the device's CSR.

        The subject is set here, never taken from the CSR: the device id comes from the
        authority, so a device cannot ask for another device's name.
        """
        if not DEVICE_ID.fullmatch(device_id):
            raise CertificateError(f"{device_id!r} is not a device id")
        _, public_key = _parse_csr(csr_pem)
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise CertificateError("device keys must be elliptic-curve (P-256) keys")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
        builder, serial, not_after = self._builder(subject, public_key, validity)
        cert = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        ).sign(self.key, hashes.SHA256())
        return IssuedCertificate(cert.public_bytes(serialization.Encoding.PEM), serial, not_after)


def csr_key_sha256(csr_pem: bytes) -> str:
    """The sha256 of the CSR's public key (SubjectPublicKeyInfo DER): which key is enrolling.
    CertificateError for a CSR that does not parse, names a key type or curve cryptography does
    not support, or whose signature does not verify."""
    _, public_key = _parse_csr(csr_pem)
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def ca_paths(keys_dir: Path) -> tuple[Path, Path]:
    return keys_dir / CA_DIR / CA_KEY, keys_dir / CA_DIR / CA_CERT


def init_ca(keys_dir: Path, *, passphrase: bytes | None = None) -> CertificateAuthority:
    """Creates the fleet CA in the key directory (refuses to replace an existing one)."""
    key_path, cert_path = ca_paths(keys_dir)
    if key_path.exists():
        raise CertificateError(f"a CA already exists in {key_path.parent}")
    key = new_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgefleet fleet CA")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    atomic_write_bytes(key_path, private_key_pem(key, passphrase), mode=0o600)
    atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return CertificateAuthority(key, cert)


def load_ca(keys_dir: Path, *, passphrase: bytes | None = None) -> CertificateAuthority | None:
    """The fleet CA, or None when the key directory has none."""
    key_path, cert_path = ca_paths(keys_dir)
    if not key_path.exists():
        return None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=passphrase)
    except (TypeError, ValueError) as exc:
        raise CertificateError(f"cannot decrypt {key_path}: wrong or missing passphrase") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{key_path} is not an elliptic-curve key")
    return CertificateAuthority(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))
