"""Run one model on two backends: split it where the main backend cannot run a node.

`compile_partitioned` (what `tvm` does with `fallback="onnxruntime"`) walks the main graph in order
and cuts it into maximal runs of nodes that the main backend supports and runs that it does not.
Each run becomes a model of its own, extracted from the ONNX form of the whole model with
`onnx.utils.Extractor` (which keeps subgraphs and the weights each part reads), and is compiled by
the main backend or by the fallback backend (`onnxruntime` or `reference`). Running feeds each
part the values it reads: graph inputs or outputs of earlier parts.

`save` writes one file per part (`<stem>.part0.so`, `<stem>.part1.onnx`, ...) and `<stem>.json`
listing them in order; `load_partitioned` reads that back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from graphopt.backends.base import Backend, BackendError, Executable, get_backend
from graphopt.ir.core import Model, Node, Value

__all__ = ["PartitionedExecutable", "compile_partitioned", "load_partitioned"]

FALLBACKS = ("onnxruntime", "reference")


class PartitionedExecutable(Executable):
    """Parts run in order; each reads graph inputs and earlier parts' outputs by name."""

    def __init__(
        self, parts: list[tuple[str, Executable, list[str], list[str], Any]],
        inputs: list[str], outputs: dict[str, str], meta: dict[str, Any],
    ):  # fmt: skip
        self.parts = parts  # (backend name, executable, input names, output names, onnx part)
        self.input_names = inputs
        self.output_names = list(outputs)
        self.outputs = outputs  # graph output name -> value name
        self.meta = meta

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        env = dict(inputs)
        for _, executable, names, outs, _ in self.parts:
            results = executable.run({n: env[n] for n in names})
            env.update({n: results[n] for n in outs})
        return {name: env[value] for name, value in self.outputs.items()}

    def save(self, path: str) -> list[str]:
        import onnx

        from graphopt.backends.tvm import FORMAT, json_path

        stem = os.path.splitext(os.fspath(path))[0]
        written: list[str] = []
        segments = []
        for index, (kind, executable, names, outs, proto) in enumerate(self.parts):
            if kind == "tvm":
                file = f"{stem}.part{index}.so"
                written += executable.save(file)
            else:
                file = f"{stem}.part{index}.onnx"
                onnx.save(proto, file)
                written.append(file)
            segments.append(
                {"backend": kind, "file": os.path.basename(file), "inputs": names, "outputs": outs}
            )
        meta = dict(self.meta, format=FORMAT, segments=segments, output_values=self.outputs)
        with open(json_path(path), "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=2)
        return written + [json_path(path)]


def _runs(model: Model, unsupported: set[Node]) -> list[tuple[bool, list[Node]]]:
    runs: list[tuple[bool, list[Node]]] = []
    for node in model.graph:
        ok = node not in unsupported
        if runs and runs[-1][0] == ok:
            runs[-1][1].append(node)
        else:
            runs.append((ok, [node]))
    return runs


def _reads(node: Node) -> list[Value]:
    values = [v for v in node.inputs if v is not None]
    for sub in node.subgraphs():
        for inner in sub.all_nodes():
            values += [v for v in inner.inputs if v is not None and v.owning_graph is not sub]
    return values


def compile_partitioned(
    model: Model, backend: Backend, unsupported: list[Node], fallback: str, *,
    target: str | None = None, **options: Any,
) -> PartitionedExecutable:  # fmt: skip
    """Compile the parts `backend` supports with it and the rest with `fallback`."""
    import onnx.utils

    import graphopt
    from graphopt.backends.onnx import to_onnx
    from graphopt.backends.tvm import _signature

    if fallback not in FALLBACKS:
        raise BackendError(f"unknown fallback '{fallback}'", hint=f"use one of {FALLBACKS}")
    graph = model.graph
    proto = _typed_proto(to_onnx(model), model)
    extractor = onnx.utils.Extractor(proto)
    # the exporter may rename a value that is a graph output to the output's name
    present = {name for node in proto.graph.node for name in node.output}
    present |= {i.name for i in proto.graph.input} | {i.name for i in proto.graph.initializer}
    renamed = {v: n for n, v in zip(graph.output_names, graph.outputs, strict=True)}

    def name(value: Value) -> str:
        if value.name is not None and value.name in present:
            return value.name
        return renamed.get(value, value.name or "")

    final = {v for v in graph.outputs}
    runs = _runs(model, set(unsupported))
    parts: list[tuple[str, Executable, list[str], list[str], Any]] = []
    for index, (ok, nodes) in enumerate(runs):
        defined = {v for n in nodes for v in n.outputs}
        later = {v for _, rest in runs[index + 1 :] for n in rest for v in _reads(n)} | final
        reads = dict.fromkeys(v for n in nodes for v in _reads(n) if v not in defined)
        names = [name(v) for v in reads if not v.is_constant]
        outs = [name(v) for v in dict.fromkeys(v for n in nodes for v in n.outputs) if v in later]
        part = extractor.extract_model(names, outs)
        kind = backend.name if ok else fallback
        part_model = graphopt.load(part)
        if ok:
            executable = backend.compile(part_model, target, **options)
        else:
            executable = get_backend(fallback).compile(part_model)
        parts.append((kind, executable, names, outs, part))
    outputs = {n: name(v) for n, v in zip(graph.output_names, graph.outputs, strict=True)}
    inputs = [v.name or "" for v in graph.inputs if v.const_value is None]
    meta = {"fallback": fallback, **_signature(model, options.get("dims") or {})}
    return PartitionedExecutable(parts, inputs, outputs, meta)


def _typed_proto(proto: Any, model: Model) -> Any:
    """`proto` with a value_info for every node output (the extractor needs the type of each
    value it cuts at): ONNX's inference where it knows, else the IR's type."""
    import onnx

    from graphopt.ir.types import TensorType

    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001  (over 2 GB or an op inference rejects: use the IR's types)
        pass
    known = {v.name for v in list(proto.graph.value_info) + list(proto.graph.output)}
    for node in model.graph:
        for value in node.outputs:
            t = value.type
            if value.name and value.name not in known and isinstance(t, TensorType):
                shape = None if t.shape is None else [d if d is not None else "?" for d in t.shape]
                proto.graph.value_info.append(
                    onnx.helper.make_tensor_value_info(value.name, int(t.dtype), shape)
                )
    return proto


def load_partitioned(
    path: str, meta: dict[str, Any], *, remote: str | None = None, threads: int | None = None
) -> PartitionedExecutable:
    """A partitioned executable from the JSON `save` wrote (parts beside it)."""
    import onnx

    import graphopt
    from graphopt.backends.tvm import load_library

    folder = os.path.dirname(os.path.abspath(path))
    parts: list[tuple[str, Executable, list[str], list[str], Any]] = []
    for segment in meta["segments"]:
        file = os.path.join(folder, segment["file"])
        if segment["backend"] == "tvm":
            executable = load_library(file, remote=remote, threads=threads)
            proto = None
        else:
            proto = onnx.load(file)
            executable = get_backend(segment["backend"]).compile(graphopt.load(proto))
        parts.append((segment["backend"], executable, segment["inputs"], segment["outputs"], proto))
    inputs = [spec["name"] for spec in meta.get("inputs", [])]
    return PartitionedExecutable(parts, inputs, dict(meta["output_values"]), meta)
