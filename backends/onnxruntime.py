"""Run an IR model with ONNX Runtime (imported lazily: it is the runtime, not the optimizer)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from graphopt.ir.core import Model
from graphopt.ir.errors import GraphoptError

_PROTOBUF_LIMIT = 2**31 - 1


def make_session(model: Model, *, threads: int | None = None, optimize: bool = True) -> Any:
    """An `onnxruntime.InferenceSession` for `model` (through a temp file when over 2 GB)."""
    import onnxruntime as ort

    from graphopt.backends.onnx import save_onnx, to_onnx

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = to_onnx(model)
    try:
        if proto.ByteSize() < _PROTOBUF_LIMIT:
            return ort.InferenceSession(
                proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            save_onnx(model, path, external_data=True)
            return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own exception types for invalid graphs
        raise GraphoptError(f"ONNX Runtime cannot load the model: {error}") from None


def run_onnxruntime(
    model: Model, inputs: Mapping[str, np.ndarray], *, threads: int | None = None
) -> dict[str, np.ndarray]:
    session = make_session(model, threads=threads)
    names = [o.name for o in session.get_outputs()]
    try:
        results = session.run(names, dict(inputs))
    except Exception as error:
        raise GraphoptError(f"ONNX Runtime failed to run the model: {error}") from None
    return dict(zip(names, results, strict=True))
