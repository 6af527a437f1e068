"""Content hashes: one file hasher and one definition of an ONNX graph's content hash.

Export records :func:`graph_content_hash` in the manifest; the ONNX Runtime cache and the TensorRT plan
key compare against that same value, so a graph or weight change is seen by every cache. Reads the ONNX
protobuf without the ``onnx`` package (standard library only).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import re
from pathlib import Path

from engine.errors import EngineFolderError

# An ONNX StringStringEntryProto whose key is "location": the file of an external tensor.
_LOCATION_ENTRY = re.compile(rb"\x0a\x08location\x12")


_CHUNK_BYTES = 1 << 22


def json_digest(value: object) -> str:
    """Hex sha256 of a JSON value with sorted keys: the digest that names a cache entry by its key."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of one file's bytes, read in 4 MiB chunks (a UNet's weights never sit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def external_data_files(network_file: Path) -> list[Path]:
    """Files holding a graph's external initializers, in first-use order, read from the protobuf.

    Raises EngineFolderError naming the graph when a referenced file is missing.
    """
    found: dict[Path, None] = {}
    if network_file.stat().st_size == 0:  # mmap rejects empty files; ONNX Runtime reports them
        return []
    with open(network_file, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for match in _LOCATION_ENTRY.finditer(data):
            length, start = _varint(data, match.end())
            location = bytes(data[start : start + length]).decode("utf-8", errors="replace")
            found[network_file.parent / location] = None
    missing = [path.name for path in found if not path.is_file()]
    if missing:
        raise EngineFolderError(f"{network_file}: external data file(s) {missing} are missing")
    return list(found)


def graph_content_hash(network_file: Path) -> str:
    """The graph's identity: sha256 over ``name NUL sha256(file) NUL`` of the graph file, then each of
    its external data files. Weights count, not just the graph; a rename of the data file counts too."""
    digest = hashlib.sha256()
    for path in [network_file, *external_data_files(network_file)]:
        digest.update(f"{path.name}\0{sha256_file(path)}\0".encode())
    return digest.hexdigest()


def _varint(data: mmap.mmap, position: int) -> tuple[int, int]:
    """Decode a protobuf varint at position; return (value, position after it)."""
    value, shift = 0, 0
    while position < len(data):
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return value, position
        shift += 7
    return value, position
