"""fuse-qkv: MatMuls that read one input with constant weights become one MatMul and a Split.

Matches (horizontal fusion) two or more MatMuls of one graph that read the same value x as their
first operand, each with a constant 2-D weight W_i of shape [K, N_i] (the same K and element type),
each optionally followed by an Add of a constant per-column bias b_i ([N_i], [1, N_i], ...: ones
but the last axis). BERT's and LLaMA's Q/K/V projections are this (GPT-2 exports one c_attn
already), and so are LLaMA's gate/up projections:

    q = x @ Wq + bq;  k = x @ Wk + bk;  v = x @ Wv + bv
      ->  q, k, v = Split(x @ [Wq | Wk | Wv] + [bq | bk | bv], [Nq, Nk, Nv], axis=-1)

Algebra: column block i of x @ [W_1 | ... | W_n] is x @ W_i (each output column is the dot product
of a row of x with one weight column, whichever other columns sit beside it), and adding the
concatenated bias adds b_i to block i; Split on the last axis hands back the blocks. Members
without a bias get zeros in the concatenated bias (x @ W_i + 0 = x @ W_i). Results are equal up
to the GEMM's summation order.

Refuses, naming the MatMul: a weight read by other nodes too (it would be stored twice), a weight
whose K or element type differs from the group's, a Split axis that cannot be written (unknown
rank before opset 11). A bias Add is left outside the fusion (its MatMul joins without a bias)
when the MatMul's output has other readers or the bias is not a per-column constant of the same
element type. A group of one is no group, and not reported.

The Split's outputs stand for the old MatMul (or Add) outputs, so the patterns that read Q/K/V
(fuse-attention's per-head Reshape/Transpose) see the same values from a Split instead of three
MatMuls. Ordering: after fuse-attention (so that an attention fusion that wants the separate
projections, such as ONNX Runtime's packed Attention, sees them first) and before
fuse-matmul-add; run clean-up (eliminate-dead-code) after it like after every fusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt.ir.core import Graph, Node, Value
from graphopt.ir.errors import GraphoptError
from graphopt.ir.inference import constant_value, infer_node, merge_types, type_conflict
from graphopt.ir.types import TensorType
from graphopt.passes.manager import GraphPass, PassContext, register_pass

__all__ = ["FuseQKV"]

WEIGHT_LIMIT = 1 << 62  # elements: weights of any size are read


@dataclass
class _Member:
    matmul: Node
    weight: np.ndarray  # [K, N]
    bias: np.ndarray | None  # [N] when an Add of this member's bias joins
    add: Node | None
    out: Value  # the value the Split's output replaces

    @property
    def columns(self) -> int:
        return int(self.weight.shape[1])


def _constant(value: Value | None) -> np.ndarray | None:
    return constant_value(value, WEIGHT_LIMIT)


def _bias_of(matmul: Node, weight: np.ndarray) -> tuple[Node, np.ndarray] | None:
    """The Add of a per-column constant bias that alone reads `matmul`'s output, if any."""
    out = matmul.outputs[0]
    users = out.users()
    if len(users) != 1 or len(out.uses) != 1 or users[0].op != "Add":
        return None
    add = users[0]
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    bias = _constant(other)
    rank = out.type.rank if isinstance(out.type, TensorType) else None
    if bias is None or rank is None or bias.ndim > rank or bias.dtype != weight.dtype:
        return None
    n = weight.shape[1]
    if any(d != 1 for d in bias.shape[:-1]) or (bias.ndim and bias.shape[-1] not in (1, n)):
        return None
    return add, np.broadcast_to(bias.reshape(-1), (n,))


def _member(matmul: Node, context: PassContext) -> _Member | None:
    """The MatMul as a group member (None: no constant 2-D weight, or refused with a note)."""
    w = matmul.inputs[1]
    weight = _constant(w)
    if weight is None or weight.ndim != 2:
        return None
    assert w is not None
    if len(w.uses) != 1:
        context.refuse(matmul, "its weight is read by other nodes too: it would be stored twice")
        return None
    found = _bias_of(matmul, weight)
    if found is None:
        return _Member(matmul, weight, None, None, matmul.outputs[0])
    add, bias = found
    return _Member(matmul, weight, bias, add, add.outputs[0])


def _groups(graph: Graph) -> list[tuple[Value, list[Node]]]:
    """MatMuls of `graph` by their first operand, for operands read by two or more of them."""
    by_input: dict[Value, list[Node]] = {}
    for node in graph:
        if node.op == "MatMul" and node.inputs[0] is not None and node.inputs[1] is not None:
            by_input.setdefault(node.inputs[0], []).append(node)
    return [(x, nodes) for x, nodes in by_input.items() if len(nodes) >= 2]


def _fuse(graph: Graph, x: Value, members: list[_Member], context: PassContext) -> None:
    opsets = context.model.opset_imports
    opset = context.model.opset
    first = members[0].matmul  # graph order: every member reads x, defined before the first
    weight = np.concatenate([m.weight for m in members], axis=1)
    sizes = [m.columns for m in members]

    def insert(op: str, inputs: list[Value | None], outputs: int = 1, **attrs: object) -> Node:
        node = Node(op, inputs, dict(attrs), outputs=outputs)
        graph.insert_before(first, node)
        _type(node, opsets)
        return node

    product = insert("MatMul", [x, graph.add_initializer(None, weight)])
    fused = product.outputs[0]
    if any(m.bias is not None for m in members):
        parts = [
            m.bias if m.bias is not None else np.zeros(m.columns, weight.dtype) for m in members
        ]
        bias = graph.add_initializer(None, np.concatenate(parts).astype(weight.dtype))
        fused = insert("Add", [fused, bias]).outputs[0]
    rank = x.type.rank if isinstance(x.type, TensorType) else None
    axis = -1 if rank is None else max(rank - 1, 0)
    if opset >= 13:
        split_sizes = graph.add_initializer(None, np.asarray(sizes, np.int64))
        split = insert("Split", [fused, split_sizes], len(members), axis=axis)
    else:
        split = insert("Split", [fused], len(members), axis=axis, split=sizes)
    for member, piece in zip(members, split.outputs, strict=True):
        piece.type = merge_types(piece.type, member.out.type)
        member.out.replace_all_uses_with(piece)
    for member in members:
        used = [member.matmul.inputs[1]]
        if member.add is not None:
            used += list(member.add.inputs)
            graph.remove(member.add)
        graph.remove(member.matmul)
        for value in used:
            if value is not None and value.is_constant and not value.is_used:
                if graph.initializers.get(value.name or "") is value:
                    graph.remove_initializer(value)


def _type(node: Node, opsets: dict[str, int]) -> None:
    try:
        inferred = infer_node(node, opsets)
    except GraphoptError:
        return
    for value, t in zip(node.outputs, inferred, strict=False):
        if type_conflict(value.type, t) is None:
            value.type = merge_types(value.type, t)


@register_pass(
    "fuse-qkv", "MatMuls sharing an input with constant weights -> one MatMul (+ bias) and a Split"
)
@dataclass
class FuseQKV(GraphPass):
    def run_on_graph(self, graph: Graph, context: PassContext) -> bool:
        changed = False
        for x, nodes in _groups(graph):
            found = [m for m in (_member(n, context) for n in nodes) if m is not None]
            members = self.agreeing(x, found, context)
            if len(members) < 2:
                continue
            rank = x.type.rank if isinstance(x.type, TensorType) else None
            if rank is None and context.model.opset < 11:
                context.refuse(
                    members[0].matmul,
                    "Split on the last axis of an operand of unknown rank needs opset 11",
                )
                continue
            _fuse(graph, x, members, context)
            changed = True
        return changed

    def agreeing(self, x: Value, found: list[_Member], context: PassContext) -> list[_Member]:
        """The members whose weights share the K and element type most members have."""
        if not found:
            return []
        keys = [(m.weight.shape[0], m.weight.dtype) for m in found]
        best = max(set(keys), key=keys.count)
        x_dtype = x.type.dtype if isinstance(x.type, TensorType) else None
        kept = []
        for member, key in zip(found, keys, strict=True):
            if key != best:
                context.refuse(member.matmul, f"its weight is {list(member.weight.shape)} "
                               f"{member.weight.dtype}, the group's K is {best[0]} ({best[1]})")  # fmt: skip
            elif x_dtype is not None and x_dtype.numpy != member.weight.dtype:
                context.refuse(member.matmul, "its weight's element type differs from its input's")
            else:
                kept.append(member)
        return kept
