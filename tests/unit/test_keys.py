"""Key files, passphrases and root edits (the operator's side of rotation)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root

from edgefleet.controlplane.trust.keys import (
    KeyDir,
    KeysAlreadyExist,
    RootEditRefused,
    WrongPassphrase,
    init_keys,
)
from edgefleet.protos.fleet.uptane import DIRECTOR, IMAGE, TrustAnchors


def test_passphrase_encrypts_every_private_key(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "k", passphrase=b"correct horse")
    pems = list((tmp_path / "k").glob("*.pem"))
    assert len(pems) == 5
    assert all(b"ENCRYPTED PRIVATE KEY" in p.read_bytes() for p in pems)
    assert all(p.stat().st_mode & 0o077 == 0 for p in pems)
    assert keys.release_signers()
    with pytest.raises(WrongPassphrase):
        KeyDir(tmp_path / "k", passphrase=b"wrong").release_signers()
    with pytest.raises(WrongPassphrase):
        KeyDir(tmp_path / "k").release_signers()


def test_init_refuses_to_overwrite_and_writes_the_trust_file(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "k")
    with pytest.raises(KeysAlreadyExist):
        init_keys(tmp_path / "k")
    anchors = TrustAnchors.from_bytes(keys.trust_path.read_bytes())
    assert Metadata[Root].from_bytes(anchors.image_root).signed.version == 1
    assert Metadata[Root].from_bytes(anchors.director_root).signed.version == 1


def test_root_edits_chain_and_refuse_impossible_thresholds(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "k")
    with pytest.raises(RootEditRefused):
        keys.set_threshold(IMAGE, "targets", 2)  # only one release key exists
    keys.add_key(IMAGE, "targets")
    keys.set_threshold(IMAGE, "targets", 2)
    history = keys.root_history(IMAGE)
    assert len(history) == 3
    for older, newer in itertools.pairwise(history):
        old = Metadata[Root].from_bytes(older).signed
        new = Metadata[Root].from_bytes(newer)
        old.verify_delegate("root", new.signed_bytes, new.signatures)  # each version vouched for by the last
    assert len(keys.release_signers()) == 2


def test_revoking_below_threshold_is_refused(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "k")
    new_key = keys.add_key(IMAGE, "targets")
    keys.set_threshold(IMAGE, "targets", 2)
    with pytest.raises(RootEditRefused):
        keys.revoke_key(new_key)
    keys.set_threshold(IMAGE, "targets", 1)
    assert keys.revoke_key(new_key) == IMAGE
    assert new_key not in keys.root(IMAGE).signed.roles["targets"].keyids


def test_rotation_replaces_the_role_keys(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "k")
    before = set(keys.root(DIRECTOR).signed.roles["timestamp"].keyids)
    new = keys.rotate(DIRECTOR, "timestamp")
    after = keys.root(DIRECTOR).signed.roles["timestamp"].keyids
    assert after == [new] and not before & set(after)
    listed = {row["keyid"]: row for row in keys.list_keys()}
    assert listed[new]["roles"] == ["timestamp"] and listed[new]["private_key_here"]
