"""fleetctl operators and fleetctl audit: who may do what, and what was done."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import grpc
import typer
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table

from edgefleet.controlplane.app.settings import DEFAULT_LISTEN
from edgefleet.controlplane.cli.client import all_pages
from edgefleet.controlplane.cli.common import ControlPlaneOpt, connect, err, rpc_error
from edgefleet.protos.fleet.v1 import operator_pb2

operators_app = typer.Typer(help="Operators and their roles (admin only).", no_args_is_help=True)
audit_app = typer.Typer(help="The hash-chained audit trail.", no_args_is_help=True)


@operators_app.command("create")
def operators_create(
    name: Annotated[str, typer.Argument(help="operator name")],
    role: Annotated[str, typer.Option(help="viewer, operator or admin")] = "viewer",
    controlplane: ControlPlaneOpt = DEFAULT_LISTEN,
) -> None:
    """Create an operator; prints its token alone on stdout (shown once)."""
    channel, stub = connect(controlplane)
    with channel:
        try:
            token = stub.CreateOperator(operator_pb2.CreateOperatorRequest(name=name, role=role)).token
        except grpc.RpcError as exc:
            raise rpc_error(exc) from exc
    typer.echo(token)


@operators_app.command("list")
def operators_list(controlplane: ControlPlaneOpt = DEFAULT_LISTEN) -> None:
    """List operators and their roles."""
    channel, stub = connect(controlplane)
    with channel:
        try:
            rows = list(all_pages(stub.ListOperators, operator_pb2.ListOperatorsRequest(), "operators"))
        except grpc.RpcError as exc:
            raise rpc_error(exc) from exc
    table = Table("name", "role", "created", "revoked")
    for r in rows:
        table.add_row(
            r.name, r.role, r.created.ToDatetime(tzinfo=UTC).isoformat(), "yes" if r.revoked else ""
        )
    Console().print(table)


@operators_app.command("revoke")
def operators_revoke(
    name: Annotated[str, typer.Argument(help="operator name")], controlplane: ControlPlaneOpt = DEFAULT_LISTEN
) -> None:
    """Revoke an operator's token at once."""
    channel, stub = connect(controlplane)
    with channel:
        try:
            revoked = stub.RevokeOperator(operator_pb2.RevokeOperatorRequest(name=name)).revoked
        except grpc.RpcError as exc:
            raise rpc_error(exc) from exc
    err.print(f"{name} {'revoked' if revoked else 'was not active'}")


@audit_app.command("list")
def audit_list(
    controlplane: ControlPlaneOpt = DEFAULT_LISTEN,
    actor: Annotated[str, typer.Option(help="e.g. operator:admin or device:dev-…")] = "",
    action: Annotated[str, typer.Option(help="e.g. deploy, bundle.push, deployment.refused")] = "",
    target: Annotated[str, typer.Option(help="e.g. smollm2@2")] = "",
    since: Annotated[str, typer.Option(help="ISO time, e.g. 2026-11-22T08:00:00Z")] = "",
    limit: Annotated[int, typer.Option(help="newest N entries")] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List audit entries, newest first."""
    request = operator_pb2.ListAuditRequest(actor=actor, action=action, target=target)
    if since:
        try:
            moment = datetime.fromisoformat(since.replace("Z", "+00:00"))
        except ValueError as exc:
            raise typer.BadParameter(f"not an ISO time: {since!r}", param_hint="--since") from exc
        stamp = Timestamp()
        stamp.FromDatetime(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
        request.since.CopyFrom(stamp)
    channel, stub = connect(controlplane)
    with channel:
        try:
            entries = list(all_pages(stub.ListAudit, request, "entries", limit=max(limit, 0)))
        except grpc.RpcError as exc:
            raise rpc_error(exc) from exc
    if as_json:
        for e in entries:
            typer.echo(
                json.dumps(
                    {
                        "seq": e.seq,
                        "time": e.time.ToDatetime(tzinfo=UTC).isoformat(),
                        "actor": e.actor,
                        "action": e.action,
                        "target": e.target,
                        "outcome": e.outcome,
                        "detail": e.detail_json if e.detail_truncated else json.loads(e.detail_json),
                        "hash": e.hash,
                    }
                )
            )
        return
    table = Table("seq", "time", "actor", "action", "target", "outcome")
    for e in entries:
        table.add_row(
            str(e.seq),
            e.time.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds"),
            e.actor,
            e.action,
            e.target,
            e.outcome,
        )
    Console().print(table)


@audit_app.command("verify")
def audit_verify(controlplane: ControlPlaneOpt = DEFAULT_LISTEN) -> None:
    """Check the hash chain; exits 1 and names the first bad entry if a row was edited or deleted."""
    channel, stub = connect(controlplane)
    with channel:
        try:
            result = stub.VerifyAudit(operator_pb2.VerifyAuditRequest())
        except grpc.RpcError as exc:
            raise rpc_error(exc) from exc
    if result.ok:
        typer.echo(f"audit chain intact: {result.entries} entries, head {result.head}")
        return
    err.print(f"[red]audit chain broken at entry {result.broken_at}:[/red] {result.reason}", soft_wrap=True)
    raise typer.Exit(1)
