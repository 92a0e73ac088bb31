"""How O1's cost grows with graph size: synthetic graphs of 1k, 10k and 100k nodes.

Why: passes must be linear (worklists and use-def chains, not whole-graph rescans); a pass that is
quadratic is invisible on test models and fatal on a 100k-node LLM export. The graph repeats a
block with everything O1 cleans up: a dynamic-batch Shape/Gather/Concat/Reshape chain, constant
sub-expressions, duplicated expressions, identities, a same-type Cast, a dead branch, and real work
(MatMul, Add, Relu) in between. Each block is ~20 nodes; blocks chain through one activation.

For each size it times `graphopt.optimize(model, "O1")` (load and save are timed apart) and
onnxslim's `slim` on the same ModelProto, in fresh processes, and prints one JSON line per size and
a summary line with the per-node time ratio 100k/10k. Progress goes to stderr.

    python bench/scaling.py [--sizes 1000,10000,100000] [--skip-onnxslim]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np


def build(nodes: int, path: str) -> int:
    """Write a synthetic model of about `nodes` nodes to `path`; returns its exact node count."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    hidden = 16
    rng = np.random.default_rng(0)
    graph_nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array, name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        graph_nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    x = "x"
    block = 0
    while len(graph_nodes) < nodes:
        p = f"b{block}_"
        w = const(p + "w", (rng.standard_normal((hidden, hidden)) * 0.1).astype(np.float32))
        shape = node("Shape", [x], p + "shape")
        batch = node(
            "Gather", [shape, const(p + "zero", np.array(0, np.int64))], p + "batch", axis=0
        )
        batch1 = node(
            "Unsqueeze", [batch, const(p + "axes", np.array([0], np.int64))], p + "batch1"
        )
        target = node(
            "Concat",
            [batch1, const(p + "rest", np.array([-1, hidden], np.int64))],
            p + "target",
            axis=0,
        )
        reshaped = node("Reshape", [x, target], p + "reshaped")
        flat = node(
            "Reshape", [reshaped, const(p + "back", np.array([0, hidden], np.int64))], p + "flat"
        )
        mm = node("MatMul", [flat, w], p + "mm")
        two = node(
            "Add",
            [const(p + "one", np.float32(1.0)), const(p + "one_b", np.float32(1.0))],
            p + "two",
        )
        scaled = node("Mul", [mm, two], p + "scaled")
        scaled_again = node("Mul", [mm, two], p + "scaled_again")
        summed = node("Add", [scaled, scaled_again], p + "sum")
        same = node("Identity", [summed], p + "same")
        cast = node("Cast", [same], p + "cast", to=TensorProto.FLOAT)
        bias = const(p + "b", np.zeros(hidden, np.float32))
        biased = node("Add", [cast, bias], p + "biased")
        node("Exp", [biased], p + "dead")  # nothing reads it
        one = const(p + "unit", np.float32(1.0))
        kept = node("Mul", [biased, one], p + "kept")
        x = node("Relu", [kept], p + "out")
        block += 1
    graph = helper.make_graph(
        graph_nodes, "scaling",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", hidden])],
        initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return len(graph_nodes)


def child(tool: str, path: str) -> None:
    """One measured run in this fresh process; prints a JSON line."""
    import onnx

    if tool == "graphopt":
        import graphopt

        start = time.perf_counter()
        model = graphopt.load(path)
        loaded = time.perf_counter()
        model = graphopt.optimize(model, "O1")
        optimized = time.perf_counter()
        graphopt.save(model, path + ".graphopt.onnx")
        saved = time.perf_counter()
        nodes = sum(1 for _ in model.graph.all_nodes())
        figures = {
            "load_s": loaded - start,
            "optimize_s": optimized - loaded,
            "save_s": saved - optimized,
        }
    else:
        import onnxslim

        proto = onnx.load(path)
        start = time.perf_counter()
        slim = onnxslim.slim(proto)
        figures = {"optimize_s": time.perf_counter() - start}
        nodes = len(slim.graph.node)
    print(json.dumps({"tool": tool, "nodes_after": nodes, **figures}))


def _measure(tool: str, path: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", tool, path],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return {"tool": tool, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--skip-onnxslim", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    from rich.progress import Progress

    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    tools = ["graphopt"] + ([] if args.skip_onnxslim else ["onnxslim"])
    with (
        tempfile.TemporaryDirectory() as folder,
        Progress(transient=True, console=_stderr()) as bar,
    ):
        task = bar.add_task("scaling", total=len(sizes) * len(tools))
        for size in sizes:
            path = os.path.join(folder, f"synthetic_{size}.onnx")
            count = build(size, path)
            row: dict[str, Any] = {"bench": "scaling", "nodes": count}
            for tool in tools:
                bar.update(task, description=f"{tool} on {count} nodes")
                figures = _measure(tool, path)
                for key, value in figures.items():
                    if key != "tool":
                        row[f"{tool}_{key}"] = (
                            round(value, 4) if isinstance(value, float) else value
                        )
                if "optimize_s" in figures:
                    row[f"{tool}_us_per_node"] = round(1e6 * figures["optimize_s"] / count, 2)
                bar.advance(task)
            results[size] = row
            print(json.dumps(row), flush=True)
    summary: dict[str, Any] = {
        "bench": "scaling-summary",
        "cpu": platform.processor() or platform.machine(),
    }
    if 10000 in results and 100000 in results:
        for tool in tools:
            key = f"{tool}_us_per_node"
            if key in results[10000] and key in results[100000]:
                summary[f"{tool}_per_node_ratio_100k_vs_10k"] = round(
                    results[100000][key] / results[10000][key], 3
                )
        summary["graphopt_100k_optimize_s"] = results[100000].get("graphopt_optimize_s")
    print(json.dumps(summary))


def _stderr() -> Any:
    from rich.console import Console

    return Console(stderr=True)


if __name__ == "__main__":
    main()
