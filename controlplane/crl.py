"""The fleet CA's certificate revocation list (CRL), as a PEM file for the MQTT broker.

A device certificate is valid until it expires (days, see ``controlplane.ca.DEVICE_VALIDITY``);
revoking it early is the only way to lock out a stolen or decommissioned device before then.
Mosquitto's ``crlfile`` option on the device listener makes OpenSSL check every client
certificate against this list during the TLS handshake, so a revoked device is refused when it
connects (see deploy/mosquitto/mosquitto.conf).

Two properties of that check shape this module:

* With ``crlfile`` set, OpenSSL refuses every client certificate when it has no CRL for the
  issuing CA, or when the CRL's ``next_update`` has passed. The file must therefore exist (an
  empty list is fine) and be re-issued well before it expires.
* The broker may read the file at any moment (start, reload), so it is replaced atomically:
  a reader never sees a torn list, which would lock out every device.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from controlplane.ca import CertificateAuthority
from protos.fleet.fsio import atomic_write_bytes

# How long a CRL stays valid. Re-issue it (with or without new entries) well within this
# window: an expired CRL makes the broker refuse every device.
CRL_VALIDITY = timedelta(days=7)


@dataclass(frozen=True, slots=True)
class RevokedCertificate:
    """One revoked device certificate: its serial (``IssuedCertificate.serial``) and when."""

    serial: int
    revoked_at: datetime


def build_crl(
    ca: CertificateAuthority,
    revoked: Iterable[RevokedCertificate],
    *,
    last_update: datetime | None = None,
    validity: timedelta = CRL_VALIDITY,
    number: int | None = None,
) -> bytes:
    """A PEM CRL listing ``revoked``, signed by the CA's key with SHA-256.

    ``last_update`` defaults to now and ``next_update`` is ``validity`` later. ``number`` is the
    CRL number (RFC 5280 requires one, increasing with each CRL a CA issues); by default it is
    ``last_update`` in milliseconds since the epoch, which increases as long as the clock does.
    """
    if validity <= timedelta(0):
        raise ValueError(f"a CRL's validity must be positive, not {validity}")
    issued = last_update or datetime.now(UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(issued)
        .next_update(issued + validity)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .add_extension(
            x509.CRLNumber(number if number is not None else int(issued.timestamp() * 1000)),
            critical=False,
        )
    )
    for entry in {entry.serial: entry for entry in revoked}.values():
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
            .build()
        )
    crl = builder.sign(ca.key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


def write_crl(
    path: Path,
    ca: CertificateAuthority,
    revoked: Iterable[RevokedCertificate],
    *,
    last_update: datetime | None = None,
) -> bytes:
    """Builds the CRL (see ``build_crl``) and atomically replaces ``path`` with it.

    The file is world-readable (a CRL is public) so the broker can read it after dropping
    root. Returns the PEM written.
    """
    pem = build_crl(ca, revoked, last_update=last_update)
    atomic_write_bytes(path, pem, mode=0o644)
    return pem
