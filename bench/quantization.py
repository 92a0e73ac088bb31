"""Quantization against ONNX Runtime's own tool: accuracy, latency and size, per model and scheme.

For each model of the zoo (GPT-2, BERT, LLaMA-style, ResNet; base size by default) and each
scheme, this builds two quantized models from the same export and compares them with the float
model in ONNX Runtime (method: ../shared/notes/benchmarking.md and bench/common.py: 2 intra-op
threads, spinning off, ORT_ENABLE_ALL, batch 1, sequence 128, warm-up runs, paired timing in
shuffled order, medians):

  scheme         graphopt                                          ONNX Runtime's tool
  static-int8    O2,quantize-static (QDQ, uint8 activations,      quantize_static(QDQ, per_channel,
                 int8 per-channel weights)                         QUInt8 activations, QInt8 weights)
  dynamic-int8   O2,quantize-dynamic, --target onnxruntime        quantize_dynamic(per_channel)
                 (DynamicQuantizeMatMul)
  weights-int8   O2,quantize-weights{bits=8 block-size=32          MatMulNBitsQuantizer(bits=8,
                 format=matmulnbits}, --target onnxruntime         block_size=32, symmetric)
  weights-int4   O2,quantize-weights{bits=4 block-size=32          MatMulNBitsQuantizer(bits=4,
                 format=matmulnbits}, --target onnxruntime         block_size=32, asymmetric: its
                 (asymmetric, clip search: graphopt's defaults)    default)
  weights-int4-  the same with symmetric=true                      the same, is_symmetric=True
  sym

Both tools calibrate on the same data: `--calibration` (16) seeded samples drawn like the zoo's
`sample_inputs` (seeds 100, 101, ...), handed to ONNX Runtime through a CalibrationDataReader.
Accuracy is measured on held-out inputs (seeds 0..`--eval`-1, never in the calibration set):
the cosine similarity of each output with the float model's, the worst over inputs and outputs.
The float model is the export itself under ORT_ENABLE_ALL (ONNX Runtime fuses it at load).
graphopt's models also went through O2, so their size includes O2's folding (BatchNorm into Conv).
`<tool>_ops` counts the quantization ops each model holds (`<tool>_ort_kernels`: the int8
kernels and float Gemm/MatMul in ONNX Runtime's optimized graph of it): ONNX Runtime's MatMulNBitsQuantizer
quantizes MatMul only (not Gemm), so on a graph whose projections are Gemms it changes nothing
and its figures are the float model's. Weight-only int8: ONNX Runtime's tool has no per-channel
int8 weight-only mode; MatMulNBits with bits=8 (block 32) is its equivalent, and graphopt is run
with the same scheme.

One JSON line per model and scheme: cosine of both against fp32, their ratio and the ratio of
their errors (1 - cosine), median latency (ms) of fp32, graphopt and the tool (timed together,
shuffled), the latency ratios, size on disk of all three, whether each model loads and runs in
ONNX Runtime (a tool that fails or writes an invalid model is recorded, never fatal), and the
machine: `graphopt.passes.quantization.cpu_features.detect_cpu().to_json()` when that module is
there, else CPU model and SIMD flags from /proc/cpuinfo, and the runtime versions.

    python bench/quantization.py [--models gpt2,bert,llama,resnet] [--size base|tiny]
        [--schemes static-int8,dynamic-int8,weights-int8,weights-int4,weights-int4-sym]
        [--rounds 30]
        [--static-options "quantize-add-concat=true"]

`--size tiny` is the smoke check (well under a minute): tiny models, sequence 32, 10 rounds.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from common import machine, ort_session, time_paired  # noqa: E402

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class Scheme:
    """One quantization scheme: graphopt's pipeline and target, and how ORT's tool does it."""

    name: str
    pipeline: str
    target: str
    tool: str  # a description of ONNX Runtime's call, printed in the JSON line


SCHEMES = {
    s.name: s
    for s in (
        Scheme("static-int8", "O2,quantize-static", "onnx",
               "quantize_static(QDQ, per_channel=True, QUInt8 activations, QInt8 weights, MinMax)"),
        Scheme("dynamic-int8", "O2,quantize-dynamic", "onnxruntime",
               "quantize_dynamic(per_channel=True, QInt8 weights)"),
        Scheme("weights-int8", "O2,quantize-weights{bits=8 block-size=32 format=matmulnbits}",
               "onnxruntime", "MatMulNBitsQuantizer(bits=8, block_size=32, is_symmetric=True)"),
        Scheme("weights-int4", "O2,quantize-weights{bits=4 block-size=32 format=matmulnbits}",
               "onnxruntime", "MatMulNBitsQuantizer(bits=4, block_size=32, is_symmetric=False)"),
        Scheme("weights-int4-sym",
               "O2,quantize-weights{bits=4 block-size=32 format=matmulnbits symmetric=true}",
               "onnxruntime", "MatMulNBitsQuantizer(bits=4, block_size=32, is_symmetric=True)"),
    )
}  # fmt: skip


def cpu_capabilities() -> dict[str, Any]:
    """What the quantization passes know of this CPU (their own detection), or, before that
    module exists, the model and SIMD flags bench/common.py reads from /proc/cpuinfo."""
    try:
        from graphopt.passes.quantization.cpu_features import detect_cpu
    except ImportError:
        return {"cpu_features": None}
    features = detect_cpu().to_json()
    return {"cpu_features": json.loads(features) if isinstance(features, str) else features}


def samples(name: str, size: str, seeds: range, sequence: int) -> list[Feeds]:
    """Batch-1 inputs drawn like the zoo's `sample_inputs`, one per seed."""
    from models import sample_inputs

    return [sample_inputs(name, size, batch=1, sequence=sequence, seed=s) for s in seeds]


class _Reader:
    """ONNX Runtime's CalibrationDataReader over a list of feeds (it asks for the next one
    until None; `rewind` lets the tool read them again)."""

    def __init__(self, feeds: list[Feeds], names: set[str]):
        self.feeds, self.names, self.position = feeds, names, 0

    def get_next(self) -> Feeds | None:
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return {k: v for k, v in self.feeds[self.position - 1].items() if k in self.names}

    def rewind(self) -> None:
        self.position = 0


def reader(feeds: list[Feeds], path: str) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    names = {i.name for i in ort_session(path).get_inputs()}
    cls = type("FeedsReader", (_Reader, CalibrationDataReader), {})
    return cls(feeds, names)


def build_graphopt(scheme: Scheme, path: str, out: str, calibration: list[Feeds],
                   static_options: str) -> None:  # fmt: skip
    import graphopt

    pipeline = scheme.pipeline
    if scheme.name == "static-int8" and static_options:
        pipeline = f"O2,quantize-static{{{static_options}}}"
    data = calibration if scheme.name == "static-int8" else None  # the others need none
    model = graphopt.optimize(graphopt.load(path), pipeline, target=scheme.target, calibration=data)
    graphopt.save(model, out)


def build_ort_tool(scheme: Scheme, path: str, out: str, calibration: list[Feeds]) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if scheme.name == "static-int8":
        # not CalibMaxIntermediateOutputs: in ONNX Runtime 1.32 it drops the collected outputs
        # without computing their ranges (only the last partial chunk counts; "No data is
        # collected" when the sample count is a multiple of it)
        quantize_static(
            path, out, reader(calibration, path), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )  # fmt: skip
    elif scheme.name == "dynamic-int8":
        quantize_dynamic(path, out, per_channel=True, weight_type=QuantType.QInt8)
    else:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        bits = 8 if scheme.name == "weights-int8" else 4
        symmetric = "is_symmetric=True" in scheme.tool  # the description is the call
        quantizer = MatMulNBitsQuantizer(onnx.load(path), bits=bits, block_size=32,
                                         is_symmetric=symmetric)  # fmt: skip
        quantizer.process()
        quantizer.model.save_model_to_file(out, use_external_data_format=False)


QUANT_OPS = (
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
    "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "QLinearConv",
    "QLinearMatMul", "QLinearAdd", "QLinearConcat", "QAttention",
)  # fmt: skip


def quantized_ops(path: str) -> dict[str, int]:
    """How many quantization ops the written model holds (a tool that quantized nothing has
    none: its figures then are the float model's)."""
    import collections

    import onnx

    counts = collections.Counter(
        n.op_type for n in onnx.load(path, load_external_data=False).graph.node
    )
    return {op: counts[op] for op in QUANT_OPS if counts[op]}


ORT_KERNELS = (
    "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "QLinearConv", "QLinearAdd",
    "DynamicQuantizeMatMul", "MatMulInteger", "MatMulNBits", "Gemm", "FusedGemm", "MatMul",
)  # fmt: skip


def ort_kernels(path: str) -> dict[str, int]:
    """The int8 kernels (and float Gemm/MatMul left) in ONNX Runtime's optimized graph of the
    model (ORT_ENABLE_ALL, saved with optimized_model_filepath): whether its QDQ transformer
    fused the quantized ops, which the written model's op counts cannot tell."""
    import collections

    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = path + ".optimized.onnx"
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    counts = collections.Counter(n.op_type for n in graph.node)
    return {op: counts[op] for op in ORT_KERNELS if counts[op]}


def size_on_disk(path: str) -> int:
    """The model file plus any external data file beside it."""
    total = os.path.getsize(path)
    data = path + ".data"
    return total + (os.path.getsize(data) if os.path.exists(data) else 0)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    norm = float(np.linalg.norm(a64) * np.linalg.norm(b64))
    return float(a64 @ b64 / norm) if norm else float(np.array_equal(a64, b64))


def worst_cosine(session: Any, names: list[str], held_out: list[Feeds],
                 expected: list[list[np.ndarray]]) -> float:  # fmt: skip
    """The lowest cosine similarity to the float model over held-out inputs and outputs."""
    worst = 1.0
    for feeds, reference in zip(held_out, expected, strict=True):
        for e, a in zip(reference, session.run(names, feeds), strict=True):
            worst = min(worst, cosine(e, a))
    return worst


def _error(error: BaseException) -> str:
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:200]}"


def measure(name: str, size: str, scheme: Scheme, path: str, calibration: list[Feeds],
            held_out: list[Feeds], timing: Feeds, fp32: Any, expected: list[list[np.ndarray]],
            rounds: int, static_options: str, folder: str) -> dict[str, Any]:  # fmt: skip
    row: dict[str, Any] = {"bench": "quantization", "model": f"{name}-{size}",
                           "scheme": scheme.name, "threads": 2, "batch": 1,
                           "graphopt_pipeline": scheme.pipeline, "graphopt_target": scheme.target,
                           "ort_tool": scheme.tool, "fp32_mb": round(size_on_disk(path) / 2**20, 3)}  # fmt: skip
    if scheme.name == "static-int8" and static_options:
        row["graphopt_pipeline"] = f"O2,quantize-static{{{static_options}}}"
    names = [o.name for o in fp32.get_outputs()]
    runners: dict[str, Callable[[], Any]] = {"fp32": lambda: fp32.run(names, timing)}
    builders = {
        "graphopt": lambda out: build_graphopt(scheme, path, out, calibration, static_options),
        "ort_tool": lambda out: build_ort_tool(scheme, path, out, calibration),
    }
    for label, make in builders.items():
        out = os.path.join(folder, f"{name}-{size}-{scheme.name}-{label}.onnx")
        try:
            start = time.perf_counter()
            with warnings.catch_warnings(), _quiet_logs():
                warnings.simplefilter("ignore")
                make(out)
            row[f"{label}_build_s"] = round(time.perf_counter() - start, 2)
            row[f"{label}_mb"] = round(size_on_disk(out) / 2**20, 3)
            row[f"{label}_ops"] = quantized_ops(out)
        except Exception as error:  # the tool cannot quantize this graph: a finding, not a crash
            row[f"{label}_loads"] = False
            row[f"{label}_error"] = f"build: {_error(error)}"
            continue
        try:
            session = ort_session(out)
            row[f"{label}_ort_kernels"] = ort_kernels(out)
            row[f"{label}_cosine"] = round(worst_cosine(session, names, held_out, expected), 6)
            row[f"{label}_loads"] = True
        except Exception as error:  # written, but ONNX Runtime refuses to load or run it
            row[f"{label}_loads"] = False
            row[f"{label}_error"] = f"load/run: {_error(error)}"
            continue
        runners[label] = functools.partial(session.run, names, timing)
    times = time_paired(runners, rounds=rounds, title=f"{name}-{size} {scheme.name}")
    medians = {label: statistics.median(t) for label, t in times.items() if t}
    for label, ms in medians.items():
        row[f"{label}_ms"] = round(ms, 3)
        row[f"{label}_vs_fp32"] = round(ms / medians["fp32"], 3)
    if "graphopt_ms" in row and "ort_tool_ms" in row:
        row["latency_ratio"] = round(row["graphopt_ms"] / row["ort_tool_ms"], 3)
    if "graphopt_cosine" in row and "ort_tool_cosine" in row:
        g, o = row["graphopt_cosine"], row["ort_tool_cosine"]
        row["cosine_ratio"] = round(g / o, 6) if o else None
        row["error_ratio"] = round((1 - g) / (1 - o), 3) if o < 1 else None
    if "graphopt_mb" in row and "ort_tool_mb" in row and row["ort_tool_mb"]:
        row["size_ratio"] = round(row["graphopt_mb"] / row["ort_tool_mb"], 3)
    return row


class _quiet_logs:
    """ONNX Runtime's tool logs every node it skips at WARNING: keep the JSON output readable."""

    def __enter__(self) -> None:
        import logging

        self.logger = logging.getLogger()
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)


def rows(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    from models import build

    folder = os.environ.get("GRAPHOPT_MODEL_CACHE", os.path.expanduser("~/.cache/graphopt-models"))
    sequence = args.sequence or (32 if args.size == "tiny" else 128)
    for name in args.models.split(","):
        path = os.fspath(build(name, folder, size=args.size))
        calibration = samples(name, args.size, range(100, 100 + args.calibration), sequence)
        held_out = samples(name, args.size, range(args.eval), sequence)
        fp32 = ort_session(path)
        names = [o.name for o in fp32.get_outputs()]
        expected = [fp32.run(names, feeds) for feeds in held_out]
        with tempfile.TemporaryDirectory(prefix="graphopt-bench-quant-") as out:
            for scheme in args.schemes.split(","):
                row = measure(name, args.size, SCHEMES[scheme], path, calibration, held_out,
                              held_out[0], fp32, expected, args.rounds, args.static_options,
                              out)  # fmt: skip
                yield {**row, "sequence": None if name == "resnet" else sequence}
                for file in os.listdir(out):  # base models are hundreds of MB each
                    os.unlink(os.path.join(out, file))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="gpt2,bert,llama,resnet")
    parser.add_argument("--size", default="base", choices=["tiny", "base"])
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--calibration", type=int, default=16, help="calibration samples")
    parser.add_argument("--eval", type=int, default=4, help="held-out evaluation inputs")
    parser.add_argument("--sequence", type=int, default=0, help="default 32 tiny, 128 base")
    parser.add_argument(
        "--rounds", type=int, default=0, help="timed rounds (default 10 tiny, 30 base)"
    )
    parser.add_argument("--static-options", default="", help="options for quantize-static")
    args = parser.parse_args()
    unknown = set(args.schemes.split(",")) - set(SCHEMES)
    if unknown:
        parser.error(f"unknown schemes {sorted(unknown)}; schemes: {', '.join(SCHEMES)}")
    args.rounds = args.rounds or (10 if args.size == "tiny" else 30)
    warnings.filterwarnings("ignore")
    info = {**machine(), **cpu_capabilities()}
    for row in rows(args):
        print(json.dumps({**row, **info}), flush=True)


if __name__ == "__main__":
    main()
