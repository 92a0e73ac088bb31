"""Lower a graphopt IR model straight to a TVM Relax module (no ONNX round trip).

`lower_model(model, dims=...)` walks the main graph in order and emits one Relax binding per op
through a `relax.BlockBuilder`, inside one dataflow block of a function `main` whose parameters are
the graph's runtime inputs and which returns a tuple of the graph outputs. Weights are bound as
constants (`relax.const`), so TVM's `FoldConstant` can pre-transpose them and the compiled library
is self-contained.

Shapes stay symbolic: each symbolic dim of the inputs (`batch`, `sequence`) becomes one `int64`
TIR variable shared by every input that names it, unless `dims` binds it to a number (tuning and
benchmarks do: MetaSchedule wants static shapes). Shape arithmetic is done at compile time: a
small integer tensor whose elements are known (a constant, or computed from shapes: `Shape`,
`Gather`, `Concat`, `Slice`, integer `Add`/`Mul`/`Div`, ...) is tracked as a `Known` value, a numpy
object array of Python ints and TIR expressions, and becomes a tensor only if a data op reads it.
So the Shape -> Gather -> Concat -> Reshape chains of exported transformers turn into
`reshape(x, (batch, sequence, 64))`, not into runtime shape tensors. A shape that depends on
data (not on shapes) falls back to `tensor_to_shape` with fresh variables.

Every node output must leave with a shape Relax knows (dims, not only a rank): an op whose result
shape Relax cannot derive is never legalized, and the build then fails far from the node. Where
ONNX semantics fix a dim that Relax cannot prove (`batch` broadcast against 2 is 2; concatenated
operands agree off the axis), the operands are made explicit first (`broadcast_operands`,
`Lowerer.match`), and a result still without a shape is an error naming the node.

Op families are lowered by small functions registered with `@lowering("Op", ...)`: this module
holds the driver, the shape machinery and broadcasting; `tvm_lower_elementwise.py` the
element-wise family (and its compile-time integer arithmetic); `tvm_lower_data.py` the shape,
data-movement and indexing families; `tvm_lower_nn.py` MatMul/Gemm, convolution and pooling,
normalizations, reductions, softmax, attention, rotary embedding and quantization. Semantics
are the ONNX spec's; anything else (an op with no lowering, or an attribute combination a
lowering refuses) raises `LoweringError` naming the node. tvm is imported here at module level:
import this module only when compiling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import relax, sym, te, tirx

from graphopt.backends.base import BackendError
from graphopt.ir.core import Model, Node, Value
from graphopt.ir.types import DType, TensorType

__all__ = ["Known", "Lowerer", "LoweringError", "LOWERINGS", "lower_model", "lowering"]

KNOWN_LIMIT = 64  # integer tensors up to this many elements are tracked at compile time


class LoweringError(BackendError):
    """A node cannot be lowered to Relax (no lowering for the op, or a refused attribute)."""


@dataclass
class Known:
    """An integer (or bool) tensor whose elements are known at compile time: Python ints or TIR
    expressions of the shape variables, in a numpy object array."""

    items: np.ndarray
    dtype: str

    def ints(self) -> list[int] | None:
        """The elements as Python ints, or None if some are symbolic."""
        flat = [_as_int(x) for x in self.items.reshape(-1)]
        ints = [x for x in flat if x is not None]
        return ints if len(ints) == len(flat) else None


Lowering = Callable[["Lowerer", Node], Sequence[Any]]
LOWERINGS: dict[str, Lowering] = {}


def lowering(*ops: str) -> Callable[[Lowering], Lowering]:
    """Register the decorated function as the lowering of `ops` (domain-qualified names)."""

    def register(fn: Lowering) -> Lowering:
        for op in ops:
            if op in LOWERINGS:
                raise ValueError(f"op {op} already has a lowering")
            LOWERINGS[op] = fn
        return fn

    return register


_analyzer = sym.Analyzer()


def _simplify(x: Any) -> Any:
    """A Python int or bool when `x` folds to a constant, else the simplified TIR expression."""
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    x = _analyzer.simplify(x)
    if isinstance(x, tirx.IntImm):
        return bool(x.value) if str(x.ty) == "bool" else int(x.value)
    return x


def _as_int(x: Any) -> int | None:
    x = _simplify(x)
    return int(x) if isinstance(x, (int, bool)) else None


def _same_dim(a: Any, b: Any) -> bool:
    """Whether two dims (ints or TIR expressions) are provably equal."""
    return _as_int(_prim(a) - _prim(b)) == 0


def _prim(x: Any, dtype: str = "int64") -> Any:
    if isinstance(x, (bool, np.bool_)):
        return tirx.const(int(x), dtype) if dtype != "bool" else tirx.const(bool(x), "bool")
    if isinstance(x, (int, np.integer)):
        return tirx.const(int(x), dtype)
    if str(x.ty) == "bool" and dtype != "bool":
        return tirx.Select(x, tirx.const(1, dtype), tirx.const(0, dtype))
    return x if str(x.ty) == dtype else tirx.Cast(dtype, x)


def relax_dtype(dtype: DType) -> str:
    """TVM's name of an IR element type (`float32`, `int64`, `bool`, ...)."""
    try:
        return str(np.dtype(dtype.numpy))
    except KeyError:
        raise LoweringError(f"element type {dtype.short_name} has no TVM equivalent") from None


class Lowerer:
    """Lowers one model; `lower()` returns the `tvm.IRModule`. Lowering functions use the helpers
    below to read inputs (`x`, `known`, `ints`, `shape_of`) and build expressions."""

    def __init__(self, model: Model, dims: dict[str, int] | None = None):
        self.model = model
        self.opset = model.opset
        self.dims = dict(dims or {})
        self.bb = relax.BlockBuilder()
        self.env: dict[Value, Any] = {}
        self.knowns: dict[Value, Known] = {}
        self.symbols: dict[str, Any] = {}
        self.node: Node | None = None

    # ----- driver ------------------------------------------------------------------------------
    def lower(self) -> tvm.IRModule:
        graph = self.model.graph
        params = []
        for value in graph.inputs:
            if value.const_value is not None:  # an input with a default: baked in as a constant
                continue
            var = relax.Var(value.name or "input", self._input_type(value))
            self.env[value] = var
            params.append(var)
        with self.bb.function("main", params):
            with self.bb.dataflow():
                for node in graph:
                    self.node = node
                    self._lower_node(node)
                self.node = None
                outputs = [self.x(v) for v in graph.outputs]
                result = self.bb.emit_output(relax.Tuple(outputs))
            self.bb.emit_func_output(result)
        return self.bb.get()

    def _input_type(self, value: Value) -> Any:
        t = value.type
        if not isinstance(t, TensorType) or t.shape is None:
            raise LoweringError(f"input %{value.name} needs a tensor type of known rank, not {t}")
        shape = []
        for i, d in enumerate(t.shape):
            if isinstance(d, int):
                shape.append(d)
            else:
                name = d if isinstance(d, str) else f"{value.name}_dim{i}"
                shape.append(self.dims[name] if name in self.dims else self._symbol(name))
        return relax.TensorType(shape, relax_dtype(t.dtype))

    def _symbol(self, name: str) -> Any:
        if name not in self.symbols:
            self.symbols[name] = tirx.Var(name, "int64")
        return self.symbols[name]

    def _lower_node(self, node: Node) -> None:
        fn = LOWERINGS.get(node.op)
        if fn is None:
            raise LoweringError(
                f"the tvm backend has no lowering for {node.describe()}",
                hint="run with --fallback to execute such nodes on ONNX Runtime",
            )
        try:
            self._bind_results(node, list(fn(self, node)))
        except LoweringError:
            raise
        except Exception as error:  # a TVM type error: say which node caused it
            raise LoweringError(
                f"cannot lower {node.describe()}: {type(error).__name__}: {error}"
            ) from error

    def _bind_results(self, node: Node, results: list[Any]) -> None:
        for index, value in enumerate(node.outputs):
            result = results[index] if index < len(results) else None
            if result is None:
                if value.is_used:
                    self.fail(f"output {index} (%{value.name}) is not supported")
                continue
            if isinstance(result, Known):
                self.knowns[value] = result
                continue
            var = self.env[value] = self.emit(result)
            if isinstance(var.ty, relax.TensorType) and not isinstance(var.ty.shape, relax.ShapeExpr):  # fmt: skip  # noqa: E501
                self.fail(f"Relax cannot derive the shape of output {index} ({var.ty})")

    def fail(self, why: str) -> LoweringError:
        what = self.node.describe() if self.node is not None else "the model"
        raise LoweringError(f"cannot lower {what}: {why}")

    # ----- reading inputs ----------------------------------------------------------------------
    def emit(self, expr: Any) -> Any:
        if isinstance(expr, relax.Var):
            return expr
        return self.bb.emit(expr)

    def match(self, expr: Any, dims: list[Any]) -> Any:
        """`expr` with the shape `dims`, checked at run time (`match_cast`): for dims ONNX says
        are equal but Relax cannot prove so (a symbol and a number), so that it can derive the
        shape of what uses them."""
        ty = relax.TensorType([_prim(d) for d in dims], self.dtype_of(expr))
        return self.bb.match_cast(self.emit(expr), ty)

    def x(self, value: Value | None) -> Any:
        """The Relax expression of `value` (a known integer tensor becomes a tensor here)."""
        if value is None:
            self.fail("a required input is missing")
        assert value is not None
        if value in self.env:
            return self.env[value]
        known = self.knowns.get(value)
        if known is not None:
            expr = self.emit(self._materialize(known))
        elif value.const_value is not None:
            expr = constant(value.const_value)
        else:
            self.fail(f"input %{value.name} has no value")
        self.env[value] = expr
        return expr

    def _materialize(self, known: Known) -> Any:
        ints = known.ints()
        if ints is not None:
            return constant(np.array(ints, dtype=known.dtype).reshape(known.items.shape))
        flat = [_prim(v) for v in known.items.reshape(-1)]
        tensor = self.emit(relax.op.shape_to_tensor(relax.ShapeExpr(flat)))
        if known.items.shape != (len(flat),):
            tensor = self.emit(relax.op.reshape(tensor, known.items.shape))
        return tensor if known.dtype == "int64" else relax.op.astype(tensor, known.dtype)

    def known(self, value: Value | None) -> Known | None:
        """`value` as a `Known` when its elements are known at compile time (small integer
        constants and tracked shape computations), else None."""
        if value is None:
            return None
        if value in self.knowns:
            return self.knowns[value]
        array = value.const_value
        if (
            array is not None
            and not value.is_graph_input
            and array.dtype.kind in "iub"
            and array.size <= KNOWN_LIMIT
        ):
            items = np.empty(array.shape, dtype=object)
            for index, item in np.ndenumerate(array):
                items[index] = bool(item) if array.dtype.kind == "b" else int(item)
            known = Known(items, str(array.dtype))
            self.knowns[value] = known
            return known
        return None

    def ints(self, value: Value | None, what: str, *, static: bool = False) -> list[Any] | None:
        """The elements of a 0-D/1-D shape-like input (ints or TIR expressions), None if the
        input is omitted; with `static`, ints only."""
        if value is None:
            return None
        known = self.known(value)
        if known is None:
            self.fail(f"{what} (%{value.name}) must be known at compile time")
        assert known is not None
        items = [_simplify(v) for v in known.items.reshape(-1)]
        if static and any(not isinstance(v, int) for v in items):
            self.fail(f"{what} must be constant, got {items}")
        return items

    def scalar(self, value: Value | None, default: Any = None) -> Any:
        """A constant scalar input as a Python number (float or int), or `default`."""
        if value is None:
            return default
        array = value.const_value if not value.is_graph_input else None
        if array is None or array.size != 1:
            known = self.known(value)
            if known is not None and known.items.size == 1:
                return _simplify(known.items.reshape(-1)[0])
            self.fail(f"input %{value.name} must be a constant scalar")
        assert array is not None
        return array.reshape(-1)[0].item()

    def shape_of(self, expr: Any) -> list[Any]:
        """The dims of a tensor expression: ints, or TIR expressions for symbolic dims."""
        ty = expr.ty
        if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
            self.fail(f"the shape of an operand is unknown ({ty})")
        return [_simplify(d) for d in ty.shape.values]

    def rank(self, expr: Any) -> int:
        return len(self.shape_of(expr))

    def dtype_of(self, expr: Any) -> str:
        return str(expr.ty.dtype)

    def shape_arg(self, value: Value) -> Any:
        """A shape input (Reshape, Expand, ...) as a list of dims, or as a runtime shape when it
        depends on data."""
        known = self.known(value)
        if known is not None:
            return [_simplify(v) for v in known.items.reshape(-1)]
        tensor = self.x(value)
        (length,) = self.shape_of(tensor)
        if not isinstance(length, int):
            self.fail("a shape input of unknown length")
        shape = self.emit(relax.op.tensor_to_shape(tensor))
        fresh = [tirx.Var(f"d{i}", "int64") for i in range(length)]
        shape = self.bb.match_cast(shape, relax.ShapeType(fresh))
        return list(fresh)

    def const(self, value: Any, dtype: str) -> Any:
        return constant(np.array(value, dtype=dtype))

    def out_dtype(self, node: Node, index: int = 0) -> str:
        t = node.outputs[index].type
        if not isinstance(t, TensorType):
            self.fail("the output type is unknown")
        assert isinstance(t, TensorType)
        return relax_dtype(t.dtype)


def _register_families() -> None:
    """Import the modules holding the other op families (they register on import)."""
    import graphopt.backends.tvm_lower_data  # noqa: F401
    import graphopt.backends.tvm_lower_elementwise  # noqa: F401
    import graphopt.backends.tvm_lower_nn  # noqa: F401


def constant(array: np.ndarray) -> Any:
    """A Relax constant of exactly `array`'s dtype. `relax.const` alone narrows int64 to int32
    and float64 to float32 (silently, even when the values do not fit)."""
    array = np.require(array, requirements="C")  # (np.ascontiguousarray makes scalars 1-D)
    return relax.const(array, str(array.dtype))


def lower_model(model: Model, dims: dict[str, int] | None = None) -> tvm.IRModule:
    """The Relax module of `model` (see the module docstring); raises `LoweringError`."""
    _register_families()
    return Lowerer(model, dims).lower()


def supported_ops() -> set[str]:
    _register_families()
    return set(LOWERINGS)


def axis_of(node: Node, rank: int, name: str = "axis", default: int = 0) -> int:
    axis = int(node.get_attr(name, default))
    return axis + rank if axis < 0 else axis


def axes_input(lw: Lowerer, node: Node, index: int, rank: int) -> list[int] | None:
    """Axes from attribute `axes` (old opsets) or from input `index` (new ones), normalized."""
    axes = node.get_attr("axes")
    if axes is None and len(node.inputs) > index:
        axes = lw.ints(node.inputs[index], "axes", static=True)
    if axes is None:
        return None
    return [int(a) + rank if int(a) < 0 else int(a) for a in axes]


# ----- broadcasting ------------------------------------------------------------------------------
def _broadcast_dims(a: list[Any], b: list[Any]) -> list[Any]:
    """The numpy broadcast of two shapes. A symbol against a number other than 1 gives the
    number (a valid ONNX broadcast needs the symbol to be 1 or that number); two different
    symbols give their max."""
    n = max(len(a), len(b))
    a, b = [1] * (n - len(a)) + a, [1] * (n - len(b)) + b
    out = []
    for x, y in zip(a, b, strict=True):
        if _as_int(x) == 1:
            out.append(y)
        elif _as_int(y) == 1 or _same_dim(x, y) or isinstance(x, int):
            out.append(x)
        elif isinstance(y, int):
            out.append(y)
        else:
            out.append(_simplify(tirx.max(_prim(x), _prim(y))))
    return out


def broadcast_to(lw: Lowerer, x: Any, out: list[Any]) -> Any:
    """`x` broadcast to the dims `out` (numpy rules). TVM's broadcast takes a symbolic dim to
    equal the other one, never to be 1, so where a dim of `x` is a symbol that `out` does not
    share, the element is read through `Select(dim == 1, 0, index)`: `batch` against 2 is right
    for batch 1 and 2 alike. Static (and shared) dims use `relax.op.broadcast_to`."""
    dims = lw.shape_of(x)
    lead = len(out) - len(dims)
    if all(isinstance(d, int) or _same_dim(d, o) for d, o in zip(dims, out[lead:], strict=True)):
        return lw.emit(relax.op.broadcast_to(x, relax.ShapeExpr([_prim(d) for d in out])))

    def at(d: Any, o: Any, i: Any) -> Any:
        zero = tirx.const(0, str(i.ty))
        if _as_int(d) == 1:
            return zero
        if _as_int(d) is not None or _same_dim(d, o):
            return i
        return tirx.Select(tirx.EQ(_prim(d), tirx.const(1, "int64")), zero, i)

    def element(t: te.Tensor) -> te.Tensor:
        def read(*index: Any) -> Any:
            return t(*[at(d, o, i) for d, o, i in zip(t.shape, out[lead:], index[lead:], strict=True)])  # fmt: skip  # noqa: E501

        return te.compute([_prim(d) for d in out], read, name="broadcast_to")

    return lw.bb.emit_te(element, x)


def broadcast_operands(lw: Lowerer, xs: list[Any]) -> list[Any]:
    """Operands of an element-wise op, broadcast to the result's shape where Relax could not
    derive it (a dim that is neither 1 nor the result's: `batch` against 2). Relax leaves such a
    result with a rank but no shape, which nothing can legalize; FuseOps folds the broadcast
    into the element-wise kernel."""
    shapes = [lw.shape_of(x) for x in xs]
    out = shapes[0]
    for shape in shapes[1:]:
        out = _broadcast_dims(out, shape)
    return [x if fits(s, out) else broadcast_to(lw, x, out) for x, s in zip(xs, shapes, strict=True)]  # fmt: skip  # noqa: E501


def fits(shape: list[Any], out: list[Any]) -> bool:
    """Whether TVM broadcasts `shape` to `out` as numpy does: each dim is 1 or out's."""
    tail = out[len(out) - len(shape) :]
    return all(_as_int(d) == 1 or _same_dim(d, o) for d, o in zip(shape, tail, strict=True))
