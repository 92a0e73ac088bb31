"""Calibration (passes/quantization/calibration.py, observers.py): observers on synthetic data
with known answers, the histogram's exact growth, the data sources, and `calibrate` on a small
model (ranges of intermediate values, model left unchanged)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from graphopt.ir import parse_model, print_model
from graphopt.ir.errors import GraphoptError
from graphopt.passes.quantization.calibration import (
    CalibrationData,
    calibrate,
    from_npz,
    random_feeds,
)
from graphopt.passes.quantization.observers import (
    HistogramObserver,
    MovingAverageObserver,
    make_observer,
)
from graphopt.passes.quantization.scheme import QuantScheme, compute_params, dequantize, quantize


def _observe(method: str, batches, **options):
    observer = make_observer(method, **options)
    for batch in batches:
        observer.update(batch)
    lo, hi = observer.range()
    return float(lo), float(hi)


def _normal(n_batches=20, size=10_000, seed=0, outliers=0):
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal(size).astype(np.float32) for _ in range(n_batches)]
    for i in range(outliers):  # a few huge values in a few batches
        batches[i][0] = 60.0 * (1 if i % 2 else -1) * (1 + i)
    return batches


# ----- observers ----------------------------------------------------------------------------------


def test_minmax_per_tensor_and_per_channel():
    batches = [np.array([[1.0, -2.0], [3.0, 0.5]]), np.array([[-4.0, 2.0], [0.0, 1.0]])]
    assert _observe("minmax", batches) == (-4.0, 3.0)
    observer = make_observer("minmax", axis=1)
    for b in batches:
        observer.update(b)
    lo, hi = observer.range()
    assert lo.tolist() == [-4.0, -2.0] and hi.tolist() == [3.0, 2.0]


def test_moving_average_follows_the_formula():
    observer = MovingAverageObserver(momentum=0.25)
    for top in [4.0, 8.0, 0.0]:
        observer.update(np.array([-top, top]))
    expected = 4.0 + 0.25 * (8.0 - 4.0)
    expected = expected + 0.25 * (0.0 - expected)
    assert float(observer.range()[1]) == pytest.approx(expected)
    assert float(observer.range()[0]) == pytest.approx(-expected)


@pytest.mark.parametrize("p, z", [(99.0, 2.3263), (99.9, 3.0902), (95.0, 1.6449)])
def test_percentile_of_a_normal_distribution(p, z):
    lo, hi = _observe("percentile", _normal(), percentile=p)
    assert hi == pytest.approx(z, abs=0.04) and lo == pytest.approx(-z, abs=0.04)


def test_percentile_ignores_outliers_minmax_does_not():
    batches = _normal(outliers=4)
    assert _observe("minmax", batches)[1] > 100
    lo, hi = _observe("percentile", batches, percentile=99.0)
    assert hi == pytest.approx(2.3263, abs=0.1) and lo == pytest.approx(-2.3263, abs=0.1)


def _quant_mse(values: np.ndarray, lo: float, hi: float) -> float:
    scheme = QuantScheme("uint8", symmetric=False)
    scale, zero = compute_params(np.float32(lo), np.float32(hi), scheme)
    y = dequantize(quantize(values, scale, zero, scheme), scale, zero, scheme)
    return float(np.mean((y.astype(np.float64) - values) ** 2))


def test_entropy_clips_outliers():
    batches = _normal(outliers=4)
    m_lo, m_hi = _observe("minmax", batches)
    lo, hi = _observe("entropy", batches)
    assert hi - lo < 0.25 * (m_hi - m_lo)  # much narrower than min/max
    assert hi > 2.0 and lo < -2.0  # yet it keeps the bulk of the distribution


def test_mse_range_beats_minmax_on_squared_error():
    # 1M values and two outliers: clipping them costs less squared error than spreading 256
    # levels over [-60, 120] would cost the million
    batches = _normal(size=50_000, outliers=2)
    values = np.concatenate(batches)
    m_lo, m_hi = _observe("minmax", batches)
    lo, hi = _observe("mse", batches)
    assert hi - lo < 0.5 * (m_hi - m_lo) and hi > 2.0 and lo < -2.0
    assert _quant_mse(values, lo, hi) < 0.5 * _quant_mse(values, m_lo, m_hi)


def test_mse_keeps_the_whole_range_of_a_uniform_distribution():
    rng = np.random.default_rng(1)
    batches = [rng.uniform(-1, 1, 20_000) for _ in range(5)]
    lo, hi = _observe("mse", batches)
    assert lo == pytest.approx(-1, abs=0.02) and hi == pytest.approx(1, abs=0.02)
    # (entropy calibration is known to clip uniform data: every window's KL is near zero)


def test_asymmetric_data_gets_an_asymmetric_range():
    rng = np.random.default_rng(2)
    batches = [np.maximum(rng.standard_normal(20_000), 0) for _ in range(5)]  # after ReLU
    for method in ("percentile", "entropy", "mse"):
        lo, hi = _observe(method, batches)
        assert lo == pytest.approx(0, abs=0.05) and hi > 2.0, method


@given(st.lists(st.tuples(st.floats(-1e3, 1e3), st.floats(0, 1e3)), min_size=1, max_size=6),
       st.integers(0, 2**16))  # fmt: skip
def test_histogram_growth_keeps_every_count(batches, seed):
    """However the span grows, every value lands in the bin holding it, and none is lost."""
    rng = np.random.default_rng(seed)
    h = HistogramObserver(bins=64)
    seen = []
    for center, spread in batches:
        x = center + spread * rng.standard_normal(50)
        h.update(x)
        seen.append(x)
    values = np.concatenate(seen)
    assert h.counts.sum() == values.size
    edges = h.edges
    assert edges[0] <= values.min() and edges[-1] >= values.max()
    expected = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0]
    # a value on an inner edge may be counted on either side of it (floating point)
    inner = edges[1:-1]
    tolerance = 1e-9 * np.maximum(np.abs(inner), 1.0)
    near = (np.abs(values[None, :] - inner[:, None]) <= tolerance[:, None]).sum(axis=1)
    assert np.all(np.abs(np.cumsum(expected) - np.cumsum(h.counts))[:-1] <= near)


def test_observers_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="unknown calibration method"):
        make_observer("kl")
    with pytest.raises(ValueError, match="per tensor"):
        make_observer("percentile", axis=0)
    with pytest.raises(ValueError, match="no data"):
        make_observer("minmax").range()


# ----- data sources and calibrate -----------------------------------------------------------------

MODEL = """model opset={"": 18}
graph @main(%x: f32[2,4]) {
  %two: f32[] = const [2.0]
  %h: f32[2,4] = Mul(%x, %two)
  %r: f32[2,4] = Relu(%h)
  %y: f32[2,4] = Sub(%r, %two)
  return %y
}"""


def test_calibrate_records_intermediate_values_and_keeps_the_model():
    model = parse_model(MODEL)
    before = print_model(model)
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal((2, 4)).astype(np.float32)} for _ in range(5)]
    ranges = calibrate(model, CalibrationData(samples, "test"), progress=False)
    assert set(ranges) == {"x", "h", "r", "y"}
    xs = np.stack([s["x"] for s in samples])
    assert float(ranges["x"][0]) == pytest.approx(xs.min()) and float(
        ranges["x"][1]
    ) == pytest.approx(xs.max())
    assert float(ranges["h"][1]) == pytest.approx(2 * xs.max())
    assert float(ranges["r"][0]) == 0.0
    assert float(ranges["y"][0]) == -2.0
    assert print_model(model) == before
    per_channel = calibrate(model, samples, ["h"], axes={"h": 1}, progress=False)
    assert per_channel["h"][1].tolist() == pytest.approx((2 * xs.max(axis=(0, 1))).tolist())


def test_calibrate_with_a_progress_bar_and_random_data(capsys):
    model = parse_model(MODEL)
    data = random_feeds(model, 3, seed=1)
    assert data.is_random and "RANDOM" in data.label and len(data) == 3
    ranges = calibrate(model, data, ["r"], method="percentile", percentile=99.0)
    assert float(ranges["r"][0]) >= 0.0


def test_calibrate_names_unknown_values():
    with pytest.raises(GraphoptError, match="no value named nope"):
        calibrate(parse_model(MODEL), [], ["nope"], progress=False)


def test_from_npz(tmp_path):
    model = parse_model(MODEL)
    x = np.arange(24, dtype=np.float32).reshape(3, 2, 4)
    np.savez(tmp_path / "calib.npz", x=x)
    data = from_npz(tmp_path / "calib.npz", model)
    assert len(data) == 3 and not data.is_random
    assert [s["x"].tolist() for s in data] == [a.tolist() for a in x]
    ranges = calibrate(model, data, ["x"], progress=False)
    assert (float(ranges["x"][0]), float(ranges["x"][1])) == (0.0, 23.0)
    np.savez(tmp_path / "bad.npz", z=x)
    with pytest.raises(GraphoptError, match="missing x"):
        from_npz(tmp_path / "bad.npz", model)
    np.savez(tmp_path / "ragged.npz", x=x, w=x[:2])
    with pytest.raises(GraphoptError, match="same number"):
        from_npz(tmp_path / "ragged.npz")
