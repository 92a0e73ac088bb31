"""Rewrite rules and the greedy worklist driver that applies them to a fixpoint.

A rule is three short methods:

    class MatMulAddToGemm(RewriteRule):
        '''MatMul(x, w) + b -> Gemm(x, w, b) when x and w are 2-D: Gemm computes x @ w + b.'''

        def pattern(self, op, x, w, b):
            return op.Add(op.MatMul(x, w), b)

        def check(self, ctx, x, w, b):
            return ctx.rank(x) == 2 or ctx.refuse("x is not 2-D")

        def rewrite(self, op, x, w, b):
            return op.Gemm(x, w, b)

`check` and `rewrite` receive the bound values by the pattern's variable names (they may take any
subset). `check` may call `ctx.refuse(reason)` to record why the rule did not apply; the reasons go
to the pass report. `rewrite` builds the replacement with `op` (an IR `Builder` that inserts before
the matched root) and returns the value(s) that replace the root's outputs, or None to give up.

The driver (`apply_rules`) starts with every node of the graph on a worklist; after a rewrite it
queues only the neighbourhood that changed (the new nodes, their readers and the producers of
their inputs), so a pass over a big graph costs little more than one visit per node. Matched
intermediate nodes must have no readers outside the match (unless the rule sets
`allow_external_uses`, in which case they stay for those readers); dead matched nodes are removed.
A rule that keeps rewriting its own output is stopped with an error naming it.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import numpy as np

from graphopt.ir.builder import Builder
from graphopt.ir.core import Graph, Node, Value
from graphopt.ir.errors import GraphoptError, InvalidGraphError
from graphopt.ir.inference import constant_value, infer_node, merge_types, type_conflict
from graphopt.ir.types import TensorType, Type
from graphopt.passes.manager import GraphPass, PassContext
from graphopt.passes.rewrite.matcher import Match, match
from graphopt.passes.rewrite.pattern import PatternNode, trace

__all__ = ["RewriteContext", "RewritePass", "RewriteRule", "apply_rules"]


class RewriteContext:
    """What `check` and `rewrite` can ask about a match."""

    def __init__(self, graph: Graph, found: Match, rule: RewriteRule, context: PassContext | None):
        self.graph = graph
        self.match = found
        self.rule = rule
        self.pass_context = context
        self.refusal: str | None = None

    @property
    def root(self) -> Node:
        return self.match.root

    @property
    def opset(self) -> int:
        return self.match.opset or 1

    def node(self, name: str) -> Node:
        """The IR node matched by the pattern node captured as `_name=name`."""
        return self.match.captured[name]

    def constant(self, value: Value | None) -> np.ndarray | None:
        """The value's array if it is a constant (initializer or Constant node), else None."""
        return constant_value(value, limit=1 << 62)

    def type(self, value: Value | None) -> Type | None:
        return value.type if value is not None else None

    def shape(self, value: Value | None) -> tuple[Any, ...] | None:
        t = self.type(value)
        return t.shape if isinstance(t, TensorType) else None

    def rank(self, value: Value | None) -> int | None:
        shape = self.shape(value)
        return None if shape is None else len(shape)

    def dtype(self, value: Value | None) -> Any:
        t = self.type(value)
        return t.dtype if isinstance(t, TensorType) else None

    def refuse(self, reason: str) -> bool:
        """Record why the rule does not apply here; returns False (`return ctx.refuse(...)`)."""
        self.refusal = reason
        return False


class RewriteBuilder(Builder):
    """The `op` that `rewrite` receives: a Builder placing nodes before the matched root."""

    def __init__(self, graph: Graph, ctx: RewriteContext):
        super().__init__(graph, insert_before=ctx.root)
        self.ctx = ctx


class RewriteRule:
    """Base class of rules; see the module docstring."""

    name: ClassVar[str] = ""
    allow_external_uses: ClassVar[bool] = False

    def pattern(self, op: Any, *values: Any) -> Any:
        raise NotImplementedError

    # check and rewrite take any subset of the pattern's variables, by name: `*args: Any,
    # **values: Any` lets subclasses name theirs (mypy accepts any override of that signature)
    def check(self, ctx: RewriteContext, *args: Any, **values: Any) -> bool:
        return True

    def rewrite(
        self, op: RewriteBuilder, *args: Any, **values: Any
    ) -> Value | Sequence[Value] | None:
        raise NotImplementedError

    @property
    def label(self) -> str:
        return self.name or type(self).__name__

    def compiled(self) -> PatternNode:
        cached = self.__dict__.get("_root")
        if cached is None:
            cached, _ = trace(self.pattern)
            self.__dict__["_root"] = cached
            self.__dict__["_check_args"] = _accepted(self.check)
            self.__dict__["_rewrite_args"] = _accepted(self.rewrite)
        return cached

    def call_check(self, ctx: RewriteContext, bindings: dict[str, Value]) -> bool:
        return bool(self.check(ctx, **_select(bindings, self.__dict__["_check_args"])))

    def call_rewrite(self, op: RewriteBuilder, bindings: dict[str, Value]) -> Any:
        return self.rewrite(op, **_select(bindings, self.__dict__["_rewrite_args"]))


def _accepted(method: Callable[..., Any]) -> set[str] | None:
    """The keyword names a method takes after its first parameter (None: it takes **kwargs)."""
    params = list(inspect.signature(method).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _select(bindings: dict[str, Value], names: set[str] | None) -> dict[str, Value]:
    return dict(bindings) if names is None else {k: v for k, v in bindings.items() if k in names}


def apply_rules(
    graph: Graph,
    rules: Iterable[RewriteRule],
    context: PassContext | None = None,
    *,
    opset_imports: dict[str, int] | None = None,
) -> int:
    """Apply `rules` to `graph` until none matches; returns the number of rewrites made."""
    opsets = dict(opset_imports or (context.model.opset_imports if context else {"": 21}))
    opset = opsets.get("", opsets.get("ai.onnx"))
    by_op: dict[tuple[str, str], list[RewriteRule]] = {}
    for rule in rules:
        root = rule.compiled()
        by_op.setdefault((root.domain, root.op_type), []).append(rule)
    worklist: deque[Node] = deque(graph)
    queued: set[Node] = set(worklist)
    # why rules did not apply, by (rule, node, reason); reported at the end for the nodes still
    # there (a node another rule rewrote later was not, in the end, refused)
    refusals: dict[tuple[str, Node, str], None] = {}
    rewrites = 0
    limit = 10 * len(graph) + 1000
    while worklist:
        node = worklist.popleft()
        queued.discard(node)
        if node.graph is not graph:
            continue
        for rule in by_op.get((node.domain, node.op_type), ()):
            changed = _try(rule, node, graph, opset, opsets, context, refusals)
            if changed is None:
                continue
            rewrites += 1
            if rewrites > limit:
                raise GraphoptError(
                    f"rule {rule.label} keeps rewriting (over {limit} rewrites in graph "
                    f"'{graph.name}')",
                    hint="its replacement matches its own pattern again; tighten check()",
                )
            for touched in changed:
                if touched.graph is graph and touched not in queued:
                    queued.add(touched)
                    worklist.append(touched)
            break
    if context is not None:
        for label, node, reason in refusals:
            if node.graph is graph:
                context.note(f"{label}: {reason}", node, "refused")
    return rewrites


def _try(
    rule: RewriteRule,
    node: Node,
    graph: Graph,
    opset: int | None,
    opsets: dict[str, int],
    context: PassContext | None,
    refusals: dict[tuple[str, Node, str], None],
) -> list[Node] | None:
    """Rewrite at `node` with the first match `rule` accepts; returns the nodes to revisit."""
    first_refusal: str | None = None
    for found in match(rule.compiled(), node, opset):
        ctx = RewriteContext(graph, found, rule, context)
        outside = None if rule.allow_external_uses else _external_use(found)
        if outside is not None:
            first_refusal = first_refusal or outside
            continue
        if not rule.call_check(ctx, found.bindings):
            first_refusal = first_refusal or ctx.refusal
            continue
        builder = RewriteBuilder(graph, ctx)
        result = rule.call_rewrite(builder, found.bindings)
        if result is None:
            for created in reversed(builder.created):
                graph.remove(created)
            first_refusal = first_refusal or ctx.refusal
            continue
        return _commit(rule, node, graph, found, builder.created, result, opsets)
    if first_refusal:
        refusals[(rule.label, node, first_refusal)] = None
    return None


def _external_use(found: Match) -> str | None:
    inside = set(found.matched_nodes)
    for matched in found.matched_nodes:
        if matched is found.root:
            continue
        for value in matched.outputs:
            for user in value.users():
                if user not in inside:
                    reader = "a graph output" if user.op == "return" else user.describe()
                    return f"%{value.name} is also read by {reader}, outside the pattern"
    return None


def _commit(
    rule: RewriteRule,
    root: Node,
    graph: Graph,
    found: Match,
    created: list[Node],
    result: Any,
    opsets: dict[str, int],
) -> list[Node]:
    replacements = list(result) if isinstance(result, (list, tuple)) else [result]
    if len(replacements) != len(root.outputs):
        raise InvalidGraphError(
            f"rule {rule.label} returned {len(replacements)} values for the "
            f"{len(root.outputs)} outputs of {root.describe()}"
        )
    for new in created:
        try:
            inferred = infer_node(new, opsets)
        except GraphoptError as error:
            raise InvalidGraphError(f"rule {rule.label} built an invalid node: {error}") from None
        for value, t in zip(new.outputs, inferred, strict=False):
            if type_conflict(value.type, t) is None:
                value.type = merge_types(value.type, t)
    if root.name and created and not created[-1].name:
        created[-1].name = root.name
    revisit: list[Node] = list(created)
    for old, new in zip(root.outputs, replacements, strict=True):
        if new is old:
            continue
        conflict = type_conflict(old.type, new.type)
        if conflict:
            raise InvalidGraphError(
                f"rule {rule.label} replaced %{old.name} with a value of another type: {conflict}"
            )
        if new.producer is not None:  # a graph input's or initializer's type is not refined
            new.type = merge_types(new.type, old.type)
        revisit.extend(u for u in old.users() if u.op != "return")
        old.replace_all_uses_with(new)
    _remove_dead(graph, found.matched_nodes)
    for new in created:
        revisit.extend(v.producer for v in new.inputs if v is not None and v.producer is not None)
    return revisit


def _remove_dead(graph: Graph, nodes: list[Node]) -> None:
    pending = [n for n in nodes if n.graph is graph]
    removed = True
    while removed:
        removed = False
        for node in pending:
            if node.graph is graph and not any(v.is_used for v in node.outputs):
                graph.remove(node)
                removed = True


class RewritePass(GraphPass):
    """A pass that applies a fixed set of rules to every graph of the model."""

    def rules(self) -> list[RewriteRule]:
        raise NotImplementedError

    def run_on_graph(self, graph: Graph, context: PassContext) -> bool:
        rules = self.__dict__.get("_rules")
        if rules is None:
            rules = self.__dict__["_rules"] = self.rules()
        return apply_rules(graph, rules, context) > 0
