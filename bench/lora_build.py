"""Small LoRA adapters in llama.cpp's GGUF format, for a given GGUF base model (tests and benches).

No package ships a LoRA adapter for a model small enough to test with, so this writes one with
the ``gguf`` package's writer, in the layout llama.cpp's ``convert_lora_to_gguf.py`` produces
and ``llama_adapter_lora_init`` checks:

- metadata ``general.type = "adapter"``, ``general.architecture`` the base's,
  ``adapter.type = "lora"`` and ``adapter.lora.alpha`` (llama.cpp scales the product by
  alpha / rank, times the per-request scale);
- for each targeted base weight ``W`` (ggml shape ``[n_in, n_out]``), ``<name>.lora_a`` of
  ggml shape ``[n_in, rank]`` and ``<name>.lora_b`` of ``[rank, n_out]``: as numpy arrays
  ``A`` is ``(rank, n_in)`` and ``B`` is ``(n_out, rank)``, so ``W x + scale * B (A x)``,
  PEFT's own orientation.

The weights are random from ``seed``: A is uniform in +-1/sqrt(n_in) (PEFT's Kaiming init),
B normal with a standard deviation that makes ``B A x`` about ``strength`` times as large as
``x``, far from a trained adapter's zero-initialised B, so the greedy output visibly changes.
``mismatched_lora`` writes one whose shapes fit no base (the rank dimension of A swapped with
the input dimension), for the refusal path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter

DEFAULT_TARGETS = ("attn_q", "attn_v")


def base_shapes(base: Path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The base's architecture and its weight shapes in ggml order (ne[0] first)."""
    reader = GGUFReader(base)
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()
    return arch, {str(t.name): tuple(int(d) for d in t.shape) for t in reader.tensors}


def build_lora(
    base: Path,
    out: Path,
    *,
    rank: int = 8,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    seed: int = 0,
    strength: float = 1.0,
    f16: bool = False,
    architecture: str | None = None,
) -> Path:
    """Write a LoRA for every layer's ``blk.N.<target>.weight`` of ``base``; returns ``out``.

    ``alpha`` defaults to ``rank`` (llama.cpp's multiplier alpha / rank is then 1);
    ``architecture`` overrides the base's in the metadata (an adapter for another model)."""
    arch, shapes = base_shapes(base)
    arch = architecture or arch
    rng = np.random.default_rng(seed)
    dtype = np.float16 if f16 else np.float32
    writer = GGUFWriter(out, arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank if alpha is None else alpha))
    wanted = tuple(f".{target}.weight" for target in targets)
    names = sorted(name for name in shapes if name.startswith("blk.") and name.endswith(wanted))
    if not names:
        raise ValueError(f"{base} has no weights named like {targets}")
    for name in names:
        n_in, n_out = shapes[name][:2]
        bound = 1.0 / math.sqrt(n_in)
        a = rng.uniform(-bound, bound, size=(rank, n_in))
        # Each entry of A x has variance rms(x)^2 / 3; B sums `rank` of them, so this standard
        # deviation makes the entries of B A x about `strength` times rms(x).
        b = rng.normal(0.0, strength * math.sqrt(3.0 / rank), size=(n_out, rank))
        writer.add_tensor(f"{name}.lora_a", a.astype(dtype))
        writer.add_tensor(f"{name}.lora_b", b.astype(dtype))
    _write(writer)
    return out


def mismatched_lora(base: Path, out: Path, *, rank: int = 4, target: str = "attn_q") -> Path:
    """An adapter of the base's architecture whose first target pair has the wrong input size."""
    arch, shapes = base_shapes(base)
    name = next(n for n in sorted(shapes) if n.endswith(f".{target}.weight"))
    n_in, n_out = shapes[name][:2]
    writer = GGUFWriter(out, arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    writer.add_tensor(f"{name}.lora_a", np.zeros((rank, n_in + 64), dtype=np.float32))
    writer.add_tensor(f"{name}.lora_b", np.zeros((n_out, rank), dtype=np.float32))
    _write(writer)
    return out


def _write(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
