"""fuse-attention: scaled dot-product attention as exporters write it -> ONNX `Attention` (opset 23).

Matches, from the MatMul with V back (`passes/fusion/attention_patterns.py` holds the pieces):

    Y = MatMul(P, V)                          P: Softmax(X) over the last axis, or torch's guard
                                              Where(IsNaN(s), 0, s) around it
    X = scores | Add(scores, mask)            an additive float mask (BERT's (1 - m) * min,
      | Where(cond, scores, fill)             transformers' Where(bool, 0, min)), or a bool mask
    scores = MatMul(Q * a, K^T * b) * c       every factor optional, Mul or Div by a one-element
                                              constant (torch's SDPA splits sqrt(scale) over Q, K)
    K^T = Transpose(K, (0, 1, 3, 2)) | Transpose(Reshape(k3), (0, 2, 3, 1)) (folded head split)
        | Reshape(Transpose(Reshape(K, [-1, L, D]), (0, 2, 1)), [b, H, D, L]) (torch.onnx)
    K, V = repeat_kv(K'), repeat_kv(V')       LLaMA's grouped-query repeat, absorbed: Attention
                                              takes kv_num_heads < q_num_heads itself

and emits `Attention(Q, K, V, mask?, scale=a*b*c, is_causal?)`. When Q, K and V are head splits
of [b, s, H*D] tensors (`Transpose(Reshape(x3, [b, s, H, D]), (0, 2, 1, 3))`, a 4-D
RotaryEmbedding of such a split included) and the output is merged back by
`Transpose(Y, (0, 2, 1, 3))`, the 3-D form replaces the reshapes too: `Attention(q3, k3, v3,
q_num_heads=H, kv_num_heads=Hk)` gives [b, s, H*Dv] directly (ONNX Runtime 1.32: 0.6-0.8x the
time of the 4-D form with its transposes); the merged value's readers that are Reshapes read it
directly. Otherwise (`form=4d`, or a side that is not a plain head split) the 4-D form keeps the
exporter's reshapes.

Masks: a mask must broadcast to [b, H, S, L]; ONNX Runtime wants its last two dims exactly S and
L, so one that broadcasts there ([b, 1, 1, L]) or whose dims cannot be proved is expanded once
(`Expand`, shared by the layers that read the same mask with the same dims). A Where mask with a
fill of -inf passes its condition as a bool mask; a finite fill (at most -1e30, e.g. float32's
min) becomes the additive Where(cond, 0, fill). A mask that is exactly causal (j <= i: a
LessOrEqual of two aranges, a constant lower-triangular bool mask, a top-left slice of one such
as GPT-2's `bias[:, :, L-S:L, :L]` once L - S is proved 0), alone or And-ed with true, becomes
`is_causal=1` (option `causal=false` keeps it as a mask).

Why equal: Attention-23 computes softmax((Q sqrt(s)) (K sqrt(s))^T + mask) V per head, with
query head h reading K/V head h // (Hq / Hkv): exactly what the pattern computes with s the product
of its factors, and what repeat_kv's Expand of [b, h, 1, L, D] to [b, h, n, L, D] makes of head
j = h * n + r. The 3-D form is defined as the reshape/transpose the pattern does by hand. A finite
very negative fill `f` replaced by scores + f changes no row with a visible key (exp(f - max)
is 0 in float32 either way) and leaves fully masked rows uniform (scores + f rounds to f for
|scores| < 1e22). Differences: rounding (the scale lands as sqrt(s) on Q and K), and rows with
every key masked by -inf, which the pattern turns into NaN (or 0 with torch's IsNaN guard) and
Attention into 0.

Refuses, saying why: softmax not over the last axis, a Dropout between softmax and V, a scale
applied after the mask, scale factors that are not one-element constants, a second additive
mask, a Where fill above -1e30, a mask not broadcastable to [b, H, S, L] or of rank > 4, K and
V repeated differently, head counts, head dims, batch or sequence dims that do not line up or
cannot be proved to, element types that differ or are not float, an inner value read outside the
pattern, a model opset below 23.

A 4-D Attention already in the graph (`graphopt.from_torch`'s) between head splits and a head
merge is put in the 3-D form, repeat_kv folded into grouped-query attention, by the rule in
`passes/fusion/attention_layout.py` (not with `form=4d`).

Order: after `upgrade-opset` (Attention is opset 23) and the O1 clean-up (it reads the shapes
simplify-shapes proves); after `fuse-rotary`, whose 3-D RotaryEmbedding it reads through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from graphopt.ir.builder import Builder
from graphopt.ir.core import Graph, Node, Value
from graphopt.ir.errors import GraphoptError
from graphopt.ir.inference import constant_value, infer_node, merge_types, type_conflict
from graphopt.ir.types import DType, TensorType
from graphopt.passes.cleanup.shape_dims import Elem
from graphopt.passes.cleanup.shape_values import ShapeValues
from graphopt.passes.fusion.attention_layout import fold_attention_layouts
from graphopt.passes.fusion.attention_patterns import (
    VERY_NEGATIVE,
    HeadMerge,
    HeadSplit,
    analyze,
    causal_condition,
    causal_condition_array,
    clear_dim,
    head_merge,
    head_split,
    key_transpose,
    only_feeds,
    producer,
    remove_dead,
    repeat_kv,
    safe_to_read_merged,
    scalar_constant,
    shape_feeders,
    strip_scale,
)
from graphopt.passes.manager import GraphPass, PassContext, register_pass

__all__ = ["FuseAttention"]

ATTENTION_OPSET = 23
_FLOATS = (DType.FLOAT, DType.FLOAT16, DType.BFLOAT16, DType.DOUBLE)


class _Refused(Exception):
    """A match that cannot be fused; the message says why."""


@dataclass
class _Side:
    """One of Q, K, V: the 4-D value (or how to build it) and, for the 3-D form, its source."""

    value: Value | None  # [b, H, s, D]; None for a K whose transpose was folded into its split
    split: HeadSplit | None = None  # head split of a 3-D source (3-D form)
    rotary: Node | None = None  # a 4-D RotaryEmbedding between the split and `value`


@dataclass
class _Mask:
    kind: str  # "add": additive float mask; "bool": bool condition; "fill": Where(cond, 0, fill)
    value: Value
    fill: float = 0.0
    negate: bool = False  # Where(cond, fill, scores): the condition marks the masked keys


@dataclass
class _Match:
    root: Node
    q: _Side
    k: _Side
    v: _Side
    scale: float
    q_heads: int
    kv_heads: int
    dims: tuple[Elem, Elem, Elem, Elem]  # b, Hq, S, L of the scores
    dtype: DType
    mask: _Mask | None
    causal: bool
    interior: list[Node]
    merge: HeadMerge | None = None


@register_pass(
    "fuse-attention",
    "scaled dot-product attention (MatMul, scale, mask, Softmax, MatMul) -> Attention (opset 23)",
)
@dataclass
class FuseAttention(GraphPass):
    form: Literal["auto", "4d"] = "auto"  # auto: the 3-D form where the head reshapes allow it
    causal: bool = True  # turn exactly causal masks into is_causal=1

    def run_on_graph(self, graph: Graph, context: PassContext) -> bool:
        roots = [n for n in graph if n.op == "MatMul" and _after_softmax(n.inputs[0])]
        # 4-D Attention already there (graphopt.from_torch): attention_layout.py's rule
        four_d = [] if self.form == "4d" else [n for n in graph if _four_d_attention(n)]
        if not roots and not four_d:
            return False
        opsets = context.model.opset_imports
        sv = analyze(graph, opsets)
        found: list[_Match] = []
        for root in roots:
            try:
                found.append(_Matcher(sv, self, context.model.opset).match(root))
            except _Refused as why:
                context.refuse(root, f"attention not fused: {why}")
        opset = context.model.opset
        if found and opset < ATTENTION_OPSET:
            for m in found:
                context.refuse(
                    m.root,
                    f"Attention needs opset {ATTENTION_OPSET}, the model imports {opset}: "
                    "run upgrade-opset first",
                )
            return False
        rewriter = _Rewriter(graph, sv, dict(opsets))
        for m in found:
            rewriter.rewrite(m)
        if found:
            forms = [m.merge is not None for m in found]
            context.note(
                f"fused {len(found)} attention(s): {sum(forms)} in the 3-D form, "
                f"{len(forms) - sum(forms)} in the 4-D form"
            )
        folded = 0
        if four_d:
            if found:  # the fusion changed the graph: prove the shapes again
                sv = analyze(graph, opsets)
            folded = fold_attention_layouts(graph, four_d, sv, dict(opsets), context.refuse)
            if folded:
                context.note(f"put {folded} 4-D Attention(s) in the 3-D form")
        return bool(found) or folded > 0


def _four_d_attention(node: Node) -> bool:
    """An Attention in the 4-D form (no head counts), as graphopt.from_torch writes it."""
    return node.op == "Attention" and not node.get_attr("q_num_heads", 0)


def _after_softmax(value: Value | None) -> bool:
    """Whether `value` is a softmax output, perhaps through torch's guard and a Dropout."""
    where = producer(value, "Where")
    if where is not None and where.inputs[2] is not None:
        value = where.inputs[2]
    dropout = producer(value, "Dropout")
    if dropout is not None:
        value = dropout.inputs[0]
    return producer(value, "Softmax") is not None


# ----- matching ---------------------------------------------------------------------------------


class _Matcher:
    def __init__(self, sv: ShapeValues, options: FuseAttention, opset: int):
        self.sv = sv
        self.options = options
        self.opset = opset
        self.interior: list[Node] = []

    def dims(self, value: Value) -> tuple[Elem, ...]:
        dims = self.sv.dims.dims(value)
        if dims is None:
            raise _Refused(f"the rank of %{value.name} is unknown")
        return dims

    def match(self, root: Node) -> _Match:
        self.interior = [root]
        p, v_side = root.inputs
        assert p is not None and v_side is not None
        p = self._guard(p)
        dropout = producer(p, "Dropout")
        if dropout is not None:
            raise _Refused(
                f"{dropout.describe()} sits between the softmax and V (a Dropout in inference"
                " mode would have been removed by canonicalize)"
            )
        softmax = producer(p, "Softmax")
        assert softmax is not None
        rank = len(self.dims(p))
        if rank != 4:
            raise _Refused(f"the attention weights have rank {rank}, not 4 ([batch, heads, S, L])")
        axis = softmax.get_attr("axis", -1 if self.opset >= 13 else 1)
        if (axis + rank if axis < 0 else axis) != rank - 1:
            raise _Refused(f"the softmax is over axis {axis}, not the last one")
        self.interior.append(softmax)
        x = softmax.inputs[0]
        assert x is not None
        x, outer = strip_scale(x, self.sv, self.interior)
        x, mask = self._mask(x)
        if mask is not None and outer != 1.0:
            raise _Refused("the scale is applied after the mask")
        scores, inner = strip_scale(x, self.sv, self.interior)
        qk = producer(scores, "MatMul")
        if qk is None:
            scaled = scores.producer
            if (
                scaled is not None
                and scaled.op in ("Mul", "Div")
                and any(
                    producer(strip_scale(v, self.sv, [])[0], "MatMul") for v in scaled.inputs if v
                )
            ):
                raise _Refused(
                    f"the scores are scaled by {scaled.describe()}, whose factor is not a"
                    " one-element constant"
                )
            raise _Refused("the softmax does not read a MatMul of Q and K^T (after scale and mask)")
        self.interior.append(qk)
        q_value, q_factor = strip_scale(qk.inputs[0], self.sv, self.interior)  # type: ignore[arg-type]
        kt = key_transpose(qk.inputs[1], self.sv)  # type: ignore[arg-type]
        if kt is None:
            raise _Refused("the second input of the Q MatMul is not a transposed K")
        self.interior.extend(kt.nodes)
        scale = outer * inner * q_factor * kt.factor
        if not scale > 0 or not np.isfinite(scale):
            raise _Refused(
                f"the scale {scale:g} is not positive (Attention splits its square root over Q and K)"
            )
        k_value = kt.key
        rk = kt.repeat or (repeat_kv(k_value, self.sv) if k_value is not None else None)
        rv = repeat_kv(v_side, self.sv)
        if (rk is None) != (rv is None) or (rk and rv and rk.times != rv.times):
            raise _Refused("K and V do not repeat their heads the same way")
        if rk is not None and rv is not None:
            self.interior += ([] if kt.repeat else rk.nodes) + rv.nodes
            k_value, v_side = rk.source, rv.source
        q = self._side(q_value)
        v = self._side(v_side)
        if k_value is None:
            assert kt.split is not None
            k = _Side(None, kt.split)
            dk = self.dims(kt.split.output)
            dk = (dk[0], dk[1], dk[3], dk[2])
        else:
            k = self._side(k_value)
            dk = self.dims(k_value)
        dq, dv = self.dims(q_value), self.dims(v_side)
        q_heads, kv_heads = self._check_shapes(dq, dk, dv, rk.times if rk else 1)
        dtype = self._check_dtypes(q_value, k_value or kt.split.source, v_side)  # type: ignore[union-attr]
        dims = (dq[0], dq[1], dq[2], dk[2])
        causal = False
        if mask is not None:
            self._check_mask(mask, dims, dtype)
            causal = self.options.causal and self._is_causal(mask, dims)
        self._check_inside()
        m = _Match(
            root, q, k, v, scale, q_heads, kv_heads, dims, dtype,
            None if causal else mask, causal, list(self.interior),
        )  # fmt: skip
        if self.options.form == "auto":
            self._three_d(m)
        return m

    def _guard(self, p: Value) -> Value:
        """Strip torch's `Where(IsNaN(s), 0, s)` after the softmax."""
        where = producer(p, "Where")
        if where is None:
            return p
        cond, zero, s = where.inputs
        isnan = producer(cond, "IsNaN")
        if isnan is None or isnan.inputs[0] is not s or scalar_constant(zero) != 0.0 or s is None:
            raise _Refused("the softmax output goes through a Where that is not the IsNaN guard")
        self.interior += [where, isnan]
        return s

    def _mask(self, x: Value) -> tuple[Value, _Mask | None]:
        add = producer(x, "Add")
        if add is not None:
            for scores, mask in (add.inputs, add.inputs[::-1]):
                if scores is not None and mask is not None and self._reaches_scores(scores):
                    if self._reaches_scores(mask):
                        raise _Refused("both inputs of the Add before the softmax read Q K^T")
                    self.interior.append(add)
                    inner = producer(strip_scale(scores, self.sv, [])[0], "Add")
                    if inner is not None or producer(scores, "Where") is not None:
                        raise _Refused("more than one mask is applied to the scores")
                    return scores, _Mask("add", mask)
            raise _Refused("the Add before the softmax has no Q K^T side")
        where = producer(x, "Where")
        if where is not None:
            cond, a, b = where.inputs
            assert cond is not None and a is not None and b is not None
            for scores, fill_value, negate in ((a, b, False), (b, a, True)):
                fill = scalar_constant(fill_value)
                if fill is None or not self._reaches_scores(scores):
                    continue
                if fill != -np.inf and fill > VERY_NEGATIVE:
                    raise _Refused(
                        f"the Where fills masked scores with {fill:g}, not -inf or at most -1e30:"
                        " as an additive mask it would change rows with every key masked"
                    )
                self.interior.append(where)
                kind = "bool" if fill == -np.inf else "fill"
                return scores, _Mask(kind, cond, fill, negate)
            raise _Refused(
                "the Where before the softmax does not select between scores and a constant"
            )
        return x, None

    def _reaches_scores(self, value: Value | None, depth: int = 4) -> bool:
        """Whether `value` is Q K^T, perhaps scaled or masked again (a few ops deep)."""
        if value is None or depth == 0:
            return False
        value, _ = strip_scale(value, self.sv, [])
        node = value.producer
        if node is None or node.domain != "":
            return False
        if node.op_type == "MatMul":
            return True
        if node.op_type in ("Add", "Where", "Mul", "Div"):
            return any(self._reaches_scores(v, depth - 1) for v in node.inputs)
        return False

    def _side(self, value: Value) -> _Side:
        split = head_split(value, self.sv)
        if split is not None:
            return _Side(value, split)
        rotary = value.producer
        if (
            rotary is not None and rotary.op == "RotaryEmbedding" and not rotary.get_attr("num_heads", 0)
            and rotary.inputs[0] is not None
        ):  # fmt: skip
            split = head_split(rotary.inputs[0], self.sv)
            if split is not None:
                return _Side(value, split, rotary)
        return _Side(value)

    def _check_shapes(
        self, dq: tuple[Elem, ...], dk: tuple[Elem, ...], dv: tuple[Elem, ...], times: int
    ) -> tuple[int, int]:
        if len(dq) != 4 or len(dk) != 4 or len(dv) != 4:
            raise _Refused(f"Q, K, V have ranks {len(dq)}, {len(dk)}, {len(dv)}, not 4")
        q_heads, kv_heads = dq[1], dk[1]
        if not isinstance(q_heads, int) or not isinstance(kv_heads, int):
            raise _Refused(
                f"the head counts of Q and K are not known numbers ({q_heads}, {kv_heads})"
            )
        if dv[1] != kv_heads or kv_heads * times != q_heads or q_heads % kv_heads:
            raise _Refused(f"Q has {q_heads} heads, K {kv_heads}, V {dv[1]}: they do not line up")
        if not (dq[0] == dk[0] == dv[0]):
            raise _Refused(
                f"the batch dims of Q, K, V are not provably equal ({dq[0]}, {dk[0]}, {dv[0]})"
            )
        if dq[3] != dk[3]:
            raise _Refused(f"Q's head size {dq[3]} is not K's {dk[3]}")
        if dk[2] != dv[2]:
            raise _Refused(f"K's sequence dim {dk[2]} is not provably V's {dv[2]}")
        return q_heads, kv_heads

    def _check_dtypes(self, *values: Value) -> DType:
        types = {self.sv.dims.dtype(v) for v in values}
        if len(types) != 1:
            raise _Refused(
                f"Q, K and V have different element types ({', '.join(str(t) for t in types)})"
            )
        (dtype,) = types
        if dtype not in _FLOATS:
            raise _Refused(f"Q, K and V are {dtype}, not a float type Attention takes")
        return dtype  # type: ignore[return-value]

    def _check_mask(self, mask: _Mask, dims: tuple[Elem, ...], dtype: DType) -> None:
        mdtype = self.sv.dims.dtype(mask.value)
        if mask.kind == "add" and mdtype != dtype:
            raise _Refused(f"the additive mask is {mdtype}, the scores {dtype}")
        if mask.kind != "add" and mdtype != DType.BOOL:
            raise _Refused(f"the Where condition is {mdtype}, not bool")
        md = self.dims(mask.value)
        if len(md) > 4:
            raise _Refused(f"the mask has rank {len(md)}, more than 4")
        for m, s in zip(md[::-1], dims[::-1], strict=False):
            if isinstance(m, int) and m != 1 and isinstance(s, int) and m != s:
                raise _Refused(f"the mask's dims {md} do not broadcast to the scores' {dims}")

    def _is_causal(self, mask: _Mask, dims: tuple[Elem, ...]) -> bool:
        rows, cols = dims[2], dims[3]
        if mask.kind in ("bool", "fill"):
            return not mask.negate and causal_condition(mask.value, rows, cols, self.sv)
        node = mask.value.producer
        if node is not None and node.op == "Where":
            cond, zero, fill = node.inputs
            f = scalar_constant(fill)
            if (
                scalar_constant(zero) == 0.0
                and f is not None
                and f <= VERY_NEGATIVE
                and cond is not None
            ):
                return causal_condition(cond, rows, cols, self.sv)
            return False
        array = constant_value(mask.value, limit=1 << 24)
        if array is None or array.dtype.kind != "f":
            return False
        visible = array == 0
        if not np.all(visible | (array <= VERY_NEGATIVE)):
            return False
        return causal_condition_array(visible, rows, cols)

    def _check_inside(self) -> None:
        inside = set(self.interior)
        root = self.interior[0]
        for node in self.interior:
            if node is root:
                continue
            for value in node.outputs:
                for user in value.users():
                    if user.op in ("Shape", "Size") and only_feeds(user, inside, self.sv):
                        continue  # shape arithmetic of the pattern itself: dies with it
                    if user not in inside:
                        who = "a graph output" if user.op == "return" else user.describe()
                        raise _Refused(f"%{value.name} is also read by {who}, outside the pattern")

    def _three_d(self, m: _Match) -> None:
        """Choose the 3-D form when every side is a head split and the output is merged."""
        if m.q.split is None or m.k.split is None or m.v.split is None:
            return
        if (m.q.split.heads, m.k.split.heads, m.v.split.heads) != (
            m.q_heads,
            m.kv_heads,
            m.kv_heads,
        ):
            return
        for side in (m.q, m.k):
            if side.rotary is not None and side.value is not None:
                if any(u not in set(m.interior) for u in side.value.users()):
                    return  # the 4-D rotary output is read elsewhere: keep it
        out = m.root.outputs[0]
        dv = self.dims(m.v.split.output)
        merge = head_merge(out, (m.dims[0], m.q_heads, m.dims[2], dv[3]), self.sv)
        if merge is None:
            return
        sinks = set(m.interior + merge.nodes)
        for value in [out] + [n.outputs[0] for n in merge.nodes[:-1]]:
            for user in value.users():
                if user.op in ("Shape", "Size") and not only_feeds(user, sinks, self.sv):
                    return  # the 4-D output's shape is read elsewhere: keep the 4-D form
        m.merge = merge


# ----- rewriting --------------------------------------------------------------------------------


class _Rewriter:
    def __init__(self, graph: Graph, sv: ShapeValues, opsets: dict[str, int]):
        self.graph = graph
        self.sv = sv
        self.opsets = opsets
        self.cache: dict[tuple[Any, ...], Value] = {}

    def rewrite(self, m: _Match) -> None:
        b = Builder(self.graph, insert_before=m.root)
        three_d = m.merge is not None
        q, k, v = (self._input(b, side, three_d, m) for side in (m.q, m.k, m.v))
        inputs: list[Value | None] = [q, k, v]
        if m.mask is not None:
            inputs.append(self._mask(b, m, q, k, three_d))
        attrs: dict[str, Any] = {"scale": float(m.scale)}
        if m.causal:
            attrs["is_causal"] = 1
        if three_d:
            attrs["q_num_heads"] = m.q_heads
            attrs["kv_num_heads"] = m.kv_heads
        y = b.op("Attention", *inputs, _name=m.root.name, **attrs)
        dead = list(m.interior)
        if three_d:
            assert m.merge is not None
            for value in (q, k, v):  # ONNX Runtime's inference needs the hidden sizes
                self._refine(value)
            self._finish(b)
            dv = self.sv.dims.dims(m.v.split.output) if m.v.split else None  # type: ignore[union-attr]
            hidden = dv[3] * m.q_heads if dv and isinstance(dv[3], int) else None
            known = TensorType(m.dtype, tuple(clear_dim(e) for e in (m.dims[0], m.dims[2], hidden)))
            if type_conflict(y.type, known) is None:
                y.type = merge_types(y.type, known)
            self._use_merged(b, y, m)
            dead += m.merge.nodes
        else:
            self._finish(b, replaced=m.root.outputs[0])
            m.root.outputs[0].replace_all_uses_with(y)
        for side in (m.q, m.k, m.v):
            if side.split is not None:
                dead += side.split.nodes
            if side.rotary is not None:
                dead.append(side.rotary)
        remove_dead(self.graph, dead + shape_feeders(dead))

    def _input(self, b: Builder, side: _Side, three_d: bool, m: _Match) -> Value:
        if three_d:
            assert side.split is not None
            if side.rotary is None:
                return side.split.source
            key = ("rotary", side.rotary, side.split.source)
            if key not in self.cache:
                rot = side.rotary
                attrs = {n: a for n, a in rot.attrs.items() if n != "num_heads"}
                self.cache[key] = b.op(
                    "RotaryEmbedding", side.split.source, *rot.inputs[1:],
                    num_heads=side.split.heads, _attrs=attrs,
                )  # fmt: skip
            return self.cache[key]
        if side.value is not None:
            return side.value
        assert side.split is not None and side.split.reshaped is not None  # folded K^T
        return b.op("Transpose", side.split.reshaped, perm=[0, 2, 1, 3])

    def _mask(self, b: Builder, m: _Match, q: Value, k: Value, three_d: bool) -> Value:
        mask = m.mask
        assert mask is not None
        value = mask.value
        if mask.negate:
            inner = producer(value, "Not")
            value = inner.inputs[0] if inner is not None and inner.inputs[0] is not None else value
            if inner is None:
                value = self._cached(("not", value), lambda: b.Not(mask.value))
        if mask.kind == "fill":
            dtype = m.dtype.numpy
            cond = value
            value = self._cached(
                ("fill", cond, mask.fill),
                lambda: b.Where(
                    cond, b.const(np.array(0, dtype)), b.const(np.array(mask.fill, dtype))
                ),
            )
        return self._expand(b, m, value, q, k, three_d)

    def _expand(
        self, b: Builder, m: _Match, value: Value, q: Value, k: Value, three_d: bool
    ) -> Value:
        """Expand the mask where ONNX Runtime needs it: the last two dims exactly S and L, the
        first two 1 or b and Hq (any dim not provably so is expanded)."""
        md = self.sv.dims.dims(value) or ()
        md = (1,) * (4 - len(md)) + tuple(md)
        wanted: list[Elem] = []
        needed = False
        for axis, (have, want) in enumerate(zip(md, m.dims, strict=True)):
            ok = have == want or (have == 1 and axis < 2)
            needed |= not ok
            wanted.append(1 if have == 1 and axis < 2 else want)
        if not needed:
            return value
        key = ("expand", value, tuple(wanted))
        if key in self.cache:
            return self.cache[key]
        # read each dim at run time from the mask itself (shared by every layer), else Q or K
        own_dims = self.sv.dims.dims(value) or ()
        seq_axis = 1 if three_d else 2
        sources = {0: (q, 0), 2: (q, seq_axis), 3: (k, seq_axis)}
        parts: list[Value] = []
        for axis, want in enumerate(wanted):
            if isinstance(want, int):
                parts.append(b.const(np.array([want], np.int64)))
                continue
            source, at = sources[axis]
            if want in own_dims:
                source, at = value, own_dims.index(want)
            parts.append(b.Shape(source, start=at, end=at + 1))
        expanded = b.Expand(value, b.Concat(*parts, axis=0))
        self.cache[key] = expanded
        return expanded

    def _refine(self, value: Value) -> None:
        """Give a node output the dims the analysis proves (types only get more precise)."""
        dims, dtype = self.sv.dims.dims(value), self.sv.dims.dtype(value)
        if value.producer is None or dims is None or dtype is None:
            return
        known = TensorType(dtype, tuple(clear_dim(e) for e in dims))
        if type_conflict(value.type, known) is None:
            value.type = merge_types(value.type, known)

    def _cached(self, key: tuple[Any, ...], make: Any) -> Value:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def _use_merged(self, b: Builder, y: Value, m: _Match) -> None:
        """Readers of the merged [b, s, H, Dv] value read the [b, s, H*Dv] output instead."""
        assert m.merge is not None
        merged = m.merge.output
        bridge: Value | None = None
        for node, index in merged.uses:
            if safe_to_read_merged(node, index, self.sv):
                node.set_input(index, y)
                continue
            if bridge is None:
                dv = self.sv.dims.dims(merged)
                tail = [d if isinstance(d, int) else -1 for d in (dv or ())[2:]]
                bridge = b.Reshape(y, b.const(np.array([0, 0, *tail], np.int64)))
                self._finish(b, replaced=merged)
            node.set_input(index, bridge)

    def _finish(self, b: Builder, replaced: Value | None = None) -> None:
        """Give the new nodes their inferred types (the last one also the replaced value's)."""
        for node in b.created:
            if node.graph is None or all(v.type is not None for v in node.outputs):
                continue
            try:
                inferred = infer_node(node, self.opsets)
            except GraphoptError as error:
                raise GraphoptError(f"fuse-attention built an invalid node: {error}") from None
            for value, t in zip(node.outputs, inferred, strict=False):
                if type_conflict(value.type, t) is None:
                    value.type = merge_types(value.type, t)
        if replaced is not None and b.created:
            out = b.created[-1].outputs[0]
            if type_conflict(out.type, replaced.type) is None:
                out.type = merge_types(out.type, replaced.type)
