"""Kernels, inference and costs for ONNX Runtime contrib ops (`com.microsoft`) that fusion passes
emit for `--target onnxruntime`: the GELU family (written by `fuse-bias-gelu`) and FusedConv
(written by `fuse-conv-activation`).

- `Gelu(X)`: `0.5 * X * (1 + erf(X / sqrt(2)))`, the exact GELU.
- `BiasGelu(A, B)`: `Gelu(A + B)`, B 1-D over A's last axis.
- `FastGelu(X[, bias])`: the tanh approximation of GELU of `X + bias`:
  `0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))`.
- `FusedConv(X, W[, B[, Z]])`: `activation(Conv(X, W, B) + Z)` with Conv's attributes and
  `activation` one of Relu, Tanh, Sigmoid, LeakyRelu (`activation_params` = [alpha]), Clip
  ([min, max]) or HardSigmoid ([alpha, beta]): the activations ONNX Runtime's CPU kernel accepts
  (`contrib_ops/cpu/fused_activation.cc`; anything else fails at session creation). The CPU kernel
  runs float32 only.

The kernels compute in float64 and return the input's dtype; the tests compare each with ONNX
Runtime's own kernel on random inputs. The convolution reuses graphopt's Conv kernel
(`graphopt.ir.ops.nn`), and FusedConv's type inference is Conv's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from graphopt.ir.core import Node
from graphopt.ir.errors import GraphoptError, InvalidGraphError
from graphopt.ir.ops.costs import conv_cost, io_bytes, numel
from graphopt.ir.ops.nn import conv_kernel
from graphopt.ir.ops.shape_rules import broadcast
from graphopt.ir.registry import (
    REGISTRY,
    Cost,
    InferenceInputs,
    Kernel,
    KernelEnv,
    register_cost,
    register_inference,
    register_kernel,
)
from graphopt.ir.types import TensorType, Type

__all__ = [
    "FUSED_CONV_ACTIVATIONS",
    "activation_function",
    "erf",
    "gelu_erf",
    "gelu_tanh",
]

GELU = "com.microsoft.Gelu"
BIAS_GELU = "com.microsoft.BiasGelu"
FAST_GELU = "com.microsoft.FastGelu"
FUSED_CONV = "com.microsoft.FusedConv"

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715

# activation -> number of `activation_params` ONNX Runtime's CPU FusedConv reads
FUSED_CONV_ACTIVATIONS: dict[str, int] = {
    "Relu": 0, "Tanh": 0, "Sigmoid": 0, "LeakyRelu": 1, "Clip": 2, "HardSigmoid": 2,
}  # fmt: skip


def erf(x: np.ndarray) -> np.ndarray:
    """erf of a float64 array (scipy's vectorized erf when installed, else math.erf per element)."""
    try:
        from scipy.special import erf as scipy_erf
    except ImportError:  # pragma: no cover - scipy is optional
        return np.vectorize(math.erf, otypes=[np.float64])(x)
    return np.asarray(scipy_erf(x), dtype=np.float64)


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """0.5 * x * (1 + erf(x / sqrt(2))), in float64."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))), in float64."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + np.tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)))


def _with_bias(x: np.ndarray, bias: np.ndarray | None, node: Node) -> np.ndarray:
    if bias is None:
        return np.asarray(x, dtype=np.float64)
    if bias.ndim != 1 or x.ndim < 1 or bias.shape[0] != x.shape[-1]:
        raise GraphoptError(
            f"{node.describe()}: the bias {list(bias.shape)} is not 1-D over the last axis of "
            f"the input {list(x.shape)}"
        )
    return np.asarray(x, dtype=np.float64) + np.asarray(bias, dtype=np.float64)


@register_kernel(GELU)
def gelu_kernel(node: Node, env: KernelEnv) -> Kernel:
    return lambda x: gelu_erf(x).astype(x.dtype)


@register_kernel(BIAS_GELU)
def bias_gelu_kernel(node: Node, env: KernelEnv) -> Kernel:
    return lambda a, b: gelu_erf(_with_bias(a, b, node)).astype(a.dtype)


@register_kernel(FAST_GELU)
def fast_gelu_kernel(node: Node, env: KernelEnv) -> Kernel:
    def run(x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        return gelu_tanh(_with_bias(x, bias, node)).astype(x.dtype)

    return run


def _gelu_inference(node: Node, inputs: InferenceInputs) -> list[Type | None]:
    """The output has the input's type; a bias must be 1-D over its last axis, same dtype."""
    x = inputs.types[0] if inputs.types else None
    bias = inputs.types[1] if len(inputs.types) > 1 else None
    if not isinstance(x, TensorType):
        return [None]
    if isinstance(bias, TensorType):
        if bias.dtype != x.dtype:
            raise InvalidGraphError(
                f"{node.describe()}: the input is {x.dtype.name}, the bias {bias.dtype.name}"
            )
        if bias.shape is not None and len(bias.shape) != 1:
            raise InvalidGraphError(f"{node.describe()}: the bias must be 1-D")
        if x.shape is not None and bias.shape is not None and len(bias.shape) == 1:
            last, length = (x.shape[-1] if x.shape else None), bias.shape[0]
            if not x.shape or (
                isinstance(last, int) and isinstance(length, int) and last != length
            ):
                raise InvalidGraphError(
                    f"{node.describe()}: the bias {list(bias.shape)} does not fit the input's "
                    f"last axis {list(x.shape)}"
                )
    return [x]


def _gelu_cost(weight: int) -> Callable[[Node, list[Type | None], list[Type | None]], Cost]:
    def cost(node: Node, inputs: list[Type | None], outputs: list[Type | None]) -> Cost:
        out, exact = numel(outputs[0] if outputs else None)
        has_bias = len(inputs) > 1 and inputs[1] is not None
        moved, exact_bytes = io_bytes(inputs, outputs)
        return Cost(out * (weight + has_bias), moved, exact and exact_bytes)

    return cost


for _op in (GELU, BIAS_GELU, FAST_GELU):
    register_inference(_op)(_gelu_inference)
register_cost(GELU)(_gelu_cost(10))
register_cost(BIAS_GELU)(_gelu_cost(10))
register_cost(FAST_GELU)(_gelu_cost(10))


def activation_function(name: str, params: Sequence[float]) -> Callable[[np.ndarray], np.ndarray]:
    """The elementwise function FusedConv applies for `activation=name` (float64 in and out);
    raises GraphoptError for an activation ONNX Runtime's CPU kernel does not accept or a wrong
    number of parameters."""
    count = FUSED_CONV_ACTIVATIONS.get(name)
    if count is None:
        raise GraphoptError(
            f"FusedConv activation '{name}' is not one ONNX Runtime's CPU kernel runs "
            f"({', '.join(FUSED_CONV_ACTIVATIONS)})"
        )
    if len(params) != count:
        raise GraphoptError(
            f"FusedConv activation '{name}' takes {count} activation_params, got {len(params)}"
        )
    if name == "Relu":
        return lambda y: np.maximum(y, 0.0)
    if name == "Tanh":
        return np.tanh
    if name == "Sigmoid":
        return lambda y: np.exp(-np.logaddexp(0.0, -y))
    if name == "LeakyRelu":
        alpha = float(params[0])
        return lambda y: np.where(y >= 0, y, alpha * y)
    if name == "Clip":
        low, high = float(params[0]), float(params[1])
        return lambda y: np.minimum(np.maximum(y, low), high)
    alpha, beta = float(params[0]), float(params[1])  # HardSigmoid
    return lambda y: np.clip(alpha * y + beta, 0.0, 1.0)


def _activation(node: Node) -> Callable[[np.ndarray], np.ndarray]:
    name = node.get_attr("activation", None)
    if name is None:
        return lambda y: y
    if isinstance(name, bytes):
        name = name.decode()
    params = list(node.get_attr("activation_params", None) or [])
    try:
        return activation_function(str(name), params)
    except GraphoptError as error:
        raise GraphoptError(f"{node.describe()}: {error}") from None


@register_kernel(FUSED_CONV)
def fused_conv_kernel(node: Node, env: KernelEnv) -> Kernel:
    conv = conv_kernel(node, env)  # reads only Conv's attributes
    activation = _activation(node)

    def run(
        x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, z: np.ndarray | None = None
    ) -> np.ndarray:
        y = np.asarray(conv(x.astype(np.float64), w.astype(np.float64), b), dtype=np.float64)
        if z is not None:
            y = y + z
        return np.asarray(activation(y)).astype(x.dtype)

    return run


def _conv_node(node: Node) -> Node:
    """A detached Conv node with FusedConv's first three inputs and Conv's attributes (nodes
    register their uses only when inserted into a graph, so this one touches nothing)."""
    attrs = {k: v for k, v in node.attrs.items() if k not in ("activation", "activation_params")}
    return Node("Conv", node.inputs[:3], attrs, name=node.name)


@register_inference(FUSED_CONV)
def fused_conv_inference(node: Node, inputs: InferenceInputs) -> list[Type | None]:
    _activation(node)  # an activation ORT cannot run is an error here, not at run time
    entry = REGISTRY.lookup("Conv", inputs.opset(""))
    if entry is None or entry.infer is None:  # pragma: no cover - Conv is always known
        return [None]
    conv_inputs = InferenceInputs(
        inputs.types[:3], lambda: list(inputs.constants[:3]), inputs.opset_imports
    )
    out = entry.infer(_conv_node(node), conv_inputs)[0]
    z = inputs.types[3] if len(inputs.types) > 3 else None
    if isinstance(out, TensorType) and isinstance(z, TensorType):
        if z.dtype != out.dtype:
            raise InvalidGraphError(f"{node.describe()}: Z is {z.dtype.name}, X {out.dtype.name}")
        if out.shape is not None and z.shape is not None and z.shape != out.shape:
            merged = broadcast([out.shape, z.shape])
            if merged is None or merged != out.shape:
                raise InvalidGraphError(
                    f"{node.describe()}: Z {list(z.shape)} does not fit the output "
                    f"{list(out.shape)}"
                )
    return [out]


@register_cost(FUSED_CONV)
def fused_conv_cost(node: Node, inputs: list[Type | None], outputs: list[Type | None]) -> Cost:
    """Conv's cost, plus per output element the Z addition and a few FLOPs of activation."""
    base = conv_cost(node, inputs[:3], outputs)
    out, exact = numel(outputs[0] if outputs else None)
    extra = (len(inputs) > 3 and inputs[3] is not None) + (4 if node.get_attr("activation") else 0)
    z_bytes, _ = io_bytes(inputs[3:], [])
    return Cost(base.flops + out * extra, base.bytes + z_bytes, base.exact and exact)
