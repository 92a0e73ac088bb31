"""What the quantization tests share: running a model in ONNX Runtime, cosine similarity (the
accuracy budget of lossy passes), and array literals for models written in IR text."""

from __future__ import annotations

import numpy as np
import onnx

from graphopt.backends.onnx import to_onnx
from graphopt.ir import Model


def run_ort(model: Model | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """All outputs, fed with the entries of `feeds` the model takes."""
    import onnxruntime as ort

    proto = to_onnx(model) if isinstance(model, Model) else model
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def literal(array: np.ndarray) -> str:
    """`array` as an IR text list literal."""
    return str([float(v) for v in array.astype(np.float64).ravel()])
