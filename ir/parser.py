"""The IR text parser: `parse_model` and `parse_graph` read the form `graphopt.ir.printer` writes.

What: a hand-written tokenizer and a recursive-descent parser for the grammar in docs/ir-text.md.
The IR is built only through its own methods (`Graph.add_input`, `add_initializer`,
`set_input_default`, `append(Node(...))`, `set_outputs`, `Node.set_input`), so use lists and name
scopes are exactly what they would be for a graph built in Python; subgraphs are made with
`outer.subgraph(name)` and share the model's name scope.

Why it is shaped this way: tests and people write this text, so mistakes come back as a
`TextParseError` whose `where` is `line:column` and whose message says what was expected where
("expected ')' after the inputs of MatMul"). Scoping is lexical: a name resolves to the innermost
enclosing graph that defines it, wherever in that graph the definition is, so out-of-order text
parses. A read of a name not defined yet gets a placeholder that is resolved when its graph ends
(the graph is then sorted topologically if a read came before its definition); only a name that
no enclosing graph defines is an error.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from graphopt.ir.core import Attribute, AttrKind, Graph, Model, Node, Value
from graphopt.ir.errors import InvalidGraphError, TextParseError
from graphopt.ir.gc_pause import paused_gc
from graphopt.ir.printer import KIND_WORDS, format_type
from graphopt.ir.types import DType, MapType, OptionalType, SequenceType, TensorType, Type

__all__ = ["parse_model", "parse_graph"]


def parse_model(text: str) -> Model:
    """A `Model` from its text form (the header, metadata and functions are optional: fields left
    out take `Model`'s defaults)."""
    with paused_gc():
        return _Parser(text).model()


def parse_graph(text: str) -> Graph:
    """A `Graph` from a single `graph @name(...) {...}` block."""
    with paused_gc():
        parser = _Parser(text)
        graph = parser.graph(None)
        parser.expect_end("after the graph")
        return graph


# ----- tokens ------------------------------------------------------------------------------------

# kinds: "value" (%name), "global" (@name), "ident", "str", "b64", "int", "float", "punct", "end"
_PUNCT = frozenset("(){}[]<>,:=*?.")
_SKIP = re.compile(r"(?:[ \t\r\n]+|#[^\n]*)*")  # blanks and comments
_BARE = re.compile(r"[A-Za-z0-9_./-]+")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|inf\b)")
_HEX2 = re.compile(r"[0-9A-Fa-f]{2}")
_STR_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}
_MODEL_FIELDS = {
    "ir_version": "ir_version", "opset": "opset_imports", "producer": "producer_name",
    "domain": "domain", "model_version": "model_version", "doc": "doc_string",
}  # fmt: skip
_NODE_OPTIONS = ("name", "device", "overload", "doc", "meta")
_EMPTY_LISTS = {
    "ints": AttrKind.INTS, "floats": AttrKind.FLOATS, "strings": AttrKind.STRINGS,
    "tensors": AttrKind.TENSORS, "graphs": AttrKind.GRAPHS, "types": AttrKind.TYPE_PROTOS,
    "sparse": AttrKind.SPARSE_TENSORS,
}  # fmt: skip
_ONE_KIND = {"tensor": AttrKind.TENSOR, "graph": AttrKind.GRAPH, "type": AttrKind.TYPE_PROTO,
             "sparse": AttrKind.SPARSE_TENSOR}  # fmt: skip
_LIST_KIND = {"tensor": AttrKind.TENSORS, "graph": AttrKind.GRAPHS, "type": AttrKind.TYPE_PROTOS,
              "sparse": AttrKind.SPARSE_TENSORS}  # fmt: skip
_KIND_BY_WORD = {word: kind for kind, word in KIND_WORDS.items()}


@dataclass(slots=True)
class _Token:
    kind: str
    value: Any  # the name or string (decoded), the number's text, the punctuation character
    start: int
    end: int
    word: str | None = None  # the value of punctuation and identifiers (what `at` compares)

    def describe(self) -> str:
        if self.kind == "end":
            return "the end of the text"
        sigil = {"value": "%", "global": "@"}.get(self.kind)
        if sigil:
            return sigil + self.value
        return {"str": "a string", "b64": 'b64"..."'}.get(self.kind) or f"'{self.value}'"

    def scalar(self) -> str | None:
        """The kind of literal scalar this token is ("int", "float", "str", "bool"), or None."""
        if self.kind in ("int", "float", "str"):
            return self.kind
        if self.kind == "ident":
            return {"inf": "float", "nan": "float", "true": "bool", "false": "bool"}.get(self.value)
        return None


def _tokenize(text: str, fail: Callable[..., NoReturn]) -> list[_Token]:
    """The tokens of `text`, then four "end" tokens (so that `peek(k)` needs no bounds check)."""
    tokens: list[_Token] = []
    add = tokens.append
    pos, n = 0, len(text)
    while pos < n:
        c = text[pos]
        if c in _PUNCT:  # the most frequent case first
            add(_Token("punct", c, pos, pos + 1, c))
            pos += 1
        elif c in " \t\r\n#":
            pos = _SKIP.match(text, pos).end()  # type: ignore[union-attr]
        elif c == "%" or c == "@":
            kind = "value" if c == "%" else "global"
            if text.startswith('"', pos + 1):
                name, end = _read_string(text, pos + 1, fail)
            elif (m := _BARE.match(text, pos + 1)) is not None:
                name, end = m.group(), m.end()
            else:
                fail(f"expected a name after '{c}'", pos + 1, 'odd names are quoted: %"a b"')
            add(_Token(kind, name, pos, end))
            pos = end
        elif c == '"':
            value, end = _read_string(text, pos, fail)
            add(_Token("str", value, pos, end))
            pos = end
        elif (c.isdigit() or c == "-") and (m := _NUMBER.match(text, pos)) is not None:
            word = m.group()
            add(_Token("float" if any(ch in word for ch in ".eEi") else "int", word, pos, m.end()))
            pos = m.end()
        elif c.isascii() and (c.isalpha() or c == "_"):
            m = _IDENT.match(text, pos)
            word, pos = m.group(), m.end()  # type: ignore[union-attr]
            if word == "b64" and text.startswith('"', pos):
                close = text.find('"', pos + 1)
                if close < 0 or 0 <= text.find("\n", pos, close):
                    fail("unterminated base64 string", pos)
                add(_Token("b64", text[pos + 1 : close], m.start(), close + 1))  # type: ignore[union-attr]
                pos = close + 1
            else:
                add(_Token("ident", word, m.start(), pos, word))  # type: ignore[union-attr]
        else:
            fail(f"unexpected character {c!r}", pos)
    tokens.extend(_Token("end", None, n, n) for _ in range(4))
    return tokens


def _read_string(text: str, pos: int, fail: Callable[..., NoReturn]) -> tuple[str, int]:
    """The decoded STR whose opening quote is at `pos`, and the offset after its closing quote.
    `\\xNN` of 0x80 and above decodes to that byte's `surrogateescape` character."""
    start = pos + 1
    close = text.find('"', start)
    if close >= 0 and text.find("\\", start, close) < 0 and text.find("\n", start, close) < 0:
        return text[start:close], close + 1
    parts: list[str] = []
    i, n = start, len(text)
    while True:
        c = text[i] if i < n else "\n"
        if c == "\n":
            fail("unterminated string", pos, 'close it with " on the same line')
        if c == '"':
            return "".join(parts), i + 1
        if c != "\\":
            parts.append(c)
            i += 1
            continue
        e = text[i + 1 : i + 2]
        if e in _STR_ESCAPES:
            parts.append(_STR_ESCAPES[e])
            i += 2
        elif e == "x" and _HEX2.fullmatch(text, i + 2, i + 4):
            code = int(text[i + 2 : i + 4], 16)
            parts.append(chr(code if code < 0x80 else 0xDC00 + code))
            i += 4
        else:
            fail(f"unknown escape '\\{e}' in a string", i, 'known: \\" \\\\ \\n \\t \\xNN')


def _to_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _float32(text: str) -> float:
    """FLOAT attributes are float32, as in ONNX: the number read, rounded to float32."""
    with np.errstate(over="ignore"):
        return float(np.float32(float(text)))


# ----- scopes ------------------------------------------------------------------------------------

# an unresolved read: (name, reading node, input index, text offset, position in the graph)
_Pending = tuple[str, Node, int, int, int]


@dataclass(eq=False)
class _Scope:
    """One graph being parsed: its definitions and the reads not resolved yet."""

    graph: Graph
    parent: _Scope | None
    start: int  # offset of its 'graph' keyword
    defs: dict[str, Value] = field(default_factory=dict)
    def_at: dict[str, int] = field(default_factory=dict)  # name -> text offset
    node_of: dict[Value, int] = field(default_factory=dict)  # node output -> node position
    pending: list[_Pending] = field(default_factory=list)
    count: int = 0  # nodes appended so far


# ----- the parser --------------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self._lines: list[int] | None = None
        self.tokens = _tokenize(text, self.fail)
        self.i = 0
        self.placeholder = Value("<unresolved>")
        self.all_names: set[str] = set()

    # ----- errors and token helpers ------------------------------------------------------------
    def where(self, offset: int) -> str:
        if self._lines is None:
            self._lines = [m.start() for m in re.finditer("\n", self.text)]
        line = bisect.bisect_left(self._lines, offset)
        column = offset - (self._lines[line - 1] + 1 if line else 0)
        return f"{line + 1}:{column + 1}"

    def fail(self, message: str, at: _Token | int, hint: str | None = None) -> NoReturn:
        offset = at if isinstance(at, int) else at.start
        raise TextParseError(message, where=self.where(offset), hint=hint)

    def expected(self, what: str, context: str, hint: str | None = None) -> NoReturn:
        """'expected X <context>, found Y'; at the end of the previous token when Y is on a later
        line (where a missing ')' or ',' belongs)."""
        token = self.peek()
        previous = self.tokens[self.i - 1] if self.i else None
        if previous is not None and "\n" in self.text[previous.end : token.start]:
            self.fail(f"expected {what} {context}", previous.end, hint)
        self.fail(f"expected {what} {context}, found {token.describe()}", token, hint)

    def peek(self, k: int = 0) -> _Token:
        return self.tokens[self.i + k]  # k <= 3: the token list ends with 4 "end" tokens

    def take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += token.kind != "end"
        return token

    def at(self, word: str, k: int = 0) -> bool:
        """Whether token `k` ahead is the punctuation or identifier `word`."""
        return self.tokens[self.i + k].word == word

    def accept(self, word: str) -> bool:
        if self.tokens[self.i].word == word:
            self.i += 1
            return True
        return False

    def expect(self, word: str, context: str, hint: str | None = None) -> _Token:
        if not self.at(word):
            self.expected(f"'{word}'", context, hint)
        return self.take()

    def expect_kind(self, kind: str, what: str, context: str) -> _Token:
        if self.peek().kind != kind:
            self.expected(what, context)
        return self.take()

    def expect_end(self, context: str) -> None:
        if self.peek().kind != "end":
            self.fail(f"unexpected {self.peek().describe()} {context}", self.peek())

    def string(self, context: str) -> str:
        return str(self.expect_kind("str", "a string", context).value)

    def integer(self, context: str) -> int:
        return int(self.expect_kind("int", "an integer", context).value)

    def separated(self, close: str, context: str, item: Callable[[], Any]) -> None:
        """Call `item` for each element of a ','-separated list up to `close` (consumed)."""
        while not self.accept(close):
            item()
            if not self.at(close):
                self.expect(",", f"or '{close}' {context}")

    def entries(self, context: str, value: Callable[[str], Any]) -> dict[str, Any]:
        """`{"key": value, ...}`."""
        items: dict[str, Any] = {}

        def entry() -> None:
            key = self.string(f"as a key of {context}")
            self.expect(":", f"after the key {key!r} of {context}")
            items[key] = value(f"for the key {key!r} of {context}")

        self.expect("{", f"to open {context}")
        self.separated("}", f"between the entries of {context}", entry)
        return items

    def b64(self, token: _Token) -> bytes:
        try:
            return base64.b64decode(token.value, validate=True)
        except (binascii.Error, ValueError) as error:
            self.fail(f"invalid base64: {error}", token)

    def proto(self, message: Any, context: str) -> Any:
        token = self.expect_kind("b64", 'b64"..."', context)
        try:
            message.ParseFromString(self.b64(token))
        except Exception as error:  # protobuf's DecodeError
            self.fail(f"not a serialized {type(message).__name__}: {error}", token)
        return message

    # ----- model -------------------------------------------------------------------------------
    def model(self) -> Model:
        fields: dict[str, Any] = {}
        if self.accept("model"):
            while self.peek().kind == "ident" and self.at("=", 1):
                token = self.take()
                key = _MODEL_FIELDS.get(token.value)
                if key is None or key in fields:
                    problem = "is given twice" if key else "is not a model field"
                    hint = "fields: " + " ".join(_MODEL_FIELDS)
                    self.fail(f"'{token.value}' {problem}", token, hint)
                self.take()
                context = f"after {token.value}="
                if key == "opset_imports":
                    fields[key] = self.entries("the opset imports", self.integer)
                elif key in ("ir_version", "model_version"):
                    fields[key] = self.integer(context)
                else:
                    fields[key] = self.string(context)
                    if key == "producer_name" and self.peek().kind == "str":
                        fields["producer_version"] = self.string("as the producer version")
        if self.accept("metadata"):
            fields["metadata"] = self.entries("the model metadata", self.string)
        import onnx

        functions = []
        while self.accept("function"):
            functions.append(self.proto(onnx.FunctionProto(), "after 'function'"))
        graph = self.graph(None)
        self.expect_end("after the main graph")
        return Model(graph, functions=functions, **fields)

    # ----- graphs ------------------------------------------------------------------------------
    def graph(self, parent: _Scope | None) -> Graph:
        start = self.expect("graph", "to start a graph").start
        name = str(self.expect_kind("global", "the graph's name (@name)", "after 'graph'").value)
        graph = Graph(name) if parent is None else parent.graph.subgraph(name)
        scope = _Scope(graph, parent, start)
        context = f"of graph @{name}"

        def param() -> None:
            token = self.expect_kind("value", "an input (%name)", context)
            self.define(scope, graph.add_input(token.value, self.opt_type()), token)

        self.expect("(", f"after the graph name @{name}")
        self.separated(")", f"after the inputs {context}", param)
        options = self.options(("doc", "meta"), context)
        graph.doc_string = options.get("doc", "")
        graph.metadata = options.get("meta", {})
        self.expect("{", f"to open the body {context}")
        while not self.accept("return"):
            self.statement(scope)
        self.outputs(scope)
        self.expect("}", f"to close graph @{name}", "'return' is the last statement of a graph")
        self.finish(scope)
        return graph

    def statement(self, scope: _Scope) -> None:
        token = self.peek()
        if token.kind == "value" or self.at("_"):
            self.results(scope)
        elif self.at("default") and self.peek(1).kind == "value":
            self.default(scope)
        elif token.kind in ("ident", "str"):
            self.node(scope, [])
        elif self.at("}") or token.kind == "end":
            hint = "every graph ends with 'return' and its outputs (maybe none)"
            self.expected("'return'", f"at the end of graph @{scope.graph.name}", hint)
        else:
            hint = "statements: %y = Op(%x), %c: f32[] = const 1.0, default %x = i64[] 0, return"
            self.fail(f"expected a statement, found {token.describe()}", token, hint)

    def results(self, scope: _Scope) -> None:
        results: list[tuple[_Token, Value]] = []
        while True:
            token = self.take()
            if token.kind == "value":
                results.append((token, Value(token.value, self.opt_type())))
            elif token.kind == "ident" and token.value == "_":
                results.append((token, Value("")))
            else:
                self.fail(f"expected a result (%name or _), found {token.describe()}", token)
            if not self.accept(","):
                break
        self.expect("=", "after the results", "a node reads: %y = Op(%x)")
        if not self.at("const"):
            self.node(scope, results)
            return
        const = self.take()
        token, value = results[0]
        if len(results) != 1 or token.kind != "value" or value.type is None:
            hint = "%c: f32[2] = const [1.0, 2.0]"
            self.fail("a const defines one value and gives its type", const, hint)
        array = self.literal(value.type, f"of const %{token.value}")
        self.define(scope, scope.graph.add_initializer(token.value, array), token)

    def default(self, scope: _Scope) -> None:
        self.take()
        token = self.take()
        value = scope.defs.get(token.value)
        if value is None or not value.is_graph_input or value.graph is not scope.graph:
            hint = "'default' gives an input of its graph a default value"
            self.fail(f"%{token.value} is not an input of graph @{scope.graph.name}", token, hint)
        if value.const_value is not None:
            self.fail(f"%{token.value} has a default already", token)
        context = f"of the default of %{token.value}"
        self.expect("=", f"after 'default %{token.value}'")
        scope.graph.set_input_default(value, self.literal(self.type(context), context))

    def node(self, scope: _Scope, results: list[tuple[_Token, Value]]) -> None:
        token = self.take()
        domain: str | None = None
        if token.kind == "ident":
            op = str(token.value)
        elif token.kind == "str":  # "Op" or "domain"."Op": names that do not print bare
            domain, op_type = "", str(token.value)
            if self.accept("."):
                domain, op_type = op_type, self.string("as the op name after the quoted domain")
            op = f"{domain}.{op_type}" if domain else op_type
        else:
            self.fail(f"expected an op name, found {token.describe()}", token)
        inputs: list[Value | None] = []
        unresolved: list[tuple[str, int, int]] = []
        attrs: dict[str, Attribute] = {}

        def argument() -> None:
            arg = self.take()
            if arg.kind == "value":
                value = scope.defs.get(arg.value)
                if value is None:
                    unresolved.append((arg.value, len(inputs), arg.start))
                inputs.append(value or self.placeholder)
            elif arg.kind == "ident" and arg.value == "_":
                inputs.append(None)
            else:
                self.i -= 1
                self.expected("an input (%name or _)", f"of {op}")

        def attribute() -> None:
            token = self.take()
            if token.kind not in ("ident", "str"):
                self.fail(f"expected an attribute name of {op}, found {token.describe()}", token)
            if token.value in attrs:
                self.fail(f"attribute '{token.value}' of {op} is given twice", token)
            self.expect("=", f"after the attribute name '{token.value}' of {op}")
            attrs[token.value] = self.attribute(scope, f"attribute '{token.value}' of {op}")

        self.expect("(", f"after the op name {op}")
        self.separated(")", f"after the inputs of {op}", argument)
        if self.accept("{"):
            self.separated("}", f"after the attributes of {op}", attribute)
        options = self.options(_NODE_OPTIONS, f"of {op}")
        outputs = [v for _, v in results]
        node = Node(op, inputs, attrs, outputs=outputs, name=options.get("name", ""))
        if domain is not None:
            node.domain, node.op_type = domain, op_type
        node.device = options.get("device")
        node.overload = options.get("overload", "")
        node.doc_string = options.get("doc", "")
        node.metadata = options.get("meta", {})
        for result_token, value in results:
            if result_token.kind == "value":
                self.define(scope, value, result_token)
                scope.node_of[value] = scope.count
        scope.pending.extend((n, node, i, at, scope.count) for n, i, at in unresolved)
        scope.graph.append(node)
        scope.count += 1

    def options(self, allowed: tuple[str, ...], context: str) -> dict[str, Any]:
        options: dict[str, Any] = {}
        while self.peek().kind == "ident" and self.peek().value in allowed and self.at("=", 1):
            token = self.take()
            if token.value in options:
                self.fail(f"{token.value}= is given twice {context}", token)
            self.take()
            if token.value == "meta":
                options["meta"] = self.entries(f"the metadata {context}", self.string)
            else:
                options[token.value] = self.string(f"after {token.value}= {context}")
        return options

    def outputs(self, scope: _Scope) -> None:
        values: list[Value] = []
        names: list[str] = []
        unresolved: list[tuple[str, int, int]] = []
        while self.peek().kind == "value":
            token = self.take()
            value = scope.defs.get(token.value)
            if value is None:
                unresolved.append((token.value, len(values), token.start))
            values.append(value or self.placeholder)
            if self.accept("as"):
                token = self.expect_kind("value", "the output's name (%name)", "after 'as'")
            names.append(token.value)
            if not self.accept(","):
                break
        scope.graph.set_outputs(values, names)
        node = scope.graph.return_node
        scope.pending.extend((n, node, i, at, scope.count) for n, i, at in unresolved)

    def define(self, scope: _Scope, value: Value, token: _Token) -> None:
        name = str(token.value)
        if name in scope.defs:
            first, hint = self.where(scope.def_at[name]), "a value is defined once; rename one"
            self.fail(f"%{name} is defined twice (first at {first})", token, hint)
        scope.defs[name] = value
        scope.def_at[name] = token.start
        self.all_names.add(name)

    def finish(self, scope: _Scope) -> None:
        """Resolve the reads of names this graph defines, pass the others to the enclosing graph,
        and sort the graph when a read came before its definition."""
        remaining: list[_Pending] = []
        unordered = False
        for entry in scope.pending:
            name, node, index, offset, position = entry
            value = scope.defs.get(name)
            if value is None:
                remaining.append(entry)
                continue
            defined_at = scope.node_of.get(value, -1)  # -1: an input or a const
            if defined_at == position:
                inner = " inside a subgraph of" if node.graph is not scope.graph else " by"
                hint = "a node cannot read its own output (a Loop carries values across steps)"
                self.fail(f"%{name} is read{inner} the node that defines it", offset, hint)
            unordered = unordered or defined_at > position
            node.set_input(index, value)
        if scope.parent is not None:
            position = scope.parent.count  # the node whose attribute holds this graph
            scope.parent.pending.extend((n, nd, i, at, position) for n, nd, i, at, _ in remaining)
        elif remaining:
            name, _, _, offset, _ = min(remaining, key=lambda entry: entry[3])
            close = difflib.get_close_matches(name, self.all_names, n=3)
            suggestion = f"did you mean {', '.join('%' + c for c in close)}?" if close else None
            self.fail(f"%{name} is not defined", offset, suggestion)
        if unordered:
            try:
                scope.graph.sort_topologically()
            except InvalidGraphError as error:
                self.fail(error.message, scope.start, error.hint)

    # ----- types -------------------------------------------------------------------------------
    def opt_type(self) -> Type | None:
        return self.type("after ':'") if self.accept(":") else None

    def type(self, context: str) -> Type | None:
        if self.accept("?"):
            return None
        token = self.expect_kind("ident", "a type (f32[2], seq<...>, ...)", context)
        word = token.value
        if word in ("seq", "opt", "map") and self.accept("<"):
            key = self.dtype(self.take()) if word == "map" else None
            if key is not None:
                self.expect(",", "after the key type of map<...>")
            elem = self.type(f"inside {word}<...>")
            self.expect(">", f"to close {word}<...>")
            if key is not None:
                return MapType(key, elem)
            return SequenceType(elem) if word == "seq" else OptionalType(elem)
        dtype = self.dtype(token)
        self.expect("[", f"after the element type {word}", "a scalar is f32[], unknown rank f32[*]")
        if self.accept("*"):
            self.expect("]", "after '*' (unknown rank)")
            return TensorType(dtype, None)
        dims: list[int | str | None] = []

        def dim() -> None:
            token = self.take()
            if token.kind == "int":
                dims.append(int(token.value))
            elif token.kind in ("ident", "str"):
                dims.append(str(token.value))
            elif token.kind == "punct" and token.value == "?":
                dims.append(None)
            else:
                what = "a dimension (integer, symbol or ?)"
                self.fail(f"expected {what}, found {token.describe()}", token)

        self.separated("]", f"after the dimensions of {word}[...]", dim)
        return TensorType(dtype, tuple(dims))

    def dtype(self, token: _Token) -> DType:
        if token.kind != "ident":
            self.fail(f"expected an element type (f32, i64, ...), found {token.describe()}", token)
        try:
            return DType.from_short_name(token.value)
        except ValueError as error:
            self.fail(str(error), token)

    # ----- literals ----------------------------------------------------------------------------
    def literal(self, t: Type | None, context: str) -> np.ndarray:
        token = self.peek()
        if not isinstance(t, TensorType) or t.shape is None or not t.is_static:
            self.fail(f"a tensor literal needs a static shape, not {format_type(t)}", token)
        dtype, shape = DType(t.dtype), tuple(int(d) for d in t.shape)  # type: ignore[arg-type]
        count = int(np.prod(shape, dtype=np.int64))
        if min(shape, default=0) < 0:
            self.fail(f"a tensor literal cannot have a negative dimension: {format_type(t)}", token)
        if token.kind == "b64":
            self.take()
            if dtype is DType.STRING:
                self.fail("string tensors are written as lists of strings, not base64", token)
            np_dtype = self.numpy_dtype(dtype, token)
            data, size = self.b64(token), count * np_dtype.itemsize
            if len(data) != size:
                self.fail(f"{format_type(t)} is {size} bytes, the base64 is {len(data)}", token)
            return np.frombuffer(data, dtype=np_dtype).reshape(shape)
        if self.at("<"):
            hint = "print the model without elide_large to get text that parses"
            self.fail("this tensor was elided (printed with elide_large=True)", token, hint)
        items: list[_Token] = []
        if self.accept("["):
            self.separated("]", f"between the values {context}", lambda: items.append(self.take()))
        elif shape == () and token.scalar():
            items.append(self.take())
        else:
            self.expected(f'a list of {count} values or b64"..."', context)
        if len(items) != count:
            self.fail(f"{format_type(t)} needs {count} values, got {len(items)}", token)
        return self.array(items, dtype, shape, token)

    def array(
        self, items: list[_Token], dtype: DType, shape: tuple[int, ...], start: _Token
    ) -> np.ndarray:
        want = {DType.STRING: "str", DType.BOOL: "bool"}.get(dtype)
        want = want or ("int" if dtype.is_integer else "float" if dtype.is_float else None)
        if want is None:
            self.fail(f'{dtype.short_name} tensors are written as b64"..."', start)
        for item in items:
            kind = item.scalar()
            if kind != want and not (want == "float" and kind == "int"):
                what = f"a {want} value ({dtype.short_name})"
                self.fail(f"expected {what}, found {item.describe()}", item)
        if dtype is DType.STRING:
            out = np.empty(len(items), dtype=object)
            for i, item in enumerate(items):
                raw = _to_bytes(item.value)
                try:
                    out[i] = raw.decode("utf-8")  # str, as onnx.numpy_helper gives them
                except UnicodeDecodeError:
                    out[i] = raw
            return out.reshape(shape)
        np_dtype = self.numpy_dtype(dtype, start)
        values: list[Any]
        if dtype is DType.BOOL:
            values = [item.value == "true" for item in items]
        elif dtype.is_integer:
            info = np.iinfo(np_dtype) if np_dtype.kind in "iu" else _ml_dtypes().iinfo(np_dtype)
            values = [int(item.value) for item in items]
            for item, v in zip(items, values, strict=True):
                if not int(info.min) <= v <= int(info.max):
                    bounds = f"{dtype.short_name} ({info.min}..{info.max})"
                    self.fail(f"{v} does not fit in {bounds}", item)
        else:
            values = [float(item.value) for item in items]
        with np.errstate(over="ignore"):
            return np.array(values, dtype=np_dtype).reshape(shape)

    def numpy_dtype(self, dtype: DType, token: _Token) -> np.dtype:
        try:
            return dtype.numpy
        except KeyError:
            self.fail(f"element type {dtype.short_name} has no numpy type here", token)

    # ----- attributes --------------------------------------------------------------------------
    def attribute(self, scope: _Scope, context: str) -> Attribute:
        token = self.peek()
        scalar = token.scalar()
        if scalar in ("int", "float", "str"):
            self.take()
            if scalar == "int":
                return Attribute(AttrKind.INT, int(token.value))
            if scalar == "float":
                return Attribute(AttrKind.FLOAT, _float32(token.value))
            return Attribute(AttrKind.STRING, _to_bytes(token.value))
        if self.at("["):
            return self.attribute_list(scope, context)
        word = token.value if token.kind == "ident" else None
        if word in _EMPTY_LISTS and self.at("[", 1) and self.at("]", 2):
            self.i += 3
            return Attribute(_EMPTY_LISTS[word], [])
        if self.accept("ref"):
            kind = self.expect_kind("ident", "an attribute kind", "after 'ref'")
            if kind.value not in _KIND_BY_WORD:
                hint = "kinds: " + " ".join(_KIND_BY_WORD)
                self.fail(f"'{kind.value}' is not an attribute kind", kind, hint)
            name = self.string("after 'ref <kind>' (the function attribute's name)")
            return Attribute(_KIND_BY_WORD[kind.value], None, ref=name)
        if word in _ONE_KIND:
            return Attribute(_ONE_KIND[word], self.item(scope, word, context))
        hint = 'values: 3, 1.0, "s", [..], ints[], tensor .., graph .., type .., sparse .., ref ..'
        self.expected("an attribute value", f"for {context}", hint)

    def attribute_list(self, scope: _Scope, context: str) -> Attribute:
        start = self.take()
        if self.at("]"):
            hint = "write ints[], floats[], strings[], tensors[], graphs[], types[] or sparse[]"
            self.fail("an empty list needs its kind", start, hint)
        word = self.peek().value if self.peek().kind == "ident" else None
        items: list[Any] = []
        if word in _LIST_KIND:

            def element() -> None:
                if not self.at(word):
                    self.expected(f"'{word}'", f"in the list of {context}")
                items.append(self.item(scope, word, context))

            self.separated("]", f"in the list of {context}", element)
            return Attribute(_LIST_KIND[word], items)

        def scalar() -> None:
            token = self.take()
            if token.scalar() not in ("int", "float", "str"):
                what = f"a number or a string in the list of {context}"
                self.fail(f"expected {what}, found {token.describe()}", token)
            items.append(token)

        self.separated("]", f"in the list of {context}", scalar)
        kinds = {token.scalar() for token in items}
        if kinds == {"str"}:
            return Attribute(AttrKind.STRINGS, [_to_bytes(t.value) for t in items])
        if "str" in kinds:
            self.fail(f"the list of {context} mixes strings and numbers", start)
        if kinds == {"int"}:
            return Attribute(AttrKind.INTS, [int(t.value) for t in items])
        return Attribute(AttrKind.FLOATS, [_float32(t.value) for t in items])

    def item(self, scope: _Scope, word: str, context: str) -> Any:
        """The value after `tensor`, `graph`, `type` or `sparse`."""
        if word == "graph":
            return self.graph(scope)
        self.take()
        if word == "tensor":
            t = self.type(f"after 'tensor' in {context}")
            return self.literal(t, f"of the tensor in {context}")
        if word == "type":
            return self.type(f"after 'type' in {context}")
        import onnx

        return self.proto(onnx.SparseTensorProto(), f"after 'sparse' in {context}")


def _ml_dtypes() -> Any:
    import ml_dtypes

    return ml_dtypes
