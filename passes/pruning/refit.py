"""Refit after structured pruning: re-solve each consumer layer by least squares.

A sink layer (the MLP down projection, the attention output projection, the Conv after a pruned
channel) computes `Y = X W + b`, X its input over calibration data (rows: tokens, or im2col
patches of a Conv's input). After pruning it only sees the kept columns `X_k`. The best affine
reconstruction of the original output from them,

    W', b' = argmin || X_k W' + 1 b' - X W ||^2,

has a closed form in the mean `mu` and covariance `C = E[x x^T] - mu mu^T` of the inputs:

    W' = (C_kk + lambda I)^-1 (C_k: W + lambda W_k)          b' = mu W - mu_k W'

(the removed inputs' mean contribution folds into the bias: with uncorrelated inputs `W' = W_k`
and `b' = mu_removed W_removed`). `lambda` is a ridge toward the plain pruned weights `W_k` (not
toward 0: input directions the calibration rows miss keep W_k's answer instead of losing it), in
units of the mean variance, chosen per sink: samples alternate between two folds, each candidate
(`RIDGE` times 1, 10, 100, 1000; "keep W_k, fold only the mean"; "plain pruning": W_k and no bias
change) is solved on the first fold and scored on the second, and the best is solved again on
both. Few calibration rows for a wide layer overfit a least-squares fit (and even the mean
estimate); the held-out fold catches that, and a layer where nothing beats plain pruning is left
as plain pruning leaves it. The report gives per sink the choice and the best fit's held-out error
over plain pruning's (how much of what pruning removed the fit recovers). The Gram matrix
`E[x x^T]` and the mean are accumulated in one pass over the calibration data
(`calibration.observe`), in float64, on the *original* model's activations (one-shot, as
SparseGPT/Wanda do): memory 2 P x P per sink, P the input width (MatMul: K; Conv: C * kh * kw).

Convolutions: group 1, 2-D, explicit pads (`auto_pad` NOTSET): im2col patches with the Conv's
pads, strides and dilations. Depthwise/grouped Convs are not sinks (they carry channels through).
Sinks wider than `MAX_WIDTH` are left with plain pruning and said so.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from graphopt.ir.core import Model, Node
from graphopt.passes.quantization.calibration import Feeds, observe

__all__ = ["MAX_WIDTH", "RIDGE", "Refit", "SinkCut", "refit"]

RIDGE = 1e-2
RIDGE_STEPS = 4  # ridges tried: RIDGE, 10 RIDGE, 100 RIDGE, 1000 RIDGE; also MEAN and PLAIN
MAX_WIDTH = 4096


@dataclass
class SinkCut:
    """A sink layer and which of its input positions (channels, rows) stay."""

    node: Node
    keep: np.ndarray  # bool, one per input channel/row


@dataclass
class Refit:
    """New (unsliced) weights per (node, input index), bias deltas per node, and notes."""

    weights: dict[tuple[Node, int], np.ndarray]
    bias: dict[Node, np.ndarray]
    skipped: list[tuple[Node, str]]
    chosen: dict[Node, str] = field(
        default_factory=dict
    )  # per sink: which fit the held-out fold chose, and its held-out error against plain's
    heldout_ratio: dict[Node, float] = field(
        default_factory=dict
    )  # per sink: the best fit's held-out error over plain pruning's (below 1: the fit helps)


@dataclass
class _Moments:
    """Sum of x x^T, sum of x and the row count of some rows."""

    gram: np.ndarray
    total: np.ndarray
    count: int = 0

    def add(self, r: np.ndarray) -> None:
        self.gram += r.T @ r
        self.total += r.sum(axis=0)
        self.count += r.shape[0]

    def __add__(self, other: _Moments) -> _Moments:
        return _Moments(self.gram + other.gram, self.total + other.total, self.count + other.count)


class _Gram:
    """The moments of one sink's input rows, samples alternating between two folds (the second
    fold scores the ridge each candidate solution of the first fold was solved with)."""

    def __init__(self, rows: Callable[[np.ndarray], np.ndarray], width: int):
        self.rows = rows
        self.folds = [_Moments(np.zeros((width, width)), np.zeros(width)) for _ in range(2)]
        self.samples = 0

    def __call__(self, x: np.ndarray) -> None:
        self.folds[self.samples % 2].add(self.rows(np.asarray(x, dtype=np.float64)))
        self.samples += 1

    @property
    def count(self) -> int:
        return self.folds[0].count + self.folds[1].count


def _im2col(node: Node, kernel: tuple[int, int]) -> Callable[[np.ndarray], np.ndarray]:
    pads = node.get_attr("pads") or [0, 0, 0, 0]
    strides = node.get_attr("strides") or [1, 1]
    dilations = node.get_attr("dilations") or [1, 1]
    kh, kw = kernel

    def rows(x: np.ndarray) -> np.ndarray:
        x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
        span = ((kh - 1) * dilations[0] + 1, (kw - 1) * dilations[1] + 1)
        windows = np.lib.stride_tricks.sliding_window_view(x, span, axis=(2, 3))
        windows = windows[:, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]]
        b, c, oh, ow = windows.shape[:4]
        # patch vector ordered (channel, ky, kx), as W.reshape(out, C * kh * kw) is
        return windows.transpose(0, 2, 3, 1, 4, 5).reshape(b * oh * ow, c * kh * kw)

    return rows


def _rows_of(width: int) -> Callable[[np.ndarray], np.ndarray]:
    def rows(x: np.ndarray) -> np.ndarray:
        return x.reshape(-1, width)

    return rows


def _fan_out(grams: list[_Gram]) -> Callable[[np.ndarray], None]:
    def feed(x: np.ndarray) -> None:
        for gram in grams:
            gram(x)

    return feed


def _matrix(node: Node) -> tuple[np.ndarray, int]:
    """The sink's weight as [P, O] (P input positions), and the input axis of the stored array."""
    w = node.inputs[1].const_value  # type: ignore[union-attr]
    assert w is not None
    if node.op_type == "MatMul":
        return w.astype(np.float64), 0
    if node.op_type == "Gemm":
        return (w.T if node.get_attr("transB", 0) else w).astype(np.float64), (
            1 if node.get_attr("transB", 0) else 0
        )
    return w.reshape(w.shape[0], -1).T.astype(np.float64), 1


def _why_not(node: Node) -> str:
    if node.op_type in ("Conv", "FusedConv"):
        w = node.inputs[1].const_value  # type: ignore[union-attr]
        if w is None or w.ndim != 4:
            return "only 2-D convolutions are refit"
        if node.get_attr("auto_pad", "NOTSET") != "NOTSET":
            return "auto_pad convolutions are not refit"
        if int(np.prod(w.shape[1:])) > MAX_WIDTH:
            return f"its im2col width {int(np.prod(w.shape[1:]))} is over {MAX_WIDTH}"
    elif node.op_type == "Gemm" and node.get_attr("transA", 0):
        return "Gemm with transA is not refit"
    else:
        width = node.inputs[1].const_value.shape[  # type: ignore[union-attr]
            1 if node.get_attr("transB", 0) else 0
        ]
        if width > MAX_WIDTH:
            return f"its input width {width} is over {MAX_WIDTH}"
    return ""


def refit(model: Model, data: Iterable[Feeds], cuts: Sequence[SinkCut]) -> Refit:
    """Least-squares weights and bias deltas for every sink in `cuts` (see the module docstring)."""
    grams: dict[Node, _Gram] = {}
    skipped: list[tuple[Node, str]] = []
    by_input: dict[str, list[_Gram]] = defaultdict(list)
    for cut in cuts:
        reason = _why_not(cut.node)
        if reason:
            skipped.append((cut.node, reason))
            continue
        w = cut.node.inputs[1].const_value  # type: ignore[union-attr]
        assert w is not None
        if cut.node.op_type in ("Conv", "FusedConv"):
            width = int(np.prod(w.shape[1:]))
            gram = _Gram(_im2col(cut.node, (w.shape[2], w.shape[3])), width)
        else:
            width = len(cut.keep)
            gram = _Gram(_rows_of(width), width)
        grams[cut.node] = gram
        by_input[cut.node.inputs[0].name or ""].append(gram)  # type: ignore[union-attr]
    if by_input:
        consumers: Mapping[str, Callable[[np.ndarray], None]] = {
            name: _fan_out(gs) for name, gs in by_input.items()
        }
        observe(model, data, consumers)
    weights: dict[tuple[Node, int], np.ndarray] = {}
    bias: dict[Node, np.ndarray] = {}
    chosen: dict[Node, str] = {}
    ratios: dict[Node, float] = {}
    for cut in cuts:
        found = grams.get(cut.node)
        if found is None or found.count == 0:
            continue
        gram = found
        matrix, axis = _matrix(cut.node)
        per = matrix.shape[0] // len(cut.keep)  # im2col: kh * kw positions per channel
        keep = np.repeat(cut.keep, per)
        new, delta, choice, ratio = _solve(gram, matrix, keep)
        chosen[cut.node] = _describe(choice, ratio)
        if ratio is not None:
            ratios[cut.node] = ratio
        w = cut.node.inputs[1].const_value  # type: ignore[union-attr]
        assert w is not None
        full = matrix.copy()
        full[keep] = new
        if cut.node.op_type in ("Conv", "FusedConv"):
            stored = full.T.reshape(w.shape)
        else:
            stored = full.T if axis == 1 else full
        weights[(cut.node, 1)] = stored.astype(w.dtype)
        bias[cut.node] = delta
    return Refit(weights, bias, skipped, chosen, ratios)


def _solve(
    gram: _Gram, w: np.ndarray, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float | str, float | None]:
    """The refit of the kept rows and the bias delta. Candidates: least squares with a ridge of
    `RIDGE` times 1, 10, ... (`RIDGE_STEPS` of them), only the mean fold (`MEAN`), and nothing at
    all (`PLAIN`: W_k, no bias change); each is solved on the first fold and scored on the second,
    and the best is solved again on both. With few calibration rows for a wide layer (LLaMA-base's
    2048-wide down projection from 8 x 128 tokens) the held-out fold can prefer plain pruning:
    then the layer is left as plain pruning leaves it. Returns the weights, the bias delta, the
    choice and the best fit's held-out error over plain pruning's (None with a single sample:
    no held-out fold)."""
    first, second = gram.folds
    choice: float | str = RIDGE
    ratio = None
    if first.count and second.count:
        fits: list[float | str] = [RIDGE * 10**k for k in range(RIDGE_STEPS)] + [MEAN]
        errors = [_error(second, w, keep, *_fit(first, w, keep, c)) for c in fits]
        plain = _error(second, w, keep, *_fit(first, w, keep, PLAIN))
        best = int(np.argmin(errors))
        ratio = errors[best] / plain if plain > 0 else 1.0
        choice = fits[best] if errors[best] < plain else PLAIN
    return (*_fit(first + second, w, keep, choice), choice, ratio)


def _describe(choice: float | str, ratio: float | None) -> str:
    """What the held-out check chose; `ratio`: the best fit's held-out error over plain's."""
    heldout = f"held-out error {ratio:.3g}x plain pruning's" if ratio is not None else ""
    if choice == PLAIN:
        return "plain pruning (no fit did better on held-out rows" + (
            f"; the best fit's {heldout})" if heldout else ")"
        )
    if choice == MEAN:
        how = "mean folded into the bias, weights kept"
    else:
        how = f"least squares, ridge {float(choice):g} x mean variance"
    return f"{how} ({heldout})" if heldout else how


MEAN, PLAIN = "mean", "plain"


def _fit(
    m: _Moments, w: np.ndarray, keep: np.ndarray, choice: float | str
) -> tuple[np.ndarray, np.ndarray]:
    if choice == PLAIN:
        return w[keep], np.zeros(w.shape[1])
    mean = m.total / m.count
    if choice == MEAN:  # keep the weights, fold the removed inputs' mean into the bias
        new = w[keep]
    else:
        cov = m.gram / m.count - np.outer(mean, mean)
        a = cov[np.ix_(keep, keep)]
        scale = float(choice) * max(float(np.trace(a)) / max(len(a), 1), 1e-12)
        # the ridge pulls toward the plain pruned weights W_k, not toward 0: directions the
        # calibration rows do not cover keep W_k's answer
        new = np.linalg.solve(a + scale * np.eye(len(a)), cov[keep] @ w + scale * w[keep])
    return new, mean @ w - mean[keep] @ new


def _error(
    m: _Moments, w: np.ndarray, keep: np.ndarray, new: np.ndarray, delta: np.ndarray
) -> float:
    """Mean squared error of `x_k new + delta` against `x w` over the rows of `m`: with the
    difference of coefficients D (removed rows: -w) it is E[(x D + delta)^2]."""
    d = -w.copy()
    d[keep] += new
    quadratic = float(np.einsum("ij,ij->", d, m.gram @ d))
    linear = 2.0 * float((m.total @ d) @ delta)
    return (quadratic + linear) / m.count + float(delta @ delta)
