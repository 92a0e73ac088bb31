"""torch.export -> IR: `from_torch(module, example_inputs, dynamic_shapes)` and
`from_exported_program(program)` (also what `graphopt.load("model.pt2")` uses).

How: `torch.export.export` traces the module to an ATen graph (the training dialect: ops as the
module called them). When the translation table covers every op it uses and none mutates its
inputs (the zoo's models), that graph is translated as it is. Otherwise `run_decompositions`
first brings it to the inference op set with torch's default (core ATen) table *minus* the ops
the IR states whole (`KEPT_WHOLE`: scaled_dot_product_attention, layer_norm, rms_norm, linear,
convolutions, silu, pooling, ...); it re-traces the program, which costs more than the export
itself. Either way attention arrives as one `Attention` node, never as the MatMul/Softmax pattern
a fusion pass would have to find again. Each fx node is translated by the table in
`torch_aten.py` (math), `torch_shapes.py` (shape ops, creation, indexing, sizes) and
`torch_nn.py` (neural-network ops); `torch_context.py` holds the shared machinery (type
promotion, shape lists, constants).

What comes out: graph inputs are the user inputs (named as `forward`'s parameters); parameters,
buffers and lifted constants become initializers that share the tensors' storage (read-only
numpy views, no copies); symbolic sizes (`torch.export.Dim("batch")`) become symbolic dims named
as the Dims (so the written ONNX has dim_param "batch"), derived sizes become expressions
("batch*sequence").
Every value torch recorded gets its type. Sizes computed at run time (`sym_size`, arithmetic on
sizes) become Shape/Gather/arithmetic nodes on rank-0 int64 values. Nodes only assertions read
(`_assert_tensor_metadata`, `_assert_scalar`, `sym_constrain_range*`) are dropped, with anything
only they use.

An op without a translation stops the import with one `UnsupportedOpError` naming the op and the
model source line torch recorded for it (`node.meta["stack_trace"]`), with a hint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from graphopt.frontends import (  # noqa: F401  (they fill the translation table)
    torch_aten,
    torch_nn,
    torch_shapes,
)
from graphopt.frontends.torch_context import Lowering, bind, lookup, target_name
from graphopt.ir.core import Graph, Model, Value
from graphopt.ir.errors import GraphoptError, ModelLoadError, UnsupportedOpError
from graphopt.ir.types import TensorType

if TYPE_CHECKING:
    import torch
    import torch.fx

__all__ = ["from_torch", "from_exported_program", "load_exported_program", "KEPT_WHOLE", "OPSET"]

OPSET = 23  # Attention and RMSNormalization
KEPT_WHOLE = (
    "scaled_dot_product_attention.default", "layer_norm.default", "rms_norm.default",
    "linear.default", "conv1d.default", "conv2d.default", "conv3d.default", "conv1d.padding",
    "conv2d.padding", "conv3d.padding", "conv_transpose1d.default", "conv_transpose2d.input",
    "conv_transpose3d.input", "silu.default", "mish.default", "softplus.default",
    "hardswish.default", "hardsigmoid.default", "max_pool1d.default", "max_pool2d.default",
    "avg_pool1d.default", "adaptive_avg_pool1d.default", "adaptive_avg_pool2d.default",
)  # fmt: skip


def from_torch(
    module: torch.nn.Module,
    example_inputs: Any,
    dynamic_shapes: Any = None,
    *,
    output_names: Sequence[str] | None = None,
) -> Model:
    """Export `module` with `torch.export.export(module, example_inputs, dynamic_shapes=...)`
    and translate it to an IR model.

    `example_inputs` is a tuple of positional arguments (a single tensor is taken as one), or a
    dict of keyword arguments. `dynamic_shapes` is torch.export's: `torch.export.Dim("batch")`
    on an axis makes it a symbolic dim named "batch". Outputs are named `output_names`, else
    `output` (one) or `output_0`, `output_1`, ...
    """
    import torch

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    args, kwargs = (
        ((), dict(example_inputs))
        if isinstance(example_inputs, Mapping)
        else (tuple(example_inputs), None)
    )
    try:
        program = torch.export.export(module, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes)
    except Exception as error:  # torch's own export errors: unsupported Python, guards, ...
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"torch.export.export failed: {type(error).__name__}: {first}",
            where=type(module).__name__,
            hint="graphopt needs a module torch.export can trace (see torch.export's message "
            "above; torch.export.draft_export lists every problem)",
        ) from error
    return from_exported_program(program, output_names=output_names)


def load_exported_program(path: str | os.PathLike[str]) -> Model:
    """Read a program saved with `torch.export.save` (`.pt2`) and translate it."""
    import torch

    where = os.fspath(path)
    try:
        program = torch.export.load(where)
    except FileNotFoundError:
        raise ModelLoadError("no such file", where=where) from None
    except Exception as error:
        raise ModelLoadError(
            f"cannot read it as a torch.export program: {type(error).__name__}: {error}",
            where=where,
            hint="write it with torch.export.save(torch.export.export(module, inputs), path)",
        ) from None
    return from_exported_program(program)


def from_exported_program(
    program: torch.export.ExportedProgram, *, output_names: Sequence[str] | None = None
) -> Model:
    """Translate an `ExportedProgram`: as it is when the table translates every op it uses and
    none of them mutates its inputs, else after `run_decompositions(decomposition_table())`."""
    if not translatable_as_is(program):
        program = program.run_decompositions(decomposition_table())
    return _Importer(program, output_names).model()


def translatable_as_is(program: torch.export.ExportedProgram) -> bool:
    """Whether every op the outputs depend on has a translation and mutates nothing.

    torch.export gives the training dialect: the ops as the module called them (dropout,
    `to`, `new_ones`, ...), in-place ops included. Decomposing re-traces the whole program (more
    than half of an import's time for the zoo's transformers), so it is skipped when the table
    covers the program already."""
    import operator

    for node in _live_nodes(program.graph):
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        schema = getattr(node.target, "_schema", None)
        if lookup(node.target) is None or (schema is not None and schema.is_mutable):
            return False
    return True


def decomposition_table() -> dict[Any, Any]:
    """torch.export's default decompositions without those of the ops in `KEPT_WHOLE`."""
    import torch
    from torch.export import default_decompositions

    table = dict(default_decompositions())
    for name in KEPT_WHOLE:
        packet, overload = name.split(".")
        table.pop(getattr(getattr(torch.ops.aten, packet), overload), None)
    return table


class _Importer:
    """One translation of an exported program's graph to an IR model."""

    def __init__(self, program: torch.export.ExportedProgram, output_names: Sequence[str] | None):
        self.program = program
        self.output_names = output_names
        self.graph = Graph("main")
        self.fx_graph = program.graph
        self.lowering = Lowering(self.graph, self._symbol_names())

    def model(self) -> Model:
        import torch

        signature = self.program.graph_signature
        specs = {spec.arg.name: spec for spec in signature.input_specs if hasattr(spec.arg, "name")}
        live = _live_nodes(self.fx_graph)
        self.graph.scope.taken.update(n.name for n in self.fx_graph.nodes)
        lw = self.lowering
        for node in self.fx_graph.nodes:
            if node.op == "placeholder":
                self._placeholder(node, specs.get(node.name), node in live)
            elif node.op == "get_attr":
                if node in live:
                    lw.values[node] = self._constant(
                        getattr(self.program.graph_module, node.target), str(node.target)
                    )
            elif node.op == "call_function":
                if node in live:
                    self._call(node)
            elif node.op == "output":
                self._outputs(node, signature)
            else:
                lw.node = node
                raise lw.fail(f"fx node kind '{node.op}' is not supported")
        return Model(
            self.graph,
            opset_imports={"": OPSET},
            producer_name="graphopt",
            producer_version=torch.__version__,
            doc_string="translated from torch.export by graphopt.frontends.torch",
        )

    # ----- inputs --------------------------------------------------------------------------------
    def _placeholder(self, node: torch.fx.Node, spec: Any, live: bool) -> None:
        from torch.export.graph_signature import InputKind

        lw = self.lowering
        kind = spec.kind if spec is not None else InputKind.USER_INPUT
        if kind == InputKind.USER_INPUT:
            val = node.meta.get("val")
            value_type = lw.type_of(val)
            if not isinstance(value_type, TensorType) or not hasattr(val, "shape"):
                if live:
                    lw.node = node
                    raise lw.fail(
                        f"input '{node.name}' is not a tensor ({type(val).__name__})",
                        hint="pass non-tensor arguments as constants inside the module",
                    )
                return
            lw.values[node] = self.graph.add_input(node.name, value_type)
            return
        if not live:
            return
        if kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            tensor = self.program.state_dict.get(spec.target)
            if tensor is None:
                tensor = self.program.constants[spec.target]
            lw.values[node] = self._constant(tensor, spec.target)
            return
        lw.node = node
        raise lw.fail(f"input kind {kind.name} ('{node.name}') is not supported")

    def _constant(self, tensor: Any, name: str) -> Value:
        if name in self.graph.scope.taken:
            name = self.graph.scope.fresh(name)
        return self.graph.add_initializer(name, tensor_array(tensor))

    # ----- nodes ---------------------------------------------------------------------------------
    def _call(self, node: torch.fx.Node) -> None:
        import operator

        lw = self.lowering
        lw.node = node
        if node.target is operator.getitem:
            source, index = node.args
            lw.values[node] = self._item(source, int(index))  # type: ignore[arg-type]
            return
        val = node.meta.get("val")
        if isinstance(val, (bool, int, float)):  # a size torch specialized: a constant
            lw.values[node] = lw.const(np.asarray(val), None)
            return
        translation = lookup(node.target)
        if translation is None:
            raise _untranslated(lw, node)
        first = len(lw.b.created)
        result = translation(lw, node, bind(node))
        created = set(lw.b.created[first:])
        self._annotate(node, result, created)
        lw.values[node] = result

    def _item(self, source: Any, index: int) -> Value:
        lw = self.lowering
        results = lw.values[source]
        if not isinstance(results, list):
            raise lw.fail(f"'{source.name}' has one output; getitem({index}) of it")
        item = results[index]
        if item is None:
            raise lw.fail(
                f"output {index} of {target_name(source.target)} is not translated "
                "(training statistics or pooling indices)",
                hint="use only the op's first output in inference",
            )
        return item

    def _annotate(self, node: torch.fx.Node, result: Any, created: set[Any]) -> None:
        """Name the values the node's translation made after it and give them torch's types."""
        lw = self.lowering
        val = node.meta.get("val")
        if isinstance(result, list):
            vals = list(val) if isinstance(val, (list, tuple)) else [None] * len(result)
            pairs = [
                (r, v, f"{node.name}_{i}")
                for i, (r, v) in enumerate(zip(result, vals, strict=False))
            ]
        else:
            pairs = [(result, val, node.name)]
        for value, value_val, name in pairs:
            if not isinstance(value, Value) or value.producer not in created:
                continue  # an input's value passed through (clone, alias), or a shared constant
            if value.name != name:  # fx names are claimed up front; `node_i` names are not
                value.name = name if name == node.name else self.graph.scope.fresh(name)
            producer = value.producer
            assert producer is not None  # it is in `created`
            producer.name = producer.name or value.name or node.name  # unique, as values are
            declared = lw.type_of(value_val)
            if declared is not None:
                value.type = declared

    # ----- outputs -------------------------------------------------------------------------------
    def _outputs(self, node: torch.fx.Node, signature: Any) -> None:
        from torch.export.graph_signature import OutputKind

        lw = self.lowering
        lw.node = node
        results: Any = node.args[0]
        user = [
            result
            for result, spec in zip(results, signature.output_specs, strict=True)
            if spec.kind == OutputKind.USER_OUTPUT
        ]
        values = [lw.tensor(result) for result in user]
        names = list(self.output_names or [])
        if names and len(names) != len(values):
            raise GraphoptError(
                f"{len(names)} output names for {len(values)} outputs",
                hint="give one name per tensor the module returns",
            )
        if not names:
            names = ["output"] if len(values) == 1 else [f"output_{i}" for i in range(len(values))]
        self.graph.set_outputs(values, names)

    # ----- symbolic dims -------------------------------------------------------------------------
    def _symbol_names(self) -> dict[Any, str]:
        """Names for the symbols of the user inputs' sizes: the `torch.export.Dim` names torch
        recorded, else `<input>_dim<axis>` (a program read from a .pt2 file keeps no names)."""
        import torch

        names: dict[Any, str] = {}
        user_inputs = set(self.program.graph_signature.user_inputs)
        for node in self.fx_graph.nodes:
            val = node.meta.get("val")
            if (
                node.op != "placeholder"
                or node.name not in user_inputs
                or not hasattr(val, "shape")
            ):
                continue
            for axis, size in enumerate(val.shape):
                if not isinstance(size, torch.SymInt) or not size.node.expr.is_Symbol:
                    continue
                symbol = size.node.expr
                if symbol not in names:
                    names[symbol] = _dim_name(size) or f"{node.name}_dim{axis}"
        return names


def _dim_name(size: Any) -> str | None:
    """The name of the `torch.export.Dim` a symbolic size came from, if torch kept it."""
    env = size.node.shape_env
    sources = getattr(env, "var_to_sources", {}).get(size.node.expr, [])
    debug = getattr(env, "source_name_to_debug_name", {})
    for source in sources:
        key = source.name() if callable(source.name) else source.name
        name = debug.get(key)
        if name:
            return str(name)
    return None


def tensor_array(tensor: Any) -> np.ndarray:
    """A read-only numpy view of a CPU tensor's storage (bfloat16 through ml_dtypes), as the
    ONNX frontend's weights are read-only views of the file; a copy only for tensors elsewhere
    (GPU)."""
    import torch

    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        array = tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
        array = tensor.numpy()
    array.flags.writeable = False  # the view only: the tensor stays writable
    return array


def _live_nodes(graph: torch.fx.Graph) -> set[Any]:
    """The nodes the outputs depend on (assertions and what only they read are not)."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    live: set[Any] = set()
    stack = [output]
    while stack:
        node = stack.pop()
        if node in live:
            continue
        live.add(node)
        stack.extend(node.all_input_nodes)
    return live


def _untranslated(lw: Lowering, node: torch.fx.Node) -> UnsupportedOpError:
    name = target_name(node.target)
    namespace = name.split(".")[0]
    if namespace == "aten":
        hint = (
            "graphopt translates the core ATen op set and the ops it keeps whole "
            "(graphopt.frontends.torch.KEPT_WHOLE); rewrite this call with supported ops, or "
            "export with torch.onnx.export(..., dynamo=True) and graphopt.load the .onnx file"
        )
    else:
        hint = (
            f"'{namespace}' ops (custom or higher-order) have no ONNX equivalent; replace the "
            "call for export, or export with torch.onnx.export and a custom translation"
        )
    return lw.fail("graphopt has no translation for this op", hint=hint)
