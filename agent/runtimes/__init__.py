"""Inference backends behind one protocol; see `base` for the contract, `registry` to load one.

Importing this package never imports a backend library (llama_cpp, onnxruntime, mlx).
"""

from edgefleet.agent.runtimes.base import (
    ChatMessage,
    ChatNotSupported,
    Completion,
    ContextLengthExceeded,
    Delta,
    Generation,
    GenerationError,
    InvalidPromptError,
    Runtime,
    RuntimeDescription,
    RuntimeFailure,
    RuntimeLoadError,
    RuntimeSmokeTestError,
    RuntimeUnloaded,
    SamplingParams,
    UnsupportedFormatError,
)
from edgefleet.agent.runtimes.registry import load_runtime, supported_formats

__all__ = [
    "ChatMessage",
    "ChatNotSupported",
    "Completion",
    "ContextLengthExceeded",
    "Delta",
    "Generation",
    "GenerationError",
    "InvalidPromptError",
    "Runtime",
    "RuntimeDescription",
    "RuntimeFailure",
    "RuntimeLoadError",
    "RuntimeSmokeTestError",
    "RuntimeUnloaded",
    "SamplingParams",
    "UnsupportedFormatError",
    "load_runtime",
    "supported_formats",
]
