"""Translations of ONNX ops to torch: elementwise math, shapes, indexing, reductions, softmax.

`OPS` maps an op name (domain-qualified, as `Node.op` spells it) to a function of torch tensors:
positional arguments are the node's inputs in order (`None` for an omitted optional input),
keyword arguments its attributes (plain Python values, named as ONNX names them). A function
whose signature has a parameter `opset` also gets the node's domain opset, and one with
`n_out` the number of outputs the node declares; it returns one tensor, or a tuple with one
entry per output. `graphopt.backends.torch` puts one call of such a function per node into a
`torch.fx` graph; the neural-network ops (convolutions, norms, attention, contrib and
quantization ops) are in `torch_ops_nn`.

Semantics are ONNX's, checked against the reference interpreter (`tests/test_torch_backend.py`).
Shapes are read at run time (`.tolist()` on shape tensors), so symbolic dims take any size.
Integer values a QuantizeLinear computes are carried as float tensors of whole numbers (so a
straight-through gradient can flow through them, see `torch_ops_nn`); the ops here that need
real integers (indices, shapes) convert what they read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["OPS", "TORCH_DTYPES", "ints", "torch_dtype"]

# ONNX element type code -> torch dtype (int4/uint4 are held widened to int8/uint8)
TORCH_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16,
    6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64,
    12: torch.uint32, 13: torch.uint64, 16: torch.bfloat16, 21: torch.uint8, 22: torch.int8,
}  # fmt: skip


def torch_dtype(code: int) -> torch.dtype:
    try:
        return TORCH_DTYPES[int(code)]
    except KeyError:
        raise ValueError(f"ONNX element type {code} has no torch dtype here") from None


def ints(t: Tensor | Sequence[int] | None) -> list[int]:
    """A shape-like input (1-D int64 tensor) as a list of Python ints."""
    if t is None:
        return []
    if isinstance(t, Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ----- elementwise -----------------------------------------------------------------------------


def _unary(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def run(x: Tensor) -> Tensor:
        return fn(x)

    run.__name__ = getattr(fn, "__name__", "unary")
    return run


def _softsign(x: Tensor) -> Tensor:
    return x / (1 + x.abs())


def _is_inf(x: Tensor, detect_negative: int = 1, detect_positive: int = 1) -> Tensor:
    result = torch.zeros_like(x, dtype=torch.bool)
    if detect_negative:
        result = result | (x == -math.inf)
    if detect_positive:
        result = result | (x == math.inf)
    return result


def _div(a: Tensor, b: Tensor) -> Tensor:
    if not a.dtype.is_floating_point:
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _pow(a: Tensor, b: Tensor) -> Tensor:
    return torch.pow(a, b).to(a.dtype)


def _mod(a: Tensor, b: Tensor, fmod: int = 0) -> Tensor:
    return torch.fmod(a, b) if fmod else torch.remainder(a, b)


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., Tensor]:
    def run(*xs: Tensor) -> Tensor:
        result = xs[0]
        for x in xs[1:]:
            result = fn(result, x)
        return result

    return run


def _mean(*xs: Tensor) -> Tensor:
    return _variadic(torch.add)(*xs) / len(xs)


def _leaky_relu(x: Tensor, alpha: float = 0.01) -> Tensor:
    return torch.where(x >= 0, x, x * alpha)


def _elu(x: Tensor, alpha: float = 1.0) -> Tensor:
    return torch.where(x > 0, x, alpha * torch.expm1(x))


def _selu(x: Tensor, alpha: float = 1.67326319217681884765625, gamma: float = 1.05070102214813232421875) -> Tensor:  # fmt: skip
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


def _celu(x: Tensor, alpha: float = 1.0) -> Tensor:
    return torch.clamp(x, min=0) + torch.clamp(alpha * torch.expm1(x / alpha), max=0)


def _hard_sigmoid(x: Tensor, alpha: float = 0.2, beta: float = 0.5) -> Tensor:
    return torch.clamp(alpha * x + beta, 0.0, 1.0)


def _hard_swish(x: Tensor) -> Tensor:
    return x * torch.clamp(x / 6 + 0.5, 0.0, 1.0)


def _thresholded_relu(x: Tensor, alpha: float = 1.0) -> Tensor:
    return torch.where(x > alpha, x, torch.zeros_like(x))


def _prelu(x: Tensor, slope: Tensor) -> Tensor:
    return torch.where(x < 0, x * slope, x)


def _gelu(x: Tensor, approximate: str = "none") -> Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh" if approximate == "tanh" else "none")


def _clip(
    x: Tensor, low: Tensor | None = None, high: Tensor | None = None, *, opset: int,
    min: float | None = None, max: float | None = None,
) -> Tensor:  # fmt: skip
    if opset < 11:  # bounds were attributes
        return torch.clamp(x, min, max)
    if low is not None:
        x = torch.maximum(x, low.to(x.dtype))
    if high is not None:
        x = torch.minimum(x, high.to(x.dtype))
    return x


def _cast(x: Tensor, to: int, saturate: int = 1, round_mode: str = "up") -> Tensor:
    return x.to(torch_dtype(to))


def _cast_like(x: Tensor, like: Tensor, saturate: int = 1, round_mode: str = "up") -> Tensor:
    return x.to(like.dtype)


def _identity(x: Any) -> Any:
    return x


def _dropout(
    x: Tensor, ratio: Tensor | None = None, training_mode: Tensor | None = None, *, n_out: int,
    seed: int = 0,
) -> Any:  # fmt: skip
    if n_out == 1:
        return x
    return x, torch.ones_like(x, dtype=torch.bool)


# ----- shapes and layout ------------------------------------------------------------------------


def _shape(x: Tensor, start: int = 0, end: int | None = None) -> Tensor:
    dims = list(x.shape)[start:end]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


def _size(x: Tensor) -> Tensor:
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


def _reshape(x: Tensor, shape: Tensor, allowzero: int = 0) -> Tensor:
    target = ints(shape)
    if not allowzero:
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return x.reshape(target)


def _expand(x: Tensor, shape: Tensor) -> Tensor:
    return x.expand(torch.broadcast_shapes(x.shape, tuple(ints(shape))))


def _tile(x: Tensor, repeats: Tensor) -> Tensor:
    return x.repeat(ints(repeats))


def _transpose(x: Tensor, perm: Sequence[int] | None = None) -> Tensor:
    return x.permute(list(perm) if perm is not None else list(range(x.dim() - 1, -1, -1)))


def _flatten(x: Tensor, axis: int = 1) -> Tensor:
    axis = _axis(axis, x.dim())
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _squeeze(x: Tensor, axes_t: Tensor | None = None, *, axes: Sequence[int] | None = None) -> Tensor:  # fmt: skip
    chosen = ints(axes_t) if axes_t is not None else list(axes or [])
    if not chosen:
        return x.squeeze()
    return x.squeeze(tuple(_axis(a, x.dim()) for a in chosen))


def _unsqueeze(x: Tensor, axes_t: Tensor | None = None, *, axes: Sequence[int] | None = None) -> Tensor:  # fmt: skip
    chosen = ints(axes_t) if axes_t is not None else list(axes or [])
    rank = x.dim() + len(chosen)
    for axis in sorted(_axis(a, rank) for a in chosen):
        x = x.unsqueeze(axis)
    return x


def _concat(*xs: Tensor, axis: int) -> Tensor:
    return torch.cat(list(xs), dim=axis)


def _split(
    x: Tensor, split_t: Tensor | None = None, *, n_out: int, axis: int = 0,
    split: Sequence[int] | None = None, num_outputs: int | None = None,
) -> tuple[Tensor, ...]:  # fmt: skip
    sizes = ints(split_t) if split_t is not None else list(split or [])
    dim = x.shape[_axis(axis, x.dim())]
    if sizes:
        return tuple(torch.split(x, sizes, dim=axis))
    if num_outputs:
        return tuple(torch.split(x, -(-dim // num_outputs), dim=axis))
    return tuple(torch.split(x, dim // n_out, dim=axis))


def _slice_axis(x: Tensor, axis: int, start: int, end: int, step: int) -> Tensor:
    dim = x.shape[axis]
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        return x[(slice(None),) * axis + (slice(start, end, step),)]
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    index = torch.arange(start, end, step, device=x.device)
    return x.index_select(axis, index)


def _slice(
    x: Tensor, starts_t: Tensor | None = None, ends_t: Tensor | None = None,
    axes_t: Tensor | None = None, steps_t: Tensor | None = None, *, opset: int,
    starts: Sequence[int] = (), ends: Sequence[int] = (), axes: Sequence[int] | None = None,
) -> Tensor:  # fmt: skip
    if opset >= 10:
        starts, ends = ints(starts_t), ints(ends_t)
        axes = ints(axes_t) if axes_t is not None else None
    chosen = list(axes) if axes is not None else list(range(len(starts)))
    steps = ints(steps_t) if opset >= 10 and steps_t is not None else [1] * len(starts)
    for axis, start, end, step in zip(chosen, starts, ends, steps, strict=True):
        x = _slice_axis(x, _axis(axis, x.dim()), start, end, step)
    return x


def _pad(
    x: Tensor, pads_t: Tensor | None = None, value_t: Tensor | None = None,
    axes_t: Tensor | None = None, *, opset: int, mode: str = "constant",
    pads: Sequence[int] = (), value: float = 0.0,
) -> Tensor:  # fmt: skip
    pad_list = ints(pads_t) if opset >= 11 else list(pads)
    fill = value_t.item() if opset >= 11 and value_t is not None and value_t.numel() else value
    rank = x.dim()
    axes = [_axis(a, rank) for a in ints(axes_t)] if axes_t is not None else list(range(rank))
    n = len(axes)
    begin = dict(zip(axes, pad_list[:n], strict=True))
    end = dict(zip(axes, pad_list[n:], strict=True))
    torch_pads: list[int] = []
    for axis in range(rank - 1, -1, -1):
        torch_pads += [begin.get(axis, 0), end.get(axis, 0)]
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]
    modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}
    if mode == "constant":
        return torch.nn.functional.pad(x, torch_pads, value=float(fill))
    return torch.nn.functional.pad(x, torch_pads, mode=modes[mode])


# ----- creation --------------------------------------------------------------------------------


def constant_of_shape(shape: Tensor, *, value: float | int = 0.0, dtype: int = 1) -> Tensor:
    return torch.full(ints(shape), value, dtype=torch_dtype(dtype), device=shape.device)


def _range(start: Tensor, limit: Tensor, delta: Tensor) -> Tensor:
    if start.dtype.is_floating_point:
        count = max(math.ceil((limit.item() - start.item()) / delta.item()), 0)
        steps = torch.arange(count, dtype=start.dtype, device=start.device)
        return start + steps * delta
    return torch.arange(
        start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device
    )


def _trilu(x: Tensor, k: Tensor | None = None, upper: int = 1) -> Tensor:
    offset = int(k.item()) if k is not None else 0
    return torch.triu(x, offset) if upper else torch.tril(x, offset)


def _eye_like(x: Tensor, dtype: int | None = None, k: int = 0) -> Tensor:
    out = torch.eye(x.shape[0], x.shape[1], device=x.device)
    if k:
        out = torch.diag(torch.ones(x.shape[0], device=x.device), k)[: x.shape[0], : x.shape[1]]
    return out.to(torch_dtype(dtype) if dtype is not None else x.dtype)


# ----- indexing --------------------------------------------------------------------------------


def _positive(indices: Tensor, dim: int) -> Tensor:
    indices = indices.long()
    return torch.where(indices < 0, indices + dim, indices)


def _gather(data: Tensor, indices: Tensor, axis: int = 0) -> Tensor:
    axis = _axis(axis, data.dim())
    index = _positive(indices, data.shape[axis])
    picked = data.index_select(axis, index.reshape(-1))
    return picked.reshape((*data.shape[:axis], *index.shape, *data.shape[axis + 1 :]))


def _gather_elements(data: Tensor, indices: Tensor, axis: int = 0) -> Tensor:
    axis = _axis(axis, data.dim())
    return torch.gather(data, axis, _positive(indices, data.shape[axis]))


def _gather_nd(data: Tensor, indices: Tensor, batch_dims: int = 0) -> Tensor:
    indices = indices.long()
    batch = data.shape[:batch_dims]
    b = math.prod(batch)
    flat_data = data.reshape(b, *data.shape[batch_dims:])
    flat_index = indices.reshape(b, *indices.shape[batch_dims:])
    k = flat_index.shape[-1]
    columns = [
        _positive(flat_index[..., i], flat_data.shape[1 + i]) for i in range(k)
    ]  # one index tensor per indexed axis
    rows = torch.arange(b, device=data.device).reshape(b, *([1] * (flat_index.dim() - 2)))
    picked = flat_data[tuple([rows, *columns])]
    return picked.reshape((*batch, *picked.shape[1:]))


def _scatter_nd(data: Tensor, indices: Tensor, updates: Tensor, reduction: str = "none") -> Tensor:
    out = data.clone()
    k = indices.shape[-1]
    index = tuple(_positive(indices[..., i], data.shape[i]) for i in range(k))
    if reduction == "add":
        return out.index_put(index, updates, accumulate=True)
    if reduction == "none":
        return out.index_put(index, updates)
    current = out[index]
    combined = {"mul": current * updates, "max": torch.maximum(current, updates),
                "min": torch.minimum(current, updates)}[reduction]  # fmt: skip
    return out.index_put(index, combined)


def _where(condition: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return torch.where(condition.bool(), x, y)


def _cumsum(x: Tensor, axis_t: Tensor, exclusive: int = 0, reverse: int = 0) -> Tensor:
    axis = _axis(int(axis_t.item()), x.dim())
    if reverse:
        x = x.flip(axis)
    out = torch.cumsum(x, dim=axis).to(x.dtype)
    if exclusive:
        out = out - x
    return out.flip(axis) if reverse else out


def _arg(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def run(x: Tensor, axis: int = 0, keepdims: int = 1, select_last_index: int = 0) -> Tensor:
        axis = _axis(axis, x.dim())
        if select_last_index:
            flipped = fn(x.flip(axis), dim=axis, keepdim=bool(keepdims))
            return (x.shape[axis] - 1 - flipped).long()
        return fn(x, dim=axis, keepdim=bool(keepdims)).long()

    return run


def _topk(
    x: Tensor, k: Tensor, axis: int = -1, largest: int = 1, sorted: int = 1
) -> tuple[Tensor, Tensor]:
    values, indices = torch.topk(x, int(k.item()), dim=axis, largest=bool(largest), sorted=True)
    return values, indices.long()


# ----- reductions ------------------------------------------------------------------------------


def _reduce(kind: str) -> Callable[..., Tensor]:
    def run(
        x: Tensor, axes_t: Tensor | None = None, *, axes: Sequence[int] | None = None,
        keepdims: int = 1, noop_with_empty_axes: int = 0,
    ) -> Tensor:  # fmt: skip
        chosen = ints(axes_t) if axes_t is not None else list(axes or [])
        if not chosen:
            if noop_with_empty_axes:
                return x
            chosen = list(range(x.dim()))
        dims = tuple(_axis(a, x.dim()) for a in chosen)
        keep = bool(keepdims)
        if not dims:  # a scalar
            return _REDUCERS[kind](x.unsqueeze(0), (0,), False)
        return _REDUCERS[kind](x, dims, keep)

    run.__name__ = f"reduce_{kind}"
    return run


def _prod(x: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keep)
    return x


_REDUCERS: dict[str, Callable[[Tensor, tuple[int, ...], bool], Tensor]] = {
    "mean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
    "sum": lambda x, d, k: torch.sum(x, dim=d, keepdim=k).to(x.dtype),
    "max": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
    "min": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
    "prod": _prod,
    "l1": lambda x, d, k: torch.sum(x.abs(), dim=d, keepdim=k).to(x.dtype),
    "l2": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
    "sum_square": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k).to(x.dtype),
    "log_sum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
    "log_sum_exp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
}


def _softmax_family(fn: Callable[[Tensor, int], Tensor]) -> Callable[..., Tensor]:
    def run(x: Tensor, *, opset: int, axis: int | None = None) -> Tensor:
        if opset >= 13:
            return fn(x, -1 if axis is None else axis)
        a = _axis(1 if axis is None else axis, x.dim())  # older opsets: 2-D view from axis
        flat = x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))
        return fn(flat, 1).reshape(x.shape)

    return run


def _hardmax(x: Tensor, axis: int) -> Tensor:
    index = torch.argmax(x, dim=axis, keepdim=True)
    return torch.zeros_like(x).scatter(axis, index, 1.0)


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    return torch.matmul(a, b)


def _gemm(
    a: Tensor, b: Tensor, c: Tensor | None = None, *, alpha: float = 1.0, beta: float = 1.0,
    transA: int = 0, transB: int = 0,
) -> Tensor:  # fmt: skip
    y = torch.matmul(a.t() if transA else a, b.t() if transB else b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


def _einsum(*xs: Tensor, equation: str) -> Tensor:
    return torch.einsum(equation, *xs)


def _logical(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    def run(a: Tensor, b: Tensor) -> Tensor:
        return fn(a.bool(), b.bool())

    return run


# unary math: y = f(x)
_UNARY: dict[str, Callable[..., Tensor]] = {
    "Abs": torch.abs, "Neg": torch.neg, "Exp": torch.exp, "Log": torch.log,
    "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal, "Relu": torch.relu,
    "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf, "Sin": torch.sin,
    "Cos": torch.cos, "Tan": torch.tan, "Asin": torch.asin, "Acos": torch.acos,
    "Atan": torch.atan, "Sinh": torch.sinh, "Cosh": torch.cosh, "Floor": torch.floor,
    "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign, "Not": torch.logical_not,
    "IsNaN": torch.isnan, "Softsign": _softsign, "Softplus": torch.nn.functional.softplus,
    "Mish": torch.nn.functional.mish, "HardSwish": _hard_swish,
    "BitwiseNot": torch.bitwise_not,
}  # fmt: skip

OPS: dict[str, Callable[..., Any]] = {
    **{name: _unary(fn) for name, fn in _UNARY.items()},
    "Identity": _identity, "IsInf": _is_inf, "LeakyRelu": _leaky_relu, "Elu": _elu,
    "Selu": _selu, "Celu": _celu, "HardSigmoid": _hard_sigmoid,
    "ThresholdedRelu": _thresholded_relu, "PRelu": _prelu, "Gelu": _gelu, "Clip": _clip,
    "Cast": _cast, "CastLike": _cast_like, "Dropout": _dropout,
    # binary, broadcasting as numpy does
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div, "Pow": _pow,
    "Mod": _mod, "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt,
    "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge, "And": _logical(torch.logical_and),
    "Or": _logical(torch.logical_or), "Xor": _logical(torch.logical_xor),
    "BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or,
    "BitwiseXor": torch.bitwise_xor,
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add), "Mean": _mean, "Where": _where,
    # shapes and layout
    "Shape": _shape, "Size": _size, "Reshape": _reshape, "Expand": _expand, "Tile": _tile,
    "Transpose": _transpose, "Flatten": _flatten, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Concat": _concat, "Split": _split, "Slice": _slice, "Pad": _pad,
    "ConstantOfShape": constant_of_shape, "Range": _range, "Trilu": _trilu, "EyeLike": _eye_like,
    # indexing
    "Gather": _gather, "GatherElements": _gather_elements, "GatherND": _gather_nd,
    "ScatterND": _scatter_nd, "CumSum": _cumsum, "ArgMax": _arg(torch.argmax),
    "ArgMin": _arg(torch.argmin), "TopK": _topk,
    # reductions
    "ReduceMean": _reduce("mean"), "ReduceSum": _reduce("sum"), "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"), "ReduceProd": _reduce("prod"), "ReduceL1": _reduce("l1"),
    "ReduceL2": _reduce("l2"), "ReduceSumSquare": _reduce("sum_square"),
    "ReduceLogSum": _reduce("log_sum"), "ReduceLogSumExp": _reduce("log_sum_exp"),
    "Softmax": _softmax_family(lambda x, a: torch.softmax(x, dim=a)),
    "LogSoftmax": _softmax_family(lambda x, a: torch.log_softmax(x, dim=a)),
    "Hardmax": _softmax_family(_hardmax),
    # products
    "MatMul": _matmul, "Gemm": _gemm, "Einsum": _einsum,
}  # fmt: skip
