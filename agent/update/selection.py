"""Chooses which variant of a release this device runs, on which accelerator, and says why.

A bundle ships the same model several ways (GGUF for llama.cpp, ONNX, MLX; several
quantizations); the device, not the control plane, knows what it can run well. The rules,
applied in this order:

0. **Pin.** When the device's signed director targets carry a pin, only the pinned variant (by
   id) or the variants of the pinned format are candidates. If none survives rules 1-2, the
   release is refused with ``PinNotHonoured`` and the device keeps serving what it has.
1. **A runtime, and a usable accelerator.** The format needs a runtime installed here (the
   runtime registry). Each variant gets its possible placements:

   * GGUF runs on llama.cpp's CPU path; it is offloaded to a GPU only when llama.cpp was built
     with GPU offload (``llama_gpu_offload``) and there is a GPU: NVIDIA (``cuda``), Apple
     silicon (``metal``) or another GPU (``gpu``).
   * MLX needs Apple silicon with mlx installed (``mlx_available``); otherwise it is rejected.
   * ONNX runs on onnxruntime's best available execution provider, in the order of
     ``ONNX_PROVIDERS`` (a GPU provider counts only when the matching GPU was detected), and
     always on ``CPUExecutionProvider``.
2. **Fits in memory, context included.** needed = max(``min_ram_bytes``, ``size_bytes``) +
   the KV-cache estimate for the configured ``n_ctx`` (``kv_cache_bytes``), against available
   RAM (capped by the cgroup limit) for CPU, Apple silicon and NPU placements; a discrete-GPU
   placement needs ``size_bytes`` + KV within 90% of the largest matching GPU's memory (free
   VRAM is not probed). A variant too big for its GPU falls back to its CPU placement. Memory
   the hardware profile does not know is not checked, and the reason says so.
3. **Accelerator over CPU.** Tier 2, the platform's native stack: llama.cpp with CUDA on an
   NVIDIA GPU, MLX on Apple silicon, an ONNX accelerator or NPU provider. Tier 1: other
   llama.cpp GPU offload (Metal, ROCm/Vulkan). Tier 0: CPU. The highest tier that fits wins.
4. **Highest quality that fits.** Within that tier, the lowest measured perplexity when every
   candidate has one (the bundle builder measures them on the same text), else the highest
   quantization bit width, then the largest file; remaining ties go to the smaller id.

The ``Selection`` names the variant, the runtime placement, a one-line reason and why every
other variant was not chosen; when nothing can run, ``NoUsableVariant`` lists every reason.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from edgefleet.agent.device.hardware_profile import GpuVendor, HardwareProfile
from edgefleet.agent.update.errors import NoUsableVariant
from edgefleet.protos.fleet.release import VerifiedRelease
from edgefleet.protos.fleet.v1 import bundle_pb2, common_pb2

GIB = 1 << 30
GPU_MEMORY_USABLE = 0.9
"""Share of a GPU's total memory a model may use: the driver, display and CUDA context keep some."""
ASSUMED_BITS = 4
"""Bit width assumed for an unreadable quantization; low, so the KV estimate errs toward large."""

CPU, CUDA, METAL, GPU, MLX = "cpu", "cuda", "metal", "gpu", "mlx"
ONNX_CPU = "CPUExecutionProvider"
ONNX_PROVIDERS: tuple[tuple[str, GpuVendor | str | None], ...] = (
    ("TensorrtExecutionProvider", GpuVendor.NVIDIA),
    ("CUDAExecutionProvider", GpuVendor.NVIDIA),
    ("MIGraphXExecutionProvider", GpuVendor.AMD),
    ("ROCMExecutionProvider", GpuVendor.AMD),
    ("QNNExecutionProvider", None),
    ("VitisAIExecutionProvider", None),
    ("CoreMLExecutionProvider", "apple"),
    ("OpenVINOExecutionProvider", None),
    ("DmlExecutionProvider", None),
)
"""onnxruntime's accelerator providers, best first, with the hardware each needs detected.

A detected discrete GPU is the fastest target; NPUs (QNN, Vitis AI) come next, then the
providers that pick a device themselves. ``None``: the provider's presence is the only sign.
"""

RUNTIME_NAMES: Mapping[int, str] = MappingProxyType(
    {
        common_pb2.MODEL_FORMAT_GGUF: "llama.cpp",
        common_pb2.MODEL_FORMAT_ONNX: "onnxruntime",
        common_pb2.MODEL_FORMAT_MLX: "mlx",
    }
)

_BIT_PATTERNS = (
    re.compile(r"(\d+)\s*-?BITS?\b"),  # MLX: "4bit", "8-bit"
    re.compile(r"^(?:I?Q|U?INT|FP|BF|F)(\d+)"),  # GGUF "Q4_1", "IQ2_XS", "F16"; ONNX "INT8", "FP16"
)


class PinNotHonoured(NoUsableVariant):
    """The operator's pin names a variant or runtime this device cannot run; the old model stays."""


def format_name(fmt: int) -> str:
    """ "GGUF" for MODEL_FORMAT_GGUF; the number for a value this build does not know."""
    try:
        return common_pb2.ModelFormat.Name(fmt).removeprefix("MODEL_FORMAT_")
    except ValueError:
        return str(fmt)


@dataclass(frozen=True, slots=True)
class Pin:
    """An operator's pin as the director signed it: one variant id, or one format."""

    variant_id: str = ""
    format: int = common_pb2.MODEL_FORMAT_UNSPECIFIED
    scope: str = ""

    def __post_init__(self) -> None:
        if bool(self.variant_id) == bool(self.format):
            raise ValueError("a pin names exactly one of a variant id and a format")

    @classmethod
    def from_message(cls, message: common_pb2.VariantPin) -> Pin | None:
        """None for an empty message (no pin); ValueError for one naming both or a bad format."""
        if not message.variant_id and not message.format:
            return None
        if message.format and message.format not in RUNTIME_NAMES:
            raise ValueError(f"pin names unknown format {message.format}")
        return cls(variant_id=message.variant_id, format=message.format, scope=message.scope)

    def to_message(self) -> common_pb2.VariantPin:
        return common_pb2.VariantPin(
            variant_id=self.variant_id,
            format=self.format,  # type: ignore[arg-type]
            scope=self.scope,
        )

    def describe(self) -> str:
        what = (
            f"variant {self.variant_id}" if self.variant_id else f"runtime {format_name(self.format).lower()}"
        )
        return f"pinned to {what}" + (f" ({self.scope})" if self.scope else "")

    def admits(self, variant: bundle_pb2.Variant) -> bool:
        return variant.id == self.variant_id if self.variant_id else variant.format == self.format


@dataclass(frozen=True, slots=True)
class RuntimeChoice:
    """Where a variant runs: its format's runtime on an accelerator (or ``cpu``)."""

    format: int
    accelerator: str
    tier: int  # rule 3: 2 native accelerator, 1 other GPU offload, 0 CPU

    def describe(self) -> str:
        runtime = RUNTIME_NAMES.get(self.format, format_name(self.format))
        if self.format == common_pb2.MODEL_FORMAT_ONNX:
            return f"{runtime} on {self.accelerator}"
        if self.accelerator == CPU:
            return f"{runtime} on CPU"
        if self.format == common_pb2.MODEL_FORMAT_MLX:
            return f"{runtime} on the Apple silicon GPU"
        offload = "CUDA" if self.accelerator == CUDA else self.accelerator
        return f"{runtime} with {offload} offload"


@dataclass(frozen=True, slots=True)
class Rejection:
    """One variant not chosen, and why, for the operator reading the fleet listing."""

    variant_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Selection:
    """The variant to install, where it runs, why, and why each other variant was not chosen."""

    variant: bundle_pb2.Variant
    runtime: RuntimeChoice
    reason: str
    rejections: tuple[Rejection, ...] = ()
    pin: Pin | None = None

    def to_message(self) -> common_pb2.VariantSelection:
        message = common_pb2.VariantSelection(
            variant=self.variant.id,
            format=self.variant.format,
            accelerator=self.runtime.accelerator,
            reason=self.reason,
            rejections=[
                common_pb2.VariantRejection(variant=r.variant_id, reason=r.reason) for r in self.rejections
            ],
        )
        if self.pin is not None:
            message.pin.CopyFrom(self.pin.to_message())
        return message


# --- rule 2's figures ------------------------------------------------------------------------


def quantization_bits(quantization: str) -> int | None:
    """Nominal bits per weight of a quantization label ("Q4_1" 4, "INT8" 8, "4bit" 4, "F16" 16)."""
    text = quantization.strip().upper()
    for pattern in _BIT_PATTERNS:
        match = pattern.search(text)
        if match:
            return int(match.group(1))
    return None


def kv_cache_bytes(variant: bundle_pb2.Variant, n_ctx: int) -> int:
    """Estimated f16 KV cache of ``n_ctx`` tokens, from the file size alone.

    The manifest carries no layer or head counts, so the model's shape is inferred: parameters
    = size x 8 / bit width; a transformer has about 12·L·d² parameters with L ≈ d/128 layers,
    so d ≈ (32·params/3)^(1/3); K and V in f16 take 2·2·L·d = d²/32 bytes per token. That is
    full multi-head attention: models with grouped-query attention need less, so the estimate
    errs toward "does not fit" (Llama-2-7B: ~0.5 MiB per token, as measured).
    """
    bits = quantization_bits(variant.quantization) or ASSUMED_BITS
    params = variant.size_bytes * 8 / bits
    d_model = (32 * params / 3) ** (1 / 3)
    return int(max(0, n_ctx) * d_model * d_model / 32)


def memory_needed(variant: bundle_pb2.Variant, n_ctx: int, *, weights_only: bool = False) -> int:
    """Estimated memory of the variant loaded with an ``n_ctx`` context: its weights (or the
    bundle's stated minimum RAM, whichever is larger, unless only weights count, as on a
    GPU) plus the KV cache. Selection checks it against free memory, the agent's memory
    budget against what its other models hold."""
    base = variant.size_bytes if weights_only else max(variant.min_ram_bytes, variant.size_bytes)
    return base + kv_cache_bytes(variant, n_ctx)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


@dataclass(frozen=True, slots=True)
class _Budget:
    """The memory one placement is checked against; ``bytes`` None means unknown."""

    bytes: int | None
    kind: str  # "RAM" or "GPU memory"
    weights_only: bool = False  # a GPU holds weights + KV; host overhead (min_ram_bytes) is not its


def _ram(hw: HardwareProfile) -> _Budget:
    available = hw.ram_available_bytes
    if hw.memory_limit_bytes is not None:
        available = min(available, hw.memory_limit_bytes) if available is not None else hw.memory_limit_bytes
    return _Budget(available, "RAM")


def _gpu_memory(hw: HardwareProfile, vendor: GpuVendor | None) -> _Budget:
    sizes = [g.memory_bytes for g in hw.gpus if vendor is None or g.vendor == vendor]
    known = [s for s in sizes if s is not None]
    usable = int(max(known) * GPU_MEMORY_USABLE) if known else None
    return _Budget(usable, "GPU memory", weights_only=True)


@dataclass(frozen=True, slots=True)
class _Placement:
    runtime: RuntimeChoice
    budget: _Budget


# --- rule 1: placements ----------------------------------------------------------------------


def _has_gpu(hw: HardwareProfile, vendor: GpuVendor) -> bool:
    return any(g.vendor == vendor for g in hw.gpus)


def _gguf_placements(hw: HardwareProfile) -> list[_Placement]:
    fmt = common_pb2.MODEL_FORMAT_GGUF
    found: list[_Placement] = []
    if hw.llama_gpu_offload:
        if _has_gpu(hw, GpuVendor.NVIDIA):
            found.append(_Placement(RuntimeChoice(fmt, CUDA, 2), _gpu_memory(hw, GpuVendor.NVIDIA)))
        elif hw.apple_silicon:
            found.append(_Placement(RuntimeChoice(fmt, METAL, 1), _ram(hw)))  # unified memory
        elif hw.gpus:
            found.append(_Placement(RuntimeChoice(fmt, GPU, 1), _gpu_memory(hw, None)))
    found.append(_Placement(RuntimeChoice(fmt, CPU, 0), _ram(hw)))
    return found


def _onnx_provider_usable(hw: HardwareProfile, needs: GpuVendor | str | None) -> bool:
    if isinstance(needs, GpuVendor):
        return _has_gpu(hw, needs)
    if needs == "apple":
        return hw.apple_silicon
    return True


def _onnx_placements(hw: HardwareProfile) -> list[_Placement]:
    fmt = common_pb2.MODEL_FORMAT_ONNX
    available = set(hw.onnx_providers or ())
    found: list[_Placement] = []
    for provider, needs in ONNX_PROVIDERS:
        if provider in available and _onnx_provider_usable(hw, needs):
            budget = _gpu_memory(hw, needs) if isinstance(needs, GpuVendor) else _ram(hw)
            found.append(_Placement(RuntimeChoice(fmt, provider, 2), budget))
            break
    found.append(_Placement(RuntimeChoice(fmt, ONNX_CPU, 0), _ram(hw)))
    return found


def _placements(variant: bundle_pb2.Variant, hw: HardwareProfile) -> list[_Placement] | str:
    """Where the variant could run, best first, or why it cannot run here at all."""
    if variant.format == common_pb2.MODEL_FORMAT_GGUF:
        return _gguf_placements(hw)
    if variant.format == common_pb2.MODEL_FORMAT_ONNX:
        return _onnx_placements(hw)
    if variant.format == common_pb2.MODEL_FORMAT_MLX:
        if not hw.apple_silicon:
            return "MLX needs Apple silicon"
        if not hw.mlx_available:
            return "MLX needs the mlx package, which is not installed"
        return [_Placement(RuntimeChoice(variant.format, MLX, 2), _ram(hw))]
    return f"no runtime knows format {format_name(variant.format)}"


# --- rules 1-2 for one variant ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Candidate:
    variant: bundle_pb2.Variant
    placement: _Placement
    note: str  # e.g. why the GPU placement was skipped, or that memory was not checked


def _evaluate(
    variant: bundle_pb2.Variant, hw: HardwareProfile, supported: Collection[int], n_ctx: int
) -> _Candidate | str:
    """The best placement where the variant fits (rules 1 and 2), or why there is none."""
    if variant.format not in supported:
        return f"no {format_name(variant.format)} runtime installed on this device"
    placements = _placements(variant, hw)
    if isinstance(placements, str):
        return placements
    misses: list[str] = []
    for placement in placements:
        budget = placement.budget
        needed = memory_needed(variant, n_ctx, weights_only=budget.weights_only)
        where = placement.runtime.accelerator
        if budget.bytes is None:
            return _Candidate(variant, placement, f"{budget.kind} unknown, not checked")
        if needed <= budget.bytes:
            return _Candidate(variant, placement, "; ".join(misses))
        misses.append(
            f"needs {_gib(needed)} on {where} (model + KV cache for n_ctx={n_ctx}), "
            f"{_gib(budget.bytes)} {budget.kind} available"
        )
    return "; ".join(misses)


# --- rules 3-4 -------------------------------------------------------------------------------


def _quality_key(c: _Candidate, by_perplexity: bool) -> tuple[int, int, int, str]:
    """Smaller is better: (perplexity, -bits, -size, id) or (0, -bits, -size, id)."""
    bits = quantization_bits(c.variant.quantization) or 0
    ppl = c.variant.perplexity_milli if by_perplexity else 0
    return (ppl, -bits, -c.variant.size_bytes, c.variant.id)


def _quality(c: _Candidate, by_perplexity: bool) -> str:
    if by_perplexity:
        return f"perplexity {c.variant.perplexity_milli / 1000:.3f}"
    bits = quantization_bits(c.variant.quantization)
    return f"{bits}-bit, {_gib(c.variant.size_bytes)}" if bits else _gib(c.variant.size_bytes)


def _label(variant: bundle_pb2.Variant) -> str:
    quant = f" {variant.quantization}" if variant.quantization else ""
    return f"{variant.id} ({format_name(variant.format)}{quant})"


def _rank(fitting: Sequence[_Candidate]) -> tuple[_Candidate, str, list[Rejection]]:
    """Rules 3 and 4: the winner, why it won, and why each other fitting variant lost."""
    top = max(c.placement.runtime.tier for c in fitting)
    tier = [c for c in fitting if c.placement.runtime.tier == top]
    by_perplexity = all(c.variant.perplexity_milli > 0 for c in tier)
    ordered = sorted(tier, key=lambda c: _quality_key(c, by_perplexity))
    best = ordered[0]
    why: list[str] = []
    if len(tier) < len(fitting):
        why.append(f"accelerator ({best.placement.runtime.accelerator}) preferred over CPU")
    if len(tier) > 1:
        criterion = "lowest perplexity" if by_perplexity else "highest bit width"
        why.append(f"{criterion} of {len(tier)} that fit ({_quality(best, by_perplexity)})")
    elif len(fitting) == 1:
        why.append("the only variant that fits")
    lost: list[Rejection] = []
    for c in fitting:
        if c is best:
            continue
        where = c.placement.runtime.accelerator
        if c.placement.runtime.tier < top:
            lost.append(Rejection(c.variant.id, f"fits on {where}, but an accelerated variant is preferred"))
        else:
            lost.append(
                Rejection(c.variant.id, f"fits on {where}, lower quality ({_quality(c, by_perplexity)})")
            )
    return best, ", ".join(why), lost


def select_variant(
    release: VerifiedRelease,
    *,
    hardware: HardwareProfile,
    supported_formats: Collection[int],
    n_ctx: int,
    pin: Pin | None = None,
) -> Selection:
    """Applies the module's rules; raises NoUsableVariant (PinNotHonoured under a pin) naming
    why each variant cannot run, so the operator sees every reason at once."""
    variants = list(release.manifest.variants)
    rejections: list[Rejection] = []
    considered = variants
    if pin is not None:
        considered = [v for v in variants if pin.admits(v)]
        if not considered:
            have = ", ".join(_label(v) for v in variants) or "none"
            raise PinNotHonoured(
                f"{pin.describe()}, but {release.name}@{release.version} has no such variant (it has: {have})"
            )
        rejections += [
            Rejection(v.id, f"not allowed: {pin.describe()}") for v in variants if not pin.admits(v)
        ]
    fitting: list[_Candidate] = []
    unusable: list[Rejection] = []
    for variant in considered:
        outcome = _evaluate(variant, hardware, supported_formats, n_ctx)
        if isinstance(outcome, str):
            unusable.append(Rejection(variant.id, outcome))
        else:
            fitting.append(outcome)
    if not fitting:
        listed = "; ".join(f"{r.variant_id}: {r.reason}" for r in unusable)
        if pin is not None:
            raise PinNotHonoured(f"{pin.describe()} cannot be honoured on this device: {listed}")
        raise NoUsableVariant(f"no variant of {release.name}@{release.version} can run here: {listed}")
    best, why, lost = _rank(fitting)
    if pin is not None:
        why = f"{pin.describe()}, " + why if why else pin.describe()
    reason = f"{_label(best.variant)} on {best.placement.runtime.describe()}: {why}"
    if best.note:
        reason += f" ({best.note})"
    all_rejections = tuple(rejections + unusable + lost)
    if unusable:
        reason += "; cannot run: " + "; ".join(f"{r.variant_id}: {r.reason}" for r in unusable)
    return Selection(
        variant=best.variant,
        runtime=best.placement.runtime,
        reason=reason,
        rejections=all_rejections,
        pin=pin,
    )
