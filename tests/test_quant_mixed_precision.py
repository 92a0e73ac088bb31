"""Mixed precision under an accuracy budget (passes/quantization/mixed_precision.py): on the zoo's
tiny models a budget tighter than full quantization keeps the most sensitive layers float and
the result meets it on the calibration data (measured here, independently, in the reference
interpreter); a hand-built model whose one bad layer must be the one kept float; a budget only
float meets; bad values and a budget without data, from a pipeline, the API and the command
line; and the drop metric itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from quant_checks import cosine, literal

import graphopt
from graphopt.api.cli import main
from graphopt.backends.reference import Interpreter
from graphopt.ir import Model, parse_model
from graphopt.ir.errors import GraphoptError
from graphopt.passes import optimize_model
from graphopt.passes.quantization.mixed_precision import output_drop

PASSES = ("quantize-static", "quantize-dynamic", "quantize-weights")


def _drop(reference: Model, quantized: Model, samples: list[dict[str, np.ndarray]]) -> float:
    """1 - cosine, worst over float outputs and samples, computed here from scratch."""
    worst = 0.0
    for feeds in samples:
        expected = Interpreter(reference).run(feeds)
        actual = Interpreter(quantized).run(feeds)
        for name, e in expected.items():
            if e.dtype.kind == "f":
                worst = max(worst, 1 - cosine(e, actual[name]))
    return worst


def _kept_notes(result) -> list[str]:
    return [
        n.message for n in result.notes if n.kind == "refused" and "kept float for" in n.message
    ]


def _weight_is_float(model: Model, layer: str) -> bool:
    (node,) = [n for n in model.graph if n.name == layer]
    weight = node.inputs[1]
    return weight.is_constant and np.asarray(weight.const_value).dtype == np.float32


# ----- the zoo's tiny models ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "pass_name"),
    [("gpt2", "quantize-static"), ("bert", "quantize-static"), ("llama", "quantize-static"),
     ("resnet", "quantize-static"), ("bert", "quantize-dynamic"), ("llama", "quantize-weights")],
)  # fmt: skip
def test_zoo_budget_keeps_the_worst_layers_float_and_is_met(zoo_model, name, pass_name):
    from models.zoo import sample_inputs

    path = zoo_model(name, "dynamo")
    samples = [sample_inputs(name, seed=seed, batch=1) for seed in (11, 12)]

    def prepared() -> Model:
        model = graphopt.load(path)
        optimize_model(model, "O2")
        return model

    reference = prepared()
    everything = optimize_model(prepared(), pass_name, calibration=samples)
    quantized_layers = len(everything.artifacts["quantization"].layers)
    drop_all = _drop(reference, everything.model, samples)
    assert quantized_layers >= 4 and drop_all > 0

    budget = drop_all / 4
    pipeline = f"{pass_name}{{max-accuracy-drop={budget!r}}}"
    result = optimize_model(prepared(), pipeline, verify_each=True, calibration=samples)
    report = result.artifacts["quantization"]
    (decision,) = report.budgets
    kept = list(decision.kept_float)
    assert 1 <= len(kept) <= quantized_layers and decision.quantizable == quantized_layers
    assert decision.drop_all_quantized == pytest.approx(drop_all, rel=1e-3)
    assert len(report.layers) == quantized_layers - len(kept)
    assert not {layer.layer for layer in report.layers} & set(kept)
    assert all(_weight_is_float(result.model, layer) for layer in kept)
    drops_alone = list(decision.kept_float.values())
    assert drops_alone == sorted(drops_alone, reverse=True)  # the worst first
    assert len(_kept_notes(result)) == len(kept)
    measured = _drop(reference, result.model, samples)
    assert measured <= budget * (1 + 1e-6), (name, kept, measured, budget)
    assert measured == pytest.approx(decision.drop, rel=1e-3, abs=1e-12)
    print(f"{name} {pass_name}: {quantized_layers} layers, all quantized 1-cos={drop_all:.3g}; "
          f"budget {budget:.3g} keeps {kept} float -> 1-cos={measured:.3g}")  # fmt: skip


# ----- a model with one bad layer -----------------------------------------------------------------


def _two_layers(outlier: float = 30.0) -> Model:
    """x @ W1 -> Relu -> @ W2, where W1 holds one large weight: per tensor, its scale leaves the
    other weights a handful of levels, so W1 is the layer that hurts."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 64)) / 8
    w1[0, 0] = outlier
    w2 = rng.standard_normal((64, 32)) / 8
    return parse_model(f"""model opset={{"": 21}}
graph @g(%x: f32[8,64]) {{
  %w1: f32[64,64] = const {literal(w1)}
  %w2: f32[64,32] = const {literal(w2)}
  %h: f32[8,64] = MatMul(%x, %w1) name="first"
  %r: f32[8,64] = Relu(%h)
  %y: f32[8,32] = MatMul(%r, %w2) name="second"
  return %y
}}""")


def _samples(count: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(count)]


OPTIONS = {
    "quantize-static": "per-channel=false quantize-output-layer=true",
    "quantize-dynamic": "per-channel=false quantize-output-layer=true",
    "quantize-weights": "min-elements=16 block-size=0",
}


def _pipeline(pass_name: str, extra: str = "") -> str:
    """The pass with the options that make both layers of `_two_layers` candidates."""
    return f"{pass_name}{{{OPTIONS[pass_name]} {extra}}}"


@pytest.mark.parametrize("pass_name", PASSES)
def test_the_bad_layer_is_the_one_kept_float(pass_name):
    samples = _samples()
    pipeline = _pipeline(pass_name)
    everything = optimize_model(_two_layers(), pipeline, calibration=samples)
    drop_all = _drop(_two_layers(), everything.model, samples)
    exclude_first = _pipeline(pass_name, "exclude=first")
    only_second = optimize_model(_two_layers(), exclude_first, calibration=samples)
    drop_second = _drop(_two_layers(), only_second.model, samples)
    assert drop_second < drop_all / 10  # the setup: the first layer is the bad one
    budget = (drop_second + drop_all) / 2
    pipeline = _pipeline(pass_name, f"max-accuracy-drop={budget!r}")
    result = optimize_model(_two_layers(), pipeline, calibration=samples)
    report = result.artifacts["quantization"]
    assert list(report.budgets[0].kept_float) == ["first"]
    assert [layer.layer for layer in report.layers] == ["second"]
    assert _drop(_two_layers(), result.model, samples) == pytest.approx(drop_second, rel=1e-6)
    (note,) = _kept_notes(result)
    assert "'first'" in [n.node for n in result.notes if n.message == note][0]
    assert "the 1st worst of 2 layers" in note
    assert [n for n in result.notes if "excluded by the exclude option" in n.message] == []


def test_a_budget_only_float_meets_keeps_everything_float():
    samples = _samples(2)
    model = _two_layers()
    pipeline = _pipeline("quantize-static", "max-accuracy-drop=0")
    result = optimize_model(model, pipeline, calibration=samples)
    assert not result.records[-1].changed
    assert [n.op for n in model.graph] == ["MatMul", "Relu", "MatMul"]
    (warning,) = [n.message for n in result.notes if n.kind == "warning"]
    assert "max-accuracy-drop=0 cannot be met with any layer quantized" in warning
    assert "the model stays float" in warning
    assert sorted(result.artifacts["quantization"].budgets[0].kept_float) == ["first", "second"]
    for feeds in samples:  # the float model itself, to the bit
        expected = Interpreter(_two_layers()).run(feeds)["y"]
        np.testing.assert_array_equal(Interpreter(model).run(feeds)["y"], expected)


def test_a_loose_budget_quantizes_everything_and_the_run_option_counts():
    samples = _samples(2)

    def quantize_linears(pipeline: str, run_budget: float) -> int:
        model = graphopt.optimize(
            _two_layers(), pipeline, calibration=samples, max_accuracy_drop=run_budget
        )
        return [n.op for n in model.graph].count("QuantizeLinear")

    assert quantize_linears(_pipeline("quantize-static"), 0.5) == 2
    assert quantize_linears(_pipeline("quantize-static"), 0.0) == 0
    # the pass's own option wins over the run's
    assert quantize_linears(_pipeline("quantize-static", "max-accuracy-drop=0.5"), 0.0) == 2


# ----- bad values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pass_name", PASSES)
@pytest.mark.parametrize("value", ["-0.1", "1", "1.5", "nan", "inf", "abc"])
def test_bad_budget_in_a_pipeline_is_a_clear_error(pass_name, value):
    with pytest.raises(GraphoptError, match=r"max-accuracy-drop.*(\[0, 1\)|expected a number)"):
        pipeline = _pipeline(pass_name, f"max-accuracy-drop={value}")
        optimize_model(_two_layers(), pipeline, calibration=_samples(1))


def test_bad_run_option_and_missing_data_are_clear_errors():
    message = r"max-accuracy-drop \(the run's option\) must be a number in \[0, 1\), not -1"
    with pytest.raises(GraphoptError, match=message):
        graphopt.optimize(
            _two_layers(), "quantize-dynamic", calibration=_samples(1), max_accuracy_drop=-1
        )
    with pytest.raises(GraphoptError, match="needs calibration data to measure the drop") as error:
        graphopt.optimize(_two_layers(), "quantize-weights{min-elements=16 max-accuracy-drop=0.01}")
    assert "--calibration" in str(error.value)


@pytest.mark.parametrize("value", ["-0.1", "1", "2", "x"])
def test_cli_bad_budget_exits_2(tmp_path, capsys, value):
    graphopt.save(_two_layers(), tmp_path / "m.onnx")
    code = main(["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"),
                 "--passes", "quantize-static", "--calibration", "random:1",
                 "--max-accuracy-drop", value])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max-accuracy-drop must be a number in [0, 1)")
    assert not (tmp_path / "q.onnx").exists()


def test_cli_budget_reports_the_layers_kept_float(tmp_path, capsys):
    import json

    graphopt.save(_two_layers(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.stack([s["x"] for s in _samples(2)]))
    code = main(["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"),
                 "--passes", f"quantize-static{{{OPTIONS['quantize-static']}}}",
                 "--calibration", str(tmp_path / "calib.npz"), "--max-accuracy-drop", "0.001",
                 "--report", str(tmp_path / "r.json")])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out.replace("\n", " ")
    assert "max-accuracy-drop=0.001" in out and "kept float" in out and "first" in out
    (budget,) = json.loads((tmp_path / "r.json").read_text())["quantization"]["budgets"]
    assert budget["max_accuracy_drop"] == 0.001 and budget["drop"] <= 0.001
    assert [k["layer"] for k in budget["kept_float"]] == ["first"]


# ----- the metric ---------------------------------------------------------------------------------

arrays = st.lists(
    st.floats(-100, 100, allow_nan=False, allow_subnormal=False, width=32), min_size=1, max_size=16
).map(lambda v: np.asarray(v, np.float32))


@given(arrays, st.floats(0.01, 100))
def test_drop_is_zero_for_equal_or_positively_scaled_outputs(a, factor):
    assert output_drop([[a]], [[a]]) == pytest.approx(0.0, abs=1e-12)
    scaled = (a * np.float32(factor)).astype(np.float32)
    assert output_drop([[a]], [[scaled]]) == pytest.approx(0.0, abs=1e-6)


@given(st.lists(st.tuples(arrays, st.floats(-1, 1)), min_size=1, max_size=4))
def test_drop_is_the_worst_over_samples_and_within_0_2(pairs):
    reference = [[a, np.arange(3)] for a, _ in pairs]  # the integer output is not compared
    outputs = [[a + np.float32(noise), np.arange(3) + 9] for a, noise in pairs]
    each = [output_drop([r], [o]) for r, o in zip(reference, outputs, strict=True)]
    assert output_drop(reference, outputs) == max(each)
    assert all(0 <= d <= 2 for d in each)


def test_drop_edge_cases():
    a = np.float32([1, 2, 3])
    assert output_drop([[a]], [[-a]]) == pytest.approx(2.0)
    assert output_drop([[a]], [[np.float32([1, math.nan, 3])]]) == 2.0
    assert output_drop([[np.zeros(3, np.float32)]], [[np.zeros(3, np.float32)]]) == 0.0
    assert output_drop([[a]], [[np.zeros(3, np.float32)]]) == 1.0
