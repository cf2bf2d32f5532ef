"""A llama.cpp build with AMX kernels is refused before it loads, naming the rebuild."""

from __future__ import annotations

import pytest

from edgefleet.agent.runtimes.base import RuntimeLoadError
from edgefleet.agent.runtimes.llama_build import REBUILD, refuse_crashing_build

AVX512 = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_BF16 = 1 | REPACK = 1 | "


def test_a_build_without_amx_kernels_loads() -> None:
    refuse_crashing_build(AVX512)
    refuse_crashing_build("CPU : AVX2 = 1 | AMX_INT8 = 0 | ")


def test_a_build_with_amx_kernels_is_refused_with_the_rebuild_command() -> None:
    with pytest.raises(RuntimeLoadError) as refused:
        refuse_crashing_build(AVX512 + "AMX_INT8 = 1 | ")
    assert "AMX" in str(refused.value) and REBUILD in str(refused.value)
