"""Cost estimates for standard ops: FLOPs and bytes moved, from the node's input and output types.

These feed the reports (where does a model spend its work), the placement cost model and fusion
heuristics; they are estimates for ranking, not timings. Rules:
- MatMul-like ops count 2 * M * N * K (a multiply and an add per inner-product term), convolutions
  2 * outputs * (input channels / groups) * kernel size, attention 4 * B * H * S * L * D for its two
  batched products plus its softmax.
- Elementwise ops count their output elements times a per-op weight (transcendentals cost more),
  reductions their input elements; pure data movement (Transpose, Gather, Concat ...) counts 0 FLOPs.
- Bytes are all input and output tensors' sizes, except for ops runtimes implement as views
  (Reshape, Squeeze, Identity ...), which move nothing.
- Symbolic or unknown dims count as 1 and mark the estimate `exact=False`.
"""

from __future__ import annotations

import math

from graphopt.ir.core import Node
from graphopt.ir.registry import REGISTRY, Cost, CostFn, OpEntry
from graphopt.ir.types import TensorType, Type

VIEW_OPS = frozenset(
    "Reshape Squeeze Unsqueeze Flatten Identity Shape Size Constant Dropout Optional".split()
)
MOVEMENT_OPS = frozenset(
    """Transpose Gather GatherElements GatherND Concat Split Slice Expand Tile Pad Cast CastLike
    ScatterElements ScatterND DepthToSpace SpaceToDepth Resize Compress Where OneHot Range Trilu
    ConstantOfShape EyeLike NonZero""".split()
)
REDUCTION_OPS = frozenset(
    """ReduceSum ReduceMean ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceSumSquare ArgMax ArgMin GlobalAveragePool GlobalMaxPool GlobalLpPool
    CumSum TopK""".split()
)
# FLOPs per output element for elementwise and normalization ops (default 1).
ELEMENT_WEIGHTS = {
    "Exp": 4, "Log": 4, "Sqrt": 2, "Reciprocal": 2, "Div": 2, "Pow": 8, "Erf": 8, "Tanh": 8,
    "Sigmoid": 4, "Softplus": 8, "Gelu": 10, "HardSwish": 3, "Mish": 12, "Sin": 8, "Cos": 8,
    "Softmax": 6, "LogSoftmax": 7, "LayerNormalization": 8, "RMSNormalization": 5,
    "BatchNormalization": 2, "InstanceNormalization": 8, "GroupNormalization": 8,
    "LpNormalization": 4, "QuantizeLinear": 3, "DequantizeLinear": 2, "RotaryEmbedding": 3,
}  # fmt: skip


def numel(t: Type | None) -> tuple[int, bool]:
    """Elements of a tensor type, and whether that count is exact."""
    if not isinstance(t, TensorType) or t.shape is None:
        return 1, False
    n, exact = 1, True
    for d in t.shape:
        if isinstance(d, int):
            n *= d
        else:
            exact = False
    return n, exact


def nbytes(t: Type | None) -> tuple[int, bool]:
    n, exact = numel(t)
    bits = t.dtype.itemsize_bits if isinstance(t, TensorType) else 32
    return (n * (bits or 32) + 7) // 8, exact


def io_bytes(inputs: list[Type | None], outputs: list[Type | None]) -> tuple[int, bool]:
    total, exact = 0, True
    for t in [*inputs, *outputs]:
        b, e = nbytes(t)
        total += b
        exact = exact and e
    return total, exact


def _dims(t: Type | None) -> tuple[list[int], bool]:
    if not isinstance(t, TensorType) or t.shape is None:
        return [], False
    return [d if isinstance(d, int) else 1 for d in t.shape], all(
        isinstance(d, int) for d in t.shape
    )


def elementwise_cost(node: Node, inputs: list[Type | None], outputs: list[Type | None]) -> Cost:
    out, exact = numel(outputs[0] if outputs else None)
    moved, exact_bytes = io_bytes(inputs, outputs)
    return Cost(out * ELEMENT_WEIGHTS.get(node.op_type, 1), moved, exact and exact_bytes)


def reduction_cost(node: Node, inputs: list[Type | None], outputs: list[Type | None]) -> Cost:
    n, exact = numel(inputs[0] if inputs else None)
    moved, exact_bytes = io_bytes(inputs, outputs)
    return Cost(n, moved, exact and exact_bytes)


def movement_cost(node: Node, inputs: list[Type | None], outputs: list[Type | None]) -> Cost:
    moved, exact = io_bytes(inputs, outputs)
    return Cost(0, moved, exact)


def view_cost(node: Node, inputs: list[Type | None], outputs: list[Type | None]) -> Cost:
    return Cost(0, 0, True)


def matmul_cost(node: Node, inputs: list[Type | None], outputs: list[Type | None]) -> Cost:
    """2 * (output elements) * K, K the reduction dim of the first input."""
    a, exact_a = _dims(inputs[0] if inputs else None)
    out, exact_out = numel(outputs[0] if outputs else None)
    k = 1
    if a:
        transposed = node.op_type == "Gemm" and node.get_attr("transA", 0)
        k = a[0] if transposed and len(a) == 2 else a[-1]
    moved, exact_bytes = io_bytes(inputs, outputs)
    return Cost(2 * out * k, moved, exact_a and exact_out and exact_bytes)


def conv_cost(node: Node, inputs: list[Type | None], outputs: list[Type | None]) -> Cost:
    """2 * outputs * (C_in / group) * prod(kernel) (ConvTranspose: per input element instead)."""
    w, exact_w = _dims(inputs[1] if len(inputs) > 1 else None)
    per_output = math.prod(w[1:]) if w else 1  # W is [C_out, C_in/group, k...]
    if node.op_type == "ConvTranspose":  # W is [C_in, C_out/group, k...]
        n, exact = numel(inputs[0] if inputs else None)
        flops = 2 * n * (math.prod(w[1:]) if w else 1)
    else:
        n, exact = numel(outputs[0] if outputs else None)
        flops = 2 * n * per_output
    moved, exact_bytes = io_bytes(inputs, outputs)
    return Cost(flops, moved, exact and exact_w and exact_bytes)


def attention_cost(node: Node, inputs: list[Type | None], outputs: list[Type | None]) -> Cost:
    """Q K^T and P V: 2 * 2 * B * H * S * L * D, plus ~6 FLOPs per score for the softmax."""
    q, exact_q = _dims(inputs[0] if inputs else None)
    k, exact_k = _dims(inputs[1] if len(inputs) > 1 else None)
    if len(q) == 4 and len(k) == 4:  # [B, H, S, D] and [B, H_kv, L, D]
        b, h, s, d = q
        length = k[2]
    elif len(q) == 3 and len(k) == 3:  # [B, S, H*D] with q_num_heads
        b, s, hidden = q
        h = int(node.get_attr("q_num_heads", 1)) or 1
        d, length = hidden // h, k[1]
    else:
        return movement_cost(node, inputs, outputs)
    scores = b * h * s * length
    moved, exact_bytes = io_bytes(inputs, outputs)
    return Cost(4 * scores * d + 6 * scores, moved, exact_q and exact_k and exact_bytes)


_BY_OP: dict[str, CostFn] = {
    **dict.fromkeys(
        "MatMul Gemm MatMulInteger QLinearMatMul FusedMatMul MatMulNBits".split(), matmul_cost
    ),
    **dict.fromkeys("Conv ConvInteger QLinearConv ConvTranspose".split(), conv_cost),
    **dict.fromkeys("Attention MultiHeadAttention GroupQueryAttention".split(), attention_cost),
    **dict.fromkeys(VIEW_OPS, view_cost),
    **dict.fromkeys(MOVEMENT_OPS, movement_cost),
    **dict.fromkeys(REDUCTION_OPS, reduction_cost),
}


def default_cost(op_type: str) -> CostFn:
    """The cost rule for a standard op type (elementwise when nothing more specific applies)."""
    return _BY_OP.get(op_type, elementwise_cost)


def _fill(entry: OpEntry) -> None:
    if entry.cost is None:
        entry.cost = default_cost(entry.op_type)


REGISTRY.add_defaults(_fill)
