"""GELU fusions: fuse-gelu and fuse-bias-gelu, and the contrib GELU kernels.

The forms the exporters write (text taken from real torch.onnx exports, dynamo and TorchScript)
and every grouping on random instances (hypothesis: constants as initializers, one-element tensors
or Constant nodes; random shapes and float types), compared before and after with graphopt's
interpreter and ONNX Runtime; every refusal leaves the graph as it was and says why; the contrib
kernels against ONNX Runtime's; the zoo's tiny GPT-2 and BERT with both exporters (every layer's
GELU fused, ONNX Runtime outputs equal).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from activation_checks import (
    EXPORTERS,
    close,
    fuse,
    ops,
    ort_run,
    refused,
    single_op,
    text_model,
    with_biases,
    zoo_fuse,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.backends.reference import Interpreter
from graphopt.ir import Builder, DType, Graph, Model, TensorType, Value, print_model
from graphopt.passes import optimize_model

SQRT2 = math.sqrt(2.0)
SCALE = math.sqrt(2.0 / math.pi)


# ----- GELU graphs built in Python: every grouping exporters use ----------------------------------

Const = Callable[[str, float], Value]
OUTER: dict[str, Callable[[Builder, Value, Value, Const], Value]] = {
    "half_first": lambda b, x, a, c: b.Mul(b.Mul(x, c("half", 0.5)), b.Add(a, c("one", 1.0))),
    "half_first_swapped": lambda b, x, a, c: b.Mul(
        b.Add(c("one", 1.0), a), b.Mul(c("half", 0.5), x)
    ),
    "half_inside": lambda b, x, a, c: b.Mul(x, b.Mul(c("half", 0.5), b.Add(a, c("one", 1.0)))),
    "half_last": lambda b, x, a, c: b.Mul(b.Mul(x, b.Add(a, c("one", 1.0))), c("half", 0.5)),
    "halved_first": lambda b, x, a, c: b.Mul(b.Div(x, c("two", 2.0)), b.Add(a, c("one", 1.0))),
    "halved_last": lambda b, x, a, c: b.Div(b.Mul(x, b.Add(a, c("one", 1.0))), c("two", 2.0)),
}
ERF: dict[str, Callable[[Builder, Value, Const], Value]] = {
    "div": lambda b, x, c: b.Erf(b.Div(x, c("sqrt2", SQRT2))),
    "mul": lambda b, x, c: b.Erf(b.Mul(c("inv_sqrt2", 1 / SQRT2), x)),
}


def _sum(b: Builder, x: Value, cube: Value, c: Const) -> Value:
    return b.Tanh(b.Mul(c("scale", SCALE), b.Add(x, cube)))


TANH: dict[str, Callable[[Builder, Value, Const], Value]] = {
    "pow": lambda b, x, c: _sum(b, x, b.Mul(c("k", 0.044715), b.Pow(x, c("three", 3.0))), c),
    "xxx": lambda b, x, c: _sum(b, x, b.Mul(b.Mul(b.Mul(x, x), x), c("k", 0.044715)), c),
    "kxxx": lambda b, x, c: _sum(b, x, b.Mul(b.Mul(b.Mul(c("k", 0.044715), x), x), x), c),
    "fast_xx": lambda b, x, c: b.Tanh(
        b.Mul(
            b.Mul(x, c("scale", SCALE)), b.Add(c("one", 1.0), b.Mul(c("k", 0.044715), b.Mul(x, x)))
        )
    ),
    "fast_kxx": lambda b, x, c: b.Tanh(
        b.Mul(
            b.Add(b.Mul(b.Mul(x, c("k", 0.044715)), x), c("one", 1.0)), b.Mul(c("scale", SCALE), x)
        )
    ),
    "fast_pow": lambda b, x, c: b.Tanh(
        b.Mul(
            b.Mul(x, c("scale", SCALE)),
            b.Add(b.Mul(b.Pow(x, c("two_exp", 2.0)), c("k", 0.044715)), c("one", 1.0)),
        )
    ),
}


def gelu_model(
    outer: str = "half_first",
    inner: str = "div",
    *,
    consts: str = "init",
    dtype: Any = np.float32,
    shape: tuple[Any, ...] = (2, "seq", 8),
    opset: int = 20,
    values: dict[str, Any] | None = None,
    bias: bool = False,
    extra_reader: bool = False,
) -> Model:
    """x [+ bias] -> the GELU formula `outer(inner)`; constants as initializers ("init"),
    one-element tensors ("tensor", integer exponents) or Constant nodes ("node"); `values`
    overrides constants."""
    graph = Graph("g")
    b = Builder(graph)
    x = graph.add_input("x", TensorType(DType.from_numpy(np.dtype(dtype)), shape))
    if bias:
        last = shape[-1]
        x = b.Add(x, b.const(np.linspace(-1, 1, last).astype(dtype), "bias"))

    def c(name: str, value: float) -> Value:
        array = np.asarray((values or {}).get(name, value), dtype=dtype)
        if consts == "tensor":
            array = array.reshape(1)
            if name in ("three", "two_exp"):
                array = array.astype(np.int64)  # Pow takes an integer exponent too
        if consts == "node":
            return b.Constant(value=array)  # type: ignore[no-any-return]
        return b.const(array)

    act = (ERF.get(inner) or TANH[inner])(b, x, c)
    y = OUTER[outer](b, x, act, c)
    outputs = [y]
    if extra_reader:
        outputs.append(act)
    graph.set_outputs(outputs)
    model = Model(graph, opset_imports={"": opset})
    return optimize_model(model, "infer-shapes").model


def _approximate(inner: str) -> str:
    return "none" if inner in ERF else "tanh"


# ----- fuse-gelu: exporters' forms ----------------------------------------------------------------

BERT_DYNAMO = """graph @g(%x: f32[batch,seq,8]) {
  %c2: f32[] = const 1.4142135
  %c1: f32[] = const 1.0
  %ch: f32[] = const 0.5
  %d: f32[batch,seq,8] = Div(%x, %c2)
  %e: f32[batch,seq,8] = Erf(%d)
  %a: f32[batch,seq,8] = Add(%e, %c1)
  %m: f32[batch,seq,8] = Mul(%ch, %a)
  %y: f32[batch,seq,8] = Mul(%x, %m)
  return %y
}"""

BERT_TORCHSCRIPT = """graph @g(%x: f32[batch,seq,8]) {
  %c2 = Constant() {value = tensor f32[] 1.4142135}
  %d = Div(%x, %c2)
  %e = Erf(%d)
  %c1 = Constant() {value = tensor f32[] 1.0}
  %a = Add(%e, %c1)
  %m = Mul(%x, %a)
  %ch = Constant() {value = tensor f32[] 0.5}
  %y: f32[batch,seq,8] = Mul(%m, %ch)
  return %y
}"""

GPT2_DYNAMO = """graph @g(%x: f32[batch,seq,8]) {
  %half: f32[] = const 0.5
  %three: f32[] = const 3.0
  %k: f32[] = const 0.044715
  %s: f32[] = const 0.7978846
  %one: f32[] = const 1.0
  %h: f32[batch,seq,8] = Mul(%x, %half)
  %p: f32[batch,seq,8] = Pow(%x, %three)
  %pk: f32[batch,seq,8] = Mul(%p, %k)
  %in: f32[batch,seq,8] = Add(%x, %pk)
  %sc: f32[batch,seq,8] = Mul(%in, %s)
  %t: f32[batch,seq,8] = Tanh(%sc)
  %t1: f32[batch,seq,8] = Add(%t, %one)
  %y: f32[batch,seq,8] = Mul(%h, %t1)
  return %y
}"""

TANH_TORCHSCRIPT = """graph @g(%x: f32[batch,seq,8]) {
  %xx = Mul(%x, %x)
  %xxx = Mul(%x, %xx)
  %k = Constant() {value = tensor f32[] 0.044715}
  %kx = Mul(%k, %xxx)
  %in = Add(%x, %kx)
  %s = Constant() {value = tensor f32[] 0.7978846}
  %sc = Mul(%s, %in)
  %t = Tanh(%sc)
  %one = Constant() {value = tensor f32[] 1.0}
  %t1 = Add(%one, %t)
  %m = Mul(%x, %t1)
  %half = Constant() {value = tensor f32[] 0.5}
  %y: f32[batch,seq,8] = Mul(%half, %m)
  return %y
}"""


@pytest.mark.parametrize(
    "text, approximate",
    [(BERT_DYNAMO, "none"), (BERT_TORCHSCRIPT, "none"), (GPT2_DYNAMO, "tanh"),
     (TANH_TORCHSCRIPT, "tanh")],
    ids=["bert-dynamo", "bert-torchscript", "gpt2-dynamo", "tanh-torchscript"],
)  # fmt: skip
@pytest.mark.parametrize("opset", [20, 21])
def test_gelu_exporter_forms(text, approximate, opset):
    model, _ = fuse(text_model(text, opset), "fuse-gelu,eliminate-dead-code")
    assert [n.op for n in model.graph] == ["Gelu"]
    assert model.graph.nodes[0].get_attr("approximate", "none") == approximate
    assert model.graph.nodes[0].inputs[0] is model.graph.inputs[0]


def test_gelu_golden_text():
    model, _ = fuse(text_model(BERT_DYNAMO), "fuse-gelu,eliminate-dead-code")
    assert print_model(model).splitlines()[1:] == [
        "graph @g(%x: f32[batch,seq,8]) {",
        "  %gelu: f32[batch,seq,8] = Gelu(%x)",
        "  return %gelu as %y",
        "}",
    ]


@pytest.mark.parametrize("outer", list(OUTER))
@pytest.mark.parametrize("inner", [*ERF, *TANH])
def test_gelu_every_grouping(outer, inner):
    model, notes = fuse(gelu_model(outer, inner), "fuse-gelu")
    assert ops(model) == ["Gelu"], notes
    assert model.graph.nodes[0].get_attr("approximate", "none") == _approximate(inner)


@settings(max_examples=25)
@given(
    outer=st.sampled_from(list(OUTER)),
    inner=st.sampled_from([*ERF, *TANH]),
    consts=st.sampled_from(["init", "tensor", "node"]),
    dtype=st.sampled_from([np.float32, np.float16, np.float64]),
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple),
)
def test_gelu_random_instances(outer, inner, consts, dtype, shape):
    model = gelu_model(outer, inner, consts=consts, dtype=dtype, shape=shape)
    # float16 keeps 3 digits; onnxruntime has no float64 Erf kernel
    rtol = 2e-3 if dtype == np.float16 else 1e-4
    check_ort = not (dtype == np.float64 and inner in ERF)
    result, notes = fuse(model, "fuse-gelu", check_ort=check_ort, rtol=rtol)
    assert ops(result) == ["Gelu"], notes


# ----- fuse-gelu: refusals ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "inner, name, value, reason",
    [("div", "sqrt2", 1.41, "the divisor sqrt(2) inside erf (%"),
     ("div", "half", 0.49, "the factor 0.5"),
     ("pow", "k", 0.0447, "the coefficient 0.044715"),
     ("pow", "scale", 0.8, "the factor sqrt(2/pi) inside tanh"),
     ("pow", "three", 3.0001, "the exponent 3 is 3.0001"),
     ("fast_xx", "one", 1.001, "the 1 in (1 + 0.044715 * x^2)")],
)  # fmt: skip
def test_gelu_refuses_wrong_constants(inner, name, value, reason):
    refused(gelu_model("half_first", inner, values={name: value}), "fuse-gelu", reason)


def test_gelu_constant_tolerance_is_relative_1e4():
    assert ops(fuse(gelu_model(values={"sqrt2": SQRT2 * (1 + 5e-5)}), "fuse-gelu")[0]) == ["Gelu"]
    refused(gelu_model(values={"sqrt2": SQRT2 * (1 + 5e-4)}), "fuse-gelu", "relative tolerance")
    model = fuse(gelu_model(values={"sqrt2": SQRT2 * (1 + 5e-4)}), "fuse-gelu{rtol=1e-3}")[0]
    assert ops(model) == ["Gelu"]


def test_gelu_refusals():
    refused(gelu_model(opset=18), "fuse-gelu", "Gelu needs opset 20, the model imports 18")
    refused(gelu_model(extra_reader=True), "fuse-gelu", "is also read by a graph output")
    wide = gelu_model(values={"half": np.full((1, 1, 1, 1), 0.5)}, shape=(2, 3, 8))
    refused(wide, "fuse-gelu", "has 4 axes, x 3: it broadcasts the output")
    vector = gelu_model(values={"one": np.ones(8)}, shape=(2, 3, 8))
    refused(vector, "fuse-gelu", "the 1 added to erf/tanh (%")


def test_gelu_upgrade_then_fuse():
    model = optimize_model(gelu_model(opset=17), "upgrade-opset,fuse-gelu").model
    assert ops(model) == ["Gelu"] and model.opset >= 20


# ----- contrib kernels against ONNX Runtime -------------------------------------------------------


@pytest.mark.parametrize(
    "op, shapes",
    [("com.microsoft.Gelu", [(2, 3, 16)]), ("com.microsoft.BiasGelu", [(2, 3, 16), (16,)]),
     ("com.microsoft.FastGelu", [(4, 16)]), ("com.microsoft.FastGelu", [(2, 5, 16), (16,)])],
)  # fmt: skip
def test_gelu_kernels_match_onnxruntime(op, shapes):
    rng = np.random.default_rng(1)
    arrays = [(rng.standard_normal(s) * 3).astype(np.float32) for s in shapes]
    model = single_op(op, arrays)
    feeds = {f"i{k}": a for k, a in enumerate(arrays)}
    close(ort_run(model, feeds), Interpreter(model).run(feeds), 1e-5)


# ----- fuse-bias-gelu -----------------------------------------------------------------------------


def _bias_gelu(op_attrs: str, opset: int = 20, bias: str = "f32[8]") -> Model:
    return text_model(
        f"""graph @g(%x: f32[batch,seq,8], %b: {bias}) {{
  %a: f32[batch,seq,8] = Add(%b, %x)
  %y: f32[batch,seq,8] = Gelu(%a){op_attrs}
  return %y
}}""",
        opset,
    )


def test_bias_gelu_from_gelu():
    model, _ = fuse(_bias_gelu(""), "fuse-bias-gelu", "onnxruntime")
    assert ops(model) == ["com.microsoft.BiasGelu"]
    assert [v.name for v in model.graph.nodes[0].inputs] == ["x", "b"]
    model, _ = fuse(_bias_gelu(' {approximate = "tanh"}'), "fuse-bias-gelu", "onnxruntime")
    assert ops(model) == ["com.microsoft.FastGelu"] and len(model.graph.nodes[0].inputs) == 2


@pytest.mark.parametrize("inner", ["div", "pow", "fast_kxx"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("opset", [13, 17, 20])
def test_bias_gelu_from_raw_formulas(inner, bias, opset):
    passes = "fuse-gelu,fuse-bias-gelu" if opset >= 20 else "fuse-bias-gelu"
    model, _ = fuse(gelu_model("half_last", inner, opset=opset, bias=bias), passes, "onnxruntime")
    expected = {
        ("none", True): "com.microsoft.BiasGelu", ("tanh", True): "com.microsoft.FastGelu",
        ("tanh", False): "com.microsoft.FastGelu",
        ("none", False): "Gelu" if opset >= 20 else "com.microsoft.Gelu",
    }[_approximate(inner), bias]  # fmt: skip
    assert ops(model) == [expected]
    assert model.opset_imports.get("com.microsoft") == (None if expected == "Gelu" else 1)


@settings(max_examples=20)
@given(
    approximate=st.sampled_from(["none", "tanh"]),
    form=st.sampled_from(["Gelu", "raw", "contrib"]),
    bias=st.sampled_from(["", "left", "right"]),
    dims=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    last=st.integers(1, 9),
    opset=st.sampled_from([17, 20]),
)
def test_bias_gelu_random_instances(approximate, form, bias, dims, last, opset):
    """x [+ bias] -> a GELU written as the opset-20 op, the raw formula or the contrib op."""
    if form == "Gelu":
        opset = 20
    graph = Graph("g")
    b = Builder(graph)
    x = graph.add_input("x", TensorType(DType.FLOAT, (*dims, last)))
    if bias:
        vector = b.const(np.linspace(-2, 1, last).astype(np.float32))
        x = b.Add(x, vector) if bias == "right" else b.Add(vector, x)
    if form == "raw":
        inner = ERF["div"] if approximate == "none" else TANH["pow"]

        def c(name: str, value: float) -> Value:
            return b.const(np.float32(value))

        y = OUTER["half_last"](b, x, inner(b, x, c), c)
    elif form == "contrib":
        y = b.op("com.microsoft." + ("Gelu" if approximate == "none" else "FastGelu"), x)
    else:
        y = b.Gelu(x, approximate=approximate)
    graph.set_outputs([y])
    ms = {"com.microsoft": 1} if form == "contrib" else {}
    model = optimize_model(Model(graph, opset_imports={"": opset, **ms}), "infer-shapes").model
    result, notes = fuse(model, "fuse-bias-gelu", "onnxruntime")
    expected = {("none", True): "BiasGelu", ("tanh", True): "FastGelu", ("tanh", False): "FastGelu",
                ("none", False): "Gelu"}[approximate, bool(bias)]  # fmt: skip
    left = ops(result)
    assert len(left) == 1 and left[0].endswith(expected), (left, notes)


def test_bias_gelu_refusals():
    refused(_bias_gelu(""), "fuse-bias-gelu", "nothing to do for target 'onnx'")
    refused(_bias_gelu("", bias="f32[seq,8]"), "fuse-bias-gelu", "1-D bias", "onnxruntime")
    model = _bias_gelu("")
    model.graph.inputs[0].type = TensorType(DType.FLOAT, ("batch", "seq", "hidden"))
    refused(model, "fuse-bias-gelu", "1-D bias over the other's last (static) axis", "onnxruntime")
    f64 = gelu_model(dtype=np.float64, opset=17)
    refused(f64, "fuse-bias-gelu", "runs float32 and float16, x is double", "onnxruntime")


# ----- the zoo's tiny models ----------------------------------------------------------------------


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name, tanh_left", [("gpt2", 0), ("bert", 1)])  # BERT's pooler Tanh
def test_zoo_gelu(zoo_model, name, tanh_left, exporter):
    counts = zoo_fuse(with_biases(zoo_model(name, exporter)), name, "upgrade-opset,O1,fuse-gelu")
    assert counts["Gelu"] == 2 and counts["Erf"] == 0 and counts["Tanh"] == tanh_left
    assert counts["Pow"] == 0


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name, fused", [("gpt2", "FastGelu"), ("bert", "BiasGelu")])
def test_zoo_bias_gelu(zoo_model, name, fused, exporter):
    passes = "upgrade-opset,O1,fuse-gelu,fuse-bias-gelu"
    counts = zoo_fuse(with_biases(zoo_model(name, exporter)), name, passes, "onnxruntime")
    assert counts[f"com.microsoft.{fused}"] == 2 and counts["Gelu"] == 0
