"""What the torch.export frontend's translations share: the translation table and `Lowering`,
the state of one ATen graph -> IR conversion.

A translation is a function `(lowering, fx_node, args) -> result` registered for one or more ATen
op names with `@translates("aten.add.Tensor", "aten.add.Scalar")` (a name without an overload,
`"aten.add"`, stands for all of them). `args` maps the op schema's argument names to what the fx
node passes (defaults filled in): `fx.Node`s for tensors and symbolic ints, Python numbers, lists.
The result is one IR `Value`, or a list (`None` where an output is not produced) for ops with
several outputs, which `operator.getitem` nodes pick from.

`Lowering` turns those arguments into IR values: `tensor(arg, dtype)` (a cast or a constant as
needed), `ints(items)` (a shape list of ints and symbolic sizes -> one int64 vector), and knows the
element type and shape torch recorded for every fx value (`node.meta["val"]`), which is how
translations follow torch's type promotion exactly: an arithmetic op casts its operands to the
result type torch computed. Symbolic ints are rank-0 int64 values. Errors name the model's source
line (`fail`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from graphopt.ir.builder import Builder
from graphopt.ir.core import Graph, Value
from graphopt.ir.errors import UnsupportedOpError
from graphopt.ir.types import Dim, DType, TensorType

if TYPE_CHECKING:
    import torch
    import torch.fx

Args = dict[str, Any]
Result = Value | list[Value | None]
Translation = Callable[["Lowering", "torch.fx.Node", Args], Result]

TRANSLATIONS: dict[str, Translation] = {}
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
SMALL_CONSTANT = 64  # elements: constants up to this size are shared between nodes


def translates(*names: str) -> Callable[[Translation], Translation]:
    """Register a translation for the ATen ops `names` (`aten.op.overload` or `aten.op`)."""

    def register(function: Translation) -> Translation:
        for name in names:
            if name in TRANSLATIONS:
                raise ValueError(f"two translations for {name}")
            TRANSLATIONS[name] = function
        return function

    return register


def target_name(target: Any) -> str:
    """How the table and error messages name an fx call target: `aten.add.Tensor`,
    `operator.add`, `torch.sym_max`."""
    import torch

    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    module = {"_operator": "operator", "torch.fx.experimental.sym_node": "torch"}.get(
        module, module
    )
    return f"{module}.{getattr(target, '__name__', repr(target))}"


def lookup(target: Any) -> Translation | None:
    import torch

    name = target_name(target)
    found = TRANSLATIONS.get(name)
    if found is None and isinstance(target, torch._ops.OpOverload):
        found = TRANSLATIONS.get(str(target.overloadpacket))
    return found


def bind(node: torch.fx.Node) -> Args:
    """The node's arguments by schema name, defaults filled in (positional `"0"`, `"1"`, ...
    for Python callables such as `operator.add`)."""
    import torch

    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return {str(i): a for i, a in enumerate(node.args)}
    bound: Args = {}
    for index, argument in enumerate(target._schema.arguments):
        if index < len(node.args):
            bound[argument.name] = node.args[index]
        elif argument.name in node.kwargs:
            bound[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            bound[argument.name] = argument.default_value
        else:
            bound[argument.name] = None
    return bound


def torch_dtypes() -> dict[Any, DType]:
    import torch

    return {
        torch.float32: DType.FLOAT, torch.float16: DType.FLOAT16, torch.bfloat16: DType.BFLOAT16,
        torch.float64: DType.DOUBLE, torch.int64: DType.INT64, torch.int32: DType.INT32,
        torch.int16: DType.INT16, torch.int8: DType.INT8, torch.uint8: DType.UINT8,
        torch.bool: DType.BOOL,
    }  # fmt: skip


def source_line(node: torch.fx.Node) -> tuple[str, str] | None:
    """`file:line` and code of the innermost frame of the node's recorded stack trace."""
    trace = node.meta.get("stack_trace") or ""
    lines = [line for line in trace.strip().splitlines() if line.strip()]
    for index in range(len(lines) - 1, -1, -1):
        line = lines[index].strip()
        if line.startswith("File "):
            parts = line.split(", ")
            file = parts[0][len("File ") :].strip('"')
            number = parts[1].replace("line ", "") if len(parts) > 1 else "?"
            code = lines[index + 1].strip() if index + 1 < len(lines) else ""
            return f"{file}:{number}", code
    return None


class Lowering:
    """The state of one conversion: the IR graph being built, the IR value of every fx value
    translated so far, shared constants and the names of symbolic dims."""

    def __init__(self, graph: Graph, symbol_names: dict[Any, str]):
        self.graph = graph
        self.b = Builder(graph)
        self.values: dict[Any, Any] = {}  # fx.Node -> Value | list[Value | None]
        self.symbol_names = symbol_names  # sympy Symbol -> dim name
        self.node: torch.fx.Node | None = None  # the node being translated, for errors
        self._constants: dict[tuple[str, tuple[int, ...], bytes], Value] = {}
        self._shapes: dict[tuple[Value, int | None, int | None], Value] = {}
        self._vectors: dict[Value, Value] = {}

    # ----- errors --------------------------------------------------------------------------------
    def fail(self, message: str, hint: str | None = None) -> UnsupportedOpError:
        """An error about the node being translated, naming its source line."""
        node = self.node
        if node is None:
            return UnsupportedOpError(message, where="torch model", hint=hint)
        what = f"{target_name(node.target)} (fx node '{node.name}'"
        torch_fn = node.meta.get("torch_fn")
        if torch_fn and len(torch_fn) > 1:
            what += f", from torch's {str(torch_fn[1]).split('.')[-1]}"
        location = source_line(node)
        text = f"{what}): {message}"
        if location is not None and location[1]:
            text += f"\n  source: {location[1]}"
        where = location[0] if location is not None else "torch model (no source line recorded)"
        return UnsupportedOpError(text, where=where, hint=hint)

    # ----- building ------------------------------------------------------------------------------
    def op(self, op: str, *inputs: Value | None, _outputs: int = 1, **attrs: Any) -> Any:
        """Append a node; trailing omitted (None) inputs are dropped."""
        trimmed = list(inputs)
        while trimmed and trimmed[-1] is None:
            trimmed.pop()
        return self.b.op(op, *trimmed, _outputs=_outputs, **attrs)

    def const(self, array: Any, dtype: DType | None = None) -> Value:
        """An initializer holding `array`; small ones are shared."""
        array = np.asarray(array, dtype=None if dtype is None else dtype.numpy)
        if array.dtype == np.float64 and dtype is None:
            array = array.astype(np.float32)
        if array.size > SMALL_CONSTANT:
            return self.b.const(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        value = self._constants.get(key)
        if value is None:
            value = self._constants[key] = self.b.const(array)
        return value

    def cast(self, value: Value, dtype: DType) -> Value:
        known = value.type.dtype if isinstance(value.type, TensorType) else None
        if known == dtype:
            return value
        if value.is_constant and value.const_value is not None:
            return self.const(np.asarray(value.const_value).astype(dtype.numpy), dtype)
        cast = self.op("Cast", value, to=int(dtype))
        cast.type = TensorType(
            dtype, value.type.shape if isinstance(value.type, TensorType) else None
        )
        return cast

    # ----- fx arguments -> IR values -------------------------------------------------------------
    def value(self, arg: Any) -> Value:
        """The IR value of an fx tensor or symbolic-int argument."""
        import torch.fx

        if not isinstance(arg, torch.fx.Node):
            raise self.fail(f"expected a tensor argument, got {arg!r}")
        result = self.values[arg]
        if isinstance(result, list):
            raise self.fail(f"argument '{arg.name}' is a list of tensors, not one tensor")
        if result is None:
            raise self.fail(f"argument '{arg.name}' is an output graphopt does not produce")
        return result  # type: ignore[no-any-return]

    def tensor(self, arg: Any, dtype: DType | None = None) -> Value:
        """`arg` as an IR value of element type `dtype` (cast if needed): fx values, and Python
        numbers as constants (of `dtype`, or the default type for their kind)."""
        import torch.fx

        if isinstance(arg, torch.fx.Node):
            value = self.value(arg)
            return value if dtype is None else self.cast(value, dtype)
        if isinstance(arg, Value):
            return arg if dtype is None else self.cast(arg, dtype)
        if isinstance(arg, (bool, int, float)):
            return self.const(np.asarray(arg), dtype or scalar_dtype(arg))
        raise self.fail(f"cannot use {arg!r} as a tensor")

    def optional(self, arg: Any, dtype: DType | None = None) -> Value | None:
        return None if arg is None else self.tensor(arg, dtype)

    def int_scalar(self, item: Any) -> Value:
        """A rank-0 int64 value for an int or a symbolic int."""
        static = self.static_int(item)
        if static is not None:
            return self.const(np.asarray(static, dtype=np.int64))
        return self.tensor(item, DType.INT64)

    def ints(self, items: Sequence[Any]) -> Value:
        """A 1-D int64 vector for a list of ints and symbolic ints (runs of ints become one
        constant; symbolic ones are unsqueezed and concatenated)."""
        pieces: list[Value] = []
        run: list[int] = []
        for item in items:
            static = self.static_int(item)
            if static is not None:
                run.append(static)
                continue
            if run:
                pieces.append(self.const(np.asarray(run, dtype=np.int64)))
                run = []
            pieces.append(self.vector(self.tensor(item, DType.INT64)))
        if run or not pieces:
            pieces.append(self.const(np.asarray(run, dtype=np.int64)))
        return pieces[0] if len(pieces) == 1 else self.op("Concat", *pieces, axis=0)

    def vector(self, scalar: Value) -> Value:
        """A rank-0 value as a one-element vector (one Unsqueeze per value)."""
        if scalar not in self._vectors:
            self._vectors[scalar] = self.op("Unsqueeze", scalar, self.const(np.zeros(1, np.int64)))
        return self._vectors[scalar]

    def static_int(self, item: Any) -> int | None:
        """An int argument's value when torch knows it (a Python int, or an fx value torch
        specialized to a constant); None for a symbolic one."""
        import torch.fx

        if isinstance(item, bool):
            return int(item)
        if isinstance(item, int):
            return item
        if isinstance(item, torch.fx.Node):
            val = item.meta.get("val")
            if isinstance(val, int) and not isinstance(val, bool):
                return val
        return None

    def static_ints(self, items: Any, what: str) -> list[int]:
        """A list argument that must be static (kernel sizes, axes...)."""
        if isinstance(items, int):
            return [items]
        values = [self.static_int(i) for i in items]
        if any(v is None for v in values):
            raise self.fail(
                f"{what} must be static, not symbolic: {items!r}",
                hint="export with these sizes static (no torch.export.Dim on the dims they "
                "depend on)",
            )
        return values  # type: ignore[return-value]

    def shape(self, value: Value, start: int | None = None, end: int | None = None) -> Value:
        """`Shape(value, start, end)`, one node per value and range."""
        key = (value, start, end)
        if key not in self._shapes:
            bounds = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
            self._shapes[key] = self.op("Shape", value, **bounds)
        return self._shapes[key]

    # ----- what torch recorded -------------------------------------------------------------------
    def meta(self, arg: Any) -> Any:
        import torch.fx

        return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg

    def dtype_of(self, arg: Any) -> DType:
        """The element type of an fx value or Python number."""
        import torch

        val = self.meta(arg)
        if isinstance(val, torch.Tensor):
            return self.torch_dtype(val.dtype)
        if isinstance(val, (list, tuple)) and val and isinstance(val[0], torch.Tensor):
            return self.torch_dtype(val[0].dtype)
        return scalar_dtype(val)

    def torch_dtype(self, dtype: Any) -> DType:
        found = torch_dtypes().get(dtype)
        if found is None:
            raise self.fail(
                f"element type {dtype} has no ONNX equivalent graphopt handles",
                hint="cast to float32/float16/bfloat16/int64 before this op",
            )
        return found

    def out_dtype(self, node: torch.fx.Node) -> DType:
        return self.dtype_of(node)

    def rank(self, arg: Any) -> int:
        val = self.meta(arg)
        return int(val.dim()) if hasattr(val, "dim") else 0

    def dims(self, arg: Any) -> tuple[Dim, ...]:
        """The IR dims of an fx tensor: ints, or the symbolic dims' names (expressions of them)."""
        val = self.meta(arg)
        return tuple(self.dim(d) for d in val.shape)

    def dim(self, size: Any) -> Dim:
        if isinstance(size, int):
            return size
        expr = size.node.expr
        if expr.is_number:
            return int(expr)
        if expr.is_Symbol:
            return self.symbol_names.get(expr, str(expr))
        import sympy

        renamed = expr.xreplace(
            {s: sympy.Symbol(self.symbol_names.get(s, str(s))) for s in expr.free_symbols}
        )
        return str(renamed).replace(" ", "")

    def type_of(self, val: Any) -> TensorType | None:
        """The IR type of a value torch recorded (a tensor, or a symbolic number as rank 0)."""
        import torch

        if isinstance(val, torch.Tensor):
            return TensorType(self.torch_dtype(val.dtype), tuple(self.dim(d) for d in val.shape))
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
            return TensorType(scalar_dtype(val), ())
        return None

    def promoted(self, first: Any, second: Any) -> DType:
        """The type torch computes a binary op of these operands in (`torch.result_type`)."""
        import torch

        return self.torch_dtype(
            torch.result_type(_stand_in(self.meta(first)), _stand_in(self.meta(second)))
        )


def scalar_dtype(value: Any) -> DType:
    """The element type of a Python (or symbolic) number: bool, int64 or float."""
    import torch

    if isinstance(value, (bool, torch.SymBool)):
        return DType.BOOL
    if isinstance(value, (int, torch.SymInt)):
        return DType.INT64
    if isinstance(value, (float, torch.SymFloat)):
        return DType.DOUBLE if isinstance(value, torch.SymFloat) else DType.FLOAT
    raise TypeError(f"not a number: {value!r}")


def _stand_in(val: Any) -> Any:
    """What `torch.result_type` sees for an operand: a meta tensor of the same type and rank
    category (dim-0 tensors promote differently), or a Python number of the same kind."""
    import torch

    if isinstance(val, torch.Tensor):
        return torch.empty((1,) * min(val.dim(), 1), dtype=val.dtype, device="meta")
    if isinstance(val, (bool, torch.SymBool)):
        return True
    if isinstance(val, (int, torch.SymInt)):
        return 1
    return 1.0
