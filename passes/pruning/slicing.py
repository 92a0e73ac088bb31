"""Removing units from regions: slice the constants, rewrite shapes, head counts and split sizes.

`structure.analyze` says which positions of which tensors belong to which unit; given the units to
drop per region, `remove(graph, plans)` makes the model smaller for real:

- every constant edit (weights, biases, BatchNormalization parameters) is applied as `np.take` of
  the kept positions along its axis; edits on the same (node, input) compose (a Conv that is the
  sink of one region and the source of the next loses input and output channels). A constant read
  by anything else than the edited input gets a sliced copy: shared tensors are never changed;
- Reshape shapes: the entry holding the channel count gets the kept count, in a new constant (or a
  new Concat beside the old one, whose other readers keep it);
- Split sizes become a new constant (an equal-parts `num_outputs` Split too, since the parts may no
  longer be equal); `group`, `q_num_heads`/`kv_num_heads`, `num_heads` become the kept counts;
- the declared types of the region's tensors get their new size on the tracked axis.

`base` lets a caller (refit) give a replacement array for a constant before slicing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from graphopt.ir.core import Graph, Node, Value
from graphopt.ir.types import TensorType
from graphopt.passes.pruning.structure import MaskEdit, Region

__all__ = ["Plan", "drop_if_unused", "keep_mask", "remove"]


@dataclass
class Plan:
    """A region and the unit indices (into `region.units()`) to remove from it."""

    region: Region
    drop: np.ndarray

    def __post_init__(self) -> None:
        roots, _ = self.region.units()
        self._dropped_roots = roots[self.drop]

    def keep(self, ids: np.ndarray) -> np.ndarray:
        return keep_mask(self.region, self._dropped_roots, ids)


def keep_mask(region: Region, dropped_roots: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return ~np.isin(region.positions.roots(ids), dropped_roots)


def _new_const(graph: Graph, like: Value, array: np.ndarray) -> Value:
    return graph.add_initializer(graph.scope.fresh(f"{like.name or 'const'}_pruned"), array)


def remove(
    graph: Graph, plans: Sequence[Plan], base: Mapping[tuple[Node, int], np.ndarray] | None = None
) -> None:
    """Apply every plan's removal to `graph` (see the module docstring)."""
    base = base or {}
    slices: dict[tuple[Node, int], list[tuple[int, np.ndarray]]] = defaultdict(list)
    for plan in plans:
        for edit in plan.region.consts:
            slices[(edit.node, edit.index)].append((edit.axis, plan.keep(edit.ids)))
    for (node, index), cuts in slices.items():
        value = node.inputs[index]
        assert value is not None and value.const_value is not None
        array = base.get((node, index), value.const_value)
        for axis, keep in cuts:
            array = np.compress(keep, array, axis=axis)
        array = np.ascontiguousarray(array)
        if value.uses == [(node, index)] and not value.is_graph_input:
            value.const_value = array
            value.type = TensorType(value.type.dtype, array.shape)  # type: ignore[union-attr]
        else:
            node.set_input(index, _new_const(graph, value, array))
            drop_if_unused(graph, value)
    sizes: dict[Value, dict[int, int]] = defaultdict(dict)
    for plan in plans:
        for value, (axis, ids) in plan.region.values.items():
            sizes[value][axis] = int(plan.keep(ids).sum())
        for r in plan.region.reshapes:
            _rewrite_shape(graph, r.node, r.entry, int(plan.keep(r.ids).sum()))
        for s in plan.region.splits:
            _rewrite_split(graph, s.node, [int(plan.keep(ids).sum()) for ids in s.ids])
        for a in plan.region.attrs:
            a.node.set_attr(a.name, int(plan.keep(a.ids).sum()) // a.per)
        for m in plan.region.masks:
            _gather_mask(graph, m, np.flatnonzero(plan.keep(m.ids)[:: m.per]))
    for value, new in sizes.items():
        t = value.type
        if isinstance(t, TensorType) and t.shape is not None:
            shape = list(t.shape)
            for axis, n in new.items():
                shape[axis] = n
            value.type = t.with_shape(tuple(shape))


def drop_if_unused(graph: Graph, value: Value) -> None:
    if not value.is_used and not value.is_graph_input and value.producer is None:
        if graph.initializers.get(value.name or "") is value:
            graph.remove_initializer(value)


def _rewrite_shape(graph: Graph, node: Node, entry: int, size: int) -> None:
    shape = node.inputs[1]
    assert shape is not None
    if shape.const_value is not None:
        array = np.array(shape.const_value, copy=True)
        array.ravel()[entry] = size
        node.set_input(1, _new_const(graph, shape, array))
        drop_if_unused(graph, shape)
        return
    concat = shape.producer
    assert concat is not None and concat.op == "Concat"
    pieces = list(concat.inputs)
    offset = entry
    for index, piece in enumerate(pieces):
        assert piece is not None and isinstance(piece.type, TensorType) and piece.type.shape
        n = int(piece.type.shape[0])  # type: ignore[arg-type]
        if offset < n:
            array = np.array(piece.const_value, copy=True)
            array.ravel()[offset] = size
            pieces[index] = _new_const(graph, piece, array)  # type: ignore[arg-type]
            break
        offset -= n
    clone = Node(
        "Concat",
        pieces,
        {"axis": concat.get_attr("axis", 0)},
        name=graph.scope.fresh(f"{concat.name}_pruned"),
    )
    graph.insert_before(node, clone)
    clone.output.type = shape.type
    node.set_input(1, clone.output)
    if not concat.outputs[0].is_used:
        graph.remove(concat)
        for piece in concat.inputs:
            if piece is not None:
                drop_if_unused(graph, piece)


def _gather_mask(graph: Graph, m: MaskEdit, heads: np.ndarray) -> None:
    """mask[:, heads] before the attention node (expanded to every head first when its head dim
    is not known: a valid mask has 1 or all of them there)."""
    mask = m.node.inputs[m.index]
    assert mask is not None and isinstance(mask.type, TensorType)
    source = mask
    if not m.known:
        shape = graph.add_initializer(
            graph.scope.fresh("mask_heads"), np.array([1, m.heads, 1, 1], np.int64)
        )
        expand = Node("Expand", [mask, shape], name=graph.scope.fresh("mask_expand"))
        graph.insert_before(m.node, expand)
        expand.output.type = TensorType(mask.type.dtype, (None, m.heads, None, None))
        source = expand.output
    dims = list(mask.type.shape) if m.known and mask.type.shape else [None, m.heads, None, None]
    dims[1] = len(heads)
    index = graph.add_initializer(graph.scope.fresh("mask_kept_heads"), heads.astype(np.int64))
    gather = Node("Gather", [source, index], {"axis": 1}, name=graph.scope.fresh("mask_gather"))
    graph.insert_before(m.node, gather)
    gather.output.type = TensorType(mask.type.dtype, tuple(dims))
    m.node.set_input(m.index, gather.output)


def _rewrite_split(graph: Graph, node: Node, sizes: list[int]) -> None:
    array = np.array(sizes, dtype=np.int64)
    opset_sizes_input = (
        len(node.inputs) > 1 or "num_outputs" in node.attrs or "split" not in node.attrs
    )
    if "split" in node.attrs and len(node.inputs) < 2:
        node.set_attr("split", sizes)
        return
    node.attrs.pop("num_outputs", None)
    assert opset_sizes_input
    new = graph.add_initializer(graph.scope.fresh("split_pruned"), array)
    if len(node.inputs) > 1:
        old = node.inputs[1]
        node.set_input(1, new)
        if old is not None:
            drop_if_unused(graph, old)
    else:
        node.set_inputs([*node.inputs, new])
