"""Translations of ATen's neural-network ops, each to the IR op that states it whole:
`scaled_dot_product_attention` -> `Attention` (opset 23), `layer_norm` -> LayerNormalization,
`rms_norm` -> RMSNormalization, `gelu` -> Gelu (opset 20), `linear`/`addmm` -> Gemm or MatMul(+Add),
convolutions, inference batch norm, max/average pooling (adaptive to 1 -> GlobalAveragePool),
`embedding` -> Gather, softmax, and the activations ONNX has (SiLU is x * Sigmoid(x)).

These ops are kept whole by the frontend's decomposition table (`torch.py`), so no fusion pass has
to find them again. Attention: Q, K, V are [B, H, S, D] (3-D [B, S, D] gets a heads axis of 1);
torch's bool mask (True = attend) and additive float mask are Attention's own mask semantics;
`is_causal` is the same top-left causal mask; `enable_gqa` is implied by fewer K/V heads. ONNX
Runtime wants a mask whose last two dims are exactly [S, L], so a mask that only broadcasts there
is expanded first.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt.frontends.torch_context import Args, Lowering, Result, translates
from graphopt.ir.core import Value
from graphopt.ir.types import DType

# ----- attention ---------------------------------------------------------------------------------


@translates("aten.scaled_dot_product_attention.default")
def _attention(lw: Lowering, node: Any, a: Args) -> Result:
    if a["dropout_p"]:
        raise lw.fail(
            f"attention dropout {a['dropout_p']} (training)",
            hint="call module.eval() before exporting",
        )
    ranks = {lw.rank(a[name]) for name in ("query", "key", "value")}
    if len(ranks) != 1 or ranks.pop() not in (3, 4):
        raise lw.fail(
            "query, key and value must all be 3-D [B, S, D] or 4-D [B, H, S, D]",
            hint="reshape extra batch dims into B before calling scaled_dot_product_attention",
        )
    rank = lw.rank(a["query"])
    heads_axis = lw.const(np.asarray([1], np.int64))
    q, k, v = (lw.tensor(a[name]) for name in ("query", "key", "value"))
    if rank == 3:
        q, k, v = (lw.op("Unsqueeze", t, heads_axis) for t in (q, k, v))
    inputs: list[Value | None] = [q, k, v]
    if a["attn_mask"] is not None:
        inputs.append(_mask(lw, a, q, k))
    attrs: dict[str, Any] = {}
    if a["is_causal"]:
        attrs["is_causal"] = 1
    if a["scale"] is not None:
        attrs["scale"] = float(a["scale"])
    y = lw.op("Attention", *inputs, **attrs)
    return lw.op("Squeeze", y, heads_axis) if rank == 3 else y


def _mask(lw: Lowering, a: Args, q: Value, k: Value) -> Value:
    """The mask as Attention takes it: bool, or float of Q's type, last two dims [S, L]."""
    mask_arg = a["attn_mask"]
    dtype = lw.dtype_of(mask_arg)
    mask = lw.tensor(mask_arg, None if dtype == DType.BOOL else lw.dtype_of(a["query"]))
    dims = lw.dims(mask_arg)
    if len(dims) > 4:
        raise lw.fail("an attention mask of rank > 4", hint="reshape it to [B, H, S, L]")
    if lw.rank(a["query"]) == 3 and len(dims) == 3:  # [B, S, L] for 3-D inputs: heads axis 1
        mask = lw.op("Unsqueeze", mask, lw.const(np.asarray([1], np.int64)))
        dims = (dims[0], 1, dims[1], dims[2])
    wanted = (lw.dims(a["query"])[-2], lw.dims(a["key"])[-2])
    if len(dims) == 4 and tuple(dims[-2:]) == wanted:
        return mask
    sequence, total = lw.shape(q, start=2, end=3), lw.shape(k, start=2, end=3)
    ones = lw.const(np.ones(2, np.int64))
    return lw.op("Expand", mask, lw.op("Concat", ones, sequence, total, axis=0))


# ----- normalization -----------------------------------------------------------------------------


def _scale_or_ones(lw: Lowering, weight: Any, shape: list[int], dtype: DType) -> Value:
    return lw.tensor(weight) if weight is not None else lw.const(np.ones(shape, dtype.numpy), dtype)


@translates("aten.layer_norm.default", "aten.native_layer_norm.default")
def _layer_norm(lw: Lowering, node: Any, a: Args) -> Result:
    shape = lw.static_ints(a["normalized_shape"], "normalized_shape")
    dtype = lw.dtype_of(a["input"])
    y = lw.op(
        "LayerNormalization", lw.tensor(a["input"]), _scale_or_ones(lw, a["weight"], shape, dtype),
        lw.optional(a["bias"]), axis=-len(shape), epsilon=float(a["eps"]),
    )  # fmt: skip
    return [y, None, None] if "native" in str(node.target) else y


@translates("aten.rms_norm.default")
def _rms_norm(lw: Lowering, node: Any, a: Args) -> Result:
    shape = lw.static_ints(a["normalized_shape"], "normalized_shape")
    dtype = lw.dtype_of(a["input"])
    eps = a["eps"] if a["eps"] is not None else float(np.finfo(dtype.numpy).eps)
    return lw.op(
        "RMSNormalization", lw.tensor(a["input"]), _scale_or_ones(lw, a["weight"], shape, dtype),
        axis=-len(shape), epsilon=float(eps),
    )  # fmt: skip


@translates("aten._native_batch_norm_legit_no_training.default", "aten.batch_norm.default")
def _batch_norm(lw: Lowering, node: Any, a: Args) -> Result:
    if a.get("training"):
        raise lw.fail("batch norm in training mode", hint="call module.eval() before exporting")
    if a["running_mean"] is None or a["running_var"] is None:
        raise lw.fail(
            "batch norm without running statistics",
            hint="construct the BatchNorm with track_running_stats=True",
        )
    dtype = lw.dtype_of(a["input"])
    channels = lw.static_ints([lw.meta(a["input"]).shape[1]], "the channel count")
    scale = _scale_or_ones(lw, a["weight"], channels, dtype)
    bias = (
        lw.tensor(a["bias"])
        if a["bias"] is not None
        else lw.const(np.zeros(channels, dtype.numpy), dtype)
    )
    y = lw.op(
        "BatchNormalization", lw.tensor(a["input"]), scale, bias, lw.tensor(a["running_mean"]),
        lw.tensor(a["running_var"]), epsilon=float(a["eps"]),
    )  # fmt: skip
    return y if "batch_norm.default" in str(node.target) else [y, None, None]


@translates("aten._softmax.default", "aten.softmax.int")
def _softmax(lw: Lowering, node: Any, a: Args) -> Result:
    x = lw.tensor(a["self"], lw.out_dtype(node))
    return lw.op("Softmax", x, axis=a["dim"])


@translates("aten._log_softmax.default", "aten.log_softmax.int")
def _log_softmax(lw: Lowering, node: Any, a: Args) -> Result:
    x = lw.tensor(a["self"], lw.out_dtype(node))
    return lw.op("LogSoftmax", x, axis=a["dim"])


# ----- activations -------------------------------------------------------------------------------


@translates("aten.gelu.default")
def _gelu(lw: Lowering, node: Any, a: Args) -> Result:
    return lw.op("Gelu", lw.tensor(a["self"]), approximate=str(a["approximate"]))


@translates("aten.silu.default")
def _silu(lw: Lowering, node: Any, a: Args) -> Result:  # x * sigmoid(x)
    x = lw.tensor(a["self"])
    return lw.op("Mul", x, lw.op("Sigmoid", x))


@translates("aten.mish.default")
def _mish(lw: Lowering, node: Any, a: Args) -> Result:  # x * tanh(softplus(x))
    x = lw.tensor(a["self"])
    return lw.op("Mul", x, lw.op("Tanh", lw.op("Softplus", x)))


@translates("aten.softplus.default")
def _softplus(lw: Lowering, node: Any, a: Args) -> Result:  # log(1 + exp(beta x)) / beta
    dtype = lw.out_dtype(node)
    x = lw.tensor(a["self"])
    beta = float(a["beta"])
    if beta == 1.0:
        return lw.op("Softplus", x)
    scaled = lw.op("Softplus", lw.op("Mul", x, lw.const(beta, dtype)))
    return lw.op("Div", scaled, lw.const(beta, dtype))


@translates("aten.hardtanh.default")
def _hardtanh(lw: Lowering, node: Any, a: Args) -> Result:
    dtype = lw.out_dtype(node)
    low, high = lw.const(a["min_val"], dtype), lw.const(a["max_val"], dtype)
    return lw.op("Clip", lw.tensor(a["self"]), low, high)


@translates("aten.leaky_relu.default")
def _leaky_relu(lw: Lowering, node: Any, a: Args) -> Result:
    return lw.op("LeakyRelu", lw.tensor(a["self"]), alpha=float(a["negative_slope"]))


@translates("aten.elu.default")
def _elu(lw: Lowering, node: Any, a: Args) -> Result:
    if float(a["scale"]) != 1.0 or float(a["input_scale"]) != 1.0:
        raise lw.fail("elu with scale or input_scale other than 1 (selu/celu)")
    return lw.op("Elu", lw.tensor(a["self"]), alpha=float(a["alpha"]))


@translates("aten.hardsigmoid.default")
def _hardsigmoid(lw: Lowering, node: Any, a: Args) -> Result:  # clip(x / 6 + 1 / 2, 0, 1)
    return lw.op("HardSigmoid", lw.tensor(a["self"]), alpha=1.0 / 6.0, beta=0.5)


@translates("aten.hardswish.default")
def _hardswish(lw: Lowering, node: Any, a: Args) -> Result:
    return lw.op("HardSwish", lw.tensor(a["self"]))


# ----- linear layers -----------------------------------------------------------------------------


@translates("aten.linear.default")
def _linear(lw: Lowering, node: Any, a: Args) -> Result:  # x W^T + b
    x, weight, bias = lw.tensor(a["input"]), lw.tensor(a["weight"]), lw.optional(a["bias"])
    if lw.rank(a["input"]) == 2 and lw.rank(a["weight"]) == 2:
        return lw.op("Gemm", x, weight, bias, transB=1)
    y = lw.op("MatMul", x, lw.op("Transpose", weight, perm=[1, 0]))
    return y if bias is None else lw.op("Add", y, bias)


@translates("aten.addmm.default")
def _addmm(lw: Lowering, node: Any, a: Args) -> Result:  # beta * bias + alpha * (m1 @ m2)
    return lw.op(
        "Gemm", lw.tensor(a["mat1"]), lw.tensor(a["mat2"]), lw.tensor(a["self"]),
        alpha=float(a["alpha"]), beta=float(a["beta"]),
    )  # fmt: skip


@translates("aten.mm.default", "aten.bmm.default", "aten.matmul.default")
def _matmul(lw: Lowering, node: Any, a: Args) -> Result:
    second = a.get("mat2", a.get("other"))
    return lw.op("MatMul", lw.tensor(a["self"]), lw.tensor(second))


@translates("aten.baddbmm.default")
def _baddbmm(lw: Lowering, node: Any, a: Args) -> Result:  # beta * self + alpha * (b1 @ b2)
    dtype = lw.out_dtype(node)
    product = lw.op("MatMul", lw.tensor(a["batch1"]), lw.tensor(a["batch2"]))
    if float(a["alpha"]) != 1.0:
        product = lw.op("Mul", product, lw.const(float(a["alpha"]), dtype))
    base = lw.tensor(a["self"], dtype)
    if float(a["beta"]) != 1.0:
        base = lw.op("Mul", base, lw.const(float(a["beta"]), dtype))
    return lw.op("Add", base, product)


@translates("aten.embedding.default")
def _embedding(lw: Lowering, node: Any, a: Args) -> Result:
    return lw.op("Gather", lw.tensor(a["weight"]), lw.tensor(a["indices"], DType.INT64), axis=0)


# ----- convolution and pooling -------------------------------------------------------------------


def _per_axis(lw: Lowering, values: Any, count: int, what: str) -> list[int]:
    """A kernel-style argument for `count` spatial axes (torch allows one value for all)."""
    items = lw.static_ints(values, what)
    return items * count if len(items) == 1 else items


@translates(
    "aten.convolution.default", "aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default",
    "aten.conv1d.padding", "aten.conv2d.padding", "aten.conv3d.padding",
    "aten.conv_transpose1d.default", "aten.conv_transpose2d.input", "aten.conv_transpose3d.input",
)  # fmt: skip
def _convolution(lw: Lowering, node: Any, a: Args) -> Result:
    spatial = lw.rank(a["weight"]) - 2
    kernel = lw.static_ints(lw.meta(a["weight"]).shape[2:], "kernel size")
    dilations = _per_axis(lw, a["dilation"], spatial, "dilation")
    strides = _per_axis(lw, a["stride"], spatial, "stride")
    transposed = bool(a.get("transposed")) or "conv_transpose" in str(node.target)
    padding = a["padding"]
    if padding == "valid":
        pads = [0] * (2 * spatial)
    elif padding == "same":  # torch puts the odd pixel at the end
        totals = [d * (k - 1) for d, k in zip(dilations, kernel, strict=True)]
        pads = [t // 2 for t in totals] + [t - t // 2 for t in totals]
    else:
        begins = _per_axis(lw, padding, spatial, "padding")
        pads = begins + begins
    attrs: dict[str, Any] = {
        "strides": strides, "pads": pads, "dilations": dilations, "group": int(a["groups"]),
        "kernel_shape": kernel,
    }  # fmt: skip
    if transposed:
        output_padding = a.get("output_padding") or [0]
        attrs["output_padding"] = _per_axis(lw, output_padding, spatial, "output_padding")
    op = "ConvTranspose" if transposed else "Conv"
    return lw.op(op, lw.tensor(a["input"]), lw.tensor(a["weight"]), lw.optional(a["bias"]), **attrs)


def _pool_attrs(lw: Lowering, a: Args, spatial: int) -> dict[str, Any]:
    kernel = _per_axis(lw, a["kernel_size"], spatial, "kernel_size")
    stride = a.get("stride") or kernel
    padding = _per_axis(lw, a.get("padding", 0), spatial, "padding")
    return {
        "kernel_shape": kernel, "strides": _per_axis(lw, stride, spatial, "stride"),
        "pads": padding + padding, "ceil_mode": int(bool(a.get("ceil_mode"))),
    }  # fmt: skip


@translates(
    "aten.max_pool1d.default", "aten.max_pool2d.default", "aten.max_pool3d.default",
    "aten.max_pool2d_with_indices.default", "aten.max_pool3d_with_indices.default",
)  # fmt: skip
def _max_pool(lw: Lowering, node: Any, a: Args) -> Result:
    spatial = lw.rank(a["self"]) - 2
    attrs = _pool_attrs(lw, a, spatial)
    attrs["dilations"] = _per_axis(lw, a.get("dilation", 1), spatial, "dilation")
    y = lw.op("MaxPool", lw.tensor(a["self"]), **attrs)
    return [y, None] if "with_indices" in str(node.target) else y


@translates("aten.avg_pool1d.default", "aten.avg_pool2d.default", "aten.avg_pool3d.default")
def _avg_pool(lw: Lowering, node: Any, a: Args) -> Result:
    if a.get("divisor_override") is not None:
        raise lw.fail(
            "average pooling with divisor_override", hint="divide by hand after sum pooling"
        )
    attrs = _pool_attrs(lw, a, lw.rank(a["self"]) - 2)
    attrs["count_include_pad"] = int(bool(a["count_include_pad"]))
    return lw.op("AveragePool", lw.tensor(a["self"]), **attrs)


@translates(
    "aten.adaptive_avg_pool1d.default", "aten.adaptive_avg_pool2d.default",
    "aten._adaptive_avg_pool2d.default", "aten.adaptive_avg_pool3d.default",
    "aten._adaptive_avg_pool3d.default",
)  # fmt: skip
def _adaptive_avg_pool(lw: Lowering, node: Any, a: Args) -> Result:
    """To 1 everywhere: GlobalAveragePool; to a size dividing the input's: AveragePool with
    kernel = stride = input / output."""
    x = lw.tensor(a["self"])
    out = lw.static_ints(a["output_size"], "output_size")
    if all(size == 1 for size in out):
        return lw.op("GlobalAveragePool", x)
    spatial = list(lw.meta(a["self"]).shape[-len(out) :])
    if not all(isinstance(s, int) and s % o == 0 for s, o in zip(spatial, out, strict=True)):
        raise lw.fail(
            f"adaptive average pooling of {spatial} to {out} (not a divisor of a static size)",
            hint="pool to 1, or to a size that divides the static input size",
        )
    kernel = [s // o for s, o in zip(spatial, out, strict=True)]
    return lw.op("AveragePool", x, kernel_shape=kernel, strides=kernel)


@translates("aten.upsample_nearest2d.vec", "aten.upsample_bilinear2d.vec")
def _upsample(lw: Lowering, node: Any, a: Args) -> Result:
    x = lw.tensor(a["input"])
    nearest = "nearest" in str(node.target)
    attrs: dict[str, Any] = {"mode": "nearest" if nearest else "linear"}
    if nearest:
        attrs.update(coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    else:
        align = bool(a.get("align_corners"))
        attrs["coordinate_transformation_mode"] = "align_corners" if align else "pytorch_half_pixel"
    if a.get("output_size") is not None:
        sizes = lw.op("Concat", lw.shape(x, end=2), lw.ints(a["output_size"]), axis=0)
        return lw.op("Resize", x, None, None, sizes, **attrs)
    factors = [1.0, 1.0] + [float(f) for f in a["scale_factors"]]
    return lw.op("Resize", x, None, lw.const(np.asarray(factors, np.float32)), **attrs)
