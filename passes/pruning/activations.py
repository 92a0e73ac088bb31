"""Activation statistics for pruning: per-channel L2 norms of values over calibration data.

Activation-aware scores (Wanda: `|W| * ||x_j||`, `importance.activation_aware`) need, for the
input `x` of each layer, the L2 norm of each input feature j over every calibration token:

    norms = input_norms(model, data, {"h1": -1, "conv_in": 1})
    norms["h1"]        # shape [features]: sqrt of the sum of h1[..., j]**2 over all samples

Each requested value is reduced, sample by sample, to a float64 sum of squares per channel
(every axis but the channel axis summed), and the square root is taken at the end: constant
memory, one pass over the data through `calibration.observe` (the one place that runs
calibration data through a model).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from graphopt.ir.core import Model
from graphopt.ir.errors import GraphoptError
from graphopt.passes.quantization.calibration import Feeds, observe

__all__ = ["input_norms"]


class _SumOfSquares:
    """Accumulates the per-channel sum of squares of one value."""

    def __init__(self, name: str, axis: int):
        self.name, self.axis = name, axis
        self.total: np.ndarray | None = None

    def __call__(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if not -x.ndim <= self.axis < x.ndim:
            raise GraphoptError(
                f"channel axis {self.axis} is out of range for %{self.name} of shape "
                f"{list(x.shape)}"
            )
        axis = self.axis % x.ndim
        others = tuple(i for i in range(x.ndim) if i != axis)
        squares = np.square(x.astype(np.float64)).sum(axis=others)
        if self.total is None:
            self.total = squares
        elif self.total.shape != squares.shape:
            raise GraphoptError(
                f"%{self.name} has {squares.shape[0]} channels on axis {self.axis} in one "
                f"sample and {self.total.shape[0]} in another"
            )
        else:
            self.total += squares


def input_norms(
    model: Model, data: Iterable[Feeds], requests: Mapping[str, int], *, progress: bool = False
) -> dict[str, np.ndarray]:
    """Value name -> the L2 norm (float64, one per channel) of that value over all samples of
    `data` and all axes but its channel axis (`requests[name]`, negative allowed). Names are
    graph inputs or node outputs of the main graph."""
    sums = {name: _SumOfSquares(name, axis) for name, axis in requests.items()}
    if not sums:
        return {}
    observe(model, data, sums, progress=progress)
    empty = [name for name, s in sums.items() if s.total is None]
    if empty:
        raise GraphoptError(
            "the calibration data holds no samples",
            hint="give at least one sample (--calibration calib.npz or random:N)",
        )
    return {name: np.sqrt(s.total) for name, s in sums.items() if s.total is not None}
