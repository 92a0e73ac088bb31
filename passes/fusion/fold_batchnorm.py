"""fold-batchnorm: fold an inference-mode BatchNormalization into the Conv or Gemm before it.

In inference BatchNormalization is per channel c: y = (x - mean[c]) * s[c] + beta[c] with
s[c] = gamma[c] / sqrt(var[c] + eps), an affine map. Applied to a Conv's output channel c, whose
value is sum(W[c] * patch) + b[c], it gives sum((W[c] * s[c]) * patch) + (b[c] - mean[c]) * s[c]
+ beta[c]: a Conv with W'[c] = W[c] * s[c] and b'[c] = (b[c] - mean[c]) * s[c] + beta[c].
ConvTranspose keeps output channels on W's second axis (per group); Gemm (and a 2-D MatMul with
a constant right operand) keeps them on its output's columns, so the scale goes on B's columns.
New weights are computed in float64 and stored in the weights' dtype.

Refuses, saying why: BatchNormalization in training mode (or with its statistics outputs read),
parameters or weights that are not constants, a Conv output read by anything but the BN, channel
counts that disagree, non-float weights, a MatMul whose input is not 2-D.

Runs in O1: it is exact algebra that removes a node per layer, as ONNX Runtime's basic level and
onnxslim do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.ir.core import Value
from graphopt.passes.manager import register_pass
from graphopt.passes.rewrite import RewriteContext, RewritePass, RewriteRule
from graphopt.passes.rewrite.rule import RewriteBuilder


def _affine(
    ctx: RewriteContext, bn_name: str, channels: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) of the captured BatchNormalization, or None after refusing."""
    bn = ctx.node(bn_name)
    if ctx.opset >= 14 and bn.get_attr("training_mode", 0):
        ctx.refuse("BatchNormalization is in training mode")
        return None
    if any(v.is_used for v in bn.outputs[1:]) or (ctx.opset < 7 and not bn.get_attr("is_test", 0)):
        ctx.refuse("BatchNormalization computes batch statistics here")
        return None
    params = [ctx.constant(v) for v in bn.inputs[1:5]]
    if any(p is None for p in params):
        ctx.refuse("BatchNormalization's scale, bias, mean or var is not a constant")
        return None
    gamma, beta, mean, var = (np.asarray(p, np.float64).reshape(-1) for p in params)  # type: ignore[arg-type]
    if not all(len(p) == channels for p in (gamma, beta, mean, var)):
        ctx.refuse(f"BatchNormalization has {len(gamma)} channels, the layer {channels}")
        return None
    scale = gamma / np.sqrt(var + float(bn.get_attr("epsilon", 1e-5)))
    return scale, beta - mean * scale


def _float_weights(ctx: RewriteContext, w: Value, b: Value | None) -> tuple[np.ndarray, Any] | None:
    weights = ctx.constant(w)
    if weights is None or weights.dtype.kind != "f":
        ctx.refuse("the weights are not float constants")
        return None
    bias = ctx.constant(b) if b is not None else None
    if b is not None and bias is None:
        ctx.refuse("the layer's bias is not a constant")
        return None
    return weights, bias


class ConvBatchNorm(RewriteRule):
    """BN(Conv(x, W, b)) -> Conv(x, W * s, (b - mean) * s + beta)."""

    def pattern(
        self, op: Any, x: Any, w: Any, b: Any, gamma: Any, beta: Any, mean: Any, var: Any
    ) -> Any:
        conv = op.Conv(x, w, b, _name="conv")
        return op.BatchNormalization(
            conv, gamma, beta, mean, var, _name="bn", _allow_other_outputs=True
        )

    def check(self, ctx: RewriteContext, w: Value, b: Value) -> bool:
        found = _float_weights(ctx, w, b)
        return found is not None and _affine(ctx, "bn", found[0].shape[0]) is not None

    def rewrite(self, op: RewriteBuilder, x: Value, w: Value, b: Value) -> Any:
        weights, bias = _float_weights(op.ctx, w, b)  # type: ignore[misc]
        scale, shift = _affine(op.ctx, "bn", weights.shape[0])  # type: ignore[misc]
        conv = op.ctx.node("conv")
        per_channel = (-1,) + (1,) * (weights.ndim - 1)
        new_w = (weights.astype(np.float64) * scale.reshape(per_channel)).astype(weights.dtype)
        old_b = 0.0 if bias is None else bias.astype(np.float64)
        new_b = (old_b * scale + shift).astype(weights.dtype)
        return op.op("Conv", x, op.const(new_w), op.const(new_b), _attrs=conv.attrs)


# Conv without a bias input: the pattern above needs three inputs, this one two.
class ConvNoBiasBatchNorm(ConvBatchNorm):
    def pattern(self, op: Any, x: Any, w: Any, gamma: Any, beta: Any, mean: Any, var: Any) -> Any:  # type: ignore[override]
        conv = op.Conv(x, w, _name="conv")
        return op.BatchNormalization(
            conv, gamma, beta, mean, var, _name="bn", _allow_other_outputs=True
        )

    def check(self, ctx: RewriteContext, w: Value) -> bool:  # type: ignore[override]
        return super().check(ctx, w, None)  # type: ignore[arg-type]

    def rewrite(self, op: RewriteBuilder, x: Value, w: Value) -> Any:  # type: ignore[override]
        return super().rewrite(op, x, w, None)  # type: ignore[arg-type]


class GemmBatchNorm(RewriteRule):
    """BN(Gemm(x, B, C)) over the output's columns -> Gemm with B's columns and C scaled."""

    def pattern(self, op: Any, x: Any, w: Any, gamma: Any, beta: Any, mean: Any, var: Any) -> Any:
        gemm = op.Gemm(x, w, _name="gemm", _allow_other_inputs=True)
        return op.BatchNormalization(
            gemm, gamma, beta, mean, var, _name="bn", _allow_other_outputs=True
        )

    def check(self, ctx: RewriteContext, w: Value) -> bool:
        gemm = ctx.node("gemm")
        c = gemm.inputs[2] if len(gemm.inputs) > 2 else None
        found = _float_weights(ctx, w, c)
        if found is None:
            return False
        weights, bias = found
        if weights.ndim != 2:
            return ctx.refuse("Gemm's B is not 2-D")
        columns = weights.shape[0 if gemm.get_attr("transB", 0) else 1]
        if bias is not None and bias.size not in (1, columns):
            return ctx.refuse("Gemm's C is not per column")
        return _affine(ctx, "bn", columns) is not None

    def rewrite(self, op: RewriteBuilder, x: Value, w: Value) -> Any:
        gemm = op.ctx.node("gemm")
        c = gemm.inputs[2] if len(gemm.inputs) > 2 else None
        weights, bias = _float_weights(op.ctx, w, c)  # type: ignore[misc]
        trans_b = bool(gemm.get_attr("transB", 0))
        columns = weights.shape[0 if trans_b else 1]
        scale, shift = _affine(op.ctx, "bn", columns)  # type: ignore[misc]
        beta_attr = float(gemm.get_attr("beta", 1.0))
        w64 = weights.astype(np.float64) * (scale[:, None] if trans_b else scale[None, :])
        old_c = 0.0 if bias is None else bias.astype(np.float64).reshape(-1) * beta_attr
        new_c = (old_c * scale + shift).astype(weights.dtype)
        attrs = {k: a for k, a in gemm.attrs.items() if k != "beta"}
        return op.op("Gemm", x, op.const(w64.astype(weights.dtype)), op.const(new_c), _attrs=attrs)


@register_pass(
    "fold-batchnorm", "fold inference-mode BatchNormalization into the Conv or Gemm before it"
)
@dataclass
class FoldBatchNorm(RewritePass):
    def rules(self) -> list[RewriteRule]:
        return [ConvBatchNorm(), ConvNoBiasBatchNorm(), GemmBatchNorm()]
