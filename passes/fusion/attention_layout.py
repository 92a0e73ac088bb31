"""fuse-attention's layout rule: a 4-D `Attention` between head splits and a head merge -> the
3-D form, with LLaMA's `repeat_kv` folded into grouped-query attention.

`graphopt.from_torch` states `scaled_dot_product_attention` as a 4-D Attention [b, H, s, D], so
the model's head reshapes stay around it (per layer 4 Transposes and 4 Reshapes, and for
LLaMA the Unsqueeze, Expand and Reshape of repeat_kv on K and V):

    q = Transpose(Reshape(q3 [b, S, Hq*D], [b, S, Hq, D]), perm=[0, 2, 1, 3])    (K, V alike,
    k = repeat_kv(Transpose(Reshape(k3, [b, L, Hk, D]), perm=[0, 2, 1, 3]))        v with Dv)
    y = Attention(q, k, v, mask?, scale?, is_causal?, softcap?, ...)               [b, Hq, S, Dv]
    o = Reshape(Transpose(y, perm=[0, 2, 1, 3]), [b, S, Hq*Dv])

becomes

    o = Attention(q3, k3, v3, mask?, ..., q_num_heads=Hq, kv_num_heads=Hk)         [b, S, Hq*Dv]

where `repeat_kv` is `Reshape(Expand(Unsqueeze(x, 2), [b, h, n, L, D]), [b, h*n, L, D])` (what
transformers writes and torch.export keeps), a 4-D RotaryEmbedding (no num_heads) on a split is
turned into the 3-D one, and the merged value's Reshape readers read the 3-D output directly
(any other reader gets one `Reshape(o, [0, 0, Hq, Dv])`). Shape readers of the 4-D values (the
frontend reads Q's and K's sequence lengths to expand the mask) are re-pointed at the 3-D ones:
dim 0 and 2 of the split are dims 0 and 1 of its source, dims 1 and 3 are the numbers H and D.

Why equal: Attention-23 defines the 3-D form as exactly this reshape to [b, s, H, D] and
transpose of Q, K, V, and the transpose/reshape of the output back to [b, S, Hq*Dv]; the mask,
`scale` (its default 1/sqrt(D) reads the same head size), `is_causal`, `softcap`,
`qk_matmul_output_mode` and `softmax_precision` mean the same in both forms and are copied. The
repeat makes head j of the expanded K/V a copy of head j // n of x, and grouped-query attention
maps query head i to K/V head i // (Hq / Hkv): with Hkv = h the same head as i // (Hq / (h n)) // n
(Hq need only be a multiple of h). So the outputs are bit-identical in the reference interpreter
(the same arithmetic on the same numbers).

Not folded: a `Tile` or a `Concat` of copies along the heads makes head j a copy of head j mod h,
not j // n, which Attention's grouping cannot express (torch.export does not write them for
transformers' repeat_kv, checked on the zoo's LLaMA).

One side alone is not rewritten. The Attention spec takes Q, K, V and gives Y all 3-D or all 4-D, so a lone side costs the other side's
reshapes back: a merged output with 4-D inputs would put a Reshape and Transpose on each of Q, K
and V to save one Transpose (a loss); split inputs with a 4-D reader of the output would save
three Transposes and add one back (perhaps a small win, but not measured, and not what
torch.export writes: models merge sdpa's output right away). Such nodes stay 4-D with a note.

Refuses, naming the node: an Attention with past key/value or `nonpad_kv_seqlen` inputs, or with
its present/qk outputs read; Q, K or V that is not such a head split (or whose transpose has
another perm); a split, repeat or rotary value read outside the chain (other than by Shape);
K and V repeated differently; head counts or head sizes that do not line up (Q's split heads
not the Attention's, Hq not a multiple of Hk, Q's head size not K's); an output not merged by
Transpose(perm=[0, 2, 1, 3]). Shapes come from the pass's dims analysis (symbolic batch and
sequence dims are fine; the head counts and sizes must be numbers).

Order: inside fuse-attention, after its MatMul/Softmax fusion (whose 4-D results it does not
revisit: those kept 4-D because a side was not a head split); `form=4d` turns it off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.ir.builder import Builder
from graphopt.ir.core import Graph, Node, Value
from graphopt.ir.errors import GraphoptError
from graphopt.ir.inference import infer_node, merge_types, type_conflict
from graphopt.ir.types import TensorType
from graphopt.passes.cleanup.shape_values import ShapeValues
from graphopt.passes.fusion.attention_patterns import (
    HeadMerge,
    HeadSplit,
    clear_dim,
    head_merge,
    head_split,
    only_feeds,
    producer,
    remove_dead,
    repeat_kv,
    safe_to_read_merged,
    shape_feeders,
)

__all__ = ["LayoutRefused", "fold_attention_layouts"]

_SAME_ATTRS = ("scale", "is_causal", "softcap", "qk_matmul_output_mode", "softmax_precision")


class LayoutRefused(Exception):
    """A 4-D Attention that stays 4-D; the message says why."""


@dataclass
class _Side:
    """Q, K or V: the head split it comes from, the nodes between it and the Attention."""

    split: HeadSplit
    rotary: Node | None = None  # a 4-D RotaryEmbedding of the split
    times: int = 1  # repeat_kv's factor
    chain: list[Node] = field(default_factory=list)  # split, rotary, repeat nodes
    four_d: list[Value] = field(default_factory=list)  # [b, H, s, D] values whose Shape we remap


@dataclass
class _Layout:
    node: Node
    q: _Side
    k: _Side
    v: _Side
    q_heads: int
    kv_heads: int
    merge: HeadMerge


def fold_attention_layouts(
    graph: Graph,
    nodes: list[Node],
    sv: ShapeValues,
    opsets: dict[str, int],
    refuse: Callable[[Node, str], object],
) -> int:
    """Rewrite each 4-D Attention of `nodes` (in `graph`) that the rule accepts; returns how
    many. `sv` must describe the graph as it is; each rewrite only removes nodes of its own
    match, so the facts about the other candidates stay true."""
    done = 0
    for node in nodes:
        if node.graph is not graph or node.op != "Attention" or node.get_attr("q_num_heads", 0):
            continue
        dims = sv.dims.dims(node.inputs[0]) if node.inputs[0] is not None else None
        if dims is None or len(dims) != 4:
            continue  # 3-D already, or a rank the analysis does not know
        try:
            found = _match(node, sv)
        except LayoutRefused as why:
            refuse(node, f"4-D Attention kept: {why}")
            continue
        _rewrite(graph, sv, opsets, found)
        done += 1
    return done


# ----- matching ---------------------------------------------------------------------------------


def _match(node: Node, sv: ShapeValues) -> _Layout:
    if any(v is not None for v in node.inputs[4:]):
        raise LayoutRefused("it has past key/value or nonpad_kv_seqlen inputs (a KV cache)")
    if any(v.is_used for v in node.outputs[1:]):
        raise LayoutRefused("its present key/value or qk outputs are read")
    q_in, k_in, v_in = node.inputs[:3]
    if q_in is None or k_in is None or v_in is None:
        raise LayoutRefused("Q, K or V is missing")
    q, k, v = (
        _side(value, name, node, sv) for value, name in ((q_in, "Q"), (k_in, "K"), (v_in, "V"))
    )
    if k.times != v.times:
        raise LayoutRefused(f"K is repeated {k.times} times over the heads, V {v.times} times")
    dq, dk, dv = (sv.dims.dims(x) or () for x in (q_in, k_in, v_in))
    if not len(dq) == len(dk) == len(dv) == 4:
        raise LayoutRefused(f"Q, K, V have ranks {len(dq)}, {len(dk)}, {len(dv)} (0: unknown)")
    q_heads, kv_heads = q.split.heads, k.split.heads
    if dq[1] != q_heads:
        raise LayoutRefused(f"Q's split has {q_heads} heads, the Attention's Q {dq[1]}")
    if v.split.heads != kv_heads or dk[1] != kv_heads * k.times or dv[1] != dk[1]:
        raise LayoutRefused(
            f"K's split has {kv_heads} heads and V's {v.split.heads} (repeated {k.times} times),"
            f" the Attention's K {dk[1]} and V {dv[1]}: they do not line up"
        )
    if q_heads % kv_heads:
        raise LayoutRefused(f"Q's {q_heads} heads are not a multiple of K's {kv_heads}")
    if q.split.head_dim != k.split.head_dim:
        raise LayoutRefused(f"Q's head size {q.split.head_dim} is not K's {k.split.head_dim}")
    out = node.outputs[0]
    merge = head_merge(out, (dq[0], q_heads, dq[2], v.split.head_dim), sv)
    if merge is None:
        raise LayoutRefused(
            "the output is not merged back by Transpose(perm=[0, 2, 1, 3]): the 3-D form takes"
            " Q, K, V and gives the output all 3-D, so it would need a Reshape and Transpose back"
            " (no win)"
        )
    sinks = set(merge.nodes) | {node}
    for value in [n.outputs[0] for n in merge.nodes[:-1]]:
        for user in value.users():
            if user.op in ("Shape", "Size") and not only_feeds(user, sinks, sv):
                raise LayoutRefused(f"the shape of %{value.name} is read by {user.describe()}")
    return _Layout(node, q, k, v, q_heads, kv_heads, merge)


def _side(value: Value, name: str, node: Node, sv: ShapeValues) -> _Side:
    """`value` as a head split, through repeat_kv and a 4-D RotaryEmbedding."""
    chain: list[Node] = []
    four_d = [value]
    times = 1
    repeat = repeat_kv(value, sv) if name != "Q" else None
    if repeat is not None:
        chain += repeat.nodes
        times = repeat.times
        value = repeat.source
        four_d.append(value)
    rotary = value.producer
    if (
        rotary is not None and rotary.op == "RotaryEmbedding" and not rotary.get_attr("num_heads", 0)
        and value is rotary.outputs[0] and rotary.inputs[0] is not None
    ):  # fmt: skip
        chain.append(rotary)
        value = rotary.inputs[0]
        four_d.append(value)
    else:
        rotary = None
    split = head_split(value, sv)
    if split is None:
        transpose = producer(value, "Transpose")
        if transpose is not None and producer(transpose.inputs[0], "Reshape") is not None:
            perm = list(transpose.get_attr("perm", []))
            raise LayoutRefused(
                f"{name}'s head split transposes with perm {perm}, not [0, 2, 1, 3]"
                if perm != [0, 2, 1, 3]
                else f"{name}'s Reshape is not a split of [b, s, H*D] into [b, s, H, D] with"
                " known H and D"
            )
        what = value.producer.describe() if value.producer is not None else f"%{value.name}"
        raise LayoutRefused(
            f"{name} is not a head split Transpose(Reshape(x, [b, s, H, D])): {what}"
        )
    chain += split.nodes
    inside = set(chain) | {node}
    for member in chain:
        for out in member.outputs:
            for user in out.users():
                if user in inside or (user.op == "Shape" and out in four_d):
                    continue
                who = "a graph output" if user.op == "return" else user.describe()
                raise LayoutRefused(f"{name}'s %{out.name} is also read by {who}")
    return _Side(split, rotary, times, chain, four_d)


# ----- rewriting --------------------------------------------------------------------------------


def _rewrite(graph: Graph, sv: ShapeValues, opsets: dict[str, int], m: _Layout) -> None:
    node = m.node
    b = Builder(graph, insert_before=node)
    q3, k3, v3 = (_source(b, side) for side in (m.q, m.k, m.v))
    attrs: dict[str, Any] = {n: a.value for n, a in node.attrs.items() if n in _SAME_ATTRS}
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    inputs = [q3, k3, v3] + ([mask] if mask is not None else [])
    y = b.op(
        "Attention", *inputs, _name=node.name, _attrs=attrs,
        q_num_heads=m.q_heads, kv_num_heads=m.kv_heads,
    )  # fmt: skip
    for value in (q3, k3, v3):  # ONNX Runtime's inference needs the hidden sizes
        _refine(sv, value)
    _finish(b, opsets)
    dv = m.v.split.head_dim
    old = node.outputs[0].type
    dims = sv.dims.dims(node.inputs[0]) or (None, None, None, None)
    if isinstance(old, TensorType):
        known = TensorType(old.dtype, (clear_dim(dims[0]), clear_dim(dims[2]), m.q_heads * dv))
        if type_conflict(y.type, known) is None:
            y.type = merge_types(y.type, known)
    for side in (m.q, m.k, m.v):  # the split's source has the dims of the rotary's output
        for at, four in enumerate(side.four_d):  # the first is the repeated value, if any
            heads = side.split.heads * (side.times if at == 0 else 1)
            _remap_shapes(graph, opsets, four, side.split.source, heads, side.split.head_dim)
    _remap_shapes(graph, opsets, node.outputs[0], y, m.q_heads, dv)
    _use_merged(b, sv, y, m)
    _finish(b, opsets)
    dead = [node, *m.merge.nodes, *m.q.chain, *m.k.chain, *m.v.chain]
    remove_dead(graph, dead + shape_feeders(dead))


def _source(b: Builder, side: _Side) -> Value:
    """The 3-D input: the split's source, through a 3-D RotaryEmbedding for a 4-D one."""
    if side.rotary is None:
        return side.split.source
    rot = side.rotary
    attrs = {n: a for n, a in rot.attrs.items() if n != "num_heads"}
    return b.op(  # type: ignore[no-any-return]
        "RotaryEmbedding", side.split.source, *rot.inputs[1:], num_heads=side.split.heads,
        _attrs=attrs,
    )  # fmt: skip


def _remap_shapes(
    graph: Graph, opsets: dict[str, int], four: Value, three: Value, heads: int, size: int
) -> None:
    """`Shape(four [b, H, s, D], start, end)` readers read the 3-D value: dims 0 and 2 of `four`
    are dims 0 and 1 of `three` [b, s, H*D], dims 1 and 3 the numbers H and D. The new nodes go
    right before each reader (`three` is defined before `four`, or before the reader)."""
    for user in [u for u in four.users() if u.op == "Shape"]:
        b = Builder(graph, insert_before=user)
        start, end = user.get_attr("start", 0), user.get_attr("end", 4)
        start, end = (min(max(a + 4 if a < 0 else a, 0), 4) for a in (start, end))
        parts: list[Value] = []
        for axis in range(start, end):
            if axis in (0, 2):
                at = axis // 2
                parts.append(b.Shape(three, start=at, end=at + 1))
            else:
                parts.append(b.const(np.array([heads if axis == 1 else size], np.int64)))
        if not parts:
            new = b.const(np.zeros(0, np.int64))
        else:
            new = parts[0] if len(parts) == 1 else b.Concat(*parts, axis=0)
        _finish(b, opsets)
        user.outputs[0].replace_all_uses_with(new)


def _use_merged(b: Builder, sv: ShapeValues, y: Value, m: _Layout) -> None:
    """Readers of the merged [b, s, H, Dv] value read the [b, s, H*Dv] output instead."""
    merged = m.merge.output
    bridge: Value | None = None
    for reader, index in list(merged.uses):
        if safe_to_read_merged(reader, index, sv):
            reader.set_input(index, y)
            continue
        if bridge is None:
            shape = np.array([0, 0, m.q_heads, m.v.split.head_dim], np.int64)
            bridge = b.Reshape(y, b.const(shape))
        reader.set_input(index, bridge)


def _refine(sv: ShapeValues, value: Value) -> None:
    """Give a node output the dims the analysis proves (types only get more precise)."""
    dims, dtype = sv.dims.dims(value), sv.dims.dtype(value)
    if value.producer is None or dims is None or dtype is None:
        return
    known = TensorType(dtype, tuple(clear_dim(e) for e in dims))
    if type_conflict(value.type, known) is None:
        value.type = merge_types(value.type, known)


def _finish(b: Builder, opsets: dict[str, int]) -> None:
    """Give the new nodes their inferred types."""
    for node in b.created:
        if node.graph is None or all(v.type is not None for v in node.outputs):
            continue
        try:
            inferred = infer_node(node, opsets)
        except GraphoptError as error:
            raise GraphoptError(f"fuse-attention built an invalid node: {error}") from None
        for value, t in zip(node.outputs, inferred, strict=False):
            if type_conflict(value.type, t) is None:
                value.type = merge_types(value.type, t)
