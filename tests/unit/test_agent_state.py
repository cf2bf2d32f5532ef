"""Persisted agent state, identity and the latest-value mailbox (selection: test_selection.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.identity import DeviceIdentity, IdentityError, load_identity, save_identity
from agent.latest import Latest
from agent.state import AgentState, InstallRecord, StateError, load_state, retained, save_state
from protos.fleet.v1 import common_pb2


def test_state_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    assert load_state(path) == AgentState()
    record = InstallRecord("m", 2, 5, "gguf-q4_0", common_pb2.MODEL_FORMAT_GGUF, "ab" * 32, 1000)
    state = AgentState(
        phase=common_pb2.DEVICE_STATE_ACTIVE, desired_generation=5, applied_generation=5, active=record
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
    state = AgentState(active=new, previous=old)
    assert retained(state, budget_bytes=None) == (new, old)
    assert retained(state, budget_bytes=1100) == (new, old)
    assert retained(state, budget_bytes=1099) == (new,)
    assert retained(AgentState(), budget_bytes=10) == ()
    same = InstallRecord("m", 1, 3, "v", common_pb2.MODEL_FORMAT_GGUF, "bb" * 32, 500)
    assert retained(AgentState(active=same, previous=old), budget_bytes=None) == (same,)
