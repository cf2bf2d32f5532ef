"""fleetctl devices: list, label, pin, unpin and revoke the fleet's devices."""

from __future__ import annotations

import json
from typing import Annotated

import grpc
import typer
from rich.console import Console

from edgefleet.controlplane.app.settings import DEFAULT_LISTEN
from edgefleet.controlplane.cli import tables as fleet_table
from edgefleet.controlplane.cli.client import all_pages
from edgefleet.controlplane.cli.common import ControlPlaneOpt, connect, err, fail, rpc_error, selector_labels
from edgefleet.controlplane.cli.rollout import devices_label
from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2

devices_app = typer.Typer(help="The fleet's devices.", no_args_is_help=True)
devices_app.command("label")(devices_label)


@devices_app.command("list")
def devices_list(
    controlplane: ControlPlaneOpt = DEFAULT_LISTEN, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """Show every device: state, its models, local API, last seen, last telemetry figures."""
    channel, stub = connect(controlplane)
    with channel:
        try:
            devices = list(all_pages(stub.ListDevices, operator_pb2.ListDevicesRequest(), "devices"))
        except grpc.RpcError as exc:
            raise rpc_error(exc) from exc
    if as_json:
        typer.echo(json.dumps(fleet_table.devices_json(devices), indent=2))
    else:
        Console().print(fleet_table.devices_table(devices))


RUNTIMES = {
    "gguf": common_pb2.MODEL_FORMAT_GGUF,
    "onnx": common_pb2.MODEL_FORMAT_ONNX,
    "mlx": common_pb2.MODEL_FORMAT_MLX,
}
DeviceArg = Annotated[str | None, typer.Argument(help="device id (or give --selector)")]
SelectorOpt = Annotated[
    list[str] | None, typer.Option(help="KEY=VALUE label the devices must have (repeatable)")
]


def _set_pin(controlplane: str, request: operator_pb2.SetVariantPinRequest) -> None:
    if bool(request.device_id) == bool(request.selector):
        raise fail("give either a DEVICE or --selector KEY=VALUE")
    channel, stub = connect(controlplane)
    with channel:
        try:
            response = stub.SetVariantPin(request)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from exc
    if not response.changed:
        err.print("nothing changed")
    else:
        err.print(f"{len(response.device_ids)} device(s) will choose their variant again")
    for device_id in response.device_ids:
        typer.echo(device_id)


@devices_app.command("pin")
def devices_pin(
    device: DeviceArg = None,
    selector: SelectorOpt = None,
    variant: Annotated[str | None, typer.Option(help="variant id to run, e.g. gguf-q4_1")] = None,
    runtime: Annotated[str | None, typer.Option(help="run the best variant of: gguf, onnx or mlx")] = None,
    controlplane: ControlPlaneOpt = DEFAULT_LISTEN,
) -> None:
    """Pin a variant or a runtime for a device or a labelled group; sent in signed director metadata.

    A device that cannot honour the pin reports why and keeps serving its current model.
    """
    if bool(variant) == bool(runtime):
        raise fail("give either --variant ID or --runtime gguf|onnx|mlx")
    fmt = RUNTIMES.get((runtime or "").lower(), 0) if runtime else 0
    if runtime and not fmt:
        raise fail(f"--runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    request = operator_pb2.SetVariantPinRequest(
        device_id=device or "",
        selector=selector_labels(selector),
        variant_id=variant or "",
        format=fmt,  # type: ignore[arg-type]
    )
    _set_pin(controlplane, request)


@devices_app.command("unpin")
def devices_unpin(
    device: DeviceArg = None, selector: SelectorOpt = None, controlplane: ControlPlaneOpt = DEFAULT_LISTEN
) -> None:
    """Remove the pin of a device or of a label selector (exactly as it was pinned)."""
    request = operator_pb2.SetVariantPinRequest(
        device_id=device or "", selector=selector_labels(selector), clear=True
    )
    _set_pin(controlplane, request)


@devices_app.command("revoke")
def devices_revoke(
    device_id: Annotated[str, typer.Argument(help="device id")],
    controlplane: ControlPlaneOpt = DEFAULT_LISTEN,
) -> None:
    """Cut a device off at once: its calls are refused and its desired-state stream ends."""
    channel, stub = connect(controlplane)
    with channel:
        try:
            revoked = stub.RevokeDevice(operator_pb2.RevokeDeviceRequest(device_id=device_id)).revoked
        except grpc.RpcError as exc:
            raise rpc_error(exc) from exc
    err.print(f"{device_id} {'revoked' if revoked else 'was already revoked'}")
