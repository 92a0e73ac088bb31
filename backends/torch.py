"""The `torch` backend: an IR model as a `torch.fx.GraphModule`, to run (CPU or CUDA) and to train.

    module = to_graph_module(model)              # torch.fx.GraphModule; module(*inputs)
    executable = get_backend("torch").compile(model, target="cuda")
    outputs = executable.run({"x": x})           # name -> numpy array, like every backend
    write_weights(model, module)                 # trained values back into the IR model

One fx node per IR node, calling the op's translation (`torch_ops.OPS`, `torch_ops_nn.OPS`: a
table from op name to a function of torch tensors) with the node's inputs and its attributes as
keyword arguments; the generated `forward` reads like the graph. Shapes are read at run time,
so symbolic dims take any size. An op without a translation (or a node with subgraphs) makes
`to_graph_module` raise one `BackendError` naming the nodes and ops.

Initializers become module state, named `w_<initializer name>` (`module.graphopt.weights` maps
initializer names to attribute names):

- float initializers are `nn.Parameter`s (trainable), except the scales of QuantizeLinear /
  DequantizeLinear, which are buffers: the quantization grid stays fixed while training;
- other initializers (integer, bool) are buffers;
- a quantized weight (an integer initializer read only as the data of DequantizeLinear nodes
  with a constant scale) is held as a float *latent* parameter equal to its dequantized value,
  and each of those DequantizeLinear nodes re-quantizes it in the forward pass
  (`torch_ops_nn.dequantize_latent`, a straight-through estimator: quantization-aware
  training). `write_weights` quantizes the trained latent onto the same grid, so the written
  model computes exactly what the module computed.

Integer results of QuantizeLinear travel as float tensors of whole numbers (see `torch_ops_nn`);
outputs are converted back to each graph output's declared element type.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from graphopt.backends.base import Backend, BackendError, Executable, register_backend
from graphopt.ir.core import AttrKind, Model, Node, Value
from graphopt.ir.types import DType, TensorType

if TYPE_CHECKING:
    import torch
    import torch.fx

__all__ = [
    "Binding",
    "QuantizedWeight",
    "TorchBackend",
    "TorchExecutable",
    "from_tensor",
    "to_graph_module",
    "to_tensor",
    "translations",
    "write_weights",
]

_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class QuantizedWeight:
    """A quantized initializer held as a float latent parameter (see the module docstring)."""

    latent: str  # attribute of the float latent
    scale: str  # attribute of the scale buffer
    zero_point: str | None
    axis: int
    block_size: int
    qtype: int  # ONNX element type of the initializer


@dataclass
class Binding:
    """What ties a GraphModule to its IR model: names in and out, and where each weight is."""

    input_names: list[str]
    output_names: list[str]
    output_dtypes: list[np.dtype | None]
    weights: dict[str, str] = field(default_factory=dict)  # initializer -> attribute
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)


@functools.cache
def translations() -> dict[str, Callable[..., Any]]:
    """The op table: op name -> function of torch tensors."""
    from graphopt.backends import torch_ops, torch_ops_nn

    return {**torch_ops.OPS, **torch_ops_nn.OPS}


# ----- numpy <-> torch ------------------------------------------------------------------------


def to_tensor(array: Any) -> torch.Tensor:
    """A torch tensor holding `array` (copied; int4/uint4 widened to int8/uint8, bfloat16 kept)."""
    import torch

    a = np.asarray(array)
    if a.dtype.kind in "OUS":
        raise BackendError(f"the torch backend cannot hold {a.dtype} tensors")
    code = DType.from_numpy(a.dtype)
    if code in (DType.INT4, DType.UINT4):
        a = a.astype(np.int8 if code is DType.INT4 else np.uint8)
    elif code is DType.BFLOAT16:
        return torch.tensor(a.astype(np.float32)).to(torch.bfloat16)
    elif code not in _TORCH_CODES:
        raise BackendError(f"the torch backend cannot hold {code.short_name} tensors")
    return torch.from_numpy(np.array(a, order="C", copy=True))  # (keeps 0-d arrays 0-d)


_TORCH_CODES = {
    DType.FLOAT, DType.UINT8, DType.INT8, DType.UINT16, DType.INT16, DType.INT32, DType.INT64,
    DType.BOOL, DType.FLOAT16, DType.DOUBLE, DType.UINT32, DType.UINT64,
}  # fmt: skip


def from_tensor(tensor: Any, dtype: np.dtype | None = None) -> np.ndarray:
    """A numpy copy of `tensor`, converted to `dtype` when given."""
    import torch

    t = tensor.detach().cpu() if isinstance(tensor, torch.Tensor) else torch.as_tensor(tensor)
    if t.dtype == torch.bfloat16:
        t = t.float()
    array = t.numpy()
    if dtype is not None and array.dtype != dtype:
        array = array.astype(dtype)
    return np.asarray(array)


# ----- IR -> fx -------------------------------------------------------------------------------


def _identifier(name: str, taken: set[str]) -> str:
    base = "w_" + re.sub(r"\W", "_", name)
    candidate, n = base, 0
    while candidate in taken:
        n += 1
        candidate = f"{base}_{n}"
    taken.add(candidate)
    return candidate


def _attr_value(node: Node, name: str) -> Any:
    a = node.attrs[name]
    if a.kind in (AttrKind.GRAPH, AttrKind.GRAPHS) or a.kind is AttrKind.TENSOR:
        raise BackendError(
            f"{node.describe()}: the torch backend has no translation for attribute '{name}' "
            f"of op {node.op}"
        )
    value = node.get_attr(name)
    return list(value) if isinstance(value, (list, tuple)) else value


def _qtype(node: Node) -> int:
    """The element type a QuantizeLinear writes (or a DequantizeLinear reads)."""
    value = node.outputs[0] if node.op_type == "QuantizeLinear" else node.inputs[0]
    if value is not None and isinstance(value.type, TensorType):
        if value.type.dtype.is_integer:
            return int(value.type.dtype)
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    if zero is not None and isinstance(zero.type, TensorType):
        return int(zero.type.dtype)
    return int(node.get_attr("output_dtype", 0) or DType.UINT8)


def _extra_kwargs(node: Node) -> dict[str, Any]:
    """Keyword arguments some ops need beyond their plain attributes."""
    if node.op == "QuantizeLinear":
        return {"qtype": _qtype(node)}
    if node.op == "ConstantOfShape":
        tensor = node.get_attr("value")
        array = np.zeros(1, np.float32) if tensor is None else np.asarray(tensor)
        return {"value": array.reshape(-1)[0].item(), "dtype": int(DType.from_numpy(array.dtype))}
    return {}


def _constant_node_value(node: Node) -> np.ndarray:
    for name, a in node.attrs.items():
        if name == "value":
            return np.asarray(a.value)
        if name in ("value_float", "value_int"):
            return np.asarray(a.value, np.float32 if name == "value_float" else np.int64)
        if name in ("value_floats", "value_ints"):
            return np.asarray(a.value, np.float32 if name == "value_floats" else np.int64)
    raise BackendError(f"{node.describe()}: the torch backend cannot read this Constant")


def _unsupported(model: Model, table: Mapping[str, Any]) -> list[Node]:
    return [
        node
        for node in model.graph
        if (node.op not in table and node.op != "Constant") or node.subgraphs()
    ]


def _latent_candidates(model: Model) -> dict[Value, Node]:
    """Integer initializers read only as the data of DequantizeLinear with a constant scale."""
    found: dict[Value, Node] = {}
    for value in model.graph.initializers.values():
        t = value.type
        if not (value.is_constant and isinstance(t, TensorType) and t.dtype.is_integer):
            continue
        if int(t.dtype) not in _quant_ranges():
            continue
        uses = value.uses
        if not uses or not all(n.op == "DequantizeLinear" and i == 0 for n, i in uses):
            continue
        first = uses[0][0]
        same = all(
            n.inputs[1:] == first.inputs[1:] and n.attrs == first.attrs for n, _ in uses
        )  # one latent serves every reader only if they all dequantize alike
        scale = first.inputs[1]
        if same and scale is not None and scale.is_constant:
            found[value] = first
    return found


def _quant_ranges() -> dict[int, tuple[int, int]]:
    from graphopt.backends.torch_ops_nn import QUANT_RANGES

    return QUANT_RANGES


def to_graph_module(model: Model, device: str | None = None) -> torch.fx.GraphModule:
    """The model's main graph as a GraphModule (see the module docstring); `device` moves it."""
    table = translations()
    missing = _unsupported(model, table)
    if missing:
        listed = ", ".join(f"{n.describe()} (op {n.op})" for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise BackendError(
            f"the torch backend has no translation for {listed}{more}",
            hint="add one to graphopt.backends.torch_ops (a function of torch tensors), or run "
            "the model with another backend",
        )
    builder = _ModuleBuilder(model)
    builder.add_inputs()
    builder.add_initializers()
    builder.add_latents()
    for node in model.graph:
        builder.add_node(node, table)
    return builder.finish(device)


class _ModuleBuilder:
    """Builds the fx graph and the module state of one model, node by node."""

    def __init__(self, model: Model):
        import torch
        import torch.fx

        self.model = model
        graph = model.graph
        self.root = torch.nn.Module()
        self.fx = torch.fx.Graph()
        self.env: dict[Value, torch.fx.Node] = {}
        self.taken: set[str] = set()
        names = graph.output_names
        self.binding = Binding(
            input_names=[],
            output_names=[
                (names[i] if i < len(names) else "") or v.name or f"output_{i}"
                for i, v in enumerate(graph.outputs)
            ],
            output_dtypes=[_declared_dtype(v) for v in graph.outputs],
        )
        self.latent_of = _latent_candidates(model)
        self.scales = {  # scales and zero points of Q/DQ nodes are buffers
            n.inputs[i] for n in graph for i in (1, 2) if n.op in _QDQ and len(n.inputs) > i
        }
        self.opsets = dict(model.opset_imports)

    def hold(self, value: Value, array: np.ndarray, trainable: bool = True) -> torch.fx.Node:
        """Module state for `value`: a Parameter if float and trainable, else a buffer."""
        import torch

        attr = _identifier(value.name or "const", self.taken)
        tensor = to_tensor(array)
        if trainable and tensor.dtype.is_floating_point and value not in self.scales:
            self.root.register_parameter(attr, torch.nn.Parameter(tensor))
        else:
            self.root.register_buffer(attr, tensor)
        self.binding.weights[value.name or attr] = attr
        return self.fx.get_attr(attr)

    def add_inputs(self) -> None:
        """Placeholders, in graph order; inputs with a default come last, as optional ones."""
        inputs = self.model.graph.inputs
        for value in [v for v in inputs if v.const_value is None]:
            self.env[value] = self.fx.placeholder(_identifier(value.name or "x", self.taken)[2:])
            self.binding.input_names.append(value.name or "")
        for value in [v for v in inputs if v.const_value is not None]:
            name = _identifier(value.name or "x", self.taken)[2:]
            given = self.fx.placeholder(name, default_value=None)
            default = self.hold(value, value.const_value)  # type: ignore[arg-type]
            self.env[value] = self.fx.call_function(_default, (given, default))
            self.binding.input_names.append(value.name or "")

    def add_initializers(self) -> None:
        for value in self.model.graph.initializers.values():
            if value in self.env or value.const_value is None or value in self.latent_of:
                continue  # (latents are held by add_latents)
            self.env[value] = self.hold(value, value.const_value)

    def add_latents(self) -> None:
        """Quantized weights as float latents equal to their dequantized values."""
        import torch

        for value, dq in self.latent_of.items():
            scale, zero = dq.inputs[1], dq.inputs[2] if len(dq.inputs) > 2 else None
            assert scale is not None and value.const_value is not None
            axis, block = int(dq.get_attr("axis", 1)), int(dq.get_attr("block_size", 0))
            weights = self.binding.weights
            s = self.root.get_buffer(weights[scale.name or ""])
            z = self.root.get_buffer(weights[zero.name or ""]) if zero is not None else None
            initial = _dequantize_exact(to_tensor(value.const_value), s, z, axis, block)
            attr = _identifier((value.name or "q") + "_latent", self.taken)
            self.root.register_parameter(attr, torch.nn.Parameter(initial.detach().clone()))
            self.binding.quantized[value.name or attr] = QuantizedWeight(
                attr, weights[scale.name or ""],
                None if zero is None else weights[zero.name or ""], axis, block,
                int(value.type.dtype),  # type: ignore[union-attr]
            )  # fmt: skip
            self.env[value] = self.fx.get_attr(attr)

    def add_node(self, node: Node, table: Mapping[str, Callable[..., Any]]) -> None:
        """One call of the op's translation (and one getitem per used output of several)."""
        from graphopt.backends.torch_ops_nn import dequantize_latent

        if node.op == "Constant":
            value = node.outputs[0]  # a buffer: there is no initializer to write it back to
            self.env[value] = self.hold(value, _constant_node_value(node), trainable=False)
            return
        fn = table[node.op]
        kwargs = {
            name: _attr_value(node, name)
            for name in node.attrs
            if not (node.op == "ConstantOfShape" and name == "value")  # in _extra_kwargs
        }
        kwargs.update(_extra_kwargs(node))
        data = node.inputs[0] if node.inputs else None
        if node.op == "DequantizeLinear" and data in self.latent_of:
            fn = dequantize_latent
            kwargs["qtype"] = int(data.type.dtype)  # type: ignore[union-attr]
        params = _parameters(fn)
        if "opset" in params:
            domain = node.domain or ""
            kwargs["opset"] = int(self.opsets.get(domain, self.opsets.get("ai.onnx", 1)))
        if "n_out" in params:
            kwargs["n_out"] = len(node.outputs)
        args = tuple(None if v is None else self.env[v] for v in node.inputs)
        while args and args[-1] is None:
            args = args[:-1]
        name = re.sub(r"\W", "_", node.outputs[0].name or node.op_type.lower()) or "v"
        call = self.fx.create_node("call_function", fn, args, kwargs, name=name)
        call.meta["graphopt_node"] = node.describe()
        if len(node.outputs) == 1:
            self.env[node.outputs[0]] = call
            return
        for index, value in enumerate(node.outputs):
            if value.is_used:
                self.env[value] = self.fx.call_function(_item, (call, index))

    def finish(self, device: str | None) -> torch.fx.GraphModule:
        import torch.fx

        self.fx.output(tuple(self.env[v] for v in self.model.graph.outputs))
        module = torch.fx.GraphModule(self.root, self.fx, class_name="GraphoptModule")
        module.graphopt = self.binding  # type: ignore[assignment]
        return module.to(device) if device else module


def _dequantize_exact(q: Any, s: Any, z: Any, axis: int, block: int) -> Any:
    from graphopt.backends.torch_ops_nn import OPS

    return OPS["DequantizeLinear"](q, s, z, axis=axis, block_size=block)


def _declared_dtype(value: Value) -> np.dtype | None:
    t = value.type
    if isinstance(t, TensorType) and t.dtype not in (DType.STRING, DType.UNDEFINED):
        return t.dtype.numpy
    return None


def _default(given: Any, default: Any) -> Any:
    return default if given is None else given


def _item(values: Sequence[Any], index: int) -> Any:
    return values[index]


_PARAMS: dict[Callable[..., Any], frozenset[str]] = {}


def _parameters(fn: Callable[..., Any]) -> frozenset[str]:
    found = _PARAMS.get(fn)
    if found is None:
        try:
            found = frozenset(inspect.signature(fn).parameters)
        except (TypeError, ValueError):  # builtins such as torch.add
            found = frozenset()
        _PARAMS[fn] = found
    return found


def binding_of(module: Any) -> Binding:
    binding = getattr(module, "graphopt", None)
    if not isinstance(binding, Binding):
        raise BackendError("this module was not made by graphopt.backends.torch.to_graph_module")
    return binding


def write_weights(model: Model, module: Any) -> list[str]:
    """Copy the module's current parameters and buffers into the model's initializers (same
    names, same element types; quantized weights re-quantized from their latents). Returns the
    names of the initializers whose values changed."""
    import torch

    from graphopt.backends.torch_ops_nn import quantize_values

    binding = binding_of(module)
    initializers = model.graph.initializers
    changed = []
    with torch.no_grad():
        for name, attr in binding.weights.items():
            value = initializers.get(name)
            if value is None or value.const_value is None or name in binding.quantized:
                continue
            old = value.const_value
            new = from_tensor(getattr(module, attr), old.dtype).reshape(old.shape)
            if not np.array_equal(new, old):
                value.const_value = new
                changed.append(name)
        for name, q in binding.quantized.items():
            value = initializers[name]
            codes_before = value.const_value
            assert codes_before is not None
            zero = getattr(module, q.zero_point) if q.zero_point else None
            codes = quantize_values(
                getattr(module, q.latent), getattr(module, q.scale), zero, q.axis,
                q.block_size, _quant_ranges()[q.qtype],
            )  # fmt: skip
            new = from_tensor(codes.to(torch.int32))
            new = new.astype(codes_before.dtype).reshape(codes_before.shape)
            if not np.array_equal(new.astype(np.int32), codes_before.astype(np.int32)):
                value.const_value = new
                changed.append(name)
    return changed


# ----- the backend -----------------------------------------------------------------------------


class TorchExecutable(Executable):
    """A GraphModule on a device, run on numpy inputs without gradients."""

    def __init__(self, model: Model, device: str):
        self.module = to_graph_module(model, device)
        self.device = device
        binding = binding_of(self.module)
        self.input_names = list(binding.input_names)
        self.output_names = list(binding.output_names)

    def tensors(self, inputs: Mapping[str, np.ndarray]) -> list[Any]:
        binding = binding_of(self.module)
        unknown = sorted(set(inputs) - set(binding.input_names))
        if unknown:
            raise BackendError(
                f"not inputs of the model: {', '.join(unknown)}",
                hint=f"the model's inputs are: {', '.join(binding.input_names)}",
            )
        return [
            to_tensor(inputs[name]).to(self.device) if name in inputs else None
            for name in binding.input_names
        ]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        binding = binding_of(self.module)
        args = self.tensors(inputs)
        with torch.no_grad():
            try:
                results = self.module(*args)
            except Exception as error:
                raise _locate(self.module, args, error) from error
        return {
            name: from_tensor(t, dtype)
            for name, t, dtype in zip(
                binding.output_names, results, binding.output_dtypes, strict=True
            )
        }


def _locate(module: Any, args: list[Any], error: Exception) -> BackendError:
    """The failure as a BackendError naming the IR node: the run is repeated node by node."""
    import torch.fx

    where: dict[str, str] = {}

    class Tracker(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            where["node"] = n.meta.get("graphopt_node", n.name)
            return super().run_node(n)

    try:
        Tracker(module).run(*args)
    except Exception as again:
        error = again
    node = where.get("node", "an unknown node")
    return BackendError(f"{node} failed in torch: {type(error).__name__}: {error}")


@register_backend
class TorchBackend(Backend):
    name = "torch"
    description = "PyTorch (torch.fx GraphModule), CPU or CUDA; trainable (graphopt distill)"
    targets = ("cpu", "cuda")

    def unavailable(self) -> str | None:
        try:
            import torch  # noqa: F401
        except ImportError:
            return "the torch package is not installed (pip install torch)"
        return None

    def supports(self, node: Node, opset: int) -> bool:
        return (node.op in translations() or node.op == "Constant") and not node.subgraphs()

    def compile(
        self, model: Model, target: str | None = None, *, threads: int | None = None,
        device: str | None = None, **options: Any,
    ) -> Executable:  # fmt: skip
        import torch

        device = device or target or "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError("target cuda: torch sees no CUDA device here")
        if threads is not None:
            torch.set_num_threads(threads)
        return TorchExecutable(model, device)
