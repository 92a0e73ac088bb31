"""Model inputs for runs and checks: seeded random feeds from the input types, or `.npz` files.

Random feeds follow each input's type: floats from a standard normal, integers in [0, 10) (small
enough to be valid indices for most embeddings and gathers), bools at random. Symbolic dims take the
value given in `dims` (e.g. `{"batch": 2}`), else 1; unknown dims take 1.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from graphopt.ir.core import Graph, Model, Value
from graphopt.ir.errors import GraphoptError
from graphopt.ir.types import DType, TensorType


def runtime_inputs(graph: Graph) -> list[Value]:
    """The graph inputs a caller must feed (inputs with an initializer default are optional)."""
    return [v for v in graph.inputs if v.const_value is None]


def random_feeds(
    model: Model | Graph, *, seed: int = 0, dims: Mapping[str, int] | None = None
) -> dict[str, np.ndarray]:
    graph = model.graph if isinstance(model, Model) else model
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    feeds: dict[str, np.ndarray] = {}
    for value in runtime_inputs(graph):
        t = value.type
        if not isinstance(t, TensorType):
            raise GraphoptError(
                f"input %{value.name} has type {t}; random feeds cover tensors only",
                hint="pass the inputs in an .npz file (--inputs)",
            )
        shape = tuple(
            d if isinstance(d, int) else dims.get(d, 1) if isinstance(d, str) else 1
            for d in (t.shape or ())
        )
        feeds[value.name or ""] = _random_array(rng, t.dtype, shape)
    return feeds


def _random_array(rng: np.random.Generator, dtype: DType, shape: tuple[int, ...]) -> np.ndarray:
    if dtype is DType.BOOL:
        return rng.random(shape) < 0.5
    if dtype is DType.STRING:
        return np.array([f"s{i}" for i in range(int(np.prod(shape)))], dtype=object).reshape(shape)
    if dtype.is_integer:
        return rng.integers(0, 10, size=shape).astype(dtype.numpy)
    if dtype.is_float or dtype in (DType.COMPLEX64, DType.COMPLEX128):
        return rng.standard_normal(shape).astype(np.float32).astype(dtype.numpy)
    raise GraphoptError(f"cannot make random data of element type {dtype.short_name}")


def load_feeds(path: str | os.PathLike[str], model: Model) -> dict[str, np.ndarray]:
    """Inputs from an `.npz` file, checked against the model's input names."""
    try:
        with np.load(path, allow_pickle=False) as data:
            feeds = {name: data[name] for name in data.files}
    except (OSError, ValueError) as error:
        raise GraphoptError(f"cannot read inputs: {error}", where=os.fspath(path)) from None
    expected = {v.name or "" for v in runtime_inputs(model.graph)}
    known = {v.name or "" for v in model.graph.inputs}
    unknown = sorted(set(feeds) - known)
    missing = sorted(expected - set(feeds))
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if unknown:
            parts.append(f"not inputs of the model: {', '.join(unknown)}")
        raise GraphoptError(
            "; ".join(parts),
            where=os.fspath(path),
            hint=f"the model's inputs are: {', '.join(sorted(n for n in known if n))}",
        )
    return feeds
