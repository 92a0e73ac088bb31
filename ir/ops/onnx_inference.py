"""Default type and shape inference for standard ONNX ops: ONNX's own, one node at a time.

ONNX's C++ inference functions implement each op's typing rules (broadcasting, type constraints,
attribute-dependent shapes) and propagate symbolic dims (`batch` stays `batch` through Add and
MatMul). Given the values of small constant inputs it also resolves data-dependent shapes such as
Reshape's. A type error it finds (Add of float and int64, a MatMul whose inner dims differ) is the
user's error: it becomes an `InvalidGraphError` naming the node.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import onnx
import onnx.shape_inference
from onnx import helper

from graphopt.ir.core import Node
from graphopt.ir.errors import InvalidGraphError
from graphopt.ir.onnx_protos import array_to_tensor, node_to_proto, type_from_proto, type_to_proto
from graphopt.ir.ops.shape_rules import RULES
from graphopt.ir.registry import REGISTRY, InferenceInputs, OpEntry
from graphopt.ir.types import DType, OptionalType, SequenceType, TensorType, Type


def onnx_infer(schema: Any, node: Node, inputs: InferenceInputs) -> list[Type | None]:
    """Output types of `node` by ONNX's inference for `schema` (None where it cannot tell)."""
    unknown: list[Type | None] = [None] * len(node.outputs)
    if node.subgraphs():
        return unknown  # bodies need whole-graph inference; types stay as declared
    proto = node_to_proto(node, _no_subgraph)
    del proto.input[:]
    proto.input.extend(f"x{i}" if v is not None else "" for i, v in enumerate(node.inputs))
    del proto.output[:]
    proto.output.extend(f"y{i}" for i in range(len(node.outputs)))
    proto.ClearField("metadata_props")
    types = {}
    data = {}
    for i, (t, const) in enumerate(zip(inputs.types, inputs.constants, strict=True)):
        if t is not None:
            types[f"x{i}"] = type_to_proto(t)
        if isinstance(const, np.ndarray):
            data[f"x{i}"] = array_to_tensor(const)
    opsets = [helper.make_opsetid(d, v) for d, v in inputs.opset_imports.items()]
    try:
        out = onnx.shape_inference.infer_node_outputs(schema, proto, types, data, None, opsets)
    except onnx.shape_inference.InferenceError as error:
        raise InvalidGraphError(
            f"{node.describe()}: {_clean(error)}",
            hint="the node's input types or attributes break the op's rules; fix the producer "
            "of the offending input or the attribute",
        ) from None
    except Exception:  # onnx fails on a few ops it cannot infer node by node: types stay unknown
        return unknown
    return [type_from_proto(out[f"y{i}"]) if f"y{i}" in out else None for i in range(len(unknown))]


def check_type_constraints(schema: Any, node: Node, types: list[Type | None]) -> None:
    """Inputs bound to one type parameter (`T` of Add) must share a type the schema allows.

    ONNX's node-level inference does not check this (only its whole-model checker does), and a
    model that breaks it fails later in every runtime, so the verifier checks it here."""
    formals = _formals(schema)
    if not formals:
        return
    bound: dict[str, tuple[str, int]] = {}
    for index, t in enumerate(types):
        param, allowed, variadic, homogeneous = formals[min(index, len(formals) - 1)]
        if index >= len(formals) and not variadic:
            break
        text = type_string(t)
        if text is None or node.inputs[index] is None:
            continue
        if allowed is not None and text not in allowed:
            raise InvalidGraphError(
                f"{node.describe()}: input {index} (%{node.inputs[index].name}) is {t}, which "  # type: ignore[union-attr]
                f"{node.op_type} does not accept for {param}",
                hint=f"{param} allows {', '.join(sorted(allowed))}; insert a Cast",
            )
        if allowed is not None and homogeneous:
            first = bound.setdefault(param, (text, index))
            if first[0] != text:
                first_value = node.inputs[first[1]]
                raise InvalidGraphError(
                    f"{node.describe()}: input {index} (%{node.inputs[index].name}) is {t}, but "  # type: ignore[union-attr]
                    f"input {first[1]} (%{first_value.name if first_value else '?'}) is "
                    f"{types[first[1]]}: both are {param}, which must be one type",
                    hint="insert a Cast so that both inputs have the same element type",
                )


@functools.lru_cache(maxsize=2048)
def _formals_of(name: str, domain: str, version: int) -> list[tuple[str, Any, bool, bool]]:
    schema = onnx.defs.get_schema(name, version, domain)
    constraints = {
        c.type_param_str: frozenset(c.allowed_type_strs) for c in schema.type_constraints
    }
    table = []
    for formal in schema.inputs:
        variadic = formal.option == _VARIADIC
        table.append(
            (formal.type_str, constraints.get(formal.type_str), variadic,
             not variadic or formal.is_homogeneous)
        )  # fmt: skip
    return table


def _formals(schema: Any) -> list[tuple[str, Any, bool, bool]]:
    """Per formal input: type parameter, allowed type strings, variadic, homogeneous (cached)."""
    return _formals_of(schema.name, schema.domain, schema.since_version)


@functools.lru_cache(maxsize=256)
def _type_string(t: Type) -> str | None:
    if isinstance(t, TensorType):
        return f"tensor({t.dtype.name.lower()})"
    if isinstance(t, SequenceType):
        inner = type_string(t.elem)
        return None if inner is None else f"seq({inner})"
    if isinstance(t, OptionalType):
        inner = type_string(t.elem)
        return None if inner is None else f"optional({inner})"
    return None


_TENSOR_STRINGS = {dtype: f"tensor({dtype.name.lower()})" for dtype in DType}


def type_string(t: Type | None) -> str | None:
    """ONNX's spelling of a type in schemas: `tensor(float)`, `seq(tensor(int64))` ..."""
    if isinstance(t, TensorType):  # the element type decides
        return _TENSOR_STRINGS[t.dtype]
    return None if t is None else _type_string(t)


_VARIADIC = onnx.defs.OpSchema.FormalParameterOption.Variadic


def _clean(error: BaseException) -> str:
    text = str(error).strip().replace("\n", " ")
    if text.startswith("[") and "] " in text:  # "[ShapeInferenceError] (op_type:Add, node name: )"
        text = text.split("] ", 1)[1]
    return text[:400]


def _no_subgraph(graph: Any) -> onnx.GraphProto:
    raise AssertionError("nodes with subgraphs are not inferred node by node")


def standard_infer(schema: Any, node: Node, inputs: InferenceInputs) -> list[Type | None]:
    """Inference for a standard op: graphopt's fast rule for the op if it has one and it
    decides, else ONNX's own inference. (`infer_node` checks type constraints first.)"""
    fast = RULES.get(node.op_type)
    if fast is not None:
        result = fast(node, inputs)
        if result is not None:
            return result
    return onnx_infer(schema, node, inputs)


def _fill(entry: OpEntry) -> None:
    if entry.infer is None and entry.schema is not None and entry.domain == "":
        entry.infer = functools.partial(standard_infer, entry.schema)
    elif entry.infer is None and entry.schema is not None:
        entry.infer = functools.partial(onnx_infer, entry.schema)


REGISTRY.add_defaults(_fill)
