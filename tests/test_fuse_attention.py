"""fuse-attention: the attention patterns of both torch exporters and of older converters become
one ONNX Attention (3-D where the head reshapes allow, else 4-D), with equal outputs in graphopt's
reference interpreter and in ONNX Runtime; every refusal leaves the graph alone and says why; the
zoo's GPT-2, BERT and LLaMA get every layer fused with both exporters."""

from __future__ import annotations

import numpy as np
import pytest
from attention_graphs import Spec, assert_close, build, feeds, ops, run_ort, run_reference
from hypothesis import given
from hypothesis import strategies as st

import graphopt
from graphopt.ir import Builder, DType, Graph, Model, TensorType
from graphopt.ir.ops.contrib_attention import attention_inference
from graphopt.passes import optimize_model

PIPELINE = "O1,fuse-attention"


def _fuse(spec: Spec, pipeline: str = PIPELINE) -> tuple[Model, list[str], dict]:
    """Build, fuse, and check outputs against the unfused graph in both runtimes."""
    model = build(spec)
    inputs = feeds(model, spec)
    before, before_ort = run_reference(model, inputs), run_ort(model, inputs)
    result = optimize_model(model, pipeline, verify_each=True)
    assert_close(before, run_reference(model, inputs))
    assert_close(before_ort, run_ort(model, inputs))
    assert_close(before, run_ort(model, inputs))
    notes = [n.message for n in result.notes if n.pass_name == "fuse-attention"]
    fused = [n for n in model.graph if n.op == "Attention"]
    attrs = {k: a.value for k, a in fused[0].attrs.items()} if fused else {}
    return model, notes, attrs


# ----- the forms exporters write --------------------------------------------------------------

FORMS = {
    # torch.onnx dynamo: flat K^T reshapes, sqrt(scale) on Q and K^T, Where(bool, 0, min) added,
    # the IsNaN guard
    "dynamo": Spec(kt="flat", scale="split", mask="add_b1sl", guard=True),
    # TorchScript: K^T folded into the head split (perm 0, 2, 3, 1), split scale, guard
    "torchscript": Spec(kt="folded", scale="split", mask="add_b1sl", guard=True),
    # BERT of older transformers / converters: Div by sqrt(d), (1 - mask) * -10000 [b, 1, 1, L]
    "bert-classic": Spec(scale="div", mask="add_b11l"),
    # GPT-2 of older transformers: Where(bias[:, :, L-S:L, :L], scores, min)
    "gpt2-classic": Spec(scale="div", mask="causal_slice"),
    # LLaMA: grouped-query repeat_kv, Mul scale, causal mask from aranges
    "llama-gqa": Spec(q_heads=4, kv_heads=2, scale="mul", mask="causal_le", kt="flat", guard=True),
    # a bool mask with -inf, a pre-scaled Q, 4-D inputs of another length (cross-attention)
    "bool-cross": Spec(layout="4d", kv_seq=7, v_head=6, mask="where_inf", scale="none"),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_exporter_forms_fuse_to_one_attention(form):
    spec = FORMS[form]
    model, notes, attrs = _fuse(spec)
    assert ops(model).count("Attention") == 1 and "Softmax" not in ops(model), notes
    assert attrs["scale"] == pytest.approx(spec.scale_value if spec.scale != "none" else 1.0)
    three_d = spec.layout == "3d" and spec.merge
    assert ("q_num_heads" in attrs) == three_d
    if three_d:
        assert (attrs["q_num_heads"], attrs["kv_num_heads"]) == (spec.q_heads, spec.kv_heads)
        assert "Transpose" not in ops(optimize_model(model, "O1").model)
    assert bool(attrs.get("is_causal")) == spec.mask.startswith("causal")


def test_exact_causal_masks_become_is_causal_and_can_stay_masks():
    spec = Spec(mask="causal_tril", symbolic=False)
    model, _, attrs = _fuse(spec)
    assert attrs["is_causal"] == 1 and len(model.graph.nodes[-2].inputs) == 3
    _, _, attrs = _fuse(spec, "O1,fuse-attention{causal=false}")
    assert "is_causal" not in attrs


def test_a_causal_mask_and_padding_stays_a_mask():
    spec = Spec(mask="add_b1sl", scale="split", guard=True)
    _, _, attrs = _fuse(spec)
    assert "is_causal" not in attrs


def test_masks_are_expanded_to_the_query_and_key_lengths_once():
    """ONNX Runtime wants the mask's last two dims to be exactly S and L."""
    model, _, _ = _fuse(Spec(mask="add_b11l"))
    (expand,) = [n for n in model.graph if n.op == "Expand"]
    assert expand.inputs[0].name == "mask"


def test_where_with_a_finite_fill_becomes_an_additive_mask():
    model, _, _ = _fuse(Spec(mask="where_min"))
    attention = next(n for n in model.graph if n.op == "Attention")
    assert attention.inputs[3].type.dtype == DType.FLOAT


def test_the_4d_form_is_kept_when_asked_or_when_the_output_is_not_merged():
    model, _, attrs = _fuse(Spec(mask="add_b1sl"), "O1,fuse-attention{form=4d}")
    assert "q_num_heads" not in attrs and "Transpose" in ops(model)
    _, _, attrs = _fuse(Spec(merge=False))
    assert "q_num_heads" not in attrs


def test_fusing_twice_changes_nothing():
    model = build(FORMS["dynamo"])
    optimize_model(model, PIPELINE)
    again = optimize_model(model, "fuse-attention")
    assert not any(r.changed for r in again.records)


@st.composite
def specs(draw):
    q_heads = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if q_heads % h == 0 and h <= q_heads]))
    layout = draw(st.sampled_from(["3d", "4d"]))
    cross = draw(st.booleans())
    kts = ["transpose", "flat"] + (["folded"] if layout == "3d" and kv_heads == q_heads else [])
    masks = ["none", "add_b11l", "add_b1sl", "where_inf", "where_min", "where_neg"]
    if not cross:
        masks += ["causal_le", "causal_slice"]
    symbolic = draw(st.booleans())
    if not symbolic and not cross:
        masks.append("causal_tril")
    seq = draw(st.integers(1, 6))
    return Spec(
        batch=draw(st.integers(1, 3)), seq=seq, kv_seq=draw(st.integers(1, 6)) if cross else None,
        q_heads=q_heads, kv_heads=kv_heads, head=draw(st.sampled_from([2, 4, 8])),
        v_head=draw(st.sampled_from([None, 3])), layout=layout, kt=draw(st.sampled_from(kts)),
        scale=draw(st.sampled_from(["div", "mul", "split", "q", "none"])),
        factor=draw(st.sampled_from([None, 0.3, 2.0])), mask=draw(st.sampled_from(masks)),
        guard=draw(st.booleans()), merge=draw(st.booleans()), symbolic=symbolic,
    )  # fmt: skip


@given(spec=specs())
def test_random_attention_patterns_fuse_with_equal_outputs(spec):
    model, notes, _ = _fuse(spec)
    assert ops(model).count("Attention") == 1, notes


# ----- refusals -------------------------------------------------------------------------------


def _refused(model: Model, pipeline: str = "infer-shapes,fuse-attention") -> str:
    before = ops(model)
    result = optimize_model(model, pipeline)
    assert ops(model) == before
    notes = [n.message for n in result.notes if n.kind == "refused"]
    assert notes, "no refusal noted"
    return " ".join(notes)


def _edit(spec: Spec, op: str, change) -> Model:
    model = build(spec)
    node = next(n for n in model.graph if n.op == op)
    change(model, node)
    return model


def test_refuses_a_softmax_over_another_axis():
    model = _edit(Spec(), "Softmax", lambda m, n: n.set_attr("axis", 2))
    assert "softmax is over axis 2" in _refused(model)


def test_refuses_a_mask_that_makes_the_scores_bigger():
    model = build(Spec(layout="4d", batch=2, symbolic=False, mask="add_b1sl"))
    for value in model.graph.inputs[:3]:  # Q, K, V of batch 1; the mask has batch 2
        value.type = TensorType(DType.FLOAT, (1, *value.type.shape[1:]))
    assert "do not broadcast" in _refused(model)


def test_refuses_a_scale_that_is_not_a_one_element_constant():
    def vector_scale(model, node):
        (user,) = node.outputs[0].users()
        b = Builder(model.graph, insert_before=user)
        scaled = b.Mul(node.outputs[0], b.const(np.full(5, 0.5, np.float32)))
        user.set_input(0, scaled)

    model = _edit(Spec(symbolic=False, scale="none"), "MatMul", vector_scale)
    assert "not a one-element constant" in _refused(model)


def test_refuses_a_negative_scale():
    assert "not positive" in _refused(build(Spec(scale="mul", factor=-0.5)))


def test_refuses_q_and_k_whose_batches_broadcast():
    spec = Spec(layout="4d", symbolic=False)
    model = build(spec)
    q = model.graph.inputs[0]
    q.type = TensorType(DType.FLOAT, (1, *q.type.shape[1:]))
    assert "batch dims" in _refused(model)


def test_refuses_dropout_between_softmax_and_v():
    def dropout(model, node):
        (user,) = node.outputs[0].users()
        b = Builder(model.graph, insert_before=user)
        dropped = b.Dropout(node.outputs[0], b.const(np.float32(0.1)), b.const(np.bool_(True)))
        user.set_input(0, dropped)

    assert "Dropout" in _refused(_edit(Spec(), "Softmax", dropout))


def test_refuses_an_inner_value_read_outside():
    model = _edit(Spec(), "Softmax", lambda m, n: m.graph.add_output(n.outputs[0], "weights"))
    assert "also read by a graph output" in _refused(model)


def test_refuses_below_opset_23_and_says_to_upgrade():
    text = _refused(build(Spec(opset=18)))
    assert "needs opset 23, the model imports 18: run upgrade-opset first" in text


def test_refuses_a_scale_after_the_mask():
    def scale_after(model, node):
        (user,) = node.outputs[0].users()
        b = Builder(model.graph, insert_before=user)
        user.set_input(0, b.Mul(node.outputs[0], b.const(np.float32(0.5))))

    model = _edit(Spec(scale="none", mask="add_b1sl"), "Add", scale_after)
    assert "scale is applied after the mask" in _refused(model)


def test_refuses_a_where_fill_that_is_not_minus_infinity():
    def fill(model, node):
        node.set_input(2, Builder(model.graph).const(np.float32(-10000.0)))

    model = _edit(Spec(mask="where_min"), "Where", fill)
    assert "fills masked scores with -10000" in _refused(model)


def test_refuses_two_masks():
    def second(model, node):
        (user,) = node.outputs[0].users()
        b = Builder(model.graph, insert_before=user)
        user.set_input(0, b.Add(node.outputs[0], model.graph.inputs[-1]))

    model = _edit(Spec(mask="add_b1sl"), "Add", second)
    assert "more than one mask" in _refused(model)


def test_refuses_k_and_v_repeated_differently():
    model = build(Spec(layout="4d", q_heads=4, kv_heads=2))
    root = [n for n in model.graph if n.op == "MatMul"][-1]
    shape = model.graph.inputs[2].type.shape
    root.set_input(
        1, model.graph.add_input("v4", TensorType(DType.FLOAT, (shape[0], 4, *shape[2:])))
    )
    optimize_model(model, "eliminate-dead-code")
    assert "do not repeat their heads the same way" in _refused(model)


# ----- the reference kernel and inference of Attention-23 ---------------------------------------


@pytest.mark.parametrize(
    "attrs,mask,three_d",
    [
        ({}, None, False),
        ({"is_causal": 1}, None, False),
        ({"scale": 0.3}, "bool", False),
        ({}, "float", True),
        ({"is_causal": 1}, "float", True),
    ],
)
def test_reference_attention_matches_onnxruntime(attrs, mask, three_d):
    """graphopt's interpreter runs Attention-23 (onnx.reference) as ONNX Runtime does, for every
    attribute combination fuse-attention emits: 3-D/4-D, GQA, bool/float masks, is_causal."""
    rng = np.random.default_rng(0)
    b, hq, hk, s, d = 2, 4, 2, 5, 8
    g = Graph("a")
    shapes = [(b, hq, s, d), (b, hk, s, d), (b, hk, s, d)]
    if three_d:
        shapes = [(b, s, hq * d), (b, s, hk * d), (b, s, hk * d)]
        attrs = {**attrs, "q_num_heads": hq, "kv_num_heads": hk}
    inputs = [
        g.add_input(n, TensorType(DType.FLOAT, sh)) for n, sh in zip("qkv", shapes, strict=True)
    ]
    data = {
        n: rng.standard_normal(sh).astype(np.float32) for n, sh in zip("qkv", shapes, strict=True)
    }
    if mask:
        dtype = DType.BOOL if mask == "bool" else DType.FLOAT
        inputs.append(g.add_input("m", TensorType(dtype, (b, 1, s, s))))
        visible = rng.random((b, 1, s, s)) > 0.3
        visible[..., 0] = True
        data["m"] = visible if mask == "bool" else np.where(visible, 0, -1e4).astype(np.float32)
    y = Builder(g).Attention(*inputs, **attrs)
    g.set_outputs([y], ["y"])
    model = Model(g, opset_imports={"": 23})
    assert_close(run_ort(model, data), run_reference(model, data), rtol=1e-5)


def test_attention_inference_keeps_unknown_hidden_sizes_unknown():
    """ONNX's own inference gives [b, s, 0] here; a static 0 would conflict with the real size."""
    g = Graph("a")
    qkv = [g.add_input(n, TensorType(DType.FLOAT, ("b", "s", None))) for n in "qkv"]
    node = Builder(g).Attention(*qkv, q_num_heads=4, kv_num_heads=2).producer
    from graphopt.ir.registry import InferenceInputs

    (y,) = attention_inference(node, InferenceInputs([v.type for v in qkv], [None] * 3, {"": 23}))
    assert y == TensorType(DType.FLOAT, ("b", "s", None))


# ----- the zoo --------------------------------------------------------------------------------

LAYERS = 2  # every tiny zoo model has two layers


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_zoo_models_fuse_every_layer_with_equal_outputs(zoo_model, name, exporter):
    from models.zoo import sample_inputs

    path = zoo_model(name, exporter)
    baseline = graphopt.load(str(path))
    optimize_model(baseline, "upgrade-opset,O1")
    model = graphopt.load(str(path))
    optimize_model(model, "upgrade-opset,O1,fuse-rotary,fuse-attention,O1")
    attention = [n for n in model.graph if n.op == "Attention"]
    assert len(attention) == LAYERS and "Softmax" not in ops(model)
    assert all(n.get_attr("q_num_heads") for n in attention)  # the 3-D form everywhere
    if name == "llama":
        assert ops(model).count("RotaryEmbedding") == 2 * LAYERS
        assert {n.get_attr("kv_num_heads") for n in attention} == {2}
    inputs = sample_inputs(name, batch=2, sequence=7)
    assert_close(run_ort(baseline, inputs), run_ort(model, inputs))
    if exporter == "dynamo":
        assert_close(run_reference(baseline, inputs), run_reference(model, inputs))
