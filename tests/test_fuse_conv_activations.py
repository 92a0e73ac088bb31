"""Convolution and pooling activations: fuse-conv-activation (and the FusedConv kernel) and
reorder-activation-pooling.

Every activation ONNX Runtime's FusedConv runs, with and without a residual, on hand-written and
random convolutions; every activation the reorder accepts, and the refusals that keep it exact
(padding-only windows, non-monotonic activations) or keep it from slowing ONNX Runtime (an
activation a runtime fuses into its Conv); random pools (whatever the pass decides, outputs stay
equal); the zoo's tiny ResNet with both exporters.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from activation_checks import (
    EXPORTERS,
    close,
    fuse,
    ops,
    ort_run,
    refused,
    single_op,
    text_model,
    zoo_fuse,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.backends.reference import Interpreter
from graphopt.ir import Builder, DType, Graph, Model, TensorType, parse_model, print_model
from graphopt.passes import optimize_model

# ----- the FusedConv kernel against ONNX Runtime's ------------------------------------------------


@pytest.mark.parametrize(
    "activation, params",
    [("Relu", []), ("Tanh", []), ("Sigmoid", []), ("LeakyRelu", [0.2]), ("Clip", [-0.5, 1.5]),
     ("HardSigmoid", [0.3, 0.4])],
)  # fmt: skip
@pytest.mark.parametrize("z", [False, True])
def test_fused_conv_kernel_matches_onnxruntime(activation, params, z):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    extra = [rng.standard_normal((2, 4, 4, 3)).astype(np.float32)] if z else []
    attrs: dict[str, Any] = {"activation": activation, "strides": [2, 2], "pads": [1, 0, 1, 1]}
    if params:
        attrs["activation_params"] = params
    model = single_op("com.microsoft.FusedConv", [x, w, b, *extra], **attrs)
    assert model.graph.outputs[0].type == TensorType(DType.FLOAT, (2, 4, 4, 3))
    feeds = {f"i{k}": a for k, a in enumerate([x, w, b, *extra])}
    close(ort_run(model, feeds), Interpreter(model).run(feeds), 1e-5)


# ----- fuse-conv-activation -----------------------------------------------------------------------


def conv_model(
    act: str, *, residual: str = "", dtype: str = "f32", clip: str = "", inputs: str = ""
) -> Model:
    """Conv(x) [+ residual z] -> act; `clip` replaces Clip's bounds, `inputs` adds graph inputs."""
    z = {"": "", "same": ", %z: DT[2,4,6,6]", "broadcast": ", %z: DT[1,4,1,1]"}[residual]
    src = "%s" if residual else "%c"
    acts = {
        "Relu": f"Relu({src})", "Sigmoid": f"Sigmoid({src})", "Tanh": f"Tanh({src})",
        "LeakyRelu": f"LeakyRelu({src}) {{alpha = 0.3}}", "HardSigmoid": f"HardSigmoid({src})",
        "Clip": f"Clip({src}, {clip or '%lo, %hi'})",
    }  # fmt: skip
    weights = np.random.default_rng(3).standard_normal(4 * 3 * 3 * 3).round(2).tolist()
    body = f"""graph @g(%x: DT[2,3,8,8]{z}{inputs}) {{
  %w: DT[4,3,3,3] = const {weights}
  %bias: DT[4] = const [0.1, -0.2, 0.3, 0.0]
  %lo: DT[] = const -0.5
  %hi: DT[] = const 0.75
  %c: DT[2,4,6,6] = Conv(%x, %w, %bias) {{kernel_shape = [3, 3]}}
  {"%s: DT[2,4,6,6] = Add(%z, %c)" if residual else ""}
  %y: DT[2,4,6,6] = {acts[act]}
  return %y
}}"""
    return text_model(body.replace("DT", dtype), 18)


@pytest.mark.parametrize("act", ["Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "Clip"])
@pytest.mark.parametrize("residual", ["", "same"])
def test_conv_activation(act, residual):
    model, _ = fuse(conv_model(act, residual=residual), "fuse-conv-activation", "onnxruntime")
    assert ops(model) == ["com.microsoft.FusedConv"]
    node = model.graph.nodes[0]
    assert node.get_attr("activation") == act and len(node.inputs) == (4 if residual else 3)
    expected = {"LeakyRelu": [0.3], "HardSigmoid": [0.2, 0.5], "Clip": [-0.5, 0.75]}
    if act in expected:
        assert node.get_attr("activation_params") == pytest.approx(expected[act])


def test_conv_activation_clip_bounds():
    model, _ = fuse(conv_model("Clip", clip="_, %hi"), "fuse-conv-activation", "onnxruntime")
    assert model.graph.nodes[0].get_attr("activation_params")[1] == pytest.approx(0.75)
    assert model.graph.nodes[0].get_attr("activation_params")[0] < -1e38
    attributes = print_model(conv_model("Clip")).replace(
        "Clip(%c, %lo, %hi)", "Clip(%c) {min = 0.0, max = 6.0}"
    )
    model, _ = fuse(
        parse_model(attributes.replace('"": 18', '"": 10')), "fuse-conv-activation", "onnxruntime"
    )
    assert model.graph.nodes[0].get_attr("activation_params") == pytest.approx([0.0, 6.0])


@settings(max_examples=20)
@given(
    act=st.sampled_from(["Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "Clip"]),
    alpha=st.floats(-1.0, 1.0),
    residual=st.booleans(),
    bias=st.booleans(),
    group=st.sampled_from([1, 2]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    pad=st.integers(0, 1),
    dilation=st.integers(1, 2),
    size=st.integers(4, 7),
)
def test_conv_activation_random_instances(
    act, alpha, residual, bias, group, kernel, stride, pad, dilation, size
):
    out = (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    assume(out >= 1)  # the dilated kernel must fit the padded input
    rng = np.random.default_rng(4)
    graph = Graph("g")
    b = Builder(graph)
    x = graph.add_input("x", TensorType(DType.FLOAT, ("batch", 4, size, size)))
    w = b.const(rng.standard_normal((6, 4 // group, kernel, kernel)).astype(np.float32))
    inputs = [x, w] + ([b.const(rng.standard_normal(6).astype(np.float32))] if bias else [])
    attrs = {
        "group": group,
        "strides": [stride] * 2,
        "pads": [pad] * 4,
        "dilations": [dilation] * 2,
    }
    y = b.Conv(*inputs, kernel_shape=[kernel, kernel], **attrs)
    if residual:
        z = graph.add_input("z", TensorType(DType.FLOAT, ("batch", 6, out, out)))
        y = b.Add(y, z)
    params = {"LeakyRelu": {"alpha": alpha}, "HardSigmoid": {"alpha": alpha, "beta": 0.5}}
    if act == "Clip":
        y = b.Clip(y, b.const(np.float32(-abs(alpha))), b.const(np.float32(abs(alpha) + 0.1)))
    else:
        y = b.op(act, y, **params.get(act, {}))
    graph.set_outputs([y])
    model = optimize_model(Model(graph, opset_imports={"": 18}), "infer-shapes").model
    result, notes = fuse(model, "fuse-conv-activation", "onnxruntime")
    assert ops(result) == ["com.microsoft.FusedConv"], notes


def test_conv_activation_refusals():
    refused(conv_model("Relu"), "fuse-conv-activation", "standard ONNX has no fused convolution")
    reason = "runs float32 only, the Conv is double"
    refused(conv_model("Relu", dtype="f64"), "fuse-conv-activation", reason, "onnxruntime")
    dynamic = conv_model("Clip", clip="%low, %hi", inputs=", %low: f32[]")
    reason = "Clip's min is not a constant scalar"
    refused(dynamic, "fuse-conv-activation", reason, "onnxruntime")
    reason = "FusedConv does not broadcast Z"
    refused(conv_model("Relu", residual="broadcast"), "fuse-conv-activation", reason, "onnxruntime")
    read = conv_model("Relu")
    read.graph.add_output(read.graph.nodes[0].outputs[0], "conv_out")
    refused(read, "fuse-conv-activation", "also read by a graph output", "onnxruntime")


# ----- reorder-activation-pooling -----------------------------------------------------------------

ACTIVATIONS = {
    "Relu": "Relu(%x)", "Sigmoid": "Sigmoid(%x)", "Tanh": "Tanh(%x)", "Softplus": "Softplus(%x)",
    "Softsign": "Softsign(%x)", "Clip": "Clip(%x, %lo, %hi)", "LeakyRelu": "LeakyRelu(%x)",
    "HardSigmoid": "HardSigmoid(%x) {alpha = 0.3}", "Elu": "Elu(%x) {alpha = 0.5}",
    "ThresholdedRelu": "ThresholdedRelu(%x) {alpha = 0.2}", "Selu": "Selu(%x)",
    "Celu": "Celu(%x) {alpha = 2.0}", "PRelu": "PRelu(%x, %slope)",
}  # fmt: skip
REFUSED_ACTIVATIONS = {"Gelu": "Gelu(%x)", "LeakyReluNeg": "LeakyRelu(%x) {alpha = -0.5}"}
MAXPOOL = "MaxPool(%a) {kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]}"


def pool_model(act: str, pool: str = MAXPOOL, x: str = "f32[2,3,8,8]", y: str = "") -> Model:
    return text_model(
        f"""graph @g(%x: {x}) {{
  %lo: f32[] = const -0.5
  %hi: f32[] = const 2.0
  %slope: f32[3,1,1] = const [0.1, 0.0, 0.7]
  %bad: f32[3,1,1] = const [0.1, -0.2, 0.0]
  %a = {act}
  %p{y} = {pool}
  return %p
}}""",
        20,
    )


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("pool", [MAXPOOL, "GlobalMaxPool(%a)"])
def test_reorder_activation_pooling(act, pool):
    model, _ = fuse(pool_model(ACTIVATIONS[act], pool), "reorder-activation-pooling")
    assert ops(model) == [pool.split("(")[0], act]
    assert model.graph.outputs[0].type.shape == ((2, 3, 4, 4) if pool == MAXPOOL else (2, 3, 1, 1))


def test_reorder_with_symbolic_shapes_and_an_unread_indices_output():
    model = text_model(
        """graph @g(%x: f32[batch,3,h,w]) {
  %a = Relu(%x)
  %p, %i = MaxPool(%a) {kernel_shape = [2, 2], strides = [2, 2]}
  return %p
}""",
        18,
    )
    model, _ = fuse(optimize_model(model, "infer-shapes").model, "reorder-activation-pooling")
    assert ops(model) == ["MaxPool", "Relu"]
    assert model.graph.outputs[0].type == TensorType(DType.FLOAT, ("batch", 3, None, None))


@pytest.mark.parametrize(
    "act, pool, reason",
    [("Gelu(%x)", MAXPOOL, "Gelu is not monotonic"),
     ("HardSwish(%x)", MAXPOOL, "HardSwish is not monotonic"),
     ("LeakyRelu(%x) {alpha = -0.1}", MAXPOOL, "LeakyRelu with alpha = -0.1 is not non-decreasing"),
     ("Elu(%x) {alpha = -1.0}", MAXPOOL, "Elu with alpha = -1 is not non-decreasing"),
     ("HardSigmoid(%x) {alpha = -0.2}", MAXPOOL, "HardSigmoid with alpha = -0.2"),
     ("PRelu(%x, %bad)", MAXPOOL, "PRelu's slope has negative entries"),
     ("Relu(%x)", "MaxPool(%a) {kernel_shape = [2, 2], pads = [2, 0, 0, 0], strides = [2, 2]}",
      "covers only padding"),
     ("Relu(%x)", "MaxPool(%a) {kernel_shape = [3, 3], pads = [1, 1, 1, 1]}",
      "no smaller than the input"),
     ("Relu(%x)", "MaxPool(%a) {kernel_shape = [2, 2], dilations = [3, 3], pads = [1, 1, 1, 1]}",
      "covers only padding")],
)  # fmt: skip
def test_reorder_refusals(act, pool, reason):
    model = pool_model(act, pool, x="f32[2,3,2,2]" if "dilations" in pool else "f32[2,3,8,8]")
    refused(model, "reorder-activation-pooling", reason)


def test_reorder_leaves_activations_a_runtime_fuses_into_the_conv():
    text = print_model(conv_model("Relu")).replace(
        "  return %y", "  %p = MaxPool(%y) {kernel_shape = [2, 2], strides = [2, 2]}\n  return %p"
    )
    refused(parse_model(text), "reorder-activation-pooling", "follows a Conv")
    model, _ = fuse(parse_model(text), "reorder-activation-pooling{after-conv=true}")
    assert ops(model) == ["Conv", "MaxPool", "Relu"]
    softplus = parse_model(text.replace("Relu(%c)", "Softplus(%c)"))  # no runtime fuses it
    assert ops(fuse(softplus, "reorder-activation-pooling")[0]) == ["Conv", "MaxPool", "Softplus"]


def test_reorder_refuses_read_indices_and_shared_activation():
    indices = text_model(
        """graph @g(%x: f32[2,3,8,8]) {
  %a = Relu(%x)
  %p, %i = MaxPool(%a) {kernel_shape = [2, 2], strides = [2, 2]}
  return %p, %i
}""",
        18,
    )
    refused(indices, "reorder-activation-pooling", "Indices output is read")
    shared = pool_model("Relu(%x)")
    shared.graph.add_output(shared.graph.nodes[0].outputs[0], "relu")
    refused(shared, "reorder-activation-pooling", "also read by a graph output")


@settings(max_examples=30)
@given(
    act=st.sampled_from([*ACTIVATIONS, *REFUSED_ACTIVATIONS]),
    spatial=st.lists(st.integers(1, 7), min_size=1, max_size=2),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    pad=st.integers(0, 3),
    dilation=st.integers(1, 2),
    ceil=st.booleans(),
    auto_pad=st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "VALID"]),
)
def test_reorder_random_pools(act, spatial, kernel, stride, pad, dilation, ceil, auto_pad):
    """Whatever the pass decides, outputs stay equal; and it reorders whenever the proof's
    conditions plainly hold."""
    rank = len(spatial)
    span = (kernel - 1) * dilation + 1
    if auto_pad == "NOTSET" and any(n + 2 * pad < span for n in spatial):
        return  # no window fits
    if auto_pad == "VALID" and any(n < span for n in spatial):
        return
    line = {**ACTIVATIONS, **REFUSED_ACTIVATIONS}[act]
    pads = "" if auto_pad != "NOTSET" else f", pads = {[pad] * 2 * rank}"
    pool = (
        f"MaxPool(%a) {{kernel_shape = {[kernel] * rank}, strides = {[stride] * rank}, "
        f'dilations = {[dilation] * rank}, ceil_mode = {int(ceil)}, auto_pad = "{auto_pad}"{pads}}}'
    )
    x = f"f32[2,3,{','.join(map(str, spatial))}]"
    text = print_model(pool_model(line, pool, x)).replace("[3,1,1]", f"[3{',1' * rank}]")
    model = optimize_model(parse_model(text), "infer-shapes").model
    result, _ = fuse(model, "reorder-activation-pooling", check_ort=False)
    rounding = math.ceil if ceil else math.floor
    pooled = [rounding((n + 2 * pad - kernel) / stride) + 1 for n in spatial]
    shrinks = math.prod(pooled) < math.prod(spatial)  # otherwise there is nothing to gain
    plain = dilation == 1 and pad < kernel and act not in REFUSED_ACTIVATIONS and shrinks
    if plain and auto_pad == "NOTSET":
        assert ops(result)[0] == "MaxPool", print_model(result)


# ----- the zoo's tiny ResNet ----------------------------------------------------------------------


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_zoo_resnet(zoo_model, exporter):
    model = graphopt.load(str(zoo_model("resnet", exporter)))
    counts = zoo_fuse(model, "resnet", "O1,fuse-conv-activation", "onnxruntime")
    assert counts["com.microsoft.FusedConv"] == 5 and counts["Relu"] == 0  # 3 plain, 2 residual
    model = graphopt.load(str(zoo_model("resnet", exporter)))
    refused(optimize_model(model, "O1").model, "reorder-activation-pooling", "follows a Conv")
    counts = zoo_fuse(model, "resnet", "O1,reorder-activation-pooling{after-conv=true}")
    assert counts["Relu"] == 5 and counts["MaxPool"] == 1
