"""ONNX file I/O benchmark: graphopt's load_onnx + save_onnx against onnx.load + onnx.save.

Why: loading and saving sit at both ends of every optimization run, and for big models the cost is
memory as much as time. graphopt memory-maps weights and streams them back out; onnx copies them
into protobuf and serializes them again. This measures both on a GPT-2-small-sized model (random
weights, `transformers.GPT2Config()` defaults: 12 layers, 768 wide, about 124M parameters, ~500 MB).

How it measures, the same way for both tools:
- Each load + save runs in a fresh subprocess, from the same source file, to an output file that does
  not exist yet (removed beforehand) and with no dirty pages left from the run before (`os.sync()`
  first), so no run pays for another's writeback or file deletion.
- Peak memory is the growth of the process's peak resident set during the load + save: the peak
  (`VmHWM`) is reset to the current resident set after imports (`/proc/self/clear_refs`), and the
  figure is `VmHWM` afterwards minus `VmRSS` before. Resident pages of memory-mapped files count:
  graphopt's weights are views of the mapped model, and every page it touched is in that figure.
- Both write the weights inline (`onnx.save`'s default; graphopt's below 2 GB), so the outputs are
  the same kind of file. Runs alternate between the tools after one uncounted warm-up pair (so both
  read the source from the page cache); medians are reported, with the range of per-pair ratios.
- Afterwards graphopt's file is checked: `onnx.checker.check_model` on the path, the same
  initializers (names, types, shapes, bytes), nodes, inputs and outputs as `onnx.save`'s file, and the
  same logits from ONNX Runtime. A mismatch fails the benchmark.
Prints one JSON line on stdout; progress goes to stderr.

    python bench/io.py [--reps 7] [--dir DIR]

The exported model is cached in DIR (default: `$TMPDIR/graphopt-bench`). Needs torch and
transformers (`pip install graphopt[torch]`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

MODEL_NAME = "gpt2-small"


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def build_model(directory: str) -> str:
    """Export a randomly initialised GPT-2 small to `directory` (cached); returns the path.

    The model comes from the zoo (`tests/models`, via `bench/models.py`): GPT-2 base, dynamo
    exporter, input_ids only (no attention mask), symbolic batch and sequence dims."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from models import build_gpt2  # bench/models.py, which forwards to the zoo in tests/models

    try:
        path = build_gpt2(directory, size="base", attention_mask=False)
    except ImportError as error:
        sys.exit(f"bench/io.py needs torch and transformers to build its model: {error}")
    return str(path)


def _proc_status_kb(key: str) -> int | None:
    """A `kB` figure from /proc/self/status (`VmRSS`, `VmHWM`), or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set (`VmHWM`) to its current size (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def child(tool: str, source: str, target: str) -> None:
    """One measured load + save, in this (fresh) process; prints a JSON line with the figures."""
    import onnx

    from graphopt.backends.onnx import save_onnx
    from graphopt.frontends.onnx import load_onnx

    gc.collect()
    exact = _reset_peak_rss()
    base_kb = _proc_status_kb("VmRSS") if exact else None
    if base_kb is None:  # no /proc: the peak so far (imports included) is the baseline
        base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if tool == "onnx":
        model = onnx.load(source)
        loaded = time.perf_counter()
        onnx.save(model, target)
    else:
        model = load_onnx(source)
        loaded = time.perf_counter()
        save_onnx(model, target)
    end = time.perf_counter()
    peak_kb = _proc_status_kb("VmHWM") if exact else None
    if peak_kb is None:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "seconds": end - start, "load_s": loaded - start, "save_s": end - loaded,
        "peak_mb": (peak_kb - base_kb) / 1024,
    }))  # fmt: skip


def _build_in_subprocess(directory: str) -> str:
    """Build the model in another process: this one must stay small, because a child process
    starts with its parent's peak RSS as its own `ru_maxrss`."""
    command = [sys.executable, os.path.abspath(__file__), "--build", "--dir", directory]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # the exporters are verbose: show only the end of their output
        sys.exit(done.stderr[-3000:] or f"building the model failed (status {done.returncode})")
    return done.stdout.strip().splitlines()[-1]


def _measure(tool: str, source: str, target: str) -> dict[str, float]:
    for stale in (target, target + ".data"):  # both tools start from the same state
        if os.path.exists(stale):
            os.remove(stale)
    os.sync()  # write back the previous run's file now, not during this run
    command = [sys.executable, os.path.abspath(__file__), "--child", tool, source, target]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"the {tool} run failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _differences(reference: str, saved: str) -> list[str]:
    """How graphopt's file differs from `onnx.save`'s in what matters: initializers (names, order,
    types, shapes, bytes), nodes, graph inputs and outputs, opsets. Empty when they agree. Also runs
    `onnx.checker.check_model` on the saved path (it raises on an invalid model)."""
    import onnx

    onnx.checker.check_model(saved)
    ref, got = onnx.load(reference), onnx.load(saved)

    def tensors(model: onnx.ModelProto) -> list[tuple[str, int, list[int], bytes]]:
        return [
            (t.name, t.data_type, list(t.dims), onnx.numpy_helper.to_array(t).tobytes())
            for t in model.graph.initializer
        ]

    def nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
        found = []
        for node in model.graph.node:  # an unset domain and domain "" mean the same
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            if not copy.domain:
                copy.ClearField("domain")
            found.append(copy)
        return found

    def interface(infos: Any) -> list[tuple[str, bytes]]:
        return [(info.name, info.type.SerializeToString()) for info in infos]

    problems = []
    if tensors(ref) != tensors(got):
        problems.append("initializers differ")
    if nodes(ref) != nodes(got):
        problems.append("nodes differ")
    if interface(ref.graph.input) != interface(got.graph.input):
        problems.append("graph inputs differ")
    if interface(ref.graph.output) != interface(got.graph.output):
        problems.append("graph outputs differ")
    if list(ref.opset_import) != list(got.opset_import) or ref.ir_version != got.ir_version:
        problems.append("opset imports or IR version differ")
    return problems


def _max_logit_diff(source: str, saved: str) -> float:
    """Largest difference between ONNX Runtime's logits on the original and on graphopt's file."""
    import numpy as np
    import onnxruntime as ort

    ids = np.arange(16, dtype=np.int64).reshape(1, 16) % 1000
    results = []
    for path in (source, saved):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        results.append(session.run(None, {session.get_inputs()[0].name: ids})[0])
    return float(np.max(np.abs(results[0] - results[1])))


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    packages = ("graphopt", "onnx", "onnxruntime", "protobuf", "numpy", "torch", "transformers",
                "onnxscript")  # fmt: skip
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def _cpu() -> tuple[str, list[str]]:
    """The CPU model and its SIMD flags that matter here (from /proc/cpuinfo)."""
    model, flags = platform.processor(), []
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    have = set(value.split())
                    wanted = ("avx2", "avx512f", "avx512_vnni", "amx_tile")
                    flags = [flag for flag in wanted if flag in have]
                    break
    except OSError:
        pass
    return model, flags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="measured runs per tool (default 7)")
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "graphopt-bench"))
    parser.add_argument("--child", nargs=3, metavar=("TOOL", "SRC", "DST"), help=argparse.SUPPRESS)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    if args.build:
        print(build_model(args.dir))
        return 0

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = _console()
    os.makedirs(args.dir, exist_ok=True)
    with console.status(f"building {MODEL_NAME} (random weights, exported once, cached)"):
        source = _build_in_subprocess(args.dir)
    targets = {tool: os.path.join(args.dir, f"out-{tool}.onnx") for tool in ("onnx", "graphopt")}
    runs: dict[str, list[dict[str, float]]] = {"onnx": [], "graphopt": []}
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("load + save", total=2 * (args.reps + 1))
        for rep in range(args.reps + 1):  # run 0 warms the page cache and is not counted
            for tool in ("onnx", "graphopt"):
                progress.update(task, description=f"load + save: {tool}")
                result = _measure(tool, source, targets[tool])
                if rep:
                    runs[tool].append(result)
                progress.advance(task)
    with console.status("checking graphopt's file against onnx.save's"):
        problems = _differences(targets["onnx"], targets["graphopt"])
        max_diff = _max_logit_diff(source, targets["graphopt"])
    for target in targets.values():
        os.remove(target)
    if max_diff > 1e-5:  # same weights and nodes: only thread scheduling may move the last bit
        problems.append(f"logits differ by {max_diff}")
    if problems:
        sys.exit(f"graphopt's file is wrong: {', '.join(problems)}")

    def median(tool: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[tool])

    pairs = [
        g["seconds"] / o["seconds"] for o, g in zip(runs["onnx"], runs["graphopt"], strict=True)
    ]
    onnx_s, graphopt_s = median("onnx", "seconds"), median("graphopt", "seconds")
    onnx_mb, graphopt_mb = median("onnx", "peak_mb"), median("graphopt", "peak_mb")
    cpu, flags = _cpu()
    print(json.dumps({
        "bench": "io", "model": MODEL_NAME,
        "time_ratio": round(graphopt_s / onnx_s, 3),
        "time_ratio_pairs": [round(min(pairs), 3), round(max(pairs), 3)],
        "memory_ratio": round(graphopt_mb / onnx_mb, 3),
        "onnx_s": round(onnx_s, 3), "graphopt_s": round(graphopt_s, 3),
        "onnx_load_s": round(median("onnx", "load_s"), 3),
        "graphopt_load_s": round(median("graphopt", "load_s"), 3),
        "onnx_peak_mb": round(onnx_mb, 1), "graphopt_peak_mb": round(graphopt_mb, 1),
        "file_mb": round(os.path.getsize(source) / 2**20, 1), "reps": args.reps,
        "same_as_onnx_save": True, "max_abs_diff_ort": max_diff, "threads": 1,
        "cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "versions": _versions(),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
