"""The hardware profile: what detection found, as a typed value, and the JSON override file.

An operator who knows better, or a test, replaces detection with a JSON file read by
``load_profile_override``; every field is validated and a bad file names the key at fault.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

SCHEMA_VERSION = 1

_T = TypeVar("_T")


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
