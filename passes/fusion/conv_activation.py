"""fuse-conv-activation: Conv followed by an activation as ONNX Runtime's FusedConv.

Target "onnxruntime" only: `com.microsoft.FusedConv` is an ONNX Runtime contrib op, and standard
ONNX has no fused form, so for target "onnx" the pass changes nothing and says so once.

Matches `act(Conv(x, W[, B]))` and `act(Conv(x, W[, B]) + z)` with `act` one of the activations
ONNX Runtime's CPU FusedConv runs (`contrib_ops/cpu/fused_activation.cc`): Relu, Tanh, Sigmoid,
LeakyRelu (`activation_params` = [alpha]), Clip ([min, max]) and HardSigmoid ([alpha, beta]).
The result is `FusedConv(x, W, B[, z], activation=act, activation_params=...)` with the Conv's
attributes; a residual `z` becomes FusedConv's fourth input Z, which the kernel adds to the
convolution before the activation (the ResNet block's `relu(conv(x) + shortcut)`).

Why equal: FusedConv computes `act(Conv(x, W, B) + Z)` with Conv's semantics for the same
attributes and the activation's ONNX definition for the given parameters (LeakyRelu's and
HardSigmoid's from their attributes, schema defaults included; Clip's from its constant min/max
inputs, or attributes before opset 11, an absent bound being float32's lowest / highest value).

Refuses, saying why: an element type other than float32 (the CPU kernel's only one); a Clip bound
that is not a constant scalar; a Conv whose output is read by anything but the pattern (the engine
checks that); for the residual form, a `z` whose shape is not exactly the Conv's output shape
(FusedConv does not broadcast Z) or unknown, or a Conv that has no bias input slot to spare
(never: Conv has at most three inputs).

ONNX Runtime fuses Conv + activation itself at ORT_ENABLE_EXTENDED and above (and at
ORT_ENABLE_ALL rewrites both forms into its NCHWc convolution), so the pass gains at the basic
level and for the residual form, which ORT's CPU optimizer leaves unfused below ORT_ENABLE_ALL.

Ordering: after O1 (`fold-batchnorm` and `fold-conv-bias` must run first: a BatchNormalization
between Conv and Relu hides the pair) and before `reorder-activation-pooling`, which would move a
Relu before a MaxPool away from its Conv (a fused Relu is free; a moved one is not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.ir.core import Node, Value
from graphopt.ir.ops.contrib_activations import FUSED_CONV_ACTIVATIONS
from graphopt.ir.types import DType, TensorType
from graphopt.passes.fusion._contrib import MS, ContribRewritePass
from graphopt.passes.manager import register_pass
from graphopt.passes.rewrite import RewriteContext, RewriteRule
from graphopt.passes.rewrite.matcher import schema_default
from graphopt.passes.rewrite.rule import RewriteBuilder

__all__ = ["ConvActivation", "ConvAddActivation", "FuseConvActivation", "activation_params"]

FLOAT_MAX = float(np.finfo(np.float32).max)


def _attr(ctx: RewriteContext, node: Node, name: str) -> float:
    value = node.get_attr(name, None)
    if value is None:
        value = schema_default(node, name, ctx.opset)
    return float(value)


def activation_params(ctx: RewriteContext, act: Node) -> list[float] | None:
    """FusedConv's `activation_params` for the activation node `act`, or None after refusing."""
    if act.op_type == "LeakyRelu":
        return [_attr(ctx, act, "alpha")]
    if act.op_type == "HardSigmoid":
        return [_attr(ctx, act, "alpha"), _attr(ctx, act, "beta")]
    if act.op_type != "Clip":
        return []
    if ctx.opset < 11:
        return [float(act.get_attr("min", -FLOAT_MAX)), float(act.get_attr("max", FLOAT_MAX))]
    bounds = []
    for index, default in ((1, -FLOAT_MAX), (2, FLOAT_MAX)):
        value = act.inputs[index] if len(act.inputs) > index else None
        if value is None:
            bounds.append(default)
            continue
        array = ctx.constant(value)
        if array is None or array.size != 1:
            ctx.refuse(f"Clip's {'min' if index == 1 else 'max'} is not a constant scalar")
            return None
        bounds.append(float(array.reshape(-1)[0]))
    return bounds


def _check_float32(ctx: RewriteContext, value: Value) -> bool:
    dtype = ctx.dtype(value)
    if dtype is not DType.FLOAT:
        name = dtype.name.lower() if dtype is not None else "of unknown type"
        return ctx.refuse(f"ONNX Runtime's CPU FusedConv runs float32 only, the Conv is {name}")
    return True


class ConvActivation(RewriteRule):
    """act(Conv(x, W, B)) -> FusedConv(x, W, B, activation=act)."""

    def __init__(self, activation: str):
        self.activation = activation

    @property
    def label(self) -> str:
        return f"{type(self).__name__}[{self.activation}]"

    def act(self, op: Any, value: Any) -> Any:
        return op.op(self.activation, value, _name="act", _allow_other_inputs=True)

    def pattern(self, op: Any, x: Any, w: Any) -> Any:
        return self.act(op, op.Conv(x, w, _name="conv", _allow_other_inputs=True))

    def check(self, ctx: RewriteContext, z: Value | None = None) -> bool:
        conv = ctx.node("conv")
        return _check_float32(ctx, conv.outputs[0]) and (
            activation_params(ctx, ctx.node("act")) is not None
        )

    def inputs(self, conv: Node, z: Value | None) -> list[Value | None]:
        return list(conv.inputs)

    def rewrite(self, op: RewriteBuilder, z: Value | None = None) -> Value | None:
        conv, act = op.ctx.node("conv"), op.ctx.node("act")
        params = activation_params(op.ctx, act)
        if params is None:  # pragma: no cover - check refused already
            return None
        attrs: dict[str, Any] = dict(conv.attrs)
        attrs["activation"] = self.activation
        if params:
            attrs["activation_params"] = params
        fused: Value = op.op(f"{MS}.FusedConv", *self.inputs(conv, z), _attrs=attrs)
        return fused


class ConvAddActivation(ConvActivation):
    """act(Conv(x, W, B) + z) -> FusedConv(x, W, B, z, activation=act): Z is added before the
    activation."""

    def pattern(self, op: Any, x: Any, w: Any, z: Any) -> Any:  # type: ignore[override]
        return self.act(op, op.Add(op.Conv(x, w, _name="conv", _allow_other_inputs=True), z))

    def check(self, ctx: RewriteContext, z: Value | None = None) -> bool:
        if z is None or not super().check(ctx, z):
            return False
        out = ctx.node("conv").outputs[0]
        z_type, out_type = z.type, out.type
        if not isinstance(z_type, TensorType) or not isinstance(out_type, TensorType):
            return ctx.refuse("the residual's or the Conv's type is unknown")
        if z_type.shape is None or out_type.shape is None or z_type.shape != out_type.shape:
            return ctx.refuse(
                f"the residual {z_type} is not exactly the Conv's output {out_type} "
                "(FusedConv does not broadcast Z)"
            )
        return True

    def inputs(self, conv: Node, z: Value | None) -> list[Value | None]:
        inputs = list(conv.inputs) + [None] * (3 - len(conv.inputs))
        return [*inputs, z]


@register_pass(
    "fuse-conv-activation", "Conv [+ residual] + activation -> FusedConv (target onnxruntime)"
)
@dataclass
class FuseConvActivation(ContribRewritePass):
    not_standard = (
        "standard ONNX has no fused convolution (FusedConv is an ONNX Runtime contrib op)"
    )

    residual: bool = True  # fuse-conv-activation{residual=false}: leave act(Conv + z) alone

    def rules(self) -> list[RewriteRule]:
        rules: list[RewriteRule] = []
        if self.residual:
            rules += [ConvAddActivation(a) for a in FUSED_CONV_ACTIVATIONS]
        return rules + [ConvActivation(a) for a in FUSED_CONV_ACTIVATIONS]
