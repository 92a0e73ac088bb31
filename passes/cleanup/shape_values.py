"""Shape vectors: the element values of the small integer tensors that shape arithmetic computes.

Exporters compute target shapes at run time: `Shape(x) -> Gather(0) -> Unsqueeze -> Concat(.., [4])
-> Reshape`. `ShapeValues` walks one graph in topological order, once, and gives every small
integer (or bool) value of rank 0 or 1 a `ShapeVec`: one `Elem` per element, an `int` when the value
is known, a symbol (`"batch"`) or a dim token when it is a dim of some tensor, an element token
when nothing is known. Transfer functions:

- leaves: initializers and `Constant` outputs (their numbers); any other integer value whose
  declared type is static and tiny gets element tokens (unknown but individually named);
- `Shape` (with opset 15's `start`/`end`) reads the dims `DimAnalysis` proves, `Size` multiplies;
- `Identity`, `Cast` (to integer types: symbols survive casts to int32/int64), `Gather`, `Slice`
  (inputs or, before opset 10, attributes), `Concat`, `Unsqueeze`/`Squeeze` (axes as input from
  opset 13, attribute before), `Reshape`/`Expand` of vectors, `Range`, `ConstantOfShape`;
- `Add Sub Mul Div Neg Abs Max Min Equal Not Where` element by element with broadcasting: numbers
  compute (a result that overflows the dtype, or an inexact or negative Div, stays unknown), and
  identities hold for anything (`a - a = 0`, `a * 1 = a`, `max(a, a) = a`, `Equal(a, a)`); a size
  is never negative, so `Equal(dim, -1)` is false (TorchScript's `expand` pattern relies on it).

A result that is not provable becomes an element token of the output, never a guess. Vectors have
at most `MAX_VECTOR` elements. The walk is linear; `DimAnalysis` adds at most one inference per
value it is asked about.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from graphopt.ir.core import Graph, Node, Value
from graphopt.ir.inference import constant_value
from graphopt.ir.types import DType, TensorType
from graphopt.passes.cleanup.shape_dims import (
    DimAnalysis,
    Elem,
    ShapeVec,
    Token,
    axes_of,
    is_size,
    shape_range,
    slice_indices,
    slice_params,
)

__all__ = ["MAX_VECTOR", "SHAPE_OPS", "ShapeValues"]

MAX_VECTOR = 1024  # elements: shape vectors are short; Range outputs may be longer
OPAQUE_LIMIT = 16  # unknown integer values get element tokens up to this size


class ShapeValues:
    """The shape vectors of one graph (call `run()` once, then `vector(value)`), and its dims."""

    def __init__(self, graph: Graph, opset_imports: Mapping[str, int]):
        self.graph = graph
        self.vectors: dict[Value, ShapeVec | None] = {}
        self.dims = DimAnalysis(opset_imports, self.vector)

    def run(self) -> ShapeValues:
        for node in self.graph:
            self.visit(node)
        return self

    def vector(self, value: Value | None) -> ShapeVec | None:
        """The value's shape vector, or None when it is not a small integer tensor of rank <= 1."""
        if value is None:
            return None
        if value in self.vectors:
            return self.vectors[value]
        vec = self.vectors[value] = _leaf(value)
        return vec

    def visit(self, node: Node) -> None:
        handler = _HANDLERS.get(node.op_type) if node.domain == "" else None
        result = None
        if handler is not None and len(node.outputs) == 1:
            result = handler(self, node)
            if result is not None and len(result.elems) > MAX_VECTOR:
                result = None
        for value in node.outputs:
            self.vectors[value] = result if result is not None else _leaf(value)


def _leaf(value: Value) -> ShapeVec | None:
    array = constant_value(value, limit=MAX_VECTOR)
    producer = value.producer
    if array is None and producer is not None and producer.op == "Constant":
        if "value_int" in producer.attrs:
            array = np.array(producer.get_attr("value_int"), np.int64)
        elif "value_ints" in producer.attrs:
            array = np.array(producer.get_attr("value_ints"), np.int64).reshape(-1)
    if array is not None:
        if array.dtype.kind not in "iub" or array.ndim > 1:
            return None
        elems = tuple(int(x) for x in array.reshape(-1))
        return ShapeVec(elems, DType.from_numpy(array.dtype), array.ndim == 0)
    t = value.type
    if (
        isinstance(t, TensorType)
        and (t.dtype.is_integer or t.dtype is DType.BOOL)
        and t.is_static
        and t.rank is not None
        and t.rank <= 1
        and (t.numel() or 0) <= OPAQUE_LIMIT
    ):
        n = t.numel() or 0
        return ShapeVec(tuple(Token("elem", value, i) for i in range(n)), t.dtype, t.rank == 0)
    return None


def _fits(e: int, dtype: DType) -> bool:
    if dtype is DType.BOOL:
        return e in (0, 1)
    info = np.iinfo(dtype.numpy)
    return int(info.min) <= e <= int(info.max)


def _all_vectors(sv: ShapeValues, values: list[Value | None]) -> list[ShapeVec] | None:
    """The vectors of all `values`, or None when one has none."""
    vecs = [sv.vector(v) for v in values]
    return None if any(v is None for v in vecs) else [v for v in vecs if v is not None]


def _known(out: Value, index: int, e: Elem | None, dtype: DType) -> Elem:
    """`e` if it is a value of `dtype`, else a token for element `index` of `out`."""
    if e is None or (isinstance(e, int) and not _fits(e, dtype)):
        return Token("elem", out, index)
    return e


def _static_ints(vec: ShapeVec | None) -> list[int] | None:
    return vec.ints() if vec is not None and vec.is_static else None


# ----- transfer functions ---------------------------------------------------------------------------

Handler = Callable[[ShapeValues, Node], ShapeVec | None]


def _shape(sv: ShapeValues, node: Node) -> ShapeVec | None:
    dims = sv.dims.dims(node.inputs[0])
    if dims is None:
        return None
    start, end = shape_range(node, len(dims))
    return ShapeVec(tuple(dims[start:end]), DType.INT64)


def _size(sv: ShapeValues, node: Node) -> ShapeVec | None:
    dims = sv.dims.dims(node.inputs[0])
    if dims is None:
        return None
    if all(isinstance(d, int) for d in dims):
        n: Elem = int(np.prod(dims, dtype=np.int64))  # type: ignore[arg-type]
    else:
        n = 0 if 0 in dims else Token("elem", node.output, 0)
    return ShapeVec((n,), DType.INT64, scalar=True)


def _identity(sv: ShapeValues, node: Node) -> ShapeVec | None:
    return sv.vector(node.inputs[0])


def _cast(sv: ShapeValues, node: Node) -> ShapeVec | None:
    vec = sv.vector(node.inputs[0])
    to = node.get_attr("to", 0)
    if vec is None or to not in DType._value2member_map_:
        return None
    target = DType(to)
    if not (target.is_integer or target is DType.BOOL):
        return None
    out: list[Elem] = []
    for i, e in enumerate(vec.elems):
        if isinstance(e, int):
            cast = np.array(e, dtype=vec.dtype.numpy).astype(target.numpy)
            out.append(int(cast))
        elif target is DType.INT64 and vec.dtype.is_integer and vec.dtype is not DType.UINT64:
            out.append(e)  # widening keeps every value
        elif target is DType.INT32 and is_size(e):
            out.append(e)  # dims fit in int32 (as every exporter that casts them assumes)
        else:
            out.append(Token("elem", node.output, i))
    return ShapeVec(tuple(out), target, vec.scalar)


def _gather(sv: ShapeValues, node: Node) -> ShapeVec | None:
    data, indices = sv.vector(node.inputs[0]), sv.vector(node.inputs[1])
    idx = _static_ints(indices)
    if data is None or data.scalar or indices is None or idx is None:
        return None
    if node.get_attr("axis", 0) not in (0, -1):
        return None
    n = len(data.elems)
    if any(not -n <= i < n for i in idx):
        return None
    return ShapeVec(tuple(data.elems[i] for i in idx), data.dtype, indices.scalar)


def _slice(sv: ShapeValues, node: Node) -> ShapeVec | None:
    data = sv.vector(node.inputs[0])
    params = slice_params(sv.vector, node)
    if data is None or data.scalar or params is None:
        return None
    if any(a not in (0, -1) for a in params.axes) or len(params.axes) > 1:
        return None
    if not params.axes:
        return data
    end = params.ends[0]
    if not isinstance(end, int):
        return None
    indices = slice_indices(len(data.elems), params.starts[0], end, params.steps[0])
    if indices is None:
        return None
    return ShapeVec(tuple(data.elems[i] for i in indices), data.dtype)


def _concat(sv: ShapeValues, node: Node) -> ShapeVec | None:
    if node.get_attr("axis", 0) not in (0, -1):
        return None
    parts = _all_vectors(sv, [v for v in node.inputs if v is not None])
    if not parts or any(p.scalar or p.dtype != parts[0].dtype for p in parts):
        return None
    return ShapeVec(tuple(e for p in parts for e in p.elems), parts[0].dtype)


def _unsqueeze(sv: ShapeValues, node: Node) -> ShapeVec | None:
    vec, axes = sv.vector(node.inputs[0]), axes_of(sv.dims, node, 1)
    if vec is None or not vec.scalar or axes not in ([0], [-1]):
        return None
    return ShapeVec(vec.elems, vec.dtype)


def _squeeze(sv: ShapeValues, node: Node) -> ShapeVec | None:
    vec, axes = sv.vector(node.inputs[0]), axes_of(sv.dims, node, 1)
    if vec is None or vec.scalar:
        return None
    if len(vec.elems) == 1 and (axes is None or axes in ([0], [-1])):
        return ShapeVec(vec.elems, vec.dtype, scalar=True)
    return vec if axes is None or axes == [] else None


def _reshape(sv: ShapeValues, node: Node) -> ShapeVec | None:
    vec, target = sv.vector(node.inputs[0]), _static_ints(sv.vector(node.inputs[1]))
    if vec is None or target is None or len(target) > 1:
        return None
    n = len(vec.elems)
    if not target:
        return ShapeVec(vec.elems, vec.dtype, scalar=True) if n == 1 else None
    t = target[0]
    if t == -1 or t == n or (t == 0 and not node.get_attr("allowzero", 0) and not vec.scalar):
        return ShapeVec(vec.elems, vec.dtype)
    return None


def _expand(sv: ShapeValues, node: Node) -> ShapeVec | None:
    vec, target = sv.vector(node.inputs[0]), _static_ints(sv.vector(node.inputs[1]))
    if vec is None or target is None or len(target) > 1:
        return None
    if not target:
        return vec
    n, t = len(vec.elems), target[0]
    if t == 1 or t == n:
        return ShapeVec(vec.elems, vec.dtype)
    if n == 1 and 0 <= t <= MAX_VECTOR:
        return ShapeVec(vec.elems * t, vec.dtype)
    return None


def _range(sv: ShapeValues, node: Node) -> ShapeVec | None:
    args = _all_vectors(sv, list(node.inputs))
    if args is None or len(args) != 3 or any(not a.scalar or not a.is_static for a in args):
        return None
    start, limit, delta = (a.ints()[0] for a in args)
    if delta == 0:
        return None
    n = max(-(-(limit - start) // delta), 0)
    if n > MAX_VECTOR:
        return None
    return ShapeVec(tuple(start + i * delta for i in range(n)), args[0].dtype)


def _constant_of_shape(sv: ShapeValues, node: Node) -> ShapeVec | None:
    shape = sv.vector(node.inputs[0])
    value = node.get_attr("value")
    if shape is None or shape.scalar or not shape.is_static or len(shape.elems) > 1:
        return None
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iub" or value.size != 1:
        return None
    fill = int(value.reshape(-1)[0])
    dtype = DType.from_numpy(value.dtype)
    if not shape.elems:
        return ShapeVec((fill,), dtype, scalar=True)
    n = shape.ints()[0]
    return ShapeVec((fill,) * n, dtype) if 0 <= n <= MAX_VECTOR else None


# ----- element-wise arithmetic ---------------------------------------------------------------------

ElemFn = Callable[..., "Elem | None"]


def _elementwise(fn: ElemFn, *, result: DType | None = None, first: int = 0) -> Handler:
    """A handler applying `fn` element by element with broadcasting; the output dtype is `result`
    or the dtype of input `first` (all inputs from `first` on must share it)."""

    def handler(sv: ShapeValues, node: Node) -> ShapeVec | None:
        vecs = _all_vectors(sv, list(node.inputs))
        if not vecs or len(vecs) <= first:
            return None
        dtype = vecs[first].dtype
        if any(v.dtype != dtype for v in vecs[first:]):
            return None
        lengths = {len(v.elems) for v in vecs} - {1}
        if len(lengths) > 1:
            return None
        n = lengths.pop() if lengths else 1
        out_dtype = result or dtype
        elems = []
        for i in range(n):
            args = [v.elems[i if len(v.elems) > 1 else 0] for v in vecs]
            elems.append(_known(node.output, i, fn(*args), out_dtype))
        return ShapeVec(tuple(elems), out_dtype, all(v.scalar for v in vecs))

    return handler


def _ints(*args: Elem) -> bool:
    return all(isinstance(a, int) for a in args)


def _add(a: Elem, b: Elem) -> Elem | None:
    if isinstance(a, int) and isinstance(b, int):
        return a + b
    return b if a == 0 else a if b == 0 else None


def _sub(a: Elem, b: Elem) -> Elem | None:
    if isinstance(a, int) and isinstance(b, int):
        return a - b
    return a if b == 0 else 0 if a == b else None


def _mul(a: Elem, b: Elem) -> Elem | None:
    if isinstance(a, int) and isinstance(b, int):
        return a * b
    return b if a == 1 else a if b == 1 else 0 if a == 0 or b == 0 else None


def _div(a: Elem, b: Elem) -> Elem | None:
    """Exact or non-negative quotients only: floor and truncation agree there."""
    if isinstance(a, int) and isinstance(b, int):
        exact = b != 0 and (a % b == 0 or (a >= 0 and b > 0))
        return a // b if exact else None
    return a if b == 1 else None


def _max(*args: Elem) -> Elem | None:
    return _extreme(max, args)


def _min(*args: Elem) -> Elem | None:
    return _extreme(min, args)


def _extreme(pick: Callable[..., int], args: tuple[Elem, ...]) -> Elem | None:
    """max/min of the elements: numbers compute, equal elements are themselves, and a size
    (never negative) beats numbers <= 0 for max and loses to them for min."""
    if all(a == args[0] for a in args):
        return args[0]
    ints = [a for a in args if isinstance(a, int)]
    others = {a for a in args if not isinstance(a, int)}
    if not others:
        return pick(ints)
    if len(others) == 1 and is_size(next(iter(others))) and all(i <= 0 for i in ints):
        return next(iter(others)) if pick is max else pick(ints)
    return None


def _equal(a: Elem, b: Elem) -> Elem | None:
    if a == b:
        return 1
    if _ints(a, b):
        return 0
    negative = (isinstance(b, int) and b < 0 and is_size(a)) or (
        isinstance(a, int) and a < 0 and is_size(b)
    )
    return 0 if negative else None


def _neg(a: Elem) -> Elem | None:
    return -a if isinstance(a, int) else None


def _abs(a: Elem) -> Elem | None:
    return abs(a) if isinstance(a, int) else a if is_size(a) else None


def _not(a: Elem) -> Elem | None:
    return int(not a) if isinstance(a, int) else None


def _where(c: Elem, a: Elem, b: Elem) -> Elem | None:
    if isinstance(c, int):
        return a if c else b
    return a if a == b else None


_HANDLERS: dict[str, Handler] = {
    "Shape": _shape, "Size": _size, "Identity": _identity, "Cast": _cast, "Gather": _gather,
    "Slice": _slice, "Concat": _concat, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "Reshape": _reshape, "Expand": _expand, "Range": _range, "ConstantOfShape": _constant_of_shape,
    "Add": _elementwise(_add), "Sub": _elementwise(_sub), "Mul": _elementwise(_mul),
    "Div": _elementwise(_div), "Neg": _elementwise(_neg), "Abs": _elementwise(_abs),
    "Max": _elementwise(_max), "Min": _elementwise(_min),
    "Equal": _elementwise(_equal, result=DType.BOOL), "Not": _elementwise(_not),
    "Where": _elementwise(_where, first=1),
}  # fmt: skip
SHAPE_OPS = frozenset(_HANDLERS)  # ops with a transfer function (none has a subgraph)
