"""The `openvino` backend: run an IR model with OpenVINO's CPU plugin, save it as OpenVINO IR.

OpenVINO is the second deployment runtime beside ONNX Runtime: on some models it is faster, on
others slower, so `--target auto` (graphopt.backends.auto) measures both. The model goes in as
graphopt's ONNX export, converted by OpenVINO's ONNX frontend in memory (through a temp file with
external data over protobuf's 2 GB limit); symbolic dims stay dynamic.

We call the frontend (`openvino.frontend`) rather than `openvino.convert_model`: for ONNX,
`convert_model` is the same frontend plus a transformation pipeline that `compile_model` and
`save_model` run anyway, plus usage telemetry that it sends by default (no opt-in asked) and that
a library should not send on its users' behalf.

Inference runs in fp32 (`INFERENCE_PRECISION_HINT=f32`: on CPUs with bf16 or fp16 units OpenVINO
would otherwise lower the precision), so outputs match the reference interpreter within 1e-4
relative; `threads` sets `INFERENCE_NUM_THREADS`. `save(path)` writes `path` (`.xml`) and its
`.bin`, weights kept in fp32, each file renamed into place.

`supports(node)` asks the installed frontend whether it has a converter for the node's op at the
model's opset (a one-node probe, cached per op): standard ONNX ops mostly, a part of
`com.microsoft`'s contrib ops, none of `ai.onnx.ml`. openvino is imported only when used.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphopt.backends.base import Backend, BackendError, Executable, register_backend
from graphopt.ir.core import Model, Node

_PROTOBUF_LIMIT = 2**31 - 1
_NO_CONVERTER = "No conversion rule found"
_STANDARD_DOMAINS = ("", "ai.onnx")

_frontend: Any = None
_core: Any = None
_probes: dict[tuple[str, str, int, int, int], bool] = {}


def _onnx_frontend() -> Any:
    global _frontend
    if _frontend is None:
        from openvino.frontend import FrontEndManager

        _frontend = FrontEndManager().load_by_framework("onnx")
    return _frontend


def _ov_core() -> Any:
    global _core
    if _core is None:
        import openvino

        _core = openvino.Core()
    return _core


def _first_lines(error: BaseException, count: int = 4) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:count]) or type(error).__name__


def has_converter(domain: str, op_type: str, opset: int, inputs: int = 1, outputs: int = 1) -> bool:
    """Whether OpenVINO's ONNX frontend has a converter for `domain.op_type` at `opset`.

    Converts a one-node model with inputs of unknown shape: "no conversion rule" means no; success,
    or a converter that rejects the probe's made-up inputs, means yes. Cached per op and arity.
    """
    domain = "" if domain == "ai.onnx" else domain
    key = (domain, op_type, opset, inputs, outputs)
    if key not in _probes:
        from onnx import TensorProto, helper

        names = [f"i{k}" for k in range(inputs)]
        results = [f"o{k}" for k in range(outputs)]
        graph = helper.make_graph(
            [helper.make_node(op_type, names, results, domain=domain)],
            "probe",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in results],
        )
        imports = [helper.make_opsetid("", 18 if domain else opset)]
        if domain:
            imports.append(helper.make_opsetid(domain, opset))
        proto = helper.make_model(graph, opset_imports=imports)
        frontend = _onnx_frontend()
        try:
            frontend.convert(frontend.load(io.BytesIO(proto.SerializeToString())))
            supported = True
        except Exception as error:  # OpConversionFailure, or the converter rejecting the probe
            supported = _NO_CONVERTER not in str(error)
        _probes[key] = supported
    return _probes[key]


def convert(model: Model) -> tuple[Any, tempfile.TemporaryDirectory[str] | None]:
    """An `openvino.Model` of `model`, from its ONNX export (in memory below 2 GB).

    Over 2 GB the export goes through a temp folder with external data, which OpenVINO maps
    rather than copies; the folder is returned and must outlive the converted model.
    """
    from graphopt.backends.onnx import save_onnx, to_onnx

    frontend = _onnx_frontend()
    proto = to_onnx(model)
    folder: tempfile.TemporaryDirectory[str] | None = None
    try:
        if proto.ByteSize() < _PROTOBUF_LIMIT:
            source: Any = io.BytesIO(proto.SerializeToString())
        else:
            folder = tempfile.TemporaryDirectory(prefix="graphopt-openvino-")
            source = os.path.join(folder.name, "model.onnx")
            save_onnx(model, source, external_data=True)
        del proto
        return frontend.convert(frontend.load(source)), folder
    except Exception as error:  # OpenVINO raises its own types (OpConversionFailure, RuntimeError)
        if folder is not None:
            folder.cleanup()
        raise BackendError(
            f"OpenVINO cannot convert the model: {_first_lines(error)}",
            hint="`graphopt backends` lists other backends; --target onnxruntime runs any ONNX op",
        ) from None


def _port_name(port: Any, graph_inputs: Sequence[str]) -> str:
    """The graph input name of a compiled model's input port. The plugin's transformations merge
    tensor names (an input may answer `get_any_name()` with the name of a Squeeze after it), so
    the port's every name is searched for one of the graph's input names."""
    names = port.get_names()
    return next((n for n in graph_inputs if n in names), str(port.get_any_name()))


class OpenVinoExecutable(Executable):
    """A model compiled for one OpenVINO device, with one infer request reused across runs."""

    def __init__(
        self,
        ov_model: Any,
        compiled: Any,
        output_names: Sequence[str],
        graph_inputs: Sequence[str] = (),
        defaults: Mapping[str, np.ndarray] | None = None,
        keep: Any = None,
    ):
        """`graph_inputs`: the IR graph's input names; `defaults`: those with an initializer
        default; `keep`: what must live as long as the model (a temp folder of weights)."""
        self.ov_model = ov_model
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.input_names = [_port_name(port, graph_inputs) for port in compiled.inputs]
        self.output_names = list(output_names)
        if len(compiled.outputs) != len(self.output_names):
            raise BackendError(
                f"OpenVINO compiled {len(compiled.outputs)} outputs for the graph's "
                f"{len(self.output_names)}"
            )
        self._keep = keep  # the temp folder whose external data ov_model maps, if any
        # graph inputs with an initializer default: the frontend folds them into constants (fed
        # from the default if a frontend version keeps one as an input); unused graph inputs
        # are dropped by OpenVINO, and feeding them is allowed
        self._defaults = dict(defaults or {})
        self._folded = {n for n in self._defaults if n not in self.input_names}
        self._known = set(graph_inputs) | set(self._defaults)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds: dict[int, Any] = {}
        for i, name in enumerate(self.input_names):
            value = inputs.get(name)
            if value is None:
                value = self._defaults.get(name)
            if value is None:  # OpenVINO would run on uninitialized memory
                raise BackendError(
                    f"input '{name}' is missing", hint=f"inputs: {', '.join(self.input_names)}"
                )
            feeds[i] = value
        if len(inputs) > len(feeds):
            self._check_extra(inputs)
        try:
            results = self.request.infer(feeds, share_inputs=True, share_outputs=False)
        except Exception as error:
            raise BackendError(f"OpenVINO failed to run the model: {_first_lines(error)}") from None
        return {name: results[i] for i, name in enumerate(self.output_names)}

    def _check_extra(self, inputs: Mapping[str, np.ndarray]) -> None:
        extra = set(inputs) - set(self.input_names)
        folded = sorted(extra & self._folded)
        if folded:
            raise BackendError(
                f"OpenVINO took the default (initializer) of input(s) {', '.join(folded)} as a "
                "constant: they cannot be fed",
                hint="make them plain inputs or constants, or use --target onnxruntime",
            )
        unknown = sorted(extra - self._known)
        if unknown:
            raise BackendError(
                f"not inputs of the model: {', '.join(unknown)}",
                hint=f"inputs: {', '.join(self.input_names)}",
            )

    def property(self, name: str) -> Any:
        """A property of the compiled model, e.g. `INFERENCE_NUM_THREADS`."""
        return self.compiled.get_property(name)

    def save(self, path: str) -> list[str]:
        """Write OpenVINO IR: `path` (must end in `.xml`) and the weights beside it (`.bin`)."""
        import openvino

        if not path.endswith(".xml"):
            raise BackendError(
                f"OpenVINO IR is an .xml file with a .bin beside it, not '{path}'",
                hint="give a path ending in .xml",
            )
        xml = os.path.abspath(path)
        weights = xml[: -len(".xml")] + ".bin"
        folder = os.path.dirname(xml)
        try:
            temp = tempfile.mkdtemp(prefix=f".{os.path.basename(xml)}.tmp", dir=folder)
        except OSError as error:
            raise BackendError(f"cannot write {path}: {error.strerror}") from None
        try:
            openvino.save_model(
                self.ov_model, os.path.join(temp, "model.xml"), compress_to_fp16=False
            )
            os.replace(os.path.join(temp, "model.bin"), weights)
            os.replace(os.path.join(temp, "model.xml"), xml)
        except OSError as error:
            raise BackendError(f"cannot write {path}: {error.strerror}") from None
        except Exception as error:
            raise BackendError(f"OpenVINO cannot save the model: {_first_lines(error)}") from None
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        return [xml, weights]


@register_backend
class OpenVinoBackend(Backend):
    name = "openvino"
    description = "OpenVINO runtime, CPU plugin, fp32 (standard ONNX ops, some com.microsoft)"
    targets = ("cpu",)

    def unavailable(self) -> str | None:
        try:
            import openvino  # noqa: F401
        except ImportError:
            return "the openvino package is not installed (pip install openvino)"
        return None

    def supports(self, node: Node, opset: int) -> bool:
        if node.domain == "ai.onnx.ml":
            return False
        return has_converter(
            node.domain,
            node.op_type,
            opset if node.domain in _STANDARD_DOMAINS else 1,
            len(node.inputs),
            len(node.outputs),
        )

    def compile(
        self, model: Model, target: str | None = None, *, threads: int | None = None,
        **options: Any,
    ) -> OpenVinoExecutable:  # fmt: skip
        """Compile for OpenVINO's CPU plugin: fp32, `threads` inference threads (default: the
        plugin's choice, all cores), latency hint (one stream)."""
        if target not in (None, "cpu", "CPU"):
            raise BackendError(
                f"openvino has no target '{target}'", hint=f"targets: {', '.join(self.targets)}"
            )
        missing = self.unsupported(model)
        if missing:
            names = ", ".join(n.describe() for n in missing[:3])
            raise BackendError(
                f"openvino cannot run {len(missing)} node(s): {names}",
                hint="use --target onnxruntime, or optimize for target onnx (standard ops only)",
            )
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            if threads < 1:
                raise BackendError(f"threads must be at least 1, not {threads}")
            config["INFERENCE_NUM_THREADS"] = int(threads)
        ov_model, keep = convert(model)
        try:
            compiled = _ov_core().compile_model(ov_model, "CPU", config)
        except Exception as error:
            raise BackendError(
                f"OpenVINO cannot compile the model: {_first_lines(error)}"
            ) from None
        defaults = {
            v.name or "": v.const_value for v in model.graph.inputs if v.const_value is not None
        }
        inputs, outputs = [v.name or "" for v in model.graph.inputs], model.graph.output_names
        return OpenVinoExecutable(ov_model, compiled, list(outputs), inputs, defaults, keep)
