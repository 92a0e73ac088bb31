"""Passes, their registry, and the pass manager that runs a pipeline of them.

A pass is a small dataclass: its fields are its options, with types and defaults, and the same names
(in kebab-case) work in pipeline strings: `fold-constants{max-elements=4096}`. It is registered under
a kebab-case name with a one-line description:

    @register_pass("eliminate-dead-code", "remove nodes and initializers nothing reads")
    @dataclass
    class EliminateDeadCode(GraphPass):
        def run_on_graph(self, graph: Graph, context: PassContext) -> bool: ...

`ModelPass.run(model, context)` sees the whole model; `GraphPass.run_on_graph` runs on the main
graph and on every subgraph (innermost first). A plain function `(model, context) -> bool` can be
registered too. Every pass returns whether it changed anything: the manager uses that to invalidate
analyses and to reach fixpoints, and the report shows it.

Analyses are computed on demand (`context.analysis(ShapeAnalysis)`), cached, and dropped when a pass
reports a change unless it lists the analysis in `preserves`.

Built-in passes are listed in `BUILTIN_PASSES` as module paths and imported on first use, so the
command line starts fast; third-party passes register through the entry-point group
`graphopt.passes` (entry point name = pass name, object = the pass class or function). A name can be
registered once.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from graphopt.ir.core import Graph, Model, Node
from graphopt.ir.errors import GraphoptError

__all__ = [
    "Analysis",
    "GraphPass",
    "ModelPass",
    "Pass",
    "PassContext",
    "PassError",
    "PassInfo",
    "PassManager",
    "PassRecord",
    "all_passes",
    "get_pass",
    "register_pass",
]


class PassError(GraphoptError):
    """A pass failed (a bug in the pass, or a model it cannot handle); names the pass and what
    ran before it."""


class Analysis:
    """A fact about a model computed on demand and cached by the `PassContext`.

    Subclasses implement `compute(model)`; `context.analysis(Cls)` returns the cached result until
    a pass that changes the model and does not list `Cls` in its `preserves` runs."""

    def compute(self, model: Model) -> Any:
        raise NotImplementedError


@dataclass
class Note:
    """Something a pass wants the user to know: a rewrite it made or refused, and why."""

    pass_name: str
    message: str
    node: str = ""
    kind: str = "info"  # "info", "refused" or "warning"


@dataclass
class PassContext:
    """What a running pass can use: the model, analyses, options of the run, and the report."""

    model: Model
    target: str = "onnx"
    options: dict[str, Any] = field(default_factory=dict)
    calibration: Any = None  # an iterable of input dicts (name -> array) for quantize-static
    notes: list[Note] = field(default_factory=list)
    # structured results passes leave for the report, by topic (e.g. "quantization": a
    # QuantizationReport); each has to_json() and may have table() for the command line
    artifacts: dict[str, Any] = field(default_factory=dict)
    current_pass: str = ""
    _analyses: dict[type, Any] = field(default_factory=dict)
    _noted: set[tuple[str, str, str, str]] = field(default_factory=set)

    def analysis(self, kind: type[Analysis]) -> Any:
        if kind not in self._analyses:
            self._analyses[kind] = kind().compute(self.model)
        return self._analyses[kind]

    def invalidate(self, preserved: Sequence[type] = ()) -> None:
        self._analyses = {k: v for k, v in self._analyses.items() if k in preserved}

    def note(self, message: str, node: Node | None = None, kind: str = "info") -> None:
        """Record a note for the report (once: a fixpoint repeating a refusal says it once)."""
        where = node.describe() if node is not None else ""
        key = (self.current_pass, message, where, kind)
        if key not in self._noted:
            self._noted.add(key)
            self.notes.append(Note(self.current_pass, message, where, kind))

    def refuse(self, node: Node, reason: str) -> bool:
        """Record why a rewrite did not apply at `node`; returns False for `return ctx.refuse(..)`."""
        self.note(reason, node, "refused")
        return False


class Pass:
    """Base class of passes. Subclasses are dataclasses whose fields are the pass's options."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    preserves: ClassVar[tuple[type, ...]] = ()
    # False for passes that change the numbers on purpose (pruning): the equivalence harness then
    # checks that the model stays valid and runs, not that its outputs are kept
    exact: ClassVar[bool] = True

    def run(self, model: Model, context: PassContext) -> bool:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The option values of this instance (field name -> value)."""
        if dataclasses.is_dataclass(self):
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {}

    def __str__(self) -> str:
        from graphopt.passes.pipeline import format_pass

        return format_pass(self)


class ModelPass(Pass):
    """A pass over the whole model."""


class GraphPass(Pass):
    """A pass applied to every graph of the model, subgraphs first, then the main graph."""

    def run(self, model: Model, context: PassContext) -> bool:
        changed = False
        for graph in _graphs_innermost_first(model.graph):
            changed |= bool(self.run_on_graph(graph, context))
        return changed

    def run_on_graph(self, graph: Graph, context: PassContext) -> bool:
        raise NotImplementedError


def _graphs_innermost_first(graph: Graph) -> Iterator[Graph]:
    yield from graph.nested_graphs()
    yield graph


@dataclass
class FunctionPass(Pass):
    """Wraps a plain function `(model, context) -> bool` registered as a pass."""

    function: ClassVar[Callable[[Model, PassContext], bool]]

    def run(self, model: Model, context: PassContext) -> bool:
        return bool(type(self).function(model, context))


# ----- registry ---------------------------------------------------------------------------------

# Built-in passes: name -> "module:attribute", imported when first asked for.
BUILTIN_PASSES: dict[str, str] = {
    "freeze-initializers": "graphopt.passes.cleanup.freeze_initializers:FreezeInitializers",
    "fold-constants": "graphopt.passes.cleanup.fold_constants:FoldConstants",
    "eliminate-dead-code": "graphopt.passes.cleanup.dead_code:EliminateDeadCode",
    "eliminate-common-subexpressions": "graphopt.passes.cleanup.cse:EliminateCommonSubexpressions",
    "infer-shapes": "graphopt.passes.cleanup.infer_shapes:InferShapes",
    "simplify-shapes": "graphopt.passes.cleanup.simplify_shapes:SimplifyShapes",
    "canonicalize": "graphopt.passes.cleanup.canonicalize:Canonicalize",
    "upgrade-opset": "graphopt.passes.conversion.upgrade_opset:UpgradeOpset",
    "fold-batchnorm": "graphopt.passes.fusion.fold_batchnorm:FoldBatchNorm",
    "fold-conv-bias": "graphopt.passes.fusion.fold_conv_bias:FoldConvBias",
    "fuse-layernorm": "graphopt.passes.fusion.layernorm:FuseLayerNorm",
    "fuse-rmsnorm": "graphopt.passes.fusion.rmsnorm:FuseRMSNorm",
    "fuse-skip-layernorm": "graphopt.passes.fusion.skip_layernorm:FuseSkipLayerNorm",
    "fuse-gelu": "graphopt.passes.fusion.gelu:FuseGelu",
    "fuse-bias-gelu": "graphopt.passes.fusion.bias_gelu:FuseBiasGelu",
    "fuse-conv-activation": "graphopt.passes.fusion.conv_activation:FuseConvActivation",
    "reorder-activation-pooling": "graphopt.passes.fusion.activation_pooling:ReorderActivationPooling",
    "fuse-attention": "graphopt.passes.fusion.attention:FuseAttention",
    "fuse-rotary": "graphopt.passes.fusion.rotary:FuseRotary",
    "fuse-matmul-add": "graphopt.passes.fusion.matmul_add:FuseMatMulAdd",
    "fold-transpose-into-matmul": "graphopt.passes.fusion.transpose_matmul:FoldTransposeIntoMatMul",
    "fuse-qkv": "graphopt.passes.fusion.qkv:FuseQKV",
    "quantize-weights": "graphopt.passes.quantization.weights:QuantizeWeights",
    "quantize-static": "graphopt.passes.quantization.static:QuantizeStatic",
    "quantize-dynamic": "graphopt.passes.quantization.dynamic:QuantizeDynamic",
    "convert-float16": "graphopt.passes.quantization.float16:ConvertFloat16",
    "convert-bfloat16": "graphopt.passes.quantization.float16:ConvertBFloat16",
    "prune-unstructured": "graphopt.passes.pruning.unstructured:PruneUnstructured",
    "prune-n-m": "graphopt.passes.pruning.n_m:PruneNM",
    "prune-channels": "graphopt.passes.pruning.channels:PruneChannels",
    "prune-mlp": "graphopt.passes.pruning.mlp:PruneMLP",
    "prune-heads": "graphopt.passes.pruning.heads:PruneHeads",
}

P = TypeVar("P", bound=type)


@dataclass
class PassInfo:
    """A registry entry: the name, its description, and how to load the pass class."""

    name: str
    load: Callable[[], type[Pass]]
    origin: str  # "built-in", "plugin <dist>" or the registering module

    @property
    def cls(self) -> type[Pass]:
        return self.load()

    @property
    def description(self) -> str:
        return self.cls.description


_REGISTRY: dict[str, PassInfo] = {}
_LOADED_PLUGINS = False
_LOADING: set[str] = set()  # plugin passes being imported (they may register themselves)


def register_pass(name: str, description: str) -> Callable[[Any], Any]:
    """Register a pass class (a `Pass` dataclass) or a function `(model, context) -> bool`."""

    def decorate(obj: Any) -> Any:
        cls = _as_pass_class(obj, name, description)
        builtin = BUILTIN_PASSES.get(name, "").partition(":")[0]
        existing = _REGISTRY.get(name)
        if (builtin and builtin != obj.__module__) or (
            existing is not None and existing.origin != "built-in" and name not in _LOADING
        ):
            by = "graphopt" if builtin else existing.origin  # type: ignore[union-attr]
            raise ValueError(f"pass '{name}' is already registered (by {by})")
        _REGISTRY[name] = PassInfo(name, lambda: cls, "built-in" if builtin else obj.__module__)
        return cls if isinstance(obj, type) else obj

    return decorate


def _as_pass_class(obj: Any, name: str, description: str) -> type[Pass]:
    if isinstance(obj, type) and issubclass(obj, Pass):
        if not dataclasses.is_dataclass(obj):
            obj = dataclass(obj)
        obj.name = name
        obj.description = description
        return obj
    if callable(obj):
        return type(  # a FunctionPass subclass named after the function
            f"{obj.__name__}_pass",
            (FunctionPass,),
            {"name": name, "description": description, "function": staticmethod(obj)},
        )
    raise TypeError(f"cannot register {obj!r} as a pass: give a Pass subclass or a function")


def _builtin_loader(name: str, target: str) -> Callable[[], type[Pass]]:
    def load() -> type[Pass]:
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]

    return load


def _load_plugins() -> None:
    global _LOADED_PLUGINS
    if _LOADED_PLUGINS:
        return
    _LOADED_PLUGINS = True
    for name, target in BUILTIN_PASSES.items():
        _REGISTRY.setdefault(name, PassInfo(name, _builtin_loader(name, target), "built-in"))
    from importlib.metadata import entry_points

    for entry in entry_points(group="graphopt.passes"):
        if entry.name in _REGISTRY:
            raise PassError(
                f"plugin pass '{entry.name}' ({entry.value}) clashes with an existing pass",
                hint="rename the plugin's entry point",
            )
        dist = entry.dist.name if entry.dist is not None else entry.value
        _REGISTRY[entry.name] = PassInfo(entry.name, _plugin_loader(entry), f"plugin {dist}")


def _plugin_loader(entry: Any) -> Callable[[], type[Pass]]:
    def load() -> type[Pass]:
        _LOADING.add(entry.name)
        try:
            obj = entry.load()
        finally:
            _LOADING.discard(entry.name)
        if isinstance(obj, type) and issubclass(obj, Pass) and obj.name == entry.name:
            return obj  # registered itself with @register_pass
        summary = (obj.__doc__ or "").strip().split("\n")[0]
        return _as_pass_class(obj, entry.name, getattr(obj, "description", "") or summary)

    return load


def all_passes() -> dict[str, PassInfo]:
    """Every registered pass by name (built-ins, plugins, and passes registered at run time)."""
    _load_plugins()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as `name`; `PassError` with close names if there is none."""
    passes = all_passes()
    if name not in passes:
        close = difflib.get_close_matches(name, list(passes), n=3, cutoff=0.5)
        raise PassError(
            f"unknown pass '{name}'",
            hint=f"did you mean {', '.join(close)}?" if close else "`graphopt passes` lists them",
        )
    return passes[name].cls


# ----- running ----------------------------------------------------------------------------------


@dataclass
class PassRecord:
    """What one pass did: time, node counts before and after, whether it changed the model."""

    name: str
    options: dict[str, Any]
    seconds: float
    nodes_before: int
    nodes_after: int
    changed: bool
    notes: list[Note] = field(default_factory=list)


class Instrument:
    """Hooks around every pass (timing, verification, IR dumps, numeric checks)."""

    def before_pass(self, pass_: Pass, model: Model, context: PassContext) -> None:
        pass

    def after_pass(
        self, pass_: Pass, model: Model, context: PassContext, record: PassRecord
    ) -> None:
        pass


def count_nodes(model: Model) -> int:
    return model.graph.count_all()


@dataclass
class Fixpoint:
    """A group of passes repeated until none of them changes the model (at most `limit` rounds)."""

    passes: list[Pass]
    limit: int = 4


PipelineItem = Pass | Fixpoint


class PassManager:
    """Runs passes in order with instruments around each; collects a record per pass run."""

    def __init__(self, items: Sequence[PipelineItem], instruments: Sequence[Instrument] = ()):
        self.items = list(items)
        self.instruments = list(instruments)
        self.records: list[PassRecord] = []
        self._count: int | None = (
            None  # node count after the last pass (reused as the next "before")
        )

    def run(self, model: Model, context: PassContext | None = None) -> PassContext:
        context = context or PassContext(model)
        context.model = model
        for item in self.items:
            if isinstance(item, Fixpoint):
                self._fixpoint(item, model, context)
            else:
                self._run_one(item, model, context)
        return context

    def _fixpoint(self, group: Fixpoint, model: Model, context: PassContext) -> None:
        """Repeat the group until a round changes nothing; a pass is skipped when nothing has
        changed since it last ran (it would find nothing new)."""
        changes = 0  # how many pass runs so far changed the model
        last_seen: dict[int, int] = {}  # pass index -> `changes` when it last ran
        for _ in range(group.limit):
            round_changed = False
            for index, pass_ in enumerate(group.passes):
                if last_seen.get(index) == changes:
                    continue
                if self._run_one(pass_, model, context):
                    changes += 1
                    round_changed = True
                last_seen[index] = changes
            if not round_changed:
                break

    def _run_one(self, pass_: Pass, model: Model, context: PassContext) -> bool:
        context.current_pass = pass_.name
        first_note = len(context.notes)
        for instrument in self.instruments:
            instrument.before_pass(pass_, model, context)
        before = (
            self._count if self._count is not None and not self.instruments else count_nodes(model)
        )
        start = time.perf_counter()
        try:
            changed = bool(pass_.run(model, context))
        except GraphoptError as error:
            error.message = f"pass '{pass_.name}': {error.message}"
            error.args = (str(error),)
            raise
        except Exception as error:
            ran = ", ".join(r.name for r in self.records[-5:]) or "none"
            raise PassError(
                f"pass '{pass_.name}' failed: {type(error).__name__}: {error}",
                hint=f"this is a bug in the pass; passes that ran before it: {ran}. "
                "Rerun with --verify-each to find the pass that broke the graph, or drop "
                f"'{pass_.name}' from the pipeline",
            ) from error
        seconds = time.perf_counter() - start
        if changed:
            context.invalidate(pass_.preserves)
        after = count_nodes(model) if changed or self._count is None else before
        self._count = after
        record = PassRecord(
            pass_.name, pass_.options(), seconds, before, after, changed, context.notes[first_note:]
        )
        self.records.append(record)
        for instrument in self.instruments:
            instrument.after_pass(pass_, model, context, record)
        return changed
