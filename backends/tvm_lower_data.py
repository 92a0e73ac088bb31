"""Relax lowerings of the shape, data-movement and indexing op families: Shape, Reshape and its
kin, Transpose, Concat, Split, Slice, Gather/Scatter, Expand, Tile, Constant(OfShape), Range,
Pad and Trilu.

Split from `tvm_lower.py` (the driver, the shape machinery and the element-wise family) to keep
each module small; registered the same way, with `tvm_lower.lowering`. These ops are where the
compile-time shape arithmetic happens: on a `Known` input (a small integer tensor whose elements
are ints or TIR expressions) they compute a `Known` result instead of emitting Relax, so the
Shape -> Gather -> Concat -> Reshape chains of exported models become static or symbolic
reshapes. Semantics are the ONNX spec's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from tvm import relax, tirx, topi

from graphopt.backends.tvm_lower import (
    KNOWN_LIMIT,
    Known,
    Lowerer,
    _broadcast_dims,
    _prim,
    _same_dim,
    _simplify,
    axes_input,
    axis_of,
    broadcast_to,
    constant,
    lowering,
)
from graphopt.ir.core import Node

INT64_MAX = 2**63 - 1


@lowering("Shape", "Size")
def lower_shape(lw: Lowerer, node: Node) -> list[Any]:
    known = lw.known(node.inputs[0])
    dims = list(known.items.shape) if known is not None else lw.shape_of(lw.x(node.inputs[0]))
    if node.op_type == "Size":
        return [Known(np.array(_simplify(math.prod(dims, start=1)), dtype=object), "int64")]
    start, end = node.get_attr("start", 0), node.get_attr("end", len(dims))
    items = dims[slice(start, end)]
    return [Known(np.array(items + [None], dtype=object)[:-1], "int64")]


def _reshape_target(lw: Lowerer, dims: list[Any], target: list[Any], allowzero: bool) -> list[Any]:
    out = [dims[i] if (t == 0 and not allowzero) else t for i, t in enumerate(target)]
    if -1 in out:
        rest = math.prod([d for d in out if not (isinstance(d, int) and d == -1)], start=1)
        out[out.index(-1)] = _simplify(tirx.floordiv(_prim(math.prod(dims, start=1)), _prim(rest)))
    return out


@lowering("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def lower_reshape(lw: Lowerer, node: Node) -> list[Any]:
    """Views: the new shape is computed at compile time; known values are reshaped there too."""
    known = lw.known(node.inputs[0])
    dims = list(known.items.shape) if known is not None else lw.shape_of(lw.x(node.inputs[0]))
    rank, op = len(dims), node.op_type
    if op == "Reshape":
        target = lw.shape_arg(node.inputs[1])  # type: ignore[arg-type]
        shape = _reshape_target(lw, dims, target, bool(node.get_attr("allowzero", 0)))
    elif op == "Flatten":
        axis = axis_of(node, rank, default=1)
        shape = [math.prod(dims[:axis], start=1), math.prod(dims[axis:], start=1)]
    elif op == "Squeeze":
        axes = axes_input(lw, node, 1, rank)
        if axes is None:
            axes = [i for i, d in enumerate(dims) if isinstance(d, int) and d == 1]
        shape = [d for i, d in enumerate(dims) if i not in axes]
    else:
        out_rank = rank + len(axes_input(lw, node, 1, 0) or [])
        axes = sorted(a + out_rank if a < 0 else a for a in (axes_input(lw, node, 1, 0) or []))
        rest = iter(dims)
        shape = [1 if i in axes else next(rest) for i in range(out_rank)]
    shape = [_simplify(d) for d in shape]
    if known is not None and all(isinstance(d, int) for d in shape):
        return [Known(known.items.reshape(shape), known.dtype)]
    return [relax.op.reshape(lw.x(node.inputs[0]), relax.ShapeExpr([_prim(d) for d in shape]))]


@lowering("Transpose")
def lower_transpose(lw: Lowerer, node: Node) -> list[Any]:
    x = lw.x(node.inputs[0])
    perm = node.get_attr("perm")
    return [relax.op.permute_dims(x, list(perm) if perm is not None else None)]


@lowering("Concat")
def lower_concat(lw: Lowerer, node: Node) -> list[Any]:
    inputs = [v for v in node.inputs if v is not None]
    knowns = [lw.known(v) for v in inputs]
    if all(k is not None for k in knowns):
        arrays = [k.items for k in knowns]  # type: ignore[union-attr]
        axis = axis_of(node, arrays[0].ndim)
        return [Known(np.concatenate(arrays, axis=axis), knowns[0].dtype)]  # type: ignore[union-attr]
    xs = [lw.x(v) for v in inputs]
    xs = [x for x in xs if not any(isinstance(d, int) and d == 0 for d in lw.shape_of(x))] or xs[:1]
    axis = axis_of(node, lw.rank(xs[0]))
    shapes = [lw.shape_of(x) for x in xs]
    # the other dims are equal: the first operand's, or a number where another has one
    dims = [next((s[i] for s in shapes if isinstance(s[i], int)), d) for i, d in enumerate(shapes[0])]  # fmt: skip  # noqa: E501
    same = [all(_same_dim(d, dims[i]) for i, d in enumerate(s) if i != axis) for s in shapes]
    xs = [x if ok else lw.match(x, dims[:axis] + [s[axis]] + dims[axis + 1 :])
          for x, s, ok in zip(xs, shapes, same, strict=True)]  # fmt: skip
    return [relax.op.concat(xs, axis=axis)]


@lowering("Split")
def lower_split(lw: Lowerer, node: Node) -> list[Any]:
    x = lw.x(node.inputs[0])
    dims = lw.shape_of(x)
    axis = axis_of(node, len(dims))
    sizes = node.get_attr("split")
    if sizes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = lw.ints(node.inputs[1], "split", static=True)
    n = len(node.outputs)
    if sizes is None and isinstance(dims[axis], int):
        chunk = -(-dims[axis] // n)  # opset 18: the last chunk may be smaller
        sizes = [chunk] * (n - 1) + [dims[axis] - chunk * (n - 1)]
    if sizes is None:
        parts = lw.emit(relax.op.split(x, n, axis))
    else:
        points = list(np.cumsum(sizes)[:-1].tolist())
        parts = lw.emit(relax.op.split(x, points, axis))
    return [relax.TupleGetItem(parts, i) for i in range(n)]


def _slice_known(known: Known, starts: list[int], ends: list[int], axes: list[int],
                 steps: list[int]) -> Known:  # fmt: skip
    index = [slice(None)] * known.items.ndim
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        index[a] = slice(s, e, st)
    return Known(known.items[tuple(index)], known.dtype)


@lowering("Slice")
def lower_slice(lw: Lowerer, node: Node) -> list[Any]:
    inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
    if node.get_attr("starts") is not None:  # opset < 10
        starts, ends = node.get_attr("starts"), node.get_attr("ends")
        axes, steps = node.get_attr("axes"), None
    else:
        starts = lw.ints(inputs[1], "starts")
        ends = lw.ints(inputs[2], "ends")
        axes = lw.ints(inputs[3], "axes", static=True)
        steps = lw.ints(inputs[4], "steps", static=True)
    assert starts is not None and ends is not None
    known = lw.known(inputs[0])
    rank = known.items.ndim if known is not None else lw.rank(lw.x(inputs[0]))
    axes = [a + rank if a < 0 else a for a in (axes or range(len(starts)))]
    steps = steps or [1] * len(starts)
    if known is not None and all(isinstance(v, int) for v in starts + ends):
        return [_slice_known(known, starts, ends, axes, steps)]
    x = lw.x(inputs[0])
    dims = lw.shape_of(x)
    begins, stops, inbound = [], [], True
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        b, f = _slice_bounds(dims[a], s, e, st)
        inbound = inbound and b is not None
        begins.append(s if b is None else b)
        stops.append(e if f is None else f)
    if not inbound:  # a negative step: TVM clamps at run time
        stops = [min(max(v, -INT64_MAX), INT64_MAX) if isinstance(v, int) else v for v in stops]
    return [
        relax.op.strided_slice(
            x, axes, [_prim(v) for v in begins], [_prim(v) for v in stops], steps,
            assume_inbound=inbound,
        )
    ]  # fmt: skip


def _slice_bounds(dim: Any, start: Any, end: Any, step: int) -> tuple[Any, Any]:
    """Begin and end of one sliced axis, clamped into the dim as ONNX says, so that TVM can
    take them as they are; (None, None) when that needs the value of a symbolic dim."""
    if step < 0:
        return None, None
    if isinstance(dim, int) and isinstance(start, int) and isinstance(end, int):
        r = range(dim)[slice(start, end, step)]
        return (r.start, r.start + len(r) * step) if len(r) else (0, 0)

    def clamp(v: Any) -> Any:
        if not isinstance(v, int):
            return v  # a symbolic bound: taken to lie inside the dim (sequence <= positions)
        if v < 0:
            return _simplify(tirx.max(_prim(v) + _prim(dim), tirx.const(0, "int64")))
        return dim if v >= 2**31 else _simplify(tirx.min(_prim(v), _prim(dim)))

    begin = clamp(start)
    return begin, _simplify(tirx.max(_prim(clamp(end)), _prim(begin)))


@lowering("Gather")
def lower_gather(lw: Lowerer, node: Node) -> list[Any]:
    data, indices = node.inputs[0], node.inputs[1]
    known, known_idx = lw.known(data), lw.known(indices)
    if known is not None and known_idx is not None and (idx := known_idx.ints()) is not None:
        axis = axis_of(node, known.items.ndim)
        picked = np.take(known.items, np.array(idx).reshape(known_idx.items.shape), axis=axis)
        return [Known(np.asarray(picked, dtype=object).reshape(np.shape(picked)), known.dtype)]
    x = lw.x(data)
    dims = lw.shape_of(x)
    axis = axis_of(node, len(dims))
    if indices is not None and indices.const_value is not None and not indices.is_graph_input:
        array = indices.const_value.astype(np.int64)
        if isinstance(dims[axis], int):
            array = np.where(array < 0, array + dims[axis], array)
        return [relax.op.take(x, constant(array), axis, mode="clip")]
    return [relax.op.take(x, lw.x(indices), axis, mode="wrap")]


def _normalized_indices(lw: Lowerer, indices: Any, extent: Any) -> Any:
    dt = lw.dtype_of(indices)
    size = relax.op.astype(relax.op.shape_to_tensor(relax.ShapeExpr([_prim(extent)])), dt)
    size = lw.emit(relax.op.reshape(size, ()))
    negative = relax.op.less(indices, lw.const(0, dt))
    return lw.emit(relax.op.where(negative, relax.op.add(indices, size), indices))


@lowering("GatherElements", "GatherND", "ScatterND", "ScatterElements")
def lower_gather_scatter(lw: Lowerer, node: Node) -> list[Any]:
    x, indices = lw.x(node.inputs[0]), lw.x(node.inputs[1])
    dims = lw.shape_of(x)
    op = node.op_type
    if op in ("GatherElements", "ScatterElements"):
        axis = axis_of(node, len(dims))
        indices = _normalized_indices(lw, indices, dims[axis])
        if op == "GatherElements":
            return [relax.op.gather_elements(x, indices, axis)]
        reduction = node.get_attr("reduction", "none")
        return [relax.op.scatter_elements(x, indices, lw.x(node.inputs[2]), axis, "update" if reduction == "none" else reduction)]  # fmt: skip  # noqa: E501
    if op == "GatherND":
        return [relax.op.gather_nd(x, indices, int(node.get_attr("batch_dims", 0)))]
    reduction = node.get_attr("reduction", "none")
    return [relax.op.scatter_nd(x, indices, lw.x(node.inputs[2]), "update" if reduction == "none" else reduction)]  # fmt: skip  # noqa: E501


@lowering("Expand")
def lower_expand(lw: Lowerer, node: Node) -> list[Any]:
    target = lw.shape_arg(node.inputs[1])  # type: ignore[arg-type]
    known = lw.known(node.inputs[0])
    if known is not None:
        shape = _broadcast_dims(list(known.items.shape), target)
        if all(isinstance(d, int) for d in shape) and math.prod(shape) <= KNOWN_LIMIT:
            return [Known(np.broadcast_to(known.items, shape).copy(), known.dtype)]
    x = lw.x(node.inputs[0])
    return [broadcast_to(lw, x, _broadcast_dims(lw.shape_of(x), target))]


@lowering("Tile")
def lower_tile(lw: Lowerer, node: Node) -> list[Any]:
    repeats = lw.ints(node.inputs[1], "repeats", static=True)
    return [relax.op.tile(lw.x(node.inputs[0]), repeats)]


@lowering("ConstantOfShape")
def lower_constant_of_shape(lw: Lowerer, node: Node) -> list[Any]:
    shape = lw.shape_arg(node.inputs[0])  # type: ignore[arg-type]
    value = node.get_attr("value")
    array = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    fill = array[0].item()
    if array.dtype.kind in "iub" and all(isinstance(d, int) for d in shape) and math.prod(shape) <= KNOWN_LIMIT:  # fmt: skip  # noqa: E501
        return [Known(np.full(shape, bool(fill) if array.dtype.kind == "b" else int(fill), dtype=object), str(array.dtype))]  # fmt: skip  # noqa: E501
    return [relax.op.full(relax.ShapeExpr([_prim(d) for d in shape]), lw.const(fill, str(array.dtype)), str(array.dtype))]  # fmt: skip  # noqa: E501


@lowering("Constant")
def lower_constant(lw: Lowerer, node: Node) -> list[Any]:
    value = node.get_attr("value")
    if value is None:
        for name in ("value_float", "value_int", "value_floats", "value_ints"):
            if node.get_attr(name) is not None:
                dtype = np.float32 if "float" in name else np.int64
                value = np.array(node.get_attr(name), dtype=dtype)
    if not isinstance(value, np.ndarray):
        lw.fail("only tensor and numeric Constant values are supported")
    assert isinstance(value, np.ndarray)
    if value.dtype.kind in "iub" and value.size <= KNOWN_LIMIT:
        items = np.empty(value.shape, dtype=object)
        for index, item in np.ndenumerate(value):
            items[index] = bool(item) if value.dtype.kind == "b" else int(item)
        return [Known(items, str(value.dtype))]
    return [constant(value)]


@lowering("Range")
def lower_range(lw: Lowerer, node: Node) -> list[Any]:
    start, limit, delta = (lw.scalar(v) for v in node.inputs[:3])
    dtype = lw.out_dtype(node)
    if all(isinstance(v, int) for v in (start, limit, delta)):
        count = max(0, -(-(limit - start) // delta))
        if count <= KNOWN_LIMIT and dtype.startswith("int"):
            return [Known(np.array(list(range(start, limit, delta)) + [None], dtype=object)[:-1], dtype)]  # fmt: skip  # noqa: E501
    args = [_prim(v) if not isinstance(v, float) else v for v in (start, limit, delta)]
    return [relax.op.arange(*args, dtype=dtype)]


@lowering("Pad")
def lower_pad(lw: Lowerer, node: Node) -> list[Any]:
    x = lw.x(node.inputs[0])
    rank = lw.rank(x)
    pads = node.get_attr("pads")
    if pads is None:
        pads = lw.ints(node.inputs[1], "pads", static=True)
    value = node.get_attr("value", 0.0)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        value = lw.scalar(node.inputs[2])
    axes = axes_input(lw, node, 3, rank) or list(range(rank))
    before, after = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        before[axis], after[axis] = int(pads[i]), int(pads[i + len(axes)])
    if min(before + after) < 0:
        lw.fail("negative pads (cropping) are not supported")
    mode = node.get_attr("mode", "constant")
    if mode == "constant":
        return [lw.bb.emit_te(topi.nn.pad, x, before, after, value)]
    if mode == "reflect":
        return [lw.bb.emit_te(topi.nn.mirror_pad, x, before, after, "REFLECT")]
    if mode == "edge":
        return [lw.bb.emit_te(topi.nn.replicate_pad, x, before, after)]
    lw.fail(f"Pad mode '{mode}' is not supported")
    return []


@lowering("Trilu")
def lower_trilu(lw: Lowerer, node: Node) -> list[Any]:
    x = lw.x(node.inputs[0])
    k = lw.scalar(node.inputs[1], 0) if len(node.inputs) > 1 else 0
    upper = node.get_attr("upper", 1)
    return [(relax.op.triu if upper else relax.op.tril)(x, k)]
