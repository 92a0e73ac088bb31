"""fuse-gelu: the GELU formulas exporters write, as one opset-20 `Gelu` node.

Matches, for any value x:

- the exact GELU `0.5 * x * (1 + erf(x / sqrt(2)))` -> `Gelu(x)` (approximate="none");
- the tanh approximation `0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))` (GPT-2's
  "gelu_new", torch's `gelu(approximate="tanh")`) -> `Gelu(x, approximate="tanh")`.

Each is a product of three factors, and exporters group it every way (`OUTER` below: the 0.5
first, with the bracket, last, or as a division by 2). Inside: erf of `x / sqrt(2)` or
`x * (1/sqrt(2))`; tanh of `sqrt(2/pi) * (x + 0.044715 * x^3)` with x^3 as `Pow(x, 3)`,
`x * (x * x)` or `((0.044715 * x) * x) * x`, or of the factored `sqrt(2/pi) * x * (1 + 0.044715 *
x^2)` (HF's "gelu_fast"). Constants may be initializers or Constant nodes, scalars or one-element
tensors. Every grouping is one rule in `gelu_rules()` (tables `OUTER`, `ERF_ARGS`, `TANH_ARGS`).

Why equal: the ONNX spec defines Gelu as exactly these formulas (approximate="none": erf;
"tanh": the tanh form with sqrt(2/pi) and 0.044715), so the fused node computes the same
function; only the rounding of the intermediate products differs (a few float32 ulps).

Refuses, saying why (`ctx.refuse`): a constant that differs from its expected value by more than
`rtol` relative (1e-4 by default, or the dtype's epsilon for float16/bfloat16, whose roundings of
sqrt(2) are coarser) names the constant and its value; an exponent must be exactly 3 (or 2); a
constant that is not a single number, or has more axes than x (it would broadcast the output to a
bigger shape); x's element type unknown or not float; the model's opset below 20 ("Gelu needs
opset 20, the model imports 18: run upgrade-opset first"); an intermediate read outside the pattern
(the engine checks that).

Ordering: after O1 (constant folding and canonicalize tidy the constants); after `upgrade-opset`
(O2 runs it first); before `fuse-bias-gelu`, which turns `Gelu(x + bias)` into ONNX Runtime's
BiasGelu / FastGelu for target onnxruntime.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.ir.core import Value
from graphopt.ir.types import DType
from graphopt.passes.manager import register_pass
from graphopt.passes.rewrite import Const, RewriteContext, RewritePass, RewriteRule
from graphopt.passes.rewrite.rule import RewriteBuilder

__all__ = ["ERF_ARGS", "OUTER", "TANH_ARGS", "Emit", "FuseGelu", "GeluRule", "gelu_rules"]

SQRT2 = math.sqrt(2.0)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715
RTOL = 1e-4

# constant name in the patterns -> (expected value, what it is, for refusals)
EXPECTED: dict[str, tuple[float, str]] = {
    "half": (0.5, "the factor 0.5"),
    "two": (2.0, "the divisor 2"),
    "one": (1.0, "the 1 added to erf/tanh"),
    "sqrt2": (SQRT2, "the divisor sqrt(2) inside erf"),
    "inv_sqrt2": (1.0 / SQRT2, "the factor 1/sqrt(2) inside erf"),
    "scale": (SQRT_2_OVER_PI, "the factor sqrt(2/pi) inside tanh"),
    "cubic": (GELU_CUBIC, "the coefficient 0.044715"),
    "one_inner": (1.0, "the 1 in (1 + 0.044715 * x^2)"),
    "three": (3.0, "the exponent 3"),
    "two_exp": (2.0, "the exponent 2"),
}
EXACT = frozenset({"three", "two_exp"})  # exponents: 3.0001 would make x^3 NaN for x < 0

Builder = Callable[..., Any]  # (op, x, ...) -> pattern value


def _c(name: str) -> Const:
    return Const(name=name)


# --- how the three factors 0.5, x and (1 + act) are grouped: (op, x, act) -> root -------------
def half_first(op: Any, x: Any, act: Any) -> Any:  # (x * 0.5) * (1 + act)
    return op.Mul(op.Mul(x, _c("half")), op.Add(act, _c("one")))


def half_inside(op: Any, x: Any, act: Any) -> Any:  # x * ((1 + act) * 0.5)
    return op.Mul(x, op.Mul(op.Add(act, _c("one")), _c("half")))


def half_last(op: Any, x: Any, act: Any) -> Any:  # (x * (1 + act)) * 0.5
    return op.Mul(op.Mul(x, op.Add(act, _c("one"))), _c("half"))


def halved_first(op: Any, x: Any, act: Any) -> Any:  # (x / 2) * (1 + act)
    return op.Mul(op.Div(x, _c("two")), op.Add(act, _c("one")))


def halved_last(op: Any, x: Any, act: Any) -> Any:  # (x * (1 + act)) / 2
    return op.Div(op.Mul(x, op.Add(act, _c("one"))), _c("two"))


OUTER: tuple[Builder, ...] = (half_first, half_inside, half_last, halved_first, halved_last)


# --- erf(x / sqrt(2)) -----------------------------------------------------------------------
def erf_div(op: Any, x: Any) -> Any:  # erf(x / sqrt(2))
    return op.Erf(op.Div(x, _c("sqrt2")))


def erf_mul(op: Any, x: Any) -> Any:  # erf(x * (1/sqrt(2)))
    return op.Erf(op.Mul(x, _c("inv_sqrt2")))


ERF_ARGS: tuple[Builder, ...] = (erf_div, erf_mul)


# --- 0.044715 * x^3 and 0.044715 * x^2 --------------------------------------------------------
def cube_pow(op: Any, x: Any) -> Any:  # x**3 * 0.044715
    return op.Mul(op.Pow(x, _c("three")), _c("cubic"))


def cube_mul(op: Any, x: Any) -> Any:  # (x * (x * x)) * 0.044715, also ((x * x) * x) * 0.044715
    return op.Mul(op.Mul(x, op.Mul(x, x)), _c("cubic"))


def cube_scaled_first(op: Any, x: Any) -> Any:  # ((0.044715 * x) * x) * x
    return op.Mul(op.Mul(op.Mul(x, _c("cubic")), x), x)


def square_pow(op: Any, x: Any) -> Any:  # x**2 * 0.044715
    return op.Mul(op.Pow(x, _c("two_exp")), _c("cubic"))


def square_mul(op: Any, x: Any) -> Any:  # (x * x) * 0.044715
    return op.Mul(op.Mul(x, x), _c("cubic"))


def square_scaled_first(op: Any, x: Any) -> Any:  # (0.044715 * x) * x
    return op.Mul(op.Mul(x, _c("cubic")), x)


def _tanh_of_sum(cube: Builder) -> Builder:
    def build(op: Any, x: Any) -> Any:  # tanh(sqrt(2/pi) * (x + 0.044715 * x^3))
        return op.Tanh(op.Mul(op.Add(x, cube(op, x)), _c("scale")))

    build.__name__ = f"tanh_sum[{cube.__name__}]"
    return build


def _tanh_of_product(square: Builder) -> Builder:
    def build(op: Any, x: Any) -> Any:  # tanh((sqrt(2/pi) * x) * (1 + 0.044715 * x^2))
        return op.Tanh(op.Mul(op.Mul(x, _c("scale")), op.Add(square(op, x), _c("one_inner"))))

    build.__name__ = f"tanh_product[{square.__name__}]"
    return build


TANH_ARGS: tuple[Builder, ...] = (
    *(_tanh_of_sum(c) for c in (cube_pow, cube_mul, cube_scaled_first)),
    *(_tanh_of_product(s) for s in (square_pow, square_mul, square_scaled_first)),
)


def tolerance(dtype: np.dtype, rtol: float = RTOL) -> float:
    """The relative tolerance for a constant stored as `dtype`: `rtol`, or the dtype's epsilon
    when that is coarser (float16 stores sqrt(2) as 1.414, 1.5e-4 off)."""
    try:
        eps = float(np.finfo(dtype).eps)
    except (TypeError, ValueError):
        eps = 2.0**-7  # bfloat16 and narrower
    return max(rtol, eps)


def check_constants(
    ctx: RewriteContext, x: Value, constants: dict[str, Value], rtol: float = RTOL
) -> bool:
    """Every matched constant is one number equal to its expected value (within `rtol`) that
    does not broadcast x to a bigger shape; refuses naming the first one that is not."""
    rank = ctx.rank(x)
    for name, value in constants.items():
        expected, what = EXPECTED[name]
        array = ctx.constant(value)
        if array is None:  # pragma: no cover - the pattern matched a constant
            return ctx.refuse(f"{what} (%{value.name}) is not a constant")
        if array.size != 1:
            return ctx.refuse(
                f"{what} (%{value.name}) has shape {list(array.shape)}, not a single number"
            )
        if rank is None and array.ndim > 0:
            return ctx.refuse(f"x's rank is unknown and {what} (%{value.name}) is not a scalar")
        if rank is not None and array.ndim > rank:
            return ctx.refuse(
                f"{what} (%{value.name}) has {array.ndim} axes, x {rank}: it broadcasts the output"
            )
        actual = float(array.reshape(-1)[0])
        if name in EXACT:
            if actual != expected:
                return ctx.refuse(f"{what} is {actual:g}, not {expected:g}")
            continue
        tol = tolerance(array.dtype, rtol)
        if not abs(actual - expected) <= tol * abs(expected):
            return ctx.refuse(
                f"{what} (%{value.name}) is {actual:.8g}, not {expected:.8g} "
                f"(relative tolerance {tol:g})"
            )
    return True


class Emit:
    """What a GELU rule builds: the standard opset-20 Gelu (here) or ONNX Runtime's contrib ops
    (`fuse-bias-gelu`)."""

    dtypes: frozenset[DType] = frozenset({DType.FLOAT16, DType.FLOAT, DType.DOUBLE, DType.BFLOAT16})

    def check(self, ctx: RewriteContext, x: Value, approximate: str) -> bool:
        if ctx.opset < 20:
            return ctx.refuse(
                f"Gelu needs opset 20, the model imports {ctx.opset}: run upgrade-opset first"
            )
        return self.check_dtype(ctx, x, "Gelu")

    def check_dtype(self, ctx: RewriteContext, x: Value, op_name: str) -> bool:
        dtype = ctx.dtype(x)
        if dtype is None:
            return ctx.refuse("x's element type is unknown (run infer-shapes first)")
        if dtype not in self.dtypes:
            names = ", ".join(sorted(d.name.lower() for d in self.dtypes))
            return ctx.refuse(f"{op_name} takes {names}, x is {dtype.name.lower()}")
        return True

    def build(self, op: RewriteBuilder, x: Value, approximate: str) -> Value:
        if approximate == "tanh":
            return op.Gelu(x, approximate="tanh")  # type: ignore[no-any-return]
        return op.Gelu(x)  # type: ignore[no-any-return]


class GeluRule(RewriteRule):
    """One grouping of one GELU formula: `outer(op, x, inner(op, x))`."""

    def __init__(
        self, approximate: str, outer: Builder, inner: Builder, emit: Emit, rtol: float = RTOL
    ):
        self.approximate = approximate
        self.outer = outer
        self.inner = inner
        self.emit = emit
        self.rtol = rtol

    @property
    def label(self) -> str:
        kind = "Erf" if self.approximate == "none" else "Tanh"
        return f"Gelu{kind}[{self.outer.__name__}, {self.inner.__name__}]"

    def pattern(self, op: Any, x: Any) -> Any:
        return self.outer(op, x, self.inner(op, x))

    def check(self, ctx: RewriteContext, x: Value, **constants: Value) -> bool:
        dtype = ctx.dtype(x)
        if dtype is not None and not dtype.is_float:
            return ctx.refuse(f"x is {dtype.name.lower()}, not a float type")
        return check_constants(ctx, x, constants, self.rtol) and self.emit.check(
            ctx, x, self.approximate
        )

    def rewrite(self, op: RewriteBuilder, x: Value) -> Value:
        return self.emit.build(op, x, self.approximate)


def gelu_rules(emit: Emit, rtol: float = RTOL) -> list[RewriteRule]:
    """A rule for every grouping of both formulas (`OUTER` x (`ERF_ARGS` + `TANH_ARGS`))."""
    rules: list[RewriteRule] = []
    for outer in OUTER:
        rules += [GeluRule("none", outer, inner, emit, rtol) for inner in ERF_ARGS]
        rules += [GeluRule("tanh", outer, inner, emit, rtol) for inner in TANH_ARGS]
    return rules


@register_pass("fuse-gelu", "the erf and tanh GELU formulas -> Gelu (opset 20)")
@dataclass
class FuseGelu(RewritePass):
    rtol: float = RTOL  # fuse-gelu{rtol=1e-3}: relative tolerance of the formulas' constants

    def rules(self) -> list[RewriteRule]:
        return gelu_rules(Emit(), self.rtol)
