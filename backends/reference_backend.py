"""The `reference` backend: the reference interpreter behind the Backend interface.

It runs every op the op registry has a kernel for, slowly and exactly as the ONNX spec says; it is
what other backends are checked against.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from graphopt.backends.base import Backend, Executable, register_backend
from graphopt.backends.reference import Interpreter
from graphopt.ir.core import Model, Node
from graphopt.ir.registry import REGISTRY


class ReferenceExecutable(Executable):
    def __init__(self, model: Model):
        self.interpreter = Interpreter(model)
        self.input_names = [v.name or "" for v in model.graph.inputs]
        self.output_names = list(model.graph.output_names)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.interpreter.run(inputs)


@register_backend
class ReferenceBackend(Backend):
    name = "reference"
    description = "graphopt's numpy interpreter: every op with a kernel, exact, slow"

    def supports(self, node: Node, opset: int) -> bool:
        entry = REGISTRY.lookup(node.op, opset if node.domain == "" else None)
        return entry is not None and entry.kernel is not None

    def compile(self, model: Model, target: str | None = None, **options: Any) -> Executable:
        return ReferenceExecutable(model)
