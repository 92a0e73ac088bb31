"""Pruning scores and selection (passes/pruning/importance.py), activation norms
(passes/pruning/activations.py) and the `observe` hook they run on (quantization/calibration.py):
properties on random arrays against direct formulas, and norms on a small model checked against
the stacked samples."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from graphopt.ir import parse_model, print_model
from graphopt.ir.errors import GraphoptError
from graphopt.passes.pruning.activations import input_norms
from graphopt.passes.pruning.importance import (
    activation_aware,
    bn_gamma,
    drop_count,
    lowest,
    magnitude,
    n_m_keep,
    reduce_scores,
    select_global,
    select_per_layer,
)
from graphopt.passes.quantization.calibration import observe

# small integers as floats: plenty of ties, exact sums
_ELEMENTS = st.integers(-4, 4).map(float)
_SHAPES = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5)
arrays = _SHAPES.flatmap(lambda shape: hnp.arrays(np.float32, shape, elements=_ELEMENTS))
vectors = hnp.arrays(np.float64, st.integers(1, 40), elements=_ELEMENTS)
ratios = st.floats(0.0, 0.99)


# ----- scores -------------------------------------------------------------------------------------


@given(arrays, st.data())
def test_magnitude_per_element_and_per_axis(w, data):
    assert np.array_equal(magnitude(w), np.abs(w.astype(np.float64)))
    assert np.array_equal(magnitude(w, norm="l2"), np.square(w.astype(np.float64)))
    axis = data.draw(st.integers(-w.ndim, w.ndim - 1))
    l1, l2 = magnitude(w, axis), magnitude(w, axis, "l2")
    assert l1.shape == l2.shape == (w.shape[axis],)
    for i in range(w.shape[axis]):  # the slice at index i, directly
        part = np.take(w, i, axis=axis).astype(np.float64)
        assert l1[i] == np.abs(part).sum()
        assert l2[i] == pytest.approx(np.sqrt(np.square(part).sum()))


@given(arrays.filter(lambda w: w.ndim >= 2))
def test_magnitude_over_a_tuple_of_axes_keeps_them_in_order(w):
    scores = magnitude(w, (1, 0))
    assert scores.shape == w.shape[:2]
    expected = np.abs(w.astype(np.float64)).reshape(*w.shape[:2], -1).sum(axis=-1)
    assert np.array_equal(scores, expected)


def test_bad_axes_and_norms_are_rejected():
    with pytest.raises(ValueError, match="out of range"):
        magnitude(np.ones((2, 3)), 2)
    with pytest.raises(ValueError, match="norm"):
        magnitude(np.ones(3), norm="l3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="norm"):
        reduce_scores(np.ones((2, 3)), 0, "max")  # type: ignore[arg-type]


@given(arrays.filter(lambda w: w.ndim >= 2), st.data())
def test_activation_aware_is_magnitude_times_the_input_norm(w, data):
    axis = data.draw(st.integers(0, w.ndim - 1))
    norms = data.draw(hnp.arrays(np.float64, w.shape[axis], elements=st.floats(0, 8)))
    scores = activation_aware(w, norms, axis)
    for j in range(w.shape[axis]):
        assert np.array_equal(
            np.take(scores, j, axis=axis), np.abs(np.take(w, j, axis=axis)) * norms[j]
        )
    # equal input norms rank like magnitude; reduction to rows is the same reduction
    flat = activation_aware(w, np.full(w.shape[axis], 3.0), axis)
    assert np.array_equal(flat, 3.0 * magnitude(w))
    assert np.allclose(reduce_scores(flat, 0), 3.0 * magnitude(w, 0))


def test_activation_aware_checks_the_input_axis():
    with pytest.raises(ValueError, match="3 input norms"):
        activation_aware(np.ones((4, 2)), np.ones(3), 0)
    with pytest.raises(ValueError, match="out of range"):
        activation_aware(np.ones((4, 2)), np.ones(4), 2)
    grouped = activation_aware(np.ones((4, 2, 1, 1)), np.arange(8.0).reshape(4, 2, 1, 1), 1)
    assert grouped[:, :, 0, 0].tolist() == np.arange(8.0).reshape(4, 2).tolist()


def test_bn_gamma_is_its_absolute_value():
    assert bn_gamma(np.array([-2.0, 0.5, 0.0], np.float32)).tolist() == [2.0, 0.5, 0.0]


# ----- selection ----------------------------------------------------------------------------------


@given(st.integers(0, 10_000), ratios, st.integers(0, 5))
def test_drop_count(size, ratio, min_keep):
    count = drop_count(size, ratio, min_keep)
    assert 0 <= count <= max(0, size - min_keep)
    if size - min_keep >= int(ratio * size) + 1:
        assert count in (int(ratio * size), int(ratio * size) + 1)  # the float product's floor
    assert drop_count(100, 0.29) == 29 and drop_count(7, 0.5) == 3 and drop_count(3, 0.9) == 2
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        drop_count(10, 1.0)


@given(vectors, ratios)
def test_lowest_drops_exactly_the_count_and_breaks_ties_by_position(scores, ratio):
    dropped = select_per_layer(scores, ratio)
    assert len(dropped) == drop_count(scores.size, ratio) and np.all(np.diff(dropped) > 0)
    kept = np.setdiff1d(np.arange(scores.size), dropped)
    if len(dropped) and len(kept):
        assert scores[dropped].max() <= scores[kept].min()
        # a kept entry tying with a dropped one sits after it
        tie = scores[dropped].max()
        assert (
            kept[scores[kept] == tie].min(initial=scores.size)
            > dropped[scores[dropped] == tie].max()
        )
    assert np.array_equal(lowest(scores, 0), []) and len(lowest(scores, 10**6)) == scores.size


def test_lowest_ranks_nan_last():
    scores = np.array([np.nan, 3.0, 1.0, np.nan, 2.0])
    assert lowest(scores, 3).tolist() == [1, 2, 4]
    assert lowest(scores, 4).tolist() == [0, 1, 2, 4]


@given(st.lists(vectors, min_size=1, max_size=4), ratios, st.integers(0, 3), st.data())
def test_select_global_ranks_normalized_scores_and_keeps_a_minimum(layers, ratio, min_keep, data):
    named = {f"l{i}": s for i, s in enumerate(layers)}
    dropped = select_global(named, ratio, min_keep)
    total = sum(s.size for s in layers)
    allowed = sum(max(s.size - min_keep, 0) for s in layers)
    assert sum(len(d) for d in dropped.values()) == min(drop_count(total, ratio, 0), allowed)
    mean = {k: np.abs(s).mean() for k, s in named.items()}
    norm = {k: s / mean[k] if mean[k] > 0 else s for k, s in named.items()}
    highest_dropped = max((norm[k][d].max() for k, d in dropped.items() if len(d)), default=None)
    for name, scores in named.items():
        keep = np.setdiff1d(np.arange(scores.size), dropped[name])
        assert len(keep) >= min(min_keep, scores.size)
        if highest_dropped is not None and len(keep) > min_keep:
            assert norm[name][keep].min() >= highest_dropped  # nothing kept that ranks lower
    # a layer scaled by a power of two competes the same (normalized per layer)
    scale = {k: s * 2.0 ** data.draw(st.integers(-3, 3)) for k, s in named.items()}
    assert all(
        np.array_equal(select_global(scale, ratio, min_keep)[k], d) for k, d in dropped.items()
    )


@given(
    st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8), (3, 3)]),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(0, 2),
    st.data(),
)
def test_n_m_keeps_n_highest_in_every_group(nm, groups, other, axis, data):
    n, m = nm
    shape = [other, other + 1, 2]
    shape[axis] = groups * m
    scores = data.draw(hnp.arrays(np.float64, shape, elements=_ELEMENTS))
    keep = n_m_keep(scores, n, m, axis)
    assert keep.shape == scores.shape and keep.dtype == bool
    grouped_keep = np.moveaxis(keep, axis, -1).reshape(-1, groups, m)
    grouped = np.moveaxis(scores, axis, -1).reshape(-1, groups, m)
    assert np.all(grouped_keep.sum(axis=-1) == n)
    kept = np.where(grouped_keep, grouped, np.inf).min(axis=-1)
    lost = np.where(grouped_keep, -np.inf, grouped).max(axis=-1)
    assert np.all(kept >= lost)


def test_n_m_rejects_bad_patterns():
    with pytest.raises(ValueError, match="does not divide"):
        n_m_keep(np.ones((6, 2)), 2, 4, 0)
    with pytest.raises(ValueError, match="1 <= n <= m"):
        n_m_keep(np.ones((8, 2)), 5, 4, 0)


# ----- activation norms and observe -------------------------------------------------------------

MODEL = """model opset={"": 18}
graph @main(%x: f32[2,3,4]) {
  %two: f32[] = const [2.0]
  %h: f32[2,3,4] = Mul(%x, %two)
  %y: f32[2,3,4] = Relu(%h)
  return %y
}"""


def _samples(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 3, 4)).astype(np.float32)} for _ in range(n)]


def test_input_norms_are_l2_over_all_samples_and_other_axes():
    model, samples = parse_model(MODEL), _samples(5)
    before = print_model(model)
    norms = input_norms(model, samples, {"h": -1, "x": 1, "y": 0})
    xs = np.stack([s["x"] for s in samples]).astype(np.float64)
    assert norms["h"] == pytest.approx(np.sqrt((4 * xs**2).sum(axis=(0, 1, 2))))
    assert norms["x"] == pytest.approx(np.sqrt((xs**2).sum(axis=(0, 1, 3))))
    assert norms["y"] == pytest.approx(np.sqrt((4 * np.maximum(xs, 0) ** 2).sum(axis=(0, 2, 3))))
    assert print_model(model) == before
    assert input_norms(model, samples, {}) == {}


def test_input_norms_errors():
    model = parse_model(MODEL)
    with pytest.raises(GraphoptError, match="no samples"):
        input_norms(model, [], {"h": -1})
    with pytest.raises(GraphoptError, match="out of range"):
        input_norms(model, _samples(1), {"h": 3})
    with pytest.raises(GraphoptError, match="no value named nope"):
        input_norms(model, _samples(1), {"nope": 0})


def test_observe_hands_every_sample_to_its_consumer_and_restores_the_outputs():
    model, samples = parse_model(MODEL), _samples(3)
    before = print_model(model)
    seen: dict[str, list[np.ndarray]] = {"h": [], "y": []}
    observe(model, samples, {name: seen[name].append for name in seen})
    assert [a.tolist() for a in seen["h"]] == [(2 * s["x"]).tolist() for s in samples]
    assert [a.tolist() for a in seen["y"]] == [np.maximum(2 * s["x"], 0).tolist() for s in samples]

    def fail(_: np.ndarray) -> None:
        raise RuntimeError("consumer failed")

    with pytest.raises(RuntimeError, match="consumer failed"):
        observe(model, samples, {"h": fail})
    assert print_model(model) == before
