"""fleetctl keys: create keys, change roots (add, revoke, rotate, threshold), publish roots."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import grpc
import typer
from rich.console import Console
from rich.table import Table
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Targets

from edgefleet.controlplane.app.settings import DEFAULT_LISTEN
from edgefleet.controlplane.cli.client import resign_image_targets
from edgefleet.controlplane.cli.common import KeysDirOpt, connect, err, fail, rpc_error
from edgefleet.controlplane.trust.ca import CertificateError, load_ca
from edgefleet.controlplane.trust.keys import (
    REPOSITORIES,
    ROLES,
    KeyDir,
    KeyStoreError,
    default_home,
    init_keys,
)
from edgefleet.protos.fleet.fsio import atomic_write_bytes
from edgefleet.protos.fleet.uptane import IMAGE
from edgefleet.protos.fleet.v1 import operator_pb2, operator_pb2_grpc

PASSPHRASE_ENV = "EDGEFLEET_KEY_PASSPHRASE"

keys_app = typer.Typer(
    help="Signing keys and roots of trust (image and director repositories).", no_args_is_help=True
)


def open_keys(keys_dir: Path | None) -> KeyDir:
    """The key directory, with the passphrase from the environment when one is set."""
    passphrase = os.environ.get(PASSPHRASE_ENV)
    return KeyDir(keys_dir or default_home() / "keys", passphrase=passphrase.encode() if passphrase else None)


RepoOpt = Annotated[str, typer.Option("--repo", help="image or director")]
RoleOpt = Annotated[str, typer.Option("--role", help="root, targets, snapshot or timestamp")]
ControlPlaneOpt = Annotated[
    str | None,
    typer.Option("--controlplane", envvar="EDGEFLEET_CONTROLPLANE", help="also publish the new root there"),
]


def _check(repo: str, role: str | None = None) -> None:
    if repo not in REPOSITORIES:
        raise fail(f"--repo must be one of {', '.join(REPOSITORIES)}")
    if role is not None and role not in ROLES:
        raise fail(f"--role must be one of {', '.join(ROLES)}")


def _publish(keys: KeyDir, repo: str, controlplane: str | None) -> None:
    if controlplane is None:
        err.print(f"new {repo} root written; publish it with 'fleetctl keys push --controlplane HOST:PORT'")
        return
    push_roots(keys, controlplane, repos=[repo])


def push_roots(keys: KeyDir, controlplane: str, *, repos: list[str]) -> None:
    """Uploads every root version the control plane lacks, oldest first; then, for the image
    repository, re-signs its targets if the current release keys did not sign them."""
    channel, stub = connect(controlplane)
    with channel:
        for repo in repos:
            for data in keys.root_history(repo):
                try:
                    version = stub.PushRoot(operator_pb2.PushRootRequest(repository=repo, root=data)).version
                except grpc.RpcError as exc:
                    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                    raise fail(f"{repo} root: {details}") from exc
                err.print(f"{repo} root {version} published")
        if IMAGE in repos:
            _resign_image_targets_if_needed(keys, stub)


def _resign_image_targets_if_needed(keys: KeyDir, stub: operator_pb2_grpc.OperatorServiceStub) -> None:
    try:
        current = stub.GetImageTargets(operator_pb2.GetImageTargetsRequest()).targets
    except grpc.RpcError as exc:
        raise rpc_error(exc) from exc
    if not current:
        return
    metadata = Metadata[Targets].from_bytes(current)
    try:
        keys.root(IMAGE).signed.verify_delegate("targets", metadata.signed_bytes, metadata.signatures)
        return  # still valid under the current root
    except UnsignedMetadataError:
        pass
    try:
        data = resign_image_targets(current, keys.release_signers())
        version = stub.PublishImageTargets(operator_pb2.PublishImageTargetsRequest(targets=data)).version
    except grpc.RpcError as exc:
        raise rpc_error(exc) from exc
    err.print(f"image targets re-signed with the current release keys (version {version})")


@keys_app.command("init")
def keys_init(
    keys_dir: KeysDirOpt = None,
    force: Annotated[bool, typer.Option(help="replace existing keys")] = False,
    root_expiry_days: Annotated[int, typer.Option(help="days until the roots expire")] = 365,
) -> None:
    """Create both repositories' keys and roots; prints the device trust file's path.

    Private keys are encrypted when EDGEFLEET_KEY_PASSPHRASE is set.
    """
    keys = open_keys(keys_dir)
    try:
        init_keys(
            keys.path, passphrase=keys.passphrase, root_expiry=timedelta(days=root_expiry_days), force=force
        )
    except KeyStoreError as exc:
        raise fail(str(exc)) from exc
    err.print(f"keys written to {keys.path}{' (encrypted)' if keys.passphrase else ''}")
    typer.echo(str(keys.trust_path))


@keys_app.command("tls-cert")
def keys_tls_cert(
    names: Annotated[list[str], typer.Option("--name", help="DNS name or IP the server answers to (repeat)")],
    out: Annotated[Path, typer.Option(help="directory for server.key, server.pem and ca.pem")],
    keys_dir: KeysDirOpt = None,
    days: Annotated[int, typer.Option(min=1, max=825, help="validity in days")] = 365,
) -> None:
    """Issue a server certificate from the fleet CA, e.g. for the MQTT broker's device listener,
    which devices verify with the CA in their trust file."""
    keys = open_keys(keys_dir)
    try:
        ca = load_ca(keys.path, passphrase=keys.passphrase)
    except CertificateError as exc:
        raise fail(str(exc)) from exc
    if ca is None:
        raise fail(f"no fleet CA in {keys.path}: run `fleetctl keys init` first")
    key_pem, cert_pem = ca.issue_server(names, validity=timedelta(days=days))
    atomic_write_bytes(out / "server.key", key_pem, mode=0o600)
    atomic_write_bytes(out / "server.pem", cert_pem)
    atomic_write_bytes(out / "ca.pem", ca.certificate_pem)
    err.print(f"server certificate for {', '.join(names)} valid {days} days in {out}")


@keys_app.command("list")
def keys_list(keys_dir: KeysDirOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every key of both current roots, its roles, and whether its private key is here."""
    try:
        rows = open_keys(keys_dir).list_keys()
    except KeyStoreError as exc:
        raise fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("repository", "keyid", "roles", "label", "private key here")
    for row in rows:
        table.add_row(
            str(row["repository"]),
            str(row["keyid"])[:16],
            ", ".join(row["roles"]),  # type: ignore[arg-type]
            str(row["label"]),
            "yes" if row["private_key_here"] else "no",
        )
    Console().print(table)


@keys_app.command("add")
def keys_add(
    repo: RepoOpt, role: RoleOpt, keys_dir: KeysDirOpt = None, controlplane: ControlPlaneOpt = None
) -> None:
    """Add a new key to a role (a new root version)."""
    _check(repo, role)
    keys = open_keys(keys_dir)
    try:
        keyid = keys.add_key(repo, role)
    except KeyStoreError as exc:
        raise fail(str(exc)) from exc
    typer.echo(keyid)
    _publish(keys, repo, controlplane)


@keys_app.command("revoke")
def keys_revoke(
    keyid: Annotated[str, typer.Argument(help="the key to remove from every role")],
    keys_dir: KeysDirOpt = None,
    controlplane: ControlPlaneOpt = None,
) -> None:
    """Remove a key from its root; metadata signed only by it is refused from then on."""
    keys = open_keys(keys_dir)
    try:
        repo = keys.revoke_key(keyid)
    except KeyStoreError as exc:
        raise fail(str(exc)) from exc
    _publish(keys, repo, controlplane)


@keys_app.command("rotate")
def keys_rotate(
    repo: RepoOpt, role: RoleOpt, keys_dir: KeysDirOpt = None, controlplane: ControlPlaneOpt = None
) -> None:
    """Replace every key of a role with a new one, in one root version."""
    _check(repo, role)
    keys = open_keys(keys_dir)
    try:
        keyid = keys.rotate(repo, role)
    except KeyStoreError as exc:
        raise fail(str(exc)) from exc
    typer.echo(keyid)
    _publish(keys, repo, controlplane)


@keys_app.command("threshold")
def keys_threshold(
    repo: RepoOpt,
    role: RoleOpt,
    threshold: Annotated[int, typer.Argument(help="signatures required")],
    keys_dir: KeysDirOpt = None,
    controlplane: ControlPlaneOpt = None,
) -> None:
    """Set how many of a role's keys must sign."""
    _check(repo, role)
    keys = open_keys(keys_dir)
    try:
        keys.set_threshold(repo, role, threshold)
    except KeyStoreError as exc:
        raise fail(str(exc)) from exc
    _publish(keys, repo, controlplane)


@keys_app.command("push")
def keys_push(
    keys_dir: KeysDirOpt = None,
    controlplane: Annotated[
        str, typer.Option("--controlplane", envvar="EDGEFLEET_CONTROLPLANE")
    ] = DEFAULT_LISTEN,
) -> None:
    """Publish every root version the control plane does not have yet."""
    push_roots(open_keys(keys_dir), controlplane, repos=list(REPOSITORIES))
