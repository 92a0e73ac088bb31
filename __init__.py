"""graphopt: a compiler-style graph optimizer for neural networks.

The public API is four functions (see `graphopt.api`):

    model = graphopt.load("model.onnx")
    model = graphopt.optimize(model, passes="O1")
    graphopt.save(model, "out.onnx")
    outputs = graphopt.run(model, {"x": x}, backend="reference")

They are imported on first use, so `import graphopt.ir` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "load", "save", "run", "optimize", "distill", "from_torch", "from_graphsurgeon",
    "to_graphsurgeon",
]  # fmt: skip
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        from graphopt import api

        return getattr(api, name)
    raise AttributeError(f"module 'graphopt' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
