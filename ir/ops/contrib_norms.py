"""Normalization kernels: ONNX Runtime's skip-norm contrib ops, and the standard norms as the spec
defines them.

`com.microsoft.SkipLayerNormalization(input, skip, gamma, beta?, bias?)` (written by
`fuse-skip-layernorm` for `--target onnxruntime`) computes `s = input + skip (+ bias)` and
LayerNorm of `s` over the last axis: `(s - mean) / sqrt(var + epsilon) * gamma (+ beta)`. Its
outputs are `output`, `mean` and `inv_std_var` (float32, shape `input[:-1] + [1]`; ONNX Runtime's
CPU kernel leaves them unset) and `input_skip_bias_sum` (`s`, so a residual stream can keep
reading the sum). `skip` may also be `[1, S, H]` or `[S, H]` against a 3-D input (it repeats over
the batch); gamma, beta and bias are `[H]`. `SkipSimplifiedLayerNormalization(input, skip,
gamma, bias?)` is the same with RMSNorm: `s / sqrt(mean(s^2) + epsilon) * gamma`, no beta.
ONNX Runtime computes float16 in float32 and the variance as `E[s^2] - mean^2`; the kernels here
compute in float32 (float64 for float64) and the variance from the centered values, so they match
ONNX Runtime to float rounding (tests compare them on random inputs).

`LayerNormalization` and `RMSNormalization` (standard ops that `fuse-layernorm` and
`fuse-rmsnorm` write) get kernels here too: `onnx.reference` computes them in the input's type,
while the spec computes the statistics in `stash_type` (float32), casts the normalized value to the
input type and then applies scale and bias in that type (what makes float16 models' fused norms
equal to their `Cast`-to-float32 decompositions), and gives Mean and InvStdDev in the stash type.
"""

from __future__ import annotations

import numpy as np

from graphopt.ir.core import Node
from graphopt.ir.errors import InvalidGraphError
from graphopt.ir.ops.costs import io_bytes, numel
from graphopt.ir.registry import (
    Cost,
    InferenceInputs,
    Kernel,
    KernelEnv,
    register_cost,
    register_inference,
    register_kernel,
)
from graphopt.ir.types import DType, TensorType, Type

__all__ = ["SKIP_LAYER_NORM", "SKIP_SIMPLIFIED_LAYER_NORM", "layer_norm", "rms_norm"]

SKIP_LAYER_NORM = "com.microsoft.SkipLayerNormalization"
SKIP_SIMPLIFIED_LAYER_NORM = "com.microsoft.SkipSimplifiedLayerNormalization"


def _compute_dtype(dtype: np.dtype) -> type:
    return np.float64 if dtype == np.float64 else np.float32


def layer_norm(
    x: np.ndarray,
    scale: np.ndarray | None,
    bias: np.ndarray | None,
    axis: int,
    epsilon: float,
    stash: type = np.float32,
    centered: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, mean, inv_std) of LayerNorm over axes [axis, rank) as ONNX specifies it: statistics in
    `stash`, the normalized value cast to x's type, then `* scale + bias` in x's type. With
    `centered=False` it is RMSNorm (mean reported as 0)."""
    a = axis + x.ndim if axis < 0 else axis
    axes = tuple(range(a, x.ndim))
    xs: np.ndarray = x.astype(stash, copy=False)
    if centered:
        mean = xs.mean(axis=axes, keepdims=True)
    else:
        mean = np.zeros(x.shape[:a] + (1,) * len(axes), stash)
    d = xs - mean if centered else xs
    var = np.mean(d * d, axis=axes, keepdims=True)
    inv_std = (1 / np.sqrt(var + stash(epsilon))).astype(stash)
    y = (d * inv_std).astype(x.dtype)
    if scale is not None:
        y = y * scale.astype(x.dtype, copy=False)
    if bias is not None:
        y = y + bias.astype(x.dtype, copy=False)
    return y.astype(x.dtype, copy=False), mean, inv_std


def rms_norm(
    x: np.ndarray, scale: np.ndarray, axis: int, epsilon: float, stash: type = np.float32
) -> np.ndarray:
    """RMSNormalization-23: `x / sqrt(mean(x^2) + epsilon)` in `stash`, cast, times scale."""
    return layer_norm(x, scale, None, axis, epsilon, stash, centered=False)[0]


def _stash(node: Node) -> type:
    stash = int(node.get_attr("stash_type", 1))
    try:
        dtype = DType(stash).numpy
    except (ValueError, KeyError):
        dtype = None
    if dtype is None or np.dtype(dtype).kind != "f":
        raise InvalidGraphError(f"{node.describe()}: stash_type {stash} is not a float type")
    return np.dtype(dtype).type


@register_kernel("LayerNormalization")
def layer_normalization_kernel(node: Node, env: KernelEnv) -> Kernel:
    axis = int(node.get_attr("axis", -1))
    epsilon = float(node.get_attr("epsilon", 1e-5))
    stash = _stash(node)

    def run(
        x: np.ndarray, scale: np.ndarray, bias: np.ndarray | None = None
    ) -> tuple[np.ndarray, ...]:
        return layer_norm(x, scale, bias, axis, epsilon, stash)

    return run


@register_kernel("RMSNormalization")
def rms_normalization_kernel(node: Node, env: KernelEnv) -> Kernel:
    axis = int(node.get_attr("axis", -1))
    epsilon = float(node.get_attr("epsilon", 1e-5))
    stash = _stash(node)
    return lambda x, scale: rms_norm(x, scale, axis, epsilon, stash)


# ----- SkipLayerNormalization, SkipSimplifiedLayerNormalization -------------------------------------


def _skip_kernel(centered: bool) -> Kernel:
    def factory(node: Node, env: KernelEnv) -> Kernel:
        epsilon = float(node.get_attr("epsilon", 1e-12))

        def run(
            x: np.ndarray, skip: np.ndarray, gamma: np.ndarray, *optional: np.ndarray | None
        ) -> list[np.ndarray]:
            beta = optional[0] if centered and optional else None
            bias_at = 1 if centered else 0
            bias = optional[bias_at] if len(optional) > bias_at else None
            if x.ndim not in (2, 3) or skip.shape[-2:] != x.shape[-2:]:
                raise InvalidGraphError(
                    f"{node.describe()}: skip {list(skip.shape)} does not fit input {list(x.shape)}"
                )
            compute = _compute_dtype(x.dtype)
            total: np.ndarray = x.astype(compute) + np.broadcast_to(skip, x.shape).astype(compute)
            if bias is not None:
                total = total + bias.astype(compute)
            y, mean, inv_std = layer_norm(
                total, gamma.astype(compute), None if beta is None else beta.astype(compute),
                -1, epsilon, compute, centered,
            )  # fmt: skip
            stats = [mean.astype(np.float32), inv_std.astype(np.float32)]  # U is float
            return [y.astype(x.dtype), *stats, total.astype(x.dtype)]

        return run

    return factory


register_kernel(SKIP_LAYER_NORM)(_skip_kernel(centered=True))
register_kernel(SKIP_SIMPLIFIED_LAYER_NORM)(_skip_kernel(centered=False))


def _skip_inference(node: Node, inputs: InferenceInputs) -> list[Type | None]:
    x = inputs.types[0] if inputs.types else None
    if not isinstance(x, TensorType):
        return [None] * len(node.outputs)
    for name, t in zip(("skip", "gamma"), inputs.types[1:3], strict=False):
        if isinstance(t, TensorType) and t.dtype != x.dtype:
            raise InvalidGraphError(
                f"{node.describe()}: {name} is {t.dtype.name}, the input {x.dtype.name}"
            )
    if x.shape is not None and len(x.shape) not in (2, 3):
        raise InvalidGraphError(f"{node.describe()}: the input has rank {len(x.shape)}, not 2 or 3")
    stats = TensorType(DType.FLOAT, None if x.shape is None else (*x.shape[:-1], 1))
    types: list[Type | None] = [x, stats, stats, x]
    return types[: len(node.outputs)]


register_inference(SKIP_LAYER_NORM)(_skip_inference)
register_inference(SKIP_SIMPLIFIED_LAYER_NORM)(_skip_inference)


def _skip_cost(node: Node, inputs: list[Type | None], outputs: list[Type | None]) -> Cost:
    """Per element: the adds (input + skip [+ bias]) and LayerNorm's ~8 FLOPs (RMSNorm's ~5)."""
    n, exact = numel(outputs[0] if outputs else None)
    centered = node.op_type == "SkipLayerNormalization"
    bias_at = 4 if centered else 3
    has_bias = len(node.inputs) > bias_at and node.inputs[bias_at] is not None
    per_element = 1 + int(has_bias) + (8 if centered else 5)
    written = [t for t, v in zip(outputs, node.outputs, strict=False) if v.is_used]
    moved, exact_bytes = io_bytes(inputs, written)
    return Cost(n * per_element, moved, exact and exact_bytes)


register_cost(SKIP_LAYER_NORM)(_skip_cost)
register_cost(SKIP_SIMPLIFIED_LAYER_NORM)(_skip_cost)
