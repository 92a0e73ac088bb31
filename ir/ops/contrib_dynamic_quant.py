"""Kernel, inference and cost of ONNX Runtime's `com.microsoft.DynamicQuantizeMatMul` (written by
`quantize-dynamic` for `--target onnxruntime`).

DynamicQuantizeMatMul(A, B, b_scale, b_zero_point?, bias?) computes `A @ W (+ bias)` with W
[K, N] stored as int8 or uint8 codes B and dequantized per tensor (b_scale a scalar) or per
column (b_scale [N]): W = (B - b_zero_point) * b_scale. A is quantized at run time the way
DynamicQuantizeLinear does it (uint8, its own [min(0, min A), max(0, max A)] range), the
product is accumulated in integers and scaled back:

    Y = ((A_q - zp_A) @ (B - zp_B)) * (s_A * b_scale) (+ bias)

The integer product is exact in int32 for the K of real models (|a - zp| <= 255, |b - zp| <= 255:
K < 2^15 keeps it within range); the tests compare this kernel with ONNX Runtime's.
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

__all__ = ["DYNAMIC_QUANTIZE_MATMUL"]

DYNAMIC_QUANTIZE_MATMUL = "com.microsoft.DynamicQuantizeMatMul"


@register_kernel(DYNAMIC_QUANTIZE_MATMUL)
def dynamic_quantize_matmul_kernel(node: Node, env: KernelEnv) -> Kernel:
    from graphopt.passes.quantization.scheme import QuantScheme, dynamic_params, quantize

    def run(
        a: np.ndarray,
        b: np.ndarray,
        b_scale: np.ndarray,
        b_zero_point: np.ndarray | None = None,
        bias: np.ndarray | None = None,
    ) -> np.ndarray:
        scale, zero = dynamic_params(a)
        a_q = quantize(a, scale, zero, QuantScheme("uint8", symmetric=False))
        a_int = a_q.astype(np.int32) - np.int32(zero)
        b_int = np.asarray(b).astype(np.int32)
        if b_zero_point is not None:
            b_int = b_int - np.asarray(b_zero_point).astype(np.int32)
        acc = np.matmul(a_int, b_int)
        y = acc.astype(np.float32) * (scale * np.asarray(b_scale, np.float32))
        if bias is not None:
            y = y + np.asarray(bias, np.float32)
        return y.astype(np.float32)

    return run


@register_inference(DYNAMIC_QUANTIZE_MATMUL)
def dynamic_quantize_matmul_inference(node: Node, inputs: InferenceInputs) -> list[Type | None]:
    a, b = (inputs.types + [None, None])[:2]
    if not isinstance(a, TensorType) or not isinstance(b, TensorType):
        return [TensorType(DType.FLOAT, None)]
    if a.shape is None or b.shape is None:
        return [TensorType(DType.FLOAT, None)]
    if len(b.shape) != 2 or not a.shape:
        raise InvalidGraphError(f"{node.describe()}: B must be 2-D and A at least 1-D")
    k, n = b.shape
    last = a.shape[-1]
    if isinstance(last, int) and isinstance(k, int) and last != k:
        raise InvalidGraphError(f"{node.describe()}: A's last dim is {last}, B's first is {k}")
    return [TensorType(DType.FLOAT, (*a.shape[:-1], n))]


@register_cost(DYNAMIC_QUANTIZE_MATMUL)
def dynamic_quantize_matmul_cost(
    node: Node, inputs: list[Type | None], outputs: list[Type | None]
) -> Cost:
    """2 * (output elements) * K multiply-adds, plus one pass over A to quantize it."""
    out, exact = numel(outputs[0] if outputs else None)
    b = inputs[1] if len(inputs) > 1 else None
    k = b.shape[0] if isinstance(b, TensorType) and b.shape and isinstance(b.shape[0], int) else 1
    moved, exact_bytes = io_bytes(inputs, outputs)
    return Cost(2 * out * k, moved, exact and exact_bytes)
