"""onnx-graphsurgeon interop: `from_graphsurgeon(gs.Graph) -> Model` and back, `to_graphsurgeon`.

What: users of NVIDIA's onnx-graphsurgeon (gs) hand a `gs.Graph` to graphopt and take one back. The
two object models are converted into each other directly: `gs.Variable` <-> `Value`, `gs.Constant` <->
initializer `Value`, `gs.Node` <-> `Node` (op, domain, name, attributes of every kind, omitted
optional inputs/outputs as gs's empty Variables), nested `gs.Graph` attributes <-> subgraphs (inner
nodes read outer values directly on both sides), and the model fields gs keeps (opset and
import_domains, ir_version, producer name/version, graph name and doc string, local functions).

Why not through ONNX bytes: weights are most of a model, and a user editing a graph in gs expects the
arrays they see to be the arrays graphopt optimizes. A gs Constant's `values` *is* the IR
initializer's `const_value` and back: nothing is serialized or copied. gs `LazyValues` are loaded
once, and the gs Constant then holds the loaded array, the one the IR gets. Arrays gs's exporter
would write wrongly from numpy (strings, 4-bit types, float8 e4m3fnuz) are the exception: gs holds
them as `LazyValues` over a correct `TensorProto` (the form its own importer uses), so going to gs
they are copied into that proto, and coming from gs the IR reads its own array and leaves gs's alone.

What gs cannot hold, and what happens to it:
- raises `GraphoptError` (the loss would change what the model computes): GRAPHS attributes, node
  overloads, optional/map/nested-sequence types on graph inputs or outputs, and inputs with a default
  (an initializer that is also an input) whose declared type differs from the default's (gs stores such
  an input as a `gs.Constant` in `graph.inputs`, so the default's shape becomes the input's type);
- warns (`UserWarning`, one message per conversion) and drops: doc strings other than the graph's,
  node metadata and device, graph metadata, the model's domain/model_version/doc_string/metadata_props,
  unused initializers (gs keeps only constants that something reads), and types gs cannot write on
  intermediate values;
- passes through as raw ONNX protos (gs's importer skips these kinds, its exporter writes them):
  TENSORS (as `onnx.TensorProto`s), SPARSE_TENSOR(S) and TYPE_PROTO(S) attributes;
- empty list attributes become `[]`, as gs's importer makes them. gs's exporter cannot write them
  (`onnx.helper.make_attribute` cannot type an empty list); coming back, their kind is the op
  schema's (INTS for custom ops).
Names: gs identifies tensors by name, so values are named as `to_onnx` names them (unique; a graph
output whose name differs from its value's is renamed or fed through an `Identity`).

onnx_graphsurgeon and onnx are imported inside the functions: `import graphopt.frontends` stays light.
"""

from __future__ import annotations

import warnings
from collections import ChainMap, Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from graphopt.ir.core import Attribute, AttrKind, Graph, Model, Node, Value, join_op
from graphopt.ir.errors import GraphoptError, InvalidGraphError
from graphopt.ir.types import (
    DType,
    OptionalType,
    SequenceType,
    TensorType,
    Type,
    tensor_type_of,
)

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

__all__ = ["from_graphsurgeon", "to_graphsurgeon"]

# Element types gs keeps as ONNX integer codes rather than numpy dtypes (see gs's get_numpy_type).
_GS_CODE_DTYPES = frozenset(
    {
        DType.BFLOAT16,
        DType.FLOAT8E4M3FN,
        DType.FLOAT8E4M3FNUZ,
        DType.FLOAT8E5M2,
        DType.FLOAT8E5M2FNUZ,
    }
)

# ===== gs -> IR ===================================================================================


def from_graphsurgeon(graph: gs.Graph) -> Model:
    """An IR `Model` from an onnx-graphsurgeon `Graph`, sharing its constants' arrays.

    The graph may be freshly imported (`gs.import_onnx`) or edited by hand: nodes need not be in
    topological order (they are sorted), and a tensor may be referenced by a new object of the same
    name. Raises `InvalidGraphError` for what gs's exporter would write as a broken model (a tensor
    read but never produced, produced twice, a node producing a `gs.Constant`, ...).
    """
    import onnx_graphsurgeon as gs

    if not isinstance(graph, gs.Graph) or isinstance(graph, gs.Function):
        raise TypeError(f"from_graphsurgeon expects an onnx_graphsurgeon.Graph, not {type(graph)}")
    opsets = _opsets_from_gs(graph)
    reader = _Reader(opsets.get("", opsets.get("ai.onnx", graph.opset)))
    main = Graph(graph.name or "main")
    reader.placement = _constant_placement(graph)
    reader.fill(graph, main, ChainMap(), ChainMap(), path=())
    if reader.unordered:
        _sort_all(main)
    return Model(
        main,
        opset_imports=opsets,
        ir_version=int(graph.ir_version or 0),
        producer_name=graph.producer_name or "",
        producer_version=graph.producer_version or "",
        functions=[_function_to_proto(f) for f in graph.functions],
    )


def _opsets_from_gs(graph: gs.Graph) -> dict[str, int]:
    """The opset imports gs's exporter would write: `import_domains` when set, else `opset`."""
    opsets: dict[str, int] = {}
    for entry in graph.import_domains or []:
        opsets[entry.domain] = int(entry.version)
    if "" not in opsets and "ai.onnx" not in opsets:
        opsets = {"": int(graph.opset), **opsets}
    return opsets


def _function_to_proto(function: Any) -> Any:
    """A `FunctionProto` for a gs `Function` (the IR carries model functions as protos)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    return OnnxExporter.export_function(function)


Path = tuple[tuple[int, str], ...]  # (id(node), attribute name) from the main graph down


def _constant_placement(graph: gs.Graph) -> dict[int, Path]:
    """For each gs Constant read by some graph, the innermost graph enclosing all its readers.

    A gs Constant belongs to no graph (gs's exporter writes it into every graph reading it); the IR
    defines each one once, where all its readers can see it, so one Constant is one initializer.
    """
    import onnx_graphsurgeon as gs

    placement: dict[int, Path] = {}
    defaults: set[int] = set()

    def read(tensor: Any, path: Path) -> None:
        if isinstance(tensor, gs.Constant) and id(tensor) not in defaults:
            known = placement.get(id(tensor))
            if known is None:
                placement[id(tensor)] = path
            else:
                common = 0
                while common < min(len(known), len(path)) and known[common] == path[common]:
                    common += 1
                placement[id(tensor)] = path[:common]

    def walk(g: gs.Graph, path: Path) -> None:
        defaults.update(id(t) for t in g.inputs if isinstance(t, gs.Constant))
        for node in g.nodes:
            for tensor in node.inputs:
                read(tensor, path)
            for name, value in node.attrs.items():
                if isinstance(value, gs.Graph):
                    walk(value, (*path, (id(node), name)))
        for tensor in g.outputs:
            read(tensor, path)

    walk(graph, ())
    return placement


class _Reader:
    """State of one gs -> IR conversion. Scopes map `id(tensor)` (and, as a fallback for hand-built
    graphs, the tensor's name) to IR values, innermost graph first."""

    def __init__(self, opset: int):
        self.opset = opset
        self.placement: dict[int, Path] = {}
        self.unordered = False  # a node reads a value produced by a later node

    def fill(
        self, gg: gs.Graph, graph: Graph, by_id: ChainMap, by_name: ChainMap, path: Path
    ) -> None:
        import onnx_graphsurgeon as gs

        by_id = by_id.new_child()
        by_name = by_name.new_child()
        where = f"graphsurgeon graph '{gg.name}'"
        graph.doc_string = gg.doc_string or ""

        def check(tensor: Any, what: Any) -> None:
            """`tensor` may be defined here; `what` names it in errors (a str, or its gs producer,
            described only when an error needs it)."""
            if id(tensor) in by_id.maps[0]:
                what = what if isinstance(what, str) else f"an output of {_describe(what)}"
                raise InvalidGraphError(
                    f"tensor '{tensor.name}' is defined twice (again as {what})",
                    where=where,
                    hint="every tensor must be produced once: by one node, or as a graph input",
                )
            if tensor.name and tensor.name in by_name.maps[0]:
                what = what if isinstance(what, str) else f"an output of {_describe(what)}"
                raise InvalidGraphError(
                    f"two distinct tensors are named '{tensor.name}' (the second is {what})",
                    where=where,
                    hint="gs writes tensors by name: rename one, or use the same tensor object",
                )

        def define(tensor: Any, value: Value) -> None:
            by_id.maps[0][id(tensor)] = value
            if tensor.name:
                by_name.maps[0][tensor.name] = value

        for tensor in gg.inputs:
            if tensor.is_empty():
                raise InvalidGraphError("a graph input has an empty name", where=where)
            check(tensor, "a graph input")
            if isinstance(tensor, gs.Constant):  # an input with a default (initializer + input)
                array = self.array(tensor, where)
                value = graph.add_input(tensor.name, tensor_type_of(array))
                graph.set_input_default(value, array)
            else:
                value = graph.add_input(tensor.name, _type_from_gs(tensor, where))
            define(tensor, value)

        outputs_of: list[list[Value]] = []
        for node in gg.nodes:
            values = []
            for tensor in node.outputs:
                if isinstance(tensor, gs.Constant):
                    raise InvalidGraphError(
                        f"{_describe(node)} produces the constant '{tensor.name}'",
                        where=where,
                        hint="after graph.fold_constants(), call graph.cleanup() to drop folded nodes",
                    )
                if not tensor.is_empty():
                    check(tensor, node)
                value = Value(tensor.name, _type_from_gs(tensor, where))
                if not tensor.is_empty():
                    define(tensor, value)
                values.append(value)
            outputs_of.append(values)

        # Constants whose readers are all in this graph or its subgraphs are defined here.
        for tensor in self._constants_read(gg):
            if self.placement.get(id(tensor)) == path and id(tensor) not in by_id:
                check(tensor, "a constant")
                value = graph.add_initializer(tensor.name or None, self.array(tensor, where))
                define(tensor, value)

        for node, values in zip(gg.nodes, outputs_of, strict=True):
            graph.append(self.node(node, values, graph, by_id, by_name, path, where))

        outputs, names = [], []
        for tensor in gg.outputs:
            if tensor.is_empty():
                raise InvalidGraphError("a graph output has an empty name", where=where)
            value = self.resolve(tensor, by_id, by_name, where, None)
            outputs.append(value)
            names.append(tensor.name)
        graph.set_outputs(outputs, names)

    @staticmethod
    def _constants_read(gg: gs.Graph) -> Iterator[Any]:
        import onnx_graphsurgeon as gs

        seen: set[int] = set()
        for tensor in [t for node in gg.nodes for t in node.inputs] + list(gg.outputs):
            if isinstance(tensor, gs.Constant) and id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor

    def resolve(
        self, tensor: Any, by_id: ChainMap, by_name: ChainMap, where: str, reader: Any
    ) -> Value:
        """The IR value `tensor` stands for; `reader` (a gs node, or None for the graph's outputs)
        names the reader in errors."""
        value = by_id.get(id(tensor))
        if value is None and tensor.name:
            value = by_name.get(tensor.name)
        if value is None:
            raise InvalidGraphError(
                f"{_describe(reader) if reader is not None else 'a graph output'} reads "
                f"'{tensor.name}', which no node in graph.nodes produces and which "
                "is not a graph input",
                where=where,
                hint="add its producer to graph.nodes or make it a graph input; after removing "
                "nodes, graph.cleanup() drops their readers",
            )
        if value.producer is None and value.graph is None:
            self.unordered = True  # produced by a node converted later
        return value

    def node(
        self,
        gn: gs.Node,
        outputs: list[Value],
        graph: Graph,
        by_id: ChainMap,
        by_name: ChainMap,
        path: Path,
        where: str,
    ) -> Node:
        import onnx_graphsurgeon as gs

        inputs: list[Value | None] = []
        for tensor in gn.inputs:
            if tensor.is_empty():
                inputs.append(None)
            else:
                inputs.append(self.resolve(tensor, by_id, by_name, where, gn))
        attrs: dict[str, Attribute] = {}
        for name, value in gn.attrs.items():
            if isinstance(value, gs.Graph):
                sub = graph.subgraph(value.name or f"{gn.op}_{name}")
                self.fill(value, sub, by_id, by_name, (*path, (id(gn), name)))
                attrs[name] = Attribute(AttrKind.GRAPH, sub)
            else:
                attrs[name] = self.attribute(gn, name, value, where)
        return Node(
            join_op(gn.domain or "", gn.op), inputs, attrs, outputs=outputs, name=gn.name or ""
        )

    def attribute(self, gn: gs.Node, name: str, value: Any, where: str) -> Attribute:
        import onnx
        import onnx_graphsurgeon as gs

        from graphopt.ir.onnx_protos import tensor_to_array, type_from_proto

        if isinstance(value, gs.Node.AttributeRef):
            from onnx_graphsurgeon.util.misc import convert_to_onnx_attr_type

            return Attribute(AttrKind(convert_to_onnx_attr_type(value.type)), None, ref=value.name)
        if isinstance(value, (bool, int, np.integer)):
            return Attribute(AttrKind.INT, int(value))
        if isinstance(value, (float, np.floating)):
            return Attribute(AttrKind.FLOAT, float(value))
        if isinstance(value, str):
            return Attribute(AttrKind.STRING, value.encode())
        if isinstance(value, bytes):
            return Attribute(AttrKind.STRING, value)
        if isinstance(value, gs.Constant):
            return Attribute(AttrKind.TENSOR, self.array(value, where))
        if isinstance(value, onnx.TensorProto):
            return Attribute(AttrKind.TENSOR, tensor_to_array(value))
        if isinstance(value, onnx.SparseTensorProto):
            return Attribute(AttrKind.SPARSE_TENSOR, value)
        if isinstance(value, onnx.TypeProto):
            return Attribute(AttrKind.TYPE_PROTO, type_from_proto(value))
        if isinstance(value, (type, np.dtype)):  # a dtype (Cast's `to=np.float32`): its code
            try:
                return Attribute(AttrKind.INT, int(DType.from_numpy(value)))
            except (TypeError, ValueError):
                pass
        if isinstance(value, np.ndarray):
            value = value.tolist()  # gs's exporter treats arrays as lists
        if isinstance(value, (list, tuple)):
            items = list(value)
            if not items:
                return Attribute(self._empty_list_kind(gn, name), [])
            if all(isinstance(v, (bool, int, np.integer)) for v in items):
                return Attribute(AttrKind.INTS, [int(v) for v in items])
            if all(isinstance(v, (int, float, np.number)) for v in items):
                return Attribute(AttrKind.FLOATS, [float(v) for v in items])
            if all(isinstance(v, (str, bytes)) for v in items):
                return Attribute(
                    AttrKind.STRINGS, [v.encode() if isinstance(v, str) else v for v in items]
                )
            if all(isinstance(v, (gs.Constant, onnx.TensorProto)) for v in items):
                return Attribute(
                    AttrKind.TENSORS,
                    [
                        self.array(v, where) if isinstance(v, gs.Constant) else tensor_to_array(v)
                        for v in items
                    ],
                )
            if all(isinstance(v, onnx.SparseTensorProto) for v in items):
                return Attribute(AttrKind.SPARSE_TENSORS, items)
            if all(isinstance(v, onnx.TypeProto) for v in items):
                return Attribute(AttrKind.TYPE_PROTOS, [type_from_proto(v) for v in items])
        raise GraphoptError(
            f"attribute '{name}' of {_describe(gn)} holds {type(value).__name__} {value!r:.60}, "
            "which is no ONNX attribute value",
            where=where,
            hint="use an int, float, str, gs.Constant, gs.Graph, or a list of one of those",
        )

    def _empty_list_kind(self, gn: gs.Node, name: str) -> AttrKind:
        """gs writes every empty list as `[]`: ask the op's schema which list it is (INTS if unknown)."""
        import onnx.defs

        try:
            schema = onnx.defs.get_schema(gn.op, self.opset, gn.domain or "")
            return AttrKind(int(schema.attributes[name].type))  # type: ignore[call-overload]
        except Exception:  # custom op, unknown attribute
            return AttrKind.INTS

    def array(self, constant: Any, where: str) -> np.ndarray:
        """The array of a gs Constant, shared with it. `LazyValues` are loaded once and the gs
        Constant then holds the loaded array (as `Constant.values` does, minus gs's outdated
        warning about bfloat16/float8) - except where gs's exporter would write that array wrongly
        (strings, 4-bit types, float8 e4m3fnuz): there gs keeps its proto and the IR gets a copy.
        Sparse values are densified; a Constant with an `export_dtype` is cast to it."""
        from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

        from graphopt.ir.onnx_protos import tensor_to_array

        values = constant._values
        try:
            if isinstance(values, SparseValues):
                array = _dense(values.tensor)
            elif isinstance(values, LazyValues):
                array = tensor_to_array(values.tensor)
                if not array.flags.writeable:  # gs hands out writable arrays: so must we
                    array = array.copy()
                if _gs_writes_raw(array.dtype):
                    constant.values = array
            else:
                array = values
        except Exception as error:  # external data not loaded, unreadable proto
            raise GraphoptError(
                f"cannot read the values of constant '{constant.name}': {error}",
                where=where,
                hint="load the model with its external data (onnx.load(path)) before gs.import_onnx",
            ) from None
        if not isinstance(array, np.ndarray):
            array = np.asarray(array)
        export_dtype = getattr(constant, "_export_dtype", None)
        if export_dtype is not None:
            target = _dtype_from_gs(export_dtype, where)
            if target is not None and target is not DType.from_numpy(array.dtype):
                array = array.astype(target.numpy)  # what gs's exporter would write
        return array


def _dense(sparse: Any) -> np.ndarray:
    """A dense array for an `onnx.SparseTensorProto` (as the ONNX frontend densifies them)."""
    from graphopt.ir.onnx_protos import tensor_to_array

    values = tensor_to_array(sparse.values)
    indices = tensor_to_array(sparse.indices).astype(np.int64)
    dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
    if indices.ndim == 2:
        dense[tuple(indices.T)] = values
    else:
        dense.reshape(-1)[indices] = values
    return dense


def _dtype_from_gs(dtype: Any, where: str) -> DType | None:
    """An IR element type from a gs dtype: a numpy dtype or type, or an ONNX code."""
    if dtype is None:
        return None
    try:
        if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
            return DType(int(dtype))
        return DType.from_numpy(np.dtype(dtype))
    except (TypeError, ValueError) as error:
        raise GraphoptError(
            f"dtype {dtype!r} has no ONNX element type ({error})",
            where=where,
            hint="give gs tensors numpy dtypes (np.float32) or onnx.TensorProto codes",
        ) from None


def _type_from_gs(tensor: Any, where: str) -> Type | None:
    """The IR type of a gs Variable. gs drops the shape of a tensor without dtype; so does this."""
    import onnx

    from graphopt.ir.onnx_protos import type_from_proto

    dtype = tensor.dtype
    kind = getattr(tensor, "type", "tensor_type")
    if dtype is None:
        return None
    if isinstance(dtype, onnx.TypeProto):  # gs keeps optional/map element types as protos
        return OptionalType(type_from_proto(dtype)) if kind == "optional_type" else None
    code = _dtype_from_gs(dtype, where)
    shape = None if tensor.shape is None else tuple(_dim_from_gs(d) for d in tensor.shape)
    tensor_type = TensorType(code, shape)  # type: ignore[arg-type]
    return SequenceType(tensor_type) if kind == "sequence_type" else tensor_type


def _dim_from_gs(dim: Any) -> int | str | None:
    if isinstance(dim, (int, np.integer)) and not isinstance(dim, bool):
        return int(dim) if dim >= 0 else None  # gs uses -1 (Tensor.DYNAMIC) for unknown
    if isinstance(dim, str) and dim:
        return dim
    return None


def _describe(gn: Any) -> str:
    parts = [join_op(gn.domain or "", gn.op)]
    if gn.name:
        parts.append(f"'{gn.name}'")
    first = next((t.name for t in gn.outputs if t.name), None)
    if first:
        parts.append(f"-> %{first}")
    return "node " + " ".join(parts)


def _sort_all(graph: Graph) -> None:
    for node in graph:
        for sub in node.subgraphs():
            _sort_all(sub)
    graph.sort_topologically()


# ===== IR -> gs ===================================================================================


def to_graphsurgeon(model: Model) -> gs.Graph:
    """An onnx-graphsurgeon `Graph` for `model`; initializer arrays become the Constants' `values`.

    Raises `GraphoptError` for what gs cannot represent (see the module docstring) and warns once
    about annotations it has no place for.
    """
    if not isinstance(model, Model):
        raise TypeError(f"to_graphsurgeon expects a graphopt Model, not {type(model).__name__}")
    writer = _Writer(model)
    graph = writer.graph(model.graph, is_main=True)
    writer.warn_losses()
    return graph


class _Writer:
    """State of one IR -> gs conversion: one gs tensor per IR value, named as `to_onnx` names it."""

    def __init__(self, model: Model):
        import onnx.helper

        from graphopt.backends.onnx import _Exporter

        self.model = model
        naming = _Exporter(model)  # unique names, output renames: the ONNX exporter's decisions
        self.names: dict[Value, str] = naming.names
        self.output_names: dict[Graph, list[str]] = naming.output_names
        self.tensors: dict[Value, Any] = {}
        self.lost: Counter[str] = Counter()
        self.opset_ids = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
        default = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        self.opset = int(default) if default is not None else None
        if model.doc_string:
            self.lost["the model's doc_string"] += 1
        if model.domain:
            self.lost["the model's domain"] += 1
        if model.model_version:
            self.lost["the model's model_version"] += 1
        if model.metadata:
            self.lost["model metadata_props"] += len(model.metadata)

    def warn_losses(self) -> None:
        if self.lost:
            items = ", ".join(f"{what} ({n})" for what, n in self.lost.items())
            warnings.warn(
                f"to_graphsurgeon: onnx-graphsurgeon has no place for {items}; not carried",
                stacklevel=3,
            )

    # ----- graphs ------------------------------------------------------------------------------
    def graph(self, graph: Graph, *, is_main: bool) -> gs.Graph:
        import onnx_graphsurgeon as gs

        where = f"graph '{graph.name}'"
        if graph.metadata:
            self.lost["graph metadata_props"] += len(graph.metadata)
        inputs = [self.tensor(v, where, interface=True) for v in graph.inputs]
        nodes = [self.node(node, where) for node in graph]
        outputs = []
        for value, name in zip(graph.outputs, self.output_names[graph], strict=True):
            tensor = self.tensor(value, where, interface=True)
            if self.names[value] != name:  # the exporter could not rename it: copy to the name
                kwargs = self._variable_kwargs(value, where, interface=True)
                copy = gs.Variable(name, **kwargs)
                nodes.append(gs.Node("Identity", inputs=[tensor], outputs=[copy]))
                tensor = copy
            outputs.append(tensor)
        for value in graph.initializers.values():
            if not value.is_used and not value.is_graph_input:
                self.lost["unused initializers"] += 1
        graph_kwargs: dict[str, Any] = {}
        if is_main:
            from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter

            graph_kwargs = {
                "producer_name": self.model.producer_name,
                "producer_version": self.model.producer_version,
                "ir_version": self.model.ir_version or None,
                "functions": [
                    OnnxImporter.import_function(f, self.opset, self.opset_ids)
                    for f in self.model.functions
                ],
            }
        return gs.Graph(
            nodes=nodes,
            inputs=inputs,
            outputs=outputs,
            name=graph.name,
            doc_string=graph.doc_string,
            opset=self.opset,
            import_domains=list(self.opset_ids),
            **graph_kwargs,
        )

    def node(self, node: Node, where: str) -> gs.Node:
        import onnx_graphsurgeon as gs

        if node.overload:
            raise GraphoptError(
                f"{node.describe()} calls function overload '{node.overload}'",
                where=where,
                hint="onnx-graphsurgeon has no node overloads; export with graphopt.save instead",
            )
        if node.doc_string:
            self.lost["node doc strings"] += 1
        if node.metadata:
            self.lost["node metadata_props"] += 1
        if node.device:
            self.lost["node devices"] += 1
        attrs = {name: self.attribute(node, name, a, where) for name, a in node.attrs.items()}
        inputs = [gs.Variable.empty() if v is None else self.tensor(v, where) for v in node.inputs]
        outputs = [self.tensor(v, where) for v in node.outputs]
        return gs.Node(
            node.op_type,
            name=node.name,
            attrs=attrs,
            inputs=inputs,
            outputs=outputs,
            domain=node.domain or None,
        )

    # ----- tensors -----------------------------------------------------------------------------
    def tensor(self, value: Value, where: str, *, interface: bool = False) -> Any:
        """The one gs tensor of `value`; `interface` for graph inputs/outputs (types must fit)."""
        import onnx_graphsurgeon as gs

        tensor = self.tensors.get(value)
        if tensor is not None:
            if interface and isinstance(tensor, gs.Variable):
                self._variable_kwargs(value, where, interface=True)  # checks the type
            return tensor
        name = self.names[value]
        if value.doc_string:
            self.lost["value doc strings"] += 1
        if value.const_value is not None:
            array = value.const_value
            if value.is_graph_input:
                self._check_default(value, array, where)
            tensor = gs.Constant(name, _gs_values(array, name))
        else:
            tensor = gs.Variable(name, **self._variable_kwargs(value, where, interface=interface))
        self.tensors[value] = tensor
        return tensor

    def _variable_kwargs(self, value: Value, where: str, *, interface: bool) -> dict[str, Any]:
        """`gs.Variable` keyword arguments for the type of `value` (gs writes tensor and
        sequence-of-tensor types only)."""
        t = value.type
        if t is None:
            return {}
        elem = t.elem if isinstance(t, SequenceType) else t
        if isinstance(elem, TensorType):
            return {
                "dtype": _dtype_to_gs(elem.dtype),
                "shape": None if elem.shape is None else list(elem.shape),
                "type": "sequence_type" if isinstance(t, SequenceType) else "tensor_type",
            }
        if interface:
            raise GraphoptError(
                f"%{value.name} has a type onnx-graphsurgeon cannot write "
                f"({type(t).__name__}{'' if elem is t else ' of ' + type(elem).__name__})",
                where=where,
                hint="gs's exporter writes tensor and sequence-of-tensor types only; "
                "export with graphopt.save instead",
            )
        self.lost["types of intermediate values (optional, map, nested sequence)"] += 1
        return {}

    def _check_default(self, value: Value, array: np.ndarray, where: str) -> None:
        if value.type is not None and value.type != tensor_type_of(np.asarray(array)):
            raise GraphoptError(
                f"input %{value.name} has a default whose type differs from the input's",
                where=where,
                hint="gs stores an input with a default as a gs.Constant, typed by the default; "
                "give the input the default's exact type, or drop the default",
            )

    # ----- attributes --------------------------------------------------------------------------
    def attribute(self, node: Node, name: str, a: Attribute, where: str) -> Any:
        import onnx_graphsurgeon as gs

        from graphopt.ir.onnx_protos import array_to_tensor, type_to_proto

        if a.doc_string:
            self.lost["attribute doc strings"] += 1
        kind, value = a.kind, a.value
        if a.ref is not None:
            from onnx_graphsurgeon.util.misc import convert_from_onnx_attr_type

            return gs.Node.AttributeRef(a.ref, convert_from_onnx_attr_type(int(kind)))
        if kind is AttrKind.FLOAT:
            return float(value)
        if kind is AttrKind.INT:
            return int(value)
        if kind is AttrKind.FLOATS:
            return [float(v) for v in value]
        if kind is AttrKind.INTS:
            return [int(v) for v in value]
        if kind is AttrKind.STRING:
            return _decode(value)
        if kind is AttrKind.STRINGS:
            return [_decode(v) for v in value]
        if kind is AttrKind.TENSOR:
            return gs.Constant("", _gs_values(value, ""))
        if kind is AttrKind.GRAPH:
            return self.graph(value, is_main=False)
        if kind is AttrKind.TENSORS:  # gs's exporter cannot write lists of Constants
            return [array_to_tensor(v) for v in value]
        if kind in (AttrKind.SPARSE_TENSOR, AttrKind.SPARSE_TENSORS):
            return value if kind is AttrKind.SPARSE_TENSOR else list(value)
        if kind is AttrKind.TYPE_PROTO:
            return type_to_proto(value)
        if kind is AttrKind.TYPE_PROTOS:
            return [type_to_proto(v) for v in value]
        raise GraphoptError(
            f"attribute '{name}' of {node.describe()} is a list of graphs (GRAPHS), which "
            "onnx-graphsurgeon cannot hold",
            where=where,
            hint="export this model with graphopt.save instead of going through gs",
        )


def _decode(value: bytes) -> str | bytes:
    """gs holds string attributes as `str`; bytes that are not UTF-8 stay bytes."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


def _dtype_to_gs(dtype: DType) -> Any:
    """A gs dtype: the numpy dtype where gs maps it back to the same ONNX code, else the code."""
    if dtype is DType.UNDEFINED:
        return None
    if dtype in _GS_CODE_DTYPES:
        return int(dtype)
    try:
        np_dtype = dtype.numpy
    except KeyError:  # a type this onnx build has no numpy dtype for
        return int(dtype)
    return np_dtype if _gs_code(np_dtype) == int(dtype) else int(dtype)


_RAW_OK: dict[np.dtype, bool] = {}


def _gs_code(np_dtype: np.dtype) -> int | None:
    """The ONNX code gs's exporter writes for `np_dtype` (None if it cannot)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx

    try:
        return int(dtype_to_onnx(np_dtype))
    except Exception:
        return None


def _gs_writes_raw(np_dtype: np.dtype) -> bool:
    """Whether gs's exporter writes arrays of `np_dtype` correctly (as raw bytes under the right
    ONNX code): not strings, not sub-byte types, not dtypes gs maps to another code."""
    ok = _RAW_OK.get(np_dtype)
    if ok is None:
        try:
            code = DType.from_numpy(np_dtype)
            ok = (
                code is not DType.STRING
                and code.itemsize_bits >= 8
                and np_dtype.byteorder != ">"
                and _gs_code(np_dtype) == int(code)
            )
        except ValueError:
            ok = False
        _RAW_OK[np_dtype] = ok
    return ok


def _gs_values(array: Any, name: str) -> Any:
    """What a gs Constant holds for `array`: the array itself where gs writes it correctly, else
    `LazyValues` over a correct `TensorProto`, which gs writes as is."""
    if not isinstance(array, np.ndarray):
        array = np.asarray(array)
    if _gs_writes_raw(array.dtype):
        return array
    from onnx_graphsurgeon.ir.tensor import LazyValues

    from graphopt.ir.onnx_protos import array_to_tensor

    return LazyValues(array_to_tensor(array, name))
