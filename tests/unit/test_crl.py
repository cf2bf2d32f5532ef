"""The fleet CA's CRL: what Mosquitto's crlfile reads must be signed by the CA, name it as the
issuer, list exactly the revoked serials and carry a next update in the future."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from edgefleet.controlplane.trust.ca import CertificateAuthority, init_ca, new_private_key
from edgefleet.controlplane.trust.crl import CRL_VALIDITY, RevokedCertificate, build_crl, write_crl


def _device_serial(ca: CertificateAuthority, device_id: str) -> int:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(new_private_key(), hashes.SHA256())
    )
    return ca.sign_device_csr(csr.public_bytes(serialization.Encoding.PEM), device_id=device_id).serial


def test_written_crl_is_signed_by_the_ca_and_lists_the_revoked_serials(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "keys")
    revoked_at = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    serials = [_device_serial(ca, "dev-1"), _device_serial(ca, "dev-2")]
    kept = _device_serial(ca, "dev-3")
    issued = datetime.now(UTC).replace(microsecond=0)
    path = tmp_path / "tls" / "devices.crl"

    pem = write_crl(path, ca, [RevokedCertificate(s, revoked_at) for s in serials], last_update=issued)

    assert path.read_bytes() == pem
    assert pem.startswith(b"-----BEGIN X509 CRL-----")
    crl = x509.load_pem_x509_crl(path.read_bytes())
    assert crl.is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]
    assert isinstance(crl.signature_hash_algorithm, hashes.SHA256)
    assert crl.issuer == ca.certificate.subject
    assert {entry.serial_number for entry in crl} == set(serials)
    assert crl.get_revoked_certificate_by_serial_number(kept) is None
    assert all(entry.revocation_date_utc == revoked_at for entry in crl)
    assert crl.last_update_utc == issued
    assert crl.next_update_utc == issued + CRL_VALIDITY
    key_id = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == key_id.digest
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["devices.crl"]  # no temp file left


def test_empty_crl_is_valid(tmp_path: Path) -> None:
    """Mosquitto needs a CRL for the CA even when nothing is revoked: an empty one."""
    ca = init_ca(tmp_path)

    crl = x509.load_pem_x509_crl(build_crl(ca, []))

    assert len(crl) == 0
    assert crl.is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]
    assert crl.next_update_utc is not None and crl.next_update_utc > datetime.now(UTC)


def test_another_cas_signature_does_not_verify(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "a")
    other = init_ca(tmp_path / "b")

    crl = x509.load_pem_x509_crl(build_crl(other, [RevokedCertificate(7, datetime.now(UTC))]))

    assert not crl.is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]


def test_a_serial_listed_twice_appears_once_with_its_last_date(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    first = datetime(2030, 1, 1, tzinfo=UTC)
    second = first + timedelta(days=1)

    crl = x509.load_pem_x509_crl(
        build_crl(ca, [RevokedCertificate(42, first), RevokedCertificate(42, second)], number=9)
    )

    assert [(entry.serial_number, entry.revocation_date_utc) for entry in crl] == [(42, second)]
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 9


def test_validity_and_default_numbering(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    earlier = datetime(2030, 1, 1, tzinfo=UTC)
    later = earlier + timedelta(seconds=1)

    numbers = [
        x509.load_pem_x509_crl(build_crl(ca, [], last_update=when, validity=timedelta(hours=1)))
        .extensions.get_extension_for_class(x509.CRLNumber)
        .value.crl_number
        for when in (earlier, later)
    ]

    assert numbers[0] < numbers[1], "CRL numbers must increase with each CRL"
    with pytest.raises(ValueError, match="positive"):
        build_crl(ca, [], validity=timedelta(0))
