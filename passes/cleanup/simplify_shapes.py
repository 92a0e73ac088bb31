"""simplify-shapes: fold the shape arithmetic exporters emit, as onnxsim and onnxslim do.

torch.onnx (the TorchScript exporter with dynamic axes above all) computes target shapes at run
time: `Shape(x) -> Gather(0) -> Unsqueeze -> Concat(.., [4, 4]) -> Reshape`. When the dims are static
that chain is a constant; when they are symbolic it often only copies dims the Reshape could keep
by itself (`[0, 0, 4, 4]`). This pass finds both, so the shape computation disappears.

How: `ShapeValues` (passes/cleanup/shape_values.py) walks the graph once and gives every small
integer value its shape vector (numbers, symbols such as `batch`, or tokens naming one unknown
dim); `DimAnalysis` (shape_dims.py) gives tensors' dims from declared types, from a few shape
rules, and, for values with no declared rank, from the op registry's inference. A second walk
rewrites:

1. a used integer value whose vector is all numbers becomes an initializer of the same dtype and
   rank (only at the frontier: a Gather whose output is folded too does not need its input
   folded). `Shape(x)` of a static `x` is the simplest case;
2. `Reshape(x, s)` with a computed `s`: an element equal to `x`'s own dim at that position becomes 0
   (copy the dim), and if exactly one element is still unknown (and `s` holds no -1) it becomes
   -1; when every element is then a number, `s` becomes a constant. With `allowzero=1` this needs
   `s` to hold no literal 0, and the Reshape switches to `allowzero=0` (a 0 that copies the dim
   the element named is that size, even when it is 0).
   A Reshape whose target is `x`'s own shape (elements equal, or 0, or one -1) is `x`;
3. `Expand(x, s)` whose target is `x`'s shape (each element equal to `x`'s dim, or 1; no new
   axes) is `x`; so is `Expand(x, Shape(x))` when `x`'s rank is unknown;
4. `ConstantOfShape(s)` with a constant `s` becomes an initializer, up to `max_elements`;
5. `Slice(x, starts, ends, ...)`: an `ends` element equal to the sliced dim becomes the dtype's
   max (both clamp to the dim), and a Slice that keeps all of `x` (starts 0, steps 1, ends at the
   dim) is `x`.

It refuses (noted in the report) a Reshape whose computed target still has two or more unknown
elements, or an unknown one beside a -1 (no single -1 can stand for them), and a ConstantOfShape
over `max_elements`. Nodes left without readers by these rewrites are removed here (default-domain
ops without subgraphs), with the initializers only they read; dead code that was there before is
left for eliminate-dead-code.

Equal because: a folded value holds the same numbers at every run (they follow from static dims
and constants by the ONNX semantics of each op); Reshape's 0 copies exactly the dim that was
there, and -1 is recomputed from the element count, which the unknown element had to match for
the original Reshape to succeed; Expand to the input's own shape and a Slice to the end copy
their input. Assumptions, stated: equal symbols in declared types are equal sizes (ONNX's
dim_param rule); dims fit in int32 when the graph casts them to int32; the -1 rewrite assumes the
other target dims are not 0 (an empty tensor), as exporters' own -1s do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphopt.ir.core import RETURN_OP, Graph, Node, Value
from graphopt.ir.inference import constant_value
from graphopt.passes.cleanup.shape_dims import (
    Elem,
    ShapeVec,
    Token,
    is_size,
    reaches_end,
    same_shape,
    slice_params,
)
from graphopt.passes.cleanup.shape_values import SHAPE_OPS, ShapeValues
from graphopt.passes.manager import GraphPass, PassContext, register_pass

__all__ = ["SimplifyShapes"]


@register_pass(
    "simplify-shapes",
    "fold shape computations (Shape/Gather/Concat/...) to constants, drop Reshape/Expand no-ops",
)
@dataclass
class SimplifyShapes(GraphPass):
    max_elements: int = 1 << 20  # ConstantOfShape folds up to this many elements

    def run_on_graph(self, graph: Graph, context: PassContext) -> bool:
        values = ShapeValues(graph, context.model.opset_imports).run()
        return _Rewriter(graph, values, self.max_elements, context).run()


class _Rewriter:
    def __init__(self, graph: Graph, values: ShapeValues, max_elements: int, context: PassContext):
        self.graph = graph
        self.values = values
        self.max_elements = max_elements
        self.context = context
        self.touched: list[Node] = []  # nodes whose readers or inputs we changed
        self.constants: dict[tuple[str, tuple[int, ...], bytes], Value] = {}
        self.created: list[Value] = []  # every initializer made here
        self.counts = {"folded": 0, "targets": 0, "noop": 0, "removed": 0}

    def run(self) -> bool:
        for node in self.graph:
            if node.domain != "":
                continue
            if node.op_type in SHAPE_OPS:  # the only ops whose outputs can be numbers
                self.fold_outputs(node)
            rewrite = _REWRITES.get(node.op_type)
            if rewrite is not None and node.outputs and node.outputs[0].is_used:
                rewrite(self, node)
        changed = bool(self.touched)
        self.remove_dead()
        if changed:
            summary = ", ".join(f"{k} {v}" for k, v in self.counts.items() if v)
            self.context.note(f"graph '{self.graph.name}': {summary}")
        return changed

    # ----- helpers -------------------------------------------------------------------------------
    def constant(self, array: np.ndarray, hint: str | None) -> Value:
        """An initializer holding `array` (shape-sized arrays are shared within the graph)."""
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 64 else None
        found = self.constants.get(key) if key is not None else None
        if found is None:
            found = self.graph.add_initializer(self.graph.scope.fresh(hint or "shape"), array)
            self.created.append(found)
            if key is not None:
                self.constants[key] = found
        return found

    def replace(self, node: Node, old: Value, new: Value, count: str) -> None:
        old.replace_all_uses_with(new)
        self.touched.append(node)
        self.counts[count] += 1

    def static(self, value: Value | None) -> ShapeVec | None:
        vec = self.values.vector(value)
        return vec if vec is not None and vec.is_static else None

    def folds_away(self, user: Node) -> bool:
        """True when every output of `user` is folded too, so it needs no constant input."""
        return (
            user.op != RETURN_OP
            and user.graph is self.graph
            and user.domain == ""
            and user.op_type != "Constant"
            and not user.subgraphs()
            and bool(user.outputs)
            and all(self.static(v) is not None for v in user.outputs)
        )

    # ----- 1. values that are numbers ------------------------------------------------------------
    def fold_outputs(self, node: Node) -> None:
        if node.op_type == "Constant":
            return
        for value in node.outputs:
            vec = self.static(value)
            if vec is None or not value.is_used:
                continue
            if all(self.folds_away(user) for user in value.users()):
                continue
            self.replace(node, value, self.constant(vec.array(), value.name), "folded")

    # ----- 2. Reshape ----------------------------------------------------------------------------
    def reshape(self, node: Node) -> None:
        x, s = node.inputs[0], node.inputs[1]
        vec = self.values.vector(s)
        allowzero = node.get_attr("allowzero", 0)
        dims = self.values.dims.dims(x)
        if x is None or s is None:
            return
        if vec is None or vec.scalar:
            if _is_whole_shape_of(s, x):
                self.replace(node, node.output, x, "noop")
            return
        if dims is not None and same_shape(vec.elems, dims, allowzero):
            self.replace(node, node.output, x, "noop")
            return
        if constant_value(s, limit=1 << 62) is not None or vec.is_static:
            return
        # with allowzero=1 and no literal 0, a 0 that copies the very dim the element names gives
        # the same size under allowzero=0 (even an empty one): the Reshape switches to it
        copy = not allowzero or 0 not in vec.elems
        entries: list[int | None] = []
        for axis, e in enumerate(vec.elems):
            if isinstance(e, int):
                entries.append(e)
            elif copy and dims is not None and axis < len(dims) and e == dims[axis]:
                entries.append(0)
            else:
                entries.append(None)
        unknown = [i for i, e in enumerate(entries) if e is None]
        if len(unknown) == 1 and -1 not in entries and copy:
            entries[unknown[0]] = -1
        elif unknown:
            why = f"{len(unknown)} unknown dims" if len(unknown) > 1 else "an unknown dim beside -1"
            why = why if copy else "an unknown dim beside allowzero=1 zeros"
            self.context.refuse(node, f"Reshape target kept: it has {why} ({_show(vec.elems)})")
            return
        if allowzero and 0 in entries:
            node.set_attr("allowzero", 0)
        array = np.array(entries, dtype=vec.dtype.numpy)
        node.set_input(1, self.constant(array, s.name))
        self.touched.append(s.producer or node)
        self.counts["targets"] += 1

    # ----- 3. Expand -----------------------------------------------------------------------------
    def expand(self, node: Node) -> None:
        x, s = node.inputs[0], node.inputs[1]
        if x is None or s is None:
            return
        vec, dims = self.values.vector(s), self.values.dims.dims(x)
        if vec is None or vec.scalar or dims is None:
            if _is_whole_shape_of(s, x):
                self.replace(node, node.output, x, "noop")
            return
        if len(vec.elems) > len(dims):
            return  # adds axes
        tail = dims[len(dims) - len(vec.elems) :]
        if all(e == d or e == 1 for e, d in zip(vec.elems, tail, strict=True)):
            self.replace(node, node.output, x, "noop")

    # ----- 4. ConstantOfShape --------------------------------------------------------------------
    def constant_of_shape(self, node: Node) -> None:
        vec = self.static(node.inputs[0])
        if self.static(node.output) is not None:
            return  # a small integer vector: folded (or not) by fold_outputs
        if vec is None or vec.scalar or any(e < 0 for e in vec.ints()):
            return
        shape = tuple(vec.ints())
        count = int(np.prod(shape, dtype=np.int64))
        if count > self.max_elements:
            self.context.refuse(
                node, f"ConstantOfShape kept: {count} elements > max-elements={self.max_elements}"
            )
            return
        value = node.get_attr("value")
        fill = value.reshape(-1)[0] if isinstance(value, np.ndarray) else np.float32(0)
        array = np.full(shape, fill, dtype=np.asarray(fill).dtype)
        self.replace(node, node.output, self.constant(array, node.output.name), "folded")

    # ----- 5. Slice ------------------------------------------------------------------------------
    def slice(self, node: Node) -> None:
        x, params = node.inputs[0], slice_params(self.values.vector, node)
        dims = self.values.dims.dims(x)
        if x is None or dims is None or params is None:
            return
        new_ends: list[int] = []
        whole = True
        for start, end, axis, step in zip(*params.lists(), strict=True):
            if not -len(dims) <= axis < len(dims):
                return
            dim = dims[axis]
            whole = whole and start == 0 and step == 1 and reaches_end(end, dim, params.top)
            if isinstance(end, int):
                new_ends.append(end)
            elif end == dim and is_size(dim):
                new_ends.append(params.top)  # both clamp to the dim
            else:
                whole = False
                new_ends = []
                break
        ends_value = node.inputs[2] if "starts" not in node.attrs else None
        if whole:
            self.replace(node, node.output, x, "noop")
        elif new_ends and ends_value is not None and constant_value(ends_value, 1 << 62) is None:
            if all(isinstance(e, int) for e in params.ends):
                return  # a computed but static ends: fold_outputs made it a constant already
            ends = self.values.vector(ends_value)
            assert ends is not None  # slice_params read it
            node.set_input(2, self.constant(np.array(new_ends, ends.dtype.numpy), ends_value.name))
            self.touched.append(ends_value.producer or node)
            self.counts["targets"] += 1

    # ----- dead nodes ----------------------------------------------------------------------------
    def remove_dead(self) -> None:
        """Remove the nodes our rewrites left without readers, and what only they read."""
        stack = list(self.touched)
        while stack:
            node = stack.pop()
            if node.graph is not self.graph or node.op == RETURN_OP:
                continue
            if node.domain != "" or node.subgraphs() or any(v.is_used for v in node.outputs):
                continue
            inputs = [v for v in node.inputs if v is not None]
            self.graph.remove(node)
            self.counts["removed"] += 1
            for value in inputs:
                if value.is_used:
                    continue
                if value.producer is not None:
                    stack.append(value.producer)
                elif value.is_constant and value.graph is self.graph:
                    self.graph.remove_initializer(value)
        for value in self.created:  # folded constants later bypassed
            if not value.is_used and value.graph is self.graph:
                if self.graph.initializers.get(value.name or "") is value:
                    self.graph.remove_initializer(value)


_REWRITES = {
    "Reshape": _Rewriter.reshape,
    "Expand": _Rewriter.expand,
    "ConstantOfShape": _Rewriter.constant_of_shape,
    "Slice": _Rewriter.slice,
}


def _is_whole_shape_of(s: Value, x: Value) -> bool:
    """True when `s` is `Shape(x)` with no start/end: exactly `x`'s shape, whatever its rank."""
    p = s.producer
    return (
        p is not None
        and p.op == "Shape"
        and p.inputs[0] is x
        and p.get_attr("start", 0) == 0
        and p.get_attr("end") is None
    )


def _show(elems: tuple[Elem, ...]) -> str:
    def one(e: Elem) -> str:
        if isinstance(e, Token):
            return "?" if e.kind == "elem" else f"dim {e.index} of %{e.value.name}"
        return str(e)

    return "[" + ", ".join(one(e) for e in elems) + "]"
