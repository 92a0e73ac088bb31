"""Kernels for deprecated ops that `onnx.reference` no longer implements.

Old models still carry them, and a model graphopt loads must run: `Scatter` (opset 9-10) is
`ScatterElements` under its old name.
"""

from __future__ import annotations

import numpy as np

from graphopt.ir.core import Node
from graphopt.ir.registry import Kernel, KernelEnv, register_kernel


@register_kernel("Scatter")
def scatter_kernel(node: Node, env: KernelEnv) -> Kernel:
    axis = int(node.get_attr("axis", 0))

    def run(data: np.ndarray, indices: np.ndarray, updates: np.ndarray) -> np.ndarray:
        a = axis + data.ndim if axis < 0 else axis
        indices = np.where(indices < 0, indices + data.shape[a], indices)
        out = data.copy()
        np.put_along_axis(out, indices, updates, axis=a)
        return out

    return run
