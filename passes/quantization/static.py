"""quantize-static: int8 quantization of MatMul, Gemm and Conv with calibrated activation ranges,
written in ONNX Runtime's QDQ format (standard QuantizeLinear/DequantizeLinear pairs).

For each site (`sites.py`: a MatMul/Gemm/Conv with a constant float weight):

    y = Conv(x, W, b)   ->   y = Conv(DQ(Q(x, s_x, zp_x)), DQ(W_q, s_w), b)

- the weight is quantized offline to int8 symmetric codes, per channel along the output-channel
  axis (`per-channel=true`, opset 13) or per tensor, and stored as int8 behind a DequantizeLinear;
- the activation x gets a QuantizeLinear -> DequantizeLinear pair whose scale and zero point come
  from x's range over the calibration data: uint8 asymmetric by default, int8 symmetric with
  `symmetric-activations=true`. Activations read by several sites share one pair;
- a Gemm's constant bias becomes int32 codes (scale s_x * s_w, per channel when the weight is,
  zero point 0) behind a DequantizeLinear, and the weight's DequantizeLinear carries its zero
  point explicitly: that is what ONNX Runtime needs to fuse the Gemm into its int8 QGemm, with a
  float or a quantized output (`bias.py` has the measurements). With a float bias, or without
  the weight's zero point input, ONNX Runtime 1.32 leaves the Gemm float and dequantizes the
  weight at every run: after O2 every transformer projection is a Gemm, and GPT-2 base ran
  1.8x slower than fp32. A MatMul without bias fuses into MatMulIntegerToFloat as it is; a
  Conv's bias stays float (ONNX Runtime quantizes it itself when it fuses QLinearConv).

Pure data movement stays in the quantized domain where ONNX Runtime fuses it: when x is the output
of Reshape, Transpose, Flatten, MaxPool, Squeeze or Unsqueeze (read by nothing else), the pair
moves to that op's input and the op's output is re-quantized with the same parameters
(`DQ -> MaxPool -> Q -> DQ -> Conv`, ONNX Runtime's shape for an int8 MaxPool). Those ops
commute with a monotone per-tensor quantizer, so the re-quantization is exact and the chain is
calibrated once, at its float input. No DequantizeLinear is ever followed by a QuantizeLinear of
the same parameters: an input already produced by a DequantizeLinear is left as it is.

Add and Concat stay in the quantized domain too (`quantize-add-concat=true`, the default) where
their output reaches a site (or another such Add/Concat) through Relu and the ops above: an Add of
two float activations gets a pair on each input and one on its output, so that ONNX Runtime's QDQ
transformer fuses `DQ, DQ -> Add -> Q` into QLinearAdd, and the Conv before it, whose output is
now quantized, into QLinearConv. A Relu that is the Add's only reader is folded into the Add's
QuantizeLinear: with uint8 activations its range [0, max] gives zero point 0 = qmin, and
Q(x, s, qmin) = Q(Relu(x), s, qmin) for every x (the quantizer already clamps at 0), so the pair
takes the Relu's range and its readers and the Relu goes (int8 symmetric activations keep it).
A Concat's inputs share its output's scale and zero point (QLinearConcat); that is exact, since
quantizing each part with the parameters of the whole commutes with concatenation. An input
already produced by a DequantizeLinear keeps its own parameters; a graph output keeps its float
value. The extra tensors are calibrated in the same single pass as the rest.

Why on by default (measured, bench/quantization.py, ONNX Runtime 1.32, 2 threads, AMD EPYC with
AVX2 and no VNNI, shared machine): on ResNet-18 (zoo base) it turns ONNX Runtime's graph from 8
QLinearConv + 12 float Convs into 19 QLinearConv + 7 QLinearAdd, and latency from 1.09-1.40x to
0.93-1.00x the fp32 model (two runs; ONNX Runtime's own quantize_static: 0.80-0.91x), for a
cosine against fp32 of 0.99995 instead of 0.99999 (ONNX Runtime's tool: 0.99982); on the tiny
ResNet latency is unchanged (noise) and the cosine 0.998. The transformers are unchanged: their Adds feed normalizations,
not sites. Part of the accuracy lost is ONNX Runtime's, not the scheme's: its uint8 x int8
kernels on x86 CPUs without VNNI add pairs of products in saturating 16-bit lanes, and more
layers run in them with this on (with 7-bit weight codes the fused outputs match the reference
interpreter's exactly).

Everything else stays float: Softmax, normalizations, attention, element-wise ops, and the final
projection (the last MatMul/Gemm before each graph output) unless `quantize-output-layer=true`.
`exclude` lists node names to keep float; `max-accuracy-drop=X` keeps the layers that hurt the
outputs most float until the model is within X of the float one on the calibration data
(`mixed_precision.py`). Each quantized layer is recorded for the quantization report
(`quant_report.py`), and the pass warns when the CPU lacks fast int8 (`driver.py`).

Calibration data is the run's `context.calibration` (`graphopt.optimize(..., calibration=feeds)`,
`--calibration` on the command line); the ranges of exactly the tensors to quantize are observed
in one pass over it (`calibration.calibrate`, `calibration=minmax|percentile|entropy|mse`). With
nothing to quantize the pass needs no data; with something to quantize and no data it raises.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from graphopt.ir.core import Graph, Model, Node, Value
from graphopt.ir.errors import GraphoptError
from graphopt.ir.types import DType, TensorType
from graphopt.passes.manager import ModelPass, PassContext, register_pass
from graphopt.passes.quantization.bias import quantize_gemm_bias
from graphopt.passes.quantization.driver import run_quantization
from graphopt.passes.quantization.mixed_precision import check_budget
from graphopt.passes.quantization.quant_report import qdq_layer, record_layer
from graphopt.passes.quantization.scheme import QuantScheme, compute_params
from graphopt.passes.quantization.sites import Site, dequantize_weight, find_sites

__all__ = ["QuantizeStatic", "require_calibration"]

# ops that move or select values without computing new ones: quantized in, quantized out
TRANSPARENT = ("Reshape", "Transpose", "Flatten", "MaxPool", "Squeeze", "Unsqueeze")

Use = tuple[Node, int]
Pair = tuple[Value, Value]  # the value quantized, the value whose range sets the parameters


def require_calibration(context: PassContext) -> Any:
    """The run's calibration data, or a GraphoptError saying how to give it."""
    if context.calibration is None:
        raise GraphoptError(
            "needs calibration data and none was given",
            hint="pass --calibration calib.npz (one array per input, samples on axis 0) or "
            "--calibration random:N; from Python, graphopt.optimize(model, passes, "
            "calibration=feeds)",
        )
    return context.calibration


@register_pass(
    "quantize-static",
    "int8 QDQ quantization of MatMul/Gemm/Conv with activation ranges from calibration data",
)
@dataclass
class QuantizeStatic(ModelPass):
    per_channel: bool = True
    symmetric_activations: bool = False
    calibration: Literal["minmax", "percentile", "entropy", "mse"] = "minmax"
    percentile: float = 99.99
    exclude: tuple[str, ...] = ()
    quantize_output_layer: bool = False
    min_elements: int = 128
    quantize_add_concat: bool = True
    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], not {self.percentile}")
        if self.max_accuracy_drop is not None:
            check_budget(self.max_accuracy_drop)

    @property
    def activation_scheme(self) -> QuantScheme:
        if self.symmetric_activations:
            return QuantScheme("int8", symmetric=True)
        return QuantScheme("uint8", symmetric=False)

    def run(self, model: Model, context: PassContext) -> bool:
        return run_quantization(self, model, context, int8_compute=True)

    def quantize(self, model: Model, context: PassContext) -> bool:
        needed = 13 if self.per_channel else 10
        if model.opset < needed:
            context.note(
                f"QuantizeLinear/DequantizeLinear {'per channel ' if self.per_channel else ''}"
                f"need opset {needed}, the model imports {model.opset}: run upgrade-opset first",
                kind="refused",
            )
            return False
        graph = model.graph
        sites = find_sites(
            graph, context, exclude=self.exclude, min_elements=self.min_elements,
            output_layer=self.quantize_output_layer,
        )  # fmt: skip
        if not sites:
            return False
        data = require_calibration(context)
        domain = _domain_nodes(graph, sites) if self.quantize_add_concat else []
        pairs, folded = _plan(graph, sites, domain, fold_relu=not self.symmetric_activations)
        ranges = self.calibrate(model, data, sorted({s.name or "" for _, s in pairs}))
        params: dict[Value, tuple[Value, Value]] = {}  # one scale and zero point per range
        for (value, source), value_uses in pairs.items():
            if source not in params:
                params[source] = self.params(graph, source, ranges[source.name or ""])
            _insert_pair(graph, value, value_uses, params[source], self.activation_scheme)
        for relu in folded:  # its uses read the DequantizeLinear of the Add now
            graph.remove(relu)
        int32_biases = 0
        for site in sites:
            weight = dequantize_weight(graph, site, self.per_channel)
            if site.node.op == "Gemm" and weight.producer is not None:
                scale = weight.producer.inputs[1]
                assert scale is not None and scale.const_value is not None
                reason = quantize_gemm_bias(graph, site.node, np.asarray(scale.const_value))
                int32_biases += not reason
                if reason and reason != "no bias":
                    context.note(f"bias stays float ({reason}): ONNX Runtime runs this Gemm in "
                                 "float", node=site.node)  # fmt: skip
            record_layer(context, qdq_layer(site.node, "static"))
        label = getattr(data, "label", "the calibration data")
        kind = "warning" if getattr(data, "is_random", False) else "info"
        context.note(
            f"quantized {len(sites)} nodes ({len(pairs)} activation pairs"
            f"{f', {len(domain)} Add/Concat kept quantized' if domain else ''}"
            f"{f', {int32_biases} Gemm biases int32' if int32_biases else ''}, {self.calibration} "
            f"ranges from {label})", kind=kind,
        )  # fmt: skip
        return True

    def calibrate(
        self, model: Model, data: Any, names: list[str]
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        from graphopt.passes.quantization.calibration import calibrate

        options: dict[str, Any] = {}
        if self.calibration == "percentile":
            options["percentile"] = self.percentile
        shown = sys.stderr.isatty()  # a person waits at a terminal: show the bar; logs stay clean
        return calibrate(model, data, names, self.calibration, progress=shown, **options)

    def params(
        self, graph: Graph, value: Value, bounds: tuple[np.ndarray, np.ndarray]
    ) -> tuple[Value, Value]:
        """Scale and zero-point initializers for `value`'s calibrated range."""
        dtype = value.type.dtype.numpy if isinstance(value.type, TensorType) else np.float32
        lo, hi = (np.nan_to_num(np.asarray(b, np.float64)) for b in bounds)
        scale, zero = compute_params(lo, hi, self.activation_scheme, dtype)
        name = value.name or "x"
        return (
            graph.add_initializer(graph.scope.fresh(f"{name}_scale"), np.asarray(scale)),
            graph.add_initializer(graph.scope.fresh(f"{name}_zero_point"), np.asarray(zero)),
        )


def _plan(
    graph: Graph, sites: list[Site], domain: list[Node], fold_relu: bool
) -> tuple[dict[Pair, list[Use]], list[Node]]:
    """Which uses read a Q/DQ pair of which value, keyed by (value, the value whose calibrated
    range sets the pair's parameters: the float input at the bottom of a chain of TRANSPARENT
    ops), and the Relus folded into the pair of the Add before them."""
    pairs: dict[Pair, list[Use]] = {}

    def read(value: Value, use: Use, source: Value) -> None:
        if use[0] is graph.return_node:
            return  # a graph output keeps its float value
        found = pairs.setdefault((value, source), [])
        if use not in found:
            found.append(use)

    entries: list[Use] = [(site.node, 0) for site in sites]
    folded: list[Node] = []
    redirected: dict[Value, Value] = {}  # a folded Relu's output -> the range its pair has
    for node in domain:
        out = node.outputs[0]
        relu = _relu_after(graph, out) if fold_relu and node.op == "Add" else None
        if relu is not None:
            # Q(x, s, zp = qmin) already clamps at 0, so it equals Q(Relu(x), s, zp): the Add's
            # pair takes the Relu's range and the Relu's readers; the Relu goes
            relu_out = relu.outputs[0]
            for use in relu_out.uses:
                read(out, use, relu_out)
            redirected[relu_out] = relu_out
            folded.append(relu)
        else:
            for use in out.uses:
                read(out, use, out)
        if node.op == "Concat":  # inputs share the output's parameters: concat commutes with Q
            for index, x in enumerate(node.inputs):
                if x is None or x in redirected or x.is_constant or _dequantized(x):
                    continue  # a folded Relu's output already reads its Add's pair
                if _is_float(x):
                    read(x, (node, index), out)
        else:
            entries += [(node, 0), (node, 1)]
    for node, index in entries:
        x = node.inputs[index]
        if x is None or x in redirected or _dequantized(x):
            continue
        chain: list[tuple[Value, Use]] = [(x, (node, index))]  # (value, the use it reaches)
        source: Value | None = None
        while True:
            value = chain[-1][0]
            producer = value.producer
            if producer is None or producer.op not in TRANSPARENT or len(value.uses) != 1:
                break
            below = producer.inputs[0]
            if below is not None and below in redirected:
                source = redirected[below]  # the chain continues a folded Add's pair
                break
            if below is None or not _is_float(below) or _dequantized(below):
                break
            chain.append((below, (producer, 0)))
        for value, use in chain:
            read(value, use, source or chain[-1][0])
    return pairs, folded


def _domain_nodes(graph: Graph, sites: list[Site]) -> list[Node]:
    """The Adds of two float activations and the Concats whose output reaches the activation
    input of a site, or of another such node, through Relu and TRANSPARENT ops only."""
    readers: set[Use] = {(site.node, 0) for site in sites}
    found: list[Node] = []
    for node in reversed(list(graph)):
        inputs = [x for x in node.inputs if x is not None]
        if node.op == "Add":
            if len(inputs) != 2 or any(x.is_constant or not _is_float(x) for x in inputs):
                continue
        elif node.op != "Concat" or all(x.is_constant for x in inputs):
            continue
        if not node.outputs or not _is_float(node.outputs[0]):
            continue
        if _reaches(node.outputs[0], readers):
            found.append(node)
            readers.update((node, i) for i in range(len(node.inputs)))
    found.reverse()
    return found


def _reaches(value: Value, readers: set[Use]) -> bool:
    for use in value.uses:
        user, index = use
        if use in readers:
            return True
        if index == 0 and user.op in (*TRANSPARENT, "Relu") and _reaches(user.outputs[0], readers):
            return True
    return False


def _relu_after(graph: Graph, value: Value) -> Node | None:
    """The Relu that is `value`'s only reader, when its output is not a graph output."""
    if len(value.uses) != 1:
        return None
    ((node, index),) = value.uses
    if node.op != "Relu" or index != 0:
        return None
    if any(user is graph.return_node for user, _ in node.outputs[0].uses):
        return None
    return node


def _insert_pair(
    graph: Graph, value: Value, uses: list[Use], params: tuple[Value, Value], scheme: QuantScheme
) -> Node:
    """value -> QuantizeLinear -> DequantizeLinear, read by `uses` instead of `value`."""
    order = {node: i for i, node in enumerate(graph)}
    first = min((node for node, _ in uses), key=order.__getitem__)
    name = value.name or "x"
    shape = value.type.shape if isinstance(value.type, TensorType) else None
    q = Node("QuantizeLinear", [value, *params], name=graph.scope.fresh(f"{name}_q"))
    q.outputs[0].type = TensorType(DType.from_numpy(scheme.numpy_dtype), shape)
    dq = Node("DequantizeLinear", [q.outputs[0], *params], name=graph.scope.fresh(f"{name}_dq"))
    dq.outputs[0].type = value.type
    graph.insert_before(first, q)
    graph.insert_before(first, dq)
    for node, index in uses:
        node.set_input(index, dq.outputs[0])
    return dq


def _is_float(value: Value) -> bool:
    return isinstance(value.type, TensorType) and value.type.dtype.is_float


def _dequantized(value: Value) -> bool:
    return value.producer is not None and value.producer.op == "DequantizeLinear"
