"""fleetctl telemetry: the telemetry rows the control plane stored, queried or followed live."""

from __future__ import annotations

import json
import signal
import threading
from types import FrameType
from typing import Annotated

import grpc
import typer

from edgefleet.controlplane.app.settings import DEFAULT_LISTEN
from edgefleet.controlplane.cli.client import all_pages
from edgefleet.controlplane.cli.common import ControlPlaneOpt, connect, fail, rpc_error
from edgefleet.protos.fleet.v1 import operator_pb2

telemetry_app = typer.Typer(help="Telemetry stored by the control plane.", no_args_is_help=True)


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
        # Ctrl-C (or SIGTERM) cancels the call, which ends the loop below with CANCELLED. A
        # KeyboardInterrupt raised wherever the main thread happens to be (inside gRPC's own
        # waiting, between rows) is not relied on to reach this frame.
        stopping = threading.Event()

        def stop(_signum: int, _frame: FrameType | None) -> None:
            stopping.set()
            rows.cancel()

        previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            for row in rows:
                typer.echo(json.dumps(row_json(row)))
        except grpc.RpcError as exc:
            if not stopping.is_set():
                raise rpc_error(exc) from exc
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
