"""The IR core keeps SSA, use lists and order exact through every mutation method."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.ir import Builder, DType, Graph, InvalidGraphError, Node, TensorType
from graphopt.ir.core import split_op

F32 = TensorType(DType.FLOAT, ("batch", 4))


def _chain() -> tuple[Graph, Builder]:
    g = Graph("main")
    b = Builder(g)
    x = g.add_input("x", F32)
    y = b.Relu(b.Neg(x))
    g.set_outputs([y], ["y"])
    return g, b


def test_use_lists_follow_inserts_and_removals():
    g, _ = _chain()
    neg, relu = g.nodes
    x = g.inputs[0]
    assert x.uses == [(neg, 0)]
    assert neg.output.uses == [(relu, 0)]
    assert relu.output.is_graph_output
    relu.set_input(0, x)
    assert neg.output.uses == [] and x.users() == [neg, relu]
    g.remove(neg)
    assert x.uses == [(relu, 0)] and len(g) == 1


def test_removing_a_used_node_is_an_error_naming_it():
    g, _ = _chain()
    neg = g.nodes[0]
    with pytest.raises(InvalidGraphError, match="Neg"):
        g.remove(neg)


def test_replace_all_uses_with_covers_graph_outputs():
    g, b = _chain()
    relu = g.nodes[1]
    b.insert_before = None
    sig = b.Sigmoid(relu.inputs[0])
    relu.output.replace_all_uses_with(sig)
    assert g.outputs == [sig] and g.output_names == ["y"]
    g.remove(relu)
    assert [n.op for n in g] == ["Neg", "Sigmoid"]


def test_detached_nodes_register_no_uses():
    g, _ = _chain()
    x = g.inputs[0]
    Node("Abs", [x])
    assert len(x.uses) == 1


def test_iteration_survives_removal_of_the_current_node():
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", F32)
    for _ in range(5):
        b.Identity(x)
    for node in g:
        g.remove(node)
    assert len(g) == 0 and list(g) == []


def test_insert_before_and_after_keep_order():
    g, _ = _chain()
    neg, relu = g.nodes
    g.insert_after(neg, Node("Abs", [neg.output]))
    g.insert_before(neg, Node("Exp", [g.inputs[0]]))
    assert [n.op for n in g] == ["Exp", "Neg", "Abs", "Relu"]
    assert [n.op for n in reversed(g)] == ["Relu", "Abs", "Neg", "Exp"]


def test_sort_topologically_is_stable_and_detects_cycles():
    g = Graph()
    x = g.add_input("x", F32)
    a = Node("Neg", [x])
    b = Node("Relu", [a.output])
    g.append(b)
    g.append(a)
    g.set_outputs([b.output])
    g.sort_topologically()
    assert [n.op for n in g] == ["Neg", "Relu"]
    c = Node("Add", [x, None], name="loop_add")
    d = Node("Abs", [c.output], name="loop_abs")
    g.append(c)
    g.append(d)
    c.set_input(1, d.output)
    with pytest.raises(InvalidGraphError, match="cycle"):
        g.sort_topologically()


def test_subgraph_reads_of_outer_values_are_uses_and_are_dropped_with_the_node():
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", F32)
    cond = g.add_input("c", TensorType(DType.BOOL, ()))
    then = g.subgraph("then")
    then.append(Node("Neg", [x]))
    then.set_outputs([then.nodes[0].output])
    other = g.subgraph("else")
    other.append(Node("Abs", [x]))
    other.set_outputs([other.nodes[0].output])
    y = b.If(cond, then_branch=then, else_branch=other)
    g.set_outputs([y])
    assert len(x.uses) == 2 and then.parent is g.nodes[0]
    g.set_outputs([])
    g.remove(g.nodes[0])
    assert x.uses == []


def test_fresh_names_are_unique_across_subgraphs():
    g = Graph()
    x = g.add_input("x", F32)
    inner = g.subgraph("body")
    n1, n2 = Node("Neg", [x]), Node("Neg", [x])
    g.append(n1)
    inner.append(n2)
    assert n1.output.name != n2.output.name


def test_initializers_and_defaults():
    g = Graph()
    w = g.add_initializer("w", np.arange(6, dtype=np.float32).reshape(2, 3))
    assert w.is_constant and w.type == TensorType(DType.FLOAT, (2, 3))
    with pytest.raises(InvalidGraphError):
        g.add_initializer("w", np.zeros(1))
    x = g.add_input("x", F32)
    g.set_input_default(x, np.zeros((1, 4), np.float32))
    assert x.is_graph_input and not x.is_constant and "x" in g.initializers


def test_split_op_domains():
    assert split_op("com.microsoft.Gelu") == ("com.microsoft", "Gelu")
    assert split_op("ai.onnx.Add") == ("", "Add")
    assert split_op("ai.onnx.ml.LabelEncoder") == ("ai.onnx.ml", "LabelEncoder")
    assert Node("com.microsoft.Gelu", []).op == "com.microsoft.Gelu"


def test_dtype_mapping():
    assert DType.FLOAT.numpy == np.float32
    assert DType.from_numpy(np.int64) is DType.INT64
    assert DType.from_short_name("bf16") is DType.BFLOAT16
    assert DType.BFLOAT16.numpy.itemsize == 2
    with pytest.raises(ValueError, match="known"):
        DType.from_short_name("f33")
