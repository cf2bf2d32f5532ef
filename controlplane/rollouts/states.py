"""The states of a rollout and of its devices (fleet.v1.RolloutState, RolloutDeviceState, stored
as their numbers), and the groups of them the engine's rules speak of."""

from __future__ import annotations

from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2

RUNNING = operator_pb2.ROLLOUT_STATE_RUNNING
PAUSED = operator_pb2.ROLLOUT_STATE_PAUSED
COMPLETED = operator_pb2.ROLLOUT_STATE_COMPLETED
ABORTED = operator_pb2.ROLLOUT_STATE_ABORTED
ROLLED_BACK = operator_pb2.ROLLOUT_STATE_ROLLED_BACK

ACTIVE = frozenset({RUNNING, PAUSED})  # the engine drives these

PENDING = operator_pb2.ROLLOUT_DEVICE_STATE_PENDING
UPDATING = operator_pb2.ROLLOUT_DEVICE_STATE_UPDATING
UPDATED = operator_pb2.ROLLOUT_DEVICE_STATE_UPDATED
HEALTHY = operator_pb2.ROLLOUT_DEVICE_STATE_HEALTHY
FAILED = operator_pb2.ROLLOUT_DEVICE_STATE_FAILED
DEVICE_ROLLED_BACK = operator_pb2.ROLLOUT_DEVICE_STATE_ROLLED_BACK

# A device applied its assignment when it reports the generation in one of these: serving it, or
# holding no model at all (the same rule as DeviceService's applied_generation).
DEVICE_APPLIED = frozenset({common_pb2.DEVICE_STATE_ACTIVE, common_pb2.DEVICE_STATE_IDLE})

# Devices the rollout changed (it assigned them a generation): what a rollback puts back.
CHANGED = frozenset({UPDATING, UPDATED, HEALTHY, FAILED})
# Devices whose outcome in their wave is known: they applied the change or failed to.
SETTLED = frozenset({UPDATED, HEALTHY, FAILED})


def rollout_state_name(state: int) -> str:
    """ "running", "rolled_back": the state as operators read it."""
    return operator_pb2.RolloutState.Name(state).removeprefix("ROLLOUT_STATE_").lower()


def device_state_name(state: int) -> str:
    return operator_pb2.RolloutDeviceState.Name(state).removeprefix("ROLLOUT_DEVICE_STATE_").lower()
