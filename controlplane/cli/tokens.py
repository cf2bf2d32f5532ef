"""fleetctl token: the bootstrap tokens devices enroll with."""

from __future__ import annotations

from typing import Annotated

import grpc
import typer

from edgefleet.controlplane.app.settings import DEFAULT_LISTEN
from edgefleet.controlplane.cli.common import ControlPlaneOpt, connect, fail, rpc_error
from edgefleet.protos.fleet.v1 import operator_pb2

token_app = typer.Typer(help="Bootstrap tokens devices enroll with.", no_args_is_help=True)


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
