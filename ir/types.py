"""Element types and value types of the IR.

`DType` mirrors ONNX's `TensorProto.DataType` (same integer codes, so conversion is free) and knows
its numpy dtype and the short name the text form prints (`f32`, `i64`, ...).

A value's type is one of:
- `TensorType(dtype, shape)`: `shape` is a tuple whose dims are `int` (static), `str` (a symbol such as
  `"batch"`) or `None` (unknown), or `shape` is `None` for unknown rank;
- `SequenceType(elem)`, `OptionalType(elem)`, `MapType(key, value)`: ONNX's container types;
- `None` on a `Value` when nothing is known.
Types are immutable and compare structurally.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

Dim = int | str | None
Shape = tuple[Dim, ...] | None


class DType(enum.IntEnum):
    """Tensor element types, numbered as ONNX numbers them."""

    UNDEFINED = 0
    FLOAT = 1
    UINT8 = 2
    INT8 = 3
    UINT16 = 4
    INT16 = 5
    INT32 = 6
    INT64 = 7
    STRING = 8
    BOOL = 9
    FLOAT16 = 10
    DOUBLE = 11
    UINT32 = 12
    UINT64 = 13
    COMPLEX64 = 14
    COMPLEX128 = 15
    BFLOAT16 = 16
    FLOAT8E4M3FN = 17
    FLOAT8E4M3FNUZ = 18
    FLOAT8E5M2 = 19
    FLOAT8E5M2FNUZ = 20
    UINT4 = 21
    INT4 = 22
    FLOAT4E2M1 = 23
    FLOAT8E8M0 = 24
    UINT2 = 25
    INT2 = 26
    FLOAT6E2M3 = 27
    FLOAT6E3M2 = 28

    @property
    def short_name(self) -> str:
        """The name the text form uses, e.g. `f32`."""
        return _SHORT_NAMES[self]

    @classmethod
    def from_short_name(cls, name: str) -> DType:
        try:
            return _FROM_SHORT_NAME[name]
        except KeyError:
            raise ValueError(
                f"unknown element type '{name}'; known: {', '.join(sorted(_FROM_SHORT_NAME))}"
            ) from None

    @property
    def numpy(self) -> np.dtype:
        """The numpy dtype holding this element type (ml_dtypes for the narrow float/int types)."""
        return _numpy_dtypes()[self]

    @classmethod
    def from_numpy(cls, dtype: np.dtype | type) -> DType:
        dt = np.dtype(dtype)
        for code, candidate in _numpy_dtypes().items():
            if candidate == dt:
                return code
        if dt.kind in "OUS":
            return cls.STRING
        raise ValueError(f"numpy dtype {dt} has no ONNX element type")

    @property
    def is_float(self) -> bool:
        return self in _FLOATS

    @property
    def is_integer(self) -> bool:
        return self in _INTEGERS

    @property
    def itemsize_bits(self) -> int:
        """Storage bits per element (4 for int4, 8 for float8, ...); 0 for strings."""
        return _BITS.get(self, 0)


_SHORT_NAMES = {
    DType.UNDEFINED: "undef",
    DType.FLOAT: "f32",
    DType.UINT8: "u8",
    DType.INT8: "i8",
    DType.UINT16: "u16",
    DType.INT16: "i16",
    DType.INT32: "i32",
    DType.INT64: "i64",
    DType.STRING: "str",
    DType.BOOL: "bool",
    DType.FLOAT16: "f16",
    DType.DOUBLE: "f64",
    DType.UINT32: "u32",
    DType.UINT64: "u64",
    DType.COMPLEX64: "c64",
    DType.COMPLEX128: "c128",
    DType.BFLOAT16: "bf16",
    DType.FLOAT8E4M3FN: "f8e4m3fn",
    DType.FLOAT8E4M3FNUZ: "f8e4m3fnuz",
    DType.FLOAT8E5M2: "f8e5m2",
    DType.FLOAT8E5M2FNUZ: "f8e5m2fnuz",
    DType.UINT4: "u4",
    DType.INT4: "i4",
    DType.FLOAT4E2M1: "f4e2m1",
    DType.FLOAT8E8M0: "f8e8m0",
    DType.UINT2: "u2",
    DType.INT2: "i2",
    DType.FLOAT6E2M3: "f6e2m3",
    DType.FLOAT6E3M2: "f6e3m2",
}
_FROM_SHORT_NAME = {name: code for code, name in _SHORT_NAMES.items()}
_FLOATS = {
    DType.FLOAT, DType.FLOAT16, DType.DOUBLE, DType.BFLOAT16, DType.FLOAT8E4M3FN,
    DType.FLOAT8E4M3FNUZ, DType.FLOAT8E5M2, DType.FLOAT8E5M2FNUZ, DType.FLOAT4E2M1,
    DType.FLOAT8E8M0, DType.FLOAT6E2M3, DType.FLOAT6E3M2,
}  # fmt: skip
_INTEGERS = {
    DType.UINT8, DType.INT8, DType.UINT16, DType.INT16, DType.INT32, DType.INT64, DType.UINT32,
    DType.UINT64, DType.UINT4, DType.INT4, DType.UINT2, DType.INT2,
}  # fmt: skip
_BITS = {
    DType.FLOAT: 32, DType.UINT8: 8, DType.INT8: 8, DType.UINT16: 16, DType.INT16: 16,
    DType.INT32: 32, DType.INT64: 64, DType.BOOL: 8, DType.FLOAT16: 16, DType.DOUBLE: 64,
    DType.UINT32: 32, DType.UINT64: 64, DType.COMPLEX64: 64, DType.COMPLEX128: 128,
    DType.BFLOAT16: 16, DType.FLOAT8E4M3FN: 8, DType.FLOAT8E4M3FNUZ: 8, DType.FLOAT8E5M2: 8,
    DType.FLOAT8E5M2FNUZ: 8, DType.UINT4: 4, DType.INT4: 4, DType.FLOAT4E2M1: 4,
    DType.FLOAT8E8M0: 8, DType.UINT2: 2, DType.INT2: 2, DType.FLOAT6E2M3: 6, DType.FLOAT6E3M2: 6,
}  # fmt: skip

_NUMPY_CACHE: dict[DType, np.dtype] = {}


def _numpy_dtypes() -> dict[DType, np.dtype]:
    if not _NUMPY_CACHE:
        from onnx import helper

        for code in DType:
            if code is DType.UNDEFINED:
                continue
            try:
                _NUMPY_CACHE[code] = np.dtype(helper.tensor_dtype_to_np_dtype(int(code)))
            except (KeyError, TypeError, ValueError):  # a type this onnx build does not map
                continue
    return _NUMPY_CACHE


@dataclass(frozen=True)
class TensorType:
    """A tensor: element type and shape (`None` shape = unknown rank)."""

    dtype: DType
    shape: Shape = None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    @property
    def is_static(self) -> bool:
        """True when every dim is a known integer."""
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    def numel(self) -> int | None:
        if not self.is_static:
            return None
        n = 1
        for d in self.shape or ():
            assert isinstance(d, int)
            n *= d
        return n

    def with_shape(self, shape: Shape) -> TensorType:
        return TensorType(self.dtype, None if shape is None else tuple(shape))

    def __str__(self) -> str:
        from graphopt.ir.printer import format_type

        return format_type(self)


@dataclass(frozen=True)
class SequenceType:
    """ONNX `seq(T)`."""

    elem: Type | None

    def __str__(self) -> str:
        from graphopt.ir.printer import format_type

        return format_type(self)


@dataclass(frozen=True)
class OptionalType:
    """ONNX `optional(T)`."""

    elem: Type | None

    def __str__(self) -> str:
        from graphopt.ir.printer import format_type

        return format_type(self)


@dataclass(frozen=True)
class MapType:
    """ONNX `map(K, V)` (ai.onnx.ml)."""

    key: DType
    value: Type | None

    def __str__(self) -> str:
        from graphopt.ir.printer import format_type

        return format_type(self)


Type = TensorType | SequenceType | OptionalType | MapType


def tensor_type_of(array: np.ndarray) -> TensorType:
    """The static `TensorType` of a numpy array."""
    return TensorType(DType.from_numpy(array.dtype), tuple(int(d) for d in array.shape))
