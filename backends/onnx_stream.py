"""Write an ONNX file by streaming weights from numpy arrays, atomically.

Why: `onnx.save` needs a `ModelProto` holding every weight (one copy) and serializes it to bytes
(another) before writing. Here the model is serialized without its main-graph initializers, and the
file is assembled as protobuf fields: the `graph` field (ModelProto field 7) is written as tag and
length, then the graph's own bytes, with each initializer (GraphProto field 5) serialized on its own
and its `raw_data` (TensorProto field 9) written straight from the array's memory. Lengths are
computed first, from each tensor's small header and its byte count. Fields are placed in field-number
order, so the file has the same bytes `onnx.save` would write for the same message.

Files are written to a temp file in the target folder and renamed into place (`os.replace`): readers
never see a partial model, a failed save leaves the old file as it was, and saving over a file that is
memory-mapped (the model was loaded from it) is safe on POSIX: the old inode lives on until unmapped.

Models past protobuf's 2 GB limit, or saved with `external=True`, keep tensors of at least
`size_threshold` bytes in `<file>.data` beside the model, at 64-byte aligned offsets.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import onnx

from graphopt.frontends.onnx_stream import plain_numpy_dtype
from graphopt.frontends.protowire import len_field_size, len_prefix, split_before
from graphopt.ir.errors import SaveError
from graphopt.ir.onnx_protos import array_to_tensor
from graphopt.ir.types import DType

PROTOBUF_LIMIT = 2**31 - 1  # bytes; a bigger message cannot be parsed by protobuf
ALIGNMENT = 64
MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_RAW_DATA = 7, 5, 9


@dataclass
class _Tensor:
    """One initializer ready to write: its serialized fields without `raw_data`, and its raw bytes:
    the array itself (made contiguous only while it is written, so at most one tensor is ever
    copied), or `bytes` for the rare layouts `array_to_tensor` encodes, or `None` for tensors
    stored in typed fields."""

    header: bytes
    raw: np.ndarray | bytes | None
    external_offset: int | None = None

    @property
    def raw_size(self) -> int:
        if isinstance(self.raw, np.ndarray):
            return self.raw.nbytes
        return 0 if self.raw is None else len(self.raw)

    def raw_view(self) -> memoryview:
        """The raw bytes as a flat buffer (no copy for the usual C-ordered weights)."""
        if isinstance(self.raw, np.ndarray):
            flat = np.ascontiguousarray(self.raw).reshape(-1).view(np.uint8)
            return memoryview(flat)  # type: ignore[arg-type]  # numpy arrays are buffers
        return memoryview(self.raw or b"")

    def payload_size(self) -> int:
        inline = self.raw is not None and self.external_offset is None
        return len(self.header) + (len_field_size(TENSOR_RAW_DATA, self.raw_size) if inline else 0)


def write_model(
    path: str,
    proto: onnx.ModelProto,
    initializers: list[tuple[str, np.ndarray]],
    *,
    external: bool | None = None,
    size_threshold: int = 1024,
) -> None:
    """Write `proto` (whose graph has no initializers) plus `initializers` to `path`.

    `proto` is modified (its graph is taken out); pass a copy if it is still needed.
    """
    tensors = [_prepare(name, array) for name, array in initializers]
    graph_bytes = proto.graph.SerializeToString()
    proto.ClearField("graph")
    model_bytes = proto.SerializeToString()
    inline_total = len(model_bytes) + len_field_size(
        MODEL_GRAPH,
        len(graph_bytes)
        + sum(len_field_size(GRAPH_INITIALIZER, t.payload_size()) for t in tensors),
    )
    if external is None:
        external = inline_total > PROTOBUF_LIMIT
    data_path = path + ".data"
    if external:
        _place_external(tensors, os.path.basename(data_path), size_threshold)
    graph_len = len(graph_bytes) + sum(
        len_field_size(GRAPH_INITIALIZER, t.payload_size()) for t in tensors
    )
    total = len(model_bytes) + len_field_size(MODEL_GRAPH, graph_len)
    if total > PROTOBUF_LIMIT:
        hint = "save with external_data=True (weights go to a .data file beside the model)"
        if external:
            hint = "lower size_threshold so that more tensors go to the .data file"
        raise SaveError(
            f"the model is {total / 2**30:.2f} GiB, over protobuf's 2 GiB limit",
            where=path,
            hint=hint,
        )

    files: list[_AtomicFile] = []
    current = path
    try:
        if external:
            current = data_path
            data_file = _AtomicFile(data_path)
            files.append(data_file)
            _write_data(data_file.stream, tensors)
        current = path
        model_file = _AtomicFile(path)
        files.append(model_file)
        written = _write_proto(model_file.stream, model_bytes, graph_bytes, tensors, graph_len)
        if written != total:  # a bug, not a user error: never leave such a file behind
            raise RuntimeError(f"wrote {written} bytes, expected {total}")
        for f in files:
            f.close()
        for f in files:
            current = f.path
            f.commit()
    except OSError as error:
        for f in files:
            f.discard()
        raise SaveError(
            f"cannot write {'the model' if current == path else repr(current)}: "
            f"{error.strerror or error}",
            where=path,
            hint=_hint(error),
        ) from None
    except BaseException:
        for f in files:
            f.discard()
        raise


def _hint(error: OSError) -> str:
    import errno

    if error.errno == errno.ENOENT:
        return "the folder does not exist; create it first"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "choose a folder you can write to"
    if error.errno == errno.ENOSPC:
        return "the disk is full; free space or save elsewhere"
    if error.errno in (errno.EISDIR, errno.ENOTDIR):
        return "the path must name a file inside an existing folder"
    return "check the path and the disk"


def _prepare(name: str, array: np.ndarray) -> _Tensor:
    array = np.asarray(array)
    code = _dtype_code(array.dtype)
    dtype = plain_numpy_dtype(code) if code is not None else None
    if dtype is not None and array.dtype == dtype:
        header = onnx.TensorProto()
        header.name = name
        header.data_type = code  # type: ignore[assignment]
        header.dims.extend(array.shape)
        return _Tensor(header.SerializeToString(), array)
    tensor = array_to_tensor(array, name)  # strings, packed 4-bit types, big-endian: a copy is fine
    raw_bytes = None
    if tensor.HasField("raw_data"):
        raw_bytes = tensor.raw_data
        tensor.ClearField("raw_data")
    return _Tensor(tensor.SerializeToString(), raw_bytes)


def _dtype_code(dtype: np.dtype) -> int | None:
    if dtype.byteorder == ">" or (dtype.byteorder == "=" and sys.byteorder != "little"):
        return None
    try:
        return int(DType.from_numpy(dtype))
    except ValueError:
        return None


def _place_external(tensors: list[_Tensor], location: str, size_threshold: int) -> None:
    offset = 0
    for tensor in tensors:
        if tensor.raw is None or tensor.raw_size < size_threshold:
            continue
        offset = -(-offset // ALIGNMENT) * ALIGNMENT
        tensor.external_offset = offset
        header = onnx.TensorProto()
        header.ParseFromString(tensor.header)
        for key, val in (("location", location), ("offset", offset), ("length", tensor.raw_size)):
            header.external_data.append(onnx.StringStringEntryProto(key=key, value=str(val)))
        header.data_location = onnx.TensorProto.EXTERNAL
        tensor.header = header.SerializeToString()
        offset += tensor.raw_size


def _write_data(stream: BinaryIO, tensors: list[_Tensor]) -> None:
    position = 0
    for tensor in tensors:
        if tensor.external_offset is None:
            continue
        if tensor.external_offset > position:
            stream.write(b"\0" * (tensor.external_offset - position))
        stream.write(tensor.raw_view())
        position = tensor.external_offset + tensor.raw_size


def _write_proto(
    stream: BinaryIO, model_bytes: bytes, graph_bytes: bytes, tensors: list[_Tensor], graph_len: int
) -> int:
    """Write the model's fields in field-number order; returns the bytes written."""
    written = 0

    def put(data: bytes | memoryview | np.ndarray) -> None:
        nonlocal written
        view = memoryview(data)  # type: ignore[arg-type]
        stream.write(view)
        written += view.nbytes

    model_split = split_before(model_bytes, MODEL_GRAPH)
    graph_split = split_before(graph_bytes, GRAPH_INITIALIZER)
    put(model_bytes[:model_split])
    put(len_prefix(MODEL_GRAPH, graph_len))
    put(graph_bytes[:graph_split])
    for tensor in tensors:
        put(len_prefix(GRAPH_INITIALIZER, tensor.payload_size()))
        if tensor.raw is None or tensor.external_offset is not None:
            put(tensor.header)
            continue
        split = split_before(tensor.header, TENSOR_RAW_DATA)
        put(tensor.header[:split])
        put(len_prefix(TENSOR_RAW_DATA, tensor.raw_size))
        if tensor.raw_size:
            put(tensor.raw_view())
        put(tensor.header[split:])
    put(graph_bytes[graph_split:])
    put(model_bytes[model_split:])
    return written


class _AtomicFile:
    """A temp file beside `path`, renamed onto it by `commit` or deleted by `discard`."""

    def __init__(self, path: str):
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        fd, self.temp = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
        )
        self.stream: BinaryIO = os.fdopen(fd, "wb")

    def close(self) -> None:
        self.stream.close()
        os.chmod(self.temp, _new_file_mode(self.path))

    def commit(self) -> None:
        os.replace(self.temp, self.path)
        self.temp = ""

    def discard(self) -> None:
        try:
            self.stream.close()
        except OSError:
            pass
        if self.temp:
            try:
                os.unlink(self.temp)
            except OSError:
                pass
            self.temp = ""


def _new_file_mode(path: str) -> int:
    """The mode a plain `open(path, "wb")` would give: the old file's, or 0o666 minus the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        pass
    umask = 0o022
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
                    break
    except OSError:
        pass
    return 0o666 & ~umask
