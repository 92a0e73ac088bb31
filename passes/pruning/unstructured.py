"""prune-unstructured: zero the least important weights of MatMul, Gemm and Conv layers.

    prune-unstructured{sparsity=0.5 scores=magnitude|activation scope=layer|global}

Each site's weight (`sites.py`: constant float weights read by that layer alone; the final
projection stays dense unless `prune-output-layer=true`) gets a per-element score, `magnitude`
(|w|) or `activation` (Wanda, |w| * ||x_j||, from one pass over the calibration data), and the
lowest scores are set to zero:

- `scope=layer`: in every layer exactly `floor(sparsity * size)` weights are zero-masked (ties
  broken by position, `importance.select_per_layer`), so each layer reaches the asked sparsity
  (weights already zero rank lowest and count towards it).
- `scope=global`: one ranking over all layers, each layer's scores divided by their mean
  (`importance.select_global`), `floor(sparsity * total)` dropped overall; no layer goes beyond
  `max-layer-sparsity` (default 0.95), so no layer is emptied.

The masked weight is a new initializer (`sites.replace_weight`): kept weights are bit for bit
the old ones, and nothing else reading the old array can see a change. The graph keeps the
weights dense; the report (`storage.py`) gives each layer's sparsity and the model's weight bytes
dense and stored sparse (bitmask or CSR, whichever is smaller per layer).

The pass is lossy by design (`exact = False`): the outputs change by what the dropped weights
contributed. Its tests hold it to a cosine floor on the zoo models. Run it after O2 (fused
MatMul/Gemm weights are the same constants, so order matters little) and before quantization
(a quantized weight is integer and no longer a site).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from graphopt.ir.core import Model
from graphopt.ir.errors import GraphoptError
from graphopt.passes.manager import ModelPass, PassContext, register_pass
from graphopt.passes.pruning.importance import select_global, select_per_layer
from graphopt.passes.pruning.sites import Scores, layer_sites, replace_weight, site_scores
from graphopt.passes.pruning.storage import pruning_report, unstructured_bytes

__all__ = ["PruneUnstructured", "PruningOptionError", "check_scores", "nothing_to_prune"]


class PruningOptionError(GraphoptError, ValueError):
    """A pruning option out of range. A ValueError too, so a pipeline string points at it."""


@register_pass(
    "prune-unstructured",
    "zero the lowest-scoring MatMul/Gemm/Conv weights (magnitude or activation-aware, per "
    "layer or global)",
)
@dataclass
class PruneUnstructured(ModelPass):
    exact: ClassVar[bool] = False

    sparsity: float = 0.5
    scores: Scores = "magnitude"
    scope: Literal["layer", "global"] = "layer"
    min_elements: int = 0
    max_layer_sparsity: float = 0.95
    exclude: tuple[str, ...] = ()
    prune_output_layer: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise PruningOptionError(
                f"sparsity must be in [0, 1), got {self.sparsity}",
                hint="sparsity is the fraction of weights set to zero, e.g. sparsity=0.5",
            )
        if not 0.0 <= self.max_layer_sparsity < 1.0:
            raise PruningOptionError(
                f"max-layer-sparsity must be in [0, 1), got {self.max_layer_sparsity}"
            )
        check_scores(self.scores)
        if self.scope not in ("layer", "global"):
            raise PruningOptionError(f"scope must be layer or global, not {self.scope}")

    def run(self, model: Model, context: PassContext) -> bool:
        graph = model.graph
        sites = layer_sites(self, graph, context)
        if not sites:
            raise nothing_to_prune(model, context)
        if self.sparsity == 0.0:
            return False
        all_scores = site_scores(model, sites, self.scores, context)
        scored = [(s, sc) for s, sc in zip(sites, all_scores, strict=True) if sc is not None]
        if not scored:
            return False
        if self.scope == "layer":
            drops = [select_per_layer(scores, self.sparsity) for _, scores in scored]
        else:
            layers = {str(i): scores for i, (_, scores) in enumerate(scored)}
            keep = {str(i): math.ceil((1 - self.max_layer_sparsity) * s.size)
                    for i, (_, s) in enumerate(scored)}  # fmt: skip
            chosen = select_global(layers, self.sparsity, keep)
            drops = [chosen[str(i)] for i in range(len(scored))]
        report = pruning_report(context)
        changed = zeros = elements = 0
        for (site, _), drop in zip(scored, drops, strict=True):
            keep_mask = np.ones(site.array.size, dtype=bool)
            keep_mask[drop] = False
            changed += replace_weight(graph, site, keep_mask.reshape(site.array.shape))
            report.add(self.name, site.name, site.array, *unstructured_bytes(site.array))
            zeros += site.array.size - int(np.count_nonzero(site.array))
            elements += site.array.size
        report.finish(model)
        context.note(
            f"pruned {len(scored)} layers to {zeros / elements:.1%} sparsity ({self.scores} "
            f"scores, {self.scope} scope); weights {report.model_dense_bytes:,} bytes dense, "
            f"{report.model_sparse_bytes:,} stored sparse (bitmask or CSR per layer)"
        )
        return changed > 0


def check_scores(scores: str) -> None:
    """The masking passes' `scores` option: magnitude or activation."""
    if scores not in ("magnitude", "activation"):
        raise PruningOptionError(f"scores must be magnitude or activation, not {scores}")


def nothing_to_prune(model: Model, context: PassContext) -> GraphoptError:
    """The error a masking pass raises when the model has no layer it may prune."""
    refused = [
        n for n in context.notes if n.kind == "refused" and n.pass_name == context.current_pass
    ]
    reasons = "; ".join(f"{n.node}: {n.message}" for n in refused[:3])
    return GraphoptError(
        "the model has no prunable layer: no MatMul/Gemm/Conv of the main graph has a constant "
        "float weight read by it alone",
        where=f"graph '{model.graph.name}'",
        hint=reasons
        or "pruning needs constant weights (run O1 first to fold weights computed from constants)",
    )
