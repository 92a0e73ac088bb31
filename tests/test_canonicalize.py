"""canonicalize: every rule applies where it is exact (ops left, outputs equal to the bit) and
refuses, with its reason in the report, where it cannot prove that; golden before/after text for a
few rules; random graphs with no-ops sprinkled in; light ONNX models run by ONNX Runtime."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import assert_outputs_close, feeds_for, models

from graphopt.backends.reference import Interpreter
from graphopt.ir import Builder, DType, Model, Value, parse_model, print_model
from graphopt.ir.inference import infer_node
from graphopt.ir.types import TensorType
from graphopt.ir.verifier import verify
from graphopt.passes import optimize_model
from graphopt.passes.cleanup.canonicalize import holds_exactly

INT64_MAX = 2**63 - 1
LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def _model(body: str, opset: int) -> Model:
    return parse_model(f'model opset={{"": {opset}}}\n{body}')


def _feeds(model: Model) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in model.graph.inputs:
        assert isinstance(value.type, TensorType) and value.type.shape is not None
        shape = tuple(d if isinstance(d, int) else 2 for d in value.type.shape)
        dtype = value.type.dtype
        if dtype is DType.BOOL:
            array = rng.random(shape) > 0.5
        elif dtype.is_integer:
            array = rng.integers(0 if dtype.name.startswith("U") else -100, 100, shape)
        else:
            array = rng.standard_normal(shape)
        feeds[value.name or ""] = np.asarray(array).astype(dtype.numpy)
    return feeds


def canonicalize(body: str, opset: int = 18, run: bool = True) -> tuple[Model, list[str]]:
    """Run the pass on the graph `body`; outputs must stay equal to the bit. Returns the model
    and the refusal messages."""
    model = _model(body, opset)
    feeds = _feeds(model) if run else {}
    expected = Interpreter(model).run(feeds) if run else {}
    result = optimize_model(model, "canonicalize", verify_each=True)
    if run:
        assert_outputs_close(expected, Interpreter(result.model).run(feeds), rtol=0, atol=0)
    return result.model, [n.message for n in result.notes if n.kind == "refused"]


def ops(model: Model) -> list[str]:
    return [n.op for n in model.graph]


def folds(body: str, left: list[str], opset: int = 18, run: bool = True) -> Model:
    model, notes = canonicalize(body, opset, run)
    assert ops(model) == left, print_model(model)
    assert notes == []
    return model


def refused(body: str, reason: str, opset: int = 18, run: bool = True) -> None:
    """The graph stays as it was, and the report says why."""
    before = print_model(_model(body, opset))
    model, notes = canonicalize(body, opset, run)
    assert print_model(model) == before
    assert any(reason in note for note in notes), notes


def kept(body: str, opset: int = 18) -> None:
    """Not a no-op at all: unchanged, and nothing to report."""
    before = print_model(_model(body, opset))
    model, notes = canonicalize(body, opset)
    assert print_model(model) == before and notes == []


def unary(x: str, line: str, inputs: str = "", outputs: str = "%y") -> str:
    """A graph of input %x of type `x` (and `inputs`) whose statements are `line`."""
    return f"graph @g(%x: {x}{inputs}) {{\n  {line}\n  return {outputs}\n}}"


# ----- Identity, Dropout --------------------------------------------------------------------------


def test_identity():
    folds(unary("f32[2,3]", "%y: f32[2,3] = Identity(%x)"), [])
    line = "%i: f32[4] = Identity(%x)\n  %y: f32[4] = Relu(%i)"
    folds(unary("f32[4]", line, outputs="%y, %i"), ["Relu"])


def test_identity_keeps_the_graph_inputs_type():
    model = folds(unary("f32[batch,4]", "%y: f32[2,4] = Identity(%x)"), [])
    assert model.graph.inputs[0].type.shape == ("batch", 4)


DROPOUT_13 = """graph @g(%x: f32[batch,3], %ratio: f32[], %t: bool[]) {
  %mode: bool[] = const MODE
  %y: f32[batch,3], %m: bool[batch,3] = Dropout(%x, RATIO, %mode)
  return %y, %m
}"""


@pytest.mark.parametrize("ratio", ["%ratio", "_"])
def test_dropout_in_inference_keeps_x_and_an_all_true_mask(ratio):
    text = DROPOUT_13.replace("MODE", "false").replace("RATIO", ratio)
    model = folds(text, ["Shape", "ConstantOfShape"], 13)
    assert model.graph.outputs[0] is model.graph.inputs[0]


def test_dropout_forms_of_each_opset():
    folds(unary("f32[2,3]", "%y: f32[2,3] = Dropout(%x, %r)", ", %r: f32[]"), [], 13)
    folds(unary("f32[2,3]", "%y: f32[2,3], _ = Dropout(%x)"), [], 18)
    folds(unary("f32[2,3]", "%y: f32[2,3] = Dropout(%x) {ratio = 0.2}"), [], 9)
    mask = "%y: f32[2,3], %m: bool[2,3] = Dropout(%x) {ratio = 0.2}\n  %z: f32[2,3] = Relu(%y)"
    folds(unary("f32[2,3]", mask, outputs="%z, %m"), ["ConstantOfShape", "Relu"], 10)
    # training at ratio 0 is the identity too
    zero = DROPOUT_13.replace("RATIO", "%r0").replace("{", "{\n  %r0: f32[] = const 0.0", 1)
    folds(zero.replace("MODE", "true"), ["Shape", "ConstantOfShape"], 13)


def test_dropout_refusals():
    training = DROPOUT_13.replace("MODE", "true").replace("RATIO", "%ratio")
    refused(training, "training_mode is true", 13, run=False)
    dynamic = DROPOUT_13.replace("MODE", "false").replace("RATIO, %mode", "%ratio, %t")
    refused(dynamic, "training_mode is not a constant", 13, run=False)
    old_mask = unary("f32[2,3]", "%y: f32[2,3], %m = Dropout(%x)", outputs="%y, %m")
    refused(old_mask, "before opset 10", 9, run=False)  # the mask's type is the data's
    is_test = unary("f32[2,3]", "%y: f32[2,3], %m: bool[2,3] = Dropout(%x)")
    refused(is_test, "is_test=0", 6, run=False)  # no kernel before opset 7
    folds(is_test.replace("Dropout(%x)", "Dropout(%x) {is_test = 1}"), [], 6, run=False)


# ----- Reshape ------------------------------------------------------------------------------------

RESHAPE = """graph @g(%x: X) {
  %s: i64[N] = const SHAPE
  %y: Y = Reshape(%x, %s)
  return %y
}"""


def reshape(x: str, shape: list[int], y: str = "") -> str:
    text = RESHAPE.replace("X", x).replace("N", str(len(shape))).replace("SHAPE", str(shape))
    return text.replace(": Y", f": {y}" if y else "")


def test_reshape_to_its_own_shape():
    folds(reshape("f32[2,3]", [2, 3], "f32[2,3]"), [])
    folds(reshape("f32[batch,3]", [0, -1]), [])  # no declared output type: read the target
    folds(reshape("f32[batch,3]", [0, 3], "f32[batch,3]"), [])
    folds(reshape("f32[batch,3]", [-1, 3]), [])
    kept(reshape("f32[2,3]", [3, 2], "f32[3,2]"))
    own = "%s: i64[2] = Shape(%x)\n  %y: f32[batch,3] = Reshape(%x, %s)"
    model = folds(unary("f32[batch,3]", own).replace("return %y", "return %y, %s"), ["Shape"])
    assert model.graph.outputs[0] is model.graph.inputs[0]  # Shape stays for its other reader
    attr = "%y: f32[2,3] = Reshape(%x) {shape = [2, 3]}"  # before opset 5
    folds(unary("f32[2,3]", attr), [], 1, run=False)


def test_reshape_refusals():
    refused(reshape("f32[batch,3]", [2, 3]), "x's dim 0 is batch")
    dynamic = unary("f32[2,3]", "%y = Reshape(%x, %s)", ", %s: i64[2]")
    refused(dynamic, "the target shape is not a constant", run=False)


def two_reshapes(x: str, first: list[int], second: str, extra: str = "", m: str = "") -> str:
    return f"""graph @g(%x: {x}{extra}) {{
  %s1: i64[{len(first)}] = const {first}
  %m{m} = Reshape(%x, %s1)
  SECOND
  %y = Reshape(%m, %s2)
  return %y
}}""".replace("SECOND", second)


def test_reshape_of_reshape_keeps_the_last_shape():
    model = folds(two_reshapes("f32[2,3,4]", [6, 4], "%s2: i64[2] = const [4, 6]"), ["Reshape"])
    assert model.graph.nodes[0].inputs[0] is model.graph.inputs[0]
    # a 0 copying a dim the first shape copied from x stays a 0; the second Reshape then
    # reshapes x to its own shape, and goes too
    folds(two_reshapes("f32[batch,3,4]", [0, 12], "%s2: i64[3] = const [0, 3, 4]"), [])
    # a 0 copying a dim the first shape inferred resolves to the intermediate's static dim
    second = "%s2: i64[3] = const [0, 2, 2]"
    model = folds(two_reshapes("f32[2,3,4]", [-1, 4], second, m=": f32[6,4]"), ["Reshape"])
    assert model.graph.nodes[0].inputs[1].const_value.tolist() == [6, 2, 2]


def test_reshape_of_reshape_refusals():
    unknown = two_reshapes("f32[batch,12]", [-1, 3, 4], "%s2: i64[2] = const [0, 12]")
    refused(unknown, "copies an intermediate dim that is unknown")
    dynamic = two_reshapes("f32[2,12]", [6, 4], "", ", %s2: i64[2]")
    refused(dynamic, "the second shape is not a constant", run=False)
    shared = two_reshapes("f32[2,12]", [6, 4], "%s2: i64[2] = const [4, 6]")
    shared = shared.replace("return %y", "return %y, %m")
    refused(shared, "%m is also read by a graph output")
    old = "%m: f32[3,2] = Reshape(%x) {shape = [3, 2]}\n  %y: f32[6] = Reshape(%m) {shape = [6]}"
    refused(unary("f32[2,3]", old), "before opset 5", 1, run=False)


# ----- Transpose ----------------------------------------------------------------------------------


def test_identity_transpose():
    folds(unary("f32[2,3,4]", "%y: f32[2,3,4] = Transpose(%x) {perm = [0, 1, 2]}"), [])
    folds(unary("f32[5]", "%y: f32[5] = Transpose(%x)"), [])  # reversing one axis
    kept(unary("f32[2,3]", "%y: f32[3,2] = Transpose(%x)"))
    refused(unary("f32[*]", "%y = Transpose(%x)"), "no perm, and x's rank is unknown", run=False)


def two_transposes(x: str, p: str, q: str) -> str:
    return unary(x, f"%m = Transpose(%x){p}\n  %y = Transpose(%m){q}")


def test_transpose_pairs_compose():
    folds(two_transposes("f32[2,3,4]", " {perm = [1, 2, 0]}", " {perm = [2, 0, 1]}"), [])
    folds(two_transposes("f32[2,3]", "", ""), [])  # reversed twice
    text = two_transposes("f32[2,3,4,5]", " {perm = [0, 2, 1, 3]}", " {perm = [3, 0, 2, 1]}")
    model = folds(text, ["Transpose"])
    assert model.graph.nodes[0].get_attr("perm") == [3, 0, 1, 2]
    refused(two_transposes("f32[*]", "", " {perm = [1, 0]}"), "x's rank is unknown", run=False)
    shared = two_transposes("f32[2,3]", "", "").replace("return %y", "return %y, %m")
    refused(shared, "%m is also read by a graph output")


# ----- Cast ---------------------------------------------------------------------------------------


def test_cast_to_its_own_type():
    folds(unary("f16[3]", "%y: f16[3] = Cast(%x) {to = 10}"), [])
    kept(unary("f32[3]", "%y: f64[3] = Cast(%x) {to = 11}"))
    untyped = "%u = Relu(%x)\n  %y = Cast(%u) {to = 1}"
    refused(unary("f32[3]", untyped), "x's element type is unknown")


def test_castlike_becomes_a_cast_to_the_declared_type():
    model = folds(unary("i32[3]", "%y: f16[3] = CastLike(%x, %h)", ", %h: f16[2]"), ["Cast"])
    assert model.graph.nodes[0].get_attr("to") == F16
    folds(unary("f32[3]", "%y: f32[3] = CastLike(%x, %h)", ", %h: f32[2]"), [])  # then no-op
    untyped = "%u = Relu(%h)\n  %y = CastLike(%x, %u)"
    refused(unary("f32[3]", untyped, ", %h: f32[2]"), "target's element type is unknown")


def two_casts(x: str, a: int, b: int) -> str:
    return unary(x, f"%m = Cast(%x) {{to = {a}}}\n  %y = Cast(%m) {{to = {b}}}")


F16, F32, F64, I8, I32, I64, U8 = 10, 1, 11, 3, 6, 7, 2


@pytest.mark.parametrize("x,a", [("f16[4]", F32), ("i8[4]", I32), ("u8[4]", F16), ("i8[4]", I8)])
def test_cast_round_trips_through_a_wider_type(x, a):
    back = {"f16[4]": F16, "i8[4]": I8, "u8[4]": U8}[x]
    folds(two_casts(x, a, back), [])


@pytest.mark.parametrize("x,a,b", [("f16[4]", F32, F64), ("i8[4]", I32, I64), ("u8[4]", F16, F32)])
def test_cast_chains_through_a_wider_type(x, a, b):
    model = folds(two_casts(x, a, b), ["Cast"])
    assert model.graph.nodes[0].get_attr("to") == b


@pytest.mark.parametrize(
    "x,a,b", [("f32[4]", F16, F32), ("i32[4]", F32, I64), ("f32[4]", I64, F32)]
)
def test_lossy_cast_chains_are_refused(x, a, b):
    refused(two_casts(x, a, b), "does not hold every")


def test_which_types_hold_which():
    D = DType
    assert holds_exactly(D.FLOAT16, D.FLOAT) and holds_exactly(D.BFLOAT16, D.DOUBLE)
    assert holds_exactly(D.INT16, D.FLOAT) and holds_exactly(D.INT32, D.DOUBLE)
    assert holds_exactly(D.BOOL, D.UINT8) and holds_exactly(D.UINT32, D.INT64)
    assert not holds_exactly(D.FLOAT, D.FLOAT16) and not holds_exactly(D.FLOAT16, D.BFLOAT16)
    assert not holds_exactly(D.INT32, D.FLOAT) and not holds_exactly(D.INT16, D.FLOAT16)
    assert not holds_exactly(D.INT8, D.UINT64) and not holds_exactly(D.FLOAT, D.INT64)


# ----- Expand, Slice, Squeeze/Unsqueeze, Concat, Split, Pad, Flatten ------------------------------


def expand(x: str, shape: list[int], y: str = "") -> str:
    return reshape(x, shape, y).replace("Reshape", "Expand")


def test_expand_to_a_shape_x_has():
    folds(expand("f32[2,3]", [1, 3], "f32[2,3]"), [])
    folds(expand("f32[batch,3]", [3]), [])
    folds(expand("f32[batch,3]", [1, 1]), [])
    kept(expand("f32[1,3]", [2, 3], "f32[2,3]"))
    own = "%s: i64[2] = Shape(%x)\n  %y: f32[batch,3] = Expand(%x, %s)"  # declared shapes agree
    folds(unary("f32[batch,3]", own), ["Shape"])  # dead: eliminate-dead-code's


def test_expand_refusals():
    refused(expand("f32[batch,3]", [2, 3]), "has dims not known to match the target's")
    dynamic = unary("f32[2,3]", "%y = Expand(%x, %s)", ", %s: i64[2]")
    refused(dynamic, "the target shape is not a constant", run=False)


def slice_(x: str, starts: list[int], ends: list[int], rest: str = "", opset: int = 13) -> str:
    if opset < 10:
        return unary(x, f"%y = Slice(%x) {{starts = {starts}, ends = {ends}{rest}}}")
    consts = "\n  ".join(
        f"%{n}: i64[{len(v)}] = const {v}" for n, v in (("b", starts), ("e", ends), ("a", [1]))
    )
    return unary(x, f"{consts}\n  %y = Slice(%x, %b, %e{rest})")


def test_full_range_slices():
    folds(slice_("f32[2,3]", [0], [INT64_MAX], ", %a"), [])
    folds(slice_("f32[2,3]", [-3], [3], ", %a"), [])
    folds(slice_("f32[batch,3]", [0, 0], [INT64_MAX, 5]), [])
    folds(slice_("f32[2,3]", [0], [9], opset=9), [], 9)
    folds(slice_("f32[2,3]", [0], [3], ", axes = [-1]", opset=9), [], 9)
    kept(slice_("f32[2,3]", [1], [3], ", %a"))
    kept(slice_("f32[2,3]", [0], [-1], ", %a"))


def test_slice_refusals():
    refused(slice_("f32[batch,3]", [0], [100]), "x's dim 0 is batch: end 100 may not reach it")
    dynamic = unary("f32[2,3]", "%e: i64[1] = const [3]\n  %y = Slice(%x, %b, %e)", ", %b: i64[1]")
    refused(dynamic, "starts is not a constant", run=False)


def squeeze_pair(x: str, inner: str, outer: str, a: str, b: str, opset: int = 13) -> str:
    if opset < 13:
        args = [f" {{axes = {a}}}" if a else "", f" {{axes = {b}}}" if b else ""]
        return unary(x, f"%m = {inner}(%x){args[0]}\n  %y = {outer}(%m){args[1]}")
    lines = [f"%a: i64[{len(eval(a))}] = const {a}"] if a else []
    lines += [f"%b: i64[{len(eval(b))}] = const {b}"] if b else []
    lines += [f"%m = {inner}(%x{', %a' if a else ''})", f"%y = {outer}(%m{', %b' if b else ''})"]
    return unary(x, "\n  ".join(lines))


def test_squeeze_of_unsqueeze():
    folds(squeeze_pair("f32[2,3]", "Unsqueeze", "Squeeze", "[1]", "[1]"), [])
    folds(squeeze_pair("f32[2,3]", "Unsqueeze", "Squeeze", "[0, -1]", "[3, 0]"), [])
    folds(squeeze_pair("f32[2,3]", "Unsqueeze", "Squeeze", "[1]", "[1]", 11), [], 11)
    folds(squeeze_pair("f32[2,3]", "Unsqueeze", "Squeeze", "[1]", ""), [])  # x has no 1s
    kept(squeeze_pair("f32[2,1]", "Unsqueeze", "Squeeze", "[0]", ""))  # drops x's 1 too
    refused(squeeze_pair("f32[batch,3]", "Unsqueeze", "Squeeze", "[1]", ""), "not static")
    unknown = squeeze_pair("f32[*]", "Unsqueeze", "Squeeze", "[-1]", "[-1]")
    refused(unknown, "rank is unknown", run=False)


def test_unsqueeze_of_squeeze():
    folds(squeeze_pair("f32[2,1,3]", "Squeeze", "Unsqueeze", "[1]", "[1]"), [])
    folds(squeeze_pair("f32[2,1,3]", "Squeeze", "Unsqueeze", "[-2]", "[1]", 11), [], 11)
    folds(squeeze_pair("f32[1,3,1]", "Squeeze", "Unsqueeze", "", "[0, 2]"), [])
    kept(squeeze_pair("f32[2,1,3]", "Squeeze", "Unsqueeze", "[1]", "[0]"))
    refused(squeeze_pair("f32[batch,1]", "Squeeze", "Unsqueeze", "", "[1]"), "not static")


def test_concat_and_split_of_one():
    folds(unary("f32[2,3]", "%y: f32[2,3] = Concat(%x) {axis = 1}"), [])
    folds(unary("f32[4,3]", "%y: f32[4,3] = Split(%x) {axis = 0, num_outputs = 1}"), [])
    folds(unary("f32[4,3]", "%y: f32[4,3] = Split(%x) {split = [4]}"), [], 11)
    split = "%s: i64[1] = const [3]\n  %y: f32[4,3] = Split(%x, %s) {axis = 1}"
    folds(unary("f32[4,3]", split), [], 13)


def test_pad_with_zero_pads():
    zero = '%p: i64[4] = const [0, 0, 0, 0]\n  %y: f32[2,3] = Pad(%x, %p) {mode = "reflect"}'
    folds(unary("f32[2,3]", zero), [])
    folds(unary("f32[2,3]", "%y: f32[2,3] = Pad(%x) {pads = [0, 0, 0, 0]}"), [], 10)
    one = "%p: i64[4] = const [0, 0, 0, 1]\n  %y: f32[2,4] = Pad(%x, %p)"
    kept(unary("f32[2,3]", one))
    dynamic = unary("f32[2,3]", "%y = Pad(%x, %p)", ", %p: i64[4]")
    refused(dynamic, "pads are not a constant", run=False)


def test_flatten_of_a_matrix():
    folds(unary("f32[2,3]", "%y: f32[2,3] = Flatten(%x)"), [])
    folds(unary("f32[batch,3]", "%y: f32[batch,3] = Flatten(%x) {axis = -1}"), [])
    kept(unary("f32[2,3]", "%y: f32[1,6] = Flatten(%x) {axis = 0}"))
    kept(unary("f32[2,3,4]", "%y: f32[2,12] = Flatten(%x)"))
    refused(unary("f32[*]", "%y = Flatten(%x)"), "x's rank is unknown", run=False)


# ----- arithmetic with a neutral constant, Where, involutions -------------------------------------

NEUTRAL = [
    ("Mul", "%x, %c", "1.0"),
    ("Mul", "%c, %x", "1.0"),
    ("Add", "%x, %c", "0.0"),
    ("Add", "%c, %x", "-0.0"),
    ("Sub", "%x, %c", "0.0"),
    ("Div", "%x, %c", "1.0"),
    ("Pow", "%x, %c", "1.0"),
]


def neutral(op: str, args: str, c: str, x: str = "f32[batch,3]", cshape: str = "[1,3]") -> str:
    n = int(np.prod(eval(cshape.replace("batch", "2"))))
    values = ", ".join([c] * n) if n > 1 else c
    literal = f"[{values}]" if cshape != "[]" else c
    return unary(x, f"%c: f32{cshape} = const {literal}\n  %y = {op}({args})")


@pytest.mark.parametrize("op,args,c", NEUTRAL)
def test_neutral_operands(op, args, c):
    folds(neutral(op, args, c), [])
    folds(neutral(op, args, c, "f32[2,3]", "[]"), [])


def test_neutral_operands_of_integers_and_what_is_not_neutral():
    folds(unary("i32[3]", "%c: i32[] = const 1\n  %y = Mul(%x, %c)"), [])
    kept(neutral("Sub", "%c, %x", "0.0"))  # 0 - x
    kept(neutral("Div", "%c, %x", "1.0"))  # 1 / x
    kept(neutral("Mul", "%x, %c", "2.0"))


def test_neutral_operand_refusals():
    refused(neutral("Mul", "%x, %c", "1.0", "f32[3]", "[2,3]"), "may change x's shape")
    refused(neutral("Add", "%x, %c", "0.0", "f32[batch,3]", "[2,3]"), "may change x's shape")
    unknown = "%c: f32[] = const 1.0\n  %u = Relu(%x)\n  %y = Mul(%u, %c)"
    refused(unary("f32[3]", unknown), "x's shape is unknown")


def where(a: str, b: str, cond: list[bool]) -> str:
    return f"""graph @g(%a: {a}, %b: {b}) {{
  %c: bool[{len(cond)}] = const {str(cond).lower()}
  %y = Where(%c, %a, %b)
  return %y
}}"""


def test_where_with_a_constant_condition():
    model = folds(where("f32[2,3]", "f32[3]", [True]), [])
    assert model.graph.outputs[0] is model.graph.inputs[0]
    model = folds(where("f32[1]", "f32[batch,3]", [False, False, False]), [])
    assert model.graph.outputs[0] is model.graph.inputs[1]
    kept(where("f32[3]", "f32[3]", [True, False, True]))


def test_where_refusals():
    refused(where("f32[3]", "f32[2,3]", [True]), "may change [3]")
    refused(where("f32[1]", "f32[1]", [True, True]), "may change [1]")
    unknown = where("f32[3]", "f32[3]", [False]).replace("%a: f32[3]", "%x: f32[3]")
    unknown = unknown.replace("{", "{\n  %a = Relu(%x)", 1)
    refused(unknown, "the shapes of the branches are unknown")


def test_involutions():
    folds(unary("f32[3]", "%n = Neg(%x)\n  %y = Neg(%n)"), [])
    folds(unary("i8[3]", "%n = Neg(%x)\n  %y = Neg(%n)"), [])
    folds(unary("bool[3]", "%n = Not(%x)\n  %y = Not(%n)"), [])
    kept(unary("f32[3]", "%n = Reciprocal(%x)\n  %y = Reciprocal(%n)"))  # 1/(1/x) rounds


# ----- golden before/after text -------------------------------------------------------------------

GOLDEN = [
    (  # Transpose(Transpose(x, p), q) -> Transpose(x, p∘q), Identity(x) -> x
        """model ir_version=10 opset={"": 18}
graph @g(%x: f32[2,3,4]) {
  %t1: f32[3,2,4] = Transpose(%x) {perm = [1, 0, 2]}
  %i: f32[3,2,4] = Identity(%t1)
  %t2: f32[4,2,3] = Transpose(%i) {perm = [2, 1, 0]}
  return %t2
}
""",
        """model ir_version=10 opset={"": 18}
graph @g(%x: f32[2,3,4]) {
  %transpose: f32[4,2,3] = Transpose(%x) {perm = [2, 0, 1]}
  return %transpose as %t2
}
""",
    ),
    (  # Reshape(Reshape(x, s1), s2) -> Reshape(x, s2), the 0 of s2 resolved from s1
        """model ir_version=10 opset={"": 18}
graph @g(%x: f32[2,3,4]) {
  %s1: i64[2] = const [6, 4]
  %s2: i64[3] = const [0, 2, 2]
  %m: f32[6,4] = Reshape(%x, %s1)
  %y: f32[6,2,2] = Reshape(%m, %s2)
  return %y
}
""",
        """model ir_version=10 opset={"": 18}
graph @g(%x: f32[2,3,4]) {
  %s1: i64[2] = const [6, 4]
  %s2: i64[3] = const [0, 2, 2]
  %const: i64[3] = const [6, 2, 2]
  %reshape: f32[6,2,2] = Reshape(%x, %const)
  return %reshape as %y
}
""",
    ),
    (  # Dropout in inference -> x; its mask -> all true; x * 1 -> x
        """model ir_version=10 opset={"": 13}
graph @g(%x: f32[2,3]) {
  %one: f32[] = const 1.0
  %y: f32[2,3], %mask: bool[2,3] = Dropout(%x)
  %z: f32[2,3] = Mul(%one, %y)
  return %z, %mask
}
""",
        """model ir_version=10 opset={"": 13}
graph @g(%x: f32[2,3]) {
  %one: f32[] = const 1.0
  %const: i64[2] = const [2, 3]
  %constantofshape: bool[2,3] = ConstantOfShape(%const) {value = tensor bool[1] [true]}
  return %x as %z, %constantofshape as %mask
}
""",
    ),
]


@pytest.mark.parametrize("before,after", GOLDEN)
def test_golden(before, after):
    model = parse_model(before)
    feeds = _feeds(model)
    expected = Interpreter(model).run(feeds)
    optimize_model(model, "canonicalize", verify_each=True)
    assert print_model(model) == after
    assert_outputs_close(expected, Interpreter(model).run(feeds), rtol=0, atol=0)


# ----- random graphs with no-ops sprinkled in -----------------------------------------------------


def _insert_noop(model: Model, value: Value, kind: str, draw) -> None:
    """Route every reader of `value` through a chain of nodes that computes `value` again."""
    graph, shape = model.graph, value.type.shape
    rank = len(shape)
    uses = value.uses
    first = next((n for n in graph if any(v is value for v in n.inputs)), None)
    b = Builder(graph, insert_before=first)
    i64 = lambda v: b.const(np.array(v, np.int64))  # noqa: E731
    ones = b.const(np.ones([1] * draw(st.integers(0, rank)), np.float32))
    if kind == "transpose" and rank >= 1:
        perm = draw(st.permutations(range(rank)))
        out = b.Transpose(b.Transpose(value, perm=perm), perm=list(np.argsort(perm)))
    elif kind == "reshape" and rank >= 1:
        target = [0] * rank
        target[draw(st.integers(0, rank - 1))] = -1
        out = b.Reshape(value, i64(target))
    elif kind == "squeeze":
        axis = draw(st.integers(-rank - 1, rank))
        out = b.Squeeze(b.Unsqueeze(value, i64([axis])), i64([axis]))
    elif kind == "concat" and rank >= 1:
        out = b.Concat(value, axis=draw(st.integers(-rank, rank - 1)))
    elif kind == "slice" and rank >= 1:
        out = b.Slice(value, i64([0]), i64([INT64_MAX]), i64([draw(st.integers(-rank, rank - 1))]))
    else:
        out = {
            "identity": lambda: b.Identity(value),
            "dropout": lambda: b.Dropout(value, b.const(np.float32(0.5))),
            "mul": lambda: b.Mul(ones, value),
            "add": lambda: b.Add(value, b.const(np.zeros_like(ones.const_value))),
            "cast": lambda: b.Cast(b.Cast(value, to=int(DType.DOUBLE)), to=int(DType.FLOAT)),
            "expand": lambda: b.Expand(value, i64([1] * draw(st.integers(0, rank)))),
            "pad": lambda: b.Pad(value, i64([0] * (2 * rank))),
            "neg": lambda: b.Neg(b.Neg(value)),
            "where": lambda: b.Where(b.const(np.array(True)), value, b.const(np.float32(0))),
        }.get(kind, lambda: b.Identity(value))()
    for node in b.created:
        for output, t in zip(node.outputs, infer_node(node, model.opset_imports), strict=True):
            output.type = t
    for node, index in uses:
        node.set_input(index, out)


@st.composite
def models_with_noops(draw) -> tuple[Model, int]:
    model = draw(models(max_nodes=8))
    size = len(model.graph)
    produced = [o for n in model.graph for o in n.outputs]
    values = [v for v in [*model.graph.inputs, *produced] if v.type.dtype is DType.FLOAT]
    kinds = "identity dropout mul add cast expand pad neg where concat transpose reshape squeeze"
    kinds += " slice"
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(kinds.split()))
        _insert_noop(model, draw(st.sampled_from(values)), kind, draw)
    verify(model)
    return model, size


@given(models_with_noops())
def test_random_graphs_keep_their_outputs_and_lose_the_noops(drawn):
    model, size = drawn
    feeds = feeds_for(model)
    expected = Interpreter(model).run(feeds)
    result = optimize_model(model, "canonicalize")
    verify(result.model)
    assert_outputs_close(expected, Interpreter(result.model).run(feeds), rtol=0, atol=0)
    assert len(result.model.graph) <= size, print_model(result.model)
    again = optimize_model(result.model, "canonicalize")
    assert not any(r.changed for r in again.records), print_model(result.model)


# ----- real models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["squeezenet", "inception_v1"])
def test_light_models_agree_under_onnxruntime(name):
    import onnxruntime as ort

    from graphopt.backends.onnx import to_onnx
    from graphopt.frontends.onnx import load_onnx

    def run(model: Model) -> list[np.ndarray]:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        proto = to_onnx(model).SerializeToString()
        session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
        return session.run(None, feeds)

    model = load_onnx(os.path.join(LIGHT, f"light_{name}.onnx"))
    (data,) = [v for v in model.graph.inputs if v.const_value is None]
    feeds = {data.name: np.random.default_rng(0).random(data.type.shape).astype(np.float32)}
    expected = run(model)
    assert "Dropout" in ops(model)
    result = optimize_model(model, "canonicalize")
    assert "Dropout" not in ops(result.model)
    for e, a in zip(expected, run(result.model), strict=True):
        np.testing.assert_array_equal(a, e)
