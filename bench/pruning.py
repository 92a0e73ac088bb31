"""Structured pruning in ONNX Runtime: does removing work make the model that much faster?

For each model of the zoo this builds graphopt's O2 model and pruned copies of it, and times them in
ONNX Runtime, paired, in shuffled order, in one process (../shared/notes/benchmarking.md:
ORT_ENABLE_ALL, 2 intra-op threads, spinning off, batch 1, warm-up runs, medians):

  gpt2, llama   prune-mlp{ratio=0.5}: half the MLP neurons of every layer
  resnet        prune-channels{ratio=0.3}: 30% of the channels of every group, kept counts
                rounded up to the CPU's SIMD block (the default, multiple=0: 8 on AVX2, for ORT's
                NCHWc kernels), and again with multiple=1 (no rounding) to show what that costs

  o2            graphopt O2, unpruned (the peer)
  magnitude     O2 + pruning with magnitude scores
  activation    O2 + pruning with activation-aware scores (Wanda |W| * ||x||, calibration data)
  refit         O2 + magnitude pruning + least-squares refit of the consumer layers

FLOPs are the MatMul/Gemm/Conv FLOPs of the graph (per batch x sequence element: symbolic dims
count 1; attention's own products are not counted), before and after. One JSON line per model and
setting: median latencies (ms), speed-up over o2, FLOP reduction (before / after), and
speed-up / FLOP reduction (the goal: >= 0.8), and per scoring the output cosine similarity with
the unpruned model on held-out inputs (seeds other than the calibration samples'), run in ONNX
Runtime; for refit, how many consumer layers its held-out check left as plain pruning and the
best fit's error on the held-out calibration fold over plain pruning's (min, median, max over the
consumer layers: below 1, least squares recovers some of what pruning removed); plus the machine
(CPU model, SIMD flags, versions).

    python bench/pruning.py [--models gpt2,llama,resnet] [--size base|tiny] [--pairs 30]
        [--calibration 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from common import machine, ort_session, time_paired  # noqa: E402

# (model, pass, ratio, multiple; None: the pass's default)
SETTINGS: list[tuple[str, str, float, int | None]] = [
    ("gpt2", "prune-mlp", 0.5, None),
    ("llama", "prune-mlp", 0.5, None),
    ("resnet", "prune-channels", 0.3, None),
    ("resnet", "prune-channels", 0.3, 1),
]
SCORINGS = {"magnitude": ("magnitude", "false"), "activation": ("activation", "false"),
            "refit": ("magnitude", "true")}  # fmt: skip


def cosine(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    from graphopt.passes.pruning.driver import output_cosine

    return output_cosine(a, b)


def measure(
    name: str, pass_name: str, ratio: float, multiple: int | None, size: str, pairs: int,
    calibration: int, folder: str,
) -> dict[str, Any]:  # fmt: skip
    from models import build, sample_inputs

    import graphopt
    from graphopt.backends.onnx import to_onnx
    from graphopt.passes import optimize_model
    from graphopt.passes.pruning.driver import model_flops

    sequence = 128 if size == "base" else 32
    path = os.fspath(build(name, size=size, folder=folder))
    o2 = to_onnx(graphopt.optimize(graphopt.load(path), "O2"))
    calib = [sample_inputs(name, size, batch=1, sequence=sequence, seed=s)
             for s in range(1, calibration + 1)]  # fmt: skip
    held_out = [sample_inputs(name, size, batch=1, sequence=sequence, seed=s) for s in (100, 101)]
    feeds = held_out[0]
    row: dict[str, Any] = {"bench": "pruning", "model": f"{name}-{size}", "threads": 2,
                           "sequence": sequence if name != "resnet" else None,
                           "calibration_samples": calibration}  # fmt: skip
    extra = f" multiple={multiple}" if multiple is not None else ""
    row["setting"] = f"{pass_name}{{ratio={ratio}{extra}}}"
    flops_before = model_flops(graphopt.load(o2).graph)
    sessions = {"o2": ort_session(o2)}
    reference = [sessions["o2"].run(None, f) for f in held_out]
    for label, (scores, refit) in SCORINGS.items():
        setting = f"{pass_name}{{ratio={ratio} scores={scores} refit={refit}{extra}}}"
        model = graphopt.load(o2)
        start = time.perf_counter()
        result = optimize_model(model, setting, calibration=calib)
        row[f"{label}_prune_s"] = round(time.perf_counter() - start, 2)
        if refit == "true":  # how many sinks the held-out fold let least squares change
            chosen = [n.message for n in result.notes if n.message.startswith("refit: ")]
            row["refit_sinks"] = len(chosen)
            row["refit_sinks_left_plain"] = sum("plain pruning (" in m for m in chosen)
            refits = result.artifacts["structured-pruning"].refits
            ratios = [r.heldout_ratio for r in refits if r.heldout_ratio is not None]
            if ratios:  # the best fit's error on the held-out fold over plain pruning's, per sink
                row["refit_heldout_error_ratio"] = {
                    "min": round(min(ratios), 4), "median": round(statistics.median(ratios), 4),
                    "max": round(max(ratios), 4),
                }  # fmt: skip
        flops_after = model_flops(model.graph)
        row["flops_before"], row[f"{label}_flops_after"] = flops_before, flops_after
        session = ort_session(to_onnx(model))
        outs = [session.run(None, f) for f in held_out]
        row[f"{label}_cosine"] = round(
            cosine([v for r in reference for v in r], [v for o in outs for v in o]), 5
        )
        if label in ("magnitude", "refit"):  # activation prunes to the same shapes
            sessions[label] = session
    runners = {label: (lambda s=s: s.run(None, feeds)) for label, s in sessions.items()}
    times = time_paired(runners, rounds=pairs, title=f"{name}-{size}")
    medians = {label: statistics.median(t) for label, t in times.items()}
    for label, ms in medians.items():
        row[f"{label}_ms"] = round(ms, 3)
    reduction = flops_before / max(row["magnitude_flops_after"], 1)
    row["flop_reduction"] = round(reduction, 3)
    for label in ("magnitude", "refit"):
        speedup = medians["o2"] / medians[label]
        row[f"{label}_speedup"] = round(speedup, 3)
        row[f"{label}_speedup_per_flop_reduction"] = round(speedup / reduction, 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="gpt2,llama,resnet")
    parser.add_argument("--size", default="base", choices=["tiny", "base"])
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--calibration", type=int, default=8, help="calibration samples")
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    folder = os.environ.get("GRAPHOPT_MODEL_CACHE", os.path.expanduser("~/.cache/graphopt-models"))
    info = machine()
    wanted = args.models.split(",")
    for name, pass_name, ratio, multiple in SETTINGS:
        if name in wanted:
            row = measure(
                name, pass_name, ratio, multiple, args.size, args.pairs, args.calibration, folder
            )
            print(json.dumps({**row, **info}), flush=True)


if __name__ == "__main__":
    main()
