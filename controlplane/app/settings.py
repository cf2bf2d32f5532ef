"""The control plane's one settings object."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from edgefleet.controlplane.telemetry.retention import RetentionPolicy
from edgefleet.controlplane.trust.ca import DEVICE_VALIDITY

DEFAULT_LISTEN = "127.0.0.1:7443"
DEFAULT_DEVICE_LISTEN = "127.0.0.1:7444"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``fleetctl serve`` is configured with.

    ``mqtt_url`` None means: start the embedded broker on loopback (zero-setup default).
    ``keys_dir`` holds both repositories' roots and the online keys the control plane signs
    snapshot, timestamp and director metadata with (the release keys may live elsewhere), and
    the fleet CA. ``listen`` serves enrollment and operators over TLS; ``device_listen``
    serves every other device call over mutual TLS. ``device_advertise`` is the address
    devices are told to use for it (default ``:PORT``: the host they enrolled through).
    """

    data_dir: Path
    listen: str = DEFAULT_LISTEN
    device_listen: str = DEFAULT_DEVICE_LISTEN
    device_advertise: str | None = None
    tls_hostnames: tuple[str, ...] = ()  # extra names for the server certificate
    device_cert_validity: timedelta = DEVICE_VALIDITY
    crl_file: Path | None = None  # where the broker reads revoked device certificates from
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
    # Raw telemetry for days, hourly rollups for a year.
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    rollout_tick_seconds: float = 1.0  # how often the rollout engine steps (controlplane/rollouts)
    # How often the CRL file is compared with the database's revocations and rewritten when
    # another replica revoked: the bound on how stale this replica's CRL file can be.
    crl_refresh_seconds: float = 10.0
    # Health: the database is probed (SELECT 1 on a connection of its own) this often, each
    # probe given this long; a failed probe turns the health service NOT_SERVING.
    db_probe_seconds: float = 5.0
    db_probe_timeout_seconds: float = 3.0
    # gRPC max_connection_age (gRPC adds its own +/-10% jitter) and the grace calls get after
    # it: long-lived device streams move to replicas added later.
    max_connection_age_seconds: float = 1800.0
    max_connection_age_grace_seconds: float = 30.0
    # gRPC max_connection_idle: a connection without a call this long is closed, so a device
    # that hears of changes through the broker costs nothing here while idle whatever its client
    # does (a desired-state stream is a call: its connection is never idle). Longer than the
    # agent's own idle timeout (300 s), which normally lets the connection go first.
    max_connection_idle_seconds: float = 600.0
    # On SIGTERM: how long unary calls in flight get to finish (device streams end at once).
    shutdown_grace_seconds: float = 10.0

    @property
    def crl_path(self) -> Path:
        return self.crl_file or self.data_dir / "tls" / "devices.crl.pem"

    @property
    def effective_keys_dir(self) -> Path:
        return self.keys_dir or self.data_dir / "keys"
