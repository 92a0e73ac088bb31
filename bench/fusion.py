"""Fusion against ONNX Runtime's own optimizers: latency in ONNX Runtime and fused-op counts.

For each model of the zoo (GPT-2, BERT, LLaMA-style, ResNet; base sizes by default) this builds
five variants of the same export and times them in ONNX Runtime, paired, in shuffled order, in one
process (method: ../shared/notes/benchmarking.md: 2 intra-op threads, spinning off, batch 1,
sequence 128, warm-up runs, medians):

  original      the export, under ORT_ENABLE_ALL
  graphopt      graphopt O2 (standard ONNX ops only), under ORT_ENABLE_ALL
  graphopt-ort  graphopt O2 with --target onnxruntime (contrib ops allowed), under ORT_ENABLE_ALL
  ort-tools     onnxruntime.transformers.optimizer.optimize_model, under ORT_ENABLE_ALL
  onnxscript    onnxscript.rewriter.ort_fusions.optimize_for_ort, under ORT_ENABLE_ALL

Each variant's outputs are compared with the original's (max abs diff relative to output scale); a
variant that fails to build or run, or disagrees, is reported as such and not timed. One JSON line
per model: medians (ms), ratios to the original and to the better peer, fused-op counts, and the
machine (CPU model, SIMD flags, versions).

    python bench/fusion.py [--models gpt2,bert,llama,resnet] [--size base|tiny] [--pairs 30]
        [--exporter dynamo|torchscript]
    python bench/fusion.py --models light_resnet50,light_squeezenet   # old-opset CNNs the onnx
        package ships: original vs graphopt O2 only (the peers fuse transformers)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from common import machine, ort_session, relative_error, time_paired  # noqa: E402

FUSED_OPS = (
    "Attention", "MultiHeadAttention", "GroupQueryAttention", "LayerNormalization",
    "SkipLayerNormalization", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
    "RMSNormalization", "Gelu", "BiasGelu", "FastGelu", "RotaryEmbedding", "FusedMatMul",
    "FusedConv", "BatchNormalization", "Conv", "Gemm", "MatMul",
)  # fmt: skip
MODEL_TYPES = {"gpt2": "gpt2", "bert": "bert", "llama": "gpt2", "resnet": "bert"}


def op_counts(proto: Any) -> dict[str, int]:
    counts = collections.Counter(n.op_type for n in proto.graph.node)
    return {op: counts[op] for op in FUSED_OPS if counts[op]}


def variants(name: str, size: str, path: str) -> dict[str, Callable[[], Any]]:
    import onnx
    from models.specs import MODELS

    config = MODELS[name].config(size) if name in MODELS else {}
    heads = config.get("n_head", config.get("num_attention_heads", 0))
    hidden = config.get("n_embd", config.get("hidden_size", 0))

    def original() -> Any:
        return onnx.load(path)

    def graphopt_o2(target: str) -> Callable[[], Any]:
        def build() -> Any:
            import graphopt
            from graphopt.backends.onnx import to_onnx

            return to_onnx(graphopt.optimize(graphopt.load(path), "O2", target=target))

        return build

    def ort_tools() -> Any:
        from onnxruntime.transformers import optimizer

        return optimizer.optimize_model(
            path, model_type=MODEL_TYPES[name], num_heads=heads, hidden_size=hidden, opt_level=0
        ).model

    def onnxscript_fusions() -> Any:
        import onnx_ir
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        model, _ = optimize_for_ort(onnx_ir.load(path))
        return onnx_ir.to_proto(model)

    ours = {"original": original, "graphopt": graphopt_o2("onnx")}
    ours["graphopt-ort"] = graphopt_o2("onnxruntime")
    if name not in MODEL_TYPES:  # a light model (old-opset CNN): the peers fuse transformers
        return ours
    return {**ours, "ort-tools": ort_tools, "onnxscript": onnxscript_fusions}


def light_model(name: str) -> tuple[str, dict[str, np.ndarray]]:
    """A light model the onnx package ships (`light_resnet50`) and random inputs for it."""
    import onnx

    path = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    path = os.path.join(path, f"{name}.onnx")
    rng = np.random.default_rng(0)
    feeds = {
        i.name: rng.random([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
        for i in ort_session(path).get_inputs()
    }
    return path, feeds


def measure(name: str, size: str, exporter: str, pairs: int, folder: str) -> dict[str, Any]:
    from models import build, sample_inputs

    if name.startswith("light_"):
        path, feeds = light_model(name)
        row: dict[str, Any] = {"bench": "fusion", "model": name, "threads": 2}
    else:
        path = os.fspath(build(name, size=size, folder=folder, exporter=exporter))
        feeds = sample_inputs(name, size, batch=1, sequence=128)
        row = {"bench": "fusion", "model": f"{name}-{size}-{exporter}", "threads": 2}
    sessions: dict[str, Any] = {}
    expected = None
    for label, make in variants(name, size, path).items():
        try:
            start = time.perf_counter()
            proto = make()
            row[f"{label}_build_s"] = round(time.perf_counter() - start, 2)
            row[f"{label}_ops"] = op_counts(proto)
            s = ort_session(proto)
            outputs = s.run(None, feeds)
            if expected is None:
                expected = outputs
            error = relative_error(expected, outputs)
            row[f"{label}_rel_err"] = error
            if error > 1e-3:
                row[f"{label}_error"] = f"outputs differ (relative {error:.2g})"
                continue
            sessions[label] = s
        except Exception as error:  # a peer that cannot handle this export
            row[f"{label}_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    runners = {label: (lambda s=s: s.run(None, feeds)) for label, s in sessions.items()}
    times = time_paired(runners, rounds=pairs, title=f"{name}-{size}")
    medians = {label: statistics.median(t) for label, t in times.items()}
    for label, ms in medians.items():
        row[f"{label}_ms"] = round(ms, 3)
    base = medians.get("original")
    if base:
        for label, ms in medians.items():
            row[f"{label}_vs_original"] = round(ms / base, 3)
    peers = [medians[p] for p in ("ort-tools", "onnxscript") if p in medians]
    if peers and "graphopt-ort" in medians:
        row["graphopt-ort_vs_best_peer"] = round(medians["graphopt-ort"] / min(peers), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="gpt2,bert,llama,resnet")
    parser.add_argument("--size", default="base", choices=["tiny", "base"])
    parser.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    parser.add_argument("--pairs", type=int, default=30)
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    folder = os.environ.get("GRAPHOPT_MODEL_CACHE", os.path.expanduser("~/.cache/graphopt-models"))
    info = machine()
    for name in args.models.split(","):
        row = measure(name, args.size, args.exporter, args.pairs, folder)
        print(json.dumps({**row, **info}), flush=True)


if __name__ == "__main__":
    main()
