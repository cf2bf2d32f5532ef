"""The quantization ladder of ``fleetctl bundle build``.

From one source model (GGUF, ONNX or an MLX folder) build the requested quantized
variants, measure each one's size, perplexity on a shipped evaluation text and tokens/s on
this machine, and refuse (or only warn about) variants whose perplexity rose more than a
set percentage over the source. Runtimes are imported lazily by each backend, so importing
this package costs no llama.cpp, ONNX Runtime or mlx import.
"""

from edgefleet.controlplane.build.ladder.build import (
    BACKENDS,
    build_ladder,
    detect_format,
    gate_status,
    normalize_quantizations,
    parse_quantizations,
    ppl_increase_pct,
)
from edgefleet.controlplane.build.ladder.perplexity import default_eval_text
from edgefleet.controlplane.build.ladder.table import (
    ladder_table,
    result_from_dict,
    result_table,
    result_to_dict,
    row_from_dict,
    row_to_dict,
)
from edgefleet.controlplane.build.ladder.types import (
    EvalConfig,
    EvaluationError,
    GateStatus,
    InvalidSettings,
    LadderError,
    LadderResult,
    LadderRow,
    Measurement,
    MissingTokenizer,
    ModelFormat,
    QualityGateError,
    QuantizationFailed,
    QuantizedArtifact,
    RuntimeUnavailable,
    Tokenizer,
    UnknownQuantization,
    UnsupportedSource,
)

__all__ = [
    "BACKENDS",
    "EvalConfig",
    "EvaluationError",
    "GateStatus",
    "InvalidSettings",
    "LadderError",
    "LadderResult",
    "LadderRow",
    "Measurement",
    "MissingTokenizer",
    "ModelFormat",
    "QualityGateError",
    "QuantizationFailed",
    "QuantizedArtifact",
    "RuntimeUnavailable",
    "Tokenizer",
    "UnknownQuantization",
    "UnsupportedSource",
    "build_ladder",
    "default_eval_text",
    "detect_format",
    "gate_status",
    "ladder_table",
    "normalize_quantizations",
    "parse_quantizations",
    "ppl_increase_pct",
    "result_from_dict",
    "result_table",
    "result_to_dict",
    "row_from_dict",
    "row_to_dict",
]
