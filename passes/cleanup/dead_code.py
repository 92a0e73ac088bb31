"""eliminate-dead-code: remove nodes and initializers whose results nothing reads.

One walk from the last node to the first: a node whose outputs have no readers is removed, which
may leave its producers without readers, and they come later in the walk, so chains of dead nodes
go in one pass. Graph inputs stay (they are the model's interface); unused initializers go. ONNX
ops have no side effects, so a node nobody reads is never needed; random ops included.

Equal because: removed nodes feed nothing that reaches a graph output.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphopt.ir.core import Graph
from graphopt.passes.manager import GraphPass, PassContext, register_pass


@register_pass("eliminate-dead-code", "remove nodes and initializers whose results nothing reads")
@dataclass
class EliminateDeadCode(GraphPass):
    def run_on_graph(self, graph: Graph, context: PassContext) -> bool:
        changed = False
        for node in reversed(graph):
            if node.outputs and not any(v.is_used for v in node.outputs):
                graph.remove(node)
                changed = True
        for value in list(graph.initializers.values()):
            if not value.is_used and not value.is_graph_input:
                graph.remove_initializer(value)
                changed = True
        return changed
