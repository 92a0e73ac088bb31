"""Mixed precision under an accuracy budget: keep the layers that hurt most in float.

`max-accuracy-drop=X` (a pass option of quantize-static, quantize-dynamic and quantize-weights,
or `--max-accuracy-drop X` for the whole run, stored as `context.options["max_accuracy_drop"]`)
bounds how far the quantized model may move from the float one on the calibration data:

    drop = max over calibration samples s and float outputs o of  1 - cos(q_o(s), f_o(s))

with f the float model's output, q the quantized model's, both flattened, cos in float64 (two
all-zero tensors agree: cos = 1; a non-finite q counts as the worst drop, 2). Non-float outputs
(ids, masks) are compared elsewhere and ignored here. X is in [0, 1); 0 keeps every layer float.

The search, with the reference interpreter, on copies of the float model, so that the model
itself is rewritten once, at the end:

1. quantize everything the pass would quantize; if the drop is within X, that is the result;
2. else measure each layer's contribution: the drop of the model with that layer alone
   quantized (one run per layer);
3. keep the worst layer float, re-quantize the rest and re-measure the whole model; repeat with
   the next worst until the drop is within X (at most one run per layer). Once every layer is
   float, the drop is 0, so the budget is always met; if that is the only way, the pass leaves
   the model float and says so.

So at most 2N + 1 runs of the pass and of the model on the calibration data for N layers.
quantize-static calibrates the float model in every run; a value's range does not depend on
which layers are excluded, so the runs share one set of ranges (`_share_ranges`). Each layer
kept float gets a note with its contribution; the decision goes into the quantization report
(`quant_report.BudgetResult`). Layers are named by node name; unnamed MatMul/Gemm/Conv nodes (and
nodes sharing a name) are given unique names first, so that `exclude` can address them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import numpy as np

from graphopt.ir.core import Graph, Model
from graphopt.ir.errors import GraphoptError
from graphopt.passes.manager import PassContext
from graphopt.passes.quantization.model_copy import copy_model
from graphopt.passes.quantization.quant_report import BudgetResult, report_for

__all__ = ["OPTION", "QuantizationPass", "accuracy_budget", "check_budget", "output_drop",
           "quantize_within_budget"]  # fmt: skip

OPTION = "max_accuracy_drop"  # the key in context.options (the command line's --max-accuracy-drop)
LAYER_OPS = ("MatMul", "Gemm", "Conv")
Feeds = Mapping[str, np.ndarray]


class QuantizationPass(Protocol):
    """What the budget needs of a pass: its name, an `exclude` option it honours, the budget
    option, and `quantize`, the rewrite itself (recording layers with `quant_report`)."""

    name: ClassVar[str]
    exclude: tuple[str, ...]
    max_accuracy_drop: float | None

    def quantize(self, model: Model, context: PassContext) -> bool: ...


def check_budget(value: Any, where: str = "max-accuracy-drop") -> float:
    """`value` as a budget in [0, 1), else a GraphoptError naming `where`."""
    try:
        budget = float(value)
    except (TypeError, ValueError):
        budget = math.nan
    if not 0.0 <= budget < 1.0:
        raise GraphoptError(
            f"{where} must be a number in [0, 1), not {value!r}",
            hint="it bounds 1 - cosine similarity of the outputs vs the float model, e.g. 0.01",
        )
    return budget


def accuracy_budget(pass_: QuantizationPass, context: PassContext) -> float | None:
    """The pass's budget: its own option, else the run's `--max-accuracy-drop`, else None."""
    if pass_.max_accuracy_drop is not None:
        return check_budget(pass_.max_accuracy_drop, f"{pass_.name}{{max-accuracy-drop}}")
    value = context.options.get(OPTION)
    return None if value is None else check_budget(value, "max-accuracy-drop (the run's option)")


Outputs = Sequence[Sequence[np.ndarray]]  # per sample, the model's outputs in order


def output_drop(reference: Outputs, outputs: Outputs) -> float:
    """The worst 1 - cosine over samples and float outputs (see the module docstring)."""
    worst = 0.0
    for expected_outputs, actual_outputs in zip(reference, outputs, strict=True):
        for expected, actual in zip(expected_outputs, actual_outputs, strict=True):
            if np.asarray(expected).dtype.kind != "f":
                continue
            f = np.asarray(expected, np.float64).ravel()
            q = np.asarray(actual, np.float64).ravel()
            if not np.all(np.isfinite(q)):
                return 2.0
            norms = np.linalg.norm(f) * np.linalg.norm(q)
            if norms == 0:
                cosine = 1.0 if not f.any() and not q.any() else 0.0
            else:
                cosine = float(np.clip(f @ q / norms, -1.0, 1.0))
            worst = max(worst, 1.0 - cosine)
    return worst


def quantize_within_budget(
    pass_: QuantizationPass, model: Model, context: PassContext, budget: float,
    samples: Sequence[Feeds],
) -> bool:  # fmt: skip
    """Quantize `model` with `pass_`, keeping the most harmful layers float, one at a time, until
    the drop on `samples` is within `budget`; see the module docstring."""
    _name_layers(model)
    trials = _Trials(pass_, model, context, samples)
    everything, drop_all = trials.measure(())
    if not everything:  # nothing to quantize: let the pass say why
        return pass_.quantize(model, context)
    alone: dict[str, float] = {}
    kept: list[str] = []
    drop = drop_all
    if drop_all > budget:
        for layer in everything:
            alone[layer] = trials.measure(tuple(other for other in everything if other != layer))[1]
        for layer in sorted(everything, key=lambda name: -alone[name]):
            kept.append(layer)
            drop = 0.0 if len(kept) == len(everything) else trials.measure(tuple(kept))[1]
            if drop <= budget:
                break
    result = BudgetResult(
        pass_.name, budget, drop, drop_all, len(samples), len(everything),
        {layer: alone[layer] for layer in kept},
    )  # fmt: skip
    report_for(context).budgets.append(result)
    nodes = {node.name: node for graph in _graphs(model) for node in graph}
    for rank, layer in enumerate(kept, 1):
        context.refuse(
            nodes[layer],
            f"kept float for max-accuracy-drop={budget:g}: quantized alone it drops the outputs' "
            f"cosine by {alone[layer]:.3g} (the {_ordinal(rank)} worst of {len(everything)} "
            "layers)",
        )  # fmt: skip
    metric = f"1 - cosine vs float, worst over outputs and {len(samples)} calibration samples"
    if len(kept) == len(everything):
        context.note(
            f"max-accuracy-drop={budget:g} cannot be met with any layer quantized (all "
            f"{len(everything)} quantized: drop {drop_all:.3g}; the least sensitive layer alone: "
            f"{min(alone.values()):.3g}; {metric}): the model stays float",
            kind="warning",
        )  # fmt: skip
        return False
    context.note(
        f"max-accuracy-drop={budget:g}: {len(kept)} of {len(everything)} layers kept float, drop "
        f"{drop:.3g} ({metric}; all quantized: {drop_all:.3g})",
    )  # fmt: skip
    final = trials.configured(tuple(kept))
    first_note = len(context.notes)
    changed = final.quantize(model, context)
    # the layers kept float were refused again by `exclude`: their note above says why
    kept_nodes = {nodes[layer].describe() for layer in kept}
    context.notes[first_note:] = [
        n for n in context.notes[first_note:] if not (n.kind == "refused" and n.node in kept_nodes)
    ]
    return changed


class _Trials:
    """Quantizes copies of the float model with some layers excluded and measures the drop."""

    def __init__(self, pass_: QuantizationPass, model: Model, context: PassContext,
                 samples: Sequence[Feeds]):  # fmt: skip
        from graphopt.backends.reference import Interpreter

        self.pass_ = pass_
        self.model = model
        self.context = context
        self.samples = samples
        self.ranges: dict[str, Any] = {}
        interpreter = Interpreter(model)
        self.reference = [list(interpreter.run(dict(feeds)).values()) for feeds in samples]

    def configured(self, excluded: tuple[str, ...]) -> QuantizationPass:
        """The pass with `excluded` layers added to its exclude option and no budget."""
        trial: QuantizationPass = dataclasses.replace(
            self.pass_,  # type: ignore[type-var]
            exclude=tuple(self.pass_.exclude) + excluded,
            max_accuracy_drop=None,
        )
        _share_ranges(trial, self.ranges)
        return trial

    def measure(self, excluded: tuple[str, ...]) -> tuple[list[str], float]:
        """(layers quantized, drop) with `excluded` kept float."""
        from graphopt.backends.reference import Interpreter

        model = copy_model(self.model)
        scratch = PassContext(model, target=self.context.target, options=dict(self.context.options),
                              calibration=self.samples)  # fmt: skip
        scratch.current_pass = self.pass_.name
        self.configured(excluded).quantize(model, scratch)
        layers = [layer.layer for layer in report_for(scratch).layers]
        interpreter = Interpreter(model)
        outputs = [list(interpreter.run(dict(feeds)).values()) for feeds in self.samples]
        return layers, output_drop(self.reference, outputs)


def _share_ranges(trial: Any, ranges: dict[str, Any]) -> None:
    """Give a pass that calibrates (`calibrate(model, data, names) -> {name: range}`) a cache
    shared by all trials: every trial calibrates the same float model on the same data."""
    original: Callable[..., dict[str, Any]] | None = getattr(trial, "calibrate", None)
    if original is None:
        return

    def calibrate(model: Model, data: Any, names: list[str]) -> dict[str, Any]:
        missing = [name for name in names if name not in ranges]
        if missing:
            ranges.update(original(model, data, missing))
        return {name: ranges[name] for name in names}

    object.__setattr__(trial, "calibrate", calibrate)


def _graphs(model: Model) -> list[Graph]:
    return [model.graph, *model.graph.nested_graphs()]


def _name_layers(model: Model) -> None:
    """Give unnamed or same-named MatMul/Gemm/Conv nodes unique names (exclude names them)."""
    taken = {node.name for graph in _graphs(model) for node in graph if node.name}
    seen: set[str] = set()
    for node in (node for graph in _graphs(model) for node in graph):
        if node.op not in LAYER_OPS:
            continue
        if not node.name or node.name in seen:
            base = node.name or f"{node.op}_{node.outputs[0].name}"
            name, index = base, 1
            while name in taken:
                name, index = f"{base}_{index}", index + 1
            node.name = name
            taken.add(name)
        seen.add(node.name)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
