"""The equivalence harness: every registered pass, on random graphs and on real models, keeps the
outputs, keeps the graph valid, and has nothing left to do when run a second time.

A new pass gets these tests by being registered; nothing here names passes one by one.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hypothesis import given
from strategies import assert_outputs_close, feeds_for, models

from graphopt.backends.reference import Interpreter
from graphopt.frontends.onnx import load_onnx
from graphopt.ir.errors import GraphoptError
from graphopt.ir.parser import parse_model
from graphopt.ir.printer import print_model
from graphopt.ir.verifier import verify
from graphopt.passes import all_passes, get_pass, optimize_model

PASSES = sorted(n for n, info in all_passes().items() if not info.origin.startswith("test_"))
LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def _copy(model):
    return parse_model(print_model(model))


def _optimize(model, name, feeds):
    """Run pass `name` (the feeds are its calibration data); None when a lossy pass refuses the
    model with a clear error (e.g. nothing to prune): its own tests cover those refusals."""
    try:
        return optimize_model(model, name, verify_each=True, calibration=[feeds])
    except GraphoptError:
        if get_pass(name).exact:
            raise
        return None


@pytest.mark.parametrize("name", PASSES)
@given(model=models(max_nodes=16))
def test_pass_keeps_outputs_on_random_graphs(name, model):
    feeds = feeds_for(model)
    expected = Interpreter(model).run(feeds)
    result = _optimize(model, name, feeds)
    if result is None:
        return
    verify(result.model)
    actual = Interpreter(result.model).run(feeds)
    if not get_pass(name).exact:  # lossy by design: its own tests hold it to an accuracy budget
        assert {k: v.shape for k, v in actual.items()} == {k: v.shape for k, v in expected.items()}
        return
    assert_outputs_close(expected, actual, rtol=1e-4, atol=1e-5)
    again = optimize_model(result.model, name)
    assert not any(r.changed for r in again.records), f"{name} changed the model a second time"


@pytest.mark.parametrize("name", PASSES)
@pytest.mark.parametrize("light", ["squeezenet", "shufflenet"])
def test_pass_keeps_outputs_on_light_models(name, light):
    model = load_onnx(os.path.join(LIGHT, f"light_{light}.onnx"))
    rng = np.random.default_rng(0)
    (data,) = [v for v in model.graph.inputs if v.const_value is None]
    feeds = {data.name: rng.random(data.type.shape).astype(np.float32)}
    expected = Interpreter(model).run(feeds)
    result = _optimize(_copy(model), name, feeds)
    if result is None:
        return
    actual = Interpreter(result.model).run(feeds)
    if not get_pass(name).exact:
        return
    for key, value in expected.items():
        scale = float(np.abs(value).max())
        assert np.abs(actual[key] - value).max() <= 1e-4 * max(scale, 1e-6), key
