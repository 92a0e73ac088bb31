"""Attention kernels whose bodies are IR subgraphs: `ai.onnx.preview.FlexAttention`.

FlexAttention computes softmax(Q K^T * scale) V with two optional hooks, `score_mod` (applied to the
raw scores) and `prob_mod` (to the probabilities), each a one-input, one-output graph. The hooks
are IR graphs, so they run through the interpreter's frame. Grouped-query layouts (fewer K/V heads
than Q heads) repeat each K/V head for its group of Q heads. The softmax runs in
`softmax_precision` (float32 for half-precision inputs by default).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt.ir.core import Graph, Node
from graphopt.ir.errors import GraphoptError
from graphopt.ir.registry import Frame, Kernel, KernelEnv, register_kernel
from graphopt.ir.types import DType


def _softmax_dtype(dtype: np.dtype, precision: int | None) -> np.dtype:
    if precision is not None:
        return DType(precision).numpy
    return dtype if dtype.itemsize >= 4 else np.dtype(np.float32)


@register_kernel("ai.onnx.preview.FlexAttention", needs_frame=True)
def flex_attention_kernel(node: Node, env: KernelEnv) -> Kernel:
    score_mod: Graph | None = node.get_attr("score_mod")
    prob_mod: Graph | None = node.get_attr("prob_mod")
    scale_attr = node.get_attr("scale")
    precision = node.get_attr("softmax_precision")

    def hook(frame: Frame, graph: Graph | None, values: np.ndarray) -> np.ndarray:
        if graph is None:
            return values
        return np.asarray(frame.run_graph(graph, [values])[0], dtype=values.dtype)

    def run(frame: Frame, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> Any:
        if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
            raise GraphoptError(f"{node.describe()}: Q, K and V must be rank 4 [B, H, S, D]")
        q_heads, kv_heads = q.shape[1], k.shape[1]
        if q_heads != kv_heads:
            if kv_heads == 0 or q_heads % kv_heads:
                raise GraphoptError(
                    f"{node.describe()}: {q_heads} Q heads for {kv_heads} K/V heads"
                )
            k = np.repeat(k, q_heads // kv_heads, axis=1)
            v = np.repeat(v, q_heads // kv_heads, axis=1)
        scale = 1.0 / np.sqrt(q.shape[-1]) if scale_attr is None else scale_attr
        root = np.asarray(np.sqrt(np.float32(scale)), dtype=q.dtype)  # split over Q and K
        scores = np.matmul(q * root, np.swapaxes(k * root, -1, -2))
        compute = _softmax_dtype(q.dtype, precision)
        scores = hook(frame, score_mod, scores.astype(compute))
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = hook(frame, prob_mod, scores / scores.sum(axis=-1, keepdims=True))
        return np.matmul(probs, v.astype(compute)).astype(v.dtype)

    return run
