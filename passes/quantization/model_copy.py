"""An independent copy of a model, for passes that measure a rewrite against the original.

The mixed-precision search quantizes many copies of the float model, and the quantization report
compares the quantized model with a float copy taken before the rewrite. `copy.deepcopy` cannot
do it: the IR keeps nodes in a linked list, so deepcopy recurses once per node and overflows
Python's stack on real models. The copy goes through ONNX instead (`to_onnx`, then `from_onnx`),
which keeps node names, value names, initializers, subgraphs and opsets as they are (weights are
copied as raw bytes: about 2 s per 500 MB).
"""

from __future__ import annotations

from graphopt.ir.core import Model

__all__ = ["copy_model"]


def copy_model(model: Model) -> Model:
    """A copy of `model` sharing nothing with it."""
    from graphopt.backends.onnx import to_onnx
    from graphopt.frontends.onnx import from_onnx

    return from_onnx(to_onnx(model))
