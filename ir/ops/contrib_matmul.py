"""Kernels, inference and costs for ONNX Runtime contrib ops (`com.microsoft`) that fusion passes
emit for `--target onnxruntime`: `com.microsoft.FusedMatMul` (written by
`fold-transpose-into-matmul`).

FusedMatMul(A, B) computes `alpha * matmul(op(A), op(B))` where `op` first applies the batch
transposition (`transBatchA`/`transBatchB`: an operand of rank R is read with the permutation
`[1, 2, ..., R-2, 0, R-1]`, so a `[M, b0, ..., bn, K]` tensor is used as `[b0, ..., bn, M, K]`;
both operands then have the same rank R >= 3) and then swaps the last two axes (`transA`/`transB`).
Batch dims broadcast as in MatMul. ONNX Runtime's CPU kernel runs float32 only. The numpy kernel
here follows those semantics step by step (the tests compare it with ONNX Runtime's kernel on
random inputs for every attribute combination).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from graphopt.ir.core import Node
from graphopt.ir.errors import GraphoptError, InvalidGraphError
from graphopt.ir.ops.costs import io_bytes, numel
from graphopt.ir.ops.shape_rules import broadcast
from graphopt.ir.registry import (
    Cost,
    InferenceInputs,
    Kernel,
    KernelEnv,
    register_cost,
    register_inference,
    register_kernel,
)
from graphopt.ir.types import Dim, TensorType, Type

__all__ = ["fused_matmul_perm", "fused_matmul_shapes"]

FUSED_MATMUL = "com.microsoft.FusedMatMul"


def _flags(node: Node) -> tuple[bool, bool, bool, bool]:
    return (
        bool(node.get_attr("transA", 0)),
        bool(node.get_attr("transB", 0)),
        bool(node.get_attr("transBatchA", 0)),
        bool(node.get_attr("transBatchB", 0)),
    )


def fused_matmul_perm(rank: int, trans: bool, trans_batch: bool) -> list[int]:
    """The permutation FusedMatMul applies to an operand of `rank` (as Transpose's `perm`: output
    axis i reads input axis perm[i]) for the given flags; the identity when both are off."""
    perm = list(range(rank))
    if trans_batch:
        perm = [*perm[1 : rank - 1], perm[0], perm[rank - 1]]
    if trans:
        perm[-2], perm[-1] = perm[-1], perm[-2]
    return perm


def fused_matmul_shapes(
    a: Sequence[Dim], b: Sequence[Dim], node: Node
) -> tuple[tuple[Dim, ...], tuple[Dim, ...]] | None:
    """The shapes of op(A) and op(B) as the plain matmul sees them, or None if the flags do not
    fit the ranks (a transpose of a vector, a batch transposition below rank 3 or across ranks)."""
    trans_a, trans_b, batch_a, batch_b = _flags(node)
    if (trans_a and len(a) < 2) or (trans_b and len(b) < 2):
        return None
    if (batch_a or batch_b) and (len(a) != len(b) or len(a) < 3):
        return None
    pa = fused_matmul_perm(len(a), trans_a, batch_a)
    pb = fused_matmul_perm(len(b), trans_b, batch_b)
    return tuple(a[i] for i in pa), tuple(b[i] for i in pb)


@register_kernel(FUSED_MATMUL)
def fused_matmul_kernel(node: Node, env: KernelEnv) -> Kernel:
    alpha = float(node.get_attr("alpha", 1.0))
    trans_a, trans_b, batch_a, batch_b = _flags(node)

    def run(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if fused_matmul_shapes(a.shape, b.shape, node) is None:
            raise GraphoptError(
                f"{node.describe()}: FusedMatMul flags do not fit operands of shapes "
                f"{list(a.shape)} and {list(b.shape)}"
            )
        a = np.transpose(a, fused_matmul_perm(a.ndim, trans_a, batch_a)) if a.ndim > 1 else a
        b = np.transpose(b, fused_matmul_perm(b.ndim, trans_b, batch_b)) if b.ndim > 1 else b
        product = np.matmul(a, b)
        if alpha != 1.0:
            product = product * np.asarray(alpha, dtype=product.dtype)
        return np.asarray(product, dtype=a.dtype)

    return run


@register_inference(FUSED_MATMUL)
def fused_matmul_inference(node: Node, inputs: InferenceInputs) -> list[Type | None]:
    a, b = (inputs.types + [None, None])[:2]
    if not isinstance(a, TensorType):
        return [None]
    if a.shape is None or not isinstance(b, TensorType) or b.shape is None:
        return [TensorType(a.dtype, None)]
    if b.dtype != a.dtype:
        raise InvalidGraphError(f"{node.describe()}: A is {a.dtype.name}, B is {b.dtype.name}")
    shapes = fused_matmul_shapes(a.shape, b.shape, node)
    if shapes is None:
        raise InvalidGraphError(
            f"{node.describe()}: FusedMatMul flags do not fit operands of ranks "
            f"{len(a.shape)} and {len(b.shape)}"
        )
    sa, sb = list(shapes[0]), list(shapes[1])
    a_vec, b_vec = len(sa) == 1, len(sb) == 1
    sa = [1, *sa] if a_vec else sa
    sb = [*sb, 1] if b_vec else sb
    k1, k2 = sa[-1], sb[-2]
    if isinstance(k1, int) and isinstance(k2, int) and k1 != k2:
        raise InvalidGraphError(f"{node.describe()}: inner dims differ ({k1} and {k2})")
    batch = broadcast([tuple(sa[:-2]), tuple(sb[:-2])])
    if batch is None:
        raise InvalidGraphError(f"{node.describe()}: batch dims do not broadcast")
    shape = (*batch, *([] if a_vec else [sa[-2]]), *([] if b_vec else [sb[-1]]))
    return [TensorType(a.dtype, shape)]


@register_cost(FUSED_MATMUL)
def fused_matmul_cost(node: Node, inputs: list[Type | None], outputs: list[Type | None]) -> Cost:
    """2 * (output elements) * K, K read from op(A); the scaling by alpha is free (in the GEMM)."""
    out, exact = numel(outputs[0] if outputs else None)
    a = inputs[0] if inputs else None
    b = inputs[1] if len(inputs) > 1 else None
    k: Dim = 1
    if isinstance(a, TensorType) and a.shape and isinstance(b, TensorType) and b.shape:
        shapes = fused_matmul_shapes(a.shape, b.shape, node)
        if shapes is not None:
            k = shapes[0][-1]
    if not isinstance(k, int):
        k, exact = 1, False
    moved, exact_bytes = io_bytes(inputs, outputs)
    return Cost(2 * out * k, moved, exact and exact_bytes)
