"""The pattern rewriter: matching rules (commutativity, shared sub-patterns, optional nodes,
constants, attributes with opset defaults), refusals, the loop guard, and worklist locality."""

from __future__ import annotations

import numpy as np
import pytest
from strategies import feeds_for

from graphopt.backends.reference import Interpreter
from graphopt.ir import Builder, DType, Graph, GraphoptError, Model, TensorType, parse_model
from graphopt.passes import PassContext
from graphopt.passes.rewrite import Const, RewriteRule, apply_rules

F = DType.FLOAT


def _ops(model: Model) -> list[str]:
    return [n.op for n in model.graph]


def _apply(text: str, *rules: RewriteRule) -> tuple[Model, PassContext, int]:
    model = parse_model(text)
    context = PassContext(model)
    count = apply_rules(model.graph, rules, context)
    return model, context, count


class MatMulAddToGemm(RewriteRule):
    def pattern(self, op, x, w, b):
        return op.Add(op.MatMul(x, w), b)

    def check(self, ctx, x, w):
        return (ctx.rank(x) == 2 and ctx.rank(w) == 2) or ctx.refuse("x and w must be 2-D")

    def rewrite(self, op, x, w, b):
        return op.Gemm(x, w, b)


GEMM_TEXT = """
graph @g(%x: f32[2,4], %w: f32[4,3], %b: f32[3]) {
  %m: f32[2,3] = MatMul(%x, %w)
  %y: f32[2,3] = Add(%b, %m)
  return %y
}
"""


def test_commutative_inputs_match_either_order_and_types_carry_over():
    model, _, count = _apply(GEMM_TEXT, MatMulAddToGemm())
    assert count == 1 and _ops(model) == ["Gemm"]
    assert model.graph.outputs[0].type == TensorType(F, (2, 3))
    assert model.graph.output_names == ["y"]


def test_a_use_outside_the_pattern_is_refused_and_reported():
    text = GEMM_TEXT.replace("return %y", "return %y, %m")
    model, context, count = _apply(text, MatMulAddToGemm())
    assert count == 0 and _ops(model) == ["MatMul", "Add"]
    (note,) = context.notes
    assert note.kind == "refused" and "%m is also read by a graph output" in note.message


def test_check_refusals_are_reported_once():
    text = GEMM_TEXT.replace("f32[2,4]", "f32[1,2,4]").replace("f32[2,3]", "f32[1,2,3]")
    model, context, count = _apply(text, MatMulAddToGemm())
    assert count == 0 and [n.message for n in context.notes] == [
        "MatMulAddToGemm: x and w must be 2-D"
    ]


class SquareOfDifference(RewriteRule):
    """(a - b) * (a - b) -> Pow(a - b, 2): t is one shared sub-pattern."""

    def pattern(self, op, a, b):
        t = op.Sub(a, b)
        return op.Mul(t, t)

    def rewrite(self, op, a, b):
        return op.Pow(op.Sub(a, b), op.const(np.float32(2)))


def test_shared_sub_patterns_bind_one_node():
    same = """
graph @g(%a: f32[3], %b: f32[3]) {
  %t: f32[3] = Sub(%a, %b)
  %y: f32[3] = Mul(%t, %t)
  return %y
}"""
    model, _, count = _apply(same, SquareOfDifference())
    assert count == 1 and _ops(model) == ["Sub", "Pow"]
    different = """
graph @g(%a: f32[3], %b: f32[3]) {
  %t: f32[3] = Sub(%a, %b)
  %u: f32[3] = Sub(%b, %a)
  %y: f32[3] = Mul(%t, %u)
  return %y
}"""
    model, _, count = _apply(different, SquareOfDifference())
    assert count == 0


class ReluOfMaybeCast(RewriteRule):
    def pattern(self, op, x):
        return op.Relu(op.Cast(x, to=1, _optional=True))

    def rewrite(self, op, x):
        return op.Max(op.Cast(x, to=1), op.const(np.float32(0)))


def test_optional_nodes_match_present_or_absent():
    with_cast = """
graph @g(%x: f64[2]) {
  %c: f32[2] = Cast(%x) {to = 1}
  %y: f32[2] = Relu(%c)
  return %y
}"""
    model, _, count = _apply(with_cast, ReluOfMaybeCast())
    assert count == 1 and _ops(model) == ["Cast", "Max"]
    model, _, count = _apply("graph @g(%x: f32[2]) {\n  %y: f32[2] = Relu(%x)\n  return %y\n}",
                             ReluOfMaybeCast())  # fmt: skip
    assert count == 1 and _ops(model) == ["Cast", "Max"]


class MulByOne(RewriteRule):
    def pattern(self, op, x):
        return op.Mul(x, Const(1.0))

    def rewrite(self, op, x):
        return x


@pytest.mark.parametrize("value,folds", [("1.0", True), ("2.0", False)])
def test_constant_constraints(value, folds):
    text = f"""
graph @g(%x: f32[2]) {{
  %one: f32[] = const {value}
  %y: f32[2] = Mul(%one, %x)
  %z: f32[2] = Neg(%y)
  return %z
}}"""
    model, _, count = _apply(text, MulByOne())
    assert count == int(folds) and _ops(model) == (["Neg"] if folds else ["Mul", "Neg"])


class LastAxisSoftmax(RewriteRule):
    def pattern(self, op, x):
        return op.Softmax(x, axis=-1, _name="softmax")

    def rewrite(self, op, x):
        assert op.ctx.node("softmax").op == "Softmax"
        return op.op("com.example.FastSoftmax", x)


@pytest.mark.parametrize("opset,matches", [(13, True), (11, False)])
def test_attribute_defaults_follow_the_opset(opset, matches):
    text = f"""model opset={{"": {opset}}}
graph @g(%x: f32[2,3]) {{
  %y: f32[2,3] = Softmax(%x)
  return %y
}}"""
    _, _, count = _apply(text, LastAxisSoftmax())
    assert count == int(matches)


class ReluForever(RewriteRule):
    def pattern(self, op, x):
        return op.Relu(x)

    def rewrite(self, op, x):
        return op.Relu(x)


def test_a_rule_that_never_stops_is_named():
    with pytest.raises(GraphoptError, match="ReluForever keeps rewriting"):
        _apply("graph @g(%x: f32[2]) {\n  %y: f32[2] = Relu(%x)\n  return %y\n}", ReluForever())


class CountingNegPair(RewriteRule):
    """Neg(Neg(x)) -> x, counting how often the driver asks."""

    checks = 0

    def pattern(self, op, x):
        return op.Neg(op.Neg(x))

    def check(self, ctx, x):
        CountingNegPair.checks += 1
        return True

    def rewrite(self, op, x):
        return x


def test_the_worklist_revisits_only_what_changed():
    g = Graph()
    b = Builder(g)
    x = g.add_input("x", TensorType(F, (4,)))
    value = x
    for _ in range(1000):
        value = b.Neg(value)
        value.type = TensorType(F, (4,))
    g.set_outputs([value], ["y"])
    model = Model(g, {"": 18})
    feeds = feeds_for(model)
    expected = Interpreter(model).run(feeds)
    CountingNegPair.checks = 0
    assert apply_rules(g, [CountingNegPair()]) == 500
    assert len(g) == 0 and CountingNegPair.checks < 3 * 1000
    np.testing.assert_array_equal(Interpreter(model).run(feeds)["y"], expected["y"])
