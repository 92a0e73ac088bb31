"""The SSA IR: values with use-def chains, nodes, graphs (with nested subgraphs) and models.

Rules the mutation methods keep, so that passes never patch them by hand:
- A `Value` is defined once: by a node output, a graph input, or an initializer (`const_value`).
- `value.uses` lists every `(node, input index)` that reads it, updated only by `Node.set_input`,
  `Graph.insert_*`/`remove` and `Value.replace_all_uses_with`. Graph outputs are ordinary uses by the
  graph's `return_node`, so replacing a value that is a graph output needs no special case.
- A graph's nodes form an intrusive doubly linked list in topological order: insert and remove are
  O(1) and iterating while mutating is safe. A node's uses are registered when it is inserted into a
  graph and dropped when it is removed, so a node built and then abandoned leaves no trace.
- Subgraphs (If/Loop/Scan bodies) are `Graph`s held in node attributes; their nodes may read values of
  enclosing graphs, and those reads are uses like any other.
Values, nodes and graphs compare by identity.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.ir.errors import InvalidGraphError
from graphopt.ir.types import Type, tensor_type_of

RETURN_OP = "return"


class Value:
    """One SSA value: a node output, a graph input or an initializer."""

    __slots__ = (
        "name", "type", "producer", "index", "const_value", "graph", "doc_string", "metadata",
        "_uses",
    )  # fmt: skip

    def __init__(
        self,
        name: str | None = None,
        type: Type | None = None,
        *,
        const_value: np.ndarray | None = None,
    ):
        self.name = name
        self.type = type
        self.producer: Node | None = None
        self.index = 0
        self.const_value = const_value
        self.graph: Graph | None = None  # set for graph inputs and initializers
        self.doc_string = ""
        self.metadata: dict[str, str] = {}
        self._uses: dict[tuple[Node, int], None] = {}
        if const_value is not None and type is None:
            self.type = tensor_type_of(const_value)

    @property
    def uses(self) -> list[tuple[Node, int]]:
        """Every `(node, input index)` reading this value, graph outputs included."""
        return list(self._uses)

    def users(self) -> list[Node]:
        """The distinct nodes reading this value (the graph's return node included)."""
        return list(dict.fromkeys(node for node, _ in self._uses))

    @property
    def is_used(self) -> bool:
        return bool(self._uses)

    @property
    def is_constant(self) -> bool:
        """True for an initializer that is not also an overridable graph input."""
        return self.const_value is not None and not self.is_graph_input

    @property
    def is_graph_input(self) -> bool:
        return self.graph is not None and self.producer is None and self in self.graph._input_set

    @property
    def is_graph_output(self) -> bool:
        return any(node.op == RETURN_OP for node, _ in self._uses)

    @property
    def owning_graph(self) -> Graph | None:
        """The graph that defines this value."""
        return self.producer.graph if self.producer is not None else self.graph

    def replace_all_uses_with(self, other: Value) -> None:
        """Make every reader of this value read `other` instead (graph outputs included)."""
        if other is self:
            return
        for node, index in list(self._uses):
            node.set_input(index, other)

    def __repr__(self) -> str:
        return f"Value(%{self.name}: {self.type})"


class AttrKind(enum.IntEnum):
    """Attribute kinds, numbered as ONNX's `AttributeProto.AttributeType`."""

    FLOAT = 1
    INT = 2
    STRING = 3
    TENSOR = 4
    GRAPH = 5
    FLOATS = 6
    INTS = 7
    STRINGS = 8
    TENSORS = 9
    GRAPHS = 10
    SPARSE_TENSOR = 11
    SPARSE_TENSORS = 12
    TYPE_PROTO = 13
    TYPE_PROTOS = 14


@dataclass
class Attribute:
    """A typed attribute value.

    Values: FLOAT -> float, INT -> int, STRING -> bytes, TENSOR -> np.ndarray, GRAPH -> Graph,
    TYPE_PROTO -> Type, SPARSE_TENSOR -> onnx.SparseTensorProto (kept opaque), and lists of those for
    the plural kinds. `ref` names the function attribute this one refers to (function bodies only).
    """

    kind: AttrKind
    value: Any
    ref: str | None = None
    doc_string: str = ""

    @property
    def is_graph(self) -> bool:
        return self.kind in (AttrKind.GRAPH, AttrKind.GRAPHS)

    def graphs(self) -> list[Graph]:
        if self.ref is not None:
            return []
        if self.kind is AttrKind.GRAPH:
            return [self.value]
        if self.kind is AttrKind.GRAPHS:
            return list(self.value)
        return []


def attr(value: Any) -> Attribute:
    """Infer the kind of a plain Python attribute value: `attr(1)`, `attr([1.0, 2.0])`, `attr("x")`."""
    if isinstance(value, Attribute):
        return value
    if isinstance(value, (bool, int, np.integer)):
        return Attribute(AttrKind.INT, int(value))
    if isinstance(value, (float, np.floating)):
        return Attribute(AttrKind.FLOAT, float(value))
    if isinstance(value, str):
        return Attribute(AttrKind.STRING, value.encode())
    if isinstance(value, bytes):
        return Attribute(AttrKind.STRING, value)
    if isinstance(value, np.ndarray):
        return Attribute(AttrKind.TENSOR, value)
    if isinstance(value, Graph):
        return Attribute(AttrKind.GRAPH, value)
    if isinstance(value, (list, tuple)):
        items = list(value)
        if items and all(isinstance(v, (bool, int, np.integer)) for v in items):
            return Attribute(AttrKind.INTS, [int(v) for v in items])
        if items and all(isinstance(v, (int, float, np.number)) for v in items):
            return Attribute(AttrKind.FLOATS, [float(v) for v in items])
        if items and all(isinstance(v, (str, bytes)) for v in items):
            return Attribute(
                AttrKind.STRINGS, [v.encode() if isinstance(v, str) else v for v in items]
            )
        if items and all(isinstance(v, np.ndarray) for v in items):
            return Attribute(AttrKind.TENSORS, items)
        if items and all(isinstance(v, Graph) for v in items):
            return Attribute(AttrKind.GRAPHS, items)
        if not items:
            return Attribute(AttrKind.INTS, [])
    raise TypeError(f"cannot infer the attribute kind of {value!r}; pass an Attribute")


def split_op(op: str) -> tuple[str, str]:
    """`"com.microsoft.Gelu"` -> `("com.microsoft", "Gelu")`; `"MatMul"` -> `("", "MatMul")`."""
    domain, _, op_type = op.rpartition(".")
    if domain == "ai.onnx":
        domain = ""
    return domain, op_type


def join_op(domain: str, op_type: str) -> str:
    return op_type if domain in ("", "ai.onnx") else f"{domain}.{op_type}"


class Node:
    """One operation: `op` (domain-qualified), inputs (a `None` input is an omitted optional one),
    outputs, attributes, and optional name, device and doc string."""

    __slots__ = (
        "domain", "op_type", "_inputs", "outputs", "attrs", "name", "device", "doc_string",
        "metadata", "overload", "graph", "_prev", "_next",
    )  # fmt: skip

    def __init__(
        self,
        op: str,
        inputs: Sequence[Value | None] = (),
        attrs: dict[str, Any] | None = None,
        *,
        outputs: Sequence[Value] | int = 1,
        name: str = "",
        device: str | None = None,
    ):
        self.domain, self.op_type = split_op(op)
        self._inputs: list[Value | None] = list(inputs)
        if isinstance(outputs, int):
            outputs = [Value() for _ in range(outputs)]
        self.outputs: list[Value] = list(outputs)
        for index, value in enumerate(self.outputs):
            if value.producer is not None or value.graph is not None:
                raise InvalidGraphError(f"value %{value.name} is already defined elsewhere")
            value.producer = self
            value.index = index
        self.attrs: dict[str, Attribute] = {k: attr(v) for k, v in (attrs or {}).items()}
        self.name = name
        self.device = device
        self.doc_string = ""
        self.metadata: dict[str, str] = {}
        self.overload = ""
        self.graph: Graph | None = None
        self._prev: Node | None = None
        self._next: Node | None = None

    @property
    def op(self) -> str:
        return join_op(self.domain, self.op_type)

    @property
    def inputs(self) -> tuple[Value | None, ...]:
        return tuple(self._inputs)

    @property
    def output(self) -> Value:
        """The single output of a one-output node."""
        if len(self.outputs) != 1:
            raise ValueError(f"{self} has {len(self.outputs)} outputs; use .outputs")
        return self.outputs[0]

    def set_input(self, index: int, value: Value | None) -> None:
        """Point input `index` at `value`, keeping both values' use lists exact."""
        old = self._inputs[index]
        if old is value:
            return
        attached = self.graph is not None
        if attached and old is not None:
            del old._uses[(self, index)]
        self._inputs[index] = value
        if attached and value is not None:
            value._uses[(self, index)] = None

    def set_inputs(self, values: Sequence[Value | None]) -> None:
        """Replace the whole input list (its length may change)."""
        attached = self.graph is not None
        if attached:
            self._drop_uses()
        self._inputs = list(values)
        if attached:
            self._add_uses()

    def get_attr(self, name: str, default: Any = None) -> Any:
        """The plain value of attribute `name` (strings decoded), or `default`."""
        a = self.attrs.get(name)
        if a is None:
            return default
        if a.kind is AttrKind.STRING:
            return a.value.decode("utf-8", "replace")
        if a.kind is AttrKind.STRINGS:
            return [s.decode("utf-8", "replace") for s in a.value]
        return a.value

    def set_attr(self, name: str, value: Any) -> None:
        self.attrs[name] = attr(value)
        if self.graph is not None:
            self.graph._track_subgraphs(self)

    @property
    def has_subgraphs(self) -> bool:
        if self.graph is not None:
            return self in self.graph._holders
        return bool(self.subgraphs())

    def subgraphs(self) -> list[Graph]:
        graphs: list[Graph] = []
        for a in self.attrs.values():
            if a.kind is AttrKind.GRAPH or a.kind is AttrKind.GRAPHS:  # most nodes: none
                graphs.extend(a.graphs())
        return graphs

    def _add_uses(self) -> None:
        for index, value in enumerate(self._inputs):
            if value is not None:
                value._uses[(self, index)] = None
        for sub in self.subgraphs():
            sub.parent = self

    def _drop_uses(self) -> None:
        for index, value in enumerate(self._inputs):
            if value is not None:
                value._uses.pop((self, index), None)

    def __repr__(self) -> str:
        label = f" '{self.name}'" if self.name else ""
        return f"Node({self.op}{label})"

    def describe(self) -> str:
        """How error messages name this node: op, name and first output."""
        first = self.outputs[0].name if self.outputs else None
        parts = [self.op]
        if self.name:
            parts.append(f"'{self.name}'")
        if first:
            parts.append(f"-> %{first}")
        return "node " + " ".join(parts)


class NameScope:
    """The value names taken in a model (shared by a graph and all its subgraphs)."""

    def __init__(self) -> None:
        self.taken: set[str] = set()
        self._counter = itertools.count()

    def fresh(self, hint: str = "v") -> str:
        name = hint
        while name in self.taken:
            name = f"{hint}_{next(self._counter)}"
        self.taken.add(name)
        return name


class Graph:
    """A list of nodes in topological order, with inputs, initializers and outputs.

    Outputs are the inputs of `return_node`; `output_names` are the names the outputs carry outside
    (kept when a pass swaps the value behind an output).
    """

    def __init__(self, name: str = "main", *, scope: NameScope | None = None):
        self.name = name
        self.scope = scope or NameScope()
        self.inputs: list[Value] = []
        self._input_set: set[Value] = set()
        self.initializers: dict[str, Value] = {}
        self.return_node = Node(RETURN_OP, outputs=0)
        self.return_node.graph = self
        self.output_names: list[str] = []
        self.parent: Node | None = None  # the node whose attribute holds this subgraph
        self.doc_string = ""
        self.metadata: dict[str, str] = {}
        self._head: Node | None = None
        self._tail: Node | None = None
        self._count = 0
        # nodes holding subgraphs, so walks over nested graphs skip the other 99.9% of nodes;
        # kept by insert/remove/Node.set_attr (set graph attributes through set_attr)
        self._holders: dict[Node, None] = {}

    # ----- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Node]:
        """Nodes in order; removing the current node while iterating is safe."""
        node = self._head
        while node is not None:
            following = node._next
            yield node
            node = following

    def __reversed__(self) -> Iterator[Node]:
        node = self._tail
        while node is not None:
            previous = node._prev
            yield node
            node = previous

    def __len__(self) -> int:
        return self._count

    @property
    def nodes(self) -> list[Node]:
        return list(self)

    @property
    def outputs(self) -> list[Value]:
        return list(self.return_node._inputs)  # type: ignore[arg-type]

    def all_nodes(self) -> Iterator[Node]:
        """Nodes of this graph and, depth first, of every subgraph."""
        if not self._holders:
            yield from self
            return
        for node in self:
            yield node
            if node in self._holders:
                for sub in node.subgraphs():
                    yield from sub.all_nodes()

    def count_all(self) -> int:
        """Nodes of this graph and of all its subgraphs."""
        return self._count + sum(
            sub.count_all() for node in self._holders for sub in node.subgraphs()
        )

    def nested_graphs(self) -> Iterator[Graph]:
        """Every subgraph below this graph, innermost first."""
        for node in list(self._holders):
            for sub in node.subgraphs():
                yield from sub.nested_graphs()
                yield sub

    def _track_subgraphs(self, node: Node) -> None:
        if node.graph is self and node.subgraphs():
            self._holders[node] = None
        else:
            self._holders.pop(node, None)

    def subgraph(self, name: str) -> Graph:
        """A new empty graph sharing this graph's name scope (for If/Loop/Scan bodies)."""
        return Graph(name, scope=self.scope)

    # ----- inputs, initializers, outputs -------------------------------------------------------
    def _claim(self, value: Value, hint: str) -> None:
        if value.name is None:
            value.name = self.scope.fresh(hint)
        else:
            self.scope.taken.add(value.name)

    def add_input(self, name: str | None, type: Type | None = None) -> Value:
        value = Value(name, type)
        value.graph = self
        self._claim(value, "input")
        self.inputs.append(value)
        self._input_set.add(value)
        return value

    def add_initializer(self, name: str | None, array: np.ndarray) -> Value:
        """A constant (initializer) value holding `array` (kept as is: no copy)."""
        value = Value(name, const_value=array)
        value.graph = self
        self._claim(value, "const")
        if value.name in self.initializers:
            raise InvalidGraphError(f"initializer %{value.name} is defined twice", where=self.name)
        self.initializers[value.name] = value  # type: ignore[index]
        return value

    def set_input_default(self, value: Value, array: np.ndarray) -> None:
        """Give graph input `value` a default (an initializer that callers may override)."""
        value.const_value = array
        self.initializers[value.name] = value  # type: ignore[index]

    def freeze_input(self, value: Value) -> None:
        """Make graph input `value`, which has a default, a constant: callers can no longer
        override it and it leaves the graph's inputs (its readers are unchanged)."""
        if value not in self._input_set or value.const_value is None:
            raise InvalidGraphError(f"%{value.name} is not a graph input with a default")
        self.inputs.remove(value)
        self._input_set.discard(value)

    def remove_initializer(self, value: Value) -> None:
        if value.is_used:
            raise InvalidGraphError(f"cannot remove initializer %{value.name}: it is still used")
        if self.initializers.get(value.name or "") is not value:  # renamed since it was added
            self.initializers = {k: v for k, v in self.initializers.items() if v is not value}
        else:
            del self.initializers[value.name or ""]

    def remove_input(self, value: Value) -> None:
        if value.is_used:
            raise InvalidGraphError(f"cannot remove input %{value.name}: it is still used")
        self.inputs.remove(value)
        self._input_set.discard(value)

    def set_outputs(self, values: Sequence[Value], names: Sequence[str] | None = None) -> None:
        self.return_node.set_inputs(values)
        self.output_names = list(names) if names is not None else [v.name or "" for v in values]

    def add_output(self, value: Value, name: str | None = None) -> None:
        self.set_outputs(self.outputs + [value], self.output_names + [name or value.name or ""])

    # ----- node list mutation ------------------------------------------------------------------
    def _attach(self, node: Node, prev: Node | None, nxt: Node | None) -> Node:
        if node.graph is not None:
            raise InvalidGraphError(f"{node.describe()} is already in graph '{node.graph.name}'")
        node.graph = self
        node._prev, node._next = prev, nxt
        if prev is None:
            self._head = node
        else:
            prev._next = node
        if nxt is None:
            self._tail = node
        else:
            nxt._prev = node
        self._count += 1
        self._track_subgraphs(node)
        for value in node.outputs:
            self._claim(value, node.op_type.lower())
        node._add_uses()
        return node

    def append(self, node: Node) -> Node:
        return self._attach(node, self._tail, None)

    def insert_before(self, anchor: Node, node: Node) -> Node:
        self._check_member(anchor)
        return self._attach(node, anchor._prev, anchor)

    def insert_after(self, anchor: Node, node: Node) -> Node:
        self._check_member(anchor)
        return self._attach(node, anchor, anchor._next)

    def remove(self, node: Node, *, force: bool = False) -> None:
        """Take `node` out of the graph. Its outputs must be unused unless `force`."""
        self._check_member(node)
        if not force:
            for value in node.outputs:
                if value.is_used:
                    users = ", ".join(u.describe() for u in value.users()[:3])
                    raise InvalidGraphError(
                        f"cannot remove {node.describe()}: output %{value.name} is used by {users}",
                        hint="replace its uses first (Value.replace_all_uses_with)",
                    )
        node._drop_uses()
        for sub in node.subgraphs():
            sub._drop_all_uses()
        if node._prev is None:
            self._head = node._next
        else:
            node._prev._next = node._next
        if node._next is None:
            self._tail = node._prev
        else:
            node._next._prev = node._prev
        node._prev = node._next = None
        node.graph = None
        self._count -= 1
        self._holders.pop(node, None)

    def _drop_all_uses(self) -> None:
        for node in self:
            node._drop_uses()
            for sub in node.subgraphs():
                sub._drop_all_uses()
        self.return_node._drop_uses()

    def _check_member(self, node: Node) -> None:
        if node.graph is not self:
            raise InvalidGraphError(f"{node.describe()} is not in graph '{self.name}'")

    def replace_node(
        self, old: Node, new_nodes: Sequence[Node], new_outputs: Sequence[Value]
    ) -> None:
        """Insert `new_nodes` before `old`, route `old`'s outputs to `new_outputs`, drop `old`."""
        for node in new_nodes:
            self.insert_before(old, node)
        for old_value, new_value in zip(old.outputs, new_outputs, strict=True):
            old_value.replace_all_uses_with(new_value)
        self.remove(old)

    def sort_topologically(self) -> None:
        """Reorder the nodes so that every value is defined before it is read (stable: keeps the
        current order where it is already valid). Raises `InvalidGraphError` naming a cycle."""
        order = list(self)
        position = {node: i for i, node in enumerate(order)}
        pending = {node: 0 for node in order}
        readers: dict[Node, list[Node]] = {node: [] for node in order}
        for node in order:
            for dep in _local_dependencies(node, self):
                pending[node] += 1  # a node reading its own output is a cycle of one
                readers[dep].append(node)
        import heapq

        ready = [position[n] for n, count in pending.items() if count == 0]
        heapq.heapify(ready)
        result: list[Node] = []
        while ready:
            node = order[heapq.heappop(ready)]
            result.append(node)
            for reader in readers[node]:
                pending[reader] -= 1
                if pending[reader] == 0:
                    heapq.heappush(ready, position[reader])
        if len(result) != len(order):
            stuck = [n for n in order if pending[n] > 0]
            cycle = _find_cycle(stuck, self)
            raise InvalidGraphError(
                "the graph has a cycle: " + " -> ".join(n.describe() for n in cycle),
                where=f"graph '{self.name}'",
                hint="every value must be computed before it is used; break the loop or use a Loop op",
            )
        self._head = self._tail = None
        previous: Node | None = None
        for node in result:
            node._prev = previous
            node._next = None
            if previous is None:
                self._head = node
            else:
                previous._next = node
            previous = node
        self._tail = previous

    def __repr__(self) -> str:
        return f"Graph(@{self.name}, {self._count} nodes)"


def _local_dependencies(node: Node, graph: Graph) -> Iterable[Node]:
    """Producers in `graph` of the values `node` reads, subgraph captures included."""
    for value in _values_read(node):
        producer = value.producer
        inner = False
        while producer is not None and producer.graph is not graph:
            parent_graph = producer.graph
            producer = parent_graph.parent if parent_graph is not None else None
            inner = True
        if producer is not None and not (inner and producer is node):  # not the body's own
            yield producer


def _values_read(node: Node) -> Iterator[Value]:
    for value in node._inputs:
        if value is not None:
            yield value
    for sub in node.subgraphs():
        for inner in sub.all_nodes():
            yield from (v for v in inner._inputs if v is not None)
        yield from (v for v in sub.return_node._inputs if v is not None)


def _find_cycle(stuck: list[Node], graph: Graph) -> list[Node]:
    stuck_set = set(stuck)
    node = stuck[0]
    seen: dict[Node, int] = {}
    path: list[Node] = []
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = next(d for d in _local_dependencies(node, graph) if d in stuck_set)
    cycle = path[seen[node] :] + [node]
    return list(reversed(cycle))


@dataclass
class Model:
    """A main graph with the model-level facts ONNX keeps around it."""

    graph: Graph
    opset_imports: dict[str, int] = field(default_factory=lambda: {"": 21})
    ir_version: int = 10
    producer_name: str = "graphopt"
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    functions: list[Any] = field(default_factory=list)  # onnx.FunctionProto, carried as is

    @property
    def opset(self) -> int:
        """The default-domain (ai.onnx) opset version."""
        return self.opset_imports.get("", self.opset_imports.get("ai.onnx", 1))
