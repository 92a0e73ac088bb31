"""The per-layer quantization report: what each int8 pass did to each layer, and what it cost.

The passes record every layer they quantize (`record_layer`) as a `QuantizedLayer`: its weight's
scale and zero point, and for quantize-static the activation's. When the run has calibration
data, `measure_layers` runs the float model (copied before the pass rewrote it) and the
quantized model side by side on it with the reference interpreter and adds, per layer:

- `clipping_rate`: the fraction of the values reaching the activation's QuantizeLinear that
  saturate, i.e. whose code `rint(x / scale) + zero_point` falls outside the integer type (they
  lie more than half a step beyond the representable range and are clipped to its ends),
  counted where the QuantizeLinear runs, in the quantized model. With minmax ranges it is zero
  on the calibration data where the activation is a graph input, and near zero elsewhere (the
  error of the layers before can push a few values past the calibrated range). None for
  quantize-dynamic and quantize-weights (activations quantized per run, or not at all);
- `snr_db`: the signal-to-noise ratio of the layer's output, 10 log10(sum f^2 / sum (q - f)^2)
  over all calibration samples, f the output in the float model and q the same tensor in the
  quantized model. q carries the error of every quantized layer before it too: this is the
  error a person would see at that layer, not the layer's error alone (mixed precision measures
  that). None (null) when not measured, or when there is no error at all.

Values below a range that starts at 0 (zero point = the type's minimum) do not count as clipped:
there the quantizer's clamp at 0 is intended (quantize-static folds a Relu into it), or the
calibrated value is never negative.

The results reach the user through `PassContext.artifacts["quantization"]`, a
`QuantizationReport` the run's `OptimizationResult` carries: `to_json()` goes into the JSON
`--report`, `table()` is printed by the command line after the pass table. It also holds the
target CPU (`cpu_features.detect_cpu`) and the layers an accuracy budget kept float
(`mixed_precision.py`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.ir.core import Model, Node, Value
from graphopt.passes.manager import PassContext
from graphopt.passes.quantization.cpu_features import CpuFeatures, detect_cpu
from graphopt.passes.quantization.scheme import QDTYPES, QuantScheme, quantize_tensor

__all__ = [
    "BudgetResult",
    "QuantizationReport",
    "QuantizedLayer",
    "TOPIC",
    "layer_name",
    "measure_layers",
    "qdq_layer",
    "record_layer",
    "report_for",
    "weight_layer",
]

TOPIC = "quantization"  # the key in PassContext.artifacts and in the JSON report


@dataclass
class QuantizedLayer:
    """What a pass did to one layer (MatMul, Gemm or Conv), recorded when it rewrote it."""

    layer: str  # the node's name (`layer_name`)
    op: str
    mode: str  # "static", "dynamic" or "weight-only"
    float_output: str  # the layer's output in the float model
    weight_dtype: str
    weight_scale: np.ndarray
    weight_zero_point: np.ndarray | None = None
    quantized_output: str | None = None  # in the quantized model, when renamed by the rewrite
    activation: str | None = None  # the float value the activation's QuantizeLinear reads
    activation_dtype: str | None = None
    activation_scale: np.ndarray | None = None
    activation_zero_point: np.ndarray | None = None
    pass_name: str = ""
    clipping_rate: float | None = None  # measured on the calibration data
    snr_db: float | None = None

    def to_json(self) -> dict[str, Any]:
        activation = None
        if self.activation is not None:
            activation = {
                "value": self.activation,
                "dtype": self.activation_dtype,
                "scale": _summary(self.activation_scale),
                "zero_point": _summary(self.activation_zero_point),
                "clipping_rate": self.clipping_rate,
            }
        return {
            "pass": self.pass_name,
            "layer": self.layer,
            "op": self.op,
            "mode": self.mode,
            "weight": {
                "dtype": self.weight_dtype,
                "scale": _summary(self.weight_scale),
                "zero_point": _summary(self.weight_zero_point),
            },
            "activation": activation,
            "output": self.float_output,
            "snr_db": round(self.snr_db, 3)
            if self.snr_db is not None and math.isfinite(self.snr_db)
            else None,  # fmt: skip
        }


@dataclass
class BudgetResult:
    """What an accuracy budget decided (`mixed_precision.py`): the layers kept float and why."""

    pass_name: str
    max_accuracy_drop: float
    drop: float  # of the result, on the calibration data
    drop_all_quantized: float
    samples: int
    quantizable: int  # layers the pass would quantize without a budget
    kept_float: dict[str, float] = field(default_factory=dict)  # layer -> its drop alone

    def to_json(self) -> dict[str, Any]:
        return {
            "pass": self.pass_name,
            "max_accuracy_drop": self.max_accuracy_drop,
            "metric": "1 - cosine(quantized, float) per output and sample, worst case",
            "drop": self.drop,
            "drop_all_quantized": self.drop_all_quantized,
            "samples": self.samples,
            "quantizable_layers": self.quantizable,
            "kept_float": [{"layer": k, "drop_alone": v} for k, v in self.kept_float.items()],
        }


@dataclass
class QuantizationReport:
    """Every layer the run's quantization passes quantized, the budgets, and the target CPU."""

    cpu: CpuFeatures = field(default_factory=lambda: detect_cpu())  # looked up at call time
    layers: list[QuantizedLayer] = field(default_factory=list)
    budgets: list[BudgetResult] = field(default_factory=list)
    calibration: str = ""  # where the measured figures come from

    def to_json(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu.to_json(),
            "cpu_description": self.cpu.describe(),
            "calibration": self.calibration or None,
            "layers": [layer.to_json() for layer in self.layers],
            "budgets": [budget.to_json() for budget in self.budgets],
        }

    def table(self) -> Any:
        """A rich table: one row per quantized layer; the budgets' decisions in the caption."""
        from rich.table import Table

        passes = list(dict.fromkeys(layer.pass_name for layer in self.layers))
        measured = f", measured on {self.calibration}" if self.calibration else ""
        table = Table(
            title=f"{', '.join(passes) or 'quantization'}: {len(self.layers)} layers{measured}\n"
            f"CPU: {self.cpu.describe()}",
            title_justify="left", caption=self.budget_summary() or None, caption_justify="left",
        )  # fmt: skip
        if len(passes) > 1:
            table.add_column("pass")
        table.add_column("layer", overflow="fold")
        for column in ("op", "mode", "weight scale", "act scale/zp", "clip %", "SNR dB"):
            table.add_column(column, justify="right" if column in ("clip %", "SNR dB") else "left")
        for layer in self.layers:
            act = "dynamic" if layer.mode == "dynamic" else "-"
            if layer.activation_scale is not None:
                act = f"{_short(layer.activation_scale)}/{_short(layer.activation_zero_point)}"
            clip = "-" if layer.clipping_rate is None else f"{100 * layer.clipping_rate:.3f}"
            snr = "-" if layer.snr_db is None else f"{layer.snr_db:.1f}"
            cells = [layer.layer, layer.op, layer.mode, _short(layer.weight_scale), act, clip, snr]
            table.add_row(*([layer.pass_name] if len(passes) > 1 else []), *cells)
        return table

    def budget_summary(self) -> str:
        """One line per budget: the drop reached and the layers kept float."""
        lines = []
        for b in self.budgets:
            kept = ", ".join(f"{name} ({drop:.2g})" for name, drop in b.kept_float.items())
            lines.append(
                f"{b.pass_name} max-accuracy-drop={b.max_accuracy_drop:g}: drop {b.drop:.2g} "
                f"(all quantized {b.drop_all_quantized:.2g}); kept float "
                f"{len(b.kept_float)}/{b.quantizable}" + (f", drop alone: {kept}" if kept else "")
            )
        return "\n".join(lines)


def report_for(context: PassContext) -> QuantizationReport:
    """The run's quantization report (created on first use)."""
    report = context.artifacts.get(TOPIC)
    if not isinstance(report, QuantizationReport):
        report = context.artifacts[TOPIC] = QuantizationReport()
    return report


def record_layer(context: PassContext, layer: QuantizedLayer) -> None:
    """Called by a pass for each layer it quantizes."""
    layer.pass_name = layer.pass_name or context.current_pass
    report_for(context).layers.append(layer)


def layer_name(node: Node) -> str:
    """How the report names a layer: the node's name, else its op and output."""
    first = node.outputs[0].name if node.outputs else ""
    return node.name or f"{node.op} -> %{first}"


def qdq_layer(node: Node, mode: str) -> QuantizedLayer:
    """The layer as a QDQ rewrite left it: weight (input 1) = DequantizeLinear(codes, scale[,
    zero point]) and, for static, activation (input 0) = DequantizeLinear(QuantizeLinear(x))."""
    weight = _dequantized_constant(node.inputs[1] if len(node.inputs) > 1 else None)
    codes, scale, zero = weight if weight is not None else (None, np.asarray(np.nan), None)
    layer = QuantizedLayer(
        layer_name(node), node.op, mode, node.outputs[0].name or "",
        str(codes.dtype) if codes is not None else "?", scale, zero,
    )  # fmt: skip
    dq = node.inputs[0].producer if node.inputs and node.inputs[0] is not None else None
    q = None
    if dq is not None and dq.op == "DequantizeLinear" and dq.inputs[0] is not None:
        q = dq.inputs[0].producer
    if q is not None and q.op == "QuantizeLinear" and q.inputs[0] is not None:
        scale_value, zero_value = (q.inputs[i] if len(q.inputs) > i else None for i in (1, 2))
        if scale_value is not None and scale_value.const_value is not None:
            layer.activation = q.inputs[0].name
            layer.activation_scale = np.asarray(scale_value.const_value)
            zp = zero_value.const_value if zero_value is not None else None
            layer.activation_zero_point = np.asarray(zp if zp is not None else np.uint8(0))
            layer.activation_dtype = str(layer.activation_zero_point.dtype)
    return layer


def weight_layer(
    node: Node,
    array: np.ndarray,
    scheme: QuantScheme,
    mode: str,
    quantized_output: str | None,
    clip_search: bool = False,
) -> QuantizedLayer:
    """The layer of a rewrite that replaced the node (quantize-dynamic, MatMulNBits): the
    weight's parameters recomputed from the float `array` with the pass's `scheme` (and its
    clip search, as the pass did)."""
    t = quantize_tensor(array, scheme, clip_search=clip_search)
    return QuantizedLayer(
        layer_name(node), node.op, mode, node.outputs[0].name or "", scheme.dtype,
        np.asarray(t.scale), np.asarray(t.zero_point), quantized_output,
    )  # fmt: skip


def _dequantized_constant(value: Value | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    dq = value.producer if value is not None else None
    if dq is None or dq.op != "DequantizeLinear" or dq.inputs[0] is None:
        return None
    codes, scale = dq.inputs[0].const_value, dq.inputs[1].const_value if dq.inputs[1] else None
    if codes is None or scale is None:
        return None
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    zero_array = zero.const_value if zero is not None else None
    if zero_array is None:  # DequantizeLinear's default zero point
        zero_array = np.zeros(np.shape(scale), np.asarray(codes).dtype)
    return np.asarray(codes), np.asarray(scale), np.asarray(zero_array)


# ----- measurement --------------------------------------------------------------------------------


def measure_layers(
    float_model: Model,
    quantized_model: Model,
    layers: Sequence[QuantizedLayer],
    data: Iterable[Mapping[str, np.ndarray]],
) -> None:
    """Fill in each layer's `clipping_rate` and `snr_db` from running both models on `data`."""
    quantized_names = {v.name for n in quantized_model.graph for v in n.outputs} | {
        v.name for v in quantized_model.graph.inputs
    }
    by_node = {n.name: n.outputs[0].name for n in quantized_model.graph if n.name and n.outputs}
    float_names = {v.name for n in float_model.graph for v in n.outputs}
    outputs: dict[int, tuple[str, str]] = {}  # layer index -> (float name, quantized name)
    for i, layer in enumerate(layers):
        quantized = layer.quantized_output or (
            layer.float_output
            if layer.float_output in quantized_names
            else by_node.get(layer.layer)
        )
        if quantized and layer.float_output in float_names:
            outputs[i] = (layer.float_output, quantized)
    clipped = [_Clipping(layer) for layer in layers]
    watched_q = {name for _, name in outputs.values()} | {c.value for c in clipped if c.value}
    signal = np.zeros(len(layers))
    noise = np.zeros(len(layers))
    watched_f = {name for name, _ in outputs.values()}
    with _Probe(float_model, watched_f) as f_run, _Probe(quantized_model, watched_q) as q_run:
        for feeds in data:
            f_values, q_values = f_run(feeds), q_run(feeds)
            for i, (f_name, q_name) in outputs.items():
                f, q = f_values[f_name].astype(np.float64), q_values[q_name].astype(np.float64)
                if f.shape != q.shape:
                    outputs[i] = ("", "")
                    continue
                signal[i] += np.square(f).sum()
                noise[i] += np.square(q - f).sum()
            for c in clipped:
                c.update(q_values)
    for i, layer in enumerate(layers):
        if outputs.get(i, ("", ""))[0] and noise[i] > 0:
            layer.snr_db = float(10 * np.log10(signal[i] / noise[i])) if signal[i] else -math.inf
        layer.clipping_rate = clipped[i].rate()


class _Clipping:
    """Counts the values of a static layer's activation that saturate its QuantizeLinear."""

    def __init__(self, layer: QuantizedLayer):
        self.value = layer.activation if layer.activation_scale is not None else None
        self.scale = layer.activation_scale
        self.zero = layer.activation_zero_point
        dtype = layer.activation_dtype if layer.activation_dtype in QDTYPES else "uint8"
        scheme = QuantScheme(dtype or "uint8")  # the type's whole range: where Q saturates
        self.qmin, self.qmax = scheme.qmin, scheme.qmax
        # a range starting at 0 (zero point = the type's minimum) clamps negatives to 0 on purpose:
        # there quantize-static folds a Relu into the quantizer, or the value is never negative
        self.clamps_negatives = self.zero is not None and bool(np.all(self.zero == self.qmin))
        self.saturated = self.total = 0

    def update(self, values: Mapping[str, np.ndarray]) -> None:
        if self.value is None or self.value not in values:
            return
        x = np.asarray(values[self.value])
        assert self.scale is not None and self.zero is not None
        codes = np.rint(x / self.scale.astype(x.dtype)) + self.zero.astype(np.float64)
        below = np.zeros(codes.shape, bool) if self.clamps_negatives else codes < self.qmin
        self.saturated += int(np.count_nonzero(below | (codes > self.qmax)))
        self.total += x.size

    def rate(self) -> float | None:
        return self.saturated / self.total if self.value is not None and self.total else None


class _Probe:
    """Runs a model with the reference interpreter, returning some inner values by name: they
    are extra graph outputs while the `with` block lasts (restored afterwards, also on error),
    as `calibration.observe` does it."""

    def __init__(self, model: Model, names: Iterable[str]):
        self.model = model
        self.names = sorted(names)

    def __enter__(self) -> Any:
        from graphopt.backends.reference import Interpreter

        graph = self.model.graph
        self.saved = (graph.outputs, list(graph.output_names))
        by_name = {v.name: v for v in graph.inputs}
        by_name.update((v.name, v) for node in graph for v in node.outputs)
        values = [by_name[name] for name in self.names]
        graph.set_outputs(
            [*graph.outputs, *values],
            [*graph.output_names, *(f"\0report:{i}" for i in range(len(values)))],
        )
        interpreter = Interpreter(self.model)
        count = len(self.saved[0])

        def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            results = list(interpreter.run(dict(feeds)).values())[count:]
            return {
                name: np.asarray(array) for name, array in zip(self.names, results, strict=True)
            }

        return run

    def __exit__(self, *exc: object) -> None:
        self.model.graph.set_outputs(*self.saved)


# ----- formatting ---------------------------------------------------------------------------------


def _summary(array: np.ndarray | None) -> Any:
    """A scalar as a number; per channel or per block as {min, max, mean, count}."""
    if array is None:
        return None
    array = np.asarray(array)
    if array.size == 1:
        return array.item()
    values = array.astype(np.float64)
    return {"min": float(values.min()), "max": float(values.max()),
            "mean": float(values.mean()), "count": int(array.size)}  # fmt: skip


def _short(array: np.ndarray | None) -> str:
    if array is None:
        return "-"
    array = np.asarray(array)
    if array.size == 1:
        value = array.item()
        return str(value) if isinstance(value, int) else f"{value:.3g}"
    values = array.astype(np.float64)
    return f"{values.min():.2g}..{values.max():.2g}"
