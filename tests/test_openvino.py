"""The `openvino` backend: every tiny zoo model after O1, and random graphs, compute what the
reference interpreter computes (max |a - b| <= 1e-4 * max |b|, fp32 inference); saved OpenVINO IR
reloads and computes the same; the thread count reaches the plugin; symbolic dims stay dynamic;
`supports` reflects the installed ONNX frontend. Skipped when openvino is not installed."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from models import EXPORTERS, MODELS, sample_inputs
from strategies import assert_outputs_close, feeds_for, models

import graphopt
from graphopt.backends.base import BackendError, all_backends, get_backend
from graphopt.backends.reference import Interpreter
from graphopt.ir import Builder, DType, Graph, Model, Node, TensorType

ov = pytest.importorskip("openvino", reason="the openvino backend needs `pip install openvino`")
openvino_backend = pytest.importorskip("graphopt.backends.openvino")

RTOL = 1e-4
CASES = [(name, exporter) for name in MODELS for exporter in EXPORTERS]
Zoo = Callable[..., Path]


def _assert_close(actual: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    assert list(actual) == list(expected)
    for name, want in expected.items():
        got = np.asarray(actual[name])
        assert got.shape == want.shape and got.dtype == want.dtype, name
        error = float(np.max(np.abs(got - want)))
        scale = float(np.max(np.abs(want)))
        assert error <= RTOL * scale, f"{name} differs by {error:.3g} (scale {scale:.3g})"


def _mlp(batch: int | str = "batch") -> Model:
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.FLOAT, (batch, 4)))
    rng = np.random.default_rng(0)
    h = b.Relu(b.Gemm(x, b.const(rng.standard_normal((4, 8)).astype(np.float32)),
                      b.const(np.ones(8, np.float32))))  # fmt: skip
    g.set_outputs([b.MatMul(h, b.const(rng.standard_normal((8, 3)).astype(np.float32)))], ["y"])
    return Model(g, {"": 18})


def _reference_ov_run(compiled: object, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    results = compiled.create_infer_request().infer(dict(feeds))  # type: ignore[attr-defined]
    return [np.asarray(results[i]) for i in range(len(results))]


def test_openvino_is_a_builtin_backend() -> None:
    assert all_backends()["openvino"].origin == "built-in"
    assert get_backend("openvino").unavailable() is None


@pytest.mark.parametrize(("name", "exporter"), CASES)
def test_zoo_model_after_o1_matches_the_reference(name: str, exporter: str, zoo_model: Zoo) -> None:
    model = graphopt.optimize(graphopt.load(zoo_model(name, exporter)), "O1")
    feeds = sample_inputs(name, batch=3, sequence=11)  # not the traced sizes: dims stay dynamic
    expected = Interpreter(model).run(feeds)
    executable = get_backend("openvino").compile(model, threads=2)
    _assert_close(executable.run(feeds), expected)


def test_saved_ir_reloads_and_computes_the_same(tmp_path: Path, zoo_model: Zoo) -> None:
    model = graphopt.optimize(graphopt.load(zoo_model("gpt2", "dynamo")), "O1")
    executable = get_backend("openvino").compile(model)
    written = executable.save(str(tmp_path / "gpt2.xml"))
    assert written == [str(tmp_path / "gpt2.xml"), str(tmp_path / "gpt2.bin")]
    assert sorted(os.listdir(tmp_path)) == ["gpt2.bin", "gpt2.xml"]  # no temp files left
    reloaded = ov.Core().read_model(written[0])
    assert {str(c.get_element_type()) for c in reloaded.get_ops() if c.get_type_name() ==
            "Constant" and c.get_element_type().is_real()} == {"<Type: 'float32'>"}  # fmt: skip
    compiled = ov.Core().compile_model(reloaded, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for batch, sequence in ((1, 5), (2, 9)):
        feeds = sample_inputs("gpt2", batch=batch, sequence=sequence)
        expected = Interpreter(model).run(feeds)
        actual = dict(
            zip(model.graph.output_names, _reference_ov_run(compiled, feeds), strict=True)
        )
        _assert_close(actual, expected)


def test_save_wants_an_xml_path_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    executable = get_backend("openvino").compile(_mlp())
    with pytest.raises(BackendError, match=r"\.xml"):
        executable.save(str(tmp_path / "model.onnx"))
    with pytest.raises(BackendError, match="cannot write"):
        executable.save(str(tmp_path / "missing" / "model.xml"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("threads", [1, 2])
def test_thread_count_and_fp32_reach_the_plugin(threads: int) -> None:
    executable = get_backend("openvino").compile(_mlp(), threads=threads)
    assert int(executable.property("INFERENCE_NUM_THREADS")) == threads
    assert "f32" in str(executable.property("INFERENCE_PRECISION_HINT")).lower() or (
        "float32" in str(executable.property("INFERENCE_PRECISION_HINT"))
    )
    with pytest.raises(BackendError, match="threads"):
        get_backend("openvino").compile(_mlp(), threads=0)


def test_symbolic_dims_stay_dynamic() -> None:
    model = _mlp("batch")
    executable = get_backend("openvino").compile(model)
    assert executable.compiled.inputs[0].get_partial_shape().is_dynamic
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
        _assert_close(executable.run({"x": x}), Interpreter(model).run({"x": x}))


def test_inputs_are_checked_not_left_uninitialized() -> None:
    executable = get_backend("openvino").compile(_mlp(2))
    with pytest.raises(BackendError, match="input 'x' is missing"):
        executable.run({})
    x = np.ones((2, 4), np.float32)
    with pytest.raises(BackendError, match="not inputs of the model: z"):
        executable.run({"x": x, "z": x})


def test_an_overridden_initializer_input_is_refused_not_ignored() -> None:
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.FLOAT, (2,)))
    bias = g.add_input("bias", TensorType(DType.FLOAT, (2,)))
    g.set_input_default(bias, np.ones(2, np.float32))  # an initializer that is also an input
    g.set_outputs([b.Add(x, bias)], ["y"])
    model = Model(g, {"": 18})
    executable = get_backend("openvino").compile(model)
    x_value = np.array([1.0, 2.0], np.float32)
    _assert_close(executable.run({"x": x_value}), Interpreter(model).run({"x": x_value}))
    if "bias" not in executable.input_names:  # folded into a constant by the frontend
        with pytest.raises(BackendError, match="cannot be fed"):
            executable.run({"x": x_value, "bias": x_value})


def test_unknown_target_is_refused() -> None:
    with pytest.raises(BackendError, match="no target 'gpu'"):
        get_backend("openvino").compile(_mlp(), target="gpu")


def _one_node(op: str, inputs: int = 1) -> tuple[Model, Node]:
    g = Graph()
    b = Builder(g)
    xs = [g.add_input(f"x{i}", TensorType(DType.FLOAT, (2, 3))) for i in range(inputs)]
    y = b.op(op, *xs)
    g.set_outputs([y], ["y"])
    assert y.producer is not None
    return Model(g, {"": 18, "com.microsoft": 1}), y.producer


def test_supports_follows_the_installed_frontend() -> None:
    backend = get_backend("openvino")
    relu = _one_node("Relu")[1]
    assert backend.supports(relu, 18)
    assert backend.supports(_one_node("com.microsoft.FusedMatMul", 2)[1], 18)
    assert not backend.supports(_one_node("com.microsoft.NoSuchOp")[1], 18)
    assert not backend.supports(_one_node("ai.onnx.ml.Normalizer")[1], 18)
    model, node = _one_node("com.microsoft.NoSuchOp")
    with pytest.raises(BackendError, match="cannot run 1 node.*NoSuchOp"):
        backend.compile(model)


def test_models_over_the_protobuf_limit_go_through_a_temp_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(openvino_backend, "_PROTOBUF_LIMIT", 0)
    model = _mlp(2)
    executable = get_backend("openvino").compile(model)
    folder = executable._keep.name
    assert os.path.exists(os.path.join(folder, "model.onnx"))
    x = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    _assert_close(executable.run({"x": x}), Interpreter(model).run({"x": x}))
    del executable
    import gc

    gc.collect()
    assert not os.path.exists(folder)


def test_unavailable_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    reason = openvino_backend.OpenVinoBackend().unavailable()
    assert reason is not None and "pip install openvino" in reason


@settings(max_examples=30, deadline=None)
@given(models())
def test_random_graphs_match_the_reference(model: Model) -> None:
    feeds = feeds_for(model)
    expected = Interpreter(model).run(feeds)
    actual = get_backend("openvino").compile(model, threads=1).run(feeds)
    assert_outputs_close(expected, actual, rtol=1e-4, atol=1e-5)
