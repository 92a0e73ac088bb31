"""O1 against onnxslim: node counts left and outputs kept, on real models.

For each model (the 9 light models the onnx package ships, and GPT-2 and BERT from the model zoo,
exported by torch.onnx with both exporters), this runs onnxslim's `slim` and graphopt's O1 on the
same file, counts the nodes each leaves, and checks with ONNX Runtime that both keep every output
(max abs diff relative to the output's scale). One JSON line per model, then a summary line.

    python bench/cleanup.py [--size tiny|base] [--models light,gpt2,bert] [--skip-onnxslim]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def _session(model: Any) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model if isinstance(model, (bytes, str)) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _feeds(session: Any, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for info in session.get_inputs():
        shape = [d if isinstance(d, int) else 2 for d in info.shape]
        if "int64" in info.type:
            feeds[info.name] = rng.integers(0, 100, size=shape).astype(np.int64)
        elif "int32" in info.type:
            feeds[info.name] = rng.integers(0, 100, size=shape).astype(np.int32)
        else:
            feeds[info.name] = rng.random(shape).astype(np.float32)
    return feeds


def relative_error(expected: list[np.ndarray], actual: list[np.ndarray]) -> float:
    worst = 0.0
    for e, a in zip(expected, actual, strict=True):
        e64, a64 = np.asarray(e, np.float64), np.asarray(a, np.float64)
        scale = max(float(np.abs(e64).max()) if e64.size else 0.0, 1e-12)
        worst = max(worst, float(np.abs(e64 - a64).max()) / scale if e64.size else 0.0)
    return worst


def models(names: list[str], size: str, folder: str) -> list[tuple[str, str]]:
    import onnx

    found = []
    if "light" in names:
        light = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
        for file in sorted(os.listdir(light)):
            if file.endswith(".onnx"):
                found.append((file[len("light_") : -len(".onnx")], os.path.join(light, file)))
    for name in ("gpt2", "bert"):
        if name in names:
            from models import build

            for exporter in ("dynamo", "torchscript"):
                try:
                    path = build(name, size=size, exporter=exporter, folder=folder)
                except Exception as error:  # an exporter that cannot export this model
                    print(f"skip {name}/{exporter}: {error}", file=sys.stderr)
                    continue
                found.append((f"{name}-{size}-{exporter}", path))
    return found


def measure(name: str, path: str, with_onnxslim: bool) -> dict[str, Any]:
    import onnx

    import graphopt

    original = onnx.load(path)
    session = _session(original)
    feeds = _feeds(session)
    expected = session.run(None, feeds)
    row: dict[str, Any] = {"bench": "cleanup", "model": name, "nodes": len(original.graph.node)}
    start = time.perf_counter()
    model = graphopt.optimize(graphopt.load(path), "O1")
    row["graphopt_s"] = round(time.perf_counter() - start, 3)
    from graphopt.backends.onnx import to_onnx

    optimized = to_onnx(model)
    row["graphopt_nodes"] = len(optimized.graph.node)
    row["graphopt_rel_err"] = relative_error(expected, _session(optimized).run(None, feeds))
    if with_onnxslim:
        import onnxslim

        start = time.perf_counter()
        slim = onnxslim.slim(onnx.load(path))
        row["onnxslim_s"] = round(time.perf_counter() - start, 3)
        row["onnxslim_nodes"] = len(slim.graph.node)
        row["onnxslim_rel_err"] = relative_error(expected, _session(slim).run(None, feeds))
        row["nodes_vs_onnxslim"] = row["graphopt_nodes"] - row["onnxslim_nodes"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="tiny", choices=["tiny", "base"])
    parser.add_argument("--models", default="light,gpt2,bert")
    parser.add_argument("--skip-onnxslim", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        cache = os.environ.get("GRAPHOPT_MODEL_CACHE", folder)
        for name, path in models(args.models.split(","), args.size, cache):
            row = measure(name, path, not args.skip_onnxslim)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {
        "bench": "cleanup-summary",
        "models": len(rows),
        "max_graphopt_rel_err": max((r["graphopt_rel_err"] for r in rows), default=0.0),
        "graphopt_at_most_onnxslim": sum(r.get("nodes_vs_onnxslim", 0) <= 0 for r in rows),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
