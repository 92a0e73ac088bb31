"""The IR text form (docs/ir-text.md): exact printing, parsing back, round trips, and errors.

Every test that parses printed text also checks the round-trip promise: printing the parsed model
gives the same text byte for byte. The real-model tests hold every ONNX node test case and light
model that imports to that promise, and run the light models exported from parsed text in ONNX
Runtime.
"""

from __future__ import annotations

import base64
import os
import re
import time
import warnings
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import helper

from graphopt.ir import (
    Attribute,
    AttrKind,
    Builder,
    DType,
    Graph,
    MapType,
    Model,
    Node,
    OptionalType,
    SequenceType,
    TensorType,
    TextParseError,
    format_type,
    parse_graph,
    parse_model,
    print_graph,
    print_model,
)

F2 = TensorType(DType.FLOAT, (2,))
DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "ir-text.md")
LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def roundtrip(model: Model) -> tuple[str, Model]:
    """The text of `model` and the model parsed from it, checking that it prints the same."""
    text = print_model(model)
    parsed = parse_model(text)
    assert print_model(parsed) == text
    return text, parsed


def graph_roundtrip(text: str) -> Graph:
    """Parse a graph block written in a test and check that it prints back unchanged."""
    graph = parse_graph(text)
    assert print_graph(graph) == text
    return graph


def doc_example() -> str:
    with open(DOC, encoding="utf-8") as f:
        return re.search(r"```\n(model .*?)```", f.read(), re.S).group(1)  # type: ignore[union-attr]


# ----- golden texts ------------------------------------------------------------------------------


def tiny_model() -> Model:
    """The model of the example at the top of docs/ir-text.md."""

    def f16(*shape: Any) -> TensorType:
        return TensorType(DType.FLOAT16, shape)

    g = Graph("tiny")
    b = Builder(g)
    ids = g.add_input("input_ids", TensorType(DType.INT64, (1, "seq")))
    ratio = g.add_input("ratio", TensorType(DType.FLOAT, ()))
    g.set_input_default(ratio, np.array(0.5, np.float32))
    embedding = b.const(np.arange(20, dtype=np.float16).reshape(5, 4) / 8, "embedding")
    shape = b.const(np.array([1, -1, 2, 2], np.int64), "shape")
    hidden = b.op("Gather", embedding, ids, _name="embed")
    q = b.Reshape(hidden, shape)
    t = b.Transpose(q, perm=[0, 2, 1, 3])
    a, second = b.op("Split", t, axis=3, num_outputs=2, _outputs=2)
    y, mask = b.op("Dropout", a, ratio, _outputs=2)
    r = b.op("com.microsoft.Gelu", y)
    r.producer.device = "cpu"
    names = {hidden: "hidden", q: "q", t: "t", a: "a", second: "b", y: "y", mask: "", r: "r"}
    types = {hidden: f16(1, "seq", 4), q: f16(1, "seq", 2, 2), t: f16(1, 2, "seq", 2),
             a: f16(1, 2, "seq", 1), second: f16(1, 2, "seq", 1), r: f16(1, 2, "seq", 1)}  # fmt: skip
    for value, name in names.items():
        value.name, value.type = name, types.get(value)
    g.set_outputs([r, second], ["r", "second"])
    return Model(g, opset_imports={"": 17, "com.microsoft": 1}, ir_version=8,
                 producer_name="graphopt-example")  # fmt: skip


def test_doc_example_is_what_the_printer_prints():
    text, parsed = roundtrip(tiny_model())
    assert text == doc_example()
    embedding = parsed.graph.initializers["embedding"].const_value
    assert embedding.dtype == np.float16 and embedding[4, 3] == 19 / 8
    ratio = parsed.graph.inputs[1]
    assert ratio.is_graph_input and ratio.const_value == np.float32(0.5)
    assert not ratio.is_constant


GOLDEN_IF = """\
graph @main(%x: f32[2], %cond: bool[]) {
  %bias: f32[2] = const [1.0, 2.0]
  %out: f32[2] = If(%cond) {then_branch = graph @then() {
    %t: f32[2] = Add(%x, %bias)
    return %t
  }, else_branch = graph @else() {
    return %x
  }}
  return %out
}
"""


def test_golden_if_with_subgraphs_reading_outer_values():
    g = Graph("main")
    b = Builder(g)
    x = g.add_input("x", F2)
    cond = g.add_input("cond", TensorType(DType.BOOL, ()))
    bias = b.const(np.array([1.0, 2.0], np.float32), "bias")
    then = g.subgraph("then")
    t = Builder(then).Add(x, bias)
    t.name, t.type = "t", F2
    then.set_outputs([t])
    orelse = g.subgraph("else")
    orelse.set_outputs([x])
    out = b.If(cond, then_branch=then, else_branch=orelse)
    out.name, out.type = "out", F2
    g.set_outputs([out])
    assert print_graph(g) == GOLDEN_IF

    parsed = graph_roundtrip(GOLDEN_IF)
    if_node = parsed.nodes[0]
    then_p, else_p = if_node.subgraphs()
    assert then_p.scope is parsed.scope and then_p.parent is if_node
    x_p = parsed.inputs[0]
    assert (then_p.nodes[0], 0) in x_p.uses and (else_p.return_node, 0) in x_p.uses
    assert then_p.nodes[0].inputs[1] is parsed.initializers["bias"]


# ----- attributes --------------------------------------------------------------------------------


def all_attribute_kinds(g: Graph) -> dict[str, Attribute]:
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("v", onnx.TensorProto.FLOAT, [2], [1.5, 2.5]),
        helper.make_tensor("i", onnx.TensorProto.INT64, [2], [0, 3]),
        [4],
    )
    body = g.subgraph("body")
    i = body.add_input("i", TensorType(DType.INT64, ()))
    body.set_outputs([i])
    other = g.subgraph("other")
    other.set_outputs([])
    return {
        "i": Attribute(AttrKind.INT, -3),
        "f": Attribute(AttrKind.FLOAT, 1e-5),
        "f_inf": Attribute(AttrKind.FLOAT, float("-inf")),
        "s": Attribute(AttrKind.STRING, b'say "hi"\n\xff'),
        "t": Attribute(AttrKind.TENSOR, np.array([1.0, 2.0], np.float32)),
        "g": Attribute(AttrKind.GRAPH, body),
        "fs": Attribute(AttrKind.FLOATS, [1.0, 0.5, 1e20]),
        "is": Attribute(AttrKind.INTS, [0, 2, 1, 3]),
        "ss": Attribute(AttrKind.STRINGS, [b"a", b"b"]),
        "ts": Attribute(AttrKind.TENSORS, [np.array(3, np.int64), np.array(["x"], object)]),
        "gs": Attribute(AttrKind.GRAPHS, [other]),
        "sp": Attribute(AttrKind.SPARSE_TENSOR, sparse),
        "sps": Attribute(AttrKind.SPARSE_TENSORS, [sparse, sparse]),
        "tp": Attribute(AttrKind.TYPE_PROTO, SequenceType(F2)),
        "tps": Attribute(AttrKind.TYPE_PROTOS, [F2, None, MapType(DType.STRING, F2)]),
        "e_fs": Attribute(AttrKind.FLOATS, []),
        "e_is": Attribute(AttrKind.INTS, []),
        "e_ss": Attribute(AttrKind.STRINGS, []),
        "e_ts": Attribute(AttrKind.TENSORS, []),
        "e_gs": Attribute(AttrKind.GRAPHS, []),
        "e_tps": Attribute(AttrKind.TYPE_PROTOS, []),
        "e_sps": Attribute(AttrKind.SPARSE_TENSORS, []),
        "ref": Attribute(AttrKind.FLOAT, None, ref="alpha"),
    }


def test_every_attribute_kind_prints_and_parses_back():
    g = Graph("main")
    x = g.add_input("x", F2)
    attrs = all_attribute_kinds(g)
    node = g.append(Node("com.example.Everything", [x], attrs))
    g.set_outputs([node.output])
    text, parsed = roundtrip(Model(g))
    for snippet in [
        "i = -3", "f = 1e-05", "f_inf = -inf", r's = "say \"hi\"\n\xff"',
        "t = tensor f32[2] [1.0, 2.0]", "g = graph @body(%i: i64[]) {", "fs = [1.0, 0.5, 1e+20]",
        "is = [0, 2, 1, 3]", 'ss = ["a", "b"]', 'ts = [tensor i64[] 3, tensor str[1] ["x"]]',
        "gs = [graph @other() {", "sp = sparse b64", "sps = [sparse b64", "tp = type seq<f32[2]>",
        "tps = [type f32[2], type ?, type map<str, f32[2]>]", "e_fs = floats[]", "e_is = ints[]",
        "e_ss = strings[]", "e_ts = tensors[]", "e_gs = graphs[]", "e_tps = types[]",
        "e_sps = sparse[]", 'ref = ref float "alpha"',
    ]:  # fmt: skip
        assert snippet in text, snippet
    got = parsed.graph.nodes[0].attrs
    assert list(got) == list(attrs)
    for name, want in attrs.items():
        have = got[name]
        assert (have.kind, have.ref) == (want.kind, want.ref), name
    assert got["i"].value == -3 and got["s"].value == b'say "hi"\n\xff'
    assert got["f"].value == float(np.float32(1e-5))  # FLOAT is float32, as in ONNX
    assert got["fs"].value == [1.0, 0.5, float(np.float32(1e20))]
    assert got["is"].value == [0, 2, 1, 3] and got["ss"].value == [b"a", b"b"]
    assert got["tp"].value == SequenceType(F2) and got["tps"].value == attrs["tps"].value
    assert got["sp"].value == attrs["sp"].value and got["sps"].value == attrs["sps"].value
    np.testing.assert_array_equal(got["t"].value, [1.0, 2.0])
    assert got["ts"].value[0].dtype == np.int64 and got["ts"].value[1].tolist() == ["x"]
    body = got["g"].value
    assert body.scope is parsed.graph.scope and body.parent is parsed.graph.nodes[0]
    assert [v.name for v in body.inputs] == ["i"] and body.outputs == body.inputs


def test_hand_written_attribute_lists():
    g = graph_roundtrip_loose(
        'graph @g(%x) {\n  %y = Foo(%x) {a = [1, 0.5], b = [inf, nan], "odd name" = 2}\n'
        "  return %y\n}\n"
    )
    attrs = g.nodes[0].attrs
    assert attrs["a"].kind is AttrKind.FLOATS and attrs["a"].value == [1.0, 0.5]
    assert attrs["b"].kind is AttrKind.FLOATS and np.isnan(attrs["b"].value[1])
    assert attrs["odd name"].value == 2
    assert 'Foo(%x) {a = [1.0, 0.5], b = [inf, nan], "odd name" = 2}' in print_graph(g)


def graph_roundtrip_loose(text: str) -> Graph:
    """Parse hand-written text that need not be in printed form; check the printed form is stable."""
    graph = parse_graph(text)
    printed = print_graph(graph)
    assert print_graph(parse_graph(printed)) == printed
    return graph


# ----- types -------------------------------------------------------------------------------------

TYPES = [
    (TensorType(DType.FLOAT, ("batch", 128, 768)), "f32[batch,128,768]"),
    (TensorType(DType.FLOAT, ()), "f32[]"),
    (TensorType(DType.FLOAT16, None), "f16[*]"),
    (TensorType(DType.BFLOAT16, (None, 3, None)), "bf16[?,3,?]"),
    (TensorType(DType.INT64, ("n + 1", "2", "a-b", "_k9")), 'i64["n + 1","2","a-b",_k9]'),
    (TensorType(DType.INT4, ('q"uote',)), 'i4["q\\"uote"]'),
    (TensorType(DType.UINT8, (-1,)), "u8[-1]"),
    (SequenceType(TensorType(DType.FLOAT, (2,))), "seq<f32[2]>"),
    (SequenceType(None), "seq<?>"),
    (OptionalType(TensorType(DType.INT64, ())), "opt<i64[]>"),
    (OptionalType(SequenceType(TensorType(DType.STRING, None))), "opt<seq<str[*]>>"),
    (MapType(DType.INT64, TensorType(DType.FLOAT, ())), "map<i64, f32[]>"),
    (MapType(DType.STRING, None), "map<str, ?>"),
    (SequenceType(MapType(DType.INT64, TensorType(DType.DOUBLE, ()))), "seq<map<i64, f64[]>>"),
    (TensorType(DType.FLOAT8E4M3FN, (1,)), "f8e4m3fn[1]"),
    (TensorType(DType.UNDEFINED, None), "undef[*]"),
]


@pytest.mark.parametrize(("t", "text"), TYPES, ids=[text for _, text in TYPES])
def test_type_forms(t: Any, text: str):
    assert format_type(t) == text
    assert str(t) == text  # TensorType.__str__ & co. use the printer
    g = Graph("g")
    x = g.add_input("x", t)
    y = g.append(Node("Identity", [x])).output
    y.type = t
    g.set_outputs([y])
    printed = print_graph(g)
    assert f"(%x: {text})" in printed
    parsed = graph_roundtrip(printed)
    assert parsed.inputs[0].type == t and parsed.outputs[0].type == t


def test_values_without_types():
    g = graph_roundtrip("graph @g(%x) {\n  %y = Neg(%x)\n  return %y\n}\n")
    assert g.inputs[0].type is None and g.outputs[0].type is None


# ----- literals ----------------------------------------------------------------------------------


def const_text(array: np.ndarray) -> tuple[str, np.ndarray]:
    """The literal `array` prints as, and the array parsed back from it."""
    g = Graph("g")
    c = g.add_initializer("c", array)
    g.set_outputs([c])
    printed = print_graph(g)
    parsed = graph_roundtrip(printed)
    literal = printed.splitlines()[1].split(" = const ", 1)[1]
    return literal, parsed.initializers["c"].const_value


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


LITERALS = [
    (np.array([1, -1, 2, 16], np.int64), "[1, -1, 2, 16]"),
    (np.array(7, np.int32), "7"),
    (np.arange(6, dtype=np.int8).reshape(2, 3), "[0, 1, 2, 3, 4, 5]"),
    (np.array([0, 2**64 - 1], np.uint64), "[0, 18446744073709551615]"),
    (np.array([-128, 127], np.int8), "[-128, 127]"),
    (np.array([True, False]), "[true, false]"),
    (np.array(True), "true"),
    (np.array([0.5, 1e-05, -0.0, 1e20, 123456789.0], np.float32),
     "[0.5, 1e-05, -0.0, 1e+20, 123456790.0]"),
    (np.array([np.nan, np.inf, -np.inf], np.float64), "[nan, inf, -inf]"),
    (np.array([0.1, 1 / 3], np.float64), "[0.1, 0.3333333333333333]"),
    (np.array([0.1, 65504, 6e-08], np.float16), "[0.1, 65500.0, 6e-08]"),
    (np.array([0.1, 1 / 3, 3e38], ml_dtypes.bfloat16), "[0.1, 0.334, 3e+38]"),
    (np.array([-8, 7, 0], ml_dtypes.int4), "[-8, 7, 0]"),
    (np.array([0, 15], ml_dtypes.uint4), "[0, 15]"),
    (np.array([-2, 1], ml_dtypes.int2), "[-2, 1]"),
    (np.array([b"a", "\u00e9t\u00e9", b"\xff\x00", 'q"\n'], object),
     '["a", "\u00e9t\u00e9", "\\xff\\x00", "q\\"\\n"]'),
    (np.array("one", object), '"one"'),
    (np.zeros((0, 3), np.float32), "[]"),
    (np.arange(17, dtype=np.int64), 'b64"'),
    (np.arange(4, dtype=np.complex64), 'b64"'),
    (np.array([0.5, 448], ml_dtypes.float8_e4m3fn), 'b64"'),
    (np.array([1, 0.5], ml_dtypes.float8_e5m2), 'b64"'),
    (np.array([-8, 7], ml_dtypes.int4).repeat(9), 'b64"'),
    (np.arange(20, dtype=np.float16), 'b64"'),
    (np.arange(20, dtype=ml_dtypes.bfloat16), 'b64"'),
    (np.array([str(i) for i in range(20)], object), '["0", "1", "2"'),
]  # fmt: skip


@pytest.mark.parametrize(("array", "expected"), LITERALS, ids=lambda v: getattr(v, "dtype", "t"))
def test_literals_inline_or_base64(array: np.ndarray, expected: str):
    literal, back = const_text(array)
    if expected.endswith('b64"'):
        assert literal.startswith('b64"')
    elif expected.startswith('["0", "1", "2"'):
        assert literal.startswith(expected)
    else:
        assert literal == expected
    if array.dtype == object:
        want = [s.decode("utf-8", "surrogateescape") if isinstance(s, bytes) else s
                for s in array.reshape(-1).tolist()]  # fmt: skip
        got = [s.decode("utf-8", "surrogateescape") if isinstance(s, bytes) else s
               for s in back.reshape(-1).tolist()]  # fmt: skip
        assert got == want and back.shape == array.shape
    else:
        assert same_bits(back, array)


def test_strings_parse_to_str_or_bytes():
    _, back = const_text(np.array([b"ok", b"\xff"], object))
    assert back.tolist() == ["ok", b"\xff"]  # str as onnx.numpy_helper gives, bytes when not UTF-8


def test_base64_constants_are_not_copied_on_print_or_parse():
    array = np.arange(1000, dtype=np.float32)
    literal, back = const_text(array)
    assert literal.startswith('b64"') and not back.flags.writeable
    np.testing.assert_array_equal(back, array)


def test_every_f16_and_bf16_value_reads_back_exactly():
    for dtype in (np.float16, ml_dtypes.bfloat16):
        values = np.arange(2**16, dtype=np.uint16).view(dtype)
        values = values[np.isfinite(values.astype(np.float32))]
        chunks = np.array_split(values, len(values) // 16 + 1)  # <= 16 values: printed inline
        g = Graph("g")
        g.set_outputs([g.add_initializer(f"c{i}", chunk) for i, chunk in enumerate(chunks)])
        text = print_graph(g)
        assert "b64" not in text
        back = parse_graph(text).initializers
        for i, chunk in enumerate(chunks):
            assert same_bits(back[f"c{i}"].const_value, chunk)


@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=16))
def test_float32_literals_read_back_exactly(values: list[float]):
    array = np.array(values, np.float32)
    _, back = const_text(array)
    assert same_bits(back, array)


@given(st.lists(st.floats(allow_nan=False), min_size=1, max_size=16))
def test_float64_literals_read_back_exactly(values: list[float]):
    array = np.array(values, np.float64)
    _, back = const_text(array)
    assert same_bits(back, array)


def test_elide_large():
    m = Model(Graph("g"))
    g = m.graph
    g.set_outputs([
        g.add_initializer("w", np.zeros((512, 768), np.float32)),
        g.add_initializer("b", np.zeros(20, np.int8)),
        g.add_initializer("s", np.arange(4, dtype=np.int64)),
    ])  # fmt: skip
    text = print_model(m, elide_large=True)
    assert "%w: f32[512,768] = const <1.50 MiB>" in text
    assert "%b: i8[20] = const <20 B>" in text
    assert "%s: i64[4] = const [0, 1, 2, 3]" in text
    with pytest.raises(TextParseError, match="elided"):
        parse_model(text)


# ----- values, outputs, names --------------------------------------------------------------------


def test_omitted_inputs_and_outputs():
    text = (
        "graph @g(%x: f32[2], %scale: f32[2]) {\n"
        "  %y, _, %var = BatchNormalization(%x, %scale, _, _, _)\n"
        "  _, %idx = TopK(%x, _)\n"
        "  return %y, %var, %idx\n"
        "}\n"
    )
    g = graph_roundtrip(text)
    bn, topk = g.nodes
    assert bn.inputs[2:] == (None, None, None) and bn.outputs[1].name == ""
    assert not bn.outputs[1].is_used and len(bn.outputs) == 3
    assert topk.outputs[0].name == "" and topk.inputs[1] is None


def test_outputs_renamed_repeated_and_inputs_as_outputs():
    text = (
        "graph @g(%x: f32[2], %k: i64[]) {\n"
        "  default %k = i64[] 3\n"
        "  %y = Neg(%x)\n"
        "  return %y as %first, %y as %second, %x, %x as %x_out, %k\n"
        "}\n"
    )
    g = graph_roundtrip(text)
    y = g.nodes[0].output
    x, k = g.inputs
    assert g.outputs == [y, y, x, x, k]
    assert g.output_names == ["first", "second", "x", "x_out", "k"]
    assert k.const_value == 3 and k.const_value.dtype == np.int64 and g.initializers["k"] is k
    assert [(n.op, i) for n, i in y.uses] == [("return", 0), ("return", 1)]


def test_fresh_names_for_unnamed_and_clashing_values():
    g = Graph("g")
    b = Builder(g)
    x = g.add_input("x", F2)
    y = b.Neg(x)
    z = b.Abs(y)
    v1 = b.Relu(z)
    y.name = z.name = None  # type: ignore[assignment]
    v1.name = "v_1"  # a real name that a fresh name must not take
    body = g.subgraph("body")
    shadow = Builder(body).Neg(x)
    shadow.name = "x"  # shadows the outer %x
    body.set_outputs([shadow])
    orelse = g.subgraph("orelse")
    orelse.set_outputs([x])
    g.set_outputs([b.If(v1, then_branch=body, else_branch=orelse)], [""])
    text, parsed = roundtrip(Model(g))
    assert "%v_2 = Neg(%x)" in text and "%v_3 = Abs(%v_2)" in text and "%v_1 = Relu(%v_3)" in text
    assert "%x_1 = Neg(%x)" in text and "return %x_1 as %x" in text
    assert 'return %if as %""' in text
    names = [v.name for n in parsed.graph.all_nodes() for v in n.outputs]
    assert len(names) == len(set(names))


def test_names_needing_quotes():
    g = Graph("my graph")
    x = g.add_input("onnx::MatMul_12", F2)
    node = g.append(Node("Foo", [x], {"attr name": 1, "_ok.name-1/x": 2}))
    node.output.name = "layer.0/attn-out"
    quoted = g.append(Node("Bar", [node.output]))
    quoted.output.name = 'a "b"\tc\\'
    weird = g.append(Node("Baz", [quoted.output]))
    weird.output.name = "\u00e9\x01"
    g.set_outputs([weird.output], ["out put"])
    text = print_graph(g)
    assert text.startswith('graph @"my graph"(%"onnx::MatMul_12": f32[2]) {')
    assert '%layer.0/attn-out = Foo(%"onnx::MatMul_12") {"attr name" = 1, _ok.name-1/x = 2}' in text
    assert '%"a \\"b\\"\\tc\\\\" = Bar(%layer.0/attn-out)' in text
    assert '%"\u00e9\\x01" = Baz(' in text and 'as %"out put"' in text
    parsed = graph_roundtrip(text)
    assert parsed.name == "my graph" and parsed.inputs[0].name == "onnx::MatMul_12"
    assert [n.output.name for n in parsed] == [node.output.name, quoted.output.name, "\u00e9\x01"]
    assert parsed.output_names == ["out put"]


def test_quoted_op_names():
    g = Graph("g")
    x = g.add_input("x", F2)
    odd = [("", "My Op"), ("my.domain", "Op.v2"), ("", "const"), ("ai.onnx", "Relu"),
           ("com-x", "Op"), ("", "return")]  # fmt: skip
    value = x
    for domain, op_type in odd:
        node = g.append(Node("Identity", [value]))
        node.domain, node.op_type = domain, op_type
        value = node.output
    tail = g.append(Node("com.microsoft.Gelu", [value]))
    zero = g.append(Node("Print", [tail.output], outputs=0))
    g.set_outputs([tail.output])
    text = print_graph(g)
    for snippet in ['"My Op"(%x)', '"my.domain"."Op.v2"(', '"const"(', '"ai.onnx"."Relu"(',
                    '"com-x"."Op"(', '"return"(', "com.microsoft.Gelu(", "\n  Print(%gelu)\n"]:  # fmt: skip
        assert snippet in text, snippet
    parsed = graph_roundtrip(text)
    assert [(n.domain, n.op_type) for n in parsed][:6] == odd
    assert parsed.nodes[-1].outputs == [] and zero.outputs == []


def test_node_and_graph_options():
    text = (
        'graph @g(%x: f32[2]) doc="the graph" meta={"k": "v", "": "empty key"} {\n'
        '  %y = Neg(%x) name="neg/0" device="cuda:0" overload="o1" doc="line\\nbreak" '
        'meta={"a": "1"}\n'
        "  return %y\n"
        "}\n"
    )
    g = graph_roundtrip(text)
    node = g.nodes[0]
    assert (node.name, node.device, node.overload) == ("neg/0", "cuda:0", "o1")
    assert node.doc_string == "line\nbreak" and node.metadata == {"a": "1"}
    assert g.doc_string == "the graph" and g.metadata == {"k": "v", "": "empty key"}


def test_model_header_metadata_and_functions():
    function = helper.make_function(
        "local", "Twice", ["x"], ["y"], [helper.make_node("Add", ["x", "x"], ["y"])],
        [helper.make_opsetid("", 17)],
    )  # fmt: skip
    g = Graph("main")
    x = g.add_input("x", F2)
    y = g.append(Node("local.Twice", [x])).output
    g.set_outputs([y], ["y"])
    model = Model(g, opset_imports={"": 17, "local": 1}, ir_version=9, producer_name="tool",
                  producer_version="2.4", domain="ai.example", model_version=3,
                  doc_string='a "model"', metadata={"author": "me", "x": "\u00e9"},
                  functions=[function])  # fmt: skip
    text, parsed = roundtrip(model)
    assert text.splitlines()[:3] == [
        'model ir_version=9 opset={"": 17, "local": 1} producer="tool" "2.4" '
        'domain="ai.example" model_version=3 doc="a \\"model\\""',
        'metadata {"author": "me", "x": "\u00e9"}',
        f'function b64"{base64.b64encode(function.SerializeToString()).decode()}"',
    ]
    for field in ("opset_imports", "ir_version", "producer_name", "producer_version", "domain",
                  "model_version", "doc_string", "metadata"):  # fmt: skip
        assert getattr(parsed, field) == getattr(model, field), field
    assert parsed.functions == [function]


def test_header_defaults():
    text, parsed = roundtrip(Model(Graph("g")))
    assert text == 'model ir_version=10 opset={"": 21}\ngraph @g() {\n  return\n}\n'
    assert parsed.producer_name == "graphopt"
    bare = parse_model("graph @g() {\n  return\n}\n")
    assert (bare.ir_version, bare.opset_imports, bare.producer_name) == (10, {"": 21}, "graphopt")
    renamed = parse_model('model producer="" "1"\ngraph @g() {\n  return\n}\n')
    assert (renamed.producer_name, renamed.producer_version) == ("", "1")


def test_comments_and_free_layout():
    g = parse_graph(
        "# a comment\ngraph @g(%x: f32[2])   {  # the body\n  %y = Neg(\n    %x,\n  )\n  return %y}"
    )
    assert print_graph(g) == "graph @g(%x: f32[2]) {\n  %y = Neg(%x)\n  return %y\n}\n"


# ----- Loop, Scan, nesting, order ----------------------------------------------------------------

LOOP_SCAN = """\
graph @main(%n: i64[], %x: f32[2], %xs: f32[3,2]) {
  %one: f32[] = const 1.0
  %final: f32[2], %steps: f32[?,2] = Loop(%n, _, %x) {body = graph @body(%i: i64[], %c: bool[], %v: f32[2]) {
    %next: f32[2] = Add(%v, %x)
    %inner: f32[2] = If(%c) {then_branch = graph @deep() {
      %w: f32[2] = Mul(%next, %one)
      return %w
    }, else_branch = graph @shallow() {
      return %v
    }}
    return %c, %inner, %next
  }}
  %acc: f32[2], %ys: f32[3,2] = Scan(%x, %xs) {body = graph @step(%a: f32[2], %e: f32[2]) {
    %s: f32[2] = Add(%a, %e)
    %t: f32[2] = Mul(%s, %final)
    return %s, %t
  }, num_scan_inputs = 1}
  return %acc, %ys, %steps
}
"""


def test_loop_and_scan_with_nested_subgraphs_reading_outer_values():
    g = graph_roundtrip(LOOP_SCAN)
    loop, scan = g.nodes
    body = loop.attrs["body"].value
    add, if_node = body.nodes
    deep = if_node.attrs["then_branch"].value
    mul = deep.nodes[0]
    x, one = g.inputs[1], g.initializers["one"]
    assert add.inputs == (body.inputs[2], x)  # the Loop body reads the outer %x
    assert mul.inputs == (add.output, one)  # two levels down: the body's %next and the main %one
    assert scan.attrs["body"].value.nodes[1].inputs[1] is loop.outputs[0]
    assert {(n.op, i) for n, i in x.uses} == {("Loop", 2), ("Add", 1), ("Scan", 0)}
    assert all(sub.scope is g.scope for sub in (body, deep))
    assert scan.attrs["num_scan_inputs"].value == 1
    assert loop.inputs[1] is None


def test_out_of_order_statements_are_sorted():
    text = (
        "graph @g(%x: f32[2]) {\n"
        "  %z = Abs(%y)\n"
        "  %out = If(%c) {then_branch = graph @t() {\n"
        "    %late = Neg(%w)\n"
        "    %w = Relu(%y)\n"
        "    return %late\n"
        "  }, else_branch = graph @e() {\n"
        "    return %z\n"
        "  }}\n"
        "  %y = Neg(%x)\n"
        "  %c: bool[] = const true\n"
        "  return %out, %z\n"
        "}\n"
    )
    g = parse_graph(text)
    assert [n.op for n in g] == ["Neg", "Abs", "If"]  # the If reads %y inside @t: after Neg
    neg, _, if_node = g.nodes
    then = if_node.attrs["then_branch"].value
    assert [n.op for n in then] == ["Relu", "Neg"]
    assert then.nodes[0].inputs[0] is neg.output and then.outputs == [then.nodes[1].output]
    assert (then.nodes[0], 0) in neg.output.uses
    canonical = print_graph(g)
    assert canonical.index("%y = Neg(%x)") < canonical.index("%z = Abs(%y)")
    assert print_graph(parse_graph(canonical)) == canonical


def test_inner_names_shadow_outer_ones():
    text = (
        "graph @g(%x: f32[2], %c: bool[]) {\n"
        "  %y = If(%c) {then_branch = graph @t() {\n"
        "    %r = Neg(%x)\n"
        "    %x = Abs(%c)\n"
        "    return %r\n"
        "  }, else_branch = graph @e() {\n"
        "    return %x\n"
        "  }}\n"
        "  return %y\n"
        "}\n"
    )
    g = parse_graph(text)
    then, orelse = g.nodes[0].subgraphs()
    assert [n.op for n in then] == ["Abs", "Neg"]  # %x inside @t is @t's own %x
    assert then.nodes[1].inputs[0] is then.nodes[0].output
    assert orelse.outputs == [g.inputs[0]]
    printed = print_graph(g)
    assert "%x_1 = Abs(%c)" in printed and "%r = Neg(%x_1)" in printed
    assert print_graph(parse_graph(printed)) == printed


def test_large_graphs_print_and_parse_in_linear_time():
    def chain(n: int) -> Model:
        g = Graph("big")
        b = Builder(g)
        y = g.add_input("x", TensorType(DType.FLOAT, ("batch", 64)))
        for i in range(n):
            y = b.Relu(y) if i % 2 else b.Add(y, y)
            y.type = TensorType(DType.FLOAT, ("batch", 64))
        g.set_outputs([y])
        return Model(g)

    def seconds(model: Model) -> tuple[float, float]:
        start = time.perf_counter()
        text = print_model(model)
        middle = time.perf_counter()
        parse_model(text)
        return middle - start, time.perf_counter() - middle

    small, large = chain(2000), chain(20000)
    seconds(small)  # warm up
    (p1, r1), (p10, r10) = seconds(small), seconds(large)
    assert p10 < 2.0 and r10 < 5.0
    assert p10 < 30 * p1 + 0.2 and r10 < 30 * r1 + 0.5  # ~10x for 10x the nodes: linear


# ----- errors ------------------------------------------------------------------------------------

ERRORS = [
    ("graph @g(%a: f32[2], %b: f32[2]) {\n  %y = MatMul(%a, %b\n  return %y\n}\n", "2:21",
     "expected ',' or ')' after the inputs of MatMul"),
    ("graph @g(%a: f32[2]) {\n  %y = MatMul(%a %a)\n  return %y\n}\n", "2:18",
     "expected ',' or ')' after the inputs of MatMul, found %a"),
    ("graph @g(%x: f33[2]) {\n  return %x\n}\n", "1:14",
     "unknown element type 'f33'; known: bf16, bool,"),
    ("graph @g(%x) {\n  %y = Neg(%foo)\n  return %y\n}\n", "2:12", "%foo is not defined"),
    ("graph @g(%x) {\n  %y = Neg(%x)\n  %y = Abs(%x)\n  return %y\n}\n", "3:3",
     "%y is defined twice (first at 2:3)"),
    ("graph @g(%x, %x) {\n  return %x\n}\n", "1:14", "%x is defined twice"),
    ('graph @g(%x) {\n  %y = Neg(%x) name="abc\n  return %y\n}\n', "2:21", "unterminated string"),
    ('graph @g(%x) {\n  %y = Neg(%x) name="a\\q"\n  return %y\n}\n', "2:23", "unknown escape"),
    ("graph @g() {\n  %c: f32[3] = const [1.0, 2.0]\n  return %c\n}\n", "2:22",
     "f32[3] needs 3 values, got 2"),
    ('graph @g() {\n  %c: f32[1] = const b64"!!!!"\n  return %c\n}\n', "2:22", "invalid base64"),
    ('graph @g() {\n  %c: f32[2] = const b64"AAAA"\n  return %c\n}\n', "2:22",
     "f32[2] is 8 bytes, the base64 is 3"),
    ("graph @g() {\n  %c: i8[] = const 300\n  return %c\n}\n", "2:20",
     "300 does not fit in i8 (-128..127)"),
    ("graph @g() {\n  %c: i4[2] = const [1, 9]\n  return %c\n}\n", "2:25", "9 does not fit in i4"),
    ("graph @g() {\n  %c: bool[1] = const [1]\n  return %c\n}\n", "2:24",
     "expected a bool value (bool), found '1'"),
    ("graph @g() {\n  %c: f32[n] = const [1.0]\n  return %c\n}\n", "2:22",
     "needs a static shape, not f32[n]"),
    ("graph @g() {\n  %c = const [1.0]\n  return %c\n}\n", "2:8",
     "a const defines one value and gives its type"),
    ("graph @g(%x) {\n  %y = Neg(%x)\n}\n", "2:15", "expected 'return' at the end of graph @g"),
    ("graph @g(%x) {\n  %y = Foo(%x) {axes = []}\n  return %y\n}\n", "2:24",
     "an empty list needs its kind"),
    ('graph @g(%x) {\n  %y = Foo(%x) {axes = [1, "a"]}\n  return %y\n}\n', "2:24", "mixes"),
    ("graph @g(%x) {\n  %y = Foo(%x) {a = 1, a = 2}\n  return %y\n}\n", "2:24",
     "attribute 'a' of Foo is given twice"),
    ("graph @g(%x) {\n  %y = Foo(%x) {a = 1\n  return %y\n}\n", "2:22",
     "expected ',' or '}' after the attributes of Foo"),
    ("graph @g(%x) {\n  default %y = f32[] 1.0\n  return %x\n}\n", "2:11",
     "%y is not an input of graph @g"),
    ("graph @g() {\n  %c: f32[] = const <1.50 MiB>\n  return %c\n}\n", "2:21", "elided"),
    ("graph @g(%x) {\n  %a = Neg(%b)\n  %b = Neg(%a)\n  return %b\n}\n", "1:1",
     "the graph has a cycle"),
    ("graph @g(%x) {\n  %a = Add(%x, %a)\n  return %a\n}\n", "2:16",
     "%a is read by the node that defines it"),
    ("graph @g(%c) {\n  %a = If(%c) {b = graph @t() {\n    return %a\n  }}\n  return %a\n}\n",
     "3:12", "%a is read inside a subgraph of the node that defines it"),
    ("graph @g(%x) {\n  return %x\n}\nextra\n", "4:1", "unexpected 'extra' after the graph"),
    ("graph @g(%x) {\n  %y = Neg($x)\n  return %y\n}\n", "2:12", "unexpected character '$'"),
    ("graph @g(%x) {\n  %y = Neg(%x) {t = tensor c64[1] [1.0]}\n  return %y\n}\n", "2:35",
     'c64 tensors are written as b64"..."'),
    ("graph @g(%x) {\n  %y: seq<f32[2] = Neg(%x)\n  return %y\n}\n", "2:18", "expected '>'"),
    ("graph @g(%x) {\n  3\n}\n", "2:3", "expected a statement, found '3'"),
    ("graph g() {\n  return\n}\n", "1:7", "expected the graph's name (@name) after 'graph'"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "where", "message"), ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_parse_errors_say_where_and_what(text: str, where: str, message: str):
    with pytest.raises(TextParseError) as info:
        parse_graph(text)
    error = info.value
    assert error.where == where, str(error)
    assert message in error.message, str(error)
    assert str(error).startswith(f"{where}: ")


def test_error_hints():
    with pytest.raises(TextParseError) as info:
        parse_graph("graph @g(%input) {\n  %y = Neg(%inptu)\n  return %y\n}\n")
    assert info.value.hint == "did you mean %input?"
    with pytest.raises(TextParseError) as info:
        parse_model("model ir_verison=3\ngraph @g() {\n  return\n}\n")
    assert "'ir_verison' is not a model field" in str(info.value)
    assert "ir_version" in (info.value.hint or "")


# ----- real models -------------------------------------------------------------------------------


def node_test_models() -> list[tuple[str, onnx.ModelProto]]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [(case.name, case.model) for case in collect_testcases(None)]


def light_models() -> list[tuple[str, onnx.ModelProto]]:
    files = sorted(f for f in os.listdir(LIGHT) if f.endswith(".onnx"))
    return [(f, onnx.load(os.path.join(LIGHT, f))) for f in files]


def test_every_imported_node_test_case_and_light_model_round_trips():
    from graphopt.frontends.onnx import from_onnx

    cases = node_test_models() + light_models()
    imported, differ = 0, []
    for name, proto in cases:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = from_onnx(proto)
        except Exception:  # a case the frontend refuses is not the text form's business
            continue
        imported += 1
        text = print_model(model)
        if print_model(parse_model(text)) != text:
            differ.append(name)
    assert len(cases) > 1500 and imported > 0.95 * len(cases)
    assert differ == []


@pytest.mark.parametrize("name", ["light_squeezenet.onnx", "light_shufflenet.onnx",
                                  "light_inception_v1.onnx"])  # fmt: skip
def test_parsed_light_models_export_and_run_the_same(name: str):
    import onnxruntime

    from graphopt.backends.onnx import to_onnx
    from graphopt.frontends.onnx import from_onnx

    proto = onnx.load(os.path.join(LIGHT, name))
    model = from_onnx(proto)
    parsed = parse_model(print_model(model))
    exported = to_onnx(parsed)
    onnx.checker.check_model(exported)
    assert exported.SerializeToString() == to_onnx(model).SerializeToString()

    initializers = {t.name for t in proto.graph.initializer}
    feeds = {}
    for info in proto.graph.input:
        if info.name not in initializers:
            shape = [d.dim_value or 1 for d in info.type.tensor_type.shape.dim]
            n = int(np.prod(shape))
            feeds[info.name] = (np.arange(n).reshape(shape) / n).astype(np.float32)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3

    def run(m: onnx.ModelProto) -> list[Any]:
        session = onnxruntime.InferenceSession(
            m.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        return session.run(None, feeds)

    for want, got in zip(run(proto), run(exported), strict=True):
        np.testing.assert_array_equal(got, want)
