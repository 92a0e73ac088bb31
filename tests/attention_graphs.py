"""Attention subgraphs in the forms exporters write, built from a small spec (for the tests of
fuse-attention and fuse-rotary), with feeds and helpers to compare outputs.

`build(spec)` gives a model whose output is the attention output (merged to [b, s, H*Dv] or the
4-D [b, H, s, Dv]); the spec picks the layout of the inputs (3-D projections split into heads, or
4-D heads), how K^T is written (`transpose`, `folded` into the head split, or torch.onnx's
`flat` Reshape-Transpose-Reshape), how the scale is applied, the mask, torch's IsNaN guard and
grouped-query repeat_kv.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from graphopt.backends.onnx import to_onnx
from graphopt.backends.reference import Interpreter
from graphopt.ir import Builder, DType, Graph, Model, TensorType, Value

F = DType.FLOAT
MIN = float(np.finfo(np.float32).min)
INT64_MIN = np.iinfo(np.int64).min


@dataclass(frozen=True)
class Spec:
    batch: int = 2
    seq: int = 5
    kv_seq: int | None = None  # None: self-attention (L = S)
    q_heads: int = 4
    kv_heads: int = 4
    head: int = 8
    v_head: int | None = None
    layout: str = "3d"  # "3d": [b, s, H*D] inputs split into heads; "4d": [b, H, s, D] inputs
    kt: str = "transpose"  # "transpose", "folded", "flat"
    scale: str = "div"  # "div", "mul", "split", "q", "none"
    factor: float | None = None  # None: 1/sqrt(head)
    mask: str = "none"  # see _mask
    guard: bool = False
    merge: bool = True
    symbolic: bool = True
    opset: int = 23

    @property
    def length(self) -> int:
        return self.seq if self.kv_seq is None else self.kv_seq

    @property
    def dv(self) -> int:
        return self.head if self.v_head is None else self.v_head

    @property
    def scale_value(self) -> float:
        return 1 / math.sqrt(self.head) if self.factor is None else self.factor


def _const(b: Builder, values: Any, dtype: Any = np.int64) -> Value:
    return b.const(np.array(values, dtype))


def _heads(b: Builder, x3: Value, heads: int, size: int, perm: list[int]) -> Value:
    return b.Transpose(b.Reshape(x3, _const(b, [0, 0, heads, size])), perm=perm)


def _repeat(b: Builder, x: Value, spec: Spec) -> Value:
    """LLaMA's repeat_kv: [b, h, L, D] -> [b, h*n, L, D], each head n times in a row."""
    n = spec.q_heads // spec.kv_heads
    size = spec.head
    shape = b.Shape(x)
    target = b.Concat(
        b.Slice(shape, _const(b, [0]), _const(b, [2])), _const(b, [n]),
        b.Slice(shape, _const(b, [2]), _const(b, [4])), axis=0,
    )  # fmt: skip
    expanded = b.Expand(b.Unsqueeze(x, _const(b, [2])), target)
    return b.Reshape(expanded, _const(b, [0, spec.q_heads, -1, size]))


def _flat_kt(b: Builder, k: Value, head: int) -> Value:
    """torch.onnx's K^T: Reshape(Transpose(Reshape(K, [-1, L, D]), (0, 2, 1)), [b, H, D, L])."""
    shape = b.Shape(k)
    length = b.Slice(shape, _const(b, [-2]), _const(b, [-1]))
    lead = b.Slice(shape, _const(b, [INT64_MIN]), _const(b, [-2]))
    flat = b.Reshape(k, b.Concat(_const(b, [-1]), length, _const(b, [head]), axis=0))
    return b.Reshape(
        b.Transpose(flat, perm=[0, 2, 1]), b.Concat(lead, _const(b, [head]), length, axis=0)
    )


def build(spec: Spec) -> Model:
    g = Graph("attention")
    b = Builder(g)
    bs, ss = ("batch", "seq") if spec.symbolic else (spec.batch, spec.seq)
    ls = ss if spec.kv_seq is None else ("kv" if spec.symbolic else spec.length)
    hq, hk, d, dv = spec.q_heads, spec.kv_heads, spec.head, spec.dv
    kt: Value | None = None
    if spec.layout == "3d":
        q3 = g.add_input("q", TensorType(F, (bs, ss, hq * d)))
        k3 = g.add_input("k", TensorType(F, (bs, ls, hk * d)))
        v3 = g.add_input("v", TensorType(F, (bs, ls, hk * dv)))
        q = _heads(b, q3, hq, d, [0, 2, 1, 3])
        if spec.kt == "folded":
            kt = _heads(b, k3, hk, d, [0, 2, 3, 1])
            k = None
        else:
            k = _heads(b, k3, hk, d, [0, 2, 1, 3])
        v = _heads(b, v3, hk, dv, [0, 2, 1, 3])
    else:
        q = g.add_input("q", TensorType(F, (bs, hq, ss, d)))
        k = g.add_input("k", TensorType(F, (bs, hk, ls, d)))
        v = g.add_input("v", TensorType(F, (bs, hk, ls, dv)))
    if hk != hq:
        assert k is not None
        k, v = _repeat(b, k, spec), _repeat(b, v, replace(spec, head=dv))
    scale = spec.scale_value
    if kt is None:
        assert k is not None
        kt = _flat_kt(b, k, d) if spec.kt == "flat" else b.Transpose(k, perm=[0, 1, 3, 2])
    f32 = np.float32
    if spec.scale == "split":
        root = _const(b, math.sqrt(scale), f32)
        scores = b.MatMul(b.Mul(q, root), b.Mul(kt, root))
    elif spec.scale == "q":
        scores = b.MatMul(b.Mul(q, _const(b, scale, f32)), kt)
    elif spec.scale == "mul":
        scores = b.Mul(b.MatMul(q, kt), _const(b, scale, f32))
    elif spec.scale == "div":
        scores = b.Div(b.MatMul(q, kt), _const(b, 1 / scale, f32))
    else:
        scores = b.MatMul(q, kt)
    x = _mask(b, g, spec, scores, q, (bs, ss, ls))
    p = b.Softmax(x, axis=-1)
    if spec.guard:
        p = b.Where(b.IsNaN(p), _const(b, 0.0, f32), p)
    out = b.MatMul(p, v)
    if spec.merge:
        out = b.Reshape(b.Transpose(out, perm=[0, 2, 1, 3]), _const(b, [0, 0, hq * dv]))
    g.set_outputs([out], ["y"])
    return Model(g, opset_imports={"": spec.opset})


def _mask(
    b: Builder, g: Graph, spec: Spec, scores: Value, q: Value, dims: tuple[Any, Any, Any]
) -> Value:
    bs, ss, ls = dims
    f32 = np.float32
    kind = spec.mask
    if kind == "none":
        return scores
    if kind == "add_b11l":  # BERT: (1 - mask) * -10000 as an input [b, 1, 1, L]
        return b.Add(scores, g.add_input("mask", TensorType(F, (bs, 1, 1, ls))))
    if kind == "add_b1sl":
        return b.Add(scores, g.add_input("mask", TensorType(F, (bs, 1, ss, ls))))
    if kind in ("where_inf", "where_min", "where_neg"):
        cond = g.add_input("mask", TensorType(DType.BOOL, (bs, 1, ss, ls)))
        fill = {"where_inf": -np.inf, "where_min": MIN, "where_neg": MIN}[kind]
        if kind == "where_neg":  # Where(masked, fill, scores): the condition marks masked keys
            return b.Where(b.Not(cond), _const(b, fill, f32), scores)
        return b.Where(cond, scores, _const(b, fill, f32))
    if kind == "causal_le":  # transformers: Where(k <= q, 0, min) added to the scores
        seq = b.Squeeze(b.Shape(q, start=2, end=3), _const(b, [0]))
        idx = b.Range(_const(b, 0), seq, _const(b, 1))
        kidx = b.Unsqueeze(idx, _const(b, [0, 1, 2]))
        qidx = b.Unsqueeze(idx, _const(b, [0, 1, 3]))
        cond = b.And(_const(b, True, np.bool_), b.LessOrEqual(kidx, qidx))
        return b.Add(scores, b.Where(cond, _const(b, 0.0, f32), _const(b, MIN, f32)))
    if kind == "causal_tril":
        tril = np.tril(np.ones((spec.seq, spec.length), np.bool_))
        return b.Where(b.const(tril), scores, _const(b, MIN, f32))
    if kind == "causal_slice":  # GPT-2: bias[:, :, L - S : L, :L] of a [1, 1, N, N] tril buffer
        bias = b.const(np.tril(np.ones((1, 1, 16, 16), np.bool_)))
        s_dim = b.Shape(q, start=2, end=3)
        l_dim = b.Shape(q, start=2, end=3)
        rows = b.Slice(bias, b.Sub(l_dim, s_dim), l_dim, _const(b, [2]))
        cond = b.Slice(rows, _const(b, [0]), l_dim, _const(b, [3]))
        return b.Where(cond, scores, _const(b, MIN, f32))
    raise ValueError(kind)


def feeds(model: Model, spec: Spec, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = {"batch": spec.batch, "seq": spec.seq, "kv": spec.length}
    out: dict[str, np.ndarray] = {}
    for value in model.graph.inputs:
        assert isinstance(value.type, TensorType) and value.type.shape is not None
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in value.type.shape)
        if value.type.dtype == DType.BOOL:
            mask = rng.random(shape) > 0.3
            mask[..., 0] = True  # every query sees a key: no NaN rows in the original
            out[value.name or ""] = mask
        elif value.name == "mask":
            out[value.name] = np.where(rng.random(shape) > 0.3, 0.0, -10000.0).astype(np.float32)
        else:
            out[value.name or ""] = rng.standard_normal(shape).astype(np.float32)
    return out


def run_reference(model: Model, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    result = Interpreter(model).run(inputs)
    return [result[name] for name in model.graph.output_names]


def run_ort(model: Model, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        to_onnx(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {k: v for k, v in inputs.items() if k in names})


def assert_close(expected: list[np.ndarray], actual: list[np.ndarray], rtol: float = 1e-4) -> None:
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual, strict=True):
        assert e.shape == a.shape
        scale = max(float(np.abs(e).max()), 1e-6)
        assert float(np.abs(e - a).max()) <= rtol * scale


def ops(model: Model) -> list[str]:
    return [n.op for n in model.graph]
