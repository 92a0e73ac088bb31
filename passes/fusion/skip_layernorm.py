"""fuse-skip-layernorm: a residual Add feeding a norm -> ONNX Runtime's fused skip norms.

Only for `--target onnxruntime` (with the default target `onnx` the pass changes nothing and says
so once). Matches

    LayerNormalization(Add(a, b) [+ bias], gamma, beta?)   (last axis only)
    RMSNormalization(Add(a, b) [+ bias], gamma)            (last axis only)

(`bias` a constant `[H]` added to one operand first: `Add(Add(a, bias), b)`, as BERT's dense
output writes it) and writes `com.microsoft.SkipLayerNormalization(input, skip, gamma, beta,
bias)` or `com.microsoft.SkipSimplifiedLayerNormalization(input, skip, gamma, bias)` with the
norm's epsilon. When the sum is read elsewhere too (pre-LN transformers such as GPT-2 and LLaMA
add the next residual to it), those readers are moved to the fused node's fourth output,
`input_skip_bias_sum`, so the Add disappears either way.

Equal because the fused op computes `s = input + skip (+ bias)`, then exactly the norm of `s`
over the last axis with the same epsilon, gamma and beta, and gives `s` as its fourth output.
Rounding differs: the sum is formed as `(input + skip) + bias` whatever order the graph used;
ONNX Runtime computes float16 in float32 and the variance as `E[s^2] - mean^2` (the standard op:
from the centered values), which loses digits only when |mean| is far above the standard
deviation.

Refuses, naming the node: a norm over more than the last axis, with stash_type other than float32,
or whose Mean/InvStdDev outputs are read; an element type ONNX Runtime's kernels lack (float,
float16, bfloat16 and double are there); an input of rank other than 2 or 3; operands whose
shapes are not provably the sum's shape (`input`) and that shape or `[1, S, H]` / `[S, H]`
(`skip`) (unknown dims prove nothing; run infer-shapes); gamma, beta or bias that are not `[H]`
(constants are reshaped to it); a float16 skip that is a constant (ONNX Runtime's prepacked float16
skip reads only its first row); a bias Add whose result is read elsewhere (the plain Add(a, b)
form is then tried on the outer Add).

Order: after `fuse-layernorm` and `fuse-rmsnorm`, and before `fuse-matmul-add` and other passes
that would take the bias Add into a MatMul.

Options `layernorm` and `rmsnorm` (both true) choose the rewrites. Speed: ONNX Runtime 1.32's CPU
kernel of SkipLayerNormalization is slower than Add + LayerNormalization (1.4x to 3.2x, measured),
and SkipSimplifiedLayerNormalization about as fast as Add + RMSNormalization: the fusion pays on
ONNX Runtime's GPU providers, not on its CPU one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from graphopt.ir.core import Graph, Value
from graphopt.ir.types import Dim, DType
from graphopt.passes.manager import PassContext, register_pass
from graphopt.passes.rewrite import Const, RewriteBuilder, RewriteContext, RewritePass, RewriteRule

__all__ = ["FuseSkipLayerNorm", "SkipNorm"]

SKIP_LAYER_NORM = "com.microsoft.SkipLayerNormalization"
SKIP_SIMPLIFIED = "com.microsoft.SkipSimplifiedLayerNormalization"
LAYER_NORM, RMS_NORM = "LayerNormalization", "RMSNormalization"
RUNTIME_DTYPES = (DType.FLOAT, DType.FLOAT16, DType.BFLOAT16, DType.DOUBLE)


def _same_dims(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> bool:
    """The dims are provably equal: the same numbers or the same symbols (unknowns never)."""
    return len(a) == len(b) and all(x is not None and x == y for x, y in zip(a, b, strict=True))


class SkipNorm(RewriteRule):
    """N(Add(a, b) [+ bias], gamma[, beta]) -> Skip(Simplified)LayerNormalization."""

    allow_external_uses: ClassVar[bool] = True  # the sum's other readers move to output 3

    def __init__(self, norm: str, with_bias: bool):
        self.norm = norm
        self.with_bias = with_bias
        self.fused = SKIP_LAYER_NORM if norm == "LayerNormalization" else SKIP_SIMPLIFIED

    @property
    def label(self) -> str:
        short = "SkipLayerNorm" if self.norm == LAYER_NORM else "SkipRMSNorm"
        return f"{short}{'+bias' if self.with_bias else ''}"

    def pattern(self, op: Any, a: Any, b: Any, gamma: Any) -> Any:
        first = op.Add(a, Const(name="bias"), _name="bias_add") if self.with_bias else a
        total = op.Add(first, b, _name="add")
        return op.op(
            self.norm, total, gamma, _name="norm", _allow_other_inputs=True,
            _allow_other_outputs=True,
        )  # fmt: skip

    # ----- checks ---------------------------------------------------------------------------------

    def _plan(
        self, ctx: RewriteContext, a: Value, b: Value, gamma: Value, bias: Value | None
    ) -> dict[str, Any] | None:
        """What to build: input/skip order, hidden size, and the 1-D parameters (arrays or
        values), or None after refusing."""
        norm, add = ctx.node("norm"), ctx.node("add")
        if any(v.is_used for v in norm.outputs[1:]):
            ctx.refuse(f"the {self.norm}'s Mean/InvStdDev outputs are read")
            return None
        if int(norm.get_attr("stash_type", 1)) != 1:
            ctx.refuse(f"the {self.norm} computes in stash_type {norm.get_attr('stash_type')}")
            return None
        dtype, out = ctx.dtype(add.outputs[0]), ctx.shape(add.outputs[0])
        if dtype not in RUNTIME_DTYPES:
            ctx.refuse(f"ONNX Runtime has no skip-norm kernel for {dtype}")
            return None
        if out is None or len(out) not in (2, 3):
            ctx.refuse("the sum is not of rank 2 or 3")
            return None
        axis = int(norm.get_attr("axis", -1))
        if axis not in (-1, len(out) - 1):
            ctx.refuse(f"the {self.norm} normalizes from axis {axis}, not just the last one")
            return None
        hidden = out[-1]
        if not isinstance(hidden, int):
            ctx.refuse("the hidden size (last dim) is not static")
            return None
        roles = self._roles(ctx, a, b, bias)
        if roles is None:
            return None
        plan: dict[str, Any] = {"input": roles[0], "skip": roles[1], "hidden": hidden}
        if dtype == DType.FLOAT16 and ctx.constant(roles[1]) is not None:
            ctx.refuse("the float16 skip is a constant, which ONNX Runtime mis-reads (prepacked)")
            return None
        beta = norm.inputs[2] if len(norm.inputs) > 2 else None
        named: list[tuple[str, Value | None]] = [("gamma", gamma)]
        if self.norm == LAYER_NORM:
            named.append(("beta", beta))
        if self.with_bias:
            bias_add = ctx.node("bias_add")
            if any(u is not add for u in bias_add.outputs[0].users()):
                ctx.refuse("the bias Add's result is also read elsewhere")
                return None
            named.append(("bias", bias))
        for name, value in named:
            param = self._vector(ctx, name, value, hidden, dtype)
            if param is False:
                return None
            plan[name] = param
        return plan

    def _roles(
        self, ctx: RewriteContext, a: Value, b: Value, bias: Value | None
    ) -> tuple[Value, Value] | None:
        """(input, skip): input has the sum's full shape; skip that shape, [1, S, H] or [S, H]."""
        add = ctx.node("add")
        sa, sb = ctx.shape(a), ctx.shape(b)
        if sa is None or sb is None:
            ctx.refuse("the shapes of the Add's operands are unknown")
            return None
        if bias is not None:  # a + bias must keep a's shape: bias is [H] (checked as a vector)
            if not sa or sa[-1] != sb[-1] or len(ctx.shape(bias) or ()) > len(sa):
                ctx.refuse("the bias may broadcast the other operand")
                return None
        for x, sx, y, sy in ((a, sa, b, sb), (b, sb, a, sa)):
            if len(sx) not in (2, 3):
                continue
            if _same_dims(sx, sy) or (
                len(sx) == 3 and _same_dims(sx[1:], sy[-2:]) and (len(sy) == 2 or sy[0] == 1)
            ):
                return x, y
        ctx.refuse(
            f"cannot prove that the operands {_fmt(sa)} and {_fmt(sb)} have the sum's shape (or "
            f"the skip [1,S,H] or [S,H]); the sum is {_fmt(ctx.shape(add.outputs[0]))}"
        )
        return None

    @staticmethod
    def _vector(
        ctx: RewriteContext, name: str, value: Value | None, hidden: int, dtype: DType
    ) -> Any:
        """A gamma/beta/bias operand as a 1-D [hidden] constant array, a 1-D [hidden] value, None
        (absent), or False after refusing."""
        if value is None:
            return None
        if ctx.dtype(value) != dtype:
            return ctx.refuse(f"{name} is {ctx.dtype(value)}, the sum {dtype}")
        array = ctx.constant(value)
        if array is not None:
            if array.size == hidden and all(d == 1 for d in array.shape[:-1]):
                return np.ascontiguousarray(array.reshape(hidden))
            if array.size == 1:
                return np.full(hidden, array.reshape(()), array.dtype)
            return ctx.refuse(f"{name} {list(array.shape)} is not [{hidden}]")
        if not value.is_graph_input or ctx.shape(value) != (hidden,):
            return ctx.refuse(f"{name} is neither a constant nor a graph input of shape [{hidden}]")
        return value

    def check(
        self, ctx: RewriteContext, a: Value, b: Value, gamma: Value, bias: Value | None = None
    ) -> bool:
        return self._plan(ctx, a, b, gamma, bias) is not None

    # ----- rewrite --------------------------------------------------------------------------------

    def rewrite(
        self, op: RewriteBuilder, a: Value, b: Value, gamma: Value, bias: Value | None = None
    ) -> Any:
        ctx = op.ctx
        plan = self._plan(ctx, a, b, gamma, bias)
        assert plan is not None
        norm, add = ctx.node("norm"), ctx.node("add")
        # at the Add: every operand is defined there, and the Add's other readers come after it
        op.insert_before = add

        originals = {
            "gamma": gamma,
            "beta": norm.inputs[2] if len(norm.inputs) > 2 else None,
            "bias": bias,
        }

        def operand(name: str) -> Value | None:
            param = plan.get(name)
            if param is None or isinstance(param, Value):
                return param
            original = originals[name]
            if original is not None and original.is_constant:
                kept = original.const_value
                if kept is not None and kept.shape == param.shape:
                    return original  # a 1-D initializer already
            return op.const(param)

        inputs = [plan["input"], plan["skip"], operand("gamma")]
        if self.norm == LAYER_NORM:
            inputs.append(operand("beta"))
        if self.with_bias:
            inputs.append(operand("bias"))
        while inputs[-1] is None:
            inputs.pop()
        epsilon = float(norm.get_attr("epsilon", 1e-5))
        outputs = op.op(self.fused, *inputs, _outputs=4, epsilon=epsilon)
        result, mean, inv_std, total = outputs
        mean.name = inv_std.name = ""  # omitted optional outputs
        others = [(u, i) for u, i in add.outputs[0].uses if u is not norm]
        for user, index in others:
            user.set_input(index, total)
        if not others:
            total.name = ""
        context = ctx.pass_context
        if context is not None:
            context.model.opset_imports.setdefault("com.microsoft", 1)
        return [result, *norm.outputs[1:]]


def _fmt(shape: Any) -> str:
    if shape is None:
        return "[*]"
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


@register_pass(
    "fuse-skip-layernorm",
    "residual Add + LayerNorm/RMSNorm -> com.microsoft.Skip(Simplified)LayerNormalization "
    "(target onnxruntime)",
)
@dataclass
class FuseSkipLayerNorm(RewritePass):
    layernorm: bool = True  # LayerNormalization -> SkipLayerNormalization
    rmsnorm: bool = True  # RMSNormalization -> SkipSimplifiedLayerNormalization

    def rules(self) -> list[RewriteRule]:
        norms = [n for n, on in ((LAYER_NORM, self.layernorm), (RMS_NORM, self.rmsnorm)) if on]
        return [SkipNorm(norm, with_bias) for norm in norms for with_bias in (True, False)]

    def run_on_graph(self, graph: Graph, context: PassContext) -> bool:
        if context.target != "onnxruntime":
            context.note(
                "fuse-skip-layernorm writes ONNX Runtime contrib ops: nothing done for target "
                f"'{context.target}' (use --target onnxruntime)"
            )
            return False
        return super().run_on_graph(graph, context)
