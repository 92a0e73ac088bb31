"""fold-transpose-into-matmul: let the matrix product read its operands transposed.

Matches a MatMul (or a Gemm, or an ONNX Runtime FusedMatMul) whose operands come, each optionally,
through a Transpose and a Mul by a constant scalar (in either order: a scalar commutes with a
transpose), and a Mul or Div by a constant scalar on a FusedMatMul's or Gemm's output:

    MatMul(Transpose(a, perm=[1, 0]), Mul(b, s))  ->  Gemm(a, b, transA=1, alpha=s)
    MatMul(q, Mul(Transpose(k, perm=[0, 1, 3, 2]), s))
                                  ->  com.microsoft.FusedMatMul(q, k, transB=1, alpha=s)
    Div(FusedMatMul(a, b, alpha=x), c)  ->  FusedMatMul(a, b, alpha=x / c)

Algebra: a Transpose that swaps the last two axes is exactly what Gemm's `transA`/`transB` and
FusedMatMul's `transA`/`transB` do before the product; FusedMatMul's `transBatchA`/`transBatchB`
read a rank-R operand with the permutation [1, ..., R-2, 0, R-1], so a Transpose with that
permutation (or it followed by the swap) folds too. A Transpose feeding an operand that is already
transposed composes with the flags: the operand is read as transpose(transpose(x, p), f), that is
transpose(x, p∘f), and the fold applies when some flags give p∘f. Scalars commute with the
product: (s·A)(t·B) = s·t·(AB), and alpha scales the product (Gemm's beta is scaled with it when
the scalar sits on the output). Results differ from the unfused graph by rounding only.

Targets: 2-D operands become a standard Gemm (opset 11 or later: Gemm without C). N-D operands
need ONNX Runtime's `com.microsoft.FusedMatMul` (float32 on its CPU), emitted for target
`onnxruntime` only; for target `onnx` no standard op folds an N-D transpose, and the pass says so
once. A constant weight behind a Transpose is fold-constants' job (it folds the Transpose into the
constant), not this pass's.

Refuses, saying why: operand ranks or element types unknown; the element type is not one Gemm
(or FusedMatMul on ONNX Runtime's CPU: float32) takes; a scalar whose broadcast would change the
operand's shape or dtype; opset below 11. A Transpose that no flags can express (a head
permutation like [0, 2, 1, 3]) is simply not folded, and not reported. A matched Transpose or Mul
read elsewhere stays for its other readers.

Ordering: run after fuse-attention (the attention pattern starts from a plain MatMul(Q, K^T) and
its scale; folding them first would hide them) and after fold-constants (weights already
transposed in place).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.ir.core import Value
from graphopt.ir.ops.contrib_matmul import fused_matmul_perm
from graphopt.ir.types import DType
from graphopt.passes.manager import register_pass
from graphopt.passes.rewrite import Const, RewriteBuilder, RewriteContext, RewritePass, RewriteRule

__all__ = ["FoldTransposeIntoMatMul"]

FUSED_MATMUL = "com.microsoft.FusedMatMul"
GEMM_TYPES = frozenset(
    {DType.FLOAT16, DType.FLOAT, DType.DOUBLE, DType.BFLOAT16, DType.INT32, DType.INT64,
     DType.UINT32, DType.UINT64}
)  # fmt: skip
FLOATS = frozenset({DType.FLOAT16, DType.FLOAT, DType.DOUBLE, DType.BFLOAT16})
ND_NOTE = (
    "MatMul of N-D operands behind a Transpose kept: no standard ONNX op reads an N-D operand "
    "transposed (target onnxruntime folds it into com.microsoft.FusedMatMul)"
)


def _scalar(array: np.ndarray) -> bool:
    return array.size == 1 and array.dtype.kind == "f"


def _side(op: Any, x: Any, tag: str) -> Any:
    """An operand: x, optionally through a Transpose, optionally through a Mul by a scalar."""
    transposed = op.Transpose(x, _optional=True, _name=f"t{tag}")
    return op.Mul(transposed, Const(_scalar, name=f"s{tag}"), _optional=True, _name=f"m{tag}")


@dataclass
class _Operand:
    value: Value  # what the new node reads
    trans: bool
    batch: bool
    scale: float
    folded: bool  # a Transpose or Mul was folded


def _operand(
    ctx: RewriteContext, tag: str, base: Value, flags: tuple[bool, bool], allow_batch: bool
) -> _Operand | str | None:
    """How the root reads `base` once the matched Transpose/Mul on side `tag` are folded; a refusal
    reason, or None when the Transpose cannot be expressed by flags (not a refusal)."""
    captured = ctx.match.captured
    transpose, mul = captured.get(f"t{tag}"), captured.get(f"m{tag}")
    rank = ctx.rank(base)
    if (transpose is not None or mul is not None) and rank is None:
        return f"the rank of %{base.name} is unknown"
    scale = 1.0
    if mul is not None:
        scalar = ctx.constant(ctx.match.bindings[f"s{tag}"])
        assert scalar is not None and rank is not None
        if scalar.ndim > rank or DType.from_numpy(scalar.dtype) != ctx.dtype(base):  # type: ignore[operator]
            return f"{mul.describe()}: its scalar would change the operand's shape or type"
        scale = float(np.asarray(scalar, np.float64).reshape(()))
    trans, batch = flags
    if transpose is not None:
        assert rank is not None
        perm = list(transpose.get_attr("perm") or range(rank)[::-1])
        current = fused_matmul_perm(rank, trans, batch)
        wanted = [perm[i] for i in current]  # transpose(transpose(x, perm), current)
        found = _flags_for(wanted, rank, allow_batch)
        if found is None:
            return None
        trans, batch = found
    return _Operand(base, trans, batch, scale, transpose is not None or mul is not None)


def _flags_for(perm: list[int], rank: int, allow_batch: bool) -> tuple[bool, bool] | None:
    for batch in (False, True) if allow_batch and rank >= 3 else (False,):
        for trans in (False, True):
            if rank >= 2 or not trans:
                if fused_matmul_perm(rank, trans, batch) == perm:
                    return trans, batch
    return None


def _target(ctx: RewriteContext) -> str:
    return ctx.pass_context.target if ctx.pass_context is not None else "onnx"


class _FoldOperands(RewriteRule):
    """Root(side(a), side(b)): fold each side's Transpose and scalar into the root's flags."""

    allow_external_uses = True
    root_op = ""

    def pattern(self, op: Any, a: Any, b: Any) -> Any:
        return op.op(self.root_op, _side(op, a, "a"), _side(op, b, "b"), _name="root",
                     _allow_other_inputs=self.root_op == "Gemm")  # fmt: skip

    def plan(self, ctx: RewriteContext, a: Value, b: Value) -> tuple[str, dict[str, Any]] | None:
        """(op to emit, its attributes) or None after refusing (or when nothing folds)."""
        raise NotImplementedError

    def check(self, ctx: RewriteContext, a: Value, b: Value) -> bool:
        return self.plan(ctx, a, b) is not None

    def rewrite(self, op: RewriteBuilder, a: Value, b: Value) -> Any:
        planned = self.plan(op.ctx, a, b)
        assert planned is not None
        name, attrs = planned
        root = op.ctx.node("root")
        if name == FUSED_MATMUL and op.ctx.pass_context is not None:
            op.ctx.pass_context.model.opset_imports.setdefault("com.microsoft", 1)
        return op.op(name, a, b, *root.inputs[2:], _attrs=attrs)

    def operands(
        self, ctx: RewriteContext, a: Value, b: Value, flags: list[tuple[bool, bool]], batch: bool
    ) -> tuple[_Operand, _Operand] | None:
        sides = []
        for tag, base, f in (("a", a, flags[0]), ("b", b, flags[1])):
            found = _operand(ctx, tag, base, f, batch)
            if isinstance(found, str):
                ctx.refuse(found)
                return None
            if found is None:
                return None
            sides.append(found)
        if not (sides[0].folded or sides[1].folded):
            return None  # nothing to fold: not a refusal
        return sides[0], sides[1]


class MatMulTransposes(_FoldOperands):
    """MatMul(Transpose?(Mul?(a)), Transpose?(Mul?(b))) -> Gemm (2-D) or FusedMatMul (N-D)."""

    root_op = "MatMul"

    def plan(self, ctx: RewriteContext, a: Value, b: Value) -> tuple[str, dict[str, Any]] | None:
        captured = ctx.match.captured
        if "ta" not in captured and "tb" not in captured:
            return None  # only scalars: ONNX Runtime's MatMulScaleFusion's business
        ranks = (ctx.rank(a), ctx.rank(b))
        dtype = ctx.dtype(a)
        if ranks == (2, 2):
            if ctx.opset < 11:
                return _refuse(ctx, f"Gemm without C needs opset 11, the model imports {ctx.opset}")
            if dtype not in GEMM_TYPES:
                return _refuse(ctx, f"Gemm does not take {getattr(dtype, 'name', 'unknown')}")
            sides = self.operands(ctx, a, b, [(False, False)] * 2, batch=False)
            if sides is None:
                return None
            return "Gemm", _gemm_attrs(1.0, sides)
        if _target(ctx) != "onnxruntime":
            if ctx.pass_context is not None and None not in ranks:
                ctx.pass_context.note(ND_NOTE, kind="refused")
            return None if None not in ranks else _refuse(ctx, "operand ranks are unknown")
        if dtype is not DType.FLOAT:
            name = getattr(dtype, "name", "unknown")
            return _refuse(ctx, f"ONNX Runtime's CPU FusedMatMul runs float32 only, not {name}")
        batch = ranks[0] == ranks[1] and (ranks[0] or 0) >= 3
        sides = self.operands(ctx, a, b, [(False, False)] * 2, batch)
        if sides is None:
            return None
        return FUSED_MATMUL, _fused_attrs(1.0, sides)


class FusedMatMulOperands(_FoldOperands):
    """FusedMatMul(Transpose?(Mul?(a)), ...) -> FusedMatMul with composed flags and alpha."""

    root_op = FUSED_MATMUL

    def plan(self, ctx: RewriteContext, a: Value, b: Value) -> tuple[str, dict[str, Any]] | None:
        root = ctx.node("root")
        ranks = (ctx.rank(a), ctx.rank(b))
        batch = ranks[0] == ranks[1] and (ranks[0] or 0) >= 3
        flags = [
            (bool(root.get_attr("transA", 0)), bool(root.get_attr("transBatchA", 0))),
            (bool(root.get_attr("transB", 0)), bool(root.get_attr("transBatchB", 0))),
        ]
        sides = self.operands(ctx, a, b, flags, batch)
        if sides is None:
            return None
        return FUSED_MATMUL, _fused_attrs(float(root.get_attr("alpha", 1.0)), sides)


class GemmOperands(_FoldOperands):
    """Gemm(Transpose?(Mul?(a)), Transpose?(Mul?(b)), C) -> Gemm with flipped trans, scaled alpha."""

    root_op = "Gemm"

    def plan(self, ctx: RewriteContext, a: Value, b: Value) -> tuple[str, dict[str, Any]] | None:
        root = ctx.node("root")
        if ctx.dtype(a) not in FLOATS and (
            "ma" in ctx.match.captured or "mb" in ctx.match.captured
        ):
            return _refuse(ctx, "a scalar folds into alpha only for float Gemm")
        flags = [
            (bool(root.get_attr("transA", 0)), False),
            (bool(root.get_attr("transB", 0)), False),
        ]
        sides = self.operands(ctx, a, b, flags, batch=False)
        if sides is None:
            return None
        attrs = _gemm_attrs(float(root.get_attr("alpha", 1.0)), sides)
        if "beta" in root.attrs:
            attrs["beta"] = float(root.get_attr("beta"))
        return "Gemm", attrs


Plan = tuple[str, dict[str, Any]]  # the op to emit and its attributes


def _refuse(ctx: RewriteContext, reason: str) -> Plan | None:
    ctx.refuse(reason)
    return None


def _gemm_attrs(alpha: float, sides: tuple[_Operand, _Operand]) -> dict[str, Any]:
    a, b = sides
    attrs: dict[str, Any] = {"transA": int(a.trans), "transB": int(b.trans)}
    alpha *= a.scale * b.scale
    if alpha != 1.0:
        attrs["alpha"] = float(np.float32(alpha))
    return attrs


def _fused_attrs(alpha: float, sides: tuple[_Operand, _Operand]) -> dict[str, Any]:
    a, b = sides
    attrs: dict[str, Any] = {
        "alpha": float(np.float32(alpha * a.scale * b.scale)),
        "transA": int(a.trans),
        "transB": int(b.trans),
    }
    if a.batch:
        attrs["transBatchA"] = 1
    if b.batch:
        attrs["transBatchB"] = 1
    return attrs


class _ScaleOutput(RewriteRule):
    """Mul/Div(root(a, b, ...), s) with a constant scalar s -> root with alpha (and beta) scaled."""

    root_op = ""
    scale_op = ""

    def pattern(self, op: Any, a: Any, b: Any) -> Any:
        inner = op.op(self.root_op, a, b, _name="inner", _allow_other_inputs=True)
        return op.op(self.scale_op, inner, Const(_scalar, name="s"), _name="root")

    def _factor(self, ctx: RewriteContext, s: Value) -> float | None:
        inner = ctx.node("inner")
        out = inner.outputs[0]
        scalar = ctx.constant(s)
        assert scalar is not None
        if ctx.dtype(out) not in FLOATS:
            ctx.refuse("alpha scales only float products")
            return None
        rank = ctx.rank(out)
        if rank is None or scalar.ndim > rank or DType.from_numpy(scalar.dtype) != ctx.dtype(out):
            ctx.refuse("the scalar would change the product's shape or type")
            return None
        value = float(np.asarray(scalar, np.float64).reshape(()))
        if self.scale_op == "Div":
            if value == 0.0:
                ctx.refuse("division by zero")
                return None
            value = 1.0 / value
        return value

    def check(self, ctx: RewriteContext, s: Value) -> bool:
        return self._factor(ctx, s) is not None

    def rewrite(self, op: RewriteBuilder, s: Value) -> Any:
        factor = self._factor(op.ctx, s)
        assert factor is not None
        inner = op.ctx.node("inner")
        attrs: dict[str, Any] = dict(inner.attrs)
        attrs["alpha"] = float(np.float32(float(inner.get_attr("alpha", 1.0)) * factor))
        if inner.op == "Gemm" and len(inner.inputs) > 2 and inner.inputs[2] is not None:
            attrs["beta"] = float(np.float32(float(inner.get_attr("beta", 1.0)) * factor))
        return op.op(inner.op, *inner.inputs, _attrs=attrs)


def _scale_rules() -> list[RewriteRule]:
    rules: list[RewriteRule] = []
    for root in (FUSED_MATMUL, "Gemm"):
        for scale in ("Mul", "Div"):
            rule = type(f"{scale}Into{root.split('.')[-1]}", (_ScaleOutput,), {})()
            rule.root_op, rule.scale_op = root, scale  # type: ignore[attr-defined]
            rules.append(rule)
    return rules


@register_pass(
    "fold-transpose-into-matmul",
    "fold Transposes and scalar scales around MatMul into Gemm/FusedMatMul flags and alpha",
)
@dataclass
class FoldTransposeIntoMatMul(RewritePass):
    def rules(self) -> list[RewriteRule]:
        return [MatMulTransposes(), FusedMatMulOperands(), GemmOperands(), *_scale_rules()]
