"""Pieces of the attention and rotary patterns exporters write, shared by `fuse-attention` and
`fuse-rotary`: a dims analysis that sees through the shape arithmetic of TorchScript exports,
head splits and merges, scale factors, K transposes, LLaMA's `repeat_kv`, and causal masks.

Every recognizer returns what it found and the nodes it walked through, or None; none of them
changes the graph. Shapes are proved with `Dims` (simplify-shapes' `DimAnalysis` plus rules for
Split, the one -1 of a Reshape whose other dims cancel against the input's, and the shape-keeping
RotaryEmbedding), never read from declared types alone: TorchScript exports declare `[?, ?, ?, ?]`
for most attention tensors even after `infer-shapes`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from graphopt.ir.core import Graph, Node, Value
from graphopt.ir.inference import constant_value
from graphopt.ir.types import DType, TensorType
from graphopt.passes.cleanup.shape_dims import DimAnalysis, Elem, slice_params
from graphopt.passes.cleanup.shape_values import ShapeValues

__all__ = [
    "VERY_NEGATIVE", "Dims", "HeadMerge", "HeadSplit", "KeyTranspose", "RepeatKV", "analyze",
    "causal_condition", "causal_condition_array", "clear_dim", "head_merge", "head_split",
    "index_axis", "key_transpose", "only_feeds", "producer", "remove_dead", "repeat_kv",
    "safe_to_read_merged", "scalar_constant", "shape_feeders", "strip_scale",
]  # fmt: skip

VERY_NEGATIVE = -1e30  # a mask fill at or below this is "minus infinity" for every float32 score


class Dims(DimAnalysis):
    """`DimAnalysis` with three more rules: Split (outputs keep the input's dims but the split
    axis), Reshape's -1 when the input's and target's other dims cancel (`[b, s, 64]` to
    `[b, s, -1, 16]` gives 4 without knowing b or s), and RotaryEmbedding (keeps its input's
    dims)."""

    def _rule(self, node: Node) -> list[tuple[DType | None, tuple[Elem | None, ...] | None]] | None:
        if node.domain == "" and node.op_type == "RotaryEmbedding":
            return [self.info(node.inputs[0])] if node.inputs[0] is not None else None  # type: ignore[list-item]
        if node.domain == "" and node.op_type == "Split":
            return self._split(node)
        if node.domain == "" and node.op_type == "Range":
            start, delta = (self.vector(v) for v in (node.inputs[0], node.inputs[2]))
            limit = self.vector(node.inputs[1])
            dtype = self.info(node.inputs[0])[0] if node.inputs[0] is not None else None
            if start and delta and limit and start.elems == (0,) and delta.elems == (1,):
                if len(limit.elems) == 1 and not isinstance(limit.elems[0], int):
                    return [(dtype, (limit.elems[0],))]  # arange(n) has n elements
        found = super()._rule(node)
        if node.domain == "" and node.op_type == "Reshape" and found:
            dtype, dims = found[0]
            if dims is not None and None in dims:
                found = [(dtype, self._cancel(node, dims))]
        return found

    def _split(
        self, node: Node
    ) -> list[tuple[DType | None, tuple[Elem | None, ...] | None]] | None:
        x = node.inputs[0]
        if x is None:
            return None
        dtype, dims = self.info(x)
        if dims is None:
            return None
        axis = node.get_attr("axis", 0)
        axis = axis + len(dims) if axis < 0 else axis
        if not 0 <= axis < len(dims):
            return None
        sizes: list[Elem | None]
        split = node.inputs[1] if len(node.inputs) > 1 else None
        vec = self.vector(split) if split is not None else None
        if vec is not None and vec.is_static:
            sizes = list(vec.ints())
        elif "split" in node.attrs:
            sizes = list(node.get_attr("split"))
        elif isinstance(dims[axis], int):
            n = len(node.outputs)
            total = dims[axis]
            assert isinstance(total, int)
            chunk = -(-total // n)
            sizes = [min(chunk, max(total - i * chunk, 0)) for i in range(n)]
        else:
            sizes = [None] * len(node.outputs)
        if len(sizes) != len(node.outputs):
            return None
        return [(dtype, (*dims[:axis], size, *dims[axis + 1 :])) for size in sizes]

    def _cancel(self, node: Node, dims: tuple[Elem | None, ...]) -> tuple[Elem | None, ...]:
        x = self.info(node.inputs[0])[1] if node.inputs[0] is not None else None
        target = self.vector(node.inputs[1] if len(node.inputs) > 1 else None)
        if x is None or target is None or target.elems.count(-1) != 1:
            return dims
        hole = target.elems.index(-1)
        if dims[hole] is not None or sum(d is None for d in dims) != 1:
            return dims
        numerator = Counter(x)
        rest: list[Elem] = []
        for axis, d in enumerate(dims):
            if axis == hole:
                continue
            if d is not None and numerator[d] > 0 and not isinstance(d, int):
                numerator[d] -= 1
            else:
                rest.append(d)  # type: ignore[arg-type]
        top = [d for d, n in numerator.items() for _ in range(n)]
        symbols = [d for d in top if not isinstance(d, int)]
        if len(symbols) > 1 or not all(isinstance(d, int) for d in rest):
            return dims
        a = int(np.prod([d for d in top if isinstance(d, int)], dtype=np.int64))
        b = int(np.prod(rest, dtype=np.int64))  # type: ignore[arg-type]
        if b <= 0 or a % b:
            return dims
        if symbols:  # [b, 2, 2, L, 16] -> [b, 4, -1, 16]: the -1 is L when the numbers cancel
            return (*dims[:hole], symbols[0], *dims[hole + 1 :]) if a == b else dims
        return (*dims[:hole], a // b, *dims[hole + 1 :])


def analyze(graph: Graph, opset_imports: Mapping[str, int]) -> ShapeValues:
    """Shape vectors and dims of one graph, with `Dims` as the dims analysis."""
    values = ShapeValues(graph, opset_imports)
    values.dims = Dims(opset_imports, values.vector)
    return values.run()


# ----- small facts about values ---------------------------------------------------------------


def scalar_constant(value: Value | None) -> float | None:
    """The number a one-element float constant holds, or None."""
    array = constant_value(value, limit=1)
    if array is None or array.size != 1 or array.dtype.kind != "f":
        return None
    return float(array.reshape(-1)[0])


def producer(value: Value | None, op: str) -> Node | None:
    """The node computing `value` when it is a default-domain `op` with that output first."""
    node = value.producer if value is not None else None
    if node is None or node.domain != "" or node.op_type != op or value is not node.outputs[0]:
        return None
    return node


def _ints(sv: ShapeValues, value: Value | None) -> list[int] | None:
    vec = sv.vector(value)
    return vec.ints() if vec is not None and vec.is_static else None


def strip_scale(value: Value, sv: ShapeValues, nodes: list[Node]) -> tuple[Value, float]:
    """Walk back through `Mul(x, c)`, `Mul(c, x)` and `Div(x, c)` by one-element float constants
    that do not raise x's rank; returns x and the product of the factors (the nodes go to
    `nodes`)."""
    factor = 1.0
    while True:
        node = value.producer
        if node is None or node.domain != "" or node.op_type not in ("Mul", "Div"):
            return value, factor
        a, b = node.inputs[0], node.inputs[1]
        candidates = [(a, b)] if node.op_type == "Div" else [(a, b), (b, a)]
        for x, c in candidates:
            number = scalar_constant(c)
            if number is None or x is None or number == 0.0:
                continue
            rank = _rank(sv, x)
            if rank is None or c is None or c.type is None or _rank(sv, c) is None:
                continue
            if (_rank(sv, c) or 0) > rank:
                continue
            nodes.append(node)
            factor = factor * number if node.op_type == "Mul" else factor / number
            value = x
            break
        else:
            return value, factor


def _rank(sv: ShapeValues, value: Value) -> int | None:
    dims = sv.dims.dims(value)
    return None if dims is None else len(dims)


# ----- head split and merge -------------------------------------------------------------------


@dataclass
class HeadSplit:
    """`Transpose(Reshape(x3 [b, s, H*D], [b, s, H, D]), perm)`: x3 split into heads."""

    source: Value  # x3
    heads: int
    head_dim: int
    output: Value  # the transposed [b, H, s, D] (or [b, H, D, s] for a folded K transpose)
    nodes: list[Node] = field(default_factory=list)  # Reshape, Transpose
    reshaped: Value | None = None  # the [b, s, H, D] value


def head_split(
    value: Value, sv: ShapeValues, perm: Sequence[int] = (0, 2, 1, 3)
) -> HeadSplit | None:
    """`value` as a head split of a rank-3 tensor (perm (0, 2, 3, 1) matches a K^T with the
    transpose folded into the split)."""
    transpose = producer(value, "Transpose")
    if transpose is None or list(transpose.get_attr("perm", [])) != list(perm):
        return None
    reshape = producer(transpose.inputs[0], "Reshape")
    if reshape is None or reshape.inputs[0] is None:
        return None
    x3 = reshape.inputs[0]
    d3, d4 = sv.dims.dims(x3), sv.dims.dims(reshape.outputs[0])
    if d3 is None or d4 is None or len(d3) != 3 or len(d4) != 4:
        return None
    heads, head_dim = d4[2], d4[3]
    if (
        d4[0] != d3[0]
        or d4[1] != d3[1]
        or not isinstance(heads, int)
        or not isinstance(head_dim, int)
    ):
        return None
    if heads <= 0 or head_dim <= 0:
        return None
    if isinstance(d3[2], int) and d3[2] != heads * head_dim:
        return None
    return HeadSplit(x3, heads, head_dim, value, [reshape, transpose], reshape.outputs[0])


@dataclass
class HeadMerge:
    """`Transpose(o [b, H, s, Dv], (0, 2, 1, 3))` (after a no-op Reshape, perhaps): the heads put
    back side by side; `output` is the transposed [b, s, H, Dv] value."""

    output: Value
    nodes: list[Node]


def head_merge(value: Value, dims: tuple[Elem, ...], sv: ShapeValues) -> HeadMerge | None:
    """How the attention output `value` (whose dims the match proved to be `dims`: b, H, S, Dv)
    is merged back, when every reader but shape arithmetic is on that path."""
    nodes: list[Node] = []
    current = value
    readers = [u for u in current.users() if u.op not in ("Shape", "Size")]
    if len(readers) == 1 and readers[0].op == "Reshape" and readers[0].inputs[0] is current:
        reshape = readers[0]
        if not _keeps_dims(reshape, (dims, sv.dims.dims(current) or ()), sv):
            return None
        nodes.append(reshape)
        current = reshape.outputs[0]
        readers = [u for u in current.users() if u.op not in ("Shape", "Size")]
    if len(readers) != 1 or readers[0].op != "Transpose" or readers[0].inputs[0] is not current:
        return None
    transpose = readers[0]
    if list(transpose.get_attr("perm", [])) != [0, 2, 1, 3]:
        return None
    nodes.append(transpose)
    return HeadMerge(transpose.outputs[0], nodes)


def _keeps_dims(reshape: Node, spellings: tuple[tuple[Elem, ...], ...], sv: ShapeValues) -> bool:
    """True when the Reshape gives its input's dims back: each target element is a spelling of
    the input's dim there (or a copying 0), and at most one is -1."""
    target = sv.vector(reshape.inputs[1]) if len(reshape.inputs) > 1 else None
    if target is None or any(len(s) != len(target.elems) for s in spellings):
        return False
    minus = 0
    for axis, e in enumerate(target.elems):
        if e == -1:
            minus += 1
        elif not (
            (e == 0 and not reshape.get_attr("allowzero", 0))
            or any(s[axis] == e for s in spellings)
        ):
            return False
    return minus <= 1


def only_feeds(node: Node, sinks: set[Node], sv: ShapeValues) -> bool:
    """True when everything `node` computes goes, through integer shape arithmetic only, into
    `sinks` (so it dies with them)."""
    stack = [node]
    seen: set[Node] = set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        for value in current.outputs:
            for user in value.users():
                if user in sinks:
                    continue
                if (
                    user.op == "return"
                    or user.domain != ""
                    or not all(sv.vector(v) is not None for v in user.outputs)
                ):
                    return False
                stack.append(user)
    return True


def safe_to_read_merged(reader: Node, index: int, sv: ShapeValues) -> bool:
    """True when `reader`, a reader of a [b, s, H, Dv] value, computes the same from the
    [b, s, H*Dv] value it was made of: a Reshape whose target copies no dim past the second
    (its zeros, if any, copy b and s, which both tensors share)."""
    if reader.op != "Reshape" or index != 0 or len(reader.inputs) < 2:
        return False
    target = sv.vector(reader.inputs[1])
    if target is None:
        return False
    if reader.get_attr("allowzero", 0):
        return True
    return all(
        axis < 2 or (isinstance(e, int) and e != 0) or _is_size_token(e)
        for axis, e in enumerate(target.elems)
    )


def _is_size_token(e: Elem) -> bool:
    """A dim of some tensor or a symbol: only 0 for an empty tensor, where both forms agree."""
    return isinstance(e, str) or getattr(e, "kind", "") == "dim"


# ----- K transposes and repeat_kv -------------------------------------------------------------


@dataclass
class RepeatKV:
    """LLaMA's `repeat_kv`: `Reshape(Expand(Unsqueeze(x, 2), [b, h, n, l, d]), [b, h*n, l, d])`
    repeats each of x's h heads n times in a row (head j reads x's head j // n)."""

    source: Value
    times: int
    nodes: list[Node]


@dataclass
class KeyTranspose:
    """Where K^T came from: a 4-D K (`key`), or for a transpose folded into the head split, the
    head split of a 3-D K (`split`, whose output is K^T itself); `repeat` when the repeat_kv's
    last Reshape was merged into the transpose's reshapes (then `key` is the repeated source)."""

    key: Value | None
    split: HeadSplit | None
    factor: float
    nodes: list[Node]
    repeat: RepeatKV | None = None


def key_transpose(kt: Value, sv: ShapeValues) -> KeyTranspose | None:
    """Recognize K^T: `Transpose(K, (0, 1, 3, 2))`, the folded `Transpose(Reshape(k3),
    (0, 2, 3, 1))`, or torch.onnx's `Reshape(Transpose(Reshape(K, [-1, L, D]), (0, 2, 1)),
    [b, H, D, L])`; scale factors on either side of the transpose are collected."""
    nodes: list[Node] = []
    kt, factor = strip_scale(kt, sv, nodes)
    folded = head_split(kt, sv, perm=(0, 2, 3, 1))
    if folded is not None:
        return KeyTranspose(None, folded, factor, nodes)
    transpose = producer(kt, "Transpose")
    key: Value | None = None
    repeat = None
    if transpose is not None and list(transpose.get_attr("perm", [])) == [0, 1, 3, 2]:
        nodes.append(transpose)
        key = transpose.inputs[0]
    else:
        found = _flat_transpose(kt, sv, nodes)
        if found is None:
            return None
        key, repeat = found
    if key is None:
        return None
    if repeat is None:
        key, more = strip_scale(key, sv, nodes)
        factor *= more
    return KeyTranspose(key, None, factor, nodes, repeat)


def _flat_transpose(
    kt: Value, sv: ShapeValues, nodes: list[Node]
) -> tuple[Value, RepeatKV | None] | None:
    outer = producer(kt, "Reshape")
    transpose = producer(outer.inputs[0], "Transpose") if outer is not None else None
    if outer is None or transpose is None or list(transpose.get_attr("perm", [])) != [0, 2, 1]:
        return None
    inner = producer(transpose.inputs[0], "Reshape")
    if inner is None or inner.inputs[0] is None:
        return None
    key = inner.inputs[0]
    dk, flat, dt = sv.dims.dims(key), sv.dims.dims(inner.outputs[0]), sv.dims.dims(kt)
    if dk is None or flat is None or dt is None or len(flat) != 3 or len(dt) != 4:
        return None
    repeat = None
    if len(dk) == 5:  # repeat_kv's [b, h, n, L, D] with its own Reshape merged into this one
        repeat = _repeat_expand(key, sv)
        if repeat is None:
            return None
        b, h, n, length, d = dk
        if not isinstance(h, int) or not isinstance(n, int):
            return None
        dk = (b, h * n, length, d)
    if len(dk) != 4:
        return None
    # [b, h, l, d] -> [b*h, l, d] -> [b*h, d, l] -> [b, h, d, l]: K^T when the ends match
    if flat[1:] != dk[2:] or dt != (dk[0], dk[1], dk[3], dk[2]):
        return None
    nodes.extend([outer, transpose, inner])
    if repeat is not None:
        nodes.extend(repeat.nodes)
        return repeat.source, repeat
    return key, None


def _repeat_expand(value: Value, sv: ShapeValues) -> RepeatKV | None:
    """`Expand(Unsqueeze(x, 2), [b, h, n, l, d])` of a 4-D x: its heads repeated n times."""
    expand = producer(value, "Expand")
    unsqueeze = producer(expand.inputs[0], "Unsqueeze") if expand is not None else None
    if expand is None or unsqueeze is None or unsqueeze.inputs[0] is None:
        return None
    x = unsqueeze.inputs[0]
    dx, du, de = sv.dims.dims(x), sv.dims.dims(unsqueeze.outputs[0]), sv.dims.dims(value)
    if dx is None or du is None or de is None or len(dx) != 4:
        return None
    b, h, length, d = dx
    if du != (b, h, 1, length, d) or len(de) != 5 or (de[0], de[1], de[3], de[4]) != dx:
        return None
    times = de[2]
    if not isinstance(h, int) or not isinstance(times, int) or times < 1:
        return None
    return RepeatKV(x, times, [expand, unsqueeze])


def repeat_kv(value: Value, sv: ShapeValues) -> RepeatKV | None:
    reshape = producer(value, "Reshape")
    if reshape is None or reshape.inputs[0] is None:
        return None
    found = _repeat_expand(reshape.inputs[0], sv)
    if found is None:
        return None
    b, h, length, d = sv.dims.dims(found.source)  # type: ignore[misc]
    if not isinstance(h, int) or sv.dims.dims(value) != (b, h * found.times, length, d):
        return None
    return RepeatKV(found.source, found.times, [reshape, *found.nodes])


# ----- masks ------------------------------------------------------------------------------------


def index_axis(value: Value, sv: ShapeValues) -> tuple[int, Elem] | None:
    """If `value` holds `arange(n)` along one axis (every other dim provably 1): (that axis
    counted from the end, n). Seen through Unsqueeze, Squeeze, Reshape, Cast and Identity (which
    keep the order of a vector's elements) down to `Range(0, n, 1)`."""
    dims = sv.dims.dims(value)
    if dims is None:
        return None
    big = [axis for axis, d in enumerate(dims) if d != 1]
    if len(big) != 1:
        return None
    axis = big[0]
    current: Value | None = value
    while current is not None and current.producer is not None:
        node = current.producer
        if node.domain != "":
            return None
        if node.op_type in ("Unsqueeze", "Squeeze", "Reshape", "Identity", "Cast"):
            current = node.inputs[0]
            continue
        if node.op_type != "Range":
            return None
        start, limit, delta = (sv.vector(v) for v in node.inputs[:3])
        if start is None or delta is None or limit is None or len(limit.elems) != 1:
            return None
        if start.elems != (0,) or delta.elems != (1,):
            return None
        return axis - len(dims), limit.elems[0]
    return None


def causal_condition(cond: Value, rows: Elem, cols: Elem, sv: ShapeValues) -> bool:
    """True when the bool `cond`, broadcast to [..., rows, cols], is exactly `j <= i` (key j
    visible from query i: the top-left causal mask of Attention's `is_causal`)."""
    node = cond.producer
    if node is not None and node.domain == "" and node.op_type == "And":
        a, b = node.inputs
        for x, y in ((a, b), (b, a)):
            array = constant_value(y)
            if array is not None and array.dtype == np.bool_ and bool(array.all()):
                if x is not None and (_rank(sv, y) or 0) <= (_rank(sv, x) or 0):  # type: ignore[arg-type]
                    return causal_condition(x, rows, cols, sv)
        return False
    array = constant_value(cond, limit=1 << 24)
    if array is not None:
        return _constant_tril(array, rows, cols)
    if node is None or node.domain != "":
        return False
    if node.op_type in ("LessOrEqual", "GreaterOrEqual"):
        key, query = node.inputs if node.op_type == "LessOrEqual" else node.inputs[::-1]
        if key is None or query is None:
            return False
        k, q = index_axis(key, sv), index_axis(query, sv)
        return k == (-1, cols) and q == (-2, rows)
    if node.op_type == "Slice":
        return _causal_slice(node, rows, cols, sv)
    return False


def _constant_tril(array: np.ndarray, rows: Elem, cols: Elem) -> bool:
    if array.ndim < 2 or array.dtype != np.bool_:
        return False
    if array.shape[-2:] != (rows, cols):
        return False
    return bool(np.all(array == np.tril(np.ones(array.shape[-2:], np.bool_))))


def _causal_slice(node: Node, rows: Elem, cols: Elem, sv: ShapeValues) -> bool:
    """Slices from 0 of a constant buffer that is lower-triangular (j <= i) everywhere, to
    [rows, cols] on the last two axes: GPT-2's `bias[:, :, L-S:L, :L]` once L - S is known 0."""
    ends: dict[int, Elem] = {}
    current: Node | None = node
    array = None
    while current is not None and current.domain == "" and current.op_type == "Slice":
        params = slice_params(sv.vector, current)
        rank = len(sv.dims.dims(current.inputs[0]) or ())
        if params is None or rank < 2:
            return False
        for start, end, axis, step in zip(*params.lists(), strict=True):
            axis = axis - rank if axis >= 0 else axis
            if start != 0 or step != 1 or axis in ends:
                return False
            if axis in (-2, -1):
                ends[axis] = end
        source = current.inputs[0]
        array = constant_value(source, limit=1 << 24)
        current = source.producer if array is None and source is not None else None
    if array is None or array.ndim < 2 or array.dtype != np.bool_:
        return False
    if not np.all(array == np.tril(np.ones(array.shape[-2:], np.bool_))):
        return False
    for axis, want in ((-2, rows), (-1, cols)):
        dim = array.shape[axis]
        stop = ends.get(axis, dim)
        if stop == want and (not isinstance(want, int) or dim >= want):
            continue
        if not (isinstance(stop, int) and isinstance(want, int) and min(stop, dim) == want):
            return False
    return True


def causal_condition_array(visible: np.ndarray, rows: Elem, cols: Elem) -> bool:
    if visible.ndim < 2 or visible.shape[-2:] != (rows, cols):
        return False
    return bool(np.all(visible == np.tril(np.ones(visible.shape[-2:], np.bool_))))


# ----- clean-up ------------------------------------------------------------------------------


def clear_dim(e: Elem | None) -> int | str | None:
    """A dim as a type can hold it: numbers and symbols kept, tokens unknown."""
    return e if isinstance(e, (int, str)) else None


def shape_feeders(nodes: list[Node]) -> list[Node]:
    """The shape arithmetic only `nodes` may need: the Shape readers of their outputs and the
    integer nodes computing their Reshape/Expand targets (removed if nothing else reads them)."""
    found: list[Node] = []
    stack: list[Value | None] = []
    for node in nodes:
        for value in node.outputs:
            found += [u for u in value.users() if u.op in ("Shape", "Size")]
        if node.op in ("Reshape", "Expand") and len(node.inputs) > 1:
            stack.append(node.inputs[1])
    seen: set[Node] = set()
    while stack:
        target = stack.pop()
        feeder = target.producer if target is not None else None
        if feeder is None or feeder in seen or feeder.domain != "":
            continue
        t = feeder.outputs[0].type
        if not isinstance(t, TensorType) or t.dtype not in (DType.INT64, DType.INT32):
            continue
        seen.add(feeder)
        found.append(feeder)
        stack.extend(feeder.inputs)
    return found


def remove_dead(graph: Graph, nodes: list[Node]) -> None:
    pending = list(dict.fromkeys(nodes))
    removed = True
    while removed:
        removed = False
        for node in pending:
            if node.graph is graph and not any(v.is_used for v in node.outputs):
                graph.remove(node)
                removed = True
