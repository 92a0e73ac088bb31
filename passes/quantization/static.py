"""quantize-static: int8 quantization of MatMul, Gemm and Conv with calibrated activation ranges,
written in ONNX Runtime's QDQ format (standard QuantizeLinear/DequantizeLinear pairs).

For each site (`sites.py`: a MatMul/Gemm/Conv with a constant float weight):

    y = Conv(x, W, b)   ->   y = Conv(DQ(Q(x, s_x, zp_x)), DQ(W_q, s_w), b)

- the weight is quantized offline to int8 symmetric codes, per channel along the output-channel
  axis (`per-channel=true`, opset 13) or per tensor, and stored as int8 behind a DequantizeLinear;
- the activation x gets a QuantizeLinear -> DequantizeLinear pair whose scale and zero point come
  from x's range over the calibration data: uint8 asymmetric by default, int8 symmetric with
  `symmetric-activations=true`. Activations read by several sites share one pair;
- the bias stays float: ONNX Runtime runs a DQ -> Conv whose output is not quantized as a float
  Conv after dequantizing, so an int32 bias (scale s_x * s_w) would buy nothing here and add a
  rounding error of its own.

Pure data movement stays in the quantized domain where ONNX Runtime fuses it: when x is the output
of Reshape, Transpose, Flatten, MaxPool, Squeeze or Unsqueeze (read by nothing else), the pair
moves to that op's input and the op's output is re-quantized with the same parameters
(`DQ -> MaxPool -> Q -> DQ -> Conv`, ONNX Runtime's shape for an int8 MaxPool). Those ops
commute with a monotone per-tensor quantizer, so the re-quantization is exact and the chain is
calibrated once, at its float input. No DequantizeLinear is ever followed by a QuantizeLinear of
the same parameters: an input already produced by a DequantizeLinear is left as it is.

Everything else stays float: Softmax, normalizations, attention, element-wise ops, and the final
projection (the last MatMul/Gemm before each graph output) unless `quantize-output-layer=true`.
`exclude` lists node names to keep float.

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
from graphopt.passes.quantization.scheme import QuantScheme, compute_params
from graphopt.passes.quantization.sites import Site, dequantize_weight, find_sites

__all__ = ["QuantizeStatic", "require_calibration"]

# ops that move or select values without computing new ones: quantized in, quantized out
TRANSPARENT = ("Reshape", "Transpose", "Flatten", "MaxPool", "Squeeze", "Unsqueeze")

Use = tuple[Node, int]


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

    def __post_init__(self) -> None:
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], not {self.percentile}")

    @property
    def activation_scheme(self) -> QuantScheme:
        if self.symmetric_activations:
            return QuantScheme("int8", symmetric=True)
        return QuantScheme("uint8", symmetric=False)

    def run(self, model: Model, context: PassContext) -> bool:
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
        uses, source = _plan(sites)
        ranges = self.calibrate(model, data, sorted({v.name or "" for v in source.values()}))
        params: dict[Value, tuple[Value, Value]] = {}  # one scale and zero point per chain
        for value, value_uses in uses.items():
            bottom = source[value]
            if bottom not in params:
                params[bottom] = self.params(graph, bottom, ranges[bottom.name or ""])
            _insert_pair(graph, value, value_uses, params[bottom], self.activation_scheme)
        for site in sites:
            dequantize_weight(graph, site, self.per_channel)
        label = getattr(data, "label", "the calibration data")
        kind = "warning" if getattr(data, "is_random", False) else "info"
        context.note(
            f"quantized {len(sites)} nodes ({len(uses)} activation pairs, {self.calibration} "
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


def _plan(sites: list[Site]) -> tuple[dict[Value, list[Use]], dict[Value, Value]]:
    """Which uses of which values get a Q/DQ pair, and whose range sets each pair's parameters
    (the float input at the bottom of a chain of TRANSPARENT ops)."""
    uses: dict[Value, list[Use]] = {}
    source: dict[Value, Value] = {}
    for site in sites:
        x = site.node.inputs[0]
        if x is None or _dequantized(x):
            continue
        chain: list[tuple[Value, Use]] = [(x, (site.node, 0))]  # (value, the use it reaches)
        while True:
            value = chain[-1][0]
            producer = value.producer
            if producer is None or producer.op not in TRANSPARENT or len(value.uses) != 1:
                break
            below = producer.inputs[0]
            if below is None or not _is_float(below) or _dequantized(below):
                break
            chain.append((below, (producer, 0)))
        for value, use in chain:
            if use not in uses.setdefault(value, []):
                uses[value].append(use)
            source[value] = chain[-1][0]
    return uses, source


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
