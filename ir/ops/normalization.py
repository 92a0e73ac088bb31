"""Kernels for BatchNormalization, LRN and the Softmax family, with each opset's own semantics.

`onnx.reference` gets these wrong for older opsets: it fills missing attributes with the *latest*
schema's defaults, so Softmax-1..12 (whose default axis is 1 and which flattens the input to 2-D at
`axis`) runs as Softmax-13 over the last axis, and BatchNormalization-9..13 always sees a momentum
and runs in training mode. Both ops are also hot in real models, so graphopt computes them itself.
Its LRN sums the squares over the wrong axis (the batch, not the channels: ONNX Runtime and the
spec disagree with it on any input with more than one sample).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt.ir.core import Node
from graphopt.ir.ops.onnx_kernels import onnx_reference_kernel
from graphopt.ir.registry import Kernel, KernelEnv, register_kernel


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def _hardmax(x: np.ndarray, axis: int) -> np.ndarray:
    winners = np.expand_dims(np.argmax(x, axis=axis), axis)
    out = np.zeros_like(x)
    np.put_along_axis(out, winners, 1, axis=axis)
    return out


def _softmax_family(fn: Any) -> Any:
    def factory(node: Node, env: KernelEnv) -> Kernel:
        legacy = env.opset(node.domain) < 13
        axis = int(node.get_attr("axis", 1 if legacy else -1))

        def run(x: np.ndarray) -> np.ndarray:
            if x.size == 0:
                return x
            a = axis + x.ndim if axis < 0 else axis
            if legacy:  # coerce to 2-D [prod(shape[:a]), prod(shape[a:])]
                flat = x.reshape(int(np.prod(x.shape[:a], dtype=np.int64)), -1)
                return fn(flat, 1).reshape(x.shape).astype(x.dtype, copy=False)
            return fn(x, a).astype(x.dtype, copy=False)

        return run

    return factory


register_kernel("Softmax")(_softmax_family(_softmax))
register_kernel("LogSoftmax")(_softmax_family(_log_softmax))
register_kernel("Hardmax")(_softmax_family(_hardmax))


@register_kernel("BatchNormalization")
def batch_normalization_kernel(node: Node, env: KernelEnv) -> Kernel:
    opset = env.opset(node.domain)
    requested = sum(1 for v in node.outputs[1:] if v.name or v.is_used)
    if opset >= 14:
        training = bool(node.get_attr("training_mode", 0))
    elif opset >= 7:
        training = requested > 0
    else:
        training = not node.get_attr("is_test", 0)
    if training:
        return onnx_reference_kernel(node, env)  # batch statistics: rare at inference time
    epsilon = float(node.get_attr("epsilon", 1e-5))
    spatial = bool(node.get_attr("spatial", 1))

    def run(
        x: np.ndarray, scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray
    ) -> Any:
        per_channel = x.shape[1:2] + (1,) * (x.ndim - 2)
        shape = x.shape[1:] if not spatial and scale.size != x.shape[1] else per_channel
        compute = x.dtype if x.dtype.itemsize >= 4 else np.dtype(np.float32)
        inv = (scale.astype(compute) / np.sqrt(var.astype(compute) + epsilon)).reshape(shape)
        shift = bias.astype(compute).reshape(shape) - mean.astype(compute).reshape(shape) * inv
        y = (x.astype(compute, copy=False) * inv + shift).astype(x.dtype, copy=False)
        return [y] + [None] * (len(node.outputs) - 1)

    return run


@register_kernel("LRN")
def lrn_kernel(node: Node, env: KernelEnv) -> Kernel:
    """y = x / (bias + alpha / size * sum of x^2 over the channel window)^beta, the window of
    channel c being [c - floor((size - 1) / 2), c + ceil((size - 1) / 2)] clipped to the input."""
    size = int(node.get_attr("size"))
    alpha = float(node.get_attr("alpha", 1e-4))
    beta = float(node.get_attr("beta", 0.75))
    bias = float(node.get_attr("bias", 1.0))
    before, after = (size - 1) // 2, size // 2  # size // 2 == ceil((size - 1) / 2)

    def run(x: np.ndarray) -> np.ndarray:
        squares = np.square(x.astype(np.float64))
        channels = x.shape[1]
        # running sums over channels: window [lo, hi] is cumsum[hi + 1] - cumsum[lo]
        padded = np.concatenate([np.zeros_like(squares[:, :1]), squares], axis=1).cumsum(axis=1)
        index = np.arange(channels)
        lo, hi = np.maximum(index - before, 0), np.minimum(index + after, channels - 1)
        window = padded[:, hi + 1] - padded[:, lo]
        return (x / (bias + alpha / size * window) ** beta).astype(x.dtype)

    return run
