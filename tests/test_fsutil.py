"""One atomic file writer and one content hash: what export, the caches and the plan keys share."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from engine.errors import EngineFolderError
from engine.fsutil import write_atomic
from engine.hashing import external_data_files, graph_content_hash, sha256_file


def _graph_with_external_data(folder: Path) -> Path:
    """A one-initializer ONNX graph whose weight lives in ``w.bin`` beside it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 8])],
        [weight],
    )
    path = folder / "g.onnx"
    onnx.save_model(
        helper.make_model(graph), path, save_as_external_data=True, location="w.bin", size_threshold=0
    )
    return path


def test_write_atomic_writes_text_and_bytes_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    write_atomic(target, "é\n")
    assert target.read_bytes() == "é\n".encode()
    assert write_atomic(target, b"\x00\x01") == target
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_write_atomic_failure_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(TypeError):
        write_atomic(target, ["not", "bytes"])  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_write_atomic_uses_umask_permissions(tmp_path: Path) -> None:
    old_umask = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a", "x")
    finally:
        os.umask(old_umask)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o640


def test_sha256_file_is_hashlib_of_the_bytes(tmp_path: Path) -> None:
    data = np.random.default_rng(3).bytes((1 << 22) + 17)  # crosses a chunk boundary
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_graph_content_hash_covers_names_and_external_data(tmp_path: Path) -> None:
    graph = _graph_with_external_data(tmp_path)
    assert external_data_files(graph) == [tmp_path / "w.bin"]
    expected = hashlib.sha256()
    for path in (graph, tmp_path / "w.bin"):
        expected.update(f"{path.name}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\0".encode())
    assert graph_content_hash(graph) == expected.hexdigest()

    data = bytearray((tmp_path / "w.bin").read_bytes())
    data[-1] ^= 1
    (tmp_path / "w.bin").write_bytes(bytes(data))
    assert graph_content_hash(graph) != expected.hexdigest()  # weights count, not just the graph

    (tmp_path / "w.bin").unlink()
    with pytest.raises(EngineFolderError, match=r"g\.onnx: external data file\(s\) \['w\.bin'\] are missing"):
        graph_content_hash(graph)
