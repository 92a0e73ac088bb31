"""quantize-static (passes/quantization/static.py): random MatMul/Conv graphs within the bound the
scales give, the QDQ shape (shared pairs, data movement kept quantized, no DQ -> Q of the same
parameters), each refusal, the calibration argument of the API and the command line, and the
zoo's tiny models (cosine vs float in ONNX Runtime and the reference interpreter, onnx.checker)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view
from quant_checks import cosine, literal, run_ort

import graphopt
from graphopt.api.cli import main
from graphopt.backends.reference import Interpreter
from graphopt.ir import Model, parse_model, print_model
from graphopt.ir.errors import GraphoptError
from graphopt.passes import optimize_model


def _matmul(k: int, n: int, seed: int = 0, dtype: str = "f32", opset: int = 21) -> Model:
    w = np.random.default_rng(seed).standard_normal((k, n)) / np.sqrt(k)
    values = literal(w) if dtype == "f32" else str([int(v * 10) for v in w.ravel()])
    return parse_model(f"""model opset={{"": {opset}}}
graph @g(%x: {dtype}[2,4,{k}]) {{
  %w: {dtype}[{k},{n}] = const {values}
  %y: {dtype}[2,4,{n}] = MatMul(%x, %w)
  return %y
}}""")


def _conv(c: int, m: int, seed: int = 0, pool: bool = False) -> Model:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, c, 3, 3)) / np.sqrt(9 * c)
    b = rng.standard_normal(m)
    size = 8 if pool else 6
    head = f"  %p: f32[1,{c},6,6] = MaxPool(%x) {{kernel_shape = [2, 2], strides = [1, 1], pads = [0, 0, 1, 1]}}\n" if pool else ""  # fmt: skip
    source = "%p" if pool else "%x"
    return parse_model(f"""model opset={{"": 21}}
graph @g(%x: f32[1,{c},{size if not pool else 6},6]) {{
  %w: f32[{m},{c},3,3] = const {literal(w)}
  %b: f32[{m}] = const {literal(b)}
{head}  %y: f32[1,{m},4,4] = Conv({source}, %w, %b) {{kernel_shape = [3, 3]}}
  return %y
}}""")


def _quantize(model: Model, options: str = "", calibration=None, **kwargs):
    result = optimize_model(model, f"quantize-static{{{options}}}", verify_each=True,
                            calibration=calibration, **kwargs)  # fmt: skip
    return result.model, [n.message for n in result.notes if n.kind == "refused"]


def _scale(model: Model, weight: bool) -> np.ndarray:
    """The weight's (DequantizeLinear of a constant) or the activation's (QuantizeLinear) scale."""
    op = "DequantizeLinear" if weight else "QuantizeLinear"
    (node,) = [n for n in model.graph if n.op == op and n.inputs[0].is_constant == weight]
    return np.asarray(node.inputs[1].const_value, np.float64)


def _no_requantization(model: Model) -> None:
    """No DequantizeLinear feeds a QuantizeLinear of the same scale and zero point."""
    for node in model.graph:
        if node.op == "QuantizeLinear" and node.inputs[0].producer is not None:
            producer = node.inputs[0].producer
            assert not (
                producer.op == "DequantizeLinear" and producer.inputs[1:] == node.inputs[1:]
            ), f"{producer.describe()} -> {node.describe()}"


# ----- random graphs: within the bound the scales give --------------------------------------------


@given(
    k=st.integers(1, 24),
    n=st.integers(1, 12),
    symmetric=st.booleans(),
    per_channel=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_matmuls_stay_within_the_scale_bound(k, n, symmetric, per_channel, seed):
    """|y' - y| <= sum_k (s_x/2 |W'_kj| + |x_k| s_w,j/2): x' and W' each within half a step."""
    model = _matmul(k, n, seed)
    w = np.asarray(model.graph.initializers["w"].const_value, np.float64)
    x = np.random.default_rng(seed + 1).standard_normal((2, 4, k)).astype(np.float32)
    expected = Interpreter(model).run({"x": x})["y"].astype(np.float64)
    options = (f"min-elements=1 quantize-output-layer=true symmetric-activations="
               f"{str(symmetric).lower()} per-channel={str(per_channel).lower()}")  # fmt: skip
    out, notes = _quantize(model, options, [{"x": x}])
    assert not notes, notes
    assert [n.op for n in out.graph] == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul"]  # fmt: skip
    actual = Interpreter(out).run({"x": x})["y"].astype(np.float64)
    s_x, s_w = float(_scale(out, weight=False)), np.broadcast_to(_scale(out, weight=True), (n,))
    bound = (s_x / 2) * (np.abs(w) + s_w / 2).sum(0) + np.abs(x.astype(np.float64)) @ np.broadcast_to(s_w / 2, w.shape)  # fmt: skip
    assert np.all(np.abs(actual - expected) <= bound * (1 + 1e-3) + 1e-5)
    again, _ = _quantize(out, options, [{"x": x}])
    assert print_model(again) == print_model(out)  # nothing left to do


def _conv_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    windows = sliding_window_view(x, w.shape[2:], axis=(2, 3))  # [n, c, i, j, a, b]
    return np.einsum("ncijab,mcab->nmij", windows, w)


@given(c=st.integers(1, 4), m=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_random_convs_stay_within_the_scale_bound(c, m, seed):
    model = _conv(c, m, seed)
    w = np.asarray(model.graph.initializers["w"].const_value, np.float64)
    x = np.random.default_rng(seed + 1).standard_normal((1, c, 6, 6)).astype(np.float32)
    expected = Interpreter(model).run({"x": x})["y"].astype(np.float64)
    out, notes = _quantize(model, "min-elements=1 quantize-output-layer=true", [{"x": x}])
    assert not notes, notes
    actual = Interpreter(out).run({"x": x})["y"].astype(np.float64)
    s_x, s_w = float(_scale(out, weight=False)), _scale(out, weight=True).reshape(m, 1, 1, 1)
    ones = np.ones_like(x, np.float64)
    bound = _conv_valid(ones * s_x / 2, np.abs(w) + s_w / 2) + _conv_valid(np.abs(x.astype(np.float64)), np.broadcast_to(s_w / 2, w.shape))  # fmt: skip
    assert np.all(np.abs(actual - expected) <= bound * (1 + 1e-3) + 1e-5)


def test_pooling_stays_quantized_with_the_same_parameters():
    model = _conv(3, 8, pool=True)
    x = np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float32)
    out, _ = _quantize(model, "quantize-output-layer=true", [{"x": x}])
    ops = [n.op for n in out.graph]
    assert ops == ["QuantizeLinear", "DequantizeLinear", "MaxPool", "QuantizeLinear",
                   "DequantizeLinear", "DequantizeLinear", "Conv"]  # fmt: skip
    first, second = (n for n in out.graph if n.op == "QuantizeLinear")
    assert first.inputs[1:] == second.inputs[1:]  # one calibrated range for the chain
    _no_requantization(out)
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], Interpreter(out).run({"x": x})["y"],
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_shared_activation_gets_one_pair():
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((2, 16, 16))
    text = f"""model opset={{"": 21}}
graph @g(%x: f32[4,16]) {{
  %w1: f32[16,16] = const {literal(w1)}
  %w2: f32[16,16] = const {literal(w2)}
  %a: f32[4,16] = MatMul(%x, %w1)
  %b: f32[4,16] = MatMul(%x, %w2)
  %y: f32[4,16] = Add(%a, %b)
  return %y
}}"""
    x = rng.standard_normal((4, 16)).astype(np.float32)
    out, _ = _quantize(parse_model(text), "min-elements=1 quantize-output-layer=true", [{"x": x}])
    assert [n.op for n in out.graph].count("QuantizeLinear") == 1
    assert [n.op for n in out.graph].count("DequantizeLinear") == 3
    out, notes = _quantize(parse_model(text), "min-elements=1", [{"x": x}])
    assert [n.op for n in out.graph].count("DequantizeLinear") == 2  # %b's MatMul is the last
    assert any("final projection" in note for note in notes)


# ----- refusals ------------------------------------------------------------------------------------


def test_no_calibration_data_is_a_clear_error():
    with pytest.raises(GraphoptError, match="needs calibration data") as error:
        _quantize(_matmul(16, 16), "min-elements=1 quantize-output-layer=true")
    assert "--calibration" in str(error.value.hint)


def test_nothing_to_quantize_needs_no_data():
    before = print_model(_matmul(16, 16))
    out, notes = _quantize(_matmul(16, 16), "min-elements=1")  # the only MatMul is the output's
    assert print_model(out) == before and any("final projection" in n for n in notes)


def _refused(model: Model, options: str, reason: str) -> None:
    before = print_model(model)
    x = {"x": np.ones((2, 4, 16), np.float32)}
    out, notes = _quantize(model, f"quantize-output-layer=true {options}", [x])
    assert print_model(out) == before
    assert any(reason in note for note in notes), notes


def test_refusals():
    model = _matmul(16, 16)
    model.graph.nodes[0].name = "proj"
    _refused(model, "min-elements=1 exclude=proj,other", "excluded by the exclude option")
    _refused(_matmul(16, 16, dtype="i32"), "min-elements=1", "not float")
    _refused(_matmul(8, 8), "", "fewer than min-elements=128")
    _refused(_matmul(16, 16, opset=12), "min-elements=1", "need opset 13")


def test_bad_options_are_pipeline_errors():
    from graphopt.passes.pipeline import PipelineError

    with pytest.raises(PipelineError, match="percentile"):
        optimize_model(_matmul(16, 16), "quantize-static{percentile=0}")
    with pytest.raises(PipelineError):
        optimize_model(_matmul(16, 16), "quantize-static{calibration=kl}")


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy", "mse"])
def test_calibration_methods(method):
    model = _conv(3, 8)
    rng = np.random.default_rng(1)
    data = [{"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)} for _ in range(3)]
    out = graphopt.optimize(model, f"quantize-static{{calibration={method} quantize-output-layer=true}}", calibration=data)  # fmt: skip
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    assert cosine(Interpreter(_conv(3, 8)).run({"x": x})["y"], Interpreter(out).run({"x": x})["y"]) > 0.99  # fmt: skip


# ----- the command line ----------------------------------------------------------------------------


def test_cli_calibration_npz_random_and_missing(tmp_path, capsys):
    model_path = tmp_path / "m.onnx"
    graphopt.save(_conv(3, 8), model_path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((4, 1, 3, 6, 6)).astype(np.float32))
    base = [
        "optimize", str(model_path), "-o", str(tmp_path / "q.onnx"),
        "--passes", "quantize-static{quantize-output-layer=true}",
    ]  # fmt: skip
    report = tmp_path / "report.json"
    assert main([*base, "--calibration", str(tmp_path / "calib.npz"), "--report", str(report)]) == 0
    assert "ranges from calib.npz (4 samples)" in report.read_text()
    ops = [n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node]
    assert ops.count("QuantizeLinear") == 1
    (tmp_path / "q.onnx").unlink()
    assert main([*base, "--calibration", "random:3"]) == 0
    assert "RANDOM data (seed 0, 3 samples)" in capsys.readouterr().out.replace("\n", "")
    (tmp_path / "q.onnx").unlink()
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "needs calibration data" in err
    assert not (tmp_path / "q.onnx").exists()
    assert main([*base, "--calibration", "random:0"]) == 2
    assert "bad --calibration" in capsys.readouterr().err
    np.savez(tmp_path / "wrong.npz", y=np.zeros((2, 1, 3, 6, 6), np.float32))
    assert main([*base, "--calibration", str(tmp_path / "wrong.npz")]) == 2
    assert "missing x" in capsys.readouterr().err


# ----- the zoo's tiny models ----------------------------------------------------------------------

ZOO = ["gpt2", "bert", "llama", "resnet"]


def _calibration_set(name: str) -> list[dict[str, np.ndarray]]:
    from models.zoo import sample_inputs

    return [sample_inputs(name, seed=seed) for seed in (11, 12, 13, 14)]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_accuracy(zoo_model, name, tmp_path):
    from models.zoo import sample_inputs

    path = zoo_model(name, "dynamo")
    feeds = sample_inputs(name)  # seed 0: not among the calibration samples
    expected = run_ort(graphopt.load(path), feeds)
    model = graphopt.optimize(graphopt.load(path), "O2,quantize-static", verify_each=True,
                              calibration=_calibration_set(name))  # fmt: skip
    ops = [n.op for n in model.graph]
    assert ops.count("QuantizeLinear") >= 1 and ops.count("DequantizeLinear") >= 4
    _no_requantization(model)
    graphopt.save(model, tmp_path / "q.onnx")
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    in_ort = run_ort(onnx.load(tmp_path / "q.onnx"), feeds)
    in_reference = list(Interpreter(model).run(feeds).values())
    for e, a, r in zip(expected, in_ort, in_reference, strict=True):
        assert cosine(e, a) >= 0.99, (name, cosine(e, a))
        assert cosine(e, r) >= 0.99, (name, cosine(e, r))
