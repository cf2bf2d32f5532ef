"""The control plane's one settings object."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LISTEN = "127.0.0.1:7443"


def default_home() -> Path:
    """Where fleetctl keeps keys, tokens and a local control plane: $EDGEFLEET_HOME or ~/.edgefleet."""
    return Path(os.environ.get("EDGEFLEET_HOME", Path.home() / ".edgefleet"))


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``fleetctl serve`` is configured with.

    ``mqtt_url`` None means: start the embedded broker on loopback (zero-setup default).
    ``keys_dir`` holds both repositories' roots and the online keys the control plane signs
    snapshot, timestamp and director metadata with (the release keys may live elsewhere).
    """

    data_dir: Path
    listen: str = DEFAULT_LISTEN
    db_url: str | None = None
    mqtt_url: str | None = None
    mqtt_advertise_url: str | None = None  # the broker URL devices are told; default: mqtt_url
    keys_dir: Path | None = None
    key_passphrase: bytes | None = None
    chunk_size_bytes: int = 1 << 20
    desired_state_recheck_seconds: float = 30.0

    @property
    def effective_db_url(self) -> str:
        return self.db_url or f"sqlite:///{self.data_dir / 'controlplane.db'}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    metadata_refresh_seconds: float = 600.0

    @property
    def effective_keys_dir(self) -> Path:
        return self.keys_dir or self.data_dir / "keys"
