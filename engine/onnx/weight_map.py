"""Which ONNX initializer holds which torch weight: the map LoRA needs to patch an exported graph.

The dynamo exporter's optimizer renames most Linear weights to anonymous initializers (``val_123``)
and stores them transposed for MatMul, so a LoRA's module names cannot be found in the graph by name.
Export therefore matches every Linear / Conv2d weight of the torch module to the initializer that holds
its values (directly or transposed, in the graph's dtype) and records, per weight: the initializer,
whether it is transposed, the file and byte offset of its raw data, its dtype and shape. The runtime
reads base weights through that record (an ``np.memmap``, no ``onnx`` import) and hands patched
values to the backend by initializer name (see :mod:`engine.backends.weights`).

Matching is by content (a digest of the bytes), so it does not depend on what the exporter names
things. A weight whose content is not unique (two modules with identical values, or one initializer
shared by two modules) is left out of the map: patching one of them would silently patch the other.
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.hashing import _varint
from engine.manifest import WeightRef
from engine.models.torch_modules import lora_modules

# ONNX TensorProto.DataType codes of the float types a weight can be stored in.
_ONNX_FLOATS = {1: "float32", 10: "float16"}

# Protobuf field numbers: ModelProto.graph, GraphProto.initializer, TensorProto.name, TensorProto.raw_data.
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_NAME, _TENSOR_RAW = 8, 9


@dataclass(frozen=True)
class Stored:
    """Where one initializer's raw bytes lie: file (relative to the graph's folder) and byte offset."""

    name: str
    file: str
    offset: int
    nbytes: int
    dtype: str
    dims: tuple[int, ...]


def lora_weights(module: Any) -> dict[str, np.ndarray]:
    """Every Linear / Conv2d weight of a wrapper module as float32 arrays in torch layout, by target
    name (see :func:`engine.specs.lora_target_name`)."""
    return {target: m.weight.detach().float().cpu().numpy() for target, m in lora_modules(module).items()}


def weight_map(graph_file: Path, weights: Mapping[str, np.ndarray]) -> dict[str, WeightRef]:
    """Map each weight to the one initializer of ``graph_file`` holding its values (or their transpose,
    for 2-D weights), compared in the initializer's dtype. Weights without a unique match are left out."""
    stored = [s for s in initializer_locations(graph_file) if len(s.dims) in (2, 4)]
    by_digest: dict[tuple[str, str], list[Stored]] = {}
    for entry in stored:
        key = (entry.dtype, _digest(read_bytes(graph_file.parent, entry)))
        by_digest.setdefault(key, []).append(entry)
    found: dict[str, WeightRef] = {}
    claimed: dict[str, int] = {}
    for target, value in weights.items():
        matches = list(_candidates(value, by_digest))
        if len(matches) != 1:
            continue
        entry, transposed = matches[0]
        claimed[entry.name] = claimed.get(entry.name, 0) + 1
        found[target] = WeightRef(entry.name, transposed, entry.file, entry.offset, entry.dtype, value.shape)
    return {target: ref for target, ref in found.items() if claimed[ref.initializer] == 1}


def _candidates(
    value: np.ndarray, by_digest: Mapping[tuple[str, str], list[Stored]]
) -> Iterator[tuple[Stored, bool]]:
    """Initializers whose bytes equal the weight (False) or its transpose (True), per stored dtype."""
    for dtype in sorted({dtype for dtype, _ in by_digest}):
        cast = value.astype(dtype)
        forms = [(cast, False)] + ([(cast.T, True)] if cast.ndim == 2 else [])
        for form, transposed in forms:
            for entry in by_digest.get((dtype, _digest(np.ascontiguousarray(form).tobytes())), []):
                if entry.dims == form.shape:
                    yield entry, transposed


def _digest(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def read_bytes(folder: Path, entry: Stored) -> bytes:
    with open(folder / entry.file, "rb") as handle:
        handle.seek(entry.offset)
        return handle.read(entry.nbytes)


def initializer_locations(graph_file: Path) -> list[Stored]:
    """Every float initializer of an ONNX file with its bytes' location: inline raw_data (an offset
    into the graph file, found by walking the protobuf) or external data (the file and offset the
    tensor's external_data names)."""
    import onnx

    model = onnx.load(str(graph_file), load_external_data=False)
    inline = _inline_offsets(graph_file)
    found = []
    for tensor in model.graph.initializer:
        dtype = _ONNX_FLOATS.get(tensor.data_type)
        if dtype is None:
            continue
        dims = tuple(int(d) for d in tensor.dims)
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            found.append(
                Stored(
                    tensor.name,
                    info["location"],
                    int(info.get("offset", 0)),
                    int(info["length"]),
                    dtype,
                    dims,
                )
            )
        elif tensor.name in inline:
            offset, nbytes = inline[tensor.name]
            found.append(Stored(tensor.name, graph_file.name, offset, nbytes, dtype, dims))
    return found


def _inline_offsets(graph_file: Path) -> dict[str, tuple[int, int]]:
    """Initializer name -> (offset, length) of its raw_data inside the graph file."""
    offsets: dict[str, tuple[int, int]] = {}
    with open(graph_file, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for graph_start, graph_end in _fields(data, 0, len(data), _MODEL_GRAPH):
            for start, end in _fields(data, graph_start, graph_end, _GRAPH_INITIALIZER):
                name, raw = None, None
                for field, value_start, value_end in _all_fields(data, start, end):
                    if field == _TENSOR_NAME:
                        name = bytes(data[value_start:value_end]).decode("utf-8")
                    elif field == _TENSOR_RAW:
                        raw = (value_start, value_end - value_start)
                if name is not None and raw is not None:
                    offsets[name] = raw
    return offsets


def _fields(data: mmap.mmap, start: int, end: int, wanted: int) -> Iterator[tuple[int, int]]:
    """(start, end) of every length-delimited field number ``wanted`` in the message data[start:end]."""
    for field, value_start, value_end in _all_fields(data, start, end):
        if field == wanted:
            yield value_start, value_end


def _all_fields(data: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, value start, value end) of each length-delimited field of a message; other wire
    types are skipped."""
    position = start
    while position < end:
        tag, position = _varint(data, position)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, position = _varint(data, position)
        elif wire == 1:
            position += 8
        elif wire == 5:
            position += 4
        elif wire == 2:
            length, position = _varint(data, position)
            yield field, position, position + length
            position += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {position}")
