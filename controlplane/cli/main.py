"""fleetctl: the operator's command line."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console

from edgefleet.controlplane.app.settings import DEFAULT_DEVICE_LISTEN, DEFAULT_LISTEN, Settings, default_home
from edgefleet.controlplane.cli import tables as fleet_table
from edgefleet.controlplane.cli.admin import audit_app, operators_app
from edgefleet.controlplane.cli.bundle import bundle_app
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
from edgefleet.controlplane.cli.keys import keys_app, open_keys
from edgefleet.controlplane.cli.rollout import devices_label, rollout_app
from edgefleet.controlplane.telemetry.retention import RetentionPolicy
from edgefleet.protos.fleet.v1 import common_pb2, operator_pb2
from edgefleet.protos.fleet.v1.operator_pb2_grpc import OperatorServiceStub

MAX_IDS_PER_CALL = 10_000  # the control plane's bound on a repeated field (controlplane/api/limits.py)
app = typer.Typer(help="Operate an edgefleet: keys, bundles, devices, deployments.", no_args_is_help=True)
token_app = typer.Typer(help="Bootstrap tokens devices enroll with.", no_args_is_help=True)
devices_app = typer.Typer(help="The fleet's devices.", no_args_is_help=True)
telemetry_app = typer.Typer(help="Telemetry stored by the control plane.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(operators_app, name="operators")
app.add_typer(audit_app, name="audit")
app.add_typer(bundle_app, name="bundle")
app.add_typer(token_app, name="token")
app.add_typer(devices_app, name="devices")
app.add_typer(telemetry_app, name="telemetry")
app.add_typer(rollout_app, name="rollout")
devices_app.command("label")(devices_label)


def parse_duration(text: str, option: str) -> timedelta:
    """'7d', '12h', '30m' or '45s' as a timedelta."""
    number, unit = text[:-1], text[-1:]
    if unit not in DURATION_UNITS or not number.isdigit() or int(number) == 0:
        raise typer.BadParameter(
            f"expected a positive duration like 7d, 12h, 30m or 45s, got {text!r}", param_hint=option
        )
    return timedelta(seconds=int(number) * DURATION_UNITS[unit])


# -- serve ---------------------------------------------------------------------------------

DatabaseOpt = Annotated[str | None, typer.Option(help="SQLAlchemy URL (default: SQLite under the data dir)")]
DataDirOpt = Annotated[
    Path | None, typer.Option(help="state directory (default: $EDGEFLEET_HOME/controlplane)")
]


def retention_policy(raw: str, rollups: str) -> RetentionPolicy:
    try:
        return RetentionPolicy(
            raw_for=parse_duration(raw, "--telemetry-retention"),
            rollups_for=parse_duration(rollups, "--rollup-retention"),
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--rollup-retention") from exc


@app.command()
def serve(
    listen: Annotated[str, typer.Option(help="gRPC listen address HOST:PORT")] = DEFAULT_LISTEN,
    db: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
    mqtt: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFLEET_MQTT",
            help="broker URL, e.g. mqtt://127.0.0.1:1883 (default: embedded broker)",
        ),
    ] = None,
    mqtt_advertise: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFLEET_MQTT_ADVERTISE",
            help="broker URL devices are told, e.g. mqtts://broker.example.com:8883 (default: --mqtt "
            "without its credentials)",
        ),
    ] = None,
    keys_dir: Annotated[
        Path | None, typer.Option(help="roots, online keys and fleet CA (default: $EDGEFLEET_HOME/keys)")
    ] = None,
    device_listen: Annotated[
        str, typer.Option(help="mutual-TLS address for device calls HOST:PORT")
    ] = DEFAULT_DEVICE_LISTEN,
    device_advertise: Annotated[
        str | None,
        typer.Option(help="device endpoint told to devices (default ':PORT', the host they enrolled via)"),
    ] = None,
    tls_san: Annotated[
        list[str] | None,
        typer.Option(
            envvar="EDGEFLEET_TLS_SAN",
            help="extra DNS name or IP for the server certificate (repeatable; env: space-separated)",
        ),
    ] = None,
    device_cert_validity: Annotated[
        str, typer.Option(help="lifetime of device certificates, e.g. 7d, 12h, 30m; renewed at 2/3")
    ] = "7d",
    crl_file: Annotated[
        Path | None,
        typer.Option(
            envvar="EDGEFLEET_CRL_FILE", help="where to keep the device CRL (default: DATA_DIR/tls)"
        ),
    ] = None,
    telemetry_retention: Annotated[
        str, typer.Option(help="keep raw telemetry this long (e.g. 7d), then fold it into hourly rollups")
    ] = "7d",
    rollup_retention: Annotated[str, typer.Option(help="keep hourly telemetry rollups this long")] = "365d",
    metrics_listen: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFLEET_METRICS_LISTEN",
            help="serve Prometheus metrics (GET /metrics, no auth) on HOST:PORT (default: off)",
        ),
    ] = None,
    replica_id: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFLEET_REPLICA_ID",
            help="this replica's name: unique among control planes sharing a broker and the same "
            "across restarts (its broker session, and the telemetry queued in it, go by "
            "edgefleet-controlplane-REPLICA_ID; default: the host name)",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="logging level")] = "INFO",
) -> None:
    """Start the control plane: gRPC (TLS) + health service, store, blobs, telemetry ingestion."""
    from edgefleet.controlplane.app.server import ServeError, serve_forever

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    home = default_home()
    settings = Settings(
        data_dir=data_dir or home / "controlplane",
        listen=listen,
        db_url=db,
        mqtt_url=mqtt or None,
        mqtt_advertise_url=mqtt_advertise or None,
        keys_dir=keys_dir or home / "keys",
        key_passphrase=open_keys(keys_dir).passphrase,
        device_listen=device_listen,
        device_advertise=device_advertise,
        tls_hostnames=tuple(tls_san or ()),
        device_cert_validity=parse_duration(device_cert_validity, "--device-cert-validity"),
        crl_file=crl_file,
        retention=retention_policy(telemetry_retention, rollup_retention),
    )
    try:
        asyncio.run(
            serve_forever(settings, metrics_listen=metrics_listen or None, replica_id=replica_id or None)
        )
    except ServeError as exc:
        raise fail(str(exc)) from exc


@app.command("retire-replica")
def retire_replica_command(
    replica_id: Annotated[str, typer.Argument(help="the --replica-id the retired control plane ran with")],
    mqtt: Annotated[
        str, typer.Option(envvar="EDGEFLEET_MQTT", help="broker URL, e.g. mqtt://user:pass@broker:1883")
    ],
    db: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
    quiet: Annotated[
        float, typer.Option(help="seconds without a message that mean its session is drained")
    ] = 5.0,
) -> None:
    """Take a control-plane replica out of service for good: store the telemetry its broker
    session still holds and end the session, so the broker stops keeping a share for it.
    Run it once the replica has stopped, against the same database and broker."""
    from edgefleet.controlplane.store.engine import make_engine
    from edgefleet.controlplane.telemetry.ingest import replica_client_id
    from edgefleet.controlplane.telemetry.retire import RetireError, retire_replica

    try:
        replica_client_id(replica_id)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(data_dir=data_dir or default_home() / "controlplane", db_url=db)
    engine = make_engine(settings.effective_db_url)
    try:
        retired = retire_replica(engine, mqtt, replica_id, quiet_s=quiet)
    except (RetireError, ValueError) as exc:
        raise fail(str(exc)) from exc
    finally:
        engine.dispose()
    typer.echo(
        f"retired {retired.client_id}: stored {retired.stats.rows} records from "
        f"{retired.stats.stored} messages; its session is gone"
    )


# -- tokens, deployments, devices ---------------------------------------------------------------


@token_app.command("create")
def token_create(
    controlplane: ControlPlaneOpt = DEFAULT_LISTEN,
    uses: Annotated[int, typer.Option(help="how many devices may enroll with it")] = 1,
    ttl_hours: Annotated[float, typer.Option(help="hours until it expires")] = 24.0,
    label: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE given to devices enrolling with it")
    ] = None,
) -> None:
    """Create a bootstrap token; prints the token alone on stdout."""
    labels = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise fail(f"label {item!r} is not KEY=VALUE")
        labels[key] = value
    if uses < 1:
        raise fail("--uses must be at least 1")
    channel, stub = connect(controlplane)
    with channel:
        try:
            response = stub.CreateToken(
                operator_pb2.CreateTokenRequest(uses=uses, ttl_seconds=int(ttl_hours * 3600), labels=labels)
            )
        except grpc.RpcError as exc:
            raise rpc_error(exc) from exc
    typer.echo(response.token)


@app.command()
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


@app.command()
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
    labels = parse_selector(selector)
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


def parse_selector(items: list[str] | None) -> dict[str, str]:
    """Repeated or comma-separated KEY=VALUE items ("hw=jetson,site=a") as one label selector."""
    selector = {}
    for item in [part for group in items or [] for part in group.split(",")]:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise fail(f"selector {item!r} is not KEY=VALUE")
        selector[key] = value
    return selector


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
        selector=parse_selector(selector),
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
        device_id=device or "", selector=parse_selector(selector), clear=True
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


@telemetry_app.command("query")
def telemetry_query(
    controlplane: ControlPlaneOpt = DEFAULT_LISTEN,
    device: Annotated[str, typer.Option(help="only this device")] = "",
    kind: Annotated[str, typer.Option(help="heartbeat, inference or deployment")] = "",
    limit: Annotated[int, typer.Option(help="newest N rows")] = 20,
) -> None:
    """Print stored telemetry rows as JSON lines, newest first."""
    channel, stub = connect(controlplane)
    with channel:
        try:
            request = operator_pb2.QueryTelemetryRequest(device_id=device, kind=kind)
            for row in all_pages(stub.QueryTelemetry, request, "rows", limit=max(limit, 0)):
                typer.echo(json.dumps(row_json(row)))
        except grpc.RpcError as exc:
            raise rpc_error(exc) from exc


def row_json(row: operator_pb2.TelemetryRow) -> dict[str, object]:
    """A telemetry row as fleetctl prints it; a record too large to list says so and its size."""
    shown: dict[str, object] = {
        "device": row.device_id,
        "kind": row.kind,
        "seq": row.seq,
        "payload": None if row.payload_truncated else json.loads(row.payload_json),
    }
    if row.payload_truncated:
        shown["payload_truncated"] = True
        shown["payload_bytes"] = row.payload_bytes
    return shown


@telemetry_app.command("tail")
def telemetry_tail(
    controlplane: ControlPlaneOpt = DEFAULT_LISTEN,
    device: Annotated[str, typer.Option(help="only this device")] = "",
    kind: Annotated[str, typer.Option(help="heartbeat, inference or deployment")] = "",
    backlog: Annotated[int, typer.Option(help="first print the newest N stored rows")] = 0,
) -> None:
    """Print telemetry rows as JSON lines as the control plane stores them, until Ctrl-C."""
    if backlog < 0:
        raise fail("--backlog must be 0 or more")
    channel, stub = connect(controlplane)
    with channel:
        rows = stub.TailTelemetry(
            operator_pb2.TailTelemetryRequest(device_id=device, kind=kind, backlog=backlog)
        )
        try:
            for row in rows:
                typer.echo(json.dumps(row_json(row)))
        except KeyboardInterrupt:
            rows.cancel()
        except grpc.RpcError as exc:
            raise rpc_error(exc) from exc


@app.command()
def demo(
    keep_running: Annotated[bool, typer.Option(help="leave the fleet up after the demo")] = False,
    agents: Annotated[int, typer.Option(help="how many device agents")] = 3,
    workdir: Annotated[Path | None, typer.Option(help="where to put state (default: a temp dir)")] = None,
) -> None:
    """Run a whole fleet on this machine: control plane, SmolLM2 bundle, agents, chat, telemetry."""
    from edgefleet.controlplane.cli.demo import DemoError, run_demo

    try:
        ok = run_demo(agents=agents, keep_running=keep_running, workdir=workdir)
    except DemoError as exc:
        raise fail(str(exc)) from exc
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    app()
