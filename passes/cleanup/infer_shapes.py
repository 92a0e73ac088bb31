"""infer-shapes: give every value the most precise type its op's rules prove.

One walk over the nodes in topological order, outer graphs before the subgraphs they hold (a
body's inference needs the types of the values it reads from outside). Each node's output types
come from the op registry (`graphopt.ir.inference.infer_node`: ONNX's own inference for standard
ops, so symbolic dims such as `batch` propagate through elementwise ops, MatMul, Reshape with 0,
Transpose, Concat ...), merged with what the graph declares: static dims beat symbols, known beats
unknown. An If's outputs take what both branches agree on.

It refuses nothing, but a declared type that contradicts inference (f32 declared, i64 computed;
dim 3 declared, 4 computed) is an error naming the node: the model is inconsistent.

Equal because: only types change, never nodes or values.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphopt.ir.core import Graph, Model, Node
from graphopt.ir.errors import InvalidGraphError
from graphopt.ir.inference import infer_node, merge_types, type_conflict
from graphopt.ir.types import Type
from graphopt.passes.manager import ModelPass, PassContext, register_pass


@register_pass("infer-shapes", "give every value the most precise type its op's rules prove")
@dataclass
class InferShapes(ModelPass):
    def run(self, model: Model, context: PassContext) -> bool:
        return self._graph(model.graph, model)

    def _graph(self, graph: Graph, model: Model) -> bool:
        # Node -> what its inputs and outputs were when it was last inferred: in a fixpoint this
        # pass runs again and again, and a node whose neighbourhood is unchanged is skipped.
        seen: dict[Node, tuple[object, ...]] = self.__dict__.setdefault("_seen", {})
        changed = False
        for node in graph:
            subgraphs = node.subgraphs() if node.has_subgraphs else ()
            for sub in subgraphs:
                changed |= self._graph(sub, model)
            if not subgraphs and seen.get(node) == _signature(node):
                continue
            inferred = (
                _branch_types(node)
                if node.op == "If"
                else infer_node(node, model.opset_imports, check=False)  # checked by verify
            )
            for value, t in zip(node.outputs, inferred, strict=False):
                conflict = type_conflict(value.type, t)
                if conflict:
                    raise InvalidGraphError(
                        f"{node.describe()}: output %{value.name}: {conflict}",
                        where=f"graph '{graph.name}'",
                        hint="the declared type (value_info) is wrong; remove it or fix the model",
                    )
                merged = merge_types(value.type, t)
                if merged != value.type:
                    value.type = merged
                    changed = True
            seen[node] = _signature(node)
        return changed


def _signature(node: Node) -> tuple[object, ...]:
    inputs = tuple((id(v), v.type) if v is not None else None for v in node.inputs)
    return inputs, tuple(v.type for v in node.outputs)


def _branch_types(node: Node) -> list[Type | None]:
    then_branch: Graph = node.get_attr("then_branch")
    else_branch: Graph = node.get_attr("else_branch")
    types: list[Type | None] = []
    for a, b in zip(then_branch.outputs, else_branch.outputs, strict=False):
        types.append(a.type if a.type == b.type else None)
    return types
