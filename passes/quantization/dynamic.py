"""quantize-dynamic: int8 weights quantized offline, activations quantized at run time.

Each site (`sites.py`: a MatMul, Gemm or Conv with a constant float weight) becomes, in standard
ONNX (every op of it runs in ONNX Runtime and in `onnx.reference`):

    x_q, s_x, zp_x = DynamicQuantizeLinear(x)          # uint8, x's own range, per run
    acc = MatMulInteger(x_q, W_q, zp_x)                 # or ConvInteger (same attributes)
    y = Cast(acc, to=float) * (s_x * s_w) (+ bias)      # s_w per output channel or per tensor

W_q holds the int8 symmetric grid [-127, 127] * s_w, stored by default as uint8 codes with zero
point 128 (the same values, shifted): ONNX Runtime's uint8 x int8 kernels on x86 CPUs without
VNNI add pairs of products in saturating 16-bit lanes and can clip (measured: 27% of the outputs
of a random full-range int8 weight were off), while uint8 x uint8 never does; ConvInteger takes
uint8 weights only anyway. `signed-weights=true` stores int8 codes (zero point 0) for MatMul and
Gemm, for CPUs with VNNI where u8s8 is the faster path. A Gemm's
B is stored as [K, N] (transposed offline under transB), alpha is folded into s_w, and beta * C
is added after the scaling. Activations read by several sites are quantized once.

With `--target onnxruntime`, a MatMul becomes ONNX Runtime's single fused kernel instead,
`com.microsoft.DynamicQuantizeMatMul(x, W_q, s_w)` (`graphopt.ir.ops.contrib_dynamic_quant`).

Why the result is close: the weight moves by at most s_w / 2 per element (`scheme.py`), the
activation by at most s_x / 2 (DynamicQuantizeLinear's range is the tensor's own, so nothing
clips); the integer product is exact, so an output element moves by at most
sum_k (|x_k| s_w / 2 + |w_k| s_x / 2 + s_x s_w / 4).

Refuses a Gemm with transA (MatMulInteger has none), a bias that is not a constant, and an
activation that is not float32 (DynamicQuantizeLinear's only input type); the final projection
stays float unless `quantize-output-layer=true`, as in quantize-static. `max-accuracy-drop=X`
keeps the most harmful layers float (`mixed_precision.py`); each quantized layer is recorded for
the quantization report (`quant_report.py`); the pass warns on a CPU without fast int8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from graphopt.ir.core import Graph, Model, Node, Value
from graphopt.ir.ops.contrib_dynamic_quant import DYNAMIC_QUANTIZE_MATMUL
from graphopt.ir.types import DType, TensorType, Type
from graphopt.passes.manager import ModelPass, PassContext, register_pass
from graphopt.passes.quantization.driver import run_quantization
from graphopt.passes.quantization.mixed_precision import check_budget
from graphopt.passes.quantization.quant_report import record_layer, weight_layer
from graphopt.passes.quantization.scheme import QuantScheme, quantize_tensor
from graphopt.passes.quantization.sites import Site, drop_initializer, find_sites

__all__ = ["QuantizeDynamic"]

Quantized = tuple[Value, Value, Value]  # x_q, scale, zero point


@register_pass(
    "quantize-dynamic",
    "int8 weights offline, activations at run time (MatMulInteger/ConvInteger or "
    "DynamicQuantizeMatMul)",
)
@dataclass
class QuantizeDynamic(ModelPass):
    exact: ClassVar[bool] = False  # lossy: its tests hold it to an accuracy budget

    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    quantize_output_layer: bool = False
    min_elements: int = 128
    signed_weights: bool = False
    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        if self.max_accuracy_drop is not None:
            check_budget(self.max_accuracy_drop)

    def run(self, model: Model, context: PassContext) -> bool:
        return run_quantization(self, model, context, int8_compute=True)

    def quantize(self, model: Model, context: PassContext) -> bool:
        if model.opset < 11:
            context.note(
                f"DynamicQuantizeLinear needs opset 11, the model imports {model.opset}: run "
                "upgrade-opset first", kind="refused",
            )  # fmt: skip
            return False
        graph = model.graph
        sites = find_sites(
            graph, context, exclude=self.exclude, min_elements=self.min_elements,
            output_layer=self.quantize_output_layer,
        )  # fmt: skip
        done: dict[Value, Quantized] = {}
        fused = integer = 0
        for site in sites:
            if not self.check(site, context):
                continue
            if site.node.op == "MatMul" and context.target == "onnxruntime":
                out = self.to_fused(graph, site)
                model.opset_imports.setdefault("com.microsoft", 1)
                fused += 1
            else:
                out = self.to_integer(graph, site, done)
                integer += 1
            axis = site.channel_axis if self.per_channel else None
            scheme = QuantScheme(self.weight_type(site), True, axis=axis)
            record_layer(context, weight_layer(site.node, site.array, scheme, "dynamic", out.name))
        if fused or integer:
            context.note(
                f"quantized {fused + integer} nodes: {integer} to MatMulInteger/ConvInteger, "
                f"{fused} to DynamicQuantizeMatMul"
            )
        return bool(fused or integer)

    def check(self, site: Site, context: PassContext) -> bool:
        node = site.node
        x = node.inputs[0]
        if x is None or not isinstance(x.type, TensorType) or x.type.dtype != DType.FLOAT:
            return context.refuse(node, "DynamicQuantizeLinear takes float32 inputs only")
        if node.op == "Gemm" and int(node.get_attr("transA", 0)):
            return context.refuse(node, "a Gemm with transA=1: MatMulInteger has no transA")
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and not bias.is_constant:
            return context.refuse(node, "its bias is not a constant")
        return True

    def weight(self, site: Site, dtype: str) -> tuple[np.ndarray, np.ndarray, int]:
        """(codes, per-channel scale, channel axis) of the weight; Gemm's B as [K, N] with alpha
        folded into the scale."""
        array, axis = site.array, site.channel_axis
        if site.node.op == "Gemm" and axis == 0:
            array, axis = array.T, 1
        scheme = QuantScheme(dtype, True, axis=axis if self.per_channel else None)
        t = quantize_tensor(array, scheme)
        scale = np.asarray(t.scale, np.float32)
        if site.node.op == "Gemm":
            scale = np.asarray(scale * np.float32(site.node.get_attr("alpha", 1.0)), np.float32)
        return t.values, scale, axis

    def weight_type(self, site: Site) -> str:
        return "int8" if self.signed_weights and site.node.op != "Conv" else "uint8"

    def to_fused(self, graph: Graph, site: Site) -> Value:
        codes, scale, _ = self.weight(site, self.weight_type(site))
        node, name = site.node, site.weight.name or "w"
        inputs = [
            node.inputs[0],
            graph.add_initializer(graph.scope.fresh(f"{name}_quantized"), codes),
            graph.add_initializer(graph.scope.fresh(f"{name}_scale"), scale),
        ]
        if codes.dtype == np.uint8:
            zero = np.full(scale.shape, 128, np.uint8)
            inputs.append(graph.add_initializer(graph.scope.fresh(f"{name}_zero_point"), zero))
        out = _emit(graph, node, DYNAMIC_QUANTIZE_MATMUL, inputs, node.outputs[0].type)
        _replace(graph, site, out)
        return out

    def to_integer(self, graph: Graph, site: Site, done: dict[Value, Quantized]) -> Value:
        node, name = site.node, site.weight.name or "w"
        conv = node.op == "Conv"
        codes, scale, _ = self.weight(site, self.weight_type(site))
        x = node.inputs[0]
        assert x is not None
        x_q, x_scale, x_zero = done.get(x) or _dynamic_quantize(graph, x)
        done[x] = (x_q, x_scale, x_zero)
        w_q = graph.add_initializer(graph.scope.fresh(f"{name}_quantized"), codes)
        inputs: list[Value | None] = [x_q, w_q, x_zero]
        if codes.dtype == np.uint8:  # ConvInteger takes the weight's zero point as a scalar
            zero = np.full(() if conv else scale.shape, 128, np.uint8)
            inputs.append(graph.add_initializer(graph.scope.fresh(f"{name}_zero_point"), zero))
        attrs: dict[str, Any] = {}
        if conv:
            attrs = {k: v.value for k, v in node.attrs.items()}
            scale = scale.reshape(-1, *([1] * (codes.ndim - 2)))  # [M, 1, ...] against [N, M, ...]
        out_type = node.outputs[0].type
        shape = out_type.shape if isinstance(out_type, TensorType) else None
        op = "ConvInteger" if conv else "MatMulInteger"
        acc = _emit(graph, node, op, inputs, TensorType(DType.INT32, shape), **attrs)
        as_float = _emit(graph, node, "Cast", [acc], out_type, to=int(DType.FLOAT))
        w_scale = graph.add_initializer(graph.scope.fresh(f"{name}_scale"), scale)
        both = _emit(graph, node, "Mul", [x_scale, w_scale], TensorType(DType.FLOAT, scale.shape))
        y = _emit(graph, node, "Mul", [as_float, both], out_type)
        bias = self.bias(site, codes.ndim)
        if bias is not None:
            b = graph.add_initializer(graph.scope.fresh(f"{name}_bias"), bias)
            y = _emit(graph, node, "Add", [y, b], out_type)
        _replace(graph, site, y)
        return y

    def bias(self, site: Site, rank: int) -> np.ndarray | None:
        """The constant added after the scaling: Gemm's beta * C, Conv's B as [M, 1, ...]."""
        node = site.node
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is None or c.const_value is None:
            return None
        array = np.asarray(c.const_value, np.float32)
        if node.op == "Gemm":
            return (array * np.float32(node.get_attr("beta", 1.0))).astype(np.float32)
        return array.reshape(-1, *([1] * (rank - 2)))


def _dynamic_quantize(graph: Graph, x: Value) -> Quantized:
    """DynamicQuantizeLinear(x), right after x's definition (before every node reading x)."""
    node = Node("DynamicQuantizeLinear", [x], outputs=3, name=graph.scope.fresh(f"{x.name}_dq"))
    shape = x.type.shape if isinstance(x.type, TensorType) else None
    node.outputs[0].type = TensorType(DType.UINT8, shape)
    node.outputs[1].type = TensorType(DType.FLOAT, ())
    node.outputs[2].type = TensorType(DType.UINT8, ())
    producer = x.producer
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, node)
    else:
        graph.insert_before(next(iter(graph)), node)
    return node.outputs[0], node.outputs[1], node.outputs[2]


def _emit(graph: Graph, before: Node, op: str, inputs: list[Any], type_: Type | None,
          **attrs: Any) -> Value:  # fmt: skip
    node = Node(op, inputs, attrs, name=graph.scope.fresh(f"{before.name or 'q'}_{op.lower()}"))
    node.outputs[0].type = type_
    graph.insert_before(before, node)
    return node.outputs[0]


def _replace(graph: Graph, site: Site, out: Value) -> None:
    """Make `out` stand for the site's output and remove the site with its float constants."""
    site.node.outputs[0].replace_all_uses_with(out)
    old = [v for v in site.node.inputs if v is not None and v.is_constant]
    graph.remove(site.node)
    for value in old:
        drop_initializer(graph, value)
