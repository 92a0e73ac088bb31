"""The IR text printer: `print_model`, `print_graph` and `format_type` (spec: docs/ir-text.md).

What: one line per node, a type on every definition, small constants inline, bigger ones as base64
of their raw bytes, subgraphs nested in their node's attributes. `graphopt.ir.parser` reads the
text back, and printing the parsed model gives the same text byte for byte.

Why it is shaped this way: the text is what people read (`graphopt show`, `--dump-ir`) and what
tests write, so it must be deterministic and exact (floats print as the shortest text that reads
back to the same value of their dtype), and printing a 100k-node model must stay linear: the
printer appends fragments to one list and joins it once. Names are made unique over the whole
model in two passes (every value first claims its own name, then unnamed or clashing values get
fresh `name_N` names), so a printed name always means one value and the parser never has to guess.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from graphopt.ir.core import Attribute, AttrKind, Graph, Model, Node, Value, split_op
from graphopt.ir.types import (
    DType,
    MapType,
    OptionalType,
    SequenceType,
    TensorType,
    Type,
    tensor_type_of,
)

__all__ = [
    "print_model", "print_graph", "format_type", "format_float", "quote", "quote_bytes",
    "value_ref", "INLINE_LIMIT", "KIND_WORDS", "OP_KEYWORDS",
]  # fmt: skip

INLINE_LIMIT = 16  # tensors with at most this many elements print their values inline
INDENT = "  "

BARE_NAME = re.compile(r"[A-Za-z0-9_./-]+")  # value and graph names, after % or @
BARE_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")  # attribute names
BARE_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # symbolic dims
BARE_OP = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
OP_KEYWORDS = frozenset({"const", "default", "return", "_"})  # ops named so print quoted
_PLAIN_STR = re.compile(r'[^"\\\x00-\x1f\x7f\udc80-\udcff]*')
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t"}

KIND_WORDS = {
    AttrKind.INT: "int", AttrKind.FLOAT: "float", AttrKind.STRING: "string",
    AttrKind.TENSOR: "tensor", AttrKind.GRAPH: "graph", AttrKind.INTS: "ints",
    AttrKind.FLOATS: "floats", AttrKind.STRINGS: "strings", AttrKind.TENSORS: "tensors",
    AttrKind.GRAPHS: "graphs", AttrKind.TYPE_PROTO: "type", AttrKind.TYPE_PROTOS: "types",
    AttrKind.SPARSE_TENSOR: "sparse", AttrKind.SPARSE_TENSORS: "sparses",
}  # fmt: skip
_EMPTY_LISTS = {
    AttrKind.INTS: "ints[]", AttrKind.FLOATS: "floats[]", AttrKind.STRINGS: "strings[]",
    AttrKind.TENSORS: "tensors[]", AttrKind.GRAPHS: "graphs[]", AttrKind.TYPE_PROTOS: "types[]",
    AttrKind.SPARSE_TENSORS: "sparse[]",
}  # fmt: skip
_NATIVE_FLOATS: dict[DType, Any] = {
    DType.FLOAT16: np.float16, DType.FLOAT: np.float32, DType.DOUBLE: np.float64,
}  # fmt: skip
_DEFAULT_PRODUCER = next(f.default for f in dataclasses.fields(Model) if f.name == "producer_name")
INLINE_FLOATS = frozenset({DType.FLOAT16, DType.BFLOAT16, DType.FLOAT, DType.DOUBLE})


# ----- public entry points -----------------------------------------------------------------------


def print_model(model: Model, *, elide_large: bool = False) -> str:
    """The text form of `model`: header, metadata, functions and the main graph.

    With `elide_large=True`, tensors of more than 16 elements print as their size (`<1.50 MiB>`);
    that text is for reading only and does not parse.
    """
    printer = _Printer(elide_large)
    printer.assign_names(model.graph)
    write = printer.out.append
    write(_header(model))
    if model.metadata:
        write(f"\nmetadata {_str_dict(model.metadata)}")
    for function in model.functions:
        write(f"\nfunction {_b64(function.SerializeToString(deterministic=True))}")
    write("\n")
    printer.write_graph(model.graph, "")
    write("\n")
    return "".join(printer.out)


def print_graph(graph: Graph, *, elide_large: bool = False) -> str:
    """The text form of one graph (a `graph @name(...) {...}` block, no model header)."""
    printer = _Printer(elide_large)
    printer.assign_names(graph)
    printer.write_graph(graph, "")
    printer.out.append("\n")
    return "".join(printer.out)


def format_type(t: Type | None) -> str:
    """`f32[batch,128]`, `i64[]`, `f32[*]`, `seq<f32[2]>`, `opt<?>`, `map<i64, f32[]>`; `?` for None."""
    if t is None:
        return "?"
    if isinstance(t, TensorType):
        name = DType(t.dtype).short_name
        if t.shape is None:
            return f"{name}[*]"
        return f"{name}[{','.join(_dim(d) for d in t.shape)}]"
    if isinstance(t, SequenceType):
        return f"seq<{format_type(t.elem)}>"
    if isinstance(t, OptionalType):
        return f"opt<{format_type(t.elem)}>"
    if isinstance(t, MapType):
        return f"map<{DType(t.key).short_name}, {format_type(t.value)}>"
    raise TypeError(f"not an IR type: {t!r}")


def _dim(d: int | str | None) -> str:
    if d is None:
        return "?"
    if isinstance(d, str):
        return d if BARE_SYMBOL.fullmatch(d) else quote(d)
    return str(int(d))


# ----- scalars and strings -----------------------------------------------------------------------


def quote(text: str) -> str:
    """`text` as a double-quoted STR: `\\"`, `\\\\`, `\\n`, `\\t`, and `\\xNN` for other control
    characters and for the undecodable bytes that `surrogateescape` carries."""
    if _PLAIN_STR.fullmatch(text):
        return f'"{text}"'
    parts = ['"']
    for ch in text:
        escaped = _ESCAPES.get(ch)
        if escaped is not None:
            parts.append(escaped)
            continue
        code = ord(ch)
        if code < 0x20 or code == 0x7F:
            parts.append(f"\\x{code:02x}")
        elif 0xDC80 <= code <= 0xDCFF:
            parts.append(f"\\x{code - 0xDC00:02x}")
        else:
            parts.append(ch)
    parts.append('"')
    return "".join(parts)


def quote_bytes(data: bytes | str) -> str:
    """Bytes as a STR: UTF-8 text as is, bytes that are not UTF-8 as `\\xNN`."""
    if isinstance(data, str):
        return quote(data)
    return quote(bytes(data).decode("utf-8", "surrogateescape"))


def value_ref(name: str) -> str:
    """`%name`, quoted when the name is not made of `[A-Za-z0-9_.-/]`."""
    return "%" + (name if BARE_NAME.fullmatch(name) else quote(name))


def _global_ref(name: str) -> str:
    return "@" + (name if BARE_NAME.fullmatch(name) else quote(name))


def _ident(name: str) -> str:
    return name if BARE_IDENT.fullmatch(name) else quote(name)


def format_float(value: Any, dtype: DType = DType.FLOAT) -> str:
    """The shortest text that reads back to the same `dtype` value, always with a `.` or an
    exponent (`1.0`, `0.5`, `1e-05`), or `inf`, `-inf`, `nan`."""
    native = _NATIVE_FLOATS.get(dtype)
    with np.errstate(over="ignore"):
        x = native(value) if native is not None else float(value)
    f = float(x)
    if math.isnan(f):
        return "nan"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    if native is not None:
        return _styled(x)  # type: ignore[arg-type]  # a numpy float here
    cast = dtype.numpy.type  # bf16 and other ml_dtypes floats: numpy's Dragon4 does not take them
    for digits in range(1, 18):
        candidate = float(f"{f:.{digits}g}")
        if float(cast(candidate)) == f:
            return _styled(np.float64(candidate))
    return _styled(np.float64(f))


def _styled(x: np.floating) -> str:
    magnitude = abs(float(x))
    if magnitude == 0.0 or 1e-4 <= magnitude < 1e16:
        return np.format_float_positional(x, unique=True, trim="0")
    return np.format_float_scientific(x, unique=True, trim="-")


def _b64(data: bytes) -> str:
    return 'b64"' + base64.b64encode(data).decode("ascii") + '"'


def _str_dict(items: dict[str, str]) -> str:
    return "{" + ", ".join(f"{quote(k)}: {quote(v)}" for k, v in items.items()) + "}"


def _int_dict(items: dict[str, int]) -> str:
    return "{" + ", ".join(f"{quote(k)}: {int(v)}" for k, v in items.items()) + "}"


def _human_size(nbytes: int) -> str:
    if nbytes < 1024:
        return f"{nbytes} B"
    size, unit = nbytes / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.2f} {unit}"


def _header(model: Model) -> str:
    parts = [
        "model",
        f"ir_version={int(model.ir_version)}",
        f"opset={_int_dict(model.opset_imports)}",
    ]
    if model.producer_name != _DEFAULT_PRODUCER or model.producer_version:
        producer = f"producer={quote(model.producer_name)}"
        if model.producer_version:
            producer += f" {quote(model.producer_version)}"
        parts.append(producer)
    if model.domain:
        parts.append(f"domain={quote(model.domain)}")
    if model.model_version:
        parts.append(f"model_version={int(model.model_version)}")
    if model.doc_string:
        parts.append(f"doc={quote(model.doc_string)}")
    return " ".join(parts)


def op_text(node: Node) -> str:
    """`MatMul`, `com.microsoft.Gelu`; `"dom"."Op"` when the op does not print bare."""
    op = node.op
    if (
        BARE_OP.fullmatch(op)
        and op not in OP_KEYWORDS
        and split_op(op) == (node.domain, node.op_type)
    ):
        return op
    if not node.domain:
        return quote(node.op_type)
    return f"{quote(node.domain)}.{quote(node.op_type)}"


# ----- tensors -----------------------------------------------------------------------------------


def _inline_items(array: np.ndarray, dtype: DType) -> list[str]:
    flat = array.reshape(-1)
    if dtype is DType.BOOL:
        return ["true" if v else "false" for v in flat.tolist()]
    if dtype.is_integer:
        if flat.dtype.kind not in "iu":  # ml_dtypes int4/uint4/int2/uint2
            flat = flat.astype(np.int16)
        return [str(int(v)) for v in flat.tolist()]
    if dtype in _NATIVE_FLOATS:
        return [_float_item(x) for x in flat]
    return [format_float(v, dtype) for v in flat.astype(np.float32).tolist()]


def _float_item(x: np.floating) -> str:
    if np.isfinite(x):
        return _styled(x)
    return "nan" if np.isnan(x) else ("inf" if x > 0 else "-inf")


def _as_bytes(item: Any) -> bytes:
    return bytes(item) if isinstance(item, (bytes, np.bytes_)) else str(item).encode()


def _string_item(item: Any) -> str:
    if isinstance(item, (bytes, np.bytes_)):
        return quote_bytes(bytes(item))
    return quote(str(item))


# ----- the printer -------------------------------------------------------------------------------


class _Printer:
    def __init__(self, elide_large: bool):
        self.elide_large = elide_large
        self.out: list[str] = []
        self.refs: dict[Value, str] = {}  # value -> "%name" (or "_" for an omitted output)
        self.claimed: set[str] = set()
        self.counters: dict[str, int] = {}
        self.types: dict[Type, str] = {}

    # ----- names -------------------------------------------------------------------------------
    def assign_names(self, graph: Graph) -> None:
        """Every value keeps its own name unless an earlier value (in text order) took it; those
        and unnamed values get fresh names once all own names are known."""
        pending: list[Value] = []
        refs, claimed = self.refs, self.claimed
        for value in _defined_values(graph):
            if value in refs:
                continue
            name = value.name
            if name == "" and value.producer is not None and not value.is_used:
                refs[value] = "_"
            elif name and name not in claimed:
                claimed.add(name)
                refs[value] = value_ref(name)
            else:
                refs[value] = ""
                pending.append(value)
        for value in pending:
            refs[value] = value_ref(self._fresh(value.name or "v"))

    def _fresh(self, hint: str) -> str:
        k = self.counters.get(hint, 0)
        while True:
            k += 1
            name = f"{hint}_{k}"
            if name not in self.claimed:
                break
        self.counters[hint] = k
        self.claimed.add(name)
        return name

    def ref(self, value: Value) -> str:
        text = self.refs.get(value)
        if text is None or text == "_":  # defined outside the printed graph, or used after all
            name = value.name
            if name and name not in self.claimed:
                self.claimed.add(name)
            else:
                name = self._fresh(name or "v")
            text = self.refs[value] = value_ref(name)
        return text

    def type_text(self, t: Type) -> str:
        text = self.types.get(t)
        if text is None:
            text = self.types[t] = format_type(t)
        return text

    # ----- graphs and nodes --------------------------------------------------------------------
    def write_graph(self, graph: Graph, indent: str) -> None:
        write = self.out.append
        params = []
        for value in graph.inputs:
            ref = self.ref(value)
            params.append(ref if value.type is None else f"{ref}: {self.type_text(value.type)}")
        write(f"graph {_global_ref(graph.name)}({', '.join(params)})")
        if graph.doc_string:
            write(f" doc={quote(graph.doc_string)}")
        if graph.metadata:
            write(f" meta={_str_dict(graph.metadata)}")
        write(" {\n")
        inner = indent + INDENT
        for value in graph.initializers.values():
            array = np.asarray(value.const_value)
            if value.is_graph_input and value.graph is graph:
                write(f"{inner}default {self.ref(value)} = {self.typed_literal(array)}\n")
            else:
                t = self.type_text(tensor_type_of(array))
                write(f"{inner}{self.ref(value)}: {t} = const {self.literal(array)}\n")
        for node in graph:
            write(inner)
            self.write_node(node, inner)
            write("\n")
        outputs = []
        names = graph.output_names
        for i, value in enumerate(graph.outputs):
            ref = self.ref(value)
            wanted = value_ref(names[i] if i < len(names) else "")
            outputs.append(ref if wanted == ref else f"{ref} as {wanted}")
        write(f"{inner}return {', '.join(outputs)}\n" if outputs else f"{inner}return\n")
        write(f"{indent}}}")

    def write_node(self, node: Node, indent: str) -> None:
        write = self.out.append
        if node.outputs:
            results = []
            for value in node.outputs:
                ref = self.refs.get(value) or self.ref(value)
                if ref != "_" and value.type is not None:
                    ref = f"{ref}: {self.type_text(value.type)}"
                results.append(ref)
            write(", ".join(results))
            write(" = ")
        args = ", ".join("_" if v is None else self.ref(v) for v in node.inputs)
        write(f"{op_text(node)}({args})")
        if node.attrs:
            write(" {")
            for i, (name, attribute) in enumerate(node.attrs.items()):
                write(f"{', ' if i else ''}{_ident(name)} = ")
                self.write_attr(attribute, indent)
            write("}")
        if node.name:
            write(f" name={quote(node.name)}")
        if node.device:
            write(f" device={quote(node.device)}")
        if node.overload:
            write(f" overload={quote(node.overload)}")
        if node.doc_string:
            write(f" doc={quote(node.doc_string)}")
        if node.metadata:
            write(f" meta={_str_dict(node.metadata)}")

    def write_attr(self, a: Attribute, indent: str) -> None:
        write = self.out.append
        kind, value = AttrKind(a.kind), a.value
        if a.ref is not None:
            write(f"ref {KIND_WORDS[kind]} {quote(a.ref)}")
        elif kind is AttrKind.INT:
            write(str(int(value)))
        elif kind is AttrKind.FLOAT:
            write(format_float(value))
        elif kind is AttrKind.STRING:
            write(quote_bytes(value))
        elif kind is AttrKind.TENSOR:
            write(f"tensor {self.typed_literal(np.asarray(value))}")
        elif kind is AttrKind.GRAPH:
            self.write_graph(value, indent)
        elif kind is AttrKind.TYPE_PROTO:
            write(f"type {format_type(value)}")
        elif kind is AttrKind.SPARSE_TENSOR:
            write(f"sparse {_b64(value.SerializeToString(deterministic=True))}")
        elif not value:
            write(_EMPTY_LISTS[kind])
        elif kind is AttrKind.GRAPHS:
            write("[")
            for i, graph in enumerate(value):
                write(", " if i else "")
                self.write_graph(graph, indent)
            write("]")
        else:
            write(f"[{', '.join(self._list_item(kind, v) for v in value)}]")

    def _list_item(self, kind: AttrKind, item: Any) -> str:
        if kind is AttrKind.INTS:
            return str(int(item))
        if kind is AttrKind.FLOATS:
            return format_float(item)
        if kind is AttrKind.STRINGS:
            return quote_bytes(item)
        if kind is AttrKind.TENSORS:
            return f"tensor {self.typed_literal(np.asarray(item))}"
        if kind is AttrKind.TYPE_PROTOS:
            return f"type {format_type(item)}"
        return f"sparse {_b64(item.SerializeToString(deterministic=True))}"  # SPARSE_TENSORS

    # ----- literals ----------------------------------------------------------------------------
    def typed_literal(self, array: np.ndarray) -> str:
        return f"{self.type_text(tensor_type_of(array))} {self.literal(array)}"

    def literal(self, array: np.ndarray) -> str:
        dtype = DType.from_numpy(array.dtype)
        size = array.size
        if self.elide_large and size > INLINE_LIMIT:
            if dtype is DType.STRING:
                nbytes = sum(len(_as_bytes(s)) for s in array.reshape(-1).tolist())
            else:
                nbytes = array.nbytes
            return f"<{_human_size(nbytes)}>"
        if dtype is DType.STRING:
            items = [_string_item(s) for s in array.reshape(-1).tolist()]
        elif size <= INLINE_LIMIT and (
            dtype is DType.BOOL or dtype.is_integer or dtype in INLINE_FLOATS
        ):
            items = _inline_items(array, dtype)
        else:
            return _b64(np.ascontiguousarray(array).tobytes())
        if array.ndim == 0:
            return items[0]
        return "[" + ", ".join(items) + "]"


def _defined_values(graph: Graph) -> Iterator[Value]:
    """Every value `graph` and its subgraphs define, in the order the text shows them."""
    yield from graph.inputs
    for value in graph.initializers.values():
        if not (value.is_graph_input and value.graph is graph):
            yield value
    for node in graph:
        yield from node.outputs
        for sub in node.subgraphs():
            yield from _defined_values(sub)
