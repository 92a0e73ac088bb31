"""Default kernels for standard ONNX ops: the `onnx` package's own reference implementations.

Why delegate: `onnx.reference` is the executable form of the ONNX spec, kept current with every
opset by the ONNX maintainers, and its evaluator passes almost all of ONNX's node tests. Rewriting
~200 ops would only add bugs. graphopt registers its own kernels where the reference ones are too
slow for real models (convolution and pooling loop per element there) or cannot work on the IR
(control flow, whose bodies are IR graphs); see `graphopt.ir.ops`.

How: each node becomes a one-node ONNX model (inputs typed from the IR where known, so ops whose
function body depends on input types resolve) and a `ReferenceEvaluator` is built for it once, when
the interpreter prepares the node. Running the node calls the evaluator's prepared op directly.
"""

from __future__ import annotations

from typing import Any

import onnx
from onnx import helper

from graphopt.ir.core import Graph, Node
from graphopt.ir.errors import UnsupportedOpError
from graphopt.ir.onnx_protos import node_to_proto, type_to_proto
from graphopt.ir.registry import REGISTRY, Kernel, KernelEnv, OpEntry

_DOMAINS_WITH_REFERENCE = ("", "ai.onnx.ml", "ai.onnx.preview", "ai.onnx.preview.training")


def onnx_reference_kernel(node: Node, env: KernelEnv) -> Kernel:
    """A kernel running `node` with `onnx.reference` (built once per node)."""
    from onnx.reference import ReferenceEvaluator

    if node.subgraphs():
        raise UnsupportedOpError(
            f"{node.describe()}: graphopt has no kernel for op '{node.op}' with subgraphs",
            hint="register one with graphopt.ir.registry.register_kernel",
        )
    input_names = [f"x{i}" if v is not None else "" for i, v in enumerate(node.inputs)]
    output_names = [
        f"y{i}" if v.name != "" or v.is_used else "" for i, v in enumerate(node.outputs)
    ]
    proto = node_to_proto(node, _no_subgraph)
    del proto.input[:]
    proto.input.extend(input_names)
    del proto.output[:]
    proto.output.extend(output_names)
    proto.ClearField("metadata_props")
    inputs = []
    for name, t in zip(input_names, env.input_types(node), strict=True):
        if name:
            info = onnx.ValueInfoProto(name=name)
            if t is not None:
                info.type.CopyFrom(type_to_proto(t))
            inputs.append(info)
    outputs = [onnx.ValueInfoProto(name=n) for n in output_names if n]
    graph = helper.make_graph([proto], "node", inputs, outputs)
    opsets = {("" if d == "ai.onnx" else d): v for d, v in env.opset_imports.items()}
    opsets.setdefault(node.domain, 1)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
        functions=list(env.functions),
    )
    try:
        evaluator = ReferenceEvaluator(model)
    except Exception as error:  # onnx raises NotImplementedError, RuntimeError, TypeError ...
        raise UnsupportedOpError(
            f"{node.describe()}: no reference implementation of '{node.op}' at opset "
            f"{env.opset(node.domain)} ({type(error).__name__}: {_first_line(error)})",
            hint="graphopt runs what onnx.reference implements; register a kernel for the rest",
        ) from None
    op = evaluator.rt_nodes_[0]
    if op.need_context():
        fed = [n for n in input_names if n]
        return lambda *args: _run_graph(evaluator, fed, output_names, args)

    def run(*args: Any) -> list[Any]:
        results = list(op.run(*args))
        return results + [None] * (len(output_names) - len(results))

    return run


def _run_graph(evaluator: Any, fed: list[str], output_names: list[str], args: Any) -> list[Any]:
    feeds = dict(zip(fed, (a for a in args if a is not None), strict=True))
    results = dict(zip([n for n in output_names if n], evaluator.run(None, feeds), strict=True))
    return [results.get(n) if n else None for n in output_names]


def _no_subgraph(graph: Graph) -> onnx.GraphProto:
    raise AssertionError("nodes with subgraphs are not delegated")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else ""


def _fill(entry: OpEntry) -> None:
    if entry.kernel is None and entry.domain in _DOMAINS_WITH_REFERENCE:
        entry.kernel = onnx_reference_kernel


REGISTRY.add_defaults(_fill)
