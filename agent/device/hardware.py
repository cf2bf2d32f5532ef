"""What this device can run: CPU, SIMD, memory, disk, GPUs and installed inference runtimes.

The runtime registry turns a ``HardwareProfile`` into a runtime choice, so detection must never
stop an agent from starting: every probe runs on its own, a failed probe leaves its fields
unknown (``None``, an empty tuple or ``False``) and says why in ``notes``. An operator who knows
better, or a test, replaces detection with a JSON file read by ``load_profile_override``.

Inference runtimes are looked up with ``importlib.util.find_spec`` and imported only inside the
probe, so importing this module never loads llama_cpp, onnxruntime or mlx; mlx is never imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import TypeVar

from edgefleet.agent.device.hardware_profile import (
    SCHEMA_VERSION,
    GpuInfo,
    GpuVendor,
    HardwareProfile,
    HardwareProfileError,
    load_profile_override,
)

__all__ = [
    "SCHEMA_VERSION",
    "GpuInfo",
    "GpuVendor",
    "HardwareProfile",
    "HardwareProfileError",
    "ProbeInputs",
    "detect_hardware",
    "load_profile_override",
    "usable_cpus",
]


_NVIDIA_SMI = ("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits")
_AMD_PCI_VENDOR = "0x1002"
_MIB = 1024 * 1024
# cgroup v1 reports "no limit" as a huge page-aligned number rather than a keyword.
_UNLIMITED_THRESHOLD = 1 << 60

# Exact SIMD flag names kept from /proc/cpuinfo; avx512*, amx*, asimd* and sve* are kept by prefix.
_SIMD_FLAGS = frozenset({"avx", "avx2", "avx_vnni", "fma", "f16c", "neon", "i8mm", "bf16"})
_SIMD_PREFIXES = ("avx512", "amx", "asimd", "sve")
# macOS reports SIMD support as hw.optional[.arm].<name>: 1; these names differ from Linux's.
_SYSCTL_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "avx1_0": "avx",
        "avx2_0": "avx2",
        "advsimd": "asimd",
        "feat_i8mm": "i8mm",
        "feat_bf16": "bf16",
        "feat_dotprod": "asimddp",
        "feat_fhm": "asimdfhm",
        "feat_sve": "sve",
    }
)


_T = TypeVar("_T")

# --- detection ---


def _run_command(argv: Sequence[str], timeout_s: float) -> str:
    """Runs a probe command; raises FileNotFoundError when absent, other errors when it fails."""
    done = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout_s, check=True, stdin=subprocess.DEVNULL
    )
    return done.stdout


@dataclass(frozen=True, slots=True)
class ProbeInputs:
    """Where detection looks. Production uses the defaults; tests point them at fakes."""

    system: str = field(default_factory=platform.system)
    machine: str = field(default_factory=platform.machine)
    proc_root: Path = Path("/proc")
    sys_root: Path = Path("/sys")
    run: Callable[[Sequence[str], float], str] = _run_command
    find_spec: Callable[[str], object | None] = importlib.util.find_spec
    import_module: Callable[[str], ModuleType] = importlib.import_module
    command_timeout_s: float = 5.0


def _attempt(notes: list[str], probe: str, fn: Callable[[], _T], fallback: _T) -> _T:
    """Runs one probe so that its failure costs only its own fields."""
    try:
        return fn()
    except Exception as exc:  # a probe must never take detection down with it
        notes.append(f"{probe}: {type(exc).__name__}: {exc}")
        return fallback


def _installed(inputs: ProbeInputs, module: str) -> bool:
    return inputs.find_spec(module) is not None


@dataclass(frozen=True, slots=True)
class _Cpu:
    model: str | None = None
    flags: tuple[str, ...] = ()
    physical_cores: int | None = None


def _keep_simd(flags: Sequence[str]) -> tuple[str, ...]:
    kept = {f for f in flags if f in _SIMD_FLAGS or f.startswith(_SIMD_PREFIXES)}
    if "asimd" in kept:
        kept.add("neon")  # AArch64 calls NEON "asimd"; one name lets callers ask once
    return tuple(sorted(kept))


def _parse_cpuinfo(text: str) -> _Cpu:
    """Reads model, SIMD flags and physical cores from /proc/cpuinfo (x86 and ARM layouts)."""
    model: str | None = None
    flags: list[str] | None = None
    cores: set[tuple[str, str]] = set()
    physical_id = "0"
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if model is None and key in ("model name", "Processor", "cpu model", "Model", "Hardware") and value:
            model = value
        elif flags is None and key in ("flags", "Features"):
            flags = value.split()
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
    return _Cpu(model=model, flags=_keep_simd(flags or []), physical_cores=len(cores) or None)


def _sysctl(inputs: ProbeInputs) -> dict[str, str]:
    out = inputs.run(("sysctl", "-a"), inputs.command_timeout_s)
    values: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    return values


def _cpu_from_sysctl(values: Mapping[str, str]) -> _Cpu:
    flags = []
    for key, value in values.items():
        if key.startswith("hw.optional.") and value == "1":
            name = key.rsplit(".", 1)[-1].lower()
            flags.append(_SYSCTL_ALIASES.get(name, name))
    physical = values.get("hw.physicalcpu", "")
    return _Cpu(
        model=values.get("machdep.cpu.brand_string") or None,
        flags=_keep_simd(flags),
        physical_cores=int(physical) if physical.isdigit() else None,
    )


def _probe_cpu(inputs: ProbeInputs, notes: list[str], sysctl: Mapping[str, str]) -> _Cpu:
    if inputs.system == "Linux":
        path = inputs.proc_root / "cpuinfo"
        try:
            cpu = _parse_cpuinfo(path.read_text(encoding="utf-8", errors="replace"))
        except OSError as exc:
            notes.append(f"cpu: cannot read {path}: {exc.strerror or exc}")
            cpu = _Cpu()
    elif inputs.system == "Darwin":
        cpu = _cpu_from_sysctl(sysctl)
    else:
        notes.append(f"cpu: SIMD flags are not detected on {inputs.system or 'this system'}")
        cpu = _Cpu(model=platform.processor() or None)
    return cpu


def _psutil_physical_cores(inputs: ProbeInputs) -> int | None:
    if not _installed(inputs, "psutil"):
        return None
    import psutil  # lazily: the agent extra installs it, a bare install may not

    return psutil.cpu_count(logical=False)


def usable_cpus() -> int:
    """The CPUs this process may run on, at least 1: the one figure the agent sizes its
    inference threads by, so a ``taskset`` or container CPU set is honoured everywhere.

    ``os.process_cpu_count`` (Python 3.13+, which also honours ``-X cpu_count``), else the
    affinity mask where the platform has one (Linux), else every logical CPU: macOS (the MLX
    target) and Windows have no ``sched_getaffinity``.
    """
    process_cpu_count = getattr(os, "process_cpu_count", None)
    if process_cpu_count is not None:
        count: int | None = process_cpu_count()
    elif hasattr(os, "sched_getaffinity"):
        count = len(os.sched_getaffinity(0))
    else:
        count = os.cpu_count()
    return max(1, count or 1)


@dataclass(frozen=True, slots=True)
class _Memory:
    total: int | None = None
    available: int | None = None


def _parse_meminfo(text: str) -> _Memory:
    kib: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        parts = value.split()
        if sep and parts and parts[0].isdigit():
            kib[key.strip()] = int(parts[0])
    total, available = kib.get("MemTotal"), kib.get("MemAvailable")
    return _Memory(
        total=total * 1024 if total is not None else None,
        available=available * 1024 if available is not None else None,
    )


def _probe_memory(inputs: ProbeInputs, notes: list[str], sysctl: Mapping[str, str]) -> _Memory:
    if _installed(inputs, "psutil"):
        import psutil

        vm = psutil.virtual_memory()
        return _Memory(total=int(vm.total), available=int(vm.available))
    if inputs.system == "Linux":
        path = inputs.proc_root / "meminfo"
        try:
            return _parse_meminfo(path.read_text(encoding="utf-8", errors="replace"))
        except OSError as exc:
            notes.append(f"memory: cannot read {path}: {exc.strerror or exc}")
            return _Memory()
    memsize = sysctl.get("hw.memsize", "")
    if memsize.isdigit():
        notes.append("memory: available RAM needs psutil on this system")
        return _Memory(total=int(memsize))
    notes.append(f"memory: not detected on {inputs.system or 'this system'} without psutil")
    return _Memory()


def _probe_memory_limit(inputs: ProbeInputs) -> int | None:
    """The cgroup memory limit (v2 first, then v1), None when there is none."""
    if inputs.system != "Linux":
        return None
    cgroup = inputs.sys_root / "fs" / "cgroup"
    for path in (cgroup / "memory.max", cgroup / "memory" / "memory.limit_in_bytes"):
        try:
            raw = path.read_text(encoding="ascii").strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < _UNLIMITED_THRESHOLD:
            return int(raw)
        return None
    return None


def _probe_disk(disk_path: Path, notes: list[str]) -> int | None:
    """Free bytes on the filesystem that holds ``disk_path`` or would hold it once created."""
    target = disk_path.absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    if target != disk_path.absolute():
        notes.append(f"disk: {disk_path} does not exist; measured {target}")
    return shutil.disk_usage(target).free


def _parse_nvidia_smi(out: str) -> list[GpuInfo]:
    gpus = []
    for line in filter(str.strip, out.splitlines()):
        name, memory, driver = (part.strip() for part in line.rsplit(",", 2))
        mib = int(float(memory)) if memory.replace(".", "", 1).isdigit() else None  # "[N/A]" on some boards
        gpus.append(GpuInfo(GpuVendor.NVIDIA, name, None if mib is None else mib * _MIB, driver or None))
    return gpus


def _probe_nvidia(inputs: ProbeInputs, notes: list[str]) -> list[GpuInfo]:
    try:
        out = inputs.run(_NVIDIA_SMI, inputs.command_timeout_s)
    except FileNotFoundError:
        return []  # no NVIDIA driver tools: the common case, not worth a note
    except subprocess.TimeoutExpired:
        notes.append(f"nvidia: nvidia-smi did not answer within {inputs.command_timeout_s:g}s")
        return []
    except subprocess.CalledProcessError as exc:
        detail = (exc.stdout or exc.stderr or "").strip().splitlines()
        notes.append(
            f"nvidia: nvidia-smi exited with {exc.returncode}" + (f": {detail[0]}" if detail else "")
        )
        return []
    return _parse_nvidia_smi(out)


def _read_optional(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip() or None
    except OSError:
        return None


def _probe_amd(inputs: ProbeInputs) -> list[GpuInfo]:
    """AMD GPUs from /sys/class/drm: a directory listing, no driver tools needed."""
    if inputs.system != "Linux":
        return []
    drm = inputs.sys_root / "class" / "drm"
    if not drm.is_dir():
        return []
    gpus = []
    for card in sorted(drm.iterdir()):
        # cardN is the device; cardN-HDMI-A-1 and friends are its connectors.
        if not (card.name.startswith("card") and card.name[4:].isdigit()):
            continue
        device = card / "device"
        if _read_optional(device / "vendor") != _AMD_PCI_VENDOR:
            continue
        vram = _read_optional(device / "mem_info_vram_total")
        pci_id = _read_optional(device / "device") or "unknown device"
        gpus.append(
            GpuInfo(
                vendor=GpuVendor.AMD,
                name=_read_optional(device / "product_name") or f"AMD GPU {pci_id}",
                memory_bytes=int(vram) if vram is not None and vram.isdigit() else None,
                driver_version=_read_optional(inputs.sys_root / "module" / "amdgpu" / "version"),
            )
        )
    return gpus


def _probe_apple_silicon(inputs: ProbeInputs, notes: list[str], sysctl: Mapping[str, str]) -> bool:
    if inputs.system != "Darwin":
        return False
    if inputs.machine == "arm64":
        return True
    if sysctl.get("sysctl.proc_translated") == "1":
        notes.append("apple silicon: this Python runs under Rosetta; a native arm64 Python is faster")
        return True
    return False


ONNX_PROVIDERS_PROBE = "import json, onnxruntime; print(json.dumps(onnxruntime.get_available_providers()))"
ONNX_PROBE_TIMEOUT_S = 60.0


def _probe_onnx(inputs: ProbeInputs) -> tuple[str, ...] | None:
    """Asks a child Python: importing onnxruntime here would cost the agent tens of MB of
    resident memory for good, even on a device that never loads an ONNX variant."""
    if not _installed(inputs, "onnxruntime"):
        return None
    listed = json.loads(inputs.run([sys.executable, "-c", ONNX_PROVIDERS_PROBE], ONNX_PROBE_TIMEOUT_S))
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        raise ValueError(f"onnxruntime listed providers as {listed!r}")
    return tuple(listed)


def _probe_llama(inputs: ProbeInputs) -> bool | None:
    if not _installed(inputs, "llama_cpp"):
        return None
    llama_cpp = inputs.import_module("llama_cpp")
    return bool(llama_cpp.llama_supports_gpu_offload())


def detect_hardware(*, disk_path: Path | str = "/", inputs: ProbeInputs | None = None) -> HardwareProfile:
    """Probes this device; never raises: what a probe cannot tell stays unknown and is noted.

    ``disk_path`` should be where bundles will be stored (the agent's state directory), since
    that filesystem's free space is what limits which bundle fits.
    """
    src = inputs or ProbeInputs()
    notes: list[str] = []
    no_values: dict[str, str] = {}
    sysctl = (
        _attempt(notes, "sysctl", lambda: _sysctl(src), no_values) if src.system == "Darwin" else no_values
    )
    cpu = _attempt(notes, "cpu", lambda: _probe_cpu(src, notes, sysctl), _Cpu())
    memory = _attempt(notes, "memory", lambda: _probe_memory(src, notes, sysctl), _Memory())
    no_gpus: list[GpuInfo] = []
    nvidia = _attempt(notes, "nvidia", lambda: _probe_nvidia(src, notes), no_gpus)
    amd = _attempt(notes, "amd", lambda: _probe_amd(src), no_gpus)
    return HardwareProfile(
        arch=src.machine or "unknown",
        system=src.system or "unknown",
        cpu_model=cpu.model,
        cpu_flags=cpu.flags,
        logical_cores=_attempt(notes, "cores", os.cpu_count, None),
        usable_cores=_attempt(notes, "cores", usable_cpus, None),
        physical_cores=_attempt(notes, "cores", lambda: _psutil_physical_cores(src), None)
        or cpu.physical_cores,
        ram_total_bytes=memory.total,
        ram_available_bytes=memory.available,
        memory_limit_bytes=_attempt(notes, "memory limit", lambda: _probe_memory_limit(src), None),
        disk_path=str(disk_path),
        disk_free_bytes=_attempt(notes, "disk", lambda: _probe_disk(Path(disk_path), notes), None),
        gpus=tuple(nvidia + amd),
        apple_silicon=_attempt(
            notes, "apple silicon", lambda: _probe_apple_silicon(src, notes, sysctl), False
        ),
        onnx_providers=_attempt(notes, "onnxruntime", lambda: _probe_onnx(src), None),
        llama_gpu_offload=_attempt(notes, "llama_cpp", lambda: _probe_llama(src), None),
        mlx_available=_attempt(notes, "mlx", lambda: _installed(src, "mlx"), False),
        notes=tuple(notes),
    )
