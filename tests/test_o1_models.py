"""O1 on real models: ONNX Runtime computes the same outputs before and after, and O1 leaves no
more nodes than onnxslim does on the same file (the light models the onnx package ships, and the
tiny GPT-2 and BERT of the model zoo, from both torch.onnx exporters)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphopt
from graphopt.backends.onnx import to_onnx

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_MODELS = ["squeezenet", "shufflenet", "resnet50", "inception_v1", "densenet121"]


def _session(model: onnx.ModelProto | str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _feeds(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for info in session.get_inputs():
        shape = [d if isinstance(d, int) else 3 for d in info.shape]
        if "int64" in info.type:
            feeds[info.name] = rng.integers(0, 100, size=shape).astype(np.int64)
        else:
            feeds[info.name] = rng.random(shape).astype(np.float32)
    return feeds


def _check(path: str) -> None:
    original = _session(path)
    feeds = _feeds(original)
    expected = original.run(None, feeds)
    optimized = to_onnx(graphopt.optimize(graphopt.load(path), "O1"))
    onnx.checker.check_model(optimized)
    for want, got in zip(expected, _session(optimized).run(None, feeds), strict=True):
        scale = max(float(np.abs(want).max()), 1e-12)
        assert float(np.abs(want - got).max()) <= 1e-4 * scale
    onnxslim = pytest.importorskip("onnxslim")
    slim = onnxslim.slim(onnx.load(path))
    assert len(optimized.graph.node) <= len(slim.graph.node), (
        f"O1 left {len(optimized.graph.node)} nodes, onnxslim {len(slim.graph.node)}"
    )


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_o1_on_light_models(name):
    _check(str(LIGHT / f"light_{name}.onnx"))


@pytest.mark.parametrize("name", ["gpt2", "bert"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_o1_on_zoo_models(name, exporter, zoo_model):
    _check(os.fspath(zoo_model(name, exporter)))
