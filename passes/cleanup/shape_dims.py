"""What each dim of a tensor is, as far as the graph proves it (the dims half of simplify-shapes).

A dim is an `Elem`: an `int` (static), a `str` (a symbol from a declared type: equal symbols are
equal sizes, as ONNX dim_params are), or a `Token` (an integer nothing pins down: "dim 2 of %x").
Two dims are provably equal when their `Elem`s compare equal; nothing else is ever assumed.

`DimAnalysis.dims(value)` gives a value's dims, computed on demand and memoized, so a pass pays
only for the values it asks about (the data inputs of Shape, Reshape, Expand, Slice):
- a declared type with every dim known is taken as it is (no work);
- otherwise the producer's rule refines it: shape-preserving ops, broadcasting, Transpose,
  Reshape (with the target's *shape vector*, so `Reshape(x, Concat(Shape(x)[0], [4, 4]))` keeps
  `batch`), Expand, Unsqueeze/Squeeze, Concat, Gather, MatMul, Flatten, Slice, Shape;
- a value with no declared rank whose op has no rule here (Conv, ReduceMean, ...) asks the op
  registry's inference (ONNX's node-level inference, ~0.1 ms a node), once per value.
Dims still unknown become `Token("dim", value, axis)`. Demand walks producers with an explicit
stack (no recursion limit on 100k-node chains) and each value is computed once: linear.

The shape vectors themselves (`ShapeVec`: the element values of small integer tensors) are computed
by `graphopt.passes.cleanup.shape_values`, which hands this module a `vector` callback.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from graphopt.ir.core import Node, Value
from graphopt.ir.errors import GraphoptError
from graphopt.ir.inference import constant_value
from graphopt.ir.registry import REGISTRY, InferenceInputs
from graphopt.ir.types import DType, TensorType, Type

__all__ = [
    "DimAnalysis", "Elem", "ShapeVec", "SliceParams", "Token", "broadcast_dim", "is_size",
    "reaches_end", "same_shape", "slice_indices", "slice_params",
]  # fmt: skip


@dataclass(frozen=True)
class Token:
    """An integer the graph does not pin down. `kind="dim"`: dim `index` of tensor `value` (a size,
    so >= 0); `kind="elem"`: element `index` of the integer tensor `value` (any integer). Tokens
    compare by value identity, so two tokens are equal only when they name the same thing."""

    kind: str
    value: Value
    index: int

    def __repr__(self) -> str:
        return f"{self.kind}(%{self.value.name}, {self.index})"


Elem = int | str | Token


def is_size(e: Elem | None) -> bool:
    """True when `e` is known to be >= 0 (a dim, a symbol, or a non-negative int)."""
    if isinstance(e, int):
        return e >= 0
    return isinstance(e, str) or (isinstance(e, Token) and e.kind == "dim")


@dataclass(frozen=True)
class ShapeVec:
    """The element values of a small integer (or bool) tensor of rank 0 (`scalar`) or 1."""

    elems: tuple[Elem, ...]
    dtype: DType
    scalar: bool = False

    @property
    def is_static(self) -> bool:
        return all(isinstance(e, int) for e in self.elems)

    def ints(self) -> list[int]:
        """The elements as numbers (only when `is_static`)."""
        return [e for e in self.elems if isinstance(e, int)]

    def array(self) -> np.ndarray:
        """The values as an array of the right dtype and rank (only when `is_static`)."""
        array = np.array(self.elems, dtype=self.dtype.numpy)
        return array.reshape(()) if self.scalar else array.reshape(-1)


RawDims = tuple[Elem | None, ...]
Info = tuple[DType | None, "tuple[Elem, ...] | None"]

SAME_SHAPE = frozenset(
    """Relu Sigmoid Tanh Neg Abs Erf Exp Log Sqrt Reciprocal Floor Ceil Round Sign Sin Cos Softsign
    Softplus Elu Selu Celu LeakyRelu ThresholdedRelu HardSigmoid HardSwish Gelu Mish Softmax
    LogSoftmax Hardmax Identity Clip Dropout LayerNormalization BatchNormalization
    InstanceNormalization LpNormalization Not CumSum Cast IsNaN IsInf""".split()
)
BROADCAST = frozenset("Add Sub Mul Div Pow Max Min Mod PRelu BitShift And Or Xor Sum Mean".split())
COMPARE = frozenset("Equal Less Greater LessOrEqual GreaterOrEqual".split())


def broadcast_dim(dims: Sequence[Elem | None]) -> Elem | None:
    """The dim multidirectional broadcasting gives for these input dims (None: unknown). A dim
    that is not 1 wins; a symbol might be 1 at run time, so two different symbols give unknown."""
    others = [d for d in dims if d != 1]
    if not others:
        return 1
    ints = {d for d in others if isinstance(d, int)}
    if ints:
        return ints.pop() if len(ints) == 1 else None
    first = others[0]
    return first if first is not None and all(d == first for d in others) else None


def _broadcast(shapes: Sequence[RawDims | None]) -> RawDims | None:
    if any(s is None for s in shapes):
        return None
    rank = max(len(s) for s in shapes)  # type: ignore[arg-type]
    out = []
    for axis in range(rank):
        column = [s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0]  # type: ignore[arg-type,index]
        out.append(broadcast_dim(column))
    return tuple(out)


def _norm_axis(axis: int, rank: int) -> int | None:
    axis = axis + rank if axis < 0 else axis
    return axis if 0 <= axis < rank else None


class DimAnalysis:
    """Lazily computed dims (and element types) of tensor values; see the module docstring."""

    def __init__(
        self, opset_imports: Mapping[str, int], vector: Callable[[Value | None], ShapeVec | None]
    ):
        self.opset_imports = opset_imports
        self.vector = vector
        self.onnx_calls = 0
        self._info: dict[Value, Info] = {}

    def dims(self, value: Value | None) -> tuple[Elem, ...] | None:
        """The value's dims (one `Elem` per axis), or None when even its rank is unknown."""
        return None if value is None else self.info(value)[1]

    def dtype(self, value: Value | None) -> DType | None:
        return None if value is None else self.info(value)[0]

    def info(self, value: Value) -> Info:
        found = self._info.get(value)
        if found is not None:
            return found
        stack = [value]
        while stack:
            top = stack[-1]
            if top in self._info:
                stack.pop()
                continue
            node = top.producer
            if _complete(top) or node is None or node.domain != "" or node.subgraphs():
                self._info[top] = _finish(top, None, None)
                stack.pop()
                continue
            missing = [v for v in self._deps(node) if v not in self._info]
            if missing:
                stack.extend(missing)
                continue
            self._compute(node)
            stack.pop()
        return self._info[value]

    # ----- per node ------------------------------------------------------------------------------
    def _deps(self, node: Node) -> list[Value]:
        inputs = node.inputs[:1] if node.op_type in ("Reshape", "Expand", "Shape") else node.inputs
        return [v for v in inputs if v is not None]

    def _compute(self, node: Node) -> None:
        rules = self._rule(node)
        if rules is None and any(_needs_inference(v) for v in node.outputs):
            rules = self._infer(node)
        for index, value in enumerate(node.outputs):
            dtype, dims = rules[index] if rules is not None and index < len(rules) else (None, None)
            self._info[value] = _finish(value, dtype, dims)

    def _rule(self, node: Node) -> list[tuple[DType | None, RawDims | None]] | None:
        op = node.op_type
        deps = set(self._deps(node))
        ins = [self._info[v] if v in deps else (None, None) for v in node.inputs]  # type: ignore[index]
        if not ins:
            return None
        dtype, x = ins[0]
        if op in SAME_SHAPE:
            if op == "Cast":
                to = node.get_attr("to", 0)
                dtype = DType(to) if to in DType._value2member_map_ else None
            elif op in ("Not", "IsNaN", "IsInf"):
                dtype = DType.BOOL
            return [(dtype, x)]
        if op in BROADCAST or op in COMPARE or op == "Where":
            if op == "Where":
                dtype = ins[1][0] if len(ins) > 1 else None
            return [(DType.BOOL if op in COMPARE else dtype, _broadcast([d for _, d in ins]))]
        handler = _RULES.get(op)
        if handler is None:
            return None
        result = handler(self, node, [d for _, d in ins])
        return (
            None
            if result is None
            else [(DType.INT64 if op in ("Shape", "Size") else dtype, result)]
        )

    def _infer(self, node: Node) -> list[tuple[DType | None, RawDims | None]] | None:
        domain = node.domain
        opset = self.opset_imports.get(domain, self.opset_imports.get("ai.onnx", 1))
        entry = REGISTRY.lookup(node.op, opset)
        if entry is None or entry.infer is None:
            return None
        types: list[Type | None] = []
        constants = []
        for v in node.inputs:
            dtype, dims = self.info(v) if v is not None else (None, None)
            shape = (
                None
                if dims is None
                else tuple(d if isinstance(d, int | str) else None for d in dims)
            )
            types.append(TensorType(dtype, shape) if dtype is not None else None)
            array = constant_value(v)
            if array is None and v is not None:
                vec = self.vector(v)
                array = vec.array() if vec is not None and vec.is_static else None
            constants.append(array)
        self.onnx_calls += 1
        try:
            inferred = entry.infer(node, InferenceInputs(types, constants, self.opset_imports))
        except GraphoptError:  # inconsistent types: leave the dims unknown, the verifier reports it
            return None
        return [(t.dtype, t.shape) if isinstance(t, TensorType) else (None, None) for t in inferred]


def _complete(value: Value) -> bool:
    t = value.type
    return isinstance(t, TensorType) and t.shape is not None and None not in t.shape


def _needs_inference(value: Value) -> bool:
    t = value.type
    return not isinstance(t, TensorType) or t.shape is None


def _finish(value: Value, dtype: DType | None, dims: RawDims | None) -> Info:
    """Merge what the graph declares with what a rule found: declared numbers and symbols win,
    then the rule's dims; what is left unknown becomes a `Token` naming this value's dim."""
    t = value.type
    declared: RawDims | None = t.shape if isinstance(t, TensorType) else None
    if isinstance(t, TensorType):
        dtype = t.dtype
    if declared is None or (dims is not None and len(dims) != len(declared)):
        declared = dims if declared is None else declared
        dims = None
    if declared is None:
        return dtype, None
    out: list[Elem] = []
    for axis, d in enumerate(declared):
        found = dims[axis] if d is None and dims is not None else d
        out.append(Token("dim", value, axis) if found is None else found)
    return dtype, tuple(out)


# ----- shape rules for ops whose output shape follows from their inputs' dims ---------------------

Rule = Callable[[DimAnalysis, Node, list["tuple[Elem, ...] | None"]], "RawDims | None"]


def _transpose(da: DimAnalysis, node: Node, ins: list) -> RawDims | None:
    x = ins[0]
    if x is None:
        return None
    perm = node.get_attr("perm", list(range(len(x) - 1, -1, -1)))
    return tuple(x[p] for p in perm) if sorted(perm) == list(range(len(x))) else None


def _reshape(da: DimAnalysis, node: Node, ins: list) -> RawDims | None:
    x, target = ins[0], da.vector(node.inputs[1] if len(node.inputs) > 1 else None)
    if target is None or target.scalar:
        return None
    allowzero = node.get_attr("allowzero", 0)
    if x is not None and same_shape(target.elems, x, allowzero):
        return x  # as simplify-shapes will find it: the same dims, not new unknowns
    out: list[Elem | None] = []
    for axis, e in enumerate(target.elems):
        if e == 0 and not allowzero:
            out.append(x[axis] if x is not None and axis < len(x) else None)
        elif is_size(e):
            out.append(e)
        else:
            out.append(None)  # -1, or an element that might be 0 or -1 at run time
    if target.elems.count(-1) == 1 and x is not None and all(isinstance(d, int) for d in x):
        known = [d for d, e in zip(out, target.elems, strict=True) if e != -1]
        if all(isinstance(d, int) and d > 0 for d in known):
            total = int(np.prod(x, dtype=np.int64))
            rest = int(np.prod(known, dtype=np.int64))  # type: ignore[arg-type]
            out[target.elems.index(-1)] = total // rest if total % rest == 0 else None
    return tuple(out)


def _expand(da: DimAnalysis, node: Node, ins: list) -> RawDims | None:
    target = da.vector(node.inputs[1] if len(node.inputs) > 1 else None)
    if target is None or target.scalar:
        return None
    return _broadcast([ins[0], tuple(e if is_size(e) else None for e in target.elems)])


def _shape(da: DimAnalysis, node: Node, ins: list) -> RawDims | None:
    x = ins[0]
    if x is None:
        return (None,)
    rank = len(x)
    start, end = shape_range(node, rank)
    return (max(end - start, 0),)


def shape_range(node: Node, rank: int) -> tuple[int, int]:
    """Shape's `start`/`end` attributes (opset 15), clamped to [0, rank] as the spec says."""

    def clamp(i: int) -> int:
        return min(max(i + rank if i < 0 else i, 0), rank)

    return clamp(node.get_attr("start", 0)), clamp(node.get_attr("end", rank))


def _size(da: DimAnalysis, node: Node, ins: list) -> RawDims | None:
    return ()


def axes_of(da: DimAnalysis, node: Node, index: int) -> list[int] | None:
    """Axes given as input `index` (opset 13+, or Slice 10+) or as the `axes` attribute."""
    if len(node.inputs) > index and node.inputs[index] is not None:
        vec = da.vector(node.inputs[index])
        return vec.ints() if vec is not None and vec.is_static else None
    axes = node.get_attr("axes")
    return None if axes is None else list(axes)


def _unsqueeze(da: DimAnalysis, node: Node, ins: list) -> RawDims | None:
    x, axes = ins[0], axes_of(da, node, 1)
    if x is None or axes is None:
        return None
    rank = len(x) + len(axes)
    normed = {_norm_axis(a, rank) for a in axes}
    if None in normed or len(normed) != len(axes):
        return None
    rest = iter(x)
    return tuple(1 if axis in normed else next(rest) for axis in range(rank))


def _squeeze(da: DimAnalysis, node: Node, ins: list) -> RawDims | None:
    x, axes = ins[0], axes_of(da, node, 1)
    if x is None:
        return None
    if axes is None:
        if not all(isinstance(d, int) for d in x):
            return None  # a symbolic dim might be 1 and be squeezed
        return tuple(d for d in x if d != 1)
    normed = {_norm_axis(a, len(x)) for a in axes}
    return None if None in normed else tuple(d for i, d in enumerate(x) if i not in normed)


def _concat(da: DimAnalysis, node: Node, ins: list) -> RawDims | None:
    shapes = [s for s, v in zip(ins, node.inputs, strict=True) if v is not None]
    if not shapes or any(s is None or len(s) != len(shapes[0]) for s in shapes):
        return None
    axis = _norm_axis(node.get_attr("axis", 0), len(shapes[0]))
    if axis is None:
        return None
    out: list[Elem | None] = []
    for i in range(len(shapes[0])):
        column = [s[i] for s in shapes]
        if i == axis:
            out.append(sum(column) if all(isinstance(d, int) for d in column) else None)
        else:  # all inputs agree here: take the most informative spelling
            out.append(
                min(
                    column,
                    key=lambda d: 0 if isinstance(d, int) else 1 if isinstance(d, str) else 2,
                )
            )
    return tuple(out)


def _gather(da: DimAnalysis, node: Node, ins: list) -> RawDims | None:
    data, indices = ins[0], ins[1] if len(ins) > 1 else None
    if data is None or indices is None:
        return None
    axis = _norm_axis(node.get_attr("axis", 0), len(data))
    return None if axis is None else (*data[:axis], *indices, *data[axis + 1 :])


def _matmul(da: DimAnalysis, node: Node, ins: list) -> RawDims | None:
    a, b = ins[0], ins[1] if len(ins) > 1 else None
    if a is None or b is None or not a or not b:
        return None
    if len(a) == 1 and len(b) == 1:
        return ()
    if len(a) == 1:
        return (*b[:-2], b[-1])
    if len(b) == 1:
        return tuple(a[:-1])
    batch = _broadcast([a[:-2], b[:-2]])
    return None if batch is None else (*batch, a[-2], b[-1])


def _flatten(da: DimAnalysis, node: Node, ins: list) -> RawDims | None:
    x = ins[0]
    if x is None:
        return None
    axis = node.get_attr("axis", 1)
    axis = axis + len(x) if axis < 0 else axis

    def product(dims: Sequence[Elem]) -> Elem | None:
        if len(dims) == 1:
            return dims[0]
        return int(np.prod(dims, dtype=np.int64)) if all(isinstance(d, int) for d in dims) else None  # type: ignore[arg-type]

    return (product(x[:axis]) if axis else 1, product(x[axis:]) if axis < len(x) else 1)


def _slice(da: DimAnalysis, node: Node, ins: list) -> RawDims | None:
    x, params = ins[0], slice_params(da.vector, node)
    if x is None or params is None:
        return None
    out: list[Elem | None] = list(x)
    for start, end, axis, step in zip(*params.lists(), strict=True):
        axis = _norm_axis(axis, len(x))  # type: ignore[assignment]
        if axis is None:
            return None
        dim = x[axis]
        if start == 0 and step == 1 and reaches_end(end, dim, params.top):
            continue
        if isinstance(end, int) and isinstance(dim, int):
            indices = slice_indices(dim, start, end, step)
            out[axis] = None if indices is None else len(indices)
        else:
            out[axis] = None
    return tuple(out)


@dataclass
class SliceParams:
    """Slice's starts, axes and steps (numbers) and ends (elements: maybe computed dims)."""

    starts: list[int]
    ends: tuple[Elem, ...]
    axes: list[int]
    steps: list[int]
    top: int  # the max of the ends' dtype: "to the end"

    def lists(self) -> tuple[list[int], tuple[Elem, ...], list[int], list[int]]:
        return self.starts, self.ends, self.axes, self.steps


def slice_params(
    vector: Callable[[Value | None], ShapeVec | None], node: Node
) -> SliceParams | None:
    """Slice's parameters (attributes before opset 10, inputs since), or None when the starts,
    axes or steps are not numbers."""
    if "starts" in node.attrs:
        starts, ends = list(node.get_attr("starts")), list(node.get_attr("ends") or [])
        axes = list(node.get_attr("axes", range(len(starts))))
        params = SliceParams(
            starts, tuple(ends), axes, [1] * len(starts), int(np.iinfo(np.int64).max)
        )
    else:
        inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
        starts_vec, ends_vec = vector(inputs[1]), vector(inputs[2])
        if starts_vec is None or ends_vec is None or not starts_vec.is_static or ends_vec.scalar:
            return None
        n = len(starts_vec.elems)
        axes_vec, steps_vec = vector(inputs[3]), vector(inputs[4])
        if (inputs[3] is not None and (axes_vec is None or not axes_vec.is_static)) or (
            inputs[4] is not None and (steps_vec is None or not steps_vec.is_static)
        ):
            return None
        params = SliceParams(
            starts_vec.ints(),
            ends_vec.elems,
            axes_vec.ints() if axes_vec is not None else list(range(n)),
            steps_vec.ints() if steps_vec is not None else [1] * n,
            int(np.iinfo(ends_vec.dtype.numpy).max),
        )
    lengths = {len(part) for part in params.lists()}
    return params if len(lengths) == 1 else None


def slice_indices(n: int, start: int, end: int, step: int) -> range | None:
    """The indices ONNX Slice takes from an axis of length n (None for a zero step)."""
    if step == 0:
        return None
    start = start + n if start < 0 else start
    end = end + n if end < 0 else end
    if step > 0:
        return range(min(max(start, 0), n), min(max(end, 0), n), step)
    return range(min(max(start, 0), n - 1), min(max(end, -1), n - 1), step)


def reaches_end(end: Elem, dim: Elem, top: int) -> bool:
    """True when a Slice end of `end` (step 1) runs to the end of an axis of size `dim`."""
    return (
        end == dim or end == top or (isinstance(end, int) and isinstance(dim, int) and end >= dim)
    )


def same_shape(target: tuple[Elem, ...], dims: tuple[Elem, ...], allowzero: int) -> bool:
    """True when Reshape to `target` gives `dims` back: each element is the dim, or 0 (copy), or
    the one -1 standing for a dim when every other one is proven."""
    if len(target) != len(dims):
        return False
    minus = 0
    for e, d in zip(target, dims, strict=True):
        if e == d or (e == 0 and not allowzero):
            continue
        if e == -1:
            minus += 1
            continue
        return False
    return minus <= 1


_RULES: dict[str, Rule] = {
    "Transpose": _transpose, "Reshape": _reshape, "Expand": _expand, "Shape": _shape,
    "Size": _size, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Concat": _concat,
    "Gather": _gather, "MatMul": _matmul, "Flatten": _flatten, "Slice": _slice,
}  # fmt: skip
