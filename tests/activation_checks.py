"""Shared checks of the activation-fusion tests (test_fuse_activations.py,
test_fuse_conv_activations.py): run a pass and compare outputs before and after in graphopt's
interpreter and ONNX Runtime; assert a refusal; build single-op models; the zoo's models with
random biases."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

import graphopt
from graphopt.backends.onnx import to_onnx
from graphopt.backends.reference import Interpreter
from graphopt.ir import Builder, DType, Graph, Model, TensorType, parse_model, print_model
from graphopt.passes import optimize_model

EXPORTERS = ["dynamo", "torchscript"]


def ort_run(model: Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        to_onnx(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def close(expected: dict[str, Any], actual: dict[str, Any], rtol: float = 1e-4) -> None:
    """Max abs diff within rtol of each output's scale."""
    assert list(expected) == list(actual)
    for name, e in expected.items():
        e, a = np.asarray(e, np.float64), np.asarray(actual[name], np.float64)
        assert a.shape == e.shape, name
        finite = np.isfinite(e)
        np.testing.assert_array_equal(a[~finite], e[~finite], err_msg=name)  # -inf of pools
        e, a = e[finite], a[finite]
        scale = max(float(np.abs(e).max(initial=0.0)), 1e-6)
        assert float(np.abs(a - e).max(initial=0.0)) <= rtol * scale, name


def feeds_of(model: Model, seed: int = 0, spread: float = 3.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        assert isinstance(value.type, TensorType) and value.type.shape is not None
        shape = tuple(d if isinstance(d, int) else 3 for d in value.type.shape)
        feeds[value.name] = (rng.standard_normal(shape) * spread).astype(value.type.dtype.numpy)
    return feeds


def ops(model: Model) -> list[str]:
    """The ops left, Constant nodes aside (the rewrite engine leaves dead Constant nodes to
    eliminate-dead-code, as it does dead initializers)."""
    return [n.op for n in model.graph if n.op != "Constant"]


def fuse(
    model: Model, passes: str, target: str = "onnx", *, check_ort: bool = True, rtol: float = 1e-4
) -> tuple[Model, list[str]]:
    """Run `passes` on a copy of `model`; outputs equal before and after in the interpreter (and
    in ONNX Runtime). Returns the result and the refusal messages."""
    feeds = feeds_of(model)
    expected = Interpreter(model).run(feeds)
    expected_ort = ort_run(model, feeds) if check_ort else {}
    result = optimize_model(
        parse_model(print_model(model)), passes, target=target, verify_each=True
    )
    close(expected, Interpreter(result.model).run(feeds), rtol)
    if check_ort:
        close(expected_ort, ort_run(result.model, feeds), rtol)
    return result.model, [n.message for n in result.notes if n.kind in ("refused", "info")]


def refused(model: Model, passes: str, reason: str, target: str = "onnx") -> None:
    """The pass leaves the graph as it was and the report says why."""
    before = print_model(model)
    result = optimize_model(parse_model(before), passes, target=target)
    assert print_model(result.model) == before
    notes = [n.message for n in result.notes]
    assert any(reason in note for note in notes), notes


def text_model(body: str, opset: int = 20) -> Model:
    return parse_model(f'model opset={{"": {opset}}}\n{body}')


def single_op(op: str, inputs: list[np.ndarray], **attrs: Any) -> Model:
    graph = Graph("g")
    b = Builder(graph)
    values = [
        graph.add_input(f"i{k}", TensorType(DType.FLOAT, a.shape)) for k, a in enumerate(inputs)
    ]
    graph.set_outputs([b.op(op, *values, **attrs)])
    return optimize_model(
        Model(graph, opset_imports={"": 20, "com.microsoft": 1}), "infer-shapes"
    ).model


def with_biases(path: object) -> Model:
    """The export with the zero bias vectors of its Add/Gemm nodes made random (transformers
    initialises biases to zero, and O1 removes an Add of zeros: no bias would be left to fuse).
    TorchScript shares equal initializers through Identity nodes: those are followed."""
    proto = onnx.load(str(path))
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in arrays:
            arrays[node.output[0]] = arrays[node.input[0]]
    rng = np.random.default_rng(0)
    for node in proto.graph.node:
        for index, name in enumerate(node.input if node.op_type in ("Add", "Gemm") else []):
            array = arrays.get(name)
            if array is None or array.ndim != 1 or array.dtype != np.float32 or array.any():
                continue
            fresh = f"{name}_random_{len(proto.graph.initializer)}"
            values = (rng.standard_normal(array.shape) * 0.1).astype(np.float32)
            proto.graph.initializer.append(onnx.numpy_helper.from_array(values, fresh))
            node.input[index] = fresh
    return graphopt.load(proto)


def zoo_fuse(
    model: Model, name: str, passes: str, target: str = "onnx"
) -> collections.Counter[str]:
    from models import sample_inputs

    feeds = sample_inputs(name, batch=2, sequence=8) if name != "resnet" else sample_inputs(name)
    expected = ort_run(model, feeds)
    result = optimize_model(model, passes, target=target)
    close(expected, ort_run(result.model, feeds))
    return collections.Counter(ops(result.model))
