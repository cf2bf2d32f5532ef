"""fleetctl bundle: build (optionally a quantization ladder), inspect, push, list."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from edgefleet.controlplane.build.adapter_bundles import (
    adapter_base,
    base_from_bundle,
    build_adapter_bundle,
    parse_base_ref,
)
from edgefleet.controlplane.build.bundles import (
    BundleError,
    BundleOnDisk,
    build_bundle,
    open_bundle,
    write_bundle,
)
from edgefleet.controlplane.build.gguf_info import GgufError
from edgefleet.controlplane.build.ladder.variants import ladder_variants
from edgefleet.controlplane.cli import client
from edgefleet.controlplane.cli.common import (
    DEFAULT_CONTROLPLANE,
    ControlPlaneOpt,
    KeysDirOpt,
    connect,
    err,
    fail,
    rpc_error,
)
from edgefleet.controlplane.cli.keys import open_keys
from edgefleet.controlplane.trust.keys import KeyStoreError
from edgefleet.protos.fleet.v1 import bundle_pb2, common_pb2, operator_pb2

bundle_app = typer.Typer(help="Build, inspect, push and list signed model bundles.", no_args_is_help=True)


@bundle_app.command("build")
def bundle_build(
    name: Annotated[str, typer.Option(help="bundle name")],
    version: Annotated[int, typer.Option(help="release version, increasing")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output bundle directory")],
    quantize: Annotated[
        str, typer.Option(help="variants to build, e.g. q4_0,q5_1,q8_0 (GGUF), int8 (ONNX), q4,q8 (MLX)")
    ] = "",
    max_ppl_increase: Annotated[
        float, typer.Option(help="refuse a variant whose perplexity rises more than this % over the source")
    ] = 10.0,
    warn_only: Annotated[
        bool, typer.Option(help="keep variants over the perplexity limit, marked 'warn'")
    ] = False,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            help="tokenizer.json for a bare .onnx source: measures perplexity and ships inside each ONNX "
            "variant (a folder source brings its own)"
        ),
    ] = None,
    keys_dir: KeysDirOpt = None,
    expires_days: Annotated[int, typer.Option(help="days until the release metadata expires")] = 90,
    description: Annotated[str, typer.Option(help="free text shown to operators")] = "",
    model: Annotated[
        Path | None,
        typer.Argument(
            help="source model: a GGUF file, an ONNX file or an MLX/HF folder (not with --adapter)"
        ),
    ] = None,
    adapter: Annotated[
        Path | None, typer.Option(help="a LoRA adapter GGUF: the release is this adapter over --base")
    ] = None,
    base: Annotated[str, typer.Option(help="the adapter's base release, NAME@VERSION")] = "",
    base_bundle: Annotated[
        Path | None, typer.Option(help="the base's bundle directory, to read its artifact's sha256 from")
    ] = None,
    base_sha256: Annotated[
        str, typer.Option(help="the base's GGUF artifact sha256, when its bundle directory is not at hand")
    ] = "",
) -> None:
    """Write a signed bundle: release metadata (signed by the release key) and its variants.
    With --adapter, a LoRA adapter release over the base release --base names."""
    from edgefleet.controlplane.build.ladder import (
        LadderError,
        QualityGateError,
        parse_quantizations,
        result_table,
    )

    try:
        signers = open_keys(keys_dir).release_signers()
        if adapter is not None or base:
            if model is not None or quantize:
                raise BundleError("--adapter builds an adapter release: give no model and no --quantize")
            reference = _adapter_base(adapter, base, base_bundle, base_sha256)
            bundle = build_adapter_bundle(
                adapter or Path(),
                base=reference,
                name=name,
                version=version,
                out=out,
                signers=signers,
                expires_in=timedelta(days=expires_days),
                description=description,
            )
        elif model is None:
            raise BundleError("give a source model, or --adapter with --base")
        elif not quantize:
            bundle = build_bundle(
                model,
                name=name,
                version=version,
                out=out,
                signers=signers,
                expires_in=timedelta(days=expires_days),
                description=description,
            )
        else:
            variants, result = ladder_variants(
                model,
                quantizations=parse_quantizations(quantize),
                work_dir=out.parent / f".{out.name}.ladder",
                max_ppl_increase_pct=max_ppl_increase,
                warn_only=warn_only,
                tokenizer_path=tokenizer,
                progress=lambda message: err.print(f"  {message}", highlight=False),
            )
            Console(stderr=True).print(result_table(result))
            bundle = write_bundle(
                variants,
                name=name,
                version=version,
                out=out,
                signers=signers,
                expires_in=timedelta(days=expires_days),
                description=description,
            )
    except QualityGateError as exc:
        Console(stderr=True).print(result_table(exc.result))
        raise fail(str(exc)) from exc
    except (BundleError, GgufError, KeyStoreError, LadderError) as exc:
        raise fail(str(exc)) from exc
    Console(stderr=True).print(variants_table(bundle))
    typer.echo(str(out))


def _adapter_base(
    adapter: Path | None, base: str, base_bundle: Path | None, base_sha256: str
) -> bundle_pb2.AdapterBase:
    """fleetctl bundle build --adapter: the base's digest from its bundle directory or as given."""
    if adapter is None or not base:
        raise BundleError("an adapter release needs both --adapter FILE and --base NAME@VERSION")
    base_name, base_version = parse_base_ref(base)
    if (base_bundle is None) == (not base_sha256):
        raise BundleError("name the base's artifact digest with one of --base-bundle and --base-sha256")
    if base_bundle is not None:
        return base_from_bundle(base_bundle, name=base_name, version=base_version)
    return adapter_base(base_name, base_version, base_sha256)


def variants_table(bundle: BundleOnDisk) -> Table:
    rel = bundle.release
    over = rel.adapter_base
    caption = f"LoRA adapter over {over.name}@{over.version} ({over.artifact_sha256[:12]})" if over else None
    table = Table(
        "variant",
        "format",
        "quant",
        "size",
        "perplexity",
        "Δ ppl",
        "tok/s",
        "gate",
        title=f"{rel.name}@{rel.version}",
        caption=caption,
    )
    for v in rel.manifest.variants:
        measured = v.perplexity_milli > 0
        table.add_row(
            v.id,
            common_pb2.ModelFormat.Name(v.format).removeprefix("MODEL_FORMAT_").lower(),
            v.quantization,
            f"{v.size_bytes / 2**20:.1f} MiB",
            f"{v.perplexity_milli / 1000:.3f}" if measured else "-",
            f"{v.perplexity_increase_bp / 100:+.2f}%" if measured and v.quality_gate != "source" else "-",
            f"{v.tokens_per_second_milli / 1000:.1f}" if v.tokens_per_second_milli else "-",
            v.quality_gate or "-",
        )
    return table


@bundle_app.command("inspect")
def bundle_inspect(
    bundle_dir: Annotated[Path, typer.Argument(help="bundle directory")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    keys_dir: KeysDirOpt = None,
) -> None:
    """Show a bundle's variants with their size, perplexity and tokens/s, after checking its signature."""
    try:
        root = open_keys(keys_dir).root("image").signed
        bundle = open_bundle(bundle_dir, root=root)
    except (BundleError, KeyStoreError) as exc:
        raise fail(str(exc)) from exc
    except Exception as exc:  # a release that fails verification: say which check failed
        raise fail(f"{type(exc).__name__}: {exc}") from exc
    if as_json:
        manifest = json_format.MessageToDict(
            bundle.release.manifest, always_print_fields_with_no_presence=True
        )
        manifest["expires"] = bundle.release.expires.isoformat()
        manifest["artifacts"] = {
            p: {"length": a.length, "sha256": a.sha256} for p, a in bundle.release.artifacts.items()
        }
        typer.echo(json.dumps(manifest, indent=2))
        return
    Console().print(variants_table(bundle))


@bundle_app.command("push")
def bundle_push(
    bundle_dir: Annotated[Path, typer.Argument(help="bundle directory")],
    controlplane: ControlPlaneOpt = DEFAULT_CONTROLPLANE,
    keys_dir: KeysDirOpt = None,
) -> None:
    """Publish a bundle: sign the image repository's new targets with the release keys here,
    upload them with the artifacts; the control plane checks signatures and every hash."""
    try:
        total = client.bundle_size(bundle_dir)
        signers = open_keys(keys_dir).release_signers()
    except (BundleError, KeyStoreError) as exc:
        raise fail(str(exc)) from exc
    channel, stub = connect(controlplane)
    with (
        channel,
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=err,
            transient=True,
        ) as progress,
    ):
        task = progress.add_task(f"pushing {bundle_dir.name}", total=total)
        try:
            response = client.publish_bundle(
                stub, bundle_dir, signers, on_bytes=lambda n: progress.advance(task, n)
            )
        except grpc.RpcError as exc:
            raise rpc_error(exc) from exc
    ref = f"{response.bundle.name}@{response.bundle.version}"
    err.print(f"{ref} {'was already present' if response.already_present else 'pushed'}")
    typer.echo(ref)


@bundle_app.command("list")
def bundle_list(
    controlplane: ControlPlaneOpt = DEFAULT_CONTROLPLANE,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List pushed bundles."""
    channel, stub = connect(controlplane)
    with channel:
        try:
            bundles = list(client.all_pages(stub.ListBundles, operator_pb2.ListBundlesRequest(), "bundles"))
        except grpc.RpcError as exc:
            raise rpc_error(exc) from exc
    if as_json:
        typer.echo(json.dumps([json_format.MessageToDict(b) for b in bundles], indent=2))
        return
    table = Table("bundle", "variants", "size", "expires")
    for b in bundles:
        table.add_row(
            f"{b.manifest.name}@{b.manifest.version}",
            ", ".join(v.id for v in b.manifest.variants),
            f"{b.total_bytes / 2**20:.1f} MiB",
            b.expires.ToDatetime().date().isoformat(),
        )
    Console().print(table)
