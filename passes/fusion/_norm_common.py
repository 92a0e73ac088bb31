"""Shared pieces of the normalization fusions (`fuse-layernorm`, `fuse-rmsnorm`,
`fuse-skip-layernorm`): the spellings of the decomposed patterns, the checks on their operands,
and the rules that fold what exporters write around a fused norm into it.

A decomposed norm is fused in steps, each exact on its own, so that every spelling exporters
write is covered by a few short patterns instead of one pattern per combination:

1. the core (`x / sqrt(mean(x^2) + eps)`, centered for LayerNorm) becomes the fused op with a
   scale of ones (and a bias of zeros): `N(x, 1, 0)`;
2. `Cast(N(Cast(x, to=float32), 1, 0), to=T)` becomes `N(x, 1, 0)` computed in `T` with
   `stash_type=1`, which the ONNX spec defines as exactly that (compute in float32, cast the
   normalized value to T, then scale and shift in T);
3. `N(x, s, b) * g` becomes `N(x, s*g, b*g)` and `N(x, s, b) + c` becomes `N(x, s, b+c)`, for
   constants `g`, `c` that vary only along the normalized axes. After step 1 `s` is ones and `b`
   zeros, so the products and sums are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from graphopt.ir.core import Node, Value
from graphopt.ir.types import DType, TensorType
from graphopt.passes.rewrite import Const, RewriteBuilder, RewriteContext, RewriteRule

__all__ = [
    "INVERSE_FORMS",
    "SQUARE_FORMS",
    "FoldCasts",
    "FoldScale",
    "FoldShift",
    "epsilon_of",
    "inverse_std",
    "is_tensor_of",
    "keeps_shape",
    "need_opset",
    "normalized_axes",
    "normalized_shape",
    "square",
]

# ----- pattern spellings --------------------------------------------------------------------------

SQUARE_FORMS = ("pow", "mul")
# how `d / sqrt(v)` is written: Div(d, Sqrt(v)); d * Reciprocal(Sqrt(v)) (torch.rsqrt in the
# dynamo exporter); d * (1 / Sqrt(v)) (torch.rsqrt in the TorchScript exporter); d * v ** -0.5
INVERSE_FORMS = ("div", "reciprocal", "one-over", "pow")


def square(op: Any, d: Any, form: str) -> Any:
    """`d ** 2` as `Pow(d, 2)` or `Mul(d, d)`."""
    return op.Pow(d, Const(2.0)) if form == "pow" else op.Mul(d, d)


def inverse_std(op: Any, d: Any, var_eps: Any, form: str) -> Any:
    """`d / sqrt(var_eps)` in one of `INVERSE_FORMS`."""
    if form == "div":
        return op.Div(d, op.Sqrt(var_eps))
    if form == "reciprocal":
        return op.Mul(d, op.Reciprocal(op.Sqrt(var_eps)))
    if form == "one-over":
        return op.Mul(d, op.Div(Const(1.0), op.Sqrt(var_eps)))
    return op.Mul(d, op.Pow(var_eps, Const(-0.5)))


# ----- checks -------------------------------------------------------------------------------------


def need_opset(ctx: RewriteContext, op_name: str, version: int) -> bool:
    """Refuse (False) when the model imports an opset older than `version`, the first with
    `op_name`."""
    if ctx.opset < version:
        return ctx.refuse(
            f"{op_name} needs opset {version}, the model imports {ctx.opset}: "
            "run upgrade-opset first"
        )
    return True


def _reduce_axes(ctx: RewriteContext, node: Node) -> list[int] | str:
    """The axes a ReduceMean reduces (as written; [] for all), or why they cannot be read."""
    if not node.get_attr("keepdims", 1):
        return "ReduceMean drops the reduced axes (keepdims=0)"
    if ctx.opset >= 18:
        given = node.inputs[1] if len(node.inputs) > 1 else None
        if given is None:
            axes: list[int] = []
        else:
            array = ctx.constant(given)
            if array is None:
                return "ReduceMean's axes are not a constant"
            axes = [int(a) for a in np.asarray(array).reshape(-1)]
    else:
        axes = [int(a) for a in node.get_attr("axes", [])]
    if not axes and node.get_attr("noop_with_empty_axes", 0):
        return "ReduceMean reduces no axis (noop_with_empty_axes)"
    return axes


def normalized_axes(ctx: RewriteContext, x: Value, *reductions: Node) -> int | str:
    """How many trailing axes of `x` the ReduceMeans `reductions` all normalize over (k of the
    fused op's `axis=-k`), or why that is not a trailing block they agree on."""
    rank = ctx.rank(x)
    found: list[int] | None = None
    for node in reductions:
        axes = _reduce_axes(ctx, node)
        if isinstance(axes, str):
            return axes
        if not axes:
            if rank is None:
                return "ReduceMean reduces every axis of an input of unknown rank"
            axes = list(range(rank))
        if rank is not None:
            if any(not -rank <= a < rank for a in axes):
                return f"ReduceMean's axes {axes} are out of range for rank {rank}"
            axes = [a - rank if a >= 0 else a for a in axes]
        elif any(a >= 0 for a in axes):
            return f"the rank of %{x.name} is unknown, so axes {axes} cannot be placed"
        normalized = sorted(set(axes))
        if found is not None and normalized != found:
            return f"the two ReduceMeans normalize different axes ({found} and {normalized})"
        found = normalized
    assert found is not None
    k = len(found)
    if found != list(range(-k, 0)):
        return f"the normalized axes {found} are not the last {k} axes"
    return k


def normalized_shape(ctx: RewriteContext, x: Value, k: int) -> tuple[int, ...] | str:
    """The static sizes of `x`'s last `k` axes, or why they are not known."""
    shape = ctx.shape(x)
    if shape is None or len(shape) < k:
        return f"the shape of %{x.name} is unknown"
    dims = shape[len(shape) - k :]
    if not all(isinstance(d, int) for d in dims):
        return f"the normalized dims {list(dims)} of %{x.name} are not static"
    return tuple(int(d) for d in dims)  # type: ignore[arg-type]


def epsilon_of(ctx: RewriteContext, eps: Value) -> float | str:
    """The epsilon a constant scalar holds, or why it is not one."""
    array = ctx.constant(eps)
    if array is None:
        return "epsilon is not a constant"
    if array.size != 1 or array.dtype.kind != "f":
        return f"epsilon is not a float scalar (shape {list(array.shape)}, {array.dtype})"
    value = float(np.asarray(array, np.float64).reshape(-1)[0])
    if not value >= 0:  # also rejects NaN
        return f"epsilon {value} is negative"
    return value


def keeps_shape(ctx: RewriteContext, x: Value) -> bool:
    """Refuse (False) when a constant operand of the matched nodes (an epsilon, the 2 of Pow)
    could broadcast the pattern's result to a shape other than `x`'s."""
    shape = ctx.shape(x)
    for node in ctx.match.matched_nodes:
        for index, value in enumerate(node.inputs):
            if value is None or (node.op_type == "ReduceMean" and index == 1):
                continue
            array = ctx.constant(value)
            if array is None or array.size > 4096:
                continue
            dims = array.shape
            if shape is None:
                fits = array.size == 1 and len(dims) <= 1
            else:
                fits = len(dims) <= len(shape) and all(
                    d == 1 or d == n for d, n in zip(dims[::-1], shape[::-1], strict=False)
                )
            if not fits:
                return ctx.refuse(
                    f"the constant %{value.name} {list(dims)} may broadcast %{x.name} "
                    "to another shape"
                )
    return True


def _along_normalized(array: np.ndarray, shape: tuple[int, ...], rank: int | None) -> bool:
    """Whether a constant of `array`'s shape, broadcast against a tensor of rank `rank` whose
    last axes are `shape`, varies only along those axes (and does not grow the tensor)."""
    dims = array.shape
    if rank is not None and len(dims) > rank:
        return False
    k = len(shape)
    lead = dims[: max(0, len(dims) - k)]
    tail = dims[max(0, len(dims) - k) :]
    return all(d == 1 for d in lead) and all(
        d in (1, n) for d, n in zip(tail, shape[k - len(tail) :], strict=True)
    )


# ----- folding rules ------------------------------------------------------------------------------


class _Fold(RewriteRule):
    """Base of the folds: `norm` is the captured LayerNormalization / RMSNormalization."""

    op_name = ""  # "LayerNormalization" or "RMSNormalization", set per instance
    has_bias = True

    def __init__(self, op_name: str):
        self.op_name = op_name
        self.has_bias = op_name == "LayerNormalization"

    @property
    def label(self) -> str:
        return f"{type(self).__name__}({self.op_name})"

    def _norm(self, op: Any, x: Any) -> Any:
        return op.op(
            self.op_name, x, _name="norm", _allow_other_inputs=True, _allow_other_outputs=True
        )

    def _parts(
        self, ctx: RewriteContext
    ) -> tuple[np.ndarray, np.ndarray | None, tuple[int, ...]] | None:
        """The norm's scale and bias as arrays of the normalized shape, and that shape."""
        norm = ctx.node("norm")
        if any(v.is_used for v in norm.outputs[1:]):
            ctx.refuse(f"the {self.op_name}'s statistics outputs are read")
            return None
        x = norm.inputs[0]
        axis = int(norm.get_attr("axis", -1))
        rank = ctx.rank(x)
        k = -axis if axis < 0 else (rank - axis if rank is not None else None)
        if k is None or k <= 0:
            ctx.refuse(f"the rank of the {self.op_name}'s input is unknown")
            return None
        shape = normalized_shape(ctx, x, k)  # type: ignore[arg-type]
        if isinstance(shape, str):
            ctx.refuse(shape)
            return None
        scale = ctx.constant(norm.inputs[1])
        given_bias = norm.inputs[2] if self.has_bias and len(norm.inputs) > 2 else None
        bias = ctx.constant(given_bias) if given_bias is not None else None
        if scale is None or (given_bias is not None and bias is None):
            ctx.refuse(f"the {self.op_name}'s scale or bias is not a constant")
            return None
        if not _along_normalized(scale, shape, rank) or (
            bias is not None and not _along_normalized(bias, shape, rank)
        ):
            ctx.refuse(f"the {self.op_name}'s scale or bias is not shaped {list(shape)}")
            return None
        full_bias = None
        if self.has_bias:
            full_bias = np.zeros(shape) if bias is None else np.broadcast_to(bias, shape)
        return np.broadcast_to(scale, shape), full_bias, shape

    def _constant_operand(self, ctx: RewriteContext, c: Value, shape: tuple[int, ...]) -> Any:
        array = ctx.constant(c)
        norm_out = ctx.node("norm").outputs[0]
        dtype = ctx.dtype(norm_out)
        if array is None or dtype is None or array.dtype != dtype.numpy:
            return ctx.refuse("the constant's dtype differs from the norm's output")
        if not _along_normalized(array, shape, ctx.rank(norm_out)):
            return ctx.refuse(
                f"the constant {list(array.shape)} varies along axes the norm does not "
                f"normalize ({list(shape)})"
            )
        return np.broadcast_to(array, shape)

    def _emit(self, op: RewriteBuilder, scale: np.ndarray, bias: np.ndarray | None) -> Value:
        norm = op.ctx.node("norm")
        dtype = op.ctx.dtype(norm.outputs[0]).numpy
        inputs = [norm.inputs[0], op.const(np.ascontiguousarray(scale, dtype))]
        if bias is not None:
            inputs.append(op.const(np.ascontiguousarray(bias, dtype)))
        return op.op(self.op_name, *inputs, _attrs=norm.attrs)  # type: ignore[no-any-return]


class FoldScale(_Fold):
    """N(x, s, b) * g -> N(x, s*g, b*g): the scale and shift are affine per normalized element."""

    def pattern(self, op: Any, x: Any) -> Any:
        return op.Mul(self._norm(op, x), Const(name="g"))

    def check(self, ctx: RewriteContext, g: Value) -> bool:
        parts = self._parts(ctx)
        return parts is not None and self._constant_operand(ctx, g, parts[2]) is not False

    def rewrite(self, op: RewriteBuilder, g: Value) -> Any:
        scale, bias, shape = self._parts(op.ctx)  # type: ignore[misc]
        factor = np.asarray(self._constant_operand(op.ctx, g, shape), np.float64)
        new_bias = None if bias is None else bias.astype(np.float64) * factor
        return self._emit(op, scale.astype(np.float64) * factor, new_bias)


class FoldShift(_Fold):
    """LN(x, s, b) + c -> LN(x, s, b + c)."""

    def pattern(self, op: Any, x: Any) -> Any:
        return op.Add(self._norm(op, x), Const(name="c"))

    def check(self, ctx: RewriteContext, c: Value) -> bool:
        parts = self._parts(ctx)
        return parts is not None and self._constant_operand(ctx, c, parts[2]) is not False

    def rewrite(self, op: RewriteBuilder, c: Value) -> Any:
        scale, bias, shape = self._parts(op.ctx)  # type: ignore[misc]
        shift = np.asarray(self._constant_operand(op.ctx, c, shape), np.float64)
        return self._emit(op, scale, bias.astype(np.float64) + shift)  # type: ignore[union-attr]


NARROW_FLOATS = (DType.FLOAT16, DType.BFLOAT16)


class FoldCasts(_Fold):
    """Cast(N(Cast(x: T, to=float32), 1, 0), to=T) -> N(x, 1, 0) with stash_type=1, for T of 16
    bits: the spec computes N in the stash type (float32) and casts the normalized value to T.
    An up-cast to float64 folds the same way: with stash_type=1 the statistics are float32 either
    way, and float64 holds the float32 result exactly until the Cast down."""

    def __init__(self, op_name: str, dtypes: Sequence[DType] = NARROW_FLOATS):
        super().__init__(op_name)
        self.dtypes = tuple(dtypes)

    def pattern(self, op: Any, x: Any) -> Any:
        return op.Cast(self._norm(op, op.Cast(x, _name="up")), _name="down")

    def check(self, ctx: RewriteContext, x: Value) -> bool:
        t = ctx.dtype(x)
        up, down, norm = ctx.node("up"), ctx.node("down"), ctx.node("norm")
        if up.get_attr("to") not in (DType.FLOAT, DType.DOUBLE) or down.get_attr("to") != t:
            return False  # not an up-and-down cast pair: nothing to report
        if t not in self.dtypes:
            names = ", ".join(d.name.lower() for d in self.dtypes)
            return ctx.refuse(f"{self.op_name} in {t.name.lower()} is not fused (only {names})")
        if int(norm.get_attr("stash_type", 1)) != 1:
            return ctx.refuse(f"the {self.op_name} has stash_type {norm.get_attr('stash_type')}")
        parts = self._parts(ctx)
        if parts is None:
            return False
        scale, bias, _ = parts
        if not np.all(scale == 1) or (bias is not None and not np.all(bias == 0)):
            return ctx.refuse(
                "the scale or bias is applied in float32 before the Cast; fold the Casts first"
            )
        return True

    def rewrite(self, op: RewriteBuilder, x: Value) -> Any:
        norm = op.ctx.node("norm")
        scale, bias, _ = self._parts(op.ctx)  # type: ignore[misc]
        dtype = op.ctx.dtype(x).numpy
        inputs = [x, op.const(np.ascontiguousarray(scale, dtype))]
        if bias is not None:
            inputs.append(op.const(np.ascontiguousarray(bias, dtype)))
        attrs = {k: a for k, a in norm.attrs.items() if k != "stash_type"}
        return op.op(self.op_name, *inputs, _attrs=attrs, stash_type=1)


def is_tensor_of(value: Value | None, dtypes: Sequence[DType]) -> bool:
    t = value.type if value is not None else None
    return isinstance(t, TensorType) and t.dtype in dtypes


FLOATS = (DType.FLOAT, DType.FLOAT16, DType.BFLOAT16, DType.DOUBLE)
