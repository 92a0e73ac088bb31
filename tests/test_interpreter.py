"""The reference interpreter agrees with ONNX Runtime and with the ONNX spec's own reference code,
including control flow, opset-dependent semantics and its own fast kernels; bad inputs and failing
nodes are reported by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import graphopt
from graphopt.api.feeds import random_feeds
from graphopt.backends.reference import ExecutionError, InputError, Interpreter
from graphopt.ir import Builder, DType, Graph, Model, TensorType, UnsupportedOpError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_transformer.onnx"
F = TensorProto.FLOAT


def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _ours(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return list(Interpreter(graphopt.load(model), check_types=True).run(feeds).values())


def _model(nodes, inputs, outputs, opset=18, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape, elem=F):
    return helper.make_tensor_value_info(name, elem, shape)


def test_example_model_matches_onnxruntime():
    model = graphopt.load(EXAMPLE)
    feeds = random_feeds(model, dims={"seq": 7})
    ours = Interpreter(model, check_types=True).run(feeds)
    (expected,) = _ort(onnx.load(EXAMPLE), feeds)
    np.testing.assert_allclose(ours["logits"], expected, rtol=1e-4, atol=1e-5)


def test_if_reads_outer_values():
    then = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["t"])], "then", [], [_vi("t", [2])]
    )
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [_vi("e", [2])])
    model = _model(
        [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        [_vi("x", [2]), _vi("c", [], TensorProto.BOOL)],
        [_vi("y", [2])],
        initializers=[helper.make_tensor("w", F, [2], [10.0, 20.0])],
    )
    x = np.array([1.0, 2.0], np.float32)
    for cond in (True, False):
        feeds = {"x": x, "c": np.array(cond)}
        np.testing.assert_array_equal(_ours(model, feeds)[0], _ort(model, feeds)[0])


def _loop_model(with_trip_count: bool, with_cond: bool) -> onnx.ModelProto:
    """sum = sum + x * i while i < limit; also stacks each step's partial sum."""
    body = helper.make_graph(
        [
            helper.make_node("Cast", ["i"], ["i_f"], to=F),
            helper.make_node("Mul", ["x", "i_f"], ["xi"]),
            helper.make_node("Add", ["acc_in", "xi"], ["acc_out"]),
            helper.make_node("Less", ["i", "limit"], ["go"]),
            helper.make_node("Identity", ["acc_out"], ["scan"]),
        ],
        "body",
        [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL), _vi("acc_in", [2])],
        [_vi("go", [], TensorProto.BOOL), _vi("acc_out", [2]), _vi("scan", [2])],
    )
    inputs = ["m" if with_trip_count else "", "c" if with_cond else "", "acc0"]
    return _model(
        [helper.make_node("Loop", inputs, ["acc", "partials"], body=body)],
        [_vi("x", [2]), _vi("m", [], TensorProto.INT64), _vi("c", [], TensorProto.BOOL),
         _vi("acc0", [2]), _vi("limit", [], TensorProto.INT64)],
        [_vi("acc", [2]), _vi("partials", [None, 2])],
    )  # fmt: skip


@pytest.mark.parametrize("trip,cond", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("limit,m,c", [(3, 10, True), (9, 4, True), (5, 6, False)])
def test_loop_matches_onnxruntime(trip, cond, limit, m, c):
    model = _loop_model(trip, cond)
    feeds = {
        "x": np.array([1.0, -2.0], np.float32), "m": np.array(m, np.int64),
        "c": np.array(c), "acc0": np.zeros(2, np.float32), "limit": np.array(limit, np.int64),
    }  # fmt: skip
    for ours, expected in zip(_ours(model, feeds), _ort(model, feeds), strict=True):
        np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize(
    "directions,axes,out_axes", [([0], [0], [0]), ([1], [1], [1]), ([1], [0], [1])]
)
def test_scan_matches_onnxruntime(directions, axes, out_axes):
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "row"], ["s_out"]),
         helper.make_node("Mul", ["s_out", "w"], ["y"])],
        "body", [_vi("s_in", [3]), _vi("row", [3])], [_vi("s_out", [3]), _vi("y", [3])],
    )  # fmt: skip
    node = helper.make_node(
        "Scan", ["s0", "xs"], ["s", "ys"], body=body, num_scan_inputs=1,
        scan_input_directions=directions, scan_input_axes=axes, scan_output_axes=out_axes,
    )  # fmt: skip
    model = _model(
        [node], [_vi("s0", [3]), _vi("xs", [3, 3])], [_vi("s", [3]), _vi("ys", [3, 3])],
        initializers=[helper.make_tensor("w", F, [3], [1.0, 0.5, -1.0])],
    )  # fmt: skip
    feeds = {"s0": np.zeros(3, np.float32), "xs": np.arange(9, dtype=np.float32).reshape(3, 3)}
    for ours, exp in zip(_ours(model, feeds), _ort(model, feeds), strict=True):
        np.testing.assert_allclose(ours, exp)


def test_softmax_follows_its_opset():
    """Softmax-11 flattens at axis 1 (its default); Softmax-13 works on the last axis."""
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    for opset in (11, 13):
        model = _model([helper.make_node("Softmax", ["x"], ["y"])], [_vi("x", [2, 3, 4])],
                       [_vi("y", [2, 3, 4])], opset=opset)  # fmt: skip
        np.testing.assert_allclose(_ours(model, {"x": x})[0], _ort(model, {"x": x})[0], rtol=1e-5)


def test_batch_normalization_9_runs_in_inference_mode():
    rng = np.random.default_rng(1)
    params = [
        helper.make_tensor(name, F, [3], rng.random(3).astype(np.float32) + 0.5)
        for name in ("scale", "bias", "mean", "var")
    ]
    model = _model(
        [helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"])],
        [_vi("x", [2, 3, 4, 4])], [_vi("y", [2, 3, 4, 4])], opset=9, initializers=params,
    )  # fmt: skip
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(
        _ours(model, {"x": x})[0], _ort(model, {"x": x})[0], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_lrn_sums_over_channels(size: int):
    """LRN's window runs over channels (onnx.reference's runs over the batch): against the spec
    written out per channel, and against ONNX Runtime (which takes odd sizes only)."""
    x = np.random.default_rng(size).standard_normal((2, 5, 3, 3)).astype(np.float32) * 5
    model = _model(
        [helper.make_node("LRN", ["x"], ["y"], size=size, alpha=1e-2, beta=0.75, bias=2.0)],
        [_vi("x", [2, 5, 3, 3])], [_vi("y", [2, 5, 3, 3])], opset=13,
    )  # fmt: skip
    squares = np.zeros_like(x)
    for c in range(5):
        lo, hi = max(0, c - (size - 1) // 2), min(4, c + int(np.ceil((size - 1) / 2)))
        squares[:, c] = (x[:, lo : hi + 1] ** 2).sum(axis=1)
    spec = x / (2.0 + 1e-2 / size * squares) ** 0.75
    ours = _ours(model, {"x": x})[0]
    np.testing.assert_allclose(ours, spec, rtol=1e-5)
    if size % 2:
        np.testing.assert_allclose(ours, _ort(model, {"x": x})[0], rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    op=st.sampled_from(["Conv", "MaxPool", "AveragePool"]),
    size=st.integers(4, 9),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    pad=st.sampled_from(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID", "explicit"]),
    ceil=st.booleans(),
    include_pad=st.booleans(),
    group=st.sampled_from([1, 2]),
    seed=st.integers(0, 1000),
)
def test_fast_conv_and_pool_kernels_match_onnxruntime(
    op, size, kernel, stride, dilation, pad, ceil, include_pad, group, seed
):
    rng = np.random.default_rng(seed)
    attrs: dict = {"kernel_shape": [kernel, kernel + 1], "strides": [stride, 1]}
    if pad == "explicit":
        attrs["pads"] = [kernel // 2, 0, kernel - 1, kernel // 2]
    else:
        attrs["auto_pad"] = pad
    if pad in ("NOTSET", "VALID", "explicit") and (op != "AveragePool" or dilation == 1):
        attrs["dilations"] = [dilation, 1]  # ORT sizes dilated SAME windows against the spec
    inputs = [_vi("x", [1, 4, size, size + 1])]
    initializers = []
    if op == "Conv":
        attrs["group"] = group
        w = rng.standard_normal((6, 4 // group, kernel, kernel + 1)).astype(np.float32)
        initializers = [onnx.numpy_helper.from_array(w, "w")]
    else:
        attrs["ceil_mode"] = int(ceil and pad in ("NOTSET", "explicit"))
        if op == "AveragePool":
            attrs["count_include_pad"] = int(include_pad)
    names = ["x", "w"] if op == "Conv" else ["x"]
    model = _model([helper.make_node(op, names, ["y"], **attrs)], inputs, [_vi("y", None)],
                   initializers=initializers)  # fmt: skip
    span = (kernel - 1) * attrs.get("dilations", [1])[0] + 1
    padded = size + (sum(attrs["pads"][0::2]) if pad == "explicit" else 0)
    assume(span <= padded or pad in ("SAME_UPPER", "SAME_LOWER"))  # ORT rounds 0 outputs up to 1
    x = rng.standard_normal((1, 4, size, size + 1)).astype(np.float32)
    try:
        expected = _ort(model, {"x": x})[0]
    except Exception:  # ORT refuses SAME padding that would be negative (stride > kernel)
        assume(False)
    np.testing.assert_allclose(_ours(model, {"x": x})[0], expected, rtol=1e-4, atol=1e-5)


def _relu_graph(shape=("batch", 3), dtype=DType.FLOAT) -> Model:
    g = Graph()
    x = g.add_input("x", TensorType(dtype, shape))
    y = g.add_input("z", TensorType(dtype, shape))
    g.set_outputs([Builder(g).Add(x, y)], ["y"])
    return Model(g, {"": 18})


@pytest.mark.parametrize(
    "feeds,message",
    [
        ({"x": np.zeros((2, 3), np.float64), "z": np.zeros((2, 3), np.float32)}, "must be f32"),
        ({"x": np.zeros((2, 3, 1), np.float32), "z": np.zeros((2, 3), np.float32)}, "rank 2"),
        ({"x": np.zeros((2, 4), np.float32), "z": np.zeros((2, 4), np.float32)}, "must have 3"),
        ({"x": np.zeros((2, 3), np.float32), "z": np.zeros((5, 3), np.float32)}, "batch=5"),
        ({"x": np.zeros((2, 3), np.float32)}, "%z .* is missing"),
        ({"x": np.zeros((2, 3), np.float32), "z": np.zeros((2, 3), np.float32), "q": 1}, "q"),
    ],
)
def test_bad_inputs_are_named(feeds, message):
    with pytest.raises(InputError, match=message):
        Interpreter(_relu_graph()).run(feeds)


def test_a_failing_node_is_named():
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.FLOAT, (2, 3)))
    g.set_outputs([b.op("Reshape", x, b.const(np.array([4, 4], np.int64)), _name="bad_reshape")])
    with pytest.raises(ExecutionError, match="bad_reshape") as info:
        Interpreter(Model(g, {"": 18})).run({"x": np.zeros((2, 3), np.float32)})
    assert "float32[2, 3]" in str(info.value)


def test_an_op_without_kernel_is_named_with_a_hint():
    g = Graph()
    x = g.add_input("x", TensorType(DType.FLOAT, (2,)))
    g.set_outputs([Builder(g).op("com.example.Mystery", x, _name="mystery")])
    with pytest.raises(UnsupportedOpError, match="mystery.*com.example.Mystery") as info:
        Interpreter(Model(g, {"": 18, "com.example": 1})).run({"x": np.zeros(2, np.float32)})
    assert "register_kernel" in str(info.value)


def test_model_local_functions_run():
    function = helper.make_function(
        "local", "AddTwice", ["a", "b"], ["c"],
        [helper.make_node("Add", ["a", "b"], ["t"]), helper.make_node("Add", ["t", "b"], ["c"])],
        [helper.make_opsetid("", 18)],
    )  # fmt: skip
    model = _model([helper.make_node("AddTwice", ["x", "y"], ["z"], domain="local")],
                   [_vi("x", [2]), _vi("y", [2])], [_vi("z", [2])])  # fmt: skip
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.functions.append(function)
    feeds = {"x": np.ones(2, np.float32), "y": np.full(2, 2.0, np.float32)}
    np.testing.assert_array_equal(_ours(model, feeds)[0], [5.0, 5.0])


def test_intermediates_are_freed_at_their_last_use():
    model = graphopt.load(EXAMPLE)
    interpreter = Interpreter(model)
    plan = interpreter._plan(model.graph)
    freed = [v for step in plan.steps for v in step.free_after] + plan.unused
    produced = [v for node in model.graph for v in node.outputs]
    assert sorted(map(id, freed)) == sorted(id(v) for v in produced if not v.is_graph_output)
