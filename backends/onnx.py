"""IR -> ONNX: turn a graphopt `Model` back into a standard ONNX `ModelProto` or file.

`to_onnx` builds a complete `ModelProto` in memory (weights copied in; fine for small models and for
handing a model to ONNX Runtime). `save_onnx` never builds one holding all weights: the small part of
the model is serialized with protobuf and the weights are streamed into the file from the arrays
themselves (`backends/onnx_stream.py`), atomically, with external data for big models.

Names. ONNX identifies values by name, the IR by identity, so names are fixed up at export only:
each value keeps its name when it is unique; unnamed (or clashing) values get fresh names. A graph
output is written under `graph.output_names[i]`; when the value behind it is named differently (a pass
swapped it), the value is renamed if that is safe (it is a node output of that graph and no other
output needs it), otherwise an `Identity` node copies it to the output name.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
import onnx.helper

from graphopt.frontends.onnx import DEVICE_KEY
from graphopt.ir.core import Graph, Model, Node, Value
from graphopt.ir.errors import InvalidGraphError
from graphopt.ir.onnx_protos import array_to_tensor, node_to_proto, value_info

__all__ = ["to_onnx", "save_onnx", "export_parts", "roundtrip_proto", "DEVICE_KEY"]


def to_onnx(model: Model) -> onnx.ModelProto:
    """A complete `ModelProto` for `model` (weights copied into `raw_data`)."""
    proto, initializers = export_parts(model)
    proto.graph.initializer.extend(array_to_tensor(array, name) for name, array in initializers)
    return proto


def save_onnx(
    model: Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    size_threshold: int = 1024,
) -> None:
    """Write `model` to `path` as ONNX, streaming weights from their arrays, atomically.

    `external_data=None` keeps weights in the file unless it would pass protobuf's 2 GB limit;
    with external data, tensors of at least `size_threshold` bytes go to `<path>.data` (64-byte
    aligned). Raises `SaveError` naming the path; no partial file is left behind. Saving over the
    file the model was loaded from is safe (the old file stays mapped until its arrays are freed).
    """
    from graphopt.backends.onnx_stream import write_model

    proto, initializers = export_parts(model)
    write_model(
        os.fspath(path),
        proto,
        initializers,
        external=external_data,
        size_threshold=size_threshold,
    )


def roundtrip_proto(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` imported into the IR and exported again (what conformance checks compare)."""
    from graphopt.frontends.onnx import from_onnx

    return to_onnx(from_onnx(proto))


def export_parts(model: Model) -> tuple[onnx.ModelProto, list[tuple[str, np.ndarray]]]:
    """The `ModelProto` of `model` without the main graph's initializers, and those initializers
    as `(name, array)` in order (subgraph initializers stay inside their subgraphs)."""
    exporter = _Exporter(model)
    graph_proto = exporter.graph_proto(model.graph, with_initializers=False)
    proto = onnx.ModelProto()
    proto.ir_version = model.ir_version or _min_ir_version(model.opset_imports)
    if model.producer_name:
        proto.producer_name = model.producer_name
    if model.producer_version:
        proto.producer_version = model.producer_version
    if model.domain:
        proto.domain = model.domain
    if model.model_version:
        proto.model_version = model.model_version
    if model.doc_string:
        proto.doc_string = model.doc_string
    opsets = dict(model.opset_imports)
    for domain in sorted(exporter.domains - set(opsets)):
        if domain not in ("", "ai.onnx") or "ai.onnx" not in opsets:
            opsets[domain] = 1 if domain else onnx.defs.onnx_opset_version()
    for domain, version in opsets.items():
        proto.opset_import.append(onnx.helper.make_opsetid(domain, version))
    for key, val in model.metadata.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=val))
    proto.functions.extend(model.functions)
    proto.graph.CopyFrom(graph_proto)
    initializers = [(exporter.names[v], v.const_value) for v in model.graph.initializers.values()]
    return proto, initializers  # type: ignore[return-value]


def _min_ir_version(opsets: dict[str, int]) -> int:
    try:
        ids = [onnx.helper.make_opsetid(d, v) for d, v in opsets.items()]
        return int(onnx.helper.find_min_ir_version_for(ids, ignore_unknown=True))
    except Exception:  # an opset newer than this onnx knows
        return int(onnx.IR_VERSION)


class _Exporter:
    """Assigns every value of the model one unique name, then writes graphs with those names."""

    def __init__(self, model: Model):
        self.model = model
        self.names: dict[Value, str] = {}
        self.holder: dict[str, Value] = {}
        self.fixed: set[Value] = set()  # names that must not change (interface, settled outputs)
        self.domains: set[str] = set()
        self.identities: dict[Graph, list[tuple[str, str]]] = {}
        self.output_names: dict[Graph, list[str]] = {}
        self._counter = 0
        self._assign_names(model.graph)

    # ----- naming ---------------------------------------------------------------------------------
    def _assign_names(self, main: Graph) -> None:
        graphs = list(_graphs(main))
        pending: list[Value] = []
        for value in main.inputs:
            self._take(value, pending)
            self.fixed.add(value)
        for graph in graphs:
            for value in _defined_values(graph):
                if value not in self.names:
                    self._take(value, pending)
        for value in pending:
            self._set(value, self._fresh(value.name or "v"))
        for graph in graphs:
            self._name_outputs(graph, is_main=graph is main)

    def _take(self, value: Value, pending: list[Value]) -> None:
        name = value.name
        if name == "" and not value.is_used and value.producer is not None:
            self.names[value] = ""  # an omitted optional output
        elif name and name not in self.holder:
            self._set(value, name)
        else:
            pending.append(value)

    def _set(self, value: Value, name: str) -> None:
        old = self.names.get(value)
        if old and self.holder.get(old) is value:
            del self.holder[old]
        self.names[value] = name
        self.holder[name] = value

    def _fresh(self, hint: str) -> str:
        while True:
            name = f"{hint}__{self._counter}"
            self._counter += 1
            if name not in self.holder:
                return name

    def _name_outputs(self, graph: Graph, *, is_main: bool) -> None:
        outputs = graph.outputs
        wanted = list(graph.output_names) + [""] * (len(outputs) - len(graph.output_names))
        final = [""] * len(outputs)
        todo = []
        for i, (value, name) in enumerate(zip(outputs, wanted, strict=True)):
            self._require_defined(value, graph)
            if not name or self.names[value] == name:
                final[i] = self.names[value]
                self.fixed.add(value)
            else:
                todo.append(i)
        for i in todo:
            value, name = outputs[i], wanted[i]
            owner = self.holder.get(name)
            if owner is not None and owner is not value:
                if owner in self.fixed:
                    if is_main:
                        raise InvalidGraphError(
                            f"graph output '{name}' clashes with another value of that name",
                            where=f"graph '{graph.name}'",
                            hint="rename the output (graph.output_names) or the other value",
                        )
                    name = self._fresh(name)  # subgraph outputs are positional
                else:
                    self._set(owner, self._fresh(owner.name or "v"))
            own = value.producer is not None and value.producer.graph is graph
            if own and value not in self.fixed:
                self._set(value, name)
            else:
                self.identities.setdefault(graph, []).append((self.names[value], name))
                self.holder[name] = value  # reserve it
            self.fixed.add(value)
            final[i] = name
        self.output_names[graph] = final

    def _require_defined(self, value: Value, graph: Graph, node: Node | None = None) -> None:
        if value not in self.names:
            reader = node.describe() if node is not None else "the graph's outputs"
            raise InvalidGraphError(
                f"{reader} reads %{value.name}, which no node, input or initializer defines",
                where=f"graph '{graph.name}'",
                hint="add the value's producer to the graph or replace the use",
            )

    def name_of(self, value: Value) -> str:
        return self.names[value]

    # ----- writing --------------------------------------------------------------------------------
    def graph_proto(self, graph: Graph, *, with_initializers: bool = True) -> onnx.GraphProto:
        proto = onnx.GraphProto()
        proto.name = graph.name
        if graph.doc_string:
            proto.doc_string = graph.doc_string
        for key, val in graph.metadata.items():
            proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=val))
        for value in graph.inputs:
            proto.input.append(value_info(value, self.names[value]))
        if with_initializers:
            for value in graph.initializers.values():
                assert value.const_value is not None
                proto.initializer.append(array_to_tensor(value.const_value, self.names[value]))
        for node in graph:
            for read in node.inputs:
                if read is not None:
                    self._require_defined(read, graph, node)
            self.domains.add(node.domain)
            proto.node.append(node_to_proto(node, self._subgraph_proto, self.name_of))
        for source, target in self.identities.get(graph, []):
            proto.node.append(onnx.helper.make_node("Identity", [source], [target]))
        out_names = self.output_names[graph]
        interface = set(out_names)
        for value, name in zip(graph.outputs, out_names, strict=True):
            proto.output.append(value_info(value, name))
        for node in graph:
            for value in node.outputs:
                name = self.names[value]
                if value.type is not None and name and name not in interface:
                    proto.value_info.append(value_info(value, name))
        return proto

    def _subgraph_proto(self, graph: Graph) -> onnx.GraphProto:
        return self.graph_proto(graph, with_initializers=True)


def _graphs(graph: Graph) -> Any:
    """`graph` and, depth first, every subgraph."""
    yield graph
    for node in graph:
        for sub in node.subgraphs():
            yield from _graphs(sub)


def _defined_values(graph: Graph) -> Any:
    yield from graph.inputs
    for value in graph.initializers.values():
        if not value.is_graph_input:
            yield value
    for node in graph:
        yield from node.outputs
