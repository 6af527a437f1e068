"""Reading the tensors of a weights file: a single-file checkpoint, a VAE file, a diffusers component.

:func:`open_tensors` reads ``.safetensors`` (header first, each tensor on access, with plain reads) and
weights-only torch pickles (``.ckpt``, ``.pt``, ``.pth``, ``.bin``); both give a :class:`TensorFile`,
whose ``shapes`` need no tensor data. :class:`Float32Tensors` and :class:`MetaTensors` are views of
one for loading (float32 on read) and for checking a key map (shapes only). Export side: imports torch.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import ModelFolderError
from engine.models.folder import check_safetensors, safetensors_header

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# safetensors dtype names (the format is little-endian, as every platform torch runs on here).
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SHOWN = 5  # how many names an error lists


class TensorFile(Mapping[str, torch.Tensor]):
    """Tensors by name, produced by ``read(name)`` on access; ``shapes`` (name -> shape) needs no
    tensor data. What :func:`open_tensors` returns reads a file as stored (no upcast)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], read: Callable[[str], torch.Tensor]) -> None:
        self.shapes = shapes
        self._read = read

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise KeyError(key)
        return self._read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __contains__(self, key: object) -> bool:
        return key in self.shapes


class Float32Tensors(TensorFile):
    """A view of a :class:`TensorFile` that returns each tensor as float32 when read, so a converted
    model holds one float32 copy and never the whole file in its stored precision besides."""

    def __init__(self, file: TensorFile) -> None:
        super().__init__(file.shapes, lambda key: file[key].to(torch.float32))


class MetaTensors(TensorFile):
    """Shape-only stand-ins (meta device) for a file's tensors: running a key map on them gives the
    converted shapes without reading any weight."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        super().__init__(shapes, lambda key: torch.empty(shapes[key], device="meta"))


@contextmanager
def open_tensors(path: Path) -> Iterator[TensorFile]:
    """The tensors of a ``.safetensors`` file (header read, data on access, valid inside the ``with``)
    or of a torch pickle, :data:`PICKLE_SUFFIXES` (``torch.load(weights_only=True)``, memory-mapped
    when in torch's zip format: no code runs; a nested ``state_dict`` is unwrapped, non-tensor
    entries skipped). One-line ModelFolderError naming the file for a missing, corrupt or truncated
    file, a pickle that needs code to load, or an unknown suffix."""
    if not path.is_file():
        raise ModelFolderError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        with _open_safetensors(path) as file:
            yield file
    elif suffix in PICKLE_SUFFIXES:
        yield _open_pickle(path)
    else:
        expected = ", ".join((".safetensors", *PICKLE_SUFFIXES))
        raise ModelFolderError(f"{path}: unknown weights type '{suffix}'; expected one of {expected}")


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


@contextmanager
def _open_safetensors(path: Path) -> Iterator[TensorFile]:
    """Tensors read with plain reads into fresh memory, not memory-mapped: a map's pages would count
    in the process's resident memory until unmapped, adding the whole file to the peak."""
    check_safetensors(path)
    header = safetensors_header(path)
    start = header.pop("__header_bytes__")
    header.pop("__metadata__", None)
    try:
        entries = {name: _entry(entry, start) for name, entry in header.items()}
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFolderError(f"corrupt checkpoint {path}: header entry {one_line(error)}") from None
    with path.open("rb") as handle:

        def read(name: str) -> torch.Tensor:
            entry = entries[name]
            buffer = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
            handle.seek(entry.begin)
            if handle.readinto(memoryview(buffer.numpy())) != len(buffer):
                raise ModelFolderError(f"truncated checkpoint {path}: '{name}' is cut short")
            return buffer.view(entry.dtype).reshape(entry.shape)

        yield TensorFile({name: entry.shape for name, entry in entries.items()}, read)


def _entry(entry: Mapping[str, Any], start: int) -> _Entry:
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(f"dtype {entry['dtype']!r} is not supported")
    shape = tuple(int(d) for d in entry["shape"])
    begin, end = (int(offset) for offset in entry["data_offsets"])
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{shape} {entry['dtype']} does not fit its {end - begin} bytes")
    return _Entry(dtype, shape, start + begin, start + end)


def _open_pickle(path: Path) -> TensorFile:
    mmap = zipfile.is_zipfile(path)  # torch's zip format; legacy pickles cannot be memory-mapped
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if "weights_only" in str(error) or "global" in str(error).lower():
            raise ModelFolderError(
                f"{path}: this pickle needs to run code to load, which is unsafe; convert it to "
                ".safetensors with a tool you trust"
            ) from None
        raise ModelFolderError(f"corrupt checkpoint {path}: {one_line(error)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise ModelFolderError(f"corrupt or truncated checkpoint {path}: {one_line(error)}") from None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: holds a {type(data).__name__}, not a dict of tensors")
    tensors = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    return TensorFile({k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__)


def one_line(error: BaseException) -> str:
    """An exception's message on one line (white space folded, at most 300 characters), or its type's
    name when it has none: for quoting a library's error inside a one-line ModelFolderError."""
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__


def first_names(names: list[str]) -> str:
    """The first five names quoted, then ", ... N more" when there are more: for error messages."""
    more = f", ... {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(f"'{n}'" for n in names[:_SHOWN]) + more
