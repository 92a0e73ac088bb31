"""Calibration: run a model on sample inputs and record the range of chosen values.

Calibration data is any iterable of input dicts (input name -> array); two sources are built in:

    data = from_npz("calib.npz")           # one array per input, samples stacked on axis 0
    data = random_feeds(model, 8, seed=0)  # seeded random inputs: quick runs only, labelled so
    ranges = calibrate(model, data, method="percentile", percentile=99.99)
    lo, hi = ranges["attn_out"]

`observe(model, data, {name: consumer})` runs the reference interpreter once per sample and hands
each watched value's array to its consumer; it is the one place calibration data goes through a
model (pruning's activation statistics use it too). `calibrate` is built on it and feeds every
watched value (by default every float tensor the main graph computes, and its float inputs) to
one observer per value (`observers.py`): one pass over the data, nothing kept but the
observers' state. The interpreter returns graph outputs only, so the watched values are made
extra outputs of the graph for the duration of the run (and the outputs restored afterwards,
also on error): no copy of the model or its weights is made. A rich progress bar shows the samples done, labelled with
the data's source (random data says so).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphopt.ir.core import Graph, Model, Value
from graphopt.ir.errors import GraphoptError
from graphopt.ir.types import TensorType
from graphopt.passes.quantization.observers import Observer, make_observer

__all__ = ["CalibrationData", "calibrate", "float_values", "from_npz", "observe", "random_feeds"]

Feeds = Mapping[str, np.ndarray]


@dataclass
class CalibrationData:
    """Samples (input dicts) with a label saying where they come from."""

    samples: Sequence[Feeds]
    label: str
    is_random: bool = False

    def __iter__(self) -> Iterator[Feeds]:
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)


class _Stacked(Sequence[Feeds]):
    """Sample i of arrays stacked on axis 0: {name: array[i]}, read on demand."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = dict(arrays)
        self.size = len(next(iter(self.arrays.values()))) if self.arrays else 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.size))]
        if not -self.size <= index < self.size:
            raise IndexError(index)
        return {name: array[index] for name, array in self.arrays.items()}


def from_npz(path: str | os.PathLike[str], model: Model | None = None) -> CalibrationData:
    """Samples from an `.npz` file holding one array per model input, samples stacked on axis
    0 (sample i is `array[i]`, so a model input of shape [1, 128] is stored as [n, 1, 128]).
    With `model`, the names are checked against its inputs."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as error:
        raise GraphoptError(
            f"cannot read calibration data: {error}", where=os.fspath(path)
        ) from None
    counts = {name: (a.shape[0] if a.ndim else 0) for name, a in arrays.items()}
    if not arrays or len(set(counts.values())) != 1 or 0 in counts.values():
        raise GraphoptError(
            f"calibration arrays must hold the same number (>= 1) of samples on axis 0, got "
            f"{counts or 'no arrays'}",
            where=os.fspath(path),
        )
    if model is not None:
        _check_names(arrays, model, os.fspath(path))
    samples = _Stacked(arrays)
    return CalibrationData(samples, f"{os.path.basename(path)} ({len(samples)} samples)")


def _check_names(arrays: Mapping[str, np.ndarray], model: Model, where: str) -> None:
    from graphopt.api.feeds import runtime_inputs

    needed = {v.name or "" for v in runtime_inputs(model.graph)}
    known = {v.name or "" for v in model.graph.inputs}
    missing, unknown = sorted(needed - set(arrays)), sorted(set(arrays) - known)
    if missing or unknown:
        raise GraphoptError(
            "; ".join(
                ([f"missing {', '.join(missing)}"] if missing else [])
                + ([f"not inputs of the model: {', '.join(unknown)}"] if unknown else [])
            ),
            where=where,
            hint=f"the model's inputs are: {', '.join(sorted(n for n in known if n))}",
        )


def random_feeds(
    model: Model, n: int, seed: int = 0, dims: Mapping[str, int] | None = None
) -> CalibrationData:
    """`n` seeded random samples from the input types (floats standard normal, integers in
    [0, 10), symbolic dims from `dims`, else 1). Not representative of real inputs: ranges
    calibrated on them are for quick runs and tests, and the label says so."""
    from graphopt.api.feeds import random_feeds as one

    samples = [one(model, seed=seed + i, dims=dims) for i in range(n)]
    return CalibrationData(samples, f"RANDOM data (seed {seed}, {n} samples)", is_random=True)


def float_values(graph: Graph) -> list[Value]:
    """The float tensors of `graph` worth calibrating: its float inputs and node outputs."""
    found = [v for v in graph.inputs if v.const_value is None]
    found += [v for node in graph for v in node.outputs]
    return [v for v in found if isinstance(v.type, TensorType) and v.type.dtype.is_float]


def calibrate(
    model: Model,
    data: Iterable[Feeds],
    values: Sequence[str] | None = None,
    method: str = "minmax",
    *,
    axes: Mapping[str, int] | None = None,
    progress: bool = True,
    **options: Any,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Value name -> (lo, hi) observed over `data`, with observers of `method` ("minmax",
    "moving-average", "percentile", "entropy", "mse"; `options` go to them). `values` names
    the values to watch (default: `float_values` of the main graph); `axes` asks for per-channel
    ranges of some of them (value name -> channel axis). Runs the reference interpreter once
    per sample; the model is left as it was."""
    watched = list(_resolve(model.graph, values))
    axes = dict(axes or {})
    observers: dict[str, Observer] = {
        name: make_observer(method, axis=axes.get(name), **options) for name in watched
    }
    observe(model, data, {name: observers[name].update for name in watched}, progress=progress)
    return {name: observer.range() for name, observer in observers.items()}


def observe(
    model: Model,
    data: Iterable[Feeds],
    consumers: Mapping[str, Callable[[np.ndarray], None]],
    *,
    progress: bool = False,
) -> None:
    """Run the reference interpreter once per sample of `data` and hand each watched value's
    array to its consumer (value name -> callable), sample by sample. Names are graph inputs or
    node outputs of the main graph. This is the one place that runs calibration data through a
    model: the watched values become extra graph outputs for the run and the outputs are restored
    afterwards (also on error); the model is otherwise left as it was."""
    from graphopt.backends.reference import Interpreter

    graph = model.graph
    watched = _resolve(graph, list(consumers))
    outputs, names = graph.outputs, list(graph.output_names)
    present = set(outputs)
    extra = [v for v in dict.fromkeys(watched.values()) if v not in present]
    position = {v: i for i, v in enumerate(outputs + extra)}
    graph.set_outputs(outputs + extra, names + [f"\0calibrate:{i}" for i in range(len(extra))])
    try:
        interpreter = Interpreter(model)
        for feeds in _with_progress(data, progress):
            results = list(interpreter.run(feeds).values())
            for name, value in watched.items():
                consumers[name](np.asarray(results[position[value]]))
    finally:
        graph.set_outputs(outputs, names)


def _resolve(graph: Graph, names: Sequence[str] | None) -> dict[str, Value]:
    if names is None:
        return {v.name or "": v for v in float_values(graph)}
    by_name = {v.name: v for v in graph.inputs}
    by_name.update((v.name, v) for node in graph for v in node.outputs)
    missing = [n for n in names if n not in by_name]
    if missing:
        raise GraphoptError(
            f"no value named {', '.join(missing)} in graph '{graph.name}'",
            hint="calibrate watches graph inputs and node outputs of the main graph",
        )
    return {n: by_name[n] for n in names}


def _with_progress(data: Iterable[Feeds], show: bool) -> Iterator[Feeds]:
    if not show:
        yield from data
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    label = getattr(data, "label", "calibration data")
    total = len(data) if isinstance(data, Sized) else None
    columns = (TextColumn("calibrating on {task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns) as bar:
        task = bar.add_task(label, total=total)
        for feeds in data:
            yield feeds
            bar.advance(task)
