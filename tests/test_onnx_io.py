"""ONNX file I/O: weights stay memory-mapped on load, external data is written when it must be, and
a failed save leaves nothing behind. The 2 GB decision is tested by lowering the limit, not by
writing 2 GB."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt.backends.onnx_stream as onnx_stream
from graphopt.backends.onnx import save_onnx
from graphopt.frontends.onnx import load_onnx
from graphopt.ir.errors import ModelLoadError, SaveError

BIG = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) / 7  # 16 KiB: goes to external data
SMALL = np.array([1.5, -2.0, 3.25, 0.0], dtype=np.float32)  # 16 bytes: stays inline


def _proto() -> onnx.ModelProto:
    """y = (x @ w) + b, with w and b as initializers."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"),
        helper.make_node("Add", ["xw", "b"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
        initializer=[
            numpy_helper.from_array(BIG, "w"),
            numpy_helper.from_array(np.tile(SMALL, 16), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _bases(array: np.ndarray) -> list[object]:
    """`array` and every object below it: its `.base` chain, through memoryviews to what they view."""
    chain: list[object] = [array]
    while True:
        last = chain[-1]
        below = last.base if isinstance(last, np.ndarray) else getattr(last, "obj", None)
        if below is None or not isinstance(last, (np.ndarray, memoryview)):
            return chain
        chain.append(below)


def _nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The main graph's nodes, with an explicit empty domain cleared (it means the same)."""
    nodes = []
    for node in model.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        if not copy.domain:
            copy.ClearField("domain")
        nodes.append(copy)
    return nodes


def _arrays(path: Path) -> dict[str, np.ndarray]:
    model = load_onnx(path)
    return {name: v.const_value for name, v in model.graph.initializers.items()}


def _onnx_external(tmp_path: Path) -> Path:
    """The model saved by onnx itself with its big weight in `model.data`."""
    path = tmp_path / "model.onnx"
    onnx.save_model(
        _proto(), path, save_as_external_data=True, location="model.data", size_threshold=1024
    )
    return path


def test_inline_weights_are_views_of_the_mapped_file(tmp_path: Path):
    path = tmp_path / "model.onnx"
    onnx.save(_proto(), path)
    w = _arrays(path)["w"]
    np.testing.assert_array_equal(w, BIG)
    assert not w.flags.writeable
    assert any(isinstance(base, mmap.mmap) for base in _bases(w))


def test_external_weights_are_views_of_a_memmap(tmp_path: Path):
    path = _onnx_external(tmp_path)
    w = _arrays(path)["w"]
    np.testing.assert_array_equal(w, BIG)
    maps = [base for base in _bases(w) if isinstance(base, np.memmap)]
    assert maps, "the external weight was copied instead of mapped"
    assert Path(maps[-1].filename) == tmp_path / "model.data"
    assert np.shares_memory(w, maps[-1])
    assert not w.flags.writeable


def test_external_save_reloads_equal_and_matches_onnx(tmp_path: Path):
    target = tmp_path / "out.onnx"
    save_onnx(load_onnx(_onnx_external(tmp_path)), target, external_data=True)
    assert (tmp_path / "out.onnx.data").is_file()
    onnx.checker.check_model(str(target))
    reloaded = _arrays(target)
    assert reloaded["w"].tobytes() == BIG.tobytes()
    assert reloaded["b"].tobytes() == np.tile(SMALL, 16).tobytes()
    with_onnx = onnx.load(target)  # onnx reads our external data the same way
    assert [numpy_helper.to_array(t).tobytes() for t in with_onnx.graph.initializer] == [
        BIG.tobytes(),
        np.tile(SMALL, 16).tobytes(),
    ]
    assert _nodes(with_onnx) == _nodes(_proto())
    w = next(t for t in onnx.load(target, load_external_data=False).graph.initializer)
    info = {entry.key: entry.value for entry in w.external_data}
    assert info["location"] == "out.onnx.data" and int(info["offset"]) % 64 == 0


def test_inline_save_has_the_bytes_protobuf_would_write(tmp_path: Path):
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_proto(), source)
    save_onnx(load_onnx(source), target)
    assert not (tmp_path / "out.onnx.data").exists()
    data = target.read_bytes()
    assert onnx.load_from_string(data).SerializeToString() == data
    onnx.checker.check_model(str(target))


@pytest.mark.parametrize("external", [False, True])
def test_non_contiguous_weights_are_written_in_c_order(tmp_path: Path, external):
    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_proto(), source)
    model = load_onnx(source)
    w = model.graph.initializers["w"]
    w.const_value = w.const_value.T  # a strided view, as a transposing pass might leave
    save_onnx(model, target, external_data=external)
    assert _arrays(target)["w"].tobytes() == np.ascontiguousarray(BIG.T).tobytes()


def test_saving_over_the_loaded_file_is_safe(tmp_path: Path):
    path = _onnx_external(tmp_path)
    model = load_onnx(path)
    save_onnx(model, path)  # inline now; the old file stays mapped while `model` lives
    assert _arrays(path)["w"].tobytes() == BIG.tobytes()
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value, BIG)


def test_over_the_protobuf_limit_writes_external_data(tmp_path: Path, monkeypatch):
    model = load_onnx(_onnx_external(tmp_path))
    save_onnx(model, tmp_path / "fits.onnx")
    assert not (tmp_path / "fits.onnx.data").exists()
    monkeypatch.setattr(onnx_stream, "PROTOBUF_LIMIT", BIG.nbytes)  # "2 GB" is now 16 KiB
    save_onnx(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size == BIG.nbytes
    assert (tmp_path / "big.onnx").stat().st_size < BIG.nbytes
    assert _arrays(tmp_path / "big.onnx")["w"].tobytes() == BIG.tobytes()
    with pytest.raises(SaveError, match="limit") as caught:  # even external is too big
        save_onnx(model, tmp_path / "never.onnx", size_threshold=BIG.nbytes + 1)
    assert "size_threshold" in caught.value.hint
    with pytest.raises(SaveError, match="limit"):  # inline was asked for and cannot be
        save_onnx(model, tmp_path / "never.onnx", external_data=False)
    assert not list(tmp_path.glob("never*")) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left"), RuntimeError("bug")])
def test_failed_save_leaves_no_file_behind(tmp_path: Path, monkeypatch, external, error):
    model = load_onnx(_onnx_external(tmp_path))
    target = tmp_path / "out.onnx"
    target.write_bytes(b"old")
    before = sorted(os.listdir(tmp_path))

    def fail(stream, *args):
        stream.write(b"partial model")
        raise error

    monkeypatch.setattr(onnx_stream, "_write_proto", fail)
    with pytest.raises(SaveError if isinstance(error, OSError) else RuntimeError):
        save_onnx(model, target, external_data=external)
    assert sorted(os.listdir(tmp_path)) == before
    assert target.read_bytes() == b"old"


def test_save_into_a_missing_folder_is_a_save_error(tmp_path: Path):
    model = load_onnx(_onnx_external(tmp_path))
    with pytest.raises(SaveError) as caught:
        save_onnx(model, tmp_path / "nowhere" / "out.onnx")
    assert "folder" in caught.value.hint


def test_missing_external_data_file_is_a_clear_load_error(tmp_path: Path):
    path = _onnx_external(tmp_path)
    (tmp_path / "model.data").unlink()
    with pytest.raises(ModelLoadError, match="model.data.*'w'.*missing"):
        load_onnx(path)
