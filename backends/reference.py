"""The reference interpreter: runs any IR graph with numpy. It is the oracle of every test.

Each op's kernel comes from the op registry (`graphopt.ir.registry`): for standard ONNX ops the
`onnx` package's reference implementations unless graphopt has a faster one of its own, for ops a
pass introduces graphopt's own numpy code. Semantics are therefore ONNX's, op by op.

How it runs: the first run of a graph builds a plan, one step per node with its prepared kernel and
the values whose last reader it is; each step frees those, so intermediate tensors of a big model do
not pile up. Subgraphs (If/Loop/Scan bodies) run in a child frame that sees the enclosing graph's
values, as ONNX scoping requires. Inputs are checked against the graph's declared types before
anything runs (element type, rank, static dims, and symbolic dims bound consistently across inputs),
and a failing kernel is reported with the node that failed.

    outputs = Interpreter(model).run({"x": x})          # output name -> array
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.ir.core import Graph, Model, Node, Value
from graphopt.ir.errors import GraphoptError, UnsupportedOpError
from graphopt.ir.registry import REGISTRY, Kernel
from graphopt.ir.types import DType, TensorType, Type

__all__ = ["ExecutionError", "InputError", "Interpreter", "run_reference"]


class ExecutionError(GraphoptError):
    """A kernel failed while running a node (bad input data, or a bug in a kernel)."""


class InputError(GraphoptError):
    """The inputs given to a run do not match the model's inputs."""


@dataclass
class _Step:
    node: Node
    kernel: Kernel
    needs_frame: bool
    free_after: list[Value] = field(default_factory=list)


@dataclass
class _Plan:
    steps: list[_Step]
    unused: list[Value]  # values defined here that nothing reads: dropped right away


class _Frame:
    """Values of one graph activation; lookups fall back to the enclosing graph's frame."""

    __slots__ = ("interpreter", "values", "parent")

    def __init__(self, interpreter: Interpreter, parent: _Frame | None):
        self.interpreter = interpreter
        self.values: dict[Value, Any] = {}
        self.parent = parent

    def get(self, value: Value) -> Any:
        frame: _Frame | None = self
        while frame is not None:
            found = frame.values.get(value, _MISSING)
            if found is not _MISSING:
                return found
            frame = frame.parent
        raise ExecutionError(f"%{value.name} is read before it is computed")

    def run_graph(self, graph: Graph, inputs: Sequence[Any]) -> list[Any]:
        return self.interpreter._run(graph, list(inputs), parent=self)


_MISSING = object()


class Interpreter:
    """Runs `model` (or a bare graph with the given opset imports) on numpy inputs.

    `check_types=True` also checks every produced tensor's element type against the type the
    graph declares for it (tests use it to catch kernels and passes that change dtypes)."""

    def __init__(
        self,
        model: Model | Graph,
        *,
        opset_imports: Mapping[str, int] | None = None,
        check_types: bool = False,
    ):
        if isinstance(model, Model):
            self.graph = model.graph
            self.opset_imports: Mapping[str, int] = dict(model.opset_imports)
            self.functions: Sequence[Any] = list(model.functions)
        else:
            self.graph = model
            self.opset_imports = dict(opset_imports or {"": 21})
            self.functions = []
        self.check_types = check_types
        self._local_functions = {(f.domain, f.name) for f in self.functions}
        self._plans: dict[Graph, _Plan] = {}

    # ----- KernelEnv ------------------------------------------------------------------------------
    def opset(self, domain: str) -> int:
        if domain in ("", "ai.onnx"):
            return int(self.opset_imports.get("", self.opset_imports.get("ai.onnx", 1)))
        return int(self.opset_imports.get(domain, 1))

    def input_types(self, node: Node) -> list[Type | None]:
        return [v.type if v is not None else None for v in node.inputs]

    # ----- running --------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run the main graph; returns graph output name -> value, in output order."""
        graph = self.graph
        values = self._run(graph, _bind_inputs(graph, feeds), parent=None)
        names = graph.output_names
        return {
            (names[i] if i < len(names) and names[i] else v.name or f"output_{i}"): values[i]
            for i, v in enumerate(graph.outputs)
        }

    def _run(self, graph: Graph, inputs: list[Any], parent: _Frame | None) -> list[Any]:
        plan = self._plans.get(graph) or self._plan(graph)
        frame = _Frame(self, parent)
        env = frame.values
        if len(inputs) != len(graph.inputs):
            raise ExecutionError(
                f"graph '{graph.name}' takes {len(graph.inputs)} inputs, got {len(inputs)}"
            )
        for value in graph.initializers.values():
            env[value] = value.const_value
        for value, array in zip(graph.inputs, inputs, strict=True):
            env[value] = array
        for step in plan.steps:
            node = step.node
            args = [None if v is None else frame.get(v) for v in node.inputs]
            try:
                result = step.kernel(frame, *args) if step.needs_frame else step.kernel(*args)
            except GraphoptError:
                raise
            except Exception as error:
                raise ExecutionError(
                    f"{node.describe()} failed: {type(error).__name__}: {error}",
                    where=f"graph '{graph.name}'",
                    hint=_describe_args(node, args),
                ) from error
            for value, array in zip(node.outputs, _outputs(result, node), strict=False):
                env[value] = array
                if self.check_types:
                    _check_dtype(node, value, array)
            for value in step.free_after:
                env.pop(value, None)
        for value in plan.unused:
            env.pop(value, None)
        return [frame.get(v) for v in graph.outputs]

    def run_node(self, node: Node, inputs: Sequence[Any]) -> list[Any]:
        """Run one node on `inputs` outside any graph run (constant folding uses this); a node
        with subgraphs sees no enclosing values but the model's initializers."""
        kernel, needs_frame = self._kernel(node)
        if needs_frame:
            frame = _Frame(self, None)
            frame.values.update((v, v.const_value) for v in self.graph.initializers.values())
            return _outputs(kernel(frame, *inputs), node)
        return _outputs(kernel(*inputs), node)

    def _plan(self, graph: Graph) -> _Plan:
        steps = []
        last_use: dict[Value, int] = {}
        defined: set[Value] = set()
        for index, node in enumerate(graph):
            entry = self._kernel(node)
            steps.append(_Step(node, entry[0], entry[1]))
            for value in _values_read(node):
                last_use[value] = index
            defined.update(node.outputs)
        keep = set(graph.outputs)
        unused = []
        for value in defined:
            if value in keep:
                continue
            if value in last_use:
                steps[last_use[value]].free_after.append(value)
            else:
                unused.append(value)
        plan = _Plan(steps, unused)
        self._plans[graph] = plan
        return plan

    def _kernel(self, node: Node) -> tuple[Kernel, bool]:
        if (node.domain, node.op_type) in self._local_functions:
            from graphopt.ir.ops.onnx_kernels import onnx_reference_kernel

            return onnx_reference_kernel(node, self), False
        entry = REGISTRY.lookup(node.op, self.opset(node.domain))
        if entry is None or entry.kernel is None:
            close = REGISTRY.suggest(node.op) if entry is None else []
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UnsupportedOpError(
                f"{node.describe()}: the reference interpreter has no kernel for op '{node.op}'"
                + ("" if entry is None else f" at opset {self.opset(node.domain)}"),
                hint=hint + "register one with graphopt.ir.registry.register_kernel",
            )
        return entry.kernel(node, self), entry.needs_frame


def _outputs(result: Any, node: Node) -> list[Any]:
    """A kernel's result as one entry per node output (a bare array for a single output)."""
    outputs = list(result) if isinstance(result, (list, tuple)) else [result]
    return outputs + [None] * (len(node.outputs) - len(outputs))


def _values_read(node: Node) -> list[Value]:
    """Values `node` reads, its subgraphs' reads of enclosing values included."""
    read = [v for v in node.inputs if v is not None]
    for sub in node.subgraphs():
        inner = set(sub.inputs) | set(sub.initializers.values())
        for n in sub.all_nodes():
            inner.update(n.outputs)
        for n in [*sub.all_nodes(), sub.return_node]:
            read.extend(v for v in n.inputs if v is not None and v not in inner)
    return read


def _bind_inputs(graph: Graph, feeds: Mapping[str, Any]) -> list[Any]:
    """The main graph's input values in order, checked against the declared types."""
    by_name = {v.name: v for v in graph.inputs}
    unknown = sorted(set(feeds) - set(by_name))
    if unknown:
        raise InputError(
            f"not inputs of the model: {', '.join(unknown)}",
            hint=f"the model's inputs are: {', '.join(n or '?' for n in by_name)}",
        )
    bound: dict[str, int] = {}
    arrays = []
    for value in graph.inputs:
        if value.name in feeds:
            array = feeds[value.name]  # type: ignore[index]
            if isinstance(value.type, TensorType):
                array = _check_input(value, value.type, array, bound)
        elif value.const_value is not None:
            array = value.const_value
        else:
            raise InputError(
                f"input %{value.name} ({value.type}) is missing",
                hint="pass a value for every input without a default",
            )
        arrays.append(array)
    return arrays


def _check_input(value: Value, t: TensorType, array: Any, bound: dict[str, int]) -> np.ndarray:
    array = np.asarray(array)
    expected = t.dtype.numpy if t.dtype is not DType.STRING else None
    if expected is not None and array.dtype != expected:
        raise InputError(
            f"input %{value.name} must be {t.dtype.short_name} ({expected}), got {array.dtype}",
            hint=f"convert it with .astype(np.{expected})",
        )
    if t.shape is None:
        return array
    if array.ndim != len(t.shape):
        raise InputError(
            f"input %{value.name} must have rank {len(t.shape)} ({t}), got shape {array.shape}"
        )
    for axis, (dim, size) in enumerate(zip(t.shape, array.shape, strict=True)):
        if isinstance(dim, int) and dim != size:
            raise InputError(
                f"input %{value.name} must have {dim} at axis {axis} ({t}), got shape {array.shape}"
            )
        if isinstance(dim, str):
            if bound.setdefault(dim, size) != size:
                raise InputError(
                    f"input %{value.name} has {dim}={size} at axis {axis}, but another input "
                    f"bound {dim}={bound[dim]}",
                    hint=f"every input must agree on the size of '{dim}'",
                )
    return array


def _check_dtype(node: Node, value: Value, array: Any) -> None:
    t = value.type
    if isinstance(t, TensorType) and isinstance(array, np.ndarray) and t.dtype is not DType.STRING:
        if array.dtype != t.dtype.numpy:
            raise ExecutionError(
                f"{node.describe()} produced %{value.name} as {array.dtype}, but its type is {t}"
            )


def _describe_args(node: Node, args: list[Any]) -> str:
    parts = []
    for value, arg in zip(node.inputs, args, strict=True):
        if value is None:
            parts.append("_")
        elif isinstance(arg, np.ndarray):
            parts.append(f"%{value.name}: {arg.dtype}{list(arg.shape)}")
        else:
            parts.append(f"%{value.name}: {type(arg).__name__}")
    return "inputs were " + ", ".join(parts)


def run_reference(model: Model | Graph, feeds: Mapping[str, Any]) -> dict[str, Any]:
    """Run `model` once on `feeds` with the reference interpreter."""
    return Interpreter(model).run(feeds)
