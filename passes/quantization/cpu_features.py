"""What the host CPU offers int8 kernels, so quantization can say whether it will pay off here.

int8 matmul/conv beats fp32 on a CPU only when the CPU has an instruction that multiplies and
accumulates 8-bit integers into 32-bit sums in one step: VNNI (`avx512_vnni`, `avx_vnni`) or AMX
(`amx_int8`) on x86, the dot-product instructions (`asimddp`, and `i8mm`) on ARM. Without them
(e.g. an AVX2-only x86), runtimes emulate the int8 product with several instructions plus
quantize/dequantize overhead, and a statically or dynamically quantized model is often *slower*
than fp32; weight-only quantization (smaller file, float compute) or float16 is the better choice.

`detect_cpu()` reads `/proc/cpuinfo` on Linux (x86 `flags`, ARM `Features`; a flag counts only if
every core lists it) and falls back to `platform` information elsewhere, where it knows only what
the architecture guarantees (ARMv8-A always has Advanced SIMD; Apple silicon always has dot
product). `bench/quantization.py` imports `detect_cpu` and `CpuFeatures.to_json()`: keep both.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CpuFeatures", "detect_cpu", "parse_cpuinfo"]

# The flags worth knowing for quantization, spelled as Linux's /proc/cpuinfo spells them.
X86_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
ARM_FLAGS = ("asimd", "neon", "asimddp", "i8mm")

# Fastest first: the int8 instruction set a runtime would pick.
_INT8_KERNELS = (
    ("amx_int8", "AMX-INT8"),
    ("avx512_vnni", "AVX512-VNNI"),
    ("avx_vnni", "AVX-VNNI"),
    ("i8mm", "ARM I8MM"),
    ("asimddp", "ARM dot product"),
)

_ARM_MACHINES = ("aarch64", "arm64", "armv8l", "armv7l")


def _canonical_arch(machine: str) -> str:
    machine = machine.lower()
    if machine in ("x86_64", "amd64", "i686", "i386", "x86"):
        return "x86_64" if "64" in machine else "x86"
    if machine in ("aarch64", "arm64"):
        return "aarch64"
    if machine.startswith("arm"):
        return "arm"
    return machine or "unknown"


@dataclass(frozen=True)
class CpuFeatures:
    """The host's architecture and the quantization-relevant flags it reported.

    `flags` holds only names from `X86_FLAGS`/`ARM_FLAGS`; `source` says where they came from
    (`"/proc/cpuinfo"` or `"platform"`, the latter meaning most flags are unknown, not absent).
    """

    arch: str
    model_name: str = ""
    cores: int = 0
    flags: frozenset[str] = field(default_factory=frozenset)
    source: str = "platform"

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def int8_kernel(self) -> str | None:
        """The int8 multiply-accumulate instruction set a runtime would use, or None if none."""
        for flag, name in _INT8_KERNELS:
            if flag in self.flags:
                return name
        return None

    @property
    def fast_int8(self) -> bool:
        """True when int8 matmul/conv is expected to run faster than fp32 on this CPU."""
        return self.int8_kernel is not None

    @property
    def simd(self) -> str:
        """The widest float SIMD the CPU reported, for the one-line description."""
        for flag, name in (
            ("avx512f", "AVX-512"),
            ("avx2", "AVX2"),
            ("asimd", "NEON"),
            ("neon", "NEON"),
        ):
            if flag in self.flags:
                return name
        return "unknown SIMD" if self.source == "platform" else "no wide SIMD"

    def describe(self) -> str:
        """One line, e.g. `x86_64 (AMD EPYC 7B13, 2 cores): AVX2, no fast int8 (no VNNI/AMX)`."""
        details = ", ".join(
            part for part in (self.model_name, f"{self.cores} cores" if self.cores else "") if part
        )
        head = f"{self.arch} ({details})" if details else self.arch
        if self.int8_kernel is not None:
            int8 = f"fast int8 via {self.int8_kernel}"
        elif self.arch in ("aarch64", "arm"):
            int8 = "no fast int8 (no dot product)"
        elif self.arch.startswith("x86"):
            int8 = "no fast int8 (no VNNI/AMX)"
        else:
            int8 = "int8 speed unknown"
        if self.source == "platform":
            int8 += "; flags not readable, assumed from the architecture"
        return f"{head}: {self.simd}, {int8}"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (benchmarks embed it in their result line)."""
        return {
            "arch": self.arch,
            "model_name": self.model_name,
            "cores": self.cores,
            "flags": sorted(self.flags),
            "int8_kernel": self.int8_kernel,
            "fast_int8": self.fast_int8,
            "source": self.source,
        }


def parse_cpuinfo(text: str, machine: str | None = None) -> CpuFeatures:
    """Read the text of a Linux `/proc/cpuinfo`. `machine` (as `platform.machine()` gives it) is
    inferred from the text when omitted: x86 kernels list `flags`, ARM kernels list `Features`."""
    per_core_flags: list[set[str]] = []
    model_name = ""
    flag_key = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("flags", "features"):
            flag_key = flag_key or key
            per_core_flags.append(set(value.split()))
        elif key in ("model name", "hardware", "cpu model") and not model_name:
            model_name = " ".join(value.split())
    if machine is None:
        machine = {"flags": "x86_64", "features": "aarch64"}.get(flag_key or "", platform.machine())
    arch = _canonical_arch(machine)
    known = X86_FLAGS if arch.startswith("x86") else ARM_FLAGS
    common = set.intersection(*per_core_flags) if per_core_flags else set()
    flags = frozenset(flag for flag in known if flag in common)
    source = "/proc/cpuinfo" if per_core_flags else "platform"
    if not per_core_flags:
        flags = _assumed_flags(arch, platform.system())
    return CpuFeatures(arch, model_name, len(per_core_flags), flags, source)


def _assumed_flags(arch: str, system: str) -> frozenset[str]:
    """What an architecture guarantees when the flags cannot be read."""
    if arch == "aarch64":
        # Advanced SIMD is mandatory in ARMv8-A; every Apple silicon core has dot product (ARMv8.4).
        return frozenset({"asimd", "asimddp"}) if system == "Darwin" else frozenset({"asimd"})
    return frozenset()


def detect_cpu(cpuinfo_path: str | Path = "/proc/cpuinfo") -> CpuFeatures:
    """The host CPU's features: from `/proc/cpuinfo` where readable, else from `platform`."""
    machine = platform.machine()
    try:
        text = Path(cpuinfo_path).read_text(errors="replace")
    except OSError:
        text = ""
    if text.strip():
        return parse_cpuinfo(text, machine or None)
    arch = _canonical_arch(machine)
    name = platform.processor() or ""
    return CpuFeatures(arch, name, 0, _assumed_flags(arch, platform.system()), "platform")
