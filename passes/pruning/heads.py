"""prune-heads: remove attention heads (whole key/value groups under grouped-query attention).

A group (`structure.py`) is one attention layer: head-sized column blocks of the Q, K and V
projections (separate, or one fused QKV MatMul read through a Split, whose sizes are rewritten),
their biases, RotaryEmbedding's `num_heads`, the `Attention` op's `q_num_heads`/`kv_num_heads`
(ONNX opset 23) or `num_heads` (com.microsoft MultiHeadAttention), Reshape constants holding the
hidden size, and the output projection's input rows. A unit is a KV head and its group of
`q_num_heads / kv_num_heads` query heads: removing a KV head removes them all, so the grouping
stays consistent. The lowest-scoring `floor(ratio * kv_heads)` units of each layer go (at least
one kept; `driver.py`: `magnitude` or `activation` on the output projection). `refit=true`
re-solves the output projection by least squares (`refit.py`).

Only the 3-D `Attention(q, k, v)` form (what O2 writes on the zoo) is pruned; the 4-D form and
unfused MatMul/Softmax attention are left alone, with a note. Lossy by design (`exact = False`);
heads whose weights are all zero are removed exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphopt.passes.manager import register_pass
from graphopt.passes.pruning.driver import StructuredPrune

__all__ = ["PruneHeads"]


@register_pass("prune-heads", "remove the lowest-scoring attention heads (KV groups under GQA)")
@dataclass
class PruneHeads(StructuredPrune):
    kind: ClassVar[str] = "attention"
    unit: ClassVar[str] = "KV head group"
    group: ClassVar[str] = "attention head"

    ratio: float = 0.25
    scores: str = "magnitude"
    refit: bool = False
    multiple: int = 1  # round the kept count of each group up to a multiple of this
