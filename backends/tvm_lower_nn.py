"""Relax lowerings of the neural-network op families: MatMul/Gemm, convolution and pooling,
normalizations, softmax, reductions, attention, rotary embedding and (de)quantization.

Each family is one small function registered with `tvm_lower.lowering`; the ONNX spec (and
`onnx.reference`, which the tests compare against) defines what each computes. Where TVM has a
fused op with the same semantics (`nn.layer_norm`, `nn.softmax`, `nn.conv2d`) it is used; the
rest is written with element-wise ops and reductions, which TVM's `FuseOps` turns into a few
kernels. Fused ops the graphopt passes emit (opset 20/23 `Gelu`, `RMSNormalization`,
`RotaryEmbedding`, `Attention`) are lowered from their spec definitions, so a fused graph and the
unfused one compute the same thing.
"""

from __future__ import annotations

import math
from typing import Any

from tvm import relax, topi

from graphopt.backends.tvm_lower import (
    Lowerer,
    _broadcast_dims,
    _prim,
    axes_input,
    axis_of,
    broadcast_operands,
    broadcast_to,
    fits,
    lowering,
    relax_dtype,
)
from graphopt.ir.core import Node
from graphopt.ir.types import DType

NEG_INF = float("-inf")


# ----- MatMul and Gemm ---------------------------------------------------------------------------
@lowering("MatMul", "Gemm")
def lower_matmul(lw: Lowerer, node: Node) -> list[Any]:
    a, b = lw.x(node.inputs[0]), lw.x(node.inputs[1])
    if node.op_type == "MatMul":
        da, db = lw.shape_of(a), lw.shape_of(b)
        if len(da) > 2 and len(db) > 2:  # batch dims broadcast as element-wise operands do
            batch = _broadcast_dims(da[:-2], db[:-2])
            a = a if fits(da[:-2], batch) else broadcast_to(lw, a, batch + da[-2:])
            b = b if fits(db[:-2], batch) else broadcast_to(lw, b, batch + db[-2:])
        return [relax.op.matmul(a, b)]
    if node.get_attr("transA", 0):
        a = relax.op.permute_dims(a, [1, 0])
    if node.get_attr("transB", 0):
        b = relax.op.permute_dims(b, [1, 0])
    dt = lw.dtype_of(lw.emit(a))
    y = lw.emit(relax.op.matmul(a, b))
    alpha, beta = float(node.get_attr("alpha", 1.0)), float(node.get_attr("beta", 1.0))
    if alpha != 1.0:
        y = lw.emit(relax.op.multiply(y, lw.const(alpha, dt)))
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is not None and beta != 0.0:
        bias = lw.x(c)
        if beta != 1.0:
            bias = lw.emit(relax.op.multiply(bias, lw.const(beta, dt)))
        y = relax.op.add(*broadcast_operands(lw, [y, bias]))
    return [y]


# ----- convolution and pooling -------------------------------------------------------------------
def _window(lw: Lowerer, node: Node, spatial: list[Any], kernel: list[int]) -> dict[str, Any]:
    """Strides, dilations and explicit pads (TVM order: all begins, then all ends)."""
    n = len(kernel)
    strides = list(node.get_attr("strides") or [1] * n)
    dilations = list(node.get_attr("dilations") or [1] * n)
    pads = list(node.get_attr("pads") or [0] * (2 * n))
    auto_pad = node.get_attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if not all(isinstance(d, int) for d in spatial):
            lw.fail("auto_pad SAME needs static spatial dims")
        for i in range(n):
            out = -(-spatial[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - spatial[i])
            small, big = total // 2, total - total // 2
            pads[i], pads[i + n] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
    elif auto_pad == "VALID":
        pads = [0] * (2 * n)
    return {"strides": strides, "dilation": dilations, "padding": pads}


_LAYOUTS = {1: ("NCW", "OIW"), 2: ("NCHW", "OIHW"), 3: ("NCDHW", "OIDHW")}


@lowering("Conv", "ConvTranspose")
def lower_conv(lw: Lowerer, node: Node) -> list[Any]:
    x, w = lw.x(node.inputs[0]), lw.x(node.inputs[1])
    dims, wdims = lw.shape_of(x), lw.shape_of(w)
    n = len(dims) - 2
    if n not in _LAYOUTS or not all(isinstance(d, int) for d in wdims):
        lw.fail(f"{n}-D convolution or a non-constant kernel shape is not supported")
    kernel = list(node.get_attr("kernel_shape") or wdims[2:])
    win = _window(lw, node, dims[2:], kernel)
    groups = int(node.get_attr("group", 1))
    data_layout, kernel_layout = _LAYOUTS[n]
    if node.op_type == "Conv":
        fn = {1: relax.op.nn.conv1d, 2: relax.op.nn.conv2d, 3: relax.op.nn.conv3d}[n]
        y = lw.emit(fn(x, w, groups=groups, data_layout=data_layout, kernel_layout=kernel_layout, **win))  # fmt: skip  # noqa: E501
    else:
        if node.get_attr("output_shape") is not None or n == 3:
            lw.fail("ConvTranspose with output_shape, or 3-D, is not supported")
        fn = {1: relax.op.nn.conv1d_transpose, 2: relax.op.nn.conv2d_transpose}[n]
        out_pad = list(node.get_attr("output_padding") or [0] * n)
        y = lw.emit(fn(x, w, output_padding=out_pad, groups=groups, data_layout=data_layout, kernel_layout="I" + kernel_layout[0] + kernel_layout[2:], **win))  # fmt: skip  # noqa: E501
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = relax.op.reshape(lw.x(node.inputs[2]), [1, -1] + [1] * n)
        y = relax.op.add(y, bias)
    return [y]


@lowering("MaxPool", "AveragePool", "LpPool")
def lower_pool(lw: Lowerer, node: Node) -> list[Any]:
    if len(node.outputs) > 1 and node.outputs[1].is_used:
        lw.fail("the Indices output of MaxPool is not supported")
    if node.op_type == "LpPool":
        lw.fail("LpPool is not supported")
    x = lw.x(node.inputs[0])
    dims = lw.shape_of(x)
    n = len(dims) - 2
    if n not in _LAYOUTS:
        lw.fail(f"{n}-D pooling is not supported")
    kernel = list(node.get_attr("kernel_shape"))
    win = _window(lw, node, dims[2:], kernel)
    layout = _LAYOUTS[n][0]
    ceil = bool(node.get_attr("ceil_mode", 0))
    if node.op_type == "MaxPool":
        fn = {1: relax.op.nn.max_pool1d, 2: relax.op.nn.max_pool2d, 3: relax.op.nn.max_pool3d}[n]
        return [fn(x, kernel, ceil_mode=ceil, layout=layout, **win)]
    fn = {1: relax.op.nn.avg_pool1d, 2: relax.op.nn.avg_pool2d, 3: relax.op.nn.avg_pool3d}[n]
    include = bool(node.get_attr("count_include_pad", 0))
    return [fn(x, kernel, ceil_mode=ceil, count_include_pad=include, layout=layout, **win)]


@lowering("GlobalAveragePool", "GlobalMaxPool")
def lower_global_pool(lw: Lowerer, node: Node) -> list[Any]:
    x = lw.x(node.inputs[0])
    axes = list(range(2, lw.rank(x)))
    fn = relax.op.mean if node.op_type == "GlobalAveragePool" else relax.op.max
    return [fn(x, axes, keepdims=True)]


# ----- normalizations ----------------------------------------------------------------------------
def _channel(lw: Lowerer, value: Any, rank: int, axis: int = 1) -> Any:
    """A per-channel vector reshaped to broadcast along `axis` of a rank-`rank` tensor."""
    shape = [1] * rank
    shape[axis] = -1
    return relax.op.reshape(lw.x(value), shape)


@lowering("BatchNormalization")
def lower_batchnorm(lw: Lowerer, node: Node) -> list[Any]:
    if node.get_attr("training_mode", 0):
        lw.fail("training_mode BatchNormalization is not supported")
    x = lw.x(node.inputs[0])
    rank, dt = lw.rank(x), lw.dtype_of(x)
    scale, bias, mean, var = (_channel(lw, v, rank) for v in node.inputs[1:5])
    eps = float(node.get_attr("epsilon", 1e-5))
    inv = relax.op.rsqrt(relax.op.add(var, lw.const(eps, dt)))
    y = relax.op.multiply(relax.op.subtract(x, mean), relax.op.multiply(inv, scale))
    return [relax.op.add(y, bias)]


def _normalize(lw: Lowerer, x: Any, axes: list[int], eps: float) -> tuple[Any, Any, Any]:
    """(x - mean) * rsqrt(var + eps), with the mean and the inverse standard deviation."""
    dt = lw.dtype_of(x)
    mean = lw.emit(relax.op.mean(x, axes, keepdims=True))
    centered = lw.emit(relax.op.subtract(x, mean))
    var = relax.op.mean(relax.op.multiply(centered, centered), axes, keepdims=True)
    inv = lw.emit(relax.op.rsqrt(relax.op.add(var, lw.const(eps, dt))))
    return lw.emit(relax.op.multiply(centered, inv)), mean, inv


@lowering("LayerNormalization")
def lower_layernorm(lw: Lowerer, node: Node) -> list[Any]:
    x = lw.x(node.inputs[0])
    dims = lw.shape_of(x)
    axis = axis_of(node, len(dims), default=-1)
    axes = list(range(axis, len(dims)))
    eps = float(node.get_attr("epsilon", 1e-5))
    scale = lw.x(node.inputs[1])
    bias = lw.x(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    extra = any(v.is_used for v in node.outputs[1:])
    fits = [str(d) for d in lw.shape_of(scale)] == [str(d) for d in dims[axis:]]
    if not extra and fits and (bias is None or lw.shape_of(bias) == lw.shape_of(scale)):
        if bias is None:
            bias = relax.op.zeros_like(scale)
        return [relax.op.nn.layer_norm(x, scale, bias, axes, eps)]
    y, mean, inv = _normalize(lw, x, axes, eps)  # scale and bias broadcast to the normalized dims
    y = lw.emit(relax.op.multiply(*broadcast_operands(lw, [y, scale])))
    if bias is not None:
        y = relax.op.add(*broadcast_operands(lw, [y, bias]))
    return [y, mean, inv]


@lowering("RMSNormalization")
def lower_rmsnorm(lw: Lowerer, node: Node) -> list[Any]:
    x = lw.x(node.inputs[0])
    rank, dt = lw.rank(x), lw.dtype_of(x)
    axes = list(range(axis_of(node, rank, default=-1), rank))
    eps = float(node.get_attr("epsilon", 1e-5))
    mean_square = relax.op.mean(relax.op.multiply(x, x), axes, keepdims=True)
    inv = lw.emit(relax.op.rsqrt(relax.op.add(mean_square, lw.const(eps, dt))))
    y = lw.emit(relax.op.multiply(x, inv))
    return [relax.op.multiply(*broadcast_operands(lw, [y, lw.x(node.inputs[1])]))]


@lowering("InstanceNormalization", "GroupNormalization")
def lower_instance_group_norm(lw: Lowerer, node: Node) -> list[Any]:
    x = lw.x(node.inputs[0])
    dims = lw.shape_of(x)
    rank = len(dims)
    eps = float(node.get_attr("epsilon", 1e-5))
    if node.op_type == "InstanceNormalization":
        y, _, _ = _normalize(lw, x, list(range(2, rank)), eps)
    else:
        groups = int(node.get_attr("num_groups"))
        channels = dims[1]
        if not isinstance(channels, int):
            lw.fail("GroupNormalization needs a static channel count")
        grouped = relax.op.reshape(x, [dims[0], groups, -1])
        y, _, _ = _normalize(lw, lw.emit(grouped), [2], eps)
        y = lw.emit(relax.op.reshape(y, relax.ShapeExpr([_dim(d) for d in dims])))
    scale, bias = lw.x(node.inputs[1]), lw.x(node.inputs[2])
    if node.op_type == "GroupNormalization" and lw.opset < 21:  # opset 18: one value per group
        repeat = dims[1] // int(node.get_attr("num_groups"))
        scale, bias = relax.op.repeat(scale, repeat, 0), relax.op.repeat(bias, repeat, 0)
    shape = [1, -1] + [1] * (rank - 2)
    y = relax.op.multiply(y, relax.op.reshape(scale, shape))
    return [relax.op.add(lw.emit(y), relax.op.reshape(bias, shape))]


def _dim(d: Any) -> Any:
    return _prim(d)


# ----- softmax and reductions --------------------------------------------------------------------
@lowering("Softmax", "LogSoftmax", "Hardmax")
def lower_softmax(lw: Lowerer, node: Node) -> list[Any]:
    x = lw.x(node.inputs[0])
    dims = lw.shape_of(x)
    if node.op_type == "Hardmax":
        lw.fail("Hardmax is not supported")
    fn = relax.op.nn.softmax if node.op_type == "Softmax" else relax.op.nn.log_softmax
    if lw.opset >= 13:
        return [fn(x, axis_of(node, len(dims), default=-1))]
    axis = axis_of(node, len(dims), default=1)  # old opsets: softmax over the flattened tail
    flat = relax.op.reshape(x, [math.prod(dims[:axis], start=1), math.prod(dims[axis:], start=1)])
    y = lw.emit(fn(lw.emit(flat), -1))
    return [relax.op.reshape(y, relax.ShapeExpr([_dim(d) for d in dims]))]


_REDUCE = {
    "ReduceMean": relax.op.mean, "ReduceSum": relax.op.sum, "ReduceMax": relax.op.max,
    "ReduceMin": relax.op.min, "ReduceProd": relax.op.prod,
}  # fmt: skip


@lowering(*_REDUCE, "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp")
def lower_reduce(lw: Lowerer, node: Node) -> list[Any]:
    x = lw.x(node.inputs[0])
    rank = lw.rank(x)
    axes = axes_input(lw, node, 1, rank)
    if not axes:
        if node.get_attr("noop_with_empty_axes", 0):
            return [x]
        axes = list(range(rank))
    keep = bool(node.get_attr("keepdims", 1))
    op = node.op_type
    if op in _REDUCE:
        return [_REDUCE[op](x, axes, keepdims=keep)]
    if op == "ReduceL1":
        return [relax.op.sum(relax.op.abs(x), axes, keepdims=keep)]
    if op in ("ReduceL2", "ReduceSumSquare"):
        total = relax.op.sum(relax.op.multiply(x, x), axes, keepdims=keep)
        return [relax.op.sqrt(total) if op == "ReduceL2" else total]
    if op == "ReduceLogSum":
        return [relax.op.log(relax.op.sum(x, axes, keepdims=keep))]
    top = lw.emit(relax.op.max(x, axes, keepdims=True))
    total = relax.op.sum(relax.op.exp(relax.op.subtract(x, top)), axes, keepdims=True)
    y = relax.op.add(relax.op.log(total), top)
    return [y if keep else relax.op.squeeze(lw.emit(y), axes)]


@lowering("ArgMax", "ArgMin")
def lower_argmax(lw: Lowerer, node: Node) -> list[Any]:
    x = lw.x(node.inputs[0])
    dims = lw.shape_of(x)
    axis = axis_of(node, len(dims))
    keep = bool(node.get_attr("keepdims", 1))
    fn = relax.op.argmax if node.op_type == "ArgMax" else relax.op.argmin
    if node.get_attr("select_last_index", 0):
        index = lw.emit(fn(relax.op.flip(x, axis), axis, keep))
        last = relax.op.shape_to_tensor(relax.ShapeExpr([_dim(dims[axis] - 1)]))
        y = relax.op.subtract(relax.op.reshape(last, ()), relax.op.astype(index, "int64"))
        return [y]
    return [relax.op.astype(fn(x, axis, keep), "int64")]


@lowering("CumSum")
def lower_cumsum(lw: Lowerer, node: Node) -> list[Any]:
    x = lw.x(node.inputs[0])
    axis = int(lw.scalar(node.inputs[1]))
    axis = axis + lw.rank(x) if axis < 0 else axis
    reverse, exclusive = node.get_attr("reverse", 0), bool(node.get_attr("exclusive", 0))
    if reverse:
        x = lw.emit(relax.op.flip(x, axis))
    y = relax.op.cumsum(x, axis, exclusive=exclusive)
    return [relax.op.flip(lw.emit(y), axis) if reverse else y]


@lowering("TopK")
def lower_topk(lw: Lowerer, node: Node) -> list[Any]:
    x = lw.x(node.inputs[0])
    k = lw.scalar(node.inputs[1])
    axis = axis_of(node, lw.rank(x), default=-1)
    largest = bool(node.get_attr("largest", 1))
    both = lw.emit(relax.op.topk(x, int(k), axis, "both", largest, "int64"))
    return [relax.TupleGetItem(both, 0), relax.TupleGetItem(both, 1)]


@lowering("Einsum")
def lower_einsum(lw: Lowerer, node: Node) -> list[Any]:
    return [relax.op.einsum([lw.x(v) for v in node.inputs], node.get_attr("equation"))]


# ----- attention and rotary embedding ------------------------------------------------------------
def _heads(lw: Lowerer, x: Any, heads: int) -> Any:
    """(B, S, H*D) -> (B, H, S, D)."""
    b, s, hidden = lw.shape_of(x)
    if not isinstance(hidden, int):
        lw.fail("3-D attention inputs need a static hidden size")
    split = lw.emit(relax.op.reshape(x, relax.ShapeExpr([_dim(b), _dim(s), heads, hidden // heads])))  # fmt: skip  # noqa: E501
    return lw.emit(relax.op.permute_dims(split, [0, 2, 1, 3]))


def _causal_bias(lw: Lowerer, q_len: Any, kv_len: Any, offset: Any, dt: str) -> Any:
    """0 where key j <= query i + offset, -inf elsewhere: shape (q_len, kv_len)."""
    i = relax.op.reshape(relax.op.arange(0, _dim(q_len), 1, "int64"), relax.ShapeExpr([_dim(q_len), 1]))  # fmt: skip  # noqa: E501
    j = relax.op.reshape(relax.op.arange(0, _dim(kv_len), 1, "int64"), relax.ShapeExpr([1, _dim(kv_len)]))  # fmt: skip  # noqa: E501
    shifted = relax.op.add(lw.emit(i), relax.op.reshape(relax.op.shape_to_tensor(relax.ShapeExpr([_dim(offset)])), ()))  # fmt: skip  # noqa: E501
    allowed = relax.op.less_equal(lw.emit(j), lw.emit(shifted))
    return lw.emit(relax.op.where(allowed, lw.const(0.0, dt), lw.const(NEG_INF, dt)))


@lowering("Attention")
def lower_attention(lw: Lowerer, node: Node) -> list[Any]:
    """ONNX Attention (opset 23): scaled dot-product attention with optional mask, causal
    masking, KV cache, grouped-query heads and softcap."""
    inputs = list(node.inputs) + [None] * (7 - len(node.inputs))
    if inputs[6] is not None or node.get_attr("left_window_size", -1) not in (-1, None):
        lw.fail("nonpad_kv_seqlen and sliding windows are not supported")
    q, k, v = (lw.x(value) for value in inputs[:3])
    three_d = lw.rank(q) == 3
    if three_d:
        q = _heads(lw, q, int(node.get_attr("q_num_heads")))
        k = _heads(lw, k, int(node.get_attr("kv_num_heads")))
        v = _heads(lw, v, int(node.get_attr("kv_num_heads")))
    dt = lw.dtype_of(q)
    if inputs[4] is not None:
        k = lw.emit(relax.op.concat([lw.x(inputs[4]), k], 2))
    if inputs[5] is not None:
        v = lw.emit(relax.op.concat([lw.x(inputs[5]), v], 2))
    present_k, present_v = k, v
    qd, kd = lw.shape_of(q), lw.shape_of(k)
    head_size = qd[3]
    scale = node.get_attr("scale")
    if scale is None:
        if not isinstance(head_size, int):
            lw.fail("Attention without a scale needs a static head size")
        scale = 1.0 / math.sqrt(head_size)
    if isinstance(qd[1], int) and isinstance(kd[1], int) and qd[1] != kd[1]:
        k = lw.emit(relax.op.repeat(k, qd[1] // kd[1], 1))
        v = lw.emit(relax.op.repeat(v, qd[1] // kd[1], 1))
    scores = lw.emit(relax.op.matmul(relax.op.multiply(q, lw.const(scale, dt)), relax.op.permute_dims(k, [0, 1, 3, 2])))  # fmt: skip  # noqa: E501
    softcap = float(node.get_attr("softcap", 0.0))
    if softcap > 0:
        capped = relax.op.tanh(relax.op.divide(scores, lw.const(softcap, dt)))
        scores = lw.emit(relax.op.multiply(capped, lw.const(softcap, dt)))
    qk_out = scores
    bias = None
    if inputs[3] is not None:
        mask = lw.x(inputs[3])
        if lw.dtype_of(mask) == "bool":
            mask = relax.op.where(mask, lw.const(0.0, dt), lw.const(NEG_INF, dt))
        bias = lw.emit(mask)
        mask_len = lw.shape_of(bias)[-1]
        if isinstance(mask_len, int) and isinstance(kd[2], int) and mask_len < kd[2]:
            pad = [0] * (lw.rank(bias) - 1) + [kd[2] - mask_len]
            bias = lw.bb.emit_te(topi.nn.pad, bias, [0] * len(pad), pad, NEG_INF)
    if node.get_attr("is_causal", 0):
        past = lw.shape_of(lw.x(inputs[4]))[2] if inputs[4] is not None else 0
        causal = _causal_bias(lw, qd[2], kd[2], past, dt)
        bias = causal if bias is None else lw.emit(relax.op.add(bias, causal))
    mode = int(node.get_attr("qk_matmul_output_mode", 0))
    if bias is not None:
        scores = lw.emit(relax.op.add(scores, bias))
    if mode == 2:
        qk_out = scores
    precision = node.get_attr("softmax_precision")
    if precision is not None:
        scores = lw.emit(relax.op.astype(scores, relax_dtype(DType(int(precision)))))
    probs = lw.emit(relax.op.nn.softmax(scores, -1))
    if bias is not None:  # rows with no attendable key are 0, not NaN
        masked = relax.op.equal(relax.op.max(bias, [-1], keepdims=True), lw.const(NEG_INF, dt))
        probs = lw.emit(relax.op.where(lw.emit(masked), lw.const(0.0, lw.dtype_of(probs)), probs))
    if lw.dtype_of(probs) != dt:
        probs = lw.emit(relax.op.astype(probs, dt))
    if mode == 3:
        qk_out = probs
    y = lw.emit(relax.op.matmul(probs, v))
    if three_d:
        b, _, s, _ = lw.shape_of(y)
        heads, head_v = lw.shape_of(y)[1], lw.shape_of(y)[3]
        shape = relax.ShapeExpr([_dim(b), _dim(s), _dim(heads * head_v)])
        y = relax.op.reshape(lw.emit(relax.op.permute_dims(y, [0, 2, 1, 3])), shape)
    return [y, present_k, present_v, qk_out]


@lowering("RotaryEmbedding")
def lower_rotary(lw: Lowerer, node: Node) -> list[Any]:
    """ONNX RotaryEmbedding (opset 23) on (B, H, S, D) or (B, S, H*D) inputs."""
    x = lw.x(node.inputs[0])
    cos, sin = lw.x(node.inputs[1]), lw.x(node.inputs[2])
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        ids = lw.x(node.inputs[3])
        cos, sin = lw.emit(relax.op.take(cos, ids, 0, mode="clip")), lw.emit(relax.op.take(sin, ids, 0, mode="clip"))  # fmt: skip  # noqa: E501
    original = lw.shape_of(x)
    if len(original) == 3:
        heads = int(node.get_attr("num_heads", 0))
        b, s, hidden = original
        x = lw.emit(relax.op.reshape(x, relax.ShapeExpr([_dim(b), _dim(s), heads, hidden // heads])))  # fmt: skip  # noqa: E501
        head_axis = 2  # (B, S, H, D): cos (B, S, d/2) broadcasts as (B, S, 1, d/2)
    else:
        head_axis = 1  # (B, H, S, D): cos broadcasts as (B, 1, S, d/2)
    cos, sin = lw.emit(relax.op.expand_dims(cos, head_axis)), lw.emit(relax.op.expand_dims(sin, head_axis))  # fmt: skip  # noqa: E501
    head = lw.shape_of(x)[3]
    dim = int(node.get_attr("rotary_embedding_dim", 0)) or head
    if not isinstance(dim, int):
        lw.fail("RotaryEmbedding needs a static head size")

    def part(begin: int, end: int, step: int = 1) -> Any:
        return lw.emit(relax.op.strided_slice(x, [3], [begin], [end], [step]))

    if node.get_attr("interleaved", 0):
        x1, x2 = part(0, dim, 2), part(1, dim, 2)
    else:
        x1, x2 = part(0, dim // 2), part(dim // 2, dim)
    real = lw.emit(relax.op.subtract(relax.op.multiply(cos, x1), relax.op.multiply(sin, x2)))
    imag = lw.emit(relax.op.add(relax.op.multiply(sin, x1), relax.op.multiply(cos, x2)))
    if node.get_attr("interleaved", 0):
        pairs = lw.emit(relax.op.concat([relax.op.expand_dims(real, -1), relax.op.expand_dims(imag, -1)], -1))  # fmt: skip  # noqa: E501
        rotated = lw.emit(relax.op.reshape(pairs, relax.ShapeExpr([_dim(d) for d in lw.shape_of(x1)[:3]] + [dim])))  # fmt: skip  # noqa: E501
    else:
        rotated = lw.emit(relax.op.concat([real, imag], -1))
    if isinstance(head, int) and dim < head:
        rotated = lw.emit(relax.op.concat([rotated, part(dim, head)], -1))
    if len(original) == 3:
        return [relax.op.reshape(rotated, relax.ShapeExpr([_dim(d) for d in original]))]
    return [rotated]


# ----- quantization ------------------------------------------------------------------------------
_INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767),
               "uint16": (0, 65535), "int32": (-(2**31), 2**31 - 1)}  # fmt: skip


def _per_axis(lw: Lowerer, node: Node, param: Any, rank: int) -> Any:
    """A scale or zero point: scalar as is, 1-D reshaped to broadcast along `axis`."""
    if lw.rank(param) != 1 or rank <= 1:
        return param
    if node.get_attr("block_size", 0):
        lw.fail("blocked quantization is not supported")
    shape = [1] * rank
    shape[axis_of(node, rank, default=1)] = -1
    return relax.op.reshape(param, shape)


@lowering("QuantizeLinear", "DequantizeLinear")
def lower_qdq(lw: Lowerer, node: Node) -> list[Any]:
    """Q: saturate(round_half_even(x / scale) + zero_point); DQ: (x - zero_point) * scale."""
    x = lw.x(node.inputs[0])
    rank = lw.rank(x)
    scale = _per_axis(lw, node, lw.x(node.inputs[1]), rank)
    zp_value = node.inputs[2] if len(node.inputs) > 2 else None
    zero = _per_axis(lw, node, lw.x(zp_value), rank) if zp_value is not None else None
    if node.op_type == "DequantizeLinear":
        dt = lw.dtype_of(lw.emit(scale))
        y = relax.op.astype(x, dt)
        if zero is not None:
            y = relax.op.subtract(y, relax.op.astype(zero, dt))
        return [relax.op.multiply(y, scale)]
    out = lw.out_dtype(node)
    if out not in _INT_RANGES:
        lw.fail(f"quantizing to {out} is not supported")
    dt = lw.dtype_of(x)
    y = lw.emit(relax.op.round(relax.op.divide(x, scale)))  # TVM's round is half to even
    if zero is not None:
        y = relax.op.add(y, relax.op.astype(zero, dt))
    low, high = _INT_RANGES[out]
    y = relax.op.clip(y, float(low), float(high))
    return [relax.op.astype(lw.emit(y), out)]
