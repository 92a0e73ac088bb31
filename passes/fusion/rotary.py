"""fuse-rotary: LLaMA's rotary position embedding as exported -> ONNX `RotaryEmbedding` (opset 23).

Matches `x * cos + rotate_half(x) * sin` with `rotate_half(x) = Concat(-x[..., h:], x[..., :h])`
(two Slices of the last axis at h = D/2, Neg, Concat on the last axis; Add and Mul in any input
order), and the partial form `Concat(that on x[..., :r], x[..., r:])` (`rotary_embedding_dim=r`).
`cos` and `sin` are [1 or b, 1, S, D] (broadcast over the heads; `Unsqueeze(c, 1)` of a
[1 or b, S, D] value, or a constant), whose two halves are equal:

- cached tables: `Gather(table [P, D], position_ids)` -> `cos_cache = table[:, :h]` (constants,
  the halves checked equal), `position_ids` kept (expanded to [b, S] if it broadcasts);
- computed from positions: an elementwise chain (Cos/Sin, Cast, Mul/Div by a constant: the
  attention scaling) of `Concat(F, F)` -> the same chain on F (h columns). If F is
  `Cast(p) * inv_freq` with the positions p bounded by a known max M (a Range of constants, a
  Slice or Gather of a constant table: the config's max positions), the tables for 0..M are
  computed here once (float32, as the graph computes them) and p becomes `position_ids`.
  Otherwise (transformers: p = arange(sequence), bounded by nothing in the graph) the caches stay
  computed in the graph, from F, as RotaryEmbedding's [b, S, h] caches without position_ids (one
  Expand to the batch, shared by the layers): still exact (why this is kept, not refused: the
  fuse-rotary entry of `docs/passes.md`; option `runtime-cache=false` refuses instead);
- a constant [.., S, D] with equal halves -> its first half, expanded to the batch.

When x is a head split (`Transpose(Reshape(x3 [b, s, H*D], [b, s, H, D]), (0, 2, 1, 3))`) the
3-D form is emitted, `RotaryEmbedding(x3, num_heads=H)`, and split again after it, so that
`fuse-attention` can read the 3-D tensor (option `form=4d` keeps the 4-D input).

Why equal: RotaryEmbedding (interleaved=0) computes, per position, x1 * c - x2 * s and
x2 * c + x1 * s for the halves x1, x2 of the rotated dims, with c, s the cache rows: the pattern's
x * cat(c, c) + cat(-x2, x1) * cat(s, s) term by term. The 3-D form is defined as that
reshape/transpose. Rounding differs only in the order of one multiply-add.

Refuses, saying why: slices that are not the two halves of the last axis, a Concat not on the last
axis, cos/sin that vary over the heads or whose halves differ (or cannot be shown equal), cos/sin
of another element type, a non-float x, position ids that are not int64, a model opset below 23.

Order: after `upgrade-opset` and O1; before `fuse-attention`, which reads through the 3-D form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from graphopt.ir.core import Graph, Node, Value
from graphopt.ir.inference import constant_value
from graphopt.ir.types import DType, TensorType
from graphopt.passes.cleanup.shape_dims import Elem, slice_params
from graphopt.passes.cleanup.shape_values import ShapeValues
from graphopt.passes.fusion.attention_patterns import (
    HeadSplit,
    analyze,
    head_split,
    producer,
    scalar_constant,
)
from graphopt.passes.manager import PassContext, register_pass
from graphopt.passes.rewrite import RewriteBuilder, RewriteContext, RewritePass, RewriteRule

__all__ = ["FuseRotary"]

ROTARY_OPSET = 23
MAX_TABLE = 1 << 20  # positions: a bigger precomputed table is not worth its bytes
_ELEMENTWISE = ("Cos", "Sin", "Cast", "Mul", "Div", "Identity")
_X_TYPES = (DType.FLOAT, DType.FLOAT16, DType.BFLOAT16)


@dataclass
class _Cache:
    """How to get one half-width cache: a constant, or a chain to rebuild on F, plus where the
    position ids come from (None: a [b, S, h] cache without them)."""

    table: np.ndarray | None = None  # [P, h] with position_ids, or [.., S, h] without
    half: Value | None = None  # F: the chain is rebuilt on it
    chain: tuple[tuple[Node, Value | None], ...] = ()  # (op, its constant operand) from F up
    positions: Value | None = None  # [1 or b, S] int64


@dataclass
class _Plan:
    x: Value
    head_dim: int
    rotary_dim: int
    cos: _Cache
    sin: _Cache
    split: HeadSplit | None


class _Rotary(RewriteRule):
    """x * cos + rotate_half(x) * sin -> RotaryEmbedding(x, cos_cache, sin_cache)."""

    def __init__(self, owner: FuseRotary):
        self.owner = owner

    def pattern(self, op: Any, x: Any, cos: Any, sin: Any) -> Any:
        lo = op.Slice(x, _allow_other_inputs=True, _name="lo")
        hi = op.Slice(x, _allow_other_inputs=True, _name="hi")
        rot = op.Concat(op.Neg(hi), lo, _name="cat")
        return op.Add(op.Mul(x, cos), op.Mul(rot, sin))

    def check(self, ctx: RewriteContext, x: Value, cos: Value, sin: Value) -> bool:
        return (
            self.owner.plan(ctx, x, cos, sin, ctx.node("lo"), ctx.node("hi"), ctx.node("cat"), None)
            is not None
        )

    def rewrite(self, op: RewriteBuilder, x: Value, cos: Value, sin: Value) -> Any:
        ctx = op.ctx
        plan = self.owner.plan(
            ctx, x, cos, sin, ctx.node("lo"), ctx.node("hi"), ctx.node("cat"), None
        )
        assert plan is not None
        return self.owner.emit(op, plan)


class _PartialRotary(RewriteRule):
    """Concat(rotary(x[..., :r]), x[..., r:]) -> RotaryEmbedding(x, rotary_embedding_dim=r)."""

    def __init__(self, owner: FuseRotary):
        self.owner = owner

    def pattern(self, op: Any, x: Any, cos: Any, sin: Any) -> Any:
        xr = op.Slice(x, _allow_other_inputs=True, _name="rot_part")
        xp = op.Slice(x, _allow_other_inputs=True, _name="pass_part")
        lo = op.Slice(xr, _allow_other_inputs=True, _name="lo")
        hi = op.Slice(xr, _allow_other_inputs=True, _name="hi")
        rot = op.Concat(op.Neg(hi), lo, _name="cat")
        inner = op.Add(op.Mul(xr, cos), op.Mul(rot, sin))
        return op.Concat(inner, xp, _name="outer")

    def _plan(self, ctx: RewriteContext, x: Value, cos: Value, sin: Value) -> _Plan | None:
        owner = self.owner
        parts = (ctx.node("rot_part"), ctx.node("pass_part"), ctx.node("outer"))
        return owner.plan(ctx, x, cos, sin, ctx.node("lo"), ctx.node("hi"), ctx.node("cat"), parts)

    def check(self, ctx: RewriteContext, x: Value, cos: Value, sin: Value) -> bool:
        return self._plan(ctx, x, cos, sin) is not None

    def rewrite(self, op: RewriteBuilder, x: Value, cos: Value, sin: Value) -> Any:
        plan = self._plan(op.ctx, x, cos, sin)
        assert plan is not None
        return self.owner.emit(op, plan)


@register_pass(
    "fuse-rotary", "rotary position embedding (rotate_half, cos/sin) -> RotaryEmbedding (opset 23)"
)
@dataclass
class FuseRotary(RewritePass):
    form: Literal["auto", "4d"] = "auto"  # auto: the 3-D form when x is a head split
    runtime_cache: bool = True  # unbounded positions: keep the caches computed in the graph

    def rules(self) -> list[RewriteRule]:
        return [_PartialRotary(self), _Rotary(self)]

    def run_on_graph(self, graph: Graph, context: PassContext) -> bool:
        if not any(n.op == "Neg" for n in graph):
            return False
        self._sv = analyze(graph, context.model.opset_imports)
        self._opset = context.model.opset
        self._shared: dict[tuple[Any, ...], Value] = {}
        return super().run_on_graph(graph, context)

    # ----- check -----------------------------------------------------------------------------

    def plan(
        self, ctx: RewriteContext, x: Value, cos: Value, sin: Value, lo: Node, hi: Node,
        cat: Node, parts: tuple[Node, Node, Node] | None,
    ) -> _Plan | None:  # fmt: skip
        sv = self._sv
        dims = sv.dims.dims(x)
        if dims is None or len(dims) != 4 or not isinstance(dims[3], int):
            ctx.refuse("x is not 4-D with a known head size")
            return None
        head_dim = dims[3]
        rotary_dim = head_dim
        inner = producer(x, "Slice")
        if parts is None and inner is not None and ctx.root.outputs[0].users()[0].op == "Concat":
            sliced = _slice_of_last(sv, inner, 4)
            if sliced is not None and sliced[0] == 0:
                ctx.refuse("x is the rotated part x[..., :r] of a partial rotary: see its Concat")
                return None
        if parts is not None:
            rot_part, pass_part, outer = parts
            r = _slice_of_last(sv, rot_part, 4)
            p = _slice_of_last(sv, pass_part, 4)
            if r is None or p is None or r[0] != 0 or p[0] != r[1] or p[1] < head_dim:
                ctx.refuse("the rotated and passed parts are not x[..., :r] and x[..., r:]")
                return None
            if not _last_axis(outer, 4):
                ctx.refuse("the parts are not concatenated on the last axis")
                return None
            rotary_dim = r[1]
        if rotary_dim % 2 or rotary_dim <= 0:
            ctx.refuse(f"rotary dim {rotary_dim} is not even")
            return None
        half = rotary_dim // 2
        a, b = _slice_of_last(sv, lo, 4), _slice_of_last(sv, hi, 4)
        if a != (0, half) or b is None or b[0] != half or b[1] < rotary_dim:
            ctx.refuse(f"the slices are not the halves [:{half}] and [{half}:] of the last axis")
            return None
        if not _last_axis(cat, 4):
            ctx.refuse("rotate_half's Concat is not on the last axis")
            return None
        dtype = sv.dims.dtype(x)
        if dtype not in _X_TYPES:
            ctx.refuse(f"x is {dtype}; RotaryEmbedding takes float, float16, bfloat16")
            return None
        if sv.dims.dtype(cos) != dtype or sv.dims.dtype(sin) != dtype:
            ctx.refuse("cos/sin have another element type than x")
            return None
        caches = []
        for name, value in (("cos", cos), ("sin", sin)):
            found = self._cache(ctx, value, rotary_dim, dims, name)
            if found is None:
                return None
            caches.append(found)
        c, s = caches
        if (c.positions is None) != (s.positions is None) or (c.positions is not s.positions):
            ctx.refuse("cos and sin are indexed by different positions")
            return None
        if self._opset < ROTARY_OPSET:
            ctx.refuse(
                f"RotaryEmbedding needs opset {ROTARY_OPSET}, the model imports {self._opset}: "
                "run upgrade-opset first"
            )
            return None
        split = head_split(x, sv) if self.form == "auto" else None
        if split is not None and split.heads != dims[1]:
            split = None
        return _Plan(x, head_dim, rotary_dim, c, s, split)

    def _cache(
        self, ctx: RewriteContext, value: Value, rotary_dim: int, xdims: tuple[Elem, ...], name: str
    ) -> _Cache | None:
        sv = self._sv
        half = rotary_dim // 2
        cdims = sv.dims.dims(value)
        if cdims is None or cdims[-1] != rotary_dim or len(cdims) not in (2, 4):
            ctx.refuse(f"{name} is not [.., S, {rotary_dim}]")
            return None
        if len(cdims) == 4 and cdims[1] != 1:
            ctx.refuse(f"{name} {cdims} is not [1 or batch, 1, S, D]: it varies over the heads")
            return None
        pairs = [(cdims[-2], xdims[2])] + ([(cdims[0], xdims[0])] if len(cdims) == 4 else [])
        for have, want in pairs:  # sequence and batch: equal, 1, or expanded at run time
            if isinstance(have, int) and have != 1 and isinstance(want, int) and have != want:
                ctx.refuse(f"{name} {cdims} does not broadcast to x's {xdims}")
                return None
        array = constant_value(value, limit=1 << 26)
        if array is not None:
            table = array.reshape((-1,) + array.shape[-2:]) if array.ndim == 4 else array[None]
            if table.shape[0] != 1 or not _equal_halves(table, half):
                ctx.refuse(f"{name}'s two halves differ")
                return None
            return _Cache(table=np.ascontiguousarray(table[..., :half]))
        c3 = value
        if len(cdims) == 4:
            unsqueeze = producer(value, "Unsqueeze")
            axes = (
                sv.vector(unsqueeze.inputs[1])
                if unsqueeze is not None and len(unsqueeze.inputs) > 1
                else None
            )
            if unsqueeze is None or axes is None or axes.elems not in ((1,), (-3,)):
                ctx.refuse(f"{name} is not Unsqueeze(c, 1) of a [.., S, D] value")
                return None
            c3 = unsqueeze.inputs[0]  # type: ignore[assignment]
        gather = producer(c3, "Gather")
        if gather is not None and gather.get_attr("axis", 0) == 0:
            cached = constant_value(gather.inputs[0], limit=1 << 26)
            positions = gather.inputs[1]
            if (
                cached is not None
                and cached.ndim == 2
                and cached.shape[1] == rotary_dim
                and positions is not None
            ):
                if not _equal_halves(cached, half):
                    ctx.refuse(f"{name}'s cached table has halves that differ")
                    return None
                if sv.dims.dtype(positions) != DType.INT64:
                    ctx.refuse(f"{name}'s position ids are not int64")
                    return None
                return _Cache(table=np.ascontiguousarray(cached[:, :half]), positions=positions)
        chain: list[tuple[Node, Value | None]] = []
        current = c3
        while True:
            node = current.producer
            if node is None or node.domain != "":
                break
            if (
                node.op_type == "Concat"
                and len(node.inputs) == 2
                and node.inputs[0] is node.inputs[1]
            ):
                if not _last_axis(node, len(sv.dims.dims(current) or ())):
                    break
                f = node.inputs[0]
                assert f is not None
                return self._computed(ctx, f, tuple(reversed(chain)), name)
            step = _elementwise(node)
            if step is None:
                break
            chain.append((node, step[1]))
            current = step[0]
        ctx.refuse(
            f"cannot show {name}'s two halves equal (not Concat(F, F), a cached table, a constant)"
        )
        return None

    def _computed(
        self, ctx: RewriteContext, f: Value, chain: tuple[tuple[Node, Value | None], ...], name: str
    ) -> _Cache | None:
        bounded = _bounded_positions(self._sv, f)
        if bounded is not None:
            positions, inv_freq, top = bounded
            angles = np.arange(top + 1, dtype=np.float32)[:, None] * inv_freq[None, :]
            table = _evaluate(chain, angles)
            if table is not None and self._sv.dims.dtype(positions) == DType.INT64:
                return _Cache(table=table, positions=positions)
        if not self.runtime_cache:
            ctx.refuse(
                f"{name} is computed from positions with no known maximum: a constant cache"
                " would need a bound (runtime-cache=false)"
            )
            return None
        return _Cache(half=f, chain=chain)

    # ----- rewrite ---------------------------------------------------------------------------

    def emit(self, op: RewriteBuilder, plan: _Plan) -> Value:
        x, heads = plan.x, 0
        # where the batch and sequence dims are read: x [b, H, S, D], or the 3-D source [b, S, HD]
        where = (x, 0, 2)
        if plan.split is not None:
            x, heads = plan.split.source, plan.split.heads
            where = (x, 0, 1)
        cos = self._materialize(op, plan.cos, where)
        sin = self._materialize(op, plan.sin, where)
        inputs: list[Value | None] = [x, cos, sin]
        if plan.cos.positions is not None:
            inputs.append(self._expand(op, plan.cos.positions, where, 2))
        attrs: dict[str, Any] = {}
        if plan.rotary_dim != plan.head_dim:
            attrs["rotary_embedding_dim"] = plan.rotary_dim
        if heads:
            attrs["num_heads"] = heads
        y = op.op("RotaryEmbedding", *inputs, **attrs)
        if plan.split is None:
            return y
        shape = op.const(np.array([0, 0, heads, plan.head_dim], np.int64))
        return op.Transpose(op.Reshape(y, shape), perm=[0, 2, 1, 3])

    def _materialize(
        self, op: RewriteBuilder, cache: _Cache, where: tuple[Value, int, int]
    ) -> Value:
        if cache.table is not None:
            dtype = self._sv.dims.dtype(where[0])
            assert dtype is not None
            key: tuple[Any, ...] = ("table", cache.table.tobytes(), cache.table.shape, dtype)
            if key not in self._shared:
                self._shared[key] = op.const(cache.table.astype(dtype.numpy))
            value = self._shared[key]
            if cache.positions is not None:
                return value
            return self._expand(op, value, where, 3)
        assert cache.half is not None
        key = ("chain", cache.half, tuple(cache.chain))
        if key not in self._shared:
            value = cache.half
            for node, constant in cache.chain:
                operands = [value] if constant is None else [value, constant]
                value = op.op(node.op, *operands, _attrs=node.attrs)
            self._shared[key] = value
        return self._expand(op, self._shared[key], where, 3)

    def _expand(
        self, op: RewriteBuilder, value: Value, where: tuple[Value, int, int], rank: int
    ) -> Value:
        """ONNX Runtime wants caches of exactly [b, S, h] and position ids of exactly [b, S]:
        expand `value`'s leading two dims to x's batch and sequence where they are not provably
        those already (one Expand, shared by the layers that see the same dims)."""
        sv = self._sv
        x, batch_axis, seq_axis = where
        xdims = sv.dims.dims(x) or ()
        want = (
            xdims[batch_axis] if len(xdims) > batch_axis else None,
            xdims[seq_axis] if len(xdims) > seq_axis else None,
        )
        dims = sv.dims.dims(value) or ()
        dims = (1,) * (rank - len(dims)) + tuple(dims)
        if (dims[0], dims[1]) == want:
            return value
        key = ("expand", value, want, rank)
        if key in self._shared and None not in want:
            return self._shared[key]
        one = op.const(np.array([1], np.int64))
        parts = [
            one if dims[i] == want[i] else op.Shape(x, start=axis, end=axis + 1)
            for i, axis in enumerate((batch_axis, seq_axis))
        ]
        expanded = op.Expand(value, op.Concat(*parts, *([one] if rank == 3 else []), axis=0))
        vtype = value.type
        if isinstance(vtype, TensorType) and vtype.shape is not None:
            known = tuple(e if isinstance(e, (int, str)) else None for e in want)
            expanded.type = TensorType(
                vtype.dtype, known + tuple(vtype.shape[len(vtype.shape) - rank + 2 :])
            )
        self._shared[key] = expanded
        return expanded


# ----- helpers ----------------------------------------------------------------------------------


def _slice_of_last(sv: ShapeValues, node: Node, rank: int) -> tuple[int, int] | None:
    """(start, end) of a Slice that takes a step-1 range of the last axis only (end: an int,
    huge for "to the end")."""
    params = slice_params(sv.vector, node)
    if params is None or len(params.starts) != 1 or params.steps != [1]:
        return None
    axis = params.axes[0]
    if (axis + rank if axis < 0 else axis) != rank - 1:
        return None
    end = params.ends[0]
    if not isinstance(end, int) or params.starts[0] < 0 or end < 0:
        return None
    return params.starts[0], end


def _last_axis(node: Node, rank: int) -> bool:
    axis = node.get_attr("axis", 0)
    return rank > 0 and (axis + rank if axis < 0 else axis) == rank - 1


def _equal_halves(table: np.ndarray, half: int) -> bool:
    return bool(np.array_equal(table[..., :half], table[..., half : 2 * half]))


def _elementwise(node: Node) -> tuple[Value, Value | None] | None:
    """An op of a cache chain: (its data input, its constant operand or None) for Cos, Sin,
    Identity, a float Cast, Mul by or Div by a one-element constant; None for anything else."""
    if node.op_type not in _ELEMENTWISE or node.inputs[0] is None:
        return None
    if node.op_type in ("Cos", "Sin", "Identity"):
        return node.inputs[0], None
    if node.op_type == "Cast":
        to = node.get_attr("to", 0)
        ok = to in DType._value2member_map_ and DType(to) in _X_TYPES + (DType.DOUBLE,)
        return (node.inputs[0], None) if ok else None
    a, b = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    if b is not None and scalar_constant(b) is not None:
        return a, b
    if node.op_type == "Mul" and b is not None and scalar_constant(a) is not None:
        return b, a
    return None


def _evaluate(
    chain: tuple[tuple[Node, Value | None], ...], angles: np.ndarray
) -> np.ndarray | None:
    """The chain's ops on float32 angles, as ONNX computes them (float32 throughout)."""
    value = angles.astype(np.float32)
    for node, constant in chain:
        if node.op_type == "Cos":
            value = np.cos(value)
        elif node.op_type == "Sin":
            value = np.sin(value)
        elif node.op_type == "Cast":
            value = value.astype(DType(node.get_attr("to")).numpy)
        elif node.op_type in ("Mul", "Div"):
            c = np.asarray(constant_value(constant)).astype(value.dtype).reshape(())
            value = value * c if node.op_type == "Mul" else value / c
        elif node.op_type != "Identity":
            return None
    return np.ascontiguousarray(value)


def _bounded_positions(sv: ShapeValues, f: Value) -> tuple[Value, np.ndarray, int] | None:
    """F = Cast(p) * inv_freq with p's values bounded: (position ids [1 or b, S], inv_freq,
    the largest position)."""
    mul = producer(f, "Mul")
    if mul is None:
        return None
    for p, c in (mul.inputs, mul.inputs[::-1]):
        inv = constant_value(c)
        cast = producer(p, "Cast")
        if inv is None or cast is None or inv.dtype != np.float32 or cast.inputs[0] is None:
            continue
        ids = cast.inputs[0]
        unsqueeze = producer(ids, "Unsqueeze")
        if unsqueeze is not None and unsqueeze.inputs[0] is not None:
            ids = unsqueeze.inputs[0]
        dims = sv.dims.dims(ids)
        if dims is None or len(dims) != 2 or inv.size != (inv.shape[-1] if inv.ndim else 1):
            continue
        top = _max_position(sv, ids)
        if top is not None and 0 <= top < MAX_TABLE:
            return ids, inv.reshape(-1).astype(np.float32), top
    return None


def _max_position(sv: ShapeValues, value: Value) -> int | None:
    """The largest value `value` can hold, when a constant bounds it."""
    node = value.producer
    while (
        node is not None
        and node.domain == ""
        and node.op_type in ("Unsqueeze", "Expand", "Identity")
    ):
        value = node.inputs[0]  # type: ignore[assignment]
        node = value.producer
    array = constant_value(value, limit=1 << 24)
    if array is not None and array.dtype.kind in "iu" and array.size:
        return int(array.max())
    if node is None or node.domain != "":
        return None
    if node.op_type in ("Slice", "Gather") and node.inputs[0] is not None:
        table = constant_value(node.inputs[0], limit=1 << 24)
        if table is not None and table.dtype.kind in "iu" and table.size and int(table.min()) >= 0:
            return int(table.max())
    if node.op_type == "Range":
        start, limit, delta = (sv.vector(v) for v in node.inputs[:3])
        if (
            start
            and limit
            and delta
            and start.is_static
            and limit.is_static
            and delta.elems == (1,)
        ):
            if start.ints()[0] >= 0:
                return limit.ints()[0] - 1
    return None
