"""reorder-activation-pooling: run a non-decreasing activation after a MaxPool, not before it.

Matches `MaxPool(f(x))` and `GlobalMaxPool(f(x))` where `f` is an elementwise activation that is
non-decreasing, and rewrites it to `f(MaxPool(x))`: the activation then runs on the pooled tensor
(4x fewer elements after a 2x2 stride-2 pool). The pool keeps its attributes, the activation its
attributes and extra inputs (Clip's bounds, PRelu's slope).

Why equal. Take one output position o. Its window holds input positions W (inside x) and padding
positions P; MaxPool reads padding as -inf (the spec's "pads with -inf": padding never wins).
Suppose W is not empty. Then

    MaxPool(f(x))[o] = max(max_{w in W} f(x_w), max_{p in P} -inf) = max_{w in W} f(x_w)
    f(MaxPool(x))[o] = f(max(max_{w in W} x_w, -inf))             = f(max_{w in W} x_w)

and for a non-decreasing f, f(max_w x_w) = max_w f(x_w): the largest x_w is a w* with
x_w <= x_w* for all w, so f(x_w) <= f(x_w*) for all w, and f(x_w*) is one of the f(x_w). The two
sides are equal. If W were empty (a window entirely in the padding) the left side would be -inf
and the right f(-inf) (0 for Relu), so the pass proves W is never empty (`window_problem`):
with static spatial dims by walking every window's taps per axis (windows are products of per-axis
ranges), else from the attributes: auto_pad VALID / SAME_* or explicit pads smaller than the
kernel, with dilations 1 (a window then starts at or after -pad > -kernel and, ceil_mode
included, before the end of the input). GlobalMaxPool has no padding. NaN inputs are outside the
argument (the runtimes' max treats NaN differently from each other anyway).

Non-decreasing activations accepted: Relu, Sigmoid, Tanh, Softplus, Softsign, Clip (any bounds:
min(max(x, lo), hi) is non-decreasing in x), LeakyRelu / HardSigmoid / Elu / ThresholdedRelu with
alpha >= 0, Selu with alpha >= 0 and gamma >= 0, Celu with alpha > 0 (its derivative is positive),
PRelu with a constant slope >= 0 that is per channel (its spatial dims 1, so f does not depend on
the position the pool picks). Refused as not monotonic: Gelu (minimum near x = -0.75), HardSwish,
Mish, and the same ops with negative parameters.

Refuses, saying why: the activation is not non-decreasing (with these parameters); a window may
cover only padding; the pool's Indices output is read (it would index f's input, not its output:
the same positions, but graph readers expect the original node); the pooled output is no smaller
than the input (nothing to gain: stride 1 with "same" padding); the activation's output is read by
anything but the pool (the engine checks that); a PRelu slope that is not a constant or not per
channel; unless `after-conv=true`, an activation ONNX Runtime fuses into a convolution (Relu,
Sigmoid, Tanh, LeakyRelu, Clip, HardSigmoid) reading a Conv's output, directly or through a
residual Add: fused it costs nothing, and moved it runs as a node of its own (ONNX Runtime's
optimized ResNet then has one Relu node more at ORT_ENABLE_EXTENDED and ORT_ENABLE_ALL, the
default level).

Ordering: after `fuse-conv-activation` for target onnxruntime (a Relu fused into its Conv is free;
moving it past the pool would break that fusion), and after O1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.ir.core import Node, Value
from graphopt.ir.ops.contrib_activations import FUSED_CONV_ACTIVATIONS
from graphopt.ir.ops.nn import Window
from graphopt.passes.manager import register_pass
from graphopt.passes.rewrite import RewriteContext, RewritePass, RewriteRule
from graphopt.passes.rewrite.matcher import schema_default
from graphopt.passes.rewrite.rule import RewriteBuilder

__all__ = ["MONOTONE", "NOT_MONOTONE", "ReorderActivationPooling", "window_problem"]

POOLS = ("MaxPool", "GlobalMaxPool")


def _param(ctx: RewriteContext, node: Node, name: str) -> float:
    value = node.get_attr(name, None)
    return float(schema_default(node, name, ctx.opset) if value is None else value)


def _nonnegative(*names: str) -> Callable[[RewriteContext, Node], str | None]:
    def check(ctx: RewriteContext, node: Node) -> str | None:
        for name in names:
            value = _param(ctx, node, name)
            if not value >= 0:
                return f"{node.op_type} with {name} = {value:g} is not non-decreasing"
        return None

    return check


def _always(ctx: RewriteContext, node: Node) -> str | None:
    return None


def _celu(ctx: RewriteContext, node: Node) -> str | None:
    alpha = _param(ctx, node, "alpha")
    return None if alpha > 0 else f"Celu with alpha = {alpha:g} is not non-decreasing"


def _prelu(ctx: RewriteContext, node: Node) -> str | None:
    slope = ctx.constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if slope is None:
        return "PRelu's slope is not a constant (its sign decides monotonicity)"
    if not np.all(slope >= 0):
        return "PRelu's slope has negative entries: not non-decreasing"
    x_rank = ctx.rank(node.inputs[0])
    if x_rank is None:
        return "x's rank is unknown: cannot tell whether PRelu's slope varies over positions"
    spatial = min(slope.ndim, x_rank - 2)  # the slope's dims that line up with spatial axes
    if any(d != 1 for d in slope.shape[slope.ndim - spatial :]):
        return f"PRelu's slope {list(slope.shape)} varies over spatial positions"
    return None


# activation -> None when non-decreasing with the node's parameters, else the reason
MONOTONE: dict[str, Callable[[RewriteContext, Node], str | None]] = {
    "Relu": _always,  # max(x, 0)
    "Sigmoid": _always,  # 1 / (1 + e^-x)
    "Tanh": _always,
    "Softplus": _always,  # log(1 + e^x)
    "Softsign": _always,  # x / (1 + |x|)
    "Clip": _always,  # min(max(x, lo), hi) for any scalar lo, hi
    "LeakyRelu": _nonnegative("alpha"),  # x or alpha * x
    "HardSigmoid": _nonnegative("alpha"),  # clip(alpha * x + beta, 0, 1)
    "Elu": _nonnegative("alpha"),  # x or alpha * (e^x - 1)
    "ThresholdedRelu": _nonnegative("alpha"),  # x if x > alpha else 0
    "Selu": _nonnegative("alpha", "gamma"),  # gamma * (x or alpha * (e^x - 1))
    "Celu": _celu,  # max(0, x) + min(0, alpha * (e^(x/alpha) - 1)), derivative > 0
    "PRelu": _prelu,  # x or slope * x, slope per channel
}
NOT_MONOTONE = {
    "Gelu": "Gelu is not monotonic (its minimum is near x = -0.75)",
    "HardSwish": "HardSwish is not monotonic (its minimum is at x = -1.5)",
    "Mish": "Mish is not monotonic (its minimum is near x = -1.19)",
}


def _taps_hit_input(starts: range, kernel: int, dilation: int, n: int) -> int | None:
    """The first window start whose taps all miss [0, n), or None."""
    for start in starts:
        if not any(0 <= start + i * dilation < n for i in range(kernel)):
            return start
    return None


def window_problem(pool: Node, shape: tuple[Any, ...] | None) -> str | None:
    """Why some window of `pool` (input `shape`) might cover only padding, or None if none can."""
    if pool.op_type == "GlobalMaxPool":
        return None
    kernel = list(pool.get_attr("kernel_shape", None) or [])
    rank = len(kernel)
    dilations = list(pool.get_attr("dilations", None) or [1] * rank)
    auto_pad = pool.get_attr("auto_pad", "NOTSET") or "NOTSET"
    if shape is not None and len(shape) == rank + 2 and all(isinstance(d, int) for d in shape[2:]):
        spatial = [int(d) for d in shape[2:]]
        window = Window(pool, spatial, kernel, ceil_mode=bool(pool.get_attr("ceil_mode", 0)))
        for axis, (n, k, d, s, b, out) in enumerate(
            zip(spatial, kernel, dilations, window.strides, window.begin, window.out, strict=True)
        ):
            start = _taps_hit_input(range(-b, -b + out * s, s), k, d, n)
            if start is not None:
                return f"the window starting at {start} on spatial axis {axis} covers only padding"
        return None
    if any(d != 1 for d in dilations) and auto_pad != "VALID":
        return "a dilated, padded MaxPool over an input of unknown size: a window might cover only padding"
    if auto_pad in ("VALID", "SAME_UPPER", "SAME_LOWER"):
        return None  # SAME pads at most kernel - 1 in total
    pads = list(pool.get_attr("pads", None) or [0] * (2 * rank))
    if all(p < k for p, k in zip(pads, kernel + kernel, strict=True)):
        return None
    return f"pads {pads} reach the kernel size {kernel}: a window might cover only padding"


def _smaller(ctx: RewriteContext, pool: Node, x: Value) -> bool:
    """Whether the pool's output has fewer elements than its input."""
    before, after = ctx.shape(x), ctx.shape(pool.outputs[0])
    if before is not None and after is not None:
        if all(isinstance(d, int) for d in (*before, *after)):
            return math.prod(after) < math.prod(before)
    if pool.op_type == "GlobalMaxPool":
        return before is None or any(d != 1 for d in before[2:])
    rank = len(pool.get_attr("kernel_shape", None) or [])
    return any(s > 1 for s in (pool.get_attr("strides", None) or [1] * rank))


def _fusable_after_conv(x: Value, activation: str) -> bool:
    """Whether `activation` reads a Conv's output (directly or through a residual Add), where
    runtimes fuse it into the convolution for free (ONNX Runtime's FusedConv and NCHWc Conv)."""
    if activation not in FUSED_CONV_ACTIVATIONS:
        return False
    producer = x.producer
    if producer is not None and producer.op == "Add":
        return any(v is not None and v.producer is not None and v.producer.op == "Conv"
                   for v in producer.inputs)  # fmt: skip
    return producer is not None and producer.op == "Conv"


class ActivationPool(RewriteRule):
    """pool(f(x)) -> f(pool(x)) for a non-decreasing elementwise f."""

    def __init__(self, activation: str, pool: str, after_conv: bool = False):
        self.activation = activation
        self.pool = pool
        self.after_conv = after_conv

    @property
    def label(self) -> str:
        return f"ActivationPool[{self.activation}, {self.pool}]"

    def pattern(self, op: Any, x: Any) -> Any:
        act = op.op(self.activation, x, _name="act", _allow_other_inputs=True)
        return op.op(self.pool, act, _name="pool", _allow_other_outputs=True)

    def check(self, ctx: RewriteContext, x: Value) -> bool:
        act, pool = ctx.node("act"), ctx.node("pool")
        if self.activation in NOT_MONOTONE:
            return ctx.refuse(f"{NOT_MONOTONE[self.activation]}: max does not commute with it")
        if any(v.is_used for v in pool.outputs[1:]):
            return ctx.refuse("the MaxPool's Indices output is read")
        reason = MONOTONE[self.activation](ctx, act) or window_problem(pool, ctx.shape(x))
        if reason:
            return ctx.refuse(reason)
        if not _smaller(ctx, pool, x):
            return ctx.refuse("the pooled output is no smaller than the input: nothing to gain")
        if not self.after_conv and _fusable_after_conv(x, self.activation):
            return ctx.refuse(
                f"the {self.activation} follows a Conv, which runtimes fuse it into for free "
                "(ONNX Runtime's FusedConv): moving it would cost a pass of its own "
                "(reorder-activation-pooling{after-conv=true} moves it anyway)"
            )
        return True

    def rewrite(self, op: RewriteBuilder, x: Value) -> list[Value]:
        act, pool = op.ctx.node("act"), op.ctx.node("pool")
        pooled = op.op(pool.op, x, _attrs=pool.attrs)
        out = op.op(act.op, pooled, *act.inputs[1:], _attrs=act.attrs)
        return [out, *pool.outputs[1:]]  # an unread Indices output goes with the old pool


@register_pass(
    "reorder-activation-pooling", "MaxPool(f(x)) -> f(MaxPool(x)) for non-decreasing activations"
)
@dataclass
class ReorderActivationPooling(RewritePass):
    after_conv: bool = False  # also move activations a runtime would fuse into the Conv before

    def rules(self) -> list[RewriteRule]:
        activations = [*MONOTONE, *NOT_MONOTONE]
        return [ActivationPool(a, p, self.after_conv) for p in POOLS for a in activations]
