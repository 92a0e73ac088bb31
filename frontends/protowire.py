"""Just enough of the protobuf wire format to stream ONNX files without copying weights.

Why: `onnx.load` reads the whole file into one bytes object and parses every tensor's `raw_data` into
another; `onnx.save` builds the full message again before writing. For a model with gigabytes of
weights that is two or three copies. The ONNX reader (`frontends/onnx_stream.py`) and writer
(`backends/onnx_stream.py`) use these helpers to walk a message's top-level fields as byte ranges of
a buffer (an `mmap`), so weights can be viewed in place and written straight from numpy.

A message is a sequence of fields `tag, payload`; the tag is a varint `(field_number << 3) |
wire_type`. Wire types: 0 varint, 1 fixed64, 2 length-delimited (bytes, strings, sub-messages,
packed repeated), 5 fixed32; 3/4 are the deprecated groups, which ONNX never uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message; `offset` is where reading failed."""

    def __init__(self, message: str, offset: int):
        super().__init__(f"{message} at byte {offset}")
        self.offset = offset


class Field(NamedTuple):
    """One field of a message: its number, wire type, the byte range of the whole field (tag
    included) and of its payload (for `LEN` fields: the bytes after the length prefix)."""

    number: int
    wire_type: int
    start: int
    payload_start: int
    end: int

    @property
    def payload_len(self) -> int:
        return self.end - self.payload_start


def read_varint(buf: memoryview | bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode the varint at `pos`; returns `(value, position after it)`."""
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint", pos)
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes", pos)


def iter_fields(buf: memoryview | bytes, start: int = 0, end: int | None = None) -> Iterator[Field]:
    """The top-level fields of the message in `buf[start:end]`, in file order."""
    if end is None:
        end = len(buf)
    pos = start
    while pos < end:
        field_start = pos
        key, pos = read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0", field_start)
        if wire_type == VARINT:
            _, pos = read_varint(buf, pos, end)
            payload_start = field_start
        elif wire_type == LEN:
            length, payload_start = read_varint(buf, pos, end)
            pos = payload_start + length
        elif wire_type == FIXED64:
            payload_start = pos
            pos += 8
        elif wire_type == FIXED32:
            payload_start = pos
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wire_type} (field {number})", field_start)
        if pos > end:
            raise WireError(f"field {number} runs past the end of its message", field_start)
        yield Field(number, wire_type, field_start, payload_start, pos)


def encode_varint(value: int) -> bytes:
    """The varint encoding of a non-negative integer."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def varint_size(value: int) -> int:
    size = 1
    while value > 0x7F:
        value >>= 7
        size += 1
    return size


def len_prefix(number: int, length: int) -> bytes:
    """Tag and length of a length-delimited field `number` whose payload has `length` bytes."""
    return encode_varint((number << 3) | LEN) + encode_varint(length)


def len_field_size(number: int, length: int) -> int:
    """Bytes a length-delimited field takes in total, prefix included."""
    return varint_size((number << 3) | LEN) + varint_size(length) + length


def split_before(serialized: bytes, number: int) -> int:
    """Where a field numbered `number` belongs in `serialized` (fields written in number order):
    the offset of the first field whose number is greater."""
    for f in iter_fields(serialized):
        if f.number > number:
            return f.start
    return len(serialized)
