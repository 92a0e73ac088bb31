"""The public API: `load`, `save`, `run`, `optimize`, and graphsurgeon interop.

Kept to one screen on purpose: each function forwards to the frontend, backend or pass manager that
does the work. `graphopt.load` etc. are these functions (re-exported lazily by the package).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphopt.ir.core import Model

__all__ = [
    "load", "save", "run", "optimize", "distill", "from_torch", "from_graphsurgeon",
    "to_graphsurgeon",
]  # fmt: skip


def load(source: str | os.PathLike[str] | bytes | Any) -> Model:
    """Read a model: an `.onnx` path, serialized bytes, an `onnx.ModelProto`, or an IR `Model`;
    also a torch `ExportedProgram` or a `.pt2` file written by `torch.export.save`.

    Weights stay memory-mapped from the file (embedded or external data), not copied.
    Raises `graphopt.ir.GraphoptError` subclasses with a message naming the file and node.
    """
    if isinstance(source, Model):
        return source
    if type(source).__name__ == "ExportedProgram" or (
        isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".pt2")
    ):
        from graphopt.frontends.torch import from_exported_program, load_exported_program

        if isinstance(source, (str, os.PathLike)):
            return load_exported_program(source)
        return from_exported_program(source)  # type: ignore[arg-type]
    from graphopt.frontends.onnx import load_onnx

    return load_onnx(source)


def save(model: Model, path: str | os.PathLike[str], *, external_data: bool | None = None) -> None:
    """Write `model` as standard ONNX, atomically (a temp file renamed into place).

    Models over 2 GB, or any model with `external_data=True`, keep their weights in `<path>.data`.
    """
    from graphopt.backends.onnx import save_onnx

    save_onnx(model, os.fspath(path), external_data=external_data)


def run(
    model: Model | str | os.PathLike[str],
    inputs: Mapping[str, np.ndarray],
    backend: str = "reference",
) -> dict[str, np.ndarray]:
    """Run `model` on `inputs` (name -> array) with `backend` (a registered backend name, see
    `graphopt backends`); returns output name -> array. A library compiled with the tvm backend
    (`model.so` with `model.json` beside it) runs as it was compiled, whatever `backend` says."""
    from graphopt.backends.base import get_backend
    from graphopt.backends.tvm import is_library, load_library

    if is_library(model):
        return load_library(model).run(dict(inputs))  # type: ignore[arg-type]
    return get_backend(backend).compile(load(model)).run(dict(inputs))


def optimize(
    model: Model | str | Any,
    passes: str | Sequence[Any] = "O1",
    *,
    target: str = "onnx",
    verify_each: bool = False,
    check_each: bool = False,
    calibration: Any = None,
    **options: Any,
) -> Model:
    """Run a pass pipeline over `model` (changed in place) and return it.

    `passes` is a pipeline string (`"fold-constants,eliminate-dead-code"`), a preset (`"O0"`..`"O3"`)
    or a list of pass names and pass objects. `calibration` is the sample data quantize-static
    calibrates on: an iterable of input dicts (name -> array). Other keyword arguments reach the
    passes as options of the run. `graphopt.passes.optimize_model` returns the per-pass report as
    well.
    """
    from graphopt.passes import optimize_model

    result = optimize_model(
        load(model), passes, target=target, verify_each=verify_each, check_each=check_each,
        options=options, calibration=calibration,
    )  # fmt: skip
    return result.model


def distill(
    student: Model | str | os.PathLike[str],
    teacher: Model | str | os.PathLike[str],
    data: Any,
    *,
    steps: int = 200,
    loss: str = "mse",
    temperature: float = 1.0,
    lr: float = 1e-3,
    outputs: Sequence[str] | None = None,
    **options: Any,
) -> Model:
    """Knowledge distillation: train `student`'s weights (torch backend, Adam) to match
    `teacher`'s outputs on `data` (input dicts, an `.npz` file or `"random:N"`), with `loss`
    "mse" or "kl" (softmax at `temperature`). Returns the student, changed in place: same graph,
    new initializer values. `graphopt.api.distillation.distill_model` also returns the report."""
    from graphopt.api.distillation import distill_model

    return distill_model(
        student, teacher, data, steps=steps, loss=loss, temperature=temperature, lr=lr,
        outputs=outputs, **options,
    ).model  # fmt: skip


def from_torch(
    module: Any, example_inputs: Any, dynamic_shapes: Any = None, **options: Any
) -> Model:
    """An IR model of a `torch.nn.Module`: `torch.export.export(module, example_inputs,
    dynamic_shapes=...)` translated from ATen (attention arrives as `Attention`, norms whole;
    weights shared with the module's tensors). See `graphopt.frontends.torch`."""
    from graphopt.frontends.torch import from_torch as convert

    return convert(module, example_inputs, dynamic_shapes, **options)


def from_graphsurgeon(graph: Any) -> Model:
    """An IR model from an onnx-graphsurgeon `Graph`."""
    from graphopt.frontends.graphsurgeon import from_graphsurgeon as convert

    return convert(graph)


def to_graphsurgeon(model: Model) -> Any:
    """An onnx-graphsurgeon `Graph` from an IR model."""
    from graphopt.frontends.graphsurgeon import to_graphsurgeon as convert

    return convert(model)
