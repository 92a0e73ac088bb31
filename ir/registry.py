"""The op registry: what graphopt knows about each op, in one table.

Every consumer of op knowledge reads this table: the reference interpreter (the `kernel`), type and
shape inference and the verifier (`infer`), fusion checks (`schema`), and the placement and cost
reports (`cost`). An entry is looked up by domain-qualified op name and the opset version the model
imports for that domain:

    entry = REGISTRY.lookup("Conv", opset=17)
    entry.schema          # onnx.defs.OpSchema for standard ops, None for ops of our own
    entry.kernel          # factory: kernel = entry.kernel(node, env); outputs = kernel(*arrays)
    entry.infer           # (node, InferenceInputs) -> output types
    entry.cost            # (node, input types, output types) -> Cost

Standard ONNX ops need no registration: their entry is made on first lookup from `onnx.defs`, with
ONNX's own shape inference and the `onnx` package's reference kernels as defaults (see
`graphopt.ir.ops.onnx_reference`). Registrations override single fields: graphopt's own fast numpy
kernels for hot ops (Conv, pooling), control flow that must run IR subgraphs, and every op a pass
introduces. Registering an op twice for the same field is an error, so two plugins cannot silently
shadow each other.

    @register_kernel("com.example.Swish")
    def swish(node, env):
        beta = node.get_attr("beta", 1.0)
        return lambda x: (x / (1 + np.exp(-beta * x))).astype(x.dtype)
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from graphopt.ir.core import Graph, Node, join_op, split_op
from graphopt.ir.types import Type

__all__ = [
    "REGISTRY",
    "Cost",
    "InferenceInputs",
    "KernelEnv",
    "OpEntry",
    "OpRegistry",
    "register_cost",
    "register_inference",
    "register_kernel",
]

DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Cost:
    """Work an op does: floating-point (or integer) operations, and bytes read plus written.

    `exact` is False when some dims were unknown or symbolic and were counted as 1."""

    flops: int = 0
    bytes: int = 0
    exact: bool = True

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes, self.exact and other.exact)


class KernelEnv(Protocol):
    """What a kernel factory may ask of the interpreter that prepares it."""

    def opset(self, domain: str) -> int:
        """The opset version the model imports for `domain`."""

    @property
    def opset_imports(self) -> Mapping[str, int]: ...

    @property
    def functions(self) -> Sequence[Any]:
        """The model's local functions (`onnx.FunctionProto`)."""

    def input_types(self, node: Node) -> list[Type | None]:
        """The IR types of `node`'s inputs (None where unknown or omitted)."""


class Frame(Protocol):
    """What a control-flow kernel receives at run time: a way to run a subgraph in the current
    scope (its nodes may read values of enclosing graphs)."""

    def run_graph(self, graph: Graph, inputs: Sequence[Any]) -> list[Any]: ...


Kernel = Callable[..., Any]
"""Called with the input arrays (None for omitted optional inputs) and returns one array or a
sequence of outputs. Control-flow kernels take a `Frame` first (see `needs_frame`)."""

KernelFactory = Callable[[Node, KernelEnv], Kernel]


class InferenceInputs:
    """What type inference knows about a node's inputs: their types, the values of the constant
    ones (small constants only; looked up on first use), and the model's opset imports."""

    def __init__(
        self,
        types: list[Type | None],
        constants: list[Any | None] | Callable[[], list[Any | None]],
        opset_imports: Mapping[str, int],
    ):
        self.types = types
        self._constants = constants
        self.opset_imports = opset_imports

    @property
    def constants(self) -> list[Any | None]:
        if callable(self._constants):
            self._constants = self._constants()
        return self._constants

    def opset(self, domain: str) -> int:
        return _opset_for(self.opset_imports, domain)


InferFn = Callable[[Node, InferenceInputs], list[Type | None]]
CostFn = Callable[[Node, list[Type | None], list[Type | None]], Cost]


@dataclass
class OpEntry:
    """Everything graphopt knows about one op at one opset version."""

    domain: str
    op_type: str
    schema: Any = None  # onnx.defs.OpSchema
    kernel: KernelFactory | None = None
    needs_frame: bool = False
    infer: InferFn | None = None
    cost: CostFn | None = None
    doc: str = ""

    @property
    def op(self) -> str:
        return join_op(self.domain, self.op_type)

    @property
    def is_standard(self) -> bool:
        return self.schema is not None


@dataclass
class _Overrides:
    kernel: KernelFactory | None = None
    needs_frame: bool = False
    kernel_since: int = 1
    infer: InferFn | None = None
    cost: CostFn | None = None
    doc: str = ""


class OpRegistry:
    """The table. Lookups are cached per (op, opset); registration clears the cache."""

    def __init__(self) -> None:
        self._overrides: dict[tuple[str, str], _Overrides] = {}
        self._defaults: list[Callable[[OpEntry], None]] = []
        self._cache: dict[tuple[str, int | None], OpEntry | None] = {}

    def register(
        self,
        op: str,
        *,
        kernel: KernelFactory | None = None,
        needs_frame: bool = False,
        since: int = 1,
        infer: InferFn | None = None,
        cost: CostFn | None = None,
        doc: str = "",
    ) -> None:
        """Give `op` a kernel, inference or cost function (any subset). A kernel registered with
        `since=N` is used for models importing opset N or later of the op's domain."""
        key = _key(op)
        entry = self._overrides.setdefault(key, _Overrides())
        for name, value in (("kernel", kernel), ("infer", infer), ("cost", cost)):
            if value is None:
                continue
            if getattr(entry, name) is not None:
                raise ValueError(f"op '{op}' already has a registered {name}")
            setattr(entry, name, value)
        if kernel is not None:
            entry.needs_frame = needs_frame
            entry.kernel_since = since
        if doc:
            entry.doc = doc
        self._cache.clear()

    def add_defaults(self, fill: Callable[[OpEntry], None]) -> None:
        """Register a function that fills the fields an entry still lacks (used for the standard
        ONNX ops: ONNX's inference and reference kernels)."""
        self._defaults.append(fill)
        self._cache.clear()

    def lookup(self, op: str, opset: int | None = None) -> OpEntry | None:
        """The entry for `op` at `opset` (the domain's version), or None for an op nobody knows."""
        try:
            return self._cache[op, opset]
        except KeyError:
            _ensure_builtin_ops()
            entry = self._cache[op, opset] = self._build(op, opset)
            return entry

    def _build(self, op: str, opset: int | None) -> OpEntry | None:
        domain, op_type = _key(op)
        schema = _schema(op_type, domain, opset)
        overrides = self._overrides.get((domain, op_type))
        if schema is None and overrides is None:
            return None
        entry = OpEntry(domain, op_type, schema)
        if overrides is not None:
            if overrides.kernel is not None and (opset is None or opset >= overrides.kernel_since):
                entry.kernel = overrides.kernel
                entry.needs_frame = overrides.needs_frame
            entry.infer = overrides.infer
            entry.cost = overrides.cost
            entry.doc = overrides.doc
        if schema is not None:
            entry.doc = entry.doc or (schema.doc or "").strip().split("\n")[0]
        for fill in self._defaults:
            fill(entry)
        return entry

    def known_ops(self) -> list[str]:
        """Every op with an entry: registered ones and the standard ONNX ops."""
        _ensure_builtin_ops()
        names = {join_op(*key) for key in self._overrides}
        names.update(join_op(s.domain, s.name) for s in _all_schemas())
        return sorted(names)

    def suggest(self, op: str) -> list[str]:
        """Known op names close to `op` (for 'did you mean' hints)."""
        return difflib.get_close_matches(op, self.known_ops(), n=3, cutoff=0.6)


def _key(op: str) -> tuple[str, str]:
    domain, op_type = split_op(op)
    return ("" if domain in DEFAULT_DOMAINS else domain), op_type


def _opset_for(opsets: Mapping[str, int], domain: str) -> int:
    if domain in DEFAULT_DOMAINS:
        return int(opsets.get("", opsets.get("ai.onnx", 1)))
    return int(opsets.get(domain, 1))


@functools.lru_cache(maxsize=4096)
def _schema(op_type: str, domain: str, opset: int | None) -> Any:
    import onnx.defs

    try:
        if opset is None:
            return onnx.defs.get_schema(op_type, domain)
        return onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return None


@functools.lru_cache(maxsize=1)
def _all_schemas() -> list[Any]:
    import onnx.defs

    return list(onnx.defs.get_all_schemas())


REGISTRY = OpRegistry()


def register_kernel(
    op: str, *, since: int = 1, needs_frame: bool = False
) -> Callable[[KernelFactory], KernelFactory]:
    """Decorator: `@register_kernel("Conv")` on a factory `(node, env) -> kernel`."""

    def decorate(factory: KernelFactory) -> KernelFactory:
        REGISTRY.register(op, kernel=factory, since=since, needs_frame=needs_frame)
        return factory

    return decorate


def register_inference(op: str) -> Callable[[InferFn], InferFn]:
    """Decorator: `@register_inference("com.microsoft.Gelu")` on `(node, inputs) -> types`."""

    def decorate(fn: InferFn) -> InferFn:
        REGISTRY.register(op, infer=fn)
        return fn

    return decorate


def register_cost(op: str) -> Callable[[CostFn], CostFn]:
    """Decorator: `@register_cost("MatMul")` on `(node, input types, output types) -> Cost`."""

    def decorate(fn: CostFn) -> CostFn:
        REGISTRY.register(op, cost=fn)
        return fn

    return decorate


_BUILTINS_LOADED = False


def _ensure_builtin_ops() -> None:
    """Import the modules that register graphopt's own kernels and the ONNX defaults (once)."""
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        import graphopt.ir.ops  # noqa: F401  (registers on import)
