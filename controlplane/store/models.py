"""SQLModel tables of the control plane.

SQLite is the default (a file under the data dir); any SQLAlchemy URL works, PostgreSQL for
scale. Times are stored as timezone-aware UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, LargeBinary, UniqueConstraint, false
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class Device(SQLModel, table=True):
    """An enrolled device and what it last told us about itself."""

    id: str = Field(primary_key=True, max_length=64)
    # sha256 of the bootstrap token's hash and the enrolling key: lets a device whose
    # enrollment answer was lost (killed, network cut) enroll again with the same token and key.
    enrollment_sha256: str = Field(default="", index=True, max_length=64)
    hostname: str = ""
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    enrolled_at: datetime = Field(default_factory=utcnow)
    last_seen: datetime | None = None
    state: int = 0
    active_bundle: str = ""
    active_version: int = 0
    variant: str = ""
    api_url: str = ""
    last_error: str = ""
    # The most recently deployed of the device's models (DeviceModel), None when it holds none.
    desired_bundle_id: int | None = Field(default=None, foreign_key="bundle.id")
    desired_generation: int = 0
    applied_generation: int = 0
    last_tokens_per_second: float = 0.0
    last_latency_ms: float = 0.0
    requests_total: int = Field(default=0, sa_type=BigInteger)  # a heartbeat's uint64 counter
    revoked_at: datetime | None = None
    selection_reason: str = ""  # the agent's last explanation of its variant choice
    # Every model the device last reported installed: [{"name", "version", "variant", "loaded"}].
    # What it is assigned is DeviceModel; this is what it says it holds, shown side by side.
    models: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # Whether the device is connected to the broker, from its retained Presence (its Last Will
    # says offline), and that Presence's time: an older one never replaces a newer one.
    online: bool = Field(default=False, sa_column_kwargs={"server_default": false()})
    presence_at: datetime | None = None
    # The DeviceConfig in force for the device (protobuf JSON mapping; {} when none), signed into
    # its director targets with its models and pin; set by config rollouts (controlplane/rollouts).
    config: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class DeviceModel(SQLModel, table=True):
    """One model a device is assigned: at most one release per bundle name, so deploying a new
    version of a name replaces the old one and the device's other models stay.

    The director targets signed for the device list exactly these releases' targets.
    """

    device_id: str = Field(foreign_key="device.id", primary_key=True, max_length=64)
    name: str = Field(primary_key=True, max_length=128)
    bundle_id: int = Field(foreign_key="bundle.id", index=True)


class VariantPinRule(SQLModel, table=True):
    """An operator's pin of a variant id or a format for one device or a labelled group.

    ``scope`` is the key: "device:<id>" or "labels:<k=v,...>" (sorted), so setting the same
    scope again replaces its pin. Which pin a device gets is ``pins.effective_pin``'s rule.
    """

    scope: str = Field(primary_key=True, max_length=512)
    device_id: str | None = Field(default=None, index=True, max_length=64)
    selector: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    variant_id: str = Field(default="", max_length=128)
    format: int = 0  # fleet.v1.ModelFormat; 0 when a variant id is pinned
    set_by: str = Field(default="", max_length=128)
    updated_at: datetime = Field(default_factory=utcnow)


class DeviceCertificate(SQLModel, table=True):
    """A client certificate the fleet CA issued to a device (at enrollment or renewal).

    A device call is accepted only with a certificate listed here, unrevoked, for a device
    that is not revoked; the revoked rows are what the CRL for the MQTT broker lists.
    """

    serial: str = Field(primary_key=True, max_length=40)  # hex
    device_id: str = Field(foreign_key="device.id", index=True, max_length=64)
    issued_at: datetime = Field(default_factory=utcnow)
    not_after: datetime
    revoked_at: datetime | None = Field(default=None, index=True)


class EnrollmentToken(SQLModel, table=True):
    """A bootstrap token; only its hash is kept, so a leaked database leaks no tokens."""

    token_sha256: str = Field(primary_key=True, max_length=64)
    uses_left: int
    expires_at: datetime
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class Bundle(SQLModel, table=True):
    """A signed release as pushed by an operator; the metadata bytes are kept verbatim."""

    __table_args__ = (UniqueConstraint("name", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, max_length=128)
    version: int
    release_metadata: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    manifest_json: str
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime
    total_bytes: int = 0


class BundleArtifact(SQLModel, table=True):
    """One artifact of a bundle: its target path and content address in the blob store."""

    bundle_id: int = Field(foreign_key="bundle.id", primary_key=True)
    path: str = Field(primary_key=True, max_length=512)
    sha256: str = Field(index=True, max_length=64)
    length: int


class StoredBlob(SQLModel, table=True):
    """An artifact's bytes in a PostgreSQL large object (``store.blob_postgres``), published
    under its sha256: a row exists only for bytes that matched the signed length and hash, and
    is written in the transaction that wrote them. Unused on SQLite (blobs are files there)."""

    __tablename__ = "blob"

    sha256: str = Field(primary_key=True, max_length=64)
    length: int = Field(sa_type=BigInteger)
    loid: int = Field(sa_type=BigInteger, unique=True)  # the large object's oid
    created_at: datetime = Field(default_factory=utcnow)


class Deployment(SQLModel, table=True):
    """Each desired-state change of a device, in generation order."""

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", index=True)
    bundle_id: int = Field(foreign_key="bundle.id")
    generation: int
    created_at: datetime = Field(default_factory=utcnow)


class TelemetryRecord(SQLModel, table=True):
    """One telemetry message, deduplicated by (device, seq) so redelivery is harmless."""

    __table_args__ = (UniqueConstraint("device_id", "seq"),)

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(index=True, max_length=64)
    kind: str = Field(index=True, max_length=32)
    seq: int = Field(sa_type=BigInteger)  # uint64 on the wire; ingestion refuses beyond BIGINT
    time: datetime
    received_at: datetime = Field(default_factory=utcnow)
    payload: dict[str, object] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class TelemetryDeadLetter(SQLModel, table=True):
    """A telemetry message ingestion acknowledged without storing it: refused by its checks
    (controlplane/telemetry/ingest.py) or by the database. ``reason`` is a RejectReason value, ``detail``
    what exactly; the payload is kept only as its first bytes (``excerpt``), with its full size
    and sha256, so a flood of large messages cannot fill the database. Retention deletes rows
    older than the raw telemetry's retention."""

    id: int | None = Field(default=None, primary_key=True)
    received_at: datetime = Field(index=True)
    topic: str = Field(max_length=256)
    device_id: str = Field(default="", index=True, max_length=64)
    reason: str = Field(index=True, max_length=32)
    detail: str = Field(default="", max_length=1024)
    payload_bytes: int = Field(default=0, sa_type=BigInteger)
    payload_sha256: str = Field(default="", max_length=64)
    excerpt: bytes = Field(default=b"", sa_column=Column(LargeBinary, nullable=False))


class TufMetadata(SQLModel, table=True):
    """Signed TUF metadata of the image repository (device_id "") and of each device's director
    repository, every version kept so roots can be served as a chain."""

    repository: str = Field(primary_key=True, max_length=16)
    device_id: str = Field(primary_key=True, max_length=64)
    role: str = Field(primary_key=True, max_length=16)
    version: int = Field(primary_key=True)
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    expires_at: datetime
    created_at: datetime = Field(default_factory=utcnow)


class AuditEntry(SQLModel, table=True):
    """One link of the hash-chained audit trail (see controlplane/fleet/audit.py)."""

    seq: int = Field(primary_key=True)
    time: datetime
    actor: str = Field(index=True, max_length=128)
    action: str = Field(index=True, max_length=64)
    target: str = Field(index=True, max_length=256)
    outcome: str = Field(max_length=16)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)


class OperatorToken(SQLModel, table=True):
    """An operator's API token (hash only) and the role it grants."""

    name: str = Field(primary_key=True, max_length=64)
    token_sha256: str = Field(index=True, unique=True, max_length=64)
    role: str = Field(max_length=16)
    created_at: datetime = Field(default_factory=utcnow)
    revoked_at: datetime | None = None


class TelemetryRollup(SQLModel, table=True):
    """One device's telemetry of one kind over one hour, folded from raw rows past retention
    (controlplane/telemetry/retention.py): counts, sums and maxima, so rates and averages stay derivable."""

    device_id: str = Field(primary_key=True, max_length=64)
    kind: str = Field(primary_key=True, max_length=32)
    hour: datetime = Field(primary_key=True)
    # Counters are BIGINT: they sum uint64 figures ingestion admits up to 2^63-1, and
    # retention saturates a sum at that instead of overflowing (controlplane/telemetry/retention.py).
    records: int = Field(default=0, sa_type=BigInteger)
    requests: int = Field(default=0, sa_type=BigInteger)  # inference: requests served
    errors: int = Field(default=0, sa_type=BigInteger)
    prompt_tokens: int = Field(default=0, sa_type=BigInteger)
    completion_tokens: int = Field(default=0, sa_type=BigInteger)
    decode_tokens: int = Field(
        default=0, sa_type=BigInteger
    )  # tokens after the first of successful generations
    decode_seconds: float = 0.0  # decode_tokens / decode_seconds = the hour's decode tokens/s
    latency_ms_p95_max: float = 0.0
    rss_bytes_max: int = Field(default=0, sa_type=BigInteger)  # heartbeat
    cpu_percent_sum: float = 0.0  # heartbeat: / records = the hour's mean CPU


class Rollout(SQLModel, table=True):
    """A release or a device config taken to the devices a label selector matches, wave by wave,
    each wave gated on what its devices report (controlplane/rollouts/). Everything the engine
    knows lives here and in RolloutDevice, so a restarted control plane resumes where it stopped.

    The change is ``bundle_id`` (a release) or, when that is None, ``config`` (a DeviceConfig in
    the protobuf JSON mapping). ``waves`` holds the WaveSpecs ([{"percent": 10.0} or {"count": 5}]),
    ``gates`` the HealthGates (field name: value), ``state`` a fleet.v1.RolloutState, and
    ``wave_progress`` one {"soak_until": ISO time or None, "gate_result": str} per wave.
    """

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=128)
    bundle_id: int | None = Field(default=None, foreign_key="bundle.id")
    config: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    selector: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    waves: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    soak_seconds: int = 0
    max_concurrent: int = 0  # devices UPDATING at once; 0: no limit
    gates: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    state: int = Field(default=0, index=True)
    current_wave: int = 0
    reason: str = ""
    wave_progress: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_by: str = Field(default="", max_length=128)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class RolloutDevice(SQLModel, table=True):
    """One device of a rollout: its wave, where it is (a fleet.v1.RolloutDeviceState), and what it
    ran before, so a rollback can put it back.

    ``generation`` is the one the rollout assigned it (0: not assigned yet); a device with one is
    never assigned again by this rollout. ``previous_bundle_id`` is the release of the rollout's
    bundle name the device held before (None: it held none, so a rollback removes the model);
    ``previous_config`` the DeviceConfig it had (config rollouts).
    """

    rollout_id: int = Field(foreign_key="rollout.id", primary_key=True)
    device_id: str = Field(foreign_key="device.id", primary_key=True, index=True, max_length=64)
    wave: int = 0
    state: int = 0
    reason: str = ""
    generation: int = 0
    previous_bundle_id: int | None = Field(default=None, foreign_key="bundle.id")
    previous_config: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    assigned_at: datetime | None = None
    applied_at: datetime | None = None  # when the engine saw the device report it applied
    rollback_generation: int = 0  # the generation that put it back, once rolled back
    updated_at: datetime = Field(default_factory=utcnow)
