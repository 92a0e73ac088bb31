"""How each op relates the tracked positions of its inputs and outputs (structure.py's walk).

One rule per op family; a rule sees the node once, when the walk first reaches any of its
tracked values, and must relate all of them: give untracked ones ids (`Walk.track`), union ids
that must go together, record the constants (`Walk.edit`), shapes, split sizes, attributes and
masks that change with them, or refuse (`Refused`, naming the node and why). Rules:

- element-wise ops and activations (`_elementwise`): the output takes the input's ids; other
  operands are broadcast (dim 1 on the axis: nothing to do), constants (sliced: biases, scales)
  or tracked tensors (ids unioned: the gate multiply, residual Adds);
- BatchNormalization/InstanceNormalization, pooling, Reduce* off the axis, Transpose,
  Squeeze/Unsqueeze, Flatten, Reshape (the shape entry holding the count is rewritten), Split and
  Concat (ids sliced/joined), Shape (allowed when nothing reads the tracked dim from it);
- layers: MatMul/Gemm/Conv/FusedConv with a constant weight: source (output axis) or sink (input
  axis); a depthwise Conv carries channels through (input channel c <-> its outputs);
- attention (ONNX Attention, com.microsoft MultiHeadAttention, 3-D form) and RotaryEmbedding:
  head-granular unions, head-count attributes, per-head masks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from graphopt.ir.core import Node, Value
from graphopt.passes.pruning.structure import (
    ELEMENTWISE,
    MIXERS,
    POOLS,
    REDUCE,
    UNARY,
    AttrEdit,
    MaskEdit,
    Refused,
    ReshapeEdit,
    SplitEdit,
    Walk,
    constant_of,
    rank_of,
    shape_of,
)

__all__ = ["RULES", "rule_for"]


def _known_inputs(walk: Walk, node: Node) -> list[int]:
    return [i for i, v in enumerate(node.inputs) if v is not None and v in walk.region.values]


def _only_first_output(node: Node) -> None:
    for extra in node.outputs[1:]:
        if extra.is_used:
            raise Refused(node, f"output %{extra.name} of {node.op} is used")


def _elementwise(walk: Walk, node: Node) -> None:
    _only_first_output(node)
    out = node.outputs[0]
    out_rank = rank_of(out)
    if walk.axis(out) is not None:
        axis, ids = walk.axis(out), walk.ids(out)
    else:
        known = node.inputs[_known_inputs(walk, node)[0]]
        assert known is not None
        axis = walk.axis(known) + out_rank - rank_of(known)  # type: ignore[operator]
        ids = walk.ids(known)
    assert axis is not None and ids is not None
    walk.track(out, axis, ids)
    for i, value in enumerate(node.inputs):
        if value is None:
            continue
        offset = axis - (out_rank - rank_of(value))
        shape = shape_of(value) or ()
        if offset < 0 or shape[offset] == 1:
            continue  # broadcast along the axis
        if constant_of(value) is not None:
            walk.edit(node, i, offset, ids, "param")
        else:  # a symbolic dim is taken as the full size (a 1 there would broadcast)
            walk.track(value, offset, ids)


def _batchnorm(walk: Walk, node: Node) -> None:
    _only_first_output(node)
    x, y = node.inputs[0], node.outputs[0]
    assert x is not None
    if (walk.axis(x) or walk.axis(y) or 1) != 1:
        raise Refused(node, f"{node.op} normalizes axis 1, not the tracked one")
    ids = walk.ids(x) if walk.ids(x) is not None else walk.ids(y)
    assert ids is not None
    walk.track(x, 1, ids)
    walk.track(y, 1, ids)
    for i in range(1, len(node.inputs)):
        if node.inputs[i] is not None:
            walk.edit(node, i, 0, ids, "param")


def _pool(walk: Walk, node: Node) -> None:
    _only_first_output(node)
    x, y = node.inputs[0], node.outputs[0]
    assert x is not None
    if (walk.axis(x) if walk.axis(x) is not None else walk.axis(y)) != 1:
        raise Refused(node, f"{node.op} pools over the tracked axis")
    ids = walk.ids(x) if walk.ids(x) is not None else walk.ids(y)
    walk.track(x, 1, ids)
    walk.track(y, 1, ids)


def _forward_only(walk: Walk, node: Node) -> tuple[Value, int, np.ndarray]:
    x = node.inputs[0]
    if x is None or x not in walk.region.values:
        raise Refused(node, f"channels cannot be traced back through {node.op}")
    return x, walk.axis(x), walk.ids(x)  # type: ignore[return-value]


def _reduce(walk: Walk, node: Node) -> None:
    x, axis, ids = _forward_only(walk, node)
    rank = rank_of(x)
    axes = node.get_attr("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        array = constant_of(node.inputs[1])
        if array is None:
            raise Refused(node, f"the axes of {node.op} are not a constant")
        axes = array.tolist()
    if not axes:
        raise Refused(node, f"{node.op} reduces over every axis")
    axes = sorted(a % rank for a in axes)
    if axis in axes:
        raise Refused(node, f"{node.op} reduces over the tracked axis")
    out_axis = axis if node.get_attr("keepdims", 1) else axis - sum(a < axis for a in axes)
    walk.track(node.outputs[0], out_axis, ids)


def _transpose(walk: Walk, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    assert x is not None
    perm = node.get_attr("perm") or list(reversed(range(rank_of(x))))
    if walk.axis(x) is not None:
        walk.track(y, perm.index(walk.axis(x)), walk.ids(x))
    else:
        walk.track(x, perm[walk.axis(y)], walk.ids(y))  # type: ignore[index]


def _squeeze_unsqueeze(walk: Walk, node: Node) -> None:
    x, axis, ids = _forward_only(walk, node)
    axes = node.get_attr("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        array = constant_of(node.inputs[1])
        if array is None:
            raise Refused(node, f"the axes of {node.op} are not a constant")
        axes = array.tolist()
    if axes is None:
        raise Refused(node, f"{node.op} without axes")
    if node.op_type == "Squeeze":
        axes = [a % rank_of(x) for a in axes]
        if axis in axes:
            raise Refused(node, "Squeeze removes the tracked axis")
        out_axis = axis - sum(a < axis for a in axes)
    else:
        out_rank = rank_of(node.outputs[0])
        axes = sorted(a % out_rank for a in axes)
        out_axis = axis
        for a in axes:
            if a <= out_axis:
                out_axis += 1
    walk.track(node.outputs[0], out_axis, ids)


def _flatten(walk: Walk, node: Node) -> None:
    x, axis, ids = _forward_only(walk, node)
    shape = shape_of(x) or ()
    k = node.get_attr("axis", 1) % max(len(shape), 1)
    others = [d for i, d in enumerate(shape) if i != axis and (i >= k) == (axis >= k)]
    if any(d != 1 for d in others):
        raise Refused(node, "Flatten merges the tracked axis with other dims")
    walk.track(node.outputs[0], 0 if axis < k else 1, ids)


def _shape_op(walk: Walk, node: Node) -> None:
    """A Shape may read the tracked tensor when nothing reads the tracked dim from it: its range
    leaves the axis out, or its only readers are Gathers/Slices of other entries (TorchScript's
    `x.size()[:-1]`)."""
    x, axis, _ = _forward_only(walk, node)
    rank = rank_of(x)
    start = node.get_attr("start", 0)
    end = node.get_attr("end", rank)
    start, end = (max(0, min(rank, s + rank if s < 0 else s)) for s in (start, end))
    if not start <= axis < end:
        return
    entry = axis - start
    for user, _ in node.outputs[0].uses:
        if not _reads_other_entries(user, entry, end - start):
            raise Refused(user, "the tracked dim is read from a Shape")


def _reads_other_entries(user: Node, entry: int, length: int) -> bool:
    if user.op == "Gather" and user.get_attr("axis", 0) == 0:
        indices = constant_of(user.inputs[1])
        return indices is not None and entry not in {int(i) % length for i in indices.ravel()}
    if user.op == "Slice" and len(user.inputs) >= 3:
        starts, ends = constant_of(user.inputs[1]), constant_of(user.inputs[2])
        axes = constant_of(user.inputs[3]) if len(user.inputs) > 3 else None
        steps = constant_of(user.inputs[4]) if len(user.inputs) > 4 else None
        if starts is None or ends is None or (axes is not None and axes.tolist() != [0]):
            return False
        if steps is not None and steps.tolist() != [1]:
            return False
        lo, hi = (
            max(0, min(length, v + length if v < 0 else v)) for v in (int(starts[0]), int(ends[0]))
        )
        return not lo <= entry < hi
    return False


def _shape_entries(value: Value) -> list[tuple[Node | None, int, int, int | None]] | None:
    """The entries of a shape tensor: (Concat node or None, its input, offset, constant or None)."""
    array = constant_of(value)
    if array is not None:
        return [(None, 0, i, int(v)) for i, v in enumerate(array.ravel().tolist())]
    node = value.producer
    if node is None or node.op != "Concat":
        return None
    entries: list[tuple[Node | None, int, int, int | None]] = []
    for index, piece in enumerate(node.inputs):
        shape = shape_of(piece)
        if piece is None or shape is None or len(shape) != 1 or not isinstance(shape[0], int):
            return None
        array = constant_of(piece)
        for offset in range(shape[0]):
            entries.append(
                (node, index, offset, None if array is None else int(array.ravel()[offset]))
            )
    return entries


def _reshape(walk: Walk, node: Node) -> None:
    x, axis, ids = _forward_only(walk, node)
    shape_in = shape_of(x) or ()
    size = len(ids)
    trailing = shape_in[axis + 1 :]
    if not all(isinstance(d, int) for d in trailing):
        raise Refused(node, "Reshape: the dims after the tracked axis are not known")
    t_in = int(np.prod(trailing, dtype=np.int64))
    entries = _shape_entries(node.inputs[1]) if node.inputs[1] is not None else None
    if entries is None:
        raise Refused(node, "Reshape: its shape is neither a constant nor a Concat of pieces")
    out_shape = shape_of(node.outputs[0]) or ()
    found = []
    for j, entry in enumerate(entries):
        after = [e[3] for e in entries[j + 1 :]]
        # the channel count written out, or a -1 that the declared output type says is it
        inferred = entry[3] == -1 and j < len(out_shape) and out_shape[j] == size
        if (entry[3] == size or inferred) and all(v is not None and v > 0 for v in after):
            if int(np.prod([v or 1 for v in after], dtype=np.int64)) == t_in:
                found.append(j)
    if len(found) != 1:
        raise Refused(node, f"Reshape: cannot find the {size} channels in its shape")
    if entries[found[0]][3] != -1:  # a -1 adapts by itself
        walk.region.reshapes.append(ReshapeEdit(node, found[0], ids))
    walk.track(node.outputs[0], found[0], ids)


def _split(walk: Walk, node: Node) -> None:
    x = node.inputs[0]
    assert x is not None
    rank = rank_of(x)
    split_axis = node.get_attr("axis", 0) % rank
    known = walk.axis(x)
    if known is None:
        known_out = next(o for o in node.outputs if o in walk.region.values)
        known = walk.axis(known_out)
    if known != split_axis:  # a split along another axis keeps the channels whole
        ids = walk.ids(x)
        if ids is None:
            o = next(o for o in node.outputs if o in walk.region.values)
            ids = walk.ids(o)
        walk.track(x, known, ids)  # type: ignore[arg-type]
        for o in node.outputs:
            if o.is_used:
                walk.track(o, known, ids)  # type: ignore[arg-type]
        return
    sizes = _split_sizes(node, x)
    if walk.ids(x) is None:
        parts: list[np.ndarray] = []
        for o, n in zip(node.outputs, sizes, strict=True):
            known_ids = walk.ids(o)
            parts.append(known_ids if known_ids is not None else walk.region.positions.fresh(n))
        walk.track(x, split_axis, np.concatenate(parts))
    ids = walk.ids(x)
    assert ids is not None
    bounds = np.cumsum([0, *sizes])
    pieces = [ids[bounds[k] : bounds[k + 1]] for k in range(len(sizes))]
    for o, piece in zip(node.outputs, pieces, strict=True):
        walk.track(o, split_axis, piece)
    walk.region.splits.append(SplitEdit(node, pieces))


def _split_sizes(node: Node, x: Value) -> list[int]:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        array = constant_of(node.inputs[1])
        if array is None:
            raise Refused(node, "Split: its sizes are not a constant")
        return [int(v) for v in array.tolist()]
    if node.get_attr("split") is not None:
        return list(node.get_attr("split"))
    total = (shape_of(x) or ())[node.get_attr("axis", 0)]
    n = len(node.outputs)
    if not isinstance(total, int) or total % n:
        raise Refused(node, "Split: the part sizes are not known")
    return [total // n] * n


def _concat(walk: Walk, node: Node) -> None:
    y = node.outputs[0]
    rank = rank_of(y)
    cat_axis = node.get_attr("axis", 0) % rank
    known = next((walk.axis(v) for v in [y, *node.inputs] if v in walk.region.values), None)
    if known != cat_axis:
        ids = next(walk.ids(v) for v in [y, *node.inputs] if v in walk.region.values)
        for v in [y, *node.inputs]:
            if v is not None:
                walk.track(v, known, ids)  # type: ignore[arg-type]
        return
    parts = []
    for v in node.inputs:
        dim = (shape_of(v) or ())[cat_axis] if v is not None else None
        if v is None or (v not in walk.region.values and not isinstance(dim, int)):
            raise Refused(node, "Concat: a part has an unknown size")
        if constant_of(v) is not None:
            raise Refused(node, "Concat: a constant part")
        parts.append(walk.track(v, cat_axis, size=dim if isinstance(dim, int) else 0))
    walk.track(y, cat_axis, np.concatenate(parts))


def _matmul(walk: Walk, node: Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    y = node.outputs[0]
    assert x is not None and w is not None
    weight = constant_of(w)
    if weight is None or weight.ndim != 2:
        raise Refused(node, "MatMul: the weight is not a 2-D constant")
    if x in walk.region.values:
        if walk.axis(x) != rank_of(x) - 1:
            raise Refused(node, "MatMul: the tracked axis is not the input's last")
        walk.edit(node, 1, 0, walk.ids(x), "sink")  # type: ignore[arg-type]
    if y in walk.region.values:
        if walk.axis(y) != rank_of(y) - 1:
            raise Refused(node, "MatMul: the tracked axis is not the output's last")
        walk.edit(node, 1, 1, walk.ids(y), "source")  # type: ignore[arg-type]


def _gemm(walk: Walk, node: Node) -> None:
    a, b = node.inputs[0], node.inputs[1]
    y = node.outputs[0]
    assert a is not None and b is not None
    trans_b = bool(node.get_attr("transB", 0))
    if a in walk.region.values:
        if node.get_attr("transA", 0) or walk.axis(a) != 1:
            raise Refused(node, "Gemm: the tracked axis is not A's columns")
        walk.edit(node, 1, 1 if trans_b else 0, walk.ids(a), "sink")  # type: ignore[arg-type]
    if y in walk.region.values:
        ids = walk.ids(y)
        assert ids is not None
        if walk.axis(y) != 1:
            raise Refused(node, "Gemm: the tracked axis is not the output's columns")
        walk.edit(node, 1, 0 if trans_b else 1, ids, "source")
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is not None:
            shape = shape_of(c) or ()
            if constant_of(c) is None or (len(shape) == 2 and shape[0] != 1):
                raise Refused(node, "Gemm: C is not a per-column constant")
            if shape and shape[-1] != 1:
                walk.edit(node, 2, len(shape) - 1, ids, "param")


def _conv(walk: Walk, node: Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    y = node.outputs[0]
    assert x is not None and w is not None
    weight = constant_of(w)
    if weight is None:
        raise Refused(node, "Conv: the weight is not a constant")
    group = node.get_attr("group", 1)
    for v in (x, y):
        if v in walk.region.values and walk.axis(v) != 1:
            raise Refused(node, "Conv: the tracked axis is not the channel axis")
    bias = len(node.inputs) > 2 and node.inputs[2] is not None
    z = node.inputs[3] if len(node.inputs) > 3 else None  # FusedConv's sum input: y = act(conv + z)
    if z is not None and group == 1:
        known = walk.ids(y) if walk.ids(y) is not None else walk.ids(z)
        if known is not None:
            walk.track(y, 1, known)
            walk.track(z, 1, known)
    if group == 1:
        if x in walk.region.values:
            walk.edit(node, 1, 1, walk.ids(x), "sink")  # type: ignore[arg-type]
        if y in walk.region.values:
            walk.edit(node, 1, 0, walk.ids(y), "source")  # type: ignore[arg-type]
            if bias:
                walk.edit(node, 2, 0, walk.ids(y), "param")  # type: ignore[arg-type]
        return
    c_out = weight.shape[0]
    if weight.shape[1] != 1 or c_out % group:
        raise Refused(node, f"Conv: grouped convolution (group={group}) is not depthwise")
    mult = c_out // group
    ids_x = walk.track(x, 1, size=group)
    ids_y = walk.track(y, 1, size=c_out)
    walk.region.positions.union(np.repeat(ids_x, mult), ids_y)
    if z is not None:
        walk.track(z, 1, ids_y)
    walk.edit(node, 1, 0, ids_y, "param")
    if bias:
        walk.edit(node, 2, 0, ids_y, "param")
    walk.region.attrs.append(AttrEdit(node, "group", ids_x))


def _heads(walk: Walk, value: Value, count: int, node: Node) -> tuple[np.ndarray, int]:
    size = (shape_of(value) or ())[-1]
    if walk.ids(value) is None and not isinstance(size, int):
        raise Refused(node, f"the hidden size of %{value.name} is unknown")
    ids = walk.track(value, -1, size=size if isinstance(size, int) else 0)
    if count <= 0 or len(ids) % count:
        raise Refused(node, f"{len(ids)} channels of %{value.name} are not {count} heads")
    return ids, len(ids) // count


def _attention(walk: Walk, node: Node) -> None:
    contrib = node.domain == "com.microsoft"
    q, k, v = node.inputs[0], node.inputs[1], node.inputs[2]
    if q is None or k is None or v is None:
        raise Refused(node, f"{node.op} without separate Q, K and V")
    if any(rank_of(t) != 3 for t in (q, k, v)):
        raise Refused(node, f"{node.op}: only the 3-D [batch, seq, heads*size] form is pruned")
    _only_first_output(node)
    if contrib:
        extra = {3: "a packed bias", 6: "past key", 7: "past value"}
        hq = hk = node.get_attr("num_heads", 0)
        bias_at = 5
    else:
        extra = {4: "past key", 5: "past value", 6: "nonpad_kv_seqlen"}
        hq, hk = node.get_attr("q_num_heads", 0), node.get_attr("kv_num_heads", 0)
        bias_at = 3
    for index, what in extra.items():
        if len(node.inputs) > index and node.inputs[index] is not None:
            raise Refused(node, f"{node.op} with {what}")
    mask = node.inputs[bias_at] if len(node.inputs) > bias_at else None
    if mask is not None:
        shape = shape_of(mask)
        if shape is None or len(shape) == 4 and shape[1] != 1:
            # a per-head mask (or one whose head dim is not known: TorchScript) keeps the kept
            # heads' slices through a Gather (after an Expand to all heads when not known)
            if shape is not None and isinstance(shape[1], int) and shape[1] != hq:
                raise Refused(node, f"{node.op}: the mask's head dim is {shape[1]}, not {hq}")
            if shape is None and not mask.type:
                raise Refused(node, f"{node.op}: the mask's rank is unknown")
            known = shape is not None and isinstance(shape[1], int)
            walk.region.masks.append(MaskEdit(node, bias_at, hq, known=known))
        elif len(shape) > 4:
            raise Refused(node, f"{node.op}: a mask of rank {len(shape)}")
    if hk <= 0 or hq <= 0 or hq % hk:
        raise Refused(node, f"{node.op}: head counts {hq}/{hk} do not group")
    ids_q, dq = _heads(walk, q, hq, node)
    ids_k, dk = _heads(walk, k, hk, node)
    ids_v, dv = _heads(walk, v, hk, node)
    ids_o = walk.track(node.outputs[0], -1, size=hq * dv)
    if len(ids_o) != hq * dv:
        raise Refused(node, f"{node.op}: the output is not {hq} heads of {dv}")
    per = hq // hk
    union = walk.region.positions.union
    # every position of KV head g, of its query heads and of their outputs: one unit
    anchor_k = np.repeat(ids_k[::dk], dk)
    union(anchor_k, ids_k)
    union(np.repeat(ids_k[::dk], dv), ids_v)
    union(np.repeat(ids_k[::dk], per * dq), ids_q)
    union(np.repeat(ids_k[::dk], per * dv), ids_o)
    for m in walk.region.masks:
        if m.node is node:
            m.ids, m.per = ids_q, dq
    if contrib:
        walk.region.attrs.append(AttrEdit(node, "num_heads", ids_q, dq))
    else:
        walk.region.attrs.append(AttrEdit(node, "q_num_heads", ids_q, dq))
        walk.region.attrs.append(AttrEdit(node, "kv_num_heads", ids_k, dk))


def _rotary(walk: Walk, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    assert x is not None
    heads = node.get_attr("num_heads", 0)
    if rank_of(x) != 3 or not heads:
        raise Refused(node, f"{node.op}: only the 3-D form with num_heads is pruned")
    _only_first_output(node)
    ids_x, d = _heads(walk, x, heads, node)
    walk.track(y, -1, ids_x)
    walk.region.positions.union(np.repeat(ids_x[::d], d), ids_x)
    walk.region.attrs.append(AttrEdit(node, "num_heads", ids_x, d))


RULES: dict[str, Callable[[Walk, Node], None]] = {
    "BatchNormalization": _batchnorm,
    "InstanceNormalization": _batchnorm,
    "Transpose": _transpose,
    "Squeeze": _squeeze_unsqueeze,
    "Unsqueeze": _squeeze_unsqueeze,
    "Flatten": _flatten,
    "Shape": _shape_op,
    "Reshape": _reshape,
    "Split": _split,
    "Concat": _concat,
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Conv": _conv,
    "com.microsoft.FusedConv": _conv,
    "Attention": _attention,
    "com.microsoft.MultiHeadAttention": _attention,
    "RotaryEmbedding": _rotary,
    "com.microsoft.RotaryEmbedding": _rotary,
}


def rule_for(node: Node) -> Callable[[Walk, Node], None]:
    """The rule relating `node`'s tracked inputs and outputs; `Refused` when there is none."""
    op = node.op
    rule = RULES.get(op)
    if rule is not None:
        return rule
    if op in UNARY or op in ELEMENTWISE:
        return _elementwise
    if op in POOLS:
        return _pool
    if op in REDUCE:
        return _reduce
    if op in MIXERS:
        raise Refused(node, f"{op} mixes the channels")
    raise Refused(node, f"{op} is not an op the analysis knows")
