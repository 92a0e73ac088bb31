"""Relax lowerings of the element-wise op families: unary and binary math (numpy broadcasting,
variadic Max/Min/Sum/Mean), comparisons and logic, Where, Clip and Cast.

Split from `tvm_lower.py` to keep each module small; registered the same way, with
`tvm_lower.lowering`. Integer element-wise ops on `Known` inputs (shape arithmetic: `Add`, `Mul`,
`Div`, `Equal`, `Where`, ... on small integer tensors of ints and TIR expressions) are computed
at compile time, so they stay shapes rather than becoming tensors. Operands are aligned with
`broadcast_operands` first where Relax cannot derive the broadcast shape. Semantics are the ONNX
spec's.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
from tvm import relax, tirx

from graphopt.backends.tvm_lower import (
    KNOWN_LIMIT,
    Known,
    Lowerer,
    _prim,
    _simplify,
    broadcast_operands,
    lowering,
)
from graphopt.ir.core import Node


# ----- known-value arithmetic --------------------------------------------------------------------
def _int_div(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int):
        q = abs(a) // abs(b)
        return q if (a >= 0) == (b >= 0) else -q
    return tirx.truncdiv(_prim(a), _prim(b))


def _either(on_ints: Callable[[Any, Any], Any], on_tir: Callable[[Any, Any], Any],
            dtype: str = "int64") -> Callable[[Any, Any], Any]:  # fmt: skip
    """A binary op on known elements: Python's on two ints, TIR's when one is symbolic."""
    return lambda a, b: (
        on_ints(a, b) if isinstance(a, int) and isinstance(b, int)
        else on_tir(_prim(a, dtype), _prim(b, dtype))
    )  # fmt: skip


_KNOWN_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
    "Div": _int_div, "Max": _either(max, tirx.max), "Min": _either(min, tirx.min),
    "Equal": _either(operator.eq, tirx.EQ), "Less": _either(operator.lt, tirx.LT),
    "Greater": _either(operator.gt, tirx.GT), "LessOrEqual": _either(operator.le, tirx.LE),
    "GreaterOrEqual": _either(operator.ge, tirx.GE),
    "And": _either(lambda a, b: bool(a and b), tirx.And, "bool"),
    "Or": _either(lambda a, b: bool(a or b), tirx.Or, "bool"),
}  # fmt: skip
_COMPARISONS = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or"}


def _known_elementwise(lw: Lowerer, node: Node) -> Known | None:
    """Integer element-wise ops on known values, computed at compile time."""
    knowns = [lw.known(v) for v in node.inputs]
    if any(k is None for k in knowns) or not knowns:
        return None
    arrays = [k.items for k in knowns]  # type: ignore[union-attr]
    if math.prod(np.broadcast_shapes(*[a.shape for a in arrays])) > KNOWN_LIMIT:
        return None
    op = node.op_type
    if op in _KNOWN_BINARY:
        fn = np.frompyfunc(
            lambda a, b: _simplify(_KNOWN_BINARY[op](_simplify(a), _simplify(b))), 2, 1
        )
        result = arrays[0]
        for other in arrays[1:]:
            result = fn(result, other)
        dtype = "bool" if op in _COMPARISONS else knowns[0].dtype  # type: ignore[union-attr]
    elif op == "Where":
        select = np.frompyfunc(
            lambda c, a, b: (a if c else b) if isinstance(c, bool) else _simplify(tirx.Select(_prim(c, "bool"), _prim(a), _prim(b))), 3, 1)  # fmt: skip  # noqa: E501
        result = select(*arrays)
        dtype = knowns[1].dtype  # type: ignore[union-attr]
    elif op in ("Neg", "Abs", "Not", "Identity"):
        fn1 = {
            "Neg": lambda a: -a if isinstance(a, int) else _simplify(-_prim(a)),
            "Abs": lambda a: abs(a) if isinstance(a, int) else _simplify(tirx.abs(_prim(a))),
            "Not": lambda a: (not a) if isinstance(a, int) else tirx.Not(_prim(a, "bool")),
            "Identity": lambda a: a,
        }[op]
        result = np.frompyfunc(lambda a: fn1(_simplify(a)), 1, 1)(arrays[0])
        dtype = knowns[0].dtype  # type: ignore[union-attr]
    else:
        return None
    return Known(np.asarray(result, dtype=object).reshape(np.shape(result)), dtype)


# ----- element-wise ------------------------------------------------------------------------------
_UNARY = {
    "Relu": relax.op.nn.relu, "Sigmoid": relax.op.sigmoid, "Tanh": relax.op.tanh,
    "Exp": relax.op.exp, "Log": relax.op.log, "Sqrt": relax.op.sqrt, "Neg": relax.op.negative,
    "Abs": relax.op.abs, "Erf": relax.op.erf, "Sin": relax.op.sin, "Cos": relax.op.cos,
    "Tan": relax.op.tan, "Asin": relax.op.asin, "Acos": relax.op.acos, "Atan": relax.op.atan,
    "Sinh": relax.op.sinh, "Cosh": relax.op.cosh, "Asinh": relax.op.asinh,
    "Acosh": relax.op.acosh, "Atanh": relax.op.atanh, "Floor": relax.op.floor,
    "Ceil": relax.op.ceil, "Round": relax.op.round, "Sign": relax.op.sign,
    "IsNaN": relax.op.isnan, "Not": relax.op.logical_not, "BitwiseNot": relax.op.bitwise_not,
}  # fmt: skip


@lowering(*_UNARY, "Identity", "Dropout", "Reciprocal", "Softsign", "Softplus", "LeakyRelu",
          "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "ThresholdedRelu", "Mish", "Gelu",
          "IsInf", "Shrink")  # fmt: skip
def lower_unary(lw: Lowerer, node: Node) -> list[Any]:
    op = node.op_type
    if op in ("Identity", "Neg", "Abs", "Not"):
        known = _known_elementwise(lw, node)
        if known is not None:
            return [known]
    if op in ("Identity", "Dropout"):
        if len(node.outputs) > 1 and node.outputs[1].is_used:
            lw.fail("the mask output of Dropout is not supported")
        return [lw.x(node.inputs[0])]
    x = lw.x(node.inputs[0])
    dt = lw.dtype_of(x)

    def c(v: float) -> Any:
        return lw.const(v, dt)

    if op in _UNARY:
        return [_UNARY[op](x)]
    if op == "Reciprocal":
        return [relax.op.divide(c(1.0), x)]
    if op == "Softsign":
        return [relax.op.divide(x, relax.op.add(c(1.0), relax.op.abs(x)))]
    if op == "Softplus":
        return [relax.op.log(relax.op.add(relax.op.exp(x), c(1.0)))]
    if op == "LeakyRelu":
        return [relax.op.nn.leakyrelu(x, float(node.get_attr("alpha", 0.01)))]
    if op == "HardSigmoid":
        y = relax.op.add(relax.op.multiply(x, c(node.get_attr("alpha", 0.2))), c(node.get_attr("beta", 0.5)))  # fmt: skip  # noqa: E501
        return [relax.op.clip(y, 0.0, 1.0)]
    if op == "HardSwish":
        y = relax.op.add(relax.op.multiply(x, c(1 / 6)), c(0.5))
        return [relax.op.multiply(x, relax.op.clip(y, 0.0, 1.0))]  # fmt: skip  # noqa: E501
    if op in ("Elu", "Celu"):
        a = float(node.get_attr("alpha", 1.0))
        neg = relax.op.multiply(c(a), relax.op.subtract(relax.op.exp(relax.op.divide(x, c(a)) if op == "Celu" else x), c(1.0)))  # fmt: skip  # noqa: E501
        return [relax.op.where(relax.op.less(x, c(0.0)), neg, x)]
    if op == "Selu":
        a, g = float(node.get_attr("alpha", 1.67326319)), float(node.get_attr("gamma", 1.05070102))
        neg = relax.op.multiply(c(a), relax.op.subtract(relax.op.exp(x), c(1.0)))
        return [relax.op.multiply(c(g), relax.op.where(relax.op.greater(x, c(0.0)), x, neg))]
    if op == "ThresholdedRelu":
        a = float(node.get_attr("alpha", 1.0))
        return [relax.op.where(relax.op.greater(x, c(a)), x, c(0.0))]
    if op == "Shrink":
        bias, lambd = float(node.get_attr("bias", 0.0)), float(node.get_attr("lambd", 0.5))
        low = relax.op.where(relax.op.less(x, c(-lambd)), relax.op.add(x, c(bias)), c(0.0))
        return [relax.op.where(relax.op.greater(x, c(lambd)), relax.op.subtract(x, c(bias)), low)]
    if op == "Mish":
        softplus = relax.op.log(relax.op.add(relax.op.exp(x), c(1.0)))
        return [relax.op.multiply(x, relax.op.tanh(softplus))]
    if op == "Gelu":  # the spec's formulas: CPU targets approximate tanh/erf (tvm._fast_math)
        if node.get_attr("approximate", "none") == "tanh":
            cubic = relax.op.multiply(c(0.044715), relax.op.multiply(x, relax.op.multiply(x, x)))
            inner = relax.op.multiply(c(math.sqrt(2 / math.pi)), relax.op.add(x, cubic))
            cdf = relax.op.tanh(inner)
        else:
            cdf = relax.op.erf(relax.op.multiply(x, c(1 / math.sqrt(2))))
        return [relax.op.multiply(relax.op.multiply(c(0.5), x), relax.op.add(c(1.0), cdf))]
    if op == "IsInf":
        pos, neg = node.get_attr("detect_positive", 1), node.get_attr("detect_negative", 1)
        inf = relax.op.isinf(x)
        if pos and neg:
            return [inf]
        sign = relax.op.greater(x, c(0.0)) if pos else relax.op.less(x, c(0.0))
        return [relax.op.logical_and(inf, sign) if (pos or neg) else relax.op.zeros_like(inf)]
    lw.fail("unreachable")
    return []


_BINARY = {
    "Add": relax.op.add, "Sub": relax.op.subtract, "Mul": relax.op.multiply,
    "Pow": relax.op.power, "Max": relax.op.maximum, "Min": relax.op.minimum,
    "Equal": relax.op.equal, "Less": relax.op.less, "Greater": relax.op.greater,
    "LessOrEqual": relax.op.less_equal, "GreaterOrEqual": relax.op.greater_equal,
    "And": relax.op.logical_and, "Or": relax.op.logical_or, "Xor": relax.op.logical_xor,
    "BitwiseAnd": relax.op.bitwise_and, "BitwiseOr": relax.op.bitwise_or,
    "BitwiseXor": relax.op.bitwise_xor,
}  # fmt: skip


@lowering(*_BINARY, "Div", "Mod", "Sum", "Mean", "Where", "PRelu", "BitShift")
def lower_binary(lw: Lowerer, node: Node) -> list[Any]:
    """Element-wise ops of two or more inputs (numpy broadcasting); variadic Max/Min/Sum/Mean."""
    known = _known_elementwise(lw, node)
    if known is not None:
        return [known]
    op = node.op_type
    xs = broadcast_operands(lw, [lw.x(v) for v in node.inputs])
    if op == "Where":
        return [relax.op.where(*xs)]
    if op == "PRelu":
        x, slope = xs
        return [relax.op.where(relax.op.less(x, lw.const(0, lw.dtype_of(x))), relax.op.multiply(x, slope), x)]  # fmt: skip  # noqa: E501
    dt = lw.dtype_of(xs[0])
    if op == "Div":
        if dt.startswith("float") or dt.startswith("bfloat"):
            return [relax.op.divide(*xs)]
        q = relax.op.trunc(relax.op.divide(*[relax.op.astype(v, "float64") for v in xs]))
        return [relax.op.astype(q, dt)]
    if op == "Mod":
        if node.get_attr("fmod", 0) or dt.startswith("float"):
            return [relax.op.mod(*xs)]  # C fmod: sign of the dividend
        return [relax.op.floor_mod(*xs)]  # Python %: sign of the divisor
    if op == "BitShift":
        left = node.get_attr("direction") == "LEFT"
        return [(relax.op.left_shift if left else relax.op.right_shift)(*xs)]
    if op == "Pow" and node.inputs[1] is not None and node.inputs[1].const_value is not None:
        exponent = node.inputs[1].const_value
        if exponent.size == 1 and float(exponent.reshape(-1)[0]) == 2.0:
            return [relax.op.multiply(xs[0], xs[0])]
        xs[1] = relax.op.astype(xs[1], dt) if lw.dtype_of(xs[1]) != dt else xs[1]
    fn = {"Sum": relax.op.add, "Mean": relax.op.add}.get(op) or _BINARY[op]
    result = xs[0]
    for other in xs[1:]:
        result = lw.emit(fn(result, other))
    if op == "Mean":
        result = relax.op.divide(result, lw.const(len(xs), dt))
    return [result]


@lowering("Clip")
def lower_clip(lw: Lowerer, node: Node) -> list[Any]:
    x = lw.x(node.inputs[0])
    dt = lw.dtype_of(x)
    bounds: list[Any] = [node.get_attr("min"), node.get_attr("max")]
    for i in (1, 2):
        value = node.inputs[i] if len(node.inputs) > i else None
        if value is not None:
            bounds[i - 1] = lw.x(value) if value.const_value is None else value.const_value.item()
    lo, hi = bounds
    if isinstance(lo, (float, int)) or lo is None:
        if lo is not None:
            x = lw.emit(relax.op.maximum(x, lw.const(lo, dt)))
    else:
        x = lw.emit(relax.op.maximum(x, lo))
    if hi is not None:
        x = relax.op.minimum(x, lw.const(hi, dt) if isinstance(hi, (float, int)) else hi)
    return [x]


@lowering("Cast", "CastLike")
def lower_cast(lw: Lowerer, node: Node) -> list[Any]:
    to = lw.out_dtype(node)
    known = lw.known(node.inputs[0])
    if known is not None and (to.startswith("int") or to.startswith("uint") or to == "bool"):
        flat = [_simplify(v) for v in known.items.reshape(-1)]
        if to == "bool":
            flat = [bool(v) if isinstance(v, int) else tirx.NE(_prim(v), tirx.const(0, "int64")) for v in flat]  # fmt: skip  # noqa: E501
        return [Known(np.array(flat + [None], dtype=object)[:-1].reshape(known.items.shape), to)]
    x = lw.x(node.inputs[0])
    if to == "bool" and lw.dtype_of(x) != "bool":
        return [relax.op.not_equal(x, lw.const(0, lw.dtype_of(x)))]
    return [relax.op.astype(x, to)]
