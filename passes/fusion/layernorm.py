"""fuse-layernorm: the decomposed LayerNorm exporters write -> one LayerNormalization (opset 17).

Matches, over the last k axes of x (ReduceMean axes as an attribute before opset 18, as an input
from 18; keepdims=1):

    m = ReduceMean(x)            d = Sub(x, m)            [d = Cast(d, to=float32)]
    v = ReduceMean(d ** 2)       (Pow(d, 2) or Mul(d, d))
    y = d / Sqrt(v + eps)        (Div, or Mul by Reciprocal(Sqrt), by Div(1, Sqrt), by Pow(., -0.5))

and writes `LayerNormalization(x, 1, 0, axis=-k, epsilon=eps, stash_type=1)` (the optional middle
Cast, which the TorchScript exporter writes for float16 inputs, becomes a Cast of x). Then, by
the folds of `_norm_common` (each exact):

- `Cast(LN(Cast(x: T, to=float32), 1, 0), to=T)` -> `LN(x, 1, 0)` in T (float16, bfloat16): the
  half-precision exports (torch's layer_norm under TorchScript, `x.float()` in model code);
- `LN(x, s, b) * g` -> `LN(x, s*g, b*g)` and `LN(x, s, b) + c` -> `LN(x, s, b+c)` for constants
  varying only along the normalized axes: the affine `weight` and `bias` that follow.

Equal because LayerNormalization-17 is defined as exactly this computation: mean and variance
over axes [axis, rank) in the stash type, `(x - mean) / sqrt(var + eps)`, cast to T, times Scale
plus B. Rounding differs where the graph computes in another order: `d * (1/s)` for `d / s`; a
float16 graph without the Casts computed the statistics in float16, the fused op in float32 (more
accurately); the TorchScript float16 form computed `x - mean` in float16.

Refuses, naming the node: the model imports opset < 17 ("run upgrade-opset first"); a ReduceMean
with keepdims=0, axes that are not constants, or axes that are not one trailing block both
reductions agree on; normalized dims that are not static (the fused op's scale needs them);
epsilon that is not a float scalar constant >= 0; float64 inputs (the fused op would compute in
float32); a middle Cast to anything but float32; a constant that would broadcast x to a higher
rank; a scale/bias constant that varies along other axes; matched nodes read outside the pattern.

Order: run after `O1` (constants folded, Identity and no-op Casts gone) and before
`fuse-skip-layernorm`. The dynamo and TorchScript (opset >= 17) exporters already write
LayerNormalization for `torch.nn.LayerNorm`; this pass is for older opsets and other converters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.ir.core import Value
from graphopt.ir.types import DType
from graphopt.passes.fusion._norm_common import (
    FLOATS,
    INVERSE_FORMS,
    NARROW_FLOATS,
    SQUARE_FORMS,
    FoldCasts,
    FoldScale,
    FoldShift,
    epsilon_of,
    inverse_std,
    is_tensor_of,
    keeps_shape,
    need_opset,
    normalized_axes,
    normalized_shape,
    square,
)
from graphopt.passes.manager import register_pass
from graphopt.passes.rewrite import RewriteBuilder, RewriteContext, RewritePass, RewriteRule

__all__ = ["FuseLayerNorm", "LayerNormCore"]

OP = "LayerNormalization"


class LayerNormCore(RewriteRule):
    """(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) -> LayerNormalization(x, 1, 0)."""

    name = "LayerNorm"

    def __init__(self, square_form: str = "pow", inverse_form: str = "div"):
        self.square_form = square_form
        self.inverse_form = inverse_form

    def pattern(self, op: Any, x: Any, eps: Any) -> Any:
        d = op.Sub(x, op.ReduceMean(x, _name="mean", _allow_other_inputs=True))
        dc = op.Cast(d, _name="cast", _optional=True)
        var = op.ReduceMean(square(op, dc, self.square_form), _name="var", _allow_other_inputs=True)
        return inverse_std(op, dc, op.Add(var, eps), self.inverse_form)

    def _plan(self, ctx: RewriteContext, x: Value, eps: Value) -> tuple[int, Any, float] | None:
        """(k, normalized shape, epsilon), or None after refusing."""
        if not need_opset(ctx, OP, 17):
            return None
        if ctx.shape(x) is None:
            ctx.refuse(f"the shape of %{x.name} is unknown (run infer-shapes first)")
            return None
        if not is_tensor_of(x, FLOATS):
            ctx.refuse(f"%{x.name} is not a float tensor")
            return None
        if ctx.dtype(x) == DType.DOUBLE:
            ctx.refuse("the pattern computes in float64; LayerNormalization would use float32")
            return None
        cast = ctx.match.captured.get("cast")
        if cast is not None and not self._cast_ok(ctx, cast.get_attr("to"), ctx.dtype(x)):
            return None
        k = normalized_axes(ctx, x, ctx.node("mean"), ctx.node("var"))
        shape = normalized_shape(ctx, x, k) if isinstance(k, int) else k
        epsilon = epsilon_of(ctx, eps)
        for problem in (k, shape, epsilon):
            if isinstance(problem, str):
                ctx.refuse(problem)
                return None
        if not keeps_shape(ctx, x):
            return None
        return k, shape, epsilon  # type: ignore[return-value]

    @staticmethod
    def _cast_ok(ctx: RewriteContext, to: Any, dtype: DType) -> bool:
        """The middle Cast goes to float32, or (TorchScript's float16 export, whose epsilon is a
        double) to float64 from 16 bits and back: float32 statistics then round the same."""
        if to == DType.FLOAT:
            return True
        if to == DType.DOUBLE and dtype in NARROW_FLOATS:
            users = ctx.root.outputs[0].users()
            if users and all(u.op == "Cast" and u.get_attr("to") == dtype for u in users):
                return True
            return ctx.refuse("the pattern computes in float64 and is not cast back to 16 bits")
        return ctx.refuse("the Cast inside the pattern is not to float32")

    def check(self, ctx: RewriteContext, x: Value, eps: Value) -> bool:
        return self._plan(ctx, x, eps) is not None

    def rewrite(self, op: RewriteBuilder, x: Value, eps: Value) -> Any:
        k, shape, epsilon = self._plan(op.ctx, x, eps)  # type: ignore[misc]
        cast = op.ctx.match.captured.get("cast")
        if cast is not None:  # compute in the Cast's type, as the pattern did
            x = op.Cast(x, to=int(cast.get_attr("to")))
        dtype = op.ctx.dtype(x).numpy if cast is None else DType(cast.get_attr("to")).numpy
        scale = op.const(np.ones(shape, dtype))
        bias = op.const(np.zeros(shape, dtype))
        return op.op(OP, x, scale, bias, axis=-k, epsilon=epsilon, stash_type=1)


def layernorm_rules() -> list[RewriteRule]:
    """Every spelling of the core, then the folds of Casts, weight and bias."""
    cores: list[RewriteRule] = [LayerNormCore(s, i) for s in SQUARE_FORMS for i in INVERSE_FORMS]
    return [*cores, FoldCasts(OP), FoldScale(OP), FoldShift(OP)]


@register_pass(
    "fuse-layernorm", "decomposed LayerNorm (ReduceMean, Sub, Pow, Sqrt, Div) -> LayerNormalization"
)
@dataclass
class FuseLayerNorm(RewritePass):
    def rules(self) -> list[RewriteRule]:
        return layernorm_rules()
