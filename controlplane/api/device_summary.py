"""A device as ListDevices shows it: its row, its assigned models and the pin in force, within
the bounds a listing has whatever was stored before those bounds existed."""

from __future__ import annotations

from collections.abc import Sequence

from edgefleet.controlplane.api.operator_parts import timestamp
from edgefleet.controlplane.store.deployments import Release
from edgefleet.controlplane.store.models import Bundle, Device
from edgefleet.protos.fleet.selectors import MAX_LABEL_KEY, MAX_LABEL_VALUE, MAX_LABELS
from edgefleet.protos.fleet.v1 import common_pb2

MAX_SUMMARY_LABEL_KEY, MAX_SUMMARY_LABEL_VALUE = MAX_LABEL_KEY, MAX_LABEL_VALUE


def installed_models(device: Device) -> list[common_pb2.InstalledModel]:
    """The models the device last reported (stored by DeviceService.ReportStatus)."""
    return [
        common_pb2.InstalledModel(
            bundle=common_pb2.BundleRef(name=str(m.get("name", "")), version=int(m.get("version", 0))),
            variant=str(m.get("variant", "")),
            loaded=bool(m.get("loaded", False)),
        )
        for m in device.models
    ]


def listed_labels(labels: dict[str, str]) -> dict[str, str]:
    """A device's labels as listed: within the bounds labels have now, whatever was stored
    before they had them (one device's oversized labels once broke every fleet listing)."""
    kept = list(labels.items())[:MAX_LABELS]
    return {k[:MAX_SUMMARY_LABEL_KEY]: v[:MAX_SUMMARY_LABEL_VALUE] for k, v in kept}


def device_summary(
    device: Device,
    desired: Bundle | None,
    pin: common_pb2.VariantPin | None = None,
    desired_models: Sequence[Release] = (),
) -> common_pb2.DeviceSummary:
    summary = common_pb2.DeviceSummary(
        device_id=device.id,
        state=device.state,  # type: ignore[arg-type]
        api_url=device.api_url,
        last_error=device.last_error,
        last_tokens_per_second=device.last_tokens_per_second,
        last_latency_ms=device.last_latency_ms,
        requests_total=device.requests_total,
        desired_generation=device.desired_generation,
        applied_generation=device.applied_generation,
        labels=listed_labels(device.labels),
        variant=device.variant,
        revoked=device.revoked_at is not None,
        selection_reason=device.selection_reason,
        desired_models=[common_pb2.BundleRef(name=name, version=version) for name, version in desired_models],
        models=installed_models(device),
    )
    if pin is not None:
        summary.pin.CopyFrom(pin)
    if device.active_bundle:
        summary.active_bundle.CopyFrom(
            common_pb2.BundleRef(name=device.active_bundle, version=device.active_version)
        )
    if desired is not None:
        summary.desired_bundle.CopyFrom(common_pb2.BundleRef(name=desired.name, version=desired.version))
    if device.last_seen is not None:
        summary.last_seen.CopyFrom(timestamp(device.last_seen))
    summary.online = device.online
    if device.presence_at is not None:
        summary.presence_at.CopyFrom(timestamp(device.presence_at))
    return summary
