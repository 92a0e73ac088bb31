"""fuse-bias-gelu: GELU (and the bias Add before it) as ONNX Runtime's BiasGelu / FastGelu.

Target "onnxruntime" only: the ops are ONNX Runtime contrib ops (`com.microsoft`); for target
"onnx" the pass changes nothing and says so once. Rules, applied to a fixpoint:

| rule | rewrite |
| --- | --- |
| BiasGelu | `Gelu(x + bias)` (approximate="none", or com.microsoft.Gelu) -> `BiasGelu(x, bias)` |
| FastGeluBias | `Gelu(x + bias, approximate="tanh")`, `FastGelu(x + bias)` -> `FastGelu(x, bias)` |
| FastGelu | `Gelu(x, approximate="tanh")` -> `FastGelu(x)` |
| GeluErf[...], GeluTanh[...] | the raw formulas of `fuse-gelu` -> `com.microsoft.Gelu(x)` / |
| | `FastGelu(x)` (any opset); the rules above then merge them with a bias Add |

`bias` is the Add operand that is 1-D with as many elements as the other operand's last (static)
dim, so `x + bias` has x's shape. A standard `Gelu(x)` without bias stays: in ONNX Runtime 1.32
the opset-20 Gelu is as fast as its contrib Gelu (405 against 409 us on [1, 128, 3072], 2 threads,
both in one session), the opset-20 tanh Gelu as fast as FastGelu (255 against 253 us), while
BiasGelu beats Add + Gelu (463 against 111 + 418 us). ONNX Runtime makes these fusions itself at
ORT_ENABLE_EXTENDED and above, but not everywhere (not for a GELU that is a graph output, not for
the dynamo exporter's `x * (0.5 * (1 + erf(x / sqrt(2))))`); this pass makes them at every level
and for runtimes that read the model as written.

Why equal: BiasGelu(x, b) is defined as Gelu(x + b) (the erf form), FastGelu(x, b) as the tanh
approximation of x + b with the constants sqrt(2/pi) and 0.044715, com.microsoft.Gelu as the erf
form: the formulas `fuse-gelu` documents, evaluated once instead of node by node.

Refuses, saying why: no operand of the Add is 1-D over the other's last axis (or that dim is not
static); an element type ONNX Runtime's CPU kernels do not run (float32 and float16 only); the
constants and groupings `fuse-gelu` refuses.

Ordering: after `fuse-gelu` (so standard Gelu nodes exist where the opset allows) and before any
pass that folds the bias Add into its MatMul (`fuse-matmul-add`), which would hide the bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from graphopt.ir.core import Value
from graphopt.ir.types import DType
from graphopt.passes.fusion._contrib import MS, ContribRewritePass
from graphopt.passes.fusion.gelu import RTOL, Emit, gelu_rules
from graphopt.passes.manager import register_pass
from graphopt.passes.rewrite import RewriteContext, RewriteRule
from graphopt.passes.rewrite.rule import RewriteBuilder

__all__ = ["FuseBiasGelu", "split_bias"]

ORT_DTYPES = frozenset({DType.FLOAT, DType.FLOAT16})


def split_bias(ctx: RewriteContext, a: Value, b: Value) -> tuple[Value, Value] | None:
    """(x, bias) of `a + b`: bias is 1-D with the length of x's last (static) dim; None after
    refusing when neither operand is."""
    for x, bias in ((a, b), (b, a)):
        bias_shape, x_shape = ctx.shape(bias), ctx.shape(x)
        if bias_shape is None or x_shape is None or len(bias_shape) != 1 or not x_shape:
            continue
        if isinstance(x_shape[-1], int) and bias_shape[0] == x_shape[-1]:
            return x, bias
    ctx.refuse("no operand of the Add is a 1-D bias over the other's last (static) axis")
    return None


def _check_dtype(ctx: RewriteContext, x: Value, op_name: str) -> bool:
    dtype = ctx.dtype(x)
    if dtype not in ORT_DTYPES:
        name = dtype.name.lower() if dtype is not None else "of unknown type"
        return ctx.refuse(f"ONNX Runtime's CPU {op_name} runs float32 and float16, x is {name}")
    return True


class ContribEmit(Emit):
    """The raw formulas become com.microsoft.Gelu (erf) or FastGelu (tanh), at any opset."""

    dtypes = ORT_DTYPES

    def check(self, ctx: RewriteContext, x: Value, approximate: str) -> bool:
        return _check_dtype(ctx, x, "Gelu" if approximate == "none" else "FastGelu")

    def build(self, op: RewriteBuilder, x: Value, approximate: str) -> Value:
        name = "Gelu" if approximate == "none" else "FastGelu"
        return op.op(f"{MS}.{name}", x)  # type: ignore[no-any-return]


class BiasGelu(RewriteRule):
    """Gelu(x + bias) -> BiasGelu(x, bias): BiasGelu is defined as exactly that."""

    def __init__(self, gelu: str, **attrs: Any):
        self.gelu = gelu
        self.attrs = attrs

    @property
    def label(self) -> str:
        return f"BiasGelu[{self.gelu}]"

    def pattern(self, op: Any, a: Any, b: Any) -> Any:
        return op.op(self.gelu, op.Add(a, b), **self.attrs)

    def check(self, ctx: RewriteContext, a: Value, b: Value) -> bool:
        parts = split_bias(ctx, a, b)
        return parts is not None and _check_dtype(ctx, parts[0], "BiasGelu")

    def rewrite(self, op: RewriteBuilder, a: Value, b: Value) -> Value | None:
        parts = split_bias(op.ctx, a, b)
        return None if parts is None else op.op(f"{MS}.BiasGelu", *parts)


class FastGeluBias(BiasGelu):
    """Gelu(x + bias, approximate="tanh") -> FastGelu(x, bias): FastGelu adds its bias first."""

    @property
    def label(self) -> str:
        return f"FastGeluBias[{self.gelu}]"

    def check(self, ctx: RewriteContext, a: Value, b: Value) -> bool:
        parts = split_bias(ctx, a, b)
        return parts is not None and _check_dtype(ctx, parts[0], "FastGelu")

    def rewrite(self, op: RewriteBuilder, a: Value, b: Value) -> Value | None:
        parts = split_bias(op.ctx, a, b)
        return None if parts is None else op.op(f"{MS}.FastGelu", *parts)


class FastGelu(RewriteRule):
    """Gelu(x, approximate="tanh") -> FastGelu(x): the same tanh formula."""

    def pattern(self, op: Any, x: Any) -> Any:
        return op.Gelu(x, approximate="tanh")

    def check(self, ctx: RewriteContext, x: Value) -> bool:
        return _check_dtype(ctx, x, "FastGelu")

    def rewrite(self, op: RewriteBuilder, x: Value) -> Value:
        return op.op(f"{MS}.FastGelu", x)  # type: ignore[no-any-return]


@register_pass(
    "fuse-bias-gelu", "Add + Gelu -> BiasGelu, tanh GELU -> FastGelu (target onnxruntime)"
)
@dataclass
class FuseBiasGelu(ContribRewritePass):
    not_standard = "BiasGelu and FastGelu are ONNX Runtime contrib ops"

    rtol: float = RTOL  # relative tolerance of the raw formulas' constants (as in fuse-gelu)

    def rules(self) -> list[RewriteRule]:
        return [
            BiasGelu("Gelu", approximate="none"),
            BiasGelu(f"{MS}.Gelu"),
            FastGeluBias("Gelu", approximate="tanh"),
            FastGeluBias(f"{MS}.FastGelu"),
            FastGelu(),
            *gelu_rules(ContribEmit(), self.rtol),
        ]
