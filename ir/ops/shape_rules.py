"""Fast type and shape rules for the ops that make up most of every graph.

Why: ONNX's node-level inference costs ~40 us a node (a NodeProto built, serialized, parsed in C++
and the result parsed back); big graphs are mostly elementwise ops, MatMul and shape plumbing, and
these rules do them in a few microseconds. They also know more about symbols: Reshape's -1 is
solved when the input's symbolic dims cancel (`[batch, seq, 768] -> [0, -1, 12, 64]` gives `seq`).

A rule returns the output types, or None to hand the node to ONNX's inference (old opsets, unknown
input types, attributes it does not model). Dims are ints, symbols or None (unknown); broadcasting
two different symbols gives None, never an error (they may be equal at run time).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from graphopt.ir.core import Node
from graphopt.ir.registry import InferenceInputs
from graphopt.ir.types import Dim, DType, TensorType, Type

Rule = Callable[[Node, InferenceInputs], list[Type | None] | None]
RULES: dict[str, Rule] = {}

INT_MAX = 2**62


def rule(*ops: str) -> Callable[[Rule], Rule]:
    def decorate(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return decorate


def _tensors(inputs: InferenceInputs) -> list[TensorType] | None:
    types = []
    for t in inputs.types:
        if not isinstance(t, TensorType) or t.shape is None:
            return None
        types.append(t)
    return types


def _known_dtypes(inputs: InferenceInputs) -> list[TensorType] | None:
    """The input tensor types if all are tensors (shapes may be unknown), else None."""
    types = [t for t in inputs.types if t is not None]
    if len(types) != len(inputs.types) or not all(isinstance(t, TensorType) for t in types):
        return None
    return types  # type: ignore[return-value]


def broadcast(shapes: Sequence[tuple[Dim, ...]]) -> tuple[Dim, ...] | None:
    """Multidirectional broadcasting of shapes with symbolic dims; None when ints clash."""
    rank = max(len(s) for s in shapes)
    result: list[Dim] = []
    for axis in range(rank):
        dims = [s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0]
        known = {d for d in dims if d != 1}
        if not known:
            result.append(1)
        elif len(known) == 1:
            (only,) = known
            result.append(only)
        else:
            ints = {d for d in known if isinstance(d, int)}
            if len(ints) > 1:
                return None
            result.append(ints.pop() if ints else None)
    return tuple(result)


UNARY = """Relu Neg Abs Exp Log Sqrt Tanh Sigmoid Erf Reciprocal Floor Ceil Sin Cos Softplus Softsign
LeakyRelu Elu Selu Celu HardSigmoid HardSwish Gelu Softmax LogSoftmax Not Round Sign Mish
ThresholdedRelu Asin Acos Atan Sinh Cosh Tan BitwiseNot IsNaN IsInf""".split()
BOOLEAN_RESULTS = {"Not", "IsNaN", "IsInf"}


@rule(*UNARY, "Identity", "Clip")
def _unary(node: Node, inputs: InferenceInputs) -> list[Type | None] | None:
    t = inputs.types[0]
    if not isinstance(t, TensorType) or len(node.outputs) != 1:
        return None
    dtype = DType.BOOL if node.op_type in ("IsNaN", "IsInf") else t.dtype
    return [TensorType(dtype, t.shape)]


@rule("Dropout")
def _dropout(node: Node, inputs: InferenceInputs) -> list[Type | None] | None:
    t = inputs.types[0]
    if not isinstance(t, TensorType):
        return None
    types: list[Type | None] = [t, TensorType(DType.BOOL, t.shape)]
    return types[: len(node.outputs)]


@rule("Cast")
def _cast(node: Node, inputs: InferenceInputs) -> list[Type | None] | None:
    t, to = inputs.types[0], node.get_attr("to")
    if not isinstance(t, TensorType) or not isinstance(to, int):  # Cast-1 names the type
        return None
    return [TensorType(DType(to), t.shape)]


COMPARISONS = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor"}


@rule("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Mod", *COMPARISONS)
def _broadcasting(node: Node, inputs: InferenceInputs) -> list[Type | None] | None:
    types = _known_dtypes(inputs)
    if not types or node.attrs.keys() - {"fmod"}:
        return None
    dtype = DType.BOOL if node.op_type in COMPARISONS else types[0].dtype
    if any(t.shape is None for t in types):
        return [TensorType(dtype, None)]
    shape = broadcast([t.shape for t in types])  # type: ignore[misc]
    if shape is None:
        return None  # let ONNX's inference word the error
    return [TensorType(dtype, shape)]


@rule("Where")
def _where(node: Node, inputs: InferenceInputs) -> list[Type | None] | None:
    types = _tensors(inputs)
    if types is None:
        return None
    shape = broadcast([t.shape for t in types])  # type: ignore[misc]
    return None if shape is None else [TensorType(types[1].dtype, shape)]


@rule("MatMul")
def _matmul(node: Node, inputs: InferenceInputs) -> list[Type | None] | None:
    types = _tensors(inputs)
    if types is None:
        return None
    a, b = (list(t.shape) for t in types)  # type: ignore[arg-type]
    if not a or not b:
        return None
    a_vec, b_vec = len(a) == 1, len(b) == 1
    if a_vec:
        a = [1, *a]
    if b_vec:
        b = [*b, 1]
    k1, k2 = a[-1], b[-2]
    if isinstance(k1, int) and isinstance(k2, int) and k1 != k2:
        return None
    batch = broadcast([tuple(a[:-2]), tuple(b[:-2])])
    if batch is None:
        return None
    shape = [*batch, *([] if a_vec else [a[-2]]), *([] if b_vec else [b[-1]])]
    return [TensorType(types[0].dtype, tuple(shape))]


@rule("Gemm")
def _gemm(node: Node, inputs: InferenceInputs) -> list[Type | None] | None:
    a, b = inputs.types[0], inputs.types[1]
    if not isinstance(a, TensorType) or not isinstance(b, TensorType) or a.rank != 2 or b.rank != 2:
        return None
    m = a.shape[1] if node.get_attr("transA", 0) else a.shape[0]  # type: ignore[index]
    n = b.shape[0] if node.get_attr("transB", 0) else b.shape[1]  # type: ignore[index]
    return [TensorType(a.dtype, (m, n))]


@rule("Transpose")
def _transpose(node: Node, inputs: InferenceInputs) -> list[Type | None] | None:
    t = inputs.types[0]
    if not isinstance(t, TensorType) or t.shape is None:
        return None
    perm = node.get_attr("perm") or list(range(len(t.shape)))[::-1]
    if sorted(perm) != list(range(len(t.shape))):
        return None
    return [TensorType(t.dtype, tuple(t.shape[p] for p in perm))]


def _symbolic_product(dims: Sequence[Dim]) -> tuple[int, Counter[str]] | None:
    coefficient, symbols = 1, Counter[str]()
    for d in dims:
        if isinstance(d, int):
            coefficient *= d
        elif isinstance(d, str):
            symbols[d] += 1
        else:
            return None
    return coefficient, symbols


@rule("Reshape")
def _reshape(node: Node, inputs: InferenceInputs) -> list[Type | None] | None:
    t, shape = inputs.types[0], inputs.constants[1] if len(inputs.constants) > 1 else None
    if not isinstance(t, TensorType) or inputs.opset("") < 5:
        return None
    if shape is None or t.shape is None:  # rank from the shape input's length, if known
        target_type = inputs.types[1] if len(inputs.types) > 1 else None
        length = None
        if (
            isinstance(target_type, TensorType)
            and target_type.shape
            and len(target_type.shape) == 1
        ):
            length = target_type.shape[0]
        return [TensorType(t.dtype, (None,) * length if isinstance(length, int) else None)]
    allow_zero = bool(node.get_attr("allowzero", 0))
    target: list[Dim] = []
    for i, d in enumerate(int(x) for x in np.asarray(shape).reshape(-1)):
        if d == 0 and not allow_zero:
            if i >= len(t.shape):
                return None
            target.append(t.shape[i])
        else:
            target.append(d)
    if -1 in target:
        where = target.index(-1)
        total = _symbolic_product(t.shape)
        known = _symbolic_product([d for i, d in enumerate(target) if i != where])
        solved: Dim = None
        if total is not None and known is not None and known[0] != 0:
            rest = total[1] - known[1]
            if not (known[1] - total[1]) and total[0] % known[0] == 0:
                count = total[0] // known[0]
                if not rest:
                    solved = count
                elif count == 1 and sum(rest.values()) == 1:
                    solved = next(iter(rest))
        target[where] = solved
    return [TensorType(t.dtype, tuple(target))]


def _axes(node: Node, inputs: InferenceInputs, since: int) -> list[int] | None:
    """The `axes` of a node: an attribute before opset `since`, the second input from then on."""
    if inputs.opset("") < since:
        return node.get_attr("axes")
    if len(inputs.constants) < 2 or node.inputs[1] is None:
        return []
    value = inputs.constants[1]
    return None if value is None else [int(a) for a in np.asarray(value).reshape(-1)]


@rule("Unsqueeze")
def _unsqueeze(node: Node, inputs: InferenceInputs) -> list[Type | None] | None:
    t = inputs.types[0]
    axes = _axes(node, inputs, 13)
    if not isinstance(t, TensorType) or t.shape is None or not axes:
        return None
    rank = len(t.shape) + len(axes)
    positions = sorted(a + rank if a < 0 else a for a in axes)
    dims = list(t.shape)
    for p in positions:
        dims.insert(p, 1)
    return [TensorType(t.dtype, tuple(dims))]


@rule("Squeeze")
def _squeeze(node: Node, inputs: InferenceInputs) -> list[Type | None] | None:
    t = inputs.types[0]
    axes = _axes(node, inputs, 13)
    if not isinstance(t, TensorType) or t.shape is None or axes is None:
        return None
    rank = len(t.shape)
    drop = (
        {a + rank if a < 0 else a for a in axes}
        if axes
        else {i for i, d in enumerate(t.shape) if d == 1}
    )
    if not axes and any(not isinstance(d, int) for d in t.shape):
        return None  # which symbols are 1 is unknown
    return [TensorType(t.dtype, tuple(d for i, d in enumerate(t.shape) if i not in drop))]


@rule("Concat")
def _concat(node: Node, inputs: InferenceInputs) -> list[Type | None] | None:
    types = _tensors(inputs)
    if not types or not types[0].shape:
        return None
    rank = len(types[0].shape)  # type: ignore[arg-type]
    axis = int(node.get_attr("axis"))
    axis = axis + rank if axis < 0 else axis
    dims = [t.shape[axis] for t in types]  # type: ignore[index]
    total: Dim = sum(dims) if all(isinstance(d, int) for d in dims) else None  # type: ignore[arg-type]
    others = [tuple(d for i, d in enumerate(t.shape) if i != axis) for t in types]  # type: ignore[arg-type]
    merged = broadcast(others) if all(len(o) == rank - 1 for o in others) else None
    if merged is None:
        return None
    shape = list(merged)
    shape.insert(axis, total)
    return [TensorType(types[0].dtype, tuple(shape))]


@rule("Gather")
def _gather(node: Node, inputs: InferenceInputs) -> list[Type | None] | None:
    types = _tensors(inputs)
    if types is None:
        return None
    data, indices = types
    axis = int(node.get_attr("axis", 0))
    rank = len(data.shape)  # type: ignore[arg-type]
    axis = axis + rank if axis < 0 else axis
    shape = (*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :])  # type: ignore[index,misc]
    return [TensorType(data.dtype, shape)]


@rule("Shape")
def _shape(node: Node, inputs: InferenceInputs) -> list[Type | None] | None:
    t = inputs.types[0]
    if not isinstance(t, TensorType) or t.shape is None:
        return None
    rank = len(t.shape)
    start, end = node.get_attr("start", 0), node.get_attr("end", rank)
    lo = min(max(start + rank if start < 0 else start, 0), rank)
    hi = min(max(end + rank if end < 0 else end, 0), rank)
    return [TensorType(DType.INT64, (max(hi - lo, 0),))]


REDUCTIONS_WITH_AXES_INPUT = {"ReduceSum": 13}  # the rest take axes as an input from opset 18


@rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1",
      "ReduceSumSquare", "ReduceLogSumExp")  # fmt: skip
def _reduce(node: Node, inputs: InferenceInputs) -> list[Type | None] | None:
    t = inputs.types[0]
    axes = _axes(node, inputs, REDUCTIONS_WITH_AXES_INPUT.get(node.op_type, 18))
    if not isinstance(t, TensorType) or t.shape is None or axes is None:
        return None
    rank = len(t.shape)
    if not axes:
        if node.get_attr("noop_with_empty_axes", 0):
            return [t]
        axes = list(range(rank))
    reduced = {a + rank if a < 0 else a for a in axes}
    keep = bool(node.get_attr("keepdims", 1))
    dims = [1 if i in reduced else d for i, d in enumerate(t.shape) if keep or i not in reduced]
    return [TensorType(t.dtype, tuple(dims))]


@rule("LayerNormalization", "RMSNormalization")
def _layer_norm(node: Node, inputs: InferenceInputs) -> list[Type | None] | None:
    t = inputs.types[0]
    if not isinstance(t, TensorType) or len(node.outputs) != 1:
        return None
    return [t]


def fast_rule(op_type: str) -> Any:
    return RULES.get(op_type)
