"""fleetctl rollout (wave-by-wave, health-gated releases and configs) and fleetctl devices label.

    fleetctl devices label DEVICE hw=cpu region=eu [--remove site]
    fleetctl rollout create smollm2@3 --name smollm2-3-eu --selector region=eu \\
        --waves 1%,10%,50%,100% --soak 5m --max-concurrent 20 \\
        --max-load-failure-rate 0.1 --min-tokens-per-second-ratio 0.7 --min-requests 50
    fleetctl rollout create --config threads.json --name four-threads --waves 1,10,100
    fleetctl rollout status smollm2-3-eu [--json]
    fleetctl rollout list
    fleetctl rollout pause|resume|abort|rollback smollm2-3-eu
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Annotated, TypeVar

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from edgefleet.controlplane.app.settings import DEFAULT_LISTEN
from edgefleet.controlplane.cli.client import all_pages
from edgefleet.controlplane.cli.common import (
    DURATION_UNITS,
    ControlPlaneOpt,
    connect,
    err,
    fail,
    parse_ref,
    rpc_error,
)
from edgefleet.controlplane.rollouts.states import device_state_name, rollout_state_name
from edgefleet.protos.fleet.device_config import config_from_json, describe_config
from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2
from edgefleet.protos.fleet.v1.operator_pb2_grpc import OperatorServiceStub

rollout_app = typer.Typer(
    help="Rollouts: a release or a device config taken to labelled devices wave by wave, each wave "
    "gated on the health its devices report, rolled back automatically when a gate fails.",
    no_args_is_help=True,
)
T = TypeVar("T")
NameArg = Annotated[str, typer.Argument(help="rollout name")]


def _call(controlplane: str, work: Callable[[OperatorServiceStub], T]) -> T:
    channel, stub = connect(controlplane)
    with channel:
        try:
            return work(stub)
        except grpc.RpcError as exc:
            raise rpc_error(exc) from exc


def parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    """Repeated or comma-separated KEY=VALUE items ("hw=cpu,region=eu") as one mapping."""
    pairs = {}
    for item in [part for group in items or [] for part in group.split(",") if part]:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise fail(f"{what} {item!r} is not KEY=VALUE")
        pairs[key] = value
    return pairs


def parse_waves(text: str) -> list[operator_pb2.WaveSpec]:
    """ "1%,10%,50%,100%" (cumulative percentages) or "1,10,100" (cumulative device counts)."""
    waves = []
    for item in [p.strip() for p in text.split(",") if p.strip()]:
        try:
            if item.endswith("%"):
                waves.append(operator_pb2.WaveSpec(percent=float(item[:-1])))
            else:
                waves.append(operator_pb2.WaveSpec(count=int(item)))
        except ValueError as exc:
            raise typer.BadParameter(
                f"{item!r} is neither N% nor a device count", param_hint="--waves"
            ) from exc
    return waves


def parse_seconds(text: str, option: str) -> int:
    """'5m', '2h', '30s', '1d', or plain seconds ('0': no soak)."""
    if text.isdigit():
        return int(text)
    number, unit = text[:-1], text[-1:]
    if unit not in DURATION_UNITS or not number.isdigit():
        raise typer.BadParameter(f"expected a duration like 30s, 5m or 2h, got {text!r}", param_hint=option)
    return int(number) * DURATION_UNITS[unit]


def read_config(path: Path) -> common_pb2.DeviceConfig:
    """A DeviceConfig from a JSON file in the protobuf JSON mapping ({"nThreads": 4, ...})."""
    try:
        return config_from_json(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:  # InvalidConfig is a ValueError
        raise fail(f"{path}: {exc}") from exc


# -- devices label ---------------------------------------------------------------------------


def devices_label(
    device: Annotated[str, typer.Argument(help="device id")],
    labels: Annotated[list[str] | None, typer.Argument(help="KEY=VALUE to set (several allowed)")] = None,
    remove: Annotated[list[str] | None, typer.Option(help="label KEY to remove (repeatable)")] = None,
    controlplane: ControlPlaneOpt = DEFAULT_LISTEN,
) -> None:
    """Set and remove a device's labels; rollouts and pins select devices by them. Prints the
    device's labels afterwards."""
    to_set = parse_pairs(labels, "label")
    if not to_set and not remove:
        raise fail("give KEY=VALUE labels to set or --remove KEY")
    request = operator_pb2.SetDeviceLabelsRequest(device_id=device, set=to_set, remove=remove or [])
    response = _call(controlplane, lambda stub: stub.SetDeviceLabels(request))
    for key, value in sorted(response.labels.items()):
        typer.echo(f"{key}={value}")


# -- rollout create ----------------------------------------------------------------------------


@rollout_app.command("create")
def rollout_create(
    ref: Annotated[str | None, typer.Argument(help="NAME@VERSION to roll out (or give --config)")] = None,
    name: Annotated[str, typer.Option(help="the rollout's unique name, e.g. smollm2-3-eu")] = "",
    config: Annotated[
        Path | None, typer.Option(help='roll out this DeviceConfig (JSON, e.g. {"nThreads": 4})')
    ] = None,
    selector: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE[,KEY=VALUE...]: devices with all these labels")
    ] = None,
    waves: Annotated[
        str, typer.Option(help="cumulative wave sizes: 1%,10%,50%,100% or device counts 1,10,100")
    ] = "100%",
    soak: Annotated[str, typer.Option(help="watch each updated wave this long before judging it")] = "5m",
    max_concurrent: Annotated[int, typer.Option(help="devices updating at once (0: no limit)")] = 0,
    max_load_failure_rate: Annotated[
        float, typer.Option(help="fraction of a wave allowed to fail loading the change (0: gate off)")
    ] = 0.0,
    max_error_rate: Annotated[float, typer.Option(help="inference errors / requests (0: gate off)")] = 0.0,
    max_p95_latency_ratio: Annotated[
        float, typer.Option(help="new p95 latency / previous, per device (0: gate off)")
    ] = 0.0,
    min_tokens_per_second_ratio: Annotated[
        float, typer.Option(help="new decode tokens/s / previous, per device (0: gate off)")
    ] = 0.0,
    min_requests: Annotated[int, typer.Option(help="requests a device serves before its figures count")] = 0,
    controlplane: ControlPlaneOpt = DEFAULT_LISTEN,
) -> None:
    """Start a rollout of NAME@VERSION or --config FILE.json to the selector's devices, wave by wave.

    Each wave is judged on what its devices report before the next starts; a gate that fails
    rolls every device the rollout changed back. Prints the rollout's status.
    """
    if bool(ref) == bool(config):
        raise fail("give either NAME@VERSION or --config FILE.json")
    if not name:
        raise fail("give the rollout a --name")
    if min(max_concurrent, min_requests) < 0:
        raise fail("--max-concurrent and --min-requests cannot be negative")
    request = operator_pb2.CreateRolloutRequest(
        name=name,
        selector=parse_pairs(selector, "selector"),
        waves=parse_waves(waves),
        soak_seconds=parse_seconds(soak, "--soak"),
        max_concurrent=max_concurrent,
        gates=operator_pb2.HealthGates(
            max_load_failure_rate=max_load_failure_rate,
            max_error_rate=max_error_rate,
            max_p95_latency_ratio=max_p95_latency_ratio,
            min_tokens_per_second_ratio=min_tokens_per_second_ratio,
            min_requests=min_requests,
        ),
    )
    if ref:
        request.bundle.CopyFrom(parse_ref(ref))
    else:
        assert config is not None
        request.config.CopyFrom(read_config(config))
    rollout = _call(controlplane, lambda stub: stub.CreateRollout(request))
    err.print(f"rollout {rollout.name} started: {sum(w.devices for w in rollout.wave_status)} device(s)")
    show(rollout)


# -- reading -----------------------------------------------------------------------------------


def change_text(rollout: operator_pb2.Rollout) -> str:
    if rollout.HasField("bundle"):
        return f"{rollout.bundle.name}@{rollout.bundle.version}"
    return f"config: {describe_config(rollout.config)}"


def wave_text(wave: operator_pb2.WaveSpec) -> str:
    return f"{wave.percent:g}%" if wave.WhichOneof("size") == "percent" else str(wave.count)


def gates_text(gates: operator_pb2.HealthGates) -> str:
    parts = [
        f"load failures ≤ {gates.max_load_failure_rate:.0%}" if gates.max_load_failure_rate else "",
        f"errors ≤ {gates.max_error_rate:.1%}" if gates.max_error_rate else "",
        f"p95 ratio ≤ {gates.max_p95_latency_ratio:g}" if gates.max_p95_latency_ratio else "",
        f"tokens/s ratio ≥ {gates.min_tokens_per_second_ratio:g}"
        if gates.min_tokens_per_second_ratio
        else "",
        f"min {gates.min_requests} requests" if gates.min_requests else "",
    ]
    return ", ".join(p for p in parts if p) or "none"


def show(rollout: operator_pb2.Rollout) -> None:
    """The rollout for a person: what, where, how far, each wave, each device."""
    console = Console()
    count = len(rollout.wave_status)
    console.print(
        f"[bold]{rollout.name}[/bold] {rollout_state_name(rollout.state)}, wave "
        f"{min(rollout.current_wave + 1, count)} of {count}: {change_text(rollout)}",
        highlight=False,
    )
    selector = ",".join(f"{k}={v}" for k, v in sorted(rollout.selector.items())) or "(every device)"
    waves = ",".join(wave_text(w) for w in rollout.waves) or "100%"
    console.print(
        f"selector {selector}; waves {waves}; soak {rollout.soak_seconds}s; "
        f"max concurrent {rollout.max_concurrent or 'no limit'}; gates: {gates_text(rollout.gates)}",
        highlight=False,
        soft_wrap=True,
    )
    if rollout.reason:
        console.print(f"reason: {rollout.reason}", highlight=False, soft_wrap=True)
    table = Table("wave", "devices", "updated", "healthy", "failed", "soak until", "gate")
    for wave in rollout.wave_status:
        until = (
            wave.soak_until.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")
            if wave.HasField("soak_until")
            else ""
        )
        table.add_row(
            str(wave.index + 1),
            str(wave.devices),
            str(wave.updated),
            str(wave.healthy),
            str(wave.failed),
            until,
            wave.gate_result,
        )
    console.print(table)
    if rollout.devices:
        devices = Table("device", "wave", "state", "generation", "previous", "reason")
        for d in rollout.devices:
            previous = (
                f"{d.previous_bundle.name}@{d.previous_bundle.version}"
                if d.HasField("previous_bundle")
                else ""
            )
            devices.add_row(
                d.device_id,
                str(d.wave + 1),
                device_state_name(d.state),
                str(d.generation or ""),
                previous,
                d.reason,
            )
        console.print(devices)


def as_json(rollout: operator_pb2.Rollout) -> dict[str, object]:
    return json_format.MessageToDict(rollout, preserving_proto_field_name=True)


def by_name(name: str) -> operator_pb2.GetRolloutRequest:
    return operator_pb2.GetRolloutRequest(name=name)


@rollout_app.command("status")
def rollout_status(
    name: NameArg,
    controlplane: ControlPlaneOpt = DEFAULT_LISTEN,
    json_out: Annotated[bool, typer.Option("--json", help="the Rollout message as JSON")] = False,
) -> None:
    """Show a rollout: its state and reason, each wave's progress and gate, each device."""
    rollout = _call(controlplane, lambda stub: stub.GetRollout(by_name(name)))
    if json_out:
        typer.echo(json.dumps(as_json(rollout), indent=2))
    else:
        show(rollout)


@rollout_app.command("list")
def rollout_list(
    controlplane: ControlPlaneOpt = DEFAULT_LISTEN,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List every rollout, oldest first."""
    rollouts = _call(
        controlplane,
        lambda stub: list(all_pages(stub.ListRollouts, operator_pb2.ListRolloutsRequest(), "rollouts")),
    )
    if json_out:
        typer.echo(json.dumps([as_json(r) for r in rollouts], indent=2))
        return
    table = Table("name", "state", "change", "wave", "devices", "updated", "failed", "reason")
    for r in rollouts:
        count = len(r.wave_status)
        table.add_row(
            r.name,
            rollout_state_name(r.state),
            change_text(r),
            f"{min(r.current_wave + 1, count)}/{count}",
            str(sum(w.devices for w in r.wave_status)),
            str(sum(w.updated for w in r.wave_status)),
            str(sum(w.failed for w in r.wave_status)),
            r.reason,
        )
    Console().print(table)


def _control(name: str, action: int, controlplane: str) -> None:
    request = operator_pb2.ControlRolloutRequest(rollout=by_name(name), action=action)  # type: ignore[arg-type]
    rollout = _call(controlplane, lambda stub: stub.ControlRollout(request))
    err.print(f"rollout {rollout.name}: {rollout_state_name(rollout.state)}")


@rollout_app.command("pause")
def rollout_pause(name: NameArg, controlplane: ControlPlaneOpt = DEFAULT_LISTEN) -> None:
    """No new device starts updating; those updating finish."""
    _control(name, operator_pb2.ROLLOUT_ACTION_PAUSE, controlplane)


@rollout_app.command("resume")
def rollout_resume(name: NameArg, controlplane: ControlPlaneOpt = DEFAULT_LISTEN) -> None:
    """Carry on with a paused rollout."""
    _control(name, operator_pb2.ROLLOUT_ACTION_RESUME, controlplane)


@rollout_app.command("abort")
def rollout_abort(name: NameArg, controlplane: ControlPlaneOpt = DEFAULT_LISTEN) -> None:
    """Stop for good; devices keep what they have."""
    _control(name, operator_pb2.ROLLOUT_ACTION_ABORT, controlplane)


@rollout_app.command("rollback")
def rollout_rollback(name: NameArg, controlplane: ControlPlaneOpt = DEFAULT_LISTEN) -> None:
    """Stop, and put every device the rollout changed back on what it ran before."""
    _control(name, operator_pb2.ROLLOUT_ACTION_ROLLBACK, controlplane)
