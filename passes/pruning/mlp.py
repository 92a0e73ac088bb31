"""prune-mlp: remove hidden neurons of transformer MLPs.

A group (`structure.py`) is one MLP's hidden layer: the columns of the up projection (and of the
gate projection, also when fuse-qkv's sibling merge packed gate and up into one MatMul read through
a Split), their biases, the element-wise activation and the gate multiply, the Reshapes between
(their shape constants are rewritten), and the rows of the down projection. MatMul weights are
W[K, N]: a neuron is a column of the up/gate weights and a row of the down weight; Gemm with
transB reads them transposed. The lowest-scoring `floor(ratio * neurons)` of each MLP go
(`driver.py`: `magnitude` or `activation`, Wanda's |W| * ||x|| on the down projection).
`refit=true` re-solves the down projection by least squares on the calibration activations and
folds the removed neurons' mean contribution into its bias (`refit.py`).

Lossy by design (`exact = False`); neurons whose weights are all zero are removed exactly.
Order: after O2 (fused MatMul+Add, Gelu, the gate/up merge are all read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphopt.passes.manager import register_pass
from graphopt.passes.pruning.driver import StructuredPrune

__all__ = ["PruneMLP"]


@register_pass("prune-mlp", "remove the lowest-scoring hidden neurons of transformer MLPs")
@dataclass
class PruneMLP(StructuredPrune):
    kind: ClassVar[str] = "dense"
    unit: ClassVar[str] = "neuron"
    group: ClassVar[str] = "MLP neuron"

    ratio: float = 0.5
    scores: str = "magnitude"
    refit: bool = False
    multiple: int = 1  # round the kept count of each group up to a multiple of this
