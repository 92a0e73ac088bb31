"""Translations of the neural-network ops to torch: convolution and pooling, normalizations,
ONNX Attention and RotaryEmbedding, the ONNX Runtime contrib ops O2 writes for `--target
onnxruntime`, and QuantizeLinear/DequantizeLinear as fake quantization.

Same convention as `torch_ops` (inputs positional, attributes as keyword arguments). The
semantics follow graphopt's reference kernels (`graphopt.ir.ops.contrib_*`, `onnx.reference`):

- norms compute their statistics in float32 (`stash_type`), cast the normalized value to the
  input's type, then apply scale and bias, as the spec says;
- Attention is the explicit form (scaled Q K^T + mask bias, softmax, fully masked rows give 0,
  grouped K/V heads repeated), so masks, causal offsets and 3-D or 4-D inputs all follow the
  reference exactly, and gradients flow through every input;
- QuantizeLinear returns whole numbers as a float tensor: `clamp(round(x / s) + zp, qmin,
  qmax)` with a straight-through estimator (the rounding's gradient is taken as 1; `clamp`
  gives 0 outside the range), so a model with QDQ nodes trains. DequantizeLinear accepts such a
  tensor or a real integer one. `dequantize_latent` is the DequantizeLinear of a quantized
  *weight*: the backend keeps a float latent copy of the weight as the trainable parameter and
  re-quantizes it in the forward pass, with the same estimator (quantization-aware training).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from graphopt.backends.torch_ops import torch_dtype

__all__ = ["OPS", "QUANT_RANGES", "dequantize_latent", "quantize_values"]


# ----- convolution and pooling -----------------------------------------------------------------


def _same_pads(
    spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
    dilations: Sequence[int], upper: bool,
) -> list[int]:  # fmt: skip
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if upper else large)
        ends.append(large if upper else small)
    return begins + ends


def _resolve_pads(
    x: Tensor, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
    pads: Sequence[int] | None, auto_pad: str,
) -> list[int]:  # fmt: skip
    n = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(list(x.shape[2:]), kernel, strides, dilations, auto_pad == "SAME_UPPER")
    if auto_pad == "VALID":
        return [0] * (2 * n)
    return list(pads) if pads else [0] * (2 * n)


def _torch_pads(pads: Sequence[int]) -> list[int]:
    """ONNX [b1, b2, .., e1, e2, ..] -> F.pad's [b_last, e_last, ..., b1, e1]."""
    n = len(pads) // 2
    out: list[int] = []
    for i in range(n - 1, -1, -1):
        out += [pads[i], pads[i + n]]
    return out


def _conv(
    x: Tensor, w: Tensor, b: Tensor | None = None, *, auto_pad: str = "NOTSET",
    dilations: Sequence[int] | None = None, group: int = 1,
    kernel_shape: Sequence[int] | None = None, pads: Sequence[int] | None = None,
    strides: Sequence[int] | None = None,
) -> Tensor:  # fmt: skip
    n = w.dim() - 2
    kernel = list(kernel_shape or w.shape[2:])
    strides = list(strides or [1] * n)
    dilations = list(dilations or [1] * n)
    full = _resolve_pads(x, kernel, strides, dilations, pads, auto_pad)
    if full[:n] == full[n:]:
        padding: Any = full[:n]
    else:
        x, padding = F.pad(x, _torch_pads(full)), 0
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    return fn(x, w, b, stride=strides, padding=padding, dilation=dilations, groups=group)  # type: ignore[operator]


def _pool_setup(
    x: Tensor, kernel_shape: Sequence[int], strides: Sequence[int] | None,
    dilations: Sequence[int] | None, pads: Sequence[int] | None, auto_pad: str,
) -> tuple[list[int], list[int], list[int], list[int]]:  # fmt: skip
    n = len(kernel_shape)
    strides = list(strides or [1] * n)
    dilations = list(dilations or [1] * n)
    full = _resolve_pads(x, kernel_shape, strides, dilations, pads, auto_pad)
    return list(kernel_shape), strides, dilations, full


def _max_pool(
    x: Tensor, *, n_out: int, kernel_shape: Sequence[int], auto_pad: str = "NOTSET",
    ceil_mode: int = 0, dilations: Sequence[int] | None = None,
    pads: Sequence[int] | None = None, storage_order: int = 0,
    strides: Sequence[int] | None = None,
) -> Tensor:  # fmt: skip
    if n_out > 1:
        raise NotImplementedError("MaxPool's Indices output")
    kernel, strides, dilations, full = _pool_setup(
        x, kernel_shape, strides, dilations, pads, auto_pad
    )
    n = len(kernel)
    if any(full):
        x = F.pad(x, _torch_pads(full), value=-math.inf)
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]
    return fn(x, kernel, strides, 0, dilations, ceil_mode=bool(ceil_mode))  # type: ignore[operator]


def _average_pool(
    x: Tensor, *, kernel_shape: Sequence[int], auto_pad: str = "NOTSET", ceil_mode: int = 0,
    count_include_pad: int = 0, dilations: Sequence[int] | None = None,
    pads: Sequence[int] | None = None, strides: Sequence[int] | None = None,
) -> Tensor:  # fmt: skip
    kernel, strides, dilations, full = _pool_setup(
        x, kernel_shape, strides, dilations, pads, auto_pad
    )
    if any(d != 1 for d in dilations):
        raise NotImplementedError("AveragePool with dilations")
    n = len(kernel)
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[n]
    ones = torch.ones_like(x[:1, :1])
    if any(full):
        x = F.pad(x, _torch_pads(full))
        ones = F.pad(ones, _torch_pads(full), value=1.0 if count_include_pad else 0.0)
    # the mean of the window over the count of real elements in it: both pools divide alike
    total = fn(x, kernel, strides, 0, ceil_mode=bool(ceil_mode))  # type: ignore[operator]
    count = fn(ones, kernel, strides, 0, ceil_mode=bool(ceil_mode))  # type: ignore[operator]
    return total / count


def _global_average_pool(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def _global_max_pool(x: Tensor) -> Tensor:
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


# ----- normalizations --------------------------------------------------------------------------


def _lrn(x: Tensor, *, size: int, alpha: float = 1e-4, beta: float = 0.75, bias: float = 1.0) -> Tensor:  # fmt: skip
    """x / (bias + alpha / size * sum of squares over channels [c - (size-1)//2, c + ceil((size-1)/2)])^beta."""  # fmt: skip
    front = (size - 1) // 2
    squares = x * x
    shape = (x.shape[0], 1, *x.shape[2:])
    padded = torch.cat(
        [squares.new_zeros(shape).expand(-1, front, *x.shape[2:]), squares,
         squares.new_zeros(shape).expand(-1, size - 1 - front, *x.shape[2:])], dim=1,
    )  # fmt: skip
    channels = x.shape[1]
    total = sum(padded[:, i : i + channels] for i in range(size))
    return x / (bias + alpha / size * total) ** beta


def _channel(t: Tensor, rank: int) -> Tensor:
    return t.reshape(1, -1, *([1] * (rank - 2)))


def _batch_norm(
    x: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor, *, n_out: int,
    epsilon: float = 1e-5, momentum: float = 0.9, training_mode: int = 0, spatial: int = 1,
) -> Any:  # fmt: skip
    if training_mode or n_out > 1:
        raise NotImplementedError("BatchNormalization in training mode")
    r = x.dim()
    inv = torch.rsqrt(_channel(var, r) + epsilon)
    return (x - _channel(mean, r)) * inv * _channel(scale, r) + _channel(bias, r)


def layer_norm(
    x: Tensor, scale: Tensor | None, bias: Tensor | None, axis: int, epsilon: float,
    centered: bool = True, stash: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(y, mean, inv_std) as graphopt's reference kernel computes them (see its docstring)."""
    a = axis + x.dim() if axis < 0 else axis
    dims = tuple(range(a, x.dim()))
    xs = x.to(stash)
    mean = xs.mean(dim=dims, keepdim=True) if centered else torch.zeros_like(xs[..., :1])
    d = xs - mean if centered else xs
    var = (d * d).mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(var + epsilon)
    y = (d * inv_std).to(x.dtype)
    if scale is not None:
        y = y * scale.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y, mean, inv_std


def _stash(code: int) -> torch.dtype:
    return torch.float64 if code == 11 else torch.float32


def _layer_normalization(
    x: Tensor, scale: Tensor, bias: Tensor | None = None, *, n_out: int, axis: int = -1,
    epsilon: float = 1e-5, stash_type: int = 1,
) -> Any:  # fmt: skip
    y, mean, inv_std = layer_norm(x, scale, bias, axis, epsilon, stash=_stash(stash_type))
    return y if n_out == 1 else (y, mean, inv_std)[:n_out]


def _rms_normalization(
    x: Tensor, scale: Tensor, *, axis: int = -1, epsilon: float = 1e-5, stash_type: int = 1
) -> Tensor:
    return layer_norm(x, scale, None, axis, epsilon, centered=False, stash=_stash(stash_type))[0]


def _skip_norm(centered: bool) -> Callable[..., Any]:
    def run(
        x: Tensor, skip: Tensor, gamma: Tensor, *optional: Tensor | None, n_out: int,
        epsilon: float = 1e-12,
    ) -> Any:  # fmt: skip
        beta = optional[0] if centered and optional else None
        bias_at = 1 if centered else 0
        bias = optional[bias_at] if len(optional) > bias_at else None
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        total = x.to(compute) + skip.to(compute)
        if bias is not None:
            total = total + bias.to(compute)
        y, mean, inv_std = layer_norm(
            total, gamma.to(compute), None if beta is None else beta.to(compute), -1, epsilon,
            centered, compute,
        )  # fmt: skip
        outputs = (y.to(x.dtype), mean.float(), inv_std.float(), total.to(x.dtype))
        return outputs[0] if n_out == 1 else outputs[:n_out]

    return run


# ----- attention -------------------------------------------------------------------------------


def _heads(t: Tensor, heads: int) -> Tensor:
    """[B, S, H*D] -> [B, H, S, D]."""
    b, s, hidden = t.shape
    return t.reshape(b, s, heads, hidden // heads).transpose(1, 2)


def _attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
    past_key: Tensor | None = None, past_value: Tensor | None = None,
    nonpad_kv_seqlen: Tensor | None = None, *, n_out: int, scale: float | None = None,
    is_causal: int = 0, q_num_heads: int | None = None, kv_num_heads: int | None = None,
    softcap: float = 0.0, qk_matmul_output_mode: int = 0, softmax_precision: int | None = None,
) -> Any:  # fmt: skip
    three_d = q.dim() == 3
    if three_d:
        if q_num_heads is None or kv_num_heads is None:
            raise ValueError("3-D Attention needs q_num_heads and kv_num_heads")
        q, k, v = _heads(q, q_num_heads), _heads(k, kv_num_heads), _heads(v, kv_num_heads)
    if past_key is not None and past_value is not None:
        k, v = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
    present_key, present_value = k, v
    if scale is None:
        scale = 1 / math.sqrt(q.shape[3])
    q_len, kv_len = q.shape[2], k.shape[2]
    bias = torch.zeros(q_len, kv_len, dtype=q.dtype, device=q.device)
    if attn_mask is not None:
        pad = kv_len - attn_mask.shape[-1]
        if attn_mask.dtype == torch.bool:
            if pad > 0:
                attn_mask = F.pad(attn_mask, (0, pad), value=False)
            attn_mask = torch.where(attn_mask, 0.0, -math.inf).to(q.dtype)
        elif pad > 0:
            attn_mask = F.pad(attn_mask, (0, pad), value=-math.inf)
        bias = bias + attn_mask
    if is_causal:
        offset = past_key.shape[2] if past_key is not None else 0
        rows = torch.arange(q_len, device=q.device).reshape(-1, 1)
        cols = torch.arange(kv_len, device=q.device).reshape(1, -1)
        bias = bias + torch.where(cols <= rows + offset, 0.0, -math.inf).to(q.dtype)
    if nonpad_kv_seqlen is not None:
        keep = torch.arange(kv_len, device=q.device) < nonpad_kv_seqlen.reshape(-1, 1)
        bias = bias + torch.where(keep, 0.0, -math.inf).to(q.dtype).reshape(q.shape[0], 1, 1, -1)
    if q.shape[1] != k.shape[1]:  # grouped K/V heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    root = math.sqrt(scale)
    scores = torch.matmul(q * root, (k * root).transpose(-1, -2))
    if softcap and softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    qk_out = scores
    with_bias = scores + bias
    if qk_matmul_output_mode == 2:
        qk_out = with_bias
    row_max = with_bias.amax(dim=-1, keepdim=True)
    safe = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(with_bias - safe)
    total = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(total == 0, torch.ones_like(total), total)
    masked_rows = torch.isneginf(bias.amax(dim=-1, keepdim=True))
    probs = torch.where(masked_rows, torch.zeros_like(probs), probs)
    if qk_matmul_output_mode == 3:
        qk_out = probs
    y = torch.matmul(probs, v)
    if three_d:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    outputs = (y, present_key, present_value, qk_out)
    return y if n_out == 1 else outputs[:n_out]


def _rotary_embedding(
    x: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None = None, *,
    interleaved: int = 0, num_heads: int = 0, rotary_embedding_dim: int = 0,
) -> Tensor:  # fmt: skip
    shape = x.shape
    if x.dim() == 4:  # [B, H, S, D] -> [B, S, H, D]
        x = x.transpose(1, 2)
    else:
        x = x.reshape(shape[0], shape[1], num_heads, shape[2] // num_heads)
    dim = rotary_embedding_dim or x.shape[3]
    rotate, keep = x[..., :dim], x[..., dim:]
    if position_ids is not None:
        cos, sin = cos[position_ids.long()], sin[position_ids.long()]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if interleaved:
        x1, x2 = rotate[..., 0::2], rotate[..., 1::2]
    else:
        x1, x2 = rotate[..., : dim // 2], rotate[..., dim // 2 :]
    real = cos * x1 - sin * x2
    imag = sin * x1 + cos * x2
    if interleaved:
        rotated = torch.stack([real, imag], dim=-1).reshape(rotate.shape)
    else:
        rotated = torch.cat([real, imag], dim=-1)
    out = torch.cat([rotated, keep], dim=-1)
    return out.reshape(shape) if len(shape) == 3 else out.transpose(1, 2)


# ----- ONNX Runtime contrib ops ----------------------------------------------------------------


def _gelu_erf(x: Tensor) -> Tensor:
    return F.gelu(x)


def _bias_gelu(a: Tensor, b: Tensor) -> Tensor:
    return F.gelu(a + b)


def _fast_gelu(x: Tensor, bias: Tensor | None = None) -> Tensor:
    return F.gelu(x if bias is None else x + bias, approximate="tanh")


_ACTIVATIONS: dict[str, Callable[[Tensor, list[float]], Tensor]] = {
    "Relu": lambda y, p: torch.relu(y),
    "Tanh": lambda y, p: torch.tanh(y),
    "Sigmoid": lambda y, p: torch.sigmoid(y),
    "LeakyRelu": lambda y, p: torch.where(y >= 0, y, p[0] * y),
    "Clip": lambda y, p: torch.clamp(y, p[0], p[1]),
    "HardSigmoid": lambda y, p: torch.clamp(p[0] * y + p[1], 0.0, 1.0),
}


def _fused_conv(
    x: Tensor, w: Tensor, b: Tensor | None = None, z: Tensor | None = None, *,
    activation: str | None = None, activation_params: Sequence[float] | None = None,
    **conv: Any,
) -> Tensor:  # fmt: skip
    y = _conv(x, w, b, **conv)
    if z is not None:
        y = y + z
    return y if activation is None else _ACTIVATIONS[activation](y, list(activation_params or []))


def _fused_matmul(
    a: Tensor, b: Tensor, *, alpha: float = 1.0, transA: int = 0, transB: int = 0,
    transBatchA: int = 0, transBatchB: int = 0,
) -> Tensor:  # fmt: skip
    from graphopt.ir.ops.contrib_matmul import fused_matmul_perm

    if a.dim() > 1:
        a = a.permute(fused_matmul_perm(a.dim(), bool(transA), bool(transBatchA)))
    if b.dim() > 1:
        b = b.permute(fused_matmul_perm(b.dim(), bool(transB), bool(transBatchB)))
    y = torch.matmul(a, b)
    return y * alpha if alpha != 1.0 else y


def _matmul_nbits(
    a: Tensor, b: Tensor, scales: Tensor, zero_points: Tensor | None = None,
    g_idx: Tensor | None = None, bias: Tensor | None = None, *, K: int, N: int, bits: int = 4,
    block_size: int, accuracy_level: int = 0,
) -> Tensor:  # fmt: skip
    blocks = -(-K // block_size)
    shifts = torch.arange(0, 8, bits, device=b.device, dtype=torch.int32)
    mask = (1 << bits) - 1
    codes = (b.reshape(N, blocks, -1).to(torch.int32).unsqueeze(-1) >> shifts) & mask
    codes = codes.reshape(N, blocks, -1)[..., :block_size].float()
    scale = scales.reshape(N, blocks).float()
    if zero_points is None:
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    elif zero_points.dtype == torch.uint8:
        packed = zero_points.reshape(N, -1).to(torch.int32).unsqueeze(-1) >> shifts
        zero = (packed & mask).reshape(N, -1)[:, :blocks].float()
    else:
        zero = zero_points.reshape(N, blocks).float()
    weight = ((codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(N, -1)[:, :K]
    y = torch.matmul(a.float(), weight.t())
    if bias is not None:
        y = y + bias.float()
    return y.to(a.dtype)


# ----- quantization ----------------------------------------------------------------------------

# ONNX element type -> (qmin, qmax)
QUANT_RANGES: dict[int, tuple[int, int]] = {
    2: (0, 255), 3: (-128, 127), 4: (0, 65535), 5: (-32768, 32767), 21: (0, 15), 22: (-8, 7),
}  # fmt: skip


def _expand_param(p: Tensor, like: Tensor, axis: int, block_size: int) -> Tensor:
    """A scale or zero point broadcastable against `like` (per tensor, channel or block)."""
    if p.dim() == 0 or p.numel() == 1 and like.dim() == 0:
        return p.reshape(())
    axis = axis + like.dim() if axis < 0 else axis
    if block_size:
        return p.repeat_interleave(block_size, dim=axis).narrow(axis, 0, like.shape[axis])
    shape = [1] * like.dim()
    shape[axis] = -1
    return p.reshape(shape)


def _round_ste(x: Tensor) -> Tensor:
    """round half to even forward, identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def quantize_values(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, axis: int, block_size: int,
    qrange: tuple[int, int],
) -> Tensor:  # fmt: skip
    """clamp(round(x / scale) + zero_point, qmin, qmax) as whole numbers in x's float type;
    gradient 1 inside the range, 0 outside."""
    s = _expand_param(scale, x, axis, block_size).to(x.dtype)
    q = _round_ste(x / s)
    if zero_point is not None:
        q = q + _expand_param(zero_point, x, axis, block_size).to(x.dtype)
    return torch.clamp(q, qrange[0], qrange[1])


def _dequantize(
    q: Tensor, scale: Tensor, zero_point: Tensor | None, axis: int, block_size: int
) -> Tensor:
    shifted = q.to(torch.float32)
    if zero_point is not None:
        shifted = shifted - _expand_param(zero_point, q, axis, block_size).to(torch.float32)
    return (shifted * _expand_param(scale, q, axis, block_size)).to(scale.dtype)


def _quantize_linear(
    x: Tensor, scale: Tensor, zero_point: Tensor | None = None, *, qtype: int, axis: int = 1,
    block_size: int = 0, saturate: int = 1, output_dtype: int = 0, precision: int = 0,
) -> Tensor:  # fmt: skip
    if qtype not in QUANT_RANGES:
        raise NotImplementedError(f"QuantizeLinear to element type {qtype}")
    if not x.dtype.is_floating_point:
        x = x.float()
    return quantize_values(x, scale, zero_point, axis, block_size, QUANT_RANGES[qtype])


def _dequantize_linear(
    q: Tensor, scale: Tensor, zero_point: Tensor | None = None, *, axis: int = 1,
    block_size: int = 0, output_dtype: int = 0,
) -> Tensor:  # fmt: skip
    y = _dequantize(q, scale, zero_point, axis, block_size)
    return y.to(torch_dtype(output_dtype)) if output_dtype else y


def dequantize_latent(
    latent: Tensor, scale: Tensor, zero_point: Tensor | None = None, *, axis: int = 1,
    block_size: int = 0, qtype: int, output_dtype: int = 0,
) -> Tensor:  # fmt: skip
    """DequantizeLinear of a quantized weight held as a float latent: quantize it (with the
    straight-through estimator), then dequantize. Equal to the original DequantizeLinear while
    the latent is the dequantized weight."""
    q = quantize_values(latent, scale, zero_point, axis, block_size, QUANT_RANGES[qtype])
    return _dequantize_linear(q, scale, zero_point, axis=axis, block_size=block_size,
                              output_dtype=output_dtype)  # fmt: skip


def _dynamic_quantize_linear(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """uint8 codes of x on its own range [min(0, min x), max(0, max x)] (as onnx.reference)."""
    x32 = x.float()
    hi, lo = torch.clamp(x32.max(), min=0.0), torch.clamp(x32.min(), max=0.0)
    scale = torch.where(hi == lo, torch.ones_like(hi), hi - lo) / 255.0
    zero = torch.round(torch.clamp(0.0 - lo / scale, 0.0, 255.0))
    codes = torch.clamp(_round_ste(x32 / scale) + zero, 0.0, 255.0)
    return codes, scale.to(x.dtype), zero


def _centered(t: Tensor, zero_point: Tensor | None, axis: int) -> Tensor:
    """t - zero_point in float64 (exact for 8-bit codes); a per-row/column zero point along
    `axis` of t."""
    t64 = t.double()
    if zero_point is None:
        return t64
    zp = zero_point.double()
    if zp.numel() > 1:
        shape = [1] * t.dim()
        shape[axis] = -1
        zp = zp.reshape(shape)
    return t64 - zp


def _matmul_integer(
    a: Tensor, b: Tensor, a_zero_point: Tensor | None = None, b_zero_point: Tensor | None = None
) -> Tensor:
    product = torch.matmul(_centered(a, a_zero_point, -2), _centered(b, b_zero_point, -1))
    return product.to(torch.int32)


def _conv_integer(
    x: Tensor, w: Tensor, x_zero_point: Tensor | None = None, w_zero_point: Tensor | None = None,
    **conv: Any,
) -> Tensor:  # fmt: skip
    return _conv(_centered(x, x_zero_point, 1), _centered(w, w_zero_point, 0), **conv).to(torch.int32)  # fmt: skip


def _dynamic_quantize_matmul(
    a: Tensor, b: Tensor, b_scale: Tensor, b_zero_point: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """graphopt's DynamicQuantizeMatMul kernel: A quantized as DynamicQuantizeLinear does (an
    all-zero A gets scale 1), an integer product, scaled back."""
    a32 = a.float()
    hi, lo = torch.clamp(a32.max(), min=0.0), torch.clamp(a32.min(), max=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.clamp(torch.round(0.0 - lo / scale), 0.0, 255.0)
    codes = torch.clamp(_round_ste(a32 / scale) + zero, 0.0, 255.0)
    product = torch.matmul((codes - zero).double(), _centered(b, b_zero_point, -1)).float()
    y = product * (scale * b_scale.float())
    return y + bias.float() if bias is not None else y


OPS: dict[str, Callable[..., Any]] = {
    "Conv": _conv, "MaxPool": _max_pool, "AveragePool": _average_pool,
    "GlobalAveragePool": _global_average_pool, "GlobalMaxPool": _global_max_pool,
    "BatchNormalization": _batch_norm, "LRN": _lrn, "LayerNormalization": _layer_normalization,
    "RMSNormalization": _rms_normalization, "Attention": _attention,
    "RotaryEmbedding": _rotary_embedding,
    "QuantizeLinear": _quantize_linear, "DequantizeLinear": _dequantize_linear,
    "com.microsoft.Gelu": _gelu_erf, "com.microsoft.BiasGelu": _bias_gelu,
    "com.microsoft.FastGelu": _fast_gelu, "com.microsoft.FusedConv": _fused_conv,
    "com.microsoft.FusedMatMul": _fused_matmul,
    "com.microsoft.SkipLayerNormalization": _skip_norm(centered=True),
    "com.microsoft.SkipSimplifiedLayerNormalization": _skip_norm(centered=False),
    "com.microsoft.MatMulNBits": _matmul_nbits,
    "DynamicQuantizeLinear": _dynamic_quantize_linear, "MatMulInteger": _matmul_integer,
    "ConvInteger": _conv_integer, "com.microsoft.DynamicQuantizeMatMul": _dynamic_quantize_matmul,
}  # fmt: skip
