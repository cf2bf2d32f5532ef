"""What this device can run: CPU, SIMD, memory, disk, GPUs and installed inference runtimes.

The runtime registry turns a ``HardwareProfile`` into a runtime choice, so detection must never
stop an agent from starting: every probe runs on its own, a failed probe leaves its fields
unknown (``None``, an empty tuple or ``False``) and says why in ``notes``. An operator who knows
better, or a test, replaces detection with a JSON file read by ``load_profile_override``.

Inference runtimes are looked up with ``importlib.util.find_spec`` and imported only inside the
probe, so importing this module never loads llama_cpp, onnxruntime or mlx; mlx is never imported.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import TypeVar

SCHEMA_VERSION = 1

_T = TypeVar("_T")

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


class HardwareProfileError(ValueError):
    """A hardware profile override that cannot be used; fatal: the operator must fix the file."""


class GpuVendor(enum.StrEnum):
    NVIDIA = "nvidia"
    AMD = "amd"


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU; memory and driver are None when the probe could not tell."""

    vendor: GpuVendor
    name: str
    memory_bytes: int | None = None
    driver_version: str | None = None


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    """Everything runtime selection needs to know about the device, unknowns included.

    Sizes are in bytes. ``usable_cores`` is what this process may run on (CPU affinity), which
    is what a runtime should size its thread pool by; ``memory_limit_bytes`` is the cgroup
    limit, which caps a model's size inside a container regardless of ``ram_total_bytes``.
    ``onnx_providers`` and ``llama_gpu_offload`` are None when the runtime is not installed.
    """

    arch: str = "unknown"
    system: str = "unknown"
    cpu_model: str | None = None
    cpu_flags: tuple[str, ...] = ()
    logical_cores: int | None = None
    usable_cores: int | None = None
    physical_cores: int | None = None
    ram_total_bytes: int | None = None
    ram_available_bytes: int | None = None
    memory_limit_bytes: int | None = None
    disk_path: str | None = None
    disk_free_bytes: int | None = None
    gpus: tuple[GpuInfo, ...] = ()
    apple_silicon: bool = False
    onnx_providers: tuple[str, ...] | None = None
    llama_gpu_offload: bool | None = None
    mlx_available: bool = False
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """A JSON-able form; ``from_dict`` reads it back, so it doubles as the override format."""
        out: dict[str, object] = {"schema_version": SCHEMA_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out["gpus"] = [{**asdict(g), "vendor": g.vendor.value} for g in self.gpus]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, object], *, source: str = "profile") -> HardwareProfile:
        """Builds a profile from ``to_dict`` output; missing keys are unknown, wrong ones are errors.

        Unknown keys are rejected rather than ignored: this is a file a person edits, and a
        misspelt key silently falling back to "unknown" would be worse than a clear error.
        """
        unknown = sorted(set(data) - set(_FIELD_PARSERS) - {"schema_version"})
        if unknown:
            raise HardwareProfileError(
                f"{source}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(_FIELD_PARSERS)}"
            )
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise HardwareProfileError(
                f"{source}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})"
            )
        values = {
            name: parse(data[name], f"{source}: {name}")
            for name, parse in _FIELD_PARSERS.items()
            if name in data
        }
        return cls(**values)  # type: ignore[arg-type]  # each parser returns its field's type


def load_profile_override(path: Path) -> HardwareProfile:
    """Reads a JSON hardware profile that replaces detection, or raises HardwareProfileError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HardwareProfileError(f"cannot read hardware profile override {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HardwareProfileError(
            f"hardware profile override {path} is not valid JSON: {exc.msg} "
            f"(line {exc.lineno}, column {exc.colno})"
        ) from exc
    if not isinstance(data, dict):
        raise HardwareProfileError(
            f"hardware profile override {path} must be a JSON object, not {type(data).__name__}"
        )
    return HardwareProfile.from_dict(data, source=str(path))


# --- override parsing: one parser per field, so validation is a table, not a chain of ifs ---


def _optional(parse: Callable[[object, str], _T]) -> Callable[[object, str], _T | None]:
    """JSON null means "unknown" for every optional field."""
    return lambda value, where: None if value is None else parse(value, where)


def _parse_str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise HardwareProfileError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _parse_bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise HardwareProfileError(f"{where}: expected true or false, got {type(value).__name__}")
    return value


def _parse_opt_count(value: object, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise HardwareProfileError(f"{where}: expected a non-negative integer or null, got {value!r}")
    return value


def _parse_str_tuple(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise HardwareProfileError(f"{where}: expected a list of strings, got {type(value).__name__}")
    return tuple(_parse_str(item, f"{where}[{i}]") for i, item in enumerate(value))


def _parse_gpu(value: object, where: str) -> GpuInfo:
    if not isinstance(value, dict):
        raise HardwareProfileError(f"{where}: expected an object, got {type(value).__name__}")
    unknown = sorted(set(value) - {"vendor", "name", "memory_bytes", "driver_version"})
    if unknown:
        raise HardwareProfileError(f"{where}: unknown key(s) {', '.join(unknown)}")
    for required in ("vendor", "name"):
        if required not in value:
            raise HardwareProfileError(f"{where}: missing {required!r}")
    vendor = _parse_str(value["vendor"], f"{where}.vendor")
    try:
        parsed_vendor = GpuVendor(vendor)
    except ValueError:
        choices = ", ".join(v.value for v in GpuVendor)
        raise HardwareProfileError(f"{where}.vendor: {vendor!r} is not one of {choices}") from None
    return GpuInfo(
        vendor=parsed_vendor,
        name=_parse_str(value["name"], f"{where}.name"),
        memory_bytes=_parse_opt_count(value.get("memory_bytes"), f"{where}.memory_bytes"),
        driver_version=_optional(_parse_str)(value.get("driver_version"), f"{where}.driver_version"),
    )


def _parse_gpus(value: object, where: str) -> tuple[GpuInfo, ...]:
    if not isinstance(value, list):
        raise HardwareProfileError(f"{where}: expected a list, got {type(value).__name__}")
    return tuple(_parse_gpu(item, f"{where}[{i}]") for i, item in enumerate(value))


_FIELD_PARSERS: Mapping[str, Callable[[object, str], object]] = MappingProxyType(
    {
        "arch": _parse_str,
        "system": _parse_str,
        "cpu_model": _optional(_parse_str),
        "cpu_flags": _parse_str_tuple,
        "logical_cores": _parse_opt_count,
        "usable_cores": _parse_opt_count,
        "physical_cores": _parse_opt_count,
        "ram_total_bytes": _parse_opt_count,
        "ram_available_bytes": _parse_opt_count,
        "memory_limit_bytes": _parse_opt_count,
        "disk_path": _optional(_parse_str),
        "disk_free_bytes": _parse_opt_count,
        "gpus": _parse_gpus,
        "apple_silicon": _parse_bool,
        "onnx_providers": _optional(_parse_str_tuple),
        "llama_gpu_offload": _optional(_parse_bool),
        "mlx_available": _parse_bool,
        "notes": _parse_str_tuple,
    }
)


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


def _usable_cores() -> int | None:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or None
    return os.cpu_count()


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


def _probe_onnx(inputs: ProbeInputs) -> tuple[str, ...] | None:
    if not _installed(inputs, "onnxruntime"):
        return None
    onnxruntime = inputs.import_module("onnxruntime")
    return tuple(str(p) for p in onnxruntime.get_available_providers())


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
        usable_cores=_attempt(notes, "cores", _usable_cores, None),
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
