"""Property tests on random graphs: ONNX export/import, file save/load and the text form all
preserve what the reference interpreter computes, and ONNX Runtime agrees with the interpreter."""

from __future__ import annotations

import os
import tempfile

import onnx
import onnxruntime as ort
from hypothesis import given
from strategies import assert_outputs_close, feeds_for, models

from graphopt.backends.onnx import save_onnx, to_onnx
from graphopt.backends.reference import Interpreter
from graphopt.frontends.onnx import from_onnx, load_onnx
from graphopt.ir.parser import parse_model
from graphopt.ir.printer import print_model
from graphopt.ir.verifier import verify


def _run(model, feeds):
    return Interpreter(model, check_types=True).run(feeds)


@given(models())
def test_export_then_import_computes_the_same(model):
    feeds = feeds_for(model)
    expected = _run(model, feeds)
    proto = to_onnx(model)
    onnx.checker.check_model(proto, full_check=True)
    back = from_onnx(proto)
    verify(back)
    assert_outputs_close(expected, _run(back, feeds), rtol=0, atol=0)


@given(models())
def test_onnxruntime_agrees_with_the_interpreter(model):
    feeds = feeds_for(model)
    expected = _run(model, feeds)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(to_onnx(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    names = [o.name for o in session.get_outputs()]
    actual = dict(zip(names, session.run(names, feeds), strict=True))
    assert_outputs_close(expected, actual, rtol=1e-4, atol=1e-5)


@given(models())
def test_save_then_load_computes_the_same(model):
    feeds = feeds_for(model)
    expected = _run(model, feeds)
    with tempfile.TemporaryDirectory() as folder:
        for external in (False, True):
            path = os.path.join(folder, f"m{int(external)}.onnx")
            save_onnx(model, path, external_data=external, size_threshold=16)
            back = load_onnx(path)
            assert_outputs_close(expected, _run(back, feeds), rtol=0, atol=0)
            del back


@given(models())
def test_text_form_round_trips_and_computes_the_same(model):
    feeds = feeds_for(model)
    text = print_model(model)
    back = parse_model(text)
    assert print_model(back) == text
    verify(back)
    assert_outputs_close(_run(model, feeds), _run(back, feeds), rtol=0, atol=0)
