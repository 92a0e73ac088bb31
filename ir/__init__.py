"""The SSA IR: types, values, nodes, graphs, models, builder, errors and the text form."""

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
from graphopt.ir.parser import parse_graph, parse_model
from graphopt.ir.printer import format_type, print_graph, print_model
from graphopt.ir.types import DType, MapType, OptionalType, SequenceType, TensorType, Type

__all__ = [
    "Attribute", "AttrKind", "Builder", "DType", "Graph", "GraphoptError", "InvalidGraphError",
    "MapType", "Model", "ModelLoadError", "Node", "OptionalType", "SaveError", "SequenceType",
    "TensorType", "TextParseError", "Type", "UnsupportedOpError", "Value", "attr", "format_type",
    "parse_graph", "parse_model", "print_graph", "print_model",
]  # fmt: skip
