"""The per-layer quantization report (passes/quantization/quant_report.py): on one-MatMul models
built by hand, the scales and zero points, the clipping rate (zero by construction with minmax
ranges, the planted outliers with percentile ranges) and the SNR, each against numpy; the
JSON report, the command line's table, and the warning on a CPU without fast int8."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from quant_checks import literal

from graphopt.api.cli import main
from graphopt.ir import Model, parse_model
from graphopt.passes import optimize_model
from graphopt.passes.quantization import quant_report
from graphopt.passes.quantization.cpu_features import CpuFeatures
from graphopt.passes.quantization.scheme import QuantScheme, compute_params, dequantize, quantize

K, N, ROWS = 64, 32, 8


def _weight(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)


def _matmul(w: np.ndarray) -> Model:
    return parse_model(f"""model opset={{"": 21}}
graph @g(%x: f32[{ROWS},{K}]) {{
  %w: f32[{K},{N}] = const {literal(w)}
  %y: f32[{ROWS},{N}] = MatMul(%x, %w)
  return %y
}}""")


def _samples(count: int, seed: int = 1, scale: float = 1.0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"x": (scale * rng.standard_normal((ROWS, K))).astype(np.float32)} for _ in range(count)
    ]


def _run(model: Model, pipeline: str, calibration=None):
    result = optimize_model(model, pipeline, verify_each=True, calibration=calibration)
    return result, result.artifacts.get("quantization")


def _snr(expected: list[np.ndarray], actual: list[np.ndarray]) -> float:
    f = np.concatenate([e.astype(np.float64).ravel() for e in expected])
    q = np.concatenate([a.astype(np.float64).ravel() for a in actual])
    return float(10 * np.log10(np.square(f).sum() / np.square(q - f).sum()))


def _fake_dequantize(x: np.ndarray, scale, zero, scheme: QuantScheme) -> np.ndarray:
    return dequantize(quantize(x, scale, zero, scheme), scale, zero, scheme)


def test_static_layer_scales_clipping_and_snr_match_numpy() -> None:
    w, data = _weight(), _samples(3)
    result, report = _run(_matmul(w), "quantize-static{quantize-output-layer=true}", data)
    (layer,) = report.layers
    assert (layer.pass_name, layer.op, layer.mode) == ("quantize-static", "MatMul", "static")
    assert layer.layer == "MatMul -> %y" and layer.float_output == "y"  # unnamed: op and output
    # weight: int8 symmetric per output column, scale = max |w| / 127
    w_scale = np.abs(w).max(axis=0) / 127
    np.testing.assert_allclose(layer.weight_scale, w_scale, rtol=1e-6)
    assert layer.weight_dtype == "int8" and not np.any(layer.weight_zero_point)
    # activation: uint8 asymmetric over the calibration data's min and max
    x = np.stack([s["x"] for s in data])
    a_scheme = QuantScheme("uint8", symmetric=False)
    a_scale, a_zero = compute_params(x.min(), x.max(), a_scheme)
    assert layer.activation == "x" and layer.activation_dtype == "uint8"
    np.testing.assert_allclose(layer.activation_scale, a_scale, rtol=1e-6)
    assert int(layer.activation_zero_point) == int(a_zero)
    assert layer.clipping_rate == 0.0  # minmax ranges cover the calibration data by construction
    # SNR of the output against the numpy simulation of the quantized MatMul
    w_scheme = QuantScheme("int8", True, axis=1)
    w_q = _fake_dequantize(w, layer.weight_scale, np.zeros(N, np.int8), w_scheme)
    expected = [s["x"] @ w for s in data]
    actual = [_fake_dequantize(s["x"], a_scale, a_zero, a_scheme) @ w_q for s in data]
    assert layer.snr_db == pytest.approx(_snr(expected, actual), abs=0.01)
    assert 20 < layer.snr_db < 60
    assert report.calibration == "3 calibration samples"


def test_percentile_ranges_clip_exactly_the_planted_outliers() -> None:
    """The percentile observer's histogram spans [0, 100] in 2048 bins; the regular values sit on
    a bin's lower edge, so the 99th percentile, read linearly inside their bin, is at least them,
    while the 5 outliers per sample (under 1%) lie far above it: exactly they clip."""
    rng = np.random.default_rng(3)
    regular = np.float32(5 * 100 / 2048)
    data = []
    for _ in range(4):
        x = rng.choice(np.float32([0.0, regular]), size=(ROWS, K))
        x.flat[rng.choice(x.size, 5, replace=False)] = 100.0
        data.append({"x": x.astype(np.float32)})
    pipeline = "quantize-static{quantize-output-layer=true calibration=percentile percentile=99}"
    _, report = _run(_matmul(_weight()), pipeline, data)
    (layer,) = report.layers
    hi = (255 - int(layer.activation_zero_point)) * float(layer.activation_scale)
    assert regular <= hi < 1  # the range kept the regular values and left the outliers out
    assert layer.clipping_rate == 20 / (4 * ROWS * K)


def test_relu_clamp_at_zero_is_not_clipping() -> None:
    """A range starting at 0 (zero point 0) clamps negatives on purpose (a folded Relu)."""
    layer = quant_report.QuantizedLayer(
        "l", "MatMul", "static", "y", "int8", np.float32(1), activation="x",
        activation_dtype="uint8", activation_scale=np.float32(0.1),
        activation_zero_point=np.uint8(0),
    )  # fmt: skip
    counter = quant_report._Clipping(layer)
    counter.update({"x": np.float32([-5, -1, 0, 1, 25.4, 25.6, 30])})
    assert counter.rate() == pytest.approx(
        2 / 7
    )  # 25.6 and 30 pass code 255; negatives do not count


@given(st.integers(1, 4), st.integers(0, 10_000))
def test_dynamic_and_weight_only_snr_match_numpy(samples: int, seed: int) -> None:
    w, data = _weight(seed), _samples(samples, seed + 1)
    expected = [s["x"] @ w for s in data]
    _, report = _run(_matmul(w), "quantize-dynamic{quantize-output-layer=true}", data)
    (layer,) = report.layers
    assert layer.mode == "dynamic" and layer.clipping_rate is None and layer.activation is None
    assert layer.weight_dtype == "uint8" and np.all(layer.weight_zero_point == 128)
    w_scheme = QuantScheme("uint8", True, axis=1)
    w_q = _fake_dequantize(w, layer.weight_scale, layer.weight_zero_point, w_scheme)
    actual = []
    for s in data:
        from graphopt.passes.quantization.scheme import dynamic_params

        x_scale, x_zero = dynamic_params(s["x"])
        x_q = _fake_dequantize(s["x"], x_scale, x_zero, QuantScheme("uint8", False))
        actual.append(x_q @ w_q)
    assert layer.snr_db == pytest.approx(_snr(expected, actual), abs=0.02)

    _, report = _run(_matmul(w), "quantize-weights{min-elements=16}", data)
    (layer,) = report.layers
    assert layer.mode == "weight-only" and layer.clipping_rate is None
    w_scheme = QuantScheme("int8", True, axis=1)
    w_q = _fake_dequantize(w, layer.weight_scale, layer.weight_zero_point, w_scheme)
    assert layer.snr_db == pytest.approx(_snr(expected, [s["x"] @ w_q for s in data]), abs=0.01)


def test_without_calibration_data_only_the_scales_are_reported() -> None:
    w = _weight()
    _, report = _run(_matmul(w), "quantize-weights{min-elements=16 bits=4 block-size=16}")
    (layer,) = report.layers
    assert layer.snr_db is None and layer.clipping_rate is None and report.calibration == ""
    # 4 bits: asymmetric by default
    assert layer.weight_dtype == "uint4" and np.shape(layer.weight_scale) == (K // 16, N)
    summary = layer.to_json()["weight"]["scale"]
    assert summary["count"] == K // 16 * N
    assert summary["max"] == pytest.approx(float(np.max(layer.weight_scale)))
    assert summary["min"] <= summary["mean"] <= summary["max"]


def test_nothing_quantized_leaves_no_report() -> None:
    result, report = _run(_matmul(_weight()), "quantize-static", _samples(1))  # the output layer
    assert report is None and "quantization" not in result.to_json()


def test_cpu_without_fast_int8_warns_for_int8_compute_only(monkeypatch) -> None:
    slow = CpuFeatures("x86_64", "test", 2, frozenset({"avx2"}), "/proc/cpuinfo")
    fast = CpuFeatures("x86_64", "test", 2, frozenset({"avx2", "avx512_vnni"}), "/proc/cpuinfo")
    data = _samples(1)

    def warnings(cpu: CpuFeatures, pipeline: str) -> list[str]:
        monkeypatch.setattr(quant_report, "detect_cpu", lambda: cpu)
        result, report = _run(_matmul(_weight()), pipeline, data)
        assert report.cpu is cpu
        return [n.message for n in result.notes if n.kind == "warning"]

    for pass_name in ("quantize-static", "quantize-dynamic"):
        pipeline = f"{pass_name}{{quantize-output-layer=true}}"
        (message,) = warnings(slow, pipeline)
        assert "without fast int8" in message and "no VNNI/AMX" in message
        assert all(word in message for word in ("quantize-weights", "convert-float16", "float"))
        assert warnings(fast, pipeline) == []
    assert warnings(slow, "quantize-weights{min-elements=16}") == []


def test_json_report_and_command_line_table(tmp_path, capsys) -> None:
    import graphopt

    graphopt.save(_matmul(_weight()), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.stack([s["x"] for s in _samples(2)]))
    code = main([
        "optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"),
        "--passes", "quantize-static{quantize-output-layer=true}",
        "--calibration", str(tmp_path / "calib.npz"), "--report", str(tmp_path / "r.json"),
    ])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "quantize-static: 1 layers, measured on calib.npz (2 samples)" in out.replace("\n", " ")
    assert "CPU: " in out and "SNR dB" in out
    section = json.loads((tmp_path / "r.json").read_text())["quantization"]
    assert section["cpu"]["arch"] and section["cpu_description"]
    (layer,) = section["layers"]
    assert layer["mode"] == "static" and layer["op"] == "MatMul"
    assert layer["activation"]["clipping_rate"] == 0.0 and layer["snr_db"] > 20
    assert layer["weight"]["scale"]["count"] == N and layer["activation"]["dtype"] == "uint8"
    assert section["budgets"] == []
