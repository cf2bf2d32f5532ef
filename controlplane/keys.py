"""Signing keys of the operator and the device trust file they anchor.

``fleetctl keys init`` creates three Ed25519 keys and a self-signed TUF root:

* ``root``: signs the root metadata (the trust file devices are provisioned with);
* ``release``: the ``targets`` role; signs bundle releases and can be kept offline;
* ``online``: the ``snapshot``/``timestamp`` roles, for metadata the control plane signs itself.

Private keys are PKCS#8 PEM files readable by their owner only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Metadata, Root
from tuf.api.serialization.json import JSONSerializer

from protos.fleet.fsio import atomic_write_bytes

ROOT_FILE = "root.json"
KEY_NAMES = ("root", "release", "online")
ROLE_KEYS = {"root": "root", "targets": "release", "snapshot": "online", "timestamp": "online"}


class KeyError_(Exception):
    """Base of key-store problems."""


class KeysAlreadyExist(KeyError_):
    """``keys init`` would overwrite existing keys."""


class KeysMissing(KeyError_):
    """A key or the trust file is not in the key directory."""


@dataclass(frozen=True, slots=True)
class KeyDir:
    """A directory holding the private keys and the trust file."""

    path: Path

    def key_path(self, name: str) -> Path:
        return self.path / f"{name}.pem"

    @property
    def root_path(self) -> Path:
        return self.path / ROOT_FILE

    def signer(self, name: str) -> CryptoSigner:
        """Loads one private key as a signer usable by python-tuf."""
        path = self.key_path(name)
        try:
            pem = path.read_bytes()
        except FileNotFoundError as exc:
            raise KeysMissing(f"no {name} key at {path}; run 'fleetctl keys init' first") from exc
        private = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(private, Ed25519PrivateKey):
            raise KeysMissing(f"{path} is not an Ed25519 private key")
        return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))

    def root_bytes(self) -> bytes:
        try:
            return self.root_path.read_bytes()
        except FileNotFoundError as exc:
            raise KeysMissing(f"no trust file at {self.root_path}; run 'fleetctl keys init' first") from exc


def init_keys(path: Path, *, root_expiry: timedelta = timedelta(days=365), force: bool = False) -> KeyDir:
    """Creates the keys and a root signed by the root key; refuses to overwrite unless forced."""
    keys = KeyDir(path)
    if not force and any(keys.key_path(n).exists() for n in KEY_NAMES):
        raise KeysAlreadyExist(f"keys already exist in {path}; pass --force to replace them")
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    public: dict[str, SSlibKey] = {}
    for name in KEY_NAMES:
        private = Ed25519PrivateKey.generate()
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        atomic_write_bytes(keys.key_path(name), pem, mode=0o600)
        public[name] = SSlibKey.from_crypto(private.public_key())

    root = Root(expires=datetime.now(UTC) + root_expiry)
    for role, key_name in ROLE_KEYS.items():
        root.add_key(public[key_name], role)
    metadata = Metadata(root)
    metadata.sign(keys.signer("root"))
    atomic_write_bytes(keys.root_path, metadata.to_bytes(JSONSerializer(compact=False)))
    return keys
