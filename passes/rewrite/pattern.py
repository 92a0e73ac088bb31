"""Patterns: the shape a rewrite looks for, written as Python that builds it from op calls.

    def pattern(self, op, x, w, b):
        return op.Add(op.MatMul(x, w), b)

`trace(rule.pattern)` calls the function with an `OpBuilder` and one `Var` per parameter after
`op`, and returns the pattern's root. Pieces:

- `Var(name)`: matches any value; a name used twice must match the same value both times (that is
  how shared sub-patterns are written: `t = op.Sub(x, m); op.Mul(t, t)`).
- `op.Softmax(x, axis=-1)`: a node of that op whose attribute equals -1 (a missing attribute takes
  the schema's default); an attribute may also be a predicate, `axis=lambda a: a in (-1, 3)`.
  `_name="sm"` captures the node for `check`/`rewrite`; `_outputs=2` gives a multi-output node;
  `_optional=True` makes the node optional: the pattern also matches its first input directly.
  `_allow_other_inputs=True` lets the node have more inputs than the pattern lists (trailing
  optional ones, present or not), `_allow_other_outputs=True` more outputs than `_outputs`: the
  pattern matches the first ones, and `check`/`rewrite` read the rest from the node.
  Add, Mul, Max, Min, And, Or, Xor, Equal and Sum match either input order.
- `Const(value)` / `Const(predicate)`: a constant input (initializer or Constant node) whose value
  equals `value` everywhere (broadcast) or satisfies the predicate; `Const()` matches any constant.
  Give it a name to bind it: `Const(name="eps")`.
- `op.op("com.microsoft.Gelu", x)` for ops outside the default domain.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.ir.core import join_op, split_op

__all__ = ["Const", "NodeOutput", "OpBuilder", "PatternNode", "PatternValue", "Var", "trace"]

COMMUTATIVE = frozenset({"Add", "Mul", "Max", "Min", "And", "Or", "Xor", "Equal", "Sum"})


class PatternValue:
    """Something that matches an IR value."""


@dataclass(eq=False)
class Var(PatternValue):
    name: str

    def __repr__(self) -> str:
        return self.name


@dataclass(eq=False)
class Const(PatternValue):
    """A constant input; `value` is a number/array it must equal, or a predicate on the array."""

    value: Any = None
    name: str | None = None

    def accepts(self, array: np.ndarray) -> bool:
        if self.value is None:
            return True
        if callable(self.value):
            return bool(self.value(array))
        expected = np.asarray(self.value)
        try:
            return bool(np.all(array == expected)) and array.dtype.kind in "biuf"
        except (TypeError, ValueError):
            return False


@dataclass(eq=False)
class PatternNode:
    op: str
    inputs: list[PatternValue | None]
    attrs: dict[str, Any]
    outputs: int = 1
    capture: str | None = None
    optional: bool = False
    allow_other_inputs: bool = False
    allow_other_outputs: bool = False
    domain: str = field(init=False)
    op_type: str = field(init=False)
    commutative: bool = field(init=False)

    def __post_init__(self) -> None:  # the matcher reads these for every candidate node
        self.domain, self.op_type = split_op(self.op)
        self.commutative = (
            self.domain == "" and self.op_type in COMMUTATIVE and len(self.inputs) == 2
        )

    def nodes(self) -> list[PatternNode]:
        """This node and every pattern node below it, each once, root first."""
        seen: dict[int, PatternNode] = {}
        stack = [self]
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen[id(node)] = node
            stack.extend(v.node for v in node.inputs if isinstance(v, NodeOutput))
        return list(seen.values())


@dataclass(eq=False)
class NodeOutput(PatternValue):
    node: PatternNode
    index: int = 0


@dataclass
class OpBuilder:
    """The `op` a pattern function receives: `op.MatMul(a, b)` builds a pattern node."""

    created: list[PatternNode] = field(default_factory=list)

    def op(
        self,
        name: str,
        *inputs: PatternValue | None,
        _outputs: int = 1,
        _name: str | None = None,
        _optional: bool = False,
        _allow_other_inputs: bool = False,
        _allow_other_outputs: bool = False,
        **attrs: Any,
    ) -> Any:
        for value in inputs:
            if value is not None and not isinstance(value, PatternValue):
                raise TypeError(
                    f"pattern input {value!r} of {name}: use a pattern variable or Const(...)"
                )
        if _optional and not inputs:
            raise TypeError(f"optional pattern node {name} needs an input to pass through")
        domain, op_type = split_op(name)
        node = PatternNode(
            join_op(domain, op_type), list(inputs), attrs, _outputs, _name, _optional,
            _allow_other_inputs, _allow_other_outputs,
        )  # fmt: skip
        self.created.append(node)
        if _outputs == 1:
            return NodeOutput(node, 0)
        return tuple(NodeOutput(node, i) for i in range(_outputs))

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *inputs, **attrs: self.op(name, *inputs, **attrs)


def trace(function: Callable[..., Any]) -> tuple[PatternNode, list[str]]:
    """Build the pattern of `function(op, var1, var2, ...)`; returns its root and the var names."""
    params = list(inspect.signature(function).parameters)[1:]  # after `op`
    builder = OpBuilder()
    root = function(builder, *(Var(p) for p in params))
    if not isinstance(root, NodeOutput):
        raise TypeError(f"{function.__qualname__} must return the output of an op call")
    if root.node.optional:
        raise TypeError(f"{function.__qualname__}: the root of a pattern cannot be optional")
    return root.node, params
