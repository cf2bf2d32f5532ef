"""What the device says about itself: the status report for the control plane, the retained
DeviceStatus on the broker, and the installed models both carry.

Pure functions of the agent's state, so the service calls them on every transition and the
unit tests can check them without a process.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import cast

from edgefleet.agent.runtimes.keep_alive import KeepAliveRuntime
from edgefleet.agent.runtimes.model_table import ModelTable
from edgefleet.agent.update import adapters
from edgefleet.agent.update.selection import Selection
from edgefleet.agent.update.state import AgentState
from edgefleet.protos.fleet.v1 import common_pb2, device_pb2, telemetry_pb2


def reported_generation(state: AgentState) -> int:
    """The generation a status report names: the applied one while the device serves what it
    applied (the control plane takes an ACTIVE or IDLE report as that generation applied), the
    desired one while it works on it or refused it."""
    if state.phase in (common_pb2.DEVICE_STATE_ACTIVE, common_pb2.DEVICE_STATE_IDLE):
        return state.applied_generation
    return state.desired_generation


def installed_models(models: ModelTable, state: AgentState) -> list[common_pb2.InstalledModel]:
    """Every installed model, and whether it is in memory now (unloaded ones load on demand)."""
    listed = []
    for record in state.models:
        # A LoRA adapter is in memory while it is loaded over its base and the base is.
        runtime = models.get(record.adapter_of or record.bundle)
        loaded = runtime is not None and (not isinstance(runtime, KeepAliveRuntime) or runtime.loaded)
        if record.adapter_of:
            loaded = loaded and adapters.is_loaded(models, record)
        listed.append(
            common_pb2.InstalledModel(
                bundle=common_pb2.BundleRef(name=record.bundle, version=record.version),
                variant=record.variant,
                loaded=loaded,
            )
        )
    return listed


def status_report(
    state: AgentState,
    *,
    generation: int,
    detail: str,
    api_url: str,
    models: list[common_pb2.InstalledModel],
    selection: Selection | None,
) -> device_pb2.StatusReport:
    """The report the control plane keeps the latest of."""
    active = state.active
    report = device_pb2.StatusReport(
        state=state.phase,  # type: ignore[arg-type]
        generation=generation,
        api_url=api_url,
        error=state.last_error,
        error_kind=state.last_error_kind,
        variant=active.variant if active else "",
        detail=detail,
        models=models,
    )
    if active is not None:
        report.active_bundle.name = active.bundle
        report.active_bundle.version = active.version
    if selection is not None:
        report.selection.CopyFrom(selection.to_message())
    return report


def device_status(
    state: AgentState,
    *,
    device_id: str,
    api_url: str,
    models: list[common_pb2.InstalledModel],
    selection: Selection | None,
) -> telemetry_pb2.DeviceStatus:
    """The retained status: what a dashboard subscribing now should learn about this device."""
    status = telemetry_pb2.DeviceStatus(
        schema_version=telemetry_pb2.TELEMETRY_SCHEMA_V1,
        device_id=device_id,
        state=cast("common_pb2.DeviceState", state.phase),
        desired_generation=state.desired_generation,
        applied_generation=state.applied_generation,
        models=models,
        api_url=api_url,
        last_error=state.last_error,
        selection_reason=selection.reason if selection is not None else "",
    )
    status.time.FromDatetime(datetime.now(UTC))
    return status


def rss_bytes() -> int:
    """This process's resident memory for the heartbeat (0: unknown)."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or /proc unreadable: report unknown
        return 0
