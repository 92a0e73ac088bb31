"""The `onnxruntime` backend: run an IR model with ONNX Runtime's CPU provider.

onnxruntime is imported only when a session is made: it is a runtime, not the optimizer. Models
over protobuf's 2 GB limit go through a temp file with external data.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from graphopt.backends.base import Backend, BackendError, Executable, register_backend
from graphopt.ir.core import Model, Node
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


class OnnxRuntimeExecutable(Executable):
    def __init__(self, model: Model, threads: int | None, optimize: bool):
        self.session = make_session(model, threads=threads, optimize=optimize)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.model = model

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = self.session.run(self.output_names, dict(inputs))
        except Exception as error:
            raise BackendError(f"ONNX Runtime failed to run the model: {error}") from None
        return dict(zip(self.output_names, results, strict=True))

    def save(self, path: str) -> list[str]:
        from graphopt.backends.onnx import save_onnx

        save_onnx(self.model, path)
        return [path]


@register_backend
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    description = "ONNX Runtime, CPU execution provider (standard ONNX and com.microsoft ops)"
    targets = ("cpu",)

    def unavailable(self) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "the onnxruntime package is not installed (pip install onnxruntime)"
        return None

    def supports(self, node: Node, opset: int) -> bool:
        return node.domain in ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")

    def compile(
        self, model: Model, target: str | None = None, *, threads: int | None = None,
        optimize: bool = True, **options: Any,
    ) -> Executable:  # fmt: skip
        return OnnxRuntimeExecutable(model, threads, optimize)
