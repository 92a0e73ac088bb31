"""fuse-rotary: LLaMA's rotate_half rotary embedding becomes ONNX RotaryEmbedding (3-D when x is a
head split), whichever way the cos/sin caches are made (computed from positions, cached tables
gathered by position ids, constants, positions bounded by a constant table); outputs equal in the
reference interpreter and ONNX Runtime; refusals leave the graph alone and say why."""

from __future__ import annotations

import numpy as np
import pytest
from attention_graphs import assert_close, ops, run_ort, run_reference
from hypothesis import given
from hypothesis import strategies as st

from graphopt.ir import Builder, DType, Graph, Model, TensorType, Value
from graphopt.passes import optimize_model

F = DType.FLOAT


def _c(b: Builder, values, dtype=np.int64) -> Value:
    return b.const(np.array(values, dtype))


def build(
    caches: str = "computed", heads: int = 2, head: int = 8, rotary: int | None = None,
    split: bool = True, scaling: float | None = None, symbolic: bool = True, seq: int = 5,
    opset: int = 23,
) -> Model:  # fmt: skip
    """x3 [b, s, H*D] -> heads -> rotary -> merged back (`split`; else a 4-D input x and
    output); `caches` says how cos/sin are made."""
    g = Graph("rotary")
    b = Builder(g)
    bs, ss = ("batch", "seq") if symbolic else (2, seq)
    if split:
        x3 = g.add_input("x", TensorType(F, (bs, ss, heads * head)))
        x = b.Transpose(b.Reshape(x3, _c(b, [0, 0, heads, head])), perm=[0, 2, 1, 3])
        s_dim = b.Shape(x3, start=1, end=2)
    else:
        x = g.add_input("x", TensorType(F, (bs, heads, ss, head)))
        s_dim = b.Shape(x, start=2, end=3)
    r = rotary or head
    inv = (1.0 / 10000 ** (np.arange(0, r, 2) / r)).astype(np.float32)
    if caches in ("computed", "bounded"):
        if caches == "computed":
            pos = b.Unsqueeze(b.Range(_c(b, 0), b.Squeeze(s_dim, _c(b, [0])), _c(b, 1)), _c(b, [0]))
        else:  # position ids sliced from a constant [1, 64] buffer (BERT-style): bounded by 63
            pos = b.Slice(_c(b, np.arange(64)[None]), _c(b, [0]), s_dim, _c(b, [1]))
        freqs = b.Mul(b.Cast(b.Unsqueeze(pos, _c(b, [2])), to=1), b.const(inv))
        emb = b.Concat(freqs, freqs, axis=-1)
        cos, sin = b.Cos(emb), b.Sin(emb)
        if scaling is not None:
            cos, sin = (
                b.Mul(cos, _c(b, scaling, np.float32)),
                b.Mul(sin, _c(b, scaling, np.float32)),
            )
        cos, sin = b.Unsqueeze(cos, _c(b, [1])), b.Unsqueeze(sin, _c(b, [1]))
    elif caches == "table":  # older transformers: cos_cached[position_ids]
        angles = np.arange(32)[:, None] * inv[None, :]
        emb = np.concatenate([angles, angles], -1).astype(np.float32)
        ids = g.add_input("position_ids", TensorType(DType.INT64, (bs, ss)))
        cos = b.Unsqueeze(b.Gather(b.const(np.cos(emb)), ids), _c(b, [1]))
        sin = b.Unsqueeze(b.Gather(b.const(np.sin(emb)), ids), _c(b, [1]))
    else:  # constants [1, 1, S, D]
        angles = (np.arange(seq) + 3)[:, None] * inv[None, :]  # not cos = 1 at position 0
        emb = np.concatenate([angles, angles], -1).astype(np.float32)[None, None]
        cos, sin = b.const(np.cos(emb)), b.const(np.sin(emb))
    xr = b.Slice(x, _c(b, [0]), _c(b, [r]), _c(b, [-1])) if rotary else x
    lo = b.Slice(xr, _c(b, [0]), _c(b, [r // 2]), _c(b, [-1]))
    hi = b.Slice(xr, _c(b, [r // 2]), _c(b, [2**63 - 1]), _c(b, [-1]))
    rot = b.Concat(b.Neg(hi), lo, axis=-1)
    y = b.Add(b.Mul(xr, cos), b.Mul(rot, sin))
    if rotary:
        y = b.Concat(y, b.Slice(x, _c(b, [r]), _c(b, [2**63 - 1]), _c(b, [-1])), axis=-1)
    if split:
        y = b.Reshape(b.Transpose(y, perm=[0, 2, 1, 3]), _c(b, [0, 0, heads * head]))
    g.set_outputs([y], ["y"])
    return Model(g, opset_imports={"": opset})


def _feeds(model: Model, seq: int = 5, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for v in model.graph.inputs:
        shape = tuple({"batch": batch, "seq": seq}.get(d, d) for d in v.type.shape)  # type: ignore[union-attr]
        if v.type.dtype == DType.INT64:  # type: ignore[union-attr]
            out[v.name] = rng.integers(0, 32, shape)
        else:
            out[v.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def _fuse(model: Model, pipeline: str = "O1,fuse-rotary,O1", seq: int = 5) -> list[str]:
    inputs = _feeds(model, seq)
    before, before_ort = run_reference(model, inputs), run_ort(model, inputs)
    result = optimize_model(model, pipeline, verify_each=True)
    assert_close(before, run_reference(model, inputs))
    assert_close(before_ort, run_ort(model, inputs))
    return [n.message for n in result.notes if n.pass_name == "fuse-rotary"]


def _rotary(model: Model):
    return [n for n in model.graph if n.op == "RotaryEmbedding"]


@pytest.mark.parametrize("caches", ["computed", "bounded", "table", "constant"])
def test_rotary_fuses_with_every_kind_of_cache(caches):
    model = build(caches, symbolic=caches != "constant")
    notes = _fuse(model)
    (node,) = _rotary(model)
    assert node.get_attr("num_heads") == 2 and "Neg" not in ops(model), notes
    has_ids = len(node.inputs) == 4
    assert has_ids == (caches in ("bounded", "table"))
    if caches == "bounded":  # a precomputed [64, D/2] table, indexed by the sliced ids
        assert node.inputs[1].const_value is not None and node.inputs[1].const_value.shape == (
            64,
            4,
        )
    if caches == "computed":  # caches computed in the graph, at half width
        assert {n.op for n in model.graph} >= {"Cos", "Sin", "Expand"}


def test_attention_scaling_and_partial_rotary():
    model = build(scaling=0.7, rotary=4, head=8)
    _fuse(model)
    (node,) = _rotary(model)
    assert node.get_attr("rotary_embedding_dim") == 4


def test_the_4d_form_without_a_head_split_or_when_asked():
    model = build(split=False)
    _fuse(model)
    assert not _rotary(model)[0].get_attr("num_heads")
    model = build()
    _fuse(model, "O1,fuse-rotary{form=4d},O1")
    assert not _rotary(model)[0].get_attr("num_heads")


@given(
    caches=st.sampled_from(["computed", "bounded", "table", "constant"]),
    heads=st.integers(1, 3), head=st.sampled_from([2, 4, 8]), partial=st.booleans(),
    seq=st.integers(1, 7), split=st.booleans(), scaling=st.sampled_from([None, 0.5]),
)  # fmt: skip
def test_random_rotary_patterns_fuse_with_equal_outputs(
    caches, heads, head, partial, seq, split, scaling
):
    rotary = head // 2 if partial and head >= 4 else None
    model = build(caches, heads, head, rotary, split, scaling, caches != "constant", seq)
    notes = _fuse(model, seq=seq)
    assert len(_rotary(model)) == 1, notes


# ----- refusals -------------------------------------------------------------------------------


def _refused(model: Model, pipeline: str = "infer-shapes,fuse-rotary") -> str:
    before = ops(model)
    result = optimize_model(model, pipeline)
    assert ops(model) == before
    text = " ".join(n.message for n in result.notes if n.kind == "refused")
    assert text, "no refusal noted"
    return text


def test_refuses_cos_whose_halves_differ():
    model = build("constant", symbolic=False)
    cos = next(n for n in model.graph if n.op == "Mul").inputs[1]
    cos.const_value = cos.const_value + np.arange(8, dtype=np.float32)  # type: ignore[union-attr]
    assert "halves differ" in _refused(model)


def test_refuses_slices_that_are_not_the_halves():
    model = build()  # Concat(-x[..., :4], x[..., 4:]) instead of Concat(-x[..., 4:], x[..., :4])
    neg = next(n for n in model.graph if n.op == "Neg")
    lo, hi = neg.outputs[0].users()[0].inputs[1].producer, neg.inputs[0].producer
    lo.set_input(1, hi.inputs[1])
    lo.set_input(2, hi.inputs[2])
    hi.set_input(1, Builder(model.graph).const(np.array([0], np.int64)))
    hi.set_input(2, Builder(model.graph).const(np.array([4], np.int64)))
    assert "not the halves" in _refused(model)


def test_refuses_cos_that_varies_over_the_heads():
    model = build("constant", symbolic=False)
    cos = next(n for n in model.graph if n.op == "Mul").inputs[1]
    cos.const_value = np.repeat(cos.const_value, 2, axis=1)  # type: ignore[arg-type]
    cos.type = TensorType(F, cos.const_value.shape)
    assert "varies over the heads" in _refused(model)


def test_refuses_below_opset_23():
    assert "needs opset 23, the model imports 18: run upgrade-opset first" in _refused(
        build(opset=18)
    )


def test_refuses_unbounded_positions_without_runtime_caches():
    text = _refused(build("computed"), "infer-shapes,fuse-rotary{runtime-cache=false}")
    assert "no known maximum" in text
