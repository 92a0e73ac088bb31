"""The command line: the main job works, and every kind of bad input gets one clear message, exit
status 2, no traceback and no output file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.api.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_transformer.onnx"


def _model(nodes, inputs, outputs, opset=17, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _info(name, elem=TensorProto.FLOAT, shape=(2, 3)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _write(tmp_path: Path, model: onnx.ModelProto, name: str = "bad.onnx") -> Path:
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


def _bad_models(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, text the error must contain)."""
    good = EXAMPLE.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good[: len(good) // 3])
    text_file = tmp_path / "notes.onnx"
    text_file.write_text("this is not a model\n" * 10)
    cyclic = _model(
        [helper.make_node("Add", ["x", "b"], ["a"], name="first"),
         helper.make_node("Relu", ["a"], ["b"], name="second")],
        [_info("x")], [_info("b")],
    )  # fmt: skip
    undefined = _model(
        [helper.make_node("Add", ["x", "ghost"], ["y"], name="adder")], [_info("x")], [_info("y")]
    )
    mismatch = _model(
        [helper.make_node("Add", ["x", "i"], ["y"], name="mixed_add")],
        [_info("x"), _info("i", TensorProto.INT64)],
        [_info("y")],
    )
    unknown = _model(
        [helper.make_node("MatMull", ["x", "x"], ["y"], name="typo")], [_info("x")], [_info("y")]
    )
    return {
        "truncated": (truncated, "truncated.onnx"),
        "not onnx": (text_file, "notes.onnx"),
        "cyclic": (_write(tmp_path, cyclic, "cyclic.onnx"), "cycle"),
        "undefined input": (_write(tmp_path, undefined, "undefined.onnx"), "ghost"),
        "type mismatch": (_write(tmp_path, mismatch, "mismatch.onnx"), "mixed_add"),
        "unknown op": (_write(tmp_path, unknown, "unknown.onnx"), "MatMull"),
    }


@pytest.mark.parametrize(
    "case",
    ["truncated", "not onnx", "cyclic", "undefined input", "type mismatch", "unknown op"],
)
def test_bad_model_gives_one_clear_error(tmp_path, capsys, case):
    path, must_contain = _bad_models(tmp_path)[case]
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(path), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error:"), err
    assert must_contain in err, err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_unwritable_output(tmp_path, capsys):
    target = tmp_path / "missing-dir" / "out.onnx"
    code = main(["optimize", str(EXAMPLE), "-o", str(target)])
    err = capsys.readouterr().err
    assert code == 2 and "missing-dir" in err and "Traceback" not in err
    assert not target.parent.exists()


def test_bad_pass_name(tmp_path, capsys):
    code = main(["optimize", str(EXAMPLE), "-o", str(tmp_path / "o.onnx"), "--passes", "O1,nope"])
    err = capsys.readouterr().err
    assert code == 2 and "nope" in err
    assert not (tmp_path / "o.onnx").exists()


def test_optimize_show_run(tmp_path, capsys):
    out = tmp_path / "tiny.opt.onnx"
    assert main(["optimize", str(EXAMPLE), "-o", str(out)]) == 0
    onnx.checker.check_model(onnx.load(out))
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "graph @" in shown and "MatMul(" in shown
    outputs = tmp_path / "out.npz"
    assert main(["run", str(out), "--dim", "seq=5", "--outputs", str(outputs)]) == 0
    assert np.load(outputs)["logits"].shape == (1, 5, 50)
    assert main(["run", str(out), "--backend", "onnxruntime", "--dim", "seq=5"]) == 0


def test_run_inputs_from_npz_match_between_backends(tmp_path):
    ids = np.array([[3, 1, 4, 1, 5, 9]], np.int64)
    mask = np.triu(np.full((6, 6), -1e4, np.float32), 1)[None, None]
    feeds = tmp_path / "in.npz"
    np.savez(feeds, input_ids=ids, causal_mask=mask)
    results = {}
    for backend in ("reference", "onnxruntime"):
        out = tmp_path / f"{backend}.npz"
        assert main(["run", str(EXAMPLE), "--backend", backend, "--inputs", str(feeds),
                     "--outputs", str(out)]) == 0  # fmt: skip
        results[backend] = np.load(out)["logits"]
    np.testing.assert_allclose(results["reference"], results["onnxruntime"], rtol=1e-4, atol=1e-5)


def test_run_with_wrong_input_names(tmp_path, capsys):
    feeds = tmp_path / "in.npz"
    np.savez(feeds, tokens=np.zeros((1, 3), np.int64))
    assert main(["run", str(EXAMPLE), "--inputs", str(feeds)]) == 2
    err = capsys.readouterr().err
    assert "tokens" in err and "input_ids" in err


def test_command_line_exit_code_and_no_traceback(tmp_path):
    """The real process: `tools/optimize.py` on a non-model exits 2 with one message."""
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01garbage" * 50)
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "optimize.py"), str(junk), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "junk.onnx" in done.stderr
    assert not (tmp_path / "o").exists()
