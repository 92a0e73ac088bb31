"""`--target auto` (graphopt.backends.auto): every available backend is compiled, checked against
the reference interpreter and timed; the fastest correct one wins. A deliberately wrong backend
(registered here, removed after) is excluded however fast it is, a failing or unavailable one is
listed with its reason, and the command line prints the table and writes the winner's artifact.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import graphopt
import graphopt.backends.base as base
from graphopt.api.cli import main
from graphopt.backends.auto import (
    Candidate,
    artifact_path,
    compare_outputs,
    save_artifact,
    select_backend,
)
from graphopt.backends.base import Backend, BackendError, Executable, register_backend
from graphopt.backends.reference import Interpreter
from graphopt.ir import Builder, DType, Graph, Model, TensorType


def _mlp() -> Model:
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", TensorType(DType.FLOAT, ("batch", 16)))
    rng = np.random.default_rng(0)
    h = b.Relu(b.MatMul(x, b.const(rng.standard_normal((16, 32)).astype(np.float32))))
    g.set_outputs([b.MatMul(h, b.const(rng.standard_normal((32, 4)).astype(np.float32)))], ["y"])
    return Model(g, {"": 18})


def _feeds(batch: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((batch, 16)).astype(np.float32)}


class _Instant(Executable):
    """Answers at once with outputs fixed at compile time (the reference's, perturbed)."""

    def __init__(self, outputs: dict[str, np.ndarray]):
        self.outputs = outputs
        self.output_names = list(outputs)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.outputs.items()}


class WrongBackend(Backend):
    name = "test-wrong"
    description = "test: fast and wrong (reference outputs + 1e-2 of their scale)"

    def compile(self, model: Model, target: str | None = None, **options: Any) -> Executable:
        outputs = Interpreter(model).run(_feeds())
        for value in outputs.values():
            value += 1e-2 * np.abs(value).max()
        return _Instant(outputs)


class BrokenBackend(Backend):
    name = "test-broken"
    description = "test: cannot compile anything"

    def compile(self, model: Model, target: str | None = None, **options: Any) -> Executable:
        raise BackendError("test-broken compiles nothing")


class AbsentBackend(Backend):
    name = "test-absent"
    description = "test: never available"

    def unavailable(self) -> str | None:
        return "no such device here"


@pytest.fixture
def fake_backends() -> Iterator[None]:
    base.all_backends()  # load the built-ins first
    for cls in (WrongBackend, BrokenBackend, AbsentBackend):
        register_backend(cls)
    yield
    for cls in (WrongBackend, BrokenBackend, AbsentBackend):
        base._REGISTRY.pop(cls.name, None)


def test_auto_excludes_wrong_failing_and_unavailable_backends(fake_backends: None) -> None:
    names = ["reference", "onnxruntime", "openvino", "test-wrong", "test-broken", "test-absent"]
    selection = select_backend(_mlp(), _feeds(), backends=names, rounds=6, min_rounds=3)
    by_name = {c.backend: c for c in selection.candidates}
    assert by_name["test-wrong"].status == "wrong" and "max abs diff" in by_name["test-wrong"].note
    assert by_name["test-broken"].status == "failed"
    assert "compiles nothing" in by_name["test-broken"].note
    assert by_name["test-absent"].status == "unavailable"
    assert by_name["test-absent"].note == "no such device here"
    assert by_name["reference"].status == "ok" and by_name["onnxruntime"].status == "ok"
    assert selection.winner is not None and selection.winner.status == "ok"
    assert not selection.winner.backend.startswith("test-")
    correct = [c for c in selection.candidates if c.status == "ok"]
    assert selection.winner.median_ms == min(c.median_ms or np.inf for c in correct)
    assert selection.ratio(selection.winner) == 1.0
    assert not by_name["test-wrong"].times_ms  # excluded before timing


def test_auto_can_be_limited_to_some_backends() -> None:
    selection = select_backend(_mlp(), _feeds(), backends=["onnxruntime", "nope"], rounds=3)
    assert [c.backend for c in selection.candidates] == ["onnxruntime", "nope"]
    assert selection.winner is not None and selection.winner.backend == "onnxruntime"
    assert selection.candidates[1].status == "unavailable"
    assert len(selection.winner.times_ms) == 3


def test_slow_candidates_stop_being_timed() -> None:
    names = ["reference", "onnxruntime"]
    selection = select_backend(_mlp(), _feeds(), backends=names, rounds=8, min_rounds=2, cutoff=1)
    assert selection.winner is not None
    stopped = [c for c in selection.candidates if "stopped after" in c.note]
    assert stopped and all(len(c.times_ms) < 8 for c in stopped)


class _Sleepy(Executable):
    """Right, but takes `seconds` per run."""

    def __init__(self, model: Model, seconds: float):
        self.interpreter, self.seconds = Interpreter(model), seconds

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(self.seconds)
        return self.interpreter.run(inputs)


class SlowBackend(Backend):
    name = "test-slow"
    description = "test: correct, 50 ms a run"

    def compile(self, model: Model, target: str | None = None, **options: Any) -> Executable:
        return _Sleepy(model, 0.05)


@pytest.fixture
def slow_backend() -> Iterator[None]:
    register_backend(SlowBackend)
    yield
    base._REGISTRY.pop(SlowBackend.name, None)


def test_a_hopelessly_slow_first_run_is_the_only_run(slow_backend: None) -> None:
    names = ["onnxruntime", "test-slow"]
    selection = select_backend(_mlp(), _feeds(), backends=names, slow_first_run_s=0.01)
    fast, slow = selection.candidates
    assert selection.winner is fast and len(fast.times_ms) == 20
    assert slow.correct and len(slow.times_ms) == 1 and slow.times_ms[0] >= 50.0
    assert "timed once" in slow.note
    # the same candidate under the default bar (1 s) is timed like any other
    selection = select_backend(_mlp(), _feeds(), backends=names, rounds=3, min_rounds=3)
    assert len(selection.candidates[1].times_ms) == 3


def test_compare_outputs_names_the_problem() -> None:
    e = {"y": np.array([1.0, 2.0, np.nan], np.float32)}
    assert compare_outputs(e, {"y": e["y"] * (1 + 1e-6)}) is None
    assert "missing" in str(compare_outputs(e, {}))
    assert "shape" in str(compare_outputs(e, {"y": e["y"][:2]}))
    assert "float64" in str(compare_outputs(e, {"y": e["y"].astype(np.float64)}))
    assert "NaN" in str(compare_outputs(e, {"y": np.array([1.0, 2.0, 3.0], np.float32)}))
    assert "max abs diff" in str(compare_outputs(e, {"y": e["y"] + 1e-3}))
    ints = {"i": np.array([3, 4], np.int64)}
    assert compare_outputs(ints, {"i": np.array([3, 5], np.int64)}) is not None
    zeros = {"z": np.zeros(3, np.float32)}
    assert compare_outputs(zeros, {"z": np.full(3, 1e-30, np.float32)}) is not None


def test_artifact_paths_follow_the_backend(tmp_path: Path) -> None:
    assert artifact_path("openvino", None, "out.onnx") == "out.xml"
    assert artifact_path("onnxruntime", None, "out.xml") == "out.onnx"
    assert artifact_path("tvm", None, "dir/out") == "dir/out.so"
    assert artifact_path("someone-else", None, "out.bin") == "out.bin"
    model = _mlp()
    with pytest.raises(BackendError, match="no compiled model"):
        save_artifact(Candidate("reference"), model, str(tmp_path / "m.onnx"))
    from graphopt.backends.reference_backend import ReferenceExecutable

    written = save_artifact(
        Candidate("reference", executable=ReferenceExecutable(model)), model, str(tmp_path / "m")
    )
    assert written == [str(tmp_path / "m.onnx")]
    back = graphopt.load(written[0])
    np.testing.assert_array_equal(
        graphopt.run(back, _feeds())["y"], graphopt.run(model, _feeds())["y"]
    )


def test_command_line_auto_prints_the_table_and_writes_the_winner(
    tmp_path: Path, fake_backends: None, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "mlp.onnx"
    graphopt.save(_mlp(), source)
    np.savez(tmp_path / "in.npz", **_feeds())
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(source), "--passes", "O2", "--target", "auto", "-o", str(out),
                 "--inputs", str(tmp_path / "in.npz")])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0, text
    for word in ("backend", "median ms", "ratio", "correct", "onnxruntime", "reference"):
        assert word in text
    assert "test-wrong" in text and "no such device here" in text
    chosen = text.split("auto: chose ")[1].split()[0]
    assert chosen in graphopt.backends.base.all_backends() and not chosen.startswith("test-")
    written = artifact_path(chosen, None, str(out))
    assert os.path.exists(written)
    if written != str(out):
        assert f"wrote {written}" in text.replace("\n", "")


def test_command_line_openvino_writes_ir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ov = pytest.importorskip("openvino")
    source = tmp_path / "mlp.onnx"
    graphopt.save(_mlp(), source)
    code = main(["optimize", str(source), "--target", "openvino", "-o", str(tmp_path / "m.onnx")])
    assert code == 0
    assert sorted(os.listdir(tmp_path)) == ["m.bin", "m.xml", "mlp.onnx"]
    assert "m.xml" in capsys.readouterr().out
    # fp32 as graphopt's backend runs it: on CPUs with bf16 units (AMX, AVX512-BF16) OpenVINO's
    # own default precision is bf16, 6% off here
    compiled = ov.Core().compile_model(
        str(tmp_path / "m.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    feeds = _feeds(5)
    np.testing.assert_allclose(
        compiled(feeds)[0], graphopt.run(_mlp(), feeds)["y"], rtol=1e-4, atol=1e-5
    )


def test_auto_without_any_correct_backend_is_an_error(tmp_path: Path) -> None:
    source = tmp_path / "mlp.onnx"
    graphopt.save(_mlp(), source)
    base.all_backends()
    register_backend(BrokenBackend)
    try:
        from graphopt.backends.auto import compile_and_save

        with pytest.raises(BackendError, match="no backend ran the model correctly"):
            compile_and_save(_mlp(), "auto", str(tmp_path / "x.onnx"), feeds=_feeds(),
                             backends=["test-broken"])  # fmt: skip
    finally:
        base._REGISTRY.pop("test-broken", None)


def test_compile_options_reach_their_backend_only() -> None:
    """`compile_options` go to the named backend's `compile` (tuning the TVM candidate of
    `--target auto --tune N`), and to no other."""
    seen: dict[str, dict[str, Any]] = {}

    class Recording(Backend):
        name = "test-recording"
        description = "test: records its compile options, runs the reference"

        def compile(self, model: Model, target: str | None = None, **options: Any) -> Executable:
            seen[self.name] = options
            return _Instant(Interpreter(model).run(_feeds()))

    base.all_backends()
    register_backend(Recording)
    try:
        options = {"test-recording": {"tune": 8, "dims": {"batch": 3}}}
        select_backend(_mlp(), _feeds(), backends=["test-recording", "onnxruntime"],
                       rounds=3, min_rounds=1, compile_options=options)  # fmt: skip
    finally:
        base._REGISTRY.pop(Recording.name, None)
    assert seen["test-recording"] == {"threads": 2, "tune": 8, "dims": {"batch": 3}}


def test_feed_dims_binds_every_symbolic_input_dim() -> None:
    from graphopt.backends.auto import feed_dims

    g = Graph()
    ids = g.add_input("ids", TensorType(DType.INT64, ("batch", "sequence")))
    mask = g.add_input("mask", TensorType(DType.INT64, ("batch", "sequence")))
    g.set_outputs([Builder(g).Add(ids, mask)], ["y"])
    feeds = {"ids": np.zeros((2, 7), np.int64), "mask": np.ones((2, 7), np.int64)}
    assert feed_dims(Model(g, {"": 18}), feeds) == {"batch": 2, "sequence": 7}


def test_command_line_auto_tunes_tvm_for_the_inputs_shapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--target auto --tune N: the tvm candidate is tuned (database next to the output) for the
    shapes of the inputs auto times it on; --tune with a backend that does not tune is an error."""
    import graphopt.backends.auto as auto

    captured: dict[str, Any] = {}

    def fake_select(model: Model, feeds: Mapping[str, np.ndarray], **kw: Any) -> Any:
        captured.update(kw)
        raise BackendError("stop here")

    monkeypatch.setattr(auto, "select_backend", fake_select)
    source = tmp_path / "mlp.onnx"
    graphopt.save(_mlp(), source)
    np.savez(tmp_path / "in.npz", **_feeds(5))
    out = tmp_path / "out.so"
    code = main(["optimize", str(source), "--target", "auto", "--tune", "16", "-o", str(out),
                 "--inputs", str(tmp_path / "in.npz")])  # fmt: skip
    assert code != 0 and not out.exists()
    tvm = captured["compile_options"]["tvm"]
    assert tvm == {"tune": 16, "tuning_dir": str(tmp_path / "out.tuning"), "dims": {"batch": 5}}
    code = main(["optimize", str(source), "--target", "openvino", "--tune", "16", "-o",
                 str(tmp_path / "m.xml")])  # fmt: skip
    assert code == 2 and not (tmp_path / "m.xml").exists()
