"""The agent's one settings object, with units in the names, and the settings in force once the
control plane's signed device config is laid over it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only named in annotations: the CLI starts without loading protobuf
    from edgefleet.protos.fleet.v1 import common_pb2


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything ``fleet-agent run`` is configured with."""

    controlplane: str  # HOST:PORT, a DNS name, or IP:PORT,IP:PORT (edgefleet.agent.device.channel)
    state_dir: Path
    trust_path: Path
    token: str | None = None
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    mqtt_url: str | None = None  # None: use the broker the control plane advertised at enrollment
    mqtt_ca_path: Path | None = None  # CA of an mqtts:// broker; None: the fleet CA from the trust file
    heartbeat_interval_seconds: float = 15.0
    telemetry_interval_seconds: float = 15.0  # inference figures leave as one summary per model this often
    # How the device learns of desired-state changes (edgefleet.agent.tasks.desired_notices):
    # "broker": notices on its MQTT connection, a poll when (re)subscribing and a slow poll, and
    # no connection to the control plane while idle; "stream": one WatchDesiredState held open.
    desired_via: str = "broker"
    desired_poll_seconds: float = 900.0  # the safety-net poll while the broker subscription holds
    desired_poll_without_broker_seconds: float = 60.0  # the poll while it does not
    controlplane_idle_seconds: float = 300.0  # with "broker": an unused connection closes after this
    n_ctx: int = 2048
    n_threads: int | None = None
    hostname: str = ""
    keep_alive_seconds: float | None = None  # unload a model after this long idle; None: never
    memory_budget_bytes: int | None = None  # models loaded at once hold at most this; None: no limit
    max_running_requests: int = 1  # generations at once; the rest queue
    max_waiting_requests: int = 16  # queued beyond this get HTTP 429
    # What one API request may send (edgefleet.agent.api.limits.RequestLimits has the same defaults).
    max_request_bytes: int = 4 * 2**20  # body size; larger gets HTTP 413 before it is read
    max_prompt_chars: int = 256 * 2**10  # messages / prompt / embedding inputs together
    max_messages: int = 1024  # chat messages per request
    max_embedding_inputs: int = 2048  # texts per embeddings request (OpenAI's limit is the ceiling)
    request_body_timeout_seconds: float = 60.0  # to receive a body; slower gets HTTP 408
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


@dataclass(frozen=True, slots=True)
class LoadSettings:
    """What a model is loaded with: a change means loading it again (the rest apply live)."""

    n_ctx: int
    n_threads: int | None

    def describe(self) -> str:
        return f"n_ctx={self.n_ctx}, n_threads={self.n_threads if self.n_threads is not None else 'auto'}"


@dataclass(frozen=True, slots=True)
class EffectiveSettings:
    """The settings in force: the command line's, overridden by each field the signed device
    config sets (see ``effective_settings``)."""

    n_ctx: int
    n_threads: int | None
    max_running_requests: int
    max_waiting_requests: int
    telemetry_interval_seconds: float
    keep_alive_seconds: float | None  # None: never unload an idle model
    mirrors: tuple[str, ...] = ()  # HTTP(S) mirrors tried before the control plane, in order
    max_download_rate: int = 0  # artifact bytes per second from all sources; 0: unlimited

    @property
    def load(self) -> LoadSettings:
        return LoadSettings(n_ctx=self.n_ctx, n_threads=self.n_threads)

    def to_dict(self) -> dict[str, object]:
        """For /healthz (JSON: the mirrors as a list)."""
        return {**asdict(self), "mirrors": list(self.mirrors)}


def effective_settings(config: AgentConfig, device: common_pb2.DeviceConfig | None) -> EffectiveSettings:
    """Each field ``device`` sets wins over the command line's; an unset field keeps it.

    ``keep_alive_seconds`` 0 in a device config means "never unload", as leaving
    ``--keep-alive`` off does. ``device`` must have passed validation (edgefleet.protos.fleet.device_config).
    """
    base = EffectiveSettings(
        n_ctx=config.n_ctx,
        n_threads=config.n_threads,
        max_running_requests=config.max_running_requests,
        max_waiting_requests=config.max_waiting_requests,
        telemetry_interval_seconds=config.telemetry_interval_seconds,
        keep_alive_seconds=config.keep_alive_seconds,
    )
    if device is None:
        return base
    has = device.HasField
    return EffectiveSettings(
        n_ctx=device.n_ctx if has("n_ctx") else base.n_ctx,
        n_threads=device.n_threads if has("n_threads") else base.n_threads,
        max_running_requests=device.max_running if has("max_running") else base.max_running_requests,
        max_waiting_requests=device.max_waiting if has("max_waiting") else base.max_waiting_requests,
        telemetry_interval_seconds=(
            device.telemetry_interval_seconds
            if has("telemetry_interval_seconds")
            else base.telemetry_interval_seconds
        ),
        keep_alive_seconds=(
            (device.keep_alive_seconds or None) if has("keep_alive_seconds") else base.keep_alive_seconds
        ),
        mirrors=tuple(device.mirrors),
        max_download_rate=device.max_download_rate if has("max_download_rate") else base.max_download_rate,
    )
