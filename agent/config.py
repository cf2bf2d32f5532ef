"""The agent's one settings object, with units in the names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything ``fleet-agent run`` is configured with."""

    controlplane: str
    state_dir: Path
    trust_path: Path
    token: str | None = None
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    mqtt_url: str | None = None  # None: use the broker the control plane advertised at enrollment
    mqtt_ca_path: Path | None = None  # CA of an mqtts:// broker; None: the fleet CA from the trust file
    heartbeat_interval_seconds: float = 15.0
    n_ctx: int = 2048
    n_threads: int | None = None
    hostname: str = ""
    keep_alive_seconds: float | None = None  # unload a model after this long idle; None: never
    memory_budget_bytes: int | None = None  # models loaded at once hold at most this; None: no limit
    max_running_requests: int = 1  # generations at once; the rest queue
    max_waiting_requests: int = 16  # queued beyond this get HTTP 429
    api_key: str | None = None  # required on /v1/* when set (always set off loopback)
    artifact_budget_bytes: int | None = None  # None: keep the previous model for rollback regardless
    hardware_profile_path: Path | None = None  # JSON profile replacing hardware detection (variant choice)

    @property
    def identity_path(self) -> Path:
        return self.state_dir / "identity.json"

    @property
    def certificate_path(self) -> Path:
        """The device's key and certificate, one owner-only PEM file."""
        return self.state_dir / "device.pem"

    @property
    def enrollment_key_path(self) -> Path:
        """The key an enrollment in progress uses; gone once the identity is stored."""
        return self.state_dir / "enroll.key"

    @property
    def state_path(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def artifact_dir(self) -> Path:
        return self.state_dir / "artifacts"

    @property
    def download_dir(self) -> Path:
        return self.state_dir / "downloads"

    @property
    def unpacked_dir(self) -> Path:
        """Folder variants (ONNX, MLX) extracted from their verified archives."""
        return self.state_dir / "models"

    @property
    def api_key_path(self) -> Path:
        return self.state_dir / "api.key"

    @property
    def tuf_dir(self) -> Path:
        return self.state_dir / "tuf"

    @property
    def outbox_path(self) -> Path:
        return self.state_dir / "outbox.sqlite"
