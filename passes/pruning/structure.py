"""Dependency analysis for structured pruning: which slices of which tensors must go together.

Removing an output channel of a Conv also removes the BatchNormalization entries after it, the
matching input channel of every Conv that reads it, and, across a residual Add, the same channel
of every layer that writes into that stream. Removing an MLP neuron removes a column of the up
(and gate) projection, its bias entry, and a row of the down projection; removing an attention head
removes head-sized column blocks of Q, K and V, rows of the output projection, and changes the
head counts written in the Attention/RotaryEmbedding attributes and in Reshape/Split constants.

The analysis finds these **regions** by walking use-def chains from each layer's output. Every
position along the tracked axis of a tensor gets a *position id*; ops relate ids:

- element-wise ops (and BatchNormalization, pooling, Transpose, Reshape that keeps the axis) give
  their output the ids of their input; where two tracked tensors meet (`silu(gate) * up`, a
  residual `Add`), their ids are **unioned** position by position;
- `Split`/`Concat` along the axis slice or concatenate ids;
- attention unions every position of a key/value head with the positions of the query heads that
  read it (grouped-query attention: removing a KV head removes its whole group of query heads),
  and the output positions of those query heads;
- a depthwise Conv unions each input channel with its output channels.

A **unit** is a class of unioned ids: the smallest thing that can be removed (a channel, a neuron,
a KV-head group). What is removed from each tensor is the set of its positions whose unit goes.
Layers whose weights produce tracked positions are *sources* (their output columns/filters are
sliced), layers that read them with a constant weight are *sinks* (their input rows/channels are
sliced) and end the walk.

Anything the analysis cannot prove safe refuses the whole region (`Region.refusal`, naming the
node): a graph input or output in the region (its shape is the caller's), an op it does not know,
a tensor whose channels another op mixes (LayerNormalization, Softmax over the axis, Slice, Gather
along it), a Shape that reads the axis, a Reshape whose shape it cannot rewrite, a weight that is
not a constant, a 4-D attention layout. One region is computed per walk; walks start at every
MatMul/Gemm/Conv with a constant weight whose output no earlier region holds.

`analyze(graph) -> list[Region]`: everything is read through use lists; each node is related once,
by its op's rule in `propagation.py`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from graphopt.ir.core import RETURN_OP, Graph, Node, Value
from graphopt.ir.types import TensorType

__all__ = [
    "ATTENTION",
    "AttrEdit",
    "ConstEdit",
    "MaskEdit",
    "Positions",
    "Region",
    "ReshapeEdit",
    "SplitEdit",
    "Refused",
    "Walk",
    "constant_of",
    "rank_of",
    "shape_of",
    "analyze",
]

UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Gelu", "Erf", "Exp", "Neg", "Abs", "Sqrt", "Softplus",
    "Softsign", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Mish", "Identity", "Cast",
    "Dropout", "Clip", "Reciprocal", "Log", "Sin", "Cos", "ThresholdedRelu",
    "com.microsoft.FastGelu", "com.microsoft.Gelu", "com.microsoft.BiasGelu",
    "com.microsoft.QuickGelu",
}  # fmt: skip
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu", "Where"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1"}
ATTENTION = {"Attention", "com.microsoft.MultiHeadAttention"}
ROTARY = {"RotaryEmbedding", "com.microsoft.RotaryEmbedding"}
CONVS = ("Conv", "FusedConv")  # com.microsoft.FusedConv: Conv (+ Z) + activation
MIXERS = {
    "LayerNormalization", "RMSNormalization", "GroupNormalization", "LpNormalization",
    "com.microsoft.SkipLayerNormalization", "com.microsoft.SkipSimplifiedLayerNormalization",
    "com.microsoft.SimplifiedLayerNormalization", "Softmax", "LogSoftmax", "Hardmax",
}  # fmt: skip


class Positions:
    """Union-find over position ids (one id per position along a tracked axis)."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def fresh(self, count: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, i: int) -> int:
        parent = self.parent
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(int(i)) for i in ids), dtype=np.int64, count=len(ids))


@dataclass
class ConstEdit:
    """Slice constant input `index` of `node` along `axis`, positions `ids` (one per index)."""

    node: Node
    index: int
    axis: int
    ids: np.ndarray
    role: str  # "source" (output columns/filters), "sink" (input rows/channels), "param"


@dataclass
class ReshapeEdit:
    """Entry `entry` of `node`'s (Reshape) shape becomes the kept count of `ids`."""

    node: Node
    entry: int
    ids: np.ndarray


@dataclass
class SplitEdit:
    """`node` (Split along the tracked axis): output k keeps its positions among `ids[k]`."""

    node: Node
    ids: list[np.ndarray]


@dataclass
class AttrEdit:
    """Attribute `name` of `node` becomes (kept positions of `ids`) // `per`."""

    node: Node
    name: str
    ids: np.ndarray
    per: int = 1


@dataclass
class MaskEdit:
    """Input `index` of attention `node` (a mask over `heads` query heads, or of unknown head dim:
    `known` False) keeps the kept heads' slices: positions `ids` of Q, `per` per head."""

    node: Node
    index: int
    heads: int
    known: bool
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    per: int = 1


@dataclass
class Region:
    """Tensors whose positions along one axis must be removed together, and the edits that do it."""

    seed: Node
    positions: Positions
    values: dict[Value, tuple[int, np.ndarray]] = field(default_factory=dict)
    consts: list[ConstEdit] = field(default_factory=list)
    reshapes: list[ReshapeEdit] = field(default_factory=list)
    splits: list[SplitEdit] = field(default_factory=list)
    attrs: list[AttrEdit] = field(default_factory=list)
    masks: list[MaskEdit] = field(default_factory=list)
    nodes: set[Node] = field(default_factory=set)
    refusal: str = ""
    refused_at: Node | None = None
    _units: np.ndarray | None = None

    @property
    def kind(self) -> str:
        """ "attention" (holds an attention op), "conv" (Conv layers) or "dense" (MatMul/Gemm)."""
        ops = {n.op for n in self.nodes}
        if ops & ATTENTION:
            return "attention"
        if any(e.node.op_type in CONVS and e.role != "param" for e in self.consts):
            return "conv"
        return "dense"

    @property
    def sources(self) -> list[ConstEdit]:
        return [e for e in self.consts if e.role == "source"]

    @property
    def sinks(self) -> list[ConstEdit]:
        return [e for e in self.consts if e.role == "sink"]

    def units(self) -> tuple[np.ndarray, int]:
        """(the sorted root ids, one per unit; the number of units). Computed once, after the
        walk (later walks only union their own fresh ids)."""
        if self._units is None:
            arrays = {id(ids): ids for _, ids in self.values.values()}
            self._units = np.unique(
                np.concatenate([self.positions.roots(ids) for ids in arrays.values()])
            )
        return self._units, len(self._units)

    def unit_of(self, ids: np.ndarray) -> np.ndarray:
        roots, _ = self.units()
        return np.searchsorted(roots, self.positions.roots(ids))

    def describe(self) -> str:
        first = self.seed.outputs[0].name if self.seed.outputs else ""
        return f"the {self.kind} group from {self.seed.op} -> %{first}"


class Refused(Exception):
    def __init__(self, node: Node | None, reason: str):
        super().__init__(reason)
        self.node, self.reason = node, reason


def shape_of(value: Value | None) -> tuple | None:
    t = value.type if value is not None else None
    return t.shape if isinstance(t, TensorType) else None


def rank_of(value: Value) -> int:
    shape = shape_of(value)
    if shape is None:
        raise Refused(value.producer, f"the rank of %{value.name} is unknown")
    return len(shape)


def constant_of(value: Value | None) -> np.ndarray | None:
    if value is None or not value.is_constant:
        return None
    return value.const_value


class Walk:
    """One region: a worklist of tracked values, each node related once."""

    def __init__(self, seed: Node, positions: Positions):
        self.region = Region(seed, positions)
        self.queue: deque[Value] = deque()
        self.done: set[Node] = set()

    # ----- tracked values ----------------------------------------------------------------------
    def ids(self, value: Value) -> np.ndarray | None:
        entry = self.region.values.get(value)
        return None if entry is None else entry[1]

    def axis(self, value: Value) -> int | None:
        entry = self.region.values.get(value)
        return None if entry is None else entry[0]

    def track(
        self, value: Value, axis: int, ids: np.ndarray | None = None, size: int = 0
    ) -> np.ndarray:
        """Give `value` positions along `axis` (fresh unless `ids`), unioning with what it has."""
        rank = rank_of(value)
        axis %= rank
        known = self.region.values.get(value)
        if known is not None:
            if known[0] != axis:
                raise Refused(
                    value.producer, f"%{value.name} is reached on axes {known[0]} and {axis}"
                )
            if ids is not None:
                if len(ids) != len(known[1]):
                    raise Refused(value.producer, f"%{value.name}: sizes do not line up")
                self.region.positions.union(known[1], ids)
            return known[1]
        if ids is None:
            ids = self.region.positions.fresh(size)
        dim = (shape_of(value) or ())[axis]
        if isinstance(dim, int) and dim != len(ids):
            raise Refused(
                value.producer, f"%{value.name} has {dim} on axis {axis}, expected {len(ids)}"
            )
        self.region.values[value] = (axis, ids)
        self.queue.append(value)
        return ids

    def edit(self, node: Node, index: int, axis: int, ids: np.ndarray, role: str) -> None:
        array = constant_of(node.inputs[index])
        if array is None:
            raise Refused(node, f"input {index} of {node.op} is not a constant")
        if array.shape[axis] != len(ids):
            raise Refused(node, f"a constant of {node.op} does not line up with the channels")
        self.region.consts.append(ConstEdit(node, index, axis, ids, role))

    # ----- the walk ----------------------------------------------------------------------------
    def run(self) -> Region:
        try:
            while self.queue:
                value = self.queue.popleft()
                producer = value.producer
                if producer is None:
                    raise Refused(None, f"%{value.name} is a graph input or constant")
                self.relate(producer)
                for user in value.users():
                    if user.op == RETURN_OP:
                        raise Refused(None, f"%{value.name} is a graph output")
                    self.relate(user)
        except Refused as refused:
            self.region.refusal = refused.reason
            self.region.refused_at = refused.node
        return self.region

    def relate(self, node: Node) -> None:
        if node in self.done:
            return
        self.done.add(node)
        self.region.nodes.add(node)
        if node.subgraphs():
            raise Refused(node, f"{node.op} holds a subgraph")
        from graphopt.passes.pruning.propagation import rule_for

        rule_for(node)(self, node)


def _seed_axis(node: Node) -> int | None:
    """The output axis a layer's weight produces, or None when `node` is not a layer."""
    if len(node.inputs) < 2 or constant_of(node.inputs[1]) is None or not node.outputs:
        return None
    if node.op in ("MatMul", "Gemm") and constant_of(node.inputs[1]).ndim == 2:  # type: ignore[union-attr]
        return -1 if node.op == "MatMul" else 1
    if node.op in ("Conv", "com.microsoft.FusedConv") and node.get_attr("group", 1) == 1:
        return 1
    return None


def analyze(graph: Graph) -> list[Region]:
    """Every region of `graph`, refused ones included (with the reason), in graph order."""
    positions = Positions()
    regions: list[Region] = []
    taken: set[Value] = set()
    for node in graph:
        axis = _seed_axis(node)
        out = node.outputs[0] if node.outputs else None
        if axis is None or out is None or out in taken:
            continue
        walk = Walk(node, positions)
        try:
            walk.track(out, axis if axis >= 0 else rank_of(out) + axis, size=_out_size(node))
        except Refused as refused:
            walk.region.refusal, walk.region.refused_at = refused.reason, refused.node
            regions.append(walk.region)
            continue
        region = walk.run()
        taken.update(region.values)
        regions.append(region)
    return regions


def _out_size(node: Node) -> int:
    weight = constant_of(node.inputs[1])
    assert weight is not None
    if node.op == "MatMul":
        return int(weight.shape[1])
    if node.op == "Gemm":
        return int(weight.shape[0] if node.get_attr("transB", 0) else weight.shape[1])
    return int(weight.shape[0])
