"""A real signed release for simulated devices: a tiny GGUF built into a bundle.

Simulated devices never load a model, but the control plane publishes and signs real bundles,
so fan-out and rollout benchmarks push one: the smallest GGUF whose header a bundle build reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from securesystemslib.signer import Signer

from edgefleet.controlplane.build.bundles import BundleOnDisk, build_bundle


def write_tiny_gguf(path: Path) -> Path:
    """A few-hundred-byte GGUF with the header fields a bundle build reads (architecture, file
    type, context length): simulated devices never load it, so nothing bigger is needed."""
    import gguf
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("sim")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_context_length(512)
    writer.add_tensor("w", np.zeros((2, 34), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_sim_bundle(
    work: Path, signers: Sequence[Signer], *, name: str = "simlm", version: int = 1
) -> BundleOnDisk:
    """A real signed bundle of a tiny GGUF, for fan-out and state tracking with simulated devices."""
    model = work / f"{name}-{version}.gguf"
    if not model.exists():
        write_tiny_gguf(model)
    return build_bundle(model, name=name, version=version, out=work / f"{name}-{version}", signers=signers)
