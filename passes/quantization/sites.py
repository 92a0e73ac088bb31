"""Which nodes the int8 passes (quantize-static, quantize-dynamic) rewrite, and their weights.

A *site* is a MatMul, Gemm or Conv of the main graph whose second input is a float constant
weight read by that node alone. Its weight's output-channel axis is where per-channel scales go:
Conv W [M, C/group, k...] axis 0, MatMul W [K, N] axis 1, Gemm B [K, N] axis 1 or, with
transB=1, [N, K] axis 0.

`find_sites` also applies the user's choices, each refusal a note naming the node: `exclude`
(node names), the final projection (the last MatMul/Gemm before each graph output, in
topological order: its errors reach the outputs unaveraged, so it stays float unless asked),
weights with fewer than `min_elements` elements (not worth a quantize pair; this also keeps the
passes off the small weights of the equivalence harness's random graphs), non-float weights,
weights other nodes read too (the float copy would stay), and MatMul weights that are not 2-D.

`dequantize_weight` replaces a site's weight by `DequantizeLinear(int8 codes, scale, zero point)`
computed offline (int8 symmetric: `scheme.py` does the math). The zero point (all 0) is written
although it is ONNX's default: ONNX Runtime fuses a QDQ Gemm into QGemm only when the weight's
DequantizeLinear has its zero point input (measured in 1.32; MatMul and Conv fuse either way).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from graphopt.ir.core import Graph, Node, Value
from graphopt.ir.types import TensorType
from graphopt.passes.manager import PassContext
from graphopt.passes.quantization.scheme import QuantizedTensor, QuantScheme, quantize_tensor

__all__ = ["SITE_OPS", "Site", "dequantize_weight", "drop_initializer", "find_sites"]

SITE_OPS = ("MatMul", "Gemm", "Conv")


@dataclass
class Site:
    """A node whose constant float weight (input 1) can be quantized."""

    node: Node
    weight: Value
    array: np.ndarray
    channel_axis: int  # the output-channel axis of `array`

    def quantized(self, per_channel: bool) -> QuantizedTensor:
        """The weight as int8 symmetric codes, per channel or per tensor."""
        axis = self.channel_axis if per_channel else None
        return quantize_tensor(self.array, QuantScheme("int8", True, axis=axis))


def channel_axis(node: Node) -> int:
    if node.op == "Conv":
        return 0
    if node.op == "Gemm":
        return 0 if int(node.get_attr("transB", 0)) else 1
    return 1


def output_layers(graph: Graph) -> set[Node]:
    """For each graph output, the last MatMul/Gemm (in topological order) among its ancestors."""
    order = {node: i for i, node in enumerate(graph)}
    found: set[Node] = set()
    for output in graph.outputs:
        seen: set[Node] = set()
        stack = [output.producer] if output.producer is not None else []
        last: Node | None = None
        while stack:
            node = stack.pop()
            if node in seen or node not in order:
                continue
            seen.add(node)
            if node.op in ("MatMul", "Gemm") and (last is None or order[node] > order[last]):
                last = node
            stack += [v.producer for v in node.inputs if v is not None and v.producer is not None]
        if last is not None:
            found.add(last)
    return found


def find_sites(
    graph: Graph,
    context: PassContext,
    *,
    ops: Collection[str] = SITE_OPS,
    exclude: Collection[str] = (),
    min_elements: int = 0,
    output_layer: bool = False,
) -> list[Site]:
    """The nodes of `graph` to quantize, in order; refusals become notes."""
    last = set() if output_layer else output_layers(graph)
    sites = []
    for node in graph:
        if node.op not in ops or len(node.inputs) < 2 or node.inputs[0] is None:
            continue
        weight = node.inputs[1]
        if weight is None or not weight.is_constant or weight.const_value is None:
            continue  # activations on both sides (attention's products) or already quantized
        x = node.inputs[0].type
        if np.asarray(weight.const_value).dtype.kind == "f" and not (
            isinstance(x, TensorType) and x.dtype.is_float
        ):
            continue
        reason = _refusal(node, weight, exclude, min_elements, node in last)
        if reason:
            context.refuse(node, reason)
            continue
        array = np.asarray(weight.const_value)
        sites.append(Site(node, weight, array, channel_axis(node)))
    return sites


def _refusal(
    node: Node, weight: Value, exclude: Collection[str], min_elements: int, is_last: bool
) -> str:
    array = np.asarray(weight.const_value)
    if node.name in exclude:
        return "excluded by the exclude option"
    if array.dtype.kind != "f":
        return f"its weight is {array.dtype}, not float"
    if is_last:
        return ("the final projection before a graph output stays float "
                "(quantize-output-layer=true quantizes it)")  # fmt: skip
    if node.op == "MatMul" and array.ndim != 2:
        return f"its weight is {array.ndim}-D, not 2-D"
    if len(weight.uses) != 1:
        return (f"its weight %{weight.name} is read by {len(weight.uses)} nodes: quantizing it "
                "here would keep a float copy")  # fmt: skip
    if array.size < min_elements:
        return f"its weight has {array.size} elements, fewer than min-elements={min_elements}"
    return ""


def dequantize_weight(graph: Graph, site: Site, per_channel: bool) -> Value:
    """Put `DequantizeLinear(int8 codes, scale, zero point[, axis])` in front of the site for its
    weight."""
    t = site.quantized(per_channel)
    name = site.weight.name or "w"
    codes = graph.add_initializer(graph.scope.fresh(f"{name}_quantized"), t.values)
    scale = graph.add_initializer(graph.scope.fresh(f"{name}_scale"), t.scale)
    zero = graph.add_initializer(graph.scope.fresh(f"{name}_zero_point"), t.zero_point)
    attrs = {"axis": site.channel_axis} if per_channel else {}
    dq = Node("DequantizeLinear", [codes, scale, zero], attrs, name=graph.scope.fresh(f"{name}_dq"))
    dq.outputs[0].type = site.weight.type
    graph.insert_before(site.node, dq)
    site.node.set_input(1, dq.outputs[0])
    drop_initializer(graph, site.weight)
    return dq.outputs[0]


def drop_initializer(graph: Graph, value: Value) -> None:
    """Remove an initializer nothing reads any more."""
    if not value.is_used and graph.initializers.get(value.name or "") is value:
        graph.remove_initializer(value)
