"""An example graphopt backend plugin (see docs/backends.md): `example-numpy`.

It supports a handful of ops (MatMul, Gemm, Add, Sub, Mul, Div, Relu, Tanh, Sigmoid, Identity)
and "compiles" a graph into a list of numpy closures run in order. Small on purpose: it shows the
three things a backend provides (what it supports, compile, run) and how it registers, through
the `graphopt.backends` entry point in this package's pyproject.toml.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from graphopt.backends.base import Backend, BackendError, Executable
from graphopt.ir import Model, Node

BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "MatMul": np.matmul,
}  # fmt: skip
UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Relu": lambda x: np.maximum(x, 0),
    "Tanh": np.tanh,
    "Sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "Identity": lambda x: x,
}


def _gemm(node: Node) -> Callable[..., np.ndarray]:
    alpha, beta = node.get_attr("alpha", 1.0), node.get_attr("beta", 1.0)
    trans_a, trans_b = node.get_attr("transA", 0), node.get_attr("transB", 0)

    def run(a: np.ndarray, b: np.ndarray, c: np.ndarray | None = None) -> np.ndarray:
        y = alpha * ((a.T if trans_a else a) @ (b.T if trans_b else b))
        return (y if c is None else y + beta * c).astype(a.dtype)

    return run


class ExampleExecutable(Executable):
    def __init__(self, model: Model):
        graph = model.graph
        self.input_names = [v.name or "" for v in graph.inputs]
        self.output_names = list(graph.output_names)
        self.constants = {id(v): v.const_value for v in graph.initializers.values()}
        self.steps: list[tuple[Callable[..., Any], list[int | None], int]] = []
        for node in graph:
            function: Callable[..., Any]
            if node.op in BINARY:
                function = BINARY[node.op]
            elif node.op in UNARY:
                function = UNARY[node.op]
            else:
                function = _gemm(node)
            inputs = [id(v) if v is not None else None for v in node.inputs]
            self.steps.append((function, inputs, id(node.outputs[0])))
        self.inputs = [id(v) for v in graph.inputs]
        self.outputs = [id(v) for v in graph.outputs]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values: dict[int | None, Any] = dict(self.constants)
        values[None] = None
        for key, name in zip(self.inputs, self.input_names, strict=True):
            values[key] = np.asarray(inputs[name])
        for function, args, out in self.steps:
            values[out] = function(*(values[a] for a in args))
        return {
            name: values[key] for name, key in zip(self.output_names, self.outputs, strict=True)
        }


class ExampleNumpyBackend(Backend):
    name = "example-numpy"
    description = "example plugin: numpy closures for elementwise, MatMul and Gemm graphs"

    def supports(self, node: Node, opset: int) -> bool:
        return node.op in BINARY or node.op in UNARY or node.op == "Gemm"

    def compile(self, model: Model, target: str | None = None, **options: Any) -> Executable:
        missing = self.unsupported(model)
        if missing:
            names = ", ".join(n.describe() for n in missing[:3])
            raise BackendError(
                f"example-numpy cannot run {len(missing)} node(s): {names}",
                hint="use another backend, or split the graph",
            )
        return ExampleExecutable(model)
