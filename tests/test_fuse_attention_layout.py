"""fuse-attention's layout rule (passes/fusion/attention_layout.py): a 4-D Attention between head
splits and a head merge, as graphopt.from_torch writes scaled_dot_product_attention, becomes the
3-D form with repeat_kv folded into grouped-query attention; outputs stay equal in the reference
interpreter and ONNX Runtime; every refusal leaves the graph alone and names the node; the zoo's
GPT-2, BERT and LLaMA imported with from_torch lose every head Transpose under O2."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest
from attention_graphs import assert_close, ops, run_ort, run_reference
from hypothesis import given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.ir import Builder, DType, Graph, Model, TensorType, Value
from graphopt.passes import optimize_model

F = DType.FLOAT


@dataclass(frozen=True)
class Case:
    batch: int = 2
    seq: int = 5
    kv_seq: int | None = None  # None: self-attention
    q_heads: int = 4
    kv_heads: int = 2
    head: int = 8
    v_head: int = 8
    repeat: str = "expand"  # "expand": repeat_kv to q_heads; "gqa": K/V heads given as they are
    mask: str = "none"  # "none", "bool", "add", "expand" (a [b, 1, 1, L] mask expanded by Shapes)
    causal: bool = False
    scale: float | None = None
    softcap: float | None = None
    rotary: bool = False  # a 4-D RotaryEmbedding on the Q and K splits
    symbolic: bool = True

    @property
    def length(self) -> int:
        return self.seq if self.kv_seq is None else self.kv_seq


def _i64(b: Builder, values: list[int]) -> Value:
    return b.const(np.array(values, np.int64))


def _split(
    b: Builder, x3: Value, heads: int, size: int, perm: tuple[int, ...] = (0, 2, 1, 3)
) -> Value:
    shape = [0, 0, heads, size] if perm == (0, 2, 1, 3) else [0, 0, size, heads]
    return b.Transpose(b.Reshape(x3, _i64(b, shape)), perm=list(perm))


def _repeat_kv(b: Builder, x: Value, times: int) -> Value:
    """transformers' repeat_kv: Unsqueeze(x, 2), Expand to [b, h, n, L, D], Reshape [b, h*n, L, D]."""
    shape = b.Shape(x)
    target = b.Concat(
        b.Slice(shape, _i64(b, [0]), _i64(b, [2])), _i64(b, [times]),
        b.Slice(shape, _i64(b, [2]), _i64(b, [4])), axis=0,
    )  # fmt: skip
    expanded = b.Expand(b.Unsqueeze(x, _i64(b, [2])), target)
    heads = b.Mul(b.Slice(shape, _i64(b, [1]), _i64(b, [2])), _i64(b, [times]))
    merged = b.Concat(
        b.Slice(shape, _i64(b, [0]), _i64(b, [1])), heads,
        b.Slice(shape, _i64(b, [2]), _i64(b, [4])), axis=0,
    )  # fmt: skip
    return b.Reshape(expanded, merged)


def build(case: Case, *, k_perm=(0, 2, 1, 3), merge: bool = True, extra: str = "") -> Model:
    """q3, k3, v3 [b, s, H*D] split into heads, a 4-D Attention, the output merged back."""
    g = Graph("attention")
    b = Builder(g)
    bs, ss = ("batch", "seq") if case.symbolic else (case.batch, case.seq)
    ls = ss if case.kv_seq is None else ("kv" if case.symbolic else case.length)
    hq, hk, d, dv = case.q_heads, case.kv_heads, case.head, case.v_head
    q3 = g.add_input("q", TensorType(F, (bs, ss, hq * d)))
    k3 = g.add_input("k", TensorType(F, (bs, ls, hk * d)))
    v_heads = hq if extra == "v-unrepeated" else hk
    v3 = g.add_input("v", TensorType(F, (bs, ls, v_heads * dv)))
    q, k, v = _split(b, q3, hq, d), _split(b, k3, hk, d, k_perm), _split(b, v3, v_heads, dv)
    if case.rotary:
        cos = g.add_input("cos", TensorType(F, (bs, ss, d // 2)))
        sin = g.add_input("sin", TensorType(F, (bs, ss, d // 2)))
        q = b.RotaryEmbedding(q, cos, sin)
        if case.kv_seq is None:
            k = b.RotaryEmbedding(k, cos, sin)
    if case.repeat == "expand" and hk != hq:
        k = _repeat_kv(b, k, hq // hk)
        if extra != "v-unrepeated":
            v = _repeat_kv(b, v, hq // hk)
    inputs: list[Value | None] = [q, k, v]
    if case.mask == "bool":
        inputs.append(g.add_input("bool_mask", TensorType(DType.BOOL, (bs, 1, ss, ls))))
    elif case.mask == "add":
        inputs.append(g.add_input("mask", TensorType(F, (bs, 1, ss, ls))))
    elif case.mask == "expand":  # the frontend's: last two dims read from Q's and K's shapes
        mask = g.add_input("mask", TensorType(F, (bs, 1, 1, ls)))
        dims = b.Concat(
            _i64(b, [1, 1]), b.Shape(q, start=2, end=3), b.Shape(k, start=-2, end=-1), axis=0
        )
        inputs.append(b.Expand(mask, dims))
    if extra == "past":
        inputs += [None] * (4 - len(inputs)) + [g.add_input("past", TensorType(F, (bs, hk, 3, d)))]
    attrs: dict = {}
    if case.causal:
        attrs["is_causal"] = 1
    if case.scale is not None:
        attrs["scale"] = case.scale
    if case.softcap is not None:
        attrs["softcap"] = case.softcap
    y = b.op("Attention", *inputs, _outputs=3 if extra == "past" else 1, _name="sdpa", **attrs)
    y = y[0] if extra == "past" else y
    outputs, names = [y], ["y"]
    if merge:
        outputs = [b.Reshape(b.Transpose(y, perm=[0, 2, 1, 3]), _i64(b, [0, 0, hq * dv]))]
    if extra == "q-read":
        outputs.append(q)
        names.append("q4")
    g.set_outputs(outputs, names)
    return Model(g, opset_imports={"": 23})


def feeds(model: Model, case: Case, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = {"batch": case.batch, "seq": case.seq, "kv": case.length}
    out: dict[str, np.ndarray] = {}
    for value in model.graph.inputs:
        assert isinstance(value.type, TensorType) and value.type.shape is not None
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in value.type.shape)
        name = value.name or ""
        if value.type.dtype == DType.BOOL:
            visible = rng.random(shape) > 0.3
            visible[..., 0] = True  # every query sees a key (a fully masked row is NaN in ORT)
            out[name] = visible
        elif name == "mask":
            out[name] = np.where(rng.random(shape) > 0.3, 0.0, -10000.0).astype(np.float32)
        elif name in ("cos", "sin"):
            angles = rng.uniform(0, 6.3, shape)
            out[name] = (np.cos(angles) if name == "cos" else np.sin(angles)).astype(np.float32)
        else:
            out[name] = rng.standard_normal(shape).astype(np.float32)
    return out


def _rewrite(case: Case) -> Model:
    model = build(case)
    inputs = feeds(model, case)
    before, before_ort = run_reference(model, inputs), run_ort(model, inputs)
    result = optimize_model(model, "fuse-attention,O1", verify_each=True)
    assert_close(before, run_reference(model, inputs))
    assert_close(before_ort, run_ort(model, inputs))
    (attention,) = [n for n in model.graph if n.op == "Attention"]
    notes = [n.message for n in result.notes if n.pass_name == "fuse-attention"]
    assert attention.get_attr("q_num_heads") == case.q_heads, notes
    assert attention.get_attr("kv_num_heads") == case.kv_heads, notes
    assert "Transpose" not in ops(model) and "Unsqueeze" not in ops(model)
    return model


@pytest.mark.parametrize(
    "case",
    [
        Case(),  # LLaMA: repeat_kv of 2 heads to 4
        Case(kv_heads=4, mask="bool", causal=False, scale=0.3),  # GPT-2 / BERT: plain MHA
        Case(repeat="gqa", mask="add", causal=True),  # sdpa(enable_gqa=True)
        Case(mask="expand", kv_seq=3, v_head=6),  # the frontend's mask expansion, cross
        Case(rotary=True, mask="bool", causal=True, symbolic=False),  # 4-D rotary on Q and K
        Case(q_heads=6, kv_heads=2, softcap=5.0, mask="add"),
    ],
    ids=["llama", "mha-bool", "gqa-add-causal", "mask-from-shapes", "rotary-4d", "softcap"],
)
def test_layouts_become_the_3d_form(case):
    model = _rewrite(case)
    (attention,) = [n for n in model.graph if n.op == "Attention"]
    assert [v.name for v in attention.inputs[:3]] == ["q", "k", "v"] or case.rotary
    assert model.graph.outputs[0].producer is attention  # the merge's Reshape read the 3-D output


@st.composite
def cases(draw):
    q_heads = draw(st.sampled_from([1, 2, 4, 6]))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 3, 4, 6) if q_heads % h == 0]))
    cross = draw(st.booleans())
    return Case(
        batch=draw(st.integers(1, 3)), seq=draw(st.integers(1, 6)),
        kv_seq=draw(st.integers(1, 6)) if cross else None, q_heads=q_heads, kv_heads=kv_heads,
        head=draw(st.sampled_from([2, 4, 8])), v_head=draw(st.sampled_from([2, 3, 8])),
        repeat=draw(st.sampled_from(["expand", "gqa"])),
        mask=draw(st.sampled_from(["none", "bool", "add", "expand"])),
        causal=not cross and draw(st.booleans()), scale=draw(st.sampled_from([None, 0.3, 2.0])),
        softcap=draw(st.sampled_from([None, 4.0])), rotary=draw(st.booleans()),
        symbolic=draw(st.booleans()),
    )  # fmt: skip


@settings(max_examples=40)
@given(case=cases())
def test_random_layouts_keep_their_outputs(case):
    _rewrite(case)


# ----- refusals -------------------------------------------------------------------------------


def _refused(model: Model, words: str) -> None:
    before = ops(model)
    result = optimize_model(model, "fuse-attention")
    assert ops(model) == before
    notes = [n for n in result.notes if n.kind == "refused"]
    assert any(words in n.message and "sdpa" in n.node for n in notes), [
        (n.message, n.node) for n in result.notes
    ]


def test_refuses_a_split_read_elsewhere():
    _refused(build(Case(), extra="q-read"), "also read by a graph output")


def test_refuses_a_split_with_another_perm():
    _refused(build(Case(kv_heads=4), k_perm=(0, 3, 1, 2)), "perm [0, 3, 1, 2], not [0, 2, 1, 3]")


def test_refuses_an_output_that_is_not_merged():
    _refused(build(Case(), merge=False), "not merged back")


def test_refuses_k_and_v_repeated_differently():
    _refused(build(Case(), extra="v-unrepeated"), "K is repeated 2 times over the heads, V 1")


def test_refuses_a_kv_cache():
    _refused(build(Case(repeat="gqa"), extra="past"), "past key/value")


def test_form_4d_keeps_the_4d_attention():
    model = build(Case())
    before = ops(model)
    optimize_model(model, "fuse-attention{form=4d}")
    assert ops(model) == before


def test_rewriting_twice_changes_nothing():
    model = build(Case())
    optimize_model(model, "fuse-attention")
    again = optimize_model(model, "fuse-attention")
    assert not any(r.changed for r in again.records)


# ----- the zoo through graphopt.from_torch ----------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_from_torch_zoo_loses_its_head_transposes(name):
    import torch
    from models import sample_inputs, torch_module, torch_outputs

    module = torch_module(name)
    example = sample_inputs(name)
    from models.specs import MODELS

    spec = MODELS[name]
    limit = spec.config("tiny")[spec.sequence_limit] if spec.sequence_limit else None
    dims = {"batch": torch.export.Dim("batch"), "sequence": torch.export.Dim("sequence", max=limit)}
    shapes = {i.name: {a: dims[d] for a, d in enumerate(i.shape) if d in dims} for i in spec.inputs}
    args = {k: torch.from_numpy(v) for k, v in example.items()}
    model = graphopt.from_torch(module, args, dynamic_shapes=shapes)
    assert ops(model).count("Transpose") >= 8  # the head splits and merges of 2 layers
    model = graphopt.optimize(model, "O2", verify_each=True)
    attention = [n for n in model.graph if n.op == "Attention"]
    assert len(attention) == 2 and all(n.get_attr("q_num_heads") == 4 for n in attention)
    assert {n.get_attr("kv_num_heads") for n in attention} == {2 if name == "llama" else 4}
    assert "Transpose" not in ops(model)
    floats = [n.op for n in model.graph if n.outputs[0].type and n.outputs[0].type.dtype == F]
    assert "Unsqueeze" not in floats  # repeat_kv's Unsqueeze of K and V (then Expand, Reshape)
    feeds = sample_inputs(name, batch=3, sequence=7, seed=1)
    expected = list(torch_outputs(name, feeds).values())
    assert_close(expected, run_reference(model, feeds))
    assert_close(expected, run_ort(model, feeds))
    for_ort = graphopt.optimize(model, "O2", target="onnxruntime", verify_each=True)
    assert_close(expected, run_ort(for_ort, feeds))


def test_case_builder_is_what_the_frontend_writes():
    """The builder's graph before the rewrite has the frontend's shape: 4-D Attention, 2
    Transposes per input and one on the output (so the tests above test that layout)."""
    model = build(replace(Case(), kv_heads=4))
    assert ops(model).count("Transpose") == 4 and ops(model).count("Attention") == 1
