"""A quantized Gemm's bias as int32 behind a DequantizeLinear, the shape ONNX Runtime fuses.

ONNX Runtime's QDQ transformer (CPU) turns `DQ(x), DQ(W)[, DQ(C)] -> Gemm [-> Q]` into its int8
QGemm only when every input of the Gemm comes from a DequantizeLinear: a float bias C leaves the
Gemm float, and the weights are dequantized at every run. The bias DequantizeLinear must read
int32 codes (GemmNodeGroupSelector), beta must be 1, and the weight's DequantizeLinear must carry
an explicit zero point (`sites.dequantize_weight` writes one). Measured in ONNX Runtime 1.32 on
hand-built models (ORT_ENABLE_ALL, the optimized graph saved): transB=0 and 1, per tensor and
per channel, float or quantized output all fuse; a float bias, or a weight DequantizeLinear
without its zero point input, never does.

The codes: b' = beta * C (beta folded in, so the Gemm keeps beta = 1), scale s_b = s_x * s_w in
float32 (per channel, a [N] vector along axis 0, as the weight's scales), zero point 0 (int32's
default), q = rint(b' / s_b). This is the convention of QLinearConv and QGemm: in the integer
product sum_k (x_q - zp_x) * w_q, one unit is s_x * s_w, so the bias adds to the int32
accumulator without a rescale. Rounding moves each output by at most s_x * s_w / 2, half a unit
of that accumulator, against up to (s_x / 2) * sum_k |w_k| from rounding x alone: negligible.

Which of the two mattered where: the tiny GPT-2's Gemms have no C after O2, and the explicit
weight zero point alone took ONNX Runtime's graph from 0 to 8 QGemm (its outputs in the
reference interpreter are unchanged, cosine 0.99994 against fp32; in ONNX Runtime 0.99938, its
int8 kernel); a Gemm with a bias needs both (tests/test_quant_static_gemm.py).

A Gemm is left with its float bias (and stays float in ONNX Runtime) when: its A input is not a
DequantizeLinear with a constant per-tensor scale, alpha != 1 or transA = 1 (the bias scale would
have to include alpha), C is not a float32 constant of N or 1 elements (a full [M, N] matrix), or
a code would not fit in int32 (a bias huge against s_x * s_w).

Conv needs none of this: ONNX Runtime fuses `DQ, DQ -> Conv (float bias) -> Q` into QLinearConv
by quantizing the float bias itself; an int32 bias gives the same graph (measured: identical
node lists, outputs within one output quantization step of each other).
"""

from __future__ import annotations

import numpy as np

from graphopt.ir.core import Graph, Node, Value
from graphopt.ir.types import DType, TensorType
from graphopt.passes.quantization.sites import drop_initializer

__all__ = ["quantize_gemm_bias"]

INT32_MAX = np.iinfo(np.int32).max


def quantize_gemm_bias(graph: Graph, node: Node, weight_scale: np.ndarray) -> str:
    """Replace the Gemm `node`'s constant float bias by int32 codes behind a DequantizeLinear;
    '' when done, else why not (the Gemm then keeps its float bias)."""
    if node.op != "Gemm" or len(node.inputs) < 3 or node.inputs[2] is None:
        return "no bias"
    if float(node.get_attr("alpha", 1.0)) != 1.0 or int(node.get_attr("transA", 0)):
        return "alpha != 1 or transA"
    x_scale = _activation_scale(node.inputs[0])
    if x_scale is None:
        return "its input is not dequantized with a constant per-tensor scale"
    c = node.inputs[2]
    array = np.asarray(c.const_value) if c.is_constant and c.const_value is not None else None
    w_scale = np.asarray(weight_scale, np.float32)
    n = w_scale.size if w_scale.ndim else None
    if array is None or array.dtype != np.float32 or array.size == 0:
        return "its bias is not a float32 constant"
    if array.ndim > 1 and array.shape[:-1] != (1,) * (array.ndim - 1):
        return f"its bias has shape {array.shape}, not a vector"
    size = n if n is not None else array.size
    if array.size not in (1, size):
        return f"its bias has {array.size} elements, not {size}"
    beta = float(node.get_attr("beta", 1.0))
    bias = np.broadcast_to(array.reshape(-1).astype(np.float64) * beta, (size,))
    scale = (np.float32(x_scale) * w_scale).astype(np.float32)  # s_x * s_w in float32, as ORT
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    codes = np.rint(bias / np.broadcast_to(scale, (size,)).astype(np.float64))
    if np.abs(codes).max() > INT32_MAX:
        return "a bias code would not fit in int32"
    name = c.name or "bias"
    inputs = [
        graph.add_initializer(graph.scope.fresh(f"{name}_quantized"), codes.astype(np.int32)),
        graph.add_initializer(graph.scope.fresh(f"{name}_scale"), scale),
    ]
    attrs = {"axis": 0} if scale.ndim else {}
    dq = Node("DequantizeLinear", inputs, attrs, name=graph.scope.fresh(f"{name}_dq"))
    dq.outputs[0].type = TensorType(DType.from_numpy(np.dtype(np.float32)), (size,))
    graph.insert_before(node, dq)
    node.set_input(2, dq.outputs[0])
    if "beta" in node.attrs:
        node.set_attr("beta", 1.0)
    drop_initializer(graph, c)
    return ""


def _activation_scale(x: Value | None) -> float | None:
    """The constant per-tensor scale of the DequantizeLinear producing `x`, if any."""
    producer = x.producer if x is not None else None
    if producer is None or producer.op != "DequantizeLinear" or len(producer.inputs) < 2:
        return None
    scale = producer.inputs[1]
    if scale is None or not scale.is_constant or scale.const_value is None:
        return None
    array = np.asarray(scale.const_value)
    return float(array) if array.size == 1 and array.dtype.kind == "f" else None
