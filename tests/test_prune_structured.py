"""Structured pruning (prune-channels, prune-mlp, prune-heads) and its dependency analysis.

Random conv stacks (BatchNorm, depthwise), residual blocks, MLPs (bias or not, gated or not,
MatMul or Gemm) and attention blocks (grouped-query, separate or fused QKV) are built with the IR
builder. The test zeroes a random set of units by its own knowledge of the layout (not the
analysis's): removing exactly those must leave every output equal, shrink the weights by the
zeroed slices and leave the kept slices as they were. Shared tensors keep their arrays. On the
tiny zoo models (after O2): zeroed groups are removed exactly, and the pruned models load and agree
in ONNX Runtime. Bad options and models with no group fail with one GraphoptError (CLI exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.backends.onnx import to_onnx
from graphopt.backends.reference import Interpreter
from graphopt.ir import Builder, DType, Graph, Model, TensorType
from graphopt.ir.errors import GraphoptError
from graphopt.ir.verifier import verify
from graphopt.passes import optimize_model
from graphopt.passes.pruning.structure import analyze

F32 = DType.FLOAT


@dataclass
class Case:
    """A built model, its input shapes, and per-unit slices: (constant name, axis, indices)."""

    model: Model
    inputs: dict[str, tuple[int, ...]]
    units: int
    slices: list[list[tuple[str, int, np.ndarray]]] = field(default_factory=list)
    shared: set[str] = field(default_factory=set)  # constants read outside the group too


def _rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.5).astype(np.float32)


def _model(graph: Graph, opset: int = 18) -> Model:
    return Model(graph, opset_imports={"": opset})


def _zero(case: Case, units: list[int]) -> None:
    consts = case.model.graph.initializers
    for u in units:
        for name, axis, index in case.slices[u]:
            array = np.array(consts[name].const_value, copy=True)
            cut = [slice(None)] * array.ndim
            cut[axis] = index
            array[tuple(cut)] = 0
            consts[name].const_value = array


def _feeds(case: Case, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in case.inputs.items()}


def _check_exact(case: Case, pass_name: str, zeroed: list[int]) -> Model:
    _zero(case, zeroed)
    feeds = _feeds(case, 1)
    before = Interpreter(case.model).run(feeds)
    kept_arrays = {
        name: np.array(case.model.graph.initializers[name].const_value, copy=True)
        for u in range(case.units)
        for name, _, _ in case.slices[u]
    }
    shared = {n: np.array(case.model.graph.initializers[n].const_value) for n in case.shared}
    ratio = (len(zeroed) + 0.5) / case.units
    optimize_model(case.model, f"{pass_name}{{ratio={ratio}}}")
    verify(case.model)
    after = Interpreter(case.model).run(feeds)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-4, atol=1e-5)
    # every sliced weight lost exactly the zeroed units' slices; the rest is unchanged
    consts = {n: v for n, v in case.model.graph.initializers.items()}
    for name, original in kept_arrays.items():
        axis_cuts: dict[int, set[int]] = {}
        for u in zeroed:
            for n, axis, index in case.slices[u]:
                if n == name:
                    axis_cuts.setdefault(axis, set()).update(np.atleast_1d(index).tolist())
        expected = original
        for axis, cut in axis_cuts.items():
            expected = np.delete(expected, sorted(cut), axis=axis)
        now = _current(case.model, name, consts)
        assert now is not None, f"{name} disappeared"
        np.testing.assert_array_equal(now, expected, err_msg=name)
    for name, array in shared.items():
        np.testing.assert_array_equal(case.model.graph.initializers[name].const_value, array)
        assert case.model.graph.initializers[name].is_used
    return case.model


def _current(model: Model, name: str, consts: dict) -> np.ndarray | None:
    """The array the region's readers of constant `name` see now (a shared constant was copied
    under a fresh name starting with `{name}_pruned`; an unshared one was sliced in place)."""
    copies = [v for n, v in consts.items() if n.startswith(f"{name}_pruned")]
    value = copies[0] if copies else consts.get(name)
    return None if value is None else value.const_value


# ----- conv stacks and residual blocks ------------------------------------------------------------


def conv_stack(c_in: int, c: int, depthwise: bool, batchnorm: bool, seed: int) -> Case:
    rng = np.random.default_rng(seed)
    g = Graph("main")
    b = Builder(g)
    x = g.add_input("x", TensorType(F32, ("batch", c_in, 6, 6)))
    slices: list[list] = [[] for _ in range(c)]
    w1 = b.const(_rand(rng, c, c_in, 3, 3), "w1")
    b1 = b.const(_rand(rng, c), "b1")
    h = b.Conv(x, w1, b1, pads=[1, 1, 1, 1], kernel_shape=[3, 3])
    for j in range(c):
        slices[j] += [("w1", 0, j), ("b1", 0, j)]
    if batchnorm:
        gamma, beta = b.const(_rand(rng, c) + 1, "gamma"), b.const(_rand(rng, c), "beta")
        mean, var = b.const(_rand(rng, c), "mean"), b.const(np.abs(_rand(rng, c)) + 0.5, "var")
        h = b.BatchNormalization(h, gamma, beta, mean, var)
        for j in range(c):
            slices[j] += [("beta", 0, j), ("mean", 0, j)]
    h = b.Relu(h)
    if depthwise:
        wd = b.const(_rand(rng, 2 * c, 1, 3, 3), "wd")
        h = b.Relu(b.Conv(h, wd, group=c, pads=[1, 1, 1, 1], kernel_shape=[3, 3]))
        for j in range(c):
            slices[j] += [("wd", 0, np.array([2 * j, 2 * j + 1]))]
        width = 2
    else:
        width = 1
    w2 = b.const(_rand(rng, 4, c * width, 1, 1), "w2")
    y = b.Conv(b.MaxPool(h, kernel_shape=[2, 2], strides=[2, 2]), w2, kernel_shape=[1, 1])
    for j in range(c):
        slices[j] += [("w2", 1, np.arange(j * width, (j + 1) * width))]
    g.set_outputs([y], ["y"])
    _infer(g)
    return Case(_model(g, 20), {"x": (2, c_in, 6, 6)}, c, slices)


def residual_block(c: int, seed: int) -> Case:
    rng = np.random.default_rng(seed)
    g = Graph("main")
    b = Builder(g)
    x = g.add_input("x", TensorType(F32, (1, 3, 5, 5)))
    slices: list[list] = [[] for _ in range(c)]
    names = {}
    for name, shape in {"wa": (c, 3, 3, 3), "wb": (c + 1, c, 3, 3), "wc": (c, c + 1, 1, 1),
                        "wd": (2, c, 3, 3)}.items():  # fmt: skip
        names[name] = b.const(_rand(rng, *shape), name)
    ba = b.const(_rand(rng, c), "ba")
    h = b.Relu(b.Conv(x, names["wa"], ba, pads=[1, 1, 1, 1], kernel_shape=[3, 3]))
    t = b.Relu(b.Conv(h, names["wb"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]))
    r = b.Relu(b.Add(b.Conv(t, names["wc"], kernel_shape=[1, 1]), h))
    y = b.Conv(r, names["wd"], kernel_shape=[3, 3])
    for j in range(c):
        slices[j] += [("wa", 0, j), ("ba", 0, j), ("wb", 1, j), ("wc", 0, j), ("wd", 1, j)]
    g.set_outputs([y, t], ["y", "t"])  # t a graph output: the block's inner channels stay
    _infer(g)
    return Case(_model(g, 20), {"x": (1, 3, 5, 5)}, c, slices)


def _infer(graph: Graph) -> None:
    from graphopt.ir.inference import infer_node

    opset = 23 if any(n.op == "Attention" for n in graph) else 20
    for node in graph:
        types = infer_node(node, {"": opset})
        for value, t in zip(node.outputs, types, strict=False):
            value.type = t


@settings(max_examples=12)
@given(st.integers(3, 6), st.booleans(), st.booleans(), st.integers(0, 2**16), st.data())
def test_conv_stack_zeroed_channels_are_removed_exactly(c, depthwise, batchnorm, seed, data):
    case = conv_stack(2, c, depthwise, batchnorm, seed)
    zeroed = data.draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=c - 1, unique=True))
    _check_exact(case, "prune-channels", sorted(zeroed))


def test_bn_gamma_scores_drop_the_smallest_gammas_and_need_a_batchnorm():
    case = conv_stack(2, 6, False, True, 3)
    consts = case.model.graph.initializers
    gamma = np.array([1.0, 0.01, 2.0, -0.02, 0.5, 3.0], np.float32)  # |gamma| 0.01, 0.02 lowest
    consts["gamma"].const_value = gamma
    w1 = np.array(consts["w1"].const_value)
    optimize_model(case.model, "prune-channels{ratio=0.34 scores=bn-gamma}")
    np.testing.assert_array_equal(consts["w1"].const_value, w1[[0, 2, 4, 5]])
    np.testing.assert_array_equal(consts["gamma"].const_value, gamma[[0, 2, 4, 5]])
    without = conv_stack(2, 6, False, False, 3)
    with pytest.raises(GraphoptError, match="no prunable Conv channel group"):
        optimize_model(without.model, "prune-channels{scores=bn-gamma}")


@settings(max_examples=10)
@given(st.integers(3, 6), st.integers(0, 2**16), st.data())
def test_residual_block_prunes_the_whole_stream(c, seed, data):
    case = residual_block(c, seed)
    zeroed = data.draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=c - 1, unique=True))
    model = _check_exact(case, "prune-channels", sorted(zeroed))
    # the stream's writers (wa, wc) and readers (wb, wd) all lost the same channels
    shapes = {n: v.const_value.shape for n, v in model.graph.initializers.items()}
    kept = c - len(zeroed)
    assert shapes["wa"][0] == shapes["wc"][0] == shapes["wb"][1] == shapes["wd"][1] == kept


# ----- MLPs ---------------------------------------------------------------------------------------


def mlp(d: int, hidden: int, gated: bool, bias: bool, gemm: bool, seed: int) -> Case:
    rng = np.random.default_rng(seed)
    g = Graph("main")
    b = Builder(g)
    shape = (6, d) if gemm else ("batch", 3, d)
    x = g.add_input("x", TensorType(F32, shape))
    slices: list[list] = [[] for _ in range(hidden)]
    wu = b.const(_rand(rng, d, hidden), "wu")
    if gemm:
        bu = b.const(_rand(rng, hidden), "bu")
        up = b.Gemm(x, wu, bu) if bias else b.Gemm(x, wu)
    else:
        up = b.MatMul(x, wu)
        if bias:
            up = b.Add(up, b.const(_rand(rng, hidden), "bu"))
    for j in range(hidden):
        slices[j] += [("wu", 1, j)] + ([("bu", 0, j)] if bias else [])
    if gated:
        wg = b.const(_rand(rng, d, hidden), "wg")
        gate = b.MatMul(x, wg)
        h = b.Mul(b.Mul(gate, b.Sigmoid(gate)), up)
        for j in range(hidden):
            slices[j] += [("wg", 1, j)]
    else:
        h = b.Gelu(up)
    wd = b.const(_rand(rng, hidden, d), "wd")
    if gemm:  # down projection transposed: W[d, hidden] with transB
        wd_t = b.const(np.ascontiguousarray(wd.const_value.T), "wdt")
        y = b.Gemm(h, wd_t, transB=1)
        for j in range(hidden):
            slices[j] += [("wdt", 1, j)]
    else:
        y = b.Add(b.MatMul(h, wd), b.const(_rand(rng, d), "bd"))
        for j in range(hidden):
            slices[j] += [("wd", 0, j)]
    # a side branch reads the up weight too: it must keep the whole array
    side = b.MatMul(x, wu) if not gemm else b.Gemm(x, wu)
    g.set_outputs([y, side], ["y", "side"])
    _infer(g)
    case = Case(_model(g, 20), {"x": (6, d) if gemm else (2, 3, d)}, hidden, slices)
    case.shared.add("wu")
    return case


@settings(max_examples=15)
@given(
    st.integers(2, 5), st.integers(3, 10), st.booleans(), st.booleans(), st.booleans(),
    st.integers(0, 2**16), st.data(),
)  # fmt: skip
def test_mlp_zeroed_neurons_are_removed_exactly(d, hidden, gated, bias, gemm, seed, data):
    case = mlp(d, hidden, gated, bias, gemm, seed)
    size = hidden - 1
    zeroed = data.draw(st.lists(st.integers(0, hidden - 1), min_size=1, max_size=size, unique=True))
    # the zeroed neurons' bias entries stay zero too, so gelu(0) = silu(0) = 0 feeds the down rows
    _check_exact(case, "prune-mlp", sorted(zeroed))


# ----- attention ----------------------------------------------------------------------------------


def attention(hq: int, hkv: int, dh: int, fused: bool, bias: bool, seed: int) -> Case:
    rng = np.random.default_rng(seed)
    d = 8
    g = Graph("main")
    b = Builder(g)
    x = g.add_input("x", TensorType(F32, ("batch", "seq", d)))
    per = hq // hkv
    slices: list[list] = [[] for _ in range(hkv)]
    q_cols = [np.arange(h * dh, (h + 1) * dh) for h in range(hq)]
    kv_cols = [np.arange(k * dh, (k + 1) * dh) for k in range(hkv)]
    sizes = [hq * dh, hkv * dh, hkv * dh]
    if fused:
        w = b.const(_rand(rng, d, sum(sizes)), "wqkv")
        qkv = b.MatMul(x, w)
        if bias:
            qkv = b.Add(qkv, b.const(_rand(rng, sum(sizes)), "bqkv"))
        q, k, v = b.Split(qkv, b.const(np.array(sizes, np.int64), "sizes"), axis=2, _outputs=3)
        for gi in range(hkv):
            cols = np.concatenate(
                [q_cols[h] for h in range(gi * per, (gi + 1) * per)]
                + [sizes[0] + kv_cols[gi], sizes[0] + sizes[1] + kv_cols[gi]]
            )
            slices[gi] += [("wqkv", 1, cols)] + ([("bqkv", 0, cols)] if bias else [])
    else:
        outs = []
        for name, n in zip("qkv", sizes, strict=True):
            t = b.MatMul(x, b.const(_rand(rng, d, n), f"w{name}"))
            if bias:
                t = b.Add(t, b.const(_rand(rng, n), f"b{name}"))
            outs.append(t)
        q, k, v = outs
        for gi in range(hkv):
            qc = np.concatenate([q_cols[h] for h in range(gi * per, (gi + 1) * per)])
            for name, cols in (("q", qc), ("k", kv_cols[gi]), ("v", kv_cols[gi])):
                slices[gi] += [(f"w{name}", 1, cols)] + ([(f"b{name}", 0, cols)] if bias else [])
    a = b.Attention(q, k, v, q_num_heads=hq, kv_num_heads=hkv)
    wo = b.const(_rand(rng, hq * dh, d), "wo")
    y = b.MatMul(a, wo)
    for gi in range(hkv):
        rows = np.concatenate([q_cols[h] for h in range(gi * per, (gi + 1) * per)])
        slices[gi] += [("wo", 0, rows)]
    g.set_outputs([y], ["y"])
    _infer(g)
    return Case(_model(g, 23), {"x": (2, 5, d)}, hkv, slices)


@settings(max_examples=15)
@given(
    st.sampled_from([(2, 2), (4, 4), (4, 2), (6, 3), (6, 2), (4, 1)]), st.sampled_from([2, 4]),
    st.booleans(), st.booleans(), st.integers(0, 2**16), st.data(),
)  # fmt: skip
def test_attention_zeroed_heads_are_removed_exactly(heads, dh, fused, bias, seed, data):
    hq, hkv = heads
    if hkv < 2:  # one KV head: nothing can go (one unit is always kept)
        case = attention(hq, hkv, dh, fused, bias, seed)
        with pytest.raises(GraphoptError, match="no prunable"):
            optimize_model(case.model, "prune-heads{ratio=0.5}")
        return
    case = attention(hq, hkv, dh, fused, bias, seed)  # a zeroed head's biases are zeroed too
    zeroed = data.draw(st.lists(st.integers(0, hkv - 1), min_size=1, max_size=hkv - 1, unique=True))
    model = _check_exact(case, "prune-heads", sorted(zeroed))
    node = next(n for n in model.graph if n.op == "Attention")
    left = hkv - len(zeroed)
    assert (
        node.get_attr("kv_num_heads") == left and node.get_attr("q_num_heads") == left * hq // hkv
    )


# ----- what the analysis refuses ------------------------------------------------------------------


def test_refuses_a_tensor_used_outside_the_group():
    case = mlp(4, 6, False, False, False, 0)
    g = case.model.graph
    hidden = next(n for n in g if n.op == "Gelu").output
    g.add_output(hidden, "hidden")  # the hidden layer is now the caller's
    with pytest.raises(GraphoptError, match="no prunable MLP neuron group") as error:
        optimize_model(case.model, "prune-mlp")
    assert "graph output" in str(error.value.hint)


def test_refuses_an_unknown_op_in_the_path_and_names_it():
    case = mlp(4, 6, False, False, False, 0)
    g = case.model.graph
    gelu = next(n for n in g if n.op == "Gelu")
    gelu.domain, gelu.op_type = "custom.domain", "Mystery"
    regions = [r for r in analyze(g) if r.refusal]
    assert any("custom.domain.Mystery" in r.refusal and r.refused_at is gelu for r in regions)


def test_refuses_layernorm_over_the_channels():
    g = Graph("main")
    b = Builder(g)
    x = g.add_input("x", TensorType(F32, (2, 4)))
    h = b.MatMul(x, b.const(np.ones((4, 6), np.float32), "w"))
    h = b.LayerNormalization(h, b.const(np.ones(6, np.float32), "s"), axis=-1)
    y = b.MatMul(h, b.const(np.ones((6, 3), np.float32), "w2"))
    g.set_outputs([y], ["y"])
    _infer(g)
    region = analyze(g)[0]
    assert "LayerNormalization mixes the channels" in region.refusal


@pytest.mark.parametrize(("multiple", "kept"), [(1, 5), (4, 8), (3, 6), (16, 10)])
def test_multiple_rounds_the_kept_count_up(multiple, kept):
    case = mlp(4, 10, False, False, False, 0)
    optimize_model(case.model, f"prune-mlp{{ratio=0.5 multiple={multiple}}}")
    assert case.model.graph.initializers["wd"].const_value.shape == (kept, 4)


def test_multiple_must_not_be_negative():
    case = mlp(4, 10, False, False, False, 0)
    with pytest.raises(GraphoptError, match=r"multiple must be 0 \(auto\) or a positive integer"):
        optimize_model(case.model, "prune-mlp{multiple=-1}")


def test_auto_multiple_is_the_cpu_block_for_wide_conv_groups_only():
    """multiple=0: Conv channel groups of at least 4 SIMD blocks keep a multiple of the block
    (8 on AVX2, 16 on AVX-512); narrower Conv groups, MLP neurons and heads are not rounded."""
    from graphopt.passes.pruning.channels import PruneChannels
    from graphopt.passes.pruning.mlp import PruneMLP
    from graphopt.passes.quantization.cpu_features import detect_cpu

    block = 16 if detect_cpu().has("avx512f") else 8
    channels = PruneChannels(ratio=0.3)
    assert channels.multiple == 0
    assert channels._multiple(64) == block and channels._drop_count(64) == 64 - 48
    assert channels._multiple(4 * block - 1) == 1
    assert PruneMLP(ratio=0.3, multiple=0)._multiple(4096) == 1


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_the_range_is_one_clear_error(ratio):
    case = mlp(4, 6, False, False, False, 0)
    with pytest.raises(GraphoptError, match=r"ratio must be in \[0, 1\)"):
        optimize_model(case.model, f"prune-mlp{{ratio={ratio}}}")


def test_cli_exits_2_on_a_model_with_no_group(tmp_path):
    from graphopt.api.cli import main

    case = conv_stack(2, 4, False, False, 0)
    path = tmp_path / "m.onnx"
    graphopt.save(case.model, str(path))
    assert (
        main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--passes", "prune-mlp"]) == 2
    )
    assert not (tmp_path / "o.onnx").exists()
    args = [
        "optimize",
        str(path),
        "-o",
        str(tmp_path / "o.onnx"),
        "--passes",
        "prune-channels{ratio=1}",
    ]
    assert main(args) == 2


# ----- the zoo ------------------------------------------------------------------------------------

ZOO = [("gpt2", "prune-mlp"), ("gpt2", "prune-heads"), ("llama", "prune-mlp"),
       ("llama", "prune-heads"), ("bert", "prune-mlp"), ("bert", "prune-heads"),
       ("resnet", "prune-channels")]  # fmt: skip
KIND = {"prune-mlp": "dense", "prune-heads": "attention", "prune-channels": "conv"}


@pytest.fixture(scope="module")
def o2_models(zoo_cache):
    import models

    built = {}
    for name in ("gpt2", "llama", "bert", "resnet"):
        path = models.build(name, zoo_cache, size="tiny")
        built[name] = to_onnx(graphopt.optimize(graphopt.load(str(path)), "O2"))
    return built


@pytest.mark.parametrize(("name", "pass_name"), ZOO)
def test_zoo_zeroed_groups_are_removed_exactly_and_run_in_ort(o2_models, name, pass_name):
    import models
    import onnxruntime as ort

    model = graphopt.load(o2_models[name])
    regions = [r for r in analyze(model.graph) if r.kind == KIND[pass_name] and not r.refusal]
    assert regions, f"no {KIND[pass_name]} group found in {name}"
    for r in regions:  # zero half the units of every group (the lowest ids), every slice
        roots, units = r.units()
        assert units % 2 == 0  # ratio 0.5 then drops exactly the zeroed half
        dropped = roots[: units // 2]
        for e in r.consts:
            value = e.node.inputs[e.index]
            gone = np.isin(r.positions.roots(e.ids), dropped)
            array = np.array(value.const_value, copy=True)
            cut = [slice(None)] * array.ndim
            cut[e.axis] = gone
            array[tuple(cut)] = 0
            value.const_value = array
    feeds = models.sample_inputs(name)
    before = graphopt.run(model, feeds)
    params_before = sum(v.const_value.size for v in model.graph.initializers.values())
    graphopt.optimize(model, f"{pass_name}{{ratio=0.5}}")
    after = graphopt.run(model, feeds)
    for key in before:
        np.testing.assert_allclose(after[key], before[key], rtol=1e-4, atol=1e-4)
    assert sum(v.const_value.size for v in model.graph.initializers.values()) < params_before
    session = ort.InferenceSession(to_onnx(model).SerializeToString())
    got = session.run(None, feeds)
    for a, key in zip(got, after, strict=True):
        np.testing.assert_allclose(a, after[key], rtol=1e-4, atol=1e-4)


def test_multihead_attention_contrib_heads_are_removed_exactly_in_ort():
    """com.microsoft.MultiHeadAttention (num_heads): the reference interpreter has no kernel for
    it, so ONNX Runtime runs the model before and after."""
    import onnxruntime as ort

    rng = np.random.default_rng(7)
    heads, dh, d = 4, 4, 8
    g = Graph("main")
    b = Builder(g)
    x = g.add_input("x", TensorType(F32, ("batch", "seq", d)))
    ws = {n: _rand(rng, d, heads * dh) for n in "qkv"}
    wo = _rand(rng, heads * dh, d)
    for w in (*ws.values(), wo.T):
        w[:, dh : 2 * dh] = 0  # head 1 zeroed everywhere
    q, k, v = (b.MatMul(x, b.const(ws[n], f"w{n}")) for n in "qkv")
    a = b.op("com.microsoft.MultiHeadAttention", q, k, v, num_heads=heads)
    a.type = TensorType(F32, ("batch", "seq", heads * dh))
    y = b.MatMul(a, b.const(wo, "wo"))
    g.set_outputs([y], ["y"])
    for node in g:
        if node.op == "MatMul":
            node.output.type = TensorType(
                F32, ("batch", "seq", node.inputs[1].const_value.shape[1])
            )
    model = Model(g, opset_imports={"": 20, "com.microsoft": 1})
    feeds = {"x": rng.standard_normal((2, 5, d)).astype(np.float32)}

    def run() -> np.ndarray:
        session = ort.InferenceSession(to_onnx(model).SerializeToString())
        return session.run(None, feeds)[0]

    before = run()
    optimize_model(model, "prune-heads{ratio=0.3}")
    mha = next(n for n in model.graph if n.op_type == "MultiHeadAttention")
    assert mha.get_attr("num_heads") == heads - 1
    assert model.graph.initializers["wo"].const_value.shape == ((heads - 1) * dh, d)
    np.testing.assert_allclose(run(), before, rtol=1e-4, atol=1e-5)
