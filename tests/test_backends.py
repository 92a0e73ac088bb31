"""Backends: the registry (built-ins and entry-point plugins), errors that name what exists, and
the example plugin package under examples/backend_plugin, installed and used as a user would."""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import graphopt
import graphopt.backends.base as base
from graphopt.api.cli import main
from graphopt.backends.base import BackendError, all_backends, get_backend
from graphopt.ir import Builder, DType, Graph, Model, TensorType

PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "backend_plugin"


def _mlp(with_softmax: bool = False) -> Model:
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.FLOAT, (2, 4)))
    rng = np.random.default_rng(0)
    h = b.Relu(b.Gemm(x, b.const(rng.standard_normal((4, 8)).astype(np.float32)),
                      b.const(np.ones(8, np.float32))))  # fmt: skip
    y = b.MatMul(h, b.const(rng.standard_normal((8, 3)).astype(np.float32)))
    g.set_outputs([b.Softmax(y) if with_softmax else y], ["y"])
    return Model(g, {"": 18})


def test_builtins_are_registered_and_agree():
    assert {"reference", "onnxruntime"} <= set(all_backends())
    model = _mlp()
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    reference = graphopt.run(model, {"x": x}, backend="reference")["y"]
    onnxruntime = graphopt.run(model, {"x": x}, backend="onnxruntime")["y"]
    np.testing.assert_allclose(onnxruntime, reference, rtol=1e-5, atol=1e-6)
    timing = get_backend("onnxruntime").compile(model).benchmark({"x": x}, warmup=1, runs=3)
    assert timing["median_ms"] > 0


def test_unknown_backend_names_the_close_ones():
    with pytest.raises(BackendError, match="unknown backend 'onnxruntim'") as info:
        get_backend("onnxruntim")
    assert "did you mean onnxruntime" in str(info.value)


def test_run_command_with_an_unknown_backend_exits_2(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    graphopt.save(_mlp(), path)
    assert main(["run", str(path), "--backend", "tvmm"]) == 2
    assert "unknown backend 'tvmm'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def example_plugin():
    """Install examples/backend_plugin into this environment (as a user would), once."""
    try:
        importlib.metadata.distribution("graphopt-example-backend")
    except importlib.metadata.PackageNotFoundError:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
             "-e", str(PLUGIN)],
            check=True,
        )  # fmt: skip
        importlib.invalidate_caches()
        sys.path.insert(0, str(PLUGIN))  # editable installs take effect in new processes
    base._REGISTRY.pop("example-numpy", None)  # an earlier test may have loaded it already
    base._LOADED = False
    yield
    base._REGISTRY.pop("example-numpy", None)
    base._LOADED = False


def test_the_example_plugin_registers_through_its_entry_point(example_plugin, capsys):
    assert all_backends()["example-numpy"].origin.startswith("plugin")
    model = _mlp()
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    ours = graphopt.run(model, {"x": x}, backend="example-numpy")["y"]
    np.testing.assert_allclose(ours, graphopt.run(model, {"x": x})["y"], rtol=1e-5, atol=1e-6)
    assert main(["backends"]) == 0
    assert "example-numpy" in capsys.readouterr().out


def test_the_example_plugin_names_nodes_it_cannot_run(example_plugin):
    backend = get_backend("example-numpy")
    model = _mlp(with_softmax=True)
    assert [n.op for n in backend.unsupported(model)] == ["Softmax"]
    with pytest.raises(BackendError, match="cannot run 1 node"):
        backend.compile(model)
