"""Signing keys and the roots of trust they anchor, for both Uptane repositories.

``fleetctl keys init`` creates, per repository, a self-signed TUF root and its keys:

* image repository: ``root`` key; ``targets`` = the release key (signs releases, can stay
  offline); ``snapshot``/``timestamp`` = an online key the control plane signs with;
* director repository: ``root`` key; ``targets``/``snapshot``/``timestamp`` = an online key
  the control plane signs per-device metadata with.

Every later change to a root (add, revoke or rotate a key, change a threshold) writes a new
root version signed by the previous root's threshold and by the new one's, which devices
follow. Private keys are PKCS#8 PEM files readable by their owner, encrypted when a
passphrase is given. ``trust.json`` holds both current roots and the fleet's TLS CA
certificate: the file devices are provisioned with.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization.json import JSONSerializer

from edgefleet.controlplane.trust.ca import ca_paths, init_ca
from edgefleet.protos.fleet.fsio import atomic_write_bytes
from edgefleet.protos.fleet.uptane import DIRECTOR, IMAGE, TrustAnchors


def default_home() -> Path:
    """Where fleetctl keeps keys, tokens and a local control plane: $EDGEFLEET_HOME or ~/.edgefleet."""
    return Path(os.environ.get("EDGEFLEET_HOME", Path.home() / ".edgefleet"))


REPOSITORIES = (IMAGE, DIRECTOR)
ROLES = ("root", "targets", "snapshot", "timestamp")
KEYRING = "keyring.json"
TRUST_FILE = "trust.json"
DEFAULT_ROOT_EXPIRY = timedelta(days=365)
# Which key (by label) holds which role when a repository is created.
INITIAL_LAYOUT = {
    IMAGE: {
        "root": "image-root",
        "targets": "release",
        "snapshot": "image-online",
        "timestamp": "image-online",
    },
    DIRECTOR: {
        "root": "director-root",
        "targets": "director-online",
        "snapshot": "director-online",
        "timestamp": "director-online",
    },
}


class KeyStoreError(Exception):
    """Base of key-store problems; the message says what to do."""


class KeysAlreadyExist(KeyStoreError):
    """``keys init`` would overwrite existing keys."""


class KeysMissing(KeyStoreError):
    """A key, the keyring or a root is not in the key directory."""


class WrongPassphrase(KeyStoreError):
    """A private key could not be decrypted with the passphrase given."""


class RootEditRefused(KeyStoreError):
    """The root change would not verify (e.g. it would drop a role below its threshold)."""


def _serializer() -> JSONSerializer:
    return JSONSerializer(compact=False)


@dataclass
class KeyDir:
    """A directory holding private keys, the keyring index and both repositories' roots."""

    path: Path
    passphrase: bytes | None = None
    _cache: dict[str, CryptoSigner] = field(default_factory=dict, repr=False)

    # -- layout --------------------------------------------------------------------------

    @property
    def trust_path(self) -> Path:
        return self.path / TRUST_FILE

    @property
    def tls_ca_path(self) -> Path:
        """The fleet CA certificate: what fleetctl verifies the control plane with."""
        return ca_paths(self.path)[1]

    def root_path(self, repo: str) -> Path:
        return self.path / repo / "root.json"

    def _keyring(self) -> dict[str, dict[str, str]]:
        try:
            raw: dict[str, dict[str, str]] = json.loads((self.path / KEYRING).read_bytes())["keys"]
        except FileNotFoundError as exc:
            raise KeysMissing(f"no keyring in {self.path}; run 'fleetctl keys init' first") from exc
        return raw

    def _write_keyring(self, ring: dict[str, dict[str, str]]) -> None:
        atomic_write_bytes(self.path / KEYRING, json.dumps({"keys": ring}, indent=2, sort_keys=True).encode())

    # -- roots ---------------------------------------------------------------------------

    def root_bytes(self, repo: str) -> bytes:
        try:
            return self.root_path(repo).read_bytes()
        except FileNotFoundError as exc:
            raise KeysMissing(f"no {repo} root in {self.path}; run 'fleetctl keys init' first") from exc

    def root(self, repo: str) -> Metadata[Root]:
        return Metadata[Root].from_bytes(self.root_bytes(repo))

    def trust_anchors(self) -> TrustAnchors:
        ca = self.path / "tls" / "ca.pem"
        return TrustAnchors(
            image_root=self.root_bytes(IMAGE),
            director_root=self.root_bytes(DIRECTOR),
            tls_ca=ca.read_bytes() if ca.exists() else None,
        )

    def root_history(self, repo: str) -> list[bytes]:
        """Every root version of a repository, oldest first."""
        directory = self.path / repo / "root_history"
        versions = sorted(int(p.name.split(".")[0]) for p in directory.glob("*.root.json"))
        return [(directory / f"{v}.root.json").read_bytes() for v in versions]

    def _write_root(self, repo: str, metadata: Metadata[Root]) -> bytes:
        data = metadata.to_bytes(_serializer())
        atomic_write_bytes(self.path / repo / "root_history" / f"{metadata.signed.version}.root.json", data)
        atomic_write_bytes(self.root_path(repo), data)
        if all(self.root_path(r).exists() for r in REPOSITORIES):
            atomic_write_bytes(self.trust_path, self.trust_anchors().to_bytes())
        return data

    # -- private keys --------------------------------------------------------------------

    def _new_key(self, repo: str, label: str) -> SSlibKey:
        private = Ed25519PrivateKey.generate()
        public = SSlibKey.from_crypto(private.public_key())
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(self.passphrase)
            if self.passphrase
            else serialization.NoEncryption()
        )
        pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        filename = f"{label}-{public.keyid[:16]}.pem"
        atomic_write_bytes(self.path / filename, pem, mode=0o600)
        ring = self._keyring() if (self.path / KEYRING).exists() else {}
        ring[public.keyid] = {"file": filename, "repo": repo, "label": label}
        self._write_keyring(ring)
        return public

    def _load_signer(self, keyid: str) -> CryptoSigner:
        if keyid in self._cache:
            return self._cache[keyid]
        entry = self._keyring().get(keyid)
        if entry is None:
            raise KeysMissing(f"private key {keyid[:16]} is not in {self.path}")
        pem = (self.path / entry["file"]).read_bytes()
        try:
            private = serialization.load_pem_private_key(pem, password=self.passphrase)
        except (TypeError, ValueError) as exc:
            raise WrongPassphrase(
                f"cannot decrypt {entry['file']}: wrong or missing passphrase (EDGEFLEET_KEY_PASSPHRASE)"
            ) from exc
        if not isinstance(private, Ed25519PrivateKey):
            raise KeysMissing(f"{entry['file']} is not an Ed25519 private key")
        signer = CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))
        self._cache[keyid] = signer
        return signer

    def signers(self, repo: str, role: str, *, root: Root | None = None) -> list[CryptoSigner]:
        """The local private keys the current root lists for ``role``; at least its threshold."""
        root = root or self.root(repo).signed
        ring = self._keyring()
        role_def = root.roles[role]
        found = [self._load_signer(k) for k in role_def.keyids if k in ring]
        if len(found) < role_def.threshold:
            raise KeysMissing(
                f"{repo} {role} needs {role_def.threshold} key(s); {len(found)} available in {self.path}"
            )
        return found

    def release_signers(self) -> list[CryptoSigner]:
        """The keys that sign releases: the image repository's ``targets`` role."""
        return self.signers(IMAGE, "targets")

    def list_keys(self) -> list[dict[str, object]]:
        """Every key of both current roots, with its roles and whether its private key is here."""
        ring = self._keyring()
        rows: list[dict[str, object]] = []
        for repo in REPOSITORIES:
            root = self.root(repo).signed
            for keyid in root.keys:
                roles = [r for r in ROLES if keyid in root.roles[r].keyids]
                rows.append(
                    {
                        "repository": repo,
                        "keyid": keyid,
                        "roles": roles,
                        "label": ring.get(keyid, {}).get("label", ""),
                        "private_key_here": keyid in ring,
                    }
                )
        return rows

    # -- root edits ----------------------------------------------------------------------

    def edit_root(
        self, repo: str, edit: Callable[[Root], None], *, expires_in: timedelta = DEFAULT_ROOT_EXPIRY
    ) -> bytes:
        """Writes the next root version: signed by the old root's threshold and the new one's."""
        old = self.root(repo)
        new = Metadata[Root].from_bytes(old.to_bytes(_serializer()))
        new.signatures.clear()
        edit(new.signed)
        new.signed.version = old.signed.version + 1
        new.signed.expires = datetime.now(UTC) + expires_in
        for role in ROLES:
            definition = new.signed.roles[role]
            if len(definition.keyids) < definition.threshold:
                raise RootEditRefused(
                    f"{repo} {role} would have {len(definition.keyids)} key(s) for a threshold of "
                    f"{definition.threshold}"
                )
        signing = {s.public_key.keyid: s for s in self.signers(repo, "root", root=old.signed)}
        signing |= {s.public_key.keyid: s for s in self.signers(repo, "root", root=new.signed)}
        for signer in signing.values():
            new.sign(signer, append=True)
        try:
            old.signed.verify_delegate("root", new.signed_bytes, new.signatures)
            new.signed.verify_delegate("root", new.signed_bytes, new.signatures)
        except UnsignedMetadataError as exc:
            raise RootEditRefused(f"new {repo} root would not verify: {exc}") from exc
        return self._write_root(repo, new)

    def add_key(self, repo: str, role: str) -> str:
        key = self._new_key(repo, f"{repo}-{role}")
        self.edit_root(repo, lambda root: root.add_key(key, role))
        return key.keyid

    def revoke_key(self, keyid: str) -> str:
        """Removes a key from every role of its repository; returns the repository."""
        for repo in REPOSITORIES:
            root = self.root(repo).signed
            if keyid in root.keys:

                def revoke(r: Root) -> None:
                    for role in ROLES:
                        if keyid in r.roles[role].keyids:
                            r.revoke_key(keyid, role)

                self.edit_root(repo, revoke)
                return repo
        raise KeysMissing(f"no key {keyid} in either root")

    def rotate(self, repo: str, role: str) -> str:
        """Replaces every key of ``role`` with one new key, in one root version."""
        new_key = self._new_key(repo, f"{repo}-{role}")

        def swap(root: Root) -> None:
            for old in list(root.roles[role].keyids):
                root.revoke_key(old, role)
            root.add_key(new_key, role)

        self.edit_root(repo, swap)
        return new_key.keyid

    def set_threshold(self, repo: str, role: str, threshold: int) -> None:
        if threshold < 1:
            raise RootEditRefused("a threshold must be at least 1")

        def change(root: Root) -> None:
            root.roles[role].threshold = threshold

        self.edit_root(repo, change)


def init_keys(
    path: Path,
    *,
    passphrase: bytes | None = None,
    root_expiry: timedelta = DEFAULT_ROOT_EXPIRY,
    force: bool = False,
) -> KeyDir:
    """Creates both repositories' keys and roots; refuses to overwrite unless forced."""
    keys = KeyDir(path, passphrase=passphrase)
    if not force and (path / KEYRING).exists():
        raise KeysAlreadyExist(f"keys already exist in {path}; pass --force to replace them")
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    if force:
        (path / KEYRING).unlink(missing_ok=True)
    if force:
        shutil.rmtree(path / "tls", ignore_errors=True)
    init_ca(path, passphrase=passphrase)  # before the roots: trust.json carries its certificate
    for repo in REPOSITORIES:
        by_label: dict[str, SSlibKey] = {}
        root = Root(expires=datetime.now(UTC) + root_expiry, consistent_snapshot=False)
        for role, label in INITIAL_LAYOUT[repo].items():
            if label not in by_label:
                by_label[label] = keys._new_key(repo, label)
            root.add_key(by_label[label], role)
        metadata = Metadata(root)
        for signer in keys.signers(repo, "root", root=root):
            metadata.sign(signer, append=True)
        keys._write_root(repo, metadata)
    return keys
