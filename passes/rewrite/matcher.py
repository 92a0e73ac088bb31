"""Matching a pattern against the IR, from the root node back through producers.

`match(root_pattern, node)` yields every way the pattern matches with its root at `node`
(backtracking over the two input orders of commutative ops and over optional nodes), as `Match`
objects: variable bindings, the IR node of each pattern node, and captured nodes by name. A
variable used twice must bind one value; one IR node never matches two pattern nodes.

Attribute constraints compare with the node's attribute or, when the node leaves it out, the
default from the op's schema.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.ir.core import Node, Value
from graphopt.ir.inference import constant_value
from graphopt.passes.rewrite.pattern import Const, NodeOutput, PatternNode, PatternValue, Var

__all__ = ["Match", "match", "schema_default"]

CONSTANT_LIMIT = 1 << 20  # elements: constants a pattern may inspect


@dataclass
class Match:
    """One way a pattern matched: bindings by variable name, IR nodes by pattern node."""

    root: Node
    opset: int | None = None  # of the default domain, for attribute defaults
    bindings: dict[str, Value] = field(default_factory=dict)
    nodes: dict[int, Node] = field(default_factory=dict)  # id(PatternNode) -> Node
    captured: dict[str, Node] = field(default_factory=dict)

    def copy(self) -> Match:
        return Match(
            self.root, self.opset, dict(self.bindings), dict(self.nodes), dict(self.captured)
        )

    @property
    def matched_nodes(self) -> list[Node]:
        return list(self.nodes.values())


def match(pattern: PatternNode, node: Node, opset: int | None = None) -> Iterator[Match]:
    yield from _node(pattern, node, Match(node, opset))


def _node(pattern: PatternNode, node: Node, state: Match) -> Iterator[Match]:
    bound = state.nodes.get(id(pattern))
    if bound is not None:
        if bound is node:
            yield state
        return
    if node.op_type != pattern.op_type or node.domain != pattern.domain:
        return
    if not _arity_matches(len(node.outputs), pattern.outputs, pattern.allow_other_outputs):
        return
    if not _arity_matches(len(node.inputs), len(pattern.inputs), pattern.allow_other_inputs):
        return
    if any(node is other for other in state.nodes.values()):
        return
    if not _attributes_match(pattern, node, state.opset):
        return
    state = state.copy()
    state.nodes[id(pattern)] = node
    if pattern.capture:
        state.captured[pattern.capture] = node
    orders = [pattern.inputs]
    if pattern.commutative:
        orders.append(pattern.inputs[::-1])
    for order in orders:
        yield from _inputs(order, node.inputs, 0, state)


def _arity_matches(actual: int, wanted: int, allow_more: bool) -> bool:
    return actual == wanted or (allow_more and actual > wanted)


def _inputs(
    patterns: list[PatternValue | None], values: tuple[Value | None, ...], i: int, state: Match
) -> Iterator[Match]:
    if i == len(patterns):
        yield state
        return
    for next_state in _value(patterns[i], values[i], state):
        yield from _inputs(patterns, values, i + 1, next_state)


def _value(pattern: PatternValue | None, value: Value | None, state: Match) -> Iterator[Match]:
    if pattern is None or value is None:
        if pattern is None and value is None:
            yield state
        return
    if isinstance(pattern, Var):
        bound = state.bindings.get(pattern.name)
        if bound is None:
            state = state.copy()
            state.bindings[pattern.name] = value
            yield state
        elif bound is value:
            yield state
        return
    if isinstance(pattern, Const):
        array = constant_value(value, CONSTANT_LIMIT)
        if array is None or not pattern.accepts(array):
            return
        if pattern.name:
            bound = state.bindings.get(pattern.name)
            if bound is not None and bound is not value:
                return
            state = state.copy()
            state.bindings[pattern.name] = value
        yield state
        return
    assert isinstance(pattern, NodeOutput)
    producer = value.producer
    if producer is not None and value.index == pattern.index:
        yield from _node(pattern.node, producer, state)
    if pattern.node.optional:  # the node may be absent: its first input stands for it
        yield from _value(pattern.node.inputs[0], value, state)


def _attributes_match(pattern: PatternNode, node: Node, opset: int | None) -> bool:
    for name, expected in pattern.attrs.items():
        actual = node.get_attr(name, _MISSING)
        if actual is _MISSING:
            actual = schema_default(node, name, opset if node.domain == "" else None)
        if callable(expected):
            if not expected(actual):
                return False
        elif not _equal(actual, expected):
            return False
    return True


_MISSING = object()


def schema_default(node: Node, name: str, opset: int | None = None) -> Any:
    """The default of attribute `name` of `node`'s op (at `opset`), or None."""
    from graphopt.ir.registry import REGISTRY

    entry = REGISTRY.lookup(node.op, opset)
    schema = entry.schema if entry is not None else None
    if schema is None:
        return None
    attribute = schema.attributes.get(name)
    if attribute is None or not attribute.default_value.name:
        return None
    import onnx.helper

    value = onnx.helper.get_attribute_value(attribute.default_value)
    return value.decode() if isinstance(value, bytes) else value


def _equal(actual: Any, expected: Any) -> bool:
    if isinstance(actual, bytes):
        actual = actual.decode("utf-8", "replace")
    if isinstance(actual, np.ndarray) or isinstance(expected, np.ndarray):
        a, e = np.asarray(actual), np.asarray(expected)
        return a.shape == e.shape and bool(np.all(a == e))
    if isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple)):
        return len(actual) == len(expected) and all(map(_equal, actual, expected))
    return bool(actual == expected)
