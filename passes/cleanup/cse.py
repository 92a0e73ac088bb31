"""eliminate-common-subexpressions: compute each distinct expression once.

First identical constants are merged (same element type, shape and bytes; only constants whose
dtype and shape another constant shares are hashed, so unique weights are never read). Then one
forward walk keys every node by (op, attributes, input values) and sends the readers of a node whose key was seen to the first node's outputs. Inputs of commutative
ops are keyed as a set, so Add(a, b) and Add(b, a) merge. Random ops and nodes with subgraphs are
never merged.

Equal because: ONNX ops are pure functions of their inputs and attributes, so two nodes with the
same key compute the same values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.ir.core import Attribute, AttrKind, Graph, Node, Value
from graphopt.passes.cleanup.fold_constants import RANDOM_OPS
from graphopt.passes.manager import GraphPass, PassContext, register_pass
from graphopt.passes.rewrite.pattern import COMMUTATIVE


@register_pass("eliminate-common-subexpressions", "compute each distinct expression once")
@dataclass
class EliminateCommonSubexpressions(GraphPass):
    max_constant_elements: int = 1 << 26

    def run_on_graph(self, graph: Graph, context: PassContext) -> bool:
        changed = self._merge_constants(graph)
        seen: dict[Any, Node] = {}
        for node in graph:
            key = _key(node)
            if key is None:
                continue
            first = seen.setdefault(key, node)
            if first is node:
                continue
            for old, new in zip(node.outputs, first.outputs, strict=True):
                old.replace_all_uses_with(new)
            graph.remove(node)
            changed = True
        return changed

    def _merge_constants(self, graph: Graph) -> bool:
        """Merge equal constants; only constants sharing dtype and shape with another are read."""
        groups: dict[tuple[Any, ...], list[Value]] = {}
        for value in graph.initializers.values():
            array = value.const_value
            if value.is_graph_input or array is None or array.size > self.max_constant_elements:
                continue
            groups.setdefault((array.dtype.str, array.shape), []).append(value)
        changed = False
        for group in groups.values():
            if len(group) < 2 or group[0].const_value.dtype.kind == "O":  # type: ignore[union-attr]
                continue
            seen: dict[bytes, Value] = {}
            for value in group:
                first = seen.setdefault(_digest(value.const_value), value)  # type: ignore[arg-type]
                if first is not value:
                    value.replace_all_uses_with(first)
                    graph.remove_initializer(value)
                    changed = True
        return changed


def _digest(array: np.ndarray) -> bytes:
    if array.dtype.kind == "O":
        return hashlib.blake2b(repr(array.tolist()).encode(), digest_size=16).digest()
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).digest()


def _key(node: Node) -> tuple[Any, ...] | None:
    if node.op_type in RANDOM_OPS or not node.outputs or node.subgraphs():
        return None
    inputs: tuple[Any, ...] = tuple(id(v) if v is not None else None for v in node.inputs)
    if node.domain == "" and node.op_type in COMMUTATIVE:
        inputs = tuple(sorted(inputs, key=lambda i: (i is None, i or 0)))
    attrs = tuple(sorted((name, _attribute_key(a)) for name, a in node.attrs.items()))
    return (node.domain, node.op_type, node.overload, inputs, attrs, len(node.outputs))


def _attribute_key(a: Attribute) -> Any:
    if a.kind is AttrKind.TENSOR:
        array = np.asarray(a.value)
        return ("tensor", array.dtype.str, array.shape, _digest(array))
    if a.kind in (AttrKind.FLOATS, AttrKind.INTS, AttrKind.STRINGS):
        return (a.kind, tuple(a.value))
    if a.kind in (AttrKind.FLOAT, AttrKind.INT, AttrKind.STRING):
        return (a.kind, a.value)
    return (a.kind, id(a.value))  # graphs, sparse tensors, types: only the same object is equal
