"""The model zoo (tests/models): every tiny model, with each exporter, imports into graphopt,
verifies, and computes the same outputs in graphopt's reference interpreter, in ONNX Runtime
and in torch.

Outputs are compared relative to their scale: max |a - b| <= 1e-4 * max |b|. Inputs use a
different batch and sequence length than the exporters traced, so the symbolic dims are exercised.
Exporting dominates the first run (about 40 s for the ten exports on 2 cores, nearly all of it
in the dynamo exporter); afterwards the models come from the cache (`$GRAPHOPT_MODEL_CACHE`,
default `~/.cache/graphopt-models`) and the file runs in about 6 s, 2 s without the two tests
that rebuild a torch module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from models import (
    EXPORTERS,
    MODELS,
    UnsupportedExport,
    build,
    cache_key,
    sample_inputs,
    torch_outputs,
    torch_reference,
)

import graphopt
from graphopt.backends.reference import Interpreter
from graphopt.ir.verifier import verify

RTOL = 1e-4
CASES = [(name, exporter) for name in MODELS for exporter in EXPORTERS]
Zoo = Callable[..., Path]


def _feeds(name: str) -> dict[str, np.ndarray]:
    return sample_inputs(name, batch=3, sequence=11)


def _assert_close(
    actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray], what: str
) -> None:
    assert list(actual) == list(expected), (
        f"{what}: output names {list(actual)} != {list(expected)}"
    )
    for name, want in expected.items():
        got = np.asarray(actual[name])
        assert got.shape == want.shape, f"{what}: {name} shape {got.shape} != {want.shape}"
        assert got.dtype == want.dtype, f"{what}: {name} dtype {got.dtype} != {want.dtype}"
        error = float(np.max(np.abs(got - want)))
        scale = float(np.max(np.abs(want)))
        assert error <= RTOL * scale, f"{what}: {name} differs by {error:.3g} (scale {scale:.3g})"


def _onnxruntime(path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, dict(feeds)), strict=True))


@pytest.mark.parametrize(("name", "exporter"), CASES)
def test_tiny_model_imports_and_onnxruntime_matches_torch(
    name: str, exporter: str, zoo_model: Zoo
) -> None:
    path = zoo_model(name, exporter)
    assert os.path.getsize(path) < 2**20, f"tiny {name} is {os.path.getsize(path)} bytes"
    model = graphopt.load(path)
    verify(model)
    spec = MODELS[name]
    dims = {i.name: i.shape for i in spec.inputs}
    assert [v.name for v in model.graph.inputs] == list(_feeds(name))
    for value in model.graph.inputs:  # dynamic dims carried as symbols, named as the spec says
        symbols = tuple(d for d in dims[value.name] if d in ("batch", "sequence"))
        assert value.type.shape[: len(symbols)] == symbols, f"{value.name}: {value.type}"

    feeds, want = torch_reference(path)  # saved by the build: no torch needed on a cached run
    assert list(feeds) == list(_feeds(name)) and list(want) == [o.name for o in spec.outputs]
    _assert_close(_onnxruntime(path, feeds), want, f"{name}/{exporter} ORT vs torch")


@pytest.mark.parametrize(("name", "exporter"), CASES)
def test_tiny_model_reference_matches_onnxruntime(name: str, exporter: str, zoo_model: Zoo) -> None:
    path = zoo_model(name, exporter)
    feeds = _feeds(name)
    actual = Interpreter(graphopt.load(path)).run(feeds)
    _assert_close(actual, _onnxruntime(path, feeds), f"{name}/{exporter} reference vs ORT")


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_raw_export_keeps_batch_norm(exporter: str, zoo_model: Zoo) -> None:
    """`optimize=False` skips the exporters' own clean-up, so BatchNormalization nodes remain
    (both exporters fold them into Conv by default), and the raw file still runs correctly."""
    path = zoo_model("resnet", exporter, optimize=False)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" in ops
    model = graphopt.load(path)
    verify(model)
    feeds = _feeds("resnet")
    _assert_close(Interpreter(model).run(feeds), _onnxruntime(path, feeds), "raw resnet")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet", "llama"])
def test_rebuilt_torch_module_matches_saved_reference(name: str, zoo_model: Zoo) -> None:
    """Seeding makes every build of a model the same: a fresh module reproduces the outputs
    saved when the cached file was exported (possibly in another session)."""
    feeds, want = torch_reference(zoo_model(name, "dynamo"))
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    got = torch_outputs(name, feeds)
    assert list(got) == list(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_second_build_is_cached(zoo_model: Zoo, zoo_cache: Path) -> None:
    path = zoo_model("resnet", "torchscript")
    stamp = path.stat().st_mtime_ns
    assert build("resnet", zoo_cache, "tiny", "torchscript") == path
    assert path.stat().st_mtime_ns == stamp
    assert not [p for p in os.listdir(zoo_cache) if p.endswith(".partial.onnx")]


def test_cache_key_covers_config_and_options() -> None:
    keys = {
        cache_key("gpt2"),
        cache_key("gpt2", "base"),
        cache_key("gpt2", exporter="torchscript"),
        cache_key("gpt2", opset=20),
        cache_key("gpt2", optimize=False),
        cache_key("gpt2", attention_mask=False),
        cache_key("llama"),
    }
    assert len(keys) == 7
    assert cache_key("gpt2") == cache_key("gpt2", attention_mask=True)


def test_torchscript_without_mask_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedExport, match="aten::diff"):
        build("llama", tmp_path, exporter="torchscript", attention_mask=False)
    assert not os.listdir(tmp_path)


def test_bad_names_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no zoo model 'gpt3'"):
        build("gpt3", tmp_path)
    with pytest.raises(ValueError, match="no size 'huge'"):
        build("gpt2", tmp_path, "huge")
    with pytest.raises(ValueError, match="no exporter"):
        build("gpt2", tmp_path, exporter="tflite")
    with pytest.raises(ValueError, match="no option"):
        build("bert", tmp_path, attention_mask=False)


def test_sample_inputs_types() -> None:
    feeds = sample_inputs("llama", batch=2, sequence=8)
    assert list(feeds) == ["input_ids", "attention_mask"]
    assert feeds["input_ids"].dtype == np.int64 and feeds["input_ids"].shape == (2, 8)
    assert feeds["input_ids"].max() < MODELS["llama"].sizes["tiny"]["vocab_size"]
    assert feeds["attention_mask"][0].all() and not feeds["attention_mask"][1, -1]
    assert list(sample_inputs("gpt2", attention_mask=False)) == ["input_ids"]
    image = sample_inputs("resnet", "base", batch=1)["pixel_values"]
    assert image.dtype == np.float32 and image.shape == (1, 3, 224, 224)
    np.testing.assert_array_equal(
        sample_inputs("bert")["input_ids"], sample_inputs("bert")["input_ids"]
    )
    assert not np.array_equal(
        sample_inputs("bert")["input_ids"], sample_inputs("bert", seed=1)["input_ids"]
    )
