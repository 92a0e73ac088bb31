"""ONNX -> IR: read a model file (or bytes, or a `ModelProto`) into a graphopt `Model`.

What it does: graph inputs, initializers (an initializer named like an input becomes that input's
default), nodes with typed attributes, value_info types, outputs, doc strings, metadata (model,
graph, node; the node key `graphopt.device` becomes `Node.device`), opset imports, model functions
(kept as `FunctionProto`) and subgraphs (If/Loop/Scan bodies share the model's name scope; a body's
reads of enclosing names resolve to the enclosing `Value`s). Nodes out of topological order are
sorted. Models below `min_opset` are upgraded with ONNX's version converter when it can.

Why it is shaped this way: weights are most of a model, so files are read by
`frontends/onnx_stream.py`, which memory-maps them and hands back weights as read-only views; this
module only converts the small rest. Every problem a user can cause is reported as an
`graphopt.ir.errors` exception naming the file and node with a hint, never as a protobuf traceback.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections import ChainMap
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
import onnx.defs

from graphopt.frontends.onnx_stream import (
    StreamedModel,
    external_array,
    looks_like_text,
    map_file,
    read_model,
)
from graphopt.ir.core import Attribute, Graph, Model, Node, Value, join_op
from graphopt.ir.errors import InvalidGraphError, ModelLoadError, UnsupportedOpError
from graphopt.ir.gc_pause import paused_gc
from graphopt.ir.onnx_protos import attribute_from_proto, tensor_to_array, type_from_proto

__all__ = ["load_onnx", "from_onnx", "DEVICE_KEY"]

DEVICE_KEY = "graphopt.device"  # node metadata key carrying Node.device
DEFAULT_DOMAINS = ("", "ai.onnx")

Scope = ChainMap  # name -> Value, innermost graph first


def load_onnx(
    source: str | os.PathLike[str] | bytes | onnx.ModelProto, *, min_opset: int = 7
) -> Model:
    """Read an ONNX model from a path, serialized bytes or a `ModelProto`.

    From a path or bytes, weights are not copied: they are read-only views of the memory-mapped
    file (or of the bytes), and external data files are memory-mapped too.
    """
    if isinstance(source, onnx.ModelProto):
        return from_onnx(source, min_opset=min_opset)
    if isinstance(source, (bytes, bytearray, memoryview)):
        buffer: Any = bytes(source)
        where, base_dir = "<bytes>", ""
    elif isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        base_dir = os.path.dirname(os.path.abspath(where))
        buffer = map_file(where)
    else:
        raise TypeError(
            f"load_onnx expects a path, bytes or onnx.ModelProto, not {type(source).__name__}"
        )
    if len(buffer) == 0:
        raise ModelLoadError("the file is empty", where=where, hint="re-export the model")
    streamed = read_model(buffer, base_dir=base_dir, where=where)
    if not streamed.proto.HasField("graph"):
        raise _no_graph(where, bytes(buffer[:256]))
    with paused_gc():
        return _Importer(where, base_dir).model(streamed, min_opset)


def from_onnx(proto: onnx.ModelProto, base_dir: str = "", *, min_opset: int = 7) -> Model:
    """Convert an in-memory `ModelProto` (weights are copied out of the protobuf; external data
    is memory-mapped from `base_dir`)."""
    if not isinstance(proto, onnx.ModelProto):
        raise TypeError(f"from_onnx expects an onnx.ModelProto, not {type(proto).__name__}")
    if not proto.HasField("graph"):
        raise _no_graph("<ModelProto>", b"")
    with paused_gc():
        return _Importer("<ModelProto>", base_dir).model(StreamedModel(proto, []), min_opset)


def _no_graph(where: str, head: bytes) -> ModelLoadError:
    if looks_like_text(head):
        return ModelLoadError(
            "is a text file, not an ONNX model (ONNX models are binary protobuf)", where=where
        )
    return ModelLoadError(
        "is not an ONNX model: it parses as protobuf but has no graph",
        where=where,
        hint="is it a tensor (.pb) or another protobuf file? pass the model's .onnx file",
    )


class _Importer:
    """State of one conversion: where errors point, and the op checks made so far."""

    def __init__(self, where: str, base_dir: str):
        self.where = where
        self.base_dir = base_dir
        self.opset = onnx.defs.onnx_opset_version()
        self.local_functions: set[tuple[str, str]] = set()
        self.checked_ops: set[str] = set()
        self.unordered = False  # a node read a value defined after it

    # ----- model ---------------------------------------------------------------------------------
    def model(self, streamed: StreamedModel, min_opset: int) -> Model:
        proto = self._upgrade(streamed, min_opset)
        initializers = streamed.initializers if proto is streamed.proto else []
        opsets = {entry.domain: int(entry.version) for entry in proto.opset_import}
        for domain in DEFAULT_DOMAINS:
            if domain in opsets:
                self.opset = opsets[domain]
        self.local_functions = {(f.domain, f.name) for f in proto.functions}
        if proto.training_info:
            warnings.warn(f"{self.where}: training_info is not kept by graphopt", stacklevel=3)
        graph = Graph(proto.graph.name or "main")
        self._fill_graph(proto.graph, graph, ChainMap(), initializers)
        if self.unordered:
            _sort_all(graph)
        model = Model(
            graph,
            opset_imports=opsets,
            ir_version=int(proto.ir_version),
            producer_name=proto.producer_name,
            producer_version=proto.producer_version,
            domain=proto.domain,
            model_version=int(proto.model_version),
            doc_string=proto.doc_string,
            metadata={p.key: p.value for p in proto.metadata_props},
            functions=[_copy(f) for f in proto.functions],
        )
        return model

    def _upgrade(self, streamed: StreamedModel, min_opset: int) -> onnx.ModelProto:
        proto = streamed.proto
        version = next((e.version for e in proto.opset_import if e.domain in DEFAULT_DOMAINS), None)
        if version is None or version >= min_opset:
            return proto
        full = proto
        if streamed.initializers:  # the converter needs the whole model; old models are small
            full = _copy(proto)
            full.graph.initializer.extend(
                onnx.numpy_helper.from_array(np.asarray(a), name)
                for name, a in streamed.initializers
            )
        try:
            from onnx import version_converter

            return version_converter.convert_version(full, min_opset)
        except Exception as error:  # the converter raises bare RuntimeErrors from C++
            warnings.warn(
                f"{self.where}: could not upgrade the model from opset {version} to {min_opset} "
                f"({str(error).splitlines()[0] if str(error) else type(error).__name__}); "
                "keeping the original opset",
                stacklevel=4,
            )
            return proto

    # ----- graphs --------------------------------------------------------------------------------
    def _fill_graph(
        self,
        gp: onnx.GraphProto,
        graph: Graph,
        outer: ChainMap,
        extra_initializers: Iterable[tuple[str, np.ndarray]] = (),
    ) -> Graph:
        env: ChainMap = outer.new_child()
        local: dict[str, Value] = env.maps[0]  # type: ignore[assignment]
        where = self.where
        graph.doc_string = gp.doc_string
        graph.metadata = {p.key: p.value for p in gp.metadata_props}

        for info in gp.input:
            if info.name in local:
                raise self._duplicate(info.name, graph, "graph input")
            value = graph.add_input(info.name, self._type(info, graph))
            value.doc_string = info.doc_string
            _take_metadata(value, info)
            local[info.name] = value
        inputs = dict(local)
        for name, array in self._initializers(gp, extra_initializers):
            if name in inputs and inputs[name].const_value is None:
                graph.set_input_default(inputs[name], array)
            elif name in local:
                raise self._duplicate(name, graph, "initializer")
            else:
                local[name] = graph.add_initializer(name, array)

        outputs_of: list[list[Value]] = []
        for np_ in gp.node:
            values = []
            for name in np_.output:
                value = Value(name)
                if name:
                    if name in local:
                        raise self._duplicate(name, graph, _describe(np_))
                    local[name] = value
                values.append(value)
            outputs_of.append(values)
        for info in gp.value_info:
            annotated: Value | None = env.get(info.name)
            if annotated is None:
                continue
            if annotated.type is None:
                annotated.type = self._type(info, graph)
            if info.doc_string and not annotated.doc_string:
                annotated.doc_string = info.doc_string
            _take_metadata(annotated, info)

        for np_, values in zip(gp.node, outputs_of, strict=False):
            graph.append(self._node(np_, values, graph, env))

        outputs, names = [], []
        for info in gp.output:
            output: Value | None = env.get(info.name)
            if output is None:
                raise InvalidGraphError(
                    f"graph output '{info.name}' is never defined",
                    where=f"{where}: graph '{graph.name}'",
                    hint="an output must name a graph input, an initializer or a node output",
                )
            if output.type is None:
                output.type = self._type(info, graph)
            if info.doc_string and not output.doc_string:
                output.doc_string = info.doc_string
            _take_metadata(output, info)
            outputs.append(output)
            names.append(info.name)
        graph.set_outputs(outputs, names)
        return graph

    def _initializers(
        self, gp: onnx.GraphProto, extra: Iterable[tuple[str, np.ndarray]]
    ) -> Iterable[tuple[str, np.ndarray]]:
        yield from extra
        for tensor in gp.initializer:
            yield tensor.name, self._array(tensor)
        for sparse in gp.sparse_initializer:
            yield sparse.values.name, self._sparse(sparse)

    def _array(self, tensor: onnx.TensorProto) -> np.ndarray:
        try:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                return external_array(tensor, self.base_dir, self.where)
            return tensor_to_array(tensor)
        except ModelLoadError:
            raise
        except Exception as error:  # numpy_helper: ValueError/TypeError on malformed tensors
            raise ModelLoadError(
                f"cannot read initializer '{tensor.name}': {error}", where=self.where
            ) from None

    def _sparse(self, sparse: onnx.SparseTensorProto) -> np.ndarray:
        """A dense array for a sparse initializer (the IR has no sparse constants)."""
        values = self._array(sparse.values)
        indices = self._array(sparse.indices).astype(np.int64)
        dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
        if indices.ndim == 2:  # [nnz, rank] coordinates
            dense[tuple(indices.T)] = values
        else:  # linearized positions
            dense.reshape(-1)[indices] = values
        return dense

    def _type(self, info: onnx.ValueInfoProto, graph: Graph) -> Any:
        try:
            return type_from_proto(info.type)
        except ValueError as error:
            raise ModelLoadError(
                f"value '{info.name}' has an invalid type: {error}",
                where=f"{self.where}: graph '{graph.name}'",
            ) from None

    def _duplicate(self, name: str, graph: Graph, by: str) -> InvalidGraphError:
        return InvalidGraphError(
            f"name '{name}' is defined twice (again by {by})",
            where=f"{self.where}: graph '{graph.name}'",
            hint="ONNX graphs are in SSA form: every value name must be defined exactly once",
        )

    # ----- nodes ---------------------------------------------------------------------------------
    def _node(self, np_: onnx.NodeProto, outputs: list[Value], graph: Graph, env: ChainMap) -> Node:
        self._check_op(np_, graph)
        inputs: list[Value | None] = []
        for name in np_.input:
            if not name:
                inputs.append(None)
                continue
            value = env.get(name)
            if value is None:
                raise InvalidGraphError(
                    f"{_describe(np_)} reads '{name}', which is never defined",
                    where=f"{self.where}: graph '{graph.name}'",
                    hint="define it as a graph input, an initializer or another node's output",
                )
            if value.producer is None and value.graph is None:
                self.unordered = True  # produced by a node that comes later
            inputs.append(value)
        attrs: dict[str, Attribute] = {}
        for a in np_.attribute:
            attrs[a.name] = self._attribute(a, np_, graph, env)
        node = Node(join_op(np_.domain, np_.op_type), inputs, attrs, outputs=outputs, name=np_.name)
        node.doc_string = np_.doc_string
        node.overload = np_.overload
        for entry in np_.metadata_props:
            if entry.key == DEVICE_KEY:
                node.device = entry.value or None
            else:
                node.metadata[entry.key] = entry.value
        return node

    def _attribute(
        self, a: onnx.AttributeProto, np_: onnx.NodeProto, graph: Graph, env: ChainMap
    ) -> Attribute:
        def subgraph(gp: onnx.GraphProto) -> Graph:
            return self._fill_graph(gp, graph.subgraph(gp.name or f"{np_.op_type}_{a.name}"), env)

        if a.type == onnx.AttributeProto.UNDEFINED and not a.ref_attr_name:
            a = _with_inferred_type(a)
        try:
            return attribute_from_proto(a, subgraph)
        except (ModelLoadError, InvalidGraphError, UnsupportedOpError):
            raise
        except Exception as error:  # bad enum values, malformed tensors
            raise ModelLoadError(
                f"cannot read attribute '{a.name}' of {_describe(np_)}: {error}",
                where=f"{self.where}: graph '{graph.name}'",
            ) from None

    def _check_op(self, np_: onnx.NodeProto, graph: Graph) -> None:
        domain, op_type = np_.domain, np_.op_type
        if domain not in DEFAULT_DOMAINS or op_type in self.checked_ops:
            return
        if (domain, op_type) in self.local_functions:
            self.checked_ops.add(op_type)
            return
        try:
            onnx.defs.get_schema(op_type, self.opset, "")
        except onnx.defs.SchemaError:
            where = f"{self.where}: graph '{graph.name}'"
            if onnx.defs.has(op_type, ""):
                since = min(s.since_version for s in _schemas() if s.name == op_type)
                raise UnsupportedOpError(
                    f"{_describe(np_)}: op '{op_type}' needs opset >= {since}, "
                    f"the model imports opset {self.opset}",
                    where=where,
                    hint=f"raise the model's ai.onnx opset_import to {since} or later",
                ) from None
            names = sorted({s.name for s in _schemas()})
            close = difflib.get_close_matches(op_type, names, n=3, cutoff=0.6)
            close += [n for n in names if n.lower() == op_type.lower() and n not in close]
            suggestion = f"did you mean {', '.join(close)}? " if close else ""
            raise UnsupportedOpError(
                f"{_describe(np_)}: unknown op '{op_type}' in the default ONNX domain",
                where=where,
                hint=suggestion + "a custom op must name its own domain (e.g. com.example)",
            ) from None
        self.checked_ops.add(op_type)


_SCHEMAS: list[Any] = []


def _schemas() -> list[Any]:
    if not _SCHEMAS:
        _SCHEMAS.extend(s for s in onnx.defs.get_all_schemas_with_history() if s.domain == "")
    return _SCHEMAS


def _describe(np_: onnx.NodeProto) -> str:
    """How errors name a node proto: op, name and first output (as `Node.describe` does)."""
    parts = [join_op(np_.domain, np_.op_type)]
    if np_.name:
        parts.append(f"'{np_.name}'")
    first = next((o for o in np_.output if o), None)
    if first:
        parts.append(f"-> %{first}")
    return "node " + " ".join(parts)


_ATTR_FIELDS = [
    ("f", onnx.AttributeProto.FLOAT), ("i", onnx.AttributeProto.INT),
    ("s", onnx.AttributeProto.STRING), ("t", onnx.AttributeProto.TENSOR),
    ("g", onnx.AttributeProto.GRAPH), ("sparse_tensor", onnx.AttributeProto.SPARSE_TENSOR),
    ("tp", onnx.AttributeProto.TYPE_PROTO),
]  # fmt: skip
_ATTR_LISTS = [
    ("floats", onnx.AttributeProto.FLOATS), ("ints", onnx.AttributeProto.INTS),
    ("strings", onnx.AttributeProto.STRINGS), ("tensors", onnx.AttributeProto.TENSORS),
    ("graphs", onnx.AttributeProto.GRAPHS), ("sparse_tensors", onnx.AttributeProto.SPARSE_TENSORS),
    ("type_protos", onnx.AttributeProto.TYPE_PROTOS),
]  # fmt: skip


def _with_inferred_type(a: onnx.AttributeProto) -> onnx.AttributeProto:
    """Old files (IR version 1-2) may leave `AttributeProto.type` unset: infer it from the field
    that holds the value."""
    fixed = _copy(a)
    for name, kind in _ATTR_LISTS:
        if len(getattr(a, name)):
            fixed.type = kind
            return fixed
    for name, kind in _ATTR_FIELDS:
        if a.HasField(name):
            fixed.type = kind
            return fixed
    fixed.type = onnx.AttributeProto.INTS  # an empty list
    return fixed


def _take_metadata(value: Value, info: onnx.ValueInfoProto) -> None:
    for entry in info.metadata_props:
        value.metadata.setdefault(entry.key, entry.value)


def _sort_all(graph: Graph) -> None:
    for node in graph:
        for sub in node.subgraphs():
            _sort_all(sub)
    graph.sort_topologically()


def _copy(proto: Any) -> Any:
    clone = type(proto)()
    clone.CopyFrom(proto)
    return clone
