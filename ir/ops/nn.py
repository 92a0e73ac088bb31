"""Fast numpy kernels for convolution and pooling (the `onnx.reference` ones loop per element).

Both work the same way: pad the input, then loop over the *kernel offsets* (9 for a 3x3 kernel), not
over output positions. Each offset is one strided view of the padded input covering every output
position; convolution multiplies it with that offset's weight slice (one BLAS call), pooling folds
it into a running max or sum. Work is the same as im2col without materializing it.

Padding follows the ONNX spec: explicit `pads` ([begin..., end...]), `auto_pad` SAME_UPPER /
SAME_LOWER / VALID, and for pooling `ceil_mode` (a last window that starts inside the input or its
left padding is kept) and `count_include_pad`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from graphopt.ir.core import Node
from graphopt.ir.ops.onnx_kernels import onnx_reference_kernel
from graphopt.ir.registry import Kernel, KernelEnv, register_kernel


class Window:
    """The sliding-window geometry of one conv/pool node for one input spatial shape."""

    def __init__(
        self,
        node: Node,
        spatial: Sequence[int],
        kernel: Sequence[int],
        *,
        ceil_mode: bool = False,
    ):
        rank = len(spatial)
        self.kernel = list(kernel)
        self.strides = list(node.get_attr("strides", None) or [1] * rank)
        self.dilations = list(node.get_attr("dilations", None) or [1] * rank)
        auto_pad = node.get_attr("auto_pad", "NOTSET") or "NOTSET"
        span = [(k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations, strict=True)]
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            self.out = [-(-n // s) for n, s in zip(spatial, self.strides, strict=True)]
            total = [
                max(0, (o - 1) * s + w - n)
                for o, s, w, n in zip(self.out, self.strides, span, spatial, strict=True)
            ]
            small = [t // 2 for t in total]
            big = [t - t // 2 for t in total]
            self.begin, self.end = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
        else:
            pads = [0] * (2 * rank) if auto_pad == "VALID" else node.get_attr("pads", None)
            pads = list(pads or [0] * (2 * rank))
            self.begin, self.end = pads[:rank], pads[rank:]
            self.out = []
            for n, b, e, w, s in zip(
                spatial, self.begin, self.end, span, self.strides, strict=True
            ):
                length = n + b + e - w
                count = (-(-length // s) if ceil_mode else length // s) + 1
                if ceil_mode and (count - 1) * s >= n + b:
                    count -= 1  # the last window would start in the right padding
                self.out.append(max(count, 0))
        # ceil_mode may need room past the explicit right padding; pooling never reads it
        self.extra = [
            max(0, (o - 1) * s + w - (n + b + e))
            for o, s, w, n, b, e in zip(
                self.out, self.strides, span, spatial, self.begin, self.end, strict=True
            )
        ]

    def pad(self, x: np.ndarray, value: float) -> np.ndarray:
        widths = [(0, 0)] * (x.ndim - len(self.begin)) + [
            (b, e + x_) for b, e, x_ in zip(self.begin, self.end, self.extra, strict=True)
        ]
        if not any(b or e for b, e in widths):
            return x
        return np.pad(x, widths, constant_values=value)

    def views(self, padded: np.ndarray) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        """(kernel offset, strided view of `padded` at that offset over all outputs)."""
        if min(self.out, default=1) <= 0:
            return  # the window does not fit: no output positions, callers give empty results
        lead = (slice(None),) * (padded.ndim - len(self.kernel))
        for offset in itertools.product(*(range(k) for k in self.kernel)):
            index = tuple(
                slice(o * d, o * d + (n - 1) * s + 1, s)
                for o, d, n, s in zip(offset, self.dilations, self.out, self.strides, strict=True)
            )
            yield offset, padded[lead + index]


@register_kernel("Conv")
def conv_kernel(node: Node, env: KernelEnv) -> Kernel:
    group = int(node.get_attr("group", 1))

    def run(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
        kernel_shape = node.get_attr("kernel_shape", None) or w.shape[2:]
        window = Window(node, x.shape[2:], kernel_shape)
        padded = window.pad(x, 0)
        n, c = x.shape[:2]
        m = w.shape[0]
        taps = math.prod(kernel_shape)
        dtype = np.result_type(x, w)
        # One GEMM per group over an im2col matrix [C/G * taps, outputs], summed in double: the
        # interpreter is the oracle, and activations of deep nets reach 1e10, where float32 sums
        # taken in different orders for different channels visibly disagree after a softmax.
        compute = np.dtype(np.float64) if dtype.kind == "f" else dtype
        grouped = padded.reshape(n, group, c // group, *padded.shape[2:])
        cols = np.empty((n, group, c // group, taps, *window.out), dtype=compute)
        for index, (_, view) in enumerate(window.views(grouped)):
            cols[:, :, :, index] = view
        cols = cols.reshape(n, group, (c // group) * taps, -1)
        weights = w.reshape(group, m // group, (c // group) * taps).astype(compute)
        out = np.matmul(weights, cols).reshape(n, m, *window.out)
        if b is not None:
            out += b.reshape((1, m) + (1,) * len(window.out))
        return out.astype(dtype, copy=False)

    return run


def _pool_kernel(node: Node, env: KernelEnv, reduce: str) -> Kernel:
    kernel = list(node.get_attr("kernel_shape"))
    ceil_mode = bool(node.get_attr("ceil_mode", 0))
    include_pad = bool(node.get_attr("count_include_pad", 0))

    def run(x: np.ndarray) -> np.ndarray:
        window = Window(node, x.shape[2:], kernel, ceil_mode=ceil_mode)
        if reduce == "max":
            fill = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
            padded = window.pad(x, fill)
            result: Any = np.empty((*x.shape[:2], *window.out), x.dtype)
            for index, (_, view) in enumerate(window.views(padded)):
                result = view.copy() if index == 0 else np.maximum(result, view, out=result)
            return result
        padded = window.pad(x, 0)
        total = np.zeros(
            (*x.shape[:2], *window.out), dtype=np.float64 if x.dtype == np.float64 else np.float32
        )
        for _, view in window.views(padded):
            total += view
        # how many elements each window averages: real input, plus explicit pads if asked
        ones = np.ones(x.shape[2:], np.float32)
        counted = window.pad(ones, 0)
        if include_pad:
            counted = np.pad(
                np.ones(
                    [
                        n + b + e
                        for n, b, e in zip(x.shape[2:], window.begin, window.end, strict=True)
                    ],
                    np.float32,
                ),
                [(0, e) for e in window.extra],
            )
        count = np.zeros(window.out, np.float32)
        for _, view in window.views(counted):
            count += view
        return (total / np.maximum(count, 1)).astype(x.dtype)

    return run


@register_kernel("MaxPool", since=8)
def max_pool_kernel(node: Node, env: KernelEnv) -> Kernel:
    if len(node.outputs) > 1 and (node.outputs[1].is_used or node.outputs[1].name):
        return onnx_reference_kernel(node, env)  # Indices output: rare, keep the spec's own code
    if int(node.get_attr("storage_order", 0)) != 0:
        return onnx_reference_kernel(node, env)
    return _pool_kernel(node, env, "max")


@register_kernel("AveragePool", since=7)
def average_pool_kernel(node: Node, env: KernelEnv) -> Kernel:
    return _pool_kernel(node, env, "average")


def conv_output_shape(node: Node, spatial: Sequence[int], kernel: Sequence[int]) -> list[int]:
    """Output spatial dims of a conv or pooling node (used by cost estimates and tests)."""
    return Window(node, spatial, kernel, ceil_mode=bool(node.get_attr("ceil_mode", 0))).out


__all__ = ["Window", "conv_output_shape"]
