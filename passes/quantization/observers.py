"""Observers: they see a tensor's values batch by batch, once, and propose a range [lo, hi].

    observer = make_observer("percentile", percentile=99.99)
    for batch in batches:
        observer.update(batch)
    lo, hi = observer.range()

| method | range |
| --- | --- |
| `minmax` | the smallest and largest value seen (per tensor, or per channel with `axis`) |
| `moving-average` | exponential moving averages of each batch's min and max (`momentum`: the weight of a new batch) |
| `percentile` | the `(100 - p)`-th and `p`-th percentiles, read from a histogram |
| `entropy` | the window of the histogram whose quantized distribution is closest to the original in KL divergence (TensorRT's calibration) |
| `mse` | the window that minimizes the expected squared quantization error (clipping plus rounding) |

The histogram methods keep `bins` counts, never the values: memory is constant whatever the data.
When a batch falls outside the histogram's span, the span grows so that the old bins merge
exactly into the new ones: the new bin width is an integer multiple k of the old one and the new
left edge is an integer number of old bins to the left, so old bin i lands whole in new bin
(i + m) // k. Counts are never split, so the histogram stays exact at its (coarser) resolution.

Search of the entropy and mse windows: candidate windows shrink from the whole histogram one bin
at a time, each step dropping the end bin holding fewer counts (the tail losing the least mass).
Every window on that path is scored and the best is kept: a one-dimensional search that allows
asymmetric ranges (after ReLU, GELU) without trying all pairs of ends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "METHODS",
    "HistogramObserver",
    "MinMaxObserver",
    "MovingAverageObserver",
    "Observer",
    "make_observer",
]


class Observer:
    """Sees batches of one tensor and proposes a range."""

    def update(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi): scalars per tensor, vectors per channel."""
        raise NotImplementedError


def _reduce(x: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64)
    if axis is None:
        return np.asarray(x.min()), np.asarray(x.max())
    others = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    return x.min(axis=others), x.max(axis=others)


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x if np.all(np.isfinite(x)) else x[np.isfinite(x)]


@dataclass
class MinMaxObserver(Observer):
    """The running min and max (per channel along `axis` when given)."""

    axis: int | None = None
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        if np.asarray(x).size == 0:
            return
        lo, hi = _reduce(x, self.axis)
        self.lo = lo if self.lo is None else np.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else np.maximum(self.hi, hi)

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        if self.lo is None or self.hi is None:
            raise ValueError("the observer has seen no data")
        return self.lo, self.hi


@dataclass
class MovingAverageObserver(Observer):
    """Exponential moving averages of per-batch min and max: the first batch sets them, then
    `avg += momentum * (batch - avg)`."""

    momentum: float = 0.01
    axis: int | None = None
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        if np.asarray(x).size == 0:
            return
        lo, hi = _reduce(x, self.axis)
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo + self.momentum * (lo - self.lo)
            self.hi = self.hi + self.momentum * (hi - self.hi)

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        if self.lo is None or self.hi is None:
            raise ValueError("the observer has seen no data")
        return self.lo, self.hi


# a first batch spread over less than this gets a span of its own (subnormal bin widths overflow)
_MIN_SPAN = 1e-30


@dataclass
class HistogramObserver(Observer):
    """A histogram of `bins` equal bins over a span that grows to hold every value seen; the
    range comes from `method`: "percentile", "entropy" or "mse" (per tensor only)."""

    method: str = "percentile"
    bins: int = 2048
    percentile: float = 99.99
    num_levels: int = 256  # quantization levels the entropy and mse searches assume (int8)
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    zeros: int = 0  # exact zeros seen (in `counts` too): on every grid, so no error anywhere
    left: float = 0.0
    width: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in _HISTOGRAM_RANGES:
            raise ValueError(f"unknown histogram method '{self.method}'")

    @property
    def edges(self) -> np.ndarray:
        return self.left + self.width * np.arange(self.bins + 1)

    def update(self, x: np.ndarray) -> None:
        x = _finite(np.asarray(x, np.float64).reshape(-1))
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if not self.counts.size:
            span = hi - lo
            if span < _MIN_SPAN:  # one value, or a spread too small to divide into bins
                span, lo = max(abs(lo), 1.0) * 1e-3, (lo + hi) / 2 - max(abs(lo), 1.0) * 5e-4
            self.width = span / self.bins
            self.left = lo
            self.counts = np.zeros(self.bins, np.int64)
        self._grow(lo, hi)
        index = np.floor((x - self.left) / self.width).astype(np.int64)
        np.add.at(self.counts, np.clip(index, 0, self.bins - 1), 1)
        self.zeros += int(np.count_nonzero(x == 0))

    def nonzero_counts(self) -> np.ndarray:
        """`counts` without the exact zeros: the searches score errors, and a zero (ReLU's
        half of the data) is exact on every grid, so it must not pull the range in."""
        counts = self.counts.copy()
        if self.zeros:
            i = int(np.clip(np.floor(-self.left / self.width), 0, self.bins - 1))
            counts[i] -= self.zeros
        return counts

    def _grow(self, lo: float, hi: float) -> None:
        """Widen the span to hold [lo, hi], merging old bins whole into new ones."""
        right = self.left + self.width * self.bins
        if lo >= self.left and hi <= right:
            return
        m = int(np.ceil((self.left - lo) / self.width)) if lo < self.left else 0
        new_left = self.left - m * self.width
        while new_left > lo:  # float safety: rounding may leave lo just outside
            m += 1
            new_left = self.left - m * self.width
        k = int(np.ceil((max(hi, right) - new_left) / (self.width * self.bins)))
        k = max(k, 1)
        while new_left + k * self.width * self.bins < max(hi, right):  # float safety
            k += 1
        merged = np.zeros(self.bins, np.int64)
        np.add.at(merged, (np.arange(self.bins) + m) // k, self.counts)
        self.counts, self.left, self.width = merged, new_left, self.width * k

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.counts.size or not self.counts.any():
            raise ValueError("the observer has seen no data")
        lo, hi = _HISTOGRAM_RANGES[self.method](self)
        return np.asarray(lo), np.asarray(hi)


def _percentile_range(h: HistogramObserver) -> tuple[float, float]:
    """Quantiles read from the cumulative histogram, linear within a bin."""
    cdf = np.concatenate([[0.0], np.cumsum(h.counts, dtype=np.float64)]) / h.counts.sum()
    p = min(max(h.percentile, 50.0), 100.0) / 100.0

    def quantile(q: float) -> float:
        i = int(np.clip(np.searchsorted(cdf, q, side="left"), 1, h.bins))
        below, above = cdf[i - 1], cdf[i]
        frac = 0.0 if above <= below else (q - below) / (above - below)
        return float(h.left + h.width * (i - 1 + frac))

    return quantile(1.0 - p), quantile(p)


def _shrink_path(counts: np.ndarray, min_bins: int) -> list[tuple[int, int]]:
    """Windows [a, b) of bins from the whole histogram down to `min_bins` wide, each dropping
    the end bin holding fewer counts; leading/trailing empty bins go first."""
    nonzero = np.flatnonzero(counts)
    a, b = int(nonzero[0]), int(nonzero[-1]) + 1
    path = [(a, b)]
    while b - a > min_bins:
        if counts[a] <= counts[b - 1]:
            a += 1
        else:
            b -= 1
        path.append((a, b))
    return path


def _mse_range(h: HistogramObserver) -> tuple[float, float]:
    """Minimize sum(count * error^2) over windows: values outside clip to the nearest end
    (error: distance to it), values inside round to a grid of num_levels - 1 steps (error
    variance step^2 / 12)."""
    centers = h.left + h.width * (np.arange(h.bins) + 0.5)
    counts = h.nonzero_counts()
    if not counts.any():
        counts = h.counts
    best, best_err = (0, h.bins), np.inf
    for a, b in _shrink_path(counts, 1):
        lo, hi = h.left + a * h.width, h.left + b * h.width
        step = (hi - lo) / (h.num_levels - 1)
        clipped = np.clip(centers, lo, hi)
        err = float(np.dot(counts, (centers - clipped) ** 2))
        err += float(counts[a:b].sum()) * step * step / 12
        if err < best_err:
            best, best_err = (a, b), err
    return h.left + best[0] * h.width, h.left + best[1] * h.width


_EPS = 1e-4


def _kl(p: np.ndarray, inside: np.ndarray, levels: int) -> float:
    """KL(P || Q): P is the window's histogram with the clipped tails folded into its end bins,
    Q the window's own bins (tails left out) merged into `levels` equal groups, each group's
    mass spread evenly over its non-empty bins (TensorRT's entropy calibration). Leaving the
    tails out of Q is what makes clipping cost: a narrow window's end bins swell in P only."""
    group = np.arange(p.size) * levels // p.size  # bin -> its group (groups of equal size +-1)
    starts = np.flatnonzero(np.diff(group, prepend=-1))
    filled_mask = inside > 0
    sums = np.add.reduceat(inside, starts)
    filled = np.add.reduceat(filled_mask.astype(np.float64), starts)
    mean = np.divide(sums, filled, out=np.zeros_like(sums), where=filled > 0)
    q = np.where(filled_mask, mean[group], 0.0)
    if not q.any():
        return float("inf")
    # smoothing (as TensorRT/MXNet do): clipped mass folded into an empty end bin costs
    # p * log(p / eps), large but finite, instead of ruling the window out
    qn = q / q.sum()
    qn = np.where(qn > 0, qn, _EPS) / (1 + _EPS * np.count_nonzero(qn == 0))
    mask = p > 0
    pn = p[mask] / p.sum()
    return float(np.sum(pn * np.log(pn / qn[mask])))


def _entropy_range(h: HistogramObserver) -> tuple[float, float]:
    """The window whose clipped histogram (outliers folded into its end bins) loses the least
    information, in KL divergence, when quantized to num_levels levels."""
    nonzero = h.nonzero_counts()
    counts = (nonzero if nonzero.any() else h.counts).astype(np.float64)
    path = _shrink_path(counts, h.num_levels)
    if len(path) == 1:
        a, b = path[0]
        return h.left + a * h.width, h.left + b * h.width
    best, best_kl = path[0], np.inf
    for a, b in path[:: max(1, len(path) // 512)]:
        inside = counts[a:b]
        p = inside.copy()
        p[0] += counts[:a].sum()
        p[-1] += counts[b:].sum()
        kl = _kl(p, inside, h.num_levels)
        if kl < best_kl:
            best, best_kl = (a, b), kl
    return h.left + best[0] * h.width, h.left + best[1] * h.width


_HISTOGRAM_RANGES: dict[str, Callable[[HistogramObserver], tuple[float, float]]] = {
    "percentile": _percentile_range,
    "entropy": _entropy_range,
    "mse": _mse_range,
}

METHODS = ("minmax", "moving-average", "percentile", "entropy", "mse")


def make_observer(method: str, *, axis: int | None = None, **options: Any) -> Observer:
    """An observer for `method` (see the module docstring); `axis` gives per-channel ranges
    (minmax and moving-average only). Options: momentum, bins, percentile, num_levels."""
    if method == "minmax":
        return MinMaxObserver(axis=axis)
    if method == "moving-average":
        return MovingAverageObserver(axis=axis, **options)
    if method in _HISTOGRAM_RANGES:
        if axis is not None:
            raise ValueError(f"'{method}' ranges are per tensor; use minmax for per-channel")
        return HistogramObserver(method=method, **options)
    raise ValueError(f"unknown calibration method '{method}'; known: {', '.join(METHODS)}")
