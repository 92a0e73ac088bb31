"""quantize-dynamic (passes/quantization/dynamic.py) and com.microsoft.DynamicQuantizeMatMul
(ir/ops/contrib_dynamic_quant.py): the kernel against ONNX Runtime's, random MatMul/Gemm/Conv
graphs within the bound the scales give, the standard form in onnx.reference, each refusal, and
the zoo's tiny models (cosine vs float in ONNX Runtime and the reference interpreter)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper
from quant_checks import cosine, literal, run_ort

import graphopt
from graphopt.backends.onnx import to_onnx
from graphopt.backends.reference import Interpreter
from graphopt.ir import Model, parse_model, print_model
from graphopt.passes import optimize_model

# ----- DynamicQuantizeMatMul: the kernel against ONNX Runtime's -----------------------------------


@pytest.mark.parametrize("b_type", ["int8", "uint8"])
@pytest.mark.parametrize("per_column", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_dynamic_quantize_matmul_kernel_matches_onnx_runtime(b_type, per_column, bias):
    rng = np.random.default_rng(3)
    k, n = 48, 20
    # int8 codes within 7 bits: ONNX Runtime's u8s8 kernels on x86 without VNNI saturate
    # 16-bit pair sums of full-range codes (why quantize-dynamic stores uint8 by default)
    low, high = (-64, 64) if b_type == "int8" else (0, 256)
    b = rng.integers(low, high, (k, n)).astype(b_type)
    scale = rng.uniform(0.001, 0.01, (n,) if per_column else ()).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(b, "B"), onnx.numpy_helper.from_array(scale, "S")]
    inputs = ["A", "B", "S"]
    if b_type == "uint8":
        inits.append(onnx.numpy_helper.from_array(np.full(scale.shape, 128, np.uint8), "Z"))
        inputs.append("Z")
    if bias:
        inits.append(onnx.numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "C"))
        inputs += [""] * (4 - len(inputs)) + ["C"]
    node = helper.make_node("DynamicQuantizeMatMul", inputs, ["Y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", 1, [3, 5, k])],
        [helper.make_tensor_value_info("Y", 1, None)], inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    proto = helper.make_model(graph, opset_imports=opsets)
    a = rng.standard_normal((3, 5, k)).astype(np.float32) * 2 + 0.5
    expected = run_ort(proto, {"A": a})[0]
    actual = Interpreter(graphopt.load(proto)).run({"A": a})["Y"]
    assert actual.shape == expected.shape == (3, 5, n)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


# ----- random graphs ------------------------------------------------------------------------------


def _graph(op: str, k: int, n: int, seed: int) -> Model:
    rng = np.random.default_rng(seed)
    if op == "Conv":
        w, b = rng.standard_normal((n, k, 3, 3)) / np.sqrt(9 * k), rng.standard_normal(n)
        return parse_model(f"""model opset={{"": 21}}
graph @g(%x: f32[1,{k},6,6]) {{
  %w: f32[{n},{k},3,3] = const {literal(w)}
  %b: f32[{n}] = const {literal(b)}
  %y: f32[1,{n},4,4] = Conv(%x, %w, %b) {{kernel_shape = [3, 3]}}
  return %y
}}""")
    if op == "Gemm":
        w, c = rng.standard_normal((n, k)) / np.sqrt(k), rng.standard_normal(n)
        return parse_model(f"""model opset={{"": 21}}
graph @g(%x: f32[4,{k}]) {{
  %w: f32[{n},{k}] = const {literal(w)}
  %c: f32[{n}] = const {literal(c)}
  %y: f32[4,{n}] = Gemm(%x, %w, %c) {{transB = 1, alpha = 0.5, beta = 2.0}}
  return %y
}}""")
    w = rng.standard_normal((k, n)) / np.sqrt(k)
    return parse_model(f"""model opset={{"": 21}}
graph @g(%x: f32[2,4,{k}]) {{
  %w: f32[{k},{n}] = const {literal(w)}
  %y: f32[2,4,{n}] = MatMul(%x, %w)
  return %y
}}""")


def _quantize(model: Model, options: str = "", target: str = "onnx"):
    result = optimize_model(
        model, f"quantize-dynamic{{{options}}}", target=target, verify_each=True
    )
    return result.model, [n.message for n in result.notes if n.kind == "refused"]


def _conv_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    windows = sliding_window_view(x, w.shape[2:], axis=(2, 3))
    return np.einsum("ncijab,mcab->nmij", windows, w)


@given(
    op=st.sampled_from(["MatMul", "MatMul-ort", "Gemm", "Conv"]),
    k=st.integers(1, 20),
    n=st.integers(1, 10),
    per_channel=st.booleans(),
    signed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_graphs_stay_within_the_scale_bound(op, k, n, per_channel, signed, seed):
    """|y' - y| <= sum_k (|x_k| s_w/2 + |w_k| s_x/2 + s_x s_w/4), s_x DynamicQuantizeLinear's."""
    name, _, where = op.partition("-")
    k = min(k, 4) if name == "Conv" else k
    model = _graph(name, k, n, seed)
    w = np.asarray(model.graph.initializers["w"].const_value, np.float64)
    x = np.random.default_rng(seed + 1).standard_normal(model.graph.inputs[0].type.shape)
    x = x.astype(np.float32)
    expected = Interpreter(model).run({"x": x})["y"].astype(np.float64)
    options = (f"min-elements=1 quantize-output-layer=true per-channel={str(per_channel).lower()}"
               f" signed-weights={str(signed).lower()}")  # fmt: skip
    out, notes = _quantize(model, options, "onnxruntime" if where else "onnx")
    assert not notes, notes
    ops = [node.op for node in out.graph]
    assert ops == (["com.microsoft.DynamicQuantizeMatMul"] if where else
                   ["DynamicQuantizeLinear", "ConvInteger" if name == "Conv" else "MatMulInteger",
                    "Cast", "Mul", "Mul"] + (["Add"] if name != "MatMul" else []))  # fmt: skip
    actual = Interpreter(out).run({"x": x})["y"].astype(np.float64)
    s_x = (max(float(x.max()), 0) - min(float(x.min()), 0)) / 255
    ax = np.abs(x.astype(np.float64))
    if name == "Conv":
        s_w = np.abs(w).reshape(n, -1).max(1) if per_channel else np.full(n, np.abs(w).max())
        s_w = (s_w / 127).reshape(n, 1, 1, 1)
        bound = _conv_valid(ax, np.broadcast_to(s_w / 2, w.shape)) + _conv_valid(np.ones_like(ax), np.abs(w) * s_x / 2 + s_x * s_w / 4)  # fmt: skip
    else:
        w_kn = w.T * 0.5 if name == "Gemm" else w  # alpha = 0.5 scales the weight
        s_w = np.abs(w_kn).max(0) if per_channel else np.full(n, np.abs(w_kn).max())
        s_w = s_w / 127
        bound = ax @ np.broadcast_to(s_w / 2, w_kn.shape) + (np.abs(w_kn) * s_x / 2 + s_x * s_w / 4).sum(0)  # fmt: skip
    assert np.all(np.abs(actual - expected) <= bound * (1 + 1e-3) + 1e-4)
    again, _ = _quantize(out, options, "onnxruntime" if where else "onnx")
    assert print_model(again) == print_model(out)


def test_standard_form_runs_in_onnx_reference_and_onnx_runtime():
    from onnx.reference import ReferenceEvaluator

    for op in ("MatMul", "Conv"):
        model = _graph(op, 3 if op == "Conv" else 16, 8, 0)
        shape = model.graph.inputs[0].type.shape
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        out, _ = _quantize(model, "min-elements=1 quantize-output-layer=true")
        proto = to_onnx(out)
        onnx.checker.check_model(proto, full_check=True)
        in_onnx = ReferenceEvaluator(proto).run(None, {"x": x})[0]
        np.testing.assert_allclose(run_ort(proto, {"x": x})[0], in_onnx, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(Interpreter(out).run({"x": x})["y"], in_onnx, rtol=1e-5, atol=1e-5)  # fmt: skip


def test_refusals():
    gemm = _graph("Gemm", 16, 8, 0)
    gemm.graph.nodes[0].name = "proj"
    _, notes = _quantize(gemm, "min-elements=1 quantize-output-layer=true exclude=proj")
    assert any("excluded" in note for note in notes)
    half = parse_model("""model opset={"": 21}
graph @g(%x: f16[2,16]) {
  %w: f16[16,16] = const """ + literal(np.eye(16)) + """
  %y: f16[2,16] = MatMul(%x, %w)
  return %y
}""")  # fmt: skip
    _, notes = _quantize(half, "min-elements=1 quantize-output-layer=true")
    assert any("float32 inputs only" in note for note in notes)
    ints = parse_model("""model opset={"": 21}
graph @g(%x: i32[2,4]) {
  %w: i32[4,4] = const """ + str([1] * 16) + """
  %y: i32[2,4] = MatMul(%x, %w)
  return %y
}""")  # fmt: skip
    before = print_model(ints)
    out, notes = _quantize(ints, "min-elements=1 quantize-output-layer=true")
    assert print_model(out) == before and any("not float" in note for note in notes)
    _, notes = _quantize(_graph("MatMul", 16, 8, 0), "")
    assert any("final projection" in note for note in notes)


# ----- the zoo's tiny models ----------------------------------------------------------------------


@pytest.mark.parametrize("target", ["onnx", "onnxruntime"])
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "resnet"])
def test_zoo_accuracy(zoo_model, name, target, tmp_path):
    from models.zoo import sample_inputs

    path = zoo_model(name, "dynamo")
    feeds = sample_inputs(name)
    expected = run_ort(graphopt.load(path), feeds)
    # O2 for onnxruntime fuses Conv + Relu into FusedConv, which quantize-dynamic leaves alone
    passes = "O2,quantize-dynamic" if target == "onnx" or name != "resnet" else "O1,quantize-dynamic"  # fmt: skip
    model = graphopt.optimize(graphopt.load(path), passes, target=target, verify_each=True)
    ops = [n.op for n in model.graph]
    quantized = sum(ops.count(op) for op in ("MatMulInteger", "ConvInteger", "com.microsoft.DynamicQuantizeMatMul"))  # fmt: skip
    assert quantized >= 5
    graphopt.save(model, tmp_path / "q.onnx")
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    in_ort = run_ort(onnx.load(tmp_path / "q.onnx"), feeds)
    in_reference = list(Interpreter(model).run(feeds).values())
    for e, a, r in zip(expected, in_ort, in_reference, strict=True):
        assert cosine(e, a) >= 0.99, (name, cosine(e, a))
        assert cosine(e, r) >= 0.99, (name, cosine(e, r))
