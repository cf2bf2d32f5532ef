"""CrlFile, the embedded broker's revocation check: it follows the file as the control plane
re-issues it, and trusts only an unexpired list signed by the fleet CA."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edgefleet.controlplane.trust.ca import init_ca
from edgefleet.controlplane.trust.crl import CRL_VALIDITY, CrlFile, CrlUnusable, RevokedCertificate, write_crl

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def test_a_reissued_crl_counts_from_the_next_check(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "keys")
    path = tmp_path / "crl.pem"
    write_crl(path, ca, [], last_update=NOW)
    crl = CrlFile(path, ca.certificate)
    assert not crl.is_revoked(7, now=NOW)
    write_crl(path, ca, [RevokedCertificate(7, NOW)], last_update=NOW + timedelta(seconds=1))
    assert crl.is_revoked(7, now=NOW) and not crl.is_revoked(8, now=NOW)


def test_an_expired_missing_or_foreign_crl_is_unusable(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "keys")
    path = tmp_path / "crl.pem"
    crl = CrlFile(path, ca.certificate)
    with pytest.raises(CrlUnusable):
        crl.is_revoked(1, now=NOW)  # not issued yet
    write_crl(path, ca, [], last_update=NOW)
    with pytest.raises(CrlUnusable):
        crl.is_revoked(1, now=NOW + CRL_VALIDITY)
    write_crl(path, init_ca(tmp_path / "other"), [], last_update=NOW)
    with pytest.raises(CrlUnusable):
        crl.is_revoked(1, now=NOW)
