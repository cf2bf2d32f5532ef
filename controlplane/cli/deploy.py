"""fleetctl deploy and undeploy: which models devices hold.

A device holds one release per bundle name; deploy adds or replaces one, undeploy removes one.
A label selector is resolved here, from the device listing, and sent as device ids in calls of
at most MAX_IDS_PER_CALL ids each (the control plane's bound on a repeated field).
"""

from __future__ import annotations

from typing import Annotated

import grpc
import typer

from edgefleet.controlplane.app.settings import DEFAULT_LISTEN
from edgefleet.controlplane.cli.client import all_pages
from edgefleet.controlplane.cli.common import (
    ControlPlaneOpt,
    connect,
    err,
    fail,
    parse_ref,
    rpc_error,
    selector_labels,
)
from edgefleet.protos.fleet.v1 import operator_pb2
from edgefleet.protos.fleet.v1.operator_pb2_grpc import OperatorServiceStub

MAX_IDS_PER_CALL = 10_000  # the control plane's bound on a repeated field (controlplane/api/limits.py)


def deploy(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION")],
    controlplane: ControlPlaneOpt = DEFAULT_LISTEN,
    all_devices: Annotated[bool, typer.Option("--all", help="every enrolled device")] = False,
    device: Annotated[list[str] | None, typer.Option(help="device id (repeatable)")] = None,
) -> None:
    """Add a bundle release to devices' models; their agents pick it up at once.

    A device holds one release per bundle name: deploying NAME@VERSION adds the model, or
    replaces the release of NAME it holds (an older version rolls back), and leaves its other
    models alone. `fleetctl undeploy NAME` removes one.
    """
    if all_devices == bool(device):
        raise fail("give either --all or --device ID")
    channel, stub = connect(controlplane)
    with channel:
        try:
            response = stub.Deploy(
                operator_pb2.DeployRequest(
                    bundle=parse_ref(ref), all_devices=all_devices, device_ids=device or []
                )
            )
        except grpc.RpcError as exc:
            raise rpc_error(exc) from exc
    err.print(f"{ref} deployed to {len(response.device_ids)} device(s)")
    for device_id in response.device_ids:
        typer.echo(device_id)


def undeploy(
    name: Annotated[str, typer.Argument(help="bundle NAME (whichever release of it a device holds)")],
    controlplane: ControlPlaneOpt = DEFAULT_LISTEN,
    all_devices: Annotated[bool, typer.Option("--all", help="every enrolled device")] = False,
    device: Annotated[list[str] | None, typer.Option(help="device id (repeatable)")] = None,
    selector: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE[,KEY=VALUE...]: devices with all these labels (repeatable)"),
    ] = None,
) -> None:
    """Remove a model from devices; their agents unload and delete it, and keep their others.

    Devices that do not hold NAME are left as they are.
    """
    if "@" in name:
        raise fail(f"undeploy takes a bundle NAME (every release of it), not {name!r}")
    if sum((all_devices, bool(device), bool(selector))) != 1:
        raise fail("give exactly one of --all, --device ID or --selector KEY=VALUE")
    labels = selector_labels(selector)
    channel, stub = connect(controlplane)
    with channel:
        try:
            ids = selected_devices(stub, labels) if labels else list(device or [])
            if labels and not ids:
                raise fail(f"no device has the labels {format_selector(labels)}")
            removed: list[str] = []
            # A call takes at most MAX_IDS_PER_CALL ids; a selector may match more devices.
            batches = (
                [[]]
                if all_devices
                else [ids[i : i + MAX_IDS_PER_CALL] for i in range(0, len(ids), MAX_IDS_PER_CALL)]
            )
            for batch in batches:
                response = stub.Undeploy(
                    operator_pb2.UndeployRequest(name=name, all_devices=all_devices, device_ids=batch)
                )
                removed.extend(response.device_ids)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from exc
    err.print(f"{name} removed from {len(removed)} device(s)")
    for device_id in removed:
        typer.echo(device_id)


def selected_devices(stub: OperatorServiceStub, labels: dict[str, str]) -> list[str]:
    """The ids of the devices whose labels include every KEY=VALUE of ``labels``.

    The control plane takes device ids, so the selector is resolved here, from the listing: a
    device enrolled between the listing and the call is not included.
    """
    devices = all_pages(stub.ListDevices, operator_pb2.ListDevicesRequest(), "devices")
    return [d.device_id for d in devices if all(d.labels.get(k) == v for k, v in labels.items())]


def format_selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
