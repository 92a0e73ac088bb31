"""The torch.export frontend against torch's ONNX exporter: import time and ONNX Runtime latency.

For each model of the zoo (GPT-2, BERT, LLaMA-style, ResNet; tiny by default) this imports the
same torch module two ways, in one process, and times both imports:

  from_torch     graphopt.from_torch (torch.export + translation to the IR), then graphopt O2,
                 written as ONNX
  torch.onnx     torch.onnx.export(dynamo=True) as the zoo exports it (tests/models: opset 18,
                 onnxscript's optimizer on), loaded by ONNX Runtime as written

and two more variants that separate the frontend from the optimizer: `from_torch-raw` (the IR
written as translated, no passes) and `torch.onnx+O2` (torch's export through graphopt O2).
Every variant's outputs are compared with eager PyTorch; latency is timed in ONNX Runtime
(ORT_ENABLE_ALL, 2 intra-op threads, spinning off, paired runs in shuffled order, medians; method:
../shared/notes/benchmarking.md) at batch 1, sequence 128 (images: the size's own). One JSON
line per model: import seconds of both paths (export + translation; O2 separately), medians (ms),
ratios to torch.onnx, op counts, relative errors, and the machine.

    python bench/torch_frontend.py [--models gpt2,bert,llama,resnet] [--size tiny|base]
        [--pairs 30]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from common import machine, ort_session, relative_error, time_paired  # noqa: E402
from fusion import op_counts  # noqa: E402

BASELINE = "torch.onnx"


def dynamic_shapes(name: str, size: str) -> dict[str, dict[int, Any]]:
    """The Dims the zoo's own export uses (batch, and sequence bounded by the positions)."""
    import torch
    from models.specs import MODELS

    spec = MODELS[name]
    config = spec.config(size)
    limit = config[spec.sequence_limit] if spec.sequence_limit else None
    dims = {"batch": torch.export.Dim("batch"), "sequence": torch.export.Dim("sequence", max=limit)}
    return {
        i.name: {axis: dims[d] for axis, d in enumerate(i.shape) if d in dims} for i in spec.inputs
    }


def import_both(name: str, size: str, folder: str) -> tuple[dict[str, Any], dict[str, float]]:
    """The four variants' ModelProtos, and the import times (seconds) of both frontends."""
    import onnx
    import torch
    from models import sample_inputs, torch_module
    from models.specs import DEFAULT_OPSET, MODELS
    from models.zoo import EXPORT_BATCH, EXPORT_SEQUENCE, _export, _quiet

    import graphopt
    from graphopt.backends.onnx import to_onnx

    spec = MODELS[name]
    config = spec.config(size)
    module = torch_module(name, size)
    example = sample_inputs(name, size, batch=EXPORT_BATCH, sequence=EXPORT_SEQUENCE)
    arguments = tuple(torch.from_numpy(v) for v in example.values())
    shapes = {k: v for k, v in dynamic_shapes(name, size).items() if k in example}
    seconds: dict[str, float] = {}
    with _quiet(), contextlib.redirect_stdout(io.StringIO()):  # torch.onnx prints progress
        start = time.perf_counter()
        model = graphopt.from_torch(module, arguments, shapes)
        seconds["from_torch_import_s"] = time.perf_counter() - start
        raw = to_onnx(model)
        start = time.perf_counter()
        optimized = to_onnx(graphopt.optimize(model, "O2"))
        seconds["from_torch_O2_s"] = time.perf_counter() - start
        path = os.path.join(folder, f"{name}-{size}-torch-onnx.onnx")
        start = time.perf_counter()  # what models.build does, uncached
        _export(module, spec, config, "dynamo", DEFAULT_OPSET["dynamo"], True, path)
        seconds["torch.onnx_import_s"] = time.perf_counter() - start
        exported = onnx.load(path)
        theirs_o2 = to_onnx(graphopt.optimize(graphopt.load(path), "O2"))
    variants = {
        "from_torch": optimized, BASELINE: exported, "from_torch-raw": raw,
        "torch.onnx+O2": theirs_o2,
    }  # fmt: skip
    return variants, {k: round(v, 2) for k, v in seconds.items()}


def warm_up() -> None:
    """Pay both paths' one-time costs (lazy imports, op registrations) before timing either."""
    import torch

    import graphopt

    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()).eval()
    example = (torch.ones(2, 4),)
    graphopt.from_torch(module, example)
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(module, example, os.path.join(folder, "warm.onnx"), dynamo=True)


def measure(name: str, size: str, pairs: int) -> dict[str, Any]:
    from models import sample_inputs, torch_outputs

    row: dict[str, Any] = {"bench": "torch_frontend", "model": f"{name}-{size}", "threads": 2}
    feeds = sample_inputs(name, size, batch=1, sequence=128)
    expected = list(torch_outputs(name, feeds, size).values())
    with tempfile.TemporaryDirectory() as folder:
        variants, seconds = import_both(name, size, folder)
    row.update(seconds)
    row["import_vs_torch.onnx"] = round(
        seconds["from_torch_import_s"] / seconds["torch.onnx_import_s"], 3
    )
    sessions: dict[str, Any] = {}
    for label, proto in variants.items():
        row[f"{label}_ops"] = op_counts(proto)
        try:
            session = ort_session(proto)
            error = relative_error(expected, session.run(None, feeds))
        except Exception as failure:  # report it, time the others
            row[f"{label}_error"] = (
                f"{type(failure).__name__}: {str(failure).splitlines()[0][:200]}"
            )
            continue
        row[f"{label}_rel_err"] = error
        if error > 1e-3:
            row[f"{label}_error"] = f"outputs differ from eager torch (relative {error:.2g})"
            continue
        sessions[label] = session
    runners = {label: (lambda s=s: s.run(None, feeds)) for label, s in sessions.items()}
    times = time_paired(runners, rounds=pairs, title=f"{name}-{size}")
    medians = {label: statistics.median(t) for label, t in times.items()}
    for label, ms in medians.items():
        row[f"{label}_ms"] = round(ms, 3)
    if BASELINE in medians:
        for label, ms in medians.items():
            row[f"{label}_vs_torch.onnx"] = round(ms / medians[BASELINE], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="gpt2,bert,llama,resnet")
    parser.add_argument("--size", default="tiny", choices=["tiny", "base"])
    parser.add_argument("--pairs", type=int, default=30)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    info = machine()
    warm_up()
    for name in args.models.split(","):
        row = measure(name, args.size, args.pairs)
        print(json.dumps({**row, **info}), flush=True)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
