"""What the benchmark scripts share: the machine description printed in every JSON line, ONNX
Runtime sessions set up as ../shared/notes/benchmarking.md says (spinning off, fixed threads), the
output check, and paired timing in shuffled rounds with a progress bar (the method, shared with
`--target auto`, is graphopt.backends.timing's; medians are compared).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "asimd", "asimddp")


def machine() -> dict[str, Any]:
    """CPU model, SIMD flags, core count and the versions of the runtimes that are installed."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith(("flags", "Features")):
                    present = set(line.split(":", 1)[1].split())
                    flags = [flag for flag in SIMD_FLAGS if flag in present]
                    break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": model, "cpu_flags": flags, "cores": os.cpu_count()}
    from importlib.metadata import PackageNotFoundError, version

    for package in ("onnxruntime", "openvino", "apache-tvm", "torch"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            pass
    return info


def ort_session(model: Any, threads: int = 2, level: str = "ORT_ENABLE_ALL") -> Any:
    """An ONNX Runtime CPU session on a path or ModelProto: `threads` intra-op threads, one
    inter-op thread, spinning off, the given optimization level."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def relative_error(expected: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """The worst output's max |actual - expected| over max |expected|."""
    worst = 0.0
    for e, a in zip(expected, actual, strict=True):
        e64, a64 = np.asarray(e, np.float64), np.asarray(a, np.float64)
        scale = max(float(np.abs(e64).max()), 1e-12)
        worst = max(worst, float(np.abs(e64 - a64).max()) / scale)
    return worst


def time_paired(
    runners: Mapping[str, Callable[[], Any]], *, rounds: int = 30, warmup: int = 5,
    min_rounds: int = 3, cutoff: float = 5.0, title: str = "timing",
) -> dict[str, list[float]]:  # fmt: skip
    """Milliseconds of each runner's timed runs (graphopt.backends.timing), with a progress bar."""
    from rich.console import Console
    from rich.progress import Progress

    from graphopt.backends.timing import time_paired as paired

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"{title}: {len(runners)} runners", total=rounds)
        return paired(
            runners, rounds=rounds, warmup=warmup, min_rounds=min_rounds, cutoff=cutoff,
            on_round=lambda done: bar.update(task, completed=done),
        ).times_ms  # fmt: skip
