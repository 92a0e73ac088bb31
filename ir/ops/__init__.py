"""graphopt's op table contents: defaults for standard ONNX ops and graphopt's own kernels.

Importing this package registers everything with `graphopt.ir.registry.REGISTRY`; the registry
imports it on first lookup, so users never need to.
"""

from graphopt.ir.ops import (
    attention,
    contrib_activations,
    contrib_attention,
    contrib_dynamic_quant,
    contrib_matmul,
    contrib_norms,
    contrib_quant,
    control_flow,
    costs,
    fast_kernels,
    legacy,
    nn,
    normalization,
    onnx_inference,
    onnx_kernels,
)

__all__ = [
    "attention",
    "contrib_activations",
    "contrib_attention",
    "contrib_dynamic_quant",
    "contrib_matmul",
    "contrib_norms",
    "contrib_quant",
    "control_flow",
    "legacy",
    "costs",
    "fast_kernels",
    "nn",
    "normalization",
    "onnx_inference",
    "onnx_kernels",
]
