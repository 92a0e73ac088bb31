"""How the int8 passes run: the rewrite, wrapped in what every one of them shares.

quantize-static, quantize-dynamic and quantize-weights each implement `quantize(model, context)`
(the rewrite, recording each layer it quantizes with `quant_report.record_layer`) and delegate
`run` to `run_quantization`, which adds, in order:

1. the accuracy budget (`mixed_precision.py`), when `max-accuracy-drop` is set on the pass or the
   run: it decides which layers stay float before the model is rewritten;
2. the measured figures of the per-layer report (`quant_report.measure_layers`: clipping, SNR),
   when the run has calibration data: a copy of the float model is kept for the comparison;
3. for the passes that compute in int8 (static, dynamic), a warning when the target CPU has no
   fast int8 instructions (`cpu_features.py`): the quantized model may well be slower than fp32.

A one-shot iterable of calibration samples is materialized once (into `context.calibration`),
since the budget and the report read the data more than once.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Any

from graphopt.ir.core import Model
from graphopt.ir.errors import GraphoptError
from graphopt.passes.manager import PassContext
from graphopt.passes.quantization.mixed_precision import (
    QuantizationPass,
    accuracy_budget,
    quantize_within_budget,
)
from graphopt.passes.quantization.model_copy import copy_model
from graphopt.passes.quantization.quant_report import TOPIC, measure_layers, report_for

__all__ = ["run_quantization"]

SLOW_INT8_HINT = (
    "int8 matmul/conv may run slower than fp32 here; alternatives: quantize-weights (weight-only: "
    "smaller model, float compute), convert-float16, or keeping layers float (exclude=..., "
    "max-accuracy-drop=...)"
)


def run_quantization(
    pass_: QuantizationPass, model: Model, context: PassContext, *, int8_compute: bool
) -> bool:
    """Run `pass_.quantize` on `model` with the budget, the report and the CPU check."""
    budget = accuracy_budget(pass_, context)
    data = _samples(context)
    if budget is not None and data is None:
        raise GraphoptError(
            f"max-accuracy-drop={budget:g} needs calibration data to measure the drop on",
            hint="pass --calibration calib.npz (or random:N for a quick try); from Python, "
            "graphopt.optimize(model, passes, calibration=feeds)",
        )
    report = report_for(context)
    first_layer = len(report.layers)
    float_model = copy_model(model) if data is not None else None
    if budget is not None:
        assert data is not None
        changed = quantize_within_budget(pass_, model, context, budget, data)
    else:
        changed = pass_.quantize(model, context)
    layers = report.layers[first_layer:]
    if layers and float_model is not None and data is not None:
        measure_layers(float_model, model, layers, data)
        label = getattr(data, "label", f"{len(data)} calibration samples")
        report.calibration = report.calibration or label
    if not report.layers and not report.budgets:
        del context.artifacts[TOPIC]  # nothing quantized in this run (yet): no report
    if layers and int8_compute and not report.cpu.fast_int8:
        context.note(f"{len(layers)} layers quantized for int8 compute on a CPU without fast int8 "
                     f"({report.cpu.describe()}): {SLOW_INT8_HINT}", kind="warning")  # fmt: skip
    return changed


def _samples(context: PassContext) -> Any:
    """The run's calibration data as something that can be read more than once (or None)."""
    data = context.calibration
    if data is not None and not isinstance(data, Sized):
        data = context.calibration = list(data)
    return data
