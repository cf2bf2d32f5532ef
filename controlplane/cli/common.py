"""What every fleetctl command group shares: options, error output, the home directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console

from edgefleet.controlplane.app.settings import DEFAULT_LISTEN
from edgefleet.controlplane.cli.client import operator_stub
from edgefleet.controlplane.trust.tls import TlsConfigError
from edgefleet.protos.fleet.v1 import common_pb2
from edgefleet.protos.fleet.v1.operator_pb2_grpc import OperatorServiceStub

err = Console(stderr=True)

ControlPlaneOpt = Annotated[
    str,
    typer.Option(
        "--controlplane", envvar="EDGEFLEET_CONTROLPLANE", help="control plane gRPC address HOST:PORT"
    ),
]
KeysDirOpt = Annotated[
    Path | None, typer.Option("--keys-dir", help="key directory (default: $EDGEFLEET_HOME/keys)")
]
DEFAULT_CONTROLPLANE = DEFAULT_LISTEN


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ref(ref: str) -> common_pb2.BundleRef:
    """NAME@VERSION as a BundleRef."""
    name, sep, version = ref.rpartition("@")
    if not sep or not name or not version.isdigit():
        raise fail(f"expected NAME@VERSION, got {ref!r}")
    return common_pb2.BundleRef(name=name, version=int(version))


def fail(message: str, code: int = 1) -> typer.Exit:
    """Prints one unwrapped error line and returns the exit to raise."""
    err.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def connect(controlplane: str) -> tuple[grpc.Channel, OperatorServiceStub]:
    """fleetctl's operator channel; a missing CA certificate is a one-line error, not a traceback."""
    try:
        return operator_stub(controlplane)
    except TlsConfigError as exc:
        raise fail(str(exc)) from exc


def rpc_error(exc: grpc.RpcError) -> typer.Exit:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return fail(f"{code.name if code else 'RPC'}: {details}")


def selector_labels(items: list[str] | None) -> dict[str, str]:
    """``--selector`` items as one label selector, parsed by fleetctl's one selector parser
    (``main.parse_selector``). Imported when a command runs, since main imports every command
    group to assemble the app."""
    from edgefleet.controlplane.cli.main import parse_selector

    return parse_selector(items)
