"""LoRA files on disk: the safetensors reader, A1111's LoRA hash, and the file's metadata.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON (each tensor's
dtype, shape and byte range in the data that follows, plus an optional ``__metadata__`` of strings),
then the tensor data. This module reads that layout itself, with NumPy memory maps, rather than
through ``safetensors.numpy``: LoRAs are often saved in bf16, which NumPy (and so ``safetensors``'
NumPy API) cannot represent, and the runtime keeps its dependencies to NumPy. bf16 tensors are
widened to float32 on read; every other tensor is a read-only view of the mapped file.

Pickled formats (``.pt``, ``.ckpt``, ``.bin``) are refused: unpickling runs code from the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from engine.errors import RequestError

SAFETENSORS = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")
# safetensors' own bound on the JSON header; a larger length field means a damaged or foreign file
MAX_HEADER_BYTES = 100 * 1024 * 1024
ALIAS_KEY = "ss_output_name"  # kohya's training output name: A1111's alias of a LoRA
_CHUNK_BYTES = 1 << 22
# safetensors dtype names -> little-endian NumPy dtypes; BF16 is read as uint16 and widened
_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}


class AdapterError(RequestError):
    """A LoRA file is missing, unreadable, of an unsupported kind, or does not fit the model."""


@dataclass(frozen=True)
class SafetensorsHeader:
    """A safetensors file's header: tensor entries (dtype, shape, byte range), metadata, data offset."""

    entries: Mapping[str, Mapping[str, Any]]
    metadata: Mapping[str, str]
    data_offset: int  # bytes before the tensor data: 8 + the JSON header's length
    data_bytes: int  # bytes of tensor data the file holds after the header


@dataclass(frozen=True)
class LoraFile:
    """A parsed LoRA file.

    tensors: name -> array, each a read-only view of the file (bf16 ones widened to float32 copies);
    metadata: the safetensors ``__metadata__`` strings; alias: ``ss_output_name`` (A1111's alias).
    """

    path: Path
    name: str
    alias: str | None
    tensors: Mapping[str, np.ndarray]
    metadata: Mapping[str, str]
    data_offset: int


def check_suffix(path: Path) -> None:
    """AdapterError unless ``path`` names a .safetensors file (pickles are refused by name)."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise AdapterError(
            f"{path.name}: pickled LoRA files ({suffix}) are not loaded (unpickling runs code from the "
            "file); convert it to .safetensors"
        )
    if suffix != SAFETENSORS:
        raise AdapterError(f"{path.name}: not a LoRA file (sd-engine reads .safetensors LoRAs)")


def read_header(path: Path) -> SafetensorsHeader:
    """The header of a .safetensors file, checked against the file's size.

    Raises AdapterError (one line naming the file) for a missing, truncated or corrupt file.
    """
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(0)
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if length < 0 or length > min(MAX_HEADER_BYTES, size - 8):
                raise AdapterError(f"{path.name}: not a safetensors file, or truncated ({size} bytes)")
            raw = handle.read(length)
    except OSError as error:
        raise AdapterError(f"cannot read LoRA {path}: {error.strerror or error}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterError(f"{path.name}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path.name}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise AdapterError(f"{path.name}: corrupt safetensors header (__metadata__ is not an object)")
    data_bytes = size - 8 - length
    for name, entry in header.items():
        _check_entry(path, name, entry, data_bytes)
    return SafetensorsHeader(
        entries=MappingProxyType(header),
        metadata=MappingProxyType({str(k): str(v) for k, v in metadata.items()}),
        data_offset=8 + length,
        data_bytes=data_bytes,
    )


def _check_entry(path: Path, name: str, entry: object, data_bytes: int) -> None:
    """AdapterError unless ``entry`` is a well-formed tensor entry lying inside the file's data."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise AdapterError(f"{path.name}: corrupt safetensors header (entry {name!r})")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPES:
        raise AdapterError(f"{path.name}: tensor {name!r} has dtype {dtype}, which sd-engine does not read")
    valid_shape = isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
    valid_offsets = (
        isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    )
    if not valid_shape or not valid_offsets or not 0 <= offsets[0] <= offsets[1]:
        raise AdapterError(f"{path.name}: corrupt safetensors header (entry {name!r})")
    if offsets[1] > data_bytes:
        raise AdapterError(
            f"{path.name}: truncated (tensor {name!r} ends at byte {offsets[1]} of the data; the file "
            f"holds {data_bytes})"
        )
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
    if offsets[1] - offsets[0] != expected:
        raise AdapterError(
            f"{path.name}: corrupt safetensors header (tensor {name!r}: {offsets[1] - offsets[0]} bytes "
            f"for shape {shape} {dtype})"
        )


def _tensor(data: np.ndarray, entry: Mapping[str, Any]) -> np.ndarray:
    """One tensor of the mapped data region: a read-only view, or a float32 copy for bf16."""
    begin, end = entry["data_offsets"]
    array = data[begin:end].view(np.dtype(_DTYPES[entry["dtype"]])).reshape(entry["shape"])
    if entry["dtype"] == "BF16":  # bf16 is float32's upper half
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


def read_lora(path: str | Path) -> LoraFile:
    """A LoRA file's tensors and metadata (memory-mapped; nothing is computed yet).

    Raises AdapterError (one line naming the file) for a missing file, a pickled format, a
    truncated or corrupt file, or a tensor dtype it cannot read (fp8).
    """
    path = Path(path)
    check_suffix(path)
    if not path.is_file():
        raise AdapterError(f"no LoRA file {path}")
    header = read_header(path)
    data = (
        np.memmap(path, dtype=np.uint8, mode="r", offset=header.data_offset, shape=(header.data_bytes,))
        if header.data_bytes
        else np.zeros(0, np.uint8)  # mmap refuses an empty range; every tensor here is empty
    )
    tensors = {name: _tensor(data, entry) for name, entry in header.entries.items()}
    alias = header.metadata.get(ALIAS_KEY) or None
    return LoraFile(
        path=path,
        name=path.stem,
        alias=alias,
        tensors=MappingProxyType(tensors),
        metadata=header.metadata,
        data_offset=header.data_offset,
    )


def lora_hash(path: str | Path) -> str:
    """A1111's hash of a LoRA (kohya's "addnet" hash): hex sha256 of the file's bytes after the header
    (the 8-byte length and the JSON), so editing the metadata keeps the hash. A1111 shows its first 12
    hex digits in ``Lora hashes:``. AdapterError for a file that is not a readable safetensors file."""
    path = Path(path)
    check_suffix(path)
    header = read_header(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            handle.seek(header.data_offset)
            while chunk := handle.read(_CHUNK_BYTES):
                digest.update(chunk)
    except OSError as error:
        raise AdapterError(f"cannot read LoRA {path}: {error.strerror or error}") from None
    return digest.hexdigest()
