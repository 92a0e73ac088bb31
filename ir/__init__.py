"""The SSA IR: types, values, nodes, graphs, models, builder and errors."""

from graphopt.ir.builder import Builder
from graphopt.ir.core import Attribute, AttrKind, Graph, Model, Node, Value, attr
from graphopt.ir.errors import (
    GraphoptError,
    InvalidGraphError,
    ModelLoadError,
    SaveError,
    TextParseError,
    UnsupportedOpError,
)
from graphopt.ir.types import DType, MapType, OptionalType, SequenceType, TensorType, Type

__all__ = [
    "Attribute", "AttrKind", "Builder", "DType", "Graph", "GraphoptError", "InvalidGraphError",
    "MapType", "Model", "ModelLoadError", "Node", "OptionalType", "SaveError", "SequenceType",
    "TensorType", "TextParseError", "Type", "UnsupportedOpError", "Value", "attr",
]  # fmt: skip
