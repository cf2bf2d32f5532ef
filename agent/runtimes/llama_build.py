"""Refuses llama.cpp builds known to crash the process on this machine, before they load.

A llama.cpp built natively on an Intel CPU with AMX (Sapphire Rapids and later) repacks
quantized weights into its AMX buffer type and crashes the whole process with a segmentation
fault in its first matrix multiplication (``ggml_backend_amx_mul_mat``; llama.cpp issue
#20824, seen here with SmolLM2 Q4_1). A crash would take the agent down with every model it
serves and restart it into the same crash, so a build with AMX kernels is refused with the way
out instead: rebuild llama-cpp-python without them (``GGML_NATIVE=OFF``, as dev/setup and the
agent container image build it: kernels for any x86-64 CPU with AVX2, AMX left out).

``llama_print_system_info`` reports ``AMX_INT8 = 1`` only when the AMX kernels were compiled
in, which a build does only for a CPU that has AMX.
"""

from __future__ import annotations

from edgefleet.agent.runtimes.base import RuntimeLoadError

REBUILD = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" '
    "pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python"
)


def refuse_crashing_build(system_info: str) -> None:
    """Raises RuntimeLoadError when ``system_info`` (llama_print_system_info) names a build
    that crashes on its first generation."""
    if "AMX_INT8 = 1" in system_info:
        raise RuntimeLoadError(
            "this llama.cpp build uses AMX kernels, which crash on the first generation "
            f"(llama.cpp issue #20824); rebuild llama-cpp-python without them: {REBUILD}"
        )
