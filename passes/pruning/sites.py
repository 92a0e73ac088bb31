"""Which layers the weight-masking passes (prune-unstructured, prune-n-m) prune, their scores, and
how a pruned weight replaces the old one.

A *site* is a MatMul, Gemm or Conv of the main graph whose weight (input 1) is a float constant
read by that node alone. For each it records the weight's *input axis* (the reduction axis: the
one the layer sums over, where N:M groups run and Wanda's input norms apply) and the channel axis
of its activation input (where those norms are measured):

| op | weight | input axis | activation `x` | channel axis of `x` |
| --- | --- | --- | --- | --- |
| MatMul | W [..., K, N] | -2 (K) | [..., K] | -1 |
| Gemm | B [K, N], or [N, K] with transB=1 | 0, or 1 | A [M, K], or [K, M] with transA=1 | 1, or 0 |
| Conv | W [M, C/group, k...] | 1 (C) | [N, C, ...] | 1 |

`find_sites` applies the user's choices, each refusal a note naming the node: `exclude` (node
names); the final projection (the last MatMul/Gemm before each graph output, e.g. an LM head:
`quantization.sites.output_layers`) stays dense unless asked; weights with fewer than
`min_elements` elements; and a weight read by any other node (a tied embedding, a weight shared by
two layers) is left alone and named: pruning it here would change the other readers too.

`site_scores` gives each site's per-element scores: `magnitude` (|w|), or `activation` (Wanda,
|w| * ||x_j||), whose input norms come from one pass over the run's calibration data
(`activations.input_norms`); without data it is a GraphoptError saying how to give some.

`replace_weight` writes the masked weight as a new initializer (the old array is never written
to: it may be a read-only memory map, and nothing else may see the change) and drops the old one.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from graphopt.ir.core import RETURN_OP, Graph, Model, Node, Value
from graphopt.ir.errors import GraphoptError
from graphopt.ir.types import TensorType
from graphopt.passes.manager import PassContext
from graphopt.passes.pruning.importance import activation_aware, magnitude
from graphopt.passes.quantization.sites import drop_initializer, output_layers

__all__ = [
    "SITE_OPS", "PruneSite", "Scores", "find_sites", "layer_sites", "replace_weight", "site_scores",
]  # fmt: skip

SITE_OPS = ("MatMul", "Gemm", "Conv")
Scores = Literal["magnitude", "activation"]


@dataclass
class PruneSite:
    """A layer whose constant float weight (input 1) may be masked."""

    node: Node
    weight: Value
    array: np.ndarray
    input_axis: int  # the reduction axis of `array` (non-negative)
    x: Value  # the activation input
    x_axis: int  # the channel axis of `x` (may be negative: -1 for MatMul)
    group: int = 1  # Conv groups

    @property
    def name(self) -> str:
        return self.node.name or self.node.describe()

    @property
    def inputs(self) -> int:
        """How many input features the activation has (the weight's input axis times groups)."""
        return int(self.array.shape[self.input_axis]) * self.group


def _axes(node: Node, array: np.ndarray) -> tuple[int, int, int]:
    """(input axis of the weight, channel axis of x, group) for a site's op."""
    if node.op == "Conv":
        return 1, 1, int(node.get_attr("group", 1))
    if node.op == "Gemm":
        return (1 if int(node.get_attr("transB", 0)) else 0), (0 if int(node.get_attr("transA", 0)) else 1), 1  # fmt: skip
    return array.ndim - 2, -1, 1


def layer_sites(options: Any, graph: Graph, context: PassContext) -> list[PruneSite]:
    """`find_sites` with a masking pass's own options (`exclude`, `min_elements`,
    `prune_output_layer`)."""
    return find_sites(
        graph, context, exclude=options.exclude, min_elements=options.min_elements,
        output_layer=options.prune_output_layer,
    )  # fmt: skip


def find_sites(
    graph: Graph,
    context: PassContext,
    *,
    exclude: Collection[str] = (),
    min_elements: int = 0,
    output_layer: bool = False,
) -> list[PruneSite]:
    """The layers of `graph` to prune, in graph order; refusals become notes."""
    last = set() if output_layer else output_layers(graph)
    sites = []
    for node in graph:
        if node.op not in SITE_OPS or len(node.inputs) < 2 or node.inputs[0] is None:
            continue
        x, weight = node.inputs[0], node.inputs[1]
        if weight is None or not weight.is_constant or weight.const_value is None:
            continue  # activations on both sides (attention's products) or a computed weight
        if x.is_constant:
            continue  # constant on both sides: folding's business, not pruning's
        array = np.asarray(weight.const_value)
        if array.dtype.kind != "f" or not (
            isinstance(x.type, TensorType) and x.type.dtype.is_float
        ):
            continue  # integer layers (already quantized) are not pruned here
        reason = _refusal(node, weight, array, exclude, min_elements, node in last)
        if reason:
            context.refuse(node, reason)
            continue
        input_axis, x_axis, group = _axes(node, array)
        sites.append(PruneSite(node, weight, array, input_axis, x, x_axis, group))
    return sites


def _refusal(
    node: Node,
    weight: Value,
    array: np.ndarray,
    exclude: Collection[str],
    min_elements: int,
    is_last: bool,
) -> str:
    if node.name in exclude:
        return "excluded by the exclude option"
    if is_last:
        return ("the final projection before a graph output stays dense "
                "(prune-output-layer=true prunes it)")  # fmt: skip
    if node.op == "MatMul" and array.ndim < 2:
        return f"its weight is {array.ndim}-D: no reduction axis to prune along"
    if len(weight.uses) != 1:
        readers = [
            "the graph outputs" if n.op == RETURN_OP else n.describe()
            for n in weight.users()
            if n is not node
        ]
        who = ", ".join(readers) or "another input of this node"
        return (f"its weight %{weight.name} is also read by {who}: left dense, since masking "
                "it would change the other readers")  # fmt: skip
    if array.size < min_elements:
        return f"its weight has {array.size} elements, fewer than min-elements={min_elements}"
    return ""


def site_scores(
    model: Model, sites: list[PruneSite], scores: Scores, context: PassContext
) -> list[np.ndarray | None]:
    """Per-element scores (float64, each site's weight shape) in `sites` order: `magnitude`
    (|w|) or `activation` (Wanda: |w| * ||x_j||, one pass over `context.calibration`). None for a
    site whose activation norms do not match its weight (refused with a note)."""
    if scores == "magnitude":
        return [magnitude(site.array) for site in sites]
    if scores != "activation":
        raise GraphoptError(f"scores must be magnitude or activation, not {scores!r}")
    if not sites:
        return []
    norms = _input_norms(model, sites, context)
    result: list[np.ndarray | None] = []
    for site in sites:
        norm = norms.get((site.x.name or "", site.x_axis))
        if norm is None or norm.shape != (site.inputs,):
            got = "none" if norm is None else f"{norm.shape[0]}"
            context.refuse(site.node, f"its input has {got} channels on axis {site.x_axis}, "
                           f"its weight expects {site.inputs}: no activation-aware scores")  # fmt: skip
            result.append(None)
            continue
        result.append(activation_aware(site.array, _per_weight(site, norm), site.input_axis))
    return result


def _input_norms(
    model: Model, sites: list[PruneSite], context: PassContext
) -> dict[tuple[str, int], np.ndarray]:
    """Input norms of every site, by (value name, channel axis); one pass over the data."""
    from graphopt.passes.pruning.activations import input_norms

    data = require_calibration(context)
    requests: dict[str, int] = {}
    conflicts: list[PruneSite] = []
    for site in sites:
        name = site.x.name or ""
        if requests.setdefault(name, site.x_axis) != site.x_axis:
            conflicts.append(site)  # two layers reading one value along different axes: rare
    norms = input_norms(model, data, requests)
    found = {(name, requests[name]): norm for name, norm in norms.items()}
    for site in conflicts:  # measured along the other axis: compute them separately
        extra = input_norms(model, data, {site.x.name or "": site.x_axis})
        found.update(((k, site.x_axis), v) for k, v in extra.items())
    return found


def require_calibration(context: PassContext) -> Any:
    """The run's calibration data, or a GraphoptError saying how to give it."""
    if context.calibration is None:
        raise GraphoptError(
            "scores=activation needs calibration data and none was given",
            hint="pass --calibration calib.npz (one array per input, samples on axis 0) or "
            "--calibration random:N; from Python, graphopt.optimize(model, passes, "
            "calibration=feeds); or use scores=magnitude, which needs no data",
        )
    return context.calibration


def _per_weight(site: PruneSite, norm: np.ndarray) -> np.ndarray:
    """The input norms laid out for `activation_aware`: 1-D along the input axis, or for a
    grouped Conv W [M, C/g, k...] one norm per (output, input) pair: output m reads input
    channel (m // (M/g)) * (C/g) + c."""
    if site.group == 1:
        return norm
    out, per_group = site.array.shape[0], site.array.shape[1]
    group_of = np.arange(out) // (out // site.group)
    table = norm.reshape(site.group, per_group)[group_of]  # [M, C/g]
    return table.reshape(out, per_group, *([1] * (site.array.ndim - 2)))


def replace_weight(graph: Graph, site: PruneSite, keep: np.ndarray) -> bool:
    """Give the site a new initializer holding its weight with the entries where `keep` is False
    set to zero (kept entries bit for bit as they were); False when the mask changes nothing."""
    masked = np.where(keep, site.array, np.zeros((), site.array.dtype))
    if np.array_equal(masked, site.array):
        return False
    name = site.weight.name or "w"
    new = graph.add_initializer(graph.scope.fresh(f"{name}_pruned"), masked)
    new.type = site.weight.type
    site.node.set_input(1, new)
    drop_initializer(graph, site.weight)
    site.weight, site.array = new, masked
    return True
