"""What a pruned weight would take if stored sparse, and the pruning report that shows it.

The graph keeps pruned weights dense (zeros written out: every backend runs them as they are);
these are the sizes a sparse storage format would reach, so the report can say what pruning buys
on disk or in memory. Formulas, for a weight of `size` elements of `b` bytes, `nnz` of them
non-zero, viewed as a matrix of `rows` rows and `cols` columns (its first axis by the rest):

| format | bytes | used for |
| --- | --- | --- |
| `dense` | `size * b` | unpruned weights |
| `bitmask` | `nnz * b + ceil(size / 8)` | unstructured: one bit per element says whether a value follows |
| `csr` | `nnz * b + nnz * idx(cols) + (rows + 1) * idx(nnz)` | unstructured, very sparse |
| `n:m` | `size * n / m * b + size * n / m * ceil(log2 m) / 8` | N:M (2:4: NVIDIA's sparse tensor core layout, a 2-bit index per kept value) |

`idx(k)` is the bytes of the smallest unsigned integer holding k (1, 2, 4 or 8). Unstructured
weights are counted in whichever of bitmask and CSR is smaller, and the report names it
(bitmask up to about 90% sparsity for float32, CSR beyond).

`PruningReport` (topic `"pruning"` in `PassContext.artifacts`, so `--report` tables it and the
JSON report holds it) has one row per pruned layer, the latest pass's row winning, and the model's
weight bytes dense and with those layers stored sparse. Every pruning pass adds its layers with
`pruning_report(context).add(...)`, then `.finish(model)`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from graphopt.ir.core import Model
from graphopt.passes.manager import PassContext

__all__ = [
    "LayerSparsity",
    "PruningReport",
    "bitmask_bytes",
    "csr_bytes",
    "dense_bytes",
    "index_bits",
    "n_m_bytes",
    "pruning_report",
    "unstructured_bytes",
]


def _index_bytes(count: int) -> int:
    """Bytes of the smallest unsigned integer type that can hold `count`."""
    for size in (1, 2, 4):
        if count < 256**size:
            return size
    return 8


def dense_bytes(array: np.ndarray) -> int:
    return int(array.size * array.dtype.itemsize)


def bitmask_bytes(array: np.ndarray) -> int:
    """Non-zero values, plus one bit per element."""
    nnz = int(np.count_nonzero(array))
    return nnz * array.dtype.itemsize + math.ceil(array.size / 8)


def csr_bytes(array: np.ndarray) -> int:
    """CSR of the weight as a matrix [shape[0], rest]: values, column indices, row offsets."""
    rows = int(array.shape[0]) if array.ndim else 1
    cols = array.size // max(rows, 1)
    nnz = int(np.count_nonzero(array))
    return nnz * (array.dtype.itemsize + _index_bytes(cols)) + (rows + 1) * _index_bytes(nnz)


def unstructured_bytes(array: np.ndarray) -> tuple[str, int]:
    """(format, bytes) of the smaller of bitmask and CSR."""
    return min((("bitmask", bitmask_bytes(array)), ("csr", csr_bytes(array))), key=lambda f: f[1])


def index_bits(m: int) -> int:
    """Bits of a position inside a group of m: ceil(log2 m), at least 1."""
    return max(1, (m - 1).bit_length())


def n_m_bytes(array: np.ndarray, n: int, m: int) -> int:
    """N:M compressed: the n kept values of every group of m, plus an `index_bits(m)`-bit
    position per kept value."""
    kept = array.size * n // m
    return kept * array.dtype.itemsize + math.ceil(kept * index_bits(m) / 8)


@dataclass
class LayerSparsity:
    """One pruned layer: its weight's shape, zeros and sizes."""

    pass_name: str
    node: str
    shape: tuple[int, ...]
    elements: int
    zeros: int
    format: str
    dense_bytes: int
    sparse_bytes: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.elements if self.elements else 0.0


@dataclass
class PruningReport:
    """Per-layer sparsity and the model's weight bytes, dense and stored sparse."""

    layers: dict[str, LayerSparsity] = field(default_factory=dict)
    model_dense_bytes: int = 0
    model_sparse_bytes: int = 0

    def add(self, pass_name: str, node: str, array: np.ndarray, format: str, sparse: int) -> None:
        zeros = int(array.size - np.count_nonzero(array))
        self.layers[node] = LayerSparsity(
            pass_name, node, tuple(int(d) for d in array.shape), int(array.size), zeros, format,
            dense_bytes(array), sparse,
        )  # fmt: skip

    def finish(self, model: Model) -> None:
        """Recompute the model's totals: every initializer dense, pruned layers stored sparse."""
        total = sum(
            dense_bytes(np.asarray(v.const_value))
            for graph in [model.graph, *model.graph.nested_graphs()]
            for v in graph.initializers.values()
            if v.const_value is not None
        )
        saved = sum(layer.dense_bytes - layer.sparse_bytes for layer in self.layers.values())
        self.model_dense_bytes, self.model_sparse_bytes = total, total - saved

    @property
    def sparsity(self) -> float:
        """Zeros over elements, over the pruned layers."""
        elements = sum(layer.elements for layer in self.layers.values())
        return sum(layer.zeros for layer in self.layers.values()) / elements if elements else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": [
                {**asdict(layer), "sparsity": round(layer.sparsity, 6)}
                for layer in self.layers.values()
            ],  # fmt: skip
            "sparsity": round(self.sparsity, 6),
            "model_dense_bytes": self.model_dense_bytes,
            "model_sparse_bytes": self.model_sparse_bytes,
        }

    def table(self) -> Any:
        from rich.table import Table

        ratio = self.model_sparse_bytes / self.model_dense_bytes if self.model_dense_bytes else 1
        table = Table(
            title=f"pruning: {len(self.layers)} layers, {self.sparsity:.1%} of their weights zero; "
            f"weights {_mb(self.model_dense_bytes)} dense, {_mb(self.model_sparse_bytes)} stored "
            f"sparse ({ratio:.1%})",
            title_justify="left",
        )
        for column, justify in (("layer", "left"), ("pass", "left"), ("shape", "left"),
                                ("sparsity", "right"), ("format", "left"), ("dense", "right"),
                                ("sparse", "right")):  # fmt: skip
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        for layer in self.layers.values():
            table.add_row(
                layer.node, layer.pass_name, "x".join(map(str, layer.shape)),
                f"{layer.sparsity:.1%}", layer.format, _mb(layer.dense_bytes),
                _mb(layer.sparse_bytes),
            )  # fmt: skip
        return table


def _mb(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 100_000 else f"{size / 1e3:.1f} KB"


def pruning_report(context: PassContext) -> PruningReport:
    """The run's pruning report (created on first use, shared by every pruning pass)."""
    report = context.artifacts.get("pruning")
    if not isinstance(report, PruningReport):
        report = context.artifacts["pruning"] = PruningReport()
    return report
