"""cpu_features (passes/quantization/cpu_features.py): the flags read from fake /proc/cpuinfo texts
of a VNNI x86, an AVX2-only x86, an AMX x86 and ARM machines with and without dot product; a flag
missing on one core is not claimed; the platform fallback; the JSON and one-line forms."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from graphopt.passes.quantization import cpu_features
from graphopt.passes.quantization.cpu_features import (
    ARM_FLAGS,
    X86_FLAGS,
    CpuFeatures,
    detect_cpu,
    parse_cpuinfo,
)

X86_COMMON = "fpu vme de pse tsc msr pae mce cx8 apic sep sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c"


def _x86(
    extra: str, cores: int = 2, model: str = "Intel(R) Xeon(R) Platinum 8380 CPU @ 2.30GHz"
) -> str:
    return "\n\n".join(
        f"processor\t: {i}\nvendor_id\t: GenuineIntel\nmodel name\t: {model}\n"
        f"flags\t\t: {X86_COMMON} {extra}\nbugs\t\t: spectre_v1\n"
        for i in range(cores)
    )


def _arm(features: str, cores: int = 4) -> str:
    return "\n\n".join(
        f"processor\t: {i}\nBogoMIPS\t: 243.75\nFeatures\t: {features}\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd0c\n"
        for i in range(cores)
    )


VNNI = _x86("avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16")
AVX2_ONLY = _x86("avx2 bmi1 bmi2 sha_ni", model="AMD EPYC 7B13")
AMX = _x86("avx2 avx512f avx512_vnni avx_vnni amx_bf16 amx_tile amx_int8")
NEOVERSE_N1 = _arm("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                   "asimdrdm lrcpc dcpop asimddp ssbs")  # fmt: skip
CORTEX_A72 = _arm("fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid")
GRAVITON3 = _arm("fp asimd asimddp sve i8mm bf16 sb paca pacg dcpodp sve2")


def test_vnni_machine_is_fast_int8() -> None:
    cpu = parse_cpuinfo(VNNI)
    assert cpu.arch == "x86_64"
    assert cpu.flags == {"avx2", "avx512f", "avx512_vnni"}
    assert cpu.fast_int8 and cpu.int8_kernel == "AVX512-VNNI"
    assert cpu.cores == 2 and cpu.model_name.startswith("Intel(R) Xeon(R) Platinum 8380")
    assert cpu.describe() == (
        "x86_64 (Intel(R) Xeon(R) Platinum 8380 CPU @ 2.30GHz, 2 cores): AVX-512, "
        "fast int8 via AVX512-VNNI"
    )


def test_avx2_only_machine_is_not_fast_int8() -> None:
    cpu = parse_cpuinfo(AVX2_ONLY)
    assert cpu.flags == {"avx2"}
    assert not cpu.fast_int8 and cpu.int8_kernel is None
    assert cpu.describe() == "x86_64 (AMD EPYC 7B13, 2 cores): AVX2, no fast int8 (no VNNI/AMX)"


def test_amx_is_preferred_over_vnni() -> None:
    cpu = parse_cpuinfo(AMX)
    assert {"amx_int8", "amx_tile", "avx_vnni", "avx512_vnni"} <= cpu.flags
    assert cpu.int8_kernel == "AMX-INT8"


def test_arm_with_dot_product() -> None:
    cpu = parse_cpuinfo(NEOVERSE_N1)
    assert cpu.arch == "aarch64" and cpu.cores == 4
    assert cpu.flags == {"asimd", "asimddp"}
    assert cpu.fast_int8 and cpu.int8_kernel == "ARM dot product"
    assert cpu.describe() == "aarch64 (4 cores): NEON, fast int8 via ARM dot product"
    assert parse_cpuinfo(GRAVITON3).int8_kernel == "ARM I8MM"


def test_arm_without_dot_product() -> None:
    cpu = parse_cpuinfo(CORTEX_A72)
    assert cpu.flags == {"asimd"} and not cpu.fast_int8
    assert "no fast int8 (no dot product)" in cpu.describe()


def test_flag_missing_on_one_core_is_not_claimed() -> None:
    text = VNNI + "\n\n" + _x86("avx2", cores=1)
    cpu = parse_cpuinfo(text)
    assert cpu.cores == 3
    assert cpu.flags == {"avx2"} and not cpu.fast_int8


def test_explicit_machine_wins_and_keeps_only_its_flags() -> None:
    cpu = parse_cpuinfo(VNNI, machine="AMD64")
    assert cpu.arch == "x86_64" and cpu.fast_int8
    assert parse_cpuinfo(NEOVERSE_N1, machine="arm64").arch == "aarch64"


def test_to_json_round_trips_through_json() -> None:
    data = json.loads(json.dumps(parse_cpuinfo(GRAVITON3).to_json()))
    assert data == {
        "arch": "aarch64",
        "model_name": "",
        "cores": 4,
        "flags": ["asimd", "asimddp", "i8mm"],
        "int8_kernel": "ARM I8MM",
        "fast_int8": True,
        "source": "/proc/cpuinfo",
    }


def test_unreadable_cpuinfo_falls_back_to_platform(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(cpu_features.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(cpu_features.platform, "processor", lambda: "arm")
    cpu = detect_cpu(tmp_path / "missing")
    assert cpu.source == "platform" and cpu.arch == "aarch64"
    assert cpu.flags == {"asimd", "asimddp"} and cpu.fast_int8
    assert "assumed from the architecture" in cpu.describe()
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_features.platform, "system", lambda: "Windows")
    cpu = detect_cpu(tmp_path / "missing")
    assert cpu.arch == "x86_64" and cpu.flags == frozenset() and not cpu.fast_int8


def test_detect_cpu_reads_the_given_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "x86_64")
    path = tmp_path / "cpuinfo"
    path.write_text(AMX)
    assert detect_cpu(path) == parse_cpuinfo(AMX, "x86_64")
    host = detect_cpu()  # whatever runs the tests: well-formed, whatever it says
    assert isinstance(host, CpuFeatures) and "\n" not in host.describe()
    assert json.loads(json.dumps(host.to_json()))["fast_int8"] == host.fast_int8


@given(
    st.lists(
        st.sets(st.sampled_from(X86_FLAGS + ("sse2", "avx512bw", "sha_ni"))), min_size=1, max_size=4
    )
)
def test_x86_flags_are_the_intersection_and_fast_means_vnni_or_amx(cores: list[set[str]]) -> None:
    text = "\n\n".join(
        f"processor : {i}\nflags : {' '.join(sorted(f))}\n" for i, f in enumerate(cores)
    )
    cpu = parse_cpuinfo(text, "x86_64")
    common = set.intersection(*cores)
    assert cpu.flags == common & set(X86_FLAGS)
    assert cpu.fast_int8 == bool(common & {"avx512_vnni", "avx_vnni", "amx_int8"})


@given(st.sets(st.sampled_from(ARM_FLAGS + ("fp", "sve", "bf16"))))
def test_arm_fast_means_dot_product(features: set[str]) -> None:
    cpu = parse_cpuinfo(f"processor : 0\nFeatures : {' '.join(sorted(features))}\n", "aarch64")
    assert cpu.fast_int8 == bool(features & {"asimddp", "i8mm"})


@pytest.mark.parametrize("text", ["", "garbage without colons\n"])
def test_text_without_flags_is_platform_sourced(text: str) -> None:
    assert parse_cpuinfo(text, "x86_64").source == "platform"
