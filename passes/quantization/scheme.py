"""The quantization math, in one place: schemes, scale and zero point from a range, quantize and
dequantize. Everything is vectorized numpy and follows ONNX's QuantizeLinear/DequantizeLinear.

A `QuantScheme` says how a float tensor becomes integers:

- `dtype`: int8 [-128, 127], uint8 [0, 255], int4 [-8, 7] or uint4 [0, 15];
- `symmetric`: the zero point is the middle of the type (0 for signed types, 2^(bits-1) for
  unsigned ones) and the scale covers [-a, a] with a = max(|min|, |max|), using the restricted
  range [-(2^(bits-1) - 1), 2^(bits-1) - 1] around the zero point (int8: [-127, 127]), so that the
  grid is symmetric; asymmetric: the range [min(lo, 0), max(hi, 0)] maps onto the whole type;
- granularity: per tensor (`axis=None`), per channel (`axis=a`: one scale per index of axis a),
  or per block (`axis=a, block_size=B`: one scale per B consecutive elements along axis a, for
  each index of the other axes; ONNX's blocked quantization, opset 21);
- `power_of_two`: scales rounded *up* to a power of two (the range stays covered).

The functions:

    lo, hi = tensor_range(x, scheme)              # per the granularity; shape = param_shape
    scale, zero_point = compute_params(lo, hi, scheme)
    scale, zero_point = search_params(x, scheme)  # or: the range shrunk to the least error
    q = quantize(x, scale, zero_point, scheme)    # rint(x / scale) + zp, saturated to the type
    y = dequantize(q, scale, zero_point, scheme)  # (q - zp) * scale

Parameters have ONNX's shapes: a scalar per tensor, a vector [D_a] per channel, and per block
the tensor's shape with dim a replaced by ceil(D_a / B).

Why `|dequantize(quantize(x)) - x| <= scale / 2` for x in the range: asymmetric, zp =
rint(qmin - lo/s) puts the grid's ends at lo + d*s and hi + d*s with |d| <= 1/2, so x in
[lo, hi] is at most s/2 from a grid point (interior points by rounding, the ends by d);
symmetric, the grid [-qs*s, qs*s] with qs*s = a covers [-a, a] exactly. A power-of-two scale
is at least the exact one, so the grid still covers the range. Zero is always on the grid: q(0)
= zp, and (zp - zp) * s = 0 exactly (the range is widened to include 0).
Rounding is half to even (`np.rint`), as ONNX's QuantizeLinear does; saturation clips to the
type's range, so values outside the calibrated range clip to its ends.

Clipping search (`search_params`, what `quantize_tensor(..., clip_search=True)` uses for
weights): the min/max range is not the range of least error. With 4 bits a block of 32 has 16
levels, and one outlier stretches the step for all 31 other weights; shrinking the range to
f * [lo, hi] clips the outlier but rounds the rest finer. For each factor f of `CLIP_GRID`
(1.0 down to 0.5) the whole tensor is quantized at once, each block's (or channel's) squared
error summed, and each block keeps the factor of least error: a Python loop over the 21 factors,
numpy over all blocks. f = 1 is tried first and kept on ties, so no block ends up with a larger
error than the plain min/max scale gives, and since that one is at most scale/2 per element,
each block's root-mean-square error stays at most half the min/max step; a single element may
be clipped by up to (1 - f) * max(|lo|, |hi|) more. This is the per-block MSE clip search of
llama.cpp's and AWQ's weight quantizers, without activations: it needs only the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "CLIP_GRID",
    "QDTYPES",
    "QuantScheme",
    "QuantizedTensor",
    "block_errors",
    "block_sums",
    "compute_params",
    "dequantize",
    "dynamic_params",
    "expand_params",
    "quantize",
    "quantize_tensor",
    "search_params",
    "tensor_range",
]

# shrink factors of the range tried by `search_params`, 1.0 (plain min/max) first
CLIP_GRID: tuple[float, ...] = tuple(float(f) for f in np.round(np.linspace(1.0, 0.5, 21), 4))

# name -> (bits, signed)
QDTYPES: dict[str, tuple[int, bool]] = {
    "int8": (8, True),
    "uint8": (8, False),
    "int4": (4, True),
    "uint4": (4, False),
}


@dataclass(frozen=True)
class QuantScheme:
    """How a float tensor is quantized; see the module docstring."""

    dtype: str = "int8"
    symmetric: bool = True
    axis: int | None = None  # None: per tensor
    block_size: int = 0  # > 0: blocks of this many elements along `axis`
    power_of_two: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in QDTYPES:
            raise ValueError(f"unknown quantized type '{self.dtype}'; known: {', '.join(QDTYPES)}")
        if self.block_size < 0:
            raise ValueError(f"block_size must be >= 0, not {self.block_size}")
        if self.block_size and self.axis is None:
            raise ValueError("blocked quantization needs an axis")

    @property
    def bits(self) -> int:
        return QDTYPES[self.dtype][0]

    @property
    def signed(self) -> bool:
        return QDTYPES[self.dtype][1]

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def granularity(self) -> str:
        if self.axis is None:
            return "per-tensor"
        return "per-block" if self.block_size else "per-channel"

    @property
    def numpy_dtype(self) -> np.dtype:
        """The numpy dtype of quantized values (ml_dtypes' int4/uint4 for 4 bits)."""
        if self.bits == 4:
            import ml_dtypes

            return np.dtype(ml_dtypes.int4 if self.signed else ml_dtypes.uint4)
        return np.dtype(np.int8 if self.signed else np.uint8)

    @property
    def min_opset(self) -> int:
        """The oldest ONNX opset whose QuantizeLinear/DequantizeLinear express this scheme:
        10 per tensor, 13 per channel (axis), 21 per block or for 4-bit types."""
        if self.block_size or self.bits == 4:
            return 21
        return 13 if self.axis is not None else 10

    def with_axis(self, axis: int | None, block_size: int | None = None) -> QuantScheme:
        return replace(
            self, axis=axis, block_size=self.block_size if block_size is None else block_size
        )

    def param_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of scale and zero point for a tensor of `shape`."""
        if self.axis is None:
            return ()
        axis = _axis(self.axis, len(shape))
        if not self.block_size:
            return (shape[axis],)
        blocks = -(-shape[axis] // self.block_size)
        return (*shape[:axis], blocks, *shape[axis + 1 :])


def _axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {rank}")
    return axis % rank


def tensor_range(x: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) of `x` per the scheme's granularity, each of shape `param_shape(x.shape)`."""
    x = np.asarray(x)
    if scheme.axis is None:
        return np.asarray(x.min()), np.asarray(x.max())
    axis = _axis(scheme.axis, x.ndim)
    if not scheme.block_size:
        others = tuple(i for i in range(x.ndim) if i != axis)
        return x.min(axis=others), x.max(axis=others)
    b = scheme.block_size
    pad = -x.shape[axis] % b
    if pad:  # repeat the last element: it changes neither min nor max
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = np.pad(x, widths, mode="edge")
    blocked = x.reshape(*x.shape[:axis], x.shape[axis] // b, b, *x.shape[axis + 1 :])
    return blocked.min(axis=axis + 1), blocked.max(axis=axis + 1)


def compute_params(
    lo: np.ndarray | float,
    hi: np.ndarray | float,
    scheme: QuantScheme,
    scale_dtype: np.dtype | type = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero_point) for the range [lo, hi] (arrays of one shape, or scalars).

    The range is widened to include 0; an empty range (all zeros) gets scale 1. The scale has
    `scale_dtype`, the zero point the scheme's quantized dtype."""
    lo64 = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi64 = np.maximum(np.asarray(hi, np.float64), 0.0)
    if scheme.symmetric:
        half = (1 << (scheme.bits - 1)) - 1  # int8: 127, int4: 7
        scale = np.maximum(-lo64, hi64) / half
        zero = np.full(scale.shape, 0 if scheme.signed else 1 << (scheme.bits - 1), np.float64)
    else:
        scale = (hi64 - lo64) / (scheme.qmax - scheme.qmin)
    scale = np.where(scale > 0, scale, 1.0)
    if scheme.power_of_two:
        scale = np.exp2(np.ceil(np.log2(scale)))
    scale_out = scale.astype(scale_dtype)
    # a float32 scale rounded down would shrink the grid below the range: nudge it up
    scale_out = np.where(
        scale_out.astype(np.float64) < scale, np.nextafter(scale_out, np.inf), scale_out
    ).astype(scale_dtype)
    if not scheme.symmetric:
        s = scale_out.astype(np.float64)
        zero = np.clip(np.rint(scheme.qmin - lo64 / s), scheme.qmin, scheme.qmax)
    return scale_out, zero.astype(scheme.numpy_dtype)


def expand_params(param: np.ndarray, shape: tuple[int, ...], scheme: QuantScheme) -> np.ndarray:
    """`param` (scale or zero point) broadcastable against a tensor of `shape`."""
    param = np.asarray(param)
    if scheme.axis is None or param.ndim == 0:
        return param
    axis = _axis(scheme.axis, len(shape))
    if not scheme.block_size:
        dims = [1] * len(shape)
        dims[axis] = param.size
        return param.reshape(dims)
    repeated = np.repeat(param, scheme.block_size, axis=axis)
    return np.take(repeated, np.arange(shape[axis]), axis=axis)


def quantize(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, scheme: QuantScheme
) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(rint(x / scale) + zero_point), rounding half to even; the
    division is done in x's float type, as ONNX does."""
    x = np.asarray(x)
    s = expand_params(scale, x.shape, scheme)
    q = np.rint(x / s.astype(x.dtype)).astype(np.float64)
    if zero_point is not None:
        q = q + expand_params(zero_point, x.shape, scheme).astype(np.float64)
    return np.clip(q, scheme.qmin, scheme.qmax).astype(scheme.numpy_dtype)


def dequantize(
    q: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray | None,
    scheme: QuantScheme,
) -> np.ndarray:
    """ONNX DequantizeLinear: (q - zero_point) * scale, in the scale's float type."""
    q = np.asarray(q)
    s = np.asarray(scale)
    shifted = q.astype(np.float32)
    if zero_point is not None:
        shifted = shifted - expand_params(zero_point, q.shape, scheme).astype(np.float32)
    return (shifted * expand_params(s, q.shape, scheme)).astype(s.dtype)


@dataclass
class QuantizedTensor:
    """A tensor quantized by `scheme`: values, scale and zero point in ONNX's shapes."""

    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    scheme: QuantScheme

    def dequantize(self) -> np.ndarray:
        return dequantize(self.values, self.scale, self.zero_point, self.scheme)


def quantize_tensor(
    x: np.ndarray,
    scheme: QuantScheme,
    scale_dtype: np.dtype | type | None = None,
    clip_search: bool = False,
) -> QuantizedTensor:
    """Quantize `x` with parameters from its own range (what weight quantization does); with
    `clip_search`, from the shrunk range of least squared error per block (`search_params`)."""
    x = np.asarray(x)
    dtype = scale_dtype or (x.dtype if x.dtype.kind == "f" else np.float32)
    if clip_search:
        scale, zero = search_params(x, scheme, dtype)
    else:
        lo, hi = tensor_range(x, scheme)
        scale, zero = compute_params(lo, hi, scheme, dtype)
    return QuantizedTensor(quantize(x, scale, zero, scheme), scale, zero, scheme)


def block_errors(x: np.ndarray, x_hat: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """The sum of squared differences of `x` and `x_hat` per scale of the scheme (shape
    `param_shape(x.shape)`), in float64."""
    return block_sums(np.square(np.asarray(x, np.float64) - np.asarray(x_hat, np.float64)), scheme)


def block_sums(values: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """The sum of `values` over the elements of each scale of the scheme (shape
    `param_shape(values.shape)`), in float64."""
    v = np.asarray(values, np.float64)
    if scheme.axis is None:
        return np.asarray(v.sum())
    axis = _axis(scheme.axis, v.ndim)
    if not scheme.block_size:
        return v.sum(axis=tuple(i for i in range(v.ndim) if i != axis))
    b = scheme.block_size
    pad = -v.shape[axis] % b
    if pad:  # padded elements add nothing
        widths = [(0, 0)] * v.ndim
        widths[axis] = (0, pad)
        v = np.pad(v, widths)
    blocked = v.reshape(*v.shape[:axis], v.shape[axis] // b, b, *v.shape[axis + 1 :])
    return blocked.sum(axis=axis + 1)


def _round_trip(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, scheme: QuantScheme
) -> np.ndarray:
    """dequantize(quantize(x)) in float arithmetic, without materializing the integer type
    (4-bit numpy types are slow): the same values, since the codes are small integers."""
    s = expand_params(scale, x.shape, scheme).astype(x.dtype)
    zp = expand_params(zero_point, x.shape, scheme).astype(np.float32)
    q = np.clip(np.rint(x / s).astype(np.float64) + zp, scheme.qmin, scheme.qmax)
    return ((q.astype(np.float32) - zp) * s).astype(scale.dtype)


def search_params(
    x: np.ndarray,
    scheme: QuantScheme,
    scale_dtype: np.dtype | type = np.float32,
    grid: tuple[float, ...] = CLIP_GRID,
) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero_point) per the scheme's granularity from the range f * [min, max] whose
    round trip has the least squared error, f in `grid` chosen per block (module docstring).
    The first factor wins ties; with 1.0 first no block is worse than plain min/max."""
    x = np.asarray(x)
    lo, hi = (np.asarray(b, np.float64) for b in tensor_range(x, scheme))
    best_scale, best_zero = compute_params(lo, hi, scheme, scale_dtype)
    best = block_errors(x, _round_trip(x, best_scale, best_zero, scheme), scheme)
    for factor in grid[1:]:
        scale, zero = compute_params(lo * factor, hi * factor, scheme, scale_dtype)
        err = block_errors(x, _round_trip(x, scale, zero, scheme), scheme)
        better = err < best
        best = np.where(better, err, best)
        best_scale = np.where(better, scale, best_scale).astype(best_scale.dtype)
        best_zero = np.where(better, zero, best_zero).astype(best_zero.dtype)
    return best_scale, best_zero


def dynamic_params(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ONNX DynamicQuantizeLinear's (scale, zero point) for `x` (uint8, per tensor), computed as
    the operator defines them, in float32: scale = (max(0, max x) - min(0, min x)) / 255 (1 for an
    all-zero x, as ONNX Runtime does) and zero point = saturate(rint(-min(0, min x) / scale)).
    ONNX Runtime's DynamicQuantizeMatMul quantizes its input the same way; `quantize` applies
    them."""
    x = np.asarray(x, np.float32)
    lo = np.minimum(x.min(initial=0.0), np.float32(0))
    hi = np.maximum(x.max(initial=0.0), np.float32(0))
    scale = np.float32((hi - lo) / np.float32(255))
    if scale == 0:
        scale = np.float32(1)
    zero = np.clip(np.rint(-lo / scale), 0, 255).astype(np.uint8)
    return np.asarray(scale, np.float32), np.asarray(zero, np.uint8)
