"""convert-float16 / convert-bfloat16 (passes/quantization/float16.py): Casts only at the edges
of what stays float32, float32 inputs and outputs kept (or not), refusals, and the zoo's tiny
models (cosine vs float32 in ONNX Runtime, onnx.checker)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from quant_checks import cosine, literal, run_ort

import graphopt
from graphopt.backends.reference import Interpreter
from graphopt.ir import Model, parse_model, print_model
from graphopt.ir.types import DType
from graphopt.passes import optimize_model


def _attention_like(seed: int = 0) -> Model:
    """x @ w1 -> Softmax -> @ w2 + b: Softmax stays float32 between two float16 MatMuls."""
    rng = np.random.default_rng(seed)
    w1, w2, b = rng.standard_normal((16, 16)), rng.standard_normal((16, 8)), rng.standard_normal(8)
    return parse_model(f"""model opset={{"": 21}}
graph @g(%x: f32[4,16]) {{
  %w1: f32[16,16] = const {literal(w1 / 4)}
  %w2: f32[16,8] = const {literal(w2)}
  %b: f32[8] = const {literal(b)}
  %h: f32[4,16] = MatMul(%x, %w1)
  %p: f32[4,16] = Softmax(%h) {{axis = -1}}
  %m: f32[4,8] = MatMul(%p, %w2)
  %y: f32[4,8] = Add(%m, %b)
  return %y
}}""")


def _convert(model: Model, pass_name: str = "convert-float16", options: str = "min-elements=0"):
    result = optimize_model(model, f"{pass_name}{{{options}}}", verify_each=True)
    notes = [n.message for n in result.notes]
    return result.model, notes


@pytest.mark.parametrize("pass_name", ["convert-float16", "convert-bfloat16"])
def test_casts_only_at_the_edges_of_float32(pass_name):
    model = _attention_like()
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    expected = Interpreter(model).run({"x": x})["y"]
    out, notes = _convert(model, pass_name)
    half = "f16" if pass_name == "convert-float16" else "bf16"
    assert [n.op for n in out.graph] == ["Cast", "MatMul", "Cast", "Softmax", "Cast", "MatMul", "Add", "Cast"]  # fmt: skip
    assert print_model(out).count(f"{half}[") >= 6
    assert "3 nodes converted" in notes[-1] and "1 kept float32" in notes[-1]
    assert out.graph.inputs[0].type.dtype == DType.FLOAT
    assert out.graph.outputs[0].type.dtype == DType.FLOAT
    softmax = next(n for n in out.graph if n.op == "Softmax")
    assert softmax.inputs[0].type.dtype == DType.FLOAT
    actual = Interpreter(out).run({"x": x})["y"]
    assert actual.dtype == np.float32
    assert cosine(expected, actual) >= (0.999 if half == "f16" else 0.99)
    if half == "f16":
        np.testing.assert_allclose(run_ort(out, {"x": x})[0], actual, rtol=1e-2, atol=1e-2)
    again, _ = _convert(out, pass_name)
    assert [n.op for n in again.graph].count("Cast") == 4  # nothing left in float32 to convert


def test_without_keep_io_float32_inputs_and_outputs_are_float16():
    out, _ = _convert(_attention_like(), options="min-elements=0 keep-io-float32=false")
    assert out.graph.inputs[0].type.dtype == DType.FLOAT16
    assert out.graph.outputs[0].type.dtype == DType.FLOAT16
    assert [n.op for n in out.graph].count("Cast") == 2  # around the Softmax only
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float16)
    (y,) = run_ort(out, {"x": x})
    assert y.dtype == np.float16


def test_refusals():
    model = _attention_like()
    before = print_model(model)
    out, notes = _convert(model, options="")  # 400 weights < min-elements=4096
    assert print_model(out) == before and any("fewer than min-elements=4096" in n for n in notes)


def test_constants_past_the_float16_range_are_clipped():
    model = parse_model("""model opset={"": 21}
graph @g(%x: f32[2]) {
  %c: f32[2] = const [1e6, -1e6]
  %y: f32[2] = Mul(%x, %c)
  return %y
}""")
    out, _ = _convert(model)
    (y,) = run_ort(out, {"x": np.ones(2, np.float32)})
    assert np.all(np.isfinite(y)) and y[0] == 65504


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "resnet"])
def test_zoo_accuracy(zoo_model, name, tmp_path):
    from models.zoo import sample_inputs

    path = zoo_model(name, "dynamo")
    feeds = sample_inputs(name)
    expected = run_ort(graphopt.load(path), feeds)
    result = optimize_model(graphopt.load(path), "O2,convert-float16", verify_each=True)
    assert any("converted to float16" in n.message for n in result.notes)
    graphopt.save(result.model, tmp_path / "h.onnx")
    onnx.checker.check_model(str(tmp_path / "h.onnx"), full_check=True)
    actual = run_ort(onnx.load(tmp_path / "h.onnx"), feeds)
    for e, a in zip(expected, actual, strict=True):
        assert a.dtype == np.float32
        assert cosine(e, a) >= 0.999, (name, cosine(e, a))
