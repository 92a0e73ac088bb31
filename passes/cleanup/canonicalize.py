"""canonicalize: drop identities and no-ops, so that later passes see one spelling of each thing.

Exporters leave nodes that compute nothing: Identity, Dropout in inference, Reshape to the shape a
tensor already has, Transpose pairs that undo each other, Cast to the type a value has, `x * 1`.
Fusion patterns do not expect them, and each costs a copy at run time. The pass is a table of short
rewrite rules (`RULES` at the bottom, one idea each, its algebra in a comment beside it), applied by
the worklist driver of `graphopt.passes.rewrite` to a fixpoint.

Every rule reads the types the graph declares (run `infer-shapes` first; `O1` does) and the values
of constant inputs. A rule that matches but cannot prove its rewrite exact refuses, and the reason
goes to the pass report: a shape, rank or element type it needs is unknown, an operand it must
read is not a constant, broadcasting may change the shape or type of the value kept, a Cast chain
loses values, a Dropout runs in training mode. A node that plainly is not a no-op (a Transpose with
a real permutation, a Pad with non-zero pads) is not a refusal: the rule just does not apply. A
matched inner node read outside the pattern is refused by the driver.

Both forms of ops whose operands moved from attributes to inputs are read (Reshape's shape before
opset 5, Squeeze/Unsqueeze axes before 13, Slice starts/ends/axes before 10, Pad pads before 11,
Split sizes before 13, Dropout's ratio before 12; a node carries the form of its opset). Old
Reshape pairs are refused rather than merged.

Equal because: each rule replaces a node's output by a value that holds the same elements with the
same shape and element type (stated per rule). Graphs are taken to be valid: a node that would fail
at run time (a Squeeze of a dim that is not 1) may disappear with its failure. `x + 0 -> x` keeps
`-0.0` where ONNX computes `+0.0`; the two compare equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from graphopt.ir.core import Node, Value
from graphopt.ir.types import Dim, DType
from graphopt.passes.manager import register_pass
from graphopt.passes.rewrite import Const, RewriteBuilder, RewriteContext, RewritePass, RewriteRule

__all__ = ["RULES", "Canonicalize", "holds_exactly"]

INT64_MAX = 2**63 - 1

# ----- element types: which casts keep every value ------------------------------------------------

_INT_RANGE = {
    DType.BOOL: (0, 1), DType.UINT8: (0, 2**8 - 1), DType.UINT16: (0, 2**16 - 1),
    DType.UINT32: (0, 2**32 - 1), DType.UINT64: (0, 2**64 - 1), DType.INT8: (-(2**7), 2**7 - 1),
    DType.INT16: (-(2**15), 2**15 - 1), DType.INT32: (-(2**31), 2**31 - 1),
    DType.INT64: (-(2**63), 2**63 - 1),
}  # fmt: skip
_SIGNIFICAND_BITS = {DType.BFLOAT16: 8, DType.FLOAT16: 11, DType.FLOAT: 24, DType.DOUBLE: 53}
_WIDER_FLOATS = {
    (DType.FLOAT16, DType.FLOAT), (DType.FLOAT16, DType.DOUBLE), (DType.BFLOAT16, DType.FLOAT),
    (DType.BFLOAT16, DType.DOUBLE), (DType.FLOAT, DType.DOUBLE),
}  # fmt: skip


def holds_exactly(source: DType, target: DType) -> bool:
    """True when every value of `source` is exactly a value of `target` (f16 -> f32, i8 -> i32,
    u8 -> f16, bool -> anything numeric; not f32 -> f16, i32 -> f32, f32 -> i64)."""
    if source == target:
        return True
    if source in _INT_RANGE:
        low, high = _INT_RANGE[source]
        if target in _INT_RANGE:
            return _INT_RANGE[target][0] <= low and high <= _INT_RANGE[target][1]
        if target in _SIGNIFICAND_BITS:  # integers up to 2**p are exact in a p-bit significand
            return max(-low, high) <= 2 ** _SIGNIFICAND_BITS[target]
        return False
    return (source, target) in _WIDER_FLOATS


def _cast_target(node: Node) -> DType | None:
    to = node.get_attr("to")
    if isinstance(to, str):  # Cast-1 names the type
        try:
            return DType(onnx.TensorProto.DataType.Value(to.upper()))
        except ValueError:
            return None
    return DType(to) if isinstance(to, int) else None


# ----- reading operands and shapes ----------------------------------------------------------------


def _given(node: Node, index: int, attr: str) -> bool:
    """Whether the node carries operand `index` (newer opsets) or attribute `attr` (older ones)."""
    return (index < len(node.inputs) and node.inputs[index] is not None) or attr in node.attrs


def _ints(ctx: RewriteContext, node: Node, index: int, attr: str) -> list[int] | None:
    """The integers of input `index` if it is a constant, else of attribute `attr`; None if the
    node carries neither or the input is not a constant."""
    if index < len(node.inputs) and node.inputs[index] is not None:
        array = ctx.constant(node.inputs[index])
        return None if array is None else [int(v) for v in np.asarray(array).reshape(-1)]
    value = node.get_attr(attr)
    if value is None:
        return None
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _fully_known(shape: Sequence[Dim] | None) -> bool:
    return shape is not None and all(d is not None for d in shape)


def _broadcasts_into(small: Sequence[Dim], big: Sequence[Dim]) -> bool:
    """True when broadcasting `small` against `big` is known to give `big` (every dim of `small`
    is 1 or the same number or symbol as `big`'s)."""
    if len(small) > len(big):
        return False
    return all(
        s == 1 or (s is not None and s == b) for s, b in zip(small[::-1], big[::-1], strict=False)
    )


def _normalize(axes: Sequence[int], rank: int | None) -> list[int] | None:
    """Axes made non-negative (order kept); None when one is negative and the rank is unknown."""
    if any(a < 0 for a in axes) and rank is None:
        return None
    return [a + rank if a < 0 and rank is not None else a for a in axes]


def _verdict(ctx: RewriteContext, result: bool | str) -> bool:
    """Rule helpers answer True (proved), False (not a no-op) or a reason they cannot tell."""
    return ctx.refuse(result) if isinstance(result, str) else result


def _same_as_declared(ctx: RewriteContext, x: Value) -> bool:
    """The node's declared output shape is fully known and equals x's (numbers and symbols)."""
    shape, out = ctx.shape(x), ctx.shape(ctx.root.outputs[0])
    return _fully_known(shape) and shape == out


class _Rule(RewriteRule):
    """The rules here report under `title` (or the class name), and by default replace the
    matched node by x: the node computes x."""

    title: str = ""

    @property
    def label(self) -> str:
        return self.title or type(self).__name__

    def rewrite(self, op: RewriteBuilder, *args: Any, **values: Any) -> Any:
        return values["x"]


# ----- the rules ----------------------------------------------------------------------------------


class DropIdentity(_Rule):
    def pattern(self, op: Any, x: Any) -> Any:
        return op.Identity(x)


class DropInferenceDropout(_Rule):
    """Dropout is the identity unless it trains; its mask is then all true."""

    def pattern(self, op: Any, x: Any) -> Any:
        return op.Dropout(x, _allow_other_inputs=True, _allow_other_outputs=True)

    def check(self, ctx: RewriteContext, x: Value) -> bool:
        node = ctx.root
        if ctx.opset < 7 and not node.get_attr("is_test", 0):
            return ctx.refuse("is_test=0: before opset 7, Dropout trains unless is_test is set")
        training = node.inputs[2] if len(node.inputs) > 2 else None
        if training is not None:  # opset 12 on
            mode = ctx.constant(training)
            if mode is None:
                return ctx.refuse("training_mode is not a constant")
            ratio = node.inputs[1]
            rate = ctx.constant(ratio) if ratio is not None else np.float32(0.5)
            if bool(np.all(mode)) and (rate is None or float(np.asarray(rate)) != 0.0):
                return ctx.refuse("training_mode is true: the output is random")
        if len(node.outputs) > 1 and node.outputs[1].is_used and ctx.opset < 10:
            return ctx.refuse("the mask is read, and before opset 10 it has the data's type")
        return True

    def rewrite(self, op: RewriteBuilder, x: Value) -> list[Value]:
        outputs = op.ctx.root.outputs
        if len(outputs) == 1:
            return [x]
        mask = outputs[1]
        if not mask.is_used:
            return [x, mask]
        shape = op.ctx.shape(x)
        static = shape is not None and all(isinstance(d, int) for d in shape)
        dims = op.const(np.array(shape, np.int64)) if static else op.Shape(x)
        return [x, op.ConstantOfShape(dims, value=np.array([True]))]


def _reshape_keeps(target: Sequence[int], shape: Sequence[Dim], allowzero: bool) -> bool | str:
    """Whether Reshape to `target` gives a tensor of `shape` back that shape."""
    if len(target) != len(shape):
        return False
    unknown = ""
    for axis, (t, d) in enumerate(zip(target, shape, strict=True)):
        if (t == 0 and not allowzero) or t == -1:  # copies d; or is inferred, = d if all else is
            continue
        if isinstance(d, int):
            if t != d:
                return False
        else:
            unknown = unknown or f"x's dim {axis} is {d or '?'}, the target says {t}"
    return unknown or True


class ReshapeNoOp(_Rule):
    def pattern(self, op: Any, x: Any) -> Any:
        return op.Reshape(x, _allow_other_inputs=True)

    def check(self, ctx: RewriteContext, x: Value) -> bool:
        if _same_as_declared(ctx, x):
            return True
        target = _ints(ctx, ctx.root, 1, "shape")
        if target is None:
            return ctx.refuse("the target shape is not a constant")
        shape = ctx.shape(x)
        if shape is None:
            return ctx.refuse("x's rank is unknown")
        return _verdict(ctx, _reshape_keeps(target, shape, bool(ctx.root.get_attr("allowzero", 0))))


class ReshapeToOwnShape(_Rule):
    # Shape(x) may have other readers: it stays for them
    allow_external_uses = True

    def pattern(self, op: Any, x: Any) -> Any:
        return op.Reshape(x, op.Shape(x, start=lambda s: not s, end=lambda e: e is None))


class ReshapeReshape(_Rule):
    """Reshape keeps the row-major order of elements, so only the last target shape matters."""

    def pattern(self, op: Any, x: Any) -> Any:
        first = op.Reshape(x, _allow_other_inputs=True, _name="first")
        return op.Reshape(first, _allow_other_inputs=True)

    def check(self, ctx: RewriteContext, x: Value) -> bool:
        if len(ctx.node("first").inputs) < 2 or len(ctx.root.inputs) < 2:
            return ctx.refuse("Reshape before opset 5 (shape attribute) is not merged")
        target = self._target(ctx)
        return ctx.refuse(target) if isinstance(target, str) else True

    def rewrite(self, op: RewriteBuilder, x: Value) -> Value:
        target = self._target(op.ctx)
        shape = op.const(target) if isinstance(target, np.ndarray) else target
        assert isinstance(shape, Value)
        attrs: dict[str, Any] = dict(op.ctx.root.attrs)  # allowzero
        return op.op("Reshape", x, shape, **attrs)  # type: ignore[no-any-return]

    @staticmethod
    def _target(ctx: RewriteContext) -> Value | np.ndarray | str:
        """The second shape with its 0 entries (copies of the intermediate's dims) resolved."""
        first, root = ctx.node("first"), ctx.root
        second = root.inputs[1]
        assert second is not None
        if root.get_attr("allowzero", 0):
            return second  # its zeros are zeros
        values = ctx.constant(second)
        if values is None:
            return "the second shape is not a constant: its 0 entries may copy intermediate dims"
        shape1 = ctx.constant(first.inputs[1])
        zero_copies = not first.get_attr("allowzero", 0)
        middle = ctx.shape(first.outputs[0]) or ()
        given = [int(v) for v in np.asarray(values).reshape(-1)]
        resolved = list(given)
        for i, v in enumerate(given):
            if v != 0:
                continue
            s1 = int(shape1.reshape(-1)[i]) if shape1 is not None and i < shape1.size else None
            dim = middle[i] if i < len(middle) else None
            if s1 is not None and (s1 > 0 or (s1 == 0 and zero_copies)):
                resolved[i] = s1  # a 0 there copies x's dim i, as it does here
            elif isinstance(dim, int) and dim > 0:
                resolved[i] = dim
            else:
                return f"entry {i} of the second shape copies an intermediate dim that is unknown"
        return second if resolved == given else np.array(resolved, np.int64)


def _perm(node: Node, rank: int | None) -> list[int] | None:
    perm = node.get_attr("perm")
    if perm is None:  # the default reverses the axes
        return None if rank is None else list(range(rank))[::-1]
    return [int(p) for p in perm]


class TransposeIdentity(_Rule):
    def pattern(self, op: Any, x: Any) -> Any:
        return op.Transpose(x)

    def check(self, ctx: RewriteContext, x: Value) -> bool:
        perm = _perm(ctx.root, ctx.rank(x))
        if perm is None:
            return ctx.refuse("no perm, and x's rank is unknown")
        return perm == list(range(len(perm)))


class TransposeTranspose(_Rule):
    """out[j] = mid[q[j]] = x[p[q[j]]]: one Transpose by r = p∘q, none when r is the identity."""

    def pattern(self, op: Any, x: Any) -> Any:
        return op.Transpose(op.Transpose(x, _name="first"))

    def check(self, ctx: RewriteContext, x: Value) -> bool:
        return self._composed(ctx, ctx.rank(x)) is not None or ctx.refuse(
            "a perm is left out (reversal), and x's rank is unknown"
        )

    def rewrite(self, op: RewriteBuilder, x: Value) -> Value:
        perm = self._composed(op.ctx, op.ctx.rank(x))
        assert perm is not None
        return x if perm == list(range(len(perm))) else op.Transpose(x, perm=perm)

    @staticmethod
    def _composed(ctx: RewriteContext, rank: int | None) -> list[int] | None:
        p, q = _perm(ctx.node("first"), rank), _perm(ctx.root, rank)
        return None if p is None or q is None else [p[i] for i in q]


class CastToOwnType(_Rule):
    def pattern(self, op: Any, x: Any) -> Any:
        return op.Cast(x)

    def check(self, ctx: RewriteContext, x: Value) -> bool:
        if ctx.dtype(x) is None:
            return ctx.refuse("x's element type is unknown")
        return ctx.dtype(x) == _cast_target(ctx.root)


class CastCast(_Rule):
    """When the middle type holds every value of x's exactly, casting through it changes no
    value: a Cast depends only on the value it converts. Back to x's type, nothing is left."""

    def pattern(self, op: Any, x: Any) -> Any:
        return op.Cast(op.Cast(x, _name="first"))

    def check(self, ctx: RewriteContext, x: Value) -> bool:
        source, middle = ctx.dtype(x), _cast_target(ctx.node("first"))
        if source is None or middle is None:
            return ctx.refuse("x's element type is unknown")
        if not holds_exactly(source, middle):
            return ctx.refuse(
                f"Cast to {middle.short_name} does not hold every {source.short_name} value"
            )
        return True

    def rewrite(self, op: RewriteBuilder, x: Value) -> Value:
        if _cast_target(op.ctx.root) == op.ctx.dtype(x):
            return x
        attrs: dict[str, Any] = dict(op.ctx.root.attrs)  # to, saturate
        return op.op("Cast", x, **attrs)  # type: ignore[no-any-return]


class CastLikeToCast(_Rule):
    """CastLike reads only the element type of its second operand; once the graph declares it,
    the node is that Cast, which then folds or drops like any other (exporters write
    `CastLike(0, x)` for a zero bias, so the constant hides behind a non-constant operand)."""

    def pattern(self, op: Any, x: Any, like: Any) -> Any:
        return op.CastLike(x, like)

    def check(self, ctx: RewriteContext, x: Value, like: Value) -> bool:
        return ctx.dtype(like) is not None or ctx.refuse("the target's element type is unknown")

    def rewrite(self, op: RewriteBuilder, x: Value, like: Value) -> Value:
        dtype = op.ctx.dtype(like)
        assert dtype is not None  # checked
        attrs: dict[str, Any] = {"to": int(dtype), **op.ctx.root.attrs}  # saturate
        return op.op("Cast", x, **attrs)  # type: ignore[no-any-return]


class ExpandNoOp(_Rule):
    def pattern(self, op: Any, x: Any, shape: Any) -> Any:
        return op.Expand(x, shape)

    def check(self, ctx: RewriteContext, x: Value, shape: Value) -> bool:
        if _same_as_declared(ctx, x):
            return True
        target = ctx.constant(shape)
        if target is None:
            return ctx.refuse("the target shape is not a constant")
        dims = ctx.shape(x)
        if dims is None:
            return ctx.refuse("x's rank is unknown")
        target_dims = [int(t) for t in target.reshape(-1)]
        if len(target_dims) > len(dims) or not all(
            t == 1 or not isinstance(d, int) or t == d
            for t, d in zip(target_dims[::-1], dims[::-1], strict=False)
        ):
            return False
        if _broadcasts_into(target_dims, dims):
            return True
        return ctx.refuse(f"x's shape {list(dims)} has dims not known to match the target's")


class SliceFullRange(_Rule):
    def pattern(self, op: Any, x: Any) -> Any:
        return op.Slice(x, _allow_other_inputs=True)

    def check(self, ctx: RewriteContext, x: Value) -> bool:
        node = ctx.root
        names = ["starts", "ends", "axes", "steps"]
        operands = [_ints(ctx, node, i + 1, name) for i, name in enumerate(names)]
        for i, name in enumerate(names):
            if operands[i] is None and (i < 2 or _given(node, i + 1, name)):
                return ctx.refuse(f"{name} is not a constant")
        starts, ends, axes, steps = operands
        assert starts is not None and ends is not None
        shape = ctx.shape(x)
        if shape is None:
            return ctx.refuse("x's rank is unknown")
        axes = _normalize(axes if axes is not None else list(range(len(starts))), len(shape))
        steps = steps if steps is not None else [1] * len(starts)
        assert axes is not None
        unknown = ""
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=False):
            dim = shape[axis]
            if step != 1 or start > 0:
                return False
            if isinstance(dim, int):  # the range is [max(start + dim, 0), min(end, dim))
                if start + dim > 0 > start or end < dim:
                    return False
            elif end < INT64_MAX:
                unknown = f"x's dim {axis} is {dim or '?'}: end {end} may not reach it"
            elif start < 0:
                unknown = f"x's dim {axis} is {dim or '?'}: start {start} may not be 0"
        return _verdict(ctx, unknown or True)


def _axes(ctx: RewriteContext, node: Node) -> list[int] | str | None:
    """A Squeeze's or Unsqueeze's axes (input or attribute): None when the node has none; a
    reason when they are not a constant."""
    if not _given(node, 1, "axes"):
        return None
    axes = _ints(ctx, node, 1, "axes")
    return f"the axes of {node.op} are not a constant" if axes is None else axes


def _same_axes(ctx: RewriteContext, a: list[int], b: list[int], rank: int | None) -> bool:
    """Whether two lists of axes against `rank` name the same axes (refuses if it cannot tell)."""
    normal = [_normalize(a, rank), _normalize(b, rank)]
    if normal[0] is None or normal[1] is None:
        return ctx.refuse("negative axes, and x's rank is unknown")
    return set(normal[0]) == set(normal[1])


def _unit_axes(ctx: RewriteContext, x: Value) -> list[int] | str:
    """The axes a Squeeze without axes removes from x: its size-1 dims, if x's shape is static."""
    shape = ctx.shape(x)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return "Squeeze has no axes (it drops every size-1 dim), and x's shape is not static"
    return [i for i, d in enumerate(shape) if d == 1]


class SqueezeUnsqueeze(_Rule):
    """Squeeze drops exactly the size-1 dims Unsqueeze inserted."""

    def pattern(self, op: Any, x: Any) -> Any:
        inner = op.Unsqueeze(x, _allow_other_inputs=True, _name="unsqueeze")
        return op.Squeeze(inner, _allow_other_inputs=True)

    def check(self, ctx: RewriteContext, x: Value) -> bool:
        rank = ctx.rank(x)
        inserted, removed = _axes(ctx, ctx.node("unsqueeze")), _axes(ctx, ctx.root)
        if not isinstance(inserted, list):
            return ctx.refuse(inserted or "Unsqueeze has no axes")
        if removed is None:  # squeeze every size-1 dim: x must have none of its own
            unit = _unit_axes(ctx, x)
            return ctx.refuse(unit) if isinstance(unit, str) else not unit
        if isinstance(removed, str):
            return ctx.refuse(removed)
        middle = rank + len(inserted) if rank is not None else None  # Squeeze's input rank
        return _same_axes(ctx, inserted, removed, middle)


class UnsqueezeSqueeze(_Rule):
    """Unsqueeze puts size-1 dims back where Squeeze removed them (they were 1, or it failed)."""

    def pattern(self, op: Any, x: Any) -> Any:
        inner = op.Squeeze(x, _allow_other_inputs=True, _name="squeeze")
        return op.Unsqueeze(inner, _allow_other_inputs=True)

    def check(self, ctx: RewriteContext, x: Value) -> bool:
        rank = ctx.rank(x)
        removed, inserted = _axes(ctx, ctx.node("squeeze")), _axes(ctx, ctx.root)
        if removed is None:  # every size-1 dim
            removed = _unit_axes(ctx, x)
        for axes in (removed, inserted):
            if not isinstance(axes, list):
                return ctx.refuse(axes or "Unsqueeze has no axes")
        assert isinstance(removed, list) and isinstance(inserted, list)
        # with as many inserted as removed, the output has x's rank
        return len(removed) == len(inserted) and _same_axes(ctx, removed, inserted, rank)


class ConcatOfOne(_Rule):
    def pattern(self, op: Any, x: Any) -> Any:
        return op.Concat(x)


class SplitIntoOne(_Rule):
    # one output must take the whole axis (split sizes sum to it; num_outputs=1)
    def pattern(self, op: Any, x: Any) -> Any:
        return op.Split(x, _allow_other_inputs=True)


class PadNothing(_Rule):
    def pattern(self, op: Any, x: Any) -> Any:
        return op.Pad(x, _allow_other_inputs=True)

    def check(self, ctx: RewriteContext, x: Value) -> bool:
        node = ctx.root
        pads = _ints(ctx, node, 1, "pads" if "paddings" not in node.attrs else "paddings")
        if pads is None:
            return ctx.refuse("pads are not a constant")
        return not any(pads)  # any mode, any constant value: nothing is added


class Flatten2D(_Rule):
    def pattern(self, op: Any, x: Any) -> Any:
        return op.Flatten(x)

    def check(self, ctx: RewriteContext, x: Value) -> bool:
        rank = ctx.rank(x)
        if rank is None:
            return ctx.refuse("x's rank is unknown")
        axis = int(ctx.root.get_attr("axis", 1))
        return rank == 2 and axis in (1, -1)  # out = [d0, d1], x's shape


@dataclass(eq=False)
class NeutralOperand(_Rule):
    """x op c -> x for a constant c that op leaves x unchanged by, when broadcasting against c
    changes neither x's shape nor its element type."""

    op_type: str
    neutral: float
    title: str = ""

    def pattern(self, op: Any, x: Any) -> Any:
        return op.op(self.op_type, x, Const(self.neutral, name="c"))

    def check(self, ctx: RewriteContext, x: Value, c: Value) -> bool:
        shape, constant = ctx.shape(x), ctx.constant(c)
        if shape is None:
            return ctx.refuse("x's shape is unknown")
        assert constant is not None
        if not _broadcasts_into(constant.shape, shape):
            return ctx.refuse(
                f"broadcasting against the constant's shape {list(constant.shape)} "
                f"may change x's shape {list(shape)}"
            )
        dtype, out = ctx.dtype(x), ctx.dtype(ctx.root.outputs[0])
        if dtype is None or (out is not None and out != dtype):
            return ctx.refuse("the result's element type is not x's")
        return True


@dataclass(eq=False)
class WhereConstant(_Rule):
    """Where(c, a, b) with c all `keep` -> a (True) or b (False), when broadcasting c and the
    other branch against the kept one changes neither its shape nor its element type."""

    keep: bool
    title: str = ""

    def pattern(self, op: Any, a: Any, b: Any) -> Any:
        cond = Const(lambda v: v.dtype == np.bool_ and bool(np.all(v == self.keep)), name="c")
        return op.Where(cond, a, b)

    def check(self, ctx: RewriteContext, c: Value, a: Value, b: Value) -> bool:
        kept, other = (a, b) if self.keep else (b, a)
        shape, condition = ctx.shape(kept), ctx.constant(c)
        if shape is None or ctx.shape(other) is None:
            return ctx.refuse("the shapes of the branches are unknown")
        assert condition is not None
        for small in (list(condition.shape), ctx.shape(other)):
            if not _broadcasts_into(small, shape):  # type: ignore[arg-type]
                return ctx.refuse(f"broadcasting against {small} may change {list(shape)}")
        out = ctx.dtype(ctx.root.outputs[0])
        if ctx.dtype(kept) is None or (out is not None and out != ctx.dtype(kept)):
            return ctx.refuse("the result's element type is not the kept branch's")
        return True

    def rewrite(self, op: RewriteBuilder, a: Value, b: Value) -> Value:
        return a if self.keep else b


@dataclass(eq=False)
class Involution(_Rule):
    """f(f(x)) -> x for an f that is its own inverse on every value (Neg wraps the same way twice
    at the most negative integer). Reciprocal is not one on floats: 1/(1/x) rounds."""

    op_type: str
    title: str = ""

    def pattern(self, op: Any, x: Any) -> Any:
        return op.op(self.op_type, op.op(self.op_type, x))


# The table. Order matters only where two rules match one node: the first that applies wins.
RULES: tuple[RewriteRule, ...] = (
    DropIdentity(),  # Identity(x) -> x
    DropInferenceDropout(),  # Dropout(x, ratio, training_mode=false) -> x, mask -> all true
    ReshapeToOwnShape(),  # Reshape(x, Shape(x)) -> x
    ReshapeNoOp(),  # Reshape(x, s) -> x  when s resolves to shape(x)
    ReshapeReshape(),  # Reshape(Reshape(x, s1), s2) -> Reshape(x, s2), 0s of s2 resolved
    TransposeIdentity(),  # Transpose(x, perm=[0, 1, ..]) -> x
    TransposeTranspose(),  # Transpose(Transpose(x, p), q) -> Transpose(x, p∘q), or x if p∘q = id
    CastToOwnType(),  # Cast(x: T, to=T) -> x
    CastCast(),  # Cast(Cast(x: T, to=A), to=B) -> Cast(x, to=B), x if B = T; A holds every T
    CastLikeToCast(),  # CastLike(x, y: T) -> Cast(x, to=T)
    ExpandNoOp(),  # Expand(x, s) -> x  when broadcast(shape(x), s) = shape(x)
    SliceFullRange(),  # Slice(x, starts=0, ends>=dim, axes, steps=1) -> x
    SqueezeUnsqueeze(),  # Squeeze(Unsqueeze(x, a), a) -> x
    UnsqueezeSqueeze(),  # Unsqueeze(Squeeze(x, a), a) -> x
    ConcatOfOne(),  # Concat(x) -> x
    SplitIntoOne(),  # Split(x) -> x  with one output
    PadNothing(),  # Pad(x, pads=0) -> x
    Flatten2D(),  # Flatten(x: [a, b], axis=1) -> x
    NeutralOperand("Mul", 1, "MulByOne"),  # x * 1 -> x, 1 * x -> x
    NeutralOperand("Add", 0, "AddZero"),  # x + 0 -> x, 0 + x -> x
    NeutralOperand("Sub", 0, "SubZero"),  # x - 0 -> x
    NeutralOperand("Div", 1, "DivByOne"),  # x / 1 -> x
    NeutralOperand("Pow", 1, "PowOne"),  # x ** 1 -> x
    WhereConstant(True, "WhereTrue"),  # Where(true, a, b) -> a
    WhereConstant(False, "WhereFalse"),  # Where(false, a, b) -> b
    Involution("Neg", "NegNeg"),  # -(-x) -> x
    Involution("Not", "NotNot"),  # !!x -> x
)


@register_pass("canonicalize", "drop identities and no-ops (Identity, x*1, Transpose pairs, ...)")
@dataclass
class Canonicalize(RewritePass):
    def rules(self) -> list[RewriteRule]:
        return list(RULES)
