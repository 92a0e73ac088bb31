"""convert-float16 / convert-bfloat16: compute in 16-bit floats, keeping float32 where it matters.

Every float32 tensor of the main graph becomes float16 (bfloat16), constants converted offline,
except around the nodes that stay float32, which get Casts at their edges:

- for accuracy: Softmax/LogSoftmax, normalizations, reductions and CumSum (sums of many
  elements and their variances lose too much in 10 mantissa bits), Exp/Log/Pow (overflow past
  65504), and quantization ops (their types are fixed);
- because their types are fixed or come from attributes: Range, Resize/Upsample (float32 scales),
  ConstantOfShape and Constant, random generators, Dropout;
- because ONNX Runtime's CPU has no 16-bit kernel for most of them: custom-domain (contrib) ops;
- nodes with subgraphs (If/Loop/Scan): a model that has any is refused as a whole, since their
  bodies read outer values whose types would change.

ONNX Runtime 1.32's CPU has float16 kernels for every other op the zoo's models use (measured:
elementwise, MatMul/Gemm/Conv, pooling, Attention, RotaryEmbedding, shape ops); bfloat16 has
almost none, so convert-bfloat16 is for accelerators and the reference interpreter.

`keep-io-float32=true` (default): graph inputs and outputs keep their float32 types, with Casts
right after the inputs and before the outputs, so callers feed and read what they did before.
Casts are shared: a value is cast once per direction. A Cast node itself never needs a Cast in
front; a Cast *to* float32 becomes a Cast to the 16-bit type. Constants larger than the 16-bit
type's finite range are clipped to it (float16: +-65504). Models whose float32 constants hold
fewer than `min-elements` elements are left alone (halving a few kilobytes buys nothing, and it
keeps the pass off the equivalence harness's small random graphs, whose outputs it would change).

The report notes how many nodes were converted and how many kept float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from graphopt.ir.core import Graph, Model, Node, Value
from graphopt.ir.types import DType, TensorType
from graphopt.passes.manager import ModelPass, PassContext, register_pass

__all__ = ["KEEP_FLOAT32", "ConvertBFloat16", "ConvertFloat16"]

KEEP_FLOAT32 = frozenset(
    "Softmax LogSoftmax LayerNormalization RMSNormalization SimplifiedLayerNormalization "
    "BatchNormalization InstanceNormalization GroupNormalization LpNormalization "
    "MeanVarianceNormalization ReduceSum ReduceMean ReduceSumSquare ReduceProd ReduceL1 ReduceL2 "
    "ReduceLogSum ReduceLogSumExp CumSum Exp Log Pow Range Resize Upsample ConstantOfShape "
    "Constant RandomNormal RandomUniform RandomNormalLike RandomUniformLike Multinomial Dropout "
    "QuantizeLinear DequantizeLinear DynamicQuantizeLinear".split()
)
ANY_TYPE = frozenset({"Shape", "Size", "Cast"})  # read any input type as it is


def _is(value: Value | None, dtype: DType) -> bool:
    return value is not None and isinstance(value.type, TensorType) and value.type.dtype == dtype


def _retyped(value: Value, dtype: DType) -> TensorType:
    assert isinstance(value.type, TensorType)
    return TensorType(dtype, value.type.shape)


@dataclass
class _Convert16(ModelPass):
    exact: ClassVar[bool] = False  # lossy: its tests hold it to an accuracy budget

    keep_io_float32: bool = True
    min_elements: int = 4096

    half: ClassVar[DType] = DType.FLOAT16

    def keeps(self, node: Node) -> bool:
        return node.op in KEEP_FLOAT32 or node.domain not in ("", "ai.onnx") or node.has_subgraphs

    def run(self, model: Model, context: PassContext) -> bool:
        graph = model.graph
        if any(True for _ in graph.nested_graphs()):
            context.note("the model has subgraphs (If/Loop/Scan): not converted", kind="refused")
            return False
        weights = sum(v.const_value.size for v in graph.initializers.values()
                      if _is(v, DType.FLOAT) and v.const_value is not None)  # fmt: skip
        if weights < self.min_elements:
            context.note(
                f"the model's float32 constants hold {weights} elements, fewer than "
                f"min-elements={self.min_elements}: not converted", kind="refused",
            )  # fmt: skip
            return False
        converted, kept, casts = self.convert(graph)
        if not converted and not casts:
            return False
        name = self.half.name.lower()
        context.note(f"{converted} nodes converted to {name}, {kept} kept float32")
        return True

    def convert(self, graph: Graph) -> tuple[int, int, int]:
        """Retype, insert Casts; returns (nodes converted, float nodes kept, Casts added)."""
        casts: dict[tuple[Value, DType], Value] = {}
        inputs = list(graph.inputs) if not self.keep_io_float32 else []
        for value in inputs:
            if _is(value, DType.FLOAT) and value.const_value is None:
                value.type = _retyped(value, self.half)
        converted = kept = 0
        for node in list(graph):
            if _is(node.inputs[0] if node.inputs else None, self.half) and node.op == "Cast":
                continue  # a boundary Cast back to float32 (or on to another type)
            if self.keeps(node):
                touches = any(_is(v, t) for v in [*node.inputs, *node.outputs]
                              for t in (DType.FLOAT, self.half))  # fmt: skip
                kept += touches
                self.feed(graph, node, DType.FLOAT, casts)
                continue
            changed = node.op not in ANY_TYPE and self.feed(graph, node, self.half, casts)
            if node.op == "Cast" and int(node.get_attr("to", 0)) == DType.FLOAT:
                node.set_attr("to", int(self.half))
            for out in node.outputs:
                if _is(out, DType.FLOAT):
                    out.type = _retyped(out, self.half)
                    changed = True
            converted += changed
        self.fix_outputs(graph, casts)
        return converted, kept, len(casts)

    def feed(self, graph: Graph, node: Node, dtype: DType, casts: dict[tuple[Value, DType], Value]) -> bool:  # fmt: skip
        """Give `node` its float inputs in `dtype` (float32 or the 16-bit type); whether any
        needed a Cast."""
        other = self.half if dtype == DType.FLOAT else DType.FLOAT
        fed = False
        for index, value in enumerate(node.inputs):
            if value is None or not _is(value, other) or node.op in ANY_TYPE:
                continue
            node.set_input(index, self.cast(graph, value, dtype, casts))
            fed = True
        return fed

    def cast(self, graph: Graph, value: Value, dtype: DType, casts: dict[tuple[Value, DType], Value]) -> Value:  # fmt: skip
        """`value` in `dtype`: a converted constant, or one shared Cast after its definition."""
        key = (value, dtype)
        if key in casts:
            return casts[key]
        name = value.name or "v"
        if value.is_constant and value.const_value is not None:
            array = self.array(value.const_value, dtype)
            new = graph.add_initializer(graph.scope.fresh(f"{name}_{dtype.short_name}"), array)
        else:
            node = Node("Cast", [value], {"to": int(dtype)}, name=graph.scope.fresh(f"{name}_cast"))
            node.outputs[0].type = _retyped(value, dtype)
            if value.producer is not None:
                graph.insert_after(value.producer, node)
            else:
                graph.insert_before(next(iter(graph)), node)
            new = node.outputs[0]
        casts[key] = new
        return new

    def array(self, array: np.ndarray, dtype: DType) -> np.ndarray:
        target = dtype.numpy
        if dtype != DType.FLOAT:
            import ml_dtypes

            limit = float(ml_dtypes.finfo(target).max)
            array = np.clip(array, -limit, limit)
        return np.asarray(array).astype(target)

    def fix_outputs(self, graph: Graph, casts: dict[tuple[Value, DType], Value]) -> None:
        """Outputs back to float32 (keep-io-float32), and float32 constants nothing reads
        any more dropped."""
        if self.keep_io_float32:
            values = [
                self.cast(graph, v, DType.FLOAT, casts) if _is(v, self.half) else v
                for v in graph.outputs
            ]
            graph.set_outputs(values, list(graph.output_names))
        for (value, _), _new in list(casts.items()):
            if value.is_constant and not value.is_used:
                graph.remove_initializer(value)


@register_pass("convert-float16", "compute in float16, keeping accuracy-critical ops float32")
@dataclass
class ConvertFloat16(_Convert16):
    half: ClassVar[DType] = DType.FLOAT16


@register_pass("convert-bfloat16", "compute in bfloat16, keeping accuracy-critical ops float32")
@dataclass
class ConvertBFloat16(_Convert16):
    half: ClassVar[DType] = DType.BFLOAT16
