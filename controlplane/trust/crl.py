"""The fleet CA's certificate revocation list (CRL), as a PEM file for the MQTT broker.

A device certificate is valid until it expires (days, see ``ca.DEVICE_VALIDITY``);
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

The embedded broker (controlplane/telemetry/broker.py) checks device certificates against the same file
through ``CrlFile``, with the same rules: no usable CRL, no device.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization

from edgefleet.controlplane.trust.ca import CertificateAuthority
from edgefleet.protos.fleet.fsio import atomic_write_bytes

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


MAX_CRL_BYTES = 64 * 1024 * 1024
"""Largest CRL file read (a serial and a date take ~40 bytes: over a million revocations)."""


class CrlUnusable(Exception):
    """The CRL file cannot be trusted right now: missing, too large, not a CRL, not signed by
    the fleet CA, or past its next update. A broker then refuses every device, as OpenSSL does
    with Mosquitto's ``crlfile``."""


class CrlFile:
    """The CRL at ``path`` as a revocation check for a broker running in this process.

    The file is read again whenever it changes, so a CRL re-issued while the broker runs (a
    revocation, the daily re-issue) counts from the next connection on. ``write_crl`` replaces
    the file atomically, which gives it a new inode: (inode, mtime, size) tells a change from
    a re-read of the same file, and a check costs one ``stat`` otherwise. The list is trusted
    only with a valid signature of ``issuer``'s key and until its ``next_update``.
    """

    def __init__(self, path: Path, issuer: x509.Certificate) -> None:
        self.path = path
        self._issuer = issuer
        self._stamp: tuple[int, int, int] | None = None
        self._crl: x509.CertificateRevocationList | None = None

    def is_revoked(self, serial: int, *, now: datetime | None = None) -> bool:
        """Whether the certificate with ``serial`` is listed; CrlUnusable when the list cannot
        be trusted (then nobody should be admitted)."""
        crl = self._current()
        next_update = crl.next_update_utc
        if next_update is None or (now or datetime.now(UTC)) >= next_update:
            raise CrlUnusable(f"the CRL in {self.path} expired at {next_update}")
        return crl.get_revoked_certificate_by_serial_number(serial) is not None

    def _current(self) -> x509.CertificateRevocationList:
        try:
            status = self.path.stat()
        except OSError as exc:
            raise CrlUnusable(f"no CRL at {self.path}: {exc}") from exc
        stamp = (status.st_ino, status.st_mtime_ns, status.st_size)
        if self._crl is not None and stamp == self._stamp:
            return self._crl
        self._crl, self._stamp = None, None
        if status.st_size > MAX_CRL_BYTES:
            raise CrlUnusable(f"{self.path} holds {status.st_size} bytes, more than {MAX_CRL_BYTES}")
        try:
            with self.path.open("rb") as file:
                crl = x509.load_pem_x509_crl(file.read(MAX_CRL_BYTES + 1))
            signed = crl.is_signature_valid(self._issuer.public_key())  # type: ignore[arg-type]
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise CrlUnusable(f"cannot read the CRL in {self.path}: {exc}") from exc
        if not signed or crl.issuer != self._issuer.subject:
            raise CrlUnusable(f"the CRL in {self.path} is not the fleet CA's")
        self._crl, self._stamp = crl, stamp
        return crl
