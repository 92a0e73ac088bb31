"""Hypothesis strategies: random valid IR graphs built from the registry's ops, and their inputs.

`models()` draws a model of a few to a few dozen nodes: graph inputs of random shapes (some with
symbolic dims such as `batch`), small constants, and nodes drawn from `OP_BUILDERS`, each of which
knows how to pick operands of the right shapes from what the graph has so far. Every node's output
types come from the registry's own inference, so the graphs are typed as a frontend would type
them, and the verifier checks each one. Values nobody reads become graph outputs (sometimes a dead
branch is left in on purpose, for clean-up passes to find).

Values stay in ranges where every op is well conditioned (no Exp of large values, no division by
values near zero), so float32 results compare within a tight tolerance.

    @given(models())
    def test_something(model): ...

`feeds_for(model, seed)` makes matching input arrays (symbolic dims bound to small sizes).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import strategies as st

from graphopt.ir import Builder, DType, Graph, Model, Node, TensorType, Value
from graphopt.ir.inference import constant_value, infer_node
from graphopt.ir.registry import REGISTRY, InferenceInputs
from graphopt.ir.verifier import verify

OPSET = 18
SYMBOLS = {"batch": 2, "seq": 3}


@dataclass
class _Draft:
    """A graph under construction: values with their concrete shapes (symbols bound)."""

    draw: Any
    graph: Graph
    builder: Builder
    shapes: dict[Value, tuple[int, ...]] = field(default_factory=dict)
    symbols: dict[Value, tuple[Any, ...]] = field(default_factory=dict)

    def pick(self, predicate: Callable[[tuple[int, ...]], bool] = lambda s: True) -> Value | None:
        """A float activation (graph input or node output) whose concrete shape passes."""
        candidates = [v for v, s in self.shapes.items() if s and predicate(s)]
        if not candidates:
            return None
        return self.draw(st.sampled_from(candidates))

    def const(self, array: np.ndarray) -> Value:
        return self.builder.const(array)

    def static_axes(self, value: Value) -> list[int]:
        """Axes of `value` whose declared dim is a number (not a symbol)."""
        shape = value.type.shape if isinstance(value.type, TensorType) else None
        return [i for i, dim in enumerate(shape or ()) if isinstance(dim, int)]

    def weight(self, *shape: int) -> Value:
        seed = self.draw(st.integers(0, 2**16))
        array = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        return self.const(array * np.float32(1 / np.sqrt(max(shape[0], 1))))

    def ints(self, values: list[int]) -> Value:
        return self.const(np.array(values, np.int64))

    def emit(self, op: str, *inputs: Value | None, outputs: int = 1, **attrs: Any) -> list[Value]:
        result = self.builder.op(op, *inputs, _outputs=outputs, **attrs)
        results = list(result) if isinstance(result, tuple) else [result]
        node = results[0].producer
        assert node is not None
        concrete = self.concrete_types(node)
        for value, t, c in zip(results, infer_node(node, {"": OPSET}), concrete, strict=True):
            value.type = t
            assert isinstance(t, TensorType) and isinstance(c, TensorType) and c.is_static, op
            if t.dtype is DType.FLOAT:
                self.shapes[value] = c.shape  # type: ignore[assignment]
        return results

    def concrete_types(self, node: Node) -> list[Any]:
        """The node's output types for the concrete input shapes (symbols bound)."""
        types = []
        for v in node.inputs:
            t = v.type if v is not None else None
            if v in self.shapes and isinstance(t, TensorType):
                t = t.with_shape(self.shapes[v])
            types.append(t)
        entry = REGISTRY.lookup(node.op, OPSET)
        assert entry is not None and entry.infer is not None
        constants = [constant_value(v) for v in node.inputs]
        return entry.infer(node, InferenceInputs(types, constants, {"": OPSET}))


def _concrete(shape: tuple[Any, ...], symbols: dict[str, int]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else symbols[d] for d in shape)


# ----- op builders: each adds one node (or gives up by returning False) -----------------------------

UNARY = ["Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Erf", "Softsign", "Identity", "Sin"]
BINARY = ["Add", "Sub", "Mul", "Max", "Min"]


def _unary(d: _Draft) -> bool:
    x = d.pick()
    if x is None:
        return False
    op = d.draw(st.sampled_from(UNARY + ["LeakyRelu", "HardSigmoid", "Softmax", "Clip"]))
    if op == "LeakyRelu":
        d.emit(op, x, alpha=d.draw(st.sampled_from([0.01, 0.2])))
    elif op == "Softmax":
        d.emit(op, x, axis=d.draw(st.integers(-len(d.shapes[x]), len(d.shapes[x]) - 1)))
    elif op == "Clip":
        d.emit(op, x, d.const(np.float32(-0.5)), d.const(np.float32(0.75)))
    else:
        d.emit(op, x)
    return True


def _binary(d: _Draft) -> bool:
    x = d.pick()
    if x is None:
        return False
    shape = d.shapes[x]
    mode = d.draw(st.sampled_from(["same", "suffix", "const", "scalar"]))
    other = None
    if mode == "same":
        other = d.pick(lambda s: s == shape)
    elif mode == "suffix" and shape:
        k = d.draw(st.integers(1, len(shape)))
        other = d.weight(*shape[-k:])
    if other is None:
        other = d.const(np.float32(d.draw(st.sampled_from([0.5, 2.0, -1.5]))))
    op = d.draw(st.sampled_from(BINARY + ["Div"]))
    if op == "Div":  # divide by a constant away from zero
        other = d.const(np.float32(d.draw(st.sampled_from([2.0, -4.0, 0.5]))))
    inputs = [x, other] if d.draw(st.booleans()) else [other, x]
    d.emit(op, *inputs)
    return True


def _matmul(d: _Draft) -> bool:
    x = d.pick(lambda s: len(s) >= 1)
    if x is None:
        return False
    k = d.shapes[x][-1]
    n = d.draw(st.integers(1, 6))
    if len(d.shapes[x]) == 2 and d.draw(st.booleans()):
        trans_b = d.draw(st.integers(0, 1))
        w = d.weight(n, k) if trans_b else d.weight(k, n)
        d.emit("Gemm", x, w, d.weight(n), transB=trans_b, alpha=d.draw(st.sampled_from([1.0, 0.5])))
    else:
        d.emit("MatMul", x, d.weight(k, n))
    return True


def _transpose(d: _Draft) -> bool:
    x = d.pick(lambda s: len(s) >= 2)
    if x is None:
        return False
    perm = d.draw(st.permutations(list(range(len(d.shapes[x])))))
    d.emit("Transpose", x, perm=list(perm))
    return True


def _reshape(d: _Draft) -> bool:
    x = d.pick(lambda s: len(s) >= 1)
    if x is None:
        return False
    shape = list(d.shapes[x])
    static = d.static_axes(x)
    keep = [0] * (len(shape) - 2)  # 0 copies the input's dim, symbolic or not
    kind = d.draw(st.sampled_from(["flatten", "split", "minus_one"]))
    if kind == "flatten" and len(shape) >= 2:
        target = [*keep, -1]
    elif kind == "split" and len(shape) - 1 in static and shape[-1] % 2 == 0 and shape[-1] > 1:
        target = [*keep, *([0] if len(shape) >= 2 else []), 2, shape[-1] // 2]
    else:
        target = [-1]
    d.emit("Reshape", x, d.ints(target))
    return True


def _concat_split(d: _Draft) -> bool:
    x = d.pick(lambda s: len(s) >= 1)
    if x is None:
        return False
    rank = len(d.shapes[x])
    axis = d.draw(st.integers(0, rank - 1))
    if d.draw(st.booleans()) and d.shapes[x][axis] % 2 == 0 and axis in d.static_axes(x):
        d.emit("Split", x, outputs=2, axis=axis, num_outputs=2)
        return True
    shape = d.shapes[x]
    other = d.pick(
        lambda s: (
            len(s) == rank
            and all(a == b for i, (a, b) in enumerate(zip(s, shape, strict=True)) if i != axis)
        )
    )
    d.emit(
        "Concat", x, other if other is not None else x, axis=axis - rank * d.draw(st.integers(0, 1))
    )
    return True


def _reduce(d: _Draft) -> bool:
    x = d.pick(lambda s: len(s) >= 1)
    if x is None:
        return False
    rank = len(d.shapes[x])
    axes = sorted(set(d.draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank))))
    op = d.draw(st.sampled_from(["ReduceMean", "ReduceSum", "ReduceMax"]))
    d.emit(op, x, d.ints(axes), keepdims=d.draw(st.integers(0, 1)))
    return True


def _slice_gather(d: _Draft) -> bool:
    x = d.pick(lambda s: len(s) >= 1 and max(s) >= 2)
    if x is None:
        return False
    shape = d.shapes[x]
    axes = [i for i in d.static_axes(x) if shape[i] >= 2]
    if not axes:
        return False
    axis = d.draw(st.sampled_from(axes))
    if d.draw(st.booleans()):
        d.emit("Slice", x, d.ints([1]), d.ints([shape[axis]]), d.ints([axis]))
    else:
        indices = d.draw(
            st.lists(st.integers(-shape[axis], shape[axis] - 1), min_size=1, max_size=3)
        )
        d.emit("Gather", x, d.ints(indices), axis=axis)
    return True


def _squeeze(d: _Draft) -> bool:
    x = d.pick(lambda s: len(s) <= 3)
    if x is None:
        return False
    unsqueezed = d.emit("Unsqueeze", x, d.ints([0]))[0]
    if d.draw(st.booleans()):
        d.emit("Squeeze", unsqueezed, d.ints([0]))
    return True


def _norm(d: _Draft) -> bool:
    x = d.pick(lambda s: len(s) >= 2)
    if x is None:
        return False
    n = d.shapes[x][-1]
    d.emit("LayerNormalization", x, d.weight(n), d.weight(n), axis=-1, epsilon=1e-5)
    return True


def _where(d: _Draft) -> bool:
    x = d.pick()
    if x is None:
        return False
    cond = d.emit("Greater", x, d.const(np.float32(0.1)))[0]
    d.emit("Where", cond, x, d.const(np.float32(0.0)))
    return True


def _conv_pool(d: _Draft) -> bool:
    x = d.pick(lambda s: len(s) == 4 and s[2] >= 3 and s[3] >= 3)
    if x is None:
        return False
    channels = d.shapes[x][1]
    kind = d.draw(st.sampled_from(["conv", "depthwise", "maxpool", "avgpool"]))
    pads = d.draw(st.sampled_from([[0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]]))
    strides = d.draw(st.sampled_from([[1, 1], [2, 2]]))
    if kind in ("conv", "depthwise"):
        group = channels if kind == "depthwise" else 1
        out = channels if kind == "depthwise" else d.draw(st.integers(1, 4))
        w = d.weight(out, channels // group, 3, 3)
        d.emit(
            "Conv",
            x,
            w,
            d.weight(out),
            kernel_shape=[3, 3],
            pads=pads,
            strides=strides,
            group=group,
        )
    else:
        op = "MaxPool" if kind == "maxpool" else "AveragePool"
        d.emit(
            op,
            x,
            kernel_shape=[2, 2],
            pads=[0, 0, 1, 1] if pads[2] else [0, 0, 0, 0],
            strides=strides,
        )
    return True


OP_BUILDERS: dict[str, Callable[[_Draft], bool]] = {
    "unary": _unary, "binary": _binary, "matmul": _matmul, "transpose": _transpose,
    "reshape": _reshape, "concat_split": _concat_split, "reduce": _reduce,
    "slice_gather": _slice_gather, "squeeze": _squeeze, "norm": _norm, "where": _where,
    "conv_pool": _conv_pool,
}  # fmt: skip


@st.composite
def models(
    draw: Any,
    *,
    min_nodes: int = 1,
    max_nodes: int = 12,
    builders: tuple[str, ...] = tuple(OP_BUILDERS),
    symbolic: bool = True,
) -> Model:
    """A random valid, typed model (see the module docstring)."""
    graph = Graph("random")
    draft = _Draft(draw, graph, Builder(graph))
    for i in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 3)) == 0:  # image-like, for convolutions and pooling
            dims: list[Any] = [draw(st.integers(1, 2)), draw(st.integers(1, 3)), 5, 6]
        else:
            dims = [draw(st.integers(1, 4)) for _ in range(draw(st.integers(1, 4)))]
        rank = len(dims)
        concrete = tuple(dims)
        if symbolic and rank >= 2 and draw(st.booleans()):
            dims[0] = "batch"
            concrete = (SYMBOLS["batch"], *concrete[1:])
        value = graph.add_input(f"x{i}", TensorType(DType.FLOAT, tuple(dims)))
        draft.shapes[value] = concrete
    target = draw(st.integers(min_nodes, max_nodes))
    attempts = 0
    while len(graph) < target and attempts < 4 * target:
        attempts += 1
        OP_BUILDERS[draw(st.sampled_from(builders))](draft)
    produced = [v for node in graph for v in node.outputs]
    sinks = [v for v in produced if not v.is_used] or list(graph.inputs)
    if len(sinks) > 1 and draw(st.booleans()):
        sinks = sinks[1:]  # leave one dead branch in
    graph.set_outputs(sinks, [f"y{i}" for i in range(len(sinks))])
    model = Model(graph, opset_imports={"": OPSET})
    verify(model)
    return model


def feeds_for(model: Model, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal float inputs for `model`, symbolic dims bound as in `SYMBOLS`."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        assert isinstance(value.type, TensorType) and value.type.shape is not None
        shape = _concrete(value.type.shape, SYMBOLS)
        feeds[value.name or ""] = rng.standard_normal(shape).astype(value.type.dtype.numpy)
    return feeds


def assert_outputs_close(
    expected: dict[str, Any], actual: dict[str, Any], rtol: float = 1e-4, atol: float = 1e-5
) -> None:
    """Same output names, shapes and dtypes, values equal within tolerance (NaNs equal)."""
    assert list(expected) == list(actual), f"outputs {list(actual)} != {list(expected)}"
    for name, e in expected.items():
        a = np.asarray(actual[name])
        e = np.asarray(e)
        assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, equal_nan=True, err_msg=name)


def registry_ops() -> set[str]:
    """Every op the strategy can emit, for checks that the registry knows them all."""
    return set(UNARY + BINARY) | {
        "LeakyRelu", "HardSigmoid", "Softmax", "Clip", "Div", "Gemm", "MatMul", "Transpose",
        "Reshape", "Split", "Concat", "ReduceMean", "ReduceSum", "ReduceMax", "Slice", "Gather",
        "Unsqueeze", "Squeeze", "LayerNormalization", "Greater", "Where", "Conv", "MaxPool",
        "AveragePool",
    }  # fmt: skip
