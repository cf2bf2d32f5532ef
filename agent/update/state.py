"""The agent's persisted update state, so a crash or power cut resumes cleanly.

Written atomically after every transition. ``models`` is what serves, one installed release
per bundle name; ``previous`` keeps, per name, the release it replaced (for rollback and
garbage collection); the lifecycle phase mirrors the proto's DeviceState; ``device_config`` is
the signed device config in force, so it applies at boot before any model loads.

``loading`` is the crash-loop guard: it names the release a load is in progress for, persisted
before the load starts and cleared once it ended either way. Found at boot, it means the process
died inside that load (a runtime segfault, the OOM killer): its ``crashes`` count goes up, and a
release the runtime crashed on twice moves to ``crashed``, refused until a newer generation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from edgefleet.protos.fleet.device_config import config_from_json
from edgefleet.protos.fleet.fsio import atomic_write_bytes
from edgefleet.protos.fleet.release import Refusal, TransientFailure
from edgefleet.protos.fleet.v1 import common_pb2


class StateError(Refusal):
    """The state file is unreadable or malformed (truncated by a full disk, damaged): reading
    it again gives the same bytes, so the agent rebuilds the state from the disk instead."""


class StateNotSaved(TransientFailure):
    """The state file could not be written (a full disk, a read-only file system); the state in
    memory is still right, the file on disk is the previous one. A transient failure, whatever
    the errno: the update waiting on it is retried, and it is never taken for a refusal of the
    release being installed."""

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno


CRASHES_BEFORE_REFUSAL = 2
"""A release whose load this many agent processes died in is refused: one death may be a kill
or a power cut that happened to land there, two in the same load is the runtime."""

MAX_CRASHED = 8
"""How many crash-refused releases the state remembers (the most recent)."""


@dataclass(frozen=True, slots=True)
class LoadAttempt:
    """One release's load on this device, and how many agent processes died during it."""

    bundle: str
    version: int
    artifact_sha256: str
    generation: int
    crashes: int = 0

    def same_load(self, other: LoadAttempt) -> bool:
        return (self.bundle, self.version, self.artifact_sha256, self.generation) == (
            other.bundle,
            other.version,
            other.artifact_sha256,
            other.generation,
        )

    @property
    def model_id(self) -> str:
        return f"{self.bundle}@{self.version}"


@dataclass(frozen=True, slots=True)
class InstallRecord:
    """A verified, installed release variant."""

    bundle: str
    version: int
    generation: int
    variant: str
    model_format: int
    artifact_sha256: str
    length: int
    memory_bytes: int = 0  # estimated weights + KV cache when loaded (0: unknown, use length)
    # A LoRA adapter release: the base bundle it is loaded over and that base artifact's sha256
    # (both empty for a model). It serves as <base>:<bundle>, never as a model of its own.
    adapter_of: str = ""
    base_sha256: str = ""

    @property
    def model_id(self) -> str:
        return f"{self.bundle}@{self.version}"

    @property
    def footprint_bytes(self) -> int:
        """What the memory budget counts for this model while it is loaded."""
        return self.memory_bytes or self.length


def _by_name(records: Iterable[InstallRecord]) -> tuple[InstallRecord, ...]:
    return tuple(sorted(records, key=lambda r: r.bundle))


@dataclass(frozen=True, slots=True)
class AgentState:
    phase: int = common_pb2.DEVICE_STATE_IDLE
    desired_generation: int = 0
    applied_generation: int = 0
    models: tuple[InstallRecord, ...] = ()  # serving: one per bundle name, sorted by name
    previous: tuple[InstallRecord, ...] = ()  # per name, the release the serving one replaced
    last_error: str = ""
    last_error_kind: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # The signed DeviceConfig in force, in its protobuf JSON mapping ({}: none, the command line rules).
    device_config: dict[str, Any] = field(default_factory=dict)
    loading: LoadAttempt | None = None  # a load in progress (see the module docstring)
    crashed: tuple[LoadAttempt, ...] = ()  # loads the agent died in, with how often (refused at 2)

    def load_started(self, attempt: LoadAttempt) -> AgentState:
        """``attempt`` starts now, carrying the deaths an earlier try of the same load counted."""
        died = next((c for c in self.crashed if c.same_load(attempt)), None)
        return replace(self, loading=attempt if died is None else replace(attempt, crashes=died.crashes))

    def load_ended(self, *, loaded: bool) -> AgentState:
        """The load in progress ended; one that ``loaded`` forgets its earlier deaths."""
        if self.loading is None or not loaded:
            return replace(self, loading=None)
        done = self.loading
        return replace(self, loading=None, crashed=tuple(c for c in self.crashed if not c.same_load(done)))

    def crash_refused(self, attempt: LoadAttempt) -> LoadAttempt | None:
        """The crash record refusing ``attempt`` (the same load died too often), or None."""
        return next(
            (c for c in self.crashed if c.same_load(attempt) and c.crashes >= CRASHES_BEFORE_REFUSAL), None
        )

    def after_restart(self) -> AgentState:
        """The state a new process starts from: a load still marked in progress died with the
        previous process, which counts as one crash of that load."""
        if self.loading is None:
            return self
        died = replace(self.loading, crashes=self.loading.crashes + 1)
        kept = [c for c in self.crashed if not c.same_load(died)][-(MAX_CRASHED - 1) :]
        return replace(self, loading=None, crashed=(*kept, died))

    def config_in_force(self) -> common_pb2.DeviceConfig | None:
        """The device config in force as a message; None when there is none."""
        return config_from_json(self.device_config) if self.device_config else None

    def with_config(self, config: common_pb2.DeviceConfig | None) -> AgentState:
        """``config`` is in force now (None or an empty config: none)."""
        raw = json_format.MessageToDict(config) if config is not None else {}
        return replace(self, device_config=raw)

    def with_phase(self, phase: int, *, error: str = "", error_kind: str = "") -> AgentState:
        return replace(self, phase=phase, last_error=error, last_error_kind=error_kind)

    @property
    def active(self) -> InstallRecord | None:
        """The most recently installed model: what one-model reports (active bundle, variant)
        name; None when nothing is installed."""
        return max(self.models, key=lambda r: (r.generation, r.bundle), default=None)

    def model(self, name: str) -> InstallRecord | None:
        return next((r for r in self.models if r.bundle == name), None)

    def previous_of(self, name: str) -> InstallRecord | None:
        return next((r for r in self.previous if r.bundle == name), None)

    def installing(self, record: InstallRecord) -> AgentState:
        """``record`` serves its name now; what served that name before becomes its rollback copy."""
        current = self.model(record.bundle)
        rollback = current if current is not None and current != record else self.previous_of(record.bundle)
        return replace(
            self,
            models=_by_name([*(r for r in self.models if r.bundle != record.bundle), record]),
            previous=_by_name(
                [*(r for r in self.previous if r.bundle != record.bundle), *([rollback] if rollback else [])]
            ),
        )

    def updated(self, record: InstallRecord) -> AgentState:
        """``record`` replaces the serving record of its name in place (same artifact, a new
        generation or memory estimate): unlike ``installing``, the rollback copy is untouched."""
        return replace(
            self, models=_by_name([*(r for r in self.models if r.bundle != record.bundle), record])
        )

    def rolled_back(self, name: str) -> AgentState:
        """The rollback copy of ``name`` serves again (its newer release would not load)."""
        rollback = self.previous_of(name)
        assert rollback is not None
        return replace(
            self,
            models=_by_name([*(r for r in self.models if r.bundle != name), rollback]),
            previous=tuple(r for r in self.previous if r.bundle != name),
        )

    def without(self, name: str) -> AgentState:
        """``name`` is gone from the device: neither served nor kept for rollback."""
        return replace(
            self,
            models=tuple(r for r in self.models if r.bundle != name),
            previous=tuple(r for r in self.previous if r.bundle != name),
        )

    def without_previous(self, keep: Iterable[InstallRecord]) -> AgentState:
        kept = list(keep)
        return replace(self, previous=tuple(r for r in self.previous if r in kept))


def _records(raw: Any) -> tuple[InstallRecord, ...]:
    return _by_name(InstallRecord(**item) for item in raw)


def _attempt(raw: Any) -> LoadAttempt | None:
    return LoadAttempt(**raw) if raw else None


def _legacy(raw: dict[str, Any]) -> tuple[tuple[InstallRecord, ...], tuple[InstallRecord, ...]]:
    """State files of agents that held one model: "active" and "previous" records or null."""
    active = raw.get("active")
    previous = raw.get("previous")
    return _records([active] if active else []), _records([previous] if previous else [])


def load_state(path: Path) -> AgentState:
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return AgentState()
    except (OSError, ValueError) as exc:
        raise StateError(f"state file {path} is unreadable: {exc}") from exc
    try:
        if "models" in raw:
            models, previous = _records(raw["models"]), _records(raw.get("previous", []))
        else:
            models, previous = _legacy(raw)
        return AgentState(
            phase=int(raw["phase"]),
            desired_generation=int(raw["desired_generation"]),
            applied_generation=int(raw["applied_generation"]),
            models=models,
            previous=previous,
            last_error=str(raw.get("last_error", "")),
            last_error_kind=str(raw.get("last_error_kind", "")),
            extra=dict(raw.get("extra", {})),
            device_config=_checked_config(raw.get("device_config", {})),
            loading=_attempt(raw.get("loading")),
            crashed=tuple(LoadAttempt(**item) for item in raw.get("crashed", [])),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # InvalidConfig is a ValueError
        raise StateError(f"state file {path} is malformed: {exc}") from exc


def _checked_config(raw: Any) -> dict[str, Any]:
    """The stored config as stored, once it is known to parse (state files predating device
    configs have none). Strict, like the director's field it came from: a state file naming a
    setting this build does not know is malformed, not a config with that setting dropped."""
    config_from_json(raw)
    return dict(raw)


def save_state(path: Path, state: AgentState) -> None:
    """Atomic and durable; StateNotSaved when the disk refuses (the old file stays whole)."""
    try:
        atomic_write_bytes(path, json.dumps(asdict(state), indent=2, sort_keys=True).encode(), mode=0o600)
    except OSError as exc:
        raise StateNotSaved(
            f"could not write the agent state {path}: {exc.strerror or exc}", exc.errno
        ) from exc


def retained(state: AgentState, *, budget_bytes: int | None) -> tuple[InstallRecord, ...]:
    """The installs whose artifacts stay on disk: every serving model always, then rollback
    copies (most recently replaced first) while everything fits in the disk budget."""
    kept = list(state.models)
    serving = {r.artifact_sha256 for r in kept}
    used = sum(r.length for r in kept)
    for record in sorted(state.previous, key=lambda r: r.generation, reverse=True):
        if record.artifact_sha256 in serving:
            continue
        if budget_bytes is not None and used + record.length > budget_bytes:
            continue
        kept.append(record)
        used += record.length
    return tuple(kept)


def remove_interrupted_writes(state_dir: Path) -> list[Path]:
    """Deletes temporary files a kill left mid-write: ours (``.NAME.XXXX.tmp``, see
    protos/fleet/fsio.py) and python-tuf's (``tmpXXXX`` in each repository's metadata dir).
    Nothing reads them; the completed file, old or new, is what counts."""
    leftovers = [p for p in state_dir.glob(".*.tmp") if p.is_file()]
    leftovers += [p for p in state_dir.glob("tuf/*/tmp*") if p.is_file()]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers
