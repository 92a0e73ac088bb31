"""Read an ONNX file without copying its weights: initializers become views of a memory map.

Why: a model's weights are most of its bytes. `onnx.load` copies them twice (file -> bytes ->
`raw_data`); here the file is memory-mapped read-only and the wire format of `ModelProto.graph`
(field 7) is walked by hand to find each top-level initializer (`GraphProto.initializer`, field 5).
For an initializer whose data sits in `raw_data` (`TensorProto` field 9), the other fields of the
tensor are parsed with protobuf and the array is `np.frombuffer` over the map at the raw data's
offset: zero copy, read-only, paged in by the OS when first read. Everything else (nodes, types,
functions, subgraphs) is small: its bytes are stitched back into a `ModelProto` without those
initializers and parsed normally.

Tensors stored externally (`data_location=EXTERNAL`) are views of one read-only `np.memmap` per
data file. Tensors in typed fields (`float_data`, ...), strings, and element types without a plain
numpy layout (packed 4-bit and smaller) go through `onnx.numpy_helper` (a copy, but they are small or
rare).

The arrays keep the map alive; the file may be replaced (written to a temp file and renamed, as
`save_onnx` does) while they are in use, but must not be rewritten in place.
"""

from __future__ import annotations

import mmap
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from graphopt.frontends.protowire import LEN, WireError, iter_fields, len_prefix
from graphopt.ir.errors import ModelLoadError
from graphopt.ir.types import DType

MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
TENSOR_RAW_DATA = 9


@dataclass
class StreamedModel:
    """A parsed `ModelProto` whose main graph has no initializers, and those initializers as arrays
    (file order). `buffers` holds the maps the arrays view (kept for their lifetime only)."""

    proto: onnx.ModelProto
    initializers: list[tuple[str, np.ndarray]]
    buffers: list[object] = field(default_factory=list)


def map_file(path: str) -> mmap.mmap | bytes:
    """The file's contents, memory-mapped read-only (an empty file gives `b""`)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return b""
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise ModelLoadError(
            "no such file", where=path, hint="check the path (relative paths start at the cwd)"
        ) from None
    except IsADirectoryError:
        raise ModelLoadError("is a directory, not an ONNX file", where=path) from None
    except OSError as error:
        raise ModelLoadError(
            f"cannot read the file: {error.strerror or error}", where=path
        ) from None


def read_model(buffer: mmap.mmap | bytes, *, base_dir: str = "", where: str = "") -> StreamedModel:
    """Split a serialized `ModelProto` into its small part (parsed) and its top-level weights
    (array views of `buffer`). Raises `ModelLoadError` for bytes that are not a protobuf message."""
    view = memoryview(buffer)
    try:
        model_parts: list[memoryview] = []
        graph_parts: list[memoryview] = []
        tensors: list[tuple[int, int]] = []
        has_graph = False
        for f in iter_fields(view):
            if f.number == MODEL_GRAPH and f.wire_type == LEN:
                has_graph = True
                for g in iter_fields(view, f.payload_start, f.end):
                    if g.number == GRAPH_INITIALIZER and g.wire_type == LEN:
                        tensors.append((g.payload_start, g.end))
                    else:
                        graph_parts.append(view[g.start : g.end])
            else:
                model_parts.append(view[f.start : f.end])
        graph_bytes = b"".join(graph_parts)
        model_bytes = b"".join(model_parts)
        if has_graph:
            model_bytes += len_prefix(MODEL_GRAPH, len(graph_bytes)) + graph_bytes
        proto = onnx.ModelProto()
        proto.ParseFromString(model_bytes)
        del model_parts, graph_parts, graph_bytes, model_bytes
        externals = _ExternalFiles(base_dir, where)
        initializers = [_tensor_at(buffer, view, start, end, externals) for start, end in tensors]
    except WireError as error:
        raise _not_a_model(buffer, where, str(error)) from None
    except DecodeError as error:
        raise _not_a_model(buffer, where, f"protobuf cannot parse it ({error})") from None
    finally:
        view.release()
    return StreamedModel(proto, initializers, [buffer, *externals.maps.values()])


def _not_a_model(buffer: mmap.mmap | bytes, where: str, detail: str) -> ModelLoadError:
    head = bytes(buffer[:256])
    if looks_like_text(head):
        return ModelLoadError(
            "is a text file, not an ONNX model (ONNX models are binary protobuf)",
            where=where,
            hint="pass the .onnx file itself; ONNX text syntax can be read with onnx.parser",
        )
    return ModelLoadError(
        f"is not a valid ONNX model: the file is truncated or corrupt: {detail}",
        where=where,
        hint="re-export or re-download the model; compare its size with the original",
    )


def looks_like_text(head: bytes) -> bool:
    """True when the first bytes read as printable text (a protobuf model almost never does)."""
    if not head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # a multibyte character may be cut at the end of the sample
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(c.isprintable() or c in "\t\r\n" for c in text)


def plain_numpy_dtype(data_type: int) -> np.dtype | None:
    """The numpy dtype whose bytes are exactly ONNX's raw layout for `data_type` (little-endian
    host), or `None` (strings, packed sub-byte types, unknown codes)."""
    if sys.byteorder != "little":
        return None
    try:
        code = DType(data_type)
        dtype = code.numpy
    except (ValueError, KeyError):
        return None
    if code is DType.STRING or code.itemsize_bits not in (8, 16, 32, 64, 128):
        return None
    return dtype if dtype.itemsize * 8 == code.itemsize_bits else None


def _tensor_at(
    buffer: mmap.mmap | bytes,
    view: memoryview,
    start: int,
    end: int,
    externals: _ExternalFiles,
) -> tuple[str, np.ndarray]:
    raw: tuple[int, int] | None = None
    header_parts: list[memoryview] = []
    for f in iter_fields(view, start, end):
        if f.number == TENSOR_RAW_DATA and f.wire_type == LEN:
            raw = (f.payload_start, f.end)  # the last occurrence wins, as in protobuf
        else:
            header_parts.append(view[f.start : f.end])
    tensor = onnx.TensorProto()
    tensor.ParseFromString(b"".join(header_parts))
    name = tensor.name
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return name, externals.array(tensor)
    dims = tuple(int(d) for d in tensor.dims)
    dtype = plain_numpy_dtype(tensor.data_type)
    if raw is not None and dtype is not None:
        count = int(np.prod(dims, dtype=np.int64))
        if count * dtype.itemsize != raw[1] - raw[0]:
            raise ModelLoadError(
                f"initializer '{name}' has {raw[1] - raw[0]} bytes of raw data but its shape "
                f"{list(dims)} needs {count * dtype.itemsize}",
                where=externals.where,
                hint="the file is corrupt; re-export the model",
            )
        array = np.frombuffer(buffer, dtype=dtype, count=count, offset=raw[0])
        return name, array.reshape(dims)
    if raw is not None:
        tensor.raw_data = bytes(view[raw[0] : raw[1]])
    try:
        return name, numpy_helper.to_array(tensor)
    except Exception as error:  # numpy_helper raises ValueError/TypeError/KeyError on bad tensors
        raise ModelLoadError(
            f"cannot read initializer '{name}': {error}", where=externals.where
        ) from None


class _ExternalFiles:
    """One read-only `np.memmap` per external data file, shared by the tensors stored in it."""

    def __init__(self, base_dir: str, where: str):
        self.base_dir = base_dir
        self.where = where
        self.maps: dict[str, np.ndarray] = {}

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        return external_array(tensor, self.base_dir, self.where, self.maps)


def external_array(
    tensor: onnx.TensorProto,
    base_dir: str,
    where: str = "",
    maps: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """The array of an externally stored tensor: a read-only view of its data file, or a copy for
    layouts numpy cannot view. Raises `ModelLoadError` naming the tensor and the file."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    name = tensor.name
    location = info.get("location", "")
    if not location:
        raise ModelLoadError(f"initializer '{name}' is external but names no file", where=where)
    if os.path.isabs(location) or os.path.normpath(location).startswith(".."):
        raise ModelLoadError(
            f"initializer '{name}' points outside the model's folder: '{location}'",
            where=where,
            hint="external data must live beside the model (a relative path below its folder)",
        )
    path = os.path.join(base_dir, location)
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise ModelLoadError(f"initializer '{name}' has a bad offset/length", where=where) from None
    maps = {} if maps is None else maps
    whole: np.ndarray | None = maps.get(path)
    if whole is None:
        if not os.path.isfile(path):
            raise ModelLoadError(
                f"external data file '{path}' of initializer '{name}' is missing",
                where=where or path,
                hint="copy the data file next to the model (it must keep the name it was saved with)",
            )
        if os.path.getsize(path) == 0:
            whole = np.zeros(0, np.uint8)  # np.memmap refuses empty files
        else:
            whole = np.memmap(path, dtype=np.uint8, mode="r")
        maps[path] = whole
    dims = tuple(int(d) for d in tensor.dims)
    dtype = plain_numpy_dtype(tensor.data_type)
    count = int(np.prod(dims, dtype=np.int64))
    nbytes = count * dtype.itemsize if dtype is not None else length
    if nbytes is None:
        nbytes = whole.size - offset
    if length is not None and length != nbytes:
        raise ModelLoadError(
            f"initializer '{name}' says its external data has {length} bytes; its shape needs "
            f"{nbytes}",
            where=where,
        )
    if offset + nbytes > whole.size:
        raise ModelLoadError(
            f"external data file '{path}' is too short for initializer '{name}' "
            f"(needs bytes {offset}..{offset + nbytes}, has {whole.size})",
            where=where,
            hint="the data file is truncated or belongs to another model",
        )
    chunk = whole[offset : offset + nbytes]
    if dtype is not None:
        return chunk.view(dtype).reshape(dims)
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    del copy.external_data[:]
    copy.data_location = onnx.TensorProto.DEFAULT
    copy.raw_data = chunk.tobytes()
    return numpy_helper.to_array(copy)
