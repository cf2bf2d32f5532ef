"""Hardware detection: real values on this machine, and never an exception when probes fail."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from edgefleet.agent.device.hardware import (
    GpuInfo,
    GpuVendor,
    HardwareProfile,
    HardwareProfileError,
    ProbeInputs,
    detect_hardware,
    load_profile_override,
)

ARM_CPUINFO = """\
processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm \
lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm sve2 i8mm bf16
CPU implementer\t: 0x41
CPU part\t: 0xd40

processor\t: 1
Features\t: fp asimd
"""

X86_CPUINFO = """\
processor\t: 0
model name\t: Test CPU @ 3.00GHz
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse sse2 avx avx2 fma f16c avx512f avx512_vnni amx_tile fma4 ht

processor\t: 1
model name\t: Test CPU @ 3.00GHz
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse sse2 avx avx2 fma f16c avx512f avx512_vnni amx_tile fma4 ht

processor\t: 2
model name\t: Test CPU @ 3.00GHz
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu sse sse2 avx avx2 fma f16c avx512f avx512_vnni amx_tile fma4 ht
"""

MEMINFO = "MemTotal:        2048000 kB\nMemFree:          100000 kB\nMemAvailable:    1024000 kB\n"

DARWIN_SYSCTL = """\
hw.memsize: 17179869184
hw.physicalcpu: 8
hw.optional.neon: 1
hw.optional.AdvSIMD: 1
hw.optional.arm.FEAT_I8MM: 0
hw.optional.arm.FEAT_BF16: 1
hw.optional.floatingpoint: 1
machdep.cpu.brand_string: Apple M2
"""


def _absent(argv: Sequence[str], timeout_s: float) -> str:
    raise FileNotFoundError(2, "No such file or directory", argv[0])


def _finds_nothing(name: str) -> object | None:
    return None


def _finds_only(*present: str) -> Callable[[str], object | None]:
    return lambda name: object() if name in present else None


def _answers(outputs: dict[str, str]) -> Callable[[Sequence[str], float], str]:
    """A command runner that knows a few commands by their program name."""

    def run(argv: Sequence[str], timeout_s: float) -> str:
        if argv[0] not in outputs:
            raise FileNotFoundError(2, "No such file or directory", argv[0])
        return outputs[argv[0]]

    return run


def _fake_proc(tmp_path: Path, cpuinfo: str, meminfo: str = MEMINFO) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cpuinfo").write_text(cpuinfo)
    (proc / "meminfo").write_text(meminfo)
    return proc


def _bare_linux(tmp_path: Path, **overrides: object) -> ProbeInputs:
    """A Linux host with nothing readable, no tools and no optional modules, unless overridden."""
    values: dict[str, object] = {
        "system": "Linux",
        "machine": "x86_64",
        "proc_root": tmp_path / "no-proc",
        "sys_root": tmp_path / "no-sys",
        "run": _absent,
        "find_spec": _finds_nothing,
    }
    values.update(overrides)
    return ProbeInputs(**values)  # type: ignore[arg-type]


def test_detects_this_machine(tmp_path: Path) -> None:
    profile = detect_hardware(disk_path=tmp_path)

    assert profile.arch == platform.machine()
    assert profile.system == platform.system()
    assert profile.ram_total_bytes is not None
    assert profile.ram_total_bytes > 0
    assert profile.ram_available_bytes is not None
    assert 0 < profile.ram_available_bytes <= profile.ram_total_bytes
    assert profile.logical_cores is not None
    assert profile.logical_cores >= 1
    assert profile.usable_cores is not None
    assert 1 <= profile.usable_cores <= profile.logical_cores
    assert profile.physical_cores is None or 1 <= profile.physical_cores <= profile.logical_cores
    assert profile.disk_path == str(tmp_path)
    assert profile.disk_free_bytes is not None
    assert profile.disk_free_bytes > 0
    assert profile.cpu_flags == tuple(sorted(set(profile.cpu_flags)))
    json.dumps(profile.to_dict())


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux /proc/cpuinfo")
def test_simd_flags_come_from_this_cpu() -> None:
    text = Path("/proc/cpuinfo").read_text()
    lines = [line for line in text.splitlines() if line.startswith(("flags", "Features"))]
    raw = lines[0].split(":", 1)[1].split() if lines else []
    flags = detect_hardware().cpu_flags

    assert set(flags) - {"neon"} <= set(raw)
    for expected in ("avx", "avx2", "fma", "f16c", "avx512f", "asimd", "sve"):
        assert (expected in flags) == (expected in raw)


def test_import_loads_no_runtime() -> None:
    code = (
        "import sys, edgefleet.agent.device.hardware as h\n"
        "loaded = [m for m in ('llama_cpp', 'onnxruntime', 'mlx') if m in sys.modules]\n"
        "h.detect_hardware()\n"
        "print(loaded, 'mlx' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[] False"


def test_nothing_to_probe_still_returns_a_profile(tmp_path: Path) -> None:
    profile = detect_hardware(disk_path=tmp_path, inputs=_bare_linux(tmp_path))

    assert profile.arch == "x86_64"
    assert profile.cpu_model is None
    assert profile.cpu_flags == ()
    assert profile.ram_total_bytes is None
    assert profile.ram_available_bytes is None
    assert profile.gpus == ()
    assert profile.onnx_providers is None
    assert profile.llama_gpu_offload is None
    assert profile.mlx_available is False
    assert profile.disk_free_bytes is not None  # the disk probe does not depend on /proc
    assert profile.logical_cores is not None
    assert profile.logical_cores >= 1
    assert any("cpuinfo" in note for note in profile.notes)
    assert any("meminfo" in note for note in profile.notes)
    assert not any("nvidia" in note for note in profile.notes)  # no nvidia-smi is normal
    json.dumps(profile.to_dict())


def test_every_probe_failing_is_noted_not_raised(tmp_path: Path) -> None:
    def broken_run(argv: Sequence[str], timeout_s: float) -> str:
        raise RuntimeError("exec failed")

    def broken_find_spec(name: str) -> object | None:
        raise ImportError(f"cannot look up {name}")

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    inputs = _bare_linux(
        tmp_path, proc_root=not_a_dir, sys_root=not_a_dir, run=broken_run, find_spec=broken_find_spec
    )

    profile = detect_hardware(disk_path=tmp_path, inputs=inputs)

    notes = "\n".join(profile.notes)
    for probe in ("cpu", "memory", "nvidia", "onnxruntime", "llama_cpp", "mlx"):
        assert f"{probe}:" in notes
    assert profile.disk_free_bytes is not None


def test_nvidia_smi_timeout_and_failure_are_noted(tmp_path: Path) -> None:
    def slow(argv: Sequence[str], timeout_s: float) -> str:
        raise subprocess.TimeoutExpired(list(argv), timeout_s)

    def failing(argv: Sequence[str], timeout_s: float) -> str:
        raise subprocess.CalledProcessError(9, list(argv), output="NVIDIA-SMI has failed\nmore\n")

    slow_profile = detect_hardware(inputs=_bare_linux(tmp_path, run=slow, command_timeout_s=0.5))
    failing_profile = detect_hardware(inputs=_bare_linux(tmp_path, run=failing))

    assert slow_profile.gpus == ()
    assert failing_profile.gpus == ()
    assert "nvidia: nvidia-smi did not answer within 0.5s" in slow_profile.notes
    assert "nvidia: nvidia-smi exited with 9: NVIDIA-SMI has failed" in failing_profile.notes


def test_nvidia_gpus_are_parsed(tmp_path: Path) -> None:
    seen: list[Sequence[str]] = []

    def run(argv: Sequence[str], timeout_s: float) -> str:
        seen.append(argv)
        return "NVIDIA GeForce RTX 3090, 24576, 535.104.05\nTesla T4, [N/A], 535.54\n\n"

    profile = detect_hardware(inputs=_bare_linux(tmp_path, run=run))

    assert profile.gpus == (
        GpuInfo(GpuVendor.NVIDIA, "NVIDIA GeForce RTX 3090", 24576 * 1024 * 1024, "535.104.05"),
        GpuInfo(GpuVendor.NVIDIA, "Tesla T4", None, "535.54"),
    )
    assert seen[0][0] == "nvidia-smi"
    assert "--format=csv,noheader,nounits" in seen[0]


def test_x86_cpuinfo_and_meminfo_fallback(tmp_path: Path) -> None:
    inputs = _bare_linux(tmp_path, proc_root=_fake_proc(tmp_path, X86_CPUINFO))

    profile = detect_hardware(inputs=inputs)

    assert profile.cpu_model == "Test CPU @ 3.00GHz"
    assert profile.cpu_flags == ("amx_tile", "avx", "avx2", "avx512_vnni", "avx512f", "f16c", "fma")
    assert profile.physical_cores == 2
    assert profile.ram_total_bytes == 2048000 * 1024
    assert profile.ram_available_bytes == 1024000 * 1024
    assert profile.notes == ()


def test_arm_cpuinfo_reports_neon_and_sve(tmp_path: Path) -> None:
    inputs = _bare_linux(tmp_path, machine="aarch64", proc_root=_fake_proc(tmp_path, ARM_CPUINFO))

    profile = detect_hardware(inputs=inputs)

    assert profile.arch == "aarch64"
    assert {"neon", "asimd", "asimddp", "asimdhp", "sve", "sve2", "i8mm", "bf16"} <= set(profile.cpu_flags)
    assert "aes" not in profile.cpu_flags
    assert profile.cpu_model is None
    assert profile.physical_cores is None


def test_amd_gpus_from_drm(tmp_path: Path) -> None:
    drm = tmp_path / "sys" / "class" / "drm"
    for card, vendor in (("card0", "0x1002"), ("card1", "0x8086"), ("card0-DP-1", "0x1002")):
        (drm / card / "device").mkdir(parents=True)
        (drm / card / "device" / "vendor").write_text(vendor + "\n")
    (drm / "card0" / "device" / "device").write_text("0x744c\n")
    (drm / "card0" / "device" / "mem_info_vram_total").write_text("25753026560\n")

    profile = detect_hardware(inputs=_bare_linux(tmp_path, sys_root=tmp_path / "sys"))

    assert profile.gpus == (GpuInfo(GpuVendor.AMD, "AMD GPU 0x744c", 25753026560, None),)


@pytest.mark.parametrize(
    ("relative", "content", "expected"),
    [
        ("memory.max", "2147483648\n", 2147483648),
        ("memory.max", "max\n", None),
        ("memory/memory.limit_in_bytes", "9223372036854771712\n", None),
        ("memory/memory.limit_in_bytes", "536870912\n", 536870912),
    ],
)
def test_cgroup_memory_limit(tmp_path: Path, relative: str, content: str, expected: int | None) -> None:
    path = tmp_path / "sys" / "fs" / "cgroup" / relative
    path.parent.mkdir(parents=True)
    path.write_text(content)

    profile = detect_hardware(inputs=_bare_linux(tmp_path, sys_root=tmp_path / "sys"))

    assert profile.memory_limit_bytes == expected


def test_apple_silicon_from_sysctl(tmp_path: Path) -> None:
    inputs = _bare_linux(tmp_path, system="Darwin", machine="arm64", run=_answers({"sysctl": DARWIN_SYSCTL}))

    profile = detect_hardware(inputs=inputs)

    assert profile.apple_silicon is True
    assert profile.cpu_model == "Apple M2"
    assert profile.cpu_flags == ("asimd", "bf16", "neon")
    assert profile.physical_cores == 8
    assert profile.ram_total_bytes == 17179869184
    assert profile.ram_available_bytes is None


def test_rosetta_is_still_apple_silicon(tmp_path: Path) -> None:
    sysctl = DARWIN_SYSCTL + "sysctl.proc_translated: 1\n"
    inputs = _bare_linux(tmp_path, system="Darwin", machine="x86_64", run=_answers({"sysctl": sysctl}))

    profile = detect_hardware(inputs=inputs)

    assert profile.apple_silicon is True
    assert any("Rosetta" in note for note in profile.notes)


def test_runtime_probes_are_isolated(tmp_path: Path) -> None:
    def gpu_offload() -> bool:
        raise OSError("libllama.so: cannot open shared object file")

    modules = {"llama_cpp": SimpleNamespace(llama_supports_gpu_offload=gpu_offload)}
    imported: list[str] = []

    def import_module(name: str) -> ModuleType:
        imported.append(name)
        return modules[name]  # type: ignore[return-value]

    def run(argv: Sequence[str], timeout_s: float) -> str:
        assert argv[0] == sys.executable and "onnxruntime" in argv[-1]
        return '["CUDAExecutionProvider", "CPUExecutionProvider"]'

    inputs = _bare_linux(
        tmp_path,
        find_spec=_finds_only("onnxruntime", "llama_cpp", "mlx"),
        import_module=import_module,
        run=run,
    )

    profile = detect_hardware(inputs=inputs)

    assert profile.onnx_providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert profile.llama_gpu_offload is None
    assert any(note.startswith("llama_cpp: OSError: libllama.so") for note in profile.notes)
    assert profile.mlx_available is True
    # onnxruntime is asked in a child process and mlx only looked up: neither is imported here.
    assert imported == ["llama_cpp"]


def test_missing_disk_path_measures_the_nearest_parent(tmp_path: Path) -> None:
    profile = detect_hardware(disk_path=tmp_path / "state" / "not-yet", inputs=_bare_linux(tmp_path))

    assert profile.disk_free_bytes is not None
    assert profile.disk_free_bytes > 0
    assert any(f"measured {tmp_path}" in note for note in profile.notes)


def test_override_round_trip(tmp_path: Path) -> None:
    detected = detect_hardware(disk_path=tmp_path)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(detected.to_dict()))

    assert load_profile_override(path) == detected


def test_override_round_trip_with_gpus(tmp_path: Path) -> None:
    profile = HardwareProfile(
        arch="aarch64",
        system="Linux",
        cpu_flags=("asimd", "neon"),
        gpus=(GpuInfo(GpuVendor.NVIDIA, "Orin", 8 << 30, "540.4"), GpuInfo(GpuVendor.AMD, "MI300X")),
        onnx_providers=("TensorrtExecutionProvider", "CUDAExecutionProvider"),
        llama_gpu_offload=True,
        notes=("hand-written",),
    )
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile.to_dict()))

    assert load_profile_override(path) == profile


def test_partial_override_leaves_the_rest_unknown(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text('{"arch": "aarch64", "ram_total_bytes": 4294967296, "gpus": []}')

    profile = load_profile_override(path)

    assert profile == HardwareProfile(arch="aarch64", ram_total_bytes=4294967296)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "is not valid JSON"),
        (b"[]", "must be a JSON object, not list"),
        (b'{"ram_total": 1}', "unknown key(s) ram_total"),
        (b'{"ram_total_bytes": "lots"}', "ram_total_bytes: expected a non-negative integer"),
        (b'{"ram_total_bytes": -1}', "ram_total_bytes: expected a non-negative integer"),
        (b'{"logical_cores": true}', "logical_cores: expected a non-negative integer"),
        (b'{"apple_silicon": "yes"}', "apple_silicon: expected true or false"),
        (b'{"cpu_flags": "avx avx2"}', "cpu_flags: expected a list of strings"),
        (b'{"cpu_flags": ["avx", 2]}', "cpu_flags[1]: expected a string"),
        (b'{"gpus": [{"vendor": "intel", "name": "Arc"}]}', "gpus[0].vendor: 'intel' is not one of"),
        (b'{"gpus": [{"vendor": "amd"}]}', "gpus[0]: missing 'name'"),
        (b'{"gpus": [{"vendor": "amd", "name": "x", "vram": 1}]}', "gpus[0]: unknown key(s) vram"),
        (b'{"schema_version": 2}', "schema_version 2 is not supported"),
        (b"\xff\xfe{}", "cannot read hardware profile override"),
    ],
)
def test_bad_override_is_a_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "profile.json"
    path.write_bytes(content)

    with pytest.raises(HardwareProfileError) as caught:
        load_profile_override(path)

    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_missing_override_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"

    with pytest.raises(HardwareProfileError, match="cannot read hardware profile override"):
        load_profile_override(path)
