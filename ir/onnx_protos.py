"""Conversions between IR pieces and ONNX protobuf messages: types, tensors, attributes, nodes.

Whole graphs and models are converted by `graphopt.frontends.onnx` (ONNX -> IR) and
`graphopt.backends.onnx` (IR -> ONNX); both use these functions, as do the op registry (which hands
single nodes to ONNX's shape inference and reference kernels).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.ir.core import Attribute, AttrKind, Graph, Node, Value
from graphopt.ir.types import DType, MapType, OptionalType, SequenceType, TensorType, Type

# ----- types -------------------------------------------------------------------------------------


def type_from_proto(proto: onnx.TypeProto) -> Type | None:
    """An IR type from an ONNX `TypeProto` (`None` when the proto says nothing)."""
    which = proto.WhichOneof("value")
    if which in ("tensor_type", "sparse_tensor_type"):
        t = getattr(proto, which)
        shape: tuple[Any, ...] | None = None
        if t.HasField("shape"):
            dims: list[int | str | None] = []
            for d in t.shape.dim:
                kind = d.WhichOneof("value")
                if kind == "dim_value":
                    dims.append(int(d.dim_value))
                elif kind == "dim_param" and d.dim_param:
                    dims.append(d.dim_param)
                else:
                    dims.append(None)
            shape = tuple(dims)
        return TensorType(DType(t.elem_type), shape)
    if which == "sequence_type":
        return SequenceType(type_from_proto(proto.sequence_type.elem_type))
    if which == "optional_type":
        return OptionalType(type_from_proto(proto.optional_type.elem_type))
    if which == "map_type":
        return MapType(DType(proto.map_type.key_type), type_from_proto(proto.map_type.value_type))
    return None


def type_to_proto(t: Type | None) -> onnx.TypeProto:
    """An ONNX `TypeProto` for an IR type (an empty proto for `None`)."""
    proto = onnx.TypeProto()
    if t is None:
        return proto
    if isinstance(t, TensorType):
        tensor = proto.tensor_type
        tensor.elem_type = int(t.dtype)
        if t.shape is not None:
            shape = tensor.shape
            shape.SetInParent()
            for d in t.shape:
                dim = shape.dim.add()
                if isinstance(d, int):
                    dim.dim_value = d
                elif isinstance(d, str):
                    dim.dim_param = d
    elif isinstance(t, SequenceType):
        proto.sequence_type.SetInParent()
        if t.elem is not None:
            proto.sequence_type.elem_type.CopyFrom(type_to_proto(t.elem))
    elif isinstance(t, OptionalType):
        proto.optional_type.SetInParent()
        if t.elem is not None:
            proto.optional_type.elem_type.CopyFrom(type_to_proto(t.elem))
    elif isinstance(t, MapType):
        proto.map_type.key_type = int(t.key)
        if t.value is not None:
            proto.map_type.value_type.CopyFrom(type_to_proto(t.value))
    return proto


def value_info(value: Value, name: str | None = None) -> onnx.ValueInfoProto:
    info = onnx.ValueInfoProto()
    info.name = name if name is not None else (value.name or "")
    if value.type is not None:
        info.type.CopyFrom(type_to_proto(value.type))
    if value.doc_string:
        info.doc_string = value.doc_string
    for key, val in value.metadata.items():
        info.metadata_props.append(onnx.StringStringEntryProto(key=key, value=val))
    return info


# ----- tensors -----------------------------------------------------------------------------------


def tensor_to_array(proto: onnx.TensorProto, base_dir: str = "") -> np.ndarray:
    """A numpy array from a `TensorProto` (external data read from `base_dir`)."""
    if proto.data_location == onnx.TensorProto.EXTERNAL:
        from onnx.external_data_helper import load_external_data_for_tensor

        proto = _copy(proto)
        load_external_data_for_tensor(proto, base_dir)
    return numpy_helper.to_array(proto)


def array_to_tensor(array: np.ndarray, name: str = "") -> onnx.TensorProto:
    """A `TensorProto` holding `array` (raw little-endian bytes; strings in `string_data`)."""
    array = np.asarray(array)
    if array.dtype.kind in "OUS":
        proto = onnx.TensorProto()
        proto.name = name
        proto.data_type = onnx.TensorProto.STRING
        proto.dims.extend(array.shape)
        proto.string_data.extend(
            s if isinstance(s, bytes) else str(s).encode() for s in array.reshape(-1).tolist()
        )
        return proto
    return numpy_helper.from_array(array, name)


def _copy(proto: Any) -> Any:
    clone = type(proto)()
    clone.CopyFrom(proto)
    return clone


# ----- attributes --------------------------------------------------------------------------------

GraphFromProto = Callable[[onnx.GraphProto], Graph]
GraphToProto = Callable[[Graph], onnx.GraphProto]


def attribute_from_proto(proto: onnx.AttributeProto, graph_from_proto: GraphFromProto) -> Attribute:
    kind = AttrKind(proto.type)
    if proto.ref_attr_name:
        return Attribute(kind, None, ref=proto.ref_attr_name, doc_string=proto.doc_string)
    value: Any
    if kind is AttrKind.FLOAT:
        value = float(proto.f)
    elif kind is AttrKind.INT:
        value = int(proto.i)
    elif kind is AttrKind.STRING:
        value = bytes(proto.s)
    elif kind is AttrKind.TENSOR:
        value = tensor_to_array(proto.t)
    elif kind is AttrKind.GRAPH:
        value = graph_from_proto(proto.g)
    elif kind is AttrKind.FLOATS:
        value = [float(v) for v in proto.floats]
    elif kind is AttrKind.INTS:
        value = [int(v) for v in proto.ints]
    elif kind is AttrKind.STRINGS:
        value = [bytes(v) for v in proto.strings]
    elif kind is AttrKind.TENSORS:
        value = [tensor_to_array(t) for t in proto.tensors]
    elif kind is AttrKind.GRAPHS:
        value = [graph_from_proto(g) for g in proto.graphs]
    elif kind is AttrKind.SPARSE_TENSOR:
        value = _copy(proto.sparse_tensor)
    elif kind is AttrKind.SPARSE_TENSORS:
        value = [_copy(t) for t in proto.sparse_tensors]
    elif kind is AttrKind.TYPE_PROTO:
        value = type_from_proto(proto.tp)
    else:  # TYPE_PROTOS
        value = [type_from_proto(t) for t in proto.type_protos]
    return Attribute(kind, value, doc_string=proto.doc_string)


def attribute_to_proto(
    name: str, a: Attribute, graph_to_proto: GraphToProto
) -> onnx.AttributeProto:
    proto = onnx.AttributeProto()
    proto.name = name
    proto.type = int(a.kind)  # type: ignore[assignment]  # protobuf enums are ints
    if a.doc_string:
        proto.doc_string = a.doc_string
    if a.ref is not None:
        proto.ref_attr_name = a.ref
        return proto
    kind, value = a.kind, a.value
    if kind is AttrKind.FLOAT:
        proto.f = value
    elif kind is AttrKind.INT:
        proto.i = value
    elif kind is AttrKind.STRING:
        proto.s = value
    elif kind is AttrKind.TENSOR:
        proto.t.CopyFrom(array_to_tensor(value))
    elif kind is AttrKind.GRAPH:
        proto.g.CopyFrom(graph_to_proto(value))
    elif kind is AttrKind.FLOATS:
        proto.floats.extend(value)
    elif kind is AttrKind.INTS:
        proto.ints.extend(value)
    elif kind is AttrKind.STRINGS:
        proto.strings.extend(value)
    elif kind is AttrKind.TENSORS:
        proto.tensors.extend(array_to_tensor(v) for v in value)
    elif kind is AttrKind.GRAPHS:
        proto.graphs.extend(graph_to_proto(g) for g in value)
    elif kind is AttrKind.SPARSE_TENSOR:
        proto.sparse_tensor.CopyFrom(value)
    elif kind is AttrKind.SPARSE_TENSORS:
        proto.sparse_tensors.extend(value)
    elif kind is AttrKind.TYPE_PROTO:
        proto.tp.CopyFrom(type_to_proto(value))
    else:  # TYPE_PROTOS
        proto.type_protos.extend(type_to_proto(t) for t in value)
    return proto


def node_to_proto(
    node: Node,
    graph_to_proto: GraphToProto,
    name_of: Callable[[Value], str] = lambda v: v.name or "",
) -> onnx.NodeProto:
    """A `NodeProto` for `node`; omitted optional inputs/outputs become empty names."""
    proto = onnx.NodeProto()
    proto.op_type = node.op_type
    if node.domain:
        proto.domain = node.domain
    if node.name:
        proto.name = node.name
    if node.overload:
        proto.overload = node.overload
    if node.doc_string:
        proto.doc_string = node.doc_string
    proto.input.extend("" if v is None else name_of(v) for v in node.inputs)
    proto.output.extend(name_of(v) if v.is_used or v.name else "" for v in node.outputs)
    for attr_name, a in node.attrs.items():
        proto.attribute.append(attribute_to_proto(attr_name, a, graph_to_proto))
    for key, val in node.metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, val
    if node.device:
        entry = proto.metadata_props.add()
        entry.key, entry.value = "graphopt.device", node.device
    return proto
