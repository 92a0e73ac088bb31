"""Translations of ATen's shape ops to standard ONNX ops: views (view/reshape, permute,
transpose, expand, squeeze/unsqueeze, flatten/unflatten), slicing (slice, select, narrow, flip,
split, unbind, cat, stack), copies and type conversions, creation (full, zeros/ones, *_like,
arange), indexing (index, gather, index_select, slice/select_scatter), and the symbolic-int
arithmetic that computes sizes (`sym_size`, `operator.mul` on sizes, ...).

Semantics follow torch, not ONNX, where the two differ: `expand`'s -1 keeps a dim (ONNX Expand:
1), `squeeze` of a dim that is not 1 does nothing, `flip` is a Slice with step -1 (torch's own
slicing has no negative steps), `cat` skips the legacy 1-D empty tensors, scatters take Python
bounds (negative from the end, clamped). Symbolic ints are rank-0 int64 values.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from graphopt.frontends.torch_context import (
    INT64_MAX,
    INT64_MIN,
    Args,
    Lowering,
    Result,
    translates,
)
from graphopt.ir.core import Value
from graphopt.ir.types import DType


# ----- views and shape ops ----------------------------------------------------------------------
@translates(
    "aten.clone", "aten.alias", "aten.detach", "aten.lift_fresh_copy", "aten.contiguous",
    "aten.lift_fresh",
)  # fmt: skip
def _identity(lw: Lowering, node: Any, a: Args) -> Result:
    return lw.tensor(a["self"])


@translates("aten._to_copy", "aten.to", "aten.type_as")
def _to_copy(lw: Lowering, node: Any, a: Args) -> Result:
    return lw.tensor(a["self"], lw.out_dtype(node))


@translates("aten.dropout", "aten.native_dropout", "aten.feature_dropout")
def _dropout(lw: Lowering, node: Any, a: Args) -> Result:
    if a.get("train"):
        raise lw.fail("dropout in training mode", hint="call module.eval() before exporting")
    x = lw.tensor(a["input"])
    return [x, None] if "native" in str(node.target) else x


@translates("aten.view", "aten._unsafe_view", "aten.reshape", "aten.view_copy")
def _view(lw: Lowering, node: Any, a: Args) -> Result:
    size = a["size"] if "size" in a else a["shape"]
    return lw.op("Reshape", lw.tensor(a["self"]), lw.ints(size))


@translates("aten.flatten.using_ints")
def _flatten(lw: Lowering, node: Any, a: Args) -> Result:
    rank = lw.rank(a["self"])
    if rank == 0:
        return lw.op("Reshape", lw.tensor(a["self"]), lw.const(np.asarray([1], np.int64)))
    start, end = a["start_dim"] % rank, a["end_dim"] % rank
    x = lw.tensor(a["self"])
    shape = [lw.const(np.asarray([0] * start + [-1], np.int64))]
    if end + 1 < rank:
        shape.append(lw.shape(x, start=end + 1))
    target = shape[0] if len(shape) == 1 else lw.op("Concat", *shape, axis=0)
    return lw.op("Reshape", x, target)


@translates("aten.unflatten.int")
def _unflatten(lw: Lowering, node: Any, a: Args) -> Result:  # dim -> sizes (one may be -1)
    rank = lw.rank(a["self"])
    axis = a["dim"] % max(rank, 1)
    x = lw.tensor(a["self"])
    pieces = [lw.const(np.zeros(axis, np.int64)), lw.ints(a["sizes"])]  # 0: copy the dim
    if axis + 1 < rank:
        pieces.append(lw.shape(x, start=axis + 1))
    return lw.op("Reshape", x, lw.op("Concat", *pieces, axis=0))


@translates("aten.permute")
def _permute(lw: Lowering, node: Any, a: Args) -> Result:
    rank = lw.rank(a["self"])
    return lw.op("Transpose", lw.tensor(a["self"]), perm=[d % rank for d in a["dims"]])


@translates("aten.transpose.int")
def _transpose(lw: Lowering, node: Any, a: Args) -> Result:
    rank = lw.rank(a["self"])
    perm = list(range(rank))
    first, second = a["dim0"] % rank, a["dim1"] % rank
    perm[first], perm[second] = perm[second], perm[first]
    return lw.op("Transpose", lw.tensor(a["self"]), perm=perm)


@translates("aten.t")
def _t(lw: Lowering, node: Any, a: Args) -> Result:
    if lw.rank(a["self"]) < 2:
        return lw.tensor(a["self"])
    return lw.op("Transpose", lw.tensor(a["self"]), perm=[1, 0])


@translates("aten.expand", "aten.expand_copy")
def _expand(lw: Lowering, node: Any, a: Args) -> Result:  # torch's -1 keeps a dim: ONNX's 1
    sizes = [1 if lw.static_int(s) == -1 else s for s in a["size"]]
    return lw.op("Expand", lw.tensor(a["self"]), lw.ints(sizes))


@translates("aten.unsqueeze")
def _unsqueeze(lw: Lowering, node: Any, a: Args) -> Result:
    axis = a["dim"] % (lw.rank(a["self"]) + 1)
    return lw.op("Unsqueeze", lw.tensor(a["self"]), lw.const(np.asarray([axis], np.int64)))


@translates("aten.squeeze")
def _squeeze(lw: Lowering, node: Any, a: Args) -> Result:  # only dims that are 1 go
    dims = lw.dims(a["self"])
    rank = len(dims)
    requested = a.get("dim")
    if requested is None:
        candidates = list(range(rank))
    else:
        candidates = [d % max(rank, 1) for d in lw.static_ints(requested, "squeeze dims")]
    axes = [d for d in candidates if dims[d] == 1]
    if len(dims) - len(axes) != lw.rank(node):
        raise lw.fail("squeezes a symbolic dim", hint="export with that dim static")
    if not axes:
        return lw.tensor(a["self"])
    return lw.op("Squeeze", lw.tensor(a["self"]), lw.const(np.asarray(axes, np.int64)))


@translates("aten.slice.Tensor", "aten.slice_copy.Tensor")
def _slice(lw: Lowering, node: Any, a: Args) -> Result:
    start, end, step = a["start"], a["end"], a["step"] or 1
    start = 0 if start is None else start
    end = INT64_MAX if end is None else end
    x = lw.tensor(a["self"])
    if lw.static_int(start) == 0 and (lw.static_int(end) or 0) >= INT64_MAX and step == 1:
        return x
    axis = a["dim"] % max(lw.rank(a["self"]), 1)
    return lw.op(
        "Slice", x, lw.ints([start]), lw.ints([end]), lw.const(np.asarray([axis], np.int64)),
        lw.const(np.asarray([step], np.int64)),
    )  # fmt: skip


@translates("aten.narrow")
def _narrow(lw: Lowering, node: Any, a: Args) -> Result:
    start = lw.int_scalar(a["start"])
    end = lw.op("Add", start, lw.int_scalar(a["length"]))
    axis = a["dim"] % max(lw.rank(a["self"]), 1)
    return lw.op(
        "Slice", lw.tensor(a["self"]), lw.vector(start), lw.vector(end),
        lw.const(np.asarray([axis], np.int64)),
    )  # fmt: skip


@translates("aten.select.int", "aten.select_copy.int")
def _select_int(lw: Lowering, node: Any, a: Args) -> Result:
    axis = a["dim"] % max(lw.rank(a["self"]), 1)
    return lw.op("Gather", lw.tensor(a["self"]), lw.int_scalar(a["index"]), axis=axis)


@translates("aten.flip")
def _flip(lw: Lowering, node: Any, a: Args) -> Result:  # a Slice with step -1 per flipped axis
    rank = lw.rank(a["self"])
    axes = [d % rank for d in lw.static_ints(a["dims"], "flip dims")]
    count = len(axes)
    return lw.op(
        "Slice", lw.tensor(a["self"]), lw.const(np.full(count, -1, np.int64)),
        lw.const(np.full(count, INT64_MIN, np.int64)), lw.const(np.asarray(axes, np.int64)),
        lw.const(np.full(count, -1, np.int64)),
    )  # fmt: skip


@translates("aten.cat", "aten.concat")
def _cat(lw: Lowering, node: Any, a: Args) -> Result:
    dtype = lw.out_dtype(node)
    rank = lw.rank(node)
    # torch lets 1-D empty tensors join anything (legacy); ONNX does not
    parts = [t for t in a["tensors"] if not (lw.rank(t) == 1 and rank > 1 and lw.dims(t) == (0,))]
    axis = a["dim"] % max(rank, 1)
    return lw.op("Concat", *(lw.tensor(t, dtype) for t in parts), axis=axis)


@translates("aten.stack")
def _stack(lw: Lowering, node: Any, a: Args) -> Result:
    dtype = lw.out_dtype(node)
    axis = lw.const(np.asarray([a["dim"] % lw.rank(node)], np.int64))
    parts = [lw.op("Unsqueeze", lw.tensor(t, dtype), axis) for t in a["tensors"]]
    return lw.op("Concat", *parts, axis=a["dim"] % lw.rank(node))


@translates("aten.split.Tensor", "aten.split_with_sizes", "aten.split_copy.Tensor")
def _split(lw: Lowering, node: Any, a: Args) -> Result:
    pieces = lw.meta(node)
    axis = a["dim"] % max(lw.rank(a["self"]), 1)
    x = lw.tensor(a["self"])
    sizes = [p.shape[axis] for p in pieces]
    if all(isinstance(s, int) for s in sizes):
        outputs = lw.op(
            "Split", x, lw.const(np.asarray(sizes, np.int64)), axis=axis, _outputs=len(sizes)
        )
        return list(outputs) if len(sizes) > 1 else [outputs]
    # symbolic sizes: one Slice per piece, from running offsets (the last one clamps)
    requested = a.get("split_sizes") or [a["split_size"]] * len(pieces)
    start: Any = 0
    results: list[Value | None] = []
    axes = lw.const(np.asarray([axis], np.int64))
    for size in requested:
        end = _add_ints(lw, start, size)
        results.append(lw.op("Slice", x, lw.ints([start]), lw.ints([end]), axes))
        start = end
    return results


def _add_ints(lw: Lowering, first: Any, second: Any) -> Any:
    a, b = lw.static_int(first), lw.static_int(second)
    if a is not None and b is not None:
        return a + b
    return lw.op("Add", lw.int_scalar(first), lw.int_scalar(second))


@translates("aten.unbind.int")
def _unbind(lw: Lowering, node: Any, a: Args) -> Result:
    count = len(lw.meta(node))
    axis = a["dim"] % max(lw.rank(a["self"]), 1)
    axes = lw.const(np.asarray([axis], np.int64))
    parts = lw.op(
        "Split", lw.tensor(a["self"]), lw.const(np.ones(count, np.int64)), axis=axis, _outputs=count
    )
    parts = [parts] if count == 1 else list(parts)
    return [lw.op("Squeeze", p, axes) for p in parts]


@translates("aten.repeat")
def _repeat(lw: Lowering, node: Any, a: Args) -> Result:
    x = lw.tensor(a["self"])
    extra = len(a["repeats"]) - lw.rank(a["self"])
    if extra > 0:
        x = lw.op("Unsqueeze", x, lw.const(np.arange(extra, dtype=np.int64)))
    return lw.op("Tile", x, lw.ints(a["repeats"]))


@translates("aten.tril", "aten.triu")
def _trilu(lw: Lowering, node: Any, a: Args) -> Result:
    upper = int("triu" in str(node.target))
    k = lw.int_scalar(a.get("diagonal", 0))
    return lw.op("Trilu", lw.tensor(a["self"]), k, upper=upper)


@translates("aten.constant_pad_nd")
def _pad(lw: Lowering, node: Any, a: Args) -> Result:  # torch pairs go from the last dim back
    rank = lw.rank(a["self"])
    pad = lw.static_ints(a["pad"], "padding")
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):
        begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    dtype = lw.out_dtype(node)
    value = lw.tensor(a.get("value") or 0, dtype)
    return lw.op("Pad", lw.tensor(a["self"]), lw.const(np.asarray(begins + ends, np.int64)), value)


# ----- creation ---------------------------------------------------------------------------------
def _filled(lw: Lowering, node: Any, size: Any, fill: Any) -> Value:
    """A tensor of `size` (ints, symbolic ints, or a shape value) filled with `fill`."""
    dtype = lw.out_dtype(node)
    static = [] if isinstance(size, Value) else [lw.static_int(s) for s in size]
    known = [s for s in static if s is not None]
    if not isinstance(size, Value) and len(known) == len(static):
        if isinstance(fill, (bool, int, float)) and int(np.prod(known)) <= 1024:
            return lw.const(np.full(known, fill, dtype=dtype.numpy), dtype)
    shape = size if isinstance(size, Value) else lw.ints(size)
    if isinstance(fill, (bool, int, float)):
        return lw.op("ConstantOfShape", shape, value=np.full([1], fill, dtype=dtype.numpy))
    return lw.op("Expand", lw.tensor(fill, dtype), shape)


@translates("aten.full.default", "aten.new_full")
def _full(lw: Lowering, node: Any, a: Args) -> Result:
    return _filled(lw, node, a["size"], a["fill_value"])


@translates(
    "aten.zeros.default", "aten.new_zeros", "aten.empty.memory_format", "aten.new_empty",
    "aten.empty.default",
)  # fmt: skip
def _zeros(lw: Lowering, node: Any, a: Args) -> Result:
    return _filled(lw, node, a["size"], 0)


@translates("aten.ones.default", "aten.new_ones")
def _ones(lw: Lowering, node: Any, a: Args) -> Result:
    return _filled(lw, node, a["size"], 1)


@translates(
    "aten.full_like", "aten.zeros_like", "aten.ones_like", "aten.empty_like", "aten.fill.Scalar",
    "aten.fill.Tensor",
)  # fmt: skip
def _like(lw: Lowering, node: Any, a: Args) -> Result:
    name = str(node.target)
    fill = 1 if "ones" in name else a.get("fill_value", a.get("value", 0))
    if "zeros" in name or "empty" in name:
        fill = 0
    size = list(lw.meta(a["self"]).shape)
    if all(isinstance(s, int) for s in size):
        return _filled(lw, node, size, fill)
    return _filled(lw, node, lw.shape(lw.tensor(a["self"])), fill)


@translates("aten.scalar_tensor")
def _scalar_tensor(lw: Lowering, node: Any, a: Args) -> Result:
    return lw.tensor(a["s"], lw.out_dtype(node))


@translates("aten.arange.default", "aten.arange.start", "aten.arange.start_step")
def _arange(lw: Lowering, node: Any, a: Args) -> Result:
    dtype = lw.out_dtype(node)
    start, end, step = a.get("start", 0), a["end"], a.get("step", 1)
    bounds = [start, end, step]
    if all(isinstance(b, (int, float)) for b in bounds):
        return lw.const(np.arange(start, end, step).astype(dtype.numpy), dtype)
    return lw.op("Range", *(lw.tensor(b, dtype) for b in bounds))


# ----- indexing ---------------------------------------------------------------------------------
@translates("aten.index.Tensor", "aten._unsafe_index.Tensor")
def _index(lw: Lowering, node: Any, a: Args) -> Result:
    """x[i0, i1, ...]: one index tensor -> Gather on its axis; several leading ones -> GatherND
    of the broadcast indices stacked on a last axis."""
    present = [(axis, i) for axis, i in enumerate(a["indices"]) if i is not None]
    x = lw.tensor(a["self"])
    if any(lw.dtype_of(i) == DType.BOOL for _, i in present):
        raise lw.fail(
            "indexing with a bool mask (its result size depends on the data)",
            hint="use torch.where(mask, x, fill) or index with integer positions",
        )
    if len(present) == 1:
        axis, index = present[0]
        return lw.op("Gather", x, lw.tensor(index, DType.INT64), axis=axis)
    if [axis for axis, _ in present] != list(range(len(present))):
        raise lw.fail(
            "advanced indexing with several index tensors that are not the leading dims",
            hint="index the leading dims (permute first), or index one dim at a time",
        )
    indices = [lw.tensor(i, DType.INT64) for _, i in present]
    broadcast = indices[0]
    for other in indices[1:]:
        broadcast = lw.op("Add", broadcast, other)
    shape = lw.shape(broadcast)
    last = lw.const(np.asarray([-1], np.int64))
    stacked = [lw.op("Unsqueeze", lw.op("Expand", i, shape), last) for i in indices]
    return lw.op("GatherND", x, lw.op("Concat", *stacked, axis=-1))


@translates("aten.index_select")
def _index_select(lw: Lowering, node: Any, a: Args) -> Result:
    axis = a["dim"] % max(lw.rank(a["self"]), 1)
    return lw.op("Gather", lw.tensor(a["self"]), lw.tensor(a["index"], DType.INT64), axis=axis)


@translates("aten.gather.default")
def _gather(lw: Lowering, node: Any, a: Args) -> Result:
    axis = a["dim"] % max(lw.rank(a["self"]), 1)
    index = lw.tensor(a["index"], DType.INT64)
    return lw.op("GatherElements", lw.tensor(a["self"]), index, axis=axis)


@translates("aten.slice_scatter.default")
def _slice_scatter(lw: Lowering, node: Any, a: Args) -> Result:  # x[..., start:end:step] = src
    start = 0 if a["start"] is None else a["start"]
    end = INT64_MAX if a["end"] is None else a["end"]
    return _scatter_range(lw, a, a["dim"], start, end, a["step"] or 1, lw.tensor(a["src"]))


@translates("aten.select_scatter.default")
def _select_scatter(lw: Lowering, node: Any, a: Args) -> Result:  # x[..., index] = src
    axis = a["dim"] % max(lw.rank(a["self"]), 1)
    source = lw.op("Unsqueeze", lw.tensor(a["src"]), lw.const(np.asarray([axis], np.int64)))
    index = a["index"]
    end = -1 if lw.static_int(index) == -1 else _add_ints(lw, index, 1)
    return _scatter_range(lw, a, axis, index, INT64_MAX if end == -1 else end, 1, source)


def _scatter_range(
    lw: Lowering, a: Args, dim: int, start: Any, end: Any, step: int, src: Value
) -> Value:
    """Write `src` over positions range(start, end, step) of axis `dim` (Python bounds: negative
    counts from the end, past the end clamps): ScatterND on the axis moved to the front."""
    rank = lw.rank(a["self"])
    axis = dim % max(rank, 1)
    dtype = lw.dtype_of(a["self"])
    x = lw.tensor(a["self"])
    size = lw.op("Gather", lw.shape(x), lw.const(np.asarray(axis, np.int64)))
    bounds = [_python_bound(lw, bound, size) for bound in (start, end)]
    positions = lw.op("Range", bounds[0], bounds[1], lw.const(np.asarray(step, np.int64)))
    perm = [axis] + [d for d in range(rank) if d != axis]
    front = lw.op("Transpose", x, perm=perm)
    updates = lw.op("Transpose", lw.cast(src, dtype), perm=perm)
    indices = lw.op("Unsqueeze", positions, lw.const(np.asarray([1], np.int64)))
    scattered = lw.op("ScatterND", front, indices, updates)
    return lw.op("Transpose", scattered, perm=[perm.index(d) for d in range(rank)])


def _python_bound(lw: Lowering, bound: Any, size: Value) -> Value:
    """A slice bound as a position in [0, size]: negative ones count from the end."""
    static = lw.static_int(bound)
    if static is not None and static >= INT64_MAX:
        return size
    value = lw.int_scalar(bound)
    if static is not None and static >= 0:
        return lw.op("Min", value, size)
    negative = lw.op("Less", value, lw.const(np.asarray(0, np.int64)))
    shifted = lw.op("Where", negative, lw.op("Add", value, size), value)
    zero = lw.const(np.asarray(0, np.int64))
    return lw.op("Min", lw.op("Max", shifted, zero), size)


@translates("aten.copy.default")
def _copy(lw: Lowering, node: Any, a: Args) -> Result:  # self's shape and type, src's values
    source = lw.tensor(a["src"], lw.out_dtype(node))
    return lw.op("Expand", source, lw.shape(lw.tensor(a["self"])))


@translates("aten._local_scalar_dense", "aten.item")
def _item(lw: Lowering, node: Any, a: Args) -> Result:
    return lw.op("Reshape", lw.tensor(a["self"]), lw.const(np.zeros(0, np.int64)))


# ----- symbolic ints ----------------------------------------------------------------------------
@translates("aten.sym_size.int")
def _sym_size(lw: Lowering, node: Any, a: Args) -> Result:
    axis = a["dim"] % max(lw.rank(a["self"]), 1)
    return lw.op("Gather", lw.shape(lw.tensor(a["self"])), lw.const(np.asarray(axis, np.int64)))


@translates("aten.sym_numel")
def _sym_numel(lw: Lowering, node: Any, a: Args) -> Result:
    return lw.op("ReduceProd", lw.shape(lw.tensor(a["self"])), keepdims=0)


SYMBOLIC = {
    operator.add: "Add", operator.sub: "Sub", operator.mul: "Mul", operator.mod: "Mod",
    operator.eq: "Equal", operator.lt: "Less", operator.le: "LessOrEqual",
    operator.gt: "Greater", operator.ge: "GreaterOrEqual",
}  # fmt: skip


def _symbolic(op: str) -> Any:
    def translate(lw: Lowering, node: Any, a: Args) -> Result:
        dtype = lw.promoted(a["0"], a["1"])
        return lw.op(op, lw.tensor(a["0"], dtype), lw.tensor(a["1"], dtype))

    return translate


for _function, _op in SYMBOLIC.items():
    translates(f"operator.{_function.__name__}")(_symbolic(_op))


@translates("operator.floordiv")
def _floordiv(lw: Lowering, node: Any, a: Args) -> Result:
    dtype = lw.out_dtype(node)
    if not dtype.is_float:  # sizes: non-negative, where Div's truncation is floor
        return lw.op("Div", lw.tensor(a["0"], dtype), lw.tensor(a["1"], dtype))
    return lw.op("Floor", lw.op("Div", lw.tensor(a["0"], dtype), lw.tensor(a["1"], dtype)))


@translates("operator.truediv")
def _truediv(lw: Lowering, node: Any, a: Args) -> Result:
    return lw.op("Div", lw.tensor(a["0"], DType.DOUBLE), lw.tensor(a["1"], DType.DOUBLE))


@translates("operator.neg")
def _neg(lw: Lowering, node: Any, a: Args) -> Result:
    return lw.op("Neg", lw.tensor(a["0"]))


@translates("torch.sym_max", "torch.sym_min")
def _sym_max(lw: Lowering, node: Any, a: Args) -> Result:
    op = "Max" if "max" in str(node.target.__name__) else "Min"
    dtype = lw.promoted(a["0"], a["1"])
    return lw.op(op, lw.tensor(a["0"], dtype), lw.tensor(a["1"], dtype))


@translates("torch.sym_float")
def _sym_float(lw: Lowering, node: Any, a: Args) -> Result:
    return lw.tensor(a["0"], DType.DOUBLE)


@translates("torch.sym_int")
def _sym_int(lw: Lowering, node: Any, a: Args) -> Result:
    return lw.tensor(a["0"], DType.INT64)


@translates("torch.sym_not")
def _sym_not(lw: Lowering, node: Any, a: Args) -> Result:
    return lw.op("Not", lw.tensor(a["0"], DType.BOOL))
