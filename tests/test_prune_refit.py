"""refit=true of the structured pruning passes: least-squares re-solve of the consumer layer.

Cases where the answer is known: a hidden layer of rank r (a linear up projection from r inputs)
is reconstructed exactly from any r kept neurons, by a MatMul, a transposed Gemm and a 3x3 Conv
(im2col with padding and stride); neurons with a constant output fold into the down projection's
bias, a bias added where there was none. On the tiny zoo models with ratio 0.5, refit raises the
output cosine over plain pruning on held-out inputs (not the calibration inputs). Without
calibration data refit is one clear error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import graphopt
from graphopt.backends.onnx import to_onnx
from graphopt.backends.reference import Interpreter
from graphopt.ir import Builder, DType, Graph, Model, TensorType
from graphopt.ir.errors import GraphoptError
from graphopt.ir.inference import infer_node
from graphopt.ir.verifier import verify
from graphopt.passes.pruning.driver import output_cosine

F32 = DType.FLOAT


@pytest.fixture
def tiny_ridge(monkeypatch):
    """The exact cases compare to 1e-3: the default ridge (1% of the mean variance) would bias
    the solution by about that much, so they solve with almost none."""
    from graphopt.passes.pruning import refit

    monkeypatch.setattr(refit, "RIDGE", 1e-7)


def _finish(g: Graph) -> Model:
    for node in g:
        for value, t in zip(node.outputs, infer_node(node, {"": 20}), strict=False):
            value.type = t
    return Model(g, opset_imports={"": 20})


def _samples(shape: tuple[int, ...], count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def _low_rank_mlp(gemm: bool) -> Model:
    """x[., 3] -> up to 12 neurons (rank 3, no activation) -> down to 4."""
    rng = np.random.default_rng(0)
    g = Graph("main")
    b = Builder(g)
    x = g.add_input("x", TensorType(F32, (16, 3) if gemm else ("batch", 8, 3)))
    up = b.MatMul(x, b.const(rng.standard_normal((3, 12)).astype(np.float32), "wu"))
    h = b.Identity(up)
    wd = rng.standard_normal((12, 4)).astype(np.float32)
    y = (
        b.Gemm(h, b.const(np.ascontiguousarray(wd.T), "wd"), transB=1)
        if gemm
        else b.MatMul(h, b.const(wd, "wd"))
    )
    g.set_outputs([y], ["y"])
    return _finish(g)


@pytest.mark.parametrize("gemm", [False, True])
def test_refit_reconstructs_a_low_rank_layer_exactly(gemm, tiny_ridge):
    shape = (16, 3) if gemm else (2, 8, 3)
    calibration, held_out = _samples(shape, 6, 1), _samples(shape, 2, 2)
    results = {}
    for refit in (False, True):
        model = _low_rank_mlp(gemm)
        before = [Interpreter(model).run(f)["y"] for f in held_out]
        graphopt.optimize(model, f"prune-mlp{{ratio=0.5 refit={str(refit).lower()}}}",
                          calibration=calibration)  # fmt: skip
        verify(model)
        assert model.graph.initializers["wd"].const_value.shape[0 if not gemm else 1] == 6
        after = [Interpreter(model).run(f)["y"] for f in held_out]
        results[refit] = (before, after)
    before, after = results[True]
    for a, b in zip(after, before, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
    assert output_cosine(*results[False]) < 0.999  # plain pruning does lose something here


def test_refit_folds_constant_neurons_into_a_new_bias(tiny_ridge):
    """Neurons whose input weights are zero output relu(b_j) > 0 for every input: plain pruning
    drops their contribution, refit moves it into a bias the down projection did not have."""
    rng = np.random.default_rng(3)
    g = Graph("main")
    b = Builder(g)
    x = g.add_input("x", TensorType(F32, ("batch", 4)))
    wu = rng.standard_normal((4, 8)).astype(np.float32)
    wu[:, :4] = 0  # neurons 0-3: constant
    bu = np.abs(rng.standard_normal(8)).astype(np.float32) + 0.5
    h = b.Relu(b.Add(b.MatMul(x, b.const(wu, "wu")), b.const(bu, "bu")))
    wd = rng.standard_normal((8, 3)).astype(np.float32)
    wd[:4] *= 0.2  # so that the constant neurons score lowest
    y = b.MatMul(h, b.const(wd, "wd"))
    g.set_outputs([y], ["y"])
    model = _finish(g)
    held_out = _samples((5, 4), 1, 9)[0]
    expected = Interpreter(model).run(held_out)["y"]
    graphopt.optimize(model, "prune-mlp{ratio=0.5 refit=true}", calibration=_samples((5, 4), 8, 1))
    verify(model)
    assert np.all(model.graph.initializers["wu"].const_value.any(axis=0))  # constants went
    assert [n.op for n in model.graph].count("Add") == 2  # the new bias after the down MatMul
    np.testing.assert_allclose(
        Interpreter(model).run(held_out)["y"], expected, rtol=1e-4, atol=1e-4
    )


def test_refit_conv_uses_im2col_patches(tiny_ridge):
    """A 1x1 conv makes 8 channels of rank 2; a 3x3 strided, padded conv reads them: any 4 kept
    channels reconstruct it exactly through the im2col Gram matrix."""
    rng = np.random.default_rng(5)
    g = Graph("main")
    b = Builder(g)
    x = g.add_input("x", TensorType(F32, ("batch", 2, 7, 7)))
    w1 = rng.standard_normal((8, 2, 1, 1)).astype(np.float32)
    h = b.Conv(x, b.const(w1, "w1"), kernel_shape=[1, 1])
    w2 = rng.standard_normal((3, 8, 3, 3)).astype(np.float32)
    y = b.Conv(h, b.const(w2, "w2"), b.const(np.ones(3, np.float32), "b2"),
               kernel_shape=[3, 3], pads=[1, 0, 1, 2], strides=[2, 1])  # fmt: skip
    g.set_outputs([y], ["y"])
    model = _finish(g)
    held_out = _samples((1, 2, 7, 7), 1, 4)[0]
    expected = Interpreter(model).run(held_out)["y"]
    graphopt.optimize(
        model, "prune-channels{ratio=0.5 refit=true}", calibration=_samples((2, 2, 7, 7), 4, 1)
    )
    assert model.graph.initializers["w2"].const_value.shape == (3, 4, 3, 3)
    np.testing.assert_allclose(
        Interpreter(model).run(held_out)["y"], expected, rtol=1e-3, atol=1e-3
    )


def test_refit_says_per_layer_which_fit_it_kept():
    """The report says what the held-out check chose: least squares where the kept neurons
    explain the removed ones (rank 3 of 12), plain pruning where nothing can (independent
    neurons whose mean flips sign from sample to sample: a fit or a mean learned on one half of
    the calibration samples only adds error on the other half)."""
    from graphopt.passes import optimize_model

    shape = (2, 8, 3)
    result = optimize_model(
        _low_rank_mlp(False), "prune-mlp{ratio=0.5 refit=true}", calibration=_samples(shape, 6, 1)
    )
    chosen = [n.message for n in result.notes if n.message.startswith("refit: ")]
    assert len(chosen) == 1 and chosen[0].startswith("refit: least squares")
    assert _heldout_ratio(result) < 0.5  # the report says how much the fit recovered

    rng = np.random.default_rng(7)
    g = Graph("main")
    b = Builder(g)
    x = g.add_input("x", TensorType(F32, ("batch", 64)))
    h = b.Identity(b.MatMul(x, b.const(np.eye(64, dtype=np.float32), "wu")))
    y = b.MatMul(h, b.const(rng.standard_normal((64, 4)).astype(np.float32), "wd"))
    g.set_outputs([y], ["y"])
    samples = [
        {"x": (rng.standard_normal((4, 64)) + (-1) ** i).astype(np.float32)} for i in range(8)
    ]
    result = optimize_model(_finish(g), "prune-mlp{ratio=0.5 refit=true}", calibration=samples)
    chosen = [n.message for n in result.notes if n.message.startswith("refit: ")]
    assert len(chosen) == 1 and chosen[0].startswith("refit: plain pruning")
    assert _heldout_ratio(result) >= 1.0


def _heldout_ratio(result: Any) -> float:
    """The best fit's held-out error over plain pruning's, from the structured-pruning report
    (the refit note says the same in words)."""
    (row,) = result.artifacts["structured-pruning"].refits
    assert f"held-out error {row.heldout_ratio:.3g}x" in row.choice
    return float(row.heldout_ratio)


@pytest.mark.parametrize("passes", ["prune-mlp{refit=true}", "prune-channels{scores=activation}"])
def test_refit_and_activation_scores_need_calibration(passes):
    model = _low_rank_mlp(False)
    with pytest.raises(GraphoptError, match="needs calibration data"):
        graphopt.optimize(model, passes)


# ----- the zoo: refit beats plain pruning on held-out inputs --------------------------------------

ZOO = [("gpt2", "prune-mlp"), ("llama", "prune-mlp"), ("bert", "prune-mlp"),
       ("bert", "prune-heads"), ("resnet", "prune-channels")]  # fmt: skip


@pytest.fixture(scope="module")
def o2_models(zoo_cache):
    import models

    return {
        name: to_onnx(graphopt.optimize(graphopt.load(str(models.build(name, zoo_cache))), "O2"))
        for name in ("gpt2", "llama", "bert", "resnet")
    }


@pytest.mark.parametrize(("name", "pass_name"), ZOO)
def test_zoo_refit_raises_cosine_over_plain_pruning(o2_models, name, pass_name):
    import models

    calibration = [models.sample_inputs(name, seed=s) for s in range(1, 17)]
    held_out = [models.sample_inputs(name, seed=s) for s in (100, 101)]
    original = graphopt.load(o2_models[name])
    reference = [graphopt.run(original, f) for f in held_out]
    cosine = {}
    for refit in ("false", "true"):
        model = graphopt.load(o2_models[name])
        graphopt.optimize(model, f"{pass_name}{{ratio=0.5 refit={refit}}}", calibration=calibration)
        outs = [graphopt.run(model, f) for f in held_out]
        cosine[refit] = output_cosine(
            [v for r in reference for v in r.values()], [v for o in outs for v in o.values()]
        )
    assert cosine["true"] > cosine["false"], cosine


def test_refit_bias_goes_into_an_existing_bias_add(tiny_ridge):
    """MatMul + Add(bias) down projection: the delta lands in the bias, no new node."""
    rng = np.random.default_rng(4)
    g = Graph("main")
    b = Builder(g)
    x = g.add_input("x", TensorType(F32, ("batch", 4)))
    wu = rng.standard_normal((4, 8)).astype(np.float32)
    wu[:, :4] = 0
    bu = np.abs(rng.standard_normal(8)).astype(np.float32) + 0.5
    h = b.Relu(b.Add(b.MatMul(x, b.const(wu, "wu")), b.const(bu, "bu")))
    wd = rng.standard_normal((8, 3)).astype(np.float32)
    wd[:4] *= 0.2
    y = b.Add(b.MatMul(h, b.const(wd, "wd")), b.const(np.ones(3, np.float32), "bd"))
    g.set_outputs([y], ["y"])
    model = _finish(g)
    ops = [n.op for n in model.graph]
    held_out = _samples((5, 4), 1, 9)[0]
    expected = Interpreter(model).run(held_out)["y"]
    graphopt.optimize(model, "prune-mlp{ratio=0.5 refit=true}", calibration=_samples((5, 4), 8, 1))
    assert [n.op for n in model.graph] == ops
    assert "bd" not in model.graph.initializers  # replaced by the refit bias
    np.testing.assert_allclose(
        Interpreter(model).run(held_out)["y"], expected, rtol=1e-4, atol=1e-4
    )
