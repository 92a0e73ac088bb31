"""The verifier accepts every well-formed graph and names the node and rule of a broken one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from strategies import models

import graphopt
from graphopt.ir import Builder, DType, Graph, InvalidGraphError, Model, Node, TensorType
from graphopt.ir.verifier import verify

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_transformer.onnx"
F = TensorType(DType.FLOAT, (2, 3))


def _chain() -> tuple[Graph, Node, Node]:
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", F)
    a = b.op("Neg", x, _name="neg")
    y = b.op("Relu", a, _name="relu")
    a.type = y.type = F
    g.set_outputs([y], ["y"])
    return g, a.producer, y.producer


def test_well_formed_graphs_pass():
    verify(graphopt.load(EXAMPLE))
    g, _, _ = _chain()
    verify(g)


@given(models())
def test_random_models_pass(model):
    verify(model)


def test_read_before_definition_is_named():
    g, neg, relu = _chain()
    g.remove(relu, force=True)
    g.insert_before(neg, relu)
    with pytest.raises(InvalidGraphError, match="relu.* reads %neg before it is defined"):
        verify(g)


def test_value_from_nowhere_is_named():
    g, neg, relu = _chain()
    stray = Graph("other").add_input("stray", F)
    relu.set_input(0, stray)
    with pytest.raises(InvalidGraphError, match="reads %stray, which is not defined"):
        verify(g)


def test_double_definition_is_named():
    g, neg, relu = _chain()
    relu.outputs.append(neg.outputs[0])
    with pytest.raises(InvalidGraphError, match="not its own|defined twice"):
        verify(g)


def test_use_lists_must_match_reads():
    g, neg, relu = _chain()
    relu._inputs[0] = g.inputs[0]  # bypassing set_input, as a buggy pass might
    with pytest.raises(InvalidGraphError, match="not in its use list"):
        verify(g)


def test_a_removed_reader_left_in_a_use_list_is_a_dangling_user():
    g, neg, relu = _chain()
    neg.output._uses[(Node("Abs", [neg.output]), 0)] = None
    with pytest.raises(InvalidGraphError, match="no longer in a graph"):
        verify(g)


def test_declared_types_must_agree_with_inference():
    g, neg, relu = _chain()
    relu.output.type = TensorType(DType.FLOAT, (2, 4))
    with pytest.raises(InvalidGraphError, match=r"relu.*declared f32\[2,4\].*axis 1"):
        verify(Model(g, {"": 18}))
    verify(Model(g, {"": 18}), types=False)


def test_type_parameters_must_bind_one_type():
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", F)
    i = g.add_input("i", TensorType(DType.INT64, (2, 3)))
    g.set_outputs([b.op("Add", x, i, _name="mixed")])
    with pytest.raises(InvalidGraphError, match="mixed.*input 1 \\(%i\\) is i64.*input 0 \\(%x\\)"):
        verify(Model(g, {"": 18}))


def test_initializers_must_match_their_types():
    g = Graph()
    w = g.add_initializer("w", np.zeros((2, 3), np.float32))
    g.set_outputs([w])
    w.type = TensorType(DType.FLOAT, (3, 3))
    with pytest.raises(InvalidGraphError, match="initializer %w holds"):
        verify(g)
