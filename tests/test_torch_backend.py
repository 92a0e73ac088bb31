"""The torch backend: IR -> torch.fx GraphModule computes what the reference interpreter computes
(zoo models raw and after O2 for both targets, random hypothesis graphs, QDQ models), takes any
size for symbolic dims, trains (gradients reach the weights, through QDQ by the straight-through
estimator), names the node of an op it cannot translate, and runs from `graphopt run`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from models.zoo import sample_inputs
from strategies import assert_outputs_close, feeds_for, models

import graphopt
from graphopt.api.cli import main
from graphopt.api.distillation import random_samples
from graphopt.backends.base import BackendError, get_backend
from graphopt.backends.reference import Interpreter
from graphopt.backends.torch import to_graph_module, to_tensor, write_weights
from graphopt.ir import Builder, DType, Graph, Model, TensorType

torch.set_num_threads(1)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _assert_close_to_scale(expected: dict, actual: dict, rtol: float = 1e-4) -> None:
    """Same names, shapes and dtypes; max |diff| within `rtol` of each output's largest value."""
    assert list(actual) == list(expected)
    for name, want in expected.items():
        have = actual[name]
        assert have.shape == want.shape and have.dtype == want.dtype, name
        scale = max(float(np.abs(want).max()), 1e-12)
        diff = float(np.abs(have.astype(np.float64) - want).max())
        assert diff <= rtol * scale, f"{name}: max diff {diff:.3g} at scale {scale:.3g}"


def _feeds(name: str, sequence: int) -> dict:
    if name == "resnet":
        return sample_inputs(name, "tiny", batch=2)
    return sample_inputs(name, "tiny", batch=2, sequence=sequence)


@pytest.mark.parametrize("level", ["raw", "O2-onnx", "O2-onnxruntime"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama", "resnet"])
def test_zoo_models_match_the_reference(zoo_model, name, exporter, level):
    model = graphopt.load(str(zoo_model(name, exporter)))
    if level != "raw":
        model = graphopt.optimize(model, "O2", target=level.split("-")[1])
    executable = get_backend("torch").compile(model)
    for sequence in (5, 13):  # symbolic dims: one module, any length
        feeds = _feeds(name, sequence)
        _assert_close_to_scale(Interpreter(model).run(feeds), executable.run(feeds))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_unoptimized_export_with_batch_norm_matches_the_reference(zoo_model, exporter):
    model = graphopt.load(str(zoo_model("resnet", exporter, optimize=False)))
    assert "BatchNormalization" in {n.op for n in model.graph}
    feeds = _feeds("resnet", 0)
    expected = Interpreter(model).run(feeds)
    _assert_close_to_scale(expected, get_backend("torch").compile(model).run(feeds))


@settings(max_examples=60)
@given(model=models(max_nodes=16))
def test_random_graphs_match_the_reference(model):
    feeds = feeds_for(model)
    expected = Interpreter(model).run(feeds)
    actual = get_backend("torch").compile(model).run(feeds)
    assert_outputs_close(expected, actual, rtol=1e-4, atol=1e-5)


def test_float_initializers_are_parameters_and_gradients_reach_them(zoo_model):
    model = graphopt.load(str(zoo_model("gpt2")))
    module = to_graph_module(model)
    weights = dict(module.named_parameters())
    floats = [v for v in model.graph.initializers.values() if v.type.dtype is DType.FLOAT]
    assert len(weights) == len(floats) > 0
    assert all(not b.is_floating_point() for b in module.buffers())
    feeds = _feeds("gpt2", 9)
    logits = module(*[to_tensor(feeds[n]) for n in module.graphopt.input_names])[0]
    logits.square().mean().backward()
    matrices = [p for p in weights.values() if p.dim() == 2]
    assert matrices and all(p.grad is not None and p.grad.abs().sum() > 0 for p in matrices)


def test_write_weights_changes_only_the_values(zoo_model):
    model = graphopt.load(str(zoo_model("bert")))
    module = to_graph_module(model)
    name, attr = next(
        (k, a) for k, a in module.graphopt.weights.items() if getattr(module, a).dim() == 2
    )
    with torch.no_grad():
        getattr(module, attr).add_(1.0)
    nodes = [(n.op, [v.name for v in n.inputs if v]) for n in model.graph]
    assert write_weights(model, module) == [name]
    assert [(n.op, [v.name for v in n.inputs if v]) for n in model.graph] == nodes
    feeds = _feeds("bert", 6)
    _assert_close_to_scale(
        Interpreter(model).run(feeds), get_backend("torch").compile(model).run(feeds)
    )


def _quantized_gpt2(zoo_model, bits: int) -> Model:
    model = graphopt.load(str(zoo_model("gpt2")))
    passes = f"O2,upgrade-opset,quantize-weights{{bits={bits} min-elements=256}}"
    return graphopt.optimize(model, passes)


@pytest.mark.parametrize("bits", [4, 8])
def test_qdq_models_match_the_reference_and_train_through_the_ste(zoo_model, bits):
    model = _quantized_gpt2(zoo_model, bits)
    assert any(n.op == "DequantizeLinear" for n in model.graph)
    feeds = _feeds("gpt2", 7)
    _assert_close_to_scale(
        Interpreter(model).run(feeds), get_backend("torch").compile(model).run(feeds)
    )
    module = to_graph_module(model)
    assert module.graphopt.quantized  # the int weights are held as float latents
    latents = [getattr(module, q.latent) for q in module.graphopt.quantized.values()]
    logits = module(*[to_tensor(feeds[n]) for n in module.graphopt.input_names])[0]
    logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in latents)


@pytest.mark.parametrize(
    "name, passes, target",
    [
        ("gpt2", "O2,upgrade-opset,quantize-static", "onnx"),
        ("gpt2", "O2,quantize-dynamic", "onnx"),
        ("gpt2", "O2,quantize-dynamic", "onnxruntime"),
        ("gpt2", "O2,upgrade-opset,quantize-weights{bits=4 format=matmulnbits}", "onnxruntime"),
        ("resnet", "O2,quantize-dynamic", "onnx"),
        ("resnet", "O2,upgrade-opset,quantize-static", "onnx"),
    ],
)
def test_quantized_models_match_the_reference(zoo_model, name, passes, target):
    model = graphopt.load(str(zoo_model(name)))
    calibration = random_samples(model, 4, dims={"batch": 2, "sequence": 8})
    model = graphopt.optimize(model, passes, target=target, calibration=calibration)
    quantized = {"QuantizeLinear", "DynamicQuantizeLinear", "com.microsoft.MatMulNBits",
                 "com.microsoft.DynamicQuantizeMatMul"}  # fmt: skip
    assert quantized & {n.op for n in model.graph}
    feeds = _feeds(name, 7)
    _assert_close_to_scale(
        Interpreter(model).run(feeds), get_backend("torch").compile(model).run(feeds)
    )


def test_quantize_linear_rounds_half_to_even_and_saturates_with_a_straight_through_gradient():
    graph = Graph("q")
    b = Builder(graph)
    x = graph.add_input("x", TensorType(DType.FLOAT, (6,)))
    q = b.op("QuantizeLinear", x, b.const(np.float32(0.5)), b.const(np.int8(0)))
    q.type = TensorType(DType.INT8, (6,))
    y = b.op("DequantizeLinear", q, b.const(np.float32(0.5)), b.const(np.int8(0)))
    y.type = TensorType(DType.FLOAT, (6,))
    graph.set_outputs([q, y], ["q", "y"])
    model = Model(graph, opset_imports={"": 21})
    feeds = {"x": np.array([0.25, 0.75, -0.25, 1.0, 100.0, -100.0], np.float32)}
    expected = Interpreter(model).run(feeds)
    actual = get_backend("torch").compile(model).run(feeds)
    assert_outputs_close(expected, actual, rtol=0, atol=0)
    assert actual["q"].tolist() == [0, 2, 0, 2, 127, -128]
    module = to_graph_module(model)
    x_t = torch.tensor(feeds["x"], requires_grad=True)
    module(x_t)[1].sum().backward()
    assert x_t.grad.tolist() == [1, 1, 1, 1, 0, 0]  # identity inside the range, 0 outside


@pytest.mark.parametrize("size", [1, 3, 5])
def test_lrn_matches_onnx_runtime(size):
    """Checked against ONNX Runtime: onnx.reference's LRN (the interpreter's kernel) sums the
    squares over the wrong axis (it loops over the batch, not the channels)."""
    graph = Graph("g")
    x = graph.add_input("x", TensorType(DType.FLOAT, ("n", 7, 3, 3)))
    y = Builder(graph).op("LRN", x, size=size, alpha=0.01, beta=0.6, bias=1.5)
    y.type = x.type
    graph.set_outputs([y], ["y"])
    model = Model(graph, opset_imports={"": 13})
    feeds = {"x": np.random.default_rng(size).standard_normal((2, 7, 3, 3)).astype(np.float32)}
    expected = get_backend("onnxruntime").compile(model).run(feeds)
    assert_outputs_close(expected, get_backend("torch").compile(model).run(feeds), rtol=1e-5)


def test_an_op_without_a_translation_is_one_error_naming_the_node():
    graph = Graph("g")
    b = Builder(graph)
    x = graph.add_input("x", TensorType(DType.FLOAT, ("n", 4)))
    y = b.op("Det", b.op("Relu", x, _name="r"), _name="the_det")
    graph.set_outputs([y], ["y"])
    model = Model(graph, opset_imports={"": 18})
    assert [n.op for n in get_backend("torch").unsupported(model)] == ["Det"]
    with pytest.raises(BackendError, match=r"node Det 'the_det'.*\(op Det\)"):
        get_backend("torch").compile(model)


def test_graphopt_run_with_the_torch_backend(zoo_model, capsys):
    path = str(zoo_model("resnet"))
    assert main(["run", path, "--backend", "torch", "--dim", "batch=2"]) == 0
    assert "on torch" in capsys.readouterr().out


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_every_device_here(zoo_model, device):
    model = graphopt.optimize(graphopt.load(str(zoo_model("llama"))), "O2", target="onnxruntime")
    feeds = _feeds("llama", 9)
    actual = get_backend("torch").compile(model, target=device).run(feeds)
    _assert_close_to_scale(Interpreter(model).run(feeds), actual, rtol=1e-3)
