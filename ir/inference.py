"""Type and shape inference for single nodes, driven by the op registry.

`infer_node` gathers what is known about a node's inputs (types, and the values of small constant
inputs, which resolve data-dependent shapes such as Reshape's) and asks the op's registry entry. The
verifier compares the result with the types the graph declares (`type_conflict`), and the
`infer-shapes` pass fills in what the graph leaves unknown (`merge_types`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from graphopt.ir.core import Node, Value
from graphopt.ir.registry import REGISTRY, InferenceInputs
from graphopt.ir.types import Dim, MapType, OptionalType, SequenceType, TensorType, Type

CONSTANT_LIMIT = 4096  # elements: bigger constants are weights, which no shape depends on


def constant_value(value: Value | None, limit: int = CONSTANT_LIMIT) -> np.ndarray | None:
    """The array a value always holds, if it is a small constant (an initializer that is not an
    overridable input, or the output of a `Constant` node with a tensor `value`)."""
    if value is None:
        return None
    array = value.const_value if value.is_constant else None
    producer = value.producer
    if array is None and producer is not None and producer.op == "Constant":
        array = _constant_attribute(producer)
    if isinstance(array, np.ndarray) and array.size <= limit:
        return array
    return None


_CONSTANT_FORMS = {
    "value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
    "value_ints": np.int64,
}  # fmt: skip


def _constant_attribute(node: Node) -> np.ndarray | None:
    """The tensor a Constant node holds, from whichever `value*` attribute it uses."""
    value = node.get_attr("value")
    if isinstance(value, np.ndarray):
        return value
    for name, dtype in _CONSTANT_FORMS.items():
        if name in node.attrs:
            return np.asarray(node.get_attr(name), dtype=dtype)
    return None


def infer_node(
    node: Node, opset_imports: Mapping[str, int], *, check: bool = True
) -> list[Type | None]:
    """The output types of `node` as its op's rules give them (None where unknown).

    Raises `InvalidGraphError` naming the node when the inputs break the op's typing rules
    (`check=False` skips the type-constraint check, for nodes already verified)."""
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    opset = opset_imports.get(domain, opset_imports.get("ai.onnx") if not domain else None)
    entry = REGISTRY.lookup(node.op, opset)
    if entry is None or entry.infer is None:
        return [None] * len(node.outputs)
    types = [v.type if v is not None else None for v in node.inputs]
    if check and entry.schema is not None:
        from graphopt.ir.ops.onnx_inference import check_type_constraints

        check_type_constraints(entry.schema, node, types)
    inputs = InferenceInputs(
        types,
        lambda: [constant_value(v) for v in node.inputs],
        opset_imports,
    )
    return entry.infer(node, inputs)


def check_input_types(node: Node, opset_imports: Mapping[str, int]) -> None:
    """Raise `InvalidGraphError` naming `node` if its input element types break its op's type
    constraints (Add of f32 and i64). Much cheaper than `infer_node`."""
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    opset = opset_imports.get(domain, opset_imports.get("ai.onnx") if not domain else None)
    entry = REGISTRY.lookup(node.op, opset)
    if entry is not None and entry.schema is not None:
        from graphopt.ir.ops.onnx_inference import check_type_constraints

        check_type_constraints(
            entry.schema, node, [v.type if v is not None else None for v in node.inputs]
        )


def type_conflict(declared: Type | None, inferred: Type | None) -> str | None:
    """Why two types cannot describe the same value (None when they can). Unknown parts and
    symbolic dims never conflict: only element types, kinds, ranks and static dims do."""
    if declared is None or inferred is None:
        return None
    if type(declared) is not type(inferred):
        return f"declared {declared}, but the op gives {inferred}"
    if isinstance(declared, TensorType) and isinstance(inferred, TensorType):
        if declared.dtype != inferred.dtype:
            return f"declared {declared}, but the op gives {inferred.dtype.short_name}"
        if declared.shape is None or inferred.shape is None:
            return None
        if len(declared.shape) != len(inferred.shape):
            return f"declared {declared}, but the op gives rank {len(inferred.shape)} ({inferred})"
        for axis, (a, b) in enumerate(zip(declared.shape, inferred.shape, strict=True)):
            if isinstance(a, int) and isinstance(b, int) and a != b:
                return f"declared {declared}, but the op gives {inferred} (axis {axis})"
        return None
    if isinstance(declared, (SequenceType, OptionalType)):
        return type_conflict(declared.elem, inferred.elem)  # type: ignore[union-attr]
    if isinstance(declared, MapType) and isinstance(inferred, MapType):
        if declared.key != inferred.key:
            return f"declared {declared}, but the op gives {inferred}"
        return type_conflict(declared.value, inferred.value)
    return None


def merge_types(declared: Type | None, inferred: Type | None) -> Type | None:
    """The most precise type consistent with both (call only when `type_conflict` is None):
    static dims beat symbolic ones, known beats unknown."""
    if declared is None:
        return inferred
    if inferred is None:
        return declared
    if isinstance(declared, TensorType) and isinstance(inferred, TensorType):
        if declared.shape is None:
            return inferred
        if inferred.shape is None:
            return declared
        return declared.with_shape(
            tuple(_merge_dim(a, b) for a, b in zip(declared.shape, inferred.shape, strict=True))
        )
    if isinstance(declared, SequenceType) and isinstance(inferred, SequenceType):
        return SequenceType(merge_types(declared.elem, inferred.elem))
    if isinstance(declared, OptionalType) and isinstance(inferred, OptionalType):
        return OptionalType(merge_types(declared.elem, inferred.elem))
    return declared


def _merge_dim(a: Dim, b: Dim) -> Dim:
    if isinstance(a, int):
        return a
    if isinstance(b, int):
        return b
    return a if a is not None else b


__all__ = ["constant_value", "infer_node", "merge_types", "type_conflict"]
