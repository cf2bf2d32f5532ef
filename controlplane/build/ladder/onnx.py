"""ONNX variants through ONNX Runtime's dynamic quantization, and their measurement.

``quantize_dynamic`` stores weights as 8-bit integers with a scale and zero point and
quantizes activations on the fly, so it needs no calibration data: the right default for
a ladder that only has a source model and a few KB of text.

Measurement follows :mod:`edgefleet.controlplane.build.ladder.perplexity` (windows of ``n_ctx`` tokens,
second half scored). The graph must take ``input_ids`` [batch, seq] and return ``logits``
[batch, seq, vocab]; an ``attention_mask`` or ``position_ids`` input is fed the obvious
all-ones / 0..seq-1 values, anything else (e.g. past key values) is refused. ONNX graphs do
not carry a tokenizer, so the caller passes one, and windows start with whatever token the
tokenizer produced there (no BOS substitution). Speed is greedy decoding of ``gen_tokens``
tokens without a KV cache: every step reruns the whole sequence, which is how a plain
exported graph runs; it understates what a KV-cached export would do, the same way for
every variant.

The source is an ``.onnx`` file or a model folder holding one (``model.onnx``, or the only
``.onnx`` file at its top level, as Hugging Face Optimum exports); a folder's
tokenizer.json, configs and chat template are what the bundle ships beside each variant
(:mod:`edgefleet.controlplane.build.ladder.variants`), so a device can serve it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from edgefleet.controlplane.build.ladder.perplexity import (
    default_threads,
    perplexity_from,
    split_windows,
    window_nll,
)
from edgefleet.controlplane.build.ladder.types import (
    EvalConfig,
    EvaluationError,
    Measurement,
    MissingTokenizer,
    ModelFormat,
    QuantizationFailed,
    QuantizedArtifact,
    RuntimeUnavailable,
    Tokenizer,
    UnsupportedSource,
)

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# Ladder name -> onnxruntime.quantization.QuantType member for the weights.
WEIGHT_TYPES: MappingProxyType[str, str] = MappingProxyType({"int8": "QInt8", "uint8": "QUInt8"})

# ONNX Runtime's input type string -> numpy dtype name for the token ids.
_INPUT_DTYPES: MappingProxyType[str, str] = MappingProxyType(
    {"tensor(int64)": "int64", "tensor(int32)": "int32"}
)
_PRECISION_NAMES: MappingProxyType[int, str] = MappingProxyType(
    {1: "fp32", 10: "fp16", 16: "bf16", 3: "int8", 2: "uint8"}  # onnx.TensorProto.DataType values
)
_OPTIONAL_INPUTS = frozenset({"attention_mask", "position_ids"})
_UNAVAILABLE = "onnxruntime is not installed (install edgefleet[onnx])"


MODEL_FILE = "model.onnx"


def folder_model(folder: Path) -> Path | None:
    """A folder's ONNX model: ``model.onnx``, else its only top-level ``.onnx`` file."""
    if (folder / MODEL_FILE).is_file():
        return folder / MODEL_FILE
    candidates = [p for p in folder.glob("*.onnx") if p.is_file()]
    return candidates[0] if len(candidates) == 1 else None


def is_onnx(path: Path) -> bool:
    """An .onnx file, or a folder holding one ONNX model (tested before the MLX folder check)."""
    if path.is_dir():
        return folder_model(path) is not None
    return path.is_file() and path.suffix.lower() == ".onnx"


def model_file(source: Path) -> Path:
    """The .onnx file of a source given as a file or as a model folder."""
    if not source.is_dir():
        return source
    found = folder_model(source)
    if found is None:
        raise UnsupportedSource(f"{source} holds no {MODEL_FILE} (or several .onnx files)")
    return found


def _load_graph(model: Path) -> Any:
    """The ModelProto without external tensor data (enough to list files and types)."""
    import onnx

    try:
        return onnx.load(str(model), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors share no base
        raise UnsupportedSource(f"{model} is not a readable ONNX model: {exc}") from exc


def onnx_files(model: Path) -> tuple[Path, ...]:
    """The .onnx file and any external-data files its initializers point to."""
    import onnx

    proto = _load_graph(model)
    extra: set[Path] = set()
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    extra.add(model.parent / entry.value)
    return (model, *sorted(extra))


def weight_precision(model: Path) -> str:
    """The element type holding most of the model's initializer values ("fp32", "int8", ...)."""
    import onnx

    proto = _load_graph(model)
    counts: dict[int, int] = {}
    for tensor in proto.graph.initializer:
        counts[tensor.data_type] = counts.get(tensor.data_type, 0) + math.prod(tensor.dims)
    if not counts:
        return "unknown"
    dominant = max(counts, key=lambda data_type: counts[data_type])
    return _PRECISION_NAMES.get(dominant) or onnx.TensorProto.DataType.Name(dominant).lower()


def quantize_onnx(source: Path, dest: Path, quantization: str) -> QuantizedArtifact:
    """Dynamic quantization of every supported op's weights (MatMul, Gather, ...) to `quantization`.

    The model is written into a temporary directory next to `dest` and moved into place, so
    a failed run leaves no half-written model (and external data keeps its relative name).
    """
    if importlib.util.find_spec("onnxruntime") is None:
        raise RuntimeUnavailable(_UNAVAILABLE)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight_type = getattr(QuantType, WEIGHT_TYPES[quantization])
    external = len(onnx_files(source)) > 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        try:
            quantize_dynamic(
                source,
                staging / dest.name,
                weight_type=weight_type,
                use_external_data_format=external,
            )
        except Exception as exc:  # onnxruntime raises bare Exception/RuntimeError/ValueError subclasses
            raise QuantizationFailed(
                f"quantize_dynamic({source.name} -> {quantization}) failed: {exc}"
            ) from exc
        written = sorted(staging.iterdir())
        if not (staging / dest.name).is_file():
            raise QuantizationFailed(f"quantize_dynamic wrote no {dest.name}")
        for path in written:
            os.replace(path, dest.parent / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return QuantizedArtifact(
        quantization=quantization,
        paths=onnx_files(dest),
        note=f"dynamic quantization, {WEIGHT_TYPES[quantization]} weights",
    )


@dataclass(frozen=True, slots=True)
class _Graph:
    """An ONNX Runtime session and how to feed it."""

    session: Any
    input_dtype: str
    optional_inputs: frozenset[str]

    def logits(self, tokens: Sequence[int]) -> npt.NDArray[np.float32]:
        """Logits [seq, vocab] for one sequence."""
        import numpy as np

        ids = np.asarray([tokens], dtype=self.input_dtype)
        feeds: dict[str, npt.NDArray[Any]] = {"input_ids": ids}
        if "attention_mask" in self.optional_inputs:
            feeds["attention_mask"] = np.ones_like(ids)
        if "position_ids" in self.optional_inputs:
            feeds["position_ids"] = np.arange(len(tokens), dtype=self.input_dtype)[None, :]
        (out,) = self.session.run(["logits"], feeds)
        result = np.asarray(out, dtype=np.float32)
        if result.ndim != 3 or result.shape[1] != len(tokens):
            raise EvaluationError(f"logits have shape {result.shape}, expected [1, {len(tokens)}, vocab]")
        logits: npt.NDArray[np.float32] = result[0]
        return logits


def _open(model: Path, n_threads: int) -> _Graph:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise RuntimeUnavailable(_UNAVAILABLE) from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = n_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types are not importable in a stable place
        raise EvaluationError(f"ONNX Runtime could not load {model}: {exc}") from exc
    inputs: Mapping[str, str] = {node.name: node.type for node in session.get_inputs()}
    outputs = {node.name for node in session.get_outputs()}
    unknown = set(inputs) - {"input_ids"} - _OPTIONAL_INPUTS
    if "input_ids" not in inputs or unknown or "logits" not in outputs:
        raise EvaluationError(
            f"{model.name}: need a causal LM graph with input 'input_ids' and output 'logits' "
            f"(optional: {', '.join(sorted(_OPTIONAL_INPUTS))}); it has inputs {sorted(inputs)} "
            f"and outputs {sorted(outputs)}"
        )
    dtype = _INPUT_DTYPES.get(inputs["input_ids"])
    if dtype is None:
        raise EvaluationError(f"{model.name}: input_ids is {inputs['input_ids']}, expected int64 or int32")
    return _Graph(session=session, input_dtype=dtype, optional_inputs=frozenset(inputs) & _OPTIONAL_INPUTS)


def measure_onnx(
    model: Path, *, text: str, tokenizer: Tokenizer, config: EvalConfig, n_threads: int | None = None
) -> Measurement:
    """Perplexity over `text` and greedy tokens/s without KV cache (see the module docstring)."""
    graph = _open(model, n_threads or default_threads())
    tokens = [int(t) for t in tokenizer(text)]
    windows = split_windows(tokens, n_ctx=config.n_ctx, max_windows=config.max_windows)
    nll_sum, count = 0.0, 0
    for window in windows:
        nll, scored = window_nll(graph.logits(window), window)
        nll_sum += nll
        count += scored
    return Measurement(
        perplexity=perplexity_from(nll_sum, count),
        tokens_scored=count,
        windows=len(windows),
        tokens_per_second=_decode_speed(graph, tokens[: config.prompt_tokens], config.gen_tokens),
    )


def _decode_speed(graph: _Graph, prompt: list[int], gen_tokens: int) -> float:
    import numpy as np

    sequence = list(prompt)
    started = time.perf_counter()
    for _ in range(gen_tokens):
        sequence.append(int(np.argmax(graph.logits(sequence)[-1])))
    elapsed = time.perf_counter() - started
    return gen_tokens / elapsed if elapsed > 0 else math.inf


@dataclass(frozen=True, slots=True)
class OnnxBackend:
    """The ladder backend for ONNX causal LMs (see :class:`.types.LadderBackend`)."""

    @property
    def format(self) -> ModelFormat:
        return ModelFormat.ONNX

    def quantization_names(self) -> tuple[str, ...]:
        return tuple(WEIGHT_TYPES)

    def ensure_available(self) -> None:
        for module in ("onnxruntime", "onnx"):
            if importlib.util.find_spec(module) is None:
                raise RuntimeUnavailable(f"{module} is not installed (install edgefleet[onnx])")

    def source_label(self, source: Path) -> str:
        return weight_precision(model_file(source))

    def variant_path(self, out_dir: Path, quantization: str) -> Path:
        return out_dir / f"model.{quantization}.onnx"

    def files(self, model: Path) -> tuple[Path, ...]:
        return onnx_files(model_file(model))

    def quantize(self, source: Path, dest: Path, quantization: str, *, n_threads: int) -> QuantizedArtifact:
        return quantize_onnx(model_file(source), dest, quantization)

    def measure(
        self, model: Path, *, text: str, config: EvalConfig, n_threads: int, tokenizer: Tokenizer | None
    ) -> Measurement:
        if tokenizer is None:
            raise MissingTokenizer("an ONNX model needs a tokenizer function to be measured")
        return measure_onnx(
            model_file(model), text=text, tokenizer=tokenizer, config=config, n_threads=n_threads
        )
