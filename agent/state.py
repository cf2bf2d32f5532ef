"""The agent's persisted update state, so a crash or power cut resumes cleanly.

Written atomically after every transition. ``active`` is what serves; ``previous`` is kept for
rollback and garbage collection; the lifecycle phase mirrors the proto's DeviceState.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from protos.fleet.fsio import atomic_write_bytes
from protos.fleet.v1 import common_pb2


class StateError(Exception):
    """The state file is unreadable."""


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

    @property
    def model_id(self) -> str:
        return f"{self.bundle}@{self.version}"


@dataclass(frozen=True, slots=True)
class AgentState:
    phase: int = common_pb2.DEVICE_STATE_IDLE
    desired_generation: int = 0
    applied_generation: int = 0
    active: InstallRecord | None = None
    previous: InstallRecord | None = None
    last_error: str = ""
    last_error_kind: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def with_phase(self, phase: int, *, error: str = "", error_kind: str = "") -> AgentState:
        return replace(self, phase=phase, last_error=error, last_error_kind=error_kind)


def _record(raw: Any) -> InstallRecord | None:
    return None if raw is None else InstallRecord(**raw)


def load_state(path: Path) -> AgentState:
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return AgentState()
    except (OSError, ValueError) as exc:
        raise StateError(f"state file {path} is unreadable: {exc}") from exc
    try:
        return AgentState(
            phase=int(raw["phase"]),
            desired_generation=int(raw["desired_generation"]),
            applied_generation=int(raw["applied_generation"]),
            active=_record(raw.get("active")),
            previous=_record(raw.get("previous")),
            last_error=str(raw.get("last_error", "")),
            last_error_kind=str(raw.get("last_error_kind", "")),
            extra=dict(raw.get("extra", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"state file {path} is malformed: {exc}") from exc


def save_state(path: Path, state: AgentState) -> None:
    atomic_write_bytes(path, json.dumps(asdict(state), indent=2, sort_keys=True).encode(), mode=0o600)


def retained(state: AgentState, *, budget_bytes: int | None) -> tuple[InstallRecord | None, ...]:
    """The installs whose artifacts stay on disk: the active one always, the previous one (kept
    for rollback) only while both fit in the disk budget."""
    active, previous = state.active, state.previous
    if previous is None or previous.artifact_sha256 == (active.artifact_sha256 if active else None):
        return (active,) if active else ()
    if budget_bytes is not None and (active.length if active else 0) + previous.length > budget_bytes:
        return (active,) if active else ()
    return tuple(r for r in (active, previous) if r is not None)


def remove_interrupted_writes(state_dir: Path) -> list[Path]:
    """Deletes temporary files a kill left mid-write: ours (``.NAME.XXXX.tmp``, see
    protos/fleet/fsio.py) and python-tuf's (``tmpXXXX`` in each repository's metadata dir).
    Nothing reads them; the completed file, old or new, is what counts."""
    leftovers = [p for p in state_dir.glob(".*.tmp") if p.is_file()]
    leftovers += [p for p in state_dir.glob("tuf/*/tmp*") if p.is_file()]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers
