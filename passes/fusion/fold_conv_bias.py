"""fold-conv-bias: fold a per-channel constant Add or Mul after a Conv into its bias and weights.

Exporters from Caffe-style frameworks write a scale layer as Conv -> Mul(c) -> Add(d) with
constants shaped [C, 1, 1] (or [1, C, 1, 1], or a scalar). Per output channel k:
- Conv(x, W, b) + d  = Conv(x, W, b + d[k]);
- Conv(x, W, b) * c  = Conv(x, W * c[k], b * c[k]).
New weights are computed in float64 and stored in the weights' dtype.

Refuses, saying why: a constant that varies along any axis but the channels (or would broadcast
the Conv's output to a bigger shape), weights or bias that are not float constants, a Conv output
read by others (the engine checks that), dtypes that differ.

Runs in O1 beside fold-batchnorm: exact algebra that removes a node per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.ir.core import Value
from graphopt.passes.manager import register_pass
from graphopt.passes.rewrite import RewriteContext, RewritePass, RewriteRule
from graphopt.passes.rewrite.rule import RewriteBuilder


def per_channel(
    ctx: RewriteContext, conv_out_rank: int | None, c: Value, channels: int
) -> np.ndarray | None:
    """The constant `c` as one value per output channel, or None after refusing."""
    array = ctx.constant(c)
    if array is None or array.dtype.kind != "f":
        ctx.refuse("the other operand is not a float constant")
        return None
    if conv_out_rank is None or array.ndim > conv_out_rank:
        ctx.refuse("the constant has more axes than the Conv's output")
        return None
    shape = (1,) * (conv_out_rank - array.ndim) + array.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        ctx.refuse(f"the constant {list(array.shape)} is not per channel")
        return None
    return np.broadcast_to(array.astype(np.float64).reshape(-1), (channels,))


class _ConvThen(RewriteRule):
    """Shared matching: Conv(x, W[, b]) followed by a binary op with a constant `c`."""

    op_name = ""

    def pattern(self, op: Any, x: Any, w: Any, c: Any) -> Any:
        conv = op.Conv(x, w, _name="conv", _allow_other_inputs=True)
        return op.op(self.op_name, conv, c)

    def _parts(
        self, ctx: RewriteContext, w: Value, c: Value
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        conv = ctx.node("conv")
        weights = ctx.constant(w)
        if weights is None or weights.dtype.kind != "f":
            ctx.refuse("the Conv's weights are not float constants")
            return None
        b = conv.inputs[2] if len(conv.inputs) > 2 else None
        bias = np.zeros(weights.shape[0]) if b is None else ctx.constant(b)
        if bias is None:
            ctx.refuse("the Conv's bias is not a constant")
            return None
        if ctx.dtype(c) != ctx.dtype(conv.outputs[0]):
            ctx.refuse("the constant's dtype differs from the Conv's")
            return None
        values = per_channel(ctx, ctx.rank(conv.outputs[0]), c, weights.shape[0])
        if values is None:
            return None
        return weights, np.asarray(bias, np.float64).reshape(-1), values

    def check(self, ctx: RewriteContext, w: Value, c: Value) -> bool:
        return self._parts(ctx, w, c) is not None

    def rewrite(self, op: RewriteBuilder, x: Value, w: Value, c: Value) -> Any:
        weights, bias, values = self._parts(op.ctx, w, c)  # type: ignore[misc]
        new_w, new_b = self.fold(weights.astype(np.float64), bias, values)
        conv = op.ctx.node("conv")
        return op.op("Conv", x, op.const(new_w.astype(weights.dtype)),
                     op.const(new_b.astype(weights.dtype)), _attrs=conv.attrs)  # fmt: skip

    def fold(self, w: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class ConvAdd(_ConvThen):
    """Conv(x, W, b) + d -> Conv(x, W, b + d)."""

    op_name = "Add"

    def fold(self, w: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return w, b + c


class ConvMul(_ConvThen):
    """Conv(x, W, b) * c -> Conv(x, W * c, b * c)."""

    op_name = "Mul"

    def fold(self, w: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return w * c.reshape((-1,) + (1,) * (w.ndim - 1)), b * c


@register_pass(
    "fold-conv-bias", "fold per-channel constant Add/Mul after a Conv into its bias and weights"
)
@dataclass
class FoldConvBias(RewritePass):
    def rules(self) -> list[RewriteRule]:
        return [ConvAdd(), ConvMul()]
