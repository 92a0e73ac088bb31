"""ONNX file I/O benchmark: graphopt's load_onnx + save_onnx against onnx.load + onnx.save.

Why: loading and saving sit at both ends of every optimization run, and for big models the cost is
memory as much as time. graphopt memory-maps weights and streams them back out; onnx copies them
into protobuf and serializes them again. This measures both on a GPT-2-small-sized model (random
weights, `transformers.GPT2Config()` defaults: 12 layers, 768 wide, about 124M parameters, ~500 MB).

Each measurement runs in a fresh subprocess so the peak resident memory (`ru_maxrss`, minus the
figure after imports) belongs to that one load + save. Runs alternate between the two tools, after
one warm-up of each (so both read the file from the page cache), and the medians are reported.
Prints one JSON line on stdout; progress goes to stderr.

    python bench/io.py [--reps 5] [--dir DIR]

The exported model is cached in DIR (default: `$TMPDIR/graphopt-bench`). Needs torch and
transformers (`pip install graphopt[torch]`).
"""

from __future__ import annotations

import argparse
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
    """Export a randomly initialised GPT-2 small to `directory` (cached); returns the path."""
    path = os.path.join(directory, f"{MODEL_NAME}.onnx")
    if os.path.exists(path):
        return path
    try:
        import torch
        import transformers
    except ImportError as error:
        sys.exit(
            f"bench/io.py needs torch and transformers to build its model ({error.name} is missing):"
            " pip install 'graphopt[torch]'"
        )
    import warnings

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(use_cache=False)).eval()
    input_ids = torch.zeros((1, 16), dtype=torch.long)
    temp = path + ".partial"
    try:
        torch.onnx.export(
            model, (input_ids,), temp, dynamo=False, opset_version=17,
            input_names=["input_ids"], output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
        )  # fmt: skip
    except Exception:  # the TorchScript exporter lacks ops newer transformers use: use dynamo
        torch.onnx.export(
            model, (input_ids,), temp, dynamo=True, opset_version=18, external_data=False,
            input_names=["input_ids"], output_names=["logits"], verbose=False,
        )  # fmt: skip
    os.replace(temp, path)
    return path


def child(tool: str, source: str, target: str) -> None:
    """One measured load + save, in this (fresh) process; prints a JSON line with the figures."""
    import onnx

    from graphopt.backends.onnx import save_onnx
    from graphopt.frontends.onnx import load_onnx

    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if tool == "onnx":
        onnx.save(onnx.load(source), target)
    else:
        save_onnx(load_onnx(source), target)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_mb": (peak_kb - base_kb) / 1024}))


def _build_in_subprocess(directory: str) -> str:
    """Build the model in another process: this one must stay small, because a child process
    starts with its parent's peak RSS as its own `ru_maxrss`."""
    command = [sys.executable, os.path.abspath(__file__), "--build", "--dir", directory]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # the exporters are verbose: show only the end of their output
        sys.exit(done.stderr[-3000:] or f"building the model failed (status {done.returncode})")
    return done.stdout.strip().splitlines()[-1]


def _measure(tool: str, source: str, target: str) -> dict[str, float]:
    command = [sys.executable, os.path.abspath(__file__), "--child", tool, source, target]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"the {tool} run failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _check_outputs(source: str, saved: str) -> float:
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
    for package in (
        "graphopt",
        "onnx",
        "onnxruntime",
        "protobuf",
        "numpy",
        "torch",
        "transformers",
    ):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="measured runs per tool (default 5)")
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
    with console.status("checking graphopt's file with ONNX Runtime"):
        max_diff = _check_outputs(source, targets["graphopt"])
    for target in targets.values():
        os.remove(target)

    def median(tool: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[tool])

    onnx_s, graphopt_s = median("onnx", "seconds"), median("graphopt", "seconds")
    onnx_mb, graphopt_mb = median("onnx", "peak_mb"), median("graphopt", "peak_mb")
    print(json.dumps({
        "bench": "io", "model": MODEL_NAME,
        "onnx_s": round(onnx_s, 3), "graphopt_s": round(graphopt_s, 3),
        "time_ratio": round(graphopt_s / onnx_s, 3),
        "onnx_peak_mb": round(onnx_mb, 1), "graphopt_peak_mb": round(graphopt_mb, 1),
        "memory_ratio": round(graphopt_mb / onnx_mb, 3),
        "file_mb": round(os.path.getsize(source) / 2**20, 1),
        "reps": args.reps, "max_abs_diff_ort": max_diff, "cpu": _cpu(), "versions": _versions(),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
