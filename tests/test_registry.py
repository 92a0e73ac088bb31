"""The op registry: standard ops come with schema, kernel, inference and cost; registrations add
ops of our own and refuse to shadow each other."""

from __future__ import annotations

import numpy as np
import pytest
from strategies import OPSET, registry_ops

from graphopt.backends.reference import Interpreter
from graphopt.ir import Builder, DType, Graph, Model, TensorType
from graphopt.ir.inference import infer_node
from graphopt.ir.registry import REGISTRY, Cost, OpRegistry, register_kernel


def test_every_op_the_strategy_emits_is_fully_known():
    for op in registry_ops():
        entry = REGISTRY.lookup(op, OPSET)
        assert entry is not None and entry.is_standard, op
        assert entry.kernel and entry.infer and entry.cost, op


def test_unknown_ops_have_no_entry_and_get_suggestions():
    assert REGISTRY.lookup("MatMull", 17) is None
    assert "MatMul" in REGISTRY.suggest("MatMull")


def test_opset_selects_the_schema_version():
    old, new = REGISTRY.lookup("Softmax", 11), REGISTRY.lookup("Softmax", 13)
    assert old is not None and new is not None
    assert old.schema.since_version == 11 and new.schema.since_version == 13


def _graph_with(op: str, x_type: TensorType, *extra: np.ndarray, **attrs):
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", x_type)
    y = b.op(op, x, *(b.const(e) for e in extra), **attrs)
    g.set_outputs([y], ["y"])
    return g, y.producer


def test_cost_of_matmul_and_conv():
    f32 = DType.FLOAT
    g, node = _graph_with("MatMul", TensorType(f32, (8, 16)), np.zeros((16, 4), np.float32))
    inputs = [v.type for v in node.inputs]
    (out,) = infer_node(node, {"": 17})
    cost = REGISTRY.lookup("MatMul", 17).cost(node, inputs, [out])
    assert cost == Cost(flops=2 * 8 * 4 * 16, bytes=4 * (8 * 16 + 16 * 4 + 8 * 4), exact=True)

    w = np.zeros((6, 3, 3, 3), np.float32)
    g, node = _graph_with("Conv", TensorType(f32, (1, 3, 8, 8)), w, pads=[1, 1, 1, 1])
    (out,) = infer_node(node, {"": 17})
    assert out == TensorType(f32, (1, 6, 8, 8))
    cost = REGISTRY.lookup("Conv", 17).cost(node, [v.type for v in node.inputs], [out])
    assert cost.flops == 2 * (6 * 8 * 8) * (3 * 3 * 3) and cost.exact


def test_symbolic_dims_make_costs_inexact():
    g, node = _graph_with("Relu", TensorType(DType.FLOAT, ("batch", 4)))
    (out,) = infer_node(node, {"": 17})
    assert out == TensorType(DType.FLOAT, ("batch", 4))
    assert not REGISTRY.lookup("Relu", 17).cost(node, [node.inputs[0].type], [out]).exact


def test_registering_an_op_of_our_own_makes_it_runnable():
    op = "com.example.test.Swish"

    @register_kernel(op)
    def swish(node, env):
        beta = node.get_attr("beta", 1.0)
        return lambda x: (x / (1 + np.exp(-beta * x))).astype(x.dtype)

    g, _ = _graph_with(op, TensorType(DType.FLOAT, (3,)), beta=2.0)
    x = np.array([-1.0, 0.0, 1.0], np.float32)
    out = Interpreter(Model(g, {"": 17, "com.example.test": 1})).run({"x": x})["y"]
    np.testing.assert_allclose(out, x / (1 + np.exp(-2 * x)), rtol=1e-6)
    with pytest.raises(ValueError, match="already has a registered kernel"):
        register_kernel(op)(swish)


def test_kernel_since_applies_from_that_opset():
    registry = OpRegistry()
    registry.register("com.example.Op", kernel=lambda node, env: lambda: None, since=3)
    assert registry.lookup("com.example.Op", 2).kernel is None
    assert registry.lookup("com.example.Op", 3).kernel is not None
