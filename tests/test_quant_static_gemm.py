"""quantize-static on Gemm (passes/quantization/bias.py): what ONNX Runtime needs to fuse a QDQ
Gemm into its int8 QGemm — an int32 bias (scale s_x * s_w, per channel with the weight) behind a
DequantizeLinear, beta 1, and the weight's DequantizeLinear with its zero point input. Checked in
ONNX Runtime's optimized graph (ORT_ENABLE_ALL, saved with optimized_model_filepath) on
hand-built Gemms and the tiny GPT-2, whose projections are Gemms after O2; accuracy against the
float model in ONNX Runtime and the reference interpreter; the cases that keep a float bias."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from quant_checks import cosine, literal, run_ort

import graphopt
from graphopt.backends.onnx import to_onnx
from graphopt.backends.reference import Interpreter
from graphopt.ir import Model, parse_model
from graphopt.passes import optimize_model

FUSED = ("QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "QLinearConv")


def _gemm(k: int, n: int, *, trans_b: int = 0, beta: float = 1.0, alpha: float = 1.0,
          bias_shape: tuple[int, ...] | None = None, seed: int = 0) -> Model:  # fmt: skip
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k) if trans_b else (k, n)) / np.sqrt(k)
    shape = bias_shape or (n,)
    b = rng.standard_normal(shape)
    dims = ",".join(map(str, shape))
    return parse_model(f"""model opset={{"": 21}}
graph @g(%x: f32[8,{k}]) {{
  %w: f32[{n if trans_b else k},{k if trans_b else n}] = const {literal(w)}
  %b: f32[{dims}] = const {literal(b)}
  %h: f32[8,{n}] = Gemm(%x, %w, %b) {{transB = {trans_b}, alpha = {alpha}, beta = {beta}}}
  %y: f32[8,{n}] = Relu(%h)
  return %y
}}""")


def _ort_ops(model: Model | onnx.ModelProto, tmp_path, name: str = "m") -> collections.Counter:
    """The op types of ONNX Runtime's optimized graph (CPU, ORT_ENABLE_ALL)."""
    import onnxruntime as ort

    proto = to_onnx(model) if isinstance(model, Model) else model
    path = tmp_path / f"{name}.onnx"
    onnx.save(proto, str(path))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)  # fmt: skip
    ops["float Gemm"] = ops["Gemm"] + ops["FusedGemm"]  # FusedGemm: a float Gemm with its Relu
    return ops


def _quantize(model: Model, options: str, data):
    result = optimize_model(model, f"quantize-static{{{options}}}", verify_each=True,
                            calibration=data)  # fmt: skip
    return result.model, [n.message for n in result.notes]


def _bias_dq(model: Model):
    (gemm,) = [n for n in model.graph if n.op == "Gemm"]
    return gemm, gemm.inputs[2].producer


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gemm_fuses_into_qgemm(trans_b, per_channel, symmetric, tmp_path):
    """The QDQ Gemm becomes QGemm in ONNX Runtime (no float Gemm left); the bias is int32 with
    scale s_x * s_w and beta folded in; outputs match the reference interpreter and stay within
    cosine 0.99 of the float model."""
    k, n = 64, 48
    model = _gemm(k, n, trans_b=trans_b, beta=0.5)
    b = np.asarray(model.graph.initializers["b"].const_value, np.float64)
    rng = np.random.default_rng(1)
    data = [{"x": rng.standard_normal((8, k)).astype(np.float32)} for _ in range(4)]
    x = {"x": rng.standard_normal((8, k)).astype(np.float32)}
    expected = Interpreter(model).run(x)["y"]
    options = (f"min-elements=1 quantize-output-layer=true per-channel={str(per_channel).lower()}"
               f" symmetric-activations={str(symmetric).lower()}")  # fmt: skip
    out, _ = _quantize(model, options, data)
    gemm, dq = _bias_dq(out)
    assert dq is not None and dq.op == "DequantizeLinear"
    codes = np.asarray(dq.inputs[0].const_value)
    assert codes.dtype == np.int32
    assert float(gemm.get_attr("beta", 1.0)) == 1.0
    x_dq, w_dq = gemm.inputs[0].producer, gemm.inputs[1].producer
    assert len(w_dq.inputs) == 3  # the explicit zero point ONNX Runtime's QGemm fusion needs
    s_x = np.asarray(x_dq.inputs[1].const_value, np.float32)
    s_w = np.asarray(w_dq.inputs[1].const_value, np.float32)
    np.testing.assert_array_equal(dq.inputs[1].const_value, s_x * s_w)
    assert np.asarray(dq.inputs[1].const_value).shape == ((n,) if per_channel else ())
    assert np.all(np.abs(codes * (s_x * s_w).astype(np.float64) - 0.5 * b) <= s_x * s_w / 2 * (1 + 1e-6))  # fmt: skip
    ops = _ort_ops(out, tmp_path)
    assert ops["QGemm"] == 1 and ops["float Gemm"] == 0, ops
    in_reference = Interpreter(out).run(x)["y"]
    (in_ort,) = run_ort(out, x)
    assert cosine(expected, in_ort) >= 0.99 and cosine(expected, in_reference) >= 0.99
    if per_channel:
        # every column's codes reach +-127, and ONNX Runtime's int8 kernels on x86 CPUs without
        # VNNI add pairs of products in saturating 16-bit lanes: a few elements differ (its
        # MatMulIntegerToFloat does the same on a MatMul); per tensor only one column does
        assert cosine(in_ort, in_reference) >= 0.99
    else:
        np.testing.assert_allclose(in_ort, in_reference, rtol=1e-4, atol=1e-4 * np.abs(in_reference).max())  # fmt: skip


def test_without_the_int32_bias_onnx_runtime_keeps_the_gemm_float(tmp_path):
    """The reason for all this: the same QDQ Gemm with a float bias is not fused (nor is one
    whose weight DequantizeLinear has no zero point input)."""
    model = _gemm(64, 48)
    rng = np.random.default_rng(2)
    data = [{"x": rng.standard_normal((8, 64)).astype(np.float32)}]
    out, _ = _quantize(model, "min-elements=1 quantize-output-layer=true", data)
    gemm, dq = _bias_dq(out)
    float_bias = to_onnx(out)
    (node,) = [n for n in float_bias.graph.node if n.op_type == "Gemm"]
    node.input[2] = "b_float"
    b = np.asarray(dq.inputs[0].const_value, np.float32) * np.asarray(dq.inputs[1].const_value)
    float_bias.graph.initializer.append(onnx.numpy_helper.from_array(b.astype(np.float32), "b_float"))  # fmt: skip
    ops = _ort_ops(float_bias, tmp_path, "float_bias")
    assert ops["QGemm"] == 0 and ops["float Gemm"] == 1, ops
    no_zero_point = to_onnx(out)
    for n in no_zero_point.graph.node:
        if n.op_type == "DequantizeLinear" and n.output[0] == node.input[1]:
            del n.input[2]
    ops = _ort_ops(no_zero_point, tmp_path, "no_zero_point")
    assert ops["QGemm"] == 0 and ops["float Gemm"] == 1, ops


@pytest.mark.parametrize(
    "kwargs, reason",
    [({"alpha": 0.5}, "alpha != 1"), ({"bias_shape": (8, 48)}, "not a vector")],
)
def test_gemms_that_keep_a_float_bias(kwargs, reason):
    """alpha != 1, or a [M, N] C: the bias stays float, with a note saying why."""
    model = _gemm(64, 48, **kwargs)
    data = [{"x": np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32)}]
    out, notes = _quantize(model, "min-elements=1 quantize-output-layer=true", data)
    gemm, producer = _bias_dq(out)
    assert producer is None and gemm.inputs[2].is_constant
    assert any(reason in note and "bias stays float" in note for note in notes), notes


def test_tiny_gpt2_projections_become_qgemm(zoo_model, tmp_path):
    """After O2 the tiny GPT-2's projections are Gemms: every quantized one is a QGemm in ONNX
    Runtime (before the int32 bias: none was), at the same accuracy (cosine >= 0.99 against the
    float model, in ONNX Runtime and the reference interpreter)."""
    from models.zoo import sample_inputs

    path = zoo_model("gpt2", "dynamo")
    feeds = sample_inputs("gpt2")
    expected = run_ort(graphopt.load(path), feeds)
    data = [sample_inputs("gpt2", seed=seed) for seed in (11, 12, 13, 14)]
    model = graphopt.optimize(graphopt.load(path), "O2,quantize-static", calibration=data)
    quantized_gemms = [
        n for n in model.graph
        if n.op == "Gemm" and n.inputs[1].producer is not None
        and n.inputs[1].producer.op == "DequantizeLinear"
    ]  # fmt: skip
    assert len(quantized_gemms) >= 8
    ops = _ort_ops(model, tmp_path)
    assert ops["QGemm"] == len(quantized_gemms), ops
    assert ops["float Gemm"] == 0, ops
    in_ort = run_ort(model, feeds)
    in_reference = list(Interpreter(model).run(feeds).values())
    for e, a, r in zip(expected, in_ort, in_reference, strict=True):
        assert cosine(e, a) >= 0.99 and cosine(e, r) >= 0.99, (cosine(e, a), cosine(e, r))


@pytest.mark.parametrize("name, fused", [("bert", "MatMulIntegerToFloat"), ("llama", "MatMulIntegerToFloat"), ("resnet", "QLinearConv")])  # fmt: skip
def test_other_zoo_models_fuse_as_before(zoo_model, name, fused, tmp_path):
    """BERT's and LLaMA's bias-free MatMuls fuse into MatMulIntegerToFloat and ResNet's Convs
    into QLinearConv (float bias, quantized by ONNX Runtime itself): the explicit weight zero
    point changes none of that."""
    from models.zoo import sample_inputs

    path = zoo_model(name, "dynamo")
    data = [sample_inputs(name, seed=seed) for seed in (11, 12, 13, 14)]
    model = graphopt.optimize(graphopt.load(path), "O2,quantize-static", calibration=data)
    ops = _ort_ops(model, tmp_path)
    assert ops[fused] >= 4, ops
