"""What this llama.cpp build is: one known to crash here (refused before it loads), and the
accelerator it offloads to, if any.

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

import ctypes

from edgefleet.agent.runtimes.base import RuntimeLoadError

REBUILD = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" '
    "pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python"
)

# ggml backend registry names of accelerators, as the `device` they put in a description.
_ACCELERATOR_NAMES = {
    "CUDA": "cuda",
    "ROCm": "rocm",
    "HIP": "rocm",
    "MUSA": "musa",
    "Metal": "metal",
    "MTL": "metal",
    "Vulkan": "vulkan",
    "SYCL": "sycl",
    "OpenCL": "opencl",
    "CANN": "cann",
}
# Backends that compute on the host CPU (or elsewhere, for RPC), never a local accelerator.
_HOST_BACKENDS = frozenset({"CPU", "BLAS", "RPC", "AMX"})


def refuse_crashing_build(system_info: str) -> None:
    """Raises RuntimeLoadError when ``system_info`` (llama_print_system_info) names a build
    that crashes on its first generation."""
    if "AMX_INT8 = 1" in system_info:
        raise RuntimeLoadError(
            "this llama.cpp build uses AMX kernels, which crash on the first generation "
            f"(llama.cpp issue #20824); rebuild llama-cpp-python without them: {REBUILD}"
        )


def accelerator(gpu_offload: bool) -> str:
    """Where the layers run, as far as this llama.cpp build can tell: the ggml registry name
    of the first accelerator device it found ("cuda", "metal", "vulkan", ...), "cpu" when the
    build cannot offload, "gpu" when it can but does not say which (an older ggml)."""
    if not gpu_offload:
        return "cpu"
    try:
        from llama_cpp._ggml import libggml  # the library's own handle on ggml; no public API

        libggml.ggml_backend_dev_count.restype = ctypes.c_size_t
        libggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        libggml.ggml_backend_dev_get.restype = ctypes.c_void_p
        libggml.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
        libggml.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
        libggml.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
        libggml.ggml_backend_reg_name.restype = ctypes.c_char_p
        for index in range(int(libggml.ggml_backend_dev_count())):
            registry = libggml.ggml_backend_dev_backend_reg(libggml.ggml_backend_dev_get(index))
            name = bytes(libggml.ggml_backend_reg_name(registry) or b"").decode("utf-8", "replace")
            if name and name not in _HOST_BACKENDS:
                return _ACCELERATOR_NAMES.get(name, name.lower())
    except (ImportError, AttributeError, OSError):
        pass
    return "gpu"
