"""A small builder for writing graphs in Python: `b.MatMul(x, w)` appends a node and returns its output.

    g = Graph("main")
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.FLOAT, ("batch", 4)))
    w = b.const(np.ones((4, 3), np.float32), "w")
    y = b.Relu(b.MatMul(x, w))
    g.set_outputs([y])

Any attribute access names an op (`b.Add`, `b.op("com.microsoft.Gelu", ...)`); keyword arguments are
attributes; `_outputs=n` asks for several outputs (returned as a tuple). Nodes go at the end of the
graph, or before `insert_before` when given, which is how rewrites place replacements.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from graphopt.ir.core import Graph, Node, Value


class Builder:
    def __init__(self, graph: Graph, *, insert_before: Node | None = None, name_prefix: str = ""):
        self.graph = graph
        self.insert_before = insert_before
        self.name_prefix = name_prefix
        self.created: list[Node] = []

    def const(self, array: Any, name: str | None = None) -> Value:
        """An initializer holding `array` (numpy arrays are kept, not copied)."""
        return self.graph.add_initializer(name, np.asarray(array))

    def op(
        self,
        op: str,
        *inputs: Value | None,
        _outputs: int = 1,
        _name: str = "",
        _attrs: Mapping[str, Any] | None = None,
        **attrs: Any,
    ) -> Any:
        """Append (or insert) a node; `_attrs` passes attributes held in a dict (e.g. copied
        from another node) beside the keyword ones."""
        node = Node(op, inputs, {**(_attrs or {}), **attrs}, outputs=_outputs, name=_name)
        if self.insert_before is not None:
            self.graph.insert_before(self.insert_before, node)
        else:
            self.graph.append(node)
        self.created.append(node)
        return node.outputs[0] if _outputs == 1 else tuple(node.outputs)

    def __getattr__(self, op: str) -> Callable[..., Any]:
        if op.startswith("_"):
            raise AttributeError(op)
        return lambda *inputs, **attrs: self.op(op, *inputs, **attrs)
