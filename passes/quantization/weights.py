"""quantize-weights: weight-only quantization of the constant weights of MatMul and Gemm.

Each float weight W of a MatMul (`x @ W`, W [K, N]) or a Gemm (B, [K, N], or [N, K] with
transB=1) becomes integers and scales, dequantized in front of the op:

    y = x @ W   ->   y = x @ DequantizeLinear(Wq, scale[, zero_point], axis, block_size)
                 or  y = com.microsoft.MatMulNBits(x, pack(Wq^T), scale[, zero_point])

with the scheme (`scheme.py`) chosen by the options: `bits=8` (int8; uint8 when asymmetric) or
`bits=4` (int4 / uint4); `block-size=0` one scale per output column (per channel), `block-size=B`
one per B consecutive elements of a column along K (default 32 for 4 bits, 0 for 8 bits);
`symmetric=true` (zero point 0; the default for 8 bits) or false (uint codes and a zero point
per block: the default for 4 bits, as ONNX Runtime's MatMulNBitsQuantizer does, since with 16
levels a lopsided block wastes half of them on the side it does not reach); `clip-search`
(default: on for 4 bits, off for 8) shrinks each block's range to the one of least squared
error (`scheme.search_params`: outliers clipped, the rest rounded finer). `format=qdq` writes
standard ONNX; `format=matmulnbits` writes ONNX Runtime's MatMulNBits (`--target onnxruntime`
only; B a power of two >= 16), whose layout is in `graphopt.ir.ops.contrib_quant`. Per channel,
MatMulNBits has no form: it needs blocks.

The activations stay float: the only change to the outputs is the weights' rounding error.
Without clip search the scheme bounds it elementwise by half a quantization step, |W' - W| <=
scale / 2 (each weight inside the range its own scale was computed from; see `scheme.py`), so
each output element moves by at most sum_k |x_k| * scale_k / 2. With it, each block's squared
error is at most the min/max scale's (so its root-mean-square error at most half the min/max
step), while a clipped outlier may move by more. Measured on the zoo (4 bits, block 32, cosine
of the outputs against fp32 in ONNX Runtime; docs/passes.md has the figures): asymmetric with
clip search is the most accurate of the four combinations, and at least as accurate as ONNX
Runtime's MatMulNBitsQuantizer where both quantize the same layers (its tool skips Gemms, such
as BERT's pooler, which this pass quantizes).

Refuses, with a note naming the node: weights that are not float constants, that are not 2-D,
that other nodes read too (the float copy would stay, or the other readers would change), with
fewer than `min-elements` elements (not worth a node), K not a multiple of the block size (the
pass does not pad: padding stores extra codes and, for QDQ, needs a Slice after the
DequantizeLinear; transformer widths are multiples of 32, so refusing is the simple, rare
case); for MatMulNBits also a Gemm with alpha != 1, transA, or a C that is not a [N] vector, and
an input of rank < 2. A model whose opset cannot express the scheme (per channel needs 13; int4
or blocks need 21) is refused as a whole, with the hint to run `upgrade-opset` first: the pass
does not upgrade by itself, since changing the opset rewrites ops model-wide and is a pass of
its own (`upgrade-opset,quantize-weights{bits=4}`).

`exclude` lists node names to keep float; `max-accuracy-drop=X` keeps the layers that hurt the
outputs most float until the model is within X of the float one on the calibration data
(`mixed_precision.py`); each quantized layer is recorded for the quantization report
(`quant_report.py`).

Ordering: after O2 (the fusions match float MatMuls; a DequantizeLinear in front of a weight
hides it from them). Clean-up after it is safe: `fold-constants` keeps DequantizeLinear of
constants as it is (quantized weights stay quantized).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from graphopt.ir.core import Graph, Model, Node, Value
from graphopt.ir.ops.contrib_quant import MATMUL_NBITS, pack_codes
from graphopt.ir.types import TensorType
from graphopt.passes.manager import ModelPass, PassContext, register_pass
from graphopt.passes.quantization.driver import run_quantization
from graphopt.passes.quantization.mixed_precision import check_budget
from graphopt.passes.quantization.quant_report import qdq_layer, record_layer, weight_layer
from graphopt.passes.quantization.scheme import QuantScheme, quantize_tensor

__all__ = ["QuantizeWeights"]


@dataclass
class _Site:
    """A MatMul or Gemm whose weight can be quantized."""

    node: Node
    weight: Value
    array: np.ndarray  # as stored, [K, N] or [N, K]
    k_axis: int  # the reduction axis of `array`


@register_pass(
    "quantize-weights",
    "weight-only int8/int4 quantization of MatMul/Gemm weights (DequantizeLinear or MatMulNBits)",
)
@dataclass
class QuantizeWeights(ModelPass):
    exact: ClassVar[bool] = False  # lossy: its tests hold it to an accuracy budget

    bits: Literal[4, 8] = 8
    block_size: int = -1  # -1: 32 for 4 bits, 0 (per channel) for 8 bits
    symmetric: bool | None = None  # None: false for 4 bits, true for 8 bits
    clip_search: bool | None = None  # None: on for 4 bits, off for 8 bits (it gains nothing)
    format: Literal["qdq", "matmulnbits"] = "qdq"
    min_elements: int = 1024
    exclude: tuple[str, ...] = ()
    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        if self.max_accuracy_drop is not None:
            check_budget(self.max_accuracy_drop)
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {self.bits}")
        if self.format not in ("qdq", "matmulnbits"):
            raise ValueError(f"format must be qdq or matmulnbits, not {self.format}")
        block = self.block
        if block < 0:
            raise ValueError(f"block-size must be >= 0 (or -1 for the default), not {block}")
        if self.format == "matmulnbits" and (block < 16 or block & (block - 1)):
            raise ValueError(f"MatMulNBits needs a block-size that is a power of two >= 16, not {block}")  # fmt: skip

    @property
    def block(self) -> int:
        if self.block_size >= 0:
            return self.block_size
        return 32 if self.bits == 4 else 0

    @property
    def is_symmetric(self) -> bool:
        return self.bits == 8 if self.symmetric is None else self.symmetric

    @property
    def searches_clip(self) -> bool:
        return self.bits == 4 if self.clip_search is None else self.clip_search

    def scheme(self, k_axis: int) -> QuantScheme:
        symmetric = self.is_symmetric
        dtype = ("int" if symmetric else "uint") + str(self.bits)
        if self.block:
            return QuantScheme(dtype, symmetric, axis=k_axis, block_size=self.block)
        return QuantScheme(dtype, symmetric, axis=1 - k_axis)  # one scale per column

    def run(self, model: Model, context: PassContext) -> bool:
        return run_quantization(self, model, context, int8_compute=False)

    def quantize(self, model: Model, context: PassContext) -> bool:
        if self.format == "matmulnbits" and context.target != "onnxruntime":
            context.note(
                "format=matmulnbits writes com.microsoft.MatMulNBits, an ONNX Runtime op: run "
                "with --target onnxruntime, or use format=qdq", kind="refused",
            )  # fmt: skip
            return False
        needed = self.scheme(0).min_opset
        if self.format == "qdq" and model.opset < needed:
            context.note(
                f"{self.scheme(0).granularity} {self.scheme(0).dtype} DequantizeLinear needs "
                f"opset {needed}, the model imports {model.opset}: run upgrade-opset first "
                "(upgrade-opset,quantize-weights)", kind="refused",
            )  # fmt: skip
            return False
        changed = False
        for graph in [*model.graph.nested_graphs(), model.graph]:
            for node in list(graph):
                site = self.site(node, context)
                if site is None:
                    continue
                if self.format == "qdq":
                    self.to_qdq(graph, site)
                    record_layer(context, qdq_layer(site.node, "weight-only"))
                elif self.to_matmulnbits(graph, site, context):
                    model.opset_imports.setdefault("com.microsoft", 1)
                    scheme = self.scheme(site.k_axis)
                    layer = weight_layer(site.node, site.array, scheme, "weight-only", None,
                                         clip_search=self.searches_clip)  # fmt: skip
                    record_layer(context, layer)
                else:
                    continue
                changed = True
        return changed

    def site(self, node: Node, context: PassContext) -> _Site | None:
        """The node's weight if it can be quantized (None: not a candidate, or refused)."""
        if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            return None
        weight = node.inputs[1]
        if weight is None or not weight.is_constant or weight.const_value is None:
            return None  # an activation (attention's products) or already quantized
        array = np.asarray(weight.const_value)
        if node.name and node.name in self.exclude:
            return _refused(context, node, "excluded by the exclude option")
        if array.dtype.kind != "f":
            return _refused(context, node, f"its weight is {array.dtype}, not float")
        if array.ndim != 2:
            return _refused(context, node, f"its weight is {array.ndim}-D, not 2-D")
        if len(weight.uses) != 1:
            return _refused(context, node, f"its weight %{weight.name} is read by "
                            f"{len(weight.uses)} nodes: quantizing it here would keep a float copy")  # fmt: skip
        if array.size < self.min_elements:
            return _refused(context, node, f"its weight has {array.size} elements, fewer than "
                            f"min-elements={self.min_elements}")  # fmt: skip
        k_axis = int(node.get_attr("transB", 0)) if node.op == "Gemm" else 0
        k = array.shape[k_axis]
        if self.block and k % self.block:
            return _refused(context, node, f"K={k} is not a multiple of block-size={self.block} "
                            "(the pass does not pad); choose a block size dividing K")  # fmt: skip
        return _Site(node, weight, array, k_axis)

    def to_qdq(self, graph: Graph, site: _Site) -> None:
        scheme = self.scheme(site.k_axis)
        t = quantize_tensor(site.array, scheme, clip_search=self.searches_clip)
        name = site.weight.name or "w"
        inputs = [
            graph.add_initializer(graph.scope.fresh(f"{name}_quantized"), t.values),
            graph.add_initializer(graph.scope.fresh(f"{name}_scale"), t.scale),
        ]
        if not (self.is_symmetric and scheme.signed):  # the default zero point is 0
            inputs.append(graph.add_initializer(graph.scope.fresh(f"{name}_zero_point"), t.zero_point))  # fmt: skip
        attrs: dict[str, int] = {}
        if scheme.axis is not None:
            attrs["axis"] = scheme.axis
        if scheme.block_size:
            attrs["block_size"] = scheme.block_size
        dq = Node("DequantizeLinear", inputs, attrs, name=graph.scope.fresh(f"{name}_dequantize"))
        dq.outputs[0].type = site.weight.type
        graph.insert_before(site.node, dq)
        site.node.set_input(1, dq.outputs[0])
        _drop(graph, site.weight)

    def to_matmulnbits(self, graph: Graph, site: _Site, context: PassContext) -> bool:
        node = site.node
        x = node.inputs[0]
        rank = x.type.rank if x is not None and isinstance(x.type, TensorType) else None
        if rank is None or rank < 2:
            return context.refuse(node, "MatMulNBits needs an input of known rank >= 2")
        bias = None
        if node.op == "Gemm":
            bias = self.gemm_bias(node, site.array.shape[1 - site.k_axis], context)
            if bias is False:
                return False
        w_t = site.array.T if site.k_axis == 0 else site.array  # [N, K]
        n, k = w_t.shape
        t = quantize_tensor(w_t, self.scheme(1), clip_search=self.searches_clip)  # K blocks of W^T
        codes = t.values.astype(np.int16) + (1 << (self.bits - 1) if self.is_symmetric else 0)
        blocks = k // self.block
        packed = pack_codes(codes.astype(np.uint8).reshape(n, blocks, self.block), self.bits)
        name = site.weight.name or "w"
        inputs: list[Value | None] = [
            x,
            graph.add_initializer(graph.scope.fresh(f"{name}_nbits"), packed),
            graph.add_initializer(graph.scope.fresh(f"{name}_scales"), t.scale),
        ]
        if not self.is_symmetric:  # symmetric codes sit around the default zero point 2^(bits-1)
            # [N, blocks] uint codes packed along the blocks, each row padded to whole bytes
            zero = pack_codes(t.zero_point.astype(np.uint8), self.bits)
            inputs.append(graph.add_initializer(graph.scope.fresh(f"{name}_zero_points"), zero))
        if isinstance(bias, np.ndarray):
            inputs += [None] * (5 - len(inputs))
            inputs.append(graph.add_initializer(graph.scope.fresh(f"{name}_bias"), bias))
        attrs = {"K": k, "N": n, "bits": self.bits, "block_size": self.block}
        fused = Node(
            MATMUL_NBITS, inputs, attrs, name=node.name or graph.scope.fresh("matmul_nbits")
        )
        fused.outputs[0].type = node.outputs[0].type
        graph.insert_before(node, fused)
        node.outputs[0].replace_all_uses_with(fused.outputs[0])
        old = list(node.inputs)
        graph.remove(node)
        for value in old:
            if value is not None and value.is_constant:
                _drop(graph, value)
        return True

    def gemm_bias(self, node: Node, n: int, context: PassContext) -> np.ndarray | None | bool:
        """The Gemm's `beta * C` as a [N] vector, None without C, False (refused) otherwise."""
        if float(node.get_attr("alpha", 1.0)) != 1.0 or int(node.get_attr("transA", 0)):
            return context.refuse(node, "MatMulNBits has no alpha or transA")
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is None:
            return None
        array = c.const_value if c.is_constant else None
        if array is None or np.asarray(array).size not in (1, n) or np.asarray(array).ndim > 1:
            return context.refuse(node, "MatMulNBits adds a [N] bias: C is not a [N] constant")  # fmt: skip
        beta = float(node.get_attr("beta", 1.0))
        return np.broadcast_to(
            np.asarray(array) * np.asarray(beta, np.asarray(array).dtype), (n,)
        ).copy()


def _refused(context: PassContext, node: Node, reason: str) -> _Site | None:
    """Record why `node` keeps its float weight; None, as `site` returns for it."""
    context.refuse(node, reason)
    return None


def _drop(graph: Graph, value: Value) -> None:
    """Remove an initializer nothing reads any more."""
    if not value.is_used and graph.initializers.get(value.name or "") is value:
        graph.remove_initializer(value)
