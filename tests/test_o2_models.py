"""O2 on real models: every layer's attention, normalizations, GELU and rotary embedding fused on
the zoo's GPT-2, BERT and LLaMA-style models, every BatchNormalization folded on the ResNet, for
both torch.onnx exporters and both targets; ONNX Runtime computes the same outputs before and
after. The light models the onnx package ships (old opsets, Constant nodes, unfolded BatchNorm)
stay valid and equal under O2."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from models.specs import get_spec
from models.zoo import sample_inputs

import graphopt
from graphopt.backends.onnx import to_onnx

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _assert_equal_outputs(original: str, optimized: onnx.ModelProto, feeds: dict) -> None:
    expected = _session(original).run(None, feeds)
    got = _session(optimized).run(None, feeds)
    for want, have in zip(expected, got, strict=True):
        scale = max(float(np.abs(want).max()), 1e-12)
        assert float(np.abs(want - have).max()) <= 1e-4 * scale


def _layers(name: str) -> int:
    config = get_spec(name).config("tiny", {})
    return int(config.get("n_layer") or config["num_hidden_layers"])


def _fused_counts(name: str, layers: int) -> dict[str, int]:
    """What O2 must leave: one fused op per layer and site (norms: two per layer and a final one;
    BERT's are the embedding's and two per layer)."""
    if name == "llama":
        return {"Attention": layers, "RMSNormalization": 2 * layers + 1,
                "RotaryEmbedding": 2 * layers}  # fmt: skip
    norms = {"LayerNormalization": 2 * layers + 1}
    return {"Attention": layers, **norms, "Gelu": layers}


ORT_NAMES = {  # the contrib forms target onnxruntime may choose instead
    "LayerNormalization": ("LayerNormalization", "SkipLayerNormalization"),
    "RMSNormalization": ("RMSNormalization", "SkipSimplifiedLayerNormalization"),
    "Gelu": ("Gelu", "BiasGelu", "FastGelu"),
}


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx", "onnxruntime"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_o2_fuses_every_transformer_layer(zoo_model, name, exporter, target):
    path = str(zoo_model(name, exporter))
    optimized = to_onnx(graphopt.optimize(graphopt.load(path), "O2", target=target))
    onnx.checker.check_model(optimized)
    ops = collections.Counter(node.op_type for node in optimized.graph.node)
    for op, count in _fused_counts(name, _layers(name)).items():
        names = ORT_NAMES.get(op, (op,)) if target == "onnxruntime" else (op,)
        assert sum(ops[n] for n in names) == count, (op, dict(ops))
    assert not {"Softmax", "Erf", "ReduceMean", "Pow"} & set(ops), dict(
        ops
    )  # (BERT's pooler is a Tanh)
    _assert_equal_outputs(path, optimized, sample_inputs(name, "tiny", batch=2, sequence=11))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["onnx", "onnxruntime"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_o2_folds_every_batchnorm_of_the_resnet(zoo_model, exporter, target):
    path = str(zoo_model("resnet", exporter, optimize=False))  # the exporters' raw graphs
    source = collections.Counter(node.op_type for node in onnx.load(path).graph.node)
    optimized = to_onnx(graphopt.optimize(graphopt.load(path), "O2", target=target))
    ops = collections.Counter(node.op_type for node in optimized.graph.node)
    assert source["BatchNormalization"] == source["Conv"] > 0
    assert ops["BatchNormalization"] == 0
    if target == "onnxruntime":
        assert ops["FusedConv"] > 0, dict(ops)
    _assert_equal_outputs(path, optimized, sample_inputs("resnet", "tiny", batch=2))


@pytest.mark.parametrize("target", ["onnx", "onnxruntime"])
@pytest.mark.parametrize("name", ["squeezenet", "resnet50", "inception_v1"])
def test_o2_keeps_old_opset_models_valid_and_equal(name, target):
    path = str(LIGHT / f"light_{name}.onnx")
    optimized = to_onnx(graphopt.optimize(graphopt.load(path), "O2", target=target))
    onnx.checker.check_model(optimized)
    rng = np.random.default_rng(0)
    feeds = {
        info.name: rng.random([d if isinstance(d, int) else 1 for d in info.shape]).astype(
            np.float32
        )
        for info in _session(path).get_inputs()
    }
    _assert_equal_outputs(path, optimized, feeds)
