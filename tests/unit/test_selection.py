"""Variant selection: each documented rule, pins, and the reasons a person reads."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from edgefleet.agent.device.hardware_profile import GpuInfo, GpuVendor, HardwareProfile
from edgefleet.agent.update.errors import NoUsableVariant
from edgefleet.agent.update.selection import (
    Pin,
    PinNotHonoured,
    kv_cache_bytes,
    quantization_bits,
    select_variant,
)
from edgefleet.protos.fleet.release import ArtifactInfo, VerifiedRelease
from edgefleet.protos.fleet.v1 import bundle_pb2, common_pb2

MIB, GIB = 1 << 20, 1 << 30
GGUF, ONNX, MLX = common_pb2.MODEL_FORMAT_GGUF, common_pb2.MODEL_FORMAT_ONNX, common_pb2.MODEL_FORMAT_MLX
ALL = frozenset({GGUF, ONNX, MLX})
N_CTX = 2048
CPU_BOX = HardwareProfile(arch="x86_64", system="Linux", ram_available_bytes=64 * GIB)
NVIDIA = GpuInfo(GpuVendor.NVIDIA, "NVIDIA RTX 4090", 24 * GIB, "550.54")
APPLE = HardwareProfile(
    arch="arm64",
    system="Darwin",
    ram_available_bytes=32 * GIB,
    apple_silicon=True,
    mlx_available=True,
    llama_gpu_offload=True,
)


def variant(
    vid: str, fmt: int, quant: str, size: int, *, ram: int | None = None, ppl: float = 0
) -> bundle_pb2.Variant:
    return bundle_pb2.Variant(
        id=vid,
        format=fmt,  # type: ignore[arg-type]
        quantization=quant,
        artifact=f"{vid}.bin",
        size_bytes=size,
        min_ram_bytes=ram if ram is not None else size + 256 * MIB,
        perplexity_milli=int(ppl * 1000),
    )


def release(*variants: bundle_pb2.Variant) -> VerifiedRelease:
    manifest = bundle_pb2.BundleManifest(name="m", version=1, variants=list(variants))
    artifacts = {
        v.artifact: ArtifactInfo(v.artifact, v.size_bytes, hashlib.sha256(v.artifact.encode()).hexdigest())
        for v in variants
    }
    return VerifiedRelease("m", 1, datetime.now(UTC), manifest, artifacts, b"")


def needed(v: bundle_pb2.Variant) -> int:
    """What rule 2 asks of RAM for a CPU placement."""
    return max(v.min_ram_bytes, v.size_bytes) + kv_cache_bytes(v, N_CTX)


Q2 = variant("gguf-q2_k", GGUF, "Q2_K", 600 * MIB)
Q4 = variant("gguf-q4_1", GGUF, "Q4_1", 1100 * MIB)
Q8 = variant("gguf-q8_0", GGUF, "Q8_0", 2100 * MIB)
LADDER = release(Q2, Q4, Q8)


def test_cpu_only_small_ram_picks_the_smallest_gguf() -> None:
    box = replace(CPU_BOX, ram_available_bytes=needed(Q2) + MIB)
    chosen = select_variant(LADDER, hardware=box, supported_formats={GGUF}, n_ctx=N_CTX)
    assert chosen.variant.id == "gguf-q2_k"
    assert chosen.runtime.accelerator == "cpu"
    rejected = {r.variant_id: r.reason for r in chosen.rejections}
    assert set(rejected) == {"gguf-q4_1", "gguf-q8_0"}
    assert "KV cache for n_ctx=2048" in rejected["gguf-q8_0"] and "RAM available" in rejected["gguf-q8_0"]
    assert chosen.reason.startswith("gguf-q2_k (GGUF Q2_K) on llama.cpp on CPU: the only variant that fits")
    assert "\n" not in chosen.reason


def test_the_context_window_counts_against_memory() -> None:
    """Fits without the KV cache, not with it: rule 2 must refuse."""
    box = replace(CPU_BOX, ram_available_bytes=Q8.min_ram_bytes + MIB)
    assert select_variant(LADDER, hardware=box, supported_formats={GGUF}, n_ctx=0).variant.id == "gguf-q8_0"
    assert (
        select_variant(LADDER, hardware=box, supported_formats={GGUF}, n_ctx=N_CTX).variant.id != "gguf-q8_0"
    )


def test_large_ram_picks_the_highest_quality() -> None:
    chosen = select_variant(LADDER, hardware=CPU_BOX, supported_formats={GGUF}, n_ctx=N_CTX)
    assert chosen.variant.id == "gguf-q8_0"
    assert "highest bit width of 3 that fit (8-bit" in chosen.reason
    assert {r.variant_id for r in chosen.rejections} == {"gguf-q2_k", "gguf-q4_1"}
    assert all("lower quality" in r.reason for r in chosen.rejections)


def test_measured_perplexity_beats_bit_width() -> None:
    """A Q5_K_M that measured better than a Q6_K (it happens with imatrix quants) wins."""
    rel = release(
        variant("q5", GGUF, "Q5_K_M", 1500 * MIB, ppl=9.80),
        variant("q6", GGUF, "Q6_K", 1800 * MIB, ppl=9.95),
    )
    chosen = select_variant(rel, hardware=CPU_BOX, supported_formats={GGUF}, n_ctx=N_CTX)
    assert chosen.variant.id == "q5"
    assert "lowest perplexity of 2 that fit (perplexity 9.800)" in chosen.reason
    # One variant unmeasured: perplexities are not comparable, bit width decides.
    mixed = release(
        variant("q5", GGUF, "Q5_K_M", 1500 * MIB, ppl=9.80), variant("q6", GGUF, "Q6_K", 1800 * MIB)
    )
    assert select_variant(mixed, hardware=CPU_BOX, supported_formats={GGUF}, n_ctx=N_CTX).variant.id == "q6"


def test_nvidia_with_a_cuda_build_offloads_to_the_gpu() -> None:
    onnx = variant("onnx-int8", ONNX, "INT8", 1200 * MIB)
    rel = release(Q4, Q8, onnx)
    box = replace(CPU_BOX, gpus=(NVIDIA,), llama_gpu_offload=True, onnx_providers=("CPUExecutionProvider",))
    chosen = select_variant(rel, hardware=box, supported_formats=ALL, n_ctx=N_CTX)
    assert (chosen.variant.id, chosen.runtime.accelerator, chosen.runtime.tier) == ("gguf-q8_0", "cuda", 2)
    assert "llama.cpp with CUDA offload" in chosen.reason
    assert "accelerator (cuda) preferred over CPU" in chosen.reason
    assert (
        "an accelerated variant is preferred"
        in {r.variant_id: r.reason for r in chosen.rejections}["onnx-int8"]
    )
    # Without a CUDA-capable llama.cpp build the same box runs on the CPU.
    cpu_build = select_variant(
        rel, hardware=replace(box, llama_gpu_offload=False), supported_formats=ALL, n_ctx=N_CTX
    )
    assert cpu_build.runtime.accelerator == "cpu"


def test_a_variant_too_big_for_the_gpu_loses_to_one_that_fits_it() -> None:
    """Rule 3 before rule 4: Q4 on the GPU beats Q8 on the CPU."""
    small_gpu = replace(NVIDIA, name="Jetson-ish", memory_bytes=needed(Q4))
    box = replace(CPU_BOX, gpus=(small_gpu,), llama_gpu_offload=True)
    chosen = select_variant(release(Q4, Q8), hardware=box, supported_formats={GGUF}, n_ctx=N_CTX)
    assert (chosen.variant.id, chosen.runtime.accelerator) == ("gguf-q4_1", "cuda")
    q8 = {r.variant_id: r.reason for r in chosen.rejections}["gguf-q8_0"]
    assert q8 == "fits on cpu, but an accelerated variant is preferred"


def test_apple_silicon_with_an_mlx_variant_picks_mlx() -> None:
    mlx = variant("mlx-4bit", MLX, "4bit", 900 * MIB)
    chosen = select_variant(release(Q8, mlx), hardware=APPLE, supported_formats=ALL, n_ctx=N_CTX)
    assert (chosen.variant.id, chosen.runtime.accelerator) == ("mlx-4bit", "mlx")
    assert "mlx on the Apple silicon GPU" in chosen.reason
    # Without mlx installed the GGUF runs with Metal offload, and the MLX variant says why not.
    no_mlx = select_variant(
        release(Q8, mlx), hardware=replace(APPLE, mlx_available=False), supported_formats=ALL, n_ctx=N_CTX
    )
    assert (no_mlx.variant.id, no_mlx.runtime.accelerator) == ("gguf-q8_0", "metal")
    assert "mlx package" in {r.variant_id: r.reason for r in no_mlx.rejections}["mlx-4bit"]


def test_mlx_is_rejected_off_apple_silicon() -> None:
    mlx = variant("mlx-4bit", MLX, "4bit", 900 * MIB)
    chosen = select_variant(release(Q4, mlx), hardware=CPU_BOX, supported_formats=ALL, n_ctx=N_CTX)
    assert chosen.variant.id == "gguf-q4_1"
    assert {r.variant_id: r.reason for r in chosen.rejections}["mlx-4bit"] == "MLX needs Apple silicon"


def test_onnx_only_bundle_runs_on_the_npu_provider() -> None:
    rel = release(
        variant("onnx-qdq-int8", ONNX, "INT8", 300 * MIB), variant("onnx-fp16", ONNX, "FP16", 600 * MIB)
    )
    box = replace(CPU_BOX, arch="aarch64", onnx_providers=("QNNExecutionProvider", "CPUExecutionProvider"))
    chosen = select_variant(rel, hardware=box, supported_formats={ONNX}, n_ctx=N_CTX)
    assert chosen.runtime.accelerator == "QNNExecutionProvider"
    assert chosen.variant.id == "onnx-fp16"
    assert "onnxruntime on QNNExecutionProvider" in chosen.reason


def test_a_gpu_provider_needs_its_gpu() -> None:
    """onnxruntime-gpu lists CUDA whether or not the machine has an NVIDIA GPU."""
    rel = release(variant("onnx-int8", ONNX, "INT8", 300 * MIB))
    box = replace(CPU_BOX, onnx_providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert select_variant(rel, hardware=box, supported_formats={ONNX}, n_ctx=N_CTX).runtime.accelerator == (
        "CPUExecutionProvider"
    )
    with_gpu = replace(box, gpus=(NVIDIA,))
    chosen = select_variant(rel, hardware=with_gpu, supported_formats={ONNX}, n_ctx=N_CTX)
    assert chosen.runtime.accelerator == "CUDAExecutionProvider"


def test_the_cgroup_limit_caps_available_ram() -> None:
    box = replace(CPU_BOX, memory_limit_bytes=needed(Q4) + MIB)
    assert (
        select_variant(LADDER, hardware=box, supported_formats={GGUF}, n_ctx=N_CTX).variant.id == "gguf-q4_1"
    )


def test_unknown_memory_is_not_checked_and_says_so() -> None:
    box = HardwareProfile()
    chosen = select_variant(LADDER, hardware=box, supported_formats={GGUF}, n_ctx=N_CTX)
    assert chosen.variant.id == "gguf-q8_0"
    assert "(RAM unknown, not checked)" in chosen.reason


def test_nothing_fits_lists_every_variant_and_its_reason() -> None:
    rel = release(
        Q4, Q8, variant("onnx-int8", ONNX, "INT8", 300 * MIB), variant("mlx-4bit", MLX, "4bit", 900 * MIB)
    )
    box = replace(CPU_BOX, ram_available_bytes=512 * MIB)
    with pytest.raises(NoUsableVariant) as refused:
        select_variant(rel, hardware=box, supported_formats={GGUF, MLX}, n_ctx=N_CTX)
    message = str(refused.value)
    assert message.startswith("no variant of m@1 can run here: ")
    assert "gguf-q4_1: needs" in message and "gguf-q8_0: needs" in message
    assert "onnx-int8: no ONNX runtime installed on this device" in message
    assert "mlx-4bit: MLX needs Apple silicon" in message
    assert not isinstance(refused.value, PinNotHonoured)


def test_variant_pin_wins_over_quality() -> None:
    pin = Pin(variant_id="gguf-q4_1", scope="device")
    chosen = select_variant(LADDER, hardware=CPU_BOX, supported_formats={GGUF}, n_ctx=N_CTX, pin=pin)
    assert chosen.variant.id == "gguf-q4_1"
    assert chosen.pin == pin
    assert "pinned to variant gguf-q4_1 (device)" in chosen.reason
    assert {r.variant_id: r.reason for r in chosen.rejections}["gguf-q8_0"].startswith("not allowed: pinned")
    message = chosen.to_message()
    assert (message.variant, message.pin.variant_id, len(message.rejections)) == ("gguf-q4_1", "gguf-q4_1", 2)


def test_runtime_pin_wins_over_the_accelerator() -> None:
    onnx = variant("onnx-int8", ONNX, "INT8", 1200 * MIB)
    box = replace(CPU_BOX, gpus=(NVIDIA,), llama_gpu_offload=True)
    pin = Pin(format=ONNX, scope="hw=jetson")
    chosen = select_variant(release(Q8, onnx), hardware=box, supported_formats=ALL, n_ctx=N_CTX, pin=pin)
    assert (chosen.variant.id, chosen.runtime.accelerator) == ("onnx-int8", "CPUExecutionProvider")
    assert "pinned to runtime onnx (hw=jetson)" in chosen.reason


def test_a_pin_the_device_cannot_honour_is_an_error_with_the_reason() -> None:
    mlx = variant("mlx-4bit", MLX, "4bit", 900 * MIB)
    with pytest.raises(PinNotHonoured) as runtime:
        select_variant(
            release(Q4, mlx), hardware=CPU_BOX, supported_formats=ALL, n_ctx=N_CTX, pin=Pin(format=MLX)
        )
    assert (
        str(runtime.value)
        == "pinned to runtime mlx cannot be honoured on this device: mlx-4bit: MLX needs Apple silicon"
    )
    with pytest.raises(PinNotHonoured) as missing:
        select_variant(
            LADDER, hardware=CPU_BOX, supported_formats={GGUF}, n_ctx=N_CTX, pin=Pin(variant_id="gguf-q5")
        )
    assert "has no such variant (it has: gguf-q2_k (GGUF Q2_K)" in str(missing.value)
    tight = replace(CPU_BOX, ram_available_bytes=needed(Q2) + MIB)
    with pytest.raises(PinNotHonoured, match="gguf-q8_0: needs"):
        select_variant(
            LADDER, hardware=tight, supported_formats={GGUF}, n_ctx=N_CTX, pin=Pin(variant_id="gguf-q8_0")
        )


def test_pin_messages_round_trip_and_reject_nonsense() -> None:
    assert Pin.from_message(common_pb2.VariantPin()) is None
    pin = Pin(format=GGUF, scope="device")
    assert Pin.from_message(pin.to_message()) == pin
    with pytest.raises(ValueError, match="exactly one"):
        Pin.from_message(common_pb2.VariantPin(variant_id="x", format=GGUF))
    with pytest.raises(ValueError, match="unknown format 42"):
        Pin.from_message(common_pb2.VariantPin(format=42))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("label", "bits"),
    [
        ("Q4_1", 4),
        ("Q4_K_M", 4),
        ("IQ2_XS", 2),
        ("Q8_0", 8),
        ("F16", 16),
        ("BF16", 16),
        ("INT8", 8),
        ("fp16", 16),
        ("4bit", 4),
        ("8-bit", 8),
        ("", None),
        ("qdq", None),
    ],
)
def test_quantization_bits(label: str, bits: int | None) -> None:
    assert quantization_bits(label) == bits


def test_kv_estimate_is_in_the_range_of_real_models() -> None:
    """Llama-2-7B in f16 (13.5 GB) keeps 0.5 MiB per token of KV cache; the estimate is close."""
    llama2 = variant("f16", GGUF, "F16", 13_500_000_000)
    per_token = kv_cache_bytes(llama2, 1)
    assert 0.4 * MIB < per_token < 0.7 * MIB
    assert kv_cache_bytes(llama2, 4096) == pytest.approx(4096 * per_token, rel=1e-3)
    assert kv_cache_bytes(llama2, 0) == 0
