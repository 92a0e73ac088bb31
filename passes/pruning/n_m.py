"""prune-n-m: semi-structured N:M sparsity: in every group of m consecutive weights along the
reduction axis, keep the n most important and zero the rest.

    prune-n-m{n=2 m=4 scores=magnitude|activation}

2:4 is what NVIDIA's sparse tensor cores (Ampere and later) run at twice the dense rate, and
what ONNX Runtime/TensorRT sparse kernels expect. The groups run along the axis the layer sums
over (`sites.py`): for MatMul W [K, N], m consecutive rows of each output column; for Gemm B the
same, along K whatever transB says; for Conv W [M, C/group, kh, kw], m consecutive input channels
at each (output channel, kernel position). Scores are `magnitude` (|w|) or `activation` (Wanda,
|w| * ||x_j||; within a group all weights share the output, so this ranks by the input they
multiply as well), and in each group the n highest are kept (ties: the earlier position is
dropped first; `importance.n_m_keep`). Every layer ends at exactly 1 - n/m sparsity.

A layer whose reduction axis is not a multiple of m is left dense and named in a note (a CNN's
first convolution, C = 3, is the usual one). Weights read by other nodes, the final projection
(unless `prune-output-layer=true`) and layers under `min-elements` are left alone as in
prune-unstructured. The masked weight is a new initializer; kept weights are bit for bit the old
ones. The report counts each layer in the N:M compressed format (the kept values and a
ceil(log2 m)-bit position for each: 2:4 stores half the values and 2 bits per value; `storage.py`).

Lossy by design (`exact = False`); the tests hold it to a cosine floor on the zoo models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from graphopt.ir.core import Model
from graphopt.passes.manager import ModelPass, PassContext, register_pass
from graphopt.passes.pruning.importance import n_m_keep
from graphopt.passes.pruning.sites import Scores, layer_sites, replace_weight, site_scores
from graphopt.passes.pruning.storage import index_bits, n_m_bytes, pruning_report
from graphopt.passes.pruning.unstructured import (
    PruningOptionError,
    check_scores,
    nothing_to_prune,
)

__all__ = ["PruneNM"]


@register_pass(
    "prune-n-m",
    "N:M semi-structured sparsity (2:4 by default) along the reduction axis of MatMul/Gemm/Conv",
)
@dataclass
class PruneNM(ModelPass):
    exact: ClassVar[bool] = False

    n: int = 2
    m: int = 4
    scores: Scores = "magnitude"
    min_elements: int = 0
    exclude: tuple[str, ...] = ()
    prune_output_layer: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.n < self.m:
            raise PruningOptionError(
                f"N:M needs 1 <= n < m (n weights kept in every m), got n={self.n}, m={self.m}",
                hint="2:4 is n=2 m=4",
            )
        check_scores(self.scores)

    def run(self, model: Model, context: PassContext) -> bool:
        graph = model.graph
        sites = layer_sites(self, graph, context)
        fitting = []
        for site in sites:
            length = site.array.shape[site.input_axis]
            if length % self.m:
                context.refuse(site.node, f"its reduction axis (axis {site.input_axis} of its "
                               f"weight) has {length} entries, not a multiple of m={self.m}: "
                               "left dense")  # fmt: skip
            else:
                fitting.append(site)
        if not sites:
            raise nothing_to_prune(model, context)
        if not fitting:
            lengths = sorted({s.array.shape[s.input_axis] for s in sites})
            raise PruningOptionError(
                f"the {self.n}:{self.m} pattern fits no layer: m={self.m} divides none of the "
                f"reduction axes ({', '.join(map(str, lengths[:6]))})",
                where=f"graph '{model.graph.name}'",
                hint="choose an m that divides the layers' input widths (2:4 needs multiples "
                "of 4); layers it does not fit are left dense when others fit",
            )
        report = pruning_report(context)
        pattern = f"{self.n}:{self.m}"
        changed = pruned = 0
        all_scores = site_scores(model, fitting, self.scores, context)
        for site, scores in zip(fitting, all_scores, strict=True):
            if scores is None:
                continue
            keep = n_m_keep(scores, self.n, self.m, site.input_axis)
            changed += replace_weight(graph, site, keep)
            sparse = n_m_bytes(site.array, self.n, self.m)
            report.add(self.name, site.name, site.array, pattern, sparse)
            pruned += 1
        report.finish(model)
        context.note(
            f"pruned {pruned} layers to {pattern} ({self.scores} scores); weights "
            f"{report.model_dense_bytes:,} bytes dense, {report.model_sparse_bytes:,} with the "
            f"pruned layers stored {pattern} compressed (values + {index_bits(self.m)}-bit "
            "positions)"
        )
        return changed > 0
