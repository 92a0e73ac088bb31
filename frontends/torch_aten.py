"""Translations of ATen's math to standard ONNX ops: elementwise arithmetic, comparisons, logic,
unary functions, `where`/`masked_fill`/`clamp`, and reductions (sum, mean, max, arg-max, var,
norms, cumsum, topk).

Semantics follow torch, not ONNX, where the two differ: operands are cast to the type torch
computes in (`Lowering.out_dtype`/`promoted`), `remainder` takes the divisor's sign, integer
`div` with a rounding mode floors or truncates as asked, bool `where` goes through uint8 (ONNX
Runtime has no bool Where). Shape ops, creation and indexing live in `torch_shapes.py`,
neural-network ops (attention, norms, convolutions, pooling, linear layers) in `torch_nn.py`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphopt.frontends.torch_context import Args, Lowering, Result, translates
from graphopt.ir.core import Value
from graphopt.ir.types import DType

# ----- elementwise ------------------------------------------------------------------------------
UNARY = {
    "aten.neg": "Neg", "aten.abs": "Abs", "aten.exp": "Exp", "aten.log": "Log",
    "aten.sqrt": "Sqrt", "aten.reciprocal": "Reciprocal", "aten.sin": "Sin", "aten.cos": "Cos",
    "aten.tan": "Tan", "aten.tanh": "Tanh", "aten.sigmoid": "Sigmoid", "aten.erf": "Erf",
    "aten.floor": "Floor", "aten.ceil": "Ceil", "aten.round.default": "Round", "aten.sign": "Sign",
    "aten.relu": "Relu", "aten.asin": "Asin", "aten.acos": "Acos", "aten.atan": "Atan",
    "aten.sinh": "Sinh", "aten.cosh": "Cosh", "aten.asinh": "Asinh", "aten.acosh": "Acosh",
    "aten.atanh": "Atanh",
}  # fmt: skip
ARITHMETIC = {"aten.mul": "Mul", "aten.maximum": "Max", "aten.minimum": "Min", "aten.fmod": "Mod"}
COMPARISONS = {
    "aten.eq": "Equal", "aten.lt": "Less", "aten.le": "LessOrEqual", "aten.gt": "Greater",
    "aten.ge": "GreaterOrEqual",
}  # fmt: skip
LOGICAL = {"aten.logical_and": "And", "aten.logical_or": "Or", "aten.logical_xor": "Xor"}
BITWISE = {
    "aten.bitwise_and": ("And", "BitwiseAnd"), "aten.bitwise_or": ("Or", "BitwiseOr"),
    "aten.bitwise_xor": ("Xor", "BitwiseXor"), "aten.__and__": ("And", "BitwiseAnd"),
    "aten.__or__": ("Or", "BitwiseOr"), "aten.__xor__": ("Xor", "BitwiseXor"),
}  # fmt: skip


def _unary(op: str) -> Any:
    def translate(lw: Lowering, node: Any, a: Args) -> Result:
        return lw.op(op, lw.tensor(a["self"], lw.out_dtype(node)))

    return translate


def _arithmetic(op: str) -> Any:
    def translate(lw: Lowering, node: Any, a: Args) -> Result:
        dtype = lw.out_dtype(node)
        attrs = {"fmod": 1} if op == "Mod" else {}
        return lw.op(op, lw.tensor(a["self"], dtype), lw.tensor(a["other"], dtype), **attrs)

    return translate


def _comparison(op: str, negate: bool = False) -> Any:
    def translate(lw: Lowering, node: Any, a: Args) -> Result:
        dtype = lw.promoted(a["self"], a["other"])
        result = lw.op(op, lw.tensor(a["self"], dtype), lw.tensor(a["other"], dtype))
        return lw.op("Not", result) if negate else result

    return translate


def _logical(op: str) -> Any:
    def translate(lw: Lowering, node: Any, a: Args) -> Result:
        return lw.op(op, lw.tensor(a["self"], DType.BOOL), lw.tensor(a["other"], DType.BOOL))

    return translate


def _bitwise(ops: tuple[str, str]) -> Any:
    def translate(lw: Lowering, node: Any, a: Args) -> Result:
        dtype = lw.out_dtype(node)
        op = ops[0] if dtype == DType.BOOL else ops[1]
        return lw.op(op, lw.tensor(a["self"], dtype), lw.tensor(a["other"], dtype))

    return translate


for _name, _op in UNARY.items():
    translates(_name)(_unary(_op))
for _name, _op in ARITHMETIC.items():
    translates(_name)(_arithmetic(_op))
for _name, _op in COMPARISONS.items():
    translates(_name)(_comparison(_op))
for _name, _op in LOGICAL.items():
    translates(_name)(_logical(_op))
for _name, _ops in BITWISE.items():
    translates(_name)(_bitwise(_ops))
translates("aten.ne")(_comparison("Equal", negate=True))


def _scaled(lw: Lowering, value: Value, alpha: Any, dtype: DType) -> Value:
    return value if alpha in (None, 1) else lw.op("Mul", value, lw.tensor(alpha, dtype))


@translates("aten.add")
def _add(lw: Lowering, node: Any, a: Args) -> Result:  # x + alpha * y
    dtype = lw.out_dtype(node)
    other = _scaled(lw, lw.tensor(a["other"], dtype), a.get("alpha"), dtype)
    return lw.op("Add", lw.tensor(a["self"], dtype), other)


@translates("aten.sub")
def _sub(lw: Lowering, node: Any, a: Args) -> Result:  # x - alpha * y
    dtype = lw.out_dtype(node)
    other = _scaled(lw, lw.tensor(a["other"], dtype), a.get("alpha"), dtype)
    return lw.op("Sub", lw.tensor(a["self"], dtype), other)


@translates("aten.rsub")
def _rsub(lw: Lowering, node: Any, a: Args) -> Result:  # y - alpha * x
    dtype = lw.out_dtype(node)
    scaled = _scaled(lw, lw.tensor(a["self"], dtype), a.get("alpha"), dtype)
    return lw.op("Sub", lw.tensor(a["other"], dtype), scaled)


@translates("aten.div")
def _div(lw: Lowering, node: Any, a: Args) -> Result:
    dtype = lw.out_dtype(node)
    mode = a.get("rounding_mode")
    if mode is None:
        return lw.op("Div", lw.tensor(a["self"], dtype), lw.tensor(a["other"], dtype))
    compute = dtype if dtype.is_float else DType.DOUBLE  # exact for |ints| < 2**53
    quotient = lw.op("Div", lw.tensor(a["self"], compute), lw.tensor(a["other"], compute))
    if mode == "floor":
        rounded = lw.op("Floor", quotient)
    else:  # trunc: sign(q) * floor(|q|)
        rounded = lw.op("Mul", lw.op("Sign", quotient), lw.op("Floor", lw.op("Abs", quotient)))
    return rounded if compute == dtype else lw.cast(rounded, dtype)


@translates("aten.remainder")
def _remainder(lw: Lowering, node: Any, a: Args) -> Result:  # sign follows the divisor
    dtype = lw.out_dtype(node)
    x, y = lw.tensor(a["self"], dtype), lw.tensor(a["other"], dtype)
    if not dtype.is_float:
        return lw.op("Mod", x, y, fmod=0)
    return lw.op("Sub", x, lw.op("Mul", lw.op("Floor", lw.op("Div", x, y)), y))


@translates("aten.pow")
def _pow(lw: Lowering, node: Any, a: Args) -> Result:
    dtype = lw.out_dtype(node)
    return lw.op("Pow", lw.tensor(a["self"], dtype), lw.tensor(a["exponent"], dtype))


@translates("aten.rsqrt")
def _rsqrt(lw: Lowering, node: Any, a: Args) -> Result:
    return lw.op("Reciprocal", lw.op("Sqrt", lw.tensor(a["self"], lw.out_dtype(node))))


@translates("aten.log1p")
def _log1p(lw: Lowering, node: Any, a: Args) -> Result:
    dtype = lw.out_dtype(node)
    return lw.op("Log", lw.op("Add", lw.tensor(a["self"], dtype), lw.const(1, dtype)))


@translates("aten.expm1")
def _expm1(lw: Lowering, node: Any, a: Args) -> Result:
    dtype = lw.out_dtype(node)
    return lw.op("Sub", lw.op("Exp", lw.tensor(a["self"], dtype)), lw.const(1, dtype))


@translates("aten.log2", "aten.log10")
def _log_base(lw: Lowering, node: Any, a: Args) -> Result:
    dtype = lw.out_dtype(node)
    base = 2.0 if "log2" in str(node.target) else 10.0
    return lw.op("Div", lw.op("Log", lw.tensor(a["self"], dtype)), lw.const(np.log(base), dtype))


@translates("aten.bitwise_not", "aten.logical_not")
def _not(lw: Lowering, node: Any, a: Args) -> Result:
    dtype = lw.out_dtype(node)
    if dtype == DType.BOOL:
        return lw.op("Not", lw.tensor(a["self"], DType.BOOL))
    return lw.op("BitwiseNot", lw.tensor(a["self"], dtype))


@translates("aten.isnan", "aten.isinf")
def _is_special(lw: Lowering, node: Any, a: Args) -> Result:
    op = "IsNaN" if "isnan" in str(node.target) else "IsInf"
    return lw.op(op, lw.tensor(a["self"]))


def _select(lw: Lowering, condition: Any, chosen: Any, other: Any, dtype: DType) -> Value:
    """Where(condition, chosen, other) in `dtype`; bools go through uint8 (ONNX Runtime has no
    bool Where kernel)."""
    compute = DType.UINT8 if dtype == DType.BOOL else dtype
    result = lw.op(
        "Where", lw.tensor(condition, DType.BOOL), lw.tensor(chosen, compute),
        lw.tensor(other, compute),
    )  # fmt: skip
    return result if compute == dtype else lw.cast(result, dtype)


@translates(
    "aten.where.self", "aten.where.ScalarSelf", "aten.where.ScalarOther", "aten.where.Scalar"
)
def _where(lw: Lowering, node: Any, a: Args) -> Result:
    return _select(lw, a["condition"], a["self"], a["other"], lw.out_dtype(node))


@translates("aten.masked_fill")
def _masked_fill(lw: Lowering, node: Any, a: Args) -> Result:
    return _select(lw, a["mask"], a["value"], a["self"], lw.out_dtype(node))


@translates("aten.clamp", "aten.clamp_min", "aten.clamp_max")
def _clamp(lw: Lowering, node: Any, a: Args) -> Result:
    dtype = lw.out_dtype(node)
    x = lw.tensor(a["self"], dtype)
    low, high = a.get("min"), a.get("max")
    if "clamp_max" in str(node.target):
        low, high = None, a["max"]
    if all(isinstance(b, (int, float)) or b is None for b in (low, high)):
        return lw.op("Clip", x, lw.optional(low, dtype), lw.optional(high, dtype))
    if low is not None:  # tensor bounds broadcast: Max/Min
        x = lw.op("Max", x, lw.tensor(low, dtype))
    if high is not None:
        x = lw.op("Min", x, lw.tensor(high, dtype))
    return x


# ----- reductions -------------------------------------------------------------------------------
REDUCTIONS = {
    "aten.sum": "ReduceSum", "aten.mean": "ReduceMean", "aten.amax": "ReduceMax",
    "aten.amin": "ReduceMin", "aten.prod": "ReduceProd", "aten.any": "ReduceMax",
    "aten.all": "ReduceMin",
}  # fmt: skip


def _axes(lw: Lowering, dims: Any, rank: int) -> list[int] | None:
    """Normalized reduction axes; None for all of them (an omitted or empty dim list)."""
    if dims is None:
        return None
    axes = lw.static_ints(dims, "reduction dims")
    return [d % max(rank, 1) for d in axes] if axes else None


def _reduction(op: str) -> Any:
    def translate(lw: Lowering, node: Any, a: Args) -> Result:
        dtype = lw.out_dtype(node)
        x = lw.tensor(a["self"], dtype)
        axes = _axes(lw, a.get("dim"), lw.rank(a["self"]))
        keep = int(bool(a.get("keepdim", False)))
        if axes is None:
            return lw.op(op, x, keepdims=keep)
        return lw.op(op, x, lw.const(np.asarray(axes, np.int64)), keepdims=keep)

    return translate


for _name, _op in REDUCTIONS.items():
    translates(_name)(_reduction(_op))


@translates("aten.linalg_vector_norm")
def _vector_norm(lw: Lowering, node: Any, a: Args) -> Result:  # (sum |x|^p)^(1/p)
    dtype = lw.out_dtype(node)
    x = lw.tensor(a["self"], dtype)
    axes = _axes(lw, a.get("dim"), lw.rank(a["self"]))
    reduce_args = [x] if axes is None else [x, lw.const(np.asarray(axes, np.int64))]
    keep = int(bool(a.get("keepdim")))
    order = float(a.get("ord", 2))
    if order in (1.0, 2.0):
        return lw.op("ReduceL1" if order == 1.0 else "ReduceL2", *reduce_args, keepdims=keep)
    if order in (float("inf"), float("-inf")):
        reduce_args[0] = lw.op("Abs", x)
        return lw.op("ReduceMax" if order > 0 else "ReduceMin", *reduce_args, keepdims=keep)
    if order == 0.0:
        raise lw.fail("the 0-norm (a count of nonzeros)", hint="use (x != 0).sum(dim)")
    reduce_args[0] = lw.op("Pow", lw.op("Abs", x), lw.const(order, dtype))
    total = lw.op("ReduceSum", *reduce_args, keepdims=keep)
    return lw.op("Pow", total, lw.const(1.0 / order, dtype))


@translates("aten.max.dim", "aten.min.dim")
def _max_dim(lw: Lowering, node: Any, a: Args) -> Result:
    largest = "max" in str(node.target)
    x = lw.tensor(a["self"])
    axis = a["dim"] % max(lw.rank(a["self"]), 1)
    keep = int(bool(a["keepdim"]))
    values = lw.op("ReduceMax" if largest else "ReduceMin", x, lw.const([axis]), keepdims=keep)
    indices = lw.op("ArgMax" if largest else "ArgMin", x, axis=axis, keepdims=keep)
    return [values, indices]


@translates("aten.max.default", "aten.min.default")
def _max_all(lw: Lowering, node: Any, a: Args) -> Result:
    op = "ReduceMax" if "max" in str(node.target) else "ReduceMin"
    return lw.op(op, lw.tensor(a["self"]), keepdims=0)


@translates("aten.max.other")
def _max_other(lw: Lowering, node: Any, a: Args) -> Result:
    return _arithmetic("Max")(lw, node, a)


@translates("aten.min.other")
def _min_other(lw: Lowering, node: Any, a: Args) -> Result:
    return _arithmetic("Min")(lw, node, a)


@translates("aten.argmax", "aten.argmin")
def _argmax(lw: Lowering, node: Any, a: Args) -> Result:
    op = "ArgMax" if "argmax" in str(node.target) else "ArgMin"
    x = lw.tensor(a["self"])
    if a.get("dim") is None:
        flat = lw.op("Reshape", x, lw.const(np.asarray([-1], np.int64)))
        result = lw.op(op, flat, axis=0, keepdims=0)
        if a.get("keepdim"):
            result = lw.op("Reshape", result, lw.const(np.ones(lw.rank(a["self"]), np.int64)))
        return result
    axis = a["dim"] % max(lw.rank(a["self"]), 1)
    return lw.op(op, x, axis=axis, keepdims=int(bool(a.get("keepdim"))))


@translates("aten.var.correction", "aten.var.dim")
def _var(lw: Lowering, node: Any, a: Args) -> Result:  # sum((x - mean)^2) / (N - correction)
    dtype = lw.out_dtype(node)
    x = lw.tensor(a["self"], dtype)
    rank = lw.rank(a["self"])
    axes = _axes(lw, a.get("dim"), rank) or list(range(rank))
    correction = a.get("correction")
    if correction is None:
        correction = 1 if a.get("unbiased", True) else 0
    axes_value = lw.const(np.asarray(axes, np.int64))
    centered = lw.op("Sub", x, lw.op("ReduceMean", x, axes_value, keepdims=1))
    total = lw.op(
        "ReduceSum",
        lw.op("Mul", centered, centered),
        axes_value,
        keepdims=int(bool(a.get("keepdim"))),
    )
    sizes = lw.op("Gather", lw.shape(x), axes_value, axis=0)
    count = lw.cast(lw.op("ReduceProd", sizes, keepdims=0), dtype)
    return lw.op("Div", total, lw.op("Sub", count, lw.const(float(correction), dtype)))


@translates("aten.cumsum")
def _cumsum(lw: Lowering, node: Any, a: Args) -> Result:
    x = lw.tensor(a["self"], lw.out_dtype(node))
    return lw.op("CumSum", x, lw.const(np.asarray(a["dim"], np.int64)))


@translates("aten.topk")
def _topk(lw: Lowering, node: Any, a: Args) -> Result:
    axis = a["dim"] % max(lw.rank(a["self"]), 1)
    k = lw.vector(lw.int_scalar(a["k"]))
    values, indices = lw.op(
        "TopK", lw.tensor(a["self"]), k, _outputs=2, axis=axis,
        largest=int(bool(a["largest"])), sorted=int(bool(a["sorted"])),
    )  # fmt: skip
    return [values, indices]
