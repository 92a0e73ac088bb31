"""fuse-rmsnorm: RMSNorm as LLaMA-style models export it -> one RMSNormalization (opset 23).

Matches, over the last k axes of x (ReduceMean axes as an attribute before opset 18, as an input
from 18; keepdims=1):

    v = ReduceMean(x ** 2)       (Pow(x, 2) or Mul(x, x))
    y = x / Sqrt(v + eps)        (Div, or Mul by Reciprocal(Sqrt) as the dynamo exporter writes
                                  torch.rsqrt, by Div(1, Sqrt) as TorchScript writes it, or by
                                  Pow(v + eps, -0.5))

and writes `RMSNormalization(x, 1, axis=-k, epsilon=eps, stash_type=1)`. Then, by the folds of
`_norm_common` (each exact): `Cast(RMS(Cast(x: float16, to=float32), 1), to=float16)` ->
`RMS(x, 1)` in float16 (transformers' `LlamaRMSNorm` upcasts to float32 and back), and
`RMS(x, s) * w` -> `RMS(x, s*w)` for a constant `w` varying only along the normalized axes (the
norm's weight, which the model multiplies after the Cast back).

Equal because RMSNormalization-23 is defined as exactly this: `x / sqrt(mean(x^2) + eps)` over
axes [axis, rank) computed in the stash type, cast to T, times scale. Rounding differs where the
graph writes `x * (1/s)` for `x / s`, and a float16 graph without the Casts computed in float16
(the fused op in float32, more accurately).

Refuses, naming the node: the model imports opset < 23 ("run upgrade-opset first"); x is
centered (`x - mean(x)`: that is a LayerNorm, left to `fuse-layernorm`); a ReduceMean with
keepdims=0, non-constant axes or axes that are not a trailing block; normalized dims that are not
static; epsilon that is not a float scalar constant >= 0; float64 (the fused op would compute in
float32) or bfloat16 (ONNX Runtime has no bfloat16 RMSNormalization kernel) inputs; a constant
that would broadcast x to another shape; a weight that varies along other axes; matched nodes
read outside the pattern.

Order: after `upgrade-opset` and `O1`, and after `fuse-layernorm` (which it leaves alone either
way); before `fuse-skip-layernorm`.
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
    SQUARE_FORMS,
    FoldCasts,
    FoldScale,
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

__all__ = ["FuseRMSNorm", "RMSNormCore"]

OP = "RMSNormalization"


def _is_centered(x: Value) -> bool:
    """Whether x is `Sub(y, ReduceMean(y))`: the centered input of a LayerNorm."""
    sub = x.producer
    if sub is None or sub.op != "Sub" or sub.inputs[1] is None:
        return False
    mean = sub.inputs[1].producer
    return mean is not None and mean.op == "ReduceMean" and mean.inputs[0] is sub.inputs[0]


class RMSNormCore(RewriteRule):
    """x / sqrt(mean(x^2) + eps) -> RMSNormalization(x, 1)."""

    name = "RMSNorm"

    def __init__(self, square_form: str = "pow", inverse_form: str = "div"):
        self.square_form = square_form
        self.inverse_form = inverse_form

    def pattern(self, op: Any, x: Any, eps: Any) -> Any:
        var = op.ReduceMean(square(op, x, self.square_form), _name="var", _allow_other_inputs=True)
        return inverse_std(op, x, op.Add(var, eps), self.inverse_form)

    def _plan(self, ctx: RewriteContext, x: Value, eps: Value) -> tuple[int, Any, float] | None:
        """(k, normalized shape, epsilon), or None after refusing."""
        if _is_centered(x):
            ctx.refuse("the input is centered (x - mean(x)): a LayerNorm, for fuse-layernorm")
            return None
        if not need_opset(ctx, OP, 23):
            return None
        if ctx.shape(x) is None:
            ctx.refuse(f"the shape of %{x.name} is unknown (run infer-shapes first)")
            return None
        if not is_tensor_of(x, FLOATS):
            ctx.refuse(f"%{x.name} is not a float tensor")
            return None
        if ctx.dtype(x) in (DType.DOUBLE, DType.BFLOAT16):
            reason = {
                DType.DOUBLE: "the pattern computes in float64; RMSNormalization would use float32",
                DType.BFLOAT16: "ONNX Runtime has no bfloat16 RMSNormalization kernel",
            }
            ctx.refuse(reason[ctx.dtype(x)])
            return None
        k = normalized_axes(ctx, x, ctx.node("var"))
        shape = normalized_shape(ctx, x, k) if isinstance(k, int) else k
        epsilon = epsilon_of(ctx, eps)
        for problem in (k, shape, epsilon):
            if isinstance(problem, str):
                ctx.refuse(problem)
                return None
        if not keeps_shape(ctx, x):
            return None
        return k, shape, epsilon  # type: ignore[return-value]

    def check(self, ctx: RewriteContext, x: Value, eps: Value) -> bool:
        return self._plan(ctx, x, eps) is not None

    def rewrite(self, op: RewriteBuilder, x: Value, eps: Value) -> Any:
        k, shape, epsilon = self._plan(op.ctx, x, eps)  # type: ignore[misc]
        scale = op.const(np.ones(shape, op.ctx.dtype(x).numpy))
        return op.op(OP, x, scale, axis=-k, epsilon=epsilon, stash_type=1)


def rmsnorm_rules() -> list[RewriteRule]:
    """Every spelling of the core, then the folds of the Casts and the weight."""
    cores: list[RewriteRule] = [RMSNormCore(s, i) for s in SQUARE_FORMS for i in INVERSE_FORMS]
    return [*cores, FoldCasts(OP, (DType.FLOAT16,)), FoldScale(OP)]


@register_pass(
    "fuse-rmsnorm", "RMSNorm (Pow, ReduceMean, Add, Sqrt, Div/Reciprocal, Mul) -> RMSNormalization"
)
@dataclass
class FuseRMSNorm(RewritePass):
    def rules(self) -> list[RewriteRule]:
        return rmsnorm_rules()
