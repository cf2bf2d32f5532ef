"""Persisted agent state, identity and the latest-value mailbox (selection: test_selection.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from edgefleet.agent.device.identity import DeviceIdentity, IdentityError, load_identity, save_identity
from edgefleet.agent.update.latest import Latest
from edgefleet.agent.update.state import (
    AgentState,
    InstallRecord,
    StateError,
    load_state,
    retained,
    save_state,
)
from edgefleet.protos.fleet.v1 import common_pb2


def test_state_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    assert load_state(path) == AgentState()
    record = InstallRecord("m", 2, 5, "gguf-q4_0", common_pb2.MODEL_FORMAT_GGUF, "ab" * 32, 1000)
    state = AgentState(
        phase=common_pb2.DEVICE_STATE_ACTIVE, desired_generation=5, applied_generation=5, models=(record,)
    )
    save_state(path, state)
    assert load_state(path) == state
    assert path.stat().st_mode & 0o077 == 0
    assert not list(tmp_path.glob(".*tmp")), "temporary file left behind"


@pytest.mark.parametrize("content", [b"{", b"[]", b'{"phase": "x"}'])
def test_corrupt_state_is_a_typed_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(StateError):
        load_state(path)


def test_identity_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "identity.json"
    assert load_identity(path) is None
    identity = DeviceIdentity("dev-1", "mqtt://127.0.0.1:1883", "cp.example:7443", ":7444")
    save_identity(path, identity)
    assert load_identity(path) == identity
    assert path.stat().st_mode & 0o777 == 0o600
    assert identity.device_target == "cp.example:7444"  # ":PORT" is the host enrolled through
    elsewhere = DeviceIdentity("dev-1", "mqtt://127.0.0.1:1883", "cp.example:7443", "devices.example:443")
    assert elsewhere.device_target == "devices.example:443"
    replicas = DeviceIdentity("dev-1", "mqtt://127.0.0.1:1883", "10.0.0.1:7443,10.0.0.2:17443", ":7444")
    assert replicas.device_target == "10.0.0.1:7444,10.0.0.2:7444"  # never an enrollment port
    path.write_text('{"device_id": "x"}')
    with pytest.raises(IdentityError):
        load_identity(path)


async def test_latest_keeps_only_newest() -> None:
    box: Latest[int] = Latest()
    box.put(1)
    box.put(2)
    assert await box.get() == 2
    box.put_if_empty(3)
    box.put(4)
    box.put_if_empty(3)
    assert await box.get() == 4
    waiter = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    assert not waiter.done()
    box.put(5)
    assert await waiter == 5


def test_retention_keeps_the_rollback_copy_only_within_budget() -> None:
    new = InstallRecord("m", 2, 2, "v", common_pb2.MODEL_FORMAT_GGUF, "aa" * 32, 600)
    old = InstallRecord("m", 1, 1, "v", common_pb2.MODEL_FORMAT_GGUF, "bb" * 32, 500)
    state = AgentState(models=(old,)).installing(new)
    assert state.models == (new,) and state.previous == (old,)
    assert retained(state, budget_bytes=None) == (new, old)
    assert retained(state, budget_bytes=1100) == (new, old)
    assert retained(state, budget_bytes=1099) == (new,)
    assert retained(AgentState(), budget_bytes=10) == ()
    same = InstallRecord("m", 1, 3, "v", common_pb2.MODEL_FORMAT_GGUF, "bb" * 32, 500)
    assert retained(AgentState(models=(same,), previous=(old,)), budget_bytes=None) == (same,)


def test_several_models_each_keep_their_own_rollback_copy() -> None:
    chat1 = InstallRecord("chat", 1, 1, "v", common_pb2.MODEL_FORMAT_GGUF, "a1" * 32, 100)
    chat2 = InstallRecord("chat", 2, 3, "v", common_pb2.MODEL_FORMAT_GGUF, "a2" * 32, 100)
    embed1 = InstallRecord("embed", 1, 2, "v", common_pb2.MODEL_FORMAT_ONNX, "b1" * 32, 50)
    embed2 = InstallRecord("embed", 2, 4, "v", common_pb2.MODEL_FORMAT_ONNX, "b2" * 32, 50)
    state = AgentState().installing(chat1).installing(embed1).installing(chat2).installing(embed2)
    assert state.models == (chat2, embed2) and state.previous == (chat1, embed1)
    assert state.active == embed2  # the most recent install is what one-model reports name
    assert state.model("chat") == chat2 and state.previous_of("embed") == embed1
    # Over budget, the most recently replaced copy stays first.
    assert retained(state, budget_bytes=250) == (chat2, embed2, embed1)
    back = state.rolled_back("chat")
    assert back.models == (chat1, embed2) and back.previous == (embed1,)
    gone = state.without("embed")
    assert gone.models == (chat2,) and gone.previous == (chat1,)


def test_state_of_a_one_model_agent_still_loads(tmp_path: Path) -> None:
    """An agent upgraded in place reads the single-model state file it wrote before."""
    path = tmp_path / "state.json"
    record = {
        "bundle": "m",
        "version": 2,
        "generation": 5,
        "variant": "q4",
        "model_format": 1,
        "artifact_sha256": "ab" * 32,
        "length": 1000,
    }
    old = {**record, "version": 1, "generation": 3, "artifact_sha256": "cd" * 32}
    path.write_text(
        json.dumps(
            {
                "phase": 6,
                "desired_generation": 5,
                "applied_generation": 5,
                "active": record,
                "previous": old,
            }
        )
    )
    state = load_state(path)
    assert state.models == (InstallRecord(**record),) and state.previous == (InstallRecord(**old),)
    assert state.models[0].footprint_bytes == 1000  # no estimate recorded: the file size counts
