"""The verifier: checks that a model obeys the IR's rules, and names the first node that does not.

Rules checked, in one linear walk per graph (subgraphs see the enclosing graph's values defined
before their node):
- every value is defined once (a node output, a graph input or an initializer), and every node
  input and graph output is defined before it is read (so the order is topological, no cycles);
- use lists are exact: each read is recorded in the value's uses, and each recorded use is a real
  read by a node that is still in a graph (no dangling users);
- the node list is well linked, initializers hold arrays matching their types;
- with `types=True`, each node's input element types fit its op's type constraints;
- with `shapes=True` too, each node's declared output types agree with what its op's inference gives
  for its inputs (element type, rank, static dims): a mismatch is a user error, not a crash later.

Passes run it after every change in tests and with `--verify-each`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from graphopt.ir.core import Graph, Model, Node, Value
from graphopt.ir.errors import InvalidGraphError
from graphopt.ir.inference import check_input_types, infer_node, type_conflict
from graphopt.ir.types import TensorType, tensor_type_of

__all__ = ["verify", "verify_graph"]


def verify(model: Model | Graph, *, types: bool = True, shapes: bool = True) -> None:
    """Raise `InvalidGraphError` naming the node and the broken rule, or return None."""
    if isinstance(model, Model):
        verify_graph(model.graph, opset_imports=model.opset_imports, types=types, shapes=shapes)
    else:
        verify_graph(model, types=types, shapes=shapes)


def verify_graph(
    graph: Graph,
    *,
    opset_imports: Mapping[str, int] | None = None,
    types: bool = True,
    shapes: bool = True,
) -> None:
    _Verifier(opset_imports or {"": 21}, types, shapes and types).graph(graph, frozenset())


class _Verifier:
    def __init__(self, opset_imports: Mapping[str, int], types: bool, shapes: bool):
        self.opset_imports = opset_imports
        self.types = types
        self.shapes = shapes
        self.defined_anywhere: set[Value] = set()

    def fail(self, graph: Graph, message: str, hint: str | None = None) -> InvalidGraphError:
        return InvalidGraphError(message, where=f"graph '{graph.name}'", hint=hint)

    def graph(self, graph: Graph, outer: frozenset[Value]) -> None:
        visible = set(outer)
        for value in graph.inputs:
            self.define(graph, value, visible, "a graph input")
        for name, value in graph.initializers.items():
            if value in visible and value.is_graph_input:
                self.check_initializer(graph, name, value)
                continue
            self.define(graph, value, visible, "an initializer")
            self.check_initializer(graph, name, value)
        self.check_links(graph)
        for node in graph:
            self.reads(graph, node, visible)
            for sub in node.subgraphs():
                if sub.parent is not node:
                    raise self.fail(graph, f"{node.describe()} holds a subgraph owned elsewhere")
                self.graph(sub, frozenset(visible))
            for index, value in enumerate(node.outputs):
                if value.producer is not node or value.index != index:
                    raise self.fail(
                        graph, f"{node.describe()}: output %{value.name} is not its own"
                    )
                self.define(graph, value, visible, node.describe())
            if self.shapes:
                self.check_types(graph, node)
            elif self.types:
                check_input_types(node, self.opset_imports)
        self.reads(graph, graph.return_node, visible)
        for value in visible - outer:
            self.check_uses(graph, value)

    def define(self, graph: Graph, value: Value, visible: set[Value], by: str) -> None:
        if value in self.defined_anywhere:
            raise self.fail(
                graph,
                f"%{value.name} is defined twice (again by {by})",
                hint="every value has exactly one definition; create a new Value instead",
            )
        self.defined_anywhere.add(value)
        visible.add(value)

    def reads(self, graph: Graph, node: Node, visible: set[Value]) -> None:
        for index, value in enumerate(node.inputs):
            if value is None:
                continue
            if value not in visible:
                reader = "the graph's outputs" if node is graph.return_node else node.describe()
                later = value.producer is not None and value.producer.graph is graph
                raise self.fail(
                    graph,
                    f"{reader} reads %{value.name} before it is defined"
                    if later
                    else f"{reader} reads %{value.name}, which is not defined in this graph "
                    "or an enclosing one",
                    hint="sort the graph (Graph.sort_topologically) or break the cycle"
                    if later
                    else "insert its producer into the graph, or replace the use",
                )
            if (node, index) not in value._uses:
                reader = "the graph's outputs" if node is graph.return_node else node.describe()
                raise self.fail(graph, f"{reader} reads %{value.name} but is not in its use list")

    def check_uses(self, graph: Graph, value: Value) -> None:
        for user, index in value._uses:
            attached = user.graph is not None
            if not attached or index >= len(user.inputs) or user.inputs[index] is not value:
                raise self.fail(
                    graph,
                    f"%{value.name} lists {user.describe()} as a user, but that node "
                    + ("is no longer in a graph" if not attached else "does not read it there"),
                    hint="change uses only with Node.set_input / Value.replace_all_uses_with",
                )

    def check_links(self, graph: Graph) -> None:
        count = 0
        previous: Node | None = None
        for node in graph:
            if node.graph is not graph or node._prev is not previous:
                raise self.fail(graph, f"{node.describe()} is not properly linked into the graph")
            previous = node
            count += 1
        if count != len(graph) or graph._tail is not previous:
            raise self.fail(graph, "the node list is corrupt (count or tail is wrong)")

    def check_initializer(self, graph: Graph, name: str, value: Value) -> None:
        array = value.const_value
        if value.name != name or not isinstance(array, np.ndarray):
            raise self.fail(graph, f"initializer '{name}' is malformed (name or value)")
        if isinstance(value.type, TensorType):
            actual = tensor_type_of(array)
            if actual.dtype != value.type.dtype or (
                value.type.shape is not None
                and len(value.type.shape) == array.ndim
                and any(
                    isinstance(d, int) and d != s
                    for d, s in zip(value.type.shape, array.shape, strict=True)
                )
            ):
                raise self.fail(
                    graph,
                    f"initializer %{name} holds {actual} but is typed {value.type}",
                )

    def check_types(self, graph: Graph, node: Node) -> None:
        inferred = infer_node(node, self.opset_imports)
        for value, t in zip(node.outputs, inferred, strict=False):
            conflict = type_conflict(value.type, t)
            if conflict:
                raise self.fail(
                    graph,
                    f"{node.describe()}: output %{value.name}: {conflict}",
                    hint="fix the declared type (value_info) or the node's inputs",
                )
