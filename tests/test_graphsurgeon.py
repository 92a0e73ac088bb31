"""onnx-graphsurgeon interop: IR -> gs -> IR and gs -> IR -> gs keep what models compute (checked with
ONNX Runtime), share weight arrays instead of copying them, and refuse what gs cannot hold."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.backends.onnx import to_onnx
from graphopt.frontends.graphsurgeon import from_graphsurgeon, to_graphsurgeon
from graphopt.ir import (
    Attribute,
    AttrKind,
    DType,
    Graph,
    GraphoptError,
    InvalidGraphError,
    Model,
    Node,
    OptionalType,
    SequenceType,
    TensorType,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "tiny_transformer.onnx")
LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
LIGHT_MODELS = sorted(glob.glob(os.path.join(LIGHT, "*.onnx")))
F32 = TensorType(DType.FLOAT, (3,))


# ----- helpers ---------------------------------------------------------------------------------


def run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # no graph rewrites: the light models then build in milliseconds, and the test stays fast
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def run_ir(model: Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return run(to_onnx(model), feeds)


def run_gs(graph: gs.Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return run(gs.export_onnx(graph), feeds)


def assert_same(actual: list[np.ndarray], expected: list[np.ndarray], rtol: float = 1e-6) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=1e-6)


def gs_constants(graph: gs.Graph) -> dict[str, gs.Constant]:
    """Every Constant a gs graph reads, subgraphs included, by name."""
    found: dict[str, gs.Constant] = {}
    for g in [graph, *graph.subgraphs(recursive=True)]:
        found.update((n, t) for n, t in g.tensors().items() if isinstance(t, gs.Constant))
    return found


def tiny_feeds(seq: int = 5) -> dict[str, np.ndarray]:
    mask = np.triu(np.full((1, 1, seq, seq), -1e9, np.float32), 1)
    return {"input_ids": (np.arange(seq, dtype=np.int64) * 7 % 50)[None], "causal_mask": mask}


def light_feeds(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The inputs the onnx backend test runner uses for the light models."""
    initializers = {t.name for t in proto.graph.initializer}
    feeds = {}
    for info in proto.graph.input:
        if info.name in initializers:
            continue
        dims = info.type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in dims)
        n = int(np.prod(shape))
        feeds[info.name] = (np.arange(n).reshape(shape) / n).astype(np.float32)
    return feeds


def control_flow_model() -> onnx.ModelProto:
    """If and Loop whose bodies read outer values: an initializer (W), a graph input (x) and a node
    output (xw); the Loop omits its optional `cond` input; the then-branch has its own initializer."""
    f3 = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in ("t", "e", "s_out")]
    two = numpy_helper.from_array(np.full(3, 2.0, np.float32), "two")
    then_branch = helper.make_graph(
        [
            helper.make_node("Add", ["xw", "W"], ["t0"]),
            helper.make_node("Mul", ["t0", "two"], ["t"]),
        ],
        "then",
        [],
        [f3[0]],
        [two],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Sub", ["x", "W"], ["e"])], "else", [], [f3[1]]
    )
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["c_in"], ["c_out"]),
            helper.make_node("Add", ["s_in", "W"], ["s_add"]),
            helper.make_node("Mul", ["s_add", "x"], ["s_out"]),
            helper.make_node("Cast", ["i"], ["i_f"], to=TensorProto.FLOAT),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [3]),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            f3[2],
            helper.make_tensor_value_info("i_f", TensorProto.FLOAT, []),
        ],
    )
    nodes = [
        helper.make_node("Mul", ["x", "W"], ["xw"]),
        helper.make_node("If", ["c"], ["y_if"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Loop", ["n", "", "x"], ["y_loop", "y_scan"], body=body),
    ]
    graph = helper.make_graph(
        nodes,
        "control_flow",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("n", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("y_if", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("y_loop", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("y_scan", TensorProto.FLOAT, [None]),
        ],
        [numpy_helper.from_array(np.array([1.0, -2.0, 0.5], np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# ----- the example and the light models --------------------------------------------------------


def test_tiny_transformer_ir_to_gs_and_back_runs_the_same_and_shares_weights():
    model = graphopt.load(TINY)
    feeds = tiny_feeds()
    expected = run(onnx.load(TINY), feeds)

    graph = graphopt.to_graphsurgeon(model)  # the public API forwards to the frontend
    assert_same(run_gs(graph, feeds), expected)
    constants = gs_constants(graph)
    assert constants and set(constants) == set(model.graph.initializers)
    for name, value in model.graph.initializers.items():
        assert constants[name].values is value.const_value

    back = graphopt.from_graphsurgeon(graph)
    assert_same(run_ir(back, feeds), expected)
    for name, value in back.graph.initializers.items():
        assert value.const_value is model.graph.initializers[name].const_value
    assert [v.name for v in back.graph.inputs] == ["input_ids", "causal_mask"]
    assert back.graph.inputs[1].type == TensorType(DType.FLOAT, (1, 1, "seq", "seq"))
    assert back.opset_imports == {"": 17} and back.ir_version == 8
    assert back.producer_name == "graphopt-example"


def test_tiny_transformer_gs_to_ir_and_back_runs_the_same_and_shares_weights():
    graph = gs.import_onnx(onnx.load(TINY))
    feeds = tiny_feeds(3)
    expected = run_gs(graph, feeds)

    model = from_graphsurgeon(graph)
    assert_same(run_ir(model, feeds), expected)
    constants = gs_constants(graph)
    for name, value in model.graph.initializers.items():
        assert not isinstance(constants[name]._values, gs.ir.tensor.LazyValues)  # loaded once
        assert value.const_value is constants[name].values

    again = to_graphsurgeon(model)
    assert_same(run_gs(again, feeds), expected)
    for name, constant in gs_constants(again).items():
        assert constant.values is constants[name].values
    assert [t.name for t in again.outputs] == [t.name for t in graph.outputs]
    assert again.opset == 17 and again.ir_version == 8


@pytest.mark.parametrize("path", LIGHT_MODELS, ids=lambda p: os.path.basename(p)[6:-5])
def test_light_model_round_trips(path: str):
    """gs -> IR -> gs -> IR: both round trips in one chain, checked by one ONNX Runtime run
    (these models are compute-heavy). The weights stay the same arrays all along."""
    proto = onnx.load(path)
    expected = numpy_helper.to_array(onnx.load_tensor(path[: -len(".onnx")] + "_output_0.pb"))
    native = gs.import_onnx(proto)
    model = from_graphsurgeon(native)
    graph = to_graphsurgeon(model)
    back = from_graphsurgeon(graph)

    before, after = gs_constants(native), gs_constants(graph)
    assert (
        set(before) == set(after) == set(back.graph.initializers) == set(model.graph.initializers)
    )
    for name, value in back.graph.initializers.items():
        array = model.graph.initializers[name].const_value
        assert array is before[name].values and array is after[name].values
        assert value.const_value is array
    (actual,) = run_ir(back, light_feeds(proto))
    rtol = 2e-3 if "densenet" in path else 1e-3
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-7)


def test_light_model_weights_as_input_defaults():
    """graphopt keeps the weights of IR-version-3 models as inputs with defaults; gs holds them as
    Constants in `graph.inputs`, which its exporter writes back as inputs with initializers."""
    path = os.path.join(LIGHT, "light_squeezenet.onnx")
    proto = onnx.load(path)
    model = graphopt.load(path)
    graph = to_graphsurgeon(model)
    defaults = [t for t in graph.inputs if isinstance(t, gs.Constant)]
    assert len(defaults) == len(model.graph.initializers) > 0
    for constant in defaults:
        assert constant.values is model.graph.initializers[constant.name].const_value
    exported = gs.export_onnx(graph)
    assert {i.name for i in exported.graph.input} == {i.name for i in proto.graph.input}
    assert {t.name for t in exported.graph.initializer} == {t.name for t in proto.graph.initializer}
    back = from_graphsurgeon(graph)
    assert all(v.is_graph_input for v in back.graph.initializers.values())
    expected = numpy_helper.to_array(onnx.load_tensor(path[: -len(".onnx")] + "_output_0.pb"))
    (actual,) = run(exported, light_feeds(proto))
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-7)


# ----- control flow ------------------------------------------------------------------------------


@pytest.mark.parametrize("cond", [True, False])
def test_if_and_loop_with_outer_scope_reads_round_trip(cond: bool):
    proto = control_flow_model()
    feeds = {
        "x": np.array([1.0, 2.0, 3.0], np.float32),
        "c": np.array(cond),
        "n": np.array(3, np.int64),
    }
    expected = run(proto, feeds)

    # gs -> IR: W is one gs Constant read by the main graph and the Loop body: one IR initializer.
    graph = gs.import_onnx(proto)
    model = from_graphsurgeon(graph)
    assert list(model.graph.initializers) == ["W"]
    w = model.graph.initializers["W"]
    loop = next(n for n in model.graph if n.op == "Loop")
    body = loop.subgraphs()[0]
    assert any(user.graph is body for user in w.users())
    assert loop.inputs[1] is None  # the omitted optional `cond`
    if_node = next(n for n in model.graph if n.op == "If")
    then_branch = if_node.attrs["then_branch"].value
    assert list(then_branch.initializers) == ["two"]
    assert then_branch.nodes[0].inputs[0] is model.graph.nodes[0].output  # reads outer `xw`
    assert_same(run_ir(model, feeds), expected)
    again = to_graphsurgeon(model)
    assert_same(run_gs(again, feeds), expected)
    assert gs_constants(again)["W"].values is gs_constants(graph)["W"].values

    # IR -> gs -> IR
    model = graphopt.load(proto)
    graph = to_graphsurgeon(model)
    gs_loop = next(n for n in graph.nodes if n.op == "Loop")
    assert gs_loop.inputs[1].is_empty()
    body_graph = gs_loop.attrs["body"]
    assert isinstance(body_graph, gs.Graph)
    assert body_graph.nodes[1].inputs[1] is graph.nodes[0].inputs[1]  # the same W tensor
    graph.cleanup().toposort()  # gs's own tools work on the converted graph
    assert_same(run_gs(graph, feeds), expected)
    back = from_graphsurgeon(graph)
    assert_same(run_ir(back, feeds), expected)
    assert back.graph.initializers["W"].const_value is model.graph.initializers["W"].const_value


# ----- editing in gs -----------------------------------------------------------------------------


def test_graph_edited_with_gs_converts_and_runs():
    feeds = tiny_feeds(4)
    (expected,) = run(onnx.load(TINY), feeds)
    graph = to_graphsurgeon(graphopt.load(TINY))

    # Scale the output by 0.5 with a node put at the *front* of the node list, and leave a dead
    # node behind; then let gs clean up and sort.
    out = graph.outputs[0]
    producer = out.inputs[0]
    pre = gs.Variable("pre_scale", dtype=np.float32)
    producer.outputs = [pre]
    half = gs.Constant("half_scale", np.array(0.5, np.float32))
    graph.nodes.insert(0, gs.Node("Mul", name="scale", inputs=[pre, half], outputs=[out]))
    graph.nodes.append(gs.Node("Neg", inputs=[pre], outputs=[gs.Variable("dead")]))

    unsorted = from_graphsurgeon(graph)  # sorts on its own; keeps the dead node
    assert [n.op for n in unsorted.graph][-2:] in (["Mul", "Neg"], ["Neg", "Mul"])
    np.testing.assert_allclose(run_ir(unsorted, feeds)[0], expected * 0.5, rtol=1e-6)

    graph.cleanup().toposort()
    model = from_graphsurgeon(graph)
    assert "Neg" not in [n.op for n in model.graph]
    assert model.graph.initializers["half_scale"].const_value is half.values
    np.testing.assert_allclose(run_ir(model, feeds)[0], expected * 0.5, rtol=1e-6)
    np.testing.assert_allclose(run_gs(graph, feeds)[0], expected * 0.5, rtol=1e-6)


def test_new_tensor_object_with_an_existing_name_refers_to_that_tensor():
    x = gs.Variable("x", dtype=np.float32, shape=[3])
    y = gs.Variable("y", dtype=np.float32, shape=[3])
    node = gs.Node("Neg", inputs=[gs.Variable("x")], outputs=[y])  # by name, as gs exports it
    model = from_graphsurgeon(gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=17))
    assert model.graph.nodes[0].inputs[0] is model.graph.inputs[0]
    (out,) = run_ir(model, {"x": np.ones(3, np.float32)})
    np.testing.assert_array_equal(out, -np.ones(3, np.float32))


# ----- values, types, names --------------------------------------------------------------------


def test_types_and_symbolic_unknown_dims_round_trip():
    g = Graph("types")
    x = g.add_input("x", TensorType(DType.FLOAT, ("batch", None, 4)))
    h = g.add_input("h", TensorType(DType.BFLOAT16, None))
    s = g.add_input("s", SequenceType(TensorType(DType.INT64, ("n",))))
    node = Node("com.example.Op", [x, h, s], outputs=1)
    node.outputs[0].type = TensorType(DType.FLOAT16, (2, "k"))
    g.append(node)
    g.set_outputs([node.output], ["y"])
    graph = to_graphsurgeon(Model(g, opset_imports={"": 17, "com.example": 2}))

    gx, gh, gsq = graph.inputs
    assert gx.dtype == np.float32 and gx.shape == ["batch", None, 4]
    assert gh.dtype == TensorProto.BFLOAT16 and gh.shape is None
    assert gsq.type == "sequence_type" and gsq.dtype == np.int64
    assert graph.nodes[0].op == "Op" and graph.nodes[0].domain == "com.example"
    exported = gs.export_onnx(graph)
    assert {(o.domain, o.version) for o in exported.opset_import} == {("", 17), ("com.example", 2)}
    assert exported.graph.input[0].type.tensor_type.shape.dim[1].dim_param == ""

    back = from_graphsurgeon(graph)
    assert [v.type for v in back.graph.inputs] == [v.type for v in g.inputs]
    assert back.graph.outputs[0].type == TensorType(DType.FLOAT16, (2, "k"))
    assert back.opset_imports == {"": 17, "com.example": 2}
    assert back.graph.nodes[0].op == "com.example.Op"


def test_gs_dynamic_dims_dtypes_and_missing_types():
    x = gs.Variable("x", dtype=np.float32, shape=[-1, "n", None])
    y = gs.Variable("y")  # no type known
    graph = gs.Graph(nodes=[gs.Node("Relu", inputs=[x], outputs=[y])], inputs=[x], outputs=[y])
    model = from_graphsurgeon(graph)
    assert model.graph.inputs[0].type == TensorType(DType.FLOAT, (None, "n", None))
    assert model.graph.outputs[0].type is None
    assert model.opset_imports == {"": graph.opset}


def test_output_names_that_differ_from_their_values():
    g = Graph("main")
    x = g.add_input("x", F32)
    w = g.add_initializer("w", np.array([1.0, 2.0, 3.0], np.float32))
    node = Node("Add", [x, w], name="add")
    g.append(node)
    node.output.name = "sum"
    node.output.type = F32
    # a node output under another name, an input passed straight through, an initializer as output
    g.set_outputs([node.output, x, w], ["out", "x_copy", "weights"])
    model = Model(g, opset_imports={"": 17})
    graph = to_graphsurgeon(model)
    assert [t.name for t in graph.outputs] == ["out", "x_copy", "weights"]
    feeds = {"x": np.array([1.0, 1.0, 1.0], np.float32)}
    expected = run_ir(model, feeds)
    assert_same(run_gs(graph, feeds), expected)
    back = from_graphsurgeon(graph)
    assert back.graph.output_names == ["out", "x_copy", "weights"]
    assert_same(run_ir(back, feeds), expected)


def test_omitted_optional_inputs_and_outputs():
    proto = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("Clip", ["x", "", "hi"], ["clipped"]),
                helper.make_node("Dropout", ["clipped"], ["y", ""]),
            ],
            "optional",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
            [numpy_helper.from_array(np.array(1.5, np.float32), "hi")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    feeds = {"x": np.array([-4.0, 1.0, 9.0], np.float32)}
    expected = run(proto, feeds)
    graph = to_graphsurgeon(graphopt.load(proto))
    clip, dropout = graph.nodes
    assert clip.inputs[1].is_empty() and dropout.outputs[1].is_empty()
    assert_same(run_gs(graph, feeds), expected)
    back = from_graphsurgeon(graph)
    assert back.graph.nodes[0].inputs[1] is None
    assert back.graph.nodes[1].outputs[1].name == ""
    assert_same(run_ir(back, feeds), expected)
    exported = to_onnx(back)
    assert list(exported.graph.node[0].input)[1] == ""
    assert list(exported.graph.node[1].output) == ["y", ""]


def test_input_with_default_becomes_a_constant_graph_input():
    g = Graph("main")
    x = g.add_input("x", F32)
    scale = g.add_input("scale", F32)
    g.set_input_default(scale, np.array([2.0, 2.0, 2.0], np.float32))
    node = g.append(Node("Mul", [x, scale]))
    node.output.type = F32
    g.set_outputs([node.output], ["y"])
    model = Model(g, opset_imports={"": 17})
    graph = to_graphsurgeon(model)
    assert isinstance(graph.inputs[1], gs.Constant)
    assert graph.inputs[1].values is scale.const_value
    ones = np.ones(3, np.float32)
    assert_same(run_gs(graph, {"x": ones}), [2 * ones])
    assert_same(run_gs(graph, {"x": ones, "scale": 3 * ones}), [3 * ones])  # still overridable
    back = from_graphsurgeon(graph)
    value = back.graph.inputs[1]
    assert value.is_graph_input and value.const_value is scale.const_value
    assert_same(run_ir(back, {"x": ones, "scale": 3 * ones}), [3 * ones])


def test_model_fields_and_functions_are_carried():
    function = helper.make_function(
        "com.example",
        "Double",
        ["a"],
        ["b"],
        [helper.make_node("Add", ["a", "a"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    proto = helper.make_model(
        helper.make_graph(
            [helper.make_node("Double", ["x"], ["y"], domain="com.example", name="double")],
            "with_function",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
            doc_string="the graph",
        ),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
        functions=[function],
        producer_name="tests",
        producer_version="1.2",
    )
    proto.ir_version = 9
    feeds = {"x": np.array([1.0, 2.0, 3.0], np.float32)}
    expected = run(proto, feeds)

    graph = to_graphsurgeon(graphopt.load(proto))
    assert graph.name == "with_function" and graph.doc_string == "the graph"
    assert (graph.producer_name, graph.producer_version, graph.ir_version) == ("tests", "1.2", 9)
    assert [(f.domain, f.name) for f in graph.functions] == [("com.example", "Double")]
    assert graph.nodes[0].name == "double"
    assert_same(run_gs(graph, feeds), expected)

    back = from_graphsurgeon(graph)
    assert back.graph.name == "with_function" and back.graph.doc_string == "the graph"
    assert back.opset_imports == {"": 17, "com.example": 1}
    assert (back.producer_name, back.producer_version, back.ir_version) == ("tests", "1.2", 9)
    assert [f.name for f in back.functions] == ["Double"]
    assert_same(run_ir(back, feeds), expected)


# ----- attributes --------------------------------------------------------------------------------


def test_attributes_of_every_kind_round_trip():
    g = Graph("attrs")
    x = g.add_input("x", F32)
    weights = np.arange(6, dtype=np.float32).reshape(2, 3)
    attrs = {
        "f": 1.5,
        "i": 3,
        "s": "hello",
        "t": weights,
        "floats": [0.5, 2.0],
        "ints": [1, -2],
        "strings": ["a", "b"],
        "tensors": Attribute(AttrKind.TENSORS, [np.array([1, 2], np.int64)]),
        "tp": Attribute(AttrKind.TYPE_PROTO, TensorType(DType.INT64, (2,))),
        "sparse": Attribute(
            AttrKind.SPARSE_TENSOR,
            helper.make_sparse_tensor(
                numpy_helper.from_array(np.array([5.0], np.float32)),
                numpy_helper.from_array(np.array([1], np.int64)),
                [3],
            ),
        ),
    }
    node = g.append(Node("com.example.Custom", [x, None], attrs, outputs=2, name="custom"))
    node.outputs[0].type = F32
    g.set_outputs([node.outputs[0]], ["y"])
    graph = to_graphsurgeon(Model(g, opset_imports={"": 17, "com.example": 1}))

    custom = graph.nodes[0]
    assert (custom.op, custom.domain, custom.name) == ("Custom", "com.example", "custom")
    assert custom.inputs[1].is_empty()
    assert custom.attrs["f"] == 1.5 and custom.attrs["i"] == 3 and custom.attrs["s"] == "hello"
    assert isinstance(custom.attrs["t"], gs.Constant) and custom.attrs["t"].values is weights
    assert custom.attrs["strings"] == ["a", "b"] and custom.attrs["ints"] == [1, -2]
    exported = gs.export_onnx(graph)  # gs writes every kind
    kinds = {a.name: a.type for a in exported.graph.node[0].attribute}
    assert kinds == {name: int(a.kind) for name, a in node.attrs.items()}

    back = from_graphsurgeon(graph).graph.nodes[0]
    assert back.op == "com.example.Custom" and back.name == "custom" and back.inputs[1] is None
    assert {n: a.kind for n, a in back.attrs.items()} == {n: a.kind for n, a in node.attrs.items()}
    assert back.attrs["t"].value is weights
    for name in ("f", "i", "s", "floats", "ints", "strings", "tp"):
        assert back.attrs[name].value == node.attrs[name].value
    np.testing.assert_array_equal(back.attrs["tensors"].value[0], np.array([1, 2]))
    assert back.attrs["sparse"].value == attrs["sparse"].value


def test_gs_attribute_values_users_write():
    x = gs.Variable("x", dtype=np.int32, shape=[3])
    y = gs.Variable("y", dtype=np.float32, shape=[3])
    z = gs.Variable("z", dtype=np.float32, shape=[1])
    values = gs.Constant("values", np.array([7.0], np.float32))
    nodes = [
        gs.Node("Cast", inputs=[x], outputs=[y], attrs={"to": np.float32}),  # a dtype
        gs.Node("Constant", outputs=[z], attrs={"value": values}),
        gs.Node("Constant", outputs=[gs.Variable("e")], attrs={"value_floats": []}),
    ]
    model = from_graphsurgeon(gs.Graph(nodes=nodes, inputs=[x], outputs=[y, z], opset=17))
    cast, constant, empty = model.graph.nodes
    assert cast.attrs["to"] == Attribute(AttrKind.INT, int(TensorProto.FLOAT))
    assert constant.attrs["value"].value is values.values
    assert empty.attrs["value_floats"].kind is AttrKind.FLOATS  # kind from the op's schema
    y_out, z_out = run_ir(model, {"x": np.array([1, 2, 3], np.int32)})
    np.testing.assert_array_equal(y_out, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(z_out, [7.0])


def test_string_constants_are_written_correctly_by_gs():
    g = Graph("strings")
    x = g.add_input("x", TensorType(DType.STRING, (2,)))
    words = g.add_initializer("words", np.array(["a", "bc"], dtype=object))
    node = g.append(Node("Concat", [x, words], {"axis": 0}))
    node.output.type = TensorType(DType.STRING, (4,))
    g.set_outputs([node.output], ["y"])
    graph = to_graphsurgeon(Model(g, opset_imports={"": 17}))
    exported = gs.export_onnx(graph)
    np.testing.assert_array_equal(
        numpy_helper.to_array(exported.graph.initializer[0]).astype(str), ["a", "bc"]
    )
    (out,) = run(exported, {"x": np.array(["p", "q"], dtype=object)})
    assert list(out) == ["p", "q", "a", "bc"]


def test_narrow_dtypes_are_written_correctly_both_ways():
    int4 = np.array([1, -2, 3], dtype=DType.INT4.numpy)
    bf16 = np.array([1.5, -2.0], dtype=DType.BFLOAT16.numpy)
    g = Graph("narrow")
    values = [g.add_initializer("q", int4), g.add_initializer("b", bf16)]
    nodes = [g.append(Node("Identity", [v])) for v in values]
    for node, value in zip(nodes, values, strict=True):
        node.output.type = value.type
    g.set_outputs([n.output for n in nodes], ["q_out", "b_out"])
    graph = to_graphsurgeon(Model(g, opset_imports={"": 21}))
    constants = gs_constants(graph)
    assert constants["b"].values is bf16  # gs writes bfloat16 arrays correctly: shared
    assert isinstance(constants["q"]._values, gs.ir.tensor.LazyValues)  # int4 it would not

    def written(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
        return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}

    exported = written(gs.export_onnx(graph))
    for name, array in (("q", int4), ("b", bf16)):
        assert exported[name].dtype == array.dtype
        np.testing.assert_array_equal(exported[name].astype(np.float32), array.astype(np.float32))

    native = gs.import_onnx(gs.export_onnx(graph))
    model = from_graphsurgeon(native)
    q = model.graph.initializers["q"].const_value
    assert q.dtype == int4.dtype and q.astype(np.int8).tolist() == [1, -2, 3]
    assert model.graph.initializers["b"].const_value is gs_constants(native)["b"].values
    assert isinstance(gs_constants(native)["q"]._values, gs.ir.tensor.LazyValues)  # left alone
    again = written(gs.export_onnx(native))["q"]
    assert again.astype(np.int8).tolist() == [1, -2, 3]


# ----- what gs cannot hold ---------------------------------------------------------------------


def _one_node_model(node: Node) -> Model:
    g = Graph("main")
    x = g.add_input("x", F32)
    node.set_inputs([x])
    g.append(node)
    g.set_outputs([node.outputs[0]], ["y"])
    return Model(g, opset_imports={"": 17})


def test_graphs_attributes_are_refused():
    body = Graph("body")
    node = Node("com.example.Multi", [], {"bodies": Attribute(AttrKind.GRAPHS, [body])})
    with pytest.raises(GraphoptError, match="GRAPHS") as error:
        to_graphsurgeon(_one_node_model(node))
    assert error.value.hint


def test_overloads_and_optional_interface_types_are_refused():
    node = Node("Relu")
    node.overload = "v2"
    with pytest.raises(GraphoptError, match="overload"):
        to_graphsurgeon(_one_node_model(node))
    model = _one_node_model(Node("Identity"))
    model.graph.inputs[0].type = OptionalType(F32)
    with pytest.raises(GraphoptError, match="cannot write"):
        to_graphsurgeon(model)


def test_default_with_another_type_than_its_input_is_refused():
    g = Graph("main")
    x = g.add_input("x", TensorType(DType.FLOAT, ("n",)))
    g.set_input_default(x, np.zeros(3, np.float32))
    g.set_outputs([x], ["y"])
    with pytest.raises(GraphoptError, match="default"):
        to_graphsurgeon(Model(g))


def test_annotations_gs_has_no_place_for_are_reported():
    node = Node("Relu")
    node.doc_string = "why"
    model = _one_node_model(node)
    model.metadata = {"author": "me"}
    with pytest.warns(UserWarning, match="metadata_props.*node doc strings|node doc strings"):
        to_graphsurgeon(model)


def test_broken_gs_graphs_are_reported():
    x = gs.Variable("x", dtype=np.float32, shape=[3])
    orphan = gs.Variable("orphan", dtype=np.float32)
    y = gs.Variable("y", dtype=np.float32)
    graph = gs.Graph(
        nodes=[gs.Node("Add", inputs=[x, orphan], outputs=[y])], inputs=[x], outputs=[y]
    )
    with pytest.raises(InvalidGraphError, match="orphan"):
        from_graphsurgeon(graph)

    folded = gs.Graph(
        nodes=[gs.Node("Relu", inputs=[x], outputs=[gs.Constant("c", np.ones(3, np.float32))])],
        inputs=[x],
    )
    with pytest.raises(InvalidGraphError, match="cleanup"):
        from_graphsurgeon(folded)
    with pytest.raises(TypeError):
        from_graphsurgeon(onnx.ModelProto())  # type: ignore[arg-type]


def test_importing_the_module_does_not_import_graphsurgeon():
    code = (
        "import sys, graphopt.frontends.graphsurgeon; "
        "assert 'onnx_graphsurgeon' not in sys.modules, 'imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
