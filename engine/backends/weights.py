"""Patching a graph's weights at run time (LoRA): the protocol backends offer, and ONNX file access.

A backend whose loader has the :class:`Patchable` methods can load a graph with some weights replaced,
without re-export. Weights are named by LoRA target ("unet:down_blocks.0...attn1.to_q", see
:mod:`engine.onnx.weight_map`) and given in torch layout, (out, in) or (out, in, kh, kw) float32; the
backend converts them to what its graph stores.

For ONNX files export records where each target's initializer lies (:class:`engine.manifest.WeightRef`):
:func:`base_weight` reads it as a read-only ``np.memmap`` (no ``onnx`` import, nothing copied), and
:func:`stored_initializers` turns merged torch-layout weights into the initializer values to feed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from engine.errors import EngineFolderError
from engine.manifest import WeightRef
from engine.runtime import Graph
from engine.specs import Network


@runtime_checkable
class Patchable(Protocol):
    """A graph loader that can swap weights. in_place: True when :meth:`load_patched` changes the one
    loaded graph (torch, TensorRT refit; the caller must not keep an old graph), False when it returns
    a new graph beside the base one (ONNX Runtime)."""

    in_place: bool

    def lora_targets(self, network: Network) -> Mapping[str, tuple[int, ...]]:
        """Every patchable weight of the network's graph: target -> torch-layout shape."""
        ...

    def load_patched(
        self, network: Network, targets: Collection[str], merge: Merge, identity: str | None = None
    ) -> Graph:
        """The network's graph with each target's weight replaced by ``merge(target, exported weight)``
        (both torch layout; the exported array is read-only), every other weight as exported; no targets
        give the exported weights exactly. Merged weights are made and converted one at a time, so
        at most one full-precision copy of the changed weights exists besides what the graph keeps.
        identity: what determines the merged weights (e.g. LoRA file hashes and multipliers), so a
        backend may cache the patched graph on it; None: never cached."""
        ...


# merge(target, exported weight in torch layout, read-only) -> the new weight in torch layout.
Merge = Callable[[str, np.ndarray], np.ndarray]


def base_weight(engine_dir: Path, ref: WeightRef) -> np.ndarray:
    """A weight as export stored it, viewed in torch layout: a read-only memmap of the graph's bytes.

    Raises EngineFolderError when the file is shorter than the manifest says (a damaged folder)."""
    path = Path(engine_dir) / ref.file
    count = int(np.prod(ref.stored_shape))
    needed = ref.offset + count * np.dtype(ref.dtype).itemsize
    size = path.stat().st_size if path.is_file() else -1
    if size < needed:
        raise EngineFolderError(
            f"{path} is missing or too short for weight {ref.initializer} ({size} < {needed} bytes); "
            "re-export the model"
        )
    stored = np.memmap(
        path, dtype=np.dtype(ref.dtype).newbyteorder("<"), mode="r", offset=ref.offset, shape=ref.stored_shape
    )
    return stored.T if ref.transposed else stored


def stored_value(ref: WeightRef, value: np.ndarray) -> np.ndarray:
    """A torch-layout weight as the graph stores it (transposed or not, its dtype, C-contiguous)."""
    if tuple(value.shape) != tuple(ref.shape):
        raise ValueError(f"{ref.initializer}: weight of shape {value.shape}, the graph holds {ref.shape}")
    return np.ascontiguousarray(value.T if ref.transposed else value, dtype=np.dtype(ref.dtype))


def stored_initializers(
    engine_dir: Path, refs: Mapping[str, WeightRef], targets: Collection[str], merge: Merge
) -> dict[str, np.ndarray]:
    """Initializer name -> ``merge(target, exported weight)`` in the graph's layout and dtype, for each
    target, one at a time (the torch-layout result of each is dropped once converted). Raises KeyError
    for a target the graph does not map (callers check first)."""
    stored = {}
    for target in targets:
        ref = refs[target]
        stored[ref.initializer] = stored_value(ref, merge(target, base_weight(engine_dir, ref)))
    return stored


def patched_model_bytes(
    graph_file: Path, refs: Mapping[str, WeightRef], values: Mapping[str, np.ndarray]
) -> bytes:
    """The graph file's bytes with inline initializers overwritten in place (same size, same dtype):
    a valid ONNX model holding the new values, made without parsing the protobuf. ``values`` by
    initializer name, as :func:`stored_initializers` gives them; every one must be inline in this file."""
    data = bytearray(Path(graph_file).read_bytes())
    for ref in refs.values():
        value = values.get(ref.initializer)
        if value is None:
            continue
        raw = value.astype(np.dtype(ref.dtype).newbyteorder("<"), copy=False).tobytes()
        data[ref.offset : ref.offset + len(raw)] = raw
    return bytes(data)
