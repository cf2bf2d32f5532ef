"""The agent's persisted state at start: loaded as saved, or rebuilt when the file is damaged.

A damaged state file must not keep a device from serving what it verifiably installed: the
state is then rebuilt from the trusted metadata and the re-hashed artifacts on disk, and the
``notes`` say what could not be recovered. A load still marked in progress counts as a crash
of it. Saving is best effort: a full disk must not stop the agent from serving.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.update.state import AgentState, StateError, StateNotSaved, load_state, save_state
from edgefleet.agent.update.uptane_client import rebuilt_state, recover_installed
from edgefleet.protos.fleet.uptane import TrustAnchors

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BootState:
    state: AgentState
    notes: list[str] = field(default_factory=list)  # empty: nothing had to be rebuilt
    write_failed: bool = False  # the disk refused the state written at start


def boot_state(config: AgentConfig, anchors: TrustAnchors) -> BootState:
    """The state to start from (blocking: run it in a thread)."""
    path = config.state_path
    notes: list[str] = []
    try:
        loaded = load_state(path)
    except StateError as exc:
        log.error("%s; rebuilding it from the verified metadata and artifacts on disk", exc)
        aside = path.with_name(path.name + ".damaged")
        with contextlib.suppress(OSError):
            path.replace(aside)
        recovery = recover_installed(
            tuf_dir=config.tuf_dir, anchors=anchors, artifact_dir=config.artifact_dir
        )
        loaded = rebuilt_state(recovery)
        served = ", ".join(r.model_id for r in loaded.models) or "nothing"
        notes = [f"state file damaged (kept as {aside.name}); rebuilt: serving {served}", *recovery.problems]
        for note in notes:
            log.warning("state rebuild: %s", note)
    state = loaded.after_restart()
    if state.loading is not None:
        log.warning(
            "the agent died while loading %s (generation %d): %d crash(es) of that load",
            state.loading.model_id,
            state.loading.generation,
            state.loading.crashes,
        )
    if state != loaded or notes:
        try:
            save_state(path, state)
        except StateNotSaved as exc:
            log.error("%s; serving with the state in memory", exc)
            return BootState(state, notes, write_failed=True)
    return BootState(state, notes)
