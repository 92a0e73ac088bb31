"""fold-constants: compute nodes whose inputs are all constants once, at optimization time.

One forward walk in topological order: a node whose inputs are all constants (initializers that
callers cannot override) is run with the reference interpreter's kernel, and its outputs become
initializers, so chains of constant nodes fold in the same walk. `Constant` nodes become
initializers. An `If` whose condition is constant is replaced by the nodes of the branch it takes.

It refuses (and the pass report says so, naming the node) when:
- a folded output would have more than `max_elements` elements (folding an Expand or Tile of a
  small constant would bloat the file: the model keeps computing it);
- the op is random (RandomNormal, Bernoulli, ...), or a quantization marker (QuantizeLinear,
  DequantizeLinear: quantized weights stay quantized; passes that own them fold them);
- the op has no kernel, or its kernel fails on these inputs (the node stays; its error surfaces
  when the model runs).

Equal because: a node's output depends only on its inputs and attributes, and these are the same
at every run; the kernels are the reference interpreter's, i.e. the ONNX spec's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.backends.reference import Interpreter
from graphopt.ir.core import Graph, Node, Value
from graphopt.ir.errors import GraphoptError
from graphopt.ir.types import tensor_type_of
from graphopt.passes.manager import GraphPass, PassContext, register_pass

RANDOM_OPS = frozenset(
    """RandomNormal RandomUniform RandomNormalLike RandomUniformLike Multinomial Bernoulli
    Dropout""".split()
)
KEEP_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


@register_pass("fold-constants", "compute nodes whose inputs are all constants at compile time")
@dataclass
class FoldConstants(GraphPass):
    max_elements: int = 1 << 28

    def run_on_graph(self, graph: Graph, context: PassContext) -> bool:
        interpreter = Interpreter(context.model)
        changed = False
        for node in graph:
            if node.op == "If" and _constant(node.inputs[0]) is not None:
                _inline_if(graph, node)
                changed = True
                continue
            if not self._foldable(node, context):
                continue
            arrays = [None if v is None else v.const_value for v in node.inputs]
            try:
                results = interpreter.run_node(node, arrays)
            except GraphoptError:
                raise
            except Exception as error:  # the node fails on these constants: leave it be
                context.refuse(node, f"not folded: {type(error).__name__}: {error}")
                continue
            if not self._fits(node, results, context):
                continue
            for value, array in zip(node.outputs, results, strict=True):
                if value.is_used:
                    value.replace_all_uses_with(_initializer(graph, value, array))
            graph.remove(node)
            changed = True
        return changed

    def _foldable(self, node: Node, context: PassContext) -> bool:
        if node.domain != "" or node.op_type in RANDOM_OPS or node.op_type in KEEP_OPS:
            return False
        if node.subgraphs() or not node.outputs:
            return False
        return all(v is None or v.is_constant for v in node.inputs)

    def _fits(self, node: Node, results: list[Any], context: PassContext) -> bool:
        for array in results:
            if not isinstance(array, np.ndarray):
                return False  # sequences, optionals: no initializer can hold them
            if array.size > self.max_elements:
                return context.refuse(
                    node,
                    f"not folded: the result has {array.size} elements, over "
                    f"max-elements={self.max_elements}",
                )
        return True


def _constant(value: Value | None) -> np.ndarray | None:
    return value.const_value if value is not None and value.is_constant else None


def _initializer(graph: Graph, value: Value, array: np.ndarray) -> Value:
    """An initializer for a folded output: the output's name when free, its declared type kept
    where it is as precise (symbolic dims in a declared type never beat the real shape)."""
    name = graph.scope.fresh(value.name or "folded")
    folded = graph.add_initializer(name, np.asarray(array))
    folded.type = tensor_type_of(folded.const_value)  # type: ignore[arg-type]
    return folded


def _inline_if(graph: Graph, node: Node) -> None:
    """Replace an If with a constant condition by the nodes of the branch it takes."""
    cond = _constant(node.inputs[0])
    assert cond is not None
    branch: Graph = node.get_attr("then_branch" if bool(cond.reshape(-1)[0]) else "else_branch")
    results = branch.outputs
    branch.set_outputs([])
    for value in list(branch.initializers.values()):
        assert value.const_value is not None
        moved = graph.add_initializer(graph.scope.fresh(value.name or "c"), value.const_value)
        value.replace_all_uses_with(moved)
        results = [moved if r is value else r for r in results]
    for inner in list(branch):
        branch.remove(inner, force=True)
        graph.insert_before(node, inner)
    for old, new in zip(node.outputs, results, strict=True):
        old.replace_all_uses_with(new)
    graph.remove(node)
