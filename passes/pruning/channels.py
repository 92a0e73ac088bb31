"""prune-channels: remove Conv output channels, with everything that must go with them.

A group (`structure.py`) is a Conv's output channels together with the BatchNormalization
entries after it, the input channels of every Conv/Gemm that reads them (through activations,
pooling, flattening), depthwise Convs in between (their channels and `group` shrink together), and,
across residual Adds, every Conv writing into the same stream: one channel index is removed from
all of them at once. The lowest-scoring `floor(ratio * channels)` of each group go (`driver.py`:
scores `magnitude` of the group's filters and input slices, `activation`, or `bn-gamma` where a
BatchNormalization is still there, i.e. before O1's fold-batchnorm). `refit=true` re-solves the
Convs that read a pruned tensor by least squares on im2col patches of calibration data
(`refit.py`).

Lossy by design (`exact = False`); channels whose weights are all zero are removed exactly.
Order: after O1/O2 (it reads folded Convs, and the shapes the clean-up proved); run O1 after it if
other passes should see the smaller shapes folded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphopt.passes.manager import register_pass
from graphopt.passes.pruning.driver import StructuredPrune

__all__ = ["PruneChannels"]


@register_pass(
    "prune-channels", "remove the lowest-scoring Conv channels (and what must go with them)"
)
@dataclass
class PruneChannels(StructuredPrune):
    kind: ClassVar[str] = "conv"
    unit: ClassVar[str] = "channel"
    group: ClassVar[str] = "Conv channel"
    score_kinds: ClassVar[tuple[str, ...]] = ("magnitude", "bn-gamma", "activation")

    ratio: float = 0.3
    scores: str = "magnitude"
    refit: bool = False
    multiple: int = 0  # round each group's kept count up to a multiple of this (0: the CPU's)
