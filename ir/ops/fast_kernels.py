"""numpy kernels for the ops every model is full of: elementwise math, MatMul, data movement.

Why: the `onnx.reference` kernels are right but each one costs a `ReferenceEvaluator` to prepare
(about 0.3 ms per node), which dominates constant folding and interpreting big graphs made of
cheap nodes. These kernels are one numpy call each, prepared in microseconds. Each follows the ONNX
spec for the dtypes it accepts and hands every other case (integer division, exotic attributes,
old opsets) to the reference kernel, so semantics never drift: the conformance suite runs both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from graphopt.ir.core import Node
from graphopt.ir.ops.onnx_kernels import onnx_reference_kernel
from graphopt.ir.registry import Kernel, KernelEnv, register_kernel
from graphopt.ir.types import DType, TensorType

FLOATS = (np.float16, np.float32, np.float64)


def _all_float_inputs(node: Node, env: KernelEnv) -> bool:
    types = env.input_types(node)
    return all(
        isinstance(t, TensorType) and t.dtype in (DType.FLOAT, DType.FLOAT16, DType.DOUBLE)
        for t, v in zip(types, node.inputs, strict=True)
        if v is not None
    ) and bool(types)


def _elementwise(op: str, function: Callable[..., Any], *, variadic: bool = False) -> None:
    """Register `function` (numpy, broadcasting) for `op`; non-float inputs use the reference."""

    def factory(node: Node, env: KernelEnv) -> Kernel:
        if node.attrs or not _all_float_inputs(node, env):
            return onnx_reference_kernel(node, env)

        def run(*args: np.ndarray) -> np.ndarray:
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                result = functools.reduce(function, args) if variadic else function(*args)
            return np.asarray(result, dtype=args[0].dtype)

        return run

    register_kernel(op, since=7)(factory)


BINARY: dict[str, Callable[..., Any]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
}  # fmt: skip
UNARY: dict[str, Callable[..., Any]] = {
    "Neg": np.negative, "Abs": np.abs, "Exp": np.exp, "Log": np.log, "Sqrt": np.sqrt,
    "Tanh": np.tanh, "Reciprocal": np.reciprocal, "Floor": np.floor, "Ceil": np.ceil,
    "Sin": np.sin, "Cos": np.cos,
    "Relu": lambda x: np.maximum(x, 0),
    "Sigmoid": lambda x: 1 / (1 + np.exp(-x)),
}  # fmt: skip
for _name, _function in {**BINARY, **UNARY}.items():
    _elementwise(_name, _function)
for _name, _function in {"Max": np.maximum, "Min": np.minimum, "Sum": np.add}.items():
    _elementwise(_name, _function, variadic=True)


@register_kernel("Identity")
def identity_kernel(node: Node, env: KernelEnv) -> Kernel:
    return lambda x: x  # tensors, sequences and optionals alike


@register_kernel("MatMul")
def matmul_kernel(node: Node, env: KernelEnv) -> Kernel:
    if not _all_float_inputs(node, env):
        return onnx_reference_kernel(node, env)
    return lambda a, b: np.matmul(a, b)


def _static_ints(node: Node, env: KernelEnv) -> bool:
    return all(
        isinstance(t, TensorType) and t.dtype in (DType.INT64, DType.INT32)
        for t in env.input_types(node)
    )


@register_kernel("Shape", since=15)
def shape_kernel(node: Node, env: KernelEnv) -> Kernel:
    start = node.get_attr("start", 0)
    end = node.get_attr("end", None)

    def run(x: np.ndarray) -> np.ndarray:
        dims = np.asarray(x.shape, dtype=np.int64)
        rank = len(dims)
        lo = min(max(start + rank if start < 0 else start, 0), rank)
        hi = rank if end is None else min(max(end + rank if end < 0 else end, 0), rank)
        return dims[lo:hi]

    return run


@register_kernel("Transpose")
def transpose_kernel(node: Node, env: KernelEnv) -> Kernel:
    perm = node.get_attr("perm")
    return lambda x: np.transpose(x, perm if perm is not None else None)


@register_kernel("Reshape", since=14)
def reshape_kernel(node: Node, env: KernelEnv) -> Kernel:
    allow_zero = bool(node.get_attr("allowzero", 0))

    def run(x: np.ndarray, shape: np.ndarray) -> np.ndarray:
        target = [int(d) for d in shape]
        if not allow_zero:
            target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
        return x.reshape(target)

    return run


@register_kernel("Unsqueeze", since=13)
def unsqueeze_kernel(node: Node, env: KernelEnv) -> Kernel:
    def run(x: np.ndarray, axes: np.ndarray) -> np.ndarray:
        axes = np.atleast_1d(axes)
        rank = x.ndim + len(axes)
        return np.expand_dims(x, tuple(sorted(int(a) + rank if a < 0 else int(a) for a in axes)))

    return run


@register_kernel("Squeeze", since=13)
def squeeze_kernel(node: Node, env: KernelEnv) -> Kernel:
    def run(x: np.ndarray, axes: np.ndarray | None = None) -> np.ndarray:
        if axes is None:
            return np.squeeze(x)
        axes = np.atleast_1d(axes)
        return np.squeeze(x, tuple(int(a) + x.ndim if a < 0 else int(a) for a in axes))

    return run


@register_kernel("Concat", since=4)
def concat_kernel(node: Node, env: KernelEnv) -> Kernel:
    axis = int(node.get_attr("axis"))
    return lambda *xs: np.concatenate(xs, axis=axis)


@register_kernel("Gather", since=13)
def gather_kernel(node: Node, env: KernelEnv) -> Kernel:
    axis = int(node.get_attr("axis", 0))

    def run(x: np.ndarray, indices: np.ndarray) -> np.ndarray:
        a = axis + x.ndim if axis < 0 else axis
        indices = np.where(indices < 0, indices + x.shape[a], indices)
        return np.take(x, indices, axis=a)

    return run


@register_kernel("GatherElements")
def gather_elements_kernel(node: Node, env: KernelEnv) -> Kernel:
    """np.take_along_axis (`onnx.reference`'s version fails on axes wider than 64)."""
    axis = int(node.get_attr("axis", 0))

    def run(x: np.ndarray, indices: np.ndarray) -> np.ndarray:
        a = axis + x.ndim if axis < 0 else axis
        indices = np.where(indices < 0, indices + x.shape[a], indices)
        return np.take_along_axis(x, indices.astype(np.int64), axis=a)

    return run
