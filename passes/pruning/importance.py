"""Importance scores for pruning, and the selection of what to drop from them.

Every pruning pass ranks weights (single elements, rows, channels, heads) by a score and drops the
lowest. The scores and the selection live here, once, as plain numpy on arrays:

| score | formula | use |
| --- | --- | --- |
| `magnitude(w)` | `|w|` (`norm="l1"`) or `w**2` (`"l2"`) per element | unstructured, N:M |
| `magnitude(w, axis)` | `sum |w|` or `sqrt(sum w**2)` over every axis but `axis` | rows, channels |
| `activation_aware(w, ||x||, input_axis)` | `|w| * ||x_j||`, j the index of `w`'s input axis | Wanda |
| `bn_gamma(gamma)` | `|gamma|` | CNN channels behind a BatchNormalization |

`activation_aware` is Wanda's score (Sun et al. 2023, "A Simple and Effective Pruning Approach
for Large Language Models"): a weight matters as much as its size times the size of the input it
multiplies, `||x_j||` the L2 norm of input feature j over all calibration tokens
(`activations.input_norms`). `reduce_scores(scores, axis)` turns per-element scores into one per
row/channel (the same reduction `magnitude` uses).

Selection (scores in, indices out; indices into the flattened score array, sorted):

- `drop_count(size, ratio, min_keep)`: how many of `size` to drop for `ratio`: `floor(ratio *
  size)` (a float product a hair under an integer counts as that integer), at most
  `size - min_keep`.
- `lowest(scores, count)`: the `count` lowest scores; ties are broken by position (the earlier
  index goes first), so the result is deterministic and exactly `count` long whatever the ties.
- `select_per_layer(scores, ratio, min_keep)`: `lowest` with `drop_count`.
- `select_global(layers, ratio, min_keep)`: one ranking over many layers. Each layer's scores are
  divided by their mean first (layers of different scale and size compete on relative
  importance), then the lowest `floor(ratio * total)` are dropped, never leaving a layer with fewer
  than `min_keep` (one number, or one per layer): each layer can only give up a prefix of its own
  ranking, so the drops are the lowest allowed scores.
- `n_m_keep(scores, n, m, axis)`: the N:M mask: along `axis`, in each group of `m` consecutive
  entries, the `n` highest scores are kept (ties: the earlier position is dropped first).

Everything is vectorized, no Python loop over elements: `lowest` is linear (a partition), the
global ranking sorts, N:M sorts within each group of m.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import numpy as np

__all__ = [
    "activation_aware",
    "bn_gamma",
    "drop_count",
    "lowest",
    "magnitude",
    "n_m_keep",
    "reduce_scores",
    "select_global",
    "select_per_layer",
]

Norm = Literal["l1", "l2"]
Axes = int | tuple[int, ...]


def _keep_axes(ndim: int, axis: Axes) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for an array of {ndim} dims")
    kept = tuple(sorted({a % ndim for a in axes}))
    return tuple(i for i in range(ndim) if i not in kept)


def reduce_scores(scores: np.ndarray, axis: Axes, norm: Norm = "l1") -> np.ndarray:
    """One score per index along `axis` (an int, or a tuple of axes to keep, in their order):
    `sum |s|` (`"l1"`) or `sqrt(sum s**2)` (`"l2"`) over all other axes. float64."""
    s = np.asarray(scores, dtype=np.float64)
    others = _keep_axes(s.ndim, axis)
    if norm == "l1":
        return np.abs(s).sum(axis=others)
    if norm == "l2":
        return np.sqrt(np.square(s).sum(axis=others))
    raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")


def magnitude(weight: np.ndarray, axis: Axes | None = None, norm: Norm = "l1") -> np.ndarray:
    """Magnitude scores (float64): per element `|w|` (`"l1"`) or `w**2` (`"l2"`) when `axis` is
    None; else one score per index along `axis` (int, or tuple of axes to keep), the norm of the
    weight over all other axes."""
    w = np.asarray(weight, dtype=np.float64)
    if axis is not None:
        return reduce_scores(w, axis, norm)
    if norm == "l1":
        return np.abs(w)
    if norm == "l2":
        return np.square(w)
    raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")


def activation_aware(weight: np.ndarray, input_norm: np.ndarray, input_axis: int) -> np.ndarray:
    """Wanda's per-element score `|W| * ||x_j||` (float64), j indexing `weight`'s input axis
    `input_axis` (MatMul W[K, N]: 0; Gemm with transB: 1; Conv W[M, C, k...]: 1).
    `input_norm` is 1-D with one norm per input feature, or an array of `weight`'s rank that
    broadcasts to it (grouped convolutions: a norm per (output, input) pair)."""
    w = np.abs(np.asarray(weight, dtype=np.float64))
    norms = np.asarray(input_norm, dtype=np.float64)
    axis = input_axis % w.ndim if -w.ndim <= input_axis < w.ndim else None
    if axis is None:
        raise ValueError(f"input_axis {input_axis} is out of range for a {w.ndim}-D weight")
    if norms.ndim == 1:
        if norms.shape[0] != w.shape[axis]:
            raise ValueError(
                f"{norms.shape[0]} input norms for a weight with {w.shape[axis]} inputs on "
                f"axis {axis} (shape {list(w.shape)})"
            )
        shape = [1] * w.ndim
        shape[axis] = -1
        norms = norms.reshape(shape)
    return w * np.broadcast_to(norms, w.shape)


def bn_gamma(gamma: np.ndarray) -> np.ndarray:
    """Channel scores of a convolution followed by BatchNormalization: `|gamma|` (float64)."""
    return np.abs(np.asarray(gamma, dtype=np.float64)).ravel()


def drop_count(size: int, ratio: float, min_keep: int = 1) -> int:
    """How many of `size` entries to drop for `ratio` in [0, 1): `floor(ratio * size)`, at most
    `size - min_keep` (never negative)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    # ratio * size can land a hair under an integer (0.29 * 100 = 28.999...): round first
    count = math.floor(round(ratio * size, 9))
    return max(0, min(count, size - min_keep))


def lowest(scores: np.ndarray, count: int) -> np.ndarray:
    """Sorted indices (into the flattened `scores`) of the `count` lowest scores; among equal
    scores the earlier index goes first. NaN counts as +inf (never dropped before a number).
    Linear time: a partition finds the count-th lowest score, then everything below it and the
    earliest of its ties are taken."""
    flat = np.asarray(scores).ravel()
    count = max(0, min(int(count), flat.size))
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if count == flat.size:
        return np.arange(flat.size)
    if flat.dtype.kind == "f" and np.isnan(flat).any():
        flat = np.where(np.isnan(flat), np.inf, flat)
    cut = np.partition(flat, count - 1)[count - 1]
    chosen = flat < cut
    ties = np.flatnonzero(flat == cut)
    chosen[ties[: count - int(chosen.sum())]] = True
    return np.flatnonzero(chosen)


def select_per_layer(scores: np.ndarray, ratio: float, min_keep: int = 1) -> np.ndarray:
    """Indices (into the flattened `scores`) to drop from one layer: the lowest
    `drop_count(size, ratio, min_keep)`."""
    flat = np.asarray(scores).ravel()
    return lowest(flat, drop_count(flat.size, ratio, min_keep))


def _normalized(scores: np.ndarray) -> np.ndarray:
    flat = np.asarray(scores, dtype=np.float64).ravel()
    mean = float(np.abs(flat).mean()) if flat.size else 0.0
    return flat / mean if mean > 0 and np.isfinite(mean) else flat


def select_global(
    layers: Mapping[str, np.ndarray], ratio: float, min_keep: int | Mapping[str, int] = 1
) -> dict[str, np.ndarray]:
    """Indices to drop per layer (layer name -> sorted indices into its flattened scores) from one
    ranking over all layers: scores divided by their layer's mean absolute score, the lowest
    `floor(ratio * total)` dropped, each layer keeping at least `min_keep` (one number for all,
    or per layer name; when that cap binds, fewer than asked are dropped in all)."""
    names = list(layers)
    if not names:
        return {}
    normalized = [_normalized(layers[name]) for name in names]
    sizes = np.array([s.size for s in normalized], dtype=np.int64)
    total = int(sizes.sum())
    count = drop_count(total, ratio, 0)
    # the rank of each entry within its own layer (ties by position, as in `lowest`)
    ranks = np.empty(total, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for i, scores in enumerate(normalized):
        order = np.argsort(scores, kind="stable")
        ranks[starts[i] + order] = np.arange(scores.size)
    layer_of = np.repeat(np.arange(len(names)), sizes)
    minimum = np.array(
        [min_keep if isinstance(min_keep, int) else min_keep.get(name, 1) for name in names]
    )
    allowed = ranks < np.maximum(sizes - minimum, 0)[layer_of]
    everything = np.concatenate(normalized)
    candidates = np.flatnonzero(allowed)
    order = candidates[np.argsort(everything[candidates], kind="stable")][:count]
    dropped = np.zeros(total, dtype=bool)
    dropped[order] = True
    return {
        name: np.flatnonzero(dropped[starts[i] : starts[i + 1]]) for i, name in enumerate(names)
    }


def n_m_keep(scores: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Boolean keep-mask of `scores`' shape: along `axis`, each group of `m` consecutive entries
    keeps its `n` highest scores (ties: the earlier position is dropped first). `m` must divide
    the length of `axis`, and 1 <= n <= m."""
    s = np.asarray(scores)
    if not 1 <= n <= m:
        raise ValueError(f"N:M needs 1 <= n <= m, got n={n}, m={m}")
    axis %= s.ndim
    length = s.shape[axis]
    if length % m:
        raise ValueError(f"m={m} does not divide the length {length} of axis {axis}")
    moved = np.moveaxis(s, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], length // m, m)
    order = np.argsort(groups, axis=-1, kind="stable")
    keep = np.ones(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., : m - n], False, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)
