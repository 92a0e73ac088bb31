"""fuse-matmul-add: a matrix product followed by a bias Add becomes one Gemm.

Matches, with `b` broadcast over rows only (shape [N] or [1, N]; a one-element b too):

    Add(MatMul(x, W), b)        -> Gemm(x, W, b)              x and W 2-D
    Add(Gemm(x, W), c)          -> Gemm(x, W, c, beta=1)       Gemm without C, c a constant
    Add(Gemm(x, W, C), c)       -> Gemm(x, W, beta*C + c, beta=1)   C and c constants

Algebra: Gemm computes alpha * A' B' + beta * C with C broadcast unidirectionally to [M, N]; with
alpha = beta = 1 and no transposes that is x @ W + b, the MatMul then the Add. A per-column C adds
the same row to every output row, which is what Add of a [N] or [1, N] vector does. Two constant
per-column vectors add into one (computed in float64, stored in the bias's dtype).

N-D x (transformer activations [batch, seq, K]): Gemm takes 2-D A only, so MatMul + Add stays,
for both targets, and the pass says so once. Reshaping x to [batch * seq, K] around a Gemm was
measured in ONNX Runtime 1.32 on CPU (2 threads, BERT-base shapes [1, 128, 768] x [768, 768] /
[768, 3072] / [3072, 768], and small ones): within +-5% of MatMul + Add, not faster; and ONNX
Runtime has no contrib op for an N-D MatMul with bias (its own transformer fusions fold the bias
into SkipLayerNormalization, BiasGelu or Attention instead), so target onnxruntime keeps the pair
as well.

Refuses, saying why: ranks or shapes unknown; b broadcasts along rows ([M, 1], [M, N]: that is a
residual or another activation, which SkipLayerNormalization wants) or grows the output; element
types Gemm does not take or that differ; a Gemm C that is not a per-column constant; opset below
7 (Gemm's C broadcasts since 7; a Gemm without C needs 11). The MatMul or Gemm read elsewhere is
refused by the engine.

Ordering: after fuse-bias-gelu and fuse-skip-layernorm (they take the bias Add themselves), and
after fuse-qkv (which folds the Q/K/V biases into one Add).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.ir.core import Value
from graphopt.ir.types import DType
from graphopt.passes.manager import register_pass
from graphopt.passes.rewrite import RewriteBuilder, RewriteContext, RewritePass, RewriteRule

__all__ = ["FuseMatMulAdd"]

GEMM_TYPES = frozenset(
    {DType.FLOAT16, DType.FLOAT, DType.DOUBLE, DType.BFLOAT16, DType.INT32, DType.INT64,
     DType.UINT32, DType.UINT64}
)  # fmt: skip
ND_NOTE = (
    "MatMul + Add of an N-D input kept: Gemm takes 2-D inputs, and a Reshape to 2-D and back "
    "around a Gemm measured no faster in ONNX Runtime"
)


def per_column(ctx: RewriteContext, b: Value, n: Any) -> str | None:
    """Why `b` is not a row vector for an output of `n` columns (None when it is one)."""
    shape = ctx.shape(b)
    if shape is None:
        return f"the shape of %{b.name} is unknown"
    if len(shape) > 2:
        return f"%{b.name} has rank {len(shape)}: it would broadcast the product to a higher rank"
    if len(shape) == 2 and shape[0] != 1:
        return f"%{b.name} {list(shape)} varies along rows: Gemm's C is a per-column bias here"
    if shape and shape[-1] != 1 and shape[-1] != n:
        return f"%{b.name} has {shape[-1]} columns, the product {n}"
    return None


class MatMulAdd(RewriteRule):
    """Add(MatMul(x, W), b) -> Gemm(x, W, b) for 2-D x and W and a row-vector b."""

    def pattern(self, op: Any, x: Any, w: Any, b: Any) -> Any:
        return op.Add(op.MatMul(x, w, _name="mm"), b)

    def check(self, ctx: RewriteContext, x: Value, w: Value, b: Value) -> bool:
        ranks = (ctx.rank(x), ctx.rank(w))
        if None in ranks:
            return ctx.refuse("the operand ranks are unknown")
        if ranks != (2, 2):
            if ctx.pass_context is not None and ranks[0] != 1 and ranks[1] != 1:  # type: ignore[operator]
                ctx.pass_context.note(ND_NOTE, kind="refused")
                return False
            return ctx.refuse(f"Gemm needs 2-D operands, these are {ranks[0]}-D and {ranks[1]}-D")
        if ctx.opset < 7:
            return ctx.refuse(f"Gemm broadcasts C from opset 7, the model imports {ctx.opset}")
        dtype = ctx.dtype(x)
        if dtype not in GEMM_TYPES or ctx.dtype(b) != dtype:
            return ctx.refuse("element types Gemm does not take, or that differ")
        out = ctx.shape(ctx.node("mm").outputs[0])
        reason = per_column(ctx, b, out[-1] if out else None)
        return ctx.refuse(reason) if reason else True

    def rewrite(self, op: RewriteBuilder, x: Value, w: Value, b: Value) -> Any:
        return op.Gemm(x, w, b)


class GemmAdd(RewriteRule):
    """Add(Gemm(x, W[, C]), c) -> Gemm(x, W, beta*C + c, beta=1) for per-column constants."""

    def pattern(self, op: Any, x: Any, w: Any, c: Any) -> Any:
        return op.Add(op.Gemm(x, w, _name="gemm", _allow_other_inputs=True), c)

    def bias(self, ctx: RewriteContext, c: Value) -> np.ndarray | None:
        """The new C, or None after refusing."""
        gemm = ctx.node("gemm")
        out = gemm.outputs[0]
        shape = ctx.shape(out)
        if shape is None or len(shape) != 2:
            ctx.refuse("the Gemm's output shape is unknown")
            return None
        if ctx.opset < 11 and len(gemm.inputs) < 3:
            ctx.refuse(f"Gemm without C before opset 11 (the model imports {ctx.opset})")
            return None
        extra = ctx.constant(c)
        if extra is None or extra.dtype.kind != "f":
            ctx.refuse(f"%{c.name} is not a float constant")
            return None
        if DType.from_numpy(extra.dtype) != ctx.dtype(out):
            ctx.refuse("the bias's element type differs from the Gemm's")
            return None
        reason = per_column(ctx, c, shape[1])
        if reason:
            ctx.refuse(reason)
            return None
        total = extra.astype(np.float64).reshape(-1)
        old = gemm.inputs[2] if len(gemm.inputs) > 2 else None
        if old is not None:
            existing = ctx.constant(old)
            if existing is None or per_column(ctx, old, shape[1]) is not None:
                ctx.refuse("the Gemm's C is not a per-column constant")
                return None
            beta = float(gemm.get_attr("beta", 1.0))
            total = total + beta * existing.astype(np.float64).reshape(-1)
        if total.size == 1 and shape[1] != 1:
            return total.astype(extra.dtype).reshape(1)
        return total.astype(extra.dtype)

    def check(self, ctx: RewriteContext, c: Value) -> bool:
        return self.bias(ctx, c) is not None

    def rewrite(self, op: RewriteBuilder, x: Value, w: Value, c: Value) -> Any:
        bias = self.bias(op.ctx, c)
        gemm = op.ctx.node("gemm")
        attrs = {k: a for k, a in gemm.attrs.items() if k != "beta"}
        return op.op("Gemm", x, w, op.const(bias), _attrs=attrs)


@register_pass("fuse-matmul-add", "MatMul + bias Add -> Gemm for 2-D operands; Gemm + Add -> Gemm")
@dataclass
class FuseMatMulAdd(RewritePass):
    def rules(self) -> list[RewriteRule]:
        return [MatMulAdd(), GemmAdd()]
