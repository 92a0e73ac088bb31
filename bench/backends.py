"""Backends against ONNX Runtime: TVM (untuned and tuned), OpenVINO and `--target auto`, per model.

For each model of the zoo (GPT-2, BERT, LLaMA-style, ResNet; dynamo exports) this times, paired and
in shuffled order in one process (method: ../shared/notes/benchmarking.md and bench/common.py:
2 threads each, ONNX Runtime's spinning off, batch 1, sequence 128, warm-up runs, medians):

  onnxruntime  ONNX Runtime ORT_ENABLE_ALL on the original export (the baseline)
  openvino     graphopt O2, then the openvino backend (CPU plugin, fp32, 2 threads)
  tvm          graphopt O2, then the tvm backend for llvm (host CPU, mcpu native), untuned
  tvm-tuned    the same with MetaSchedule (`--tune N` trials; the database is kept in
               bench/out/tuning/<model>, so a second run reuses it: with the same N it tunes
               nothing new, with a bigger N only the difference)
  auto         what `--target auto` chooses on the O2 model (graphopt.backends.auto: every
               available backend compiled, checked against the reference, timed), timed again
               here beside the others

Every variant's outputs are checked against the baseline's first (max abs diff relative to the
output's scale, 1e-4); a variant that fails or disagrees is reported and not timed. One JSON line
per model: medians (ms), ratios to ONNX Runtime, auto's choice and its ratio to the fastest single
backend, compile and tuning times, and the machine.

    python bench/backends.py [--models resnet,gpt2,bert,llama] [--size base|tiny] [--tune 200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from common import machine, ort_session, relative_error, time_paired  # noqa: E402

TOLERANCE = 1e-4


def _compile_variants(
    name: str, size: str, path: str, feeds: dict[str, Any], tune: int, threads: int,
    row: dict[str, Any],
) -> dict[str, Callable[[], list[Any]]]:  # fmt: skip
    """Build every variant; returns label -> a function running it once (outputs in the
    baseline's order). Failures go into `row` as `<label>_error`."""
    import graphopt
    from graphopt.backends.auto import select_backend
    from graphopt.backends.base import get_backend

    baseline = ort_session(path, threads)
    names = [o.name for o in baseline.get_outputs()]
    runners: dict[str, Callable[[], list[Any]]] = {
        "onnxruntime": lambda: baseline.run(names, feeds)
    }
    start = time.perf_counter()
    model = graphopt.optimize(graphopt.load(path), "O2")
    row["o2_s"] = round(time.perf_counter() - start, 2)
    dims = {"batch": 1, "sequence": 128}
    tuning_dir = os.path.join(HERE, "out", "tuning", f"{name}-{size}")
    builders: dict[str, Callable[[], Any]] = {
        "openvino": lambda: get_backend("openvino").compile(model, threads=threads),
        "tvm": lambda: get_backend("tvm").compile(model, "llvm:native", dims=dims, threads=threads),
    }
    if tune:
        builders["tvm-tuned"] = lambda: get_backend("tvm").compile(
            model, "llvm:native", dims=dims, threads=threads, tune=tune, tuning_dir=tuning_dir
        )

    def auto() -> Any:
        selection = select_backend(model, feeds, threads=threads, budget_s=30.0)
        row["auto_candidates"] = {
            c.backend: c.median_ms and round(c.median_ms, 3) or c.note for c in selection.candidates
        }
        if selection.winner is None:
            raise RuntimeError("no backend ran the model correctly")
        row["auto_choice"] = selection.winner.backend
        return selection.winner.executable

    builders["auto"] = auto
    for label, build in builders.items():
        try:
            start = time.perf_counter()
            executable = build()
            row[f"{label}_compile_s"] = round(time.perf_counter() - start, 2)
            info = getattr(executable, "info", None)
            if label == "tvm-tuned" and info is not None:
                row["tvm_tune_s"], row["tvm_tasks"] = round(info.tune_s, 1), info.tasks
                row["tvm_trials"] = info.trials
            runners[label] = _in_order(executable, feeds, names)
        except Exception as error:  # a backend that cannot handle this model is a finding
            row[f"{label}_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    expected = runners["onnxruntime"]()
    for label in list(runners)[1:]:
        try:
            row[f"{label}_rel_err"] = error = relative_error(expected, runners[label]())
        except Exception as failure:
            row[f"{label}_error"] = f"run: {type(failure).__name__}: {str(failure)[:200]}"
            del runners[label]
            continue
        if error > TOLERANCE:
            row[f"{label}_error"] = f"outputs differ (relative {error:.2g})"
            del runners[label]
    return runners


def _in_order(executable: Any, feeds: dict[str, Any], names: list[str]) -> Callable[[], list[Any]]:
    """A runner: one run of `executable`, its outputs in the baseline's order."""

    def run() -> list[Any]:
        outputs = executable.run(feeds)
        return [outputs[name] for name in names]

    return run


def measure(name: str, size: str, tune: int, rounds: int, threads: int) -> dict[str, Any]:
    from models import build, sample_inputs

    path = os.fspath(build(name, size=size))
    feeds = sample_inputs(name, size, batch=1, sequence=128)
    row: dict[str, Any] = {"bench": "backends", "model": f"{name}-{size}", "threads": threads,
                           "batch": 1, "sequence": None if name == "resnet" else 128}  # fmt: skip
    runners = _compile_variants(name, size, path, feeds, tune, threads, row)
    times = time_paired(runners, rounds=rounds, title=f"{name}-{size}")
    medians = {label: statistics.median(t) for label, t in times.items() if t}
    for label, ms in medians.items():
        row[f"{label}_ms"] = round(ms, 3)
        row[f"{label}_runs"] = len(times[label])
        row[f"{label}_vs_ort"] = round(ms / medians["onnxruntime"], 3)
    singles = [ms for label, ms in medians.items() if label != "auto"]
    if "auto" in medians:
        row["auto_vs_fastest_single"] = round(medians["auto"] / min(singles), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="resnet,gpt2,bert,llama")
    parser.add_argument("--size", default="base", choices=["tiny", "base"])
    parser.add_argument("--tune", type=int, default=0, help="MetaSchedule trials (0: no tuning)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    info = machine()
    for name in args.models.split(","):
        row = measure(name, args.size, args.tune, args.rounds, args.threads)
        print(json.dumps({**row, **info}), flush=True)


if __name__ == "__main__":
    main()
